//! Contrastive search (Su et al., 2022; "Contrastive Search Is What You Need", Su & Collier, 2023): among the k
//! most likely tokens, choose the one maximising (1 - α)·p(v) - α·max_j cos(h_v, h_j), where h_v is the
//! last-layer representation of the sequence extended by v and h_j those of every earlier token, prompt
//! included. The penalty steers away from tokens whose continuation would look like something already said,
//! which is what makes greedy text loop. α = 0 is greedy decoding.
//!
//! Representations are taken after the final norm, as Hugging Face's `hidden_states[-1]` is. The k candidates
//! are one batched forward on k copies of the cache; the chosen row's cache, logits and representation are
//! kept, so each step costs that one forward.

use super::{DecodingMethod, PREFILL_CHUNK, StepContext, empty_step};
use crate::engine::Model;
use crate::error::{Error, Result};
use crate::model::{Capture, KvCache, Logits, Mask, logits_row};
use crate::sampling::{PositionStats, top_n};
use crate::trace::{ContrastiveCandidate, ContrastiveStep, StepPayload, StepRecord, TokenSource};

pub struct Contrastive {
    state: Option<State>,
}

struct State {
    cache: KvCache,
    /// Unit-length last-layer representations of every token fed so far (prompt and output).
    seen: Vec<Vec<f32>>,
    /// Logits for the next position.
    logits: Vec<f32>,
}

impl Contrastive {
    pub fn new(_model: &Model) -> Self {
        Self { state: None }
    }
}

impl DecodingMethod for Contrastive {
    fn name(&self) -> &'static str {
        "contrastive"
    }

    fn step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepRecord> {
        let llama = &ctx.model.llama;
        let last_layer = llama.config.n_layers;
        let capture = Capture {
            hidden_states: true,
            ..Capture::default()
        };
        let mut record = empty_step();
        let state = match &mut self.state {
            Some(s) => s,
            None => {
                let mut cache = llama.new_cache();
                let mut seen = Vec::with_capacity(ctx.prefill.len());
                let mut logits = None;
                for chunk in ctx.prefill.chunks(PREFILL_CHUNK) {
                    ctx.check_cancel()?;
                    let start = cache.len();
                    let positions: Vec<usize> = (start..start + chunk.len()).collect();
                    let out = llama.forward(
                        &mut cache,
                        chunk,
                        &positions,
                        1,
                        &Mask::Causal,
                        Logits::Last,
                        &capture,
                    )?;
                    seen.extend(representations(ctx, &out.hidden_states, last_layer)?);
                    logits = Some(logits_row(&out.logits, 0, 0)?);
                    record.target_forward_calls += 1;
                }
                record.prefill_tokens = ctx.prefill.len();
                self.state.insert(State {
                    cache,
                    seen,
                    logits: logits.ok_or(Error::EmptyPrompt)?,
                })
            }
        };
        let alpha = ctx.params.search.alpha;
        let stats = PositionStats::new(&state.logits);
        let candidates = top_n(&stats.logprobs, ctx.params.search.candidates.max(1));
        let k = candidates.len();
        // The cache knows the true position (a fork's tokens are in the prefill and in `generated` alike).
        let position = state.cache.len();

        // Look one token ahead with every candidate at once.
        ctx.check_cancel()?;
        let mut ahead = state.cache.clone();
        ahead.select_batch(&vec![0; k])?;
        let out = llama.forward(
            &mut ahead,
            &candidates,
            &vec![position; k],
            k,
            &Mask::Causal,
            Logits::Last,
            &capture,
        )?;
        record.target_forward_calls += 1;
        let reps = representations(ctx, &out.hidden_states, last_layer)?;

        let mut scored = Vec::with_capacity(k);
        for (&id, rep) in candidates.iter().zip(&reps) {
            let (max_similarity, most_similar_position) = state
                .seen
                .iter()
                .enumerate()
                .map(|(j, h)| (dot(rep, h), j))
                .fold(
                    (f32::NEG_INFINITY, 0),
                    |best, c| {
                        if c.0 > best.0 { c } else { best }
                    },
                );
            let prob = stats.logprobs[id as usize].exp();
            scored.push(ContrastiveCandidate {
                id,
                token: ctx.model.tokenizer.token_text(id),
                prob,
                max_similarity,
                most_similar_position,
                score: (1.0 - alpha) * prob - alpha * max_similarity,
            });
        }
        // Ties go to the earlier candidate: the more likely one, then the lower id.
        let chosen = (0..scored.len()).fold(0, |b, i| {
            if scored[i].score > scored[b].score {
                i
            } else {
                b
            }
        });
        let id = candidates[chosen];
        ahead.select_batch(&[chosen])?;
        state.cache = ahead;
        state.logits = logits_row(&out.logits, chosen, 0)?;
        if let Some(rep) = reps.into_iter().nth(chosen) {
            state.seen.push(rep);
        }
        record.tokens.push(stats.record(
            &ctx.model.tokenizer,
            id,
            position,
            None,
            TokenSource::Search,
        ));
        record.payload = Some(StepPayload::Contrastive(Box::new(ContrastiveStep {
            alpha,
            candidates: scored,
            chosen,
        })));
        Ok(record)
    }
}

/// Unit-length final-norm representations of every row and position of the last layer's residual stream,
/// row-major.
fn representations(
    ctx: &StepContext<'_>,
    hidden_states: &[candle_core::Tensor],
    last_layer: usize,
) -> Result<Vec<Vec<f32>>> {
    let hidden = hidden_states.get(last_layer).ok_or_else(|| {
        Error::MethodPanicked("the forward returned no last-layer hidden state".into())
    })?;
    let normed = ctx.model.llama.final_norm(hidden)?;
    let rows = normed.to_dtype(candle_core::DType::F32)?.to_vec3::<f32>()?;
    Ok(rows
        .into_iter()
        .flatten()
        .map(|mut v| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
            v
        })
        .collect())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
