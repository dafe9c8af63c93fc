//! The generated text, token by token: each token a chip coloured by its probability, its entropy or its source
//! (accepted draft, corrected, bonus); hovering shows its candidates, clicking focuses it (and moves the cursor
//! to its step) so it can be forked.

use egui::{RichText, Sense};

use super::colouring::{ColourBy, chip, legend};
use super::model_panel;
use super::tokens::{candidates_table, display_text, newlines};
use super::{ViewCtx, empty_state};
use crate::gui::command::Command;
use crate::gui::spec::is_speculative;
use crate::gui::store::{ModelState, TokenAt, output_at, removed_at};

#[derive(Default)]
pub struct TokenStreamPanel {
    /// The scale the user picked; `None` = automatic (source for speculative runs, probability otherwise).
    pub colour_by: Option<ColourBy>,
}

impl TokenStreamPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((key, run)) = ctx.selected() else {
            self.empty_ui(ui, ctx);
            return;
        };
        let by = self.colour_by.unwrap_or(if is_speculative(&run.trace) {
            ColourBy::Source
        } else {
            ColourBy::Probability
        });
        ui.horizontal(|ui| {
            egui::ComboBox::from_label("Colour by")
                .selected_text(by.name())
                .show_ui(ui, |ui| {
                    for option in ColourBy::ALL {
                        if ui.selectable_label(by == option, option.name()).clicked() {
                            self.colour_by = Some(option);
                        }
                    }
                });
        });
        legend(ui, by);
        ui.separator();
        let focused = ctx.focused_token().map(|t| t.index);
        let items = stream_items(&run.trace, ctx.cursor.step);
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .stick_to_bottom(true)
            .show(ui, |ui| {
                ui.label(
                    RichText::new(prompt_line(&run.trace.header.prompt.text))
                        .weak()
                        .italics(),
                );
                ui.spacing_mut().item_spacing = egui::vec2(1.0, 3.0);
                ui.horizontal_wrapped(|ui| {
                    for (t, kind) in items {
                        let mut text = match kind {
                            Shown::Output => chip(t.token, by),
                            // Taken back by this step's rollback: still readable, visibly not part of the text.
                            Shown::TakenBack => RichText::new(display_text(&t.token.token))
                                .monospace()
                                .strikethrough()
                                .color(ui.visuals().error_fg_color),
                            // Tokens after the cursor are the run's future: plain and faded, still clickable.
                            Shown::Future => RichText::new(display_text(&t.token.token))
                                .monospace()
                                .weak(),
                        };
                        if focused == Some(t.index) {
                            text = text.strong();
                        }
                        // A token is never split across lines; the row wraps between tokens.
                        let galley = egui::WidgetText::from(text).into_galley(
                            ui,
                            Some(egui::TextWrapMode::Extend),
                            f32::INFINITY,
                            egui::TextStyle::Body,
                        );
                        // A chip far from the visible area only reserves its space: building, hit-testing and
                        // painting two thousand labels every frame would blow the frame budget.
                        let slot = egui::Rect::from_min_size(ui.cursor().min, galley.size());
                        if !ui.clip_rect().expand(48.0).intersects(slot) {
                            ui.allocate_space(galley.size());
                            for _ in 0..newlines(&t.token.token) {
                                ui.end_row();
                            }
                            continue;
                        }
                        let chip = egui::Label::new(galley)
                            .selectable(false)
                            .sense(Sense::click());
                        let response = ui.add(chip);
                        if focused == Some(t.index) {
                            let stroke = egui::Stroke::new(2.0, ui.visuals().strong_text_color());
                            ui.painter().rect_stroke(
                                response.rect.expand(1.0),
                                2.0,
                                stroke,
                                egui::StrokeKind::Outside,
                            );
                        }
                        let response = response.on_hover_ui(|ui| {
                            ui.label(format!(
                                "Token {} (step {})",
                                t.output_index + 1,
                                t.step + 1
                            ));
                            if kind == Shown::TakenBack {
                                ui.label(
                                    "Taken back at this step: the method rolled the output back.",
                                );
                            }
                            candidates_table(ui, t.token, ("hover", key, t.index));
                        });
                        if response.clicked() {
                            ctx.send(Command::FocusToken(t.index));
                        }
                        for _ in 0..newlines(&t.token.token) {
                            ui.end_row();
                        }
                    }
                    if run.status.is_live() {
                        ui.spinner();
                    }
                });
                if let Some(error) = match &run.status {
                    crate::gui::store::RunStatus::Failed(e) => Some(e),
                    _ => None,
                } {
                    ui.colored_label(
                        ui.visuals().error_fg_color,
                        format!("The run failed: {error}"),
                    );
                }
                ui.add_space(8.0);
                self.fork_ui(ui, ctx, key);
            });
    }

    fn empty_ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        match &ctx.store.model {
            ModelState::Loaded { .. } => empty_state(
                ui,
                "Ready",
                "Write a prompt on the left and press Run, or open a recorded trace (File > Open trace…).",
            ),
            ModelState::Loading { path } => {
                ui.vertical_centered(|ui| {
                    ui.add_space(24.0);
                    ui.spinner();
                    ui.label(format!("Loading the model {} …", path.display()));
                    ui.label("Meanwhile you can open a recorded trace (File > Open trace…).");
                });
            }
            _ => model_panel::no_model_ui(ui, ctx),
        }
    }

    /// The focused token's candidates with a Fork button each.
    fn fork_ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>, key: crate::gui::store::RunKey) {
        let Some(t) = ctx.focused_token() else { return };
        ui.separator();
        ui.label(
            RichText::new(format!(
                "Token {} of step {}: what else could have come here?",
                t.output_index + 1,
                t.step + 1
            ))
            .strong(),
        );
        let can_fork = ctx.store.model.info().is_some();
        if !can_fork {
            ui.label(
                RichText::new(
                    "Forking runs the model from the chosen token: load a model to fork.",
                )
                .weak(),
            );
        }
        egui::Grid::new(("fork", key, t.index)).striped(true).num_columns(4).spacing([12.0, 4.0]).show(ui, |ui| {
            for (i, c) in t.token.top_logprobs.iter().enumerate().take(10) {
                ui.label(RichText::new(super::tokens::quoted(&c.token)).monospace());
                ui.label(super::tokens::percent(c.logprob.exp()));
                ui.label(c.warped_prob.map(super::tokens::warped_percent).unwrap_or_default());
                if c.id == t.token.id {
                    ui.label("chosen");
                } else if ui
                    .add_enabled(can_fork, egui::Button::new(format!("Fork with {}", super::tokens::quoted(&c.token))))
                    .on_hover_text("Start a new run that keeps the tokens before this one and forces this candidate")
                    .clicked()
                {
                    ctx.send(Command::Fork { run: key, token_index: t.index, candidate: i });
                }
                ui.end_row();
            }
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shown {
    /// Part of the output at the cursor.
    Output,
    /// Taken back by the rollback of the cursor's step.
    TakenBack,
    /// After the cursor, in the final output.
    Future,
}

/// What the stream shows at `step`: the output then, with the tokens the step's rollback took back struck
/// through where they stood, then the final output's later tokens when the output at the cursor leads to it.
fn stream_items(trace: &specula_core::trace::Trace, step: usize) -> Vec<(TokenAt<'_>, Shown)> {
    let shown = output_at(trace, step);
    let removed = removed_at(trace, step);
    let cut = trace
        .steps
        .get(step)
        .and_then(|s| s.rollback.as_ref())
        .map_or(shown.len(), |r| r.to_generated.min(shown.len()));
    let last = trace.steps.len().saturating_sub(1);
    let final_output = if step < last {
        output_at(trace, last)
    } else {
        Vec::new()
    };
    let leads_there = final_output.len() > shown.len()
        && shown
            .iter()
            .zip(&final_output)
            .all(|(a, b)| a.token.id == b.token.id);
    let mut items: Vec<(TokenAt<'_>, Shown)> = Vec::new();
    items.extend(shown[..cut].iter().map(|t| (*t, Shown::Output)));
    items.extend(removed.into_iter().map(|t| (t, Shown::TakenBack)));
    items.extend(shown[cut..].iter().map(|t| (*t, Shown::Output)));
    if leads_there {
        items.extend(
            final_output[shown.len()..]
                .iter()
                .map(|t| (*t, Shown::Future)),
        );
    }
    items
}

/// The prompt, shortened to one line for the head of the stream.
fn prompt_line(prompt: &str) -> String {
    let line = prompt.lines().next().unwrap_or_default();
    let short: String = line.chars().take(120).collect();
    if short.len() < prompt.len() {
        format!("Prompt: {short} …")
    } else {
        format!("Prompt: {short}")
    }
}
