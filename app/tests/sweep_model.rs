//! The draft-length sweep on the real default model, through the real worker: the GUI tests play the worker with
//! a fake; this checks that the same commands drive real runs one after another to the end. Fails (never skips)
//! when the model is missing: `models/fetch.sh` gets it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use specula::gui::app::repaint_waker;
use specula::gui::sweep::{SweepKind, sweep_data, sweep_ids};
use specula::gui::{AppOptions, Command, SpeculaApp};
use specula_core::worker::Worker;
use support::NoPicker;

fn model_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "the default model is missing at {}: run models/fetch.sh",
        path.display()
    );
    path
}

/// Steps frames until `done` holds; the deadline only keeps a broken worker from hanging the test.
fn frames_until(harness: &mut Harness<'_, SpeculaApp>, done: impl Fn(&SpeculaApp) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !done(harness.state()) {
        assert!(Instant::now() < deadline, "gave up waiting for the worker");
        harness.step();
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_sweep_on_the_real_model_decodes_the_baseline_and_twelve_draft_lengths() {
    let model = model_path();
    let mut harness = Harness::builder()
        .with_size(egui::vec2(1280.0, 800.0))
        .build_eframe(move |cc| {
            let worker = Worker::spawn(repaint_waker(&cc.egui_ctx));
            SpeculaApp::new(
                cc,
                AppOptions {
                    picker: Box::new(NoPicker),
                    backend: Box::new(worker),
                    model: Ok(model),
                    autorun: None,
                    examples: Vec::new(),
                },
            )
        });
    frames_until(&mut harness, |app| app.store().model.info().is_some());
    {
        let run = &mut harness.state_mut().settings_mut().run;
        // Greedy verification, so every speculative run must give the baseline's tokens.
        run.method = "greedy".into();
        run.drafter = "layer-skip".into();
        run.max_tokens = 8;
    }
    harness.state().send(Command::StartSweep {
        kind: SweepKind::DraftLength,
    });
    harness.step();
    assert!(harness.state().sweep().is_some());
    frames_until(&mut harness, |app| app.sweep().is_none());

    let app = harness.state();
    let notice = app.notice().unwrap();
    assert!(
        notice.text.starts_with("Sweep finished: 13 runs"),
        "{}",
        notice.text
    );
    let ids = sweep_ids(app.store());
    assert_eq!(ids.len(), 1);
    let data = sweep_data(app.store(), ids[0]);
    let baseline = app.store().run(data.baseline.unwrap()).unwrap();
    assert_eq!(baseline.trace.header.method, "greedy");
    let plain_ids = &baseline.trace.summary.as_ref().unwrap().token_ids;
    assert_eq!(plain_ids.len(), 8);
    assert_eq!(
        data.points.iter().map(|p| p.k).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    for point in &data.points {
        let run = app.store().run(point.key).unwrap();
        assert_eq!(run.trace.header.params.speculative.draft_len, point.k);
        assert_eq!(
            &run.trace.summary.as_ref().unwrap().token_ids,
            plain_ids,
            "k = {}: greedy speculative decoding must give plain greedy's tokens",
            point.k
        );
        assert!(point.finished);
        assert!(point.mat.is_some_and(|m| m >= 1.0), "k = {}", point.k);
        assert!(point.measured.is_some_and(|s| s > 0.0), "k = {}", point.k);
        assert!(point.predicted.is_some_and(|s| s > 0.0), "k = {}", point.k);
    }
}
