//! Speculative decoding: a drafter proposes a tree of tokens, the target checks the whole tree in ONE forward
//! (tree mask, logits at every node), the shared verifier keeps a path and adds one token of its own, and the
//! KV cache keeps only the accepted path. Drafters are plug-ins ([`drafter::Drafter`], one file each); the
//! verifier ([`verifier`]) is a pure function of distributions, shared by all.
//!
//! The last committed token is always the root of the draft tree: it has not been fed to the target yet, so
//! the same forward gives the distribution for the first draft position (as `methods::advance` does for
//! one-token methods).

use std::sync::Arc;
use std::time::Instant;

use crate::engine::Model;
use crate::error::{Error, Result, bad_param, count_in_range};
use crate::methods::{DecodingMethod, PREFILL_CHUNK, StepContext, empty_step};
use crate::model::{Capture, KvCache, Llama, Logits, Mask, logits_row};
use crate::sampling::{PositionStats, warp};
use crate::tokenizer::Tokenizer;
use crate::trace::{
    Candidate, DraftNode, DraftStatus, Rejection, SpeculativeParams, SpeculativeStep, StepPayload,
    StepRecord, StepTiming, TOP_CANDIDATES, TokenSource,
};

pub mod draft_length;
pub mod draft_model;
pub mod drafter;
pub mod early_exit;
pub mod layer_skip;
pub mod lookahead;
pub mod prompt_lookup;
pub mod token_recycling;
pub mod verifier;

use draft_length::with_priced_cost;
pub use draft_length::{
    best_length, cost_aware_depth, cost_aware_length, expected_tokens_per_round, predicted_speedup,
};
use drafter::{DraftInput, Drafter, Observation};
use token_recycling::SharedMatrix;

/// Every drafter `--drafter` accepts.
pub const DRAFTER_NAMES: &[&str] = &[
    "prompt-lookup",
    "layer-skip",
    "token-recycling",
    "early-exit",
    "lookahead",
    "model",
];

/// Longest draft a step may ask for: a 16-token verification already costs ~10 single steps on CPU.
pub const MAX_DRAFT_LEN: usize = 16;
/// Highest per-token draft cost the cost-aware policy takes: at 2 a drafted token costs two steps, and no
/// acceptance can pay for it.
pub const MAX_DRAFT_COST: f32 = 2.0;
/// Largest tree a tree drafter may build.
pub const MAX_TREE_SIZE: usize = 128;
/// Most first-position siblings a chain drafter may draw.
pub const MAX_SIBLINGS: usize = 8;
/// The drafters that draft a chain with a real q, and so can draw siblings at its first position.
pub const SIBLING_DRAFTERS: &[&str] = &["layer-skip", "early-exit", "model"];

