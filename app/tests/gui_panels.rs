//! Panel export, the Speedup panel and the draft-length sweep, driven headless: a file picker that answers with
//! fixed paths and a scripted backend whose events the test feeds, so no model is needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use specula::gui::speedup::speedup_series;
use specula::gui::sweep::{SWEEP_COSTS, SweepData, SweepKind, sweep_data, sweep_ids};
use specula::gui::{AppOptions, Backend, Command, FilePicker, Pane, PickFilter, SpeculaApp};
use specula_core::trace::{ExportOptions, RunSummary, StepRecord, StopReason, Trace};
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

/// Answers every save dialog with `save`.
struct SavePicker {
    save: Option<PathBuf>,
}

impl FilePicker for SavePicker {
    fn open(&self, _filter: PickFilter) -> Option<PathBuf> {
        None
    }

    fn save(&self, _default_name: &str) -> Option<PathBuf> {
        self.save.clone()
    }
}

/// What the app asked the scripted backend, and the events the test queues for it.
#[derive(Default)]
struct Script {
    started: Vec<RunSpec>,
    cancelled: Vec<RunId>,
    events: VecDeque<Event>,
}

/// A backend that "loads" any model (answering with the example traces' model) and starts nothing by itself:
/// the test plays the worker by queueing events.
struct ScriptedBackend(Rc<RefCell<Script>>);

impl Backend for ScriptedBackend {
    fn load_model(&mut self, path: PathBuf) {
        let info = load("greedy.jsonl").header.model;
        let mut s = self.0.borrow_mut();
        s.events.push_back(Event::ModelLoaded {
            path,
            info: Box::new(info),
            load_ms: 1.0,
        });
    }

    fn start(&mut self, spec: RunSpec, _paused: bool) -> RunId {
        let mut s = self.0.borrow_mut();
        s.started.push(spec);
        s.started.len() as RunId
    }

    fn pause(&mut self, _id: RunId) {}
    fn resume(&mut self, _id: RunId) {}
    fn step_once(&mut self, _id: RunId) {}

    fn cancel(&mut self, id: RunId) {
        self.0.borrow_mut().cancelled.push(id);
    }

    fn set_params(&mut self, _id: RunId, _params: MethodParams) {}
    fn measure_draft_cost(&mut self) {}

    fn try_event(&mut self) -> Option<Event> {
        self.0.borrow_mut().events.pop_front()
    }
}

fn new_harness(
    picker: SavePicker,
    script: Rc<RefCell<Script>>,
    model: Result<PathBuf, String>,
) -> Harness<'static, SpeculaApp> {
    let mut harness = Harness::builder()
        .with_size(egui::vec2(1280.0, 800.0))
        .build_eframe(move |cc| {
            SpeculaApp::new(
                cc,
                AppOptions {
                    picker: Box::new(picker),
                    backend: Box::new(ScriptedBackend(script)),
                    model,
                    autorun: None,
                    examples: Vec::new(),
                },
            )
        });
    harness.run();
    harness
}

fn open(harness: &mut Harness<'_, SpeculaApp>, path: PathBuf) {
    harness.state().send(Command::OpenTrace(Some(path)));
    harness.run();
    // Snapshots must not show the temporary path of the "Opened … from" notice.
    harness.state().send(Command::DismissNotice);
    harness.run();
}

fn decode_png(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    let image = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
    (image.width(), image.height())
}

/// The pixels the panel covers in the last frame: its edges, in points, rounded to whole pixels.
fn pixel_size(harness: &Harness<'_, SpeculaApp>, pane: Pane) -> (u32, u32) {
    let rect = harness.state().pane_rect(pane).unwrap();
    let ppp = harness.ctx.pixels_per_point();
    let span = |a: f32, b: f32| ((b * ppp).round() - (a * ppp).round()) as u32;
    (span(rect.min.x, rect.max.x), span(rect.min.y, rect.max.y))
}

