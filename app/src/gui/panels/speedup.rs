//! Did speculative decoding pay? For the selected speculative run: the measured wall-clock speedup against plain
//! decoding of the same prompt and settings, the speedup the measured acceptance and cost ratio predict, and the
//! same prediction charged the verification's real cost, as running values per step; then a table that says
//! what each number is, at the cursor.

use egui::{Color32, RichText};
use egui_plot::{HLine, Line, Plot, PlotPoints, Points, VLine};

use super::{ViewCtx, empty_state, readable_axes};
use crate::gui::command::Command;
use crate::gui::cursor::CursorMove;
use crate::gui::spec::is_speculative;
use crate::gui::speedup::{SpeedupPoint, find_baseline, speedup_series, wall_clock_speedup};

pub const MEASURED: Color32 = Color32::from_rgb(26, 152, 80);
pub const PREDICTED: Color32 = Color32::from_rgb(117, 112, 179);
pub const ADJUSTED: Color32 = Color32::from_rgb(217, 95, 2);
pub const BREAK_EVEN: Color32 = Color32::from_rgb(140, 140, 140);
const CURSOR: Color32 = Color32::from_rgb(230, 50, 50);

#[derive(Default)]
pub struct SpeedupPanel;

/// A figure with `decimals` decimals, or a dash when it is unknown.
pub fn figure(value: Option<f64>, decimals: usize) -> String {
    value.map_or("–".to_owned(), |v| format!("{v:.decimals$}"))
}

impl SpeedupPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((key, run)) = ctx.selected() else {
            empty_state(
                ui,
                "Nothing to measure",
                "Open a speculative trace or start a speculative run to see whether drafting made decoding \
                 faster.",
            );
            return;
        };
        if !is_speculative(&run.trace) {
            empty_state(
                ui,
                "No drafts in this run",
                &format!(
                    "This run used “{}”, which drafts nothing, so there is no speedup to show. Select a \
                     speculative run, pick “speculative” as the method and press Run, or sweep draft lengths in \
                     the Draft sweep panel.",
                    run.trace.header.method
                ),
            );
            return;
        }
        if run.trace.steps.is_empty() {
            empty_state(ui, "No steps yet", "The curves appear as the run decodes.");
            return;
        }
        let baseline = find_baseline(ctx.store, &run.trace);
        let series = speedup_series(
            &run.trace.steps,
            baseline.map(|(_, b)| b.trace.steps.as_slice()),
        );
        let at = ctx.cursor.step.min(series.len() - 1);
        let height = (ui.available_height() * 0.38).clamp(150.0, 300.0);
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                match baseline {
                    Some((_, b)) => ui.label(format!(
                        "Measured against “{}”: plain decoding of the same prompt with the same settings.",
                        b.label()
                    )),
                    None => ui.label(
                        RichText::new(
                            "No plain run of this prompt with these settings is open, so the speedup cannot be \
                             measured, only predicted. Run the same prompt and settings with method greedy \
                             (or sample, when sampling), or press “Sweep” in the Draft sweep panel, which runs \
                             one first.",
                        )
                        .color(ui.visuals().warn_fg_color),
                    ),
                };
                ui.add_space(4.0);
                ui.label(RichText::new("Speedup after each step (running values; 1 = as fast as plain decoding)").strong());
                let present = |value: fn(&SpeedupPoint) -> Option<f64>| series.iter().any(|p| value(p).is_some());
                legend_ui(
                    ui,
                    &[
                        (MEASURED, "measured", present(|p| p.measured)),
                        (PREDICTED, "predicted", present(|p| p.predicted)),
                        (ADJUSTED, "predicted, verify cost included", present(|p| p.adjusted)),
                    ],
                );
                plot_ui(ui, ctx, key, &series, at, height);
                ui.add_space(6.0);
                ui.heading(format!("At step {} of {}", at + 1, series.len()));
                let wall = baseline.and_then(|(_, b)| wall_clock_speedup(&run.trace, &b.trace));
                let draft_len = run.trace.header.params.speculative.draft_len;
                let plain_source = if baseline.is_some() {
                    "a step of the plain run"
                } else {
                    "this run's rounds that drafted nothing"
                };
                explain_table(ui, key, &series[at], draft_len, plain_source, wall);
            });
    }
}

