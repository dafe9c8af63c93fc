//! The left panel: the prompt, the method's parameters (live: a change on a running sample run applies at its
//! next step), and the list of runs.

use egui::RichText;
use specula_core::methods::speculative::{MAX_SIBLINGS, SIBLING_DRAFTERS};

use super::ViewCtx;
use crate::gui::command::Command;
use crate::gui::settings::{DraftLength, RunSettings};
use crate::gui::store::{DraftCost, ModelState};

#[derive(Default)]
pub struct PromptPanel;

impl PromptPanel {
    pub fn ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>, settings: &mut RunSettings) {
        egui::ScrollArea::vertical().show(ui, |ui| {
            ui.heading("Prompt");
            let label = ui.label("Prompt text");
            ui.add(
                egui::TextEdit::multiline(&mut settings.prompt)
                    .desired_rows(4)
                    .desired_width(f32::INFINITY),
            )
            .labelled_by(label.id);
            ui.checkbox(&mut settings.chat, "Chat template")
                .on_hover_text("Wrap the prompt as a user message in the model's chat template");
            ui.add_enabled_ui(settings.chat, |ui| {
                ui.checkbox(&mut settings.use_system, "System prompt");
                if settings.use_system {
                    let label = ui.label("System prompt text");
                    ui.add(
                        egui::TextEdit::multiline(&mut settings.system)
                            .desired_rows(2)
                            .desired_width(f32::INFINITY),
                    )
                    .labelled_by(label.id);
                }
            });
            ui.separator();
            self.params_ui(ui, ctx, settings);
            ui.separator();
            runs_ui(ui, ctx);
        });
    }

    fn params_ui(&mut self, ui: &mut egui::Ui, ctx: &ViewCtx<'_>, settings: &mut RunSettings) {
        ui.heading("Method parameters");
        let sample = !settings.is_greedy();
        if !sample {
            ui.label(RichText::new("Greedy always takes the most likely token; pick “sample” in the top bar to use these.").weak());
        }
        let before = settings.params();
        if settings.is_speculative() {
            speculative_ui(ui, ctx, settings);
        }
        if settings.is_search() {
            search_ui(ui, settings);
        }
        if settings.method == "entropy-adaptive" {
            adaptive_ui(ui, settings);
        }
        inspect_ui(ui, settings);
        ui.add_enabled_ui(sample, |ui| {
            ui.add(egui::Slider::new(&mut settings.temperature, 0.0..=2.0).text("Temperature"))
                .on_hover_text(
                    "Divides the logits: below 1 sharpens the distribution, above 1 flattens it",
                );
            ui.add(egui::Slider::new(&mut settings.top_k, 0..=100).text("Top-k (0 = off)"))
                .on_hover_text("Keep only the k most likely tokens");
            ui.add(egui::Slider::new(&mut settings.top_p, 0.01..=1.0).text("Top-p (1 = off)"))
                .on_hover_text("Keep the smallest set of tokens whose probability reaches p");
            ui.add(egui::Slider::new(&mut settings.min_p, 0.0..=0.99).text("Min-p (0 = off)"))
                .on_hover_text("Drop tokens less likely than min-p times the most likely one");
            ui.add(
                egui::Slider::new(&mut settings.typical_p, 0.01..=1.0).text("Typical-p (1 = off)"),
            )
            .on_hover_text(
                "Locally typical sampling: keep tokens whose surprise is close to the entropy",
            );
        });
        let after = settings.params();
        if after != before
            && let Some((key, run)) = ctx.selected()
            && run.live_id().is_some()
            && run.trace.header.method == settings.method
        {
            ctx.send(Command::SetParams(key, Box::new(after)));
        }
        ui.horizontal(|ui| {
            let label = ui.label("Seed");
            ui.add(egui::DragValue::new(&mut settings.seed))
                .labelled_by(label.id);
            let label = ui.label("Max tokens");
            ui.add(egui::DragValue::new(&mut settings.max_tokens).range(1..=4096))
                .labelled_by(label.id);
        });
    }
}

