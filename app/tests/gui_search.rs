//! The search, contrast and inspection panels driven headless from the example traces recorded with the real
//! model (assets/traces, see its README): no model and no display needed. Each test picks its step from the
//! trace itself, so re-recording the examples keeps the tests meaningful.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};

use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use specula::gui::panels::tokens::display_text;
use specula::gui::store::{final_output, output_at, removed_at};
use specula::gui::tiles::{default_tree, is_complete};
use specula::gui::{Pane, SpeculaApp};
use specula_core::trace::{StepPayload, Trace, output_tokens};
use support::{at_step, offline_app_with_trace};

fn trace_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/traces")
        .join(name)
}

fn load(name: &str) -> Trace {
    Trace::load(&trace_path(name)).unwrap().remove(0)
}

const SIZE: egui::Vec2 = egui::vec2(1280.0, 800.0);
/// Snapshots: tall enough that the bottom-right tab group (42% of the height) shows its panel whole.
const SHOT: egui::Vec2 = egui::vec2(1600.0, 1300.0);

fn open(name: &str, size: egui::Vec2) -> Harness<'static, SpeculaApp> {
    offline_app_with_trace(trace_path(name), size)
}

fn snapshot(harness: &mut Harness<'_, SpeculaApp>, name: &str) {
    harness.remove_cursor();
    harness.run();
    harness.snapshot(name);
}

#[test]
fn every_pane_is_in_the_default_layout_and_older_layouts_are_replaced() {
    let tree = default_tree();
    assert!(is_complete(&tree));
    // A layout saved before the search panes existed lacks them, so the app falls back to the default.
    let mut old = default_tree();
    let attention = old
        .tiles
        .iter()
        .find(|(_, t)| matches!(t, egui_tiles::Tile::Pane(Pane::Attention)))
        .map(|(id, _)| *id)
        .unwrap();
    old.remove_recursively(attention);
    assert!(!is_complete(&old));
}

#[test]
fn every_tab_title_shows_in_a_1280_point_window() {
    let harness = open("greedy.jsonl", SIZE);
    for pane in Pane::ALL {
        let title = harness.get_by_label(pane.title());
        let rect = title.rect();
        assert!(
            rect.left() >= 0.0 && rect.right() <= SIZE.x && rect.width() > 8.0,
            "{}: {rect:?}",
            pane.title()
        );
    }
}

#[test]
fn the_beam_tree_shows_the_groups_their_hypotheses_and_the_finished_list() {
    let trace = load("diverse-beam.jsonl");
    let (index, beams) = trace
        .steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match &s.payload {
            Some(StepPayload::Beams(b)) if !b.done => Some((i, b.clone())),
            _ => None,
        })
        .nth(5)
        .unwrap();
    let mut harness = open("diverse-beam.jsonl", SIZE);
    at_step(&mut harness, index, Pane::BeamTree);
    harness.get_by_label_contains(&format!(
        "Step {}: {} live hypotheses in {} groups",
        index + 1,
        beams.live.len(),
        beams.groups
    ));
    harness.get_by_label("group 2");
    harness.get_by_label_contains("distinct bigrams between the groups' best");
    for (row, h) in beams.live.iter().enumerate() {
        harness.get_by_label(&format!(
            "step {} hypothesis {}: '{}'",
            index + 1,
            row + 1,
            display_text(&h.last_token)
        ));
    }
    harness.get_by_label_contains("Finished hypotheses");
}

#[test]
fn snapshot_beam_tree() {
    let trace = load("diverse-beam.jsonl");
    let mut harness = open("diverse-beam.jsonl", SHOT);
    at_step(&mut harness, trace.steps.len() / 2, Pane::BeamTree);
    snapshot(&mut harness, "beam_tree");
}

