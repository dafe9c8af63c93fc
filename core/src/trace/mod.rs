//! The step trace: the contract between the engine and everything that shows or stores a run.
//!
//! A trace file is JSON Lines. Each run is a `header` line, one `step` line per decoding step and, when the run
//! ended, a `summary` line; a file may hold several runs one after another. Field names follow what readers
//! already know: OpenAI's `token`, `logprob`, `top_logprobs`; llama.cpp's `draft_n`, `draft_n_accepted`; vLLM's
//! `mean_acceptance_length`, `acceptance_histogram`.
//!
//! Compatibility rules, so that every version opens the previous versions' files:
//! - new fields are `#[serde(default)]`; fields are never renamed or removed;
//! - method payloads are a tagged enum; a payload kind this version does not know is read as `Unknown`;
//! - `schema_version` only grows; a file from a newer major version is refused with a clear message;
//! - a form a version replaces is still read, and upgraded by the reader (`files::upgrade`), so that the rest of
//!   the program knows only the current form; writers write the current form and version.
//!
//! Versions: 1, the first; 2, attention as a packed `attention_map` instead of `attention` (one JSON object per
//! row, 55 KB per token with the lens at the default settings), and recorded for every prompt position.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod attention;
mod files;
mod params;
mod payload;

pub use attention::{AttentionMap, WEIGHT_SCALE};

pub use files::{ExportOptions, FileFormat, save_runs, write_atomically};
pub use params::{
    AdaptiveParams, InspectParams, MethodParams, SamplingParams, SearchParams, SpeculativeParams,
};
pub use payload::*;

/// Version of the trace schema written by this build.
pub const SCHEMA_VERSION: u32 = 2;

/// How many candidates each token record keeps (OpenAI's maximum for `top_logprobs`).
pub const TOP_CANDIDATES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source} (nothing was overwritten)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("line {line}: {message}")]
    Parse { line: usize, message: String },
    #[error(
        "line {line}: a `{kind}` line comes before any `header` line; is this a Specula trace?"
    )]
    NoHeader { line: usize, kind: &'static str },
    #[error(
        "line {line}: trace schema version {found} is newer than this Specula understands ({supported}); update Specula"
    )]
    TooNew {
        line: usize,
        found: u32,
        supported: u32,
    },
    #[error("the file holds no run (it is empty or has only blank lines)")]
    Empty,
}

// ------------------------------------------------------------------------------------------------------------
// Header

/// Everything needed to know what produced a run and to run it again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunHeader {
    pub schema_version: u32,
    /// Specula's version (`CARGO_PKG_VERSION`) that wrote the trace.
    pub app_version: String,
    /// A short label shown in the GUI ("greedy", "sample T=0.8", "fork of greedy at 12").
    #[serde(default)]
    pub label: String,
    pub model: ModelInfo,
    pub tokenizer: TokenizerInfo,
    /// The decoding method's name, as `specula run --method` takes it.
    pub method: String,
    pub params: MethodParams,
    pub prompt: PromptInfo,
    pub seed: u64,
    pub max_tokens: usize,
    /// Wall-clock creation time; omitted from deterministic exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_unix_ms: Option<u64>,
    /// Set when this run was forked from another one by forcing a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<ForkOrigin>,
    /// Runs started together by a draft-length sweep share this id (the sweep's start time, unix ms), so the
    /// sweep can be rebuilt from saved traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep_id: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `general.name`, or the file name when the GGUF has none.
    pub name: String,
    pub file_name: String,
    /// sha256 of the GGUF file, lower-case hex.
    pub sha256: String,
    pub architecture: String,
    /// Weight format of the block matrices as the file stores them (e.g. "Q4_1").
    pub weight_format: String,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub embedding_length: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub file_bytes: u64,
    /// "amx-tiles" in traces of the 2026-12-05 version run with `--prompt-tiles` (prompt chunks multiplied with
    /// AMX tiles in an arithmetic of their own, since replaced by `block-sums`); read, never written now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_matmul: Option<String>,
    /// "block-sums" when every matmul summed each weight block as one integer (llama.cpp's arithmetic on CPUs with
    /// AMX, `--matmul block-sums` or `auto` there); absent for ggml's `vec_dot` (llama.cpp's elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matmul: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// `tokenizer.ggml.model`, e.g. "gpt2" for byte-level BPE.
    pub model: String,
    /// `tokenizer.ggml.pre`, the pre-tokenizer the file asks for (e.g. "smollm").
    pub pre: String,
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub add_bos: bool,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptInfo {
    /// The text the user wrote (the user message when `chat` is set).
    pub text: String,
    /// Wrapped in the model's chat template.
    pub chat: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The exact text that was tokenized (with the chat template applied).
    pub rendered: String,
    pub token_ids: Vec<u32>,
    /// One display string per prompt token.
    pub tokens: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForkOrigin {
    /// Label of the run this one was forked from.
    pub parent_label: String,
    /// Number of generated tokens kept from the parent before the forced token.
    pub kept_tokens: usize,
    pub forced_token_id: u32,
}

// ------------------------------------------------------------------------------------------------------------
// Steps

/// One decoding step: what the method fed the model and which tokens it committed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub index: usize,
    /// Tokens committed to the output by this step, in order (several for speculative methods).
    pub tokens: Vec<TokenRecord>,
    /// Forward passes of the target model this step made.
    pub target_forward_calls: u32,
    #[serde(default)]
    pub draft_forward_calls: u32,
    /// Prompt tokens fed in this step (the first step prefills the prompt).
    #[serde(default)]
    pub prefill_tokens: usize,
    /// Tokens proposed by a drafter this step (llama.cpp's name).
    #[serde(default)]
    pub draft_n: usize,
    /// Of those, accepted by the verifier.
    #[serde(default)]
    pub draft_n_accepted: usize,
    /// Parameter changes that took effect at this step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub param_changes: Vec<ParamChange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
    /// Method-specific data (draft trees, beams, attention maps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<StepPayload>,
    /// The logit lens and attention of each committed token, when the run's `inspect` parameters ask for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inspection: Vec<Inspection>,
    /// Measured times; omitted from deterministic exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<StepTiming>,
}