impl SpeculativeParams {
    /// Refuses values no drafter can work with. `n_layers` bounds `skip_layers`.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        if !DRAFTER_NAMES.contains(&self.drafter.as_str()) {
            return Err(bad_param(
                "drafter",
                &self.drafter,
                format!(
                    "unknown drafter; known drafters: {}",
                    DRAFTER_NAMES.join(", ")
                ),
            ));
        }
        if self.drafter == "model" && self.draft_model.is_none() {
            return Err(bad_param(
                "draft_model",
                "(none)",
                "the model drafter needs a draft model: a GGUF with the target's vocabulary",
            ));
        }
        count_in_range("draft_len", self.draft_len, MAX_DRAFT_LEN, "")?;
        if let Some(h) = self.adaptive
            && !(h.is_finite() && h > 0.0 && h < 1.0)
        {
            return Err(bad_param(
                "adaptive",
                h,
                "the rejection-probability threshold must be in (0, 1)",
            ));
        }
        if let Some(c) = self.draft_cost {
            if !(c.is_finite() && (0.0..=MAX_DRAFT_COST).contains(&c)) {
                return Err(bad_param(
                    "draft_cost",
                    c,
                    format!(
                        "the cost of a drafted token, as a fraction of a one-token step, must be in 0..={MAX_DRAFT_COST}"
                    ),
                ));
            }
            if self.adaptive.is_some() {
                return Err(bad_param(
                    "draft_cost",
                    c,
                    "choose one adaptive policy: the stop threshold (adaptive) or the cost-aware length",
                ));
            }
        }
        if let Some(g) = self.draft_cost_growth {
            if !(g.is_finite() && (0.0..=MAX_DRAFT_COST).contains(&g)) {
                return Err(bad_param(
                    "draft_cost_growth",
                    g,
                    format!(
                        "the growth of a drafted token's cost per 1,000 tokens of context must be in 0..={MAX_DRAFT_COST}"
                    ),
                ));
            }
            if self.draft_cost.is_none() {
                return Err(bad_param(
                    "draft_cost_growth",
                    g,
                    "the cost's growth with context needs the cost-aware length (draft_cost)",
                ));
            }
        }
        count_in_range("siblings", self.siblings, MAX_SIBLINGS, "")?;
        if self.siblings > 1 && !SIBLING_DRAFTERS.contains(&self.drafter.as_str()) {
            return Err(bad_param(
                "siblings",
                self.siblings,
                format!(
                    "only the drafters with a real q draw siblings ({}); {} drafts point masses or trees of its own",
                    SIBLING_DRAFTERS.join(", "),
                    self.drafter
                ),
            ));
        }
        count_in_range("tree_size", self.tree_size, MAX_TREE_SIZE, "")?;
        if !token_recycling::TREE_TEMPLATES.contains(&self.tree_template.as_str()) {
            return Err(bad_param(
                "tree_template",
                &self.tree_template,
                format!(
                    "unknown tree template; known: {}",
                    token_recycling::TREE_TEMPLATES.join(", ")
                ),
            ));
        }
        if let Some(&bad) = self.skip_layers.iter().find(|&&l| l >= n_layers) {
            return Err(bad_param(
                "skip_layers",
                bad,
                format!("the model has layers 0..{n_layers}"),
            ));
        }
        if !self.skip_layers.is_empty() && self.skip_layers.len() >= n_layers {
            return Err(bad_param(
                "skip_layers",
                self.skip_layers.len(),
                "skipping every layer leaves no model to draft with",
            ));
        }
        Ok(())
    }
}

/// Builds the drafter `params` name (the target's tokenizer vets a draft model's vocabulary; token recycling
/// drafts from the model's `kept` matrix when `params.keep_matrix`).
pub fn create_drafter(
    params: &SpeculativeParams,
    llama: &Arc<Llama>,
    tokenizer: &Tokenizer,
    kept: &SharedMatrix,
) -> Result<Box<dyn Drafter>> {
    match params.drafter.as_str() {
        "model" => {
            let path = params.draft_model.as_ref().ok_or_else(|| {
                bad_param(
                    "draft_model",
                    "(none)",
                    "the model drafter needs --draft-model PATH",
                )
            })?;
            Ok(Box::new(draft_model::DraftModel::load(
                path, llama, tokenizer,
            )?))
        }
        "token-recycling" if params.keep_matrix => Ok(Box::new(
            token_recycling::TokenRecycling::kept(llama.config.vocab_size, kept.clone()),
        )),
        "token-recycling" => Ok(Box::new(token_recycling::TokenRecycling::new(
            llama.config.vocab_size,
        ))),
        "prompt-lookup" => Ok(Box::new(prompt_lookup::PromptLookup::default())),
        "layer-skip" => Ok(Box::new(layer_skip::LayerSkip::default())),
        "early-exit" => Ok(Box::new(early_exit::EarlyExit::new(llama.clone()))),
        "lookahead" => Ok(Box::new(lookahead::Lookahead::default())),
        other => Err(bad_param(
            "drafter",
            other,
            format!(
                "unknown drafter; known drafters: {}",
                DRAFTER_NAMES.join(", ")
            ),
        )),
    }
}

pub struct Speculative {
    llama: Arc<Llama>,
    tokenizer: Arc<Tokenizer>,
    /// Holds every committed token but the last (the next tree's root).
    cache: KvCache,
    drafter: Option<Box<dyn Drafter>>,
    /// What the drafter was built for: its name and whether it keeps the model's matrix.
    drafter_for: (String, bool),
    /// The model's kept token-recycling matrix.
    kept_matrix: SharedMatrix,
    /// Running per-draft-token acceptance (exponential mean), for the adaptive point-mass policy.
    acceptance: f64,
}

impl Speculative {
    pub fn new(model: &Model) -> Self {
        Self {
            llama: model.llama.clone(),
            tokenizer: model.tokenizer.clone(),
            cache: model.llama.new_cache(),
            drafter: None,
            drafter_for: (String::new(), false),
            kept_matrix: model.recycled.clone(),
            acceptance: drafter::PRIOR_ACCEPTANCE,
        }
    }
}

