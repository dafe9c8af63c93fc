//! The draft-length sweep: a button that decodes the prompt panel's prompt plainly and then with draft lengths
//! k = 1..12, or with the cost-aware draft length at costs per draft C = 0..0.8 (one run after the other,
//! progress and Cancel while it runs), and what each k or C gave: mean accepted tokens (MAT) and the measured and
//! predicted speedups against it. The curves are rebuilt from the store's runs that carry the sweep's id, so a
//! saved sweep reopens with them.

use egui::{Color32, RichText};
use egui_plot::{HLine, Line, Plot, PlotPoints, Points};

use super::speedup::{ADJUSTED, BREAK_EVEN, MEASURED, PREDICTED, figure, legend_ui};
use super::{ViewCtx, empty_state, readable_axes};
use crate::gui::command::Command;
use crate::gui::sweep::{
    SWEEP_COSTS, SWEEP_KS, SweepData, SweepKind, SweepPoint, sweep_data, sweep_ids,
};

const MAT: Color32 = Color32::from_rgb(69, 117, 180);

/// Reads one figure of a sweep point.
type Value = fn(&SweepPoint) -> Option<f64>;

#[derive(Default)]
pub struct SweepPanel {
    /// The sweep shown when the store holds several (`None`: the newest).
    chosen: Option<u64>,
    /// What the next sweep varies.
    kind: SweepKind,
}

impl SweepPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        controls_ui(ui, ctx, &mut self.kind);
        ui.separator();
        let ids = sweep_ids(ctx.store);
        let Some(&newest) = ids.last() else {
            empty_state(
                ui,
                "No sweep yet",
                &format!(
                    "Press “{}” above to decode the prompt on the left plainly and then speculatively with \
                     each {} (a model must be loaded), or open a trace file saved from a sweep (File > Save \
                     all runs… keeps one).",
                    button_text(self.kind),
                    axis(self.kind).1
                ),
            );
            return;
        };
        let id = self.chosen.filter(|c| ids.contains(c)).unwrap_or(newest);
        if ids.len() > 1 {
            ui.horizontal(|ui| {
                ui.label("Sweep");
                egui::ComboBox::from_id_salt("sweep_pick")
                    .selected_text(sweep_name(&ids, id))
                    .show_ui(ui, |ui| {
                        for &other in &ids {
                            if ui
                                .selectable_label(other == id, sweep_name(&ids, other))
                                .clicked()
                            {
                                self.chosen = Some(other);
                            }
                        }
                    });
            });
        }
        let data = sweep_data(ctx.store, id);
        let height = ((ui.available_height() - 380.0) / 2.0).clamp(130.0, 220.0);
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| results_ui(ui, ctx, &data, height));
    }
}

fn button_text(kind: SweepKind) -> String {
    match kind {
        SweepKind::DraftLength => format!("Sweep k = {}..{}", SWEEP_KS.start(), SWEEP_KS.end()),
        SweepKind::Cost => format!(
            "Sweep C = {}..{}",
            SWEEP_COSTS.first().copied().unwrap_or_default(),
            SWEEP_COSTS.last().copied().unwrap_or_default()
        ),
    }
}

/// The axis of a sweep: its symbol, its name, and the range the plots show.
fn axis(kind: SweepKind) -> (&'static str, &'static str, [f64; 2]) {
    match kind {
        SweepKind::DraftLength => (
            "k",
            "draft length k",
            [*SWEEP_KS.start() as f64 - 0.5, *SWEEP_KS.end() as f64 + 0.5],
        ),
        SweepKind::Cost => (
            "C",
            "cost per draft C",
            [
                -0.05,
                f64::from(SWEEP_COSTS.last().copied().unwrap_or(1.0)) + 0.05,
            ],
        ),
    }
}

fn sweep_name(ids: &[u64], id: u64) -> String {
    let n = ids.iter().position(|&i| i == id).map_or(0, |p| p + 1);
    format!("sweep {n} of {}", ids.len())
}

fn controls_ui(ui: &mut egui::Ui, ctx: &ViewCtx<'_>, kind: &mut SweepKind) {
    ui.label(
        "Decodes the prompt on the left with its settings (sampling, seed, drafter, max tokens) once plainly, \
         then speculatively with each draft length or each cost per draft, one run after the other so that \
         their times can be compared.",
    );
    ui.add_enabled_ui(ctx.sweep.is_none(), |ui| {
        ui.horizontal(|ui| {
            ui.label("Vary");
            ui.radio_value(kind, SweepKind::DraftLength, "Draft length k")
                .on_hover_text("Fixed draft lengths 1 to 12");
            ui.radio_value(kind, SweepKind::Cost, "Cost per draft C")
                .on_hover_text(
                    "The cost-aware draft length (up to the prompt panel's draft length) at costs per draft \
                     from 0 to 0.8: where drafting stops paying on this machine",
                );
        });
    });
    let runs = 1 + match kind {
        SweepKind::DraftLength => SWEEP_KS.count(),
        SweepKind::Cost => SWEEP_COSTS.len(),
    };
    ui.horizontal(|ui| match ctx.sweep {
        Some(sweep) => {
            let now = sweep
                .current_label()
                .map_or(String::new(), |l| format!(": {l}"));
            ui.add(
                egui::ProgressBar::new(sweep.progress(ctx.store))
                    .desired_width(ui.available_width().min(460.0) - 80.0)
                    .text(format!(
                        "run {} of {}{now}",
                        (sweep.done() + 1).min(sweep.total()),
                        sweep.total()
                    )),
            );
            if ui.button("Cancel sweep").clicked() {
                ctx.send(Command::CancelSweep);
            }
        }
        None => {
            if ui
                .button(button_text(*kind))
                .on_hover_text(format!(
                    "Start the plain baseline and the speculative runs ({runs} runs in all)"
                ))
                .clicked()
            {
                ctx.send(Command::StartSweep { kind: *kind });
            }
        }
    });
}

