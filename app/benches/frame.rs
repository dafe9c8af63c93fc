//! How long one frame of the workbench takes with a 2,000-step trace open: the app's `ui` plus tessellation,
//! measured headless with egui_kittest (no GPU, no display). Target: under 8 ms. Prints figures; asserts nothing.
//! Twice: the greedy example in the default layout, and the attention example (an attention map at every
//! position) with the Attention pane in front.
//!
//! cargo bench -p specula --bench frame
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use egui_kittest::Harness;
use specula::gui::{AppOptions, Command, Pane, SpeculaApp};
use specula_core::trace::{ExportOptions, FileFormat, Trace, save_runs};

const STEPS: usize = 2_000;
const FRAMES: usize = 60;

#[path = "../tests/support/mod.rs"]
mod support;

use support::{NoBackend, NoPicker};

/// A recorded example, repeated until it has `STEPS` steps; the inspections of the steps after the first move
/// with their tokens (an attention map's keys stay where they were, so they stay before its query).
fn long_trace(dir: &Path, example: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut trace: Trace = Trace::load(&repo.join("assets/traces").join(example))
        .unwrap()
        .remove(0);
    let prompt_len = trace.header.prompt.token_ids.len();
    let recorded = trace.steps.clone();
    trace.steps = (0..STEPS)
        .map(|i| {
            let mut step = recorded[i % recorded.len()].clone();
            step.index = i;
            for t in &mut step.tokens {
                t.position = prompt_len + i;
            }
            if i > 0 {
                step.inspection.retain(|n| n.position >= prompt_len);
                for inspection in &mut step.inspection {
                    inspection.position = prompt_len + i;
                    if let Some(map) = &mut inspection.attention_map {
                        let mut wire = serde_json::to_value(&*map).unwrap();
                        wire["query"] = (prompt_len + i - 1).into();
                        *map = serde_json::from_value(wire).unwrap();
                    }
                }
            }
            step
        })
        .collect();
    trace.header.max_tokens = STEPS;
    trace.summary = None;
    let path = dir.join(example);
    save_runs(
        &path,
        &[&trace],
        FileFormat::Jsonl,
        ExportOptions::default(),
    )
    .unwrap();
    path
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    measure(&long_trace(dir.path(), "greedy.jsonl"), None);
    measure(
        &long_trace(dir.path(), "lens-attention.jsonl"),
        Some(Pane::Attention),
    );
}

fn measure(path: &Path, pane: Option<Pane>) {
    let mut harness = Harness::builder()
        .with_size(egui::vec2(1280.0, 800.0))
        .build_eframe(|cc| {
            SpeculaApp::new(
                cc,
                AppOptions {
                    picker: Box::new(NoPicker),
                    backend: Box::new(NoBackend),
                    model: Err("benchmark".into()),
                    autorun: None,
                    examples: Vec::new(),
                },
            )
        });
    harness
        .state()
        .send(Command::OpenTrace(Some(path.to_owned())));
    harness.run_steps(4);
    if let Some(pane) = pane {
        harness.state_mut().show_pane(pane);
        harness.run_steps(2);
        // The figure is only worth something if the pane shows the attention, not an empty state.
        use egui_kittest::kittest::Queryable;
        harness.get_by_label_contains("the attention of position");
    }
    let mut frame_ms = Vec::with_capacity(FRAMES);
    for i in 0..FRAMES {
        // Move the cursor every frame, as scrubbing does, so nothing is served from a still frame.
        harness.key_press(if i % 2 == 0 {
            egui::Key::ArrowLeft
        } else {
            egui::Key::ArrowRight
        });
        let started = Instant::now();
        harness.step();
        let output = harness.output();
        let primitives = harness
            .ctx
            .tessellate(output.shapes.clone(), output.pixels_per_point);
        std::hint::black_box(primitives);
        frame_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    frame_ms.sort_by(f64::total_cmp);
    let pick = |q: f64| frame_ms[((frame_ms.len() - 1) as f64 * q) as usize];
    println!(
        "frame with a {STEPS}-step trace, {} (ui + tessellation, {FRAMES} frames): min {:.2} ms, median {:.2} ms, \
         p90 {:.2} ms, max {:.2} ms; target < 8 ms (median/8 = {:.2})",
        match pane {
            Some(pane) => format!("{} in front", pane.title()),
            None => "default layout".to_owned(),
        },
        pick(0.0),
        pick(0.5),
        pick(0.9),
        pick(1.0),
        pick(0.5) / 8.0
    );
}