impl DecodingMethod for Speculative {
    fn name(&self) -> &'static str {
        "speculative"
    }

    fn step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepRecord> {
        let params = ctx.params.clone();
        params.speculative.validate(self.llama.config.n_layers)?;
        // A live change of drafter (or of keeping the matrix) takes effect here, with a fresh drafter state.
        let wanted = (
            params.speculative.drafter.clone(),
            params.speculative.keep_matrix,
        );
        if self.drafter.is_none() || self.drafter_for != wanted {
            self.drafter = Some(create_drafter(
                &params.speculative,
                &self.llama,
                &self.tokenizer,
                &self.kept_matrix,
            )?);
            self.drafter_for = wanted;
        }
        let mut record = empty_step();
        let context = ctx.sequence();
        let root = *context.last().ok_or(Error::EmptyPrompt)?;
        let root_pos = context.len() - 1;

        // The first step prefills the whole prompt, root included, in the chunks plain decoding feeds it in: a
        // position's keys and values depend on the batch it was fed in (attention.rs), and greedy speculation
        // must stay token-identical to plain greedy. The root's logits come from that prefill.
        let mut root_logits = None;
        if self.cache.len() < root_pos {
            record.prefill_tokens = ctx.prefill.len();
            let start = self.cache.len();
            let learn = self
                .drafter
                .as_ref()
                .is_some_and(|d| d.learns_from_prompt());
            let capture = Capture {
                prompt: true,
                ..Capture::default()
            };
            for (c, chunk) in context[start..=root_pos].chunks(PREFILL_CHUNK).enumerate() {
                ctx.check_cancel()?;
                let from = start + c * PREFILL_CHUNK;
                let positions: Vec<usize> = (from..from + chunk.len()).collect();
                let out = self.llama.forward(
                    &mut self.cache,
                    chunk,
                    &positions,
                    1,
                    &Mask::Causal,
                    if learn { Logits::All } else { Logits::Last },
                    &capture,
                )?;
                record.target_forward_calls += 1;
                let rows = if learn { chunk.len() } else { 1 };
                let logits: Vec<Vec<f32>> = (0..rows)
                    .map(|i| logits_row(&out.logits, 0, i))
                    .collect::<Result<_>>()?;
                // Every prompt position, the root (the prompt's last token) included: its logits are known
                // before the first draft, so the first tree can start from them. The verified tree below shows
                // the root again with the same logits.
                if learn && let Some(d) = self.drafter.as_mut() {
                    d.observe(&Observation {
                        tokens: chunk,
                        logits: &logits,
                        accepted_path: &[],
                        sampling: &params.sampling,
                        p: &[],
                        root_states: &[],
                    })?;
                }
                root_logits = logits.last().cloned();
            }
        }
        let root_fed = root_logits.is_some();
        if self.cache.len() != root_pos + usize::from(root_fed) {
            return Err(Error::MethodPanicked(format!(
                "speculative: the cache holds {} positions, expected {root_pos}",
                self.cache.len()
            )));
        }
        // Drafters see the cache before the root, as on every later step.
        let before_root;
        let draft_cache = if root_fed {
            let mut c = self.cache.clone();
            c.truncate(root_pos)?;
            before_root = c;
            &before_root
        } else {
            &self.cache
        };

        // Draft. Never past the context window: the root and every node need a position.
        let room = self
            .llama
            .config
            .context_length
            .saturating_sub(root_pos + 2);
        let max_len = params.speculative.draft_len.min(room);
        let draft_started = Instant::now();
        let drafter = self
            .drafter
            .as_mut()
            .ok_or_else(|| Error::MethodPanicked("speculative: no drafter".into()))?;
        let draft = if max_len == 0 {
            drafter::Draft::default()
        } else {
            let mut input = DraftInput {
                llama: &self.llama,
                cache: draft_cache,
                context: &context,
                params: &params,
                max_len,
                acceptance: self.acceptance,
                rng: &mut *ctx.rng,
                cancel: ctx.cancel,
            };
            drafter.draft(&mut input)?
        };
        let draft_ms = draft_started.elapsed().as_secs_f64() * 1000.0;
        ctx.check_cancel()?;
        let tree = draft.tree;
        // Depth of each node; nodes beyond the window are a drafter bug, refused rather than fed.
        let depths: Vec<usize> = (0..tree.nodes.len()).map(|i| tree.depth(i)).collect();
        if tree
            .nodes
            .iter()
            .enumerate()
            .any(|(i, n)| n.parent.is_some_and(|p| p >= i))
            || depths
                .iter()
                .any(|&d| root_pos + d >= self.llama.config.context_length)
        {
            return Err(Error::MethodPanicked(
                "speculative: the drafter built an invalid tree".into(),
            ));
        }

        // Verify: the root (unless the prefill fed it) and the whole tree in one forward.
        let verify_started = Instant::now();
        let mut tokens = vec![root];
        tokens.extend(tree.nodes.iter().map(|n| n.token));
        let mut parents = vec![None];
        parents.extend(
            tree.nodes
                .iter()
                .map(|n| Some(n.parent.map_or(0, |p| p + 1))),
        );
        let mut positions = vec![root_pos];
        positions.extend(depths.iter().map(|&d| root_pos + d));
        let mut logits: Vec<Vec<f32>> = root_logits.into_iter().collect();
        let skip = usize::from(root_fed);
        let wants_states =
            !root_fed && self.drafter.as_ref().is_some_and(|d| d.wants_root_states());
        let mut root_states = Vec::new();
        if tokens.len() > skip {
            // Without the root, nodes hanging off it hang off the past (which now ends with it).
            let parents: Vec<Option<usize>> = parents[skip..]
                .iter()
                .map(|p| p.and_then(|p| p.checked_sub(skip)))
                .collect();
            let out = self.llama.forward(
                &mut self.cache,
                &tokens[skip..],
                &positions[skip..],
                1,
                &Mask::Tree(parents),
                Logits::All,
                &Capture {
                    hidden_states: wants_states,
                    ..Capture::default()
                },
            )?;
            record.target_forward_calls += 1;
            for i in 0..tokens.len() - skip {
                logits.push(logits_row(&out.logits, 0, i)?);
            }
            // The root is the forward's first row.
            if wants_states {
                for layer in &out.hidden_states {
                    root_states.push(layer.get(0)?.get(0)?.to_vec1::<f32>()?);
                }
            }
        }
        let p: Vec<_> = logits.iter().map(|l| warp(l, &params.sampling)).collect();
        let p_refs: Vec<&_> = p.iter().collect();
        let verdict = verifier::verify(&tree, &p_refs, &params.sampling, ctx.rng)
            .ok_or_else(|| Error::MethodPanicked("speculative: verifier input mismatch".into()))?;
        // Keep the committed prefix, the root and the accepted path; drop the rejected branches.
        let mut keep: Vec<usize> = (0..=root_pos).collect();
        keep.extend(verdict.accepted_path.iter().map(|&i| root_pos + 1 + i));
        self.cache.keep(&keep)?;
        let verify_ms = verify_started.elapsed().as_secs_f64() * 1000.0;

        // What the drafter learns from the verification is drafting work: its time counts as draft time.
        let observe_started = Instant::now();
        if let Some(d) = self.drafter.as_mut() {
            d.observe(&Observation {
                tokens: &tokens,
                logits: &logits,
                accepted_path: &verdict.accepted_path,
                sampling: &params.sampling,
                p: &p,
                root_states: &root_states,
            })?;
        }
        let draft_ms = draft_ms + observe_started.elapsed().as_secs_f64() * 1000.0;

        // Running acceptance per drafted token along the verified chain (for the adaptive policy).
        if tree.nodes.is_empty() {
            drafter::drift_acceptance(&mut self.acceptance);
        } else {
            let tested = verdict.accepted_path.len() + usize::from(!verdict.bonus);
            drafter::update_acceptance(&mut self.acceptance, verdict.accepted_path.len(), tested);
        }

        // The committed tokens, each with the target's view at its position.
        let show_warped = !params.sampling.is_greedy();
        let tok = &ctx.model.tokenizer;
        let next = ctx.next_position();
        let mut slot = 0usize;
        for (i, &node) in verdict.accepted_path.iter().enumerate() {
            let stats = PositionStats::new(&logits[slot]);
            record.tokens.push(stats.record(
                tok,
                tree.nodes[node].token,
                next + i,
                show_warped.then_some(&p[slot]),
                TokenSource::DraftAccepted,
            ));
            slot = node + 1;
        }
        let stats = PositionStats::new(&logits[slot]);
        record.tokens.push(stats.record(
            tok,
            verdict.token,
            next + verdict.accepted_path.len(),
            show_warped.then_some(&p[slot]),
            if verdict.bonus {
                TokenSource::Bonus
            } else {
                TokenSource::Corrected
            },
        ));

        record.draft_forward_calls = draft.forward_calls;
        record.draft_n = tree.nodes.len();
        record.draft_n_accepted = verdict.accepted_path.len();
        record.timing = Some(StepTiming {
            total_ms: 0.0,
            draft_ms,
            verify_ms,
        });
        let nodes = tree
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| DraftNode {
                id: n.token,
                token: tok.token_text(n.token),
                parent: n.parent,
                depth: depths[i],
                q: n.q.prob(n.token),
                p: Some(p[n.parent.map_or(0, |p| p + 1)].prob(n.token)),
                residual: verdict
                    .residual_p
                    .iter()
                    .find(|&&(node, _)| node == i)
                    .map(|&(_, r)| r as f32),
                status: if verdict.accepted_path.contains(&i) {
                    DraftStatus::Accepted
                } else if verdict.rejected.contains(&i) {
                    DraftStatus::Rejected
                } else {
                    DraftStatus::Unverified
                },
                kind: n.kind,
            })
            .collect();
        let distribution = verdict
            .distribution
            .iter()
            .take(TOP_CANDIDATES)
            .map(|&(id, w)| Candidate {
                id,
                token: tok.token_text(id),
                logprob: stats.logprobs.get(id as usize).copied().unwrap_or(f32::MIN),
                warped_prob: Some(w as f32),
            })
            .collect();
        record.payload = Some(StepPayload::Speculative(Box::new(SpeculativeStep {
            drafter: params.speculative.drafter.clone(),
            verifier: if params.sampling.is_greedy() {
                "greedy".to_owned()
            } else {
                "sampling".to_owned()
            },
            draft_len: max_len,
            nodes,
            accepted_path: verdict.accepted_path.clone(),
            rejection: Some(Rejection {
                depth: verdict.accepted_path.len() + 1,
                bonus: verdict.bonus,
                distribution,
                token_id: verdict.token,
            }),
            alpha: verdict.alpha.clone(),
            note: with_priced_cost(draft.note, &params.speculative, context.len()),
            exit_layers: draft.exit_layers,
        })));
        Ok(record)
    }
}

