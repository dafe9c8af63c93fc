//! Applying commands: the one place where the app's state changes in answer to the user.

use std::path::{Path, PathBuf};

use specula_core::trace::{ExportOptions, FileFormat, Trace, save_runs};

use super::app::{SpeculaApp, repaint_waker};
use super::command::Command;
use super::cursor::CursorMove;
use super::download::Download;
use super::fork::fork_spec;
use super::picker::PickFilter;
use super::store::{DraftCost, ModelState, Notice, RunKey, tokens_with_steps};

impl SpeculaApp {
    pub fn handle(&mut self, command: Command) {
        match command {
            Command::StartRun { paused } => self.start_run(paused),
            Command::Pause(key) => self.with_live(key, |b, id| b.pause(id)),
            Command::Resume(key) => self.with_live(key, |b, id| b.resume(id)),
            Command::StepOnce(key) => self.with_live(key, |b, id| b.step_once(id)),
            Command::Cancel(key) => self.with_live(key, |b, id| b.cancel(id)),
            Command::SetParams(key, params) => {
                self.with_live(key, |b, id| b.set_params(id, *params))
            }
            Command::Fork {
                run,
                token_index,
                candidate,
            } => self.fork(run, token_index, candidate),
            Command::OpenTrace(path) => {
                if let Some(path) = path.or_else(|| self.picker.open(PickFilter::Trace)) {
                    self.open_trace(&path);
                }
            }
            Command::SaveTrace { all } => self.save(all, FileFormat::Jsonl),
            Command::ExportCsv => self.save(false, FileFormat::Csv),
            Command::LoadModel(path) => {
                if let Some(path) = path.or_else(|| self.picker.open(PickFilter::Model)) {
                    self.store.model = ModelState::Loading { path: path.clone() };
                    self.backend.load_model(path);
                }
            }
            Command::DownloadModel => {
                if self.download.is_none() {
                    self.download = Some(Download::start(repaint_waker(&self.egui_ctx)));
                }
            }
            Command::CancelDownload => {
                if let Some(d) = &self.download {
                    d.cancel();
                }
            }
            Command::SelectRun(key) => {
                self.store.select(key);
                self.follow_selection();
            }
            Command::CloseRun(key) => {
                self.with_live(key, |b, id| b.cancel(id));
                self.store.remove(key);
                self.compare.remove(&key);
            }
            Command::MoveCursor(movement) => {
                let len = self.store.selected().map_or(0, |r| r.trace.steps.len());
                self.cursor.apply(movement, len);
                if !matches!(movement, CursorMove::SetRate(_)) {
                    self.focus = None;
                }
            }
            Command::FocusToken(index) => self.focus_token(index),
            Command::ToggleCompare(key) => {
                if self.compare.is_empty() {
                    // Empty means "every run": make that explicit before taking one out.
                    self.compare = self.store.runs().map(|(k, _)| k).collect();
                }
                if !self.compare.remove(&key) {
                    self.compare.insert(key);
                }
            }
            Command::SetDarkMode(dark) => {
                self.settings.dark_mode = dark;
                self.egui_ctx.set_theme(if dark {
                    egui::Theme::Dark
                } else {
                    egui::Theme::Light
                });
            }
            Command::DismissNotice => self.notice = None,
            Command::ExportPanel(pane) => self.start_export(pane),
            Command::StartSweep { kind } => self.start_sweep(kind),
            Command::CancelSweep => self.cancel_sweep(),
            Command::MeasureDraftCost => {
                self.store.draft_cost = DraftCost::Measuring;
                self.backend.measure_draft_cost();
            }
        }
    }

    /// Runs `f` with the worker id of `key` if the run is still live; a finished run ignores controls.
    fn with_live(&mut self, key: RunKey, f: impl FnOnce(&mut dyn super::backend::Backend, u64)) {
        if let Some(id) = self.store.run(key).and_then(|r| r.live_id()) {
            f(self.backend.as_mut(), id);
        }
    }

    /// Why a run cannot start now, if it cannot.
    pub(super) fn model_problem(&self) -> Option<String> {
        match &self.store.model {
            ModelState::Loaded { .. } => None,
            ModelState::Loading { .. } => Some("the model is still loading; try again in a moment.".to_owned()),
            ModelState::Missing { .. } | ModelState::Failed { .. } => Some(
                "no model is loaded. Load a GGUF model (File > Load model…), download the default one, or run \
                 models/fetch.sh."
                    .to_owned(),
            ),
        }
    }

