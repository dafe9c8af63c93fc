//! The search methods on the real default model, each checked against its defining property: the degenerate
//! setting reproduces greedy (or beam) decoding, and the real setting does what the method promises.
//! `entropy_adaptive.rs` checks the entropy-adaptive method, `inspection.rs` the logit lens and attention records,
//! with the helpers here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;
mod entropy_adaptive;
mod inspection;

use common::model;
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

/// Asserts that a run of `method` with `params` (on a short prompt) is refused for its parameter `name`.
fn assert_refused(method: &str, params: MethodParams, name: &str) {
    let spec = RunSpec {
        method: method.into(),
        params,
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
