//! Early exit: the target's first layers alone draft a chain (the final norm and LM head applied to an
//! intermediate layer's residual stream, as the logit lens does), with a real q. LayerSkip- and DEL-style
//! methods train the model for this; on plain SmolLM2 the early exits are weak, which is what the trace shows.
//! Drafting shares the layer-skip chain (the upper layers are simply skipped) and its clone of the cache.

use std::collections::BTreeSet;

use super::drafter::{Draft, DraftInput, Drafter};
use super::layer_skip::draft_chain;
use super::verifier::DraftTree;
use crate::error::Result;

#[derive(Default)]
pub struct EarlyExit;

/// The default exit: after two thirds of the layers (layer 20 of 30), the shallowest exit whose top-1 still
/// often agrees with the full model's on this size of model.
pub fn default_exit(n_layers: usize) -> usize {
    (2 * n_layers / 3).max(1)
}

impl Drafter for EarlyExit {
    fn name(&self) -> &'static str {
        "early-exit"
    }

    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft> {
        let n_layers = input.llama.config.n_layers;
        // `skip_layers` given: exit before the first of them (everything from there up is skipped).
        let exit = input
            .params
            .speculative
            .skip_layers
            .iter()
            .copied()
            .min()
            .unwrap_or_else(|| default_exit(n_layers))
            .max(1);
        let skip: BTreeSet<usize> = (exit..n_layers).collect();
        let (nodes, calls) = draft_chain(input, &skip)?;
        Ok(Draft {
            tree: DraftTree { nodes },
            forward_calls: calls,
            note: format!("exit after layer {} of {n_layers}", exit - 1),
        })
    }
}
