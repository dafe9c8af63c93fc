//! The timeline of the selected run: one mark per step (coloured by how many tokens it committed: one is a plain
//! step, more is a speculative gain, the darker the more; a rejection ticked under the mark; the stop marked),
//! the cursor, and the play controls. Click or drag on the strip to move the cursor.

use egui::{Color32, Rect, RichText, Sense, Stroke, pos2, vec2};
use specula_core::trace::StopReason;

use super::ViewCtx;
use super::colouring::CORRECTED;
use crate::gui::command::Command;
use crate::gui::cursor::{CursorMove, PlayMode};
use crate::gui::spec::payload;

const ONE_TOKEN: Color32 = Color32::from_rgb(69, 117, 180);
/// Two tokens in a step; more get darker, up to [`MANY_TOKENS`] for the run's largest step.
const SEVERAL_TOKENS: Color32 = Color32::from_rgb(116, 196, 118);
const MANY_TOKENS: Color32 = Color32::from_rgb(0, 90, 50);
const NO_TOKEN: Color32 = Color32::from_rgb(150, 150, 150);
const STOP: Color32 = Color32::from_rgb(215, 48, 39);
pub const ROLLBACK: Color32 = Color32::from_rgb(152, 78, 163);

#[derive(Default)]
pub struct TimelinePanel;

