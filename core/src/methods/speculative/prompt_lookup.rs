//! Prompt lookup (PLD; input-guided aggressive decoding): find the most recent earlier occurrence of the last
//! n tokens (n = 3, 2, 1) in prompt + output and propose the tokens that followed it. No model, point masses.

use super::drafter::{
    Draft, DraftInput, Drafter, Observation, PRIOR_ACCEPTANCE, drift_acceptance, update_acceptance,
};
use super::verifier::DraftTree;
use crate::error::Result;

/// Longest n-gram tried first: longer matches predict better, shorter ones match more often.
const MAX_NGRAM: usize = 3;

pub struct PromptLookup {
    /// Running per-token acceptance of drafts that followed a match of the last n tokens, index n - 1: a longer
    /// match predicts better, so the draft length can follow the match found.
    acceptance: [f64; MAX_NGRAM],
    /// The match length of the last draft, if it drafted anything.
    last_match: Option<usize>,
}

impl Default for PromptLookup {
    fn default() -> Self {
        Self {
            acceptance: [PRIOR_ACCEPTANCE; MAX_NGRAM],
            last_match: None,
        }
    }
}

/// The match: (n, start of the continuation) for the most recent earlier occurrence of the last n tokens.
pub fn find_match(context: &[u32]) -> Option<(usize, usize)> {
    let len = context.len();
    for n in (1..=MAX_NGRAM).rev() {
        if len <= n {
            continue;
        }
        let tail = &context[len - n..];
        // Most recent first: the local context predicts best. The occurrence must end before the tail itself.
        for start in (0..len - n).rev() {
            if &context[start..start + n] == tail {
                return Some((n, start + n));
            }
        }
    }
    None
}

/// Up to `k` tokens of `context` from `from`, the start of a match's continuation.
pub fn continuation(context: &[u32], from: usize, k: usize) -> &[u32] {
    let rest = context.get(from..).unwrap_or_default();
    rest.get(..k).unwrap_or(rest)
}

impl Drafter for PromptLookup {
    fn name(&self) -> &'static str {
        "prompt-lookup"
    }

    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft> {
        self.last_match = None;
        let Some((n, from)) = find_match(input.context) else {
            return Ok(Draft {
                note: "no earlier match of the last 1-3 tokens".to_owned(),
                ..Draft::default()
            });
        };
        let slot = n - 1;
        let (k, policy) = match (
            input.params.speculative.draft_cost,
            self.acceptance.get(slot),
        ) {
            (Some(_), Some(&a)) => (
                input.point_mass_budget_at(a),
                format!(" (cost-aware, acceptance after such matches {a:.2})"),
            ),
            _ => (input.point_mass_budget(), String::new()),
        };
        let tokens = continuation(input.context, from, k);
        if tokens.is_empty() {
            if let Some(a) = self.acceptance.get_mut(slot) {
                drift_acceptance(a);
            }
        } else {
            self.last_match = Some(n);
        }
        Ok(Draft {
            tree: DraftTree::point_chain(tokens),
            forward_calls: 0,
            note: format!(
                "matched the last {n} token(s); proposed {}{policy}",
                tokens.len()
            ),
            exit_layers: None,
        })
    }

    fn observe(&mut self, obs: &Observation<'_>) -> Result<()> {
        let Some(n) = self.last_match.take() else {
            return Ok(());
        };
        let drafted = obs.tokens.len().saturating_sub(1);
        let accepted = obs.accepted_path.len();
        // Drafts tested: the accepted ones and the first rejected one, if any.
        let tested = (accepted + 1).min(drafted);
        if let Some(a) = self.acceptance.get_mut(n - 1) {
            update_acceptance(a, accepted, tested);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_most_recent_longest_match() {
        let ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3];
        // last 3 = [8,2,3] never seen; last 2 = [2,3] most recently at 5..7 -> continuation from 7
        assert_eq!(find_match(&ctx), Some((2, 7)));
        assert_eq!(continuation(&ctx, 7, 2), [7, 8]);
        assert_eq!(continuation(&ctx, 9, 5), [2, 3]);
        assert_eq!(find_match(&[5, 6]), None);
    }
}
