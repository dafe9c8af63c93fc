//! Momentum decoding at the cursor: the text so far as a walk on a graph of tokens (nodes on a circle in order of
//! first appearance, edges the transitions taken, the edges of repeated n-grams, the circuits, in red), the
//! current node, the k candidate edges coloured by the resistance of the loop each would close, and the
//! candidates' scores p − α·R(L).

use std::collections::BTreeMap;

use egui::{Color32, FontId, RichText, Sense, Stroke, pos2, vec2};

use super::beam_tree::clip;
use super::tokens::display_text;
use super::{ViewCtx, empty_state};
use crate::gui::search::{TokenGraph, momentum};
use crate::gui::store::output_at;

const FREE: Color32 = Color32::from_rgb(26, 152, 80);
const RESISTED: Color32 = Color32::from_rgb(253, 174, 97);
const BARRED: Color32 = Color32::from_rgb(215, 48, 39);
const CIRCUIT: Color32 = Color32::from_rgb(215, 48, 39);
/// Nodes drawn: the graph of a long text is cut to its newest nodes.
const MAX_NODES: usize = 40;

#[derive(Default)]
pub struct MomentumPanel;

fn resistance_colour(r: Option<f32>) -> Color32 {
    match r {
        Some(r) if r <= 0.0 => FREE,
        Some(_) => RESISTED,
        None => BARRED,
    }
}

impl MomentumPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((_, run)) = ctx.selected() else {
            empty_state(
                ui,
                "No run selected",
                "Open the momentum example (File > Open example) or start a momentum run.",
            );
            return;
        };
        let at = ctx.cursor.step;
        let Some(step) = run.trace.steps.get(at).and_then(momentum) else {
            empty_state(
                ui,
                "No momentum step here",
                &if run.trace.header.method == "momentum" {
                    "This step scored no candidates; move the cursor to another step.".to_owned()
                } else {
                    format!(
                        "This run used “{}”. Pick momentum as the method and press Run, or open the momentum \
                         example (File > Open example).",
                        run.trace.header.method
                    )
                },
            );
            return;
        };
        // The text the candidates were scored against: the output before this step.
        let before = at
            .checked_sub(1)
            .map(|b| output_at(&run.trace, b))
            .unwrap_or_default();
        // Momentum decoding looks for loops in the whole text, prompt included.
        let prompt = &run.trace.header.prompt;
        let ids: Vec<u32> = prompt
            .token_ids
            .iter()
            .copied()
            .chain(before.iter().map(|t| t.token.id))
            .collect();
        let mut names: BTreeMap<u32, String> = prompt
            .token_ids
            .iter()
            .zip(&prompt.tokens)
            .map(|(&id, t)| (id, display_text(t)))
            .chain(
                before
                    .iter()
                    .map(|t| (t.token.id, display_text(&t.token.token))),
            )
            .collect();
        for c in &step.candidates {
            names.insert(c.id, display_text(&c.token));
        }
        let graph = TokenGraph::of(&ids);
        ui.label(
            RichText::new(format!(
                "Step {}: score = p − α·R(L), α = {}; L = length of the repeated n-gram a candidate would close \
                 (R = 0 up to 3, 5 at 4, ∞ beyond).",
                at + 1,
                step.alpha
            ))
            .strong(),
        );
        ui.horizontal_wrapped(|ui| {
            for (c, name) in [
                (FREE, "no resistance"),
                (RESISTED, "resisted (R = 5)"),
                (BARRED, "barred (R = ∞)"),
            ] {
                ui.label(RichText::new("- -").color(c).strong());
                ui.label(name);
            }
            ui.label(RichText::new("—").color(CIRCUIT).strong());
            ui.label("a repeated n-gram (circuit) of the text");
        });
        ui.separator();
        let graph_h = (ui.available_height() * 0.55).max(180.0);
        ui.horizontal_top(|ui| {
            let side = graph_h.min(ui.available_width() * 0.55);
            graph_ui(ui, &graph, &names, &ids, step, side);
            ui.vertical(|ui| {
                ui.label(RichText::new("Circuits: repeated n-grams of the text").strong());
                ui.label(RichText::new("(prompt included, as momentum decoding counts it)").weak());
                if graph.circuits.is_empty() {
                    ui.label(
                        RichText::new("None: no n-gram of 2 or more tokens repeats yet.").weak(),
                    );
                }
                egui::ScrollArea::vertical()
                    .id_salt("momentum_circuits")
                    .max_height(side - 24.0)
                    .show(ui, |ui| {
                        for c in graph.circuits.iter().take(20) {
                            let words: Vec<String> = c
                                .ids
                                .iter()
                                .map(|i| names.get(i).cloned().unwrap_or_else(|| format!("#{i}")))
                                .collect();
                            ui.label(
                                RichText::new(format!("×{}  {}", c.count, words.join(" · ")))
                                    .monospace()
                                    .color(CIRCUIT),
                            );
                        }
                    });
            });
        });
        ui.separator();
        // No scroll area of its own: the pane scrolls, and a nested one would end below a short pane's edge.
        egui::Grid::new("momentum_grid")
            .striped(true)
            .num_columns(5)
            .spacing([14.0, 4.0])
            .show(ui, |ui| {
                for h in ["token", "p", "loop length L", "R(L)", "score"] {
                    ui.strong(h);
                }
                ui.end_row();
                for (i, c) in step.candidates.iter().enumerate() {
                    let chosen = i == step.chosen;
                    let mark = |s: String| {
                        let t = RichText::new(s);
                        if chosen { t.strong().underline() } else { t }
                    };
                    ui.label(mark(format!("'{}'", display_text(&c.token))).monospace());
                    ui.label(mark(format!("{:.3}", c.prob)));
                    ui.label(mark(c.loop_len.to_string()));
                    ui.label(
                        mark(c.resistance.map_or("∞".to_owned(), |r| format!("{r}")))
                            .color(resistance_colour(c.resistance)),
                    );
                    ui.label(mark(match c.score {
                        Some(s) => format!("{s:.3}{}", if chosen { " chosen" } else { "" }),
                        None => "barred".to_owned(),
                    }));
                    ui.end_row();
                }
            });
    }
}

