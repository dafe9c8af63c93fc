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
    fn try_event(&mut self) -> Option<Event> {
        None
    }
}
