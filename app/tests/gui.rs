//! The workbench driven headless with egui_kittest: recorded traces from assets/traces, a fake file picker and a
//! fake backend, so no model and no display are needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use specula::gui::panels::tokens::display_text;
use specula::gui::{AppOptions, Backend, Command, FilePicker, Pane, PickFilter, SpeculaApp};
use specula_core::trace::{TokenSource, Trace};
use specula_core::worker::{Event, RunId};
use specula_core::{MethodParams, RunSpec};

fn trace_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/traces")
        .join(name)
}

fn load(name: &str) -> Trace {
    Trace::load(&trace_path(name)).unwrap().remove(0)
}

/// Answers dialogs with fixed paths.
struct FakePicker {
    open: Option<PathBuf>,
    save: Option<PathBuf>,
}

impl FilePicker for FakePicker {
    fn open(&self, _filter: PickFilter) -> Option<PathBuf> {
        self.open.clone()
    }

    fn save(&self, _default_name: &str) -> Option<PathBuf> {
        self.save.clone()
    }
}

/// Records the runs it is asked to start; "loads" a model by answering with the given model info.
#[derive(Default)]
struct FakeBackend {
    model: Option<specula_core::trace::ModelInfo>,
    started: Rc<RefCell<Vec<RunSpec>>>,
    events: VecDeque<Event>,
}

impl Backend for FakeBackend {
    fn load_model(&mut self, path: PathBuf) {
        self.events
            .push_back(Event::ModelLoading { path: path.clone() });
        match &self.model {
            Some(info) => self.events.push_back(Event::ModelLoaded {
                path,
                info: Box::new(info.clone()),
                load_ms: 1.0,
            }),
            None => self.events.push_back(Event::ModelFailed {
                path,
                error: "not a GGUF file".into(),
            }),
        }
    }

    fn start(&mut self, spec: RunSpec, _paused: bool) -> RunId {
        self.started.borrow_mut().push(spec);
        self.started.borrow().len() as RunId
    }

    fn pause(&mut self, _id: RunId) {}
    fn resume(&mut self, _id: RunId) {}
    fn step_once(&mut self, _id: RunId) {}
    fn cancel(&mut self, _id: RunId) {}
    fn set_params(&mut self, _id: RunId, _params: MethodParams) {}

    /// Answers as the worker does, with a cost a real machine could measure.
    fn measure_draft_cost(&mut self) {
        self.events.push_back(Event::DraftCostMeasured {
            draft_cost: specula_core::calibrate::DraftCost {
                cost: 0.42,
                growth: 0.25,
            },
        });
    }

    fn try_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

struct Setup {
    picker: FakePicker,
    backend: FakeBackend,
    model: Result<PathBuf, String>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            picker: FakePicker {
                open: None,
                save: None,
            },
            backend: FakeBackend::default(),
            model: Err("No model found (test).".into()),
        }
    }
}

/// A setup whose fake worker "loads" the model `greedy.jsonl` was made with and records the runs it starts.
fn setup_with_model(started: &Rc<RefCell<Vec<RunSpec>>>) -> Setup {
    Setup {
        backend: FakeBackend {
            model: Some(load("greedy.jsonl").header.model),
            started: started.clone(),
            ..Default::default()
        },
        model: Ok(PathBuf::from("model.gguf")),
        ..Default::default()
    }
}

fn harness(setup: Setup) -> Harness<'static, SpeculaApp> {
    let Setup {
        picker,
        backend,
        model,
    } = setup;
    let mut harness = Harness::builder()
        .with_size(egui::vec2(1280.0, 800.0))
        .build_eframe(move |cc| {
            SpeculaApp::new(
                cc,
                AppOptions {
                    picker: Box::new(picker),
                    backend: Box::new(backend),
                    model,
                    autorun: None,
                    examples: vec![trace_path("greedy.jsonl"), trace_path("sample.jsonl")],
                },
            )
        });
    harness.run();
    harness
}

/// A harness with `names` opened (as File → Open example would).
fn with_traces(setup: Setup, names: &[&str]) -> Harness<'static, SpeculaApp> {
    let mut harness = harness(setup);
    for name in names {
        harness
            .state()
            .send(Command::OpenTrace(Some(trace_path(name))));
        harness.run();
    }
    harness
}

/// Snapshots must not show this checkout's paths (the "Opened … from /path" notice).
fn without_notice(harness: &mut Harness<'_, SpeculaApp>) {
    harness.state().send(Command::DismissNotice);
    harness.run();
}

fn step_label(h: &Harness<'_, SpeculaApp>) -> String {
    let app = h.state();
    let len = app.store().selected().unwrap().trace.steps.len();
    format!("step {} / {len}", app.cursor().step + 1)
}

