//! The speculative-decoding views driven headless: a small synthetic speculative trace (spec_trace/mod.rs, header
//! copied from assets/traces/greedy.jsonl) and the example recorded with the real model
//! (assets/traces/speculative.jsonl), opened through the app as files would be.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod spec_trace;
mod support;

use support::{at_step, offline_app_with_trace};

use std::path::{Path, PathBuf};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use spec_trace::speculative_trace;
use specula::gui::{Pane, SpeculaApp};
use specula_core::trace::{
    DraftKind, DraftStatus, ExportOptions, SpeculativeStep, StepPayload, Trace,
};

fn trace_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/traces")
        .join(name)
}

fn harness_with(
    trace: &Trace,
    size: egui::Vec2,
) -> (Harness<'static, SpeculaApp>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("speculative.jsonl");
    let mut file = std::fs::File::create(&path).unwrap();
    trace
        .write_jsonl(&mut file, ExportOptions::default())
        .unwrap();
    (offline_app_with_trace(path, size), dir)
}

const SIZE: egui::Vec2 = egui::vec2(1280.0, 800.0);

#[test]
fn the_draft_tree_shows_every_node_and_the_residual_of_a_rejection() {
    let (mut harness, _dir) = harness_with(&speculative_trace(), SIZE);
    at_step(&mut harness, 0, Pane::DraftTree);
    harness.get_by_label_contains(
        "the layer-skip drafter proposed 4 tokens (draft length 4); sampling verification",
    );
    harness.get_by_label("Drafter note: skipped layers 8–23 of 30");
    harness.get_by_label("' The' at depth 1: accepted");
    harness.get_by_label("' sky' at depth 2: rejected");
    harness.get_by_label("' air' at depth 2: rejected");
    harness.get_by_label("' blue' at depth 3: never checked");
    harness.get_by_label("' color' at depth 2: corrected");
    harness.get_by_label_contains("Click a draft to see why");
    assert!(
        harness.query_by_label("' light'").is_none(),
        "no distribution before a click"
    );

    harness
        .get_by_label("' sky' at depth 2: rejected")
        .click_accesskit();
    harness.run();
    harness.get_by_label(
        "The target gave ' sky' p = 0.31, the drafter q = 0.62: accepted with probability p/q = 0.50 — rejected; \
         the replacement ' color' was drawn from what the target wanted more than the drafter.",
    );
    harness.get_by_label_contains("The residual norm(max(0, p − q)) at depth 2");
    harness.get_by_label("' light'");
    harness.get_by_label("30.0%");

    // An accepted node explains itself but shows no distribution.
    harness
        .get_by_label("' The' at depth 1: accepted")
        .click_accesskit();
    harness.run();
    harness.get_by_label_contains("p ≥ q, so it is always accepted — accepted.");
    assert!(harness.query_by_label("' light'").is_none());
}

/// Lookahead's SJD nodes in the tree: a sampled guess and the argmax sibling tested after it, explained with the
/// residual the sibling met.
#[test]
fn the_draft_tree_explains_a_sampled_guess_and_its_argmax_sibling() {
    let mut trace = speculative_trace();
    let Some(StepPayload::Speculative(spec)) = trace.steps[0].payload.as_mut() else {
        panic!("the synthetic trace starts with a speculative step");
    };
    spec.drafter = "lookahead".into();
    spec.nodes[1].kind = DraftKind::Sampled;
    let sibling = &mut spec.nodes[3];
    sibling.kind = DraftKind::ArgmaxSibling;
    sibling.q = 1.0;
    sibling.residual = Some(0.04);
    let (mut harness, _dir) = harness_with(&trace, SIZE);
    at_step(&mut harness, 0, Pane::DraftTree);
    harness
        .get_by_label("' air' at depth 2: rejected")
        .click_accesskit();
    harness.run();
    harness.get_by_label(
        "' air' is the most likely token of the q its sampled sibling was drawn from, proposed after that sibling \
         as a point mass (q = 1). The target gave ' air' p = 0.05, but it was tested after an earlier sibling was \
         rejected, against the residual norm(max(0, p − q)) that left it 0.04; the drafter q = 1.00: accepted \
         with probability 0.04 — rejected; the replacement ' color' was drawn from what the target wanted more \
         than the drafter.",
    );
    harness
        .get_by_label("' sky' at depth 2: rejected")
        .click_accesskit();
    harness.run();
    harness.get_by_label_contains(
        "The drafter sampled ' sky' from its q. The target gave ' sky' p = 0.31",
    );
}

