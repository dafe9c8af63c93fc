//! Entropy-adaptive decoding (EAD, Simonds 2025), with a layer-skipped copy of the model standing in for the
//! paper's small model: while the rolling mean entropy of the last `window` tokens is at least τ, the full model
//! decodes; below it, the model minus the skipped layers does. A switch waits until the current model has decoded
//! `min_dwell` tokens (hysteresis). Before the first token there is no entropy to go by, so the full model
//! starts: the first token is always the full model's (greedy's own first token, when greedy), and the small
//! model can take over once the full model has decoded `min_dwell` tokens. τ = 0 is plain greedy (or sampling)
//! with the full model throughout.
//!
//! The two models keep separate KV caches, as EAD's two models do: the skipped model's keys and values in the
//! layers it keeps differ from the full model's, so sharing one cache would make the "full" model something else.
//! A model taking over first reads the tokens the other one decoded (one forward). Forwards of the full model
//! count as target calls; the skipped model's are counted apart (`draft_forward_calls`), never as full calls.

use std::collections::BTreeSet;

use super::speculative::layer_skip::default_skip_set;
use super::{DecodingMethod, PREFILL_CHUNK, StepContext, empty_step};
use crate::engine::Model;
use crate::error::{Error, Result, bad_param, count_in_range};
use crate::model::{Capture, KvCache, Logits, Mask, logits_row};
use crate::sampling::{PositionStats, argmax, warp};
use crate::trace::{
    AdaptiveParams, EntropyAdaptiveStep, StepPayload, StepRecord, TokenSource, Trace,
};

/// Longest rolling window and dwell accepted.
pub const MAX_WINDOW: usize = 64;

impl AdaptiveParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.threshold.is_finite() && self.threshold >= 0.0) {
            return Err(bad_param(
                "threshold",
                self.threshold,
                "the entropy threshold must be a number of nats >= 0 (0 = always the full model)",
            ));
        }
        count_in_range("entropy_window", self.window, MAX_WINDOW, " tokens")?;
        count_in_range("min_dwell", self.min_dwell, MAX_WINDOW, " tokens")?;
        Ok(())
    }
}

/// One model's cache and how many positions of the sequence it holds.
struct Side {
    cache: KvCache,
    fed: usize,
}

pub struct EntropyAdaptive {
    full: Side,
    small: Side,
    /// Entropy (nats) of the distribution each generated token was chosen from.
    entropies: Vec<f32>,
    /// The model in use: `None` before the first token, which the full model decodes.
    full_mode: Option<bool>,
    /// Tokens decoded since the last switch (or the start).
    dwell: usize,
}

impl EntropyAdaptive {
    pub fn new(model: &Model) -> Self {
        let side = || Side {
            cache: model.llama.new_cache(),
            fed: 0,
        };
        Self {
            full: side(),
            small: side(),
            entropies: Vec::new(),
            full_mode: None,
            dwell: 0,
        }
    }
}

