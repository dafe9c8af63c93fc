//! The search methods on the real default model, each checked against its defining property: the degenerate
//! setting reproduces greedy (or beam) decoding, and the real setting does what the method promises.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::model;
use specula_core::methods::lens::logit_lens;
use specula_core::trace::{SearchParams, StepPayload, TokenSource};
use specula_core::{Error, MethodParams, PromptSpec, RunSpec, SamplingParams, Trace, generate};

const PROMPTS: &[(&str, bool)] = &[
    ("Write one sentence about the sea.", true),
    ("The capital of France is", false),
    ("Name a colour.", true),
    ("Once upon a time, there was a", false),
];

fn run(method: &str, prompt: (&str, bool), search: SearchParams, max_tokens: usize) -> Trace {
    generate(
        model(),
        RunSpec {
            method: method.into(),
            params: MethodParams {
                sampling: SamplingParams::greedy(),
                search,
                ..MethodParams::default()
            },
            prompt: PromptSpec {
                text: prompt.0.into(),
                chat: prompt.1,
                system: None,
            },
            max_tokens,
            ..RunSpec::default()
        },
    )
    .unwrap()
}

fn ids(trace: &Trace) -> Vec<u32> {
    trace.token_ids().collect()
}

fn greedy(prompt: (&str, bool), max_tokens: usize) -> Trace {
    run("greedy", prompt, SearchParams::default(), max_tokens)
}

fn beams(beams: usize) -> SearchParams {
    SearchParams {
        beams,
        ..SearchParams::default()
    }
}

/// Sum of ln p of the output, each token under the model given the output before it.
fn logprob(trace: &Trace) -> f64 {
    trace.tokens().map(|t| f64::from(t.logprob)).sum()
}

#[test]
fn beam_of_width_one_is_greedy() {
    for &prompt in &PROMPTS[..2] {
        let beam = run("beam", prompt, beams(1), 12);
        assert_eq!(ids(&beam), ids(&greedy(prompt, 12)), "{prompt:?}");
        assert!(
            beam.tokens()
                .all(|t| t.source == TokenSource::Search && t.rank == 0)
        );
        assert!(beam.steps.iter().all(|s| s.rollback.is_none()));
    }
}

#[test]
fn wider_beams_find_likelier_text_and_the_output_is_the_answer() {
    let mut at_least_as_likely = 0;
    let mut compared = 0;
    for &prompt in PROMPTS {
        let wide = run("beam", prompt, beams(4), 8);
        let narrow = greedy(prompt, 8);
        // Positions stay contiguous through rollbacks.
        let start = wide.header.prompt.token_ids.len();
        for (i, t) in wide.tokens().enumerate() {
            assert_eq!(t.position, start + i);
        }
        // The output is the search's final answer.
        let last = match &wide.steps.last().unwrap().payload {
            Some(StepPayload::Beams(b)) => b.clone(),
            other => panic!("a beam step without a beam payload: {other:?}"),
        };
        assert!(last.done);
        let answer = match last.best {
            Some(i) => last.live[i].token_ids.clone(),
            None => last.finished[0].token_ids.clone(),
        };
        assert_eq!(ids(&wide), answer);
        assert!((logprob(&wide) - answer_logprob(&last)).abs() < 1e-3);
        if wide.generated_len() == narrow.generated_len() {
            compared += 1;
            if logprob(&wide) >= logprob(&narrow) - 1e-4 {
                at_least_as_likely += 1;
            }
        }
    }
    assert!(compared >= 2, "too few outputs of equal length to compare");
    assert!(
        at_least_as_likely * 4 >= compared * 3,
        "{at_least_as_likely} of {compared}"
    );
}

fn answer_logprob(step: &specula_core::trace::BeamStep) -> f64 {
    let h = match step.best {
        Some(i) => &step.live[i],
        None => &step.finished[0],
    };
    f64::from(h.logprob)
}

