//! The app's view of the decoding worker. `specula_core::worker::Worker` is the real one; tests use a fake that
//! records what it was asked and plays back events, so no model is needed.

use std::path::PathBuf;

use specula_core::worker::{Event, RunId, Worker};
use specula_core::{MethodParams, RunSpec};

pub trait Backend {
    fn load_model(&mut self, path: PathBuf);
    /// Queues a run; it starts stepping at once unless `paused`.
    fn start(&mut self, spec: RunSpec, paused: bool) -> RunId;
    fn pause(&mut self, id: RunId);
    fn resume(&mut self, id: RunId);
    fn step_once(&mut self, id: RunId);
    fn cancel(&mut self, id: RunId);
    fn set_params(&mut self, id: RunId, params: MethodParams);
    /// Asks for the cost of one drafted token on the loaded model (`Event::DraftCostMeasured`).
    fn measure_draft_cost(&mut self);
    /// The next event, if one is waiting; never blocks.
    fn try_event(&mut self) -> Option<Event>;
}

impl Backend for Worker {
    fn load_model(&mut self, path: PathBuf) {
        Worker::load_model(self, path);
    }

    fn start(&mut self, spec: RunSpec, paused: bool) -> RunId {
        Worker::start(self, spec, paused)
    }

    fn pause(&mut self, id: RunId) {
        Worker::pause(self, id);
    }

    fn resume(&mut self, id: RunId) {
        Worker::resume(self, id);
    }

    fn step_once(&mut self, id: RunId) {
        Worker::step_once(self, id);
    }

    fn cancel(&mut self, id: RunId) {
        Worker::cancel(self, id);
    }

    fn set_params(&mut self, id: RunId, params: MethodParams) {
        Worker::set_params(self, id, params);
    }

    fn measure_draft_cost(&mut self) {
        Worker::measure_draft_cost(self);
    }

    fn try_event(&mut self) -> Option<Event> {
        self.events().try_recv().ok()
    }
}
