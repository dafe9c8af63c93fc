//! `specula run`: one prompt, one method, headless.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use clap::Args;
use specula_core::trace::{
    AdaptiveParams, ExportOptions, FileFormat, InspectParams, SamplingParams, SearchParams,
    SpeculativeParams, save_runs,
};
use specula_core::{MethodParams, Model, PromptSpec, Run, RunSpec};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The prompt text (special tokens such as <|im_start|> are parsed).
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// Decoding method.
    #[arg(long, default_value = "greedy")]
    pub method: String,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy). Default for --method sample: 0.8.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus: keep the smallest set of tokens reaching probability P (1 = off). Default for sample: 0.95.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one (0 = off).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Locally typical sampling mass (1 = off).
    #[arg(long)]
    pub typical_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the step trace (JSONL; a .csv name writes one row per token).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Leave wall-clock times out of the trace, so that the same seed writes the same bytes.
    #[arg(long)]
    pub deterministic: bool,
    /// Print a JSON summary as the last line instead of streaming the text.
    #[arg(long)]
    pub json: bool,
    /// beam, diverse-beam, opera: hypotheses kept in total (default 4). For contrastive, momentum and opera,
    /// --top-k is the number of candidates scored per hypothesis (default 5).
    #[arg(long)]
    pub beams: Option<usize>,
    /// diverse-beam: groups the beams are split into (default 2; must divide --beams).
    #[arg(long)]
    pub groups: Option<usize>,
    /// diverse-beam: Hamming diversity strength lambda (default 0.5; 0 = independent groups).
    #[arg(long)]
    pub diversity: Option<f32>,
    /// beam, diverse-beam: finished hypotheses rank by score / length^P (default 1).
    #[arg(long)]
    pub length_penalty: Option<f32>,
    /// beam, diverse-beam: stop once --beams hypotheses have finished.
    #[arg(long)]
    pub early_stopping: bool,
    /// contrastive: degeneration penalty in [0, 1]; cad: context weight; momentum: resistance weight; opera:
    /// over-trust penalty weight (default 0.5 for all; 0 = greedy, or beam search for opera).
    #[arg(long)]
    pub alpha: Option<f32>,
    /// cad: the context (document) the output should follow.
    #[arg(long)]
    pub context: Option<String>,
    /// opera: roll back once the same summary token has won N steps (default 15; 0 = never).
    #[arg(long, conflicts_with = "no_rollback")]
    pub retrospect: Option<usize>,
    /// opera: no retrospection (the same as --retrospect 0): the over-trust penalty alone.
    #[arg(long)]
    pub no_rollback: bool,
    /// entropy-adaptive: the full model decodes while the rolling mean entropy (nats) is at least T, the
    /// layer-skipped model (--skip-layers, default the middle third) below it (default 1.5; 0 = always full).
    #[arg(long)]
    pub threshold: Option<f32>,
    /// entropy-adaptive: tokens the rolling mean entropy covers (default 4).
    #[arg(long)]
    pub entropy_window: Option<usize>,
    /// entropy-adaptive: tokens one model decodes before it may hand over (default 4).
    #[arg(long)]
    pub min_dwell: Option<usize>,
    /// Record the logit lens (top token and probability at every layer) for each generated token.
    #[arg(long)]
    pub record_lens: bool,
    /// Record every layer's attention (per head, max and mean over heads) for each generated token.
    #[arg(long)]
    pub record_attention: bool,
    /// With --record-attention: the largest weights kept per attention row (default 8).
    #[arg(long)]
    pub attention_top_k: Option<usize>,
    /// With --record-attention: the layers to record, e.g. 28,29 (default: every layer).
    #[arg(long, value_delimiter = ',')]
    pub attention_layers: Vec<usize>,
    /// speculative: who drafts (prompt-lookup, layer-skip, token-recycling, early-exit, lookahead, model).
    #[arg(long, default_value = "prompt-lookup")]
    pub drafter: String,
    /// speculative: tokens drafted per step, 1-16 (tree depth for tree drafters).
    #[arg(long, default_value_t = 4, conflicts_with = "adaptive")]
    pub draft_len: usize,
    /// speculative: adaptive draft length, up to 16: stop drafting when the estimated probability that some
    /// draft token is rejected passes H (0 < H < 1).
    #[arg(long)]
    pub adaptive: Option<f32>,
    /// speculative: cost-aware draft length, up to --draft-len: every drafted token the verification feeds costs
    /// C one-token steps (`specula bench` prints it as verify_token_cost), and each step drafts the length,
    /// possibly none, that maximises expected tokens per unit of cost.
    #[arg(long, value_name = "C", conflicts_with = "adaptive")]
    pub draft_cost: Option<f32>,
    /// speculative, with --draft-cost: the cost grows by G per 1,000 tokens of context, since every verified
    /// token attends over the whole cache (`specula bench` prints it as verify_token_cost_growth).
    #[arg(long, value_name = "G", requires = "draft_cost")]
    pub draft_cost_growth: Option<f32>,
    /// speculative: node budget of tree drafters (token-recycling).
    #[arg(long, default_value_t = 16)]
    pub tree_size: usize,
    /// speculative, token-recycling: the tree template, scored (the likeliest nodes by candidate rank) or paper
    /// (Luo et al.'s static 80-node tree, cut to --tree-size; give --tree-size 80 --draft-len 6 for all of it).
    #[arg(long, default_value = "scored")]
    pub tree_template: String,
    /// speculative, layer-skip: layers to skip, e.g. 10,11,12 (default: the middle third). early-exit: fixes the
    /// exit before the first of them (default: chosen before every draft from the estimated acceptance of each exit).
    #[arg(long, value_delimiter = ',')]
    pub skip_layers: Vec<usize>,
    /// speculative, layer-skip, early-exit, model: drafts at the first position, drawn without replacement
    /// (recursive speculative decoding's siblings; greedy, the likeliest ones), the first continuing the chain.
    #[arg(long, default_value_t = 1)]
    pub siblings: usize,
    /// speculative, model: the draft model's GGUF (it must share the target's tokenizer).
    #[arg(long)]
    pub draft_model: Option<PathBuf>,
}

