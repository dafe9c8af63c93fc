//! Token Recycling (Luo et al. 2024): the target's own top-k candidates, which plain decoding throws away, are
//! kept in a vocab x k adjacency matrix (row v = the top-k tokens the target predicted after it last read v).
//! Each step expands a static tree template from the root through the matrix into a draft tree of point masses;
//! after the verification forward the row of EVERY fed token (rejected nodes included) is overwritten with that
//! position's top-k, which is what makes the matrix adapt within a few steps.
//!
//! The prompt's positions write their rows too, its last token (the first tree's root) included, so the first
//! tree starts from the prefill's own prediction: the paper's text only describes updates from tree forwards
//! (its first query drafts nothing for a while), while implementations seed the matrix from the prompt's logits.
//! The matrix starts empty for every run unless `keep_matrix` asks for the paper's hot start (the matrix
//! inherited from the previous query).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::drafter::{Draft, DraftInput, Drafter, Observation};
use super::verifier::{DraftTree, DraftTreeNode};
use crate::error::Result;
use crate::sampling::{Warped, top_n};
use crate::trace::DraftKind;

/// Candidates kept per token (the paper's `--output-id-topk`): 49152 x 8 x 4 bytes = 1.5 MB for SmolLM2.
pub const TOP_K: usize = 8;
/// An empty matrix cell (a token never read yet).
const EMPTY: u32 = u32::MAX;
/// How likely the rank-r candidate is to be the target's next token, roughly: only the shape matters, it decides
/// which template nodes a given node budget buys (the chain of top-1 first, then the runners-up near the root).
const RANK_WEIGHT: [f64; TOP_K] = [0.5, 0.2, 0.1, 0.07, 0.05, 0.04, 0.03, 0.02];

/// The tree templates `tree_template` accepts: `scored` takes the `tree_size` nodes of highest
/// `RANK_WEIGHT` path score; `paper` is the paper's own static tree (its Figure 5), cut to `tree_size` nodes.
pub const TREE_TEMPLATES: &[&str] = &["scored", "paper"];

/// The paper's static, imbalanced tree ("2.2.2" in the authors' code, Figure 5 of the paper): each entry is a
/// path of candidate ranks from the root, level by level (8, 21, 25, 15, 8 and 3 nodes), parents first.
#[rustfmt::skip]
const PAPER_TREE: [&[u8]; 80] = [
    &[0], &[1], &[2], &[3], &[4], &[5], &[6], &[7],
    &[0, 0], &[0, 1], &[0, 2], &[0, 3], &[0, 4], &[0, 5], &[0, 6], &[0, 7],
    &[1, 0], &[1, 1], &[1, 2], &[1, 3], &[2, 0], &[2, 1], &[2, 2], &[3, 0], &[3, 1],
    &[4, 0], &[5, 0], &[6, 0], &[7, 0],
    &[0, 0, 0], &[0, 0, 1], &[0, 0, 2], &[0, 0, 3], &[0, 0, 4], &[0, 0, 5], &[0, 0, 6], &[0, 0, 7],
    &[0, 1, 0], &[0, 1, 1], &[0, 1, 2], &[0, 2, 0], &[0, 2, 1], &[0, 3, 0], &[0, 4, 0], &[0, 5, 0],
    &[0, 6, 0], &[0, 7, 0], &[1, 0, 0], &[1, 0, 1], &[1, 1, 0], &[2, 0, 0], &[3, 0, 0], &[4, 0, 0],
    &[5, 0, 0],
    &[0, 0, 0, 0], &[0, 0, 0, 1], &[0, 0, 0, 2], &[0, 0, 0, 3], &[0, 0, 0, 4], &[0, 0, 1, 0],
    &[0, 0, 1, 1], &[0, 0, 2, 0], &[0, 0, 3, 0], &[0, 0, 4, 0], &[0, 1, 0, 0], &[0, 2, 0, 0],
    &[1, 0, 0, 0], &[2, 0, 0, 0], &[3, 0, 0, 0],
    &[0, 0, 0, 0, 0], &[0, 0, 0, 0, 1], &[0, 0, 0, 0, 2], &[0, 0, 0, 1, 0], &[0, 0, 0, 2, 0],
    &[0, 0, 1, 0, 0], &[0, 1, 0, 0, 0], &[1, 0, 0, 0, 0],
    &[0, 0, 0, 0, 0, 0], &[0, 0, 0, 0, 0, 1], &[0, 0, 0, 1, 0, 0],
];

