//! The menu bar and the run controls: model, method, Run / Pause / Step / Cancel, speed.

use std::path::PathBuf;

use egui::RichText;

use super::ViewCtx;
use super::model_panel::model_status_ui;
use crate::gui::command::Command;
use crate::gui::settings::{METHODS, RunSettings};
use crate::gui::store::RunStatus;
use crate::gui::tiles::Pane;

pub struct TopBar {
    /// Example traces found at start (assets/traces/*.jsonl).
    pub examples: Vec<PathBuf>,
}

impl TopBar {
    pub fn menu_ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>, dark_mode: bool) {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("File", |ui| {
                if ui.button("Open trace…").clicked() {
                    ctx.send(Command::OpenTrace(None));
                }
                ui.menu_button("Open example", |ui| {
                    if self.examples.is_empty() {
                        ui.label("No example traces found (assets/traces/ next to the program or in the current folder).");
                    }
                    for path in &self.examples {
                        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                        if ui.button(name).clicked() {
                            ctx.send(Command::OpenTrace(Some(path.clone())));
                        }
                    }
                });
                ui.separator();
                let has_run = ctx.selected().is_some();
                if ui.add_enabled(has_run, egui::Button::new("Save selected run…")).clicked() {
                    ctx.send(Command::SaveTrace { all: false });
                }
                if ui.add_enabled(!ctx.store.is_empty(), egui::Button::new("Save all runs…")).clicked() {
                    ctx.send(Command::SaveTrace { all: true });
                }
                if ui.add_enabled(has_run, egui::Button::new("Export CSV…")).clicked() {
                    ctx.send(Command::ExportCsv);
                }
                ui.menu_button("Export panel as PNG", |ui| {
                    for pane in Pane::ALL {
                        if ui.button(format!("{}…", pane.title())).clicked() {
                            ctx.send(Command::ExportPanel(pane));
                        }
                    }
                });
                ui.separator();
                if ui.button("Load model…").clicked() {
                    ctx.send(Command::LoadModel(None));
                }
            });
            ui.menu_button("View", |ui| {
                let (label, dark) = if dark_mode { ("Light theme", false) } else { ("Dark theme", true) };
                if ui.button(label).clicked() {
                    ctx.send(Command::SetDarkMode(dark));
                }
            });
        });
    }

    /// The run controls. `settings.method` is edited in place (it is UI state, not run state).
    pub fn controls_ui(
        &mut self,
        ui: &mut egui::Ui,
        ctx: &ViewCtx<'_>,
        settings: &mut RunSettings,
    ) {
        ui.horizontal_wrapped(|ui| {
            model_status_ui(ui, ctx);
            ui.separator();
            ui.label("Method");
            egui::ComboBox::from_id_salt("method")
                .selected_text(&settings.method)
                .show_ui(ui, |ui| {
                    for m in METHODS {
                        ui.selectable_value(&mut settings.method, (*m).to_owned(), *m);
                    }
                })
                .response
                .on_hover_text(
                    "greedy takes the most likely token; sample draws from the warped distribution; speculative \
                     lets a drafter guess several tokens that the model checks in one pass",
                );
            let live = ctx
                .selected()
                .and_then(|(key, run)| run.live_id().map(|_| (key, run.status.clone())));
            if ui
                .button("Run")
                .on_hover_text("Start a new run with the prompt and settings on the left")
                .clicked()
            {
                ctx.send(Command::StartRun { paused: false });
            }
            match &live {
                Some((key, RunStatus::Running)) => {
                    if ui.button("Pause").clicked() {
                        ctx.send(Command::Pause(*key));
                    }
                }
                Some((key, _)) => {
                    if ui.button("Resume").clicked() {
                        ctx.send(Command::Resume(*key));
                    }
                }
                None => {
                    ui.add_enabled(false, egui::Button::new("Pause"));
                }
            }
            let step = ui
                .button("Step")
                .on_hover_text("Decode one step of the selected run (or start a new run paused)");
            if step.clicked() {
                match &live {
                    Some((key, _)) => ctx.send(Command::StepOnce(*key)),
                    None => ctx.send(Command::StartRun { paused: true }),
                }
            }
            if ui
                .add_enabled(live.is_some(), egui::Button::new("Cancel"))
                .clicked()
                && let Some((key, _)) = &live
            {
                ctx.send(Command::Cancel(*key));
            }
            ui.separator();
            if let Some((_, run)) = ctx.selected() {
                let speed = run
                    .tokens_per_second()
                    .map_or("– tokens/s".to_owned(), |s| format!("{s:.1} tokens/s"));
                ui.label(RichText::new(format!("{}: {speed}", run.label())).monospace())
                    .on_hover_text(
                        "Decode speed of the selected run (the prompt's prefill step is left out)",
                    );
            }
        });
    }
}