impl RunArgs {
    /// The sampling parameters: the method's defaults, overridden by the flags given.
    pub fn sampling(&self) -> SamplingParams {
        // The search methods are deterministic unless asked otherwise (cad samples with --temperature).
        let deterministic = matches!(
            self.method.as_str(),
            "greedy"
                | "beam"
                | "diverse-beam"
                | "contrastive"
                | "cad"
                | "momentum"
                | "opera"
                | "entropy-adaptive"
        );
        let mut s = if deterministic {
            SamplingParams::greedy()
        } else {
            SamplingParams::default()
        };
        if let Some(t) = self.temperature {
            s.temperature = t;
        }
        if let Some(k) = self.top_k
            && !matches!(self.method.as_str(), "contrastive" | "momentum" | "opera")
        {
            s.top_k = k;
        }
        if let Some(p) = self.top_p {
            s.top_p = p;
        }
        if let Some(p) = self.min_p {
            s.min_p = p;
        }
        if let Some(p) = self.typical_p {
            s.typical_p = p;
        }
        s
    }

    /// The search parameters: defaults, overridden by the flags given.
    pub fn search(&self) -> SearchParams {
        let mut s = SearchParams::default();
        if let Some(b) = self.beams {
            s.beams = b;
        }
        if let Some(g) = self.groups {
            s.groups = g;
        }
        if let Some(d) = self.diversity {
            s.diversity = d;
        }
        if let Some(l) = self.length_penalty {
            s.length_penalty = l;
        }
        s.early_stopping = self.early_stopping;
        if let Some(a) = self.alpha {
            s.alpha = a;
        }
        if matches!(self.method.as_str(), "contrastive" | "momentum" | "opera")
            && let Some(k) = self.top_k
        {
            s.candidates = k;
        }
        s.context = self.context.clone();
        if let Some(r) = self.retrospect {
            s.retrospect = r;
        }
        if self.no_rollback {
            s.retrospect = 0;
        }
        s
    }

    /// The entropy-adaptive parameters: defaults, overridden by the flags given.
    pub fn adaptive(&self) -> AdaptiveParams {
        let mut a = AdaptiveParams::default();
        if let Some(t) = self.threshold {
            a.threshold = t;
        }
        if let Some(w) = self.entropy_window {
            a.window = w;
        }
        if let Some(d) = self.min_dwell {
            a.min_dwell = d;
        }
        a
    }

    /// What to record of the model's insides.
    pub fn inspect(&self) -> InspectParams {
        let mut i = InspectParams {
            lens: self.record_lens,
            attention: self.record_attention,
            attention_layers: self.attention_layers.clone(),
            ..InspectParams::default()
        };
        if let Some(k) = self.attention_top_k {
            i.attention_top_k = k;
        }
        i
    }

    /// The speculative-decoding parameters from the flags.
    pub fn speculative(&self) -> SpeculativeParams {
        SpeculativeParams {
            drafter: self.drafter.clone(),
            // Adaptive drafting stops on its own; the cap is the longest draft allowed.
            draft_len: if self.adaptive.is_some() {
                specula_core::methods::speculative::MAX_DRAFT_LEN
            } else {
                self.draft_len
            },
            adaptive: self.adaptive,
            draft_cost: self.draft_cost,
            draft_cost_growth: self.draft_cost_growth,
            tree_size: self.tree_size,
            tree_template: self.tree_template.clone(),
            // One run per process: there is no earlier run whose matrix could be kept.
            keep_matrix: false,
            skip_layers: self.skip_layers.clone(),
            siblings: self.siblings,
            draft_model: self.draft_model.clone(),
        }
    }

    fn prompt_text(&self) -> Result<String> {
        match (&self.prompt, &self.prompt_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the prompt file {}", path.display())),
            (None, None) => bail!("give --prompt TEXT or --prompt-file PATH"),
        }
    }
}