#[test]
fn the_bonus_token_shows_the_target_distribution() {
    let (mut harness, _dir) = harness_with(&speculative_trace(), SIZE);
    at_step(&mut harness, 1, Pane::DraftTree);
    harness.get_by_label("' sky' at depth 3: accepted");
    harness
        .get_by_label("' is' at depth 5: bonus")
        .click_accesskit();
    harness.run();
    harness.get_by_label_contains("Every draft was accepted");
    harness.get_by_label_contains("The target's distribution p at depth 5");
    harness.get_by_label("' so'");
}

#[test]
fn tokens_are_coloured_by_source_and_the_scale_can_be_changed() {
    let (mut harness, _dir) = harness_with(&speculative_trace(), SIZE);
    harness.get_by_label("Colour = where the token came from:");
    harness.get_by_label(" accepted draft ");
    harness.get_by_label(" corrected (after a rejection) ");
    harness.get_by_label(" bonus (all drafts accepted) ");
    harness.get_by_label("Colour by").click();
    harness.run();
    harness.get_by_label("entropy").click();
    harness.run();
    harness.get_by_label("Colour = entropy of the model's distribution (nats):");
}

#[test]
fn statistics_and_acceptance_plots_show_the_figures() {
    let trace = speculative_trace();
    let drafted: usize = trace.steps.iter().map(|s| s.draft_n).sum();
    let accepted: usize = trace.steps.iter().map(|s| s.draft_n_accepted).sum();
    let (mut harness, _dir) = harness_with(&trace, SIZE);
    at_step(&mut harness, 3, Pane::Stats);
    harness.get_by_label("Acceptance rate");
    harness.get_by_label(&format!("{:.1}%", accepted as f64 * 100.0 / drafted as f64));
    harness.get_by_label("Mean accepted tokens per target forward (MAT)");
    harness.get_by_label("Tokens committed per step (acceptance histogram)");
    harness.state_mut().show_pane(Pane::Acceptance);
    harness.run();
    harness.get_by_label("Alpha per step (mean over depths): the chance a draft is accepted");
}

#[test]
fn a_plain_run_gets_an_empty_state_that_says_what_to_do() {
    let plain = Trace::load(&trace_path("greedy.jsonl")).unwrap().remove(0);
    let (mut harness, _dir) = harness_with(&plain, SIZE);
    harness.state_mut().show_pane(Pane::DraftTree);
    harness.run();
    harness.get_by_label("No draft tree");
    harness.get_by_label_contains("Pick “speculative” as the method");
    harness.get_by_label("Colour = probability the model gave the token:");
}

#[test]
fn snapshot_draft_tree() {
    let (mut harness, _dir) = harness_with(&speculative_trace(), egui::vec2(1600.0, 900.0));
    at_step(&mut harness, 0, Pane::DraftTree);
    harness
        .get_by_label("' sky' at depth 2: rejected")
        .click_accesskit();
    harness.run();
    harness.remove_cursor();
    harness.run();
    harness.snapshot("draft_tree");
}

/// The example trace recorded with the real model (see `record_speculative_example_trace`).
fn recorded() -> Trace {
    Trace::load(&trace_path("speculative.jsonl"))
        .unwrap()
        .remove(0)
}

#[test]
fn the_recorded_example_opens_and_explains_its_steps() {
    let trace = recorded();
    let (mut harness, _dir) = harness_with(&trace, SIZE);
    // Find a step with an accepted draft followed by a rejection, and check its tree and its residual.
    let (index, spec) = trace
        .steps
        .iter()
        .enumerate()
        .find_map(|(i, s)| match &s.payload {
            Some(StepPayload::Speculative(p))
                if !p.accepted_path.is_empty()
                    && p.rejection.as_ref().is_some_and(|r| !r.bonus) =>
            {
                Some((i, p.clone()))
            }
            _ => None,
        })
        .unwrap();
    at_step(&mut harness, index, Pane::DraftTree);
    let rejected = spec
        .nodes
        .iter()
        .find(|n| n.status == DraftStatus::Rejected)
        .unwrap();
    let label = format!("'{}' at depth {}: rejected", rejected.token, rejected.depth);
    harness.get_by_label(&label).click_accesskit();
    harness.run();
    harness.get_by_label_contains("The residual norm(max(0, p − q))");
    let runner_up = &spec.rejection.as_ref().unwrap().distribution[1];
    harness.get_by_label(&format!("'{}'", runner_up.token));
}

#[test]
fn snapshot_acceptance() {
    let (mut harness, _dir) = harness_with(&recorded(), egui::vec2(1600.0, 900.0));
    at_step(&mut harness, 20, Pane::Acceptance);
    harness.remove_cursor();
    harness.run();
    harness.snapshot("acceptance");
}

