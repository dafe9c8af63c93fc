//! Speculative decoding on the real default model: greedy losslessness of every drafter against plain greedy,
//! what a speculative step records in the trace, and parameter checks. The sampling verifier's exactness is in
//! speculative_sampling/.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;
mod draft_model;

use std::sync::OnceLock;

use common::{model, spec, speculative_params};
use specula_core::Trace;
use specula_core::methods::speculative::cost_aware_length;
use specula_core::methods::speculative::token_recycling::SharedMatrix;
use specula_core::sampling::warp;
use specula_core::trace::{StepPayload, TokenSource};
use specula_core::{MethodParams, Model, SamplingParams, generate};

const MAX_TOKENS: usize = 24;

/// First turns of Spec-Bench questions whose chat-wrapped prompt stays under 200 tokens.
fn spec_bench_prompts(n: usize) -> Vec<String> {
    let path = common::workspace_root().join("assets/spec-bench/question.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let tok = &model().tokenizer;
    let mut out = Vec::new();
    // Every 4th question, to cover the categories (writing, roleplay, math, coding, extraction, ...).
    for line in text.lines().step_by(4) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let q = v["turns"][0].as_str().unwrap().to_owned();
        let ids = tok.encode(&tok.render_chat(&q, None)).unwrap();
        if ids.len() < 200 {
            out.push(q);
        }
        if out.len() == n {
            break;
        }
    }
    assert_eq!(out.len(), n, "not enough short Spec-Bench prompts");
    out
}

/// Plain greedy on the lossless prompts, computed once for every drafter's test.
fn greedy_baseline() -> &'static [(String, Trace)] {
    static BASELINE: OnceLock<Vec<(String, Trace)>> = OnceLock::new();
    BASELINE.get_or_init(|| {
        spec_bench_prompts(20)
            .into_iter()
            .map(|prompt| {
                let trace = generate(
                    model(),
                    spec("greedy", &prompt, MethodParams::default(), MAX_TOKENS, 0),
                )
                .unwrap();
                (prompt, trace)
            })
            .collect()
    })
}

/// For each drafter: token-identical to plain greedy, with no tolerance. The verifier takes the tree forward's
/// own argmax, and a multi-token forward returns the logits single-token steps return, bit for bit (model.rs
/// tests it), so speculation cannot part from plain greedy even at a near-tie.
fn greedy_lossless(drafter: &str) {
    greedy_lossless_with(speculative_params(drafter, SamplingParams::greedy()));
}

