//! OPERA's over-trust map at the cursor: the best hypothesis' newest tokens' last-layer attention (max over
//! heads) over the output tokens in the window, as a lower-triangular heat map (row = the attending token,
//! column = the token attended to), the winning "summary" column outlined, each candidate's penalty, and the
//! rollback this step made, if any.

use egui::{Color32, FontId, Rect, RichText, Sense, Stroke, StrokeKind, pos2, vec2};
use specula_core::trace::OverTrustMap;

use super::beam_tree::clip;
use super::colouring::{heat, heat_legend};
use super::timeline::ROLLBACK;
use super::tokens::display_text;
use super::{ViewCtx, empty_state};
use crate::gui::search::beams;
use crate::gui::store::output_at;

/// The over-trust map's least height (points); a shorter pane scrolls instead.
const MIN_MAP_H: f32 = 200.0;
const WINNER: Color32 = Color32::from_rgb(255, 64, 64);
const LABEL_W: f32 = 96.0;

#[derive(Default)]
pub struct OperaPanel;

impl OperaPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        ui.label(
            RichText::new(
                "Text-only adaptation: the paper's image-attention term is left out (this model reads no image); \
                 the window covers the generated tokens only.",
            )
            .weak()
            .italics(),
        );
        let Some((_, run)) = ctx.selected() else {
            empty_state(
                ui,
                "No run selected",
                "Open the OPERA example (File > Open example > opera) or start an opera run.",
            );
            return;
        };
        let found = run
            .trace
            .steps
            .iter()
            .enumerate()
            .take(ctx.cursor.step + 1)
            .rev()
            .find_map(|(i, s)| beams(s).and_then(|b| b.over_trust.as_ref().map(|m| (i, m))));
        let Some((at, map)) = found else {
            empty_state(
                ui,
                "No over-trust map",
                &if run.trace.header.method == "opera" {
                    "No step up to the cursor has scored a token yet; move the cursor forward."
                        .to_owned()
                } else {
                    format!(
                        "This run used “{}”. Pick opera as the method and press Run, or open the opera example \
                         (File > Open example).",
                        run.trace.header.method
                    )
                },
            );
            return;
        };
        let search = &run.trace.header.params.search;
        let alpha = search.alpha;
        // The output after the step follows the best hypothesis, so its tokens label the rows.
        let output = output_at(&run.trace, at);
        // A retrospection step cut the hypothesis the map belongs to: its later tokens are in the output before.
        let before = at
            .checked_sub(1)
            .map(|b| output_at(&run.trace, b))
            .unwrap_or_default();
        // The map's newest row is the hypothesis' newest token: its parent's best-scoring candidate.
        let newest = map.start + map.rows.len().saturating_sub(1);
        let text = |pos: usize| match output.get(pos).or_else(|| before.get(pos)) {
            Some(t) if pos != newest || output.len() > newest => display_text(&t.token.token),
            _ if pos == newest => map
                .candidates
                .first()
                .map_or_else(|| format!("#{pos}"), |c| display_text(&c.token)),
            _ => format!("#{pos}"),
        };
        let winner = map.start + map.winner;
        let rollbacks = run
            .trace
            .steps
            .iter()
            .take(ctx.cursor.step + 1)
            .filter(|s| s.rollback.is_some())
            .count();
        ui.label(
            RichText::new(format!(
                "Step {}{}: the summary column is output token {} '{}' (score 10^{}); α = {alpha}, roll back after \
                 {} wins{}.",
                at + 1,
                if at == ctx.cursor.step {
                    String::new()
                } else {
                    format!(" (the latest map up to step {})", ctx.cursor.step + 1)
                },
                winner + 1,
                text(winner),
                map.log10_scores
                    .get(map.winner)
                    .copied()
                    .flatten()
                    .map_or("-∞".to_owned(), |s| format!("{s:.1}")),
                search.retrospect,
                if search.retrospect == 0 {
                    " (never: retrospection is off)"
                } else {
                    ""
                }
            ))
            .strong(),
        );
        ui.horizontal_wrapped(|ui| {
            ui.label(format!("Rollbacks up to the cursor: {rollbacks}."));
            if let Some(r) = run
                .trace
                .steps
                .get(ctx.cursor.step)
                .and_then(|s| s.rollback.as_ref())
            {
                ui.label(
                    RichText::new(format!(
                        "This step rolled back {} token(s): {}",
                        r.removed, r.reason
                    ))
                    .color(ROLLBACK),
                );
            }
        });
        ui.horizontal(|ui| {
            heat_legend(ui, "attention 0", "1 (row-normalised in the window)");
            ui.label(RichText::new("▯").monospace().color(WINNER).strong());
            ui.label("summary column");
        });
        ui.separator();
        let note = |ui: &mut egui::Ui| {
            ui.label(
                RichText::new(
                    "Rows: the attending token; columns: the token attended to (numbers: output positions). \
                     Hover a cell for its weight.",
                )
                .weak(),
            );
        };
        // The pane scrolls, so in a short pane the map keeps a readable height rather than shrinking to nothing.
        let area = egui::vec2(
            ui.available_width(),
            ui.available_height().max(MIN_MAP_H + 40.0),
        );
        if area.x >= 640.0 {
            // Side by side: the map gets the whole height, which a long window needs.
            ui.horizontal_top(|ui| {
                let map_w = area.x * 0.48;
                ui.allocate_ui(egui::vec2(map_w, area.y), |ui| {
                    ui.vertical(|ui| {
                        egui::ScrollArea::both()
                            .id_salt("opera_map")
                            .max_height(area.y - 40.0)
                            .auto_shrink([false, true])
                            .show(ui, |ui| map_ui(ui, map, &text, area.y - 40.0));
                        note(ui);
                    });
                });
                ui.separator();
                ui.vertical(|ui| candidates_ui(ui, map, alpha));
            });
        } else {
            let map_h = (area.y * 0.6).max(MIN_MAP_H);
            egui::ScrollArea::both()
                .id_salt("opera_map")
                .max_height(map_h)
                .auto_shrink([false, true])
                .show(ui, |ui| map_ui(ui, map, &text, map_h));
            note(ui);
            ui.separator();
            candidates_ui(ui, map, alpha);
        }
    }
}

