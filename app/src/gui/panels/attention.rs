//! Attention at the cursor: where the position that predicted the cursor's token looked, for any layer and any
//! head (or the max or mean over heads). A layers × keys heat map shows every layer at once (click a row to pick
//! the layer); a strip over the whole sequence (prompt, then output) and a list show the picked layer. Any other
//! recorded position (every prompt position, every earlier token) can be picked instead of the cursor's token.
//! The trace keeps the largest weights of each row only, so the view costs the same on 2,000 tokens as on 20.

use std::collections::BTreeMap;

use egui::{Color32, FontId, Rect, RichText, Sense, Stroke, StrokeKind, pos2, vec2};
use specula_core::trace::{AttentionMap, Inspection, SparseRow};

use super::beam_tree::clip;
use super::colouring::{heat, heat_legend};
use super::tokens::{display_text, percent, quoted};
use super::{ViewCtx, empty_state};
use crate::gui::search::{has_attention, inspections_at, position_texts};

const CELL_W: f32 = 44.0;
const CELL_H: f32 = 14.0;
const LABEL_W: f32 = 60.0;
/// Key columns of the heat map: the keys with the largest weights over all layers.
const MAX_KEYS: usize = 40;
const PROMPT: Color32 = Color32::from_rgb(150, 150, 150);
const OUTPUT: Color32 = Color32::from_rgb(69, 117, 180);

/// Which row of a layer to show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeadMode {
    #[default]
    Max,
    Mean,
    Head(usize),
}

impl HeadMode {
    fn name(self) -> String {
        match self {
            HeadMode::Max => "max over heads".to_owned(),
            HeadMode::Mean => "mean over heads".to_owned(),
            HeadMode::Head(h) => format!("head {h}"),
        }
    }

    /// This mode's row of the layer at `layer_index` of `map`: a map holds the heads, then max, then mean.
    fn row(self, map: &AttentionMap, layer_index: usize) -> Option<SparseRow> {
        let n = map.heads();
        match self {
            HeadMode::Max => map.row(layer_index, n),
            HeadMode::Mean => map.row(layer_index, n + 1),
            HeadMode::Head(h) if h < n => map.row(layer_index, h),
            HeadMode::Head(_) => None,
        }
    }
}

#[derive(Default)]
pub struct AttentionPanel {
    pub layer: Option<usize>,
    pub head: HeadMode,
    /// A position picked in the panel (the token it predicts) and the step it was picked at: moving the cursor
    /// goes back to the cursor's token, as every other panel follows the cursor.
    pub picked: Option<(usize, usize)>,
}

