//! The speculative part of Run statistics: what was drafted and accepted, the mean accepted tokens per target
//! forward (MAT), the histogram of tokens committed per step, and where the time went.

use egui::RichText;
use egui_plot::{Bar, BarChart, Plot};
use specula_core::trace::StepRecord;

use super::colouring::DRAFT_ACCEPTED;
use super::stats::table;
use crate::gui::spec::SpecStats;

pub fn spec_stats_ui(
    ui: &mut egui::Ui,
    id: impl std::hash::Hash + std::fmt::Debug + Copy,
    steps: &[StepRecord],
) {
    let s = SpecStats::of(steps);
    ui.heading("Speculative decoding");
    table(ui, ("speculative", id), |row| {
        row("Drafted tokens (draft_n)", s.draft_n.to_string());
        row(
            "Accepted drafts (draft_n_accepted)",
            s.draft_n_accepted.to_string(),
        );
        row(
            "Acceptance rate",
            s.acceptance_rate()
                .map_or("–".to_owned(), |r| format!("{:.1}%", r * 100.0)),
        );
        row(
            "Mean accepted tokens per target forward (MAT)",
            s.mat().map_or("–".to_owned(), |m| format!("{m:.2}")),
        );
        row(
            "Steps ending in a rejection / a bonus",
            format!("{} / {}", s.rejections, s.bonuses),
        );
        row(
            "Forward calls: target / draft",
            format!("{} / {}", s.target_forward_calls, s.draft_forward_calls),
        );
        if s.has_timing {
            let total = s.draft_ms + s.verify_ms;
            let share = if total > 0.0 {
                format!(" ({:.0}% drafting)", s.draft_ms * 100.0 / total)
            } else {
                String::new()
            };
            row(
                "Time: draft / verify",
                format!("{:.0} ms / {:.0} ms{share}", s.draft_ms, s.verify_ms),
            );
        }
    });
    ui.add_space(4.0);
    ui.label(RichText::new("Tokens committed per step (acceptance histogram)").strong());
    let bars: Vec<Bar> = s
        .histogram
        .iter()
        .enumerate()
        .map(|(n, count)| {
            Bar::new(n as f64, *count as f64)
                .width(0.7)
                .fill(DRAFT_ACCEPTED)
                .name(format!("{n} tokens"))
        })
        .collect();
    super::readable_axes(
        Plot::new(("acceptance_histogram", id)),
        "tokens in the step",
        "steps",
    )
    .height(130.0)
    .width(ui.available_width().min(420.0))
    .allow_drag(false)
    .allow_zoom(false)
    .allow_scroll(false)
    .allow_boxed_zoom(false)
    .include_y(0.0)
    .include_x(-0.5)
    .include_x(s.histogram.len() as f64 - 0.5)
    .show(ui, |p| {
        p.bar_chart(BarChart::new("steps", bars).color(DRAFT_ACCEPTED));
    });
}
