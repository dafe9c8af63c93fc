//! Runs side by side: their tokens aligned by position (one row per position), the first position where they
//! part marked, the cursor's row highlighted, and one measure of theirs overlaid (entropy, chosen-token
//! probability or time per step, as the user picks).

use egui::{Color32, RichText, Sense};
use egui_plot::{Line, Plot, PlotPoints, VLine};
use specula_core::trace::TokenRecord;

use super::tokens::token_chip;
use super::{ViewCtx, empty_state, readable_axes};
use crate::gui::command::Command;
use crate::gui::store::{RunEntry, RunKey, TokenAt, final_output};

const RUN_COLORS: &[Color32] = &[
    Color32::from_rgb(69, 117, 180),
    Color32::from_rgb(217, 95, 2),
    Color32::from_rgb(26, 152, 80),
    Color32::from_rgb(117, 112, 179),
    Color32::from_rgb(231, 41, 138),
];

#[derive(Default)]
pub struct ComparePanel {
    overlay: Overlay,
}

/// What the overlaid curves show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Overlay {
    #[default]
    Entropy,
    Probability,
    StepTime,
}

impl Overlay {
    const ALL: [Overlay; 3] = [Overlay::Entropy, Overlay::Probability, Overlay::StepTime];

    fn name(self) -> &'static str {
        match self {
            Self::Entropy => "entropy",
            Self::Probability => "chosen-token probability",
            Self::StepTime => "time per step",
        }
    }

    fn caption(self) -> &'static str {
        match self {
            Self::Entropy => {
                "Entropy per token (nats); the colours match the column headers below."
            }
            Self::Probability => {
                "Probability of each chosen token; the colours match the column headers below."
            }
            Self::StepTime => {
                "Time per step (ms; step 1, which reads the prompt, is left out); a speculative step commits \
                 several tokens. The colours match the column headers below."
            }
        }
    }

    fn x_label(self) -> &'static str {
        match self {
            Self::StepTime => "step",
            _ => "token",
        }
    }

    /// The curve of one run: x from 1 (token or step), y the measure; missing values leave gaps.
    pub fn points(self, run: &RunEntry, tokens: &[&TokenRecord]) -> Vec<[f64; 2]> {
        match self {
            Self::Entropy => per_token(tokens, |t| f64::from(t.entropy)),
            Self::Probability => per_token(tokens, |t| f64::from(t.prob())),
            // The prompt step costs tens of decode steps and would flatten every curve.
            Self::StepTime => run
                .trace
                .steps
                .iter()
                .enumerate()
                .skip(1)
                .filter_map(|(i, s)| s.timing.map(|t| [(i + 1) as f64, t.total_ms]))
                .collect(),
        }
    }
}