#[test]
fn diverse_beam_without_penalty_is_beam_search_per_group() {
    let prompt = PROMPTS[0];
    // λ = 0: every group is the same beam search of width B/G.
    let diverse = run(
        "diverse-beam",
        prompt,
        SearchParams {
            beams: 4,
            groups: 2,
            diversity: 0.0,
            ..SearchParams::default()
        },
        8,
    );
    assert_eq!(ids(&diverse), ids(&run("beam", prompt, beams(2), 8)));
    // One group is plain beam search whatever λ is.
    let one_group = run(
        "diverse-beam",
        prompt,
        SearchParams {
            beams: 3,
            groups: 1,
            diversity: 5.0,
            ..SearchParams::default()
        },
        8,
    );
    assert_eq!(ids(&one_group), ids(&run("beam", prompt, beams(3), 8)));
}

#[test]
fn diverse_beam_groups_differ() {
    let search = |diversity| SearchParams {
        beams: 4,
        groups: 2,
        diversity,
        ..SearchParams::default()
    };
    let distinct = |trace: &Trace| {
        // The last step that still had live hypotheses in every group.
        trace
            .steps
            .iter()
            .rev()
            .find_map(|s| match &s.payload {
                Some(StepPayload::Beams(b)) if b.live.iter().any(|h| h.group == 1) => {
                    Some((b.distinct_2.unwrap(), b.clone()))
                }
                _ => None,
            })
            .unwrap()
    };
    let (same, _) = distinct(&run("diverse-beam", PROMPTS[0], search(0.0), 8));
    let (apart, step) = distinct(&run("diverse-beam", PROMPTS[0], search(2.0), 8));
    assert!(
        (same - 0.5).abs() < 1e-6,
        "λ = 0 groups are identical: {same}"
    );
    assert!(apart > 0.5, "λ = 2 should pull the groups apart: {apart}");
    let best = |g| {
        step.live
            .iter()
            .find(|h| h.group == g)
            .unwrap()
            .token_ids
            .clone()
    };
    assert_ne!(best(0), best(1));
    // The first group never pays a penalty; later ones do when they repeat its tokens.
    assert!(
        step.pruned
            .iter()
            .filter(|c| c.group == 0)
            .all(|c| c.penalty == 0.0)
    );
}

#[test]
fn contrastive_without_penalty_is_greedy() {
    for prompt in [PROMPTS[1], PROMPTS[3]] {
        let search = SearchParams {
            alpha: 0.0,
            candidates: 4,
            ..SearchParams::default()
        };
        let c = run("contrastive", prompt, search, 12);
        assert_eq!(ids(&c), ids(&greedy(prompt, 12)), "{prompt:?}");
        for step in &c.steps {
            let Some(StepPayload::Contrastive(p)) = &step.payload else {
                panic!("no contrastive payload")
            };
            assert_eq!(p.candidates.len(), 4);
            assert_eq!(p.chosen, 0);
            assert!(
                p.candidates
                    .iter()
                    .all(|x| (-1.01..=1.01).contains(&x.max_similarity))
            );
        }
    }
    // With the penalty on, the payload's arithmetic is the rule that chose the token.
    let c = run(
        "contrastive",
        PROMPTS[3],
        SearchParams {
            alpha: 0.6,
            candidates: 4,
            ..SearchParams::default()
        },
        8,
    );
    for step in &c.steps {
        let Some(StepPayload::Contrastive(p)) = &step.payload else {
            panic!()
        };
        for x in &p.candidates {
            assert!((x.score - (0.4 * x.prob - 0.6 * x.max_similarity)).abs() < 1e-5);
        }
        assert!(
            p.candidates
                .iter()
                .all(|x| x.score <= p.candidates[p.chosen].score)
        );
        assert_eq!(step.tokens[0].id, p.candidates[p.chosen].id);
    }
}