/// The matrix kept with a loaded model for runs that ask for `keep_matrix`: the paper's hot start, where each
/// query inherits the matrix the previous ones left. Cloning shares it. Runs interleaved by the worker write to
/// the same matrix as they go, as one model's queries would.
#[derive(Clone, Default)]
pub struct SharedMatrix(Arc<Mutex<Kept>>);

#[derive(Default)]
struct Kept {
    /// Empty until the first run that keeps it.
    matrix: Vec<u32>,
    /// Runs that have drafted from it so far.
    runs: usize,
}

impl SharedMatrix {
    // A run that panicked mid-update leaves valid token ids behind, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Kept> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rows filled so far (0 before any run kept it).
    pub fn filled_rows(&self) -> usize {
        filled(&self.lock().matrix)
    }

    /// Runs that have used it.
    pub fn runs(&self) -> usize {
        self.lock().runs
    }

    /// Forgets everything: the next run that keeps the matrix starts from an empty one.
    pub fn clear(&self) {
        *self.lock() = Kept::default();
    }
}

fn filled(matrix: &[u32]) -> usize {
    matrix.chunks(TOP_K).filter(|r| r[0] != EMPTY).count()
}

enum Store {
    /// This run's own matrix, empty at the start.
    Own(Vec<u32>),
    /// The model's kept matrix; `earlier_runs` had used it before this one.
    Kept {
        shared: SharedMatrix,
        earlier_runs: usize,
    },
}

pub struct TokenRecycling {
    vocab: usize,
    store: Store,
}

impl TokenRecycling {
    /// A drafter with a matrix of its own, empty.
    pub fn new(vocab: usize) -> Self {
        Self {
            vocab,
            store: Store::Own(vec![EMPTY; vocab * TOP_K]),
        }
    }

    /// A drafter on the model's kept matrix (allocated by the first run that keeps it).
    pub fn kept(vocab: usize, shared: SharedMatrix) -> Self {
        let earlier_runs = {
            let mut kept = shared.lock();
            if kept.matrix.len() != vocab * TOP_K {
                kept.matrix = vec![EMPTY; vocab * TOP_K];
                kept.runs = 0;
            }
            kept.runs += 1;
            kept.runs - 1
        };
        Self {
            vocab,
            store: Store::Kept {
                shared,
                earlier_runs,
            },
        }
    }

    /// Bytes of state: the adjacency matrix, a row of `TOP_K` token ids per vocabulary entry (the paper's
    /// "< 2 MB"; 1.5 MB for SmolLM2's 49,152 tokens).
    pub fn state_bytes(&mut self) -> usize {
        self.with_matrix(|matrix| std::mem::size_of_val(matrix))
    }

    /// Runs `f` on the matrix, locking the kept one for the duration.
    fn with_matrix<R>(&mut self, f: impl FnOnce(&mut [u32]) -> R) -> R {
        match &mut self.store {
            Store::Own(m) => f(m),
            Store::Kept { shared, .. } => f(&mut shared.lock().matrix),
        }
    }
}