fn results_ui(ui: &mut egui::Ui, ctx: &ViewCtx<'_>, data: &SweepData, height: f32) {
    let (symbol, name, range) = axis(data.kind);
    match data.baseline.and_then(|k| ctx.store.run(k)) {
        Some(b) => ui.label(format!(
            "Baseline: “{}”. Speedups are its decode time for as many tokens over each run's.",
            b.label()
        )),
        None => ui.label(
            RichText::new("This sweep has no plain run, so only predicted speedups can be shown.")
                .color(ui.visuals().warn_fg_color),
        ),
    };
    if data.points.is_empty() {
        ui.label("No speculative run of this sweep has decoded a step yet.");
        return;
    }
    ui.label(
        RichText::new(format!(
            "Mean accepted tokens per target forward (MAT) against {name}"
        ))
        .strong(),
    );
    sweep_plot(
        ui,
        ("sweep_mat", data.id),
        (name, "MAT"),
        height,
        range,
        |p| {
            let mat = points(&data.points, |q| q.mat);
            p.line(
                Line::new("MAT", PlotPoints::from(mat.clone()))
                    .color(MAT)
                    .width(2.0),
            );
            p.points(Points::new("MAT", mat).radius(4.0).color(MAT));
        },
    );
    ui.label(
        RichText::new(format!(
            "Speedup against {name} (1 = as fast as plain decoding)"
        ))
        .strong(),
    );
    let present = |value: Value| data.points.iter().any(|q| value(q).is_some());
    legend_ui(
        ui,
        &[
            (MEASURED, "measured", present(|q| q.measured)),
            (PREDICTED, "predicted", present(|q| q.predicted)),
            (
                ADJUSTED,
                "predicted, verify cost included",
                present(|q| q.adjusted),
            ),
        ],
    );
    sweep_plot(
        ui,
        ("sweep_speedup", data.id),
        (name, "speedup"),
        height,
        range,
        |p| {
            p.hline(
                HLine::new("1 = no speedup", 1.0)
                    .color(BREAK_EVEN)
                    .width(1.0),
            );
            let curves: [(&str, Value, Color32); 3] = [
                ("measured", |q| q.measured, MEASURED),
                ("predicted", |q| q.predicted, PREDICTED),
                ("predicted, verify cost included", |q| q.adjusted, ADJUSTED),
            ];
            for (name, value, color) in curves {
                let pts = points(&data.points, value);
                if pts.is_empty() {
                    continue;
                }
                p.line(
                    Line::new(name, PlotPoints::from(pts.clone()))
                        .color(color)
                        .width(2.0),
                );
                p.points(Points::new(name, pts).radius(4.0).color(color));
            }
        },
    );
    ui.add_space(4.0);
    egui::Grid::new(("sweep_table", data.id))
        .striped(true)
        .num_columns(6)
        .spacing([14.0, 4.0])
        .show(ui, |ui| {
            for title in [
                symbol,
                "MAT",
                "measured",
                "predicted",
                "with verify cost",
                "run",
            ] {
                ui.strong(title);
            }
            ui.end_row();
            for q in &data.points {
                ui.monospace(match q.cost {
                    Some(c) => format!("{c:.2}"),
                    None => q.k.to_string(),
                });
                ui.monospace(figure(q.mat, 2));
                ui.monospace(figure(q.measured, 2));
                ui.monospace(figure(q.predicted, 2));
                ui.monospace(figure(q.adjusted, 2));
                let label = ctx.store.run(q.key).map_or("", |r| r.label());
                let text = if q.finished {
                    label.to_owned()
                } else {
                    format!("{label} (running)")
                };
                if ui
                    .link(text)
                    .on_hover_text("Select this run (its Speedup panel explains the numbers)")
                    .clicked()
                {
                    ctx.send(Command::SelectRun(q.key));
                }
                ui.end_row();
            }
        });
}

fn points(data: &[SweepPoint], value: Value) -> Vec<[f64; 2]> {
    data.iter()
        .filter_map(|q| value(q).map(|v| [q.x(), v]))
        .collect()
}

fn sweep_plot(
    ui: &mut egui::Ui,
    id: impl std::hash::Hash + std::fmt::Debug,
    (x_label, y_label): (&str, &str),
    height: f32,
    [x_min, x_max]: [f64; 2],
    body: impl FnOnce(&mut egui_plot::PlotUi<'_>),
) {
    readable_axes(Plot::new(id), x_label, y_label)
        .height(height)
        .allow_drag(false)
        .allow_scroll(false)
        .allow_zoom(false)
        .allow_boxed_zoom(false)
        .include_x(x_min)
        .include_x(x_max)
        .include_y(0.0)
        .include_y(1.2)
        .show(ui, body);
}
