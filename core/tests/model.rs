//! Properties of our Llama forward on the real default model: parity with candle's stock quantized_llama, tree
//! masks, KV-cache truncation, compaction and forking, capture and layer skipping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{Device, Tensor};
use common::{chain, max_abs_diff, model, model_path};
use std::sync::OnceLock;

use specula_core::model::{Capture, Llama, Logits, Mask, logits_row};
use specula_core::sampling::argmax;

const PROMPT: &str =
    "<|im_start|>user\nName three rivers in Europe.<|im_end|>\n<|im_start|>assistant\n";

fn prompt_ids() -> Vec<u32> {
    model().tokenizer.encode(PROMPT).unwrap()
}

/// Prefill and one decode step of candle-transformers' stock quantized_llama on the prompt: (prefill logits,
/// the greedy next token, that step's logits).
fn stock_logits() -> &'static (Vec<f32>, u32, Vec<f32>) {
    use candle_transformers::models::quantized_llama::ModelWeights;
    static STOCK: OnceLock<(Vec<f32>, u32, Vec<f32>)> = OnceLock::new();
    STOCK.get_or_init(|| {
        let path = model_path();
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let mut stock = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
        let ids = prompt_ids();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let prefill = stock
            .forward(&input, 0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let next = specula_core::sampling::argmax(&prefill);
        let input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let step = stock
            .forward(&input, ids.len())
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (prefill, next, step)
    })
}

/// Our prefill and decode-step logits on the same prompt and token as [`stock_logits`].
fn our_logits(llama: &Llama) -> (Vec<f32>, Vec<f32>) {
    let (_, next, _) = stock_logits();
    let mut cache = llama.new_cache();
    let prefill = chain(llama, &mut cache, &prompt_ids()).pop().unwrap();
    let step = chain(llama, &mut cache, &[*next]).pop().unwrap();
    (prefill, step)
}

/// How far two logit rows are apart: (largest |Δ|, mean |Δ|, KL(softmax(a) ‖ softmax(b))).
fn distance(a: &[f32], b: &[f32]) -> (f32, f32, f64) {
    let logsoftmax = |x: &[f32]| {
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        x.iter()
            .map(|&v| v as f64 - max - sum.ln())
            .collect::<Vec<f64>>()
    };
    let (la, lb) = (logsoftmax(a), logsoftmax(b));
    let kl = la.iter().zip(&lb).map(|(p, q)| p.exp() * (p - q)).sum();
    let mean = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    (max_abs_diff(a, b), mean, kl)
}

/// Our own kernels (llama.cpp's Q8_1 activations and summation order instead of candle's) stay within
/// quantization noise of candle's and make the same greedy choices on this prompt. The tight check of the rest of
/// the forward is tests/parity.rs, on dequantized weights where rounding does not get amplified.
#[test]
fn own_kernels_stay_close_to_candle() {
    let (stock_prefill, _, stock_step) = stock_logits();
    let (prefill, step) = our_logits(&model().llama);
    for (what, ours, stock) in [
        ("prefill", &prefill, stock_prefill),
        ("decode", &step, stock_step),
    ] {
        let (max, mean, kl) = distance(ours, stock);
        eprintln!("own kernels, {what}: max {max} mean {mean} kl {kl}");
        assert!(
            max < 1.5 && kl < 0.02,
            "{what}: logits differ from quantized_llama by {max} (KL {kl})"
        );
        assert_eq!(argmax(ours), argmax(stock), "{what}: greedy choice differs");
    }
}

