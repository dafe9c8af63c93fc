//! Entropy-adaptive decoding: the full model or a layer-skipped copy, switched by rolling entropy.

use specula_core::{MethodParams, PromptSpec, RunSpec, SamplingParams, Trace, generate};

use super::common::model;
use super::{PROMPTS, assert_refused, greedy, ids};

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
        let params = MethodParams {
            adaptive: specula_core::trace::AdaptiveParams {
                threshold: t,
                window: w,
                min_dwell: d,
            },
            ..MethodParams::default()
        };
        assert_refused("entropy-adaptive", params, name);
    }
}