    fn start_run(&mut self, paused: bool) {
        if let Some(problem) = self.model_problem() {
            self.notice = Some(Notice::error(format!("Cannot run: {problem}")));
            return;
        }
        if self.settings.run.prompt.trim().is_empty() {
            self.notice = Some(Notice::error(
                "Cannot run: the prompt is empty. Write one on the left.",
            ));
            return;
        }
        let id = self.backend.start(self.settings.run.run_spec(), paused);
        if paused {
            self.backend.step_once(id);
        }
        self.store.expect_run(id, true);
        self.notice = None;
    }

    fn fork(&mut self, key: RunKey, token_index: usize, candidate: usize) {
        let Some(parent) = self.store.run(key) else {
            return;
        };
        if let Some(problem) = self.model_problem() {
            self.notice = Some(Notice::error(format!("Cannot fork: {problem}")));
            return;
        }
        let wanted = &parent.trace.header.model;
        if self
            .store
            .model
            .info()
            .is_some_and(|m| m.sha256 != wanted.sha256)
        {
            self.notice = Some(Notice::error(format!(
                "Cannot fork: this run was made with {} ({}); load that model first, since token ids differ \
                 between models.",
                wanted.name, wanted.file_name
            )));
            return;
        }
        // The output as it stood when the token was committed: a later rollback may have taken it back.
        let Some(at) = tokens_with_steps(&parent.trace).find(|t| t.index == token_index) else {
            self.notice = Some(Notice::error(format!(
                "Cannot fork: the run has no token {token_index}"
            )));
            return;
        };
        let mut then = parent.trace.clone();
        then.steps.truncate(at.step + 1);
        then.summary = None;
        match fork_spec(&then, at.output_index, candidate) {
            Ok(spec) => {
                let label = spec.label.clone();
                let id = self.backend.start(spec, false);
                self.store.expect_run(id, true);
                // Show every run in Compare, so the fork appears beside its parent.
                self.compare.clear();
                self.notice = Some(Notice::info(format!(
                    "Started {label}; see it beside its parent in Compare."
                )));
            }
            Err(e) => self.notice = Some(Notice::error(format!("Cannot fork: {e}"))),
        }
    }

    fn focus_token(&mut self, index: usize) {
        let Some(run) = self.store.selected() else {
            return;
        };
        if let Some(t) = tokens_with_steps(&run.trace).find(|t| t.index == index) {
            let len = run.trace.steps.len();
            self.cursor.apply(CursorMove::To(t.step), len);
            self.focus = Some(index);
        }
    }

    pub(super) fn open_trace(&mut self, path: &Path) {
        match self.store.open_file(path) {
            Ok(keys) => {
                let runs = if keys.len() == 1 {
                    "1 run".to_owned()
                } else {
                    format!("{} runs", keys.len())
                };
                self.notice = Some(Notice::info(format!(
                    "Opened {runs} from {}.",
                    path.display()
                )));
            }
            Err(e) => {
                self.notice = Some(Notice::error(format!(
                    "Could not open {}: {e}",
                    path.display()
                )))
            }
        }
    }

    fn save(&mut self, all: bool, format: FileFormat) {
        let runs: Vec<&Trace> = if all {
            self.store.runs().map(|(_, r)| &r.trace).collect()
        } else {
            self.store
                .selected()
                .map(|r| &r.trace)
                .into_iter()
                .collect()
        };
        let Some(first) = runs.first() else {
            self.notice = Some(Notice::error(
                "Nothing to save: open a trace or start a run first.",
            ));
            return;
        };
        let extension = if format == FileFormat::Csv {
            "csv"
        } else {
            "jsonl"
        };
        let stem = if all {
            "specula-runs".to_owned()
        } else {
            file_stem(&first.header.label)
        };
        let Some(path) = self.picker.save(&format!("{stem}.{extension}")) else {
            return;
        };
        let path = with_extension_if_missing(path, extension);
        self.notice = Some(
            match save_runs(&path, &runs, format, ExportOptions::default()) {
                Ok(()) => Notice::info(format!(
                    "Saved {} run(s) to {}.",
                    runs.len(),
                    path.display()
                )),
                Err(e) => Notice::error(format!("Could not save: {e}")),
            },
        );
    }
}

/// A file name from a run label: letters, digits, dots and dashes; the rest become dashes.
pub(super) fn file_stem(label: &str) -> String {
    let stem: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let stem = stem.trim_matches('-');
    if stem.is_empty() {
        "run".to_owned()
    } else {
        stem.chars().take(60).collect()
    }
}

pub(super) fn with_extension_if_missing(path: PathBuf, extension: &str) -> PathBuf {
    if path.extension().is_some() {
        path
    } else {
        path.with_extension(extension)
    }
}