fn row(matrix: &[u32], vocab: usize, token: u32) -> &[u32] {
    let t = token as usize;
    if t < vocab {
        matrix.get(t * TOP_K..(t + 1) * TOP_K).unwrap_or(&[])
    } else {
        &[]
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

/// The paper's tree, level by level, without the nodes deeper than `max_depth`, cut to its first `size` nodes
/// (a prefix of a parents-first list is itself a tree).
pub fn paper_template(size: usize, max_depth: usize) -> Vec<TemplateNode> {
    let mut out = Vec::new();
    // PAPER_TREE index -> index in `out`.
    let mut placed: Vec<Option<usize>> = Vec::with_capacity(PAPER_TREE.len());
    for (i, path) in PAPER_TREE.iter().enumerate() {
        let depth = path.len();
        let parent = match path.split_last() {
            Some((_, [])) => Some(None),
            Some((_, prefix)) => PAPER_TREE[..i]
                .iter()
                .position(|p| *p == prefix)
                .and_then(|j| placed[j])
                .map(Some),
            None => None,
        };
        let node = match (parent, path.last()) {
            (Some(parent), Some(&rank)) if depth <= max_depth && out.len() < size => {
                out.push(TemplateNode {
                    parent,
                    rank: usize::from(rank),
                    depth,
                });
                Some(out.len() - 1)
            }
            _ => None,
        };
        placed.push(node);
    }
    out
}

/// The template `name` names (anything but "paper" is the scored one; `validate` refuses unknown names).
pub fn template_named(name: &str, size: usize, max_depth: usize) -> Vec<TemplateNode> {
    if name == "paper" {
        paper_template(size, max_depth)
    } else {
        template(size, max_depth)
    }
}

impl Drafter for TokenRecycling {
    fn name(&self) -> &'static str {
        "token-recycling"
    }

    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft> {
        let spec = &input.params.speculative;
        // Only the cost-aware policy asks for the templates' sizes (small trees, cheap to build).
        let depth =
            input.tree_depth(|d| template_named(&spec.tree_template, spec.tree_size, d).len());
        let shape = template_named(&spec.tree_template, spec.tree_size, depth);
        let root = input.context.last().copied().unwrap_or(0);
        let vocab = self.vocab;
        let (nodes, rows) = self.with_matrix(|matrix| {
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
                let candidate = row(matrix, vocab, parent_token)
                    .get(t.rank)
                    .copied()
                    .unwrap_or(EMPTY);
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
                    kind: DraftKind::Unlabelled,
                });
                placed.push(Some(nodes.len() - 1));
            }
            (nodes, filled(matrix))
        });
        let kept = match &self.store {
            Store::Own(_) => String::new(),
            Store::Kept { earlier_runs, .. } => {
                format!("; matrix kept across runs ({earlier_runs} earlier)")
            }
        };
        let megabytes = self.state_bytes() as f64 / (1024.0 * 1024.0);
        let note = format!(
            "{} template of {} nodes, depth {depth}; {} placed; {rows} matrix rows filled ({megabytes:.1} MB){kept}",
            spec.tree_template,
            shape.len(),
            nodes.len(),
        );
        Ok(Draft {
            tree: DraftTree { nodes },
            forward_calls: 0,
            note,
            exit_layers: None,
        })
    }

    /// Within a run, the prompt's own predictions are the only history there is: without them a cold matrix
    /// drafts nothing for the first dozen steps, and the first tree's root would draft from the row an earlier
    /// occurrence of its token left (for ChatML's final newline, the `<|im_start|>` that follows `<|im_end|>`).
    fn learns_from_prompt(&self) -> bool {
        true
    }

    /// Rows are overwritten in feeding order, so a token fed twice keeps its last occurrence's candidates (the
    /// paper's "last" strategy, its best by MAT).
    fn observe(&mut self, obs: &Observation<'_>) -> Result<()> {
        let vocab = self.vocab;
        self.with_matrix(|matrix| {
            for (token, logits) in obs.tokens.iter().zip(obs.logits) {
                let t = *token as usize;
                if t >= vocab {
                    continue;
                }
                let Some(row) = matrix.get_mut(t * TOP_K..(t + 1) * TOP_K) else {
                    continue;
                };
                let top = top_n(logits, TOP_K);
                for (i, cell) in row.iter_mut().enumerate() {
                    *cell = top.get(i).copied().unwrap_or(EMPTY);
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_stays_under_the_papers_two_megabytes_for_smollm2() {
        let vocab = 49_152;
        assert_eq!(TokenRecycling::new(vocab).state_bytes(), vocab * TOP_K * 4);
        assert!(TokenRecycling::new(vocab).state_bytes() < 2 * 1024 * 1024);
        let kept = SharedMatrix::default();
        assert_eq!(
            TokenRecycling::kept(vocab, kept).state_bytes(),
            vocab * TOP_K * 4
        );
    }

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

    /// The paper's tree as its Figure 5 draws it: 80 nodes on 6 levels of 8, 21, 25, 15, 8 and 3, every node's
    /// rank path unique; cut by size and depth it stays a tree.
    #[test]
    fn paper_template_is_the_papers_tree() {
        let t = paper_template(128, 16);
        assert_eq!(t.len(), 80);
        let per_level: Vec<usize> = (1..=6)
            .map(|d| t.iter().filter(|n| n.depth == d).count())
            .collect();
        assert_eq!(per_level, [8, 21, 25, 15, 8, 3]);
        let path = |mut i: usize| {
            let mut p = vec![t[i].rank];
            while let Some(parent) = t[i].parent {
                p.push(t[parent].rank);
                i = parent;
            }
            p.reverse();
            p
        };
        for (i, n) in t.iter().enumerate() {
            assert!(n.parent.is_none_or(|p| p < i && t[p].depth + 1 == n.depth));
            assert_eq!(
                path(i),
                PAPER_TREE[i]
                    .iter()
                    .map(|&r| usize::from(r))
                    .collect::<Vec<_>>()
            );
        }
        let cut = paper_template(30, 3);
        assert_eq!(cut.len(), 30);
        assert!(cut.iter().all(|n| n.depth <= 3));
        assert!(
            cut.iter()
                .enumerate()
                .all(|(i, n)| n.parent.is_none_or(|p| p < i))
        );
        assert_eq!(paper_template(80, 4).len(), 80 - 8 - 3);
    }
}
