//! The early-exit drafter's DEL estimates on the real default model: a shadow token says what a draft from its exit
//! would have proposed, the recorded estimates follow the shadow tokens, and each draft comes from the exit and
//! length with the most expected tokens per unit of cost. Greedy losslessness is in speculative/main.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{model, spec, speculative_params};
use specula_core::Trace;
use specula_core::methods::speculative::drafter::PRIOR_ACCEPTANCE;
use specula_core::methods::speculative::early_exit::{DECAY, IDLE_STRIDE, best_exit};
use specula_core::trace::{ExitLayers, SpeculativeStep, StepPayload};
use specula_core::{MethodParams, SamplingParams, generate};

const PROMPTS: [&str; 6] = [
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
    "What is the capital of France? Answer in one sentence.",
    "Describe how a bicycle works.",
    "Give two tips for learning to cook.",
];

fn run(prompt: &str, params: MethodParams, seed: u64) -> Trace {
    generate(model(), spec("speculative", prompt, params, 64, seed)).unwrap()
}

fn early_exit_params(sampling: SamplingParams) -> MethodParams {
    speculative_params("early-exit", sampling)
}

/// The speculative payload of every step, in order (steps without one are none here: early exit always reports).
fn payloads(trace: &Trace) -> Vec<&SpeculativeStep> {
    trace
        .steps
        .iter()
        .map(|s| match &s.payload {
            Some(StepPayload::Speculative(p)) => p.as_ref(),
            other => panic!("a speculative step without its payload: {other:?}"),
        })
        .collect()
}

fn exits(step: &SpeculativeStep) -> &ExitLayers {
    step.exit_layers
        .as_ref()
        .expect("an early-exit step reports its exits")
}

/// With the exit fixed after 27 layers, each step drafts its first token from exit 27 at its root, and the next
/// step's report gives exit 27's shadow token at that same root whenever exit 27 was due. Greedy, the shadow
/// token is 1 exactly when the exit's top token was the target's, which is exactly when that first draft was
/// accepted: computed twice, by the draft forward and by the LM head on the verification's hidden state, the two
/// must agree at every such root. An exit read from the wrong layer (one off) disagrees somewhere.
#[test]
fn a_shadow_token_is_what_a_draft_from_its_exit_would_have_proposed() {
    let mut params = early_exit_params(SamplingParams::greedy());
    params.speculative.skip_layers = vec![27, 28, 29];
    let (mut compared, mut accepted) = (0, 0);
    for prompt in PROMPTS {
        let trace = run(prompt, params.clone(), 0);
        let steps = payloads(&trace);
        for pair in steps.windows(2) {
            let (step, next) = (pair[0], pair[1]);
            assert_eq!((exits(step).chosen, exits(step).dynamic), (27, false));
            let Some(shadow) = exits(next)
                .exits
                .iter()
                .find(|e| e.layers == 27)
                .and_then(|e| e.shadow)
            else {
                continue;
            };
            if step.nodes.is_empty() {
                continue;
            }
            let first_accepted = step.accepted_path.first() == Some(&0);
            assert_eq!(
                shadow,
                f32::from(u8::from(first_accepted)),
                "{prompt:?}: exit 27's shadow token disagrees with its draft ({step:?})"
            );
            compared += 1;
            accepted += usize::from(first_accepted);
        }
    }
    eprintln!("{compared} shadow tokens compared with drafts, {accepted} accepted");
    assert!(compared >= 8, "only {compared} comparisons");
    assert!(
        accepted > 0 && accepted < compared,
        "both outcomes must occur for the comparison to mean anything ({accepted} of {compared})"
    );
}

/// The dynamic exit: every step's estimates follow from the previous step's and the shadow tokens it reports
/// (the decayed mean, starting from the prior with weight 1), and the step drafts from the exit with the most expected tokens per unit
/// of cost, no longer than that exit's best length; under the cost-aware policy it drafts nothing when no exit
/// beats a plain step, and then takes shadow tokens at every IDLE_STRIDE-th step only. Greedy and sampling, with and without a verification cost.
#[test]
fn each_draft_comes_from_the_exit_and_length_the_estimates_favour() {
    let mut observed = 0;
    for (sampling, cost) in [
        (SamplingParams::greedy(), None),
        (SamplingParams::greedy(), Some(0.2)),
        (SamplingParams::default(), None),
    ] {
        let mut params = early_exit_params(sampling);
        params.speculative.draft_cost = cost;
        for prompt in &PROMPTS[..3] {
            let trace = run(prompt, params.clone(), 3);
            let steps = payloads(&trace);
            let first = exits(steps[0]);
            assert!(
                first
                    .exits
                    .iter()
                    .all(|e| e.acceptance == PRIOR_ACCEPTANCE as f32)
            );
            for step in &steps {
                let report = exits(step);
                assert!(report.dynamic);
                let best = best_exit(&report.exits).unwrap();
                assert_eq!(report.chosen, best.layers, "{prompt:?}: {report:?}");
                let pays = cost.is_none() || best.tokens_per_cost > 1.0;
                let longest = if pays { best.best_len } else { 0 };
                assert!(step.nodes.len() <= longest, "{prompt:?}: {step:?}");
            }
            // While no exit pays, only every IDLE_STRIDE-th idle step takes a shadow token.
            let mut idle = 0usize;
            for pair in steps.windows(2) {
                let paid = cost.is_none()
                    || best_exit(&exits(pair[0]).exits).unwrap().tokens_per_cost > 1.0;
                idle = if paid { 0 } else { idle + 1 };
                let shadowed = exits(pair[1]).exits.iter().any(|e| e.shadow.is_some());
                if !idle.is_multiple_of(IDLE_STRIDE) {
                    assert!(!shadowed, "{prompt:?}: a shadow token on idle step {idle}");
                }
            }
            for pair in steps.windows(2) {
                let (before, after) = (exits(pair[0]), exits(pair[1]));
                for (b, a) in before.exits.iter().zip(&after.exits) {
                    let (b_acc, b_w) = (f64::from(b.acceptance), f64::from(b.samples));
                    let (expected, weight) = match a.shadow {
                        Some(x) => {
                            observed += 1;
                            assert!((0.0..=1.0).contains(&x));
                            let weight = DECAY * b_w + 1.0;
                            ((DECAY * b_acc * b_w + f64::from(x)) / weight, weight)
                        }
                        None => (b_acc, b_w),
                    };
                    assert!(
                        (f64::from(a.acceptance) - expected).abs() < 1e-4
                            && (f64::from(a.samples) - weight).abs() < 1e-4,
                        "{prompt:?}: exit {} went from {b:?} to {a:?}",
                        a.layers
                    );
                }
            }
        }
    }
    assert!(observed > 100, "only {observed} shadow tokens observed");
}