#[test]
fn tree_forward_equals_its_chains() {
    let llama = &model().llama;
    let ids = prompt_ids();
    let mut base = llama.new_cache();
    chain(llama, &mut base, &ids);
    let p = ids.len();
    // A tree: a -> b -> d, and a -> c. Fed as [a, b, c, d].
    let (a, b, c, d) = (504u32, 2000, 3000, 4000);
    let mut tree_cache = base.clone();
    let out = llama
        .forward(
            &mut tree_cache,
            &[a, b, c, d],
            &[p, p + 1, p + 1, p + 2],
            1,
            &Mask::Tree(vec![None, Some(0), Some(0), Some(1)]),
            Logits::All,
            &Capture::default(),
        )
        .unwrap();
    let tree: Vec<Vec<f32>> = (0..4)
        .map(|i| logits_row(&out.logits, 0, i).unwrap())
        .collect();
    let abd = chain(llama, &mut base.clone(), &[a, b, d]);
    let ac = chain(llama, &mut base.clone(), &[a, c]);
    for (got, want, name) in [
        (&tree[0], &abd[0], "a"),
        (&tree[1], &abd[1], "b"),
        (&tree[3], &abd[2], "d"),
        (&tree[2], &ac[1], "c"),
    ] {
        let diff = max_abs_diff(got, want);
        assert_eq!(
            diff, 0.0,
            "tree node {name} differs from its chain by {diff}"
        );
    }

    // Keeping only the accepted path a, b, d compacts the cache to exactly the chain's.
    let mut compacted = tree_cache.clone();
    let keep: Vec<usize> = (0..p).chain([p, p + 1, p + 3]).collect();
    compacted.keep(&keep).unwrap();
    assert_eq!(compacted.len(), p + 3);
    let mut reference = base.clone();
    chain(llama, &mut reference, &[a, b, d]);
    let e = 5000u32;
    let after_compaction = chain(llama, &mut compacted, &[e]);
    let after_chain = chain(llama, &mut reference, &[e]);
    let diff = max_abs_diff(&after_compaction[0], &after_chain[0]);
    assert_eq!(diff, 0.0, "compacted cache gives different logits ({diff})");
}

/// Verifying k draft tokens in one forward must give the logits k single steps give, bit for bit: otherwise
/// greedy speculative decoding could pick a different token than plain greedy at a near-tie. Our kernels treat
/// every row alike whatever the number of rows (candle's gemm did not).
#[test]
fn a_multi_token_forward_equals_single_steps_bit_for_bit() {
    let llama = &model().llama;
    let ids = prompt_ids();
    let mut base = llama.new_cache();
    chain(llama, &mut base, &ids);
    let next = [504u32, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000];
    let together = chain(llama, &mut base.clone(), &next);
    let mut stepwise = base.clone();
    for (i, &token) in next.iter().enumerate() {
        let one = chain(llama, &mut stepwise, &[token]);
        assert_eq!(
            one[0], together[i],
            "position {i} differs between one forward and single steps"
        );
    }
}

#[test]
fn truncation_rolls_back_exactly() {
    let llama = &model().llama;
    let ids = prompt_ids();
    let mut cache = llama.new_cache();
    chain(llama, &mut cache, &ids);
    let fresh_cache = cache.clone();
    chain(llama, &mut cache, &[100, 200, 300, 400, 500]);
    cache.truncate(ids.len()).unwrap();
    assert_eq!(cache.len(), ids.len());
    let rolled_back = chain(llama, &mut cache, &[700, 800]);
    let fresh = chain(llama, &mut fresh_cache.clone(), &[700, 800]);
    assert!(max_abs_diff(&rolled_back[1], &fresh[1]) <= 1e-5);
    // The copy taken before is untouched by what the other did (forking is safe).
    assert_eq!(fresh_cache.len(), ids.len());
}

#[test]
fn batch_rows_equal_single_runs_and_select_batch_forks() {
    let llama = &model().llama;
    let ids = prompt_ids();
    let mut cache = llama.new_cache();
    chain(llama, &mut cache, &ids);
    let p = ids.len();
    let single_a = chain(llama, &mut cache.clone(), &[1000])[0].clone();
    let single_b = chain(llama, &mut cache.clone(), &[2000])[0].clone();
    let mut beams = cache.clone();
    beams.select_batch(&[0, 0]).unwrap();
    assert_eq!(beams.batch(), 2);
    let out = llama
        .forward(
            &mut beams,
            &[1000, 2000],
            &[p, p],
            2,
            &Mask::Causal,
            Logits::All,
            &Capture::default(),
        )
        .unwrap();
    assert!(max_abs_diff(&logits_row(&out.logits, 0, 0).unwrap(), &single_a) <= 1e-4);
    assert!(max_abs_diff(&logits_row(&out.logits, 1, 0).unwrap(), &single_b) <= 1e-4);
}

