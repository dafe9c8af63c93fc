//! `lookahead` (Lookahead decoding, Fu et al. 2024): Jacobi iterations over a window of guessed future tokens run
//! inside the verification forward and harvest an n-gram pool; pool n-grams that start with the last committed
//! token are verified in the same forward. When sampling, the window follows Speculative Jacobi Decoding (SJD,
//! Teng et al. 2024).
//!
//! Each step drafts one tree: the Jacobi window as a chain off the root (guesses for the next `WINDOW` positions),
//! and the pool's continuations of the root token as further branches. The target's distribution at every window
//! position of the forward gives the next iteration's guesses:
//! - greedy: its argmax (Jacobi decoding). A guess equal to the target's argmax is accepted like any draft, which
//!   is Jacobi decoding's own acceptance; the guesses are point masses.
//! - sampling (SJD): a token drawn from its warped distribution, which stays with the guess as its q. The context
//!   that distribution saw was the previous iteration's guesses, not what the verifier then committed, so q is not
//!   the p the target gives the guess now; the shared verifier accepts it with min(1, p/q) and draws a rejection's
//!   replacement from norm(max(0, p - q)), which is SJD's acceptance rule and keeps the output exactly p.
//!   Each sampled guess also gets a sibling, tested right after it: the argmax a of its q as a point mass. It is
//!   tested with its own q (one-hot) against the residual the guess left, which keeps the output exactly p (see
//!   the verifier), and is accepted there with probability max(0, p(a) - q(a)) / (1 - alpha): it pays where the
//!   target is surer of q's favourite than q was. A position is then accepted with probability
//!   sum over x != a of min(p(x), q(x)) + p(a), at least what the sampled guess alone or the argmax alone gets.
//!   The sibling is a leaf (the window goes on under the sampled guess only), so accepting it ends the path with
//!   a bonus token. It is left out when the guess is the argmax already.
//!
//! The last `NGRAM - 1` iterations, read along diagonals (iteration l at position i + l), give the n-grams the pool
//! keeps: each token of such an n-gram was the model's pick right after the one before it. Pool n-grams and the
//! guesses padded from the context are point masses, which the verifier tests against p(x) (lossless for any
//! token). Pool paths are inserted after the window and its argmax siblings, so a pool path that shares their
//! tokens shares their nodes (and their q) and only adds point-mass nodes after them.

use std::collections::{BTreeMap, VecDeque};

use super::drafter::{Draft, DraftInput, Drafter, Observation};
use super::verifier::{DraftTree, DraftTreeNode};
use crate::error::Result;
use crate::sampling::{RunRng, Warped, argmax, warp};
use crate::trace::{DraftKind, SamplingParams};

/// Guessed positions per Jacobi iteration (the paper's W; small, since every guess is a row of the forward).
const WINDOW: usize = 5;
/// Length of harvested n-grams, the key token included (the paper's N).
const NGRAM: usize = 4;
/// Pool continuations verified per step (the paper's G), and kept per key token.
const CANDIDATES: usize = 3;

/// A token proposed at one position, with the q the verifier will test it against.
#[derive(Clone, Debug, PartialEq)]
struct Proposal {
    token: u32,
    q: Warped,
    kind: DraftKind,
}

impl Proposal {
    /// A deterministic guess (argmax, context padding, pool n-gram): q is the point mass on it.
    fn point(token: u32) -> Self {
        Self {
            token,
            q: Warped::point(token),
            kind: DraftKind::Unlabelled,
        }
    }
}

