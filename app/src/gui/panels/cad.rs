//! Context-aware decoding at the cursor: the model's distribution with the context, without it, and the
//! contrasted one the token was chosen from, side by side on one scale, the chosen token marked in all three.

use egui::{Color32, Rect, RichText, Sense, pos2, vec2};
use specula_core::trace::Candidate;

use super::beam_tree::clip;
use super::tokens::{display_text, percent};
use super::{ViewCtx, empty_state};
use crate::gui::search::cad;

const WITH: Color32 = Color32::from_rgb(69, 117, 180);
const WITHOUT: Color32 = Color32::from_rgb(150, 150, 150);
const ADJUSTED: Color32 = Color32::from_rgb(117, 112, 179);
const CHOSEN: Color32 = Color32::from_rgb(26, 152, 80);
const ROWS: usize = 10;

#[derive(Default)]
pub struct CadPanel;

impl CadPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((_, run)) = ctx.selected() else {
            empty_state(
                ui,
                "No run selected",
                "Open the CAD example (File > Open example) or start a cad run.",
            );
            return;
        };
        let at = ctx.cursor.step;
        let Some(step) = run.trace.steps.get(at).and_then(cad) else {
            empty_state(
                ui,
                "No CAD step here",
                &if run.trace.header.method == "cad" {
                    "This step recorded no distributions; move the cursor to another step."
                        .to_owned()
                } else {
                    format!(
                        "This run used “{}”. Pick cad as the method, write a context in the prompt panel and press \
                         Run, or open the CAD example (File > Open example).",
                        run.trace.header.method
                    )
                },
            );
            return;
        };
        let chosen = run.trace.steps[at].tokens.first().map(|t| t.id);
        ui.label(
            RichText::new(format!(
                "Step {}: logits = (1 + α)·logits(context + prompt) − α·logits(prompt), α = {}",
                at + 1,
                step.alpha
            ))
            .strong(),
        );
        if let Some(context) = &run.trace.header.params.search.context {
            ui.label(RichText::new(format!("Context: {}", clip(context, 160))).italics());
        }
        let top = |c: &[Candidate]| c.first().map(|x| x.id);
        let moved = top(&step.with_context) != top(&step.adjusted);
        ui.label(if moved {
            RichText::new("Contrasting moved the top token away from the one the model prefers with the context.")
                .color(CHOSEN)
        } else {
            RichText::new("The contrasted distribution keeps the model's top token with the context.").weak()
        });
        ui.separator();
        let scale = [&step.with_context, &step.without_context, &step.adjusted]
            .iter()
            .flat_map(|d| d.iter().take(ROWS))
            .map(|c| c.logprob.exp())
            .fold(0.0f32, f32::max)
            .max(1e-6);
        let width = ((ui.available_width() - 24.0) / 3.0).max(150.0);
        egui::ScrollArea::both()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.horizontal_top(|ui| {
                    for (title, dist, colour) in [
                        ("With the context", &step.with_context, WITH),
                        ("Without the context", &step.without_context, WITHOUT),
                        ("Contrasted (chosen from)", &step.adjusted, ADJUSTED),
                    ] {
                        ui.allocate_ui(vec2(width, 0.0), |ui| {
                            ui.vertical(|ui| {
                                ui.label(RichText::new(title).strong().color(colour));
                                for c in dist.iter().take(ROWS) {
                                    row(ui, c, colour, scale, width, Some(c.id) == chosen);
                                }
                            });
                        });
                    }
                });
                ui.label(
                    RichText::new(
                        "Bars share one scale; green text: the token chosen at this step.",
                    )
                    .weak(),
                );
            });
    }
}

fn row(ui: &mut egui::Ui, c: &Candidate, colour: Color32, scale: f32, width: f32, chosen: bool) {
    let p = c.logprob.exp();
    let label = format!("'{}' {}", clip(&display_text(&c.token), 14), percent(p));
    let (rect, _) = ui.allocate_exact_size(vec2(width - 8.0, 20.0), Sense::hover());
    let painter = ui.painter_at(rect);
    let bar = Rect::from_min_size(
        rect.min,
        vec2((rect.width() * p / scale).max(1.0), rect.height() - 3.0),
    );
    painter.rect_filled(bar, 2.0, colour.gamma_multiply(0.55));
    let text = if chosen {
        CHOSEN
    } else {
        ui.visuals().text_color()
    };
    painter.text(
        pos2(rect.left() + 4.0, rect.center().y - 1.5),
        egui::Align2::LEFT_CENTER,
        label,
        egui::FontId::monospace(12.0),
        text,
    );
}
