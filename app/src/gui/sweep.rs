//! The draft-length sweep, with no egui: the same prompt and settings decoded plainly (the baseline) and then
//! speculatively with draft lengths 1..=12, or with the cost-aware draft length at a range of costs per draft,
//! one run after the other so that no two runs share the CPU (their times would be worth nothing). The runs are
//! ordinary runs in the store; their headers carry the sweep's id, so the sweep's curves are rebuilt from the
//! store, and from saved traces, by [`sweep_data`].

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::time::{SystemTime, UNIX_EPOCH};

use specula_core::RunSpec;
use specula_core::worker::RunId;

use super::app::SpeculaApp;
use super::backend::Backend;
use super::settings::RunSettings;
use super::speedup::{is_plain, speedup_series};
use super::store::{Notice, RunKey, RunStatus, RunStore};

/// The draft lengths a sweep tries.
pub const SWEEP_KS: RangeInclusive<usize> = 1..=12;

/// The costs per draft a cost sweep tries (one-token steps per drafted token; `specula bench` prints this
/// machine's as `verify_token_cost`).
pub const SWEEP_COSTS: [f32; 9] = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8];

/// What a sweep varies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SweepKind {
    /// Fixed draft lengths [`SWEEP_KS`].
    #[default]
    DraftLength,
    /// The cost-aware draft length, up to the prompt panel's draft length, at each of [`SWEEP_COSTS`].
    Cost,
}

/// A sweep in progress.
pub struct Sweep {
    pub id: u64,
    labels: Vec<String>,
    queue: VecDeque<RunSpec>,
    current: Option<RunId>,
    done: usize,
}

/// What [`Sweep::advance`] found.
#[derive(Clone, Debug, PartialEq)]
pub enum SweepUpdate {
    Running,
    Finished,
    Failed(String),
}

impl Sweep {
    pub fn new(id: u64, specs: Vec<RunSpec>) -> Self {
        Self {
            id,
            labels: specs.iter().map(|s| s.label.clone()).collect(),
            queue: specs.into(),
            current: None,
            done: 0,
        }
    }

    pub fn total(&self) -> usize {
        self.labels.len()
    }

    /// Runs that have ended so far.
    pub fn done(&self) -> usize {
        self.done
    }

    /// The label of the run in progress.
    pub fn current_label(&self) -> Option<&str> {
        self.current
            .and_then(|_| self.labels.get(self.done))
            .map(String::as_str)
    }

    /// Fraction of the sweep done: ended runs, plus the running one's share of its token budget.
    pub fn progress(&self, store: &RunStore) -> f32 {
        let current = self
            .current
            .and_then(|id| store.key_of(id))
            .and_then(|key| store.run(key))
            .map_or(0.0, |run| {
                run.trace.generated_len() as f32 / run.trace.header.max_tokens.max(1) as f32
            })
            .min(1.0);
        ((self.done as f32 + current) / self.total().max(1) as f32).min(1.0)
    }

    /// Starts the next run once the current one has ended. Never waits: called once per frame.
    pub fn advance(&mut self, store: &mut RunStore, backend: &mut dyn Backend) -> SweepUpdate {
        if let Some(id) = self.current {
            if store.is_pending(id) {
                return SweepUpdate::Running;
            }
            let Some(run) = store.key_of(id).and_then(|key| store.run(key)) else {
                // The worker refused the run (the store has shown why).
                return SweepUpdate::Failed(format!(
                    "run {} of {} could not start",
                    self.done + 1,
                    self.total()
                ));
            };
            match &run.status {
                status if status.is_live() => return SweepUpdate::Running,
                RunStatus::Failed(e) => {
                    return SweepUpdate::Failed(format!("run \"{}\" failed: {e}", run.label()));
                }
                _ => {
                    self.done += 1;
                    self.current = None;
                }
            }
        }
        match self.queue.pop_front() {
            Some(spec) => {
                let id = backend.start(spec, false);
                store.expect_sweep_run(id, self.id);
                self.current = Some(id);
                SweepUpdate::Running
            }
            None => SweepUpdate::Finished,
        }
    }

    /// Cancels the run in progress and drops the rest.
    pub fn cancel(&mut self, backend: &mut dyn Backend) {
        if let Some(id) = self.current.take() {
            backend.cancel(id);
        }
        self.queue.clear();
    }
}

/// The sweep's runs: the plain baseline first, then speculative decoding with each draft length (fixed, not
/// adaptive) or each cost per draft (cost-aware), all with the prompt, sampling, seed and token budget of
/// `settings`.
pub fn sweep_specs(settings: &RunSettings, kind: SweepKind) -> Vec<RunSpec> {
    let base = settings.run_spec();
    let sampling = base.params.sampling;
    let plain = if sampling.is_greedy() {
        "greedy"
    } else {
        "sample"
    };
    let mut specs = vec![RunSpec {
        label: format!("sweep: plain {}", sampling.describe()),
        method: plain.to_owned(),
        ..base.clone()
    }];
    let variants: Vec<(usize, Option<f32>)> = match kind {
        SweepKind::DraftLength => SWEEP_KS.map(|k| (k, None)).collect(),
        SweepKind::Cost => SWEEP_COSTS
            .iter()
            .map(|&c| (base.params.speculative.draft_len, Some(c)))
            .collect(),
    };
    for (k, cost) in variants {
        let mut params = base.params.clone();
        params.speculative.draft_len = k;
        params.speculative.adaptive = None;
        params.speculative.draft_cost = cost;
        // Each cost holds at every context length, so that a point of the sweep is the cost it is labelled with.
        params.speculative.draft_cost_growth = None;
        let label = match cost {
            None => format!("sweep: {} k={k}", params.speculative.drafter),
            Some(c) => format!("sweep: {} C={c} (k<={k})", params.speculative.drafter),
        };
        specs.push(RunSpec {
            label,
            method: "speculative".to_owned(),
            params,
            ..base.clone()
        });
    }
    specs
}