#[test]
fn cad_without_weight_is_greedy_on_the_context_prompt() {
    let context = "The sea on Mars is made of lemonade.";
    let prompt = "The sea on Mars is made of";
    let cad = run(
        "cad",
        (prompt, false),
        SearchParams {
            alpha: 0.0,
            context: Some(context.into()),
            ..SearchParams::default()
        },
        10,
    );
    let joined = format!("{context}\n\n{prompt}");
    assert_eq!(ids(&cad), ids(&greedy((&joined, false), 10)));
    // α > 0 pushes towards what the context adds.
    let strong = run(
        "cad",
        (prompt, false),
        SearchParams {
            alpha: 1.0,
            context: Some(context.into()),
            ..SearchParams::default()
        },
        4,
    );
    let Some(StepPayload::Cad(first)) = &strong.steps[0].payload else {
        panic!()
    };
    assert_eq!(strong.steps[0].target_forward_calls, 2);
    assert_eq!(first.adjusted[0].id, strong.steps[0].tokens[0].id);
}

#[test]
fn logit_lens_at_the_last_layer_is_the_output() {
    let trace = greedy(PROMPTS[1], 4);
    let prompt = &trace.header.prompt.token_ids;
    let out = ids(&trace);
    let token = trace.tokens().nth(2).unwrap();
    let lens = logit_lens(model(), prompt, &out, token.position).unwrap();
    assert_eq!(lens.len(), model().llama.config.n_layers + 1);
    let last = lens.last().unwrap();
    assert_eq!(last.token_id, token.id);
    assert!(
        (last.prob - token.prob()).abs() < 1e-3,
        "{} vs {}",
        last.prob,
        token.prob()
    );
    assert!((last.actual_prob.unwrap() - token.prob()).abs() < 1e-3);
    assert!(lens.iter().all(|l| l.prob > 0.0 && l.prob <= 1.0));
    assert!(logit_lens(model(), prompt, &out, 0).is_err());
    assert!(logit_lens(model(), prompt, &out, prompt.len() + out.len() + 1).is_err());
}

#[test]
fn bad_search_parameters_are_refused_with_their_name() {
    let bad = |method: &str, search: SearchParams| {
        let err = generate(
            model(),
            RunSpec {
                method: method.into(),
                params: MethodParams {
                    search,
                    ..MethodParams::default()
                },
                prompt: PromptSpec {
                    text: "Hi".into(),
                    ..PromptSpec::default()
                },
                max_tokens: 2,
                ..RunSpec::default()
            },
        )
        .unwrap_err();
        match err {
            Error::BadParameter { name, .. } => name,
            other => panic!("expected a bad parameter, got {other}"),
        }
    };
    assert_eq!(bad("beam", beams(0)), "beams");
    assert_eq!(bad("beam", beams(100)), "beams");
    let d = |beams, groups, diversity| SearchParams {
        beams,
        groups,
        diversity,
        ..SearchParams::default()
    };
    assert_eq!(bad("diverse-beam", d(4, 3, 0.5)), "groups");
    assert_eq!(bad("diverse-beam", d(4, 2, f32::NAN)), "diversity");
    let a = |alpha| SearchParams {
        alpha,
        context: Some("x".into()),
        ..SearchParams::default()
    };
    assert_eq!(bad("contrastive", a(1.5)), "alpha");
    assert_eq!(bad("cad", a(-1.0)), "alpha");
    assert_eq!(bad("cad", SearchParams::default()), "context");
    // Another method's leftovers do not matter.
    let ok = generate(
        model(),
        RunSpec {
            params: MethodParams {
                search: beams(0),
                ..MethodParams::default()
            },
            prompt: PromptSpec {
                text: "Hi".into(),
                ..PromptSpec::default()
            },
            max_tokens: 1,
            ..RunSpec::default()
        },
    );
    assert!(ok.is_ok());
}

