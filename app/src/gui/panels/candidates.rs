//! The candidates at the cursor: the model's top tokens as bars, plain probability beside the probability after
//! warping (temperature, top-k, top-p...), the chosen token marked.

use egui::Align2;
use egui::{Color32, RichText};
use egui_plot::{Bar, BarChart, Plot, PlotPoint, Text};

use super::tokens::{candidates_grid, percent, source_name, warped_percent};
use super::{ViewCtx, empty_state};

/// Bars shown; the table below lists all candidates the trace kept.
const BARS: usize = 12;
const PLAIN: Color32 = Color32::from_rgb(69, 117, 180);
const WARPED: Color32 = Color32::from_rgb(252, 141, 89);
const CHOSEN: Color32 = Color32::from_rgb(26, 152, 80);

#[derive(Default)]
pub struct CandidatesPanel;

impl CandidatesPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some(t) = ctx.focused_token() else {
            empty_state(
                ui,
                "No token at the cursor",
                "Open a trace or start a run; then move the cursor or click a token.",
            );
            return;
        };
        let token = t.token;
        ui.label(
            RichText::new(format!(
                "Token {} (step {}): {} — {}, p = {}, rank {}",
                t.output_index + 1,
                t.step + 1,
                super::tokens::quoted(&token.token),
                source_name(token.source),
                percent(token.prob()),
                token.rank
            ))
            .strong(),
        );
        let warped = token.top_logprobs.iter().any(|c| c.warped_prob.is_some());
        ui.label(match token.warped_kept {
            _ if token.source == specula_core::trace::TokenSource::Forced => format!(
                "Forced by a fork: this candidate (rank {}) replaced the model's choice; the run went on from it.",
                token.rank
            ),
            Some(kept) => format!(
                "Warping kept {kept} token{} of the vocabulary; every other token had warped probability 0.",
                if kept == 1 { "" } else { "s" }
            ),
            None => "Greedy run: no warping; the chosen token is the most likely one.".to_owned(),
        });
        let shown: Vec<_> = token.top_logprobs.iter().take(BARS).collect();
        // Horizontal bars, most likely at the top, each row labelled with its token: names stay readable however
        // long they are, which vertical bars with axis ticks are not.
        let row_y = |i: usize| -(i as f64);
        let (width, offset) = if warped { (0.38, 0.2) } else { (0.7, 0.0) };
        let plain_bars: Vec<Bar> = shown
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let fill = if c.id == token.id { CHOSEN } else { PLAIN };
                Bar::new(row_y(i) + offset, f64::from(c.logprob.exp()))
                    .width(width)
                    .fill(fill)
                    .horizontal()
            })
            .collect();
        let warped_bars: Vec<Bar> = shown
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.warped_prob.map(|w| (i, w)))
            .map(|(i, w)| {
                Bar::new(row_y(i) - offset, f64::from(w))
                    .width(width)
                    .fill(WARPED)
                    .horizontal()
            })
            .collect();
        let labels: Vec<(f64, f64, String)> = shown
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let p = c.logprob.exp();
                let longest = f64::from(p.max(c.warped_prob.unwrap_or(0.0)));
                let mut text = format!("{} {}", super::tokens::quoted(&c.token), percent(p));
                if let Some(w) = c.warped_prob {
                    text += &format!(" → {}", warped_percent(w));
                }
                (longest, row_y(i), text)
            })
            .collect();
        let plot_height = (ui.available_height() * 0.6).max(200.0);
        let x_max = x_range_fitting_labels(ui, &labels);
        probability_bars_plot(
            ("candidates_plot", t.index),
            plot_height,
            x_max,
            shown.len(),
        )
        .show(ui, |plot_ui| {
            plot_ui.bar_chart(BarChart::new("model probability", plain_bars).color(PLAIN));
            if warped {
                plot_ui.bar_chart(BarChart::new("after warping", warped_bars).color(WARPED));
            }
            for (x, y, text) in labels {
                let label = RichText::new(text).monospace();
                plot_ui.text(
                    Text::new("token", PlotPoint::new(x + 0.01, y), label)
                        .anchor(Align2::LEFT_CENTER),
                );
            }
        });
        ui.horizontal_wrapped(|ui| {
            ui.label(RichText::new("■").monospace().color(CHOSEN));
            ui.label("chosen token");
            ui.label(RichText::new("■").monospace().color(PLAIN));
            ui.label("model probability");
            if warped {
                ui.label(RichText::new("■").monospace().color(WARPED));
                ui.label("probability after warping, which the token was drawn from");
            }
        });
        ui.separator();
        // No scroll area of its own: the pane scrolls, and a nested one would end below a short pane's edge.
        candidates_grid(ui, token, ("panel", t.index));
    }
}

/// A still chart of horizontal probability bars, one row per token, best at the top: the frame shared by the
/// candidates panel and the verifier's distribution in the draft tree.
pub fn probability_bars_plot(
    id: impl egui::AsIdSalt,
    height: f32,
    x_max: f64,
    rows: usize,
) -> Plot<'static> {
    Plot::new(id)
        .height(height)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .allow_boxed_zoom(false)
        .show_axes([true, false])
        .show_grid([true, false])
        .include_x(0.0)
        .include_x(x_max)
        .include_y(0.6)
        // Row i sits at y = -i.
        .include_y(-(rows.saturating_sub(1) as f64) - 0.6)
        .x_axis_label("probability")
}

/// The probability axis must reach far enough right that every bar's label fits after its bar. A label of `n`
/// monospace characters takes about `0.6 n` font sizes; with the plot `w` points wide and the axis ending at
/// `x_max`, a bar ending at `x` leaves `(1 - x / x_max) w` points, so `x_max >= x / (1 - label / w)`.
pub fn x_range_fitting_labels(ui: &egui::Ui, labels: &[(f64, f64, String)]) -> f64 {
    let font = egui::TextStyle::Monospace.resolve(ui.style()).size;
    let width = f64::from(ui.available_width() - 40.0).max(100.0);
    labels
        .iter()
        .map(|(x, _, text)| {
            let label = (text.chars().count() as f64 * 0.6 * f64::from(font) + 12.0) / width;
            (x + 0.01) / (1.0 - label.min(0.8))
        })
        .fold(1.0, f64::max)
}