/// Measures the machine's cost per draft on the loaded model and offers to use it.
fn measured_cost_ui(ui: &mut egui::Ui, ctx: &ViewCtx<'_>, settings: &mut RunSettings) {
    ui.horizontal(|ui| {
        if ctx.store.draft_cost == DraftCost::Measuring {
            ui.spinner();
            ui.label("Measuring…");
            return;
        }
        let loaded = matches!(ctx.store.model, ModelState::Loaded { .. });
        if ui
            .add_enabled(loaded, egui::Button::new("Measure here"))
            .on_hover_text(
                "Time 1- and 4-token forwards of the loaded model on this machine, after a short and a \
                 1,024-token context (about two seconds, between steps of running runs)",
            )
            .on_disabled_hover_text("Load a model first")
            .clicked()
        {
            ctx.send(Command::MeasureDraftCost);
        }
        if let DraftCost::Measured(measured) = ctx.store.draft_cost
            && ui
                .button(format!(
                    "Use {:.2} + {:.2}/1k",
                    measured.cost, measured.growth
                ))
                .on_hover_text("Set the cost per draft and its growth to the ones measured here")
                .clicked()
        {
            settings.draft_cost = measured.cost;
            settings.draft_cost_growth = measured.growth;
        }
    });
}

/// The drafter and how much it drafts. Temperature 0 below verifies greedily; above 0 the verifier uses
/// lossless rejection sampling.
fn speculative_ui(ui: &mut egui::Ui, ctx: &ViewCtx<'_>, settings: &mut RunSettings) {
    use specula_core::methods::speculative::{DRAFTER_NAMES, MAX_DRAFT_LEN};
    ui.horizontal(|ui| {
        egui::ComboBox::from_label("Drafter")
            .selected_text(&settings.drafter)
            .show_ui(ui, |ui| {
                for d in DRAFTER_NAMES {
                    ui.selectable_value(&mut settings.drafter, (*d).to_owned(), *d);
                }
            })
            .response
            .on_hover_text(
                "prompt-lookup copies what followed the last words earlier in the text; layer-skip runs the \
                 model with some layers skipped; token-recycling reuses candidates from earlier steps as a tree; \
                 early-exit drafts with the first layers only; lookahead runs Jacobi iterations and reuses the n-grams \
                 they find (when sampling, its guesses are drawn from the model's last iteration: Speculative Jacobi \
                 Decoding); model drafts with a second, smaller GGUF",
            );
    });
    if settings.drafter == "model" {
        ui.horizontal(|ui| {
            let label = ui.label("Draft model");
            ui.add(
                egui::TextEdit::singleline(&mut settings.draft_model)
                    .hint_text("path to a GGUF with the same tokenizer"),
            )
            .labelled_by(label.id);
        });
    }
    ui.add(egui::Slider::new(&mut settings.draft_len, 1..=MAX_DRAFT_LEN).text("Draft length"))
        .on_hover_text(
            "Most tokens drafted per step; the target checks them all in one forward pass",
        );
    if settings.drafter == "token-recycling" {
        recycling_ui(ui, settings);
    }
    ui.horizontal(|ui| {
        ui.label("Draft length policy");
        for (policy, name, hover) in [
            (DraftLength::Fixed, "Fixed", "Always draft the draft length"),
            (
                DraftLength::StopThreshold,
                "Stop threshold",
                "Stop drafting early when a rejection becomes likely",
            ),
            (
                DraftLength::CostAware,
                "Cost-aware",
                "Draft the length, possibly none, that maximises expected tokens per unit of verification \
                 cost, from the running acceptance (prompt lookup keeps one per match length)",
            ),
        ] {
            ui.radio_value(&mut settings.draft_length, policy, name)
                .on_hover_text(hover);
        }
    });
    match settings.draft_length {
        DraftLength::Fixed => {}
        DraftLength::StopThreshold => {
            ui.add(
                egui::Slider::new(&mut settings.adaptive_threshold, 0.05..=0.95)
                    .text("Rejection threshold"),
            )
            .on_hover_text(
                "Stop drafting once the estimated chance that a draft is rejected exceeds this",
            );
        }
        DraftLength::CostAware => {
            ui.add(egui::Slider::new(&mut settings.draft_cost, 0.0..=1.0).text("Cost per draft"))
                .on_hover_text(
                    "What one drafted token adds to the verification, in one-token steps \
                     (`specula bench` prints this machine's as verify_token_cost)",
                );
            ui.add(
                egui::Slider::new(&mut settings.draft_cost_growth, 0.0..=1.0)
                    .text("Growth per 1k context"),
            )
            .on_hover_text(
                "What the cost per draft grows by per 1,000 tokens of context, since every verified token \
                 attends over the whole cache; 0 keeps it the same at every length (`specula bench` prints \
                 this machine's as verify_token_cost_growth)",
            );
            measured_cost_ui(ui, ctx, settings);
        }
    }
    // Below the length policy, whose sliders it would otherwise push down: a tree's width is the rarer knob.
    if SIBLING_DRAFTERS.contains(&settings.drafter.as_str()) {
        ui.add(egui::Slider::new(&mut settings.siblings, 1..=MAX_SIBLINGS).text("Siblings"))
            .on_hover_text(
                "Drafts at the first position, verified in the same forward: when sampling, drawn from the \
                 drafter's q without replacement and tested one after another against what each rejection \
                 leaves (recursive speculative decoding); greedy, the likeliest ones. 1 = a plain chain",
            );
    }
    ui.label(
        RichText::new(
            "Temperature 0 verifies greedily (keep drafts while they are the target's top token); above 0 the \
             verifier samples, and the output follows the target's distribution exactly.",
        )
        .weak(),
    );
    ui.add_space(4.0);
}

