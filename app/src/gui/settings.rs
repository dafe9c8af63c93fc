//! What the user set up in the prompt panel and the view menu; persisted across sessions by eframe.

use serde::{Deserialize, Serialize};
use specula_core::methods::speculative::SIBLING_DRAFTERS;
use specula_core::trace::{
    AdaptiveParams, InspectParams, SamplingParams, SearchParams, SpeculativeParams,
};
use specula_core::{MethodParams, PromptSpec, RunSpec};

/// The decoding methods the GUI offers, as `specula run --method` names them.
pub const METHODS: &[&str] = specula_core::methods::METHOD_NAMES;

/// How a speculative step chooses its draft length (`--draft-len`, `--adaptive`, `--draft-cost`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DraftLength {
    /// Always the draft length.
    #[default]
    Fixed,
    /// Stop once a rejection becomes likely.
    StopThreshold,
    /// The length, possibly none, that maximises expected tokens per unit of cost.
    CostAware,
}

/// What a drafted token adds to a short verification on this machine's CPU, in one-token steps (`specula bench`
/// prints it as `verify_token_cost`).
pub const DEFAULT_DRAFT_COST: f32 = 0.3;

/// What that cost grows by per 1,000 tokens of context (`specula bench` prints it as `verify_token_cost_growth`:
/// 0.12 with `vec_dot` and 0.20 with block sums on the Zen 4 host of 2026-12-06).
pub const DEFAULT_DRAFT_COST_GROWTH: f32 = 0.2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunSettings {
    pub prompt: String,
    pub chat: bool,
    pub use_system: bool,
    pub system: String,
    pub method: String,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub typical_p: f32,
    pub seed: u64,
    pub max_tokens: usize,
    /// Speculative decoding: the drafter (`--drafter`), the draft length and the adaptive policy.
    pub drafter: String,
    pub draft_len: usize,
    pub draft_length: DraftLength,
    /// Stop drafting once the estimated chance that a draft is rejected exceeds this.
    pub adaptive_threshold: f32,
    /// The cost-aware policy's cost of one drafted token, in one-token steps.
    pub draft_cost: f32,
    /// Its growth per 1,000 tokens of context (0: the same cost at every length).
    pub draft_cost_growth: f32,
    /// Token recycling: node budget, tree template ("scored" or "paper") and keeping the matrix across runs.
    pub tree_size: usize,
    pub tree_template: String,
    pub keep_matrix: bool,
    /// Chain drafters with a real q: drafts at the first position (1 = a chain).
    pub siblings: usize,
    /// The `model` drafter's GGUF path (empty: none chosen).
    #[serde(default)]
    pub draft_model: String,
    /// Beam, diverse beam, contrastive, momentum, OPERA and CAD parameters (the CAD context among them).
    pub search: SearchParams,
    /// Entropy-adaptive decoding: threshold, window and dwell.
    pub entropy: AdaptiveParams,
    /// Record the logit lens and attention for every method.
    pub inspect: InspectParams,
}

impl Default for RunSettings {
    fn default() -> Self {
        let s = SamplingParams::default();
        let spec = SpeculativeParams::default();
        Self {
            prompt: "Explain why the sky is blue in two sentences.".to_owned(),
            chat: true,
            use_system: false,
            system: "You are a helpful assistant.".to_owned(),
            method: "greedy".to_owned(),
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            typical_p: s.typical_p,
            seed: 7,
            max_tokens: 64,
            drafter: spec.drafter,
            draft_len: spec.draft_len,
            draft_length: DraftLength::Fixed,
            adaptive_threshold: spec.adaptive.unwrap_or(0.5),
            draft_cost: spec.draft_cost.unwrap_or(DEFAULT_DRAFT_COST),
            draft_cost_growth: spec.draft_cost_growth.unwrap_or(DEFAULT_DRAFT_COST_GROWTH),
            tree_size: spec.tree_size,
            tree_template: spec.tree_template,
            keep_matrix: spec.keep_matrix,
            siblings: spec.siblings,
            draft_model: String::new(),
            search: SearchParams::default(),
            entropy: AdaptiveParams::default(),
            inspect: InspectParams::default(),
        }
    }
}

impl RunSettings {
    pub fn is_greedy(&self) -> bool {
        self.method == "greedy"
    }

    pub fn is_speculative(&self) -> bool {
        self.method == "speculative"
    }

    /// The search and contrast methods, whose parameters live in `search`.
    pub fn is_search(&self) -> bool {
        matches!(
            self.method.as_str(),
            "beam" | "diverse-beam" | "contrastive" | "momentum" | "opera" | "cad"
        )
    }

    /// The parameters a run of the chosen method gets: greedy ignores the sliders.
    pub fn params(&self) -> MethodParams {
        let sampling = if self.is_greedy() {
            SamplingParams::greedy()
        } else {
            SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                typical_p: self.typical_p,
            }
        };
        let speculative = SpeculativeParams {
            drafter: self.drafter.clone(),
            draft_len: self.draft_len,
            adaptive: (self.draft_length == DraftLength::StopThreshold)
                .then_some(self.adaptive_threshold),
            draft_cost: (self.draft_length == DraftLength::CostAware).then_some(self.draft_cost),
            draft_cost_growth: (self.draft_length == DraftLength::CostAware
                && self.draft_cost_growth > 0.0)
                .then_some(self.draft_cost_growth),
            tree_size: self.tree_size,
            tree_template: self.tree_template.clone(),
            keep_matrix: self.keep_matrix,
            // Only the chain drafters draw siblings; others would refuse the setting left from one of them.
            siblings: if SIBLING_DRAFTERS.contains(&self.drafter.as_str()) {
                self.siblings
            } else {
                1
            },
            draft_model: Some(self.draft_model.trim())
                .filter(|p| !p.is_empty())
                .map(Into::into),
            ..SpeculativeParams::default()
        };
        let mut search = self.search.clone();
        search.context = search.context.filter(|c| !c.trim().is_empty());
        MethodParams {
            sampling,
            speculative,
            search,
            adaptive: self.entropy.clone(),
            inspect: self.inspect.clone(),
        }
    }

    pub fn run_spec(&self) -> RunSpec {
        RunSpec {
            label: String::new(),
            method: self.method.clone(),
            params: self.params(),
            prompt: PromptSpec {
                text: self.prompt.clone(),
                chat: self.chat,
                system: (self.chat && self.use_system).then(|| self.system.clone()),
            },
            seed: self.seed,
            max_tokens: self.max_tokens,
            fork: None,
        }
    }
}

/// Everything persisted besides the tile layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub run: RunSettings,
    pub dark_mode: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            run: RunSettings::default(),
            dark_mode: true,
        }
    }
}