/// A committed token, with what the model thought at that position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: u32,
    /// The token's text (lossy where a token holds part of a UTF-8 character).
    pub token: String,
    /// Absolute position in the sequence (prompt tokens come first).
    pub position: usize,
    /// ln p(token) under the model's plain distribution (softmax of the logits at temperature 1).
    pub logprob: f32,
    /// 0 for the model's most likely token.
    pub rank: u32,
    /// Entropy of the plain distribution, in nats.
    pub entropy: f32,
    /// Probability of the token under the warped distribution it was drawn from (absent for greedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling_prob: Option<f32>,
    /// Number of tokens the warpers kept (the support of the warped distribution); absent for greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warped_kept: Option<usize>,
    /// The most likely tokens of the plain distribution, best first, with their warped probability.
    pub top_logprobs: Vec<Candidate>,
    pub source: TokenSource,
}

impl TokenRecord {
    pub fn prob(&self) -> f32 {
        self.logprob.exp()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    /// Probability after warping (0 when a warper cut the token); absent for greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warped_prob: Option<f32>,
}

/// Why a token is in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// The argmax of the target.
    Greedy,
    /// Drawn from the warped target distribution.
    Sampled,
    /// Chosen by the user (fork from a token).
    Forced,
    /// A drafted token the verifier accepted.
    DraftAccepted,
    /// Drawn by the verifier after rejecting a draft token.
    Corrected,
    /// Drawn by the verifier after accepting every draft token.
    Bonus,
    /// Chosen by a search method (beam, contrastive, ...).
    Search,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamChange {
    pub name: String,
    pub value: serde_json::Value,
}

/// Tokens taken back by the method (OPERA's retrospection, for example).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollback {
    /// Generated-token count after the rollback.
    pub to_generated: usize,
    pub removed: usize,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    pub total_ms: f64,
    #[serde(default)]
    pub draft_ms: f64,
    #[serde(default)]
    pub verify_ms: f64,
}

/// Method-specific step data. Later methods add variants; a kind this build does not know reads as `Unknown`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepPayload {
    /// One draft-and-verify round of speculative decoding.
    Speculative(Box<SpeculativeStep>),
    /// One step of beam search or diverse beam search.
    Beams(Box<BeamStep>),
    /// One step of contrastive search: the k candidates and their scores.
    Contrastive(Box<ContrastiveStep>),
    /// One step of context-aware decoding: the distributions with and without the context.
    Cad(Box<CadStep>),
    /// One step of momentum decoding: the k candidates with the loop each would close.
    Momentum(Box<MomentumStep>),
    /// One step of entropy-adaptive decoding: the model that decoded it and the rolling entropy.
    EntropyAdaptive(Box<EntropyAdaptiveStep>),
    #[serde(other)]
    Unknown,
}

// ------------------------------------------------------------------------------------------------------------
// Summary

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    Eos,
    MaxTokens,
    /// The context window is full.
    ContextFull,
    Cancelled,
    Error,
}

/// The output after `steps`: each step first applies its rollback (keeping `to_generated` tokens), then appends
/// its tokens.
pub fn output_tokens(steps: &[StepRecord]) -> Vec<&TokenRecord> {
    let mut out: Vec<&TokenRecord> = Vec::new();
    for step in steps {
        if let Some(rollback) = &step.rollback {
            out.truncate(rollback.to_generated);
        }
        out.extend(step.tokens.iter());
    }
    out
}

