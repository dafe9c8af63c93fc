//! The generated text, token by token: each token a chip coloured by its probability, its entropy or its source
//! (accepted draft, corrected, bonus); hovering shows its candidates, clicking focuses it (and moves the cursor
//! to its step) so it can be forked.

use std::sync::Arc;

use egui::{RichText, Sense};
use specula_core::trace::{TokenRecord, Trace};

use super::colouring::{ColourBy, chip, legend};
use super::model_panel;
use super::tokens::{candidates_table, display_text, newlines};
use super::{ViewCtx, empty_state};
use crate::gui::command::Command;
use crate::gui::spec::is_speculative;
use crate::gui::store::{ModelState, RunKey, TokenAt, output_at, removed_at, tokens_with_steps};

#[derive(Default)]
pub struct TokenStreamPanel {
    /// The scale the user picked; `None` = automatic (source for speculative runs, probability otherwise).
    pub colour_by: Option<ColourBy>,
    chip_sizes: ChipSizes,
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
        let sizes = self.chip_sizes.of(ui, key, &run.trace);
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
                        let Some(&ChipSize { size, newlines }) = sizes.get(t.index) else {
                            continue;
                        };
                        // A chip far from the visible area only reserves its space: building, laying out,
                        // hit-testing and painting two thousand labels every frame would blow the frame budget.
                        let slot = egui::Rect::from_min_size(ui.cursor().min, size);
                        if !ui.clip_rect().expand(48.0).intersects(slot) {
                            ui.allocate_space(size);
                            for _ in 0..newlines {
                                ui.end_row();
                            }
                            continue;
                        }
                        let galley = chip_galley(ui, t.token, kind, by, focused == Some(t.index));
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
                        for _ in 0..newlines {
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
                fork_ui(ui, ctx, key);
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
}

/// The focused token's candidates with a Fork button each.
fn fork_ui(ui: &mut egui::Ui, ctx: &ViewCtx<'_>, key: RunKey) {
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
            RichText::new("Forking runs the model from the chosen token: load a model to fork.")
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

/// A chip laid out for the stream: a token is never split across lines, the row wraps between tokens.
fn chip_galley(
    ui: &egui::Ui,
    token: &TokenRecord,
    kind: Shown,
    by: ColourBy,
    focused: bool,
) -> Arc<egui::Galley> {
    let mut text = match kind {
        Shown::Output => chip(token, by),
        // Taken back by this step's rollback: still readable, visibly not part of the text.
        Shown::TakenBack => RichText::new(display_text(&token.token))
            .monospace()
            .strikethrough()
            .color(ui.visuals().error_fg_color),
        // Tokens after the cursor are the run's future: plain and faded, still clickable.
        Shown::Future => RichText::new(display_text(&token.token)).monospace().weak(),
    };
    if focused {
        text = text.strong();
    }
    egui::WidgetText::from(text).into_galley(
        ui,
        Some(egui::TextWrapMode::Extend),
        f32::INFINITY,
        egui::TextStyle::Body,
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct ChipSize {
    size: egui::Vec2,
    /// Rows the token's own newlines end after the chip.
    newlines: usize,
}

/// Every chip's size for one run, by token index. Colour, weight and strike-through never change a monospace
/// chip's size, so the size depends only on the token's text and the font: measured once per token, it lets
/// the off-screen chips (nearly all of a long run) reserve their space without being built or laid out.
#[derive(Default)]
struct ChipSizes {
    run: Option<RunKey>,
    /// The monospace font and the scale the sizes were measured at; a change of either measures again.
    font: Option<(egui::FontId, f32)>,
    sizes: Vec<ChipSize>,
}

impl ChipSizes {
    /// The sizes of every token `trace` committed so far; a live run's new tokens are measured as they come.
    fn of(&mut self, ui: &egui::Ui, run: RunKey, trace: &Trace) -> &[ChipSize] {
        let font = (
            egui::TextStyle::Monospace.resolve(ui.style()),
            ui.ctx().pixels_per_point(),
        );
        if self.run != Some(run) || self.font.as_ref() != Some(&font) {
            self.run = Some(run);
            self.font = Some(font);
            self.sizes.clear();
        }
        let known = self.sizes.len();
        self.sizes
            .extend(tokens_with_steps(trace).skip(known).map(|t| ChipSize {
                size: chip_galley(ui, t.token, Shown::Output, ColourBy::Probability, false).size(),
                newlines: newlines(&t.token.token),
            }));
        &self.sizes
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::cell::Cell;
    use std::path::Path;

    use super::*;

    fn example(name: &str) -> Trace {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../assets/traces")
            .join(name);
        Trace::load(&path).unwrap().remove(0)
    }

    /// Off-screen chips reserve the measured size while on-screen ones are laid out in full: if the two ever
    /// differed, scrolling would shift the stream as chips cross the edge of the view.
    #[test]
    fn every_chip_is_as_large_as_measured_whatever_its_kind_colour_or_focus() {
        let checked = Cell::new(0usize);
        for name in ["greedy.jsonl", "opera.jsonl", "speculative.jsonl"] {
            let trace = example(name);
            let mut half = trace.clone();
            half.steps.truncate(trace.steps.len() / 2);
            let mut harness = egui_kittest::Harness::new_ui(|ui| {
                let mut grown = ChipSizes::default();
                grown.of(ui, 7, &half);
                let grown = grown.of(ui, 7, &trace).to_vec();
                let fresh = ChipSizes::default().of(ui, 7, &trace).to_vec();
                assert_eq!(
                    grown, fresh,
                    "{name}: a growing run measures as a whole one"
                );
                assert_eq!(fresh.len(), tokens_with_steps(&trace).count());
                for t in tokens_with_steps(&trace) {
                    for kind in [Shown::Output, Shown::TakenBack, Shown::Future] {
                        for by in ColourBy::ALL {
                            for focused in [false, true] {
                                let laid_out = chip_galley(ui, t.token, kind, by, focused).size();
                                assert_eq!(
                                    laid_out, fresh[t.index].size,
                                    "{name}: token {} {:?}",
                                    t.index, t.token.token
                                );
                            }
                        }
                    }
                    checked.set(checked.get() + 1);
                }
            });
            harness.run();
        }
        assert!(checked.get() > 100, "only {} tokens checked", checked.get());
    }
}
