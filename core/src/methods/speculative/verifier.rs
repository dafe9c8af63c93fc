//! The one verifier every drafter shares. A pure function of distributions (no model inside), so that the
//! lossless tests can call it thousands of times with distributions computed once from the real model.
//!
//! Rules (Leviathan et al. / Chen et al. 2023; multi-draft: recursive rejection sampling as in RSD / SpecInfer):
//! - greedy parameters: accept a child while its token is the target's argmax at that position; at the first
//!   position where no child matches, emit the argmax. Exactly greedy decoding on the same logits.
//! - sampling: at each position the children are tested in order. Child j (drawn from its own proposal q_j,
//!   which for siblings drafted without replacement already has the earlier siblings removed) is accepted with
//!   probability min(1, p(x)/q_j(x)); a rejection replaces p by norm(max(0, p - q_j)) for the next sibling.
//!   Accepting descends into that child; when every child is rejected the token is drawn from the last
//!   residual; when the path ends on a leaf the bonus token is drawn from that leaf's p. The output then follows
//!   p exactly, whatever the drafts were.
//!
//! Each node carries its own q, so siblings of different kinds mix freely: lookahead's SJD guess (q = the
//! distribution it was sampled from) followed by that q's argmax as a point mass (q = 1 on it). The sibling's
//! test uses its own q against the residual the guess's rejection left, which keeps the output exactly p: given
//! a rejection, whatever the guess was, the rest of the test outputs that residual (RSD's argument, one sibling
//! at a time). A sibling equal to the guess is left out by the drafter: it could never be accepted (a rejected
//! token has p(x) < q(x), so the residual gives it nothing).

use rand::Rng;

use crate::sampling::{RunRng, Warped};
use crate::trace::{DraftKind, SamplingParams, TOP_CANDIDATES};

/// One drafted token, hanging off `parent` (an earlier node) or off the last committed token (`None`).
#[derive(Clone, Debug, PartialEq)]
pub struct DraftTreeNode {
    pub token: u32,
    pub parent: Option<usize>,
    /// The distribution this token was drawn from, warped like the target's; a point mass for deterministic
    /// drafters (n-gram lookup, token recycling, greedy drafting) and for lookahead's argmax siblings. The
    /// verifier tests the node against this q and no other.
    pub q: Warped,
    /// How the drafter proposed it, for the trace; the verifier does not read it.
    pub kind: DraftKind,
}

/// The draft tree in feeding order: every parent comes before its children, and siblings are tried in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DraftTree {
    pub nodes: Vec<DraftTreeNode>,
}

impl DraftTree {
    /// A chain of point masses: what deterministic drafters (n-gram lookup) propose.
    pub fn point_chain(tokens: &[u32]) -> Self {
        let nodes = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| DraftTreeNode {
                token: t,
                parent: i.checked_sub(1),
                q: Warped::point(t),
                kind: DraftKind::Unlabelled,
            })
            .collect();
        Self { nodes }
    }

    /// Children of `parent` (`None` = the root), in order.
    pub fn children(&self, parent: Option<usize>) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].parent == parent)
            .collect()
    }

    /// 1 for the root's children.
    pub fn depth(&self, node: usize) -> usize {
        let mut d = 1;
        let mut cur = self.nodes[node].parent;
        while let Some(p) = cur {
            d += 1;
            cur = self.nodes[p].parent;
        }
        d
    }
}

/// What the verifier decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Accepted nodes, root's child first.
    pub accepted_path: Vec<usize>,
    /// Every node the verifier tested and rejected.
    pub rejected: Vec<usize>,
    /// The token the verifier drew itself after the accepted path.
    pub token: u32,
    /// True when the path ended on a leaf and `token` is the bonus from that leaf's p.
    pub bonus: bool,
    /// The top of the distribution `token` was drawn from (residual after a rejection, p for a bonus or where
    /// no draft was tested), most likely first, at most `TOP_CANDIDATES` entries.
    pub distribution: Vec<(u32, f64)>,
    /// Per depth along the verified path: sum_x min(p(x), q(x)) for the first child tested there.
    pub alpha: Vec<f32>,
    /// Under sampling, each node tested after an earlier sibling was rejected, with its token's probability under
    /// the residual it was tested against (its test was min(1, residual(x) / q(x)), not p(x) / q(x)).
    pub residual_p: Vec<(usize, f64)>,
}

