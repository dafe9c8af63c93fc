//! Early exit, DEL-style (Zarch et al., "DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative
//! Decoding"): the target's first layers alone draft a chain (the final norm and LM head applied to an
//! intermediate layer's residual stream, as the logit lens does), with a real q; which exit, and how many tokens,
//! is chosen before every draft.
//!
//! The choice rests on "shadow tokens": after each verification, the final norm and LM head are applied to the
//! verified root's hidden state at every candidate exit, which says what a draft from that exit would have
//! proposed there. Their agreement with the target is a running acceptance estimate per exit, and the drafter
//! takes the exit and length with the most expected tokens per unit of cost, TPL(l, d) = (1 − a_l^(d+1)) /
//! (1 − a_l) / (1 + d·(w_l + c)): w_l the share of a full forward's weights a draft through l layers reads, c the
//! cost of verifying a drafted token (`--draft-cost`, 0 when off, as DEL assumes). LayerSkip-trained models make
//! early exits good; on plain SmolLM2 they are weak, which is what the estimates show.
//!
//! `--skip-layers` fixes the exit before the first skipped layer instead; the estimates are still kept and shown.

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::Tensor;

use super::draft_length::best_length;
use super::drafter::{Draft, DraftInput, Drafter, Observation, PRIOR_ACCEPTANCE};
use super::layer_skip::{draft_chain, forward_weights};
use super::verifier::{DraftTree, overlap};
use crate::error::{Error, Result};
use crate::model::{Llama, logits_row};
use crate::sampling::{argmax, warp};
use crate::trace::{ExitEstimate, ExitLayers};

/// Candidate exits, as layers run before the exit: every `stride`-th layer below the full depth, with the stride
/// keeping them to about ten (each costs one LM-head row per verified step).
pub fn candidate_exits(n_layers: usize) -> Vec<usize> {
    let stride = n_layers.div_ceil(10).max(1);
    (1..n_layers).filter(|l| l % stride == 0).collect()
}

/// How much an exit's older shadow token still counts against its newer one: the estimates follow an exit's last
/// five or so observations, since what a layer gets right depends on the text at hand (DEL's "context-aware").
pub const DECAY: f64 = 0.8;

/// Running acceptance per candidate exit, from shadow tokens: a decayed mean that starts at
/// [`PRIOR_ACCEPTANCE`] worth one observation, so an exit with no evidence is neither trusted nor ruled out, and
/// whose start fades like any older observation. Each verified root gives one exit's shadow token, the exits
/// taking turns: an LM-head row costs about a sixth of a step here, so observing every exit at every root would
/// slow even the steps that draft nothing by half.
#[derive(Clone, Debug, PartialEq)]
pub struct ExitEstimator {
    exits: Vec<usize>,
    /// Decayed sums of observed acceptance, and decayed counts of observations, one per exit.
    sums: Vec<f64>,
    weights: Vec<f64>,
    /// Each exit's observation at the latest root, if it was due then.
    last: Vec<Option<f64>>,
    /// Roots observed so far (which exit is due next).
    turn: usize,
}

impl ExitEstimator {
    pub fn new(exits: Vec<usize>) -> Self {
        let n = exits.len();
        Self {
            exits,
            sums: vec![PRIOR_ACCEPTANCE; n],
            weights: vec![1.0; n],
            last: vec![None; n],
            turn: 0,
        }
    }

    pub fn exits(&self) -> &[usize] {
        &self.exits
    }

    /// The exit due at the next root (an index into the exits), in turn; `None` when there are no exits.
    pub fn due(&self) -> Option<usize> {
        (!self.exits.is_empty()).then(|| self.turn % self.exits.len())
    }

    /// Folds in one root's shadow acceptance at the exit due ([`Self::due`]).
    pub fn observe(&mut self, shadow: f64) {
        self.skip();
        if let Some(i) = self.due()
            && let (Some(sum), Some(weight), Some(last)) = (
                self.sums.get_mut(i),
                self.weights.get_mut(i),
                self.last.get_mut(i),
            )
        {
            *sum = DECAY * *sum + shadow;
            *weight = DECAY * *weight + 1.0;
            *last = Some(shadow);
        }
        self.turn += 1;
    }

    /// A root that gave no shadow tokens: the next report shows none as the newest.
    pub fn skip(&mut self) {
        self.last.iter_mut().for_each(|l| *l = None);
    }

    /// The estimated acceptance at each exit.
    pub fn acceptance(&self) -> Vec<f64> {
        self.sums
            .iter()
            .zip(&self.weights)
            .map(|(&sum, &weight)| sum / weight)
            .collect()
    }

