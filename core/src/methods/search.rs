//! What the search methods (`beam`, `diverse-beam`, `contrastive`, `cad`) share: parameter validation, moving
//! the output onto a new best hypothesis, and the per-method figures `specula run --json` prints.

use std::sync::Arc;

use crate::error::{Result, bad_param, count_in_range};
use crate::trace::{Rollback, SearchParams, StepPayload, StepRecord, TokenRecord, Trace};

/// Largest beam width: each beam is a batch row of every forward, so the cost grows linearly.
pub const MAX_BEAMS: usize = 16;
/// Largest number of contrastive-search candidates (one batch row each).
pub const MAX_CANDIDATES: usize = 32;

impl SearchParams {
    /// Refuses values that `method` would misuse. Fields other methods read are not checked, so that a
    /// leftover value from another method never blocks a run.
    pub fn validate(&self, method: &str) -> Result<()> {
        let finite = |name: &'static str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(bad_param(name, v, "must be a finite number"))
            }
        };
        match method {
            "beam" | "diverse-beam" | "opera" => {
                count_in_range("beams", self.beams, MAX_BEAMS, "")?;
                finite("length_penalty", self.length_penalty)?;
                if self.length_penalty.abs() > 10.0 {
                    return Err(bad_param(
                        "length_penalty",
                        self.length_penalty,
                        "must be between -10 and 10 (1 is the usual value)",
                    ));
                }
            }
            "momentum" => {
                finite("alpha", self.alpha)?;
                if !(0.0..=10.0).contains(&self.alpha) {
                    return Err(bad_param(
                        "alpha",
                        self.alpha,
                        "the resistance weight must be between 0 (greedy) and 10",
                    ));
                }
                count_in_range("candidates", self.candidates, MAX_CANDIDATES, "")?;
            }
            "contrastive" => {
                finite("alpha", self.alpha)?;
                if !(0.0..=1.0).contains(&self.alpha) {
                    return Err(bad_param(
                        "alpha",
                        self.alpha,
                        "the degeneration penalty must be in [0, 1]; 0 is greedy",
                    ));
                }
                count_in_range("candidates", self.candidates, MAX_CANDIDATES, "")?;
            }
            "cad" => {
                finite("alpha", self.alpha)?;
                if !(0.0..=10.0).contains(&self.alpha) {
                    return Err(bad_param(
                        "alpha",
                        self.alpha,
                        "the context weight must be between 0 (plain decoding with the context) and 10",
                    ));
                }
                if self.context.as_deref().is_none_or(|c| c.trim().is_empty()) {
                    return Err(bad_param(
                        "context",
                        self.context.as_deref().unwrap_or(""),
                        "context-aware decoding needs a context: give --context TEXT",
                    ));
                }
            }
            _ => {}
        }
        if method == "diverse-beam" {
            if self.groups == 0
                || self.groups > self.beams
                || !self.beams.is_multiple_of(self.groups)
            {
                return Err(bad_param(
                    "groups",
                    self.groups,
                    format!(
                        "must divide the number of beams ({}) into equal groups",
                        self.beams
                    ),
                ));
            }
            finite("diversity", self.diversity)?;
            if !(0.0..=100.0).contains(&self.diversity) {
                return Err(bad_param(
                    "diversity",
                    self.diversity,
                    "must be between 0 (independent groups) and 100",
                ));
            }
        }
        if method == "opera" {
            finite("alpha", self.alpha)?;
            if !(0.0..=10.0).contains(&self.alpha) {
                return Err(bad_param(
                    "alpha",
                    self.alpha,
                    "the over-trust penalty weight must be between 0 (beam search) and 10",
                ));
            }
            count_in_range("candidates", self.candidates, MAX_CANDIDATES, "")?;
        }
        Ok(())
    }
}