impl TimelinePanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let run = ctx.selected().map(|(_, r)| r);
        let len = run.map_or(0, |r| r.trace.steps.len());
        ui.horizontal(|ui| {
            let send = |m| ctx.send(Command::MoveCursor(m));
            let has_steps = len > 0;
            ui.add_enabled_ui(has_steps, |ui| {
                if ui.button("First").on_hover_text("First step (Home)").clicked() {
                    send(CursorMove::First);
                }
                if ui.button("Back").on_hover_text("Previous step (Left arrow)").clicked() {
                    send(CursorMove::Back);
                }
                if ctx.cursor.mode == PlayMode::Playing {
                    if ui.button("Stop").on_hover_text("Stop playing (Space)").clicked() {
                        send(CursorMove::Pause);
                    }
                } else if ui.button("Play").on_hover_text("Replay the steps (Space)").clicked() {
                    send(CursorMove::Play);
                }
                if ui.button("Forward").on_hover_text("Next step (Right arrow)").clicked() {
                    send(CursorMove::Forward);
                }
                if ui.button("Follow").on_hover_text("Jump to the newest step and stay there (End)").clicked() {
                    send(CursorMove::Follow);
                }
            });
            let mut rate = ctx.cursor.steps_per_second;
            let label = ui.label("Speed");
            if ui
                .add(egui::DragValue::new(&mut rate).range(0.5..=120.0).suffix(" steps/s").speed(0.2))
                .labelled_by(label.id)
                .changed()
            {
                send(CursorMove::SetRate(rate));
            }
            ui.separator();
            let position = if len == 0 { "no steps".to_owned() } else { format!("step {} / {len}", ctx.cursor.step + 1) };
            ui.label(RichText::new(position).monospace().strong());
            let rollbacks = run.map_or(0, |r| r.trace.steps.iter().filter(|s| s.rollback.is_some()).count());
            if rollbacks > 0 {
                ui.label(RichText::new(format!("■ {rollbacks} rollback{}", if rollbacks == 1 { "" } else { "s" })).monospace().color(ROLLBACK))
                    .on_hover_text("Violet bars on the strip below mark the steps that took tokens back.");
            }
            ui.label(RichText::new(ctx.cursor.mode.name()).weak())
                .on_hover_text("Following: stays on the newest step. Paused: stays put. Playing: advances by itself.");
        });
        if let Some(run) = run {
            self.strip_ui(ui, ctx, run, len);
        }
    }

    fn strip_ui(
        &mut self,
        ui: &mut egui::Ui,
        ctx: &ViewCtx<'_>,
        run: &crate::gui::store::RunEntry,
        len: usize,
    ) {
        let (rect, response) =
            ui.allocate_exact_size(vec2(ui.available_width(), 28.0), Sense::click_and_drag());
        let painter = ui.painter_at(rect);
        painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
        if len == 0 {
            return;
        }
        let width = rect.width() / len as f32;
        let stopped_at_eos = run
            .trace
            .summary
            .as_ref()
            .is_some_and(|s| s.stop_reason == StopReason::Eos);
        let most = run
            .trace
            .steps
            .iter()
            .map(|s| s.tokens.len())
            .max()
            .unwrap_or(1);
        // A hairline gap between marks keeps them countable when they are wide enough.
        let gap = if width > 3.0 { 1.0 } else { 0.0 };
        // Without gaps, neighbouring marks of one colour are painted as one rect: a long run's marks are narrower
        // than a pixel, and two thousand sliver rects cost more to tessellate than the rest of the window.
        let mut pending: Option<(Rect, Color32)> = None;
        // Rollback bars and rejection ticks go over every mark, so a merged mark painted late never covers them.
        let mut overlays: Vec<(Rect, Color32)> = Vec::new();
        for (i, step) in run.trace.steps.iter().enumerate() {
            let color = if stopped_at_eos && i + 1 == len {
                STOP
            } else {
                match step.tokens.len() {
                    0 => NO_TOKEN,
                    1 => ONE_TOKEN,
                    n => {
                        let t = if most > 2 {
                            (n - 2) as f32 / (most - 2) as f32
                        } else {
                            0.0
                        };
                        SEVERAL_TOKENS.lerp_to_gamma(MANY_TOKENS, t)
                    }
                }
            };
            // A step whose drafter proposed nothing rejected nothing either.
            let rejected = payload(step)
                .filter(|p| !p.nodes.is_empty())
                .and_then(|p| p.rejection.as_ref())
                .is_some_and(|r| !r.bonus);
            let x = rect.left() + i as f32 * width;
            let mark = Rect::from_min_max(
                pos2(x, rect.top() + 4.0),
                pos2(x + width - gap, rect.bottom() - 4.0),
            );
            pending = match pending {
                Some((run_rect, run_color)) if gap == 0.0 && run_color == color => {
                    Some((run_rect.union(mark), color))
                }
                other => {
                    if let Some((run_rect, run_color)) = other {
                        painter.rect_filled(run_rect, 0.0, run_color);
                    }
                    Some((mark, color))
                }
            };
            if step.rollback.is_some() {
                // A rollback: a violet bar over the mark, as wide as at least a few points so it stays visible.
                let w = mark.width().max(3.0);
                let bar = Rect::from_min_max(
                    pos2(mark.center().x - w / 2.0, rect.top()),
                    pos2(mark.center().x + w / 2.0, rect.top() + 6.0),
                );
                overlays.push((bar, ROLLBACK));
            }
            if rejected {
                let tick = Rect::from_min_max(
                    pos2(mark.left(), rect.bottom() - 4.0),
                    pos2(mark.right(), rect.bottom()),
                );
                overlays.push((tick, CORRECTED));
            }
        }
        for (r, c) in pending.into_iter().chain(overlays) {
            painter.rect_filled(r, 0.0, c);
        }
        let x = rect.left() + (ctx.cursor.step as f32 + 0.5) * width;
        let stroke = Stroke::new(2.0, ui.visuals().strong_text_color());
        painter.line_segment([pos2(x, rect.top()), pos2(x, rect.bottom())], stroke);
        if (response.clicked() || response.dragged())
            && let Some(pos) = response.interact_pointer_pos()
        {
            let step = ((pos.x - rect.left()) / width).floor().max(0.0) as usize;
            ctx.send(Command::MoveCursor(CursorMove::To(step.min(len - 1))));
        }
        response.on_hover_text(
            "One mark per step. Blue: one token; green: several tokens (speculative gain, darker = more; or a \
             fork's kept tokens); an orange tick below: the verifier rejected a draft; grey: none; red: the \
             end-of-text stop; a violet bar on top: the method took tokens back (a rollback: OPERA's \
             retrospection, or beam search moving to another hypothesis). Click or drag to move the cursor.",
        );
    }
}