#[test]
fn snapshot_speculative_statistics() {
    let (mut harness, _dir) = harness_with(&speculative_trace(), egui::vec2(1280.0, 800.0));
    at_step(&mut harness, 11, Pane::Stats);
    harness.remove_cursor();
    harness.run();
    harness.snapshot("speculative_statistics");
}

#[test]
fn the_speculative_method_shows_its_parameters() {
    let (mut harness, _dir) = harness_with(&speculative_trace(), SIZE);
    assert!(
        harness.query_by_label("Drafter").is_none(),
        "greedy has no drafter"
    );
    harness.state_mut().settings_mut().run.method = "speculative".into();
    harness.run();
    harness.get_by_label("Drafter");
    assert!(harness.query_all_by_label("Draft length").next().is_some());
    assert!(harness.query_by_label("Stop threshold").is_some());
    harness.get_by_label("Stop threshold").click();
    harness.run();
    let settings = &mut harness.state_mut().settings_mut().run;
    settings.drafter = "layer-skip".into();
    settings.draft_len = 6;
    let spec = settings.run_spec();
    assert_eq!(spec.method, "speculative");
    assert_eq!(spec.params.speculative.drafter, "layer-skip");
    assert_eq!(spec.params.speculative.draft_len, 6);
    assert_eq!(spec.params.speculative.adaptive, Some(0.5));
    assert_eq!(spec.params.speculative.draft_cost, None);

    // The cost-aware policy replaces the threshold and shows its own slider.
    harness.get_by_label("Cost-aware").click();
    harness.run();
    assert!(
        harness
            .query_all_by_label("Cost per draft")
            .next()
            .is_some()
            && harness
                .query_all_by_label("Growth per 1k context")
                .next()
                .is_some()
    );
    let spec = harness.state_mut().settings_mut().run.run_spec();
    assert_eq!(spec.params.speculative.adaptive, None);
    assert_eq!(spec.params.speculative.draft_cost, Some(0.3));
    // With its growth per 1,000 tokens of context; at 0 the cost is the same at every length.
    assert_eq!(spec.params.speculative.draft_cost_growth, Some(0.2));
    harness.state_mut().settings_mut().run.draft_cost_growth = 0.0;
    let spec = harness.state_mut().settings_mut().run.run_spec();
    assert_eq!(spec.params.speculative.draft_cost_growth, None);

    // Siblings: a slider for the chain drafters with a real q, reaching their runs; other drafters get 1.
    assert!(harness.query_all_by_label("Siblings").next().is_some());
    harness.state_mut().settings_mut().run.siblings = 3;
    let spec = harness.state_mut().settings_mut().run.run_spec();
    assert_eq!(spec.params.speculative.siblings, 3);
    harness.state_mut().settings_mut().run.drafter = "prompt-lookup".into();
    harness.run();
    assert!(harness.query_all_by_label("Siblings").next().is_none());
    let spec = harness.state_mut().settings_mut().run.run_spec();
    assert_eq!(spec.params.speculative.siblings, 1);
}

/// The prompt panel with speculative decoding and the cost-aware draft length chosen.
#[test]
fn snapshot_speculative_settings() {
    let (mut harness, _dir) = harness_with(&speculative_trace(), SIZE);
    harness.state_mut().settings_mut().run.method = "speculative".into();
    harness.run();
    harness.get_by_label("Cost-aware").click();
    harness.run();
    harness.remove_cursor();
    harness.run();
    harness.snapshot("speculative_settings");
}

/// Token recycling's tree size, template and kept matrix show for that drafter only, and reach the run.
#[test]
fn token_recycling_shows_its_tree_and_matrix_options() {
    let (mut harness, _dir) = harness_with(&speculative_trace(), SIZE);
    harness.state_mut().settings_mut().run.method = "speculative".into();
    harness.run();
    assert!(
        harness
            .query_by_label("Keep the matrix across runs")
            .is_none()
    );
    harness.state_mut().settings_mut().run.drafter = "token-recycling".into();
    harness.run();
    assert!(harness.query_all_by_label("Tree size").next().is_some());
    harness.get_by_label("Tree template");
    let spec = harness.state_mut().settings_mut().run.run_spec();
    assert!(!spec.params.speculative.keep_matrix, "off by default");
    harness.get_by_label("Keep the matrix across runs").click();
    harness.run();
    let settings = &mut harness.state_mut().settings_mut().run;
    settings.tree_size = 80;
    settings.tree_template = "paper".into();
    let sp = settings.run_spec().params.speculative;
    assert!(sp.keep_matrix);
    assert_eq!((sp.tree_size, sp.tree_template.as_str()), (80, "paper"));
}