/// One draft length (or cost per draft) of a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPoint {
    pub k: usize,
    /// The cost per draft of a cost sweep's run (its `k` is then the longest draft).
    pub cost: Option<f32>,
    pub key: RunKey,
    /// Tokens per target forward.
    pub mat: Option<f64>,
    /// Against the sweep's baseline; decode times, the prompt step left out.
    pub measured: Option<f64>,
    /// From the run's measured alpha and cost ratio.
    pub predicted: Option<f64>,
    /// The same, with the verification's measured cost.
    pub adjusted: Option<f64>,
    pub finished: bool,
}

impl SweepPoint {
    /// Where the point sits on the sweep's axis: its cost in a cost sweep, else its draft length.
    pub fn x(&self) -> f64 {
        self.cost.map_or(self.k as f64, f64::from)
    }
}

/// A sweep as the store holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepData {
    pub id: u64,
    pub kind: SweepKind,
    pub baseline: Option<RunKey>,
    /// One point per draft length or cost, in increasing order (the newest run when one appears twice).
    pub points: Vec<SweepPoint>,
}

/// The sweeps the store holds runs of, oldest first.
pub fn sweep_ids(store: &RunStore) -> Vec<u64> {
    let mut ids: Vec<u64> = store
        .runs()
        .filter_map(|(_, r)| r.trace.header.sweep_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

pub fn sweep_data(store: &RunStore, id: u64) -> SweepData {
    let runs: Vec<_> = store
        .runs()
        .filter(|(_, r)| r.trace.header.sweep_id == Some(id))
        .collect();
    let baseline = runs.iter().rev().find(|(_, r)| is_plain(&r.trace));
    let baseline_steps = baseline.map(|(_, r)| r.trace.steps.as_slice());
    let mut points: Vec<SweepPoint> = Vec::new();
    for (key, run) in &runs {
        if run.trace.header.method != "speculative" || run.trace.steps.is_empty() {
            continue;
        }
        let last = speedup_series(&run.trace.steps, baseline_steps)
            .last()
            .copied()
            .unwrap_or_default();
        let point = SweepPoint {
            k: run.trace.header.params.speculative.draft_len,
            cost: run.trace.header.params.speculative.draft_cost,
            key: *key,
            mat: last.mat,
            measured: last.measured,
            predicted: last.predicted,
            adjusted: last.adjusted,
            finished: !run.status.is_live(),
        };
        // Keys grow with time, so a later run of the same k and cost replaces an earlier one.
        match points
            .iter_mut()
            .find(|p| p.k == point.k && p.cost == point.cost)
        {
            Some(p) => *p = point,
            None => points.push(point),
        }
    }
    points.sort_by(|a, b| a.x().total_cmp(&b.x()));
    let kind = if points.iter().any(|p| p.cost.is_some()) {
        SweepKind::Cost
    } else {
        SweepKind::DraftLength
    };
    SweepData {
        id,
        kind,
        baseline: baseline.map(|(k, _)| *k),
        points,
    }
}

impl SpeculaApp {
    pub(super) fn start_sweep(&mut self, kind: SweepKind) {
        if self.sweep.is_some() {
            self.notice = Some(Notice::error(
                "A sweep is already running; cancel it first (Draft sweep panel).",
            ));
            return;
        }
        if let Some(problem) = self.model_problem() {
            self.notice = Some(Notice::error(format!("Cannot sweep: {problem}")));
            return;
        }
        if self.settings.run.prompt.trim().is_empty() {
            self.notice = Some(Notice::error(
                "Cannot sweep: the prompt is empty. Write one on the left.",
            ));
            return;
        }
        // Unix milliseconds keep ids of sweeps from different sessions apart when their traces are opened
        // together; a clock before 1970 only makes the id less telling.
        let id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.sweep = Some(Sweep::new(id, sweep_specs(&self.settings.run, kind)));
        self.notice = None;
        self.advance_sweep();
    }

    pub(super) fn cancel_sweep(&mut self) {
        if let Some(mut sweep) = self.sweep.take() {
            sweep.cancel(self.backend.as_mut());
            self.notice = Some(Notice::info(format!(
                "Sweep cancelled after {} of {} runs; the runs so far stay open.",
                sweep.done(),
                sweep.total()
            )));
        }
    }

    /// Called every frame: starts the sweep's next run when one ends.
    pub(super) fn advance_sweep(&mut self) {
        let Some(sweep) = self.sweep.as_mut() else {
            return;
        };
        match sweep.advance(&mut self.store, self.backend.as_mut()) {
            SweepUpdate::Running => {}
            SweepUpdate::Finished => {
                self.notice = Some(Notice::info(format!(
                    "Sweep finished: {} runs; see the Draft sweep panel.",
                    sweep.total()
                )));
                self.sweep = None;
            }
            SweepUpdate::Failed(why) => {
                // Keep the store's own message (the worker's reason) beside the sweep's.
                let reason = self
                    .notice
                    .as_ref()
                    .filter(|n| n.is_error)
                    .map(|n| format!(" ({})", n.text))
                    .unwrap_or_default();
                self.notice = Some(Notice::error(format!(
                    "The sweep stopped after {} of {} runs: {why}{reason}.",
                    sweep.done(),
                    sweep.total()
                )));
                if let Some(mut stopped) = self.sweep.take() {
                    stopped.cancel(self.backend.as_mut());
                }
            }
        }
    }
}