/// `p[0]` is the target's warped distribution after the last committed token, `p[i + 1]` the one after node i.
/// Returns `None` when `p` does not have one entry per node plus one.
pub fn verify(
    tree: &DraftTree,
    p: &[&Warped],
    params: &SamplingParams,
    rng: &mut RunRng,
) -> Option<Verdict> {
    verify_impl(tree, p, params, rng, true)
}

/// A deliberately wrong verifier that, after a rejection, draws from p instead of the residual. It exists so
/// the lossless tests can show they catch a broken verifier; never use it for decoding.
#[doc(hidden)]
pub fn verify_broken_for_tests(
    tree: &DraftTree,
    p: &[&Warped],
    params: &SamplingParams,
    rng: &mut RunRng,
) -> Option<Verdict> {
    verify_impl(tree, p, params, rng, false)
}

fn verify_impl(
    tree: &DraftTree,
    p: &[&Warped],
    params: &SamplingParams,
    rng: &mut RunRng,
    use_residual: bool,
) -> Option<Verdict> {
    if p.len() != tree.nodes.len() + 1 {
        return None;
    }
    let greedy = params.is_greedy();
    let mut verdict = Verdict {
        accepted_path: Vec::new(),
        rejected: Vec::new(),
        token: 0,
        bonus: false,
        distribution: Vec::new(),
        alpha: Vec::new(),
        residual_p: Vec::new(),
    };
    let mut at: Option<usize> = None;
    loop {
        let slot = at.map_or(0, |i| i + 1);
        let target = &p[slot];
        let children = tree.children(at);
        if children.is_empty() {
            verdict.bonus = at.is_some();
            let dist = dense(target);
            verdict.token = draw(&dist, greedy, rng);
            verdict.distribution = sorted(dist);
            return Some(verdict);
        }
        if let Some(&first) = children.first() {
            verdict
                .alpha
                .push(overlap(target, &tree.nodes[first].q) as f32);
        }
        let mut residual = dense(target);
        let mut accepted = None;
        for (j, &child) in children.iter().enumerate() {
            let node = &tree.nodes[child];
            // A token outside its own q cannot have been drawn from it; treat it as a point mass (what the
            // drafter effectively proposed) so the test stays well defined.
            let q = if node.q.prob(node.token) > 0.0 {
                node.q.clone()
            } else {
                Warped::point(node.token)
            };
            let px = residual
                .iter()
                .find(|(t, _)| *t == node.token)
                .map_or(0.0, |(_, w)| *w);
            let qx = f64::from(q.prob(node.token));
            if j > 0 && !greedy {
                verdict.residual_p.push((child, px));
            }
            let accept = if greedy {
                // The target's argmax: `residual` is then the point mass of warp(greedy).
                px > 0.0
            } else {
                let u: f64 = rng.random();
                u < (px / qx).min(1.0)
            };
            if accept {
                accepted = Some(child);
                break;
            }
            verdict.rejected.push(child);
            if use_residual {
                residual = subtract(&residual, &q);
            }
        }
        match accepted {
            Some(child) => {
                verdict.accepted_path.push(child);
                at = Some(child);
            }
            None => {
                verdict.token = draw(&residual, greedy, rng);
                verdict.distribution = sorted(residual);
                return Some(verdict);
            }
        }
    }
}

/// sum_x min(p(x), q(x)) = 1 - TV(p, q): the probability that a token drawn from q is accepted against p.
pub fn overlap(p: &Warped, q: &Warped) -> f64 {
    let q = Lookup::new(&q.support);
    p.support
        .iter()
        .map(|&(t, w)| f64::from(w).min(q.get(t)))
        .sum()
}