/// The first step of the OPERA example whose rollback came from retrospection.
fn opera_rollback(trace: &Trace) -> usize {
    trace
        .steps
        .iter()
        .position(|s| {
            s.rollback
                .as_ref()
                .is_some_and(|r| r.reason.starts_with("OPERA"))
        })
        .expect("the OPERA example rolls back at least once")
}

#[test]
fn the_opera_map_names_the_summary_token_and_the_rollback() {
    let trace = load("opera.jsonl");
    let step = opera_rollback(&trace);
    let mut harness = open("opera.jsonl", SIZE);
    at_step(&mut harness, step, Pane::OverTrust);
    harness.get_by_label_contains("image-attention term is left out");
    harness.get_by_label_contains("the summary column is output token");
    harness.get_by_label_contains("This step rolled back");
    harness.get_by_label_contains("score = log p (of the hypothesis) − α·over-trust penalty");
    let rollbacks = trace.steps.iter().filter(|s| s.rollback.is_some()).count();
    let plural = if rollbacks == 1 { "" } else { "s" };
    harness.get_by_label(&format!("■ {rollbacks} rollback{plural}"));
}

#[test]
fn snapshot_opera() {
    let trace = load("opera.jsonl");
    // The retrospection step with the largest map.
    let step = (0..trace.steps.len())
        .filter(|&i| {
            trace.steps[i]
                .rollback
                .as_ref()
                .is_some_and(|r| r.reason.starts_with("OPERA"))
        })
        .max_by_key(|&i| match &trace.steps[i].payload {
            Some(StepPayload::Beams(b)) => b.over_trust.as_ref().map_or(0, |m| m.rows.len()),
            _ => 0,
        })
        .unwrap();
    let mut harness = open("opera.jsonl", SHOT);
    at_step(&mut harness, step, Pane::OverTrust);
    snapshot(&mut harness, "opera");
}

#[test]
fn the_stream_follows_rollbacks_and_strikes_through_what_they_took_back() {
    let trace = load("opera.jsonl");
    let step = opera_rollback(&trace);
    // The store's view of the output agrees with the trace schema's.
    for s in 0..trace.steps.len() {
        let ours: Vec<u32> = output_at(&trace, s).iter().map(|t| t.token.id).collect();
        let schema: Vec<u32> = output_tokens(&trace.steps[..=s])
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ours, schema, "step {s}");
    }
    let removed = removed_at(&trace, step);
    assert_eq!(
        removed.len(),
        trace.steps[step].rollback.as_ref().unwrap().removed
    );
    // A taken-back token whose text occurs nowhere in the output at the cursor: shown struck through at the
    // rollback, and gone one step later.
    let shown: Vec<_> = [step, step + 1, trace.steps.len() - 1]
        .iter()
        .flat_map(|&s| output_at(&trace, s))
        .collect();
    let gone = removed
        .iter()
        .map(|t| display_text(&t.token.token))
        .find(|text| shown.iter().all(|t| display_text(&t.token.token) != *text))
        .expect("a taken-back token with a text of its own");
    let mut harness = open("opera.jsonl", SIZE);
    at_step(&mut harness, step, Pane::OverTrust);
    assert!(harness.query_all_by_label(&gone).next().is_some());
    at_step(&mut harness, step + 1, Pane::OverTrust);
    assert!(harness.query_all_by_label(&gone).next().is_none());
}

#[test]
fn contrastive_shows_both_terms_and_the_choice() {
    let trace = load("contrastive.jsonl");
    let (index, c) = trace
        .steps
        .iter()
        .enumerate()
        .find_map(|(i, s)| match &s.payload {
            Some(StepPayload::Contrastive(c)) if c.chosen != 0 => Some((i, c.clone())),
            _ => None,
        })
        .expect("the penalty overturns the model at some step");
    let mut harness = open("contrastive.jsonl", SIZE);
    at_step(&mut harness, index, Pane::Contrastive);
    harness.get_by_label_contains(&format!(
        "{} candidates, score = (1 − α)·p − α·max similarity",
        c.candidates.len()
    ));
    harness.get_by_label("The penalty overturned the model's first choice at this step.");
    let chosen = &c.candidates[c.chosen];
    harness.get_by_label(&format!("{:.3} chosen", chosen.score));
    harness.get_by_label(&format!("{:.3}", (1.0 - c.alpha) * chosen.prob));
    harness.get_by_label(&format!("{:.3}", c.alpha * chosen.max_similarity));
}