fn plot_ui(
    ui: &mut egui::Ui,
    ctx: &ViewCtx<'_>,
    key: u64,
    series: &[SpeedupPoint],
    at: usize,
    height: f32,
) {
    let curve = |value: fn(&SpeedupPoint) -> Option<f64>| -> Vec<[f64; 2]> {
        series
            .iter()
            .enumerate()
            .filter_map(|(i, p)| value(p).map(|v| [(i + 1) as f64, v]))
            .collect()
    };
    let measured = curve(|p| p.measured);
    let predicted = curve(|p| p.predicted);
    let adjusted = curve(|p| p.adjusted);
    let cursor_x = (at + 1) as f64;
    let response = readable_axes(Plot::new(("speedup", key)), "step", "speedup")
        .height(height)
        .allow_drag(false)
        .allow_scroll(false)
        .include_y(0.0)
        .include_y(1.2)
        .show(ui, |p| {
            p.hline(
                HLine::new("1 = no speedup", 1.0)
                    .color(BREAK_EVEN)
                    .width(1.0),
            );
            for (name, points, color) in [
                ("measured", measured, MEASURED),
                ("predicted", predicted, PREDICTED),
                ("predicted, verify cost included", adjusted, ADJUSTED),
            ] {
                if points.is_empty() {
                    continue;
                }
                let here = points.iter().find(|q| q[0] == cursor_x).copied();
                p.line(
                    Line::new(name, PlotPoints::from(points))
                        .color(color)
                        .width(2.0),
                );
                if let Some(q) = here {
                    p.points(Points::new(name, q).radius(4.0).color(color));
                }
            }
            p.vline(VLine::new("cursor", cursor_x).color(CURSOR).width(1.5));
        });
    if response.response.clicked()
        && let Some(pos) = response.response.interact_pointer_pos()
    {
        let x = response.transform.value_from_position(pos).x.round();
        let step = (x.max(1.0) as usize).saturating_sub(1);
        ctx.send(Command::MoveCursor(CursorMove::To(step)));
    }
}

/// Coloured names of the curves shown (the plots' own legend would cover them), and the break-even line.
pub fn legend_ui(ui: &mut egui::Ui, curves: &[(Color32, &str, bool)]) {
    ui.horizontal_wrapped(|ui| {
        for (color, name, shown) in curves {
            if *shown {
                ui.label(RichText::new("■").monospace().color(*color));
                ui.label(*name);
            }
        }
        ui.label(RichText::new("—").color(BREAK_EVEN));
        ui.label("1 = no speedup");
    });
}

/// Each number with its value and what it means, in plain words.
fn explain_table(
    ui: &mut egui::Ui,
    key: u64,
    p: &SpeedupPoint,
    draft_len: usize,
    plain_source: &str,
    wall: Option<f64>,
) {
    let mut rows: Vec<(&str, String, String)> = vec![
        (
            "Measured speedup",
            figure(p.measured, 2),
            "Plain decoding's time for as many tokens divided by this run's time, both without the step that \
             reads the prompt. Above 1 is faster than plain decoding."
                .to_owned(),
        ),
        (
            "Predicted speedup",
            figure(p.predicted, 2),
            "(1 − α^(k+1)) / ((1 − α)(c·k + 1)): expected tokens per round over the round's cost, assuming that \
             checking k + 1 tokens in one forward costs the same as one plain step."
                .to_owned(),
        ),
        (
            "Prediction with verify cost",
            figure(p.adjusted, 2),
            "The predicted speedup divided by v: the model's answer once verification is charged what it \
             really costs on this machine."
                .to_owned(),
        ),
        (
            "Mean accepted tokens (MAT)",
            figure(p.mat, 2),
            "Tokens committed per forward pass of the target model so far; plain decoding commits 1.".to_owned(),
        ),
        (
            "α (alpha)",
            figure(p.alpha, 3),
            "The chance that the target accepts a drafted token, averaged over every position it checked."
                .to_owned(),
        ),
        (
            "k",
            figure(p.k, 2),
            format!("Tokens drafted per round, on average (draft length asked: {draft_len})."),
        ),
        (
            "c",
            figure(p.c, 3),
            "Time to draft one token divided by the time of one verification forward.".to_owned(),
        ),
        (
            "Expected tokens per round",
            figure(p.expected_tokens, 2),
            "(1 − α^(k+1)) / (1 − α): what a round commits if each draft is accepted with chance α, \
             independently. Compare it with MAT."
                .to_owned(),
        ),
        (
            "Verify cost v",
            figure(p.verify_cost, 2),
            match p.plain_step_ms {
                Some(ms) => format!(
                    "A verification forward (k + 1 tokens) takes v times a plain one-token step ({ms:.1} ms, \
                     from {plain_source})."
                ),
                None => "How much more a verification forward costs than a plain one-token step; unknown until \
                         a plain run of the same settings is open (or a round drafted nothing)."
                    .to_owned(),
            },
        ),
    ];
    if let Some(w) = wall {
        rows.insert(
            3,
            (
            "Whole-run wall-clock speedup",
            format!("{w:.2}"),
            "The plain run's wall time divided by this run's, prompt included: what “specula run --json” \
             reports as speedup."
                .to_owned(),
        ),
        );
    }
    egui::Grid::new(("speedup_table", key))
        .striped(true)
        .num_columns(3)
        .spacing([12.0, 6.0])
        .show(ui, |ui| {
            ui.strong("Number");
            ui.strong("Value");
            ui.strong("What it means");
            ui.end_row();
            for (name, value, meaning) in rows {
                ui.strong(name);
                ui.monospace(value);
                ui.add(egui::Label::new(meaning).wrap());
                ui.end_row();
            }
        });
}