// ------------------------------------------------------------------------------------------------------------
// Export

#[test]
fn a_tab_exports_its_panel_as_png_through_the_context_menu() {
    let dir = tempfile::tempdir().unwrap();
    // No extension: the export adds ".png".
    let chosen = dir.path().join("statistics");
    let picker = SavePicker {
        save: Some(chosen.clone()),
    };
    let mut harness = new_harness(picker, Rc::default(), Err("No model found (test).".into()));
    open(&mut harness, trace_path("greedy.jsonl"));
    assert!(
        harness.state().pane_rect(Pane::Stats).is_none(),
        "Run statistics starts behind another tab"
    );
    harness.get_by_label("Run statistics").click_secondary();
    harness.run();
    harness.get_by_label("Export as PNG…").click();
    harness.run();
    let out = dir.path().join("statistics.png");
    let notice = harness.state().notice().unwrap().clone();
    assert!(!notice.is_error, "{}", notice.text);
    assert!(
        notice.text.starts_with("Exported Run statistics ("),
        "{}",
        notice.text
    );
    assert_eq!(decode_png(&out), pixel_size(&harness, Pane::Stats));
    assert!(!chosen.exists());
}

#[test]
fn the_file_menu_exports_any_panel() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plots.png");
    let picker = SavePicker {
        save: Some(out.clone()),
    };
    let mut harness = new_harness(picker, Rc::default(), Err("No model found (test).".into()));
    open(&mut harness, trace_path("sample.jsonl"));
    harness.get_by_label("File").click();
    harness.run();
    harness.get_by_label("Export panel as PNG").click();
    harness.run();
    harness.get_by_label("Plots…").click();
    harness.run();
    assert_eq!(decode_png(&out), pixel_size(&harness, Pane::Plots));
    harness.get_by_label_contains("Exported Plots (");
}

#[test]
fn an_export_that_cannot_be_written_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no-such-folder").join("stream.png");
    let picker = SavePicker {
        save: Some(out.clone()),
    };
    let mut harness = new_harness(picker, Rc::default(), Err("No model found (test).".into()));
    open(&mut harness, trace_path("greedy.jsonl"));
    harness
        .state()
        .send(Command::ExportPanel(Pane::TokenStream));
    harness.run();
    let notice = harness.state().notice().unwrap().clone();
    assert!(notice.is_error);
    assert!(
        notice
            .text
            .starts_with("Could not export Token stream: cannot write"),
        "{}",
        notice.text
    );
    assert!(!out.exists());
}

// ------------------------------------------------------------------------------------------------------------
// Speedup panel

/// greedy.jsonl's steps under a header that matches speculative.jsonl's settings, labelled as what it is: the
/// examples hold no plain run with the speculative example's sampling, and the panel only pairs equal settings.
fn stand_in_baseline() -> Trace {
    let spec = load("speculative.jsonl");
    let mut plain = load("greedy.jsonl");
    plain.header.method = "sample".into();
    plain.header.label = "greedy.jsonl as a stand-in baseline".into();
    plain.header.params.sampling = spec.header.params.sampling;
    plain.header.seed = spec.header.seed;
    plain
}

fn write_traces(dir: &Path, traces: &[&Trace]) -> PathBuf {
    let path = dir.join("runs.jsonl");
    let mut file = std::fs::File::create(&path).unwrap();
    for t in traces {
        t.write_jsonl(&mut file, ExportOptions::default()).unwrap();
    }
    path
}

#[test]
fn the_speedup_panel_predicts_without_a_baseline_and_says_how_to_measure() {
    let mut harness = new_harness(
        SavePicker { save: None },
        Rc::default(),
        Err("No model found (test).".into()),
    );
    open(&mut harness, trace_path("speculative.jsonl"));
    harness.state_mut().show_pane(Pane::Speedup);
    harness.run();
    harness.get_by_label_contains("No plain run of this prompt with these settings is open");
    harness.get_by_label("At step 43 of 43");
    harness.get_by_label("Predicted speedup");
    // The hand-computed prediction of the whole run (see the unit test in gui/speedup.rs): 1.0452.
    harness.get_by_label("1.05");
    harness.get_by_label("0.421");
}

