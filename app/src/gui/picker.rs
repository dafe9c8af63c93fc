//! File dialogs behind a trait, so tests never open a real dialog (rfd blocks without a display).

use std::path::PathBuf;

pub trait FilePicker {
    /// Asks for a file to open; `filter` names the kind ("trace" or "model"). `None` when the user cancelled.
    fn open(&self, filter: PickFilter) -> Option<PathBuf>;
    /// Asks where to save, proposing `default_name`. `None` when the user cancelled.
    fn save(&self, default_name: &str) -> Option<PathBuf>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickFilter {
    Trace,
    Model,
}

/// Answers every save dialog with one path and leaves opening to `inner`: the Xvfb smoke test's export
/// (`SPECULA_SMOKE_EXPORT`) has no portal to show a dialog on.
pub struct SaveTo {
    pub path: PathBuf,
    pub inner: Box<dyn FilePicker>,
}

impl FilePicker for SaveTo {
    fn open(&self, filter: PickFilter) -> Option<PathBuf> {
        self.inner.open(filter)
    }

    fn save(&self, _default_name: &str) -> Option<PathBuf> {
        Some(self.path.clone())
    }
}

/// The native dialog (xdg portal on Linux).
pub struct RfdPicker;

impl FilePicker for RfdPicker {
    fn open(&self, filter: PickFilter) -> Option<PathBuf> {
        let dialog = rfd::FileDialog::new();
        let dialog = match filter {
            PickFilter::Trace => dialog.add_filter("Specula trace", &["jsonl", "json"]),
            PickFilter::Model => dialog.add_filter("GGUF model", &["gguf"]),
        };
        dialog.add_filter("All files", &["*"]).pick_file()
    }

    fn save(&self, default_name: &str) -> Option<PathBuf> {
        rfd::FileDialog::new()
            .set_file_name(default_name)
            .save_file()
    }
}