/// The token graph on a circle, cut to the newest `MAX_NODES` nodes.
fn graph_ui(
    ui: &mut egui::Ui,
    graph: &TokenGraph,
    names: &BTreeMap<u32, String>,
    ids: &[u32],
    step: &specula_core::trace::MomentumStep,
    side: f32,
) {
    let (rect, _) = ui.allocate_exact_size(vec2(side, side), Sense::hover());
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 4.0, ui.visuals().extreme_bg_color);
    let first = graph.nodes.len().saturating_sub(MAX_NODES);
    let shown = &graph.nodes[first..];
    if shown.is_empty() {
        painter.text(
            rect.center(),
            egui::Align2::CENTER_CENTER,
            "No text yet: the graph grows as tokens are generated.",
            FontId::proportional(12.0),
            ui.visuals().weak_text_color(),
        );
        return;
    }
    let centre = rect.center();
    let radius = side * 0.5 - 46.0;
    let pos = |node: usize| {
        let k = (node - first) as f32;
        let angle = std::f32::consts::TAU * k / shown.len() as f32 - std::f32::consts::FRAC_PI_2;
        centre + vec2(angle.cos(), angle.sin()) * radius.max(10.0)
    };
    let visible = |node: usize| node >= first;
    let edge_colour = ui.visuals().weak_text_color();
    for (&(a, b), &count) in &graph.edges {
        if !(visible(a) && visible(b)) || a == b {
            continue;
        }
        let circuit = graph.in_circuit(graph.nodes[a], graph.nodes[b]);
        let stroke = if circuit {
            Stroke::new(1.5 + count as f32 * 0.5, CIRCUIT)
        } else {
            Stroke::new(1.0, edge_colour.gamma_multiply(0.6))
        };
        painter.line_segment([pos(a), pos(b)], stroke);
    }
    // The candidate edges from the current node.
    let current = ids
        .last()
        .and_then(|&id| graph.node_of(id))
        .filter(|&n| visible(n));
    if let Some(cur) = current {
        for c in &step.candidates {
            if let Some(to) = graph.node_of(c.id).filter(|&n| visible(n)) {
                painter.add(egui::Shape::dashed_line(
                    &[pos(cur), pos(to)],
                    Stroke::new(2.0, resistance_colour(c.resistance)),
                    6.0,
                    4.0,
                ));
            }
        }
    }
    let font = FontId::monospace(11.0);
    for (k, &id) in shown.iter().enumerate() {
        let node = first + k;
        let p = pos(node);
        let is_current = current == Some(node);
        let is_candidate = step.candidates.iter().any(|c| c.id == id);
        let fill = if is_current {
            ui.visuals().strong_text_color()
        } else if is_candidate {
            ui.visuals().selection.bg_fill
        } else {
            ui.visuals().widgets.inactive.bg_fill
        };
        painter.circle_filled(p, if is_current { 6.0 } else { 4.0 }, fill);
        let outward = (p - centre).normalized();
        let anchor = if outward.x >= 0.0 {
            egui::Align2::LEFT_CENTER
        } else {
            egui::Align2::RIGHT_CENTER
        };
        painter.text(
            p + outward * 8.0,
            anchor,
            clip(names.get(&id).map_or("?", |s| s.as_str()), 10),
            font.clone(),
            if is_current {
                ui.visuals().strong_text_color()
            } else {
                ui.visuals().text_color()
            },
        );
    }
    if first > 0 {
        painter.text(
            pos2(rect.left() + 4.0, rect.bottom() - 4.0),
            egui::Align2::LEFT_BOTTOM,
            format!("the newest {MAX_NODES} of {} nodes", graph.nodes.len()),
            FontId::proportional(10.0),
            ui.visuals().weak_text_color(),
        );
    }
}
