//! Our Llama forward against candle-transformers' stock `quantized_llama`, on the real default model with both
//! dequantized to f32 (candle's `CANDLE_DEQUANTIZE_ALL`).
//!
//! Why dequantized: with the file's Q4_1 blocks every matmul quantizes its input to 8 bits, so a last-bit
//! difference in our attention or norm loops can flip one rounding and this small model carries it to the logits
//! (up to 0.6 apart). In f32 the two forwards may differ only by float rounding, so a tight bound here catches a
//! wrong mask, RoPE, norm, GQA grouping or cache layout. The quantized comparison is in tests/model.rs.
//! A separate test binary, because candle reads the variable once per thread and it must not reach other tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::{max_abs_diff, model_path};
use specula_core::Model;
use specula_core::model::{Capture, Kernels, Logits, Mask, logits_row};
use specula_core::sampling::argmax;

const PROMPT: &str =
    "<|im_start|>user\nName three rivers in Europe.<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn logits_match_candle_quantized_llama_in_f32() {
    // SAFETY: the only test in this binary, run before any thread reads the environment.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    }
    let path = model_path();
    let ours = Model::load_with(&path, Kernels::Candle).unwrap();
    let ids = ours.tokenizer.encode(PROMPT).unwrap();

    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut stock = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let stock_row = |stock: &mut ModelWeights, tokens: &[u32], at: usize| {
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        stock
            .forward(&input, at)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };

    let llama = &ours.llama;
    let mut cache = llama.new_cache();
    let mut our_row = |tokens: &[u32], at: usize| {
        let positions: Vec<usize> = (at..at + tokens.len()).collect();
        let out = llama
            .forward(
                &mut cache,
                tokens,
                &positions,
                1,
                &Mask::Causal,
                Logits::Last,
                &Capture::default(),
            )
            .unwrap();
        logits_row(&out.logits, 0, 0).unwrap()
    };

    let stock_prefill = stock_row(&mut stock, &ids, 0);
    let prefill = our_row(&ids, 0);
    let next = argmax(&stock_prefill);
    let stock_step = stock_row(&mut stock, &[next], ids.len());
    let step = our_row(&[next], ids.len());
    for (what, ours, stock) in [
        ("prefill", &prefill, &stock_prefill),
        ("decode", &step, &stock_step),
    ] {
        let diff = max_abs_diff(ours, stock);
        eprintln!("{what}: max |Δ logit| {diff}");
        assert!(
            diff < 1e-3,
            "{what} logits differ from quantized_llama by {diff}"
        );
        assert_eq!(argmax(ours), argmax(stock), "{what}: greedy choice differs");
    }
}