#[test]
fn snapshot_contrastive() {
    let trace = load("contrastive.jsonl");
    let index = trace
        .steps
        .iter()
        .position(|s| matches!(&s.payload, Some(StepPayload::Contrastive(c)) if c.chosen != 0))
        .unwrap();
    let mut harness = open("contrastive.jsonl", SHOT);
    at_step(&mut harness, index, Pane::Contrastive);
    snapshot(&mut harness, "contrastive");
}

/// A step of the momentum example where the resistance moved the choice off the most likely token.
fn momentum_step(trace: &Trace) -> usize {
    trace
        .steps
        .iter()
        .position(|s| matches!(&s.payload, Some(StepPayload::Momentum(m)) if m.chosen != 0))
        .expect("the resistance changes the choice at some step")
}

#[test]
fn momentum_shows_the_circuits_and_the_resistance() {
    let trace = load("momentum.jsonl");
    let step = momentum_step(&trace);
    let mut harness = open("momentum.jsonl", SIZE);
    at_step(&mut harness, step, Pane::Momentum);
    harness.get_by_label_contains("score = p − α·R(L)");
    harness.get_by_label("Circuits: repeated n-grams of the text");
    assert!(
        harness.query_all_by_label_contains("×").next().is_some(),
        "the text repeats something by then"
    );
    let Some(StepPayload::Momentum(m)) = &trace.steps[step].payload else {
        panic!()
    };
    if m.candidates.iter().any(|c| c.score.is_none()) {
        assert!(harness.query_all_by_label("barred").next().is_some());
    }
    let chosen = &m.candidates[m.chosen];
    harness.get_by_label(&format!("{:.3} chosen", chosen.score.unwrap()));
}

#[test]
fn snapshot_momentum() {
    let trace = load("momentum.jsonl");
    let mut harness = open("momentum.jsonl", SHOT);
    at_step(&mut harness, momentum_step(&trace), Pane::Momentum);
    snapshot(&mut harness, "momentum");
}

fn cad_step(trace: &Trace) -> usize {
    trace
        .steps
        .iter()
        .position(|s| {
            matches!(&s.payload, Some(StepPayload::Cad(c))
                if c.with_context.first().map(|x| x.id) != c.adjusted.first().map(|x| x.id))
        })
        .expect("contrasting moves the top token at some step")
}

#[test]
fn cad_shows_the_three_distributions() {
    let trace = load("cad.jsonl");
    let step = cad_step(&trace);
    let mut harness = open("cad.jsonl", SIZE);
    at_step(&mut harness, step, Pane::Cad);
    harness.get_by_label("With the context");
    harness.get_by_label("Without the context");
    harness.get_by_label("Contrasted (chosen from)");
    harness.get_by_label_contains("Contrasting moved the top token away");
    harness.get_by_label_contains("Context: ");
}

#[test]
fn snapshot_cad() {
    let trace = load("cad.jsonl");
    let mut harness = open("cad.jsonl", SHOT);
    at_step(&mut harness, cad_step(&trace), Pane::Cad);
    snapshot(&mut harness, "cad");
}