pub fn run(model_path: Option<&Path>, args: RunArgs) -> Result<()> {
    let spec = RunSpec {
        label: String::new(),
        method: args.method.clone(),
        params: MethodParams {
            sampling: args.sampling(),
            search: args.search(),
            speculative: args.speculative(),
            adaptive: args.adaptive(),
            inspect: args.inspect(),
        },
        prompt: PromptSpec {
            text: args.prompt_text()?,
            chat: args.chat,
            system: args.system.clone(),
        },
        seed: args.seed,
        max_tokens: args.max_tokens,
        fork: None,
    };
    // Check what needs no model first, so a typo fails fast.
    spec.params.sampling.validate()?;
    spec.params.search.validate(&spec.method)?;
    if spec.method == "entropy-adaptive" {
        spec.params.adaptive.validate()?;
    }
    if spec.params.inspect.attention && !(1..=64).contains(&spec.params.inspect.attention_top_k) {
        bail!("--attention-top-k must be between 1 and 64");
    }
    // The layer count is checked once the model is loaded.
    spec.params.speculative.validate(usize::MAX)?;
    if !specula_core::methods::METHOD_NAMES.contains(&spec.method.as_str()) {
        bail!(specula_core::Error::UnknownMethod(spec.method.clone()));
    }
    let path = super::resolve_model(model_path)?;
    let model = Model::load(&path)?;
    let mut run = Run::new(&model, spec.clone())?;
    let never = AtomicBool::new(false);
    let mut stdout = std::io::stdout().lock();
    while !run.is_finished() {
        let rolled_back = match run.step(&never)? {
            Some(step) if !args.json => {
                if step.rollback.is_none() {
                    for t in &step.tokens {
                        if !model.tokenizer.is_end_of_generation(t.id) {
                            write!(stdout, "{}", t.token)?;
                        }
                    }
                }
                step.rollback.is_some()
            }
            _ => false,
        };
        if rolled_back {
            // Printed text cannot be taken back: a rollback (beam search, OPERA) starts a line with the output
            // as it now stands.
            write!(stdout, "\n⟲ ")?;
            for t in run.trace().tokens() {
                if !model.tokenizer.is_end_of_generation(t.id) {
                    write!(stdout, "{}", t.token)?;
                }
            }
        }
        stdout.flush()?;
    }
    let trace = run.into_trace();
    if let Some(out) = &args.trace {
        let opts = ExportOptions {
            deterministic: args.deterministic,
        };
        save_runs(out, &[&trace], FileFormat::from_path(out), opts)?;
    }
    let summary = trace
        .summary
        .as_ref()
        .context("the run ended without a summary")?;
    if let Some(error) = &summary.error {
        bail!("the run failed: {error}");
    }
    let timing = summary.timing.unwrap_or_default();
    if args.json {
        let mut json = serde_json::json!({
            "model": trace.header.model.file_name,
            "method": trace.header.method,
            "prompt_ids": trace.header.prompt.token_ids,
            "token_ids": summary.token_ids,
            "text": summary.text,
            "stop_reason": summary.stop_reason,
            "steps": summary.steps,
            "generated_tokens": summary.generated_tokens,
            "target_forward_calls": summary.target_forward_calls,
            "mean_accepted_tokens": summary.mean_accepted_tokens,
            "mean_entropy": summary.mean_entropy,
            "wall_ms": timing.wall_ms,
            "prefill_ms": timing.prefill_ms,
            "decode_tokens_per_s": timing.decode_tokens_per_s,
        });
        if let Some(search) = specula_core::methods::search::search_summary(&trace) {
            json["search"] = search;
        }
        if let Some(adaptive) = specula_core::methods::entropy_adaptive::adaptive_summary(&trace) {
            json["adaptive"] = adaptive;
        }
        if let Some(spec_json) = specula_core::methods::speculative::speculative_summary(&trace) {
            if let (Some(out), Some(add)) = (json.as_object_mut(), spec_json.as_object()) {
                out.extend(add.clone());
            }
            // Measured speedup: plain decoding with the same settings, run right after on the same prompt.
            let plain_method = if spec.params.sampling.is_greedy() {
                "greedy"
            } else {
                "sample"
            };
            let plain = specula_core::generate(
                &model,
                RunSpec {
                    method: plain_method.to_owned(),
                    ..spec.clone()
                },
            )?;
            let plain_wall = plain
                .summary
                .as_ref()
                .and_then(|s| s.timing)
                .map_or(0.0, |t| t.wall_ms);
            json["plain_wall_ms"] = serde_json::json!(plain_wall);
            json["speedup"] = serde_json::json!(if timing.wall_ms > 0.0 {
                plain_wall / timing.wall_ms
            } else {
                0.0
            });
        }
        writeln!(stdout, "{json}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} tokens, {:?}, prefill {:.0} ms for {} prompt tokens, decode {:.1} tokens/s]",
            summary.generated_tokens,
            summary.stop_reason,
            timing.prefill_ms,
            trace.header.prompt.token_ids.len(),
            timing.decode_tokens_per_s
        );
    }
    Ok(())
}