#[test]
fn search_methods_show_their_parameters_and_cad_its_context() {
    let trace = speculative_trace();
    let (mut harness, _dir) = harness_with(&trace, egui::vec2(1280.0, 900.0));
    harness.state_mut().settings_mut().run.method = "cad".into();
    harness.run();
    let shown = |h: &Harness<'static, SpeculaApp>, label: &str| {
        h.query_all_by_label(label).next().is_some()
    };
    assert!(shown(&harness, "Context for CAD"));
    assert!(!shown(&harness, "Beams"));
    harness.state_mut().settings_mut().run.search.context = Some("The sea is purple.".into());
    let spec = harness.state_mut().settings_mut().run.run_spec();
    assert_eq!(
        spec.params.search.context.as_deref(),
        Some("The sea is purple.")
    );
    harness.state_mut().settings_mut().run.method = "diverse-beam".into();
    harness.run();
    assert!(shown(&harness, "Beams") && shown(&harness, "Groups"));
    assert!(!shown(&harness, "Context for CAD"));
}

/// A trace made with the 2026-12-05 version's `--prompt-tiles` says so in its statistics, since its prompt was
/// rounded differently.
#[test]
fn run_statistics_name_the_prompt_matmul() {
    let mut trace = speculative_trace();
    trace.header.model.prompt_matmul = Some("amx-tiles".into());
    let (mut harness, _dir) = harness_with(&trace, SIZE);
    harness.get_by_label("Run statistics").click();
    harness.run();
    harness.get_by_label("Prompt matmul");
    harness.get_by_label("amx-tiles");
    assert!(harness.query_all_by_label("Matmul").next().is_none());
}

/// A trace made in the block-sums arithmetic says so in its statistics: every forward was rounded as llama.cpp's
/// AMX kernels round, not as `vec_dot` does.
#[test]
fn run_statistics_name_the_block_sums_arithmetic() {
    let mut trace = speculative_trace();
    trace.header.model.matmul = Some("block-sums".into());
    let (mut harness, _dir) = harness_with(&trace, SIZE);
    harness.get_by_label("Run statistics").click();
    harness.run();
    harness.get_by_label("Matmul");
    harness.get_by_label("block-sums");
    assert!(harness.query_all_by_label("Prompt matmul").next().is_none());
}

fn early_exit_example() -> Trace {
    Trace::load(&trace_path("early-exit.jsonl"))
        .unwrap()
        .remove(0)
}

/// The step of the early-exit example whose draft was accepted (the drafter had moved off its usual exit).
fn accepted_early_exit_step(trace: &Trace) -> (usize, SpeculativeStep) {
    trace
        .steps
        .iter()
        .enumerate()
        .find_map(|(i, s)| match &s.payload {
            Some(StepPayload::Speculative(p)) if !p.accepted_path.is_empty() => {
                Some((i, (**p).clone()))
            }
            _ => None,
        })
        .unwrap()
}

/// The early-exit example, recorded with the real model: beside the draft tree, every candidate exit with its
/// estimated acceptance, the last root's shadow token and best length, and the exit the drafter took marked.
#[test]
fn the_early_exit_example_shows_every_exit_and_the_one_taken() {
    let trace = early_exit_example();
    let (index, spec) = accepted_early_exit_step(&trace);
    let exits = spec.exit_layers.unwrap();
    let (mut harness, _dir) = harness_with(&trace, SIZE);
    at_step(&mut harness, index, Pane::DraftTree);
    harness.get_by_label("Exit layers");
    harness.get_by_label_contains(&format!(
        "Drafted from the exit after layer {} (the exit with the most expected tokens per unit of cost)",
        exits.chosen - 1
    ));
    for e in &exits.exits {
        let marker = if e.layers == exits.chosen { " ◀" } else { "" };
        harness.get_by_label(&format!("layer {}{marker}", e.layers - 1));
    }
    // The first steps have seen no verified root yet: every exit at the prior, no shadow token.
    at_step(&mut harness, 0, Pane::DraftTree);
    assert_eq!(
        harness.query_all_by_label("50.0%").count(),
        exits.exits.len()
    );
}

#[test]
fn snapshot_early_exit() {
    let trace = early_exit_example();
    let (index, _) = accepted_early_exit_step(&trace);
    let (mut harness, _dir) = harness_with(&trace, egui::vec2(1600.0, 900.0));
    at_step(&mut harness, index, Pane::DraftTree);
    harness.remove_cursor();
    harness.run();
    harness.snapshot("early_exit");
}
