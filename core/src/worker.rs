//! The worker thread: it owns the model, runs decoding steps, and streams events back. The UI thread only sends
//! commands and drains events, so it never waits on the model.
//!
//! Runs interleave one step at a time in run-id order (round robin), which is what lets two methods race side
//! by side on one core. Cancelling sets a flag the running method checks between forward passes, so it takes
//! effect within one forward even while the worker is busy.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::calibrate;
use crate::engine::{Model, Run, RunSpec, panic_message};
use crate::trace::{MethodParams, ModelInfo, RunHeader, RunSummary, StepRecord};

pub type RunId = u64;

/// Timings of each forward size, after each context length, behind a measured draft cost (about two seconds with
/// the default model, most of it the 1,024-token prefill).
const DRAFT_COST_REPEATS: usize = 7;

/// Called after every event, so the UI can repaint (core knows nothing of egui).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

pub enum Command {
    LoadModel(PathBuf),
    Start {
        id: RunId,
        spec: Box<RunSpec>,
        paused: bool,
        cancel: Arc<AtomicBool>,
    },
    Pause(RunId),
    Resume(RunId),
    /// Run one step, then pause.
    StepOnce(RunId),
    Cancel(RunId),
    SetParams(RunId, Box<MethodParams>),
    /// Time the loaded model's forwards and report the cost of one drafted token ([`crate::calibrate`]).
    MeasureDraftCost,
    Shutdown,
}

#[derive(Clone, Debug)]
pub enum Event {
    ModelLoading {
        path: PathBuf,
    },
    ModelLoaded {
        path: PathBuf,
        info: Box<ModelInfo>,
        load_ms: f64,
    },
    ModelFailed {
        path: PathBuf,
        error: String,
    },
    RunStarted {
        id: RunId,
        header: Box<RunHeader>,
    },
    Step {
        id: RunId,
        step: Box<StepRecord>,
    },
    Paused {
        id: RunId,
    },
    Resumed {
        id: RunId,
    },
    /// A parameter change was refused; the run goes on with its previous parameters.
    ParamsRejected {
        id: RunId,
        error: String,
    },
    RunFinished {
        id: RunId,
        summary: Box<RunSummary>,
    },
    /// The run could not start (no model, bad parameter, prompt too long...).
    RunFailed {
        id: RunId,
        error: String,
    },
    /// What one drafted token adds to a verification forward on this machine, in one-token steps, and how
    /// that grows with the context.
    DraftCostMeasured {
        draft_cost: calibrate::DraftCost,
    },
    DraftCostFailed {
        error: String,
    },
}

/// The UI's handle on the worker thread. Dropping it stops the thread.
pub struct Worker {
    commands: Sender<Command>,
    events: Receiver<Event>,
    cancels: BTreeMap<RunId, Arc<AtomicBool>>,
    next_id: RunId,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(waker: Waker) -> Self {
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let (event_tx, events) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("specula-worker".into())
            .spawn(move || WorkerLoop::new(command_rx, event_tx, waker).run())
            .ok();
        Self {
            commands,
            events,
            cancels: BTreeMap::new(),
            next_id: 1,
            thread,
        }
    }

    /// Events produced since the last call; never blocks.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// False when the worker thread could not be started or has stopped.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    pub fn load_model(&self, path: PathBuf) {
        self.send(Command::LoadModel(path));
    }

    /// Queues a run; it starts stepping at once unless `paused`.
    pub fn start(&mut self, spec: RunSpec, paused: bool) -> RunId {
        let id = self.next_id;
        self.next_id += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        self.cancels.insert(id, cancel.clone());
        self.send(Command::Start {
            id,
            spec: Box::new(spec),
            paused,
            cancel,
        });
        id
    }

    pub fn pause(&self, id: RunId) {
        self.send(Command::Pause(id));
    }

    pub fn resume(&self, id: RunId) {
        self.send(Command::Resume(id));
    }

    pub fn step_once(&self, id: RunId) {
        self.send(Command::StepOnce(id));
    }

    pub fn set_params(&self, id: RunId, params: MethodParams) {
        self.send(Command::SetParams(id, Box::new(params)));
    }

    /// Asks for [`Event::DraftCostMeasured`] on the loaded model (the worker is busy for about two seconds).
    pub fn measure_draft_cost(&self) {
        self.send(Command::MeasureDraftCost);
    }

    pub fn cancel(&mut self, id: RunId) {
        if let Some(flag) = self.cancels.remove(&id) {
            flag.store(true, Ordering::Relaxed);
        }
        self.send(Command::Cancel(id));
    }

    fn send(&self, command: Command) {
        // A send fails only when the worker thread is gone; `is_alive` reports that to the UI.
        let _ = self.commands.send(command);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        for flag in self.cancels.values() {
            flag.store(true, Ordering::Relaxed);
        }
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    Paused,
    /// Run this many more steps, then pause (each "Step" click adds one).
    Steps(u32),
}

struct Slot {
    run: Run,
    mode: Mode,
    cancel: Arc<AtomicBool>,
}

struct WorkerLoop {
    commands: Receiver<Command>,
    events: Sender<Event>,
    waker: Waker,
    model: Option<Model>,
    runs: BTreeMap<RunId, Slot>,
    /// The run stepped last; the next step goes to the next runnable id after it.
    last_stepped: RunId,
}

impl WorkerLoop {
    fn new(commands: Receiver<Command>, events: Sender<Event>, waker: Waker) -> Self {
        Self {
            commands,
            events,
            waker,
            model: None,
            runs: BTreeMap::new(),
            last_stepped: 0,
        }
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
        (self.waker)();
    }