#[test]
fn the_lens_and_attention_say_what_to_do_when_nothing_was_recorded() {
    let mut harness = open("greedy.jsonl", SIZE);
    harness.state_mut().show_pane(Pane::LogitLens);
    harness.run();
    harness.get_by_label("This run did not record the logit lens");
    harness.get_by_label_contains("Tick “Record logit lens”");
    harness.state_mut().show_pane(Pane::Attention);
    harness.run();
    harness.get_by_label("This run did not record attention");
    for pane in [
        Pane::BeamTree,
        Pane::OverTrust,
        Pane::Contrastive,
        Pane::Momentum,
        Pane::Cad,
    ] {
        harness.state_mut().show_pane(pane);
        harness.run();
        assert!(
            harness
                .query_all_by_label_contains("This run used “greedy”")
                .next()
                .is_some(),
            "{}",
            pane.title()
        );
    }
}

#[test]
fn the_lens_grid_and_the_attention_view_read_the_recorded_inspection() {
    let trace = load("lens-attention.jsonl");
    let step = trace.steps.len() / 2;
    let mut harness = open("lens-attention.jsonl", SIZE);
    at_step(&mut harness, step, Pane::LogitLens);
    harness.get_by_label_contains(&format!("Step {}: what each layer would predict", step + 1));
    at_step(&mut harness, step, Pane::Attention);
    let inspection = trace.steps[step].inspection.last().unwrap();
    let map = inspection.attention_map.as_ref().unwrap();
    let layer = *map.layers().last().unwrap();
    harness.get_by_label_contains(&format!(
        "Layer {layer}, max over heads: the {} largest weights (each key's strongest head)",
        map.width()
    ));
    harness.get_by_label("Heads").click();
    harness.run();
    harness.get_by_label("head 3").click();
    harness.run();
    harness.get_by_label_contains(&format!("Layer {layer}, head 3: the"));
    harness.get_by_label_contains("of the row");
    // Back from the cursor's token, position by position, into the prompt, whose every position was recorded.
    let prompt_len = trace.header.prompt.token_ids.len();
    let query = inspection.position - 1;
    for _ in 0..query + 2 - prompt_len {
        harness.get_by_label("Earlier").click();
        harness.run();
    }
    harness.get_by_label_contains(&format!(
        "the attention of prompt position {} (\"",
        prompt_len - 2
    ));
    harness.get_by_label("The cursor's token").click();
    harness.run();
    harness.get_by_label_contains(&format!(
        "the attention of position {query} while it predicted"
    ));
}

#[test]
fn snapshot_logit_lens() {
    let trace = load("lens-attention.jsonl");
    let mut harness = open("lens-attention.jsonl", SHOT);
    at_step(&mut harness, trace.steps.len() - 1, Pane::LogitLens);
    snapshot(&mut harness, "logit_lens");
}

#[test]
fn snapshot_attention() {
    let trace = load("lens-attention.jsonl");
    let mut harness = open("lens-attention.jsonl", SHOT);
    at_step(&mut harness, trace.steps.len() - 1, Pane::Attention);
    snapshot(&mut harness, "attention");
}

#[test]
fn the_entropy_plot_shows_the_threshold_and_the_switches() {
    let trace = load("entropy-adaptive.jsonl");
    let payloads: Vec<_> = trace
        .steps
        .iter()
        .filter_map(|s| match &s.payload {
            Some(StepPayload::EntropyAdaptive(e)) => Some(e.clone()),
            _ => None,
        })
        .collect();
    let full = payloads.iter().filter(|e| e.full_model).count();
    let switches = payloads.iter().filter(|e| e.switched).count();
    assert!(switches > 0, "the example switches models");
    let mut harness = open("entropy-adaptive.jsonl", SIZE);
    at_step(&mut harness, trace.steps.len() - 1, Pane::Plots);
    harness.get_by_label_contains(&format!(
        "full model for {full} of {} tokens",
        payloads.len()
    ));
    harness.get_by_label_contains(&format!("{switches} switch"));
    harness.get_by_label(&format!("threshold {} nats ·", payloads[0].threshold));
}

