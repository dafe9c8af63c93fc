//! The run driver: a loaded model, the specification of a run, and [`Run`], which steps a decoding method and
//! writes the trace. The worker and the headless CLI both drive runs through this module.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::methods::speculative::token_recycling::SharedMatrix;
use crate::methods::{self, DecodingMethod, StepContext};
use crate::model::{Kernels, Llama, read_gguf_header};
use crate::sampling::{RunRng, rng_from_seed};
use crate::tokenizer::Tokenizer;
use crate::trace::{
    ForkOrigin, MethodParams, ParamChange, PromptInfo, RunHeader, RunSummary, SCHEMA_VERSION,
    StepRecord, StepTiming, StopReason, TokenRecord, Trace,
};

/// A loaded model: weights and tokenizer, shared by every run.
#[derive(Clone)]
pub struct Model {
    pub llama: Arc<Llama>,
    pub tokenizer: Arc<Tokenizer>,
    pub path: PathBuf,
    /// Token recycling's matrix, kept between the runs that ask for it (`keep_matrix`); clones share it.
    pub recycled: SharedMatrix,
}

/// The matmul kernels every later [`Model::load`] uses ([`set_kernels`]).
static KERNELS: Mutex<Kernels> = Mutex::new(Kernels::VecDot);

/// Makes every later [`Model::load`] use `kernels` (the binary's `--matmul`; tests keep the default,
/// [`Kernels::VecDot`], whatever the CPU). Refused, with the reason, where the CPU lacks the instructions.
pub fn set_kernels(kernels: Kernels) -> Result<()> {
    if kernels == Kernels::BlockSums {
        crate::kernels::block_sums::require()?;
    }
    *KERNELS.lock().unwrap_or_else(PoisonError::into_inner) = kernels;
    Ok(())
}

impl Model {
    /// Loads a Llama GGUF. A corrupt, truncated or foreign file gives an error that names it, never a panic.
    /// Uses the kernels [`set_kernels`] chose (the default's unless the binary asked for others).
    pub fn load(path: &Path) -> Result<Self> {
        let kernels = *KERNELS.lock().unwrap_or_else(PoisonError::into_inner);
        Self::load_with(path, kernels)
    }