fn greedy_lossless_with(params: MethodParams) {
    let drafter = params.speculative.drafter.clone();
    let started = std::time::Instant::now();
    let baseline = greedy_baseline();
    let (mut drafted, mut accepted, mut calls, mut tokens) = (0u64, 0u64, 0u64, 0u64);
    for (prompt, plain) in baseline {
        let spec_trace = generate(
            model(),
            spec("speculative", prompt, params.clone(), MAX_TOKENS, 0),
        )
        .unwrap();
        let s = spec_trace.summary.as_ref().unwrap();
        drafted += s.draft_n;
        accepted += s.draft_n_accepted;
        calls += s.target_forward_calls;
        tokens += s.generated_tokens as u64;
        assert_eq!(
            s.token_ids,
            plain.summary.as_ref().unwrap().token_ids,
            "{drafter}: differs from plain greedy on {prompt:?}"
        );
    }
    eprintln!(
        "{drafter}: {} of {} prompts identical; acceptance {accepted}/{drafted}; {tokens} tokens in {calls} target \
         forwards; {:.1} s",
        baseline.len(),
        baseline.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn greedy_lossless_lookahead() {
    greedy_lossless("lookahead");
}

#[test]
fn greedy_lossless_prompt_lookup() {
    greedy_lossless("prompt-lookup");
}

#[test]
fn greedy_lossless_layer_skip() {
    greedy_lossless("layer-skip");
}

/// Layer skip with three siblings at the first position (the first draft's two runners-up beside it): still
/// token-identical to plain greedy, and every step that drafted tested three tokens there.
#[test]
fn greedy_lossless_layer_skip_with_siblings() {
    let mut params = speculative_params("layer-skip", SamplingParams::greedy());
    params.speculative.siblings = 3;
    greedy_lossless_with(params.clone());
    let (prompt, _) = &greedy_baseline()[0];
    let trace = generate(model(), spec("speculative", prompt, params, MAX_TOKENS, 0)).unwrap();
    let mut drafted = 0;
    for step in &trace.steps {
        let Some(StepPayload::Speculative(p)) = &step.payload else {
            continue;
        };
        if p.nodes.is_empty() {
            continue;
        }
        drafted += 1;
        let first: Vec<u32> = p
            .nodes
            .iter()
            .filter(|n| n.parent.is_none())
            .map(|n| n.id)
            .collect();
        assert_eq!(first.len(), 3, "{p:?}");
        assert!(first[0] != first[1] && first[1] != first[2] && first[0] != first[2]);
    }
    assert!(drafted > 0);
}

#[test]
fn greedy_lossless_token_recycling() {
    greedy_lossless("token-recycling");
}

#[test]
fn greedy_lossless_early_exit() {
    greedy_lossless("early-exit");
}

/// The cost-aware draft length, on the drafters with point masses (prompt lookup's per-match acceptance) and
/// with a real q (layer skip's confidence): still token-identical to plain greedy.
#[test]
fn greedy_lossless_cost_aware() {
    for drafter in ["prompt-lookup", "layer-skip"] {
        let mut params = speculative_params(drafter, SamplingParams::greedy());
        params.speculative.draft_cost = Some(0.3);
        params.speculative.draft_len = 8;
        greedy_lossless_with(params);
    }
}

/// The cost-aware policy drafts only what pays for its verification: at no cost prompt lookup drafts exactly
/// what the fixed length drafts; at a cost of one step per drafted token no draft can pay (a round commits
/// fewer than k + 1 tokens), so nobody drafts; in between, prompt lookup drafts after some matches and not
/// after others, and says so in its notes.
#[test]
fn cost_aware_length_drafts_only_what_pays() {
    let prompt = "Repeat exactly: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.";
    let run = |drafter: &str, cost: Option<f32>| {
        let mut params = speculative_params(drafter, SamplingParams::greedy());
        params.speculative.draft_cost = cost;
        generate(model(), spec("speculative", prompt, params, 60, 0)).unwrap()
    };
    let drafted = |t: &Trace| t.summary.as_ref().unwrap().draft_n;
    let ids = |t: &Trace| t.summary.as_ref().unwrap().token_ids.clone();
    let fixed = run("prompt-lookup", None);
    let free = run("prompt-lookup", Some(0.0));
    assert!(drafted(&fixed) > 0);
    assert_eq!(drafted(&free), drafted(&fixed));
    assert_eq!(ids(&free), ids(&fixed));
    for drafter in ["prompt-lookup", "layer-skip", "token-recycling"] {
        let dear = run(drafter, Some(1.0));
        assert_eq!(
            drafted(&dear),
            0,
            "{drafter} drafted at a cost of one step per token"
        );
        assert_eq!(ids(&dear), ids(&fixed));
    }
    // Each draft is at most the length the match's own acceptance pays for (less only where the context ends).
    let cost = 0.45;
    let priced = run("prompt-lookup", Some(cost));
    assert_eq!(ids(&priced), ids(&fixed));
    let (mut plain_steps, mut drafting_steps) = (0, 0);
    for note in notes(&priced).iter().filter(|n| n.starts_with("matched")) {
        let number_after = |key: &str| -> f64 {
            let at = note.find(key).unwrap_or_else(|| panic!("{note:?}")) + key.len();
            let text: String = note[at..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            text.parse().unwrap()
        };
        let proposed = number_after("proposed ") as usize;
        let acceptance = number_after("such matches ");
        let pays = cost_aware_length(acceptance, f64::from(cost), 4);
        assert!(proposed <= pays, "{note:?}: the policy pays for {pays}");
        if pays == 0 {
            plain_steps += 1;
        } else {
            drafting_steps += 1;
        }
    }
    assert!(
        plain_steps > 0 && drafting_steps > 0,
        "{:?}",
        notes(&priced)
    );
}

/// A cost that grows with the context (every verified token attends over the whole cache) prices drafts by the
/// context they are verified after: prompt lookup drafts early, and drafts nothing once the context has made a
/// drafted token cost a whole step (no draft can pay then); the output stays greedy's.
#[test]
fn cost_aware_length_prices_drafts_by_their_context() {
    // Raw text (no chat template) that the model goes on repeating, so the run is long and matches abound.
    let prompt = "the quick brown fox jumps over the lazy dog, ".repeat(12);
    let mut params = speculative_params("prompt-lookup", SamplingParams::greedy());
    params.speculative.draft_cost = Some(0.2);
    params.speculative.draft_cost_growth = Some(2.0);
    // 0.2 + 2.0 · 400 / 1000: a drafted token costs a whole step from 400 tokens of context on.
    let dear_from = 400;
    assert!(params.speculative.draft_cost_at(dear_from) >= Some(1.0));
    assert!(params.speculative.draft_cost_at(dear_from - 1) < Some(1.0));
    let raw = |method: &str, params: MethodParams| {
        let mut spec = spec(method, &prompt, params, 330, 0);
        spec.prompt.chat = false;
        generate(model(), spec).unwrap()
    };
    let trace = raw("speculative", params.clone());
    let plain = raw(
        "greedy",
        speculative_params("prompt-lookup", SamplingParams::greedy()),
    );
    assert_eq!(
        trace.summary.as_ref().unwrap().token_ids,
        plain.summary.as_ref().unwrap().token_ids
    );
    let mut context = trace.header.prompt.token_ids.len();
    let (mut early, mut late, mut late_steps) = (0, 0, 0);
    for step in &trace.steps {
        // A step drafts after every token committed before it: the context its cost is priced at, which its
        // note gives.
        if let Some(StepPayload::Speculative(p)) = &step.payload {
            let cost = params
                .speculative
                .draft_cost_at(context)
                .unwrap_or_default();
            let priced = format!("a drafted token costs {cost:.2} steps after {context} tokens");
            assert!(p.note.ends_with(&priced), "{:?}: {priced}", p.note);
        }
        if context < dear_from {
            early += step.draft_n;
        } else {
            late += step.draft_n;
            late_steps += 1;
        }
        context += step.tokens.len();
    }
    assert!(
        early > 0,
        "nothing drafted before the context made drafts dear"
    );
    assert!(late_steps > 0, "the run ended before {dear_from} tokens");
    assert_eq!(late, 0, "drafted after {dear_from} tokens of context");
}

/// A speculative run forked from a greedy one (the fork's kept tokens are prefilled after the prompt) drafts and
/// verifies from the right context: forced onto greedy's own token, it goes on exactly as greedy did.
#[test]
fn a_forked_speculative_run_continues_from_the_fork() {
    let prompt = "Explain in three sentences why the sky is blue and sunsets are red.";
    let greedy = generate(
        model(),
        spec(
            "greedy",
            prompt,
            speculative_params("prompt-lookup", SamplingParams::greedy()),
            40,
            0,
        ),
    )
    .unwrap();
    let parent: Vec<_> = greedy.tokens().cloned().collect();
    let kept = 8;
    let mut tokens = parent[..=kept].to_vec();
    tokens[kept].source = TokenSource::Forced;
    let mut forked = spec(
        "speculative",
        prompt,
        speculative_params("prompt-lookup", SamplingParams::greedy()),
        40,
        0,
    );
    forked.fork = Some(specula_core::Fork {
        origin: specula_core::trace::ForkOrigin {
            parent_label: "greedy".into(),
            kept_tokens: kept,
            forced_token_id: parent[kept].id,
        },
        tokens,
    });
    let trace = generate(model(), forked).unwrap();
    let summary = trace.summary.as_ref().unwrap();
    assert_eq!(
        summary.token_ids,
        greedy.summary.as_ref().unwrap().token_ids
    );
    assert!(
        summary.draft_n > 0,
        "prompt lookup never drafted after the fork"
    );
}

#[test]
fn trace_records_the_speculative_story() {
    let prompt = "Repeat exactly: the quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.";
    let trace = generate(
        model(),
        spec(
            "speculative",
            prompt,
            speculative_params("prompt-lookup", SamplingParams::greedy()),
            32,
            0,
        ),
    )
    .unwrap();
    let s = trace.summary.as_ref().unwrap();
    assert!(
        s.draft_n_accepted > 0,
        "prompt lookup should copy something"
    );
    assert!(s.mean_accepted_tokens > 1.0);
    for step in &trace.steps {
        let Some(StepPayload::Speculative(p)) = &step.payload else {
            panic!("every step has a speculative payload");
        };
        assert_eq!(p.accepted_path.len(), step.draft_n_accepted);
        assert_eq!(p.nodes.len(), step.draft_n);
        let n = step.tokens.len();
        // The engine may cut the last step at the token budget or end of generation.
        assert!(n <= step.draft_n_accepted + 1);
        for (i, t) in step.tokens.iter().enumerate() {
            if i < step.draft_n_accepted {
                assert_eq!(t.source, TokenSource::DraftAccepted);
            } else {
                assert!(matches!(
                    t.source,
                    TokenSource::Corrected | TokenSource::Bonus
                ));
            }
        }
    }
    // Positions run on without a gap.
    let positions: Vec<usize> = trace
        .steps
        .iter()
        .flat_map(|s| s.tokens.iter().map(|t| t.position))
        .collect();
    let first = trace.header.prompt.token_ids.len();
    assert_eq!(
        positions,
        (first..first + positions.len()).collect::<Vec<_>>()
    );
}

/// A sampled layer-skip run's steps, checked against the model recomputed from scratch: each drafted node's p is
/// the target's warped probability of its token after the committed text and the nodes above it; the drafter ran
/// a forward per chain node at least (its skip-set search runs more); drafting and verifying both took time.
#[test]
fn each_node_records_the_targets_probability_and_the_step_its_costs() {
    let params = speculative_params("layer-skip", SamplingParams::default());
    let prompt = "Write a short poem about the sea.";
    let trace = generate(model(), spec("speculative", prompt, params.clone(), 24, 5)).unwrap();
    let llama = &model().llama;
    let mut committed = trace.header.prompt.token_ids.clone();
    let mut checked = 0;
    for step in trace.steps.iter().take(6) {
        let Some(StepPayload::Speculative(p)) = &step.payload else {
            panic!("every step has a speculative payload");
        };
        let timing = step.timing.unwrap();
        assert!(
            timing.draft_ms > 0.0 && timing.verify_ms > 0.0,
            "{timing:?}"
        );
        assert!(step.draft_forward_calls as usize >= p.nodes.len());
        // A chain: the committed text, then every node, fed as one sequence.
        let mut fed = committed.clone();
        fed.extend(p.nodes.iter().map(|n| n.id));
        let logits = common::chain(llama, &mut llama.new_cache(), &fed);
        for (i, node) in p.nodes.iter().enumerate() {
            assert_eq!(node.parent, i.checked_sub(1));
            // The position before the node: the root (the last committed token), then node i - 1.
            let before = committed.len() - 1 + i;
            let expected = warp(&logits[before], &params.sampling).prob(node.id);
            let recorded = node.p.unwrap();
            assert!(
                (recorded - expected).abs() < 2e-3,
                "node {i} of {p:?}: p {recorded} recorded, {expected} recomputed"
            );
            checked += 1;
        }
        committed.extend(step.tokens.iter().map(|t| t.id));
    }
    assert!(checked >= 6, "only {checked} nodes checked");
}

#[test]
fn bad_parameters_are_refused() {
    let mut params = speculative_params("no-such-drafter", SamplingParams::greedy());
    assert!(generate(model(), spec("speculative", "Hi", params.clone(), 4, 0)).is_err());
    params.speculative.drafter = "layer-skip".into();
    params.speculative.draft_len = 0;
    assert!(generate(model(), spec("speculative", "Hi", params.clone(), 4, 0)).is_err());
    params.speculative.draft_len = 4;
    params.speculative.skip_layers = vec![99];
    assert!(generate(model(), spec("speculative", "Hi", params.clone(), 4, 0)).is_err());
    params.speculative.skip_layers = vec![];
    params.speculative.tree_template = "no-such-tree".into();
    assert!(generate(model(), spec("speculative", "Hi", params.clone(), 4, 0)).is_err());
    params.speculative.tree_template = "paper".into();
    params.speculative.adaptive = Some(1.5);
    assert!(generate(model(), spec("speculative", "Hi", params.clone(), 4, 0)).is_err());
    // One adaptive policy at a time, and a draft cost no acceptance could pay is refused.
    params.speculative.adaptive = Some(0.5);
    params.speculative.draft_cost = Some(0.3);
    assert!(generate(model(), spec("speculative", "Hi", params.clone(), 4, 0)).is_err());
    params.speculative.adaptive = None;
    params.speculative.draft_cost = Some(3.0);
    assert!(generate(model(), spec("speculative", "Hi", params.clone(), 4, 0)).is_err());
    // Siblings: at most MAX_SIBLINGS, and only for the drafters with a real q.
    params.speculative.draft_cost = None;
    params.speculative.siblings = 9;
    assert!(generate(model(), spec("speculative", "Hi", params.clone(), 4, 0)).is_err());
    params.speculative.siblings = 3;
    params.speculative.drafter = "prompt-lookup".into();
    let err = generate(model(), spec("speculative", "Hi", params.clone(), 4, 0))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("only the drafters with a real q"), "{err:?}");
    params.speculative.drafter = "layer-skip".into();
    assert!(generate(model(), spec("speculative", "Hi", params, 4, 0)).is_ok());
}

/// Token recycling with the paper's tree: its 80 nodes on 6 levels (the template cut nothing), recorded in the
/// header, and still token-identical to plain greedy.
#[test]
fn token_recycling_paper_tree_is_lossless_and_keeps_its_shape() {
    let mut params = speculative_params("token-recycling", SamplingParams::greedy());
    params.speculative.tree_template = "paper".into();
    params.speculative.tree_size = 80;
    params.speculative.draft_len = 6;
    let mut deepest = 0;
    for (prompt, plain) in &greedy_baseline()[..4] {
        let trace = generate(
            model(),
            spec("speculative", prompt, params.clone(), MAX_TOKENS, 0),
        )
        .unwrap();
        assert_eq!(trace.header.params.speculative.tree_template, "paper");
        let s = trace.summary.as_ref().unwrap();
        assert_eq!(s.token_ids, plain.summary.as_ref().unwrap().token_ids);
        for step in &trace.steps {
            let Some(StepPayload::Speculative(p)) = &step.payload else {
                panic!("every step has a speculative payload");
            };
            assert!(p.nodes.len() <= 80);
            assert!(
                p.note.starts_with("paper template of 80 nodes"),
                "{}",
                p.note
            );
            deepest = deepest.max(p.nodes.iter().map(|n| n.depth).max().unwrap_or(0));
        }
    }
    assert_eq!(
        deepest, 6,
        "the paper's tree reaches depth 6 once the matrix fills"
    );
}

/// Token recycling learns from every prompt position, the first tree's root (the prompt's last token)
/// included: on a fresh matrix the root's first candidate is the prefill's own argmax, i.e. plain greedy's first
/// token, so the first step always accepts at least that draft.
#[test]
fn token_recycling_first_tree_starts_from_the_prefill_prediction() {
    let params = recycling_params(false);
    for (prompt, plain) in &greedy_baseline()[..4] {
        let trace = generate(
            model(),
            spec("speculative", prompt, params.clone(), MAX_TOKENS, 0),
        )
        .unwrap();
        let plain_ids = &plain.summary.as_ref().unwrap().token_ids;
        assert_eq!(&trace.summary.as_ref().unwrap().token_ids, plain_ids);
        let Some(StepPayload::Speculative(first)) = &trace.steps[0].payload else {
            panic!("the first step has a speculative payload");
        };
        let root_children: Vec<u32> = first
            .nodes
            .iter()
            .filter(|n| n.parent.is_none())
            .map(|n| n.id)
            .collect();
        assert_eq!(root_children.first(), plain_ids.first(), "{prompt}");
        assert!(!first.accepted_path.is_empty(), "{prompt}");
    }
}

/// A model sharing the default one's weights with a kept matrix of its own: `common::model()` serves the tests
/// running in parallel, and its kept matrix would carry one test's runs into another's.
fn model_with_its_own_matrix() -> Model {
    Model {
        recycled: SharedMatrix::default(),
        ..model().clone()
    }
}

fn recycling_params(keep_matrix: bool) -> MethodParams {
    let mut params = speculative_params("token-recycling", SamplingParams::greedy());
    params.speculative.keep_matrix = keep_matrix;
    params
}

fn notes(trace: &Trace) -> Vec<String> {
    trace
        .steps
        .iter()
        .filter_map(|s| match &s.payload {
            Some(StepPayload::Speculative(p)) => Some(p.note.clone()),
            _ => None,
        })
        .collect()
}

/// `keep_matrix` (the paper's hot start): the first run on a model starts from an empty matrix, exactly as a
/// run that does not keep it; a second run inherits what the first left, says so in its notes and header, and on
/// the same prompt accepts more drafts per forward; a run that does not keep the matrix neither reads nor
/// changes it. Every output stays plain greedy's.
#[test]
fn keep_matrix_carries_token_recycling_from_run_to_run() {
    let model = model_with_its_own_matrix();
    let (prompt, plain) = &greedy_baseline()[1];
    let plain_ids = &plain.summary.as_ref().unwrap().token_ids;
    let run = |params: MethodParams| {
        let trace = generate(&model, spec("speculative", prompt, params, MAX_TOKENS, 0)).unwrap();
        assert_eq!(&trace.summary.as_ref().unwrap().token_ids, plain_ids);
        trace
    };
    let first = run(recycling_params(true));
    assert!(first.header.params.speculative.keep_matrix);
    let rows = model.recycled.filled_rows();
    assert!(rows > 0);
    assert_eq!(model.recycled.runs(), 1);
    let second = run(recycling_params(true));
    assert_eq!(model.recycled.runs(), 2);
    let alone = run(recycling_params(false));
    assert!(!alone.header.params.speculative.keep_matrix);
    assert_eq!(
        model.recycled.runs(),
        2,
        "a run that does not keep it took it"
    );

    let summary = |t: &Trace| t.summary.clone().unwrap();
    // The first kept run drafted exactly what a run with its own matrix drafts.
    assert_eq!(summary(&first).draft_n, summary(&alone).draft_n);
    assert_eq!(
        summary(&first).draft_n_accepted,
        summary(&alone).draft_n_accepted
    );
    assert!(notes(&first)[0].ends_with("matrix kept across runs (0 earlier)"));
    assert!(notes(&second)[0].ends_with("matrix kept across runs (1 earlier)"));
    assert!(!notes(&alone)[0].contains("kept"));
    assert!(
        summary(&second).mean_accepted_tokens > summary(&first).mean_accepted_tokens,
        "a repeat of the prompt on the kept matrix: MAT {} after {}",
        summary(&second).mean_accepted_tokens,
        summary(&first).mean_accepted_tokens
    );
    model.recycled.clear();
    assert_eq!(model.recycled.filled_rows(), 0);
}

#[test]
fn live_parameter_changes_and_adaptive_length_apply_at_the_next_step() {
    let mut params = speculative_params("layer-skip", SamplingParams::greedy());
    params.speculative.skip_layers = (10..20).collect();
    let mut run = specula_core::Run::new(
        model(),
        spec(
            "speculative",
            "Explain how a bicycle works.",
            params.clone(),
            40,
            0,
        ),
    )
    .unwrap();
    let never = std::sync::atomic::AtomicBool::new(false);
    run.step(&never).unwrap();
    run.step(&never).unwrap();
    params.speculative.draft_len = 2;
    run.set_params(params.clone()).unwrap();
    run.step(&never).unwrap();
    params.speculative.adaptive = Some(0.5);
    params.speculative.draft_len = 16;
    run.set_params(params).unwrap();
    while !run.is_finished() {
        run.step(&never).unwrap();
    }
    let steps = &run.trace().steps;
    let payload = |i: usize| match &steps[i].payload {
        Some(StepPayload::Speculative(p)) => p.clone(),
        _ => panic!("no payload"),
    };
    assert_eq!(payload(1).draft_len, 4);
    assert_eq!(payload(2).draft_len, 2);
    assert!(steps[2].draft_n <= 2);
    assert_eq!(steps[2].param_changes[0].name, "speculative.draft_len");
    // Adaptive: drafts stop on the confidence threshold, well before 16.
    let adaptive: Vec<usize> = steps[3..].iter().map(|s| s.draft_n).collect();
    assert!(adaptive.iter().all(|&n| (1..=16).contains(&n)));
    assert!(adaptive.iter().any(|&n| n < 16), "{adaptive:?}");
}
