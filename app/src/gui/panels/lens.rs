//! The logit lens up to the cursor: for each position (columns, the newest on the right, the cursor's token
//! last) and each depth (rows, the output at the top, the embeddings at the bottom), the token the model would
//! predict if it stopped there and its probability, as a heat map. Cells whose top token is the one that
//! actually came next are outlined.

use egui::{FontId, Rect, RichText, Sense, Stroke, StrokeKind, pos2, vec2};

use super::beam_tree::clip;
use super::colouring::{heat, heat_legend};
use super::tokens::{display_text, percent};
use super::{ViewCtx, empty_state};
use crate::gui::search::{has_lens, inspections_at, position_texts};

const CELL_W: f32 = 66.0;
const CELL_H: f32 = 17.0;
const LABEL_W: f32 = 64.0;

#[derive(Default)]
pub struct LensPanel;

impl LensPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((_, run)) = ctx.selected() else {
            empty_state(
                ui,
                "No run selected",
                "Open the lens example (File > Open example > lens-attention), or tick “Record logit lens” in the \
                 prompt panel and press Run.",
            );
            return;
        };
        if !has_lens(&run.trace) {
            empty_state(
                ui,
                "This run did not record the logit lens",
                "Tick “Record logit lens” in the prompt panel and press Run (it costs about one more forward per \
                 step), or open the lens example (File > Open example > lens-attention).",
            );
            return;
        }
        let at = ctx.cursor.step;
        let inspections = inspections_at(&run.trace, at);
        let texts = position_texts(&run.trace, at);
        let columns: Vec<_> = inspections
            .values()
            .filter(|i| !i.lens.is_empty())
            .collect();
        let fit = ((ui.available_width() - LABEL_W - 12.0) / CELL_W)
            .floor()
            .max(3.0) as usize;
        let shown = &columns[columns.len().saturating_sub(fit)..];
        let Some(last) = shown.last() else {
            empty_state(
                ui,
                "Nothing recorded up to the cursor",
                "Move the cursor forward.",
            );
            return;
        };
        let depths = last.lens.len();
        ui.label(
            RichText::new(format!(
                "Step {}: what each layer would predict at the last {} positions (the cursor's token is the rightmost \
                 column)",
                at + 1,
                shown.len()
            ))
            .strong(),
        );
        ui.horizontal(|ui| {
            heat_legend(ui, "probability 0", "1");
            ui.label("· outlined: already the token that came next · hover a cell");
        });
        ui.separator();
        egui::ScrollArea::both().auto_shrink([false, false]).show(ui, |ui| {
            let size = vec2(LABEL_W + shown.len() as f32 * CELL_W + 8.0, (depths as f32 + 2.0) * CELL_H + 8.0);
            let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
            let painter = ui.painter_at(rect);
            let text_colour = ui.visuals().text_color();
            let weak = ui.visuals().weak_text_color();
            let top = rect.top() + CELL_H * 1.5;
            for (c, inspection) in shown.iter().enumerate() {
                let x = rect.left() + LABEL_W + c as f32 * CELL_W;
                let next = texts.get(inspection.position).map_or_else(String::new, |t| display_text(t));
                painter.text(
                    pos2(x + CELL_W / 2.0, rect.top() + 2.0),
                    egui::Align2::CENTER_TOP,
                    clip(&format!("→'{next}'"), 9),
                    FontId::monospace(11.0),
                    text_colour,
                );
                // Depth d is drawn at row depths - 1 - d: the output on top.
                for (d, cell) in inspection.lens.iter().enumerate() {
                    let y = top + (depths - 1 - d) as f32 * CELL_H;
                    let r = Rect::from_min_size(pos2(x, y), vec2(CELL_W, CELL_H));
                    let (bg, fg) = heat(cell.prob);
                    painter.rect_filled(r.shrink(0.5), 1.0, bg);
                    // The top token is the one that came next exactly when it is as likely as that one.
                    let hit = cell.actual_prob >= cell.prob;
                    if hit {
                        painter.rect_stroke(r.shrink(1.0), 1.0, Stroke::new(1.5, fg), StrokeKind::Inside);
                    }
                    painter.text(
                        r.center(),
                        egui::Align2::CENTER_CENTER,
                        clip(&display_text(&cell.token), 8),
                        FontId::monospace(10.5),
                        fg,
                    );
                    let response = ui.interact(r, ui.scope_id().with(("lens", inspection.position, d)), Sense::hover());
                    response.on_hover_text(format!(
                        "{} at position {}: top token '{}' with {}; the token that came next ('{next}') has {} here.",
                        depth_name(d, depths),
                        inspection.position,
                        display_text(&cell.token),
                        percent(cell.prob),
                        percent(cell.actual_prob)
                    ));
                }
            }
            for d in 0..depths {
                if d % 5 == 0 || d + 1 == depths {
                    let y = top + (depths - 1 - d) as f32 * CELL_H + CELL_H / 2.0;
                    painter.text(
                        pos2(rect.left() + LABEL_W - 6.0, y),
                        egui::Align2::RIGHT_CENTER,
                        short_depth(d, depths),
                        FontId::proportional(10.5),
                        weak,
                    );
                }
            }
        });
    }
}

fn depth_name(d: usize, depths: usize) -> String {
    if d == 0 {
        "The embeddings".to_owned()
    } else if d + 1 == depths {
        format!("Layer {} (the model's output)", d - 1)
    } else {
        format!("After layer {}", d - 1)
    }
}

fn short_depth(d: usize, depths: usize) -> String {
    if d == 0 {
        "embed".to_owned()
    } else if d + 1 == depths {
        "output".to_owned()
    } else {
        format!("layer {}", d - 1)
    }
}
