//! The parameters of a run, for every method: recorded in the trace header and changed live between steps.

use serde::{Deserialize, Serialize};

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
    /// Read by `entropy-adaptive`.
    #[serde(default)]
    pub adaptive: AdaptiveParams,
    /// What the run records of the model's insides (logit lens, attention), for every method.
    #[serde(default)]
    pub inspect: InspectParams,
}

/// Entropy-adaptive decoding: the full model decodes while the rolling mean entropy of the last `window` tokens is
/// at least `threshold`, a layer-skipped copy of it otherwise; a switch waits for `min_dwell` tokens on the current
/// model. The full model decodes the first token (no entropy is known yet). The skipped layers are
/// `speculative.skip_layers` (empty = the middle third).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdaptiveParams {
    /// τ in nats (the trace's entropy unit); 0 = always the full model.
    pub threshold: f32,
    /// Tokens the rolling mean covers, 1..=64.
    pub window: usize,
    /// Tokens decoded by one model before it may hand over, 1..=64.
    pub min_dwell: usize,
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        Self {
            threshold: 1.5,
            window: 4,
            min_dwell: 4,
        }
    }
}

/// Recording of the model's insides, per committed token: an extra forward of the new tokens on a cache of its
/// own, so it costs about one forward per step and changes no decoding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InspectParams {
    /// The top token and its probability at every layer.
    pub lens: bool,
    /// Every layer's attention (per head, max and mean over heads), the `attention_top_k` largest weights per row.
    pub attention: bool,
    pub attention_top_k: usize,
    /// The layers whose attention is recorded; empty = every layer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attention_layers: Vec<usize>,
}

impl Default for InspectParams {
    fn default() -> Self {
        Self {
            lens: false,
            attention: false,
            attention_top_k: 8,
            attention_layers: Vec::new(),
        }
    }
}

impl InspectParams {
    pub fn any(&self) -> bool {
        self.lens || self.attention
    }

    /// Checks the attention settings against a model of `n_layers` layers.
    pub fn validate(&self, n_layers: usize) -> crate::error::Result<()> {
        if !self.attention {
            return Ok(());
        }
        crate::error::count_in_range("attention_top_k", self.attention_top_k, 64, "")?;
        if let Some(&bad) = self.attention_layers.iter().find(|&&l| l >= n_layers) {
            return Err(crate::error::bad_param(
                "attention_layers",
                bad,
                format!("the model has layers 0 to {}", n_layers.saturating_sub(1)),
            ));
        }
        Ok(())
    }

    /// The layers whose attention is recorded, in order, among `n_layers`.
    pub fn recorded_layers(&self, n_layers: usize) -> Vec<usize> {
        if self.attention_layers.is_empty() {
            return (0..n_layers).collect();
        }
        let chosen: std::collections::BTreeSet<usize> = self
            .attention_layers
            .iter()
            .copied()
            .filter(|&l| l < n_layers)
            .collect();
        chosen.into_iter().collect()
    }
}

impl Default for MethodParams {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::greedy(),
            speculative: SpeculativeParams::default(),
            search: SearchParams::default(),
            adaptive: AdaptiveParams::default(),
            inspect: InspectParams::default(),
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
    /// Cost-aware draft length: each drafted token the verification feeds costs this fraction of a one-token
    /// step (plus `draft_cost_growth` with the context), and each step drafts the length (0 = a plain step, up
    /// to `draft_len`) that maximises expected tokens per unit of cost, from the running acceptance. `None` =
    /// off. Exclusive with `adaptive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_cost: Option<f32>,
    /// Cost-aware draft length: what a drafted token's cost grows by per 1,000 tokens of context, since every
    /// verified token attends over the whole cache; at context n the cost is `draft_cost + growth · n / 1000`
    /// (at most `MAX_DRAFT_COST`). `None` = the same cost at every length. Only with `draft_cost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_cost_growth: Option<f32>,
    /// Node budget of tree drafters (token recycling).
    pub tree_size: usize,
    /// Token recycling's tree template: "scored" (the `tree_size` likeliest nodes by candidate rank) or
    /// "paper" (Luo et al.'s static 80-node tree, cut to `tree_size`).
    pub tree_template: String,
    /// Token recycling starts from the matrix the model's earlier runs left (the paper's hot start, kept
    /// across queries) instead of an empty one; the draft notes say how many runs it carries.
    pub keep_matrix: bool,
    /// Layers the layer-skip drafter skips; empty = the drafter's default (a contiguous middle block).
    pub skip_layers: Vec<usize>,
    /// Chain drafters with a real q (layer-skip, early-exit, model): drafts at the first position, drawn from q
    /// without replacement (recursive speculative decoding's siblings; the likeliest ones when greedy), the first
    /// continuing the chain. 1 = a plain chain.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub siblings: usize,
    /// The `model` drafter's GGUF (same vocabulary as the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_model: Option<std::path::PathBuf>,
}

impl Default for SpeculativeParams {
    fn default() -> Self {
        Self {
            drafter: "prompt-lookup".to_owned(),
            draft_len: 4,
            adaptive: None,
            draft_cost: None,
            draft_cost_growth: None,
            tree_size: 16,
            tree_template: "scored".to_owned(),
            keep_matrix: false,
            skip_layers: Vec::new(),
            siblings: 1,
            draft_model: None,
        }
    }
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
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
