//! Token Recycling: the target's own top-k candidates, which plain decoding throws away, are kept in a
//! vocab x k adjacency matrix (row v = the top-k tokens the target predicted after it last read v). Each step
//! expands a static tree template from the root through the matrix into a draft tree of point masses; after the
//! verification forward the row of EVERY fed token (rejected nodes included) is overwritten with that
//! position's top-k, which is what makes the matrix adapt within a few steps.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::drafter::{Draft, DraftInput, Drafter, Observation};
use super::verifier::{DraftTree, DraftTreeNode};
use crate::error::Result;
use crate::sampling::{Warped, top_n};

/// Candidates kept per token (the paper's `--output-id-topk`): 49152 x 8 x 4 bytes = 1.5 MB for SmolLM2.
pub const TOP_K: usize = 8;
/// An empty matrix cell (a token never read yet).
const EMPTY: u32 = u32::MAX;
/// How likely the rank-r candidate is to be the target's next token, roughly: only the shape matters, it decides
/// which template nodes a given node budget buys (the chain of top-1 first, then the runners-up near the root).
const RANK_WEIGHT: [f64; TOP_K] = [0.5, 0.2, 0.1, 0.07, 0.05, 0.04, 0.03, 0.02];

pub struct TokenRecycling {
    vocab: usize,
    matrix: Vec<u32>,
}

impl TokenRecycling {
    pub fn new(vocab: usize) -> Self {
        Self {
            vocab,
            matrix: vec![EMPTY; vocab * TOP_K],
        }
    }

    fn row(&self, token: u32) -> &[u32] {
        let t = token as usize;
        if t < self.vocab {
            &self.matrix[t * TOP_K..(t + 1) * TOP_K]
        } else {
            &[]
        }
    }

    /// Rows filled so far (for the note).
    fn filled(&self) -> usize {
        self.matrix.chunks(TOP_K).filter(|r| r[0] != EMPTY).count()
    }
}

/// A node of the static template: "candidate `rank` of the parent's token".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TemplateNode {
    pub parent: Option<usize>,
    pub rank: usize,
    pub depth: usize,
}

#[derive(PartialEq)]
struct Scored {
    score: f64,
    order: usize,
    parent: Option<usize>,
    rank: usize,
    depth: usize,
}

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    // Highest score first; ties to the earlier candidate, so the template is the same on every machine.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.order.cmp(&self.order))
    }
}

/// The template: the `size` nodes of highest path score (product of `RANK_WEIGHT`s), depth at most `max_depth`,
/// in an order where every parent precedes its children.
pub fn template(size: usize, max_depth: usize) -> Vec<TemplateNode> {
    let mut out: Vec<TemplateNode> = Vec::new();
    let mut heap = BinaryHeap::new();
    let mut order = 0;
    let mut push =
        |heap: &mut BinaryHeap<Scored>, score: f64, parent: Option<usize>, depth: usize| {
            if depth > max_depth {
                return;
            }
            for (rank, w) in RANK_WEIGHT.iter().enumerate() {
                heap.push(Scored {
                    score: score * w,
                    order,
                    parent,
                    rank,
                    depth,
                });
                order += 1;
            }
        };
    push(&mut heap, 1.0, None, 1);
    while out.len() < size {
        let Some(best) = heap.pop() else { break };
        out.push(TemplateNode {
            parent: best.parent,
            rank: best.rank,
            depth: best.depth,
        });
        let me = out.len() - 1;
        push(&mut heap, best.score, Some(me), best.depth + 1);
    }
    out
}

impl Drafter for TokenRecycling {
    fn name(&self) -> &'static str {
        "token-recycling"
    }

    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft> {
        let depth = input.point_mass_budget();
        let shape = template(input.params.speculative.tree_size, depth);
        let root = input.context.last().copied().unwrap_or(0);
        // Template index -> draft node index (None when the matrix had nothing there).
        let mut placed: Vec<Option<usize>> = Vec::with_capacity(shape.len());
        let mut nodes: Vec<DraftTreeNode> = Vec::new();
        for t in &shape {
            let parent_node = match t.parent {
                None => None,
                Some(tp) => match placed.get(tp).copied().flatten() {
                    Some(n) => Some(n),
                    None => {
                        placed.push(None);
                        continue;
                    }
                },
            };
            let parent_token = parent_node.map_or(root, |n| nodes[n].token);
            let candidate = self.row(parent_token).get(t.rank).copied().unwrap_or(EMPTY);
            // A repeated sibling could never be accepted after its twin was rejected: it would waste a slot.
            let duplicate = nodes
                .iter()
                .any(|n| n.parent == parent_node && n.token == candidate);
            if candidate == EMPTY || duplicate {
                placed.push(None);
                continue;
            }
            nodes.push(DraftTreeNode {
                token: candidate,
                parent: parent_node,
                q: Warped::point(candidate),
            });
            placed.push(Some(nodes.len() - 1));
        }
        let note = format!(
            "template of {} nodes, depth {depth}; {} placed; {} matrix rows filled",
            shape.len(),
            nodes.len(),
            self.filled()
        );
        Ok(Draft {
            tree: DraftTree { nodes },
            forward_calls: 0,
            note,
        })
    }

    /// The paper starts from an empty matrix and keeps it across queries; within one run, the prompt's own
    /// predictions are the only history there is, and without them the first dozen drafts are empty.
    fn learns_from_prompt(&self) -> bool {
        true
    }

    fn observe(&mut self, obs: &Observation<'_>) {
        for (token, logits) in obs.tokens.iter().zip(obs.logits) {
            let t = *token as usize;
            if t >= self.vocab {
                continue;
            }
            let top = top_n(logits, TOP_K);
            let row = &mut self.matrix[t * TOP_K..(t + 1) * TOP_K];
            for (i, cell) in row.iter_mut().enumerate() {
                *cell = top.get(i).copied().unwrap_or(EMPTY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_parent_first_and_chain_first() {
        let t = template(16, 4);
        assert_eq!(t.len(), 16);
        for (i, n) in t.iter().enumerate() {
            assert!(n.parent.is_none_or(|p| p < i));
            assert!(n.depth <= 4);
        }
        assert_eq!(
            t[0],
            TemplateNode {
                parent: None,
                rank: 0,
                depth: 1
            }
        );
        assert_eq!(
            t[1],
            TemplateNode {
                parent: Some(0),
                rank: 0,
                depth: 2
            }
        );
    }
}
