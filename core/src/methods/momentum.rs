//! Momentum decoding (Lan et al., 2022): the text is a walk on a graph whose nodes are tokens, and a token
//! already in the text closes a circuit. Among the k most likely tokens, choose the one maximising
//! p(v) - α·R(L(v)), where L(v) is the length of the longest n-gram (n ≤ 5) that choosing v would repeat and R a
//! resistance that lets short loops pass ("of the", a repeated name) and stops long ones. R follows the
//! authors' code (`ngram_lookup_table_ours`): 0 up to L = 3, 5 at L = 4, infinite beyond. One forward per token,
//! like greedy: the whole cost is bookkeeping over the token sequence. α = 0 is greedy decoding.

use super::{DecodingMethod, Sequence, StepContext, advance, empty_step};
use crate::engine::Model;
use crate::error::Result;
use crate::sampling::{PositionStats, top_n};
use crate::trace::{MomentumCandidate, MomentumStep, StepPayload, StepRecord, TokenSource};

/// Longest repeated n-gram looked for.
const MAX_LOOP: usize = 5;

pub struct Momentum {
    seq: Sequence,
    /// Output tokens already in the prefill when the run started (a fork's), so not to be counted twice.
    base: Option<usize>,
}

impl Momentum {
    pub fn new(model: &Model) -> Self {
        Self {
            seq: Sequence::new(model),
            base: None,
        }
    }
}

/// R(L): `None` is infinite.
fn resistance(loop_len: usize) -> Option<f32> {
    match loop_len {
        0..=3 => Some(0.0),
        4 => Some(5.0),
        _ => None,
    }
}

/// The longest n (≤ `MAX_LOOP`) such that `text`'s last n - 1 tokens followed by `candidate` already occur in
/// `text`; 1 when only the token itself recurs, 0 when it is new.
fn loop_length(text: &[u32], candidate: u32) -> usize {
    if !text.contains(&candidate) {
        return 0;
    }
    for n in (2..=MAX_LOOP.min(text.len() + 1)).rev() {
        let prefix = &text[text.len() + 1 - n..];
        // Occurrences end strictly before the end of `text`: the query n-gram itself is not there yet.
        let found = text
            .windows(n)
            .any(|w| w[n - 1] == candidate && w[..n - 1] == *prefix);
        if found {
            return n;
        }
    }
    1
}

impl DecodingMethod for Momentum {
    fn name(&self) -> &'static str {
        "momentum"
    }

    fn step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepRecord> {
        let mut record = empty_step();
        let logits = advance(&mut self.seq, ctx, &mut record)?;
        let stats = PositionStats::new(&logits);
        let alpha = ctx.params.search.alpha;
        let base = *self.base.get_or_insert(ctx.generated.len());
        let text: Vec<u32> = ctx
            .prefill
            .iter()
            .chain(ctx.generated.get(base..).unwrap_or_default())
            .copied()
            .collect();
        let candidates: Vec<MomentumCandidate> =
            top_n(&stats.logprobs, ctx.params.search.candidates.max(1))
                .into_iter()
                .map(|id| {
                    let prob = stats.logprobs[id as usize].exp();
                    let loop_len = loop_length(&text, id);
                    let resistance = resistance(loop_len);
                    MomentumCandidate {
                        id,
                        token: ctx.model.tokenizer.token_text(id),
                        prob,
                        loop_len,
                        resistance,
                        // 0·∞ is taken as 0, so that α = 0 is exactly greedy decoding.
                        score: match resistance {
                            Some(r) => Some(prob - alpha * r),
                            None if alpha == 0.0 => Some(prob),
                            None => None,
                        },
                    }
                })
                .collect();
        // Ties, and the case where every candidate is barred, go to the more likely candidate.
        let key = |c: &MomentumCandidate| c.score.unwrap_or(f32::NEG_INFINITY);
        let chosen = (0..candidates.len()).fold(0, |b, i| {
            if key(&candidates[i]) > key(&candidates[b]) {
                i
            } else {
                b
            }
        });
        let id = candidates.get(chosen).map_or(0, |c| c.id);
        record.tokens.push(stats.record(
            &ctx.model.tokenizer,
            id,
            ctx.next_position(),
            None,
            TokenSource::Search,
        ));
        record.payload = Some(StepPayload::Momentum(Box::new(MomentumStep {
            alpha,
            candidates,
            chosen,
        })));
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_lengths_count_the_repeated_ngram() {
        let text = [1, 2, 3, 4, 5, 1, 2, 3, 4];
        assert_eq!(loop_length(&text, 9), 0);
        assert_eq!(loop_length(&text, 5), 5, "1 2 3 4 5 again");
        assert_eq!(loop_length(&text, 1), 1, "4 1 never occurred");
        assert_eq!(loop_length(&[7, 8, 7], 8), 2);
        assert_eq!(resistance(3), Some(0.0));
        assert_eq!(resistance(5), None);
    }
}
