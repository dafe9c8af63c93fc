//! Per-step curves of the selected run: entropy, chosen-token probability, tokens per step, time per step. A
//! vertical line marks the cursor; clicking a plot moves the cursor there.

use egui::Color32;
use egui_plot::{HLine, Line, Plot, PlotPoints, Points, VLine};
use specula_core::trace::{EntropyAdaptiveStep, StepRecord};

use crate::gui::search::entropy_adaptive;

const FULL_MODEL: Color32 = Color32::from_rgb(215, 48, 39);
const SKIPPED_MODEL: Color32 = Color32::from_rgb(26, 152, 80);
const THRESHOLD: Color32 = Color32::from_rgb(230, 171, 2);

use super::{ViewCtx, empty_state, readable_axes};
use crate::gui::command::Command;
use crate::gui::cursor::CursorMove;

#[derive(Default)]
pub struct PlotsPanel;

/// One curve: title, unit, colour, and the value of a step (None leaves a gap).
struct Series {
    title: &'static str,
    color: Color32,
    value: fn(&StepRecord) -> Option<f64>,
}

const SERIES: &[Series] = &[
    Series {
        title: "Entropy of the model's distribution (nats)",
        color: Color32::from_rgb(117, 112, 179),
        value: |s| s.tokens.first().map(|t| f64::from(t.entropy)),
    },
    Series {
        title: "Probability of the chosen token",
        color: Color32::from_rgb(69, 117, 180),
        value: |s| s.tokens.first().map(|t| f64::from(t.prob())),
    },
    Series {
        title: "Tokens committed per step",
        color: Color32::from_rgb(26, 152, 80),
        value: |s| Some(s.tokens.len() as f64),
    },
    Series {
        title: "Time per step (ms; step 1, which reads the prompt, is left out)",
        color: Color32::from_rgb(217, 95, 2),
        // The prefill step takes ten to a hundred times a decode step and would flatten the curve.
        value: |s| {
            if s.index == 0 {
                None
            } else {
                s.timing.map(|t| t.total_ms)
            }
        },
    },
];

impl PlotsPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((key, run)) = ctx.selected() else {
            empty_state(
                ui,
                "Nothing to plot",
                "Open a trace or start a run to see its curves here.",
            );
            return;
        };
        let steps = &run.trace.steps;
        if steps.is_empty() {
            empty_state(ui, "No steps yet", "The curves appear as the run decodes.");
            return;
        }
        let cursor_x = (ctx.cursor.step + 1) as f64;
        let link = egui::Id::unique(("plots_link", key));
        let height = ((ui.available_height() - 4.0 * 28.0) / 4.0).max(80.0);
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                let adaptive: Vec<(usize, &EntropyAdaptiveStep)> = steps
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| entropy_adaptive(s).map(|e| (i, e)))
                    .collect();
                for (n, series) in SERIES.iter().enumerate() {
                    ui.label(egui::RichText::new(series.title).strong());
                    let adaptive_here = n == 0 && !adaptive.is_empty();
                    if adaptive_here {
                        adaptive_legend(ui, &adaptive);
                    }
                    let points: Vec<[f64; 2]> = steps
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| (series.value)(s).map(|v| [(i + 1) as f64, v]))
                        .collect();
                    if points.is_empty() {
                        ui.label(egui::RichText::new("Not recorded in this trace.").weak());
                        continue;
                    }
                    let at_cursor = points.iter().find(|p| p[0] == cursor_x).copied();
                    let plot = readable_axes(Plot::new(("plot", series.title)), "step", "");
                    let response = plot
                        .height(if adaptive_here { height * 2.0 } else { height })
                        .link_axis(link, [true, false])
                        .link_cursor(link, [true, false])
                        .allow_drag(false)
                        .allow_scroll(false)
                        .include_y(0.0)
                        .show(ui, |plot_ui| {
                            plot_ui.line(
                                Line::new(series.title, PlotPoints::from(points))
                                    .color(series.color),
                            );
                            plot_ui.vline(
                                VLine::new("cursor", cursor_x)
                                    .color(Color32::from_rgb(230, 50, 50))
                                    .width(1.5),
                            );
                            if adaptive_here {
                                adaptive_overlay(plot_ui, &adaptive);
                            }
                            if let Some(p) = at_cursor {
                                plot_ui.points(
                                    Points::new("at cursor", p).radius(4.0).color(series.color),
                                );
                            }
                        });
                    if response.response.clicked()
                        && let Some(pos) = response.response.interact_pointer_pos()
                    {
                        let x = response.transform.value_from_position(pos).x.round();
                        let step = (x.max(1.0) as usize).saturating_sub(1);
                        ctx.send(Command::MoveCursor(CursorMove::To(step)));
                    }
                }
            });
    }
}