impl AttentionPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((_, run)) = ctx.selected() else {
            empty_state(
                ui,
                "No run selected",
                "Open the attention example (File > Open example > lens-attention), or tick “Record attention” in \
                 the prompt panel and press Run.",
            );
            return;
        };
        if !has_attention(&run.trace) {
            empty_state(
                ui,
                "This run did not record attention",
                "Tick “Record attention” in the prompt panel and press Run (it costs about one more forward per \
                 step), or open the attention example (File > Open example > lens-attention).",
            );
            return;
        }
        let at = ctx.cursor.step;
        let Some(step) = run.trace.steps.get(at) else {
            empty_state(
                ui,
                "No steps yet",
                "The attention appears as the run decodes.",
            );
            return;
        };
        let cursor_position = ctx
            .focused_token()
            .map(|t| t.token.position)
            .or_else(|| step.inspection.last().map(|i| i.position));
        let recorded: BTreeMap<usize, &Inspection> = inspections_at(&run.trace, at)
            .into_iter()
            .filter(|(_, i)| i.attention_map.is_some())
            .collect();
        let picked = self
            .picked
            .filter(|&(s, p)| s == at && recorded.contains_key(&p))
            .map(|(_, p)| p);
        let inspection = picked
            .or(cursor_position)
            .and_then(|p| recorded.get(&p).copied());
        let Some((inspection, map)) =
            inspection.and_then(|i| i.attention_map.as_ref().map(|m| (i, m)))
        else {
            empty_state(
                ui,
                &format!("Step {} recorded no attention", at + 1),
                "Move the cursor to another step.",
            );
            return;
        };
        let layers = map.layers().len();
        let n_heads = map.heads();
        let layer_index = self
            .layer
            .unwrap_or(layers.saturating_sub(1))
            .min(layers.saturating_sub(1));
        let texts = position_texts(&run.trace, at);
        let prompt_len = run.trace.header.prompt.token_ids.len();
        // Quoted, not `display_text`: the proportional font has no glyph for its newline mark.
        let text_at = |p: usize| texts.get(p).map_or_else(String::new, |t| quoted(t));
        let query = inspection.position - 1;
        ui.label(
            RichText::new(if inspection.position < prompt_len {
                format!(
                    "Step {}: the attention of prompt position {query} ({}), followed by {}",
                    at + 1,
                    text_at(query),
                    text_at(inspection.position)
                )
            } else {
                format!(
                    "Step {}: the attention of position {query} while it predicted {} (position {})",
                    at + 1,
                    text_at(inspection.position),
                    inspection.position
                )
            })
            .strong(),
        );
        ui.horizontal_wrapped(|ui| {
            let current = inspection.position;
            let earlier = recorded.range(..current).next_back().map(|(&p, _)| p);
            let later = recorded.range(current + 1..).next().map(|(&p, _)| p);
            let mut pick = None;
            ui.label("Query position");
            if ui
                .add_enabled(earlier.is_some(), egui::Button::new("Earlier").small())
                .on_hover_text("The position before")
                .clicked()
            {
                pick = earlier;
            }
            let (first, last) = (
                recorded.keys().next().map_or(1, |p| p - 1),
                recorded.keys().next_back().map_or(1, |p| p - 1),
            );
            let mut shown = query;
            if ui
                .add(egui::DragValue::new(&mut shown).range(first..=last))
                .on_hover_text("Any recorded position: the prompt's, or an earlier token's")
                .changed()
            {
                pick = Some(shown + 1);
            }
            if ui
                .add_enabled(later.is_some(), egui::Button::new("Later").small())
                .on_hover_text("The position after")
                .clicked()
            {
                pick = later;
            }
            if picked.is_some() && ui.button("The cursor's token").clicked() {
                self.picked = None;
                ui.ctx().request_repaint();
            }
            if let Some(p) = pick.filter(|p| recorded.contains_key(p)) {
                self.picked = Some((at, p));
                ui.ctx().request_repaint();
            }
        });
        ui.horizontal_wrapped(|ui| {
            let layer_name = |l: usize| {
                map.layers()
                    .get(l)
                    .map_or_else(|| format!("{l}"), |layer| format!("layer {layer}"))
            };
            egui::ComboBox::from_label("Layer")
                .selected_text(layer_name(layer_index))
                .show_ui(ui, |ui| {
                    for l in 0..layers {
                        if ui
                            .selectable_label(l == layer_index, layer_name(l))
                            .clicked()
                        {
                            self.layer = Some(l);
                        }
                    }
                });
            let mut modes = vec![HeadMode::Max, HeadMode::Mean];
            modes.extend((0..n_heads).map(HeadMode::Head));
            egui::ComboBox::from_label("Heads")
                .selected_text(self.head.name())
                .show_ui(ui, |ui| {
                    for m in modes {
                        if ui.selectable_label(m == self.head, m.name()).clicked() {
                            self.head = m;
                        }
                    }
                });
            heat_legend(ui, "weight 0", "1");
        });
        ui.separator();
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                self.heat_map_ui(ui, map, &texts, layer_index);
                ui.add_space(6.0);
                let Some(row) = self.head.row(map, layer_index) else {
                    ui.label("This head is not recorded at this layer.");
                    return;
                };
                ui.label(
                    RichText::new(format!(
                        "Layer {}, {}: the {} largest weights{}",
                        map.layers().get(layer_index).copied().unwrap_or_default(),
                        self.head.name(),
                        row.keys.len(),
                        // The max over heads is no distribution: its weights sum to more than 1.
                        if self.head == HeadMode::Max {
                            " (each key's strongest head)".to_owned()
                        } else {
                            format!(" hold {} of the row", percent(row.covered))
                        }
                    ))
                    .strong(),
                );
                strip_ui(ui, &row, inspection.position, prompt_len, &texts);
                ui.horizontal_wrapped(|ui| {
                    ui.label(RichText::new("■").monospace().color(PROMPT));
                    ui.label("prompt");
                    ui.label(RichText::new("■").monospace().color(OUTPUT));
                    ui.label("generated");
                });
                egui::Grid::new("attention_keys")
                    .striped(true)
                    .num_columns(3)
                    .spacing([14.0, 3.0])
                    .show(ui, |ui| {
                        ui.strong("position");
                        ui.strong("token");
                        ui.strong("weight");
                        ui.end_row();
                        for (&k, &w) in row.keys.iter().zip(&row.weights) {
                            let k = k as usize;
                            ui.label(format!(
                                "{k}{}",
                                if k < prompt_len { " (prompt)" } else { "" }
                            ));
                            ui.label(
                                RichText::new(format!(
                                    "'{}'",
                                    texts.get(k).map_or_else(String::new, |t| display_text(t))
                                ))
                                .monospace(),
                            );
                            ui.label(percent(w));
                            ui.end_row();
                        }
                    });
            });
    }

    /// Layers (rows) × the most attended keys (columns) for the chosen head mode.
    fn heat_map_ui(
        &mut self,
        ui: &mut egui::Ui,
        map: &AttentionMap,
        texts: &[String],
        picked: usize,
    ) {
        let rows: Vec<Option<BTreeMap<u32, f32>>> = (0..map.layers().len())
            .map(|l| {
                self.head.row(map, l).map(|r| {
                    r.keys
                        .iter()
                        .copied()
                        .zip(r.weights.iter().copied())
                        .collect()
                })
            })
            .collect();
        let mut best: BTreeMap<u32, f32> = BTreeMap::new();
        for row in rows.iter().flatten() {
            for (&k, &w) in row {
                let e = best.entry(k).or_default();
                *e = e.max(w);
            }
        }
        let mut keys: Vec<(u32, f32)> = best.into_iter().collect();
        keys.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        keys.truncate(MAX_KEYS);
        let mut keys: Vec<u32> = keys.into_iter().map(|k| k.0).collect();
        keys.sort_unstable();
        ui.label(
            RichText::new(
                "Every layer at once (rows; click one to pick it) over the most attended positions",
            )
            .weak(),
        );
        egui::ScrollArea::horizontal()
            .id_salt("attention_heat")
            .show(ui, |ui| {
                let size = vec2(
                    LABEL_W + keys.len() as f32 * CELL_W + 8.0,
                    (rows.len() as f32 + 1.5) * CELL_H + 4.0,
                );
                let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
                let painter = ui.painter_at(rect);
                let top = rect.top() + CELL_H * 1.5;
                let text_colour = ui.visuals().text_color();
                for (c, &k) in keys.iter().enumerate() {
                    let x = rect.left() + LABEL_W + c as f32 * CELL_W;
                    painter.text(
                        pos2(x + CELL_W / 2.0, rect.top() + 1.0),
                        egui::Align2::CENTER_TOP,
                        clip(
                            &display_text(texts.get(k as usize).map_or("", |s| s.as_str())),
                            6,
                        ),
                        FontId::monospace(10.0),
                        text_colour,
                    );
                }
                for (r, row) in rows.iter().enumerate() {
                    let y = top + r as f32 * CELL_H;
                    let label_rect =
                        Rect::from_min_size(pos2(rect.left(), y), vec2(LABEL_W - 4.0, CELL_H));
                    let layer = map.layers().get(r).copied().unwrap_or_default();
                    painter.text(
                        label_rect.right_center(),
                        egui::Align2::RIGHT_CENTER,
                        format!("layer {layer}"),
                        FontId::proportional(10.0),
                        if r == picked {
                            ui.visuals().strong_text_color()
                        } else {
                            ui.visuals().weak_text_color()
                        },
                    );
                    let row_rect = Rect::from_min_size(pos2(rect.left(), y), vec2(size.x, CELL_H));
                    let response = ui.interact(
                        row_rect,
                        ui.scope_id().with(("attention_row", r)),
                        Sense::click(),
                    );
                    if response.clicked() {
                        self.layer = Some(r);
                    }
                    for (c, k) in keys.iter().enumerate() {
                        let cell = Rect::from_min_size(
                            pos2(rect.left() + LABEL_W + c as f32 * CELL_W, y),
                            vec2(CELL_W, CELL_H),
                        );
                        match row.as_ref().and_then(|m| m.get(k)) {
                            Some(&w) => {
                                painter.rect_filled(cell.shrink(0.5), 0.0, heat(w).0);
                            }
                            // Not among the row's largest weights: small, drawn as an empty cell.
                            None => {
                                painter.rect_stroke(
                                    cell.shrink(0.5),
                                    0.0,
                                    Stroke::new(
                                        0.5,
                                        ui.visuals().weak_text_color().gamma_multiply(0.4),
                                    ),
                                    StrokeKind::Inside,
                                );
                            }
                        }
                    }
                    if r == picked {
                        painter.rect_stroke(
                            row_rect,
                            0.0,
                            Stroke::new(1.5, ui.visuals().strong_text_color()),
                            StrokeKind::Inside,
                        );
                    }
                }
            });
    }
}