#[derive(Default)]
pub struct Lookahead {
    /// The last iterations' guesses, oldest first; each (position of its first token, tokens).
    levels: VecDeque<(usize, Vec<u32>)>,
    /// Each token of the newest iteration as a proposal: sampled with the distribution it was drawn from, or the
    /// argmax as a point mass.
    newest: Vec<Proposal>,
    /// Key token → continuations (NGRAM - 1 tokens each), most recent first. A BTreeMap: its order reaches the
    /// trace through the drafts.
    pool: BTreeMap<u32, Vec<Vec<u32>>>,
    /// The target's logits at the last window's positions (position of the first row, rows), not yet made into
    /// an iteration. `observe` has no random stream, so the next draft draws the iteration; that is the same place
    /// in the run's stream (right after the verifier's draws), and a draft never sees tokens drawn before it ran.
    pending: Option<(usize, Vec<Vec<f32>>)>,
    /// Position of the first window guess in the last draft, and how many window nodes it had.
    window_at: usize,
    window_len: usize,
}

impl Lookahead {
    /// Makes the pending rows the newest iteration: argmax without `draw`, else a token sampled from each row's
    /// warped distribution, which is kept as the token's q. Positions before `from` are committed already and
    /// only the pool reads them, so they take the argmax there too (no warp, no draw).
    fn iterate(&mut self, from: usize, draw: Option<(&SamplingParams, &mut RunRng)>) {
        let Some((start, rows)) = self.pending.take() else {
            return;
        };
        let mut draw = draw;
        let newest: Vec<Proposal> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| match draw.as_mut() {
                Some((sampling, rng)) if start + i >= from => {
                    let q = warp(row, sampling);
                    Proposal {
                        token: q.sample(rng),
                        q,
                        kind: DraftKind::Sampled,
                    }
                }
                _ => Proposal::point(argmax(row)),
            })
            .collect();
        self.levels
            .push_back((start, newest.iter().map(|g| g.token).collect()));
        self.newest = newest;
        while self.levels.len() > NGRAM {
            self.levels.pop_front();
        }
        self.harvest();
    }

    /// Guesses for `len` positions from `from` on, each with the distribution it was drawn from: the newest
    /// iteration's, padded with earlier context tokens as point masses (the paper starts from random prompt
    /// tokens; these are deterministic). Also returns how many came from the iteration.
    fn guesses(&self, context: &[u32], from: usize, len: usize) -> (Vec<Proposal>, usize) {
        let mut out: Vec<Proposal> = self
            .levels
            .back()
            .map(|(start, _)| {
                self.newest
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| start + i >= from)
                    .map(|(_, g)| g.clone())
                    .take(len)
                    .collect()
            })
            .unwrap_or_default();
        let iterated = out.len();
        let mut fill = context.iter().rev().cycle();
        while out.len() < len {
            match fill.next() {
                Some(&t) => out.push(Proposal::point(t)),
                None => break,
            }
        }
        (out, iterated)
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

/// Inserts `path` from the root into `nodes`, sharing existing nodes (a trie), each new node with its q and kind.
/// An existing node keeps its own q: the window and its siblings go in first, so a shared node is a window guess
/// with the q it was drawn from, or an argmax sibling with its point mass.
fn insert_path(nodes: &mut Vec<DraftTreeNode>, path: &[Proposal]) {
    let mut parent = None;
    for g in path {
        let existing = nodes
            .iter()
            .position(|n| n.parent == parent && n.token == g.token);
        parent = Some(existing.unwrap_or_else(|| {
            nodes.push(DraftTreeNode {
                token: g.token,
                parent,
                q: g.q.clone(),
                kind: g.kind,
            });
            nodes.len() - 1
        }));
    }
}

/// Adds, after the first `window` nodes (the window chain), the argmax sibling of each sampled guess among them:
/// the argmax of the guess's q as a point mass under the same parent, a leaf. Appended after the chain, so each
/// is tested right after its guess, and the chain's rows stay the forward's first (`observe` reads them).
/// Returns how many were added.
fn add_argmax_siblings(nodes: &mut Vec<DraftTreeNode>, window: usize) -> usize {
    let siblings: Vec<DraftTreeNode> = nodes
        .iter()
        .take(window)
        .filter(|n| n.kind == DraftKind::Sampled)
        .filter_map(|n| {
            // A guess that is its q's argmax already needs no sibling: the residual of its rejection gives it
            // nothing.
            let top = n.q.most_likely().filter(|&t| t != n.token)?;
            Some(DraftTreeNode {
                token: top,
                parent: n.parent,
                q: Warped::point(top),
                kind: DraftKind::ArgmaxSibling,
            })
        })
        .collect();
    let added = siblings.len();
    nodes.extend(siblings);
    added
}