    fn run(mut self) {
        loop {
            let runnable = self.runs.values().any(|s| s.mode != Mode::Paused);
            let command = if runnable {
                match self.commands.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                match self.commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            match command {
                Some(Command::Shutdown) => return,
                Some(command) => self.handle(command),
                None => self.step_next(),
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::LoadModel(path) => self.load_model(path),
            Command::Start {
                id,
                spec,
                paused,
                cancel,
            } => self.start(id, *spec, paused, cancel),
            Command::Pause(id) => {
                if let Some(slot) = self.runs.get_mut(&id) {
                    slot.mode = Mode::Paused;
                    self.emit(Event::Paused { id });
                }
            }
            Command::Resume(id) => {
                if let Some(slot) = self.runs.get_mut(&id) {
                    slot.mode = Mode::Running;
                    self.emit(Event::Resumed { id });
                }
            }
            Command::StepOnce(id) => {
                if let Some(slot) = self.runs.get_mut(&id) {
                    slot.mode = match slot.mode {
                        Mode::Steps(n) => Mode::Steps(n + 1),
                        Mode::Paused => Mode::Steps(1),
                        Mode::Running => Mode::Running,
                    };
                }
            }
            Command::Cancel(id) => {
                if let Some(mut slot) = self.runs.remove(&id) {
                    slot.run.cancel();
                    self.finish(id, &slot.run);
                }
            }
            Command::SetParams(id, params) => {
                if let Some(slot) = self.runs.get_mut(&id)
                    && let Err(e) = slot.run.set_params(*params)
                {
                    self.emit(Event::ParamsRejected {
                        id,
                        error: e.to_string(),
                    });
                }
            }
            Command::MeasureDraftCost => match &self.model {
                Some(model) => {
                    let measured = catch_unwind(AssertUnwindSafe(|| {
                        calibrate::measure_draft_cost(&model.llama, DRAFT_COST_REPEATS)
                    }));
                    self.emit(match measured {
                        Ok(Ok(draft_cost)) => Event::DraftCostMeasured { draft_cost },
                        Ok(Err(e)) => Event::DraftCostFailed {
                            error: e.to_string(),
                        },
                        Err(panic) => Event::DraftCostFailed {
                            error: format!("measuring failed: {}", panic_message(&panic)),
                        },
                    });
                }
                None => self.emit(Event::DraftCostFailed {
                    error: "load a model first: the cost is measured on its forwards".into(),
                }),
            },
            Command::Shutdown => {}
        }
    }

    fn load_model(&mut self, path: PathBuf) {
        self.emit(Event::ModelLoading { path: path.clone() });
        let started = Instant::now();
        match Model::load(&path) {
            Ok(model) => {
                let info = Box::new(model.llama.info.clone());
                self.model = Some(model);
                self.emit(Event::ModelLoaded {
                    path,
                    info,
                    load_ms: started.elapsed().as_secs_f64() * 1000.0,
                });
            }
            Err(e) => self.emit(Event::ModelFailed {
                path,
                error: e.to_string(),
            }),
        }
    }

    fn start(&mut self, id: RunId, spec: RunSpec, paused: bool, cancel: Arc<AtomicBool>) {
        let Some(model) = &self.model else {
            self.emit(Event::RunFailed {
                id,
                error: "no model is loaded: load a GGUF model first".into(),
            });
            return;
        };
        let created = catch_unwind(AssertUnwindSafe(|| Run::new(model, spec)))
            .unwrap_or_else(|p| Err(crate::error::Error::MethodPanicked(panic_message(&p))));
        match created {
            Ok(run) => {
                self.emit(Event::RunStarted {
                    id,
                    header: Box::new(run.header().clone()),
                });
                let mode = if paused { Mode::Paused } else { Mode::Running };
                self.runs.insert(id, Slot { run, mode, cancel });
            }
            Err(e) => self.emit(Event::RunFailed {
                id,
                error: e.to_string(),
            }),
        }
    }

    fn step_next(&mut self) {
        let runnable = |(&id, slot): (&RunId, &Slot)| (slot.mode != Mode::Paused).then_some(id);
        let next = self
            .runs
            .range(self.last_stepped + 1..)
            .find_map(runnable)
            .or_else(|| self.runs.iter().find_map(runnable));
        let Some(id) = next else { return };
        self.last_stepped = id;
        let Some(slot) = self.runs.get_mut(&id) else {
            return;
        };
        // Errors end the run inside `step` (its summary carries the message), so only the record matters here.
        let stepped = slot.run.step(&slot.cancel).ok().flatten().cloned();
        if let Mode::Steps(n) = slot.mode {
            slot.mode = if n <= 1 {
                Mode::Paused
            } else {
                Mode::Steps(n - 1)
            };
        }
        let paused_now = slot.mode == Mode::Paused;
        if let Some(step) = stepped {
            self.emit(Event::Step {
                id,
                step: Box::new(step),
            });
        }
        let finished = self.runs.get(&id).is_some_and(|s| s.run.is_finished());
        if finished {
            if let Some(slot) = self.runs.remove(&id) {
                self.finish(id, &slot.run);
            }
        } else if paused_now {
            self.emit(Event::Paused { id });
        }
    }

    fn finish(&self, id: RunId, run: &Run) {
        if let Some(summary) = &run.trace().summary {
            self.emit(Event::RunFinished {
                id,
                summary: Box::new(summary.clone()),
            });
        }
    }
}