/// Figures of a whole run, derived from its steps (and so rebuilt on import when a file lacks them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub stop_reason: StopReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub steps: usize,
    pub generated_tokens: usize,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub target_forward_calls: u64,
    pub draft_forward_calls: u64,
    pub draft_n: u64,
    pub draft_n_accepted: u64,
    /// Generated tokens per target forward pass (1.0 for plain decoding).
    pub mean_accepted_tokens: f64,
    /// `acceptance_histogram[n]` = number of steps that committed n tokens.
    pub acceptance_histogram: Vec<u64>,
    pub mean_entropy: f64,
    /// Mean ln p of the generated tokens under the plain distribution.
    pub mean_logprob: f64,
    /// Measured times; omitted from deterministic exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<RunTiming>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunTiming {
    pub wall_ms: f64,
    /// Time of the step that fed the prompt.
    pub prefill_ms: f64,
    /// Generated tokens after the first, per second of the steps after the first.
    pub decode_tokens_per_s: f64,
}

impl RunSummary {
    /// Derives the summary from the steps. `text` is the decoded output (the tokenizer lives elsewhere).
    pub fn from_steps(
        steps: &[StepRecord],
        stop_reason: StopReason,
        error: Option<String>,
        text: String,
    ) -> Self {
        let output = output_tokens(steps);
        let token_ids: Vec<u32> = output.iter().map(|t| t.id).collect();
        let generated_tokens = token_ids.len();
        let target_forward_calls: u64 = steps
            .iter()
            .map(|s| u64::from(s.target_forward_calls))
            .sum();
        let draft_forward_calls: u64 = steps.iter().map(|s| u64::from(s.draft_forward_calls)).sum();
        let draft_n: u64 = steps.iter().map(|s| s.draft_n as u64).sum();
        let draft_n_accepted: u64 = steps.iter().map(|s| s.draft_n_accepted as u64).sum();
        let mut acceptance_histogram = Vec::new();
        for step in steps {
            let n = step.tokens.len();
            if acceptance_histogram.len() <= n {
                acceptance_histogram.resize(n + 1, 0);
            }
            acceptance_histogram[n] += 1;
        }
        let per_token = |f: fn(&TokenRecord) -> f32| -> f64 {
            let (sum, n) = output.iter().fold((0.0f64, 0usize), |(sum, n), t| {
                (sum + f64::from(f(t)), n + 1)
            });
            if n == 0 { 0.0 } else { sum / n as f64 }
        };
        let timing = summarize_timing(steps);
        Self {
            stop_reason,
            error,
            steps: steps.len(),
            generated_tokens,
            token_ids,
            text,
            target_forward_calls,
            draft_forward_calls,
            draft_n,
            draft_n_accepted,
            mean_accepted_tokens: if target_forward_calls == 0 {
                0.0
            } else {
                generated_tokens as f64 / target_forward_calls as f64
            },
            acceptance_histogram,
            mean_entropy: per_token(|t| t.entropy),
            mean_logprob: per_token(|t| t.logprob),
            timing,
        }
    }
}

fn summarize_timing(steps: &[StepRecord]) -> Option<RunTiming> {
    let times: Vec<f64> = steps
        .iter()
        .map(|s| s.timing.map(|t| t.total_ms))
        .collect::<Option<_>>()?;
    let (first, rest) = times.split_first()?;
    let decode_ms: f64 = rest.iter().sum();
    let decode_tokens: usize = steps.iter().skip(1).map(|s| s.tokens.len()).sum();
    Some(RunTiming {
        wall_ms: first + decode_ms,
        prefill_ms: *first,
        decode_tokens_per_s: if decode_ms > 0.0 {
            decode_tokens as f64 * 1000.0 / decode_ms
        } else {
            0.0
        },
    })
}

// ------------------------------------------------------------------------------------------------------------
// A whole run, and files of runs

/// One run: its header, the steps so far and, once it ended, its summary.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub header: RunHeader,
    pub steps: Vec<StepRecord>,
    pub summary: Option<RunSummary>,
}

impl Trace {
    pub fn new(header: RunHeader) -> Self {
        Self {
            header,
            steps: Vec::new(),
            summary: None,
        }
    }

    /// Generated token ids so far, in order.
    pub fn token_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.tokens().map(|t| t.id)
    }

    /// The output so far, in order: every step's tokens, minus those a later rollback took back.
    pub fn tokens(&self) -> impl Iterator<Item = &TokenRecord> + '_ {
        output_tokens(&self.steps).into_iter()
    }

    pub fn generated_len(&self) -> usize {
        output_tokens(&self.steps).len()
    }

    /// The output text: from the summary when the run ended, else the concatenated token strings.
    pub fn text(&self) -> String {
        match &self.summary {
            Some(s) => s.text.clone(),
            None => self.tokens().map(|t| t.token.as_str()).collect(),
        }
    }
}
