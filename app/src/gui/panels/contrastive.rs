//! Contrastive search at the cursor: the k candidates with both terms of their score, (1 − α)·p (model
//! confidence) and α·max cosine similarity to an earlier token (degeneration penalty), as a diverging bar per
//! candidate, the earlier token each resembles most, and the chosen one.

use egui::{Color32, Rect, RichText, Sense, Stroke, pos2, vec2};

use super::tokens::display_text;
use super::{ViewCtx, empty_state};
use crate::gui::search::{contrastive, position_texts};

const CONFIDENCE: Color32 = Color32::from_rgb(69, 117, 180);
const PENALTY: Color32 = Color32::from_rgb(230, 85, 13);
const CHOSEN: Color32 = Color32::from_rgb(26, 152, 80);
const BAR_W: f32 = 160.0;

#[derive(Default)]
pub struct ContrastivePanel;

impl ContrastivePanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((_, run)) = ctx.selected() else {
            empty_state(
                ui,
                "No run selected",
                "Open the contrastive example (File > Open example) or start a contrastive run.",
            );
            return;
        };
        let Some(step) = run.trace.steps.get(ctx.cursor.step).and_then(contrastive) else {
            empty_state(
                ui,
                "No contrastive step here",
                &if run.trace.header.method == "contrastive" {
                    "This step scored no candidates; move the cursor to another step.".to_owned()
                } else {
                    format!(
                        "This run used “{}”. Pick contrastive as the method and press Run, or open the \
                         contrastive example (File > Open example).",
                        run.trace.header.method
                    )
                },
            );
            return;
        };
        let alpha = step.alpha;
        let texts = position_texts(&run.trace, ctx.cursor.step);
        ui.label(
            RichText::new(format!(
                "Step {}: {} candidates, score = (1 − α)·p − α·max similarity, α = {alpha}",
                ctx.cursor.step + 1,
                step.candidates.len()
            ))
            .strong(),
        );
        ui.horizontal_wrapped(|ui| {
            ui.label(RichText::new("■").monospace().color(CONFIDENCE));
            ui.label("(1 − α)·p, model confidence");
            ui.label(RichText::new("■").monospace().color(PENALTY));
            ui.label("α·max cosine similarity to an earlier token, the degeneration penalty");
            ui.label(RichText::new("|").color(CHOSEN).strong());
            ui.label("score");
        });
        if step.chosen != 0 {
            ui.label(
                RichText::new("The penalty overturned the model's first choice at this step.")
                    .color(CHOSEN),
            );
        }
        ui.separator();
        // Bars share one scale: the largest term of any candidate.
        let span = step
            .candidates
            .iter()
            .map(|c| ((1.0 - alpha) * c.prob).max(alpha * c.max_similarity.abs()))
            .fold(0.0f32, f32::max)
            .max(1e-6);
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                egui::Grid::new("contrastive_grid")
                    .striped(true)
                    .num_columns(8)
                    .spacing([12.0, 5.0])
                    .show(ui, |ui| {
                        for h in [
                            "token",
                            "penalty | confidence",
                            "p",
                            "(1 − α)·p",
                            "max sim.",
                            "α·max sim.",
                            "score",
                            "most similar earlier token",
                        ] {
                            ui.strong(h);
                        }
                        ui.end_row();
                        for (i, c) in step.candidates.iter().enumerate() {
                            let chosen = i == step.chosen;
                            let mark = |s: String| {
                                if chosen {
                                    RichText::new(s).strong().color(CHOSEN)
                                } else {
                                    RichText::new(s)
                                }
                            };
                            ui.label(mark(format!("'{}'", display_text(&c.token))).monospace());
                            bars(
                                ui,
                                (1.0 - alpha) * c.prob / span,
                                alpha * c.max_similarity / span,
                                c.score / span,
                            );
                            ui.label(mark(format!("{:.3}", c.prob)));
                            ui.label(mark(format!("{:.3}", (1.0 - alpha) * c.prob)));
                            ui.label(mark(format!("{:.3}", c.max_similarity)));
                            ui.label(mark(format!("{:.3}", alpha * c.max_similarity)));
                            ui.label(mark(format!(
                                "{:.3}{}",
                                c.score,
                                if chosen { " chosen" } else { "" }
                            )));
                            let similar = texts
                                .get(c.most_similar_position)
                                .map_or_else(String::new, |t| display_text(t));
                            ui.label(
                                RichText::new(format!(
                                    "'{similar}' at {}",
                                    c.most_similar_position
                                ))
                                .monospace(),
                            );
                            ui.end_row();
                        }
                    });
            });
    }
}

/// A diverging bar: confidence to the right of the zero line, penalty to the left, the score as a tick.
fn bars(ui: &mut egui::Ui, confidence: f32, penalty: f32, score: f32) {
    let (rect, _) = ui.allocate_exact_size(vec2(BAR_W, 16.0), Sense::hover());
    let painter = ui.painter_at(rect);
    let zero = rect.center().x;
    let half = BAR_W / 2.0 - 2.0;
    let x = |v: f32| zero + v.clamp(-1.0, 1.0) * half;
    painter.rect_filled(
        Rect::from_min_max(
            pos2(zero, rect.top() + 2.0),
            pos2(x(confidence), rect.bottom() - 2.0),
        ),
        1.0,
        CONFIDENCE,
    );
    painter.rect_filled(
        Rect::from_min_max(
            pos2(x(-penalty), rect.top() + 2.0),
            pos2(zero, rect.bottom() - 2.0),
        ),
        1.0,
        PENALTY,
    );
    painter.line_segment(
        [pos2(zero, rect.top()), pos2(zero, rect.bottom())],
        Stroke::new(1.0, ui.visuals().weak_text_color()),
    );
    painter.line_segment(
        [pos2(x(score), rect.top()), pos2(x(score), rect.bottom())],
        Stroke::new(3.0, CHOSEN),
    );
}