#[test]
fn the_speedup_panel_measures_against_a_matching_plain_run() {
    let dir = tempfile::tempdir().unwrap();
    let spec = load("speculative.jsonl");
    let plain = stand_in_baseline();
    let path = write_traces(dir.path(), &[&plain, &spec]);
    let mut harness = new_harness(
        SavePicker { save: None },
        Rc::default(),
        Err("No model found (test).".into()),
    );
    open(&mut harness, path);
    let spec_key = harness.state().store().runs().nth(1).unwrap().0;
    harness.state().send(Command::SelectRun(spec_key));
    harness.state_mut().show_pane(Pane::Speedup);
    harness.run();
    harness.get_by_label_contains("Measured against “greedy.jsonl as a stand-in baseline”");
    let last = *speedup_series(&spec.steps, Some(&plain.steps))
        .last()
        .unwrap();
    harness.get_by_label(&format!("{:.2}", last.measured.unwrap()));
    harness.get_by_label(&format!("{:.2}", last.verify_cost.unwrap()));
    harness.get_by_label("Whole-run wall-clock speedup");

    // Another seed makes another sampled run: no longer a baseline.
    let mut other = plain.clone();
    other.header.seed += 1;
    let harness = harness_with_files(&[&other, &spec]);
    harness.get_by_label_contains("No plain run of this prompt with these settings is open");
}

fn harness_with_files(traces: &[&Trace]) -> Harness<'static, SpeculaApp> {
    let dir = tempfile::tempdir().unwrap();
    let path = write_traces(dir.path(), traces);
    let mut harness = new_harness(
        SavePicker { save: None },
        Rc::default(),
        Err("No model found (test).".into()),
    );
    open(&mut harness, path);
    let last = harness.state().store().runs().last().unwrap().0;
    harness.state().send(Command::SelectRun(last));
    harness.state_mut().show_pane(Pane::Speedup);
    harness.run();
    harness
}

#[test]
fn the_speedup_panel_of_a_plain_run_says_what_to_do() {
    let harness = harness_with_files(&[&load("greedy.jsonl")]);
    harness.get_by_label("No drafts in this run");
    harness.get_by_label_contains("Select a speculative run");
}

#[test]
fn snapshot_speedup() {
    let mut harness = harness_with_files(&[&stand_in_baseline(), &load("speculative.jsonl")]);
    // Tall enough for the whole table of numbers under the plot.
    harness.set_size(egui::vec2(1600.0, 1000.0));
    harness.remove_cursor();
    harness.run();
    harness.snapshot("speedup");
}

// ------------------------------------------------------------------------------------------------------------
// Draft sweep

/// Plays the worker for run `id` of `spec`: started, `steps`, finished.
fn play_run(script: &Rc<RefCell<Script>>, id: RunId, steps: &[StepRecord], finish: bool) {
    let spec = script.borrow().started[id as usize - 1].clone();
    let mut header = load("speculative.jsonl").header;
    header.label = spec.label.clone();
    header.method = spec.method.clone();
    header.params = spec.params.clone();
    header.seed = spec.seed;
    header.max_tokens = spec.max_tokens;
    let mut s = script.borrow_mut();
    s.events.push_back(Event::RunStarted {
        id,
        header: Box::new(header),
    });
    for step in steps {
        s.events.push_back(Event::Step {
            id,
            step: Box::new(step.clone()),
        });
    }
    if finish {
        let summary = RunSummary::from_steps(steps, StopReason::MaxTokens, None, String::new());
        s.events.push_back(Event::RunFinished {
            id,
            summary: Box::new(summary),
        });
    }
}