#[test]
fn snapshot_entropy_adaptive() {
    let trace = load("entropy-adaptive.jsonl");
    let mut harness = open("entropy-adaptive.jsonl", SHOT);
    at_step(&mut harness, trace.steps.len() - 1, Pane::Plots);
    snapshot(&mut harness, "entropy_adaptive");
}

// ---------------------------------------------------------------------------------------------------------------
// Compare: rows are final-output positions, clicks focus committed tokens

/// A token of `run` that is the only widget labelled with its text, so a test can click it; `rows` picks the
/// final-output positions to look at.
fn unique_chip(
    harness: &Harness<'_, SpeculaApp>,
    trace: &Trace,
    rows: impl Iterator<Item = usize>,
) -> Option<(usize, String)> {
    let output = final_output(trace);
    rows.filter_map(|row| output.get(row).map(|t| (row, display_text(&t.token.token))))
        .find(|(_, text)| text.trim().len() > 2 && harness.query_all_by_label(text).count() == 1)
}

#[test]
fn clicking_a_compare_token_of_a_rolled_back_run_focuses_that_token_at_its_step() {
    let mut harness = open("greedy.jsonl", SIZE);
    harness
        .state()
        .send(specula::gui::Command::OpenTrace(Some(trace_path(
            "opera.jsonl",
        ))));
    harness.run();
    let opera = load("opera.jsonl");
    let greedy = load("greedy.jsonl");
    let opera_key = harness.state().store().selected_key().unwrap();
    assert_eq!(
        harness
            .state()
            .store()
            .run(opera_key)
            .unwrap()
            .trace
            .header
            .method,
        "opera"
    );
    harness.state_mut().show_pane(Pane::Compare);
    harness.run();

    // A row past OPERA's rollbacks: the run committed many more tokens than it kept before this one.
    let output = final_output(&opera);
    let after_rollbacks = (0..output.len()).filter(|&row| output[row].index != row);
    let (row, text) = unique_chip(&harness, &opera, after_rollbacks)
        .expect("a uniquely labelled token after a rollback");
    let expected = output[row];
    harness.get_by_label(&text).click();
    harness.run();
    let app = harness.state();
    assert_eq!(app.store().selected_key(), Some(opera_key));
    assert_eq!(
        app.focus(),
        Some(expected.index),
        "row {} ({text:?})",
        row + 1
    );
    assert_eq!(app.cursor().step, expected.step);
    // The row marker follows the focused token to its row, not to the row numbered like its committed index.
    harness.get_by_label(&format!("▶ {}", row + 1));
    assert!(
        harness
            .query_by_label(&format!("▶ {}", expected.index + 1))
            .is_none()
    );

    // A token of the other run selects that run and focuses the token, and the focus survives the next frames.
    let greedy_output = final_output(&greedy);
    // The first rows, which the pane shows without scrolling.
    let (row, text) = unique_chip(&harness, &greedy, 0..greedy_output.len().min(10))
        .expect("a uniquely labelled greedy token");
    harness.get_by_label(&text).click();
    harness.run();
    harness.run();
    let app = harness.state();
    let greedy_key = app.store().selected_key().unwrap();
    assert_ne!(greedy_key, opera_key);
    assert_eq!(app.focus(), Some(greedy_output[row].index));
    assert_eq!(app.cursor().step, greedy_output[row].step);
}

#[test]
fn a_focused_token_a_later_rollback_took_back_marks_its_position_as_replaced() {
    let mut harness = open("greedy.jsonl", SIZE);
    harness
        .state()
        .send(specula::gui::Command::OpenTrace(Some(trace_path(
            "opera.jsonl",
        ))));
    harness.run();
    let opera = load("opera.jsonl");
    let output = final_output(&opera);
    // The last token of a step that is not in the final output: the focus the cursor gives by itself there.
    let step = (0..opera.steps.len())
        .rev()
        .find(|&s| {
            output_at(&opera, s)
                .last()
                .is_some_and(|t| t.step == s && !output.iter().any(|o| o.index == t.index))
        })
        .expect("a step whose newest token was later taken back");
    let taken_back = *output_at(&opera, step).last().unwrap();
    at_step(&mut harness, step, Pane::Compare);
    harness.get_by_label(&format!("▷ {}", taken_back.output_index + 1));
    assert!(harness.query_by_label_contains("▶").is_none());
}