/// Makes the output follow `path`, the token records of the hypothesis now judged best: keeps the committed
/// tokens it shares, rolls back the rest, and commits its remaining tokens in this step. `base` output tokens
/// came before the search began (a fork's kept tokens) and are never taken back.
pub(crate) fn follow(
    record: &mut StepRecord,
    generated: &[u32],
    base: usize,
    path: &[Arc<TokenRecord>],
    reason: impl FnOnce(usize) -> String,
) {
    let generated = generated.get(base..).unwrap_or_default();
    let shared = generated
        .iter()
        .zip(path)
        .take_while(|(g, p)| **g == p.id)
        .count();
    if shared < generated.len() {
        record.rollback = Some(Rollback {
            to_generated: base + shared,
            removed: generated.len() - shared,
            reason: reason(base + shared),
        });
    }
    record
        .tokens
        .extend(path[shared.min(path.len())..].iter().map(|t| (**t).clone()));
}

/// The figures of a search run worth printing next to the summary: rollbacks for every method; the final beams
/// and their scores for beam search; mean similarity for contrastive search. `None` for other methods.
pub fn search_summary(trace: &Trace) -> Option<serde_json::Value> {
    let rollbacks = trace.steps.iter().filter(|s| s.rollback.is_some()).count();
    let rolled_back_tokens: usize = trace
        .steps
        .iter()
        .filter_map(|s| s.rollback.as_ref().map(|r| r.removed))
        .sum();
    match trace.header.method.as_str() {
        "beam" | "diverse-beam" | "opera" => {
            let last = trace.steps.iter().rev().find_map(|s| match &s.payload {
                Some(StepPayload::Beams(b)) => Some(b),
                _ => None,
            })?;
            let hyp = |h: &crate::trace::BeamHypothesis| {
                serde_json::json!({
                    "group": h.group,
                    "text": h.text,
                    "logprob": h.logprob,
                    "score": h.score,
                    "tokens": h.token_ids.len(),
                })
            };
            // OPERA's own rollbacks (retrospection), apart from those of the best hypothesis changing.
            let retrospections = trace
                .steps
                .iter()
                .filter(|s| {
                    s.rollback
                        .as_ref()
                        .is_some_and(|r| r.reason.starts_with("OPERA"))
                })
                .count();
            Some(serde_json::json!({
                "rollbacks": rollbacks,
                "retrospections": retrospections,
                "rolled_back_tokens": rolled_back_tokens,
                "output_logprob": trace.tokens().map(|t| f64::from(t.logprob)).sum::<f64>(),
                "finished": last.finished.iter().map(hyp).collect::<Vec<_>>(),
                "live": last.live.iter().map(hyp).collect::<Vec<_>>(),
                "distinct_2": last.distinct_2,
            }))
        }
        "contrastive" => {
            let chosen: Vec<f64> = trace
                .steps
                .iter()
                .filter_map(|s| match &s.payload {
                    Some(StepPayload::Contrastive(c)) => c
                        .candidates
                        .get(c.chosen)
                        .map(|x| f64::from(x.max_similarity)),
                    _ => None,
                })
                .collect();
            let changed = trace
                .steps
                .iter()
                .filter(
                    |s| matches!(&s.payload, Some(StepPayload::Contrastive(c)) if c.chosen != 0),
                )
                .count();
            Some(serde_json::json!({
                "rollbacks": rollbacks,
                "mean_max_similarity": if chosen.is_empty() { 0.0 } else { chosen.iter().sum::<f64>() / chosen.len() as f64 },
                "steps_not_most_likely": changed,
            }))
        }
        "momentum" => {
            let barred_or_moved = trace
                .steps
                .iter()
                .filter(|s| matches!(&s.payload, Some(StepPayload::Momentum(m)) if m.chosen != 0))
                .count();
            Some(serde_json::json!({
                "rollbacks": rollbacks,
                "steps_not_most_likely": barred_or_moved,
            }))
        }
        "cad" => {
            let changed = trace
                .steps
                .iter()
                .filter(|s| match &s.payload {
                    Some(StepPayload::Cad(c)) => {
                        c.with_context.first().map(|x| x.id) != s.tokens.first().map(|t| t.id)
                    }
                    _ => false,
                })
                .count();
            Some(serde_json::json!({
                "rollbacks": rollbacks,
                "steps_not_top_with_context": changed,
            }))
        }
        _ => None,
    }
}
