//! The `model` drafter: a second GGUF drafts for the target (here the target itself, the only GGUF on these
//! machines), and one with another vocabulary is refused.

use super::common::{self, model, spec, speculative_params};
use super::{MAX_TOKENS, greedy_baseline, greedy_lossless};
use specula_core::{SamplingParams, generate};

/// The `model` drafter with the target itself as the draft model: greedy output equals plain greedy, and since
/// the draft computes the very logits the verifier will (row-independent forwards), every draft token is
/// accepted. A missing draft model is refused with a clear message.
#[test]
fn draft_model_drafting_for_itself_is_always_accepted() {
    let (prompt, plain) = &greedy_baseline()[0];
    let params = speculative_params("model", SamplingParams::greedy());
    let trace = generate(model(), spec("speculative", prompt, params, MAX_TOKENS, 0)).unwrap();
    let s = trace.summary.as_ref().unwrap();
    assert_eq!(s.token_ids, plain.summary.as_ref().unwrap().token_ids);
    assert!(s.draft_n > 0);
    assert_eq!(
        s.draft_n_accepted, s.draft_n,
        "a model drafting for itself had drafts rejected"
    );
    assert!(
        s.mean_accepted_tokens > 3.0,
        "MAT {}",
        s.mean_accepted_tokens
    );

    let mut missing = speculative_params("model", SamplingParams::greedy());
    missing.speculative.draft_model = None;
    let err = match generate(model(), spec("speculative", prompt, missing, 4, 0)) {
        Err(e) => e.to_string(),
        Ok(t) => t.summary.and_then(|s| s.error).unwrap_or_default(),
    };
    assert!(
        err.contains("draft"),
        "no clear error without a draft model: {err:?}"
    );
}

/// The `model` drafter (the target drafting for itself, the only GGUF here) on the 20 lossless prompts.
#[test]
fn greedy_lossless_draft_model() {
    greedy_lossless("model");
}

/// A draft GGUF whose vocabulary is not the target's is refused, naming the first token that differs: here the
/// default model with two tokens' texts swapped (so that its tokenizer still builds and only the ids disagree).
#[test]
fn a_draft_model_with_another_vocabulary_is_refused() {
    use candle_core::quantized::gguf_file::{self, Value};
    let mut file = std::fs::File::open(common::model_path()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut metadata = content.metadata.clone();
    match metadata.get_mut("tokenizer.ggml.tokens") {
        Some(Value::Array(tokens)) => tokens.swap(1000, 1001),
        other => panic!("no token list: {other:?}"),
    }
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(&str, _)> = names
        .iter()
        .map(|n| {
            let t = content
                .tensor(&mut file, n, &candle_core::Device::Cpu)
                .unwrap();
            (n.as_str(), t)
        })
        .collect();
    let mut keys: Vec<&String> = metadata.keys().collect();
    keys.sort();
    let meta: Vec<(&str, &Value)> = keys.iter().map(|k| (k.as_str(), &metadata[*k])).collect();
    let dir = tempfile::tempdir().unwrap();
    let swapped = dir.path().join("swapped.gguf");
    let mut out = std::fs::File::create(&swapped).unwrap();
    let refs: Vec<(&str, &_)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut out, &meta, &refs).unwrap();
    drop(out);

    let mut params = speculative_params("model", SamplingParams::greedy());
    params.speculative.draft_model = Some(swapped);
    let err = match generate(model(), spec("speculative", "Hello", params, 4, 0)) {
        Err(e) => e.to_string(),
        Ok(t) => t.summary.and_then(|s| s.error).unwrap_or_default(),
    };
    assert!(
        err.contains("token 1000 is") && err.contains("must share the target's tokenizer"),
        "no clear refusal of another vocabulary: {err:?}"
    );
}
