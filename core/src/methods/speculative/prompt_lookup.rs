//! Prompt lookup (PLD; input-guided aggressive decoding): find the most recent earlier occurrence of the last
//! n tokens (n = 3, 2, 1) in prompt + output and propose the tokens that followed it. No model, point masses.

use super::drafter::{Draft, DraftInput, Drafter};
use super::verifier::DraftTree;
use crate::error::Result;

/// Longest n-gram tried first: longer matches predict better, shorter ones match more often.
const MAX_NGRAM: usize = 3;

#[derive(Default)]
pub struct PromptLookup;

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

/// Up to `k` tokens following the match.
pub fn lookup(context: &[u32], k: usize) -> (Vec<u32>, Option<usize>) {
    match find_match(context) {
        Some((n, from)) => {
            let to = (from + k).min(context.len());
            (context[from..to].to_vec(), Some(n))
        }
        None => (Vec::new(), None),
    }
}

impl Drafter for PromptLookup {
    fn name(&self) -> &'static str {
        "prompt-lookup"
    }

    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft> {
        let k = input.point_mass_budget();
        let (tokens, n) = lookup(input.context, k);
        let note = match n {
            Some(n) => format!("matched the last {n} token(s); proposed {}", tokens.len()),
            None => "no earlier match of the last 1-3 tokens".to_owned(),
        };
        Ok(Draft {
            tree: DraftTree::point_chain(&tokens),
            forward_calls: 0,
            note,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_most_recent_longest_match() {
        let ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3];
        // last 3 = [8,2,3] never seen; last 2 = [2,3] most recently at 5..7 -> continuation 7, 8
        assert_eq!(lookup(&ctx, 2), (vec![7, 8], Some(2)));
        assert_eq!(lookup(&[5, 6], 3), (Vec::new(), None));
    }
}