#[test]
fn momentum_without_resistance_is_greedy_and_with_it_avoids_long_loops() {
    let plain = SearchParams {
        alpha: 0.0,
        ..SearchParams::default()
    };
    let prompt = (
        "Repeat after me: hello world hello world hello world",
        false,
    );
    let m = run("momentum", prompt, plain, 12);
    assert_eq!(ids(&m), ids(&greedy(prompt, 12)));
    let m = run("momentum", prompt, SearchParams::default(), 12);
    for step in &m.steps {
        let Some(StepPayload::Momentum(p)) = &step.payload else {
            panic!()
        };
        let chosen = &p.candidates[p.chosen];
        assert_eq!(step.tokens[0].id, chosen.id);
        if p.candidates.iter().any(|c| c.score.is_some()) {
            assert!(
                chosen.score.is_some(),
                "a barred candidate won over an open one"
            );
            assert!(p.candidates.iter().all(|c| c.score <= chosen.score));
        }
    }
    // The prompt invites the loop; greedy takes it, momentum does not close a 5-gram.
    assert!(
        m.steps
            .iter()
            .any(|s| matches!(&s.payload, Some(StepPayload::Momentum(p)) if p.chosen != 0))
    );
}

#[test]
fn a_forked_beam_search_keeps_the_forced_tokens() {
    let parent = greedy(PROMPTS[1], 4);
    let mut tokens: Vec<_> = parent.tokens().take(2).cloned().collect();
    tokens[1].source = TokenSource::Forced;
    let kept: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    let trace = generate(
        model(),
        RunSpec {
            method: "beam".into(),
            params: MethodParams {
                search: beams(3),
                ..MethodParams::default()
            },
            prompt: PromptSpec {
                text: PROMPTS[1].0.into(),
                ..PromptSpec::default()
            },
            max_tokens: 8,
            fork: Some(specula_core::Fork {
                origin: specula_core::trace::ForkOrigin {
                    parent_label: "greedy".into(),
                    kept_tokens: 1,
                    forced_token_id: kept[1],
                },
                tokens,
            }),
            ..RunSpec::default()
        },
    )
    .unwrap();
    let out = ids(&trace);
    assert_eq!(out[..2], kept[..]);
    assert!(
        trace
            .steps
            .iter()
            .filter_map(|s| s.rollback.as_ref())
            .all(|r| r.to_generated >= 2)
    );
}

#[test]
fn opera_without_penalty_or_retrospection_is_beam_search() {
    let prompt = PROMPTS[1];
    let plain = SearchParams {
        beams: 2,
        candidates: 6,
        alpha: 0.0,
        retrospect: 0,
        ..SearchParams::default()
    };
    let opera = run("opera", prompt, plain, 8);
    assert_eq!(ids(&opera), ids(&run("beam", prompt, beams(2), 8)));
}

#[test]
fn opera_rolls_back_to_the_summary_token_and_chooses_again() {
    let search = SearchParams {
        beams: 2,
        candidates: 3,
        alpha: 1.0,
        retrospect: 2,
        ..SearchParams::default()
    };
    let trace = run("opera", PROMPTS[3], search, 12);
    let rollbacks: Vec<_> = trace
        .steps
        .iter()
        .filter_map(|s| s.rollback.as_ref())
        .filter(|r| r.reason.starts_with("OPERA"))
        .collect();
    assert!(
        !rollbacks.is_empty(),
        "a low threshold should trigger retrospection"
    );
    let summary = specula_core::methods::search::search_summary(&trace).unwrap();
    assert_eq!(summary["retrospections"], rollbacks.len());
    let start = trace.header.prompt.token_ids.len();
    for (i, t) in trace.tokens().enumerate() {
        assert_eq!(t.position, start + i);
    }
    // Every step names the summary token it saw, except the one that ended the search.
    for s in &trace.steps {
        let Some(StepPayload::Beams(b)) = &s.payload else {
            panic!()
        };
        assert_eq!(b.summary_position.is_none(), b.done);
    }
}

fn adaptive(prompt: (&str, bool), threshold: f32, window: usize, dwell: usize, n: usize) -> Trace {
    generate(
        model(),
        RunSpec {
            method: "entropy-adaptive".into(),
            params: MethodParams {
                sampling: SamplingParams::greedy(),
                adaptive: specula_core::trace::AdaptiveParams {
                    threshold,
                    window,
                    min_dwell: dwell,
                },
                ..MethodParams::default()
            },
            prompt: PromptSpec {
                text: prompt.0.into(),
                chat: prompt.1,
                system: None,
            },
            max_tokens: n,
            ..RunSpec::default()
        },
    )
    .unwrap()
}

