//! Measured against predicted speedup of a speculative run, step by step, with no egui: what the Speedup and
//! Draft sweep panels plot. The prediction is the one `specula run --json` reports (`predicted_speedup`), from
//! the same inputs, so the GUI's last value and the CLI's agree.
//!
//! Times are decode times: the first step of a run also reads the prompt, which costs tens of steps and would
//! swamp what drafting changes, so it is left out of measured times on both sides.

use specula_core::methods::speculative::{expected_tokens_per_round, predicted_speedup};
use specula_core::trace::{StepRecord, Trace};

use super::spec::payload;
use super::store::{RunEntry, RunKey, RunStore};

/// The speedup figures after a step, from the steps up to and including it. `None` = not measurable yet (or
/// not recorded: deterministic traces have no times).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpeedupPoint {
    /// Mean alpha over every verified depth so far.
    pub alpha: Option<f64>,
    /// Mean tokens drafted per round.
    pub k: Option<f64>,
    /// Time to draft one token over the time of one verification forward.
    pub c: Option<f64>,
    /// (1 - a^(k+1)) / (1 - a): tokens a round commits on average if drafts are accepted independently.
    pub expected_tokens: Option<f64>,
    /// The prediction, assuming a verification forward costs one plain step.
    pub predicted: Option<f64>,
    /// Time of a plain one-token step (ms): from the baseline run, else from this run's rounds that drafted
    /// nothing (their verification fed one token).
    pub plain_step_ms: Option<f64>,
    /// A verification forward's time over a plain one-token step's.
    pub verify_cost: Option<f64>,
    /// The prediction with the verification's real cost: `predicted / verify_cost`.
    pub adjusted: Option<f64>,
    /// Plain decoding's time for as many tokens, over this run's decode time.
    pub measured: Option<f64>,
    /// Tokens per target forward (MAT) so far.
    pub mat: Option<f64>,
}

/// Cumulative decode time of a plain run: `ms[i]` after `tokens[i]` tokens (the prompt step left out).
struct PlainCurve {
    tokens: Vec<usize>,
    ms: Vec<f64>,
}

impl PlainCurve {
    fn of(steps: &[StepRecord]) -> Option<Self> {
        let (mut tokens, mut ms) = (Vec::new(), Vec::new());
        let (mut n, mut t) = (0usize, 0.0f64);
        for step in steps.iter().skip(1) {
            let timing = step.timing?;
            n += step.tokens.len();
            t += timing.total_ms;
            tokens.push(n);
            ms.push(t);
        }
        (n > 0 && t > 0.0).then_some(Self { tokens, ms })
    }

    /// Mean time of one step.
    fn step_ms(&self) -> f64 {
        self.ms.last().copied().unwrap_or(0.0) / self.ms.len().max(1) as f64
    }

    /// Time plain decoding took to produce `n` tokens; beyond its end, at its mean rate.
    fn ms_for(&self, n: usize) -> f64 {
        match self.tokens.iter().position(|&t| t >= n) {
            Some(i) => self.ms[i],
            None => {
                let total = self.tokens.last().copied().unwrap_or(1).max(1);
                self.ms.last().copied().unwrap_or(0.0) * n as f64 / total as f64
            }
        }
    }
}