#[test]
fn open_trace_through_the_picker_shows_its_text() {
    let setup = Setup {
        picker: FakePicker {
            open: Some(trace_path("greedy.jsonl")),
            save: None,
        },
        ..Default::default()
    };
    let mut harness = harness(setup);
    harness.get_by_label("File").click();
    harness.run();
    harness.get_by_label("Open trace…").click();
    harness.run();

    assert_eq!(harness.state().store().len(), 1);
    let trace = load("greedy.jsonl");
    // Every generated token is on screen as its own chip.
    for token in trace.tokens().take(12) {
        assert!(
            harness
                .query_all_by_label(&display_text(&token.token))
                .next()
                .is_some(),
            "token {:?} is not shown",
            token.token
        );
    }
    harness.get_by_label_contains("Opened 1 run from");
    harness.get_by_label(&format!(
        "step {} / {}",
        trace.steps.len(),
        trace.steps.len()
    ));
}

#[test]
fn run_without_a_model_says_so() {
    let mut harness = harness(Setup::default());
    harness.get_by_label("No model loaded");
    harness.get_by_label("Run").click();
    harness.run();
    harness.get_by_label_contains("Cannot run: no model is loaded");
    harness.remove_cursor();
    harness.run();
    harness.snapshot("no_model");
}

#[test]
fn a_bad_model_file_shows_the_error_and_the_app_stays_usable() {
    let setup = Setup {
        model: Ok(PathBuf::from("/nowhere/broken.gguf")),
        ..Default::default()
    };
    let mut harness = harness(setup);
    harness.get_by_label_contains("Could not load /nowhere/broken.gguf: not a GGUF file");
    harness
        .state()
        .send(Command::OpenTrace(Some(trace_path("greedy.jsonl"))));
    harness.run();
    assert_eq!(harness.state().store().len(), 1);
}

#[test]
fn keyboard_moves_the_cursor() {
    let mut harness = with_traces(Setup::default(), &["greedy.jsonl"]);
    let len = harness
        .state()
        .store()
        .selected()
        .unwrap()
        .trace
        .steps
        .len();
    assert!(len > 4);
    harness.get_by_label(&format!("step {len} / {len}"));

    harness.key_press(egui::Key::Home);
    harness.run();
    harness.get_by_label(&format!("step 1 / {len}"));
    harness.key_press(egui::Key::ArrowRight);
    harness.run();
    harness.key_press(egui::Key::ArrowRight);
    harness.run();
    harness.get_by_label(&format!("step 3 / {len}"));
    assert_eq!(step_label(&harness), format!("step 3 / {len}"));
    harness.key_press(egui::Key::ArrowLeft);
    harness.run();
    harness.get_by_label(&format!("step 2 / {len}"));
    harness.key_press(egui::Key::End);
    harness.run();
    harness.get_by_label(&format!("step {len} / {len}"));
    assert_eq!(
        harness.state().cursor().mode,
        specula::gui::PlayMode::Following
    );
}

#[test]
fn hovering_and_clicking_a_token_shows_its_candidates() {
    let mut harness = with_traces(Setup::default(), &["sample.jsonl"]);
    let trace = load("sample.jsonl");
    let (index, token) = trace
        .tokens()
        .enumerate()
        .find(|(_, t)| {
            t.token.len() > 3 && trace.tokens().filter(|u| u.token == t.token).count() == 1
        })
        .unwrap();
    let runner_up = token
        .top_logprobs
        .iter()
        .find(|c| c.id != token.id)
        .unwrap();

    harness.get_by_label(&display_text(&token.token)).hover();
    harness.run();
    harness.get_by_label(&format!("Token {} (step {})", index + 1, index + 1));

    harness.get_by_label(&display_text(&token.token)).click();
    harness.run();
    harness.get_by_label_contains("what else could have come here?");
    harness.get_by_label(&format!("Fork with {:?}", runner_up.token));
    assert_eq!(harness.state().cursor().step, index);
}