/// Token recycling's tree and matrix. Small trees by default: on this CPU a verification forward of n nodes
/// costs about n/2 single steps, so the paper's 80-node tree is a choice, not the default.
fn recycling_ui(ui: &mut egui::Ui, settings: &mut RunSettings) {
    use specula_core::methods::speculative::MAX_TREE_SIZE;
    use specula_core::methods::speculative::token_recycling::TREE_TEMPLATES;
    ui.add(egui::Slider::new(&mut settings.tree_size, 1..=MAX_TREE_SIZE).text("Tree size"))
        .on_hover_text(
            "Draft nodes verified in one forward pass (the paper uses 80 on a GPU; each node costs CPU time here)",
        );
    ui.horizontal(|ui| {
        egui::ComboBox::from_label("Tree template")
            .selected_text(&settings.tree_template)
            .show_ui(ui, |ui| {
                for t in TREE_TEMPLATES {
                    ui.selectable_value(&mut settings.tree_template, (*t).to_owned(), *t);
                }
            })
            .response
            .on_hover_text(
                "scored keeps the likeliest nodes by candidate rank; paper is the paper's own 80-node tree \
                 (6 levels; set the draft length to 6 for all of it), cut to the tree size",
            );
    });
    ui.checkbox(&mut settings.keep_matrix, "Keep the matrix across runs")
        .on_hover_text(
            "Start from the candidates earlier runs on this model left, as the paper does between queries, \
             instead of an empty matrix; the draft tree's note says how many runs it carries",
        );
}