/// Probability lookup by token id. A layer-skip q can keep tens of thousands of tokens, so a dense table
/// (one memset, one pass) beats a map by far; point masses skip the table altogether.
enum Lookup<'a> {
    Few(&'a [(u32, f32)]),
    Dense(Vec<f64>),
}

impl<'a> Lookup<'a> {
    fn new(support: &'a [(u32, f32)]) -> Self {
        if support.len() <= 16 {
            return Lookup::Few(support);
        }
        let len = support
            .iter()
            .map(|&(t, _)| t as usize + 1)
            .max()
            .unwrap_or(0);
        let mut table = vec![0.0; len];
        for &(t, w) in support {
            table[t as usize] = f64::from(w);
        }
        Lookup::Dense(table)
    }

    fn get(&self, id: u32) -> f64 {
        match self {
            Lookup::Few(s) => s
                .iter()
                .find(|(t, _)| *t == id)
                .map_or(0.0, |(_, w)| f64::from(*w)),
            Lookup::Dense(table) => table.get(id as usize).copied().unwrap_or(0.0),
        }
    }
}

fn dense(w: &Warped) -> Vec<(u32, f64)> {
    w.support.iter().map(|&(t, p)| (t, f64::from(p))).collect()
}

/// norm(max(0, p - q)), keeping p's order so draws stay deterministic.
fn subtract(p: &[(u32, f64)], q: &Warped) -> Vec<(u32, f64)> {
    let q = Lookup::new(&q.support);
    let mut out: Vec<(u32, f64)> = p
        .iter()
        .map(|&(t, w)| (t, (w - q.get(t)).max(0.0)))
        .filter(|&(_, w)| w > 0.0)
        .collect();
    let total: f64 = out.iter().map(|(_, w)| w).sum();
    if total > 0.0 {
        for (_, w) in &mut out {
            *w /= total;
        }
        out
    } else {
        // p == q on every token: a rejection had probability 0, only rounding gets here. p itself is the
        // closest valid distribution.
        p.to_vec()
    }
}

fn draw(dist: &[(u32, f64)], greedy: bool, rng: &mut RunRng) -> u32 {
    if greedy {
        // Greedy distributions are point masses (or residuals of one, which keep it): take the heaviest, ties
        // to the lower id.
        return crate::sampling::heaviest(dist.iter().copied()).unwrap_or(0);
    }
    let total: f64 = dist.iter().map(|(_, w)| w).sum();
    let r: f64 = rng.random::<f64>() * total;
    let mut cum = 0.0;
    for &(t, w) in dist {
        cum += w;
        if r < cum {
            return t;
        }
    }
    dist.last().map_or(0, |(t, _)| *t)
}