// ---------------------------------------------------------------------------------------------------------------
// Short windows: every pane scrolls to its last widget

/// The lowest widget with text in `pane` (the pane is a named region in the accessibility tree), and its rect.
fn lowest_widget(harness: &Harness<'_, SpeculaApp>, pane: Pane) -> (String, egui::Rect) {
    let name = pane.region_name();
    let region = harness.get_by_role_and_label(egui::accesskit::Role::Region, &name);
    region
        .query_all_by(|n| {
            n.bounding_box().is_some() && (n.label().is_some() || n.value().is_some())
        })
        .map(|n| {
            let text = n.accesskit_node().label().or(n.value()).unwrap_or_default();
            (text, n.rect())
        })
        .max_by(|a, b| a.1.bottom().total_cmp(&b.1.bottom()))
        .expect("the pane shows some text")
}

#[test]
fn every_pane_scrolls_to_its_lowest_widget_in_an_800_point_window() {
    let cases = [
        ("diverse-beam.jsonl", Pane::BeamTree),
        ("opera.jsonl", Pane::OverTrust),
        ("contrastive.jsonl", Pane::Contrastive),
        ("momentum.jsonl", Pane::Momentum),
        ("cad.jsonl", Pane::Cad),
        ("lens-attention.jsonl", Pane::LogitLens),
        ("lens-attention.jsonl", Pane::Attention),
        ("speculative.jsonl", Pane::TokenStream),
        ("speculative.jsonl", Pane::Stats),
        ("speculative.jsonl", Pane::Candidates),
        ("speculative.jsonl", Pane::DraftTree),
        ("early-exit.jsonl", Pane::DraftTree),
        ("speculative.jsonl", Pane::Plots),
        ("speculative.jsonl", Pane::Acceptance),
        ("speculative.jsonl", Pane::Speedup),
        ("speculative.jsonl", Pane::Sweep),
        ("entropy-adaptive.jsonl", Pane::Plots),
    ];
    let mut cut_off = Vec::new();
    for (name, pane) in cases {
        let mut harness = open(name, SIZE);
        let steps = load(name).steps.len();
        for step in [steps / 3, steps - 1] {
            at_step(&mut harness, step, pane);
            let view = harness.state().pane_rect(pane).unwrap();
            let (text, before) = lowest_widget(&harness, pane);
            if before.bottom() > view.bottom() {
                cut_off.push((pane, text.clone()));
            }
            // As a screen reader (or a keyboard user tabbing down) would: ask for the widget to be shown.
            let name = pane.region_name();
            let region = harness.get_by_role_and_label(egui::accesskit::Role::Region, &name);
            let lowest = region
                .query_all_by(|n| {
                    n.bounding_box().is_some() && (n.label().is_some() || n.value().is_some())
                })
                .max_by(|a, b| a.rect().bottom().total_cmp(&b.rect().bottom()))
                .unwrap();
            lowest.scroll_to_me();
            harness.run();
            let (_, after) = lowest_widget(&harness, pane);
            assert!(
                after.bottom() <= view.bottom() + 0.5 && after.top() >= view.top() - 0.5,
                "{name}, {pane:?} at step {}: {text:?} is at {after:?}, outside the pane {view:?}",
                step + 1
            );
        }
    }
    // The window is short enough that the tallest panes do not fit, so the test above is about scrolling.
    assert!(
        cut_off.iter().any(|(p, _)| *p == Pane::OverTrust),
        "the OPERA pane fits at 800 points; the test no longer shows scrolling (cut off: {cut_off:?})"
    );
}
