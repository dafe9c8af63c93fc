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
//! - `schema_version` only grows; a file from a newer major version is refused with a clear message.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the trace schema written by this build.
pub const SCHEMA_VERSION: u32 = 1;

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

/// Every parameter of a run. One struct for all methods: each method reads the fields it needs, and new
/// methods add fields with defaults so old traces still parse.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MethodParams {
    pub sampling: SamplingParams,
    /// Read by the `speculative` method only.
    #[serde(default)]
    pub speculative: SpeculativeParams,
    /// Read by the search methods (`beam`, `diverse-beam`, `contrastive`, `cad`).
    #[serde(default)]
    pub search: SearchParams,
}

impl Default for MethodParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::greedy(),
            speculative: SpeculativeParams::default(),
            search: SearchParams::default(),
        }
    }
}

/// Settings of the search methods (and momentum decoding). Each method reads the fields it needs; validated by
/// `SearchParams::validate` (in `methods::search`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SearchParams {
    /// Hypotheses kept in total (beam, diverse-beam), 1..=16.
    pub beams: usize,
    /// Diverse beam search: groups the beams are split into (`beams` must be a multiple of it).
    pub groups: usize,
    /// Diverse beam search: Hamming diversity strength lambda, subtracted from a token's log-probability once
    /// per earlier group that chose the same token at the same step.
    pub diversity: f32,
    /// Finished hypotheses are ranked by score / length^length_penalty (Hugging Face's convention: > 0 favours
    /// longer outputs, 0 ranks by total log-probability).
    pub length_penalty: f32,
    /// Stop as soon as `beams` hypotheses have finished, instead of when no live one can still beat them.
    pub early_stopping: bool,
    /// Contrastive search: the degeneration penalty alpha in [0, 1]. CAD: the context weight alpha >= 0.
    /// Momentum decoding: the weight of the loop resistance.
    pub alpha: f32,
    /// Contrastive search and momentum decoding: candidates k scored each step, 1..=32.
    pub candidates: usize,
    /// OPERA: roll back once the same summary position has won this many steps (0 = never).
    pub retrospect: usize,
    /// CAD: the context (document) prepended to the prompt in the conditioned sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

impl Default for SearchParams {
    fn default() -> Self {
        Self {
            beams: 4,
            groups: 2,
            diversity: 0.5,
            length_penalty: 1.0,
            early_stopping: false,
            alpha: 0.5,
            candidates: 5,
            retrospect: 15,
            context: None,
        }
    }
}

/// Settings of speculative decoding: which drafter proposes tokens and how many. Validated by
/// `SpeculativeParams::validate` (in `methods::speculative`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpeculativeParams {
    /// The drafter's name, as `--drafter` takes it ("prompt-lookup", "layer-skip", "token-recycling").
    pub drafter: String,
    /// Longest draft (chain length, or tree depth), 1..=16.
    pub draft_len: usize,
    /// Adaptive draft length: stop drafting once the estimated probability that some draft token is rejected
    /// exceeds this threshold h (SpecDec++'s threshold policy, estimated without training). `None` = fixed.
    pub adaptive: Option<f32>,
    /// Node budget of tree drafters (token recycling).
    pub tree_size: usize,
    /// Layers the layer-skip drafter skips; empty = the drafter's default (a contiguous middle block).
    pub skip_layers: Vec<usize>,
}

impl Default for SpeculativeParams {
    fn default() -> Self {
        Self {
            drafter: "prompt-lookup".to_owned(),
            draft_len: 4,
            adaptive: None,
            tree_size: 16,
            skip_layers: Vec::new(),
        }
    }
}

/// The warping applied to the model's distribution before a token is chosen. Applied in this order:
/// temperature, top-k, typical, top-p, min-p (temperature first, as Hugging Face does, so that top-p and min-p
/// act on the distribution actually sampled). Temperature 0 means greedy (argmax).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// Locally typical sampling mass; 1 = off.
    pub typical_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            min_p: 0.0,
            typical_p: 1.0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            typical_p: 1.0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// A short description for labels: "greedy" or "T=0.8 top-p=0.95".
    pub fn describe(&self) -> String {
        if self.is_greedy() {
            return "greedy".to_owned();
        }
        let mut s = format!("T={}", self.temperature);
        if self.top_k > 0 {
            s += &format!(" top-k={}", self.top_k);
        }
        if self.typical_p < 1.0 {
            s += &format!(" typical={}", self.typical_p);
        }
        if self.top_p < 1.0 {
            s += &format!(" top-p={}", self.top_p);
        }
        if self.min_p > 0.0 {
            s += &format!(" min-p={}", self.min_p);
        }
        s
    }
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
    #[serde(other)]
    Unknown,
}