fn adaptive_steps(trace: &Trace) -> Vec<&specula_core::trace::EntropyAdaptiveStep> {
    trace
        .steps
        .iter()
        .map(|s| specula_core::methods::entropy_adaptive::payload(s).unwrap())
        .collect()
}

#[test]
fn entropy_adaptive_with_threshold_zero_is_greedy_on_the_full_model() {
    for &prompt in &PROMPTS[..2] {
        let trace = adaptive(prompt, 0.0, 4, 4, 16);
        assert_eq!(ids(&trace), ids(&greedy(prompt, 16)), "{prompt:?}");
        let steps = adaptive_steps(&trace);
        assert!(steps.iter().all(|s| s.full_model && !s.switched));
        assert!(trace.steps.iter().all(|s| s.draft_forward_calls == 0));
        let full: u32 = trace.steps.iter().map(|s| s.target_forward_calls).sum();
        assert_eq!(
            full as usize,
            trace.steps.len(),
            "one full forward per token"
        );
    }
}

#[test]
fn entropy_adaptive_starts_on_the_full_model_so_its_first_token_is_greedys() {
    for &prompt in PROMPTS {
        let first_greedy = ids(&greedy(prompt, 1));
        // A threshold no entropy reaches wants the small model at every step it has a say in.
        for threshold in [1.0, 1e6] {
            let trace = adaptive(prompt, threshold, 4, 1, 2);
            let steps = adaptive_steps(&trace);
            assert_eq!(
                ids(&trace)[..1],
                first_greedy[..],
                "{prompt:?}, τ = {threshold}"
            );
            assert_eq!(steps[0].rolling_entropy, None);
            assert!(steps[0].full_model && !steps[0].switched, "{prompt:?}");
            assert_eq!(trace.steps[0].draft_forward_calls, 0);
            assert!(trace.steps[0].target_forward_calls >= 1);
        }
    }
}

#[test]
fn entropy_adaptive_with_a_huge_threshold_hands_over_to_the_skipped_model_after_the_dwell() {
    use specula_core::model::{Capture, Logits, Mask, logits_row};
    let prompt = PROMPTS[0];
    let dwell = 3;
    let trace = adaptive(prompt, 1e6, 4, dwell, 12);
    let steps = adaptive_steps(&trace);
    // The full model starts and keeps the text for the minimum dwell; then the skipped model takes over for good.
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s.full_model, i < dwell, "step {i}");
        assert_eq!(s.switched, i == dwell, "step {i}");
        let step = &trace.steps[i];
        if s.full_model {
            assert_eq!(step.draft_forward_calls, 0, "step {i}");
        } else {
            assert_eq!(
                step.target_forward_calls, 0,
                "step {i}: no full-model forward"
            );
        }
    }
    assert_eq!(ids(&trace)[..dwell], ids(&greedy(prompt, dwell))[..]);
    // From the switch on: the same tokens, fed the same way, through the model with the same layers skipped.
    let llama = &model().llama;
    let skip: std::collections::BTreeSet<usize> = steps[0].skip_layers.iter().copied().collect();
    assert!(!skip.is_empty() && skip.len() < llama.config.n_layers);
    let capture = Capture {
        skip_layers: skip,
        ..Capture::default()
    };
    let generated = ids(&trace);
    let mut cache = llama.new_cache();
    let mut fed: Vec<u32> = trace.header.prompt.token_ids.clone();
    fed.extend(&generated[..dwell]);
    let positions: Vec<usize> = (0..fed.len()).collect();
    let mut out = llama
        .forward(
            &mut cache,
            &fed,
            &positions,
            1,
            &Mask::Causal,
            Logits::Last,
            &capture,
        )
        .unwrap();
    for &id in &generated[dwell..] {
        let logits = logits_row(&out.logits, 0, 0).unwrap();
        assert_eq!(specula_core::sampling::argmax(&logits), id);
        out = llama
            .forward(
                &mut cache,
                &[id],
                &[fed.len()],
                1,
                &Mask::Causal,
                Logits::Last,
                &capture,
            )
            .unwrap();
        fed.push(id);
    }
    assert_ne!(
        generated,
        ids(&greedy(prompt, 12)),
        "skipping a third of the layers changes the text"
    );
}

