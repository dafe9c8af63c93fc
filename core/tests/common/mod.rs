//! Shared by the tests that need the real default model. They fail (never skip) when it is missing: the test
//! command in the README fetches it first.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use specula_core::model::{Capture, KvCache, Llama, Logits, Mask, logits_row};
use specula_core::trace::SpeculativeParams;
use specula_core::{MethodParams, Model, PromptSpec, RunSpec, SamplingParams};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_path() -> PathBuf {
    let path = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "the default model is missing at {}: run models/fetch.sh",
        path.display()
    );
    path
}

/// The default model, loaded once per test binary.
pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(&model_path()).expect("the default model loads"))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A chat run of `method` on `prompt`.
pub fn spec(
    method: &str,
    prompt: &str,
    params: MethodParams,
    max_tokens: usize,
    seed: u64,
) -> RunSpec {
    RunSpec {
        method: method.into(),
        params,
        prompt: PromptSpec {
            text: prompt.into(),
            chat: true,
            system: None,
        },
        seed,
        max_tokens,
        ..RunSpec::default()
    }
}

/// Speculative parameters with `drafter` and a draft length of 4.
pub fn speculative_params(drafter: &str, sampling: SamplingParams) -> MethodParams {
    MethodParams {
        sampling,
        speculative: SpeculativeParams {
            drafter: drafter.into(),
            draft_len: 4,
            // The only GGUF here: the target drafting for itself.
            draft_model: (drafter == "model").then(model_path),
            ..SpeculativeParams::default()
        },
        ..MethodParams::default()
    }
}

/// Feeds `tokens` after the cache's contents as a chain and returns each position's logits.
pub fn chain(llama: &Llama, cache: &mut KvCache, tokens: &[u32]) -> Vec<Vec<f32>> {
    let start = cache.len();
    let positions: Vec<usize> = (start..start + tokens.len()).collect();
    let out = llama
        .forward(
            cache,
            tokens,
            &positions,
            1,
            &Mask::Causal,
            Logits::All,
            &Capture::default(),
        )
        .unwrap();
    (0..tokens.len())
        .map(|i| logits_row(&out.logits, 0, i).unwrap())
        .collect()
}