/// What a drafter proposed and what the verifier made of it, in one step. The step's `tokens` are the committed
/// result (accepted drafts, then the corrected or bonus token); this is the story behind them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeculativeStep {
    /// The drafter's name, as `--drafter` takes it ("prompt-lookup", "layer-skip", ...).
    pub drafter: String,
    /// "greedy" (accept while the draft is the target's argmax) or "sampling" (lossless rejection sampling).
    pub verifier: String,
    /// Draft length asked for this step (the adaptive policy may stop earlier).
    pub draft_len: usize,
    /// The draft tree in the order it was fed to the target; a chain is a tree whose nodes each have the
    /// previous one as parent. `parent: None` hangs off the last committed token.
    pub nodes: Vec<DraftNode>,
    /// Indices into `nodes` of the accepted path, root first.
    pub accepted_path: Vec<usize>,
    /// The verifier's draw after the last accepted node: from the residual at a rejection, or the bonus token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<Rejection>,
    /// Per depth along the verified path: alpha = sum over tokens of min(p, q), the probability that a draft
    /// drawn from q is accepted at that position.
    #[serde(default)]
    pub alpha: Vec<f32>,
    /// Drafter-specific notes shown in the panel (the skipped layers, the matched n-gram, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DraftNode {
    pub id: u32,
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<usize>,
    /// 1 for the first drafted token after the committed text.
    pub depth: usize,
    /// The drafter's probability of this token (1 for point-mass drafters such as n-gram lookup).
    pub q: f32,
    /// The target's (warped) probability of this token at this position, once verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p: Option<f32>,
    pub status: DraftStatus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftStatus {
    Accepted,
    Rejected,
    /// Never reached: an ancestor or an earlier sibling decided the step first.
    Unverified,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// Depth of the position where the verifier drew its own token.
    pub depth: usize,
    /// True when every draft on the path was accepted and the token is the bonus from the next distribution.
    pub bonus: bool,
    /// The most likely tokens of the distribution the verifier drew from: norm(max(0, p - q)) after a
    /// rejection, p for a bonus token. Probabilities in `warped_prob`.
    pub distribution: Vec<Candidate>,
    /// The token drawn.
    pub token_id: u32,
}

/// One step of (diverse) beam search. The step's `tokens` follow the best live hypothesis (after a rollback when
/// the best changed to one that diverged earlier); this is the whole search state behind them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BeamStep {
    /// Groups of diverse beam search (1 for plain beam search).
    pub groups: usize,
    /// Live hypotheses after this step, best first within each group, groups in order.
    pub live: Vec<BeamHypothesis>,
    /// Candidates of this step that were neither kept nor finished, best first (a few per group).
    #[serde(default)]
    pub pruned: Vec<BeamCandidate>,
    /// Finished hypotheses so far (ended by an end-of-generation token), best first.
    #[serde(default)]
    pub finished: Vec<BeamHypothesis>,
    /// Index into `live` of the hypothesis the output follows, or `None` when the search ended on a finished one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<usize>,
    /// Diverse beam search: distinct bigrams / all bigrams over the best live hypothesis of each group (1 = the
    /// groups share no bigram, 1/groups = they are identical). Absent for one group or fewer than two tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distinct_2: Option<f32>,
    /// True on the step that ended the search (the output is the final answer).
    #[serde(default)]
    pub done: bool,
    /// OPERA: the output position (0 = first generated token) of the summary token the best hypothesis'
    /// newest token over-trusts, i.e. the column with the largest attention product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_position: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BeamHypothesis {
    /// The generated tokens of the hypothesis (the prompt is not repeated).
    pub token_ids: Vec<u32>,
    pub text: String,
    /// Sum of ln p of its tokens under the model.
    pub logprob: f32,
    /// What the search ranks by: the log-probability plus diversity penalties, divided by
    /// length^length_penalty for finished hypotheses.
    pub score: f32,
    /// Index into the previous step's `live` of the hypothesis this one extends (`None` on the first step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<usize>,
    #[serde(default)]
    pub group: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BeamCandidate {
    /// Index into the previous step's `live` (`None` on the first step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<usize>,
    pub token_id: u32,
    pub token: String,
    /// The hypothesis' log-probability if extended by this token.
    pub logprob: f32,
    pub score: f32,
    #[serde(default)]
    pub group: usize,
    /// The penalty this token paid: the diversity penalty (diverse beam search) or the over-trust penalty
    /// (OPERA).
    #[serde(default)]
    pub penalty: f32,
}