/// The steps the fake worker reports for draft length k: a different prefix of the recorded speculative run for
/// each k, so every point of the sweep differs.
fn steps_for_k(k: usize) -> Vec<StepRecord> {
    load("speculative.jsonl").steps[..10 + 2 * k].to_vec()
}

fn sweep_harness(picker: SavePicker) -> (Harness<'static, SpeculaApp>, Rc<RefCell<Script>>) {
    let script: Rc<RefCell<Script>> = Rc::default();
    let mut harness = new_harness(picker, script.clone(), Ok(PathBuf::from("model.gguf")));
    harness.state_mut().show_pane(Pane::Sweep);
    harness.run();
    (harness, script)
}

/// The values the plots must show, computed straight from the steps each run was fed.
fn assert_points_follow_the_runs(data: &SweepData, ks: std::ops::RangeInclusive<usize>) {
    let baseline = load("greedy.jsonl").steps;
    assert_eq!(
        data.points.iter().map(|p| p.k).collect::<Vec<_>>(),
        ks.clone().collect::<Vec<_>>()
    );
    for (point, k) in data.points.iter().zip(ks) {
        let want = *speedup_series(&steps_for_k(k), Some(&baseline))
            .last()
            .unwrap();
        assert_eq!(point.mat, want.mat, "k = {k}");
        assert_eq!(point.measured, want.measured, "k = {k}");
        assert_eq!(point.predicted, want.predicted, "k = {k}");
        assert!(point.measured.is_some() && point.predicted.is_some());
    }
}

#[test]
fn a_sweep_runs_one_run_after_another_shows_progress_and_cancels() {
    let (mut harness, script) = sweep_harness(SavePicker { save: None });
    harness.get_by_label("No sweep yet");
    harness.get_by_label("Sweep k = 1..12").click();
    harness.run();
    {
        let s = script.borrow();
        assert_eq!(s.started.len(), 1, "one run at a time");
        assert_eq!(s.started[0].method, "greedy");
        assert_eq!(s.started[0].label, "sweep: plain greedy");
    }
    harness.get_by_label_contains("run 1 of 13: sweep: plain greedy");

    // Half of the baseline's 64 tokens: half of the first of 13 runs. While a run is live the top bar shows a
    // spinner that never settles, so frames are stepped rather than run to rest.
    let greedy = load("greedy.jsonl").steps;
    play_run(&script, 1, &greedy[..32], false);
    harness.run_steps(4);
    let progress = harness
        .state()
        .sweep()
        .unwrap()
        .progress(harness.state().store());
    assert!((progress - 0.5 / 13.0).abs() < 1e-6, "{progress}");
    assert_eq!(script.borrow().started.len(), 1);

    let summary = RunSummary::from_steps(&greedy[..32], StopReason::MaxTokens, None, String::new());
    script.borrow_mut().events.push_back(Event::RunFinished {
        id: 1,
        summary: Box::new(summary),
    });
    harness.run_steps(4);
    {
        let s = script.borrow();
        assert_eq!(s.started.len(), 2, "the baseline ended: k = 1 starts");
        assert_eq!(s.started[1].method, "speculative");
        assert_eq!(s.started[1].params.speculative.draft_len, 1);
        assert_eq!(s.started[1].params.speculative.adaptive, None);
        assert_eq!(s.started[1].prompt, s.started[0].prompt);
        assert_eq!(s.started[1].seed, s.started[0].seed);
    }
    harness.get_by_label_contains("run 2 of 13: sweep: prompt-lookup k=1");
    play_run(&script, 2, &steps_for_k(1), true);
    harness.run_steps(4);
    play_run(&script, 3, &steps_for_k(2)[..3], false);
    harness.run_steps(4);
    assert_eq!(script.borrow().started.len(), 3);

    harness.get_by_label("Cancel sweep").click();
    harness.run_steps(4);
    assert_eq!(script.borrow().cancelled, vec![3]);
    assert!(harness.state().sweep().is_none());
    harness.get_by_label_contains("Sweep cancelled after 2 of 13 runs");
    harness.get_by_label("Sweep k = 1..12");

    // The runs so far stay, grouped under the sweep's id: the baseline, k = 1 and the cancelled k = 2.
    let store = harness.state().store();
    let ids = sweep_ids(store);
    assert_eq!(ids.len(), 1);
    let data = sweep_data(store, ids[0]);
    assert!(data.baseline.is_some());
    assert_eq!(data.points.len(), 2);
    assert_eq!(data.points[0].k, 1);
    assert!(data.points[0].finished);
    assert!(!data.points[1].finished, "k = 2 was cut short");
}