#[test]
fn capture_hidden_states_attention_and_skip() {
    let llama = &model().llama;
    let n = llama.config.n_layers;
    let ids = prompt_ids();
    let t = ids.len();
    let positions: Vec<usize> = (0..t).collect();
    let capture = Capture {
        attention_layers: [n - 2, n - 1].into_iter().collect(),
        hidden_states: true,
        ..Capture::default()
    };
    let mut cache = llama.new_cache();
    let out = llama
        .forward(
            &mut cache,
            &ids,
            &positions,
            1,
            &Mask::Causal,
            Logits::Last,
            &capture,
        )
        .unwrap();
    assert_eq!(out.hidden_states.len(), n + 1);
    // The logit lens at the last layer is the model's output.
    let last_hidden = out.hidden_states[n].narrow(1, t - 1, 1).unwrap();
    let lens = llama.head(&last_hidden).unwrap();
    assert!(
        max_abs_diff(
            &logits_row(&lens, 0, 0).unwrap(),
            &logits_row(&out.logits, 0, 0).unwrap()
        ) <= 1e-5
    );
    // Attention rows are distributions over visible keys only.
    assert_eq!(out.attention.len(), 2);
    let probs = out.attention[1]
        .1
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, row) in probs.iter().enumerate() {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "row {i} sums to {sum}");
        assert!(
            row[i + 1..].iter().all(|&p| p == 0.0),
            "row {i} sees the future"
        );
    }
    // Skipping no layer is the full model; skipping layers changes the output and leaves those layers uncached.
    let mut full = llama.new_cache();
    let plain = llama
        .forward(
            &mut full,
            &ids,
            &positions,
            1,
            &Mask::Causal,
            Logits::Last,
            &Capture::default(),
        )
        .unwrap();
    assert_eq!(
        max_abs_diff(
            &logits_row(&plain.logits, 0, 0).unwrap(),
            &logits_row(&out.logits, 0, 0).unwrap()
        ),
        0.0
    );
    let skip = Capture {
        skip_layers: (10..20).collect(),
        ..Capture::default()
    };
    let mut skipped_cache = llama.new_cache();
    let skipped = llama
        .forward(
            &mut skipped_cache,
            &ids,
            &positions,
            1,
            &Mask::Causal,
            Logits::Last,
            &skip,
        )
        .unwrap();
    assert!(
        max_abs_diff(
            &logits_row(&skipped.logits, 0, 0).unwrap(),
            &logits_row(&plain.logits, 0, 0).unwrap()
        ) > 1e-3
    );
    assert_eq!(skipped_cache.layer_len(15), 0);
    assert_eq!(skipped_cache.layer_len(0), t);
}

#[test]
fn forward_refuses_bad_input_without_panicking() {
    let llama = &model().llama;
    let mut cache = llama.new_cache();
    let vocab = llama.config.vocab_size as u32;
    let err = |tokens: &[u32], positions: &[usize], mask: Mask| {
        llama
            .forward(
                &mut cache.clone(),
                tokens,
                positions,
                1,
                &mask,
                Logits::Last,
                &Capture::default(),
            )
            .is_err()
    };
    assert!(
        err(&[vocab], &[0], Mask::Causal),
        "token outside the vocabulary"
    );
    assert!(
        err(&[1], &[llama.config.context_length], Mask::Causal),
        "position past the context"
    );
    assert!(
        err(&[1, 2], &[0], Mask::Causal),
        "positions do not match tokens"
    );
    assert!(
        err(&[1, 2], &[0, 1], Mask::Tree(vec![None, Some(1)])),
        "a node cannot be its own parent"
    );
    assert!(err(&[], &[], Mask::Causal), "nothing to feed");
    assert!(cache.truncate(0).is_ok());
}