/// The figures after every step of `spec`; `baseline` is a plain run of the same prompt and settings, if any.
pub fn speedup_series(spec: &[StepRecord], baseline: Option<&[StepRecord]>) -> Vec<SpeedupPoint> {
    let plain = baseline.and_then(PlainCurve::of);
    let (mut alpha_sum, mut alpha_n) = (0.0f64, 0usize);
    let (mut rounds, mut drafted) = (0usize, 0usize);
    let (mut draft_ms, mut verify_ms, mut timed) = (0.0f64, 0.0f64, true);
    let (mut single_ms, mut singles) = (0.0f64, 0usize);
    let (mut generated, mut calls) = (0usize, 0u64);
    let (mut decoded, mut decode_ms) = (0usize, 0.0f64);
    spec.iter()
        .enumerate()
        .map(|(i, step)| {
            generated += step.tokens.len();
            calls += u64::from(step.target_forward_calls);
            drafted += step.draft_n;
            if let Some(p) = payload(step) {
                rounds += 1;
                alpha_sum += p.alpha.iter().map(|&a| f64::from(a)).sum::<f64>();
                alpha_n += p.alpha.len();
                match step.timing {
                    Some(t) => {
                        draft_ms += t.draft_ms;
                        verify_ms += t.verify_ms;
                        if step.draft_n == 0 && t.verify_ms > 0.0 {
                            single_ms += t.verify_ms;
                            singles += 1;
                        }
                    }
                    None => timed = false,
                }
            }
            if i > 0 {
                decoded += step.tokens.len();
                match step.timing {
                    Some(t) => decode_ms += t.total_ms,
                    None => timed = false,
                }
            }
            let alpha = (alpha_n > 0).then(|| alpha_sum / alpha_n as f64);
            let k = (rounds > 0).then(|| drafted as f64 / rounds as f64);
            let verify_round_ms =
                (timed && rounds > 0 && verify_ms > 0.0).then(|| verify_ms / rounds as f64);
            let c = verify_round_ms
                .filter(|_| drafted > 0)
                .map(|v| (draft_ms / drafted as f64) / v);
            let expected_tokens = alpha.zip(k).map(|(a, k)| expected_tokens_per_round(a, k));
            let predicted = alpha
                .zip(k)
                .zip(c)
                .map(|((a, k), c)| predicted_speedup(a, k, c));
            let plain_step_ms = match &plain {
                Some(p) => Some(p.step_ms()),
                None => (timed && singles > 0).then(|| single_ms / singles as f64),
            };
            let verify_cost = verify_round_ms.zip(plain_step_ms).map(|(v, s)| v / s);
            let adjusted = predicted.zip(verify_cost).map(|(p, v)| p / v);
            let measured = plain
                .as_ref()
                .filter(|_| timed && decoded > 0 && decode_ms > 0.0)
                .map(|p| p.ms_for(decoded) / decode_ms);
            SpeedupPoint {
                alpha,
                k,
                c,
                expected_tokens,
                predicted,
                plain_step_ms,
                verify_cost,
                adjusted,
                measured,
                mat: (calls > 0).then(|| generated as f64 / calls as f64),
            }
        })
        .collect()
}

/// True for runs that decode one token per forward with no drafter: what a speedup is measured against.
pub fn is_plain(trace: &Trace) -> bool {
    matches!(trace.header.method.as_str(), "greedy" | "sample")
}

/// A plain run of the same model, prompt and settings as `spec` (its sampling, seed and token budget) that
/// recorded its times; one from the same sweep first, else the newest.
pub fn find_baseline<'a>(store: &'a RunStore, spec: &Trace) -> Option<(RunKey, &'a RunEntry)> {
    let h = &spec.header;
    let matching = |run: &RunEntry| {
        let b = &run.trace.header;
        is_plain(&run.trace)
            && b.model.sha256 == h.model.sha256
            && b.prompt.token_ids == h.prompt.token_ids
            && b.params.sampling == h.params.sampling
            && (b.seed == h.seed || h.params.sampling.is_greedy())
            && b.max_tokens == h.max_tokens
            && b.forked_from.is_none()
            && run.trace.steps.iter().skip(1).any(|s| s.timing.is_some())
    };
    let candidates: Vec<(RunKey, &RunEntry)> = store.runs().filter(|(_, r)| matching(r)).collect();
    candidates
        .iter()
        .rev()
        .find(|(_, r)| h.sweep_id.is_some() && r.trace.header.sweep_id == h.sweep_id)
        .or_else(|| candidates.last())
        .copied()
}