#[test]
fn a_finished_sweep_plots_mat_and_speedup_against_k_and_reopens_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("sweep.jsonl");
    let (mut harness, script) = sweep_harness(SavePicker {
        save: Some(saved.clone()),
    });
    harness.state().send(Command::StartSweep {
        kind: SweepKind::DraftLength,
    });
    harness.run();
    play_run(&script, 1, &load("greedy.jsonl").steps, true);
    harness.run();
    for k in 1..=12 {
        assert_eq!(script.borrow().started.len(), k + 1);
        play_run(&script, k as RunId + 1, &steps_for_k(k), true);
        harness.run();
    }
    assert_eq!(script.borrow().started.len(), 13, "no run after k = 12");
    assert!(harness.state().sweep().is_none());
    harness.get_by_label_contains("Sweep finished: 13 runs");
    let id = sweep_ids(harness.state().store())[0];
    let data = sweep_data(harness.state().store(), id);
    assert_points_follow_the_runs(&data, 1..=12);
    harness.get_by_label("Mean accepted tokens per target forward (MAT) against draft length k");
    harness.get_by_label("with verify cost");

    // Saved and reopened with no model, the sweep comes back with the same curves.
    harness.state().send(Command::SaveTrace { all: true });
    harness.run();
    drop(harness);
    let mut reopened = new_harness(
        SavePicker { save: None },
        Rc::default(),
        Err("No model found (test).".into()),
    );
    open(&mut reopened, saved);
    let store = reopened.state().store();
    assert_eq!(sweep_ids(store), vec![id]);
    assert_points_follow_the_runs(&sweep_data(store, id), 1..=12);
}

/// A cost sweep runs the cost-aware draft length (up to the prompt panel's draft length) at each cost, and
/// plots against the cost.
#[test]
fn a_cost_sweep_runs_the_cost_aware_length_at_each_cost() {
    let (mut harness, script) = sweep_harness(SavePicker { save: None });
    // From cost-aware settings whose cost grows with context: each point's cost holds at every length.
    let run = &mut harness.state_mut().settings_mut().run;
    run.draft_length = specula::gui::settings::DraftLength::CostAware;
    run.draft_cost_growth = 0.3;
    harness.get_by_label("Cost per draft C").click();
    harness.run();
    harness.get_by_label("Sweep C = 0..0.8").click();
    harness.run();
    play_run(&script, 1, &load("greedy.jsonl").steps, true);
    harness.run();
    for (i, &cost) in SWEEP_COSTS.iter().enumerate() {
        {
            let s = script.borrow();
            assert_eq!(s.started.len(), i + 2, "one run at a time");
            let speculative = &s.started[i + 1].params.speculative;
            assert_eq!(speculative.draft_cost, Some(cost));
            assert_eq!(speculative.draft_cost_growth, None);
            assert_eq!(speculative.adaptive, None);
            assert_eq!(
                speculative.draft_len,
                s.started[0].params.speculative.draft_len
            );
        }
        play_run(&script, i as RunId + 2, &steps_for_k(i + 1), true);
        harness.run();
    }
    assert_eq!(script.borrow().started.len(), 1 + SWEEP_COSTS.len());
    assert!(harness.state().sweep().is_none());
    let store = harness.state().store();
    let data = sweep_data(store, sweep_ids(store)[0]);
    assert_eq!(data.kind, SweepKind::Cost);
    assert_eq!(
        data.points.iter().map(|p| p.cost).collect::<Vec<_>>(),
        SWEEP_COSTS.iter().map(|&c| Some(c)).collect::<Vec<_>>()
    );
    harness.get_by_label("Mean accepted tokens per target forward (MAT) against cost per draft C");
    harness.get_by_label("C");

    harness.state().send(Command::DismissNotice);
    harness.set_size(egui::vec2(1600.0, 1000.0));
    harness.remove_cursor();
    harness.run();
    harness.snapshot("sweep_cost");
}