#[test]
fn entropy_adaptive_switches_by_the_rolling_entropy_and_respects_the_dwell() {
    let (threshold, window, dwell) = (1.0, 2, 3);
    let trace = adaptive(PROMPTS[0], threshold, window, dwell, 40);
    let steps = adaptive_steps(&trace);
    let switches = steps.iter().filter(|s| s.switched).count();
    assert!(
        switches >= 2,
        "the run should use both models: {switches} switches"
    );
    let entropies: Vec<f32> = trace.tokens().map(|t| t.entropy).collect();
    let mut since_switch = 0;
    for (i, s) in steps.iter().enumerate() {
        // The decision reads the rolling mean of the entropies before it.
        let before = &entropies[i.saturating_sub(window)..i];
        let rolling =
            (!before.is_empty()).then(|| before.iter().sum::<f32>() / before.len() as f32);
        assert_eq!(s.rolling_entropy, rolling, "step {i}");
        let wants_full = rolling.is_none_or(|r| r >= threshold);
        if i == 0 {
            assert!(s.full_model && !s.switched, "the full model starts");
        } else {
            let previous = steps[i - 1].full_model;
            let may_switch = since_switch >= dwell;
            let expected = if may_switch { wants_full } else { previous };
            assert_eq!(s.full_model, expected, "step {i}");
            assert_eq!(s.switched, s.full_model != previous, "step {i}");
            if s.switched {
                assert!(
                    since_switch >= dwell,
                    "switched after {since_switch} tokens at step {i}"
                );
            }
        }
        since_switch = if s.switched { 1 } else { since_switch + 1 };
        // Forwards are counted on the model that made them.
        let step = &trace.steps[i];
        if s.full_model {
            assert!(step.target_forward_calls >= 1 && step.draft_forward_calls == 0);
        } else {
            assert!(step.draft_forward_calls >= 1 && step.target_forward_calls == 0);
        }
    }
    let summary = specula_core::methods::entropy_adaptive::adaptive_summary(&trace).unwrap();
    assert_eq!(summary["switches"], switches);
    let full = steps.iter().filter(|s| s.full_model).count();
    assert_eq!(summary["full_model_tokens"], full);
}

#[test]
fn bad_entropy_adaptive_parameters_are_refused() {
    for (t, w, d, name) in [
        (-1.0, 4, 4, "threshold"),
        (f32::NAN, 4, 4, "threshold"),
        (1.0, 0, 4, "entropy_window"),
        (1.0, 4, 0, "min_dwell"),
    ] {
        let spec = RunSpec {
            method: "entropy-adaptive".into(),
            params: MethodParams {
                adaptive: specula_core::trace::AdaptiveParams {
                    threshold: t,
                    window: w,
                    min_dwell: d,
                },
                ..MethodParams::default()
            },
            prompt: PromptSpec {
                text: "Hi".into(),
                ..PromptSpec::default()
            },
            ..RunSpec::default()
        };
        match specula_core::Run::new(model(), spec) {
            Err(Error::BadParameter { name: n, .. }) => assert_eq!(n, name),
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name} was accepted"),
        }
    }
}

