//! Decoding methods: one file per method, all behind [`DecodingMethod`].
//!
//! A method owns its model state (KV caches, beams, drafters) and advances one step at a time; the run driver
//! ([`crate::engine::Run`]) owns everything else: stop conditions, timing, parameter changes, the trace. The
//! driver never knows which method runs, so a new method is a new file plus a line in [`create`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::engine::Model;
use crate::error::{Error, Result};
use crate::model::{Capture, KvCache, Llama, Logits, Mask};
use crate::sampling::RunRng;
use crate::trace::{MethodParams, StepRecord};

mod beam;
mod cad;
mod contrastive;
mod diverse_beam;
pub mod entropy_adaptive;
mod greedy;
pub mod lens;
mod momentum;
mod opera;
mod sample;
pub mod search;
pub mod speculative;

pub use beam::Beam;
pub use cad::Cad;
pub use contrastive::Contrastive;
pub use greedy::Greedy;
pub use momentum::Momentum;
pub use opera::Opera;
pub use sample::Sample;
pub use speculative::Speculative;

/// Every method `specula run --method` accepts.
pub const METHOD_NAMES: &[&str] = &[
    "greedy",
    "sample",
    "speculative",
    "beam",
    "diverse-beam",
    "contrastive",
    "cad",
    "momentum",
    "opera",
    "entropy-adaptive",
];

/// What a method sees during one step.
pub struct StepContext<'a> {
    pub model: &'a Model,
    /// The tokens to prefill before the first generated one: the prompt (plus the kept tokens of a fork).
    pub prefill: &'a [u32],
    /// Tokens the method has committed so far, in order.
    pub generated: &'a [u32],
    /// Parameters in force for this step (they may change between steps).
    pub params: &'a MethodParams,
    /// The run's token budget: search methods settle on their final answer when it is reached.
    pub max_tokens: usize,
    /// A fork's kept tokens: the first `forked` of `generated`, already fed as the end of `prefill`.
    pub forked: usize,
    pub rng: &'a mut RunRng,
    /// Set by the user to stop the run; methods check it between forward passes.
    pub cancel: &'a AtomicBool,
}

impl StepContext<'_> {
    pub fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// The whole sequence so far: the prompt, then every generated token (a fork's kept tokens, which end
    /// `prefill` and open `generated`, once).
    pub fn sequence(&self) -> Vec<u32> {
        self.prefill
            .iter()
            .chain(self.generated.get(self.forked..).unwrap_or_default())
            .copied()
            .collect()
    }

    /// Absolute position of the next generated token.
    pub fn next_position(&self) -> usize {
        self.prefill.len() + self.generated.len() - self.forked.min(self.generated.len())
    }
}

/// A decoding method. `step` commits at least one token (several for speculative methods) and describes what it
/// did in the returned record; the driver fills in the step index, timing and parameter changes.
pub trait DecodingMethod: Send {
    fn name(&self) -> &'static str;
    fn step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepRecord>;
}

/// Builds the method `name` for `model`.
pub fn create(name: &str, model: &Model) -> Result<Box<dyn DecodingMethod>> {
    match name {
        "greedy" => Ok(Box::new(Greedy::new(model))),
        "sample" => Ok(Box::new(Sample::new(model))),
        "speculative" => Ok(Box::new(Speculative::new(model))),
        "beam" => Ok(Box::new(Beam::new(model, false))),
        "diverse-beam" => Ok(Box::new(diverse_beam::new(model))),
        "contrastive" => Ok(Box::new(Contrastive::new(model))),
        "cad" => Ok(Box::new(Cad::new(model))),
        "momentum" => Ok(Box::new(Momentum::new(model))),
        "opera" => Ok(Box::new(Opera::new(model))),
        "entropy-adaptive" => Ok(Box::new(entropy_adaptive::EntropyAdaptive::new(model))),
        other => Err(Error::UnknownMethod(other.to_owned())),
    }
}

/// A record with nothing in it yet, for methods to fill.
pub fn empty_step() -> StepRecord {
    StepRecord {
        index: 0,
        tokens: Vec::new(),
        target_forward_calls: 0,
        draft_forward_calls: 0,
        prefill_tokens: 0,
        draft_n: 0,
        draft_n_accepted: 0,
        param_changes: Vec::new(),
        rollback: None,
        payload: None,
        inspection: Vec::new(),
        timing: None,
    }
}

/// Prompts are fed in chunks of this many tokens, so that cancelling a long prefill waits for one chunk only. It
/// is llama.cpp's batch (our reference runs it with `batchSize: 512`): attention rounds differently in smaller
/// batches (attention.rs), and in these chunks a prompt gives llama.cpp's logits.
pub const PREFILL_CHUNK: usize = 512;

/// One sequence fed token by token through the target model: the state plain autoregressive methods share.
pub struct Sequence {
    model: Arc<Llama>,
    cache: KvCache,
}

impl Sequence {
    pub fn new(model: &Model) -> Self {
        Self {
            model: model.llama.clone(),
            cache: model.llama.new_cache(),
        }
    }

    /// Positions fed so far.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The cache, for methods that go on with batch rows (beams) after a plain prefill.
    pub fn into_cache(self) -> KvCache {
        self.cache
    }

    /// Feeds `tokens` after what was fed before and returns the last position's logits and the number of forward
    /// passes it took.
    pub fn feed(&mut self, tokens: &[u32], cancel: &AtomicBool) -> Result<(Vec<f32>, u32)> {
        let mut logits = None;
        let mut calls = 0;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let start = self.cache.len();
            let positions: Vec<usize> = (start..start + chunk.len()).collect();
            let out = self.model.forward(
                &mut self.cache,
                chunk,
                &positions,
                1,
                &Mask::Causal,
                Logits::Last,
                &Capture::default(),
            )?;
            logits = Some(crate::model::logits_row(&out.logits, 0, 0)?);
            calls += 1;
        }
        let logits = logits.ok_or(Error::EmptyPrompt)?;
        Ok((logits, calls))
    }
}

/// Prefills a fresh sequence with the prompt, counting the work in `record`, and returns its cache and the last
/// position's logits: the first step of methods that go on with batch rows (beams).
pub(crate) fn prefill_cache(
    ctx: &StepContext<'_>,
    record: &mut StepRecord,
) -> Result<(KvCache, Vec<f32>)> {
    let mut seq = Sequence::new(ctx.model);
    let (logits, calls) = seq.feed(ctx.prefill, ctx.cancel)?;
    record.prefill_tokens = ctx.prefill.len();
    record.target_forward_calls += calls;
    Ok((seq.into_cache(), logits))
}

/// Feeds what the previous step chose (or the whole prompt on the first step) and returns the logits for the
/// next position. Shared by the one-token-per-step methods.
pub(crate) fn advance(
    seq: &mut Sequence,
    ctx: &StepContext<'_>,
    record: &mut StepRecord,
) -> Result<Vec<f32>> {
    let (logits, calls) = if seq.is_empty() {
        record.prefill_tokens = ctx.prefill.len();
        seq.feed(ctx.prefill, ctx.cancel)?
    } else {
        let last = ctx.generated.last().copied().ok_or_else(|| {
            Error::MethodPanicked("a step after the first found no generated token to feed".into())
        })?;
        seq.feed(&[last], ctx.cancel)?
    };
    record.target_forward_calls += calls;
    Ok(logits)
}