/// The whole sequence as a strip, one bar per kept key at its position, as tall as its weight.
fn strip_ui(ui: &mut egui::Ui, row: &SparseRow, query: usize, prompt_len: usize, texts: &[String]) {
    let (rect, _) =
        ui.allocate_exact_size(vec2(ui.available_width().max(200.0), 56.0), Sense::hover());
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
    let len = query.max(1) as f32;
    let x = |p: usize| rect.left() + 4.0 + (rect.width() - 8.0) * p as f32 / len;
    // The prompt's extent as a band along the bottom.
    painter.rect_filled(
        Rect::from_min_max(
            pos2(x(0), rect.bottom() - 4.0),
            pos2(x(prompt_len.min(query)), rect.bottom()),
        ),
        0.0,
        PROMPT,
    );
    painter.rect_filled(
        Rect::from_min_max(
            pos2(x(prompt_len.min(query)), rect.bottom() - 4.0),
            pos2(x(query), rect.bottom()),
        ),
        0.0,
        OUTPUT,
    );
    let max_w = row.weights.iter().copied().fold(0.0f32, f32::max).max(1e-6);
    for (i, (&k, &w)) in row.keys.iter().zip(&row.weights).enumerate() {
        let k = k as usize;
        let h = (rect.height() - 20.0) * w / max_w;
        let colour = if k < prompt_len { PROMPT } else { OUTPUT };
        let bx = x(k);
        painter.rect_filled(
            Rect::from_min_max(
                pos2(bx - 1.5, rect.bottom() - 6.0 - h),
                pos2(bx + 1.5, rect.bottom() - 6.0),
            ),
            0.0,
            colour,
        );
        if i < 3 {
            painter.text(
                pos2(bx, rect.bottom() - 8.0 - h),
                egui::Align2::CENTER_BOTTOM,
                clip(&display_text(texts.get(k).map_or("", |s| s.as_str())), 10),
                FontId::monospace(10.0),
                ui.visuals().text_color(),
            );
        }
    }
    painter.text(
        pos2(rect.right() - 4.0, rect.top() + 2.0),
        egui::Align2::RIGHT_TOP,
        format!("positions 0–{}", query.saturating_sub(1)),
        FontId::proportional(10.0),
        ui.visuals().weak_text_color(),
    );
}