/// Wall-clock speedup of whole runs, prompt included (what `specula run --json` reports as `speedup`): the
/// baseline's wall time over the run's. Only for finished runs with times.
pub fn wall_clock_speedup(spec: &Trace, baseline: &Trace) -> Option<f64> {
    let wall = |t: &Trace| t.summary.as_ref().and_then(|s| s.timing).map(|t| t.wall_ms);
    let (s, b) = (wall(spec)?, wall(baseline)?);
    (s > 0.0 && b > 0.0).then(|| b / s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn load(name: &str) -> Trace {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../assets/traces")
            .join(name);
        Trace::load(&path).unwrap().remove(0)
    }

    /// Within 1e-7: the trace stores alpha as f32, which the hand computation read as decimal doubles.
    fn close(a: Option<f64>, b: f64) {
        let a = a.unwrap();
        assert!((a - b).abs() < 1e-7, "{a} != {b}");
    }

    /// The expected values were computed by hand (a Python script summing the JSON fields) from
    /// assets/traces/speculative.jsonl: layer-skip, draft length 4, 43 rounds of 4 drafts each.
    #[test]
    fn the_recorded_trace_gives_the_hand_computed_figures() {
        let trace = load("speculative.jsonl");
        let series = speedup_series(&trace.steps, None);
        assert_eq!(series.len(), 43);
        // After the first round: one alpha (0.069296606), c = (74.314066 / 4) / 115.450048.
        let first = series[0];
        close(first.alpha, 0.069296606);
        close(first.k, 4.0);
        close(first.c, 0.160922553276);
        close(first.expected_tokens, 1.074454448656);
        close(first.predicted, 0.653684277055);
        // After ten rounds.
        close(series[9].alpha, 0.407537089125);
        close(series[9].c, 0.157889337606);
        close(series[9].predicted, 1.022884476856);
        // The whole run.
        let last = series[42];
        close(last.alpha, 0.420619568032);
        close(last.c, 0.157399019311);
        close(last.expected_tokens, 1.703257725261);
        close(last.predicted, 1.045202396500);
        close(last.mat, 64.0 / 44.0);
        // Every round drafted, so no round measured a one-token step, and there is no baseline.
        assert_eq!(last.plain_step_ms, None);
        assert_eq!(
            (last.verify_cost, last.adjusted, last.measured),
            (None, None, None)
        );
        // The CLI's `predicted_speedup` for the same trace.
        let cli = specula_core::methods::speculative::speculative_summary(&trace).unwrap();
        close(cli["predicted_speedup"].as_f64(), last.predicted.unwrap());
    }

    /// With greedy.jsonl standing in as the baseline (a plain run of the same prompt; only the arithmetic is
    /// checked here, the app pairs runs of equal settings only), the verify cost and the measured speedup follow
    /// from the two files' step times, again computed by hand.
    #[test]
    fn a_baseline_gives_the_verify_cost_and_the_measured_speedup() {
        let trace = load("speculative.jsonl");
        let plain = load("greedy.jsonl");
        let series = speedup_series(&trace.steps, Some(&plain.steps));
        let last = series[42];
        close(last.plain_step_ms, 22.604443095238086);
        close(last.verify_cost, 121.765131023256 / 22.604443095238086);
        close(
            last.adjusted,
            1.045202396500 / (121.765131023256 / 22.604443095238086),
        );
        close(last.measured, MEASURED_LAST);
        close(series[9].measured, MEASURED_AT_10);
        assert_eq!(
            series[0].measured, None,
            "the prompt step alone measures nothing"
        );
        close(
            wall_clock_speedup(&trace, &plain),
            2204.0955309999995 / 9299.331429000002,
        );
    }

    /// Greedy's steps 1..=63 took 1424.0799149999993 ms for the 63 tokens the speculative run decoded in its
    /// steps 1..=42 (8384.679818000002 ms).
    const MEASURED_LAST: f64 = 1424.0799149999993 / 8384.679818000002;
    /// After ten rounds: 15 tokens decoded in 1789.38422 ms; greedy's first 15 took 330.671833 ms.
    const MEASURED_AT_10: f64 = 330.671833 / 1789.38422;
}