/// Contrastive search: each of the top-k tokens scored by (1 - alpha) p - alpha max-similarity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContrastiveStep {
    pub alpha: f32,
    /// The candidates, most likely first.
    pub candidates: Vec<ContrastiveCandidate>,
    /// Index into `candidates` of the chosen one.
    pub chosen: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContrastiveCandidate {
    pub id: u32,
    pub token: String,
    /// The model's probability of the candidate.
    pub prob: f32,
    /// Largest cosine similarity between the candidate's last hidden state and those of the earlier tokens.
    pub max_similarity: f32,
    /// Position (absolute) of the earlier token it is most similar to.
    pub most_similar_position: usize,
    pub score: f32,
}

/// Momentum decoding: each of the top-k tokens scored by p(v) - alpha R(L(v)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MomentumStep {
    pub alpha: f32,
    /// The candidates, most likely first.
    pub candidates: Vec<MomentumCandidate>,
    /// Index into `candidates` of the chosen one.
    pub chosen: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MomentumCandidate {
    pub id: u32,
    pub token: String,
    pub prob: f32,
    /// Length of the longest n-gram that choosing this token would repeat (0 = none).
    pub loop_len: usize,
    /// R(loop_len); `None` stands for an infinite resistance (the candidate is barred).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resistance: Option<f32>,
    /// p - alpha R; `None` when barred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// Context-aware decoding: logits = (1 + alpha) logits(context + prompt) - alpha logits(prompt).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CadStep {
    pub alpha: f32,
    /// Most likely tokens with the context; `logprob` under that distribution.
    pub with_context: Vec<Candidate>,
    /// Most likely tokens without the context.
    pub without_context: Vec<Candidate>,
    /// Most likely tokens of the adjusted distribution the token was chosen from.
    pub adjusted: Vec<Candidate>,
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

/// One line of a trace file.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TraceLine {
    Header(Box<RunHeader>),
    Step(Box<StepRecord>),
    Summary(Box<RunSummary>),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// Leave out every wall-clock measurement, so that the same seed gives the same bytes.
    pub deterministic: bool,
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

    pub fn write_jsonl(&self, w: &mut dyn Write, opts: ExportOptions) -> std::io::Result<()> {
        let mut header = self.header.clone();
        let mut summary = self.summary.clone();
        if opts.deterministic {
            header.created_unix_ms = None;
            if let Some(s) = summary.as_mut() {
                s.timing = None;
            }
        }
        write_line(w, &TraceLine::Header(Box::new(header)))?;
        for step in &self.steps {
            if opts.deterministic && step.timing.is_some() {
                let mut step = step.clone();
                step.timing = None;
                write_line(w, &TraceLine::Step(Box::new(step)))?;
            } else {
                write_line(w, &TraceLine::Step(Box::new(step.clone())))?;
            }
        }
        if let Some(s) = summary {
            write_line(w, &TraceLine::Summary(Box::new(s)))?;
        }
        Ok(())
    }

    /// One row per generated token, for spreadsheets and plotting scripts.
    pub fn write_csv(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let mut out = csv::Writer::from_writer(w);
        out.write_record([
            "run",
            "step",
            "position",
            "token_id",
            "token",
            "logprob",
            "prob",
            "rank",
            "entropy",
            "sampling_prob",
            "source",
            "top1_token",
            "top1_logprob",
            "step_ms",
        ])?;
        for step in &self.steps {
            for t in &step.tokens {
                let top1 = t.top_logprobs.first();
                out.write_record([
                    self.header.label.clone(),
                    step.index.to_string(),
                    t.position.to_string(),
                    t.id.to_string(),
                    t.token.clone(),
                    t.logprob.to_string(),
                    t.prob().to_string(),
                    t.rank.to_string(),
                    t.entropy.to_string(),
                    t.sampling_prob.map(|p| p.to_string()).unwrap_or_default(),
                    serde_json::to_string(&t.source)
                        .unwrap_or_default()
                        .trim_matches('"')
                        .to_owned(),
                    top1.map(|c| c.token.clone()).unwrap_or_default(),
                    top1.map(|c| c.logprob.to_string()).unwrap_or_default(),
                    step.timing
                        .map(|t| format!("{:.3}", t.total_ms))
                        .unwrap_or_default(),
                ])?;
            }
        }
        out.flush()
    }

    /// Reads every run of a JSONL trace. Errors name the line and, through serde, the field.
    pub fn read_jsonl(r: impl BufRead) -> Result<Vec<Trace>, TraceError> {
        let mut runs: Vec<Trace> = Vec::new();
        for (i, line) in r.lines().enumerate() {
            let line_no = i + 1;
            let line = line.map_err(|e| TraceError::Parse {
                line: line_no,
                message: e.to_string(),
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let parsed: TraceLine = serde_json::from_str(&line).map_err(|e| TraceError::Parse {
                line: line_no,
                message: describe_json_error(&line, &e),
            })?;
            match parsed {
                TraceLine::Header(h) => {
                    if h.schema_version > SCHEMA_VERSION {
                        return Err(TraceError::TooNew {
                            line: line_no,
                            found: h.schema_version,
                            supported: SCHEMA_VERSION,
                        });
                    }
                    runs.push(Trace::new(*h));
                }
                TraceLine::Step(s) => match runs.last_mut() {
                    Some(run) => run.steps.push(*s),
                    None => {
                        return Err(TraceError::NoHeader {
                            line: line_no,
                            kind: "step",
                        });
                    }
                },
                TraceLine::Summary(s) => match runs.last_mut() {
                    Some(run) => run.summary = Some(*s),
                    None => {
                        return Err(TraceError::NoHeader {
                            line: line_no,
                            kind: "summary",
                        });
                    }
                },
            }
        }
        if runs.is_empty() {
            return Err(TraceError::Empty);
        }
        Ok(runs)
    }

    pub fn load(path: &Path) -> Result<Vec<Trace>, TraceError> {
        let file = std::fs::File::open(path).map_err(|source| TraceError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::read_jsonl(std::io::BufReader::new(file))
    }
}

fn write_line(w: &mut dyn Write, line: &TraceLine) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, line)?;
    w.write_all(b"\n")
}

/// serde_json says "missing field `token` at line 1 column 80"; the line is ours to name, so keep the field and
/// the column, and add which record kind it was.
fn describe_json_error(line: &str, e: &serde_json::Error) -> String {
    let kind = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
    match kind {
        Some(kind) => format!("in a `{kind}` record: {e}"),
        None => format!("not a trace record: {e}"),
    }
}

/// The file formats a set of runs can be saved in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    Jsonl,
    Csv,
}

impl FileFormat {
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("csv") => Self::Csv,
            _ => Self::Jsonl,
        }
    }
}

/// Saves runs so that a crash or a full disk never leaves a half-written file where a good one was: the data
/// goes to a temporary file in the same folder, is flushed to disk, then renamed over the target.
pub fn save_runs(
    path: &Path,
    runs: &[&Trace],
    format: FileFormat,
    opts: ExportOptions,
) -> Result<(), TraceError> {
    write_atomically(path, |w| {
        for run in runs {
            match format {
                FileFormat::Jsonl => run.write_jsonl(w, opts)?,
                FileFormat::Csv => run.write_csv(w)?,
            }
        }
        Ok(())
    })
}

/// Writes through `body` into a temporary sibling of `path`, then renames it into place.
pub fn write_atomically(
    path: &Path,
    body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), TraceError> {
    let err = |source| TraceError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        body(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        // The temporary file is ours and incomplete; failing to remove it changes nothing for the user.
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}
