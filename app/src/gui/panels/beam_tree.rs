//! The beam tree up to the cursor: one column per step, the live hypotheses of each step as boxes (their newest
//! token), an edge to the hypothesis each extends, the candidates that step pruned faded below, the hypothesis
//! the output follows outlined. Diverse beam search colours each group; hovering a box shows its scores and text.
//! The finished hypotheses are listed under the tree.

use egui::{Color32, FontId, Rect, RichText, Sense, Stroke, StrokeKind, pos2, vec2};
use specula_core::trace::BeamStep;

use super::colouring::group_colour;
use super::tokens::display_text;
use super::{ViewCtx, empty_state};
use crate::gui::search::beams;

const COL_W: f32 = 112.0;
const ROW_H: f32 = 30.0;
const BOX_H: f32 = 22.0;
const GAP: f32 = 20.0;
/// Pruned candidates drawn per step (the trace keeps a few per group).
const PRUNED_SHOWN: usize = 4;

#[derive(Default)]
pub struct BeamTreePanel;

impl BeamTreePanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((_, run)) = ctx.selected() else {
            empty_state(
                ui,
                "No run selected",
                "Open a beam-search trace (File > Open example > diverse-beam or opera) or start a beam, \
                 diverse-beam or opera run to see its hypotheses here.",
            );
            return;
        };
        let steps: Vec<(usize, &BeamStep)> = run
            .trace
            .steps
            .iter()
            .enumerate()
            .take(ctx.cursor.step + 1)
            .filter_map(|(i, s)| beams(s).map(|b| (i, b)))
            .collect();
        let Some(&(at, current)) = steps.last() else {
            empty_state(
                ui,
                "No beams",
                &format!(
                    "This run used “{}”, which keeps no hypotheses. Pick beam, diverse-beam or opera as the \
                     method and press Run, or open the diverse-beam or opera example (File > Open example).",
                    run.trace.header.method
                ),
            );
            return;
        };
        let groups = current.groups.max(1);
        ui.label(
            RichText::new(format!(
                "Step {}: {} live hypothes{}{}, {} finished{}.",
                at + 1,
                current.live.len(),
                if current.live.len() == 1 { "is" } else { "es" },
                if groups > 1 {
                    format!(" in {groups} groups")
                } else {
                    String::new()
                },
                current.finished.len(),
                if current.done {
                    "; the search is over"
                } else {
                    ""
                }
            ))
            .strong(),
        );
        ui.horizontal_wrapped(|ui| {
            if groups > 1 {
                for g in 0..groups {
                    ui.label(RichText::new("■").monospace().color(group_colour(g)));
                    ui.label(format!("group {}", g + 1));
                }
                if let Some(d) = current.distinct_2 {
                    ui.label(format!(
                        "· distinct bigrams between the groups' best: {:.0}%",
                        d * 100.0
                    ))
                    .on_hover_text(
                        "Distinct bigrams over all bigrams of each group's best hypothesis: 100% when the groups \
                         share none, 1/groups when they are identical",
                    );
                }
            }
            ui.label(RichText::new("▭").monospace().weak());
            ui.label(RichText::new("pruned (faded)").weak());
            ui.label("· outlined: the hypothesis the output follows · hover a box for its scores");
        });
        ui.separator();
        let height = (ui.available_height() * 0.62).max(160.0);
        egui::ScrollArea::both()
            .id_salt("beam_tree")
            .max_height(height)
            .auto_shrink([false, true])
            .stick_to_right(true)
            .show(ui, |ui| tree_ui(ui, &steps));
        ui.separator();
        finished_ui(ui, current);
    }
}

