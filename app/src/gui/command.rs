//! What panels ask the app to do. Panels only read state and queue commands; the app applies the queue once per
//! frame, after every panel has drawn (rerun's command pattern), so no panel mutates what another is reading.

use std::cell::RefCell;
use std::path::PathBuf;

use specula_core::MethodParams;

use super::cursor::CursorMove;
use super::store::RunKey;
use super::sweep::SweepKind;
use super::tiles::Pane;

#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Start a run from the prompt panel's settings; `paused` starts it paused and steps it once.
    StartRun {
        paused: bool,
    },
    Pause(RunKey),
    Resume(RunKey),
    StepOnce(RunKey),
    Cancel(RunKey),
    /// New parameters for a live run; the worker applies them at its next step.
    SetParams(RunKey, Box<MethodParams>),
    /// Fork `run` at its generated token `token_index`, forcing candidate `candidate` of that position.
    Fork {
        run: RunKey,
        token_index: usize,
        candidate: usize,
    },
    /// Open a trace file; `None` asks with a file dialog.
    OpenTrace(Option<PathBuf>),
    /// Save the selected run (`all: false`) or every run as JSONL.
    SaveTrace {
        all: bool,
    },
    /// Export the selected run as CSV, one row per token.
    ExportCsv,
    /// Load a GGUF model; `None` asks with a file dialog.
    LoadModel(Option<PathBuf>),
    DownloadModel,
    CancelDownload,
    SelectRun(RunKey),
    CloseRun(RunKey),
    MoveCursor(CursorMove),
    /// Focus generated token `index` of the selected run (and move the cursor to its step).
    FocusToken(usize),
    /// Add or remove a run from the Compare panel.
    ToggleCompare(RunKey),
    SetDarkMode(bool),
    DismissNotice,
    /// Export a panel as PNG: ask where, then screenshot the window and crop it to the panel.
    ExportPanel(Pane),
    /// Run the prompt panel's prompt and settings as plain decoding, then speculatively with draft lengths
    /// 1..=12 or, for a cost sweep, with the cost-aware draft length at several costs, one run after the other.
    StartSweep {
        kind: SweepKind,
    },
    CancelSweep,
    /// Time the loaded model's forwards to suggest the cost-aware draft length's cost per draft.
    MeasureDraftCost,
}

/// The queue panels push into. `&self` so that a shared view context can hand it to every panel.
#[derive(Default)]
pub struct CommandQueue(RefCell<Vec<Command>>);

impl CommandQueue {
    pub fn send(&self, command: Command) {
        self.0.borrow_mut().push(command);
    }

    pub fn take(&self) -> Vec<Command> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}
