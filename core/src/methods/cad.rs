//! Context-aware decoding (Shi et al., 2023): two copies of the sequence run side by side, one with the
//! context (a document) before the prompt and one without, and each token is chosen from
//! (1 + α)·logits(context, prompt) - α·logits(prompt). Subtracting what the model would say anyway amplifies
//! what the context adds, so the output leans on the document over the model's prior knowledge. α = 0 is plain
//! decoding of the prompt with the context prepended. The choice is greedy or sampled on the adjusted logits,
//! per the sampling parameters.
//!
//! The conditioned sequence is the text `context + "\n\n" + prompt`, read once at the first step. Each step
//! feeds the chosen token to both sequences: two forwards per token.

use super::{DecodingMethod, Sequence, StepContext, advance, empty_step};
use crate::engine::Model;
use crate::error::{Error, Result, bad_param};
use crate::sampling::{PositionStats, top_n, warp};
use crate::trace::{CadStep, Candidate, StepPayload, StepRecord, TokenSource};

/// Tokens listed per distribution in the payload.
const SHOWN: usize = 10;

pub struct Cad {
    plain: Sequence,
    conditioned: Sequence,
}

impl Cad {
    pub fn new(model: &Model) -> Self {
        Self {
            plain: Sequence::new(model),
            conditioned: Sequence::new(model),
        }
    }
}

impl DecodingMethod for Cad {
    fn name(&self) -> &'static str {
        "cad"
    }

    fn step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepRecord> {
        let mut record = empty_step();
        let plain = advance(&mut self.plain, ctx, &mut record)?;
        let conditioned = if self.conditioned.is_empty() {
            let ids = context_prompt(ctx)?;
            let (logits, calls) = self.conditioned.feed(&ids, ctx.cancel)?;
            record.target_forward_calls += calls;
            logits
        } else {
            let last = ctx.generated.last().copied().ok_or_else(|| {
                Error::MethodPanicked("a step after the first found no generated token".into())
            })?;
            let (logits, calls) = self.conditioned.feed(&[last], ctx.cancel)?;
            record.target_forward_calls += calls;
            logits
        };
        let alpha = ctx.params.search.alpha;
        let adjusted: Vec<f32> = conditioned
            .iter()
            .zip(&plain)
            .map(|(c, p)| (1.0 + alpha) * c - alpha * p)
            .collect();
        let warped = warp(&adjusted, &ctx.params.sampling);
        let id = warped.sample(ctx.rng);
        let greedy = ctx.params.sampling.is_greedy();
        // The token's statistics are those of the distribution it was chosen from; the payload keeps the two
        // distributions that made it.
        let stats = PositionStats::new(&adjusted);
        record.tokens.push(stats.record(
            &ctx.model.tokenizer,
            id,
            ctx.next_position(),
            (!greedy).then_some(&warped),
            if greedy {
                TokenSource::Search
            } else {
                TokenSource::Sampled
            },
        ));
        let top = |logits: &[f32]| -> Vec<Candidate> {
            let s = PositionStats::new(logits);
            top_n(&s.logprobs, SHOWN)
                .into_iter()
                .map(|c| Candidate {
                    id: c,
                    token: ctx.model.tokenizer.token_text(c),
                    logprob: s.logprobs[c as usize],
                    warped_prob: None,
                })
                .collect()
        };
        record.payload = Some(StepPayload::Cad(Box::new(CadStep {
            alpha,
            with_context: top(&conditioned),
            without_context: top(&plain),
            adjusted: top(&adjusted),
        })));
        Ok(record)
    }
}

/// The conditioned sequence: the context, a blank line, then the prompt (and a fork's tokens) as text.
fn context_prompt(ctx: &StepContext<'_>) -> Result<Vec<u32>> {
    let tok = &ctx.model.tokenizer;
    let context = ctx
        .params
        .search
        .context
        .as_deref()
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| bad_param("context", "", "context-aware decoding needs a context"))?;
    let bos = tok.info().bos_token_id.filter(|_| tok.info().add_bos);
    let prompt = match (bos, ctx.prefill.first()) {
        (Some(b), Some(&first)) if first == b => &ctx.prefill[1..],
        _ => ctx.prefill,
    };
    // Tokenized as one text: BPE merges across the seam ("\n\n" alone is one token, before a word it is two),
    // so concatenating separately tokenized parts would differ from a plain run of the same text.
    let ids = tok.encode(&format!("{context}\n\n{}", tok.decode(prompt)))?;
    let context_length = ctx.model.llama.config.context_length;
    if ids.len() >= context_length {
        return Err(Error::PromptTooLong {
            prompt_tokens: ids.len(),
            context_length,
        });
    }
    Ok(ids)
}