#[test]
fn the_recorded_lens_ends_at_the_output_and_attention_rows_are_distributions() {
    let prompt = PROMPTS[0];
    let trace = generate(
        model(),
        RunSpec {
            method: "greedy".into(),
            params: MethodParams {
                sampling: SamplingParams::greedy(),
                inspect: specula_core::trace::InspectParams {
                    lens: true,
                    attention: true,
                    attention_top_k: 6,
                    ..Default::default()
                },
                ..MethodParams::default()
            },
            prompt: PromptSpec {
                text: prompt.0.into(),
                chat: prompt.1,
                system: None,
            },
            max_tokens: 6,
            ..RunSpec::default()
        },
    )
    .unwrap();
    // Recording changes nothing of the decoding.
    assert_eq!(ids(&trace), ids(&greedy(prompt, 6)));
    let n_layers = model().llama.config.n_layers;
    let prompt_len = trace.header.prompt.token_ids.len();
    let n_heads = model().llama.config.n_heads;
    for (s, step) in trace.steps.iter().enumerate() {
        let token = &step.tokens[0];
        let inspection = step.inspection.last().unwrap();
        assert_eq!(inspection.position, token.position);
        if s == 0 {
            // The attention of every prompt position, the lens of the last few.
            let positions: Vec<usize> = step.inspection.iter().map(|i| i.position).collect();
            assert_eq!(positions, (1..=prompt_len).collect::<Vec<_>>());
            assert!(step.inspection.iter().all(|i| i.attention_map.is_some()));
            let with_lens = step
                .inspection
                .iter()
                .filter(|i| !i.lens.is_empty())
                .count();
            assert_eq!(with_lens, 8);
        } else {
            assert_eq!(step.inspection.len(), 1);
        }
        assert_eq!(inspection.lens.len(), n_layers + 1);
        let out = inspection.lens.last().unwrap();
        // The last depth is the model's output: its top token is the greedy token, up to near-ties between
        // the batched forward and the decoding's.
        assert!(
            out.token_id == token.id || (out.prob - out.actual_prob).abs() < 1e-3,
            "step {s}: lens {} vs output {}",
            out.token_id,
            token.id
        );
        assert!((out.actual_prob - token.prob()).abs() < 1e-2, "step {s}");
        for inspection in &step.inspection {
            let map = inspection.attention_map.as_ref().unwrap();
            assert_eq!(map.query(), inspection.position - 1);
            assert_eq!(map.layers(), (0..n_layers).collect::<Vec<_>>());
            assert_eq!(map.heads(), n_heads);
            // 6 keys, or every key when the position sees fewer.
            assert_eq!(map.width(), inspection.position.min(6));
            for l in 0..n_layers {
                let rows: Vec<_> = (0..n_heads + 2).map(|r| map.row(l, r).unwrap()).collect();
                for (i, row) in rows.iter().enumerate() {
                    assert!(row.keys.iter().all(|&k| (k as usize) < inspection.position));
                    // Each head's row and the mean are distributions; the max over heads is not.
                    if i != n_heads {
                        assert!(row.covered <= 1.0 + 1e-3, "row {i}: {}", row.covered);
                    }
                    assert!(row.weights.windows(2).all(|w| w[0] >= w[1]));
                }
                // The max over heads is at least every head's weight at its own strongest key.
                let max = &rows[n_heads];
                for head in &rows[..n_heads] {
                    let (Some(&k), Some(&w)) = (head.keys.first(), head.weights.first()) else {
                        continue;
                    };
                    match max.keys.iter().position(|&m| m == k) {
                        Some(i) => assert!(max.weights[i] + 1e-4 >= w),
                        None => assert!(max.weights.last().is_some_and(|&m| m + 1e-4 >= w)),
                    }
                }
            }
        }
    }
    // Old traces (no inspection field) still read, and new ones round-trip.
    let mut bytes = Vec::new();
    trace
        .write_jsonl(
            &mut bytes,
            specula_core::trace::ExportOptions {
                deterministic: true,
            },
        )
        .unwrap();
    let back = Trace::read_jsonl(&bytes[..]).unwrap();
    let mut expected = trace.steps.clone();
    for s in &mut expected {
        s.timing = None;
    }
    assert_eq!(back[0].steps, expected);
}

