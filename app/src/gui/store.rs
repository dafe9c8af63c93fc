//! Everything the workbench knows about runs and the model, with no egui in sight: the panels read it, worker
//! events and opened files write it. Runs live in a `BTreeMap` so every list shown or saved has a stable order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use specula_core::trace::{ModelInfo, StopReason, TokenRecord, Trace, TraceError};
use specula_core::worker::{Event, RunId};

/// The store's own key for a run; unlike a worker `RunId` it also covers runs read from files.
pub type RunKey = u64;

/// Where a run is in its life.
#[derive(Clone, Debug, PartialEq)]
pub enum RunStatus {
    /// Read from a trace file.
    Recorded,
    Running,
    Paused,
    Finished(StopReason),
    Failed(String),
}

impl RunStatus {
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Recorded => "recorded".to_owned(),
            Self::Running => "running".to_owned(),
            Self::Paused => "paused".to_owned(),
            Self::Finished(reason) => format!("finished: {}", describe_stop(*reason)),
            Self::Failed(_) => "failed".to_owned(),
        }
    }
}

pub fn describe_stop(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Eos => "end of text",
        StopReason::MaxTokens => "max tokens",
        StopReason::ContextFull => "context full",
        StopReason::Cancelled => "cancelled",
        StopReason::Error => "error",
    }
}

/// Where a run came from.
#[derive(Clone, Debug, PartialEq)]
pub enum RunOrigin {
    File(PathBuf),
    Live(RunId),
}

#[derive(Clone, Debug)]
pub struct RunEntry {
    pub trace: Trace,
    pub status: RunStatus,
    pub origin: RunOrigin,
}

impl RunEntry {
    /// The worker's id while the run can still take commands.
    pub fn live_id(&self) -> Option<RunId> {
        match self.origin {
            RunOrigin::Live(id) if self.status.is_live() => Some(id),
            _ => None,
        }
    }

    pub fn label(&self) -> &str {
        if self.trace.header.label.is_empty() {
            &self.trace.header.method
        } else {
            &self.trace.header.label
        }
    }

    /// Decode speed: from the summary when the run ended, else measured over the steps so far (the first step
    /// is left out because it prefills the prompt).
    pub fn tokens_per_second(&self) -> Option<f64> {
        if let Some(timing) = self.trace.summary.as_ref().and_then(|s| s.timing) {
            return Some(timing.decode_tokens_per_s);
        }
        let (tokens, ms) = self
            .trace
            .steps
            .iter()
            .skip(1)
            .filter_map(|s| s.timing.map(|t| (s.tokens.len(), t.total_ms)))
            .fold((0usize, 0.0f64), |(n, ms), (k, t)| (n + k, ms + t));
        (ms > 0.0).then(|| tokens as f64 * 1000.0 / ms)
    }
}

/// A generated token with the step that committed it.
#[derive(Clone, Copy)]
pub struct TokenAt<'a> {
    /// Index among every token the run committed, in order (tokens a rollback took back keep theirs): what
    /// focusing and forking refer to.
    pub index: usize,
    pub step: usize,
    /// Its place in the output when it was committed (0 = first generated token).
    pub output_index: usize,
    pub token: &'a TokenRecord,
}

/// Every token the run committed with its step, in order, including those a later rollback took back.
pub fn tokens_with_steps(trace: &Trace) -> impl Iterator<Item = TokenAt<'_>> + '_ {
    let mut len = 0usize;
    trace
        .steps
        .iter()
        .enumerate()
        .flat_map(move |(step, s)| {
            let start = s.rollback.as_ref().map_or(len, |r| r.to_generated);
            len = start + s.tokens.len();
            s.tokens
                .iter()
                .enumerate()
                .map(move |(i, token)| (step, start + i, token))
        })
        .enumerate()
        .map(|(index, (step, output_index, token))| TokenAt {
            index,
            step,
            output_index,
            token,
        })
}

/// The output as it stood after `step`: every rollback up to it applied.
pub fn output_at(trace: &Trace, step: usize) -> Vec<TokenAt<'_>> {
    let mut out: Vec<TokenAt<'_>> = Vec::new();
    for t in tokens_with_steps(trace) {
        if t.step > step {
            break;
        }
        out.truncate(t.output_index);
        out.push(t);
    }
    // A step that took tokens back and committed none leaves the output shorter.
    if let Some(r) = trace.steps.get(step).and_then(|s| s.rollback.as_ref())
        && trace.steps.get(step).is_some_and(|s| s.tokens.is_empty())
    {
        out.truncate(r.to_generated);
    }
    out
}