/// The `TOP_CANDIDATES` heaviest entries, heaviest first (all the trace shows; a full sort of a layer-skip
/// residual would cost more than the rest of the verification).
fn sorted(mut dist: Vec<(u32, f64)>) -> Vec<(u32, f64)> {
    let by_weight = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if dist.len() > TOP_CANDIDATES {
        dist.select_nth_unstable_by(TOP_CANDIDATES - 1, by_weight);
        dist.truncate(TOP_CANDIDATES);
    }
    dist.sort_by(by_weight);
    dist
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sampling::rng_from_seed;

    fn w(pairs: &[(u32, f32)]) -> Warped {
        Warped {
            support: pairs.to_vec(),
        }
    }

    fn sampling() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn greedy_accepts_the_argmax_and_corrects_the_rest() {
        let tree = DraftTree {
            nodes: vec![
                DraftTreeNode {
                    token: 1,
                    parent: None,
                    q: Warped::point(1),
                    kind: DraftKind::Unlabelled,
                },
                DraftTreeNode {
                    token: 2,
                    parent: Some(0),
                    q: Warped::point(2),
                    kind: DraftKind::Unlabelled,
                },
            ],
        };
        let p = [&Warped::point(1), &Warped::point(3), &Warped::point(9)];
        let mut rng = rng_from_seed(0);
        let v = verify(&tree, &p, &SamplingParams::greedy(), &mut rng).unwrap();
        assert_eq!(v.accepted_path, vec![0]);
        assert_eq!(v.token, 3);
        assert!(!v.bonus);
        assert_eq!(v.alpha, vec![1.0, 0.0]);
    }

    #[test]
    fn one_position_sampling_follows_p_exactly_in_expectation() {
        // p = (0.5, 0.3, 0.2), q = (0.1, 0.8, 0.1): first token must still follow p.
        let p = w(&[(0, 0.5), (1, 0.3), (2, 0.2)]);
        let q = w(&[(1, 0.8), (0, 0.1), (2, 0.1)]);
        let mut rng = rng_from_seed(3);
        let mut counts = [0f64; 3];
        let n = 40_000;
        for _ in 0..n {
            let x = q.sample(&mut rng);
            let tree = DraftTree {
                nodes: vec![DraftTreeNode {
                    token: x,
                    parent: None,
                    q: q.clone(),
                    kind: DraftKind::Sampled,
                }],
            };
            let v = verify(&tree, &[&p, &Warped::point(0)], &sampling(), &mut rng).unwrap();
            let first = if v.accepted_path.is_empty() {
                v.token
            } else {
                x
            };
            counts[first as usize] += 1.0;
        }
        for (id, c) in counts.iter().enumerate() {
            let e = f64::from(p.prob(id as u32)) * f64::from(n);
            assert!((c - e).abs() < 4.0 * e.sqrt(), "{counts:?}");
        }
    }

    #[test]
    fn a_sampled_guess_then_its_argmax_sibling_follow_p() {
        // q's argmax 1 is likelier under p than under q, so the residual of a rejected guess keeps mass on it:
        // alpha = 0.8, residual (0.5, 0.5, 0), and the sibling is accepted after 0.2 * 0.5 = 10% of the guesses.
        let p = w(&[(1, 0.6), (0, 0.2), (2, 0.2)]);
        let q = w(&[(1, 0.5), (2, 0.4), (0, 0.1)]);
        let mut rng = rng_from_seed(5);
        let mut counts = [0f64; 3];
        let mut sibling_accepted = 0u32;
        let n = 40_000;
        for _ in 0..n {
            let x = q.sample(&mut rng);
            let mut nodes = vec![DraftTreeNode {
                token: x,
                parent: None,
                q: q.clone(),
                kind: DraftKind::Sampled,
            }];
            if x != 1 {
                nodes.push(DraftTreeNode {
                    token: 1,
                    parent: None,
                    q: Warped::point(1),
                    kind: DraftKind::ArgmaxSibling,
                });
            }
            let tree = DraftTree { nodes };
            let leaves = vec![&p; tree.nodes.len() + 1];
            let v = verify(&tree, &leaves, &sampling(), &mut rng).unwrap();
            if v.rejected.first() == Some(&0) && tree.nodes.len() == 2 {
                // The sibling met the residual (0.5, 0.5, 0), and the verdict says so.
                let (node, r) = v.residual_p[0];
                assert_eq!(node, 1);
                assert!((r - 0.5).abs() < 1e-6, "{r}");
            }
            let first = match v.accepted_path.first() {
                Some(&i) => {
                    sibling_accepted += u32::from(i == 1);
                    tree.nodes[i].token
                }
                None => v.token,
            };
            counts[first as usize] += 1.0;
        }
        for (id, c) in counts.iter().enumerate() {
            let e = f64::from(p.prob(id as u32)) * f64::from(n);
            assert!((c - e).abs() < 4.0 * e.sqrt(), "{counts:?}");
        }
        let e = 0.1 * f64::from(n);
        assert!(
            (f64::from(sibling_accepted) - e).abs() < 4.0 * (e * 0.9).sqrt(),
            "sibling accepted {sibling_accepted} times of {n}"
        );
    }
}