    /// The estimates with, for each exit, its best draft length and expected tokens per unit of cost.
    /// `draft_share(l)`: what a draft forward through l layers costs, in plain steps; `verify_cost`: what verifying
    /// one drafted token costs.
    pub fn report(
        &self,
        draft_share: impl Fn(usize) -> f64,
        verify_cost: f64,
        max_len: usize,
    ) -> Vec<ExitEstimate> {
        self.exits
            .iter()
            .zip(self.acceptance())
            .enumerate()
            .map(|(i, (&layers, acceptance))| {
                let (best_len, tokens_per_cost) =
                    best_length(acceptance, draft_share(layers) + verify_cost, max_len);
                ExitEstimate {
                    layers,
                    acceptance: acceptance as f32,
                    samples: self.weights.get(i).map_or(0.0, |&w| w as f32),
                    shadow: self.last.get(i).copied().flatten().map(|a| a as f32),
                    best_len,
                    tokens_per_cost: tokens_per_cost as f32,
                }
            })
            .collect()
    }
}

/// The exit (and its report entry) with the most tokens per unit of cost; ties to the shallower.
pub fn best_exit(report: &[ExitEstimate]) -> Option<&ExitEstimate> {
    report
        .iter()
        .fold(None, |best: Option<&ExitEstimate>, e| match best {
            Some(b) if b.tokens_per_cost >= e.tokens_per_cost => Some(b),
            _ => Some(e),
        })
}

/// The fixed exit when `--skip-layers` was not given and the estimates cannot decide (no candidate exits): after
/// two thirds of the layers.
pub fn default_exit(n_layers: usize) -> usize {
    (2 * n_layers / 3).max(1)
}

/// While no exit pays (the cost-aware policy drafts nothing), shadow tokens are taken at every `IDLE_STRIDE`-th
/// root only: they are what lets drafting start again when the text turns predictable, but at every root they
/// would cost each plain step a sixth more.
pub const IDLE_STRIDE: usize = 4;

pub struct EarlyExit {
    llama: Arc<Llama>,
    estimator: ExitEstimator,
    /// Steps in a row that drafted nothing because no draft paid.
    idle_steps: usize,
}

impl EarlyExit {
    pub fn new(llama: Arc<Llama>) -> Self {
        let exits = candidate_exits(llama.config.n_layers);
        Self {
            llama,
            estimator: ExitEstimator::new(exits),
            idle_steps: 0,
        }
    }

    /// The due exit's acceptance at one verified root: did its top token equal the target's (greedy), or the
    /// probability sum min(p, q) that a token it drew would be accepted (sampling). `None` when the root was not
    /// in the verification (or there are no exits).
    fn shadow(&self, obs: &Observation<'_>) -> Result<Option<f64>> {
        let (Some(p), false) = (obs.p.first(), obs.root_states.is_empty()) else {
            return Ok(None);
        };
        let Some(&layers) = self
            .estimator
            .due()
            .and_then(|i| self.estimator.exits().get(i))
        else {
            return Ok(None);
        };
        let dim = self.llama.config.dim;
        let state = match obs.root_states.get(layers) {
            Some(state) if state.len() == dim => state.clone(),
            _ => {
                return Err(Error::MethodPanicked(format!(
                    "early exit: the verification returned {} hidden states, none of width {dim} after {layers} \
                     layers",
                    obs.root_states.len()
                )));
            }
        };
        let head = self
            .llama
            .head(&Tensor::from_vec(state, (1, 1, dim), self.llama.device())?)?;
        let q = logits_row(&head, 0, 0)?;
        Ok(Some(if obs.sampling.is_greedy() {
            // Greedy, p is the point mass on the target's top token.
            f64::from(u8::from(p.most_likely() == Some(argmax(&q))))
        } else {
            overlap(p, &warp(&q, obs.sampling))
        }))
    }
}

