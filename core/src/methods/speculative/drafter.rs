//! The drafter plug-in interface: a drafter proposes a tree of tokens after the last committed one; the shared
//! verifier ([`super::verifier`]) decides what the target keeps. One file per drafter.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::verifier::DraftTree;
use crate::error::Result;
use crate::model::{KvCache, Llama};
use crate::sampling::RunRng;
use crate::trace::MethodParams;

/// What a drafter sees when it drafts.
pub struct DraftInput<'a> {
    pub llama: &'a Arc<Llama>,
    /// The target's cache: every committed token except the last one (the root of the draft tree). Drafters
    /// that run the model work on a clone of it.
    pub cache: &'a KvCache,
    /// Prompt and generated tokens; the last one is the root, not yet fed to the target.
    pub context: &'a [u32],
    pub params: &'a MethodParams,
    /// Longest draft this step (tree depth).
    pub max_len: usize,
    /// Running mean of measured per-draft-token acceptance, for adaptive point-mass drafters.
    pub acceptance: f64,
    pub rng: &'a mut RunRng,
    pub cancel: &'a AtomicBool,
}

impl DraftInput<'_> {
    /// Position of the root (the last committed token).
    pub fn root_position(&self) -> usize {
        self.context.len().saturating_sub(1)
    }

    /// The adaptive policy for drafters whose tokens are point masses: with a running per-token acceptance a,
    /// P(some of n drafts rejected) is estimated as 1 - a^n; draft while it stays at or under h (at least one).
    pub fn point_mass_budget(&self) -> usize {
        match self.params.speculative.adaptive {
            None => self.max_len,
            Some(h) => {
                let a = self.acceptance.clamp(1e-6, 1.0 - 1e-9);
                let mut n = 1;
                while n < self.max_len && 1.0 - a.powi(n as i32 + 1) <= f64::from(h) {
                    n += 1;
                }
                n
            }
        }
    }
}

/// A draft: the tree, what it cost, and a note for the panel.
#[derive(Clone, Debug, Default)]
pub struct Draft {
    pub tree: DraftTree,
    pub forward_calls: u32,
    pub note: String,
}

/// What the target computed in the verification forward, for drafters that learn from it.
pub struct Observation<'a> {
    /// Tokens fed: the root, then the draft nodes in order.
    pub tokens: &'a [u32],
    /// The plain logits at each fed token's position, same order.
    pub logits: &'a [Vec<f32>],
    /// Accepted draft nodes, root's child first.
    pub accepted_path: &'a [usize],
}

pub trait Drafter: Send {
    fn name(&self) -> &'static str;
    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft>;
    /// Called after every verification forward, and after each prefill chunk when `learns_from_prompt` (every
    /// position of the chunk, the root included when the chunk ends the prompt; the first verification then
    /// shows the root again, with the same logits).
    fn observe(&mut self, _obs: &Observation<'_>) {}
    /// Asks the prefill for every prompt position's logits (an LM head per prompt token, ~10% of a prefill) so
    /// the drafter can learn from the prompt before the first draft.
    fn learns_from_prompt(&self) -> bool {
        false
    }
}