impl DecodingMethod for EntropyAdaptive {
    fn name(&self) -> &'static str {
        "entropy-adaptive"
    }

    fn step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepRecord> {
        let llama = &ctx.model.llama;
        let p = &ctx.params.adaptive;
        p.validate()?;
        let mut record = empty_step();
        let skip: BTreeSet<usize> = if ctx.params.speculative.skip_layers.is_empty() {
            default_skip_set(llama.config.n_layers)
        } else {
            ctx.params.speculative.skip_layers.iter().copied().collect()
        };
        let window = &self.entropies[self.entropies.len().saturating_sub(p.window)..];
        let rolling =
            (!window.is_empty()).then(|| window.iter().sum::<f32>() / window.len() as f32);
        // An empty window says nothing about the text: counting it as entropy 0 would start every run with
        // τ > 0 on the small model and spoil its first token, so the full model starts.
        let wants_full = rolling.is_none_or(|r| r >= p.threshold);
        let (full, switched) = match self.full_mode {
            None => (true, false),
            Some(current) if current != wants_full && self.dwell >= p.min_dwell => {
                (wants_full, true)
            }
            Some(current) => (current, false),
        };
        if switched || self.full_mode.is_none() {
            self.dwell = 0;
        }
        self.full_mode = Some(full);

        let sequence = ctx.sequence();
        let (side, capture) = if full {
            (&mut self.full, Capture::default())
        } else {
            (
                &mut self.small,
                Capture {
                    skip_layers: skip.clone(),
                    ..Capture::default()
                },
            )
        };
        let caught_up = sequence.len().saturating_sub(side.fed);
        if side.fed == 0 {
            record.prefill_tokens = ctx.prefill.len();
        }
        let mut logits = None;
        let mut calls = 0u32;
        for chunk in sequence[side.fed.min(sequence.len())..].chunks(PREFILL_CHUNK) {
            ctx.check_cancel()?;
            let positions: Vec<usize> = (side.fed..side.fed + chunk.len()).collect();
            let out = llama.forward(
                &mut side.cache,
                chunk,
                &positions,
                1,
                &Mask::Causal,
                Logits::Last,
                &capture,
            )?;
            side.fed += chunk.len();
            logits = Some(logits_row(&out.logits, 0, 0)?);
            calls += 1;
        }
        let logits = logits.ok_or_else(|| {
            Error::MethodPanicked("entropy-adaptive found no new token to read".into())
        })?;
        if full {
            record.target_forward_calls += calls;
        } else {
            record.draft_forward_calls += calls;
        }
        let stats = PositionStats::new(&logits);
        let sampling = &ctx.params.sampling;
        let (id, warped, source) = if sampling.is_greedy() {
            (argmax(&logits), None, TokenSource::Greedy)
        } else {
            let w = warp(&logits, sampling);
            (w.sample(ctx.rng), Some(w), TokenSource::Sampled)
        };
        record.tokens.push(stats.record(
            &ctx.model.tokenizer,
            id,
            ctx.next_position(),
            warped.as_ref(),
            source,
        ));
        self.entropies.push(stats.entropy);
        self.dwell += 1;
        record.payload = Some(StepPayload::EntropyAdaptive(Box::new(
            EntropyAdaptiveStep {
                threshold: p.threshold,
                window: p.window,
                min_dwell: p.min_dwell,
                rolling_entropy: rolling,
                full_model: full,
                switched,
                skip_layers: skip.into_iter().collect(),
                caught_up,
            },
        )));
        Ok(record)
    }
}

/// The step payload of entropy-adaptive decoding, if the step has one.
pub fn payload(step: &StepRecord) -> Option<&EntropyAdaptiveStep> {
    match &step.payload {
        Some(StepPayload::EntropyAdaptive(e)) => Some(e),
        _ => None,
    }
}

/// What `specula run --json` adds for entropy-adaptive runs: the share of tokens the full model decoded, the
/// switches, and the forwards of each model. `None` for other methods.
pub fn adaptive_summary(trace: &Trace) -> Option<serde_json::Value> {
    let steps: Vec<&EntropyAdaptiveStep> = trace.steps.iter().filter_map(payload).collect();
    if trace.header.method != "entropy-adaptive" || steps.is_empty() {
        return None;
    }
    let full = steps.iter().filter(|s| s.full_model).count();
    let switches = steps.iter().filter(|s| s.switched).count();
    let full_calls: u64 = trace
        .steps
        .iter()
        .map(|s| u64::from(s.target_forward_calls))
        .sum();
    let small_calls: u64 = trace
        .steps
        .iter()
        .map(|s| u64::from(s.draft_forward_calls))
        .sum();
    Some(serde_json::json!({
        "full_model_tokens": full,
        "small_model_tokens": steps.len() - full,
        "full_model_share": full as f64 / steps.len() as f64,
        "switches": switches,
        "full_model_forward_calls": full_calls,
        "skipped_model_forward_calls": small_calls,
        "skip_layers": steps.first().map(|s| s.skip_layers.clone()).unwrap_or_default(),
        "threshold": steps.first().map(|s| s.threshold),
    }))
}