impl Drafter for EarlyExit {
    fn name(&self) -> &'static str {
        "early-exit"
    }

    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft> {
        let config = &input.llama.config;
        let n_layers = config.n_layers;
        let full = forward_weights(config, &BTreeSet::new());
        let share =
            |layers: usize| forward_weights(config, &(layers..n_layers).collect()) / full.max(1.0);
        let draft_cost = input.draft_cost();
        let report = self
            .estimator
            .report(share, draft_cost.unwrap_or(0.0), input.max_len);
        // `skip_layers` given: exit before the first of them (everything from there up is skipped).
        let fixed = input.params.speculative.skip_layers.iter().copied().min();
        let (exit, len, note) = match (fixed, best_exit(&report)) {
            (Some(exit), _) => (exit.max(1), input.max_len, "fixed by the skipped layers"),
            (None, Some(best)) => (
                best.layers,
                // A plain step when even the best exit's drafts cost more than they bring (cost-aware only).
                if draft_cost.is_some() && best.tokens_per_cost <= 1.0 {
                    0
                } else {
                    best.best_len
                },
                "the most expected tokens per unit of cost",
            ),
            (None, None) => (default_exit(n_layers), input.max_len, "the default"),
        };
        let exit_layers = Some(ExitLayers {
            exits: report,
            chosen: exit,
            dynamic: fixed.is_none(),
        });
        let note = format!(
            "exit after layer {} of {n_layers} ({note}), up to {len} drafts",
            exit - 1
        );
        self.idle_steps = if len == 0 { self.idle_steps + 1 } else { 0 };
        if len == 0 {
            return Ok(Draft {
                note,
                exit_layers,
                ..Draft::default()
            });
        }
        input.max_len = len.min(input.max_len);
        let skip: BTreeSet<usize> = (exit..n_layers).collect();
        let (nodes, calls) = draft_chain(input, &skip)?;
        Ok(Draft {
            tree: DraftTree { nodes },
            forward_calls: calls,
            note,
            exit_layers,
        })
    }

    fn wants_root_states(&self) -> bool {
        true
    }

    fn observe(&mut self, obs: &Observation<'_>) -> Result<()> {
        let shadow = if self.idle_steps.is_multiple_of(IDLE_STRIDE) {
            self.shadow(obs)?
        } else {
            None
        };
        match shadow {
            Some(shadow) => self.estimator.observe(shadow),
            None => self.estimator.skip(),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_exits_stay_about_ten_and_below_the_full_depth() {
        assert_eq!(candidate_exits(30), [3, 6, 9, 12, 15, 18, 21, 24, 27]);
        assert_eq!(candidate_exits(4), [1, 2, 3]);
        assert_eq!(candidate_exits(1), Vec::<usize>::new());
    }

    #[test]
    fn estimates_start_at_the_prior_and_follow_the_shadow_tokens_in_turn() {
        let mut e = ExitEstimator::new(vec![3, 6, 9]);
        assert_eq!(e.acceptance(), [0.5; 3]);
        assert_eq!(e.due(), Some(0));
        e.observe(0.0);
        // (0.8 * 0.5 + 0) / (0.8 + 1); the others keep the prior.
        let a = e.acceptance();
        assert!((a[0] - 0.4 / 1.8).abs() < 1e-12);
        assert_eq!(&a[1..], [0.5, 0.5]);
        assert_eq!(e.due(), Some(1));
        e.observe(1.0);
        assert!((e.acceptance()[1] - 1.4 / 1.8).abs() < 1e-12);
        let shadows: Vec<Option<f32>> =
            e.report(|_| 0.1, 0.0, 2).iter().map(|r| r.shadow).collect();
        assert_eq!(shadows, [None, Some(1.0), None]);
        e.observe(0.5);
        assert_eq!(e.due(), Some(0));
        e.observe(1.0);
        let w = DECAY * (DECAY + 1.0) + 1.0;
        assert!((e.acceptance()[0] - (DECAY * 0.4 + 1.0) / w).abs() < 1e-12);
        assert_eq!(e.report(|_| 0.1, 0.0, 2)[0].samples, w as f32);
        // The prior fades: an exit that is always right tends to 1, one that never is to 0.
        for _ in 0..300 {
            let shadow = if e.due() == Some(2) { 1.0 } else { 0.0 };
            e.observe(shadow);
        }
        let a = e.acceptance();
        assert!(a[0] < 1e-6 && a[2] > 1.0 - 1e-6, "{a:?}");
    }

    #[test]
    fn the_choice_maximises_tokens_per_unit_of_cost() {
        // a = 0.5 at cost 0.1 a token: TPL(1) = 1.5 / 1.1 = 1.364, TPL(2) = 1.75 / 1.2 = 1.458,
        // TPL(3) = 1.875 / 1.3 = 1.442: two drafts.
        let (len, tpc) = best_length(0.5, 0.1, 4);
        assert_eq!(len, 2);
        assert!((tpc - 1.75 / 1.2).abs() < 1e-12);
        assert_eq!(best_length(0.5, 0.1, 0), (0, 1.0));
        // A deep exit that agrees more beats a shallow cheap one that rarely does.
        let mut e = ExitEstimator::new(vec![10, 20]);
        for _ in 0..30 {
            let shadow = if e.due() == Some(0) { 0.1 } else { 0.9 };
            e.observe(shadow);
        }
        let report = e.report(|l| l as f64 / 30.0, 0.0, 4);
        let best = best_exit(&report).map(|b| b.layers);
        assert_eq!(best, Some(20));
        for r in &report {
            let (len, tpc) = best_length(f64::from(r.acceptance), r.layers as f64 / 30.0, 4);
            assert_eq!(r.best_len, len);
            assert!((f64::from(r.tokens_per_cost) - tpc).abs() < 1e-5);
            assert!(r.samples > 4.0);
        }
    }
}