    /// Loads with a choice of matmul kernels (tests compare ours with candle's).
    pub fn load_with(path: &Path, kernels: Kernels) -> Result<Self> {
        let sha256 = crate::store::sha256_file(path).map_err(|e| Error::ModelFile {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        // candle's GGUF reader has panicked on malformed input in the past; a bad file must not take down the
        // worker, so a panic here becomes an ordinary error.
        let loaded = catch_unwind(AssertUnwindSafe(|| -> Result<Self> {
            let (mut file, content) = read_gguf_header(path)?;
            let llama = Llama::load(path, &mut file, &content, sha256, kernels)?;
            let tokenizer = Tokenizer::from_gguf(&content, path)?;
            Ok(Self {
                llama: Arc::new(llama),
                tokenizer: Arc::new(tokenizer),
                path: path.to_owned(),
                recycled: SharedMatrix::default(),
            })
        }));
        loaded.unwrap_or_else(|panic| {
            Err(Error::ModelFile {
                path: path.to_owned(),
                message: format!("the GGUF reader failed: {}", panic_message(&panic)),
            })
        })
    }
}

/// The prompt as the user gave it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PromptSpec {
    pub text: String,
    /// Wrap `text` as a user message in the model's chat template.
    pub chat: bool,
    /// System message for chat prompts; `None` uses the template's default.
    pub system: Option<String>,
}

/// Everything needed to start a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    /// Shown in the GUI; empty means "method and its settings".
    pub label: String,
    pub method: String,
    pub params: MethodParams,
    pub prompt: PromptSpec,
    pub seed: u64,
    pub max_tokens: usize,
    /// A run forked from another: the parent's tokens up to the fork point and the forced token.
    pub fork: Option<Fork>,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self {
            label: String::new(),
            method: "greedy".into(),
            params: MethodParams::default(),
            prompt: PromptSpec::default(),
            seed: 0,
            max_tokens: 128,
            fork: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fork {
    pub origin: ForkOrigin,
    /// Kept tokens of the parent followed by the forced token (its source set to `Forced`).
    pub tokens: Vec<TokenRecord>,
}

/// A run in progress: a decoding method, its random stream and the trace it writes.
pub struct Run {
    model: Model,
    method: Box<dyn DecodingMethod>,
    rng: RunRng,
    params: MethodParams,
    pending_changes: Vec<ParamChange>,
    /// Prompt ids followed by a fork's tokens: what the method prefills.
    prefill: Vec<u32>,
    generated: Vec<u32>,
    trace: Trace,
    fork_tokens: Vec<TokenRecord>,
    /// How many of a fork's tokens open `generated` (they are also the end of `prefill`).
    forked: usize,
    /// Records the lens and attention when the parameters ask for them; made at the first such step.
    inspector: Option<crate::inspect::Inspector>,
}

impl Run {
    pub fn new(model: &Model, spec: RunSpec) -> Result<Self> {
        let method = methods::create(&spec.method, model)?;
        Self::with_method(model, spec, method)
    }

    /// A run of a method built outside [`methods::create`] (a plug-in, or a test double).
    pub fn with_method(
        model: &Model,
        spec: RunSpec,
        method: Box<dyn DecodingMethod>,
    ) -> Result<Self> {
        spec.params.sampling.validate()?;
        spec.params
            .speculative
            .validate(model.llama.config.n_layers)?;
        spec.params.search.validate(&spec.method)?;
        spec.params.inspect.validate(model.llama.config.n_layers)?;
        if spec.method == "entropy-adaptive" {
            spec.params.adaptive.validate()?;
        }
        if spec.max_tokens == 0 {
            return Err(crate::error::bad_param(
                "max_tokens",
                0,
                "must be at least 1",
            ));
        }
        let tok = &model.tokenizer;
        let rendered = if spec.prompt.chat {
            tok.render_chat(&spec.prompt.text, spec.prompt.system.as_deref())
        } else {
            spec.prompt.text.clone()
        };
        let prompt_ids = tok.encode(&rendered)?;
        if prompt_ids.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let context_length = model.llama.config.context_length;
        let fork_tokens = spec
            .fork
            .as_ref()
            .map(|f| f.tokens.clone())
            .unwrap_or_default();
        let mut prefill = prompt_ids.clone();
        prefill.extend(fork_tokens.iter().map(|t| t.id));
        if prefill.len() >= context_length {
            return Err(Error::PromptTooLong {
                prompt_tokens: prefill.len(),
                context_length,
            });
        }
        let label = if spec.label.is_empty() {
            default_label(&spec.method, &spec.params)
        } else {
            spec.label.clone()
        };
        let header = RunHeader {
            schema_version: SCHEMA_VERSION,
            app_version: env!("CARGO_PKG_VERSION").to_owned(),
            label,
            model: model.llama.info.clone(),
            tokenizer: tok.info().clone(),
            method: spec.method.clone(),
            params: spec.params.clone(),
            prompt: PromptInfo {
                text: spec.prompt.text.clone(),
                chat: spec.prompt.chat,
                system: spec.prompt.system.clone(),
                rendered,
                tokens: prompt_ids.iter().map(|&i| tok.token_text(i)).collect(),
                token_ids: prompt_ids,
            },
            seed: spec.seed,
            max_tokens: spec.max_tokens,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_millis() as u64),
            forked_from: spec.fork.as_ref().map(|f| f.origin.clone()),
            sweep_id: None,
        };
        Ok(Self {
            model: model.clone(),
            method,
            rng: rng_from_seed(spec.seed),
            params: spec.params,
            pending_changes: Vec::new(),
            prefill,
            generated: Vec::new(),
            trace: Trace::new(header),
            forked: fork_tokens.len(),
            fork_tokens,
            inspector: None,
        })
    }

    pub fn header(&self) -> &RunHeader {
        &self.trace.header
    }

    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    pub fn into_trace(self) -> Trace {
        self.trace
    }

    pub fn is_finished(&self) -> bool {
        self.trace.summary.is_some()
    }

    pub fn params(&self) -> &MethodParams {
        &self.params
    }

    /// Changes parameters between steps; the change is recorded on the next step.
    pub fn set_params(&mut self, params: MethodParams) -> Result<()> {
        params.sampling.validate()?;
        params
            .speculative
            .validate(self.model.llama.config.n_layers)?;
        params.search.validate(&self.trace.header.method)?;
        if self.trace.header.method == "entropy-adaptive" {
            params.adaptive.validate()?;
        }
        let old = serde_json::to_value(&self.params).unwrap_or_default();
        let new = serde_json::to_value(&params).unwrap_or_default();
        diff_params("", &old, &new, &mut self.pending_changes);
        self.params = params;
        Ok(())
    }

    /// Advances one step. Returns the new step, or `None` when the run had already ended. A failing or
    /// panicking method ends the run with `StopReason::Error` and returns the error.
    pub fn step(&mut self, cancel: &AtomicBool) -> Result<Option<&StepRecord>> {
        if self.is_finished() {
            return Ok(None);
        }
        if self.trace.steps.is_empty() && !self.fork_tokens.is_empty() {
            // A fork starts with the parent's tokens and the forced one, as a step of its own that ran nothing.
            let mut record = methods::empty_step();
            record.tokens = std::mem::take(&mut self.fork_tokens);
            self.generated.extend(record.tokens.iter().map(|t| t.id));
            self.trace.steps.push(record);
            if let Some(stop) = self.stop_reason() {
                self.finish(stop, None);
            }
            return Ok(self.trace.steps.last());
        }
        let started = Instant::now();
        let outcome = {
            let mut ctx = StepContext {
                model: &self.model,
                prefill: &self.prefill,
                generated: &self.generated,
                params: &self.params,
                max_tokens: self.trace.header.max_tokens,
                forked: self.forked,
                rng: &mut self.rng,
                cancel,
            };
            let method = &mut self.method;
            catch_unwind(AssertUnwindSafe(|| method.step(&mut ctx)))
                .unwrap_or_else(|panic| Err(Error::MethodPanicked(panic_message(&panic))))
        };
        let mut record = match outcome {
            Ok(record) => record,
            Err(Error::Cancelled) => {
                self.finish(StopReason::Cancelled, None);
                return Ok(None);
            }
            Err(e) => {
                self.finish(StopReason::Error, Some(e.to_string()));
                return Err(e);
            }
        };
        record.index = self.trace.steps.len();
        record.param_changes = std::mem::take(&mut self.pending_changes);
        let total_ms = started.elapsed().as_secs_f64() * 1000.0;
        let timing = record.timing.unwrap_or_default();
        record.timing = Some(StepTiming { total_ms, ..timing });

        // Commit tokens up to the first end-of-generation token and within the token budget, which counts
        // from where a rollback leaves the output.
        let kept = record
            .rollback
            .as_ref()
            .map_or(self.generated.len(), |r| r.to_generated);
        let budget = self.trace.header.max_tokens.saturating_sub(kept);
        record.tokens.truncate(budget);
        if let Some(eos) = record
            .tokens
            .iter()
            .position(|t| self.model.tokenizer.is_end_of_generation(t.id))
        {
            record.tokens.truncate(eos + 1);
        }
        if let Some(rollback) = &record.rollback {
            if rollback.to_generated > self.generated.len() {
                let message = format!(
                    "the method rolled back to {} tokens, but only {} were generated",
                    rollback.to_generated,
                    self.generated.len()
                );
                self.finish(StopReason::Error, Some(message.clone()));
                return Err(Error::MethodPanicked(message));
            }
            self.generated.truncate(rollback.to_generated);
        }
        self.generated.extend(record.tokens.iter().map(|t| t.id));
        if let Err(e) = self.inspect(&mut record, cancel) {
            if matches!(e, Error::Cancelled) {
                self.finish(StopReason::Cancelled, None);
                return Ok(None);
            }
            self.finish(StopReason::Error, Some(e.to_string()));
            return Err(e);
        }
        self.trace.steps.push(record);
        if let Some(stop) = self.stop_reason() {
            self.finish(stop, None);
        }
        Ok(self.trace.steps.last())
    }

    /// Adds the lens and attention of the step's tokens when the parameters ask for them. Runs after the step's
    /// timing was taken, so the figures of the method stay its own.
    fn inspect(&mut self, record: &mut StepRecord, cancel: &AtomicBool) -> Result<()> {
        if !self.params.inspect.any() || record.tokens.is_empty() {
            return Ok(());
        }
        let prompt = &self.trace.header.prompt.token_ids;
        let sequence: Vec<u32> = prompt.iter().chain(&self.generated).copied().collect();
        let new_from = sequence.len() - record.tokens.len();
        let model = &self.model;
        let inspector = self
            .inspector
            .get_or_insert_with(|| crate::inspect::Inspector::new(model));
        let params = &self.params.inspect;
        record.inspection = catch_unwind(AssertUnwindSafe(|| {
            inspector.inspect(model, &sequence, new_from, params, cancel)
        }))
        .unwrap_or_else(|panic| Err(Error::MethodPanicked(panic_message(&panic))))?;
        Ok(())
    }

    /// Ends the run now (the user cancelled it).
    pub fn cancel(&mut self) {
        if !self.is_finished() {
            self.finish(StopReason::Cancelled, None);
        }
    }

    fn stop_reason(&self) -> Option<StopReason> {
        if self
            .generated
            .last()
            .is_some_and(|&id| self.model.tokenizer.is_end_of_generation(id))
        {
            Some(StopReason::Eos)
        } else if self.generated.len() >= self.trace.header.max_tokens {
            Some(StopReason::MaxTokens)
        } else if self.prefill.len() + self.generated.len()
            >= self.model.llama.config.context_length
        {
            Some(StopReason::ContextFull)
        } else {
            None
        }
    }

    fn finish(&mut self, stop: StopReason, error: Option<String>) {
        let tok = &self.model.tokenizer;
        let text_ids: Vec<u32> = self
            .generated
            .iter()
            .copied()
            .filter(|&i| !tok.is_end_of_generation(i))
            .collect();
        let text = tok.decode(&text_ids);
        self.trace.summary = Some(RunSummary::from_steps(&self.trace.steps, stop, error, text));
    }
}

/// Runs `spec` to the end and returns its trace.
pub fn generate(model: &Model, spec: RunSpec) -> Result<Trace> {
    let mut run = Run::new(model, spec)?;
    let never = AtomicBool::new(false);
    while !run.is_finished() {
        run.step(&never)?;
    }
    Ok(run.into_trace())
}

fn default_label(method: &str, params: &MethodParams) -> String {
    match method {
        "greedy" => "greedy".to_owned(),
        "sample" => format!("sample {}", params.sampling.describe()),
        "speculative" => {
            let s = &params.speculative;
            let len = match (s.adaptive, s.draft_cost) {
                (Some(h), _) => format!("adaptive h={h}"),
                (None, Some(c)) => match s.draft_cost_growth {
                    Some(g) => format!("cost-aware c={c}+{g}/1k k≤{}", s.draft_len),
                    None => format!("cost-aware c={c} k≤{}", s.draft_len),
                },
                (None, None) => format!("k={}", s.draft_len),
            };
            format!(
                "speculative {} {len} {}",
                s.drafter,
                params.sampling.describe()
            )
        }
        "beam" => format!("beam B={}", params.search.beams),
        "diverse-beam" => format!(
            "diverse-beam B={} G={} λ={}",
            params.search.beams, params.search.groups, params.search.diversity
        ),
        "contrastive" => format!(
            "contrastive k={} α={}",
            params.search.candidates, params.search.alpha
        ),
        "opera" => format!("opera B={} α={}", params.search.beams, params.search.alpha),
        "momentum" => format!(
            "momentum k={} α={}",
            params.search.candidates, params.search.alpha
        ),
        "cad" => format!(
            "cad α={} {}",
            params.search.alpha,
            params.sampling.describe()
        ),
        "entropy-adaptive" => format!(
            "entropy-adaptive τ={} W={} D={}",
            params.adaptive.threshold, params.adaptive.window, params.adaptive.min_dwell
        ),
        other => other.to_owned(),
    }
}

/// Lists the leaves that differ between two parameter sets, as dotted names ("sampling.temperature").
fn diff_params(
    prefix: &str,
    old: &serde_json::Value,
    new: &serde_json::Value,
    out: &mut Vec<ParamChange>,
) {
    match (old, new) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            // serde_json's Map is ordered (BTreeMap), so the changes come out in a stable order.
            for (key, value) in b {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                diff_params(
                    &name,
                    a.get(key).unwrap_or(&serde_json::Value::Null),
                    value,
                    out,
                );
            }
        }
        _ if old != new => out.push(ParamChange {
            name: prefix.to_owned(),
            value: new.clone(),
        }),
        _ => {}
    }
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}
