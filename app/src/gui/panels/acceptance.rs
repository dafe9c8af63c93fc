//! How well the drafter guessed, step by step: accepted drafts and the verifier's token per step (against what
//! was drafted), alpha per step, and the running mean accepted tokens per target forward pass (MAT). A vertical
//! line marks the cursor; clicking a plot moves the cursor there.

use egui::{Color32, RichText};
use egui_plot::{Bar, BarChart, Line, Plot, PlotPoints, PlotUi, Points, VLine};
use specula_core::trace::StepRecord;

use super::colouring::{BONUS, CORRECTED, DRAFT_ACCEPTED, PLAIN};
use super::{ViewCtx, empty_state, readable_axes};
use crate::gui::command::Command;
use crate::gui::cursor::CursorMove;
use crate::gui::spec::{is_speculative, mean_alpha, payload, running_mat};

const DRAFTED: Color32 = Color32::from_rgb(140, 140, 140);
const ALPHA: Color32 = Color32::from_rgb(117, 112, 179);
const MAT: Color32 = Color32::from_rgb(217, 95, 2);
const CURSOR: Color32 = Color32::from_rgb(230, 50, 50);

#[derive(Default)]
pub struct AcceptancePanel;

impl AcceptancePanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((key, run)) = ctx.selected() else {
            empty_state(
                ui,
                "Nothing to plot",
                "Open a speculative trace or start a speculative run to see how many drafts were accepted.",
            );
            return;
        };
        if !is_speculative(&run.trace) {
            empty_state(
                ui,
                "No drafts in this run",
                &format!(
                    "This run used “{}”, which drafts nothing. Pick “speculative” as the method and press Run, \
                     or open a speculative trace (File > Open trace…).",
                    run.trace.header.method
                ),
            );
            return;
        }
        let steps = &run.trace.steps;
        if steps.is_empty() {
            empty_state(ui, "No steps yet", "The curves appear as the run decodes.");
            return;
        }
        let cursor_x = (ctx.cursor.step + 1) as f64;
        let link = egui::Id::unique(("acceptance_link", key));
        let height = ((ui.available_height() - 3.0 * 30.0) / 3.0).max(110.0);
        let x = |i: usize| (i + 1) as f64;
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.label(
                    RichText::new(
                        "Tokens per step: accepted drafts, then the verifier's own token",
                    )
                    .strong(),
                );
                ui.horizontal_wrapped(|ui| {
                    for (color, mark, name) in [
                        (DRAFT_ACCEPTED, "■", "accepted drafts"),
                        (CORRECTED, "■", "corrected after a rejection"),
                        (BONUS, "■", "bonus (all accepted)"),
                        (PLAIN, "■", "no draft"),
                        (DRAFTED, "●", "drafted"),
                    ] {
                        ui.label(RichText::new(mark).monospace().color(color));
                        ui.label(name);
                    }
                });
                plot(ui, ctx, ("accepted", link), link, height, "tokens", |p| {
                    counts(p, steps);
                    cursor(p, cursor_x, None);
                });
                ui.label(
                    RichText::new(
                        "Alpha per step (mean over depths): the chance a draft is accepted",
                    )
                    .strong(),
                );
                let alpha: Vec<[f64; 2]> = steps
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| mean_alpha(s).map(|a| [x(i), a]))
                    .collect();
                if alpha.is_empty() {
                    ui.label(RichText::new("Not recorded in this trace.").weak());
                } else {
                    let at = alpha.iter().find(|p| p[0] == cursor_x).copied();
                    plot(ui, ctx, ("alpha", link), link, height, "alpha", |p| {
                        p.line(Line::new("alpha", PlotPoints::from(alpha)).color(ALPHA));
                        cursor(p, cursor_x, at.map(|a| (a, ALPHA)));
                    });
                }
                ui.label(
                    RichText::new("Mean accepted tokens per target forward (MAT), running")
                        .strong(),
                );
                let mat: Vec<[f64; 2]> = running_mat(steps)
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| [x(i), m])
                    .collect();
                let at = mat.iter().find(|p| p[0] == cursor_x).copied();
                plot(ui, ctx, ("mat", link), link, height, "MAT", |p| {
                    p.line(Line::new("MAT", PlotPoints::from(mat)).color(MAT));
                    cursor(p, cursor_x, at.map(|a| (a, MAT)));
                });
            });
    }
}

fn plot(
    ui: &mut egui::Ui,
    ctx: &ViewCtx<'_>,
    id: impl std::hash::Hash + std::fmt::Debug,
    link: egui::Id,
    height: f32,
    y_label: &str,
    body: impl FnOnce(&mut PlotUi<'_>),
) {
    let response = readable_axes(Plot::new(id), "step", y_label)
        .height(height)
        .link_axis(link, [true, false])
        .link_cursor(link, [true, false])
        .allow_drag(false)
        .allow_scroll(false)
        .include_y(0.0)
        .show(ui, body);
    if response.response.clicked()
        && let Some(pos) = response.response.interact_pointer_pos()
    {
        let x = response.transform.value_from_position(pos).x.round();
        let step = (x.max(1.0) as usize).saturating_sub(1);
        ctx.send(Command::MoveCursor(CursorMove::To(step)));
    }
}

/// Stacked bars: accepted drafts (green) under the verifier's token (orange if corrected, blue if bonus), and
/// the drafted count as grey points.
fn counts(p: &mut PlotUi<'_>, steps: &[StepRecord]) {
    let accepted: Vec<Bar> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Bar::new((i + 1) as f64, s.draft_n_accepted as f64)
                .width(0.7)
                .fill(DRAFT_ACCEPTED)
        })
        .collect();
    // What the step's last token was: Some(true) bonus, Some(false) corrected, None no draft at all.
    let kind = |s: &StepRecord| {
        payload(s)
            .and_then(|p| p.rejection.as_ref().map(|r| (p.nodes.is_empty(), r.bonus)))
            .and_then(|(empty, bonus)| (!empty).then_some(bonus))
    };
    let verifier = |want: Option<bool>, fill: Color32| -> Vec<Bar> {
        steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let own = if kind(s) == want {
                    s.tokens.len().saturating_sub(s.draft_n_accepted) as f64
                } else {
                    0.0
                };
                Bar::new((i + 1) as f64, own).width(0.7).fill(fill)
            })
            .collect()
    };
    let accepted = BarChart::new("accepted drafts", accepted).color(DRAFT_ACCEPTED);
    let corrected = BarChart::new("corrected", verifier(Some(false), CORRECTED))
        .color(CORRECTED)
        .stack_on(&[&accepted]);
    let bonus = BarChart::new("bonus", verifier(Some(true), BONUS))
        .color(BONUS)
        .stack_on(&[&accepted]);
    let alone = BarChart::new("no draft", verifier(None, PLAIN)).color(PLAIN);
    let drafted: Vec<[f64; 2]> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| [(i + 1) as f64, s.draft_n as f64])
        .collect();
    p.bar_chart(accepted);
    p.bar_chart(corrected);
    p.bar_chart(bonus);
    p.bar_chart(alone);
    p.points(Points::new("drafted", drafted).radius(3.5).color(DRAFTED));
}

fn cursor(p: &mut PlotUi<'_>, x: f64, at: Option<([f64; 2], Color32)>) {
    p.vline(VLine::new("cursor", x).color(CURSOR).width(1.5));
    if let Some((point, color)) = at {
        p.points(Points::new("at cursor", point).radius(4.0).color(color));
    }
}
