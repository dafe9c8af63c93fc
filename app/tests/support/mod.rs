//! Fakes shared by the GUI tests and the frame benchmark: a file picker that never answers and a backend with
//! no model (replaying traces needs none).
#![allow(dead_code)]

use std::path::PathBuf;

use specula::gui::{Backend, FilePicker, PickFilter};
use specula_core::MethodParams;
use specula_core::RunSpec;
use specula_core::worker::{Event, RunId};

pub struct NoPicker;

impl FilePicker for NoPicker {
    fn open(&self, _filter: PickFilter) -> Option<PathBuf> {
        None
    }

    fn save(&self, _default_name: &str) -> Option<PathBuf> {
        None
    }
}

pub struct NoBackend;

impl Backend for NoBackend {
    fn load_model(&mut self, _path: PathBuf) {}
    fn start(&mut self, _spec: RunSpec, _paused: bool) -> RunId {
        0
    }
    fn pause(&mut self, _id: RunId) {}
    fn resume(&mut self, _id: RunId) {}
    fn step_once(&mut self, _id: RunId) {}
    fn cancel(&mut self, _id: RunId) {}
    fn set_params(&mut self, _id: RunId, _params: MethodParams) {}
    fn measure_draft_cost(&mut self) {}
    fn try_event(&mut self) -> Option<Event> {
        None
    }
}

/// The app with no model, no picker and no examples, after opening the trace at `path` and dismissing the
/// "Opened … from" notice (snapshots must not show a temporary path).
pub fn offline_app_with_trace(
    path: PathBuf,
    size: egui::Vec2,
) -> egui_kittest::Harness<'static, specula::gui::SpeculaApp> {
    use specula::gui::{AppOptions, Command, SpeculaApp};
    let mut harness = egui_kittest::Harness::builder()
        .with_size(size)
        .build_eframe(|cc| {
            SpeculaApp::new(
                cc,
                AppOptions {
                    picker: Box::new(NoPicker),
                    backend: Box::new(NoBackend),
                    model: Err("No model found (test).".into()),
                    autorun: None,
                    examples: Vec::new(),
                },
            )
        });
    harness.run();
    harness.state().send(Command::OpenTrace(Some(path)));
    harness.run();
    harness.state().send(Command::DismissNotice);
    harness.run();
    harness
}

/// Moves the cursor to `step` and brings `pane` to the front.
pub fn at_step(
    harness: &mut egui_kittest::Harness<'_, specula::gui::SpeculaApp>,
    step: usize,
    pane: specula::gui::Pane,
) {
    use specula::gui::{Command, CursorMove};
    harness
        .state()
        .send(Command::MoveCursor(CursorMove::To(step)));
    harness.state_mut().show_pane(pane);
    harness.run();
}
