//! Runs side by side: their tokens aligned by position (one row per position), the first position where they
//! part marked, the cursor's row highlighted, and their entropy curves overlaid.

use egui::{Color32, RichText, Sense};
use egui_plot::{Line, Plot, PlotPoints, VLine};
use specula_core::trace::TokenRecord;

use super::tokens::token_chip;
use super::{ViewCtx, empty_state, readable_axes};
use crate::gui::command::Command;
use crate::gui::store::{RunEntry, RunKey};

const RUN_COLORS: &[Color32] = &[
    Color32::from_rgb(69, 117, 180),
    Color32::from_rgb(217, 95, 2),
    Color32::from_rgb(26, 152, 80),
    Color32::from_rgb(117, 112, 179),
    Color32::from_rgb(231, 41, 138),
];

#[derive(Default)]
pub struct ComparePanel;

/// The first position where the runs' token ids differ (or one run ends before another).
pub fn first_divergence(runs: &[Vec<&TokenRecord>]) -> Option<usize> {
    let longest = runs.iter().map(Vec::len).max()?;
    (0..longest).find(|&i| {
        let first = runs[0].get(i).map(|t| t.id);
        runs.iter().any(|r| r.get(i).map(|t| t.id) != first)
    })
}

impl ComparePanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        if ctx.store.len() < 2 {
            empty_state(
                ui,
                "Compare needs two runs",
                "Open a trace file with several runs, start another run, or fork from a token (click a token in the \
                 stream, then “Fork with …”).",
            );
            return;
        }
        self.pick_runs_ui(ui, ctx);
        let runs = ctx.compared_runs();
        if runs.len() < 2 {
            ui.label("Tick at least two runs above.");
            return;
        }
        let tokens: Vec<Vec<&TokenRecord>> = runs
            .iter()
            .map(|(_, r)| r.trace.tokens().collect())
            .collect();
        let divergence = first_divergence(&tokens);
        ui.label(match divergence {
            Some(i) => format!("The runs part at token {} (marked with a diamond).", i + 1),
            None => "The runs produced the same tokens.".to_owned(),
        });
        let focus_row = ctx
            .selected()
            .and_then(|_| ctx.focused_token().map(|t| t.index));
        self.entropy_ui(ui, &runs, &tokens, focus_row);
        self.rows_ui(ui, ctx, &runs, &tokens, divergence, focus_row);
    }

    fn pick_runs_ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        ui.horizontal_wrapped(|ui| {
            ui.label("Runs:");
            for (key, run) in ctx.store.runs() {
                let mut on = ctx.compare.is_empty() || ctx.compare.contains(&key);
                if ui.checkbox(&mut on, run.label()).changed() {
                    ctx.send(Command::ToggleCompare(key));
                }
            }
        });
    }

    fn entropy_ui(
        &self,
        ui: &mut egui::Ui,
        runs: &[(RunKey, &RunEntry)],
        tokens: &[Vec<&TokenRecord>],
        focus: Option<usize>,
    ) {
        ui.label("Entropy per token (nats); the colours match the column headers below.");
        readable_axes(Plot::new("compare_entropy"), "token", "")
            .height(150.0)
            .allow_drag(false)
            .allow_scroll(false)
            .include_y(0.0)
            .show(ui, |plot_ui| {
                for (i, ((_, run), toks)) in runs.iter().zip(tokens).enumerate() {
                    let points: PlotPoints<'_> = toks
                        .iter()
                        .enumerate()
                        .map(|(j, t)| [(j + 1) as f64, f64::from(t.entropy)])
                        .collect();
                    plot_ui.line(
                        Line::new(run.label().to_owned(), points)
                            .color(RUN_COLORS[i % RUN_COLORS.len()]),
                    );
                }
                if let Some(f) = focus {
                    plot_ui.vline(
                        VLine::new("cursor", (f + 1) as f64).color(Color32::from_rgb(230, 50, 50)),
                    );
                }
            });
    }

    fn rows_ui(
        &self,
        ui: &mut egui::Ui,
        ctx: &ViewCtx<'_>,
        runs: &[(RunKey, &RunEntry)],
        tokens: &[Vec<&TokenRecord>],
        divergence: Option<usize>,
        focus: Option<usize>,
    ) {
        let rows = tokens.iter().map(Vec::len).max().unwrap_or(0);
        let selected = ctx.store.selected_key();
        egui::ScrollArea::both()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                egui::Grid::new("compare_rows")
                    .striped(true)
                    .num_columns(runs.len() + 1)
                    .show(ui, |ui| {
                        ui.strong("token");
                        for (i, (_, run)) in runs.iter().enumerate() {
                            ui.label(
                                RichText::new(run.label())
                                    .strong()
                                    .color(RUN_COLORS[i % RUN_COLORS.len()]),
                            );
                        }
                        ui.end_row();
                        for row in 0..rows {
                            let mut marker = format!("{}", row + 1);
                            if divergence == Some(row) {
                                marker = format!("◆ {marker}");
                            }
                            if focus == Some(row) {
                                marker = format!("▶ {marker}");
                            }
                            let differs = divergence.is_some_and(|d| row >= d);
                            let marker = RichText::new(marker).monospace();
                            ui.label(if focus == Some(row) {
                                marker.strong()
                            } else {
                                marker
                            });
                            for ((key, _), toks) in runs.iter().zip(tokens) {
                                match toks.get(row) {
                                    Some(t) => {
                                        let chip = token_chip(t);
                                        let chip = if differs && divergence == Some(row) {
                                            chip.strong()
                                        } else {
                                            chip
                                        };
                                        let chip = egui::Label::new(chip)
                                            .selectable(false)
                                            .sense(Sense::click());
                                        let r = ui.add(chip.wrap_mode(egui::TextWrapMode::Extend));
                                        if r.clicked() {
                                            if selected != Some(*key) {
                                                ctx.send(Command::SelectRun(*key));
                                            }
                                            ctx.send(Command::FocusToken(row));
                                        }
                                    }
                                    None => {
                                        ui.label(RichText::new("—").weak());
                                    }
                                }
                            }
                            ui.end_row();
                        }
                    });
            });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn empty_runs_have_no_divergence() {
        assert_eq!(super::first_divergence(&[Vec::new(), Vec::new()]), None);
    }
}