/// A prompt longer than one prefill chunk: the attention of every prompt position is recorded, and a position's
/// map holds the largest weights of what a forward in the same chunks computes for it.
#[test]
fn attention_covers_every_prefill_chunk_of_a_long_prompt() {
    use specula_core::methods::PREFILL_CHUNK;
    use specula_core::model::{Capture, Logits, Mask};

    let llama = &model().llama;
    let last_layer = llama.config.n_layers - 1;
    let text = "The sea is wide and the sky is blue; ships sail on it all day long. ".repeat(45);
    let trace = generate(
        model(),
        RunSpec {
            method: "greedy".into(),
            params: MethodParams {
                sampling: SamplingParams::greedy(),
                inspect: specula_core::trace::InspectParams {
                    attention: true,
                    attention_top_k: 4,
                    attention_layers: vec![last_layer],
                    ..Default::default()
                },
                ..MethodParams::default()
            },
            prompt: PromptSpec {
                text,
                ..PromptSpec::default()
            },
            max_tokens: 2,
            ..RunSpec::default()
        },
    )
    .unwrap();
    let prompt = &trace.header.prompt.token_ids;
    assert!(prompt.len() > PREFILL_CHUNK + 20, "{} tokens", prompt.len());
    let first = &trace.steps[0].inspection;
    assert_eq!(
        first.iter().map(|i| i.position).collect::<Vec<_>>(),
        (1..=prompt.len()).collect::<Vec<_>>()
    );
    // The same chunks, fed with the whole rows of the last layer kept.
    let mut cache = llama.new_cache();
    let capture = Capture {
        attention_layers: [last_layer].into_iter().collect(),
        ..Capture::default()
    };
    let mut start = 0;
    for chunk in prompt[..prompt.len() - 1].chunks(PREFILL_CHUNK) {
        let positions: Vec<usize> = (start..start + chunk.len()).collect();
        let out = llama
            .forward(
                &mut cache,
                chunk,
                &positions,
                1,
                &Mask::Causal,
                Logits::Last,
                &capture,
            )
            .unwrap();
        // (1, heads, t, s) -> [heads][t][s]
        let probs = out.attention[0]
            .1
            .squeeze(0)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for row in [0, chunk.len() / 2, chunk.len() - 1] {
            let query = start + row;
            let map = first[query].attention_map.as_ref().unwrap();
            assert_eq!((map.query(), map.layers()), (query, &[last_layer][..]));
            for head in [0, llama.config.n_heads - 1] {
                let dense = &probs[head][row][..=query];
                let mut order: Vec<usize> = (0..dense.len()).collect();
                order.sort_by(|&a, &b| dense[b].total_cmp(&dense[a]).then(a.cmp(&b)));
                order.truncate(4);
                let kept = map.row(0, head).unwrap();
                assert_eq!(
                    kept.keys,
                    order.iter().map(|&k| k as u32).collect::<Vec<_>>(),
                    "query {query}, head {head}"
                );
                for (w, &k) in kept.weights.iter().zip(&order) {
                    assert!(
                        (w - dense[k]).abs() < 1e-4,
                        "query {query}: {w} vs {}",
                        dense[k]
                    );
                }
            }
        }
        start += chunk.len();
    }
}

#[test]
fn bad_attention_settings_are_refused_with_their_name() {
    for (inspect, name) in [
        (
            specula_core::trace::InspectParams {
                attention: true,
                attention_layers: vec![0, 99],
                ..Default::default()
            },
            "attention_layers",
        ),
        (
            specula_core::trace::InspectParams {
                attention: true,
                attention_top_k: 0,
                ..Default::default()
            },
            "attention_top_k",
        ),
    ] {
        let spec = RunSpec {
            method: "greedy".into(),
            params: MethodParams {
                inspect,
                ..MethodParams::default()
            },
            prompt: PromptSpec {
                text: "Hi".into(),
                ..PromptSpec::default()
            },
            ..RunSpec::default()
        };
        match specula_core::Run::new(model(), spec) {
            Err(Error::BadParameter { name: n, .. }) => assert_eq!(n, name),
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name} was accepted"),
        }
    }
}