/// The run's output as it ended (or stands now, for a live run): every rollback applied. Position `i` of it is
/// what a view of the final text shows at row `i`; its `index` is what focusing and forking refer to.
pub fn final_output(trace: &Trace) -> Vec<TokenAt<'_>> {
    trace
        .steps
        .len()
        .checked_sub(1)
        .map_or_else(Vec::new, |last| output_at(trace, last))
}

/// The tokens `step`'s rollback took back (empty when it rolled nothing back).
pub fn removed_at(trace: &Trace, step: usize) -> Vec<TokenAt<'_>> {
    match (
        step.checked_sub(1),
        trace.steps.get(step).and_then(|s| s.rollback.as_ref()),
    ) {
        (Some(before), Some(r)) => {
            let mut out = output_at(trace, before);
            // A malformed file may roll back past the end; take nothing back then.
            if r.to_generated <= out.len() {
                out.split_off(r.to_generated)
            } else {
                Vec::new()
            }
        }
        _ => Vec::new(),
    }
}

/// Number of generated tokens in the output after `step`.
pub fn tokens_through_step(trace: &Trace, step: usize) -> usize {
    output_at(trace, step).len()
}

/// The model the worker holds (or why there is none).
#[derive(Clone, Debug, PartialEq)]
pub enum ModelState {
    /// No model was found or none was asked for; `reason` says where we looked.
    Missing {
        reason: String,
    },
    Loading {
        path: PathBuf,
    },
    Loaded {
        path: PathBuf,
        info: Box<ModelInfo>,
        load_ms: f64,
    },
    Failed {
        path: PathBuf,
        error: String,
    },
}

impl ModelState {
    pub fn info(&self) -> Option<&ModelInfo> {
        match self {
            Self::Loaded { info, .. } => Some(info),
            _ => None,
        }
    }
}

/// A message for the status line.
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    pub text: String,
    pub is_error: bool,
}

impl Notice {
    pub fn info(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            is_error: false,
        }
    }

    pub fn error(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            is_error: true,
        }
    }
}

/// A run the worker was asked to start and has not confirmed yet.
#[derive(Clone, Debug)]
struct PendingRun {
    /// Select the run when it starts (true for runs the user started; forks too).
    select: bool,
    /// The draft-length sweep the run belongs to; written into its header, so a saved sweep can be rebuilt.
    sweep_id: Option<u64>,
}

pub struct RunStore {
    runs: BTreeMap<RunKey, RunEntry>,
    next_key: RunKey,
    pending: BTreeMap<RunId, PendingRun>,
    selected: Option<RunKey>,
    pub model: ModelState,
    /// The cost of one drafted token, measured on the loaded model when the user asks.
    pub draft_cost: DraftCost,
}

/// Where the measurement of the machine's draft cost stands.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum DraftCost {
    #[default]
    NotMeasured,
    Measuring,
    Measured(specula_core::calibrate::DraftCost),
}

impl RunStore {
    pub fn new(model: ModelState) -> Self {
        Self {
            runs: BTreeMap::new(),
            next_key: 1,
            pending: BTreeMap::new(),
            selected: None,
            model,
            draft_cost: DraftCost::NotMeasured,
        }
    }

