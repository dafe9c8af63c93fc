//! What a run records for inspection: the logit lens and every layer's attention.

use specula_core::methods::lens::logit_lens;
use specula_core::{MethodParams, PromptSpec, RunSpec, SamplingParams, Trace, generate};

use super::common::model;
use super::{PROMPTS, assert_refused, greedy, ids};

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
        let params = MethodParams {
            inspect,
            ..MethodParams::default()
        };
        assert_refused("greedy", params, name);
    }
}