fn per_token(tokens: &[&TokenRecord], value: fn(&TokenRecord) -> f64) -> Vec<[f64; 2]> {
    tokens
        .iter()
        .enumerate()
        .map(|(j, t)| [(j + 1) as f64, value(t)])
        .collect()
}

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
        // Rows are positions in each run's final output. A run that rolled tokens back (OPERA, a beam switch)
        // committed more tokens than it kept, so a row is not a committed-token index: each shown token keeps
        // its own, which is what clicking focuses.
        let outputs: Vec<Vec<TokenAt<'_>>> =
            runs.iter().map(|(_, r)| final_output(&r.trace)).collect();
        let tokens: Vec<Vec<&TokenRecord>> = outputs
            .iter()
            .map(|out| out.iter().map(|t| t.token).collect())
            .collect();
        let divergence = first_divergence(&tokens);
        ui.label(match divergence {
            Some(i) => format!("The runs part at token {} (marked with a diamond).", i + 1),
            None => "The runs produced the same tokens.".to_owned(),
        });
        let focus = focus_row(ctx, &runs, &outputs);
        let cursor_x = match self.overlay {
            Overlay::StepTime => ctx.selected().map(|_| ctx.cursor.step + 1),
            _ => focus.map(|f| f.row + 1),
        };
        self.overlay_ui(ui, &runs, &tokens, cursor_x);
        self.rows_ui(ui, ctx, &runs, &outputs, divergence, focus);
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

    fn overlay_ui(
        &mut self,
        ui: &mut egui::Ui,
        runs: &[(RunKey, &RunEntry)],
        tokens: &[Vec<&TokenRecord>],
        cursor_x: Option<usize>,
    ) {
        ui.horizontal_wrapped(|ui| {
            ui.label("Overlay:");
            for overlay in Overlay::ALL {
                ui.selectable_value(&mut self.overlay, overlay, overlay.name());
            }
        });
        let overlay = self.overlay;
        let curves: Vec<Vec<[f64; 2]>> = runs
            .iter()
            .zip(tokens)
            .map(|((_, run), toks)| overlay.points(run, toks))
            .collect();
        ui.label(overlay.caption());
        if curves.iter().all(Vec::is_empty) {
            ui.label(
                RichText::new("Not recorded in these traces (deterministic traces keep no times).")
                    .weak(),
            );
            return;
        }
        // One plot id per measure, so each keeps its own zoom.
        readable_axes(
            Plot::new(("compare_overlay", overlay)),
            overlay.x_label(),
            "",
        )
        .height(150.0)
        .allow_drag(false)
        .allow_scroll(false)
        .include_y(0.0)
        .show(ui, |plot_ui| {
            for (i, ((_, run), points)) in runs.iter().zip(curves).enumerate() {
                plot_ui.line(
                    Line::new(run.label().to_owned(), PlotPoints::from(points))
                        .color(RUN_COLORS[i % RUN_COLORS.len()]),
                );
            }
            if let Some(x) = cursor_x {
                plot_ui.vline(VLine::new("cursor", x as f64).color(Color32::from_rgb(230, 50, 50)));
            }
        });
    }

    fn rows_ui(
        &self,
        ui: &mut egui::Ui,
        ctx: &ViewCtx<'_>,
        runs: &[(RunKey, &RunEntry)],
        outputs: &[Vec<TokenAt<'_>>],
        divergence: Option<usize>,
        focus: Option<FocusRow>,
    ) {
        let rows = outputs.iter().map(Vec::len).max().unwrap_or(0);
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
                            let focused_here = focus.filter(|f| f.row == row);
                            match focused_here {
                                Some(f) if f.shown => marker = format!("▶ {marker}"),
                                // The focused token stood here but a later rollback replaced it.
                                Some(_) => marker = format!("▷ {marker}"),
                                None => {}
                            }
                            let differs = divergence.is_some_and(|d| row >= d);
                            let marker = RichText::new(marker).monospace();
                            let marker = ui.label(if focused_here.is_some() {
                                marker.strong()
                            } else {
                                marker
                            });
                            if focused_here.is_some_and(|f| !f.shown) {
                                marker.on_hover_text(
                                    "The focused token stood at this position when it was committed; a later \
                                     rollback took it back, so the final output shows another token here.",
                                );
                            }
                            for ((key, _), out) in runs.iter().zip(outputs) {
                                match out.get(row) {
                                    Some(t) => {
                                        let chip = token_chip(t.token);
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
                                            ctx.send(Command::FocusToken(t.index));
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

/// The row of the selected run's focused token: the position it was committed at, and whether the final output
/// still shows it there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FocusRow {
    row: usize,
    shown: bool,
}

fn focus_row(
    ctx: &ViewCtx<'_>,
    runs: &[(RunKey, &RunEntry)],
    outputs: &[Vec<TokenAt<'_>>],
) -> Option<FocusRow> {
    let (selected, _) = ctx.selected()?;
    let focused = ctx.focused_token()?;
    let column = runs.iter().position(|(k, _)| *k == selected)?;
    let row = focused.output_index;
    let shown = outputs
        .get(column)
        .and_then(|out| out.get(row))
        .is_some_and(|t| t.index == focused.index);
    Some(FocusRow { row, shown })
}

#[cfg(test)]
mod tests {
    #[test]
    fn empty_runs_have_no_divergence() {
        assert_eq!(super::first_divergence(&[Vec::new(), Vec::new()]), None);
    }
}