/// A pool n-gram as point masses.
fn points(tokens: &[u32]) -> Vec<Proposal> {
    tokens.iter().map(|&t| Proposal::point(t)).collect()
}

impl Drafter for Lookahead {
    fn name(&self) -> &'static str {
        "lookahead"
    }

    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft> {
        let sampling = input.params.sampling;
        let greedy = sampling.is_greedy();
        let root = input.root_position();
        self.iterate(root + 1, (!greedy).then_some((&sampling, &mut *input.rng)));
        let window_len = WINDOW.min(input.max_len);
        let (window, iterated) = self.guesses(input.context, root + 1, window_len);
        let mut nodes = Vec::new();
        insert_path(&mut nodes, &window);
        self.window_at = root + 1;
        self.window_len = nodes.len();
        let siblings = add_argmax_siblings(&mut nodes, self.window_len);
        let key = input.context.last().copied();
        let candidates = key
            .and_then(|k| self.pool.get(&k))
            .cloned()
            .unwrap_or_default();
        let depth = (NGRAM - 1).min(input.max_len);
        for gram in &candidates {
            insert_path(&mut nodes, &points(gram.get(..depth).unwrap_or(gram)));
        }
        let window_note = if greedy {
            format!("Jacobi window of {window_len}")
        } else {
            // The window is the tree's top chain; say which of its nodes carry a real q and which are siblings.
            format!(
                "SJD window of {window_len} (the top chain): {iterated} sampled from the target's p in the last \
                 iteration, which is their q, {} context token(s) as point masses; {siblings} argmax sibling(s): \
                 a sampled guess's q argmax as a point mass, tested after it",
                window.len().saturating_sub(iterated)
            )
        };
        Ok(Draft {
            tree: DraftTree { nodes },
            forward_calls: 0,
            note: format!(
                "{window_note}; {} pool n-gram(s) (point masses) start with the last token; pool holds {} key \
                 tokens",
                candidates.len(),
                self.pool.len()
            ),
            exit_layers: None,
        })
    }

    fn observe(&mut self, obs: &Observation<'_>) -> Result<()> {
        // A draft that never ran (no room left in the context) leaves its rows; make them an argmax iteration,
        // since there is no random stream here.
        self.iterate(0, None);
        // The target's logits after the root and after each window guess: the next Jacobi iterate for the
        // positions window_at ..= window_at + window_len.
        let rows: Vec<Vec<f32>> = obs
            .logits
            .iter()
            .take(self.window_len + 1)
            .cloned()
            .collect();
        if !rows.is_empty() {
            self.pending = Some((self.window_at, rows));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::rng_from_seed;

    fn rows() -> Vec<Vec<f32>> {
        vec![
            vec![0.0, 1.0, 2.0, 3.0],
            vec![3.0, 0.0, 0.5, 0.1],
            vec![1.0, 1.0, 1.2, 1.0],
        ]
    }

    #[test]
    fn sampled_guesses_keep_their_q_and_pool_paths_stay_point_masses() {
        let sampling = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::greedy()
        };
        let mut la = Lookahead {
            pending: Some((7, rows())),
            ..Lookahead::default()
        };
        la.iterate(8, Some((&sampling, &mut rng_from_seed(1))));
        // The root is at 7 now: position 7 is committed (the argmax, for the pool), 8 and 9 are guessed, 10 is
        // padded.
        assert_eq!(la.levels.back().map(|l| l.1[0]), Some(3));
        assert_eq!(la.newest[0], Proposal::point(3));
        let (window, iterated) = la.guesses(&[9, 8], 8, 3);
        assert_eq!(iterated, 2);
        for (i, g) in window.iter().take(2).enumerate() {
            assert_eq!(g.q, warp(&rows()[i + 1], &sampling));
            assert_eq!(g.kind, DraftKind::Sampled);
            assert!(
                g.q.prob(g.token) > 0.0,
                "a guess outside the q it was drawn from"
            );
        }
        assert_eq!(window[2], Proposal::point(8));
        // A pool path through the first guess shares its node, q included; its continuation is a point mass.
        let mut nodes = Vec::new();
        insert_path(&mut nodes, &window);
        let other = (0..4).find(|&t| t != window[1].token).unwrap_or(0);
        insert_path(&mut nodes, &points(&[window[0].token, other]));
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].q, window[0].q);
        assert_eq!(
            nodes[3],
            DraftTreeNode {
                token: other,
                parent: Some(0),
                q: Warped::point(other),
                kind: DraftKind::Unlabelled,
            }
        );
    }

    /// A chain node as the window would hold it.
    fn node(token: u32, parent: Option<usize>, q: Warped, kind: DraftKind) -> DraftTreeNode {
        DraftTreeNode {
            token,
            parent,
            q,
            kind,
        }
    }

    #[test]
    fn sampled_guesses_get_their_q_argmax_as_a_point_mass_sibling() {
        let q = |pairs: &[(u32, f32)]| Warped {
            support: pairs.to_vec(),
        };
        // Depth 1 drew 2 off its mode 5; depth 2 drew its mode; depth 3 is context padding (a point mass).
        let mut nodes = vec![
            node(2, None, q(&[(5, 0.6), (2, 0.4)]), DraftKind::Sampled),
            node(7, Some(0), q(&[(7, 0.9), (1, 0.1)]), DraftKind::Sampled),
            node(4, Some(1), Warped::point(4), DraftKind::Unlabelled),
        ];
        assert_eq!(add_argmax_siblings(&mut nodes, 3), 1);
        assert_eq!(
            nodes[3],
            node(5, None, Warped::point(5), DraftKind::ArgmaxSibling)
        );
        // Tested right after its guess: the root's children in order.
        let tree = DraftTree { nodes };
        assert_eq!(tree.children(None), vec![0, 3]);
        // A pool path through the sibling shares it and hangs its continuation off it.
        let mut nodes = tree.nodes;
        insert_path(&mut nodes, &points(&[5, 6]));
        assert_eq!(nodes.len(), 5);
        assert_eq!(nodes[4].parent, Some(3));
        assert_eq!(nodes[3].kind, DraftKind::ArgmaxSibling);
    }

    #[test]
    fn greedy_drafts_have_no_siblings() {
        let mut la = Lookahead {
            pending: Some((7, rows())),
            ..Lookahead::default()
        };
        la.iterate(8, None);
        let (window, _) = la.guesses(&[9, 8], 8, 3);
        let mut nodes = Vec::new();
        insert_path(&mut nodes, &window);
        assert_eq!(add_argmax_siblings(&mut nodes, 3), 0);
        assert!(nodes.iter().all(|n| n.kind == DraftKind::Unlabelled));
    }

    #[test]
    fn greedy_guesses_are_the_argmax_as_point_masses() {
        let mut la = Lookahead {
            pending: Some((7, rows())),
            ..Lookahead::default()
        };
        la.iterate(8, None);
        let (window, iterated) = la.guesses(&[9, 8], 8, 2);
        assert_eq!(iterated, 2);
        assert_eq!(window, vec![Proposal::point(0), Proposal::point(2)]);
        assert_eq!(la.levels.back(), Some(&(7, vec![3, 0, 2])));
    }

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
        insert_path(&mut nodes, &points(&[5, 6, 7]));
        insert_path(&mut nodes, &points(&[5, 6, 8]));
        insert_path(&mut nodes, &points(&[9]));
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
