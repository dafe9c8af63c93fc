//! The egui workbench. A small version of rerun's viewer:
//!
//! ```text
//! worker (specula_core) --events--> RunStore (store.rs, no egui)
//!                                      |  read at the TimeCursor (cursor.rs)
//!                                      v
//!              panels (panels/*.rs) --Command--> SpeculaApp::handle (handle.rs) --> worker / files / store
//! ```
//!
//! `app.rs` owns everything and runs the frame: drain events (`logic`), draw the panels (`ui`), apply the
//! commands. Panels never change state themselves. File dialogs sit behind [`FilePicker`] and the worker behind
//! [`Backend`], so the whole app runs in tests without a model or a display.

use std::path::PathBuf;

pub mod app;
pub mod backend;
pub mod command;
pub mod cursor;
pub mod download;
pub mod export;
pub mod fork;
mod handle;
pub mod panels;
pub mod picker;
pub mod search;
pub mod settings;
pub mod spec;
pub mod speedup;
pub mod store;
pub mod sweep;
pub mod tiles;

pub use app::{AppOptions, SpeculaApp};
pub use backend::Backend;
pub use command::Command;
pub use cursor::{CursorMove, PlayMode, TimeCursor};
pub use picker::{FilePicker, PickFilter, RfdPicker};
pub use store::{ModelState, RunStore};
pub use tiles::Pane;

/// Environment variable: a prompt to decode greedily (32 tokens) as soon as the model is loaded. The Xvfb smoke
/// test uses it; the window title says when the run finished.
pub const AUTORUN_ENV: &str = "SPECULA_AUTORUN";

/// Environment variable, for the Xvfb smoke test only: `PANE=PATH` (a pane's title, e.g. `Plots=/tmp/p.png`)
/// exports that pane as PNG to PATH once the selected run finished, through the command File → Export panel as
/// PNG sends (only the save dialog is answered by PATH), and prints the outcome on stdout as one
/// `specula-export:` line.
pub const SMOKE_EXPORT_ENV: &str = "SPECULA_SMOKE_EXPORT";

/// The pane and path `SPECULA_SMOKE_EXPORT` asks for.
fn smoke_export() -> anyhow::Result<Option<(Pane, PathBuf)>> {
    let Some(value) = std::env::var_os(SMOKE_EXPORT_ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    let (title, path) = value
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("{SMOKE_EXPORT_ENV} must be PANE=PATH, not {value:?}"))?;
    let pane = Pane::ALL
        .into_iter()
        .find(|p| p.title().eq_ignore_ascii_case(title.trim()))
        .ok_or_else(|| {
            let titles: Vec<&str> = Pane::ALL.iter().map(|p| p.title()).collect();
            anyhow::anyhow!(
                "{SMOKE_EXPORT_ENV}: no pane is titled {title:?} (panes: {})",
                titles.join(", ")
            )
        })?;
    Ok(Some((pane, PathBuf::from(path))))
}

/// Opens the workbench. `threads` was applied by `main` already. A missing or bad model still opens the window,
/// which then says how to get one.
pub fn run(model: Option<PathBuf>, _threads: usize) -> anyhow::Result<()> {
    let model = crate::cli::resolve_model(model.as_deref()).map_err(|e| format!("{e:#}"));
    let autorun = std::env::var(AUTORUN_ENV)
        .ok()
        .filter(|p| !p.trim().is_empty());
    let smoke_export = smoke_export()?;
    let native_options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Specula")
            .with_app_id("specula")
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([800.0, 500.0]),
        ..Default::default()
    };
    eframe::run_native(
        "Specula",
        native_options,
        Box::new(move |cc| {
            let waker = app::repaint_waker(&cc.egui_ctx);
            let worker = specula_core::worker::Worker::spawn(waker);
            let picker: Box<dyn FilePicker> = match &smoke_export {
                Some((_, path)) => Box::new(picker::SaveTo {
                    path: path.clone(),
                    inner: Box::new(RfdPicker),
                }),
                None => Box::new(RfdPicker),
            };
            let options = AppOptions {
                picker,
                backend: Box::new(worker),
                model,
                autorun,
                examples: find_examples(),
            };
            let mut app = SpeculaApp::new(cc, options);
            if let Some((pane, _)) = smoke_export {
                app.export_when_finished(pane);
            }
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("could not open the window: {e}"))
}

/// Example traces: `assets/traces/*.jsonl` in the current folder or in a folder above the executable (the
/// repository when run from `target/release`). Sorted, so the menu order is stable.
pub fn find_examples() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(PathBuf::from));
    }
    for root in roots {
        let dir = root.join("assets").join("traces");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        if !found.is_empty() {
            found.sort();
            return found;
        }
    }
    Vec::new()
}