fn map_ui(ui: &mut egui::Ui, map: &OverTrustMap, text: &dyn Fn(usize) -> String, height: f32) {
    let n = map.rows.len().max(1);
    let cell = ((ui.available_width() - LABEL_W - 8.0) / n as f32)
        .min((height - 40.0) / n as f32)
        .clamp(14.0, 30.0);
    let size = vec2(LABEL_W + n as f32 * cell + 8.0, n as f32 * cell + 24.0);
    let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
    let painter = ui.painter_at(rect);
    let origin = pos2(rect.left() + LABEL_W, rect.top() + 18.0);
    let weak = ui.visuals().weak_text_color();
    let strong = ui.visuals().text_color();
    for j in 0..n {
        if cell >= 16.0 || j == map.winner {
            painter.text(
                pos2(origin.x + (j as f32 + 0.5) * cell, rect.top() + 2.0),
                egui::Align2::CENTER_TOP,
                format!("{}", map.start + j + 1),
                FontId::proportional(10.0),
                if j == map.winner { WINNER } else { weak },
            );
        }
    }
    for (i, row) in map.rows.iter().enumerate() {
        let y = origin.y + i as f32 * cell;
        painter.text(
            pos2(origin.x - 6.0, y + cell / 2.0),
            egui::Align2::RIGHT_CENTER,
            clip(
                &format!("{} '{}'", map.start + i + 1, text(map.start + i)),
                13,
            ),
            FontId::monospace(11.0),
            strong,
        );
        for (j, &v) in row.iter().enumerate() {
            let r = Rect::from_min_size(pos2(origin.x + j as f32 * cell, y), vec2(cell, cell));
            let (bg, fg) = heat(v);
            painter.rect_filled(r.shrink(0.5), 1.0, bg);
            if cell >= 26.0 {
                painter.text(
                    r.center(),
                    egui::Align2::CENTER_CENTER,
                    format!("{:.0}", v * 100.0),
                    FontId::proportional(9.5),
                    fg,
                );
            }
            let response = ui.interact(r, ui.scope_id().with(("ot", i, j)), Sense::hover());
            response.on_hover_text(format!(
                "Token {} '{}' gives {:.1}% of its window attention to token {} '{}'.\nColumn score: {}",
                map.start + i + 1,
                text(map.start + i),
                v * 100.0,
                map.start + j + 1,
                text(map.start + j),
                map.log10_scores
                    .get(j)
                    .copied()
                    .flatten()
                    .map_or("0 (a zero weight below it)".to_owned(), |s| format!("10^{s:.1}"))
            ));
        }
    }
    // The winning column, from its diagonal cell down.
    let w = map.winner.min(n - 1);
    let column = Rect::from_min_max(
        pos2(origin.x + w as f32 * cell, origin.y + w as f32 * cell),
        pos2(origin.x + (w + 1) as f32 * cell, origin.y + n as f32 * cell),
    );
    painter.rect_stroke(column, 1.0, Stroke::new(2.5, WINNER), StrokeKind::Outside);
}

fn candidates_ui(ui: &mut egui::Ui, map: &OverTrustMap, alpha: f32) {
    ui.label(RichText::new("Candidates of the best hypothesis").strong());
    ui.label("score = log p (of the hypothesis) − α·over-trust penalty");
    // The candidates are sorted by score, so the first is the newest token of the hypothesis in the map.
    let chosen = map.candidates.first().map(|c| c.token_id);
    // No scroll area of its own: the pane scrolls, and a nested one would end below a short pane's edge.
    egui::Grid::new("opera_candidates_grid")
        .striped(true)
        .num_columns(5)
        .spacing([14.0, 4.0])
        .show(ui, |ui| {
            ui.strong("token");
            ui.strong("log p");
            ui.strong("penalty");
            ui.strong("α·penalty");
            ui.strong("score");
            ui.end_row();
            for c in &map.candidates {
                let mark = |s: String| {
                    if Some(c.token_id) == chosen {
                        RichText::new(s).strong().underline()
                    } else {
                        RichText::new(s)
                    }
                };
                ui.label(mark(format!("'{}'", display_text(&c.token))).monospace());
                ui.label(mark(format!("{:.3}", c.logprob)));
                ui.label(mark(format!("{:.3e}", c.penalty)));
                ui.label(mark(format!("{:.3}", alpha * c.penalty)));
                ui.label(mark(format!("{:.3}", c.score)));
                ui.end_row();
            }
        });
    if chosen.is_some() {
        ui.label(
            RichText::new("Underlined: the best score, the token the hypothesis in the map took.")
                .weak(),
        );
    }
}