    pub fn runs(&self) -> impl Iterator<Item = (RunKey, &RunEntry)> + '_ {
        self.runs.iter().map(|(k, r)| (*k, r))
    }

    pub fn run(&self, key: RunKey) -> Option<&RunEntry> {
        self.runs.get(&key)
    }

    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn selected_key(&self) -> Option<RunKey> {
        self.selected
    }

    pub fn selected(&self) -> Option<&RunEntry> {
        self.selected.and_then(|k| self.runs.get(&k))
    }

    pub fn select(&mut self, key: RunKey) {
        if self.runs.contains_key(&key) {
            self.selected = Some(key);
        }
    }

    /// Closes a run (a live one should be cancelled first); selects a neighbour if it was selected.
    pub fn remove(&mut self, key: RunKey) {
        self.runs.remove(&key);
        if self.selected == Some(key) {
            self.selected = self.runs.keys().next_back().copied();
        }
    }

    /// True while a run was started and the worker has not confirmed it yet.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn any_live(&self) -> bool {
        self.runs.values().any(|r| r.status.is_live())
    }

    /// Adds a run read from somewhere; returns its key. The first run added is selected.
    pub fn add(&mut self, trace: Trace, status: RunStatus, origin: RunOrigin) -> RunKey {
        let key = self.next_key;
        self.next_key += 1;
        self.runs.insert(
            key,
            RunEntry {
                trace,
                status,
                origin,
            },
        );
        if self.selected.is_none() {
            self.selected = Some(key);
        }
        key
    }

    /// Opens every run of a trace file and selects the first of them.
    pub fn open_file(&mut self, path: &Path) -> Result<Vec<RunKey>, TraceError> {
        let traces = Trace::load(path)?;
        let keys: Vec<RunKey> = traces
            .into_iter()
            .map(|t| self.add(t, RunStatus::Recorded, RunOrigin::File(path.to_owned())))
            .collect();
        if let Some(&first) = keys.first() {
            self.selected = Some(first);
        }
        Ok(keys)
    }

    /// Remembers a run the worker was just asked to start.
    pub fn expect_run(&mut self, id: RunId, select: bool) {
        self.pending.insert(
            id,
            PendingRun {
                select,
                sweep_id: None,
            },
        );
    }

    /// Remembers a run a sweep just started; it is not selected, so the cursor stays on what the user reads.
    pub fn expect_sweep_run(&mut self, id: RunId, sweep_id: u64) {
        self.pending.insert(
            id,
            PendingRun {
                select: false,
                sweep_id: Some(sweep_id),
            },
        );
    }

    /// True while the worker has not confirmed (or refused) run `id`.
    pub fn is_pending(&self, id: RunId) -> bool {
        self.pending.contains_key(&id)
    }

    /// The store's key of the worker's run `id`, once it started.
    pub fn key_of(&self, id: RunId) -> Option<RunKey> {
        self.runs
            .iter()
            .find(|(_, r)| r.origin == RunOrigin::Live(id))
            .map(|(k, _)| *k)
    }

    fn live_mut(&mut self, id: RunId) -> Option<&mut RunEntry> {
        let key = self.key_of(id)?;
        self.runs.get_mut(&key)
    }

    /// Applies one worker event. Returns what the user should be told, if anything; the caller shows it once.
    pub fn apply(&mut self, event: Event) -> Option<Notice> {
        match event {
            Event::ModelLoading { path } => {
                self.model = ModelState::Loading { path };
                None
            }
            Event::ModelLoaded {
                path,
                info,
                load_ms,
            } => {
                let notice = Notice::info(format!(
                    "Loaded {} in {:.1} s.",
                    info.name,
                    load_ms / 1000.0
                ));
                self.model = ModelState::Loaded {
                    path,
                    info,
                    load_ms,
                };
                // A measured cost belongs to the model it was measured on.
                self.draft_cost = DraftCost::NotMeasured;
                Some(notice)
            }
            // The model panel shows the failure; the status line would only repeat it.
            Event::ModelFailed { path, error } => {
                self.model = ModelState::Failed { path, error };
                None
            }
            Event::RunStarted { id, mut header } => {
                let pending = self.pending.remove(&id);
                let select = pending.as_ref().is_some_and(|p| p.select);
                if let Some(sweep_id) = pending.and_then(|p| p.sweep_id) {
                    header.sweep_id = Some(sweep_id);
                }
                let key = self.add(Trace::new(*header), RunStatus::Running, RunOrigin::Live(id));
                if select {
                    self.selected = Some(key);
                }
                None
            }
            Event::Step { id, step } => {
                if let Some(run) = self.live_mut(id) {
                    run.trace.steps.push(*step);
                }
                None
            }
            Event::Paused { id } => {
                if let Some(run) = self.live_mut(id).filter(|r| r.status.is_live()) {
                    run.status = RunStatus::Paused;
                }
                None
            }
            Event::Resumed { id } => {
                if let Some(run) = self.live_mut(id).filter(|r| r.status.is_live()) {
                    run.status = RunStatus::Running;
                }
                None
            }
            Event::ParamsRejected { id: _, error } => Some(Notice::error(format!(
                "The new parameters were refused, the run goes on unchanged: {error}"
            ))),
            Event::RunFinished { id, summary } => {
                let run = self.live_mut(id)?;
                run.status = match (&summary.stop_reason, &summary.error) {
                    (StopReason::Error, Some(e)) => RunStatus::Failed(e.clone()),
                    (reason, _) => RunStatus::Finished(*reason),
                };
                let notice = match &run.status {
                    RunStatus::Failed(e) => Some(Notice::error(format!(
                        "Run \"{}\" failed: {e}",
                        run.label()
                    ))),
                    _ => None,
                };
                run.trace.summary = Some(*summary);
                notice
            }
            Event::RunFailed { id, error } => {
                self.pending.remove(&id);
                Some(Notice::error(format!("The run could not start: {error}")))
            }
            Event::DraftCostMeasured { draft_cost } => {
                self.draft_cost = DraftCost::Measured(draft_cost);
                Some(Notice::info(format!(
                    "Measured here: one drafted token costs {:.2} of a one-token step, plus {:.2} per 1,000 \
                     tokens of context.",
                    draft_cost.cost, draft_cost.growth
                )))
            }
            Event::DraftCostFailed { error } => {
                self.draft_cost = DraftCost::NotMeasured;
                Some(Notice::error(format!(
                    "The draft cost could not be measured: {error}"
                )))
            }
        }
    }
}
