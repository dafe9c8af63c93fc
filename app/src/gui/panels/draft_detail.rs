//! Beside the draft tree: why the clicked node was kept or rejected, in one sentence, and the distribution the
//! verifier drew its own token from (the residual after a rejection, the target's p for a bonus) as bars.

use egui::{Align2, Color32, RichText};
use egui_plot::{Bar, BarChart, PlotPoint, Text};
use specula_core::trace::{SpeculativeStep, StepRecord};

use super::candidates::{probability_bars_plot, x_range_fitting_labels};
use super::colouring::{BONUS, CORRECTED};
use super::tokens::percent;
use crate::gui::spec::{TreePick, explain, quote, shows_distribution};

/// Bars shown of the verifier's distribution.
const BARS: usize = 10;
const OTHER: Color32 = Color32::from_rgb(150, 150, 150);

pub fn detail_ui(
    ui: &mut egui::Ui,
    step: &StepRecord,
    spec: &SpeculativeStep,
    pick: Option<TreePick>,
) {
    ui.label(RichText::new("Why?").heading());
    let Some(pick) = pick else {
        ui.label(
            "Click a draft to see why the verifier accepted or rejected it; click the corrected or bonus token \
             (the rounded box at the end of the accepted path) to see the distribution it was drawn from.",
        );
        return;
    };
    ui.add(egui::Label::new(explain(step, spec, pick)).wrap());
    let Some(rejection) = spec
        .rejection
        .as_ref()
        .filter(|_| shows_distribution(spec, pick))
    else {
        return;
    };
    ui.add_space(6.0);
    let color = if rejection.bonus { BONUS } else { CORRECTED };
    ui.label(
        RichText::new(if rejection.bonus {
            format!(
                "The target's distribution p at depth {}, which the bonus token was drawn from:",
                rejection.depth
            )
        } else if spec.verifier == "greedy" {
            format!(
                "The target's distribution at depth {}; the verifier took its most likely token:",
                rejection.depth
            )
        } else {
            format!(
                "The residual norm(max(0, p − q)) at depth {}, which the replacement was drawn from:",
                rejection.depth
            )
        })
        .strong(),
    );
    if rejection.distribution.is_empty() {
        ui.label(RichText::new("The trace did not record this distribution.").weak());
        return;
    }
    let shown: Vec<_> = rejection.distribution.iter().take(BARS).collect();
    let prob =
        |c: &specula_core::trace::Candidate| c.warped_prob.unwrap_or_else(|| c.logprob.exp());
    let row_y = |i: usize| -(i as f64);
    let bars: Vec<Bar> = shown
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let fill = if c.id == rejection.token_id {
                color
            } else {
                OTHER
            };
            Bar::new(row_y(i), f64::from(prob(c)))
                .width(0.7)
                .fill(fill)
                .horizontal()
        })
        .collect();
    let labels: Vec<(f64, f64, String)> = shown
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let drawn = if c.id == rejection.token_id {
                "  ← drawn"
            } else {
                ""
            };
            (
                f64::from(prob(c)),
                row_y(i),
                format!("{} {}{drawn}", quote(&c.token), percent(prob(c))),
            )
        })
        .collect();
    let x_max = x_range_fitting_labels(ui, &labels);
    let height = (shown.len() as f32 * 24.0 + 44.0).min(ui.available_height().max(160.0));
    probability_bars_plot(
        ("verifier_distribution", step.index),
        height,
        x_max,
        shown.len(),
    )
    .show(ui, |plot_ui| {
        plot_ui.bar_chart(BarChart::new("verifier distribution", bars).color(OTHER));
        for (x, y, text) in labels {
            plot_ui.text(
                Text::new(
                    "token",
                    PlotPoint::new(x + 0.01, y),
                    RichText::new(text).monospace(),
                )
                .anchor(Align2::LEFT_CENTER),
            );
        }
    });
    // The same numbers as a table: readable by screen readers and tests.
    egui::Grid::new(("verifier_distribution_table", step.index))
        .striped(true)
        .num_columns(2)
        .spacing([12.0, 2.0])
        .show(ui, |ui| {
            for c in &shown {
                let mut token = RichText::new(quote(&c.token)).monospace();
                if c.id == rejection.token_id {
                    token = token.strong().color(color);
                }
                ui.label(token);
                ui.label(percent(prob(c)));
                ui.end_row();
            }
        });
}
