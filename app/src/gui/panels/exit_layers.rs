//! Beside the draft tree of an early-exit step: DEL's estimate for every candidate exit (how often a draft from
//! there would be accepted, read from the shadow tokens of earlier verified roots), the draft length that pays best
//! from each, and which exit the drafter took.

use egui::{Color32, RichText};
use egui_plot::{Bar, BarChart, Plot};
use specula_core::trace::ExitLayers;

use super::colouring::DRAFT_ACCEPTED;
use super::tokens::percent;

const OTHER_EXIT: Color32 = Color32::from_rgb(110, 130, 160);
const PLOT_HEIGHT: f32 = 130.0;
/// About what the table's five columns take.
const TABLE_WIDTH: f32 = 400.0;

/// `drafted`: the nodes the step drafted (none when no draft length paid for its cost).
pub fn exit_layers_ui(ui: &mut egui::Ui, exits: &ExitLayers, drafted: usize, step_index: usize) {
    ui.label(RichText::new("Exit layers").heading());
    let how = if exits.dynamic {
        "the exit with the most expected tokens per unit of cost"
    } else {
        "the exit the skipped layers fix"
    };
    let layer = exits.chosen.saturating_sub(1);
    let what = if drafted == 0 {
        format!(
            "No draft this step: at the best exit (after layer {layer}) no draft paid for its cost."
        )
    } else {
        format!("Drafted from the exit after layer {layer} ({how}).")
    };
    ui.add(
        egui::Label::new(format!(
            "{what} Bars: how often a draft from each exit would be accepted, from shadow tokens."
        ))
        .wrap(),
    )
    .on_hover_text(
        "A shadow token is the LM head applied to a layer's state of a verified root: what a draft from that \
         exit would have proposed there. One exit is observed at each step, in turn; newer roots weigh more. \
         Tokens per cost: expected tokens per round over the round's cost in plain steps (drafting through the \
         exit, plus --draft-cost per drafted token if set), at the exit's best draft length; plain decoding is 1.",
    );
    // Side by side when there is room: the plot is a glance, the table the figures.
    if ui.available_width() >= 600.0 {
        let plot_width = (ui.available_width() - TABLE_WIDTH).clamp(160.0, 420.0);
        ui.horizontal_top(|ui| {
            ui.allocate_ui(egui::vec2(plot_width, PLOT_HEIGHT), |ui| {
                acceptance_plot(ui, exits, step_index);
            });
            ui.vertical(|ui| exit_table(ui, exits, step_index));
        });
    } else {
        acceptance_plot(ui, exits, step_index);
        exit_table(ui, exits, step_index);
    }
}

fn acceptance_plot(ui: &mut egui::Ui, exits: &ExitLayers, step_index: usize) {
    // Candidate exits are evenly spaced: bars as wide as most of the gap.
    let gap = match exits.exits.as_slice() {
        [a, b, ..] => b.layers.saturating_sub(a.layers).max(1) as f64,
        _ => 1.0,
    };
    let bars: Vec<Bar> = exits
        .exits
        .iter()
        .map(|e| {
            Bar::new(e.layers as f64, f64::from(e.acceptance))
                .width(0.8 * gap)
                .fill(if e.layers == exits.chosen {
                    DRAFT_ACCEPTED
                } else {
                    OTHER_EXIT
                })
                .name(format!("exit after layer {}", e.layers.saturating_sub(1)))
        })
        .collect();
    Plot::new(("exit_layer_acceptance", step_index))
        .height(PLOT_HEIGHT)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .allow_boxed_zoom(false)
        .include_y(0.0)
        .include_y(1.0)
        .x_axis_label("layers before the exit")
        .y_axis_label("acceptance")
        .show(ui, |plot| {
            plot.bar_chart(BarChart::new("estimated acceptance", bars))
        });
}

fn exit_table(ui: &mut egui::Ui, exits: &ExitLayers, step_index: usize) {
    egui::Grid::new(("exit_layer_table", step_index))
        .striped(true)
        .num_columns(5)
        .spacing([12.0, 2.0])
        .show(ui, |ui| {
            for title in [
                "exit after",
                "acceptance",
                "last shadow",
                "best length",
                "tokens / cost",
            ] {
                ui.strong(title);
            }
            ui.end_row();
            for e in &exits.exits {
                let chosen = e.layers == exits.chosen;
                let cell = |text: String| {
                    let text = RichText::new(text).monospace();
                    if chosen {
                        text.color(DRAFT_ACCEPTED).strong()
                    } else {
                        text
                    }
                };
                ui.label(cell(format!(
                    "layer {}{}",
                    e.layers.saturating_sub(1),
                    if chosen { " ◀" } else { "" }
                )));
                ui.label(cell(percent(e.acceptance)));
                ui.label(cell(e.shadow.map_or("–".to_owned(), shadow_text)));
                ui.label(cell(e.best_len.to_string()));
                ui.label(cell(format!("{:.2}", e.tokens_per_cost)));
                ui.end_row();
            }
        });
}

/// A greedy shadow token is 0 or 1 (the exit's top token was the target's or not); sampling gives sum min(p, q).
fn shadow_text(shadow: f32) -> String {
    if shadow == 0.0 || shadow == 1.0 {
        format!("{:.0}%", shadow * 100.0)
    } else {
        percent(shadow)
    }
}
