//! The selected run's header (what produced it) and summary (what came out), as two tables.

use egui::RichText;
use specula_core::trace::{RunSummary, StopReason};

use super::model_panel::megabytes;
use super::spec_stats::spec_stats_ui;
use super::{ViewCtx, empty_state};
use crate::gui::spec::is_speculative;
use crate::gui::store::describe_stop;

#[derive(Default)]
pub struct StatsPanel;

impl StatsPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
        let Some((key, run)) = ctx.selected() else {
            empty_state(
                ui,
                "No run selected",
                "Open a trace or start a run to see its statistics.",
            );
            return;
        };
        let h = &run.trace.header;
        egui::ScrollArea::vertical()
            .auto_shrink([false, false])
            .show(ui, |ui| {
                ui.heading(run.label());
                table(ui, ("header", key), |row| {
                    row(
                        "Model",
                        format!(
                            "{} ({}, {})",
                            h.model.name,
                            h.model.weight_format,
                            megabytes(h.model.file_bytes)
                        ),
                    );
                    if let Some(matmul) = &h.model.matmul {
                        row("Matmul", matmul.clone());
                    }
                    if let Some(matmul) = &h.model.prompt_matmul {
                        row("Prompt matmul", matmul.clone());
                    }
                    row("Method", h.method.clone());
                    row("Parameters", h.params.sampling.describe());
                    if h.method == "speculative" {
                        let sp = &h.params.speculative;
                        let adaptive = match (sp.adaptive, sp.draft_cost) {
                            (Some(t), _) => format!(", adaptive (stop at {t:.2})"),
                            (None, Some(c)) => match sp.draft_cost_growth {
                                Some(g) => format!(
                                    ", cost-aware (a drafted token costs {c:.2} steps + {g:.2} per 1,000 tokens of context)"
                                ),
                                None => format!(", cost-aware (a drafted token costs {c:.2} steps)"),
                            },
                            (None, None) => String::new(),
                        };
                        let tree = if sp.drafter == "token-recycling" {
                            format!(
                                ", {} tree of {} nodes{}",
                                sp.tree_template,
                                sp.tree_size,
                                if sp.keep_matrix {
                                    ", matrix kept across runs"
                                } else {
                                    ""
                                }
                            )
                        } else {
                            String::new()
                        };
                        row(
                            "Drafter",
                            format!(
                                "{}, draft length {}{adaptive}{tree}",
                                sp.drafter, sp.draft_len
                            ),
                        );
                    }
                    row("Seed", h.seed.to_string());
                    row("Max tokens", h.max_tokens.to_string());
                    row("Prompt tokens", h.prompt.token_ids.len().to_string());
                    row(
                        "Chat template",
                        if h.prompt.chat { "yes" } else { "no" }.to_owned(),
                    );
                    if let Some(system) = &h.prompt.system {
                        row("System prompt", system.clone());
                    }
                    row("Prompt", h.prompt.text.clone());
                    if let Some(fork) = &h.forked_from {
                        row(
                            "Forked from",
                            format!("{} after {} tokens", fork.parent_label, fork.kept_tokens),
                        );
                    }
                    row("Status", run.status.describe());
                });
                ui.add_space(8.0);
                // For a speculative run the acceptance figures are the point: they come first.
                if is_speculative(&run.trace) {
                    spec_stats_ui(ui, key, &run.trace.steps);
                    ui.add_space(8.0);
                }
                let (summary, final_figures) = match &run.trace.summary {
                    Some(s) => (s.clone(), true),
                    // A live run has no summary yet; the same figures over the steps so far are still worth seeing.
                    None => (
                        RunSummary::from_steps(
                            &run.trace.steps,
                            StopReason::Cancelled,
                            None,
                            run.trace.text(),
                        ),
                        false,
                    ),
                };
                ui.heading(if final_figures {
                    "Summary"
                } else {
                    "Summary so far"
                });
                table(ui, ("summary", key), |row| {
                    if final_figures {
                        row("Stop reason", describe_stop(summary.stop_reason).to_owned());
                    }
                    if let Some(e) = &summary.error {
                        row("Error", e.clone());
                    }
                    row("Steps", summary.steps.to_string());
                    row("Generated tokens", summary.generated_tokens.to_string());
                    row(
                        "Target forward calls",
                        summary.target_forward_calls.to_string(),
                    );
                    row(
                        "Draft forward calls",
                        summary.draft_forward_calls.to_string(),
                    );
                    row(
                        "Drafted / accepted",
                        format!("{} / {}", summary.draft_n, summary.draft_n_accepted),
                    );
                    row(
                        "Mean tokens per forward",
                        format!("{:.3}", summary.mean_accepted_tokens),
                    );
                    row(
                        "Tokens per step (histogram)",
                        format!("{:?}", summary.acceptance_histogram),
                    );
                    row("Mean entropy", format!("{:.3} nats", summary.mean_entropy));
                    row(
                        "Mean log-probability",
                        format!("{:.3}", summary.mean_logprob),
                    );
                    if let Some(t) = summary.timing {
                        row("Wall time", format!("{:.0} ms", t.wall_ms));
                        row("Prefill", format!("{:.0} ms", t.prefill_ms));
                        row(
                            "Decode speed",
                            format!("{:.1} tokens/s", t.decode_tokens_per_s),
                        );
                    }
                });
                ui.add_space(8.0);
                ui.heading("Text");
                ui.label(RichText::new(run.trace.text()).monospace());
            });
    }
}

/// A two-column table; the closure adds rows through `row(name, value)`.
pub(super) fn table(
    ui: &mut egui::Ui,
    id: impl std::hash::Hash + std::fmt::Debug,
    rows: impl FnOnce(&mut dyn FnMut(&str, String)),
) {
    egui::Grid::new(id)
        .striped(true)
        .num_columns(2)
        .show(ui, |ui| {
            rows(&mut |name: &str, value: String| {
                ui.strong(name);
                ui.add(egui::Label::new(value).wrap());
                ui.end_row();
            });
        });
}