#[test]
fn fork_from_a_token_builds_the_run_spec() {
    let trace = load("greedy.jsonl");
    let started = Rc::new(RefCell::new(Vec::new()));
    let mut harness = with_traces(setup_with_model(&started), &["greedy.jsonl"]);

    let index = 5;
    harness.state().send(Command::FocusToken(index));
    harness.run();
    let original = trace.tokens().nth(index).unwrap().clone();
    let candidate = original
        .top_logprobs
        .iter()
        .position(|c| c.id != original.id)
        .unwrap();
    let forced = &original.top_logprobs[candidate];
    harness
        .get_by_label(&format!("Fork with {:?}", forced.token))
        .click();
    harness.run();

    let started = started.borrow();
    assert_eq!(started.len(), 1, "one run was started");
    let fork = started[0].fork.as_ref().expect("a fork spec");
    assert_eq!(fork.origin.kept_tokens, index);
    assert_eq!(fork.origin.forced_token_id, forced.id);
    assert_eq!(fork.tokens.len(), index + 1);
    let parent: Vec<_> = trace.tokens().take(index).cloned().collect();
    assert_eq!(&fork.tokens[..index], &parent[..]);
    let last = &fork.tokens[index];
    assert_eq!(
        (last.id, last.source, last.rank as usize),
        (forced.id, TokenSource::Forced, candidate)
    );
    assert_eq!(last.logprob, forced.logprob);
    assert_eq!(started[0].prompt.text, trace.header.prompt.text);
    assert_eq!(started[0].method, trace.header.method);
}

/// "Measure here" asks the worker for this machine's draft cost and its growth with context; "Use" puts both
/// into the run's parameters.
#[test]
fn the_measured_draft_cost_can_be_used() {
    let mut harness = harness(setup_with_model(&Rc::default()));
    harness.state_mut().settings_mut().run.method = "speculative".into();
    harness.run();
    harness.get_by_label("Cost-aware").click();
    harness.run();
    assert!(harness.query_by_label("Use 0.42 + 0.25/1k").is_none());
    harness.get_by_label("Measure here").click();
    harness.run();
    harness.get_by_label("Use 0.42 + 0.25/1k").click();
    harness.run();
    let spec = harness.state_mut().settings_mut().run.run_spec();
    assert_eq!(spec.params.speculative.draft_cost, Some(0.42));
    assert_eq!(spec.params.speculative.draft_cost_growth, Some(0.25));
}

#[test]
fn save_through_the_picker_reads_back_equal() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("saved.jsonl");
    let setup = Setup {
        picker: FakePicker {
            open: None,
            save: Some(out.clone()),
        },
        ..Default::default()
    };
    let mut harness = with_traces(setup, &["sample.jsonl"]);
    harness.get_by_label("File").click();
    harness.run();
    harness.get_by_label("Save selected run…").click();
    harness.run();
    harness.get_by_label_contains("Saved 1 run(s)");
    // Written by this version, so in its schema, whatever version the example was recorded in.
    let mut expected = load("sample.jsonl");
    expected.header.schema_version = specula_core::trace::SCHEMA_VERSION;
    assert_eq!(Trace::load(&out).unwrap(), vec![expected]);
}

#[test]
fn every_tile_shows_its_panel() {
    let mut harness = with_traces(Setup::default(), &["greedy.jsonl", "sample.jsonl"]);
    harness.get_by_label("Plots").click();
    harness.run();
    harness.get_by_label("Entropy of the model's distribution (nats)");
    harness.get_by_label("Run statistics").click();
    harness.run();
    harness.get_by_label("Generated tokens");
    harness.get_by_label("Compare").click();
    harness.run();
    harness.get_by_label_contains("The runs part at token");
    harness.get_by_label("Candidates").click();
    harness.run();
    harness.get_by_label_contains("Warping kept");
}

#[test]
fn snapshot_main_window() {
    let mut harness = with_traces(Setup::default(), &["greedy.jsonl"]);
    harness.state().send(Command::FocusToken(9));
    harness.run();
    without_notice(&mut harness);
    harness.snapshot("main_window");
}

#[test]
fn snapshot_candidates_panel() {
    let mut harness = with_traces(Setup::default(), &["sample.jsonl"]);
    harness.state().send(Command::FocusToken(6));
    harness.run();
    harness.state_mut().show_pane(Pane::Candidates);
    harness.run();
    without_notice(&mut harness);
    harness.snapshot("candidates");
}

#[test]
fn snapshot_plots_panel() {
    let mut harness = with_traces(Setup::default(), &["sample.jsonl"]);
    harness.state().send(Command::FocusToken(12));
    harness.state_mut().show_pane(Pane::Plots);
    harness.run();
    without_notice(&mut harness);
    harness.snapshot("plots");
}

#[test]
fn snapshot_compare_panel() {
    let mut harness = with_traces(Setup::default(), &["greedy.jsonl", "sample.jsonl"]);
    harness.state_mut().show_pane(Pane::Compare);
    harness.run();
    without_notice(&mut harness);
    harness.snapshot("compare");
}

#[test]
fn snapshot_run_statistics() {
    let mut harness = with_traces(Setup::default(), &["sample.jsonl"]);
    harness.state_mut().show_pane(Pane::Stats);
    harness.run();
    without_notice(&mut harness);
    harness.snapshot("run_statistics");
}