#[test]
fn a_sweep_without_a_model_says_what_to_do() {
    let script: Rc<RefCell<Script>> = Rc::default();
    let mut harness = new_harness(
        SavePicker { save: None },
        script.clone(),
        Err("No model found (test).".into()),
    );
    harness.state_mut().show_pane(Pane::Sweep);
    harness.run();
    harness.get_by_label("Sweep k = 1..12").click();
    harness.run();
    assert!(script.borrow().started.is_empty());
    harness.get_by_label_contains("Cannot sweep: no model is loaded");
}

#[test]
fn snapshot_sweep() {
    let (mut harness, script) = sweep_harness(SavePicker { save: None });
    harness.state().send(Command::StartSweep {
        kind: SweepKind::DraftLength,
    });
    harness.run();
    play_run(&script, 1, &load("greedy.jsonl").steps, true);
    harness.run();
    for k in 1..=12 {
        play_run(&script, k as RunId + 1, &steps_for_k(k), true);
        harness.run();
    }
    harness.state().send(Command::DismissNotice);
    harness.set_size(egui::vec2(1600.0, 1000.0));
    harness.remove_cursor();
    harness.run();
    harness.snapshot("sweep");
}

// ------------------------------------------------------------------------------------------------------------
// Compare: the overlaid measure

#[test]
fn compare_overlays_the_measure_the_user_picks() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_traces(dir.path(), &[&load("greedy.jsonl"), &load("sample.jsonl")]);
    let mut harness = new_harness(
        SavePicker { save: None },
        Rc::default(),
        Err("No model found (test).".into()),
    );
    open(&mut harness, path);
    harness.state_mut().show_pane(Pane::Compare);
    harness.run();
    harness.get_by_label("Entropy per token (nats); the colours match the column headers below.");
    harness.get_by_label("chosen-token probability").click();
    harness.run();
    harness.get_by_label_contains("Probability of each chosen token");
    harness.get_by_label("time per step").click();
    harness.run();
    harness
        .get_by_label_contains("Time per step (ms; step 1, which reads the prompt, is left out)");

    use specula::gui::panels::compare::Overlay;
    let store = harness.state().store();
    let (_, greedy) = store.runs().next().unwrap();
    let tokens: Vec<_> = greedy.trace.tokens().collect();
    let times = Overlay::StepTime.points(greedy, &tokens);
    assert_eq!(times.len(), greedy.trace.steps.len() - 1);
    assert_eq!(
        times[0],
        [2.0, greedy.trace.steps[1].timing.unwrap().total_ms]
    );
    let probs = Overlay::Probability.points(greedy, &tokens);
    assert_eq!(probs[3], [4.0, f64::from(tokens[3].prob())]);
}

#[test]
fn snapshot_sweep_empty() {
    let mut harness = new_harness(
        SavePicker { save: None },
        Rc::default(),
        Err("No model found (test).".into()),
    );
    harness.state_mut().show_pane(Pane::Sweep);
    harness.remove_cursor();
    harness.run();
    harness.get_by_label("No sweep yet");
    harness.snapshot("sweep_empty");
}