/// The speculative figures of a finished run, for `specula run --json`: drafted and accepted counts, mean
/// accepted tokens per target forward, acceptance rate, mean alpha, the measured draft/target cost ratio c and
/// the speedup the i.i.d. model predicts from them, (1 - a^(k+1)) / ((1 - a)(k c + 1)) with k the mean draft
/// length. `None` for runs of other methods.
pub fn speculative_summary(trace: &crate::trace::Trace) -> Option<serde_json::Value> {
    if trace.header.method != "speculative" {
        return None;
    }
    let summary = trace.summary.as_ref()?;
    let steps = &trace.steps;
    let (mut alpha_sum, mut alpha_n) = (0.0f64, 0usize);
    for step in steps {
        if let Some(StepPayload::Speculative(p)) = &step.payload {
            alpha_sum += p.alpha.iter().map(|&a| f64::from(a)).sum::<f64>();
            alpha_n += p.alpha.len();
        }
    }
    let verify_steps: Vec<_> = steps.iter().filter(|s| s.payload.is_some()).collect();
    let draft_ms: f64 = verify_steps
        .iter()
        .filter_map(|s| s.timing.map(|t| t.draft_ms))
        .sum();
    // The first step's verify also prefilled nothing (prefill runs before it, outside verify_ms).
    let verify_ms: f64 = verify_steps
        .iter()
        .filter_map(|s| s.timing.map(|t| t.verify_ms))
        .sum();
    let drafted = summary.draft_n as f64;
    let rounds = verify_steps.len().max(1) as f64;
    let alpha = if alpha_n == 0 {
        0.0
    } else {
        alpha_sum / alpha_n as f64
    };
    // c: time to draft one token over the time of one verification forward.
    let c = if drafted > 0.0 && verify_ms > 0.0 {
        (draft_ms / drafted) / (verify_ms / rounds)
    } else {
        0.0
    };
    let k = drafted / rounds;
    let predicted = predicted_speedup(alpha, k, c);
    Some(serde_json::json!({
        "draft_n": summary.draft_n,
        "draft_n_accepted": summary.draft_n_accepted,
        "mean_accepted_tokens": summary.mean_accepted_tokens,
        "acceptance_rate": if drafted > 0.0 { summary.draft_n_accepted as f64 / drafted } else { 0.0 },
        "mean_alpha": alpha,
        "mean_draft_len": k,
        "draft_cost_ratio": c,
        "predicted_speedup": predicted,
    }))
}