/// The parameters the chosen search or contrast method reads (the others keep their values for later).
fn search_ui(ui: &mut egui::Ui, settings: &mut RunSettings) {
    let method = settings.method.clone();
    let p = &mut settings.search;
    let uses = |names: &[&str]| names.contains(&method.as_str());
    if uses(&["beam", "diverse-beam", "opera"]) {
        ui.add(egui::Slider::new(&mut p.beams, 1..=16).text("Beams"))
            .on_hover_text("Hypotheses kept at every step");
    }
    if uses(&["beam", "diverse-beam"]) {
        ui.add(egui::Slider::new(&mut p.length_penalty, -2.0..=2.0).text("Length penalty"))
            .on_hover_text(
                "Finished hypotheses rank by score / length^penalty; above 0 favours longer ones",
            );
        ui.checkbox(&mut p.early_stopping, "Early stopping")
            .on_hover_text("Stop as soon as as many hypotheses as beams have finished");
    }
    if uses(&["diverse-beam"]) {
        ui.add(egui::Slider::new(&mut p.groups, 1..=8).text("Groups"))
            .on_hover_text(
                "The beams are split into this many groups (beams must be a multiple of it)",
            );
        ui.add(egui::Slider::new(&mut p.diversity, 0.0..=5.0).text("Diversity"))
            .on_hover_text("Penalty for choosing a token an earlier group chose at the same step");
    }
    if uses(&["contrastive", "momentum", "opera", "cad"]) {
        let range = if method == "cad" {
            0.0..=5.0
        } else {
            0.0..=1.0
        };
        ui.add(egui::Slider::new(&mut p.alpha, range).text("Alpha"))
            .on_hover_text(match method.as_str() {
                "contrastive" => {
                    "Weight of the degeneration penalty (similarity to earlier tokens)"
                }
                "momentum" => "Weight of the resistance against closing a repeated loop",
                "opera" => "Weight of the over-trust penalty",
                _ => "How much the context's evidence is amplified against the prompt alone",
            });
    }
    if uses(&["contrastive", "momentum", "opera"]) {
        ui.add(egui::Slider::new(&mut p.candidates, 1..=32).text("Candidates"))
            .on_hover_text("Top tokens scored at every step");
    }
    if uses(&["opera"]) {
        ui.add(egui::Slider::new(&mut p.retrospect, 0..=30).text("Retrospection"))
            .on_hover_text(
                "Roll back once the same summary token has won this many steps (0 = never)",
            );
    }
    if uses(&["cad"]) {
        let label = ui.label("Context for CAD");
        let mut context = p.context.clone().unwrap_or_default();
        ui.add(
            egui::TextEdit::multiline(&mut context)
                .desired_rows(3)
                .hint_text("A document the answer should follow"),
        )
        .labelled_by(label.id);
        p.context = Some(context);
    }
    ui.add_space(4.0);
}

/// Entropy-adaptive decoding: when the full model takes over, and how long a model keeps the text.
fn adaptive_ui(ui: &mut egui::Ui, settings: &mut RunSettings) {
    let p = &mut settings.entropy;
    ui.add(egui::Slider::new(&mut p.threshold, 0.0..=6.0).text("Entropy threshold (nats)"))
        .on_hover_text(
            "The full model decodes while the rolling mean entropy is at least this; below it, the model with \
             its middle third of layers skipped does. The full model decodes the first token. 0 = always the full model",
        );
    ui.add(egui::Slider::new(&mut p.window, 1..=32).text("Entropy window"))
        .on_hover_text("Tokens the rolling mean entropy covers");
    ui.add(egui::Slider::new(&mut p.min_dwell, 1..=32).text("Minimum dwell"))
        .on_hover_text("Tokens one model decodes before it may hand over to the other");
    ui.add_space(4.0);
}

/// What the run records of the model's insides, for the Logit lens and Attention panels.
fn inspect_ui(ui: &mut egui::Ui, settings: &mut RunSettings) {
    ui.horizontal_wrapped(|ui| {
        ui.checkbox(&mut settings.inspect.lens, "Record logit lens")
            .on_hover_text(
                "For each token, the top token at every layer (one extra forward per step)",
            );
        ui.checkbox(&mut settings.inspect.attention, "Record attention")
            .on_hover_text(
                "For every prompt position and token, every layer's and head's strongest attention weights \
                 (about 13 KB each in a saved trace)",
            );
    });
}

/// Every run, newest last; click to select, ✕ to close.
fn runs_ui(ui: &mut egui::Ui, ctx: &ViewCtx<'_>) {
    ui.heading("Runs");
    if ctx.store.is_empty() {
        ui.label(RichText::new("No runs yet. Press Run, or open a trace.").weak());
    }
    let selected = ctx.store.selected_key();
    for (key, run) in ctx.store.runs() {
        ui.horizontal(|ui| {
            if ui
                .small_button("Close")
                .on_hover_text("Close this run (a running one is cancelled)")
                .clicked()
            {
                ctx.send(Command::CloseRun(key));
            }
            let text = format!(
                "{} · {} tokens · {}",
                run.label(),
                run.trace.generated_len(),
                run.status.describe()
            );
            // Long labels (forks) wrap instead of widening the panel.
            let button = egui::Button::selectable(selected == Some(key), text).wrap();
            if ui.add(button).clicked() {
                ctx.send(Command::SelectRun(key));
            }
        });
    }
}