/// Paints the columns; rows are the live hypotheses, then the pruned candidates.
fn tree_ui(ui: &mut egui::Ui, steps: &[(usize, &BeamStep)]) {
    let live_rows = steps.iter().map(|(_, b)| b.live.len()).max().unwrap_or(1);
    let pruned_rows = steps
        .iter()
        .map(|(_, b)| b.pruned.len().min(PRUNED_SHOWN))
        .max()
        .unwrap_or(0);
    let size = vec2(
        steps.len() as f32 * (COL_W + GAP) + 8.0,
        (live_rows + pruned_rows) as f32 * ROW_H + 24.0,
    );
    let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
    let painter = ui.painter_at(rect);
    let font = FontId::monospace(12.5);
    let visuals = ui.visuals().clone();
    let faded = visuals.weak_text_color();
    let box_at = |col: usize, row: usize| {
        Rect::from_min_size(
            pos2(
                rect.left() + 4.0 + col as f32 * (COL_W + GAP),
                rect.top() + 20.0 + row as f32 * ROW_H,
            ),
            vec2(COL_W, BOX_H),
        )
    };
    for (col, (index, step)) in steps.iter().enumerate() {
        painter.text(
            pos2(box_at(col, 0).center().x, rect.top() + 2.0),
            egui::Align2::CENTER_TOP,
            format!("step {}", index + 1),
            FontId::proportional(11.0),
            faded,
        );
        // A parent index points into the previous step's live list, which is the previous column only when the
        // two steps follow each other (a rollback replaces the beams).
        let previous = col
            .checked_sub(1)
            .filter(|&c| steps[c].0 + 1 == *index)
            .map(|c| (c, steps[c].1.live.len()));
        let edge = |parent: Option<usize>, to: Rect, stroke: Stroke| {
            if let (Some(p), Some((c, n))) = (parent, previous)
                && p < n
            {
                let from = box_at(c, p).right_center();
                let to = to.left_center();
                let dx = vec2((to.x - from.x) * 0.5, 0.0);
                painter.add(egui::epaint::CubicBezierShape::from_points_stroke(
                    [from, from + dx, to - dx, to],
                    false,
                    Color32::TRANSPARENT,
                    stroke,
                ));
            }
        };
        for (row, h) in step.live.iter().enumerate() {
            let r = box_at(col, row);
            let colour = group_colour(h.group);
            edge(h.parent, r, Stroke::new(1.5, colour));
            painter.rect_filled(r, 4.0, colour);
            if step.best == Some(row) {
                painter.rect_stroke(
                    r.expand(2.0),
                    5.0,
                    Stroke::new(2.5, visuals.strong_text_color()),
                    StrokeKind::Outside,
                );
            }
            let token = if h.last_token.is_empty() {
                h.token_ids
                    .last()
                    .map_or_else(String::new, |i| format!("#{i}"))
            } else {
                display_text(&h.last_token)
            };
            painter.text(
                r.center(),
                egui::Align2::CENTER_CENTER,
                clip(&format!("'{token}' {:.2}", h.score), 15),
                font.clone(),
                Color32::WHITE,
            );
            let response = ui.interact(r, ui.scope_id().with(("beam", index, row)), Sense::click());
            let label = format!("step {} hypothesis {}: '{token}'", index + 1, row + 1);
            response
                .widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, true, label.clone()));
            response.on_hover_ui(|ui| {
                ui.label(
                    RichText::new(format!("Hypothesis {} of step {}", row + 1, index + 1)).strong(),
                );
                if step.groups > 1 {
                    ui.label(format!("Group {}", h.group + 1));
                }
                ui.label(format!(
                    "score {:.3} · log-probability {:.3} · {} tokens",
                    h.score,
                    h.logprob,
                    h.token_ids.len()
                ));
                ui.label(RichText::new(display_text(&h.text)).monospace());
            });
        }
        for (j, c) in step.pruned.iter().take(PRUNED_SHOWN).enumerate() {
            let r = box_at(col, live_rows + j);
            edge(c.parent, r, Stroke::new(1.0, faded.gamma_multiply(0.5)));
            painter.rect_stroke(r, 4.0, Stroke::new(1.0, faded), StrokeKind::Inside);
            painter.text(
                r.center(),
                egui::Align2::CENTER_CENTER,
                clip(&format!("'{}' {:.2}", display_text(&c.token), c.score), 15),
                font.clone(),
                faded,
            );
            let response = ui.interact(r, ui.scope_id().with(("pruned", index, j)), Sense::hover());
            response.on_hover_ui(|ui| {
                ui.label(
                    RichText::new(format!(
                        "Pruned at step {}: {}",
                        index + 1,
                        super::tokens::quoted(&c.token)
                    ))
                    .strong(),
                );
                ui.label(format!(
                    "score {:.3} · log-probability {:.3}{}",
                    c.score,
                    c.logprob,
                    if c.penalty != 0.0 {
                        format!(" · penalty {:.3}", c.penalty)
                    } else {
                        String::new()
                    }
                ));
                ui.label("It ranked below every kept hypothesis, so the search dropped it.");
            });
        }
    }
}

fn finished_ui(ui: &mut egui::Ui, step: &BeamStep) {
    ui.label(
        RichText::new("Finished hypotheses (ended by an end-of-text token), best first").strong(),
    );
    if step.finished.is_empty() {
        ui.label(RichText::new("None yet: no hypothesis has ended so far.").weak());
        return;
    }
    // No scroll area of its own: the pane scrolls, and a nested one would end below a short pane's edge.
    egui::Grid::new("beam_finished_grid")
        .striped(true)
        .num_columns(4)
        .spacing([12.0, 4.0])
        .show(ui, |ui| {
            ui.strong("score");
            ui.strong("log p");
            ui.strong("group");
            ui.strong("text");
            ui.end_row();
            for h in &step.finished {
                ui.label(format!("{:.3}", h.score));
                ui.label(format!("{:.3}", h.logprob));
                ui.label(RichText::new(format!("{}", h.group + 1)).color(group_colour(h.group)));
                ui.add(egui::Label::new(RichText::new(display_text(&h.text)).monospace()).wrap());
                ui.end_row();
            }
        });
}

/// At most `n` characters, with an ellipsis when cut.
pub fn clip(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(n - 1).collect();
        s.push('…');
        s
    }
}
