//! The drafter plug-in interface: a drafter proposes a tree of tokens after the last committed one; the shared
//! verifier ([`super::verifier`]) decides what the target keeps. One file per drafter.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::verifier::DraftTree;
use super::{cost_aware_depth, cost_aware_length};
use crate::error::Result;
use crate::model::{KvCache, Llama};
use crate::sampling::{RunRng, Warped};
use crate::trace::{ExitLayers, MethodParams, SamplingParams};

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

    /// The draft length for drafters whose tokens are point masses, at the running acceptance (tree drafters
    /// take it as their depth).
    pub fn point_mass_budget(&self) -> usize {
        self.point_mass_budget_at(self.acceptance)
    }

    /// The cost-aware policy's cost of one drafted token at this step's context length; `None` when off.
    pub fn draft_cost(&self) -> Option<f64> {
        self.params.speculative.draft_cost_at(self.context.len())
    }

    /// The depth of a point-mass draft tree whose template for depth d holds `nodes_at(d)` nodes: under the cost-aware
    /// policy the depth whose nodes pay for themselves ([`cost_aware_depth`]), else [`Self::point_mass_budget`].
    pub fn tree_depth(&self, nodes_at: impl Fn(usize) -> usize) -> usize {
        match self.draft_cost() {
            Some(cost) => {
                let nodes: Vec<usize> = (0..=self.max_len).map(nodes_at).collect();
                cost_aware_depth(clamped(self.acceptance), cost, &nodes)
            }
            None => self.point_mass_budget(),
        }
    }

    /// The draft length for point-mass drafts each accepted with probability `acceptance` (a drafter that knows
    /// its acceptance better than the running mean passes its own): the cost-aware length (which may be 0, a
    /// plain step), else the threshold policy, where P(some of n drafts rejected) is estimated as 1 - a^n and
    /// drafting goes on while it stays at or under h (at least one), else the fixed length.
    pub fn point_mass_budget_at(&self, acceptance: f64) -> usize {
        let spec = &self.params.speculative;
        let a = clamped(acceptance);
        if let Some(cost) = self.draft_cost() {
            return cost_aware_length(a, cost, self.max_len);
        }
        match spec.adaptive {
            None => self.max_len,
            Some(h) => {
                let mut n = 1;
                while n < self.max_len && 1.0 - a.powi(n as i32 + 1) <= f64::from(h) {
                    n += 1;
                }
                n
            }
        }
    }
}

/// An acceptance kept off 0 and 1, where the length formulas divide by zero.
fn clamped(acceptance: f64) -> f64 {
    acceptance.clamp(1e-6, 1.0 - 1e-9)
}

/// Acceptance assumed before any draft was tested, and the level an unused estimate drifts back to.
pub const PRIOR_ACCEPTANCE: f64 = 0.5;

/// Folds one verification into a running per-token acceptance: `accepted` of the `tested` drafts held.
pub fn update_acceptance(acceptance: &mut f64, accepted: usize, tested: usize) {
    if tested > 0 {
        *acceptance = 0.8 * *acceptance + 0.2 * accepted as f64 / tested as f64;
    }
}

/// A step that drafted nothing tests nothing: the estimate drifts back towards the prior, so that a policy
/// which stopped drafting on a low estimate tries again after a while instead of never.
pub fn drift_acceptance(acceptance: &mut f64) {
    *acceptance += 0.02 * (PRIOR_ACCEPTANCE - *acceptance);
}

/// A draft: the tree, what it cost, and a note for the panel.
#[derive(Clone, Debug, Default)]
pub struct Draft {
    pub tree: DraftTree,
    pub forward_calls: u32,
    pub note: String,
    /// The early-exit drafter's estimates and choice of exit, for the panel.
    pub exit_layers: Option<ExitLayers>,
}

/// What the target computed in the verification forward, for drafters that learn from it.
pub struct Observation<'a> {
    /// Tokens fed: the root, then the draft nodes in order.
    pub tokens: &'a [u32],
    /// The plain logits at each fed token's position, same order.
    pub logits: &'a [Vec<f32>],
    /// Accepted draft nodes, root's child first.
    pub accepted_path: &'a [usize],
    /// The sampling the verifier used (the warping applied to every distribution it compared).
    pub sampling: &'a SamplingParams,
    /// The verifier's warped target distribution p at each fed position, same order as `logits` (empty for a
    /// prefill chunk, which the verifier did not see).
    pub p: &'a [Warped],
    /// For drafters that ask ([`Drafter::wants_root_states`]): the root's residual stream after the embeddings
    /// (index 0) and after each layer (index i + 1 after layer i), from this verification forward. Empty when
    /// not asked for, and when the root was not in the forward (the first step, whose root the prefill fed).
    pub root_states: &'a [Vec<f32>],
}

pub trait Drafter: Send {
    fn name(&self) -> &'static str;
    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft>;
    /// Called after every verification forward, and after each prefill chunk when `learns_from_prompt` (every
    /// position of the chunk, the root included when the chunk ends the prompt; the first verification then
    /// shows the root again, with the same logits).
    fn observe(&mut self, _obs: &Observation<'_>) -> Result<()> {
        Ok(())
    }
    /// Asks the verification forward for the root's hidden state at every layer ([`Observation::root_states`]).
    fn wants_root_states(&self) -> bool {
        false
    }
    /// Asks the prefill for every prompt position's logits (an LM head per prompt token, ~10% of a prefill) so
    /// the drafter can learn from the prompt before the first draft.
    fn learns_from_prompt(&self) -> bool {
        false
    }
}
