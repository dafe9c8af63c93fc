//! Agreement with llama.cpp, our reference: prompt token ids on every Spec-Bench prompt, and greedy
//! continuations on 40 of them. Fixtures: tests/fixtures (made by tests/fixtures/make_fixtures.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{chain, model, spec, speculative_params, workspace_root};
use serde::Deserialize;
use specula_core::kv_cache::KvCache;
use specula_core::model::{Capture, Logits, Mask, logits_row};
use specula_core::sampling::{PositionStats, argmax};
use specula_core::{MethodParams, SamplingParams, generate};

#[derive(Deserialize)]
struct Question {
    question_id: u64,
    turns: Vec<String>,
}

#[derive(Deserialize)]
struct PromptIds {
    question_id: u64,
    mode: String,
    prompt_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Greedy {
    question_id: u64,
    category: String,
    prompt_ids: Vec<u32>,
    ids: Vec<u32>,
}

fn jsonl<T: for<'de> Deserialize<'de>>(relative: &str) -> Vec<T> {
    let text = std::fs::read_to_string(workspace_root().join(relative)).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn questions() -> BTreeMap<u64, String> {
    jsonl::<Question>("assets/spec-bench/question.jsonl")
        .into_iter()
        .map(|q| (q.question_id, q.turns.into_iter().next().unwrap()))
        .collect()
}

#[test]
fn prompt_ids_match_llama_cpp_on_every_spec_bench_prompt() {
    let tok = &model().tokenizer;
    let questions = questions();
    let fixtures: Vec<PromptIds> = jsonl("tests/fixtures/llamacpp_prompt_ids.jsonl");
    assert_eq!(fixtures.len(), 960);
    let mut mismatches = Vec::new();
    for f in &fixtures {
        let text = &questions[&f.question_id];
        let rendered = if f.mode == "chat" {
            tok.render_chat(text, None)
        } else {
            text.clone()
        };
        let ours = tok.encode(&rendered).unwrap();
        if ours != f.prompt_ids {
            let at = ours
                .iter()
                .zip(&f.prompt_ids)
                .position(|(a, b)| a != b)
                .unwrap_or(ours.len().min(f.prompt_ids.len()));
            mismatches.push(format!(
                "question {} ({}): first difference at token {at}",
                f.question_id, f.mode
            ));
        }
        assert_eq!(
            tok.decode(&ours),
            rendered,
            "decode(encode(x)) == x for question {}",
            f.question_id
        );
    }
    assert!(
        mismatches.is_empty(),
        "{} of 960 prompts tokenize differently:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn chat_prompt_golden_ids() {
    let tok = &model().tokenizer;
    let ids = tok
        .encode(&tok.render_chat("What is 17 * 23?", None))
        .unwrap();
    assert_eq!(
        ids,
        [
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 33, 39, 1672, 216, 34, 35, 47,
            2, 198, 1, 520, 9531, 198
        ]
    );
    // No prefix space: the first word of a plain text is not "Ġ"-prefixed.
    assert_eq!(tok.encode("Hello world").unwrap(), [19556, 905]);
}

/// Greedy decoding on 40 prompts, 32 tokens each, compared with llama.cpp two ways:
/// - teacher-forced: fed llama.cpp's own continuation, is our argmax llama.cpp's next token at every position?
///   This measures the two engines' logits, step by step, without letting one early flip derail the rest.
/// - free-running: are the 32 generated tokens identical?
///
/// Our forward follows llama.cpp's arithmetic operation for operation (attention.rs, ggml_float.rs), so both are
/// expected to agree everywhere; the bar is 38 of 40. Any disagreement is printed with our logit margin.
#[test]
fn greedy_agrees_with_llama_cpp() {
    let m = model();
    let llama = &m.llama;
    let fixtures: Vec<Greedy> = jsonl("tests/fixtures/llamacpp_greedy.jsonl");
    assert_eq!(fixtures.len(), 40);
    let (mut positions, mut agreeing, mut identical) = (0usize, 0usize, 0usize);
    let mut far_from_tie = Vec::new();
    for f in &fixtures {
        // Teacher forcing: the prompt, then llama.cpp's tokens, logits at every one of them.
        let mut cache = llama.new_cache();
        let p = f.prompt_ids.len();
        let prefill: Vec<usize> = (0..p).collect();
        let out = llama
            .forward(
                &mut cache,
                &f.prompt_ids,
                &prefill,
                1,
                &Mask::Causal,
                Logits::Last,
                &Capture::default(),
            )
            .unwrap();
        let mut rows = vec![logits_row(&out.logits, 0, 0).unwrap()];
        let mut free_cache = cache.clone();
        if f.ids.len() > 1 {
            let fed = &f.ids[..f.ids.len() - 1];
            rows.extend(chain(llama, &mut cache, fed));
        }
        for (i, (row, &want)) in rows.iter().zip(&f.ids).enumerate() {
            positions += 1;
            let got = argmax(row);
            if got == want {
                agreeing += 1;
                continue;
            }
            let stats = PositionStats::new(row);
            let margin = stats.logprobs[got as usize] - stats.logprobs[want as usize];
            let line = format!(
                "question {} ({}), token {i}: ours {got}, llama.cpp {want}, margin {margin:.4}",
                f.question_id, f.category
            );
            eprintln!("{line}");
            if margin > NEAR_TIE {
                far_from_tie.push(line);
            }
        }

        // Free running from the same prefill: our own argmax fed back, 32 tokens.
        let free = free_run(m, &mut free_cache, p, &rows[0]);
        if free == f.ids {
            identical += 1;
        }
    }
    let rate = agreeing as f64 / positions as f64;
    eprintln!(
        "teacher-forced top-1 agreement with llama.cpp: {agreeing} / {positions} positions ({:.2}%); \
         free-running: {identical} / 40 prompts identical for 32 tokens",
        rate * 100.0
    );
    assert!(
        far_from_tie.is_empty(),
        "disagreements that are not near-ties:\n{}",
        far_from_tie.join("\n")
    );
    assert!(
        rate >= 0.99,
        "top-1 agreement {rate:.4} under teacher forcing is below 99%"
    );
    assert!(
        identical >= 38,
        "only {identical} of 40 greedy continuations equal llama.cpp's"
    );
}

/// Greedy decoding after a prefill of `p` tokens whose last logits are `first`: our own argmax fed back, up to 32
/// tokens, without the end-of-generation token (llama.cpp's runner stops before yielding it).
fn free_run(m: &specula_core::Model, cache: &mut KvCache, p: usize, first: &[f32]) -> Vec<u32> {
    let mut free = vec![argmax(first)];
    while free.len() < 32 && !m.tokenizer.is_end_of_generation(free[free.len() - 1]) {
        let last = free[free.len() - 1];
        let pos = p + free.len() - 1;
        let out = m
            .llama
            .forward(
                cache,
                &[last],
                &[pos],
                1,
                &Mask::Causal,
                Logits::Last,
                &Capture::default(),
            )
            .unwrap();
        free.push(argmax(&logits_row(&out.logits, 0, 0).unwrap()));
    }
    free.retain(|&id| !m.tokenizer.is_end_of_generation(id));
    free
}

#[derive(Deserialize)]
struct TopLogits {
    question_id: u64,
    prompt_ids: Vec<u32>,
    /// Per greedy step, llama.cpp's top (id, logit) pairs.
    steps: Vec<Vec<(u32, f32)>>,
}

/// Our logits equal llama.cpp's to the last bit, on prompts that take each of ggml's attention paths (see
/// make_fixtures.sh): the prompt's last position and 7 greedy steps after it, at llama.cpp's top 10 tokens.
#[test]
fn logits_equal_llama_cpp_bit_for_bit() {
    let llama = &model().llama;
    let fixtures: Vec<TopLogits> = jsonl("tests/fixtures/llamacpp_logits.jsonl");
    assert_eq!(fixtures.len(), 4);
    for f in &fixtures {
        let mut cache = llama.new_cache();
        let mut fed = f.prompt_ids.clone();
        let mut positions: Vec<usize> = (0..fed.len()).collect();
        for (step, top) in f.steps.iter().enumerate() {
            let out = llama
                .forward(
                    &mut cache,
                    &fed,
                    &positions,
                    1,
                    &Mask::Causal,
                    Logits::Last,
                    &Capture::default(),
                )
                .unwrap();
            let row = logits_row(&out.logits, 0, 0).unwrap();
            for &(id, want) in top {
                assert_eq!(
                    row[id as usize].to_bits(),
                    want.to_bits(),
                    "question {}, step {step}, token {id}: ours {}, llama.cpp {want}",
                    f.question_id,
                    row[id as usize]
                );
            }
            let next = argmax(&row);
            assert_eq!(next, top[0].0, "question {}, step {step}", f.question_id);
            let at = cache.len();
            (fed, positions) = (vec![next], vec![at]);
        }
    }
}

/// The engine, not just the forward: a run of plain greedy and of greedy speculation (which prefills and verifies
/// in other shapes) gives llama.cpp's continuation on the prompts that take each attention path, the longest in
/// two prefill chunks.
#[test]
fn engine_runs_give_llama_cpp_greedy_output() {
    let questions = questions();
    let fixtures: Vec<Greedy> = jsonl("tests/fixtures/llamacpp_greedy.jsonl");
    for q in [81, 91, 133, 241] {
        let f = fixtures.iter().find(|f| f.question_id == q).unwrap();
        for (method, params) in [
            ("greedy", MethodParams::default()),
            (
                "speculative",
                speculative_params("prompt-lookup", SamplingParams::greedy()),
            ),
        ] {
            let trace = generate(model(), spec(method, &questions[&q], params, 32, 0)).unwrap();
            assert_eq!(
                trace.summary.unwrap().token_ids,
                f.ids,
                "{method} on question {q}"
            );
        }
    }
}

/// A margin (nats) below which rounding alone can pick either token: before our attention followed llama.cpp's,
/// summing it in another order moved our logits by up to 0.6.
const NEAR_TIE: f32 = 0.6;

/// `--matmul block-sums` (each weight block summed as one integer, as llama.cpp's AMX kernels do): greedy
/// continuations equal llama.cpp's on a CPU with AMX (a fixture of their own, since llama.cpp's output there
/// differs from its `vec_dot` output on 24 of the 40 prompts), and a 32-token verification forward gives exactly
/// the logits of 32 decoding steps.
#[test]
fn block_sums_equal_llama_cpp_on_amx() {
    use specula_core::model::Kernels;
    if !specula_core::kernels::block_sums::available() {
        eprintln!("no AVX-512 VNNI here: block sums are covered by the kernel tests only");
        assert!(specula_core::set_kernels(Kernels::BlockSums).is_err());
        return;
    }
    let sums = specula_core::Model::load_with(&common::model_path(), Kernels::BlockSums).unwrap();
    assert_eq!(sums.llama.info.matmul.as_deref(), Some("block-sums"));
    assert_eq!(model().llama.info.matmul, None);
    let fixtures: Vec<Greedy> = jsonl("tests/fixtures/llamacpp_greedy_amx.jsonl");
    assert_eq!(fixtures.len(), 40);
    let vec_dot: Vec<Greedy> = jsonl("tests/fixtures/llamacpp_greedy.jsonl");
    let (mut identical, mut compared, mut differ_from_vec_dot) = (0, 0, 0);
    let mut mismatches = Vec::new();
    for (n, f) in fixtures.iter().enumerate() {
        let p = f.prompt_ids.len();
        // The prompt as llama.cpp processes one (a causal batch wanting the last logits: its attention paths).
        let mut cache = sums.llama.new_cache();
        let positions: Vec<usize> = (0..p).collect();
        let out = sums
            .llama
            .forward(
                &mut cache,
                &f.prompt_ids,
                &positions,
                1,
                &Mask::Causal,
                Logits::Last,
                &Capture::default(),
            )
            .unwrap();
        let last = logits_row(&out.logits, 0, 0).unwrap();
        // The defining property of one arithmetic for every forward, on a quarter of the prompts (it holds per
        // row, whatever the prompt).
        if n % 4 == 0 {
            let verified = chain(&sums.llama, &mut cache.clone(), &f.ids);
            let mut stepping = cache.clone();
            let stepped: Vec<Vec<f32>> = f
                .ids
                .iter()
                .flat_map(|&id| chain(&sums.llama, &mut stepping, &[id]))
                .collect();
            assert_eq!(
                verified, stepped,
                "question {}: a verification forward must equal step-by-step decoding",
                f.question_id
            );
            compared += 1;
        }
        let free = free_run(&sums, &mut cache, p, &last);
        if free == f.ids {
            identical += 1;
        } else {
            mismatches.push(f.question_id);
        }
        let other = vec_dot
            .iter()
            .find(|g| g.question_id == f.question_id)
            .unwrap();
        differ_from_vec_dot += usize::from(other.ids != f.ids);
    }
    eprintln!(
        "block sums: {identical} of 40 greedy continuations of 32 tokens equal llama.cpp's on a CPU with AMX \
         (whose own differ from its vec_dot fixtures on {differ_from_vec_dot}); verification equal to steps on \
         {compared} prompts"
    );
    assert!(
        differ_from_vec_dot > 0,
        "the AMX fixtures are the vec_dot ones"
    );
    assert!(
        mismatches.is_empty(),
        "questions {mismatches:?} part from llama.cpp's AMX arithmetic"
    );
}