/// Entropy-adaptive decoding: what the extra marks on the entropy plot mean, and the share of full-model tokens.
fn adaptive_legend(ui: &mut egui::Ui, steps: &[(usize, &EntropyAdaptiveStep)]) {
    let full = steps.iter().filter(|(_, e)| e.full_model).count();
    let switches = steps.iter().filter(|(_, e)| e.switched).count();
    let tau = steps.first().map_or(0.0, |(_, e)| e.threshold);
    ui.horizontal_wrapped(|ui| {
        ui.label(egui::RichText::new("— τ").color(THRESHOLD).strong());
        ui.label(format!("threshold {tau} nats ·"));
        ui.label(egui::RichText::new("●").monospace().color(FULL_MODEL));
        ui.label("full model");
        ui.label(egui::RichText::new("●").monospace().color(SKIPPED_MODEL));
        ui.label("layer-skipped model");
        ui.label("· dashed: rolling mean that decided · vertical lines: switches ·");
        ui.label(format!(
            "full model for {full} of {} tokens ({:.0}%), {switches} switch{}",
            steps.len(),
            full as f64 * 100.0 / steps.len().max(1) as f64,
            if switches == 1 { "" } else { "es" }
        ));
    });
}

fn adaptive_overlay(plot_ui: &mut egui_plot::PlotUi<'_>, steps: &[(usize, &EntropyAdaptiveStep)]) {
    if let Some((_, first)) = steps.first() {
        plot_ui.hline(
            HLine::new("τ", f64::from(first.threshold))
                .color(THRESHOLD)
                .width(1.5),
        );
    }
    let rolling: Vec<[f64; 2]> = steps
        .iter()
        .filter_map(|(i, e)| e.rolling_entropy.map(|r| [(i + 1) as f64, f64::from(r)]))
        .collect();
    plot_ui.line(
        Line::new("rolling mean entropy", PlotPoints::from(rolling))
            .color(THRESHOLD)
            .style(egui_plot::LineStyle::dashed_dense()),
    );
    for (i, e) in steps {
        if e.switched {
            let colour = if e.full_model {
                FULL_MODEL
            } else {
                SKIPPED_MODEL
            };
            plot_ui.vline(
                VLine::new("switch", (i + 1) as f64 - 0.5)
                    .color(colour)
                    .width(1.0),
            );
        }
    }
    plot_ui.points(
        Points::new(
            "full model",
            steps
                .iter()
                .filter(|(_, e)| e.full_model)
                .map(|(i, _)| [(i + 1) as f64, 0.0])
                .collect::<Vec<_>>(),
        )
        .color(FULL_MODEL)
        .radius(2.5),
    );
    plot_ui.points(
        Points::new(
            "layer-skipped model",
            steps
                .iter()
                .filter(|(_, e)| !e.full_model)
                .map(|(i, _)| [(i + 1) as f64, 0.0])
                .collect::<Vec<_>>(),
        )
        .color(SKIPPED_MODEL)
        .radius(2.5),
    );
}
