//! `lookahead` (Lookahead decoding, Fu et al. 2024): Jacobi iterations over a window of guessed future tokens run
//! inside the verification forward and harvest an n-gram pool; pool n-grams that start with the last committed
//! token are verified in the same forward.
//!
//! Each step drafts one tree: the Jacobi window as a chain off the root (guesses for the next `WINDOW` positions;
//! where a guess equals the target's argmax it is accepted like any draft, which is Jacobi decoding's own
//! acceptance), and the pool's continuations of the root token as further branches. After the forward the target's
//! argmax at every window position becomes the next iteration's guesses, and the last `NGRAM - 1` iterations, read
//! along diagonals (iteration l at position i + l), give the n-grams the pool keeps: each token of such an n-gram
//! was the model's pick right after the one before it. All drafts are point masses, so the shared verifier keeps
//! sampling lossless too.

use std::collections::{BTreeMap, VecDeque};

use super::drafter::{Draft, DraftInput, Drafter, Observation};
use super::verifier::{DraftTree, DraftTreeNode};
use crate::error::Result;
use crate::sampling::{Warped, argmax};

/// Guessed positions per Jacobi iteration (the paper's W; small, since every guess is a row of the forward).
const WINDOW: usize = 5;
/// Length of harvested n-grams, the key token included (the paper's N).
const NGRAM: usize = 4;
/// Pool continuations verified per step (the paper's G), and kept per key token.
const CANDIDATES: usize = 3;

#[derive(Default)]
pub struct Lookahead {
    /// The last iterations' guesses, oldest first; each (position of its first token, tokens).
    levels: VecDeque<(usize, Vec<u32>)>,
    /// Key token → continuations (NGRAM - 1 tokens each), most recent first. A BTreeMap: its order reaches the
    /// trace through the drafts.
    pool: BTreeMap<u32, Vec<Vec<u32>>>,
    /// Position of the first window guess in the last draft, and how many window nodes it had.
    window_at: usize,
    window_len: usize,
}

impl Lookahead {
    /// Guesses for `len` positions from `from` on: the newest iteration's, padded with earlier context tokens
    /// (the paper starts from random prompt tokens; these are deterministic).
    fn guesses(&self, context: &[u32], from: usize, len: usize) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .levels
            .back()
            .map(|(start, tokens)| {
                tokens
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| start + i >= from)
                    .map(|(_, &t)| t)
                    .take(len)
                    .collect()
            })
            .unwrap_or_default();
        let mut fill = context.iter().rev().cycle();
        while out.len() < len {
            match fill.next() {
                Some(&t) => out.push(t),
                None => break,
            }
        }
        out
    }

    /// Adds the n-grams read along the diagonals of the kept iterations.
    fn harvest(&mut self) {
        if self.levels.len() < NGRAM {
            return;
        }
        let (first_start, first) = &self.levels[0];
        for (i, &key) in first.iter().enumerate() {
            let mut gram = Vec::with_capacity(NGRAM - 1);
            for l in 1..NGRAM {
                let position = first_start + i + l;
                let Some(t) = self.levels.get(l).and_then(|(start, tokens)| {
                    position.checked_sub(*start).and_then(|j| tokens.get(j))
                }) else {
                    break;
                };
                gram.push(*t);
            }
            if gram.len() == NGRAM - 1 {
                let kept = self.pool.entry(key).or_default();
                kept.retain(|g| *g != gram);
                kept.insert(0, gram);
                kept.truncate(CANDIDATES);
            }
        }
    }
}

/// Inserts `tokens` as a path from the root into `nodes`, sharing existing prefixes (a trie of point masses).
fn insert_path(nodes: &mut Vec<DraftTreeNode>, tokens: &[u32]) {
    let mut parent = None;
    for &token in tokens {
        let existing = nodes
            .iter()
            .position(|n| n.parent == parent && n.token == token);
        parent = Some(existing.unwrap_or_else(|| {
            nodes.push(DraftTreeNode {
                token,
                parent,
                q: Warped::point(token),
            });
            nodes.len() - 1
        }));
    }
}

impl Drafter for Lookahead {
    fn name(&self) -> &'static str {
        "lookahead"
    }

    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft> {
        let root = input.root_position();
        let window_len = WINDOW.min(input.max_len);
        let window = self.guesses(input.context, root + 1, window_len);
        let mut nodes = Vec::new();
        insert_path(&mut nodes, &window);
        self.window_at = root + 1;
        self.window_len = nodes.len();
        let key = input.context.last().copied();
        let candidates = key
            .and_then(|k| self.pool.get(&k))
            .cloned()
            .unwrap_or_default();
        let depth = (NGRAM - 1).min(input.max_len);
        for gram in &candidates {
            insert_path(&mut nodes, gram.get(..depth).unwrap_or(gram));
        }
        Ok(Draft {
            tree: DraftTree { nodes },
            forward_calls: 0,
            note: format!(
                "Jacobi window of {window_len}; {} pool n-gram(s) start with the last token; pool holds {} key \
                 tokens",
                candidates.len(),
                self.pool.len()
            ),
        })
    }

    fn observe(&mut self, obs: &Observation<'_>) {
        // The target's argmax after the root and after each window guess: the next Jacobi iterate for the
        // positions window_at ..= window_at + window_len.
        let Some(after_root) = obs.logits.first() else {
            return;
        };
        let mut next = vec![argmax(after_root)];
        for logits in obs.logits.iter().skip(1).take(self.window_len) {
            next.push(argmax(logits));
        }
        self.levels.push_back((self.window_at, next));
        while self.levels.len() > NGRAM {
            self.levels.pop_front();
        }
        self.harvest();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonals_of_the_iterations_become_ngrams() {
        // Four iterations over positions 10.., each token the model's pick after the previous level's token at
        // the previous position: the diagonal from (level 0, position 10) reads 1, 2, 3, 4.
        let mut la = Lookahead {
            levels: VecDeque::from(vec![
                (10, vec![1, 7, 7]),
                (10, vec![9, 2, 7]),
                (10, vec![9, 9, 3]),
                (11, vec![9, 9, 4]),
            ]),
            ..Lookahead::default()
        };
        la.harvest();
        assert_eq!(la.pool.get(&1), Some(&vec![vec![2, 3, 4]]));
        // Positions past a level's end give no n-gram.
        assert!(
            la.pool
                .get(&7)
                .is_none_or(|g| g.iter().all(|g| g.len() == NGRAM - 1))
        );
    }

    #[test]
    fn pool_paths_share_prefixes_with_the_window() {
        let mut nodes = Vec::new();
        insert_path(&mut nodes, &[5, 6, 7]);
        insert_path(&mut nodes, &[5, 6, 8]);
        insert_path(&mut nodes, &[9]);
        let tokens: Vec<(u32, Option<usize>)> = nodes.iter().map(|n| (n.token, n.parent)).collect();
        assert_eq!(
            tokens,
            [
                (5, None),
                (6, Some(0)),
                (7, Some(1)),
                (8, Some(1)),
                (9, None)
            ]
        );
    }
}
