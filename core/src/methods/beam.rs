//! Beam search, and the group search that diverse beam search runs on top of it (`diverse_beam.rs`).
//!
//! Every step extends each live hypothesis by its most likely tokens, scores the extensions by cumulative
//! log-probability and keeps the best `beams` of them. An extension ending in an end-of-generation token
//! becomes a finished hypothesis, ranked by score / length^length_penalty. The search follows Hugging Face's
//! `BeamSearchScorer`: 2·n candidates per group, an end-of-generation candidate only counts when it ranks among
//! the first n, at most n finished hypotheses per group, and a group is done once it holds n finished ones and
//! (unless early stopping) no live one can still beat the worst of them.
//!
//! The beams are the rows of one batched forward; `KvCache::select_batch` reorders the cache to the surviving
//! parents. The output always shows the best live hypothesis: when the best switches to one that diverged
//! earlier, the step rolls the output back to the divergence and commits the new best's tokens from there.

use std::sync::Arc;

use super::search::follow;
use super::{DecodingMethod, StepContext, empty_step, prefill_cache};
use crate::engine::Model;
use crate::error::{Error, Result};
use crate::model::{Capture, KvCache, Logits, Mask, logits_row};
use crate::sampling::{PositionStats, top_n};
use crate::trace::{
    BeamCandidate, BeamHypothesis, BeamStep, StepPayload, StepRecord, TokenRecord, TokenSource,
};

/// Pruned candidates recorded per group and step: enough to show what nearly made it.
const PRUNED_SHOWN: usize = 8;

pub struct Beam {
    /// Diverse beam search reads `groups` and `diversity`; plain beam search is one group with no penalty.
    diverse: bool,
    state: Option<State>,
}

#[derive(Clone)]
struct Hyp {
    tokens: Vec<Arc<TokenRecord>>,
    logprob: f64,
    /// Log-probability plus the diversity penalties paid so far (what the search ranks live hypotheses by).
    score: f64,
    group: usize,
    parent: Option<usize>,
}

impl Hyp {
    fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }
}

struct Finished {
    hyp: Hyp,
    /// score / length^length_penalty.
    final_score: f64,
}

struct State {
    /// One batch row per live hypothesis, in `live` order; holds every token of each except its newest.
    cache: KvCache,
    live: Vec<Hyp>,
    /// Logits for the next token of each live hypothesis (only before the first step; later steps compute them).
    first_logits: Option<Vec<f32>>,
    /// Output tokens committed before the search began (a fork's); hypotheses extend them.
    base: usize,
    /// Per group, best first, at most `beams / groups`.
    finished: Vec<Vec<Finished>>,
    group_done: Vec<bool>,
    done: bool,
}

impl Beam {
    pub fn new(_model: &Model, diverse: bool) -> Self {
        Self {
            diverse,
            state: None,
        }
    }
}

impl DecodingMethod for Beam {
    fn name(&self) -> &'static str {
        if self.diverse { "diverse-beam" } else { "beam" }
    }

    fn step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepRecord> {
        let p = &ctx.params.search;
        let diversity = if self.diverse {
            f64::from(p.diversity)
        } else {
            0.0
        };
        let mut record = empty_step();
        let state = match &mut self.state {
            Some(s) => s,
            None => {
                let (mut cache, logits) = prefill_cache(ctx, &mut record)?;
                let groups = if self.diverse { p.groups.max(1) } else { 1 };
                // Every group starts from the prompt alone: one hypothesis each, not n copies of it.
                cache.select_batch(&vec![0; groups])?;
                self.state.insert(State {
                    cache,
                    live: (0..groups)
                        .map(|group| Hyp {
                            tokens: Vec::new(),
                            logprob: 0.0,
                            score: 0.0,
                            group,
                            parent: None,
                        })
                        .collect(),
                    first_logits: Some(logits),
                    base: ctx.generated.len(),
                    finished: (0..groups).map(|_| Vec::new()).collect(),
                    group_done: vec![false; groups],
                    done: false,
                })
            }
        };
        if state.done {
            return Err(Error::MethodPanicked(
                "beam search was stepped after it had finished".into(),
            ));
        }
        // The group count is fixed at the first step (hypotheses belong to groups); the width may change.
        let groups = state.group_done.len();
        let per_group = (p.beams / groups).max(1);
        let length_penalty = f64::from(p.length_penalty);
        let cur_len = state.live.first().map_or(0, |h| h.tokens.len());
        let position = ctx.prefill.len() + cur_len;

        // Next-token distributions of every live hypothesis: one forward with a row per hypothesis.
        let rows: Vec<Vec<f32>> = match state.first_logits.take() {
            Some(logits) => vec![logits; state.live.len()],
            None => {
                ctx.check_cancel()?;
                let tokens: Vec<u32> = state
                    .live
                    .iter()
                    .map(|h| h.tokens.last().map_or(0, |t| t.id))
                    .collect();
                let positions = vec![position - 1; tokens.len()];
                let out = ctx.model.llama.forward(
                    &mut state.cache,
                    &tokens,
                    &positions,
                    tokens.len(),
                    &Mask::Causal,
                    Logits::Last,
                    &Capture::default(),
                )?;
                record.target_forward_calls += 1;
                (0..tokens.len())
                    .map(|r| logits_row(&out.logits, r, 0))
                    .collect::<Result<_>>()?
            }
        };
        let stats: Vec<PositionStats> = rows.iter().map(|l| PositionStats::new(l)).collect();
        let tok = &ctx.model.tokenizer;
        // Enough candidates per hypothesis that n non-final ones survive even if several end-of-generation
        // tokens rank high.
        let per_row = 2 * per_group + tok.info().eos_token_ids.len();

        let mut next: Vec<Hyp> = Vec::new();
        let mut rows_kept: Vec<usize> = Vec::new();
        let mut pruned: Vec<BeamCandidate> = Vec::new();
        // Tokens chosen by earlier groups at this step: the Hamming diversity term.
        let mut taken: Vec<u32> = Vec::new();
        for group in 0..groups {
            if state.group_done[group] {
                continue;
            }
            let mut cands: Vec<(f64, f64, usize, u32, f64)> = Vec::new(); // score, logprob, row, id, penalty
            for (row, hyp) in state.live.iter().enumerate() {
                if hyp.group != group {
                    continue;
                }
                for id in top_n(&stats[row].logprobs, per_row) {
                    let lp = f64::from(stats[row].logprobs[id as usize]);
                    let penalty = diversity * taken.iter().filter(|&&t| t == id).count() as f64;
                    cands.push((hyp.score + lp - penalty, hyp.logprob + lp, row, id, penalty));
                }
            }
            cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
            let mut kept = 0;
            let mut shown = 0;
            for (rank, &(score, logprob, row, id, penalty)) in cands.iter().enumerate() {
                let extend = |hyp: &Hyp| {
                    let mut tokens = hyp.tokens.clone();
                    tokens.push(Arc::new(stats[row].record(
                        tok,
                        id,
                        position,
                        None,
                        TokenSource::Search,
                    )));
                    Hyp {
                        tokens,
                        logprob,
                        score,
                        group,
                        // The prompt-only hypotheses of the first step appear in no earlier payload.
                        parent: (cur_len > 0).then_some(row),
                    }
                };
                if kept < per_group && tok.is_end_of_generation(id) {
                    // Hugging Face's rule: a final token ranked below the first n is just noise.
                    if rank < per_group {
                        let hyp = extend(&state.live[row]);
                        let len = hyp.tokens.len() as f64;
                        add_finished(
                            &mut state.finished[group],
                            Finished {
                                final_score: score / len.powf(length_penalty),
                                hyp,
                            },
                            per_group,
                        );
                    }
                } else if kept < per_group {
                    taken.push(id);
                    next.push(extend(&state.live[row]));
                    rows_kept.push(row);
                    kept += 1;
                } else if shown < PRUNED_SHOWN {
                    shown += 1;
                    pruned.push(BeamCandidate {
                        parent: (cur_len > 0).then_some(row),
                        token_id: id,
                        token: tok.token_text(id),
                        logprob: logprob as f32,
                        score: score as f32,
                        group,
                        penalty: penalty as f32,
                    });
                } else {
                    break;
                }
            }
            // A group is done once it has n finished hypotheses that no live one can still beat.
            let best_live = next
                .iter()
                .filter(|h| h.group == group)
                .map(|h| h.score)
                .fold(f64::NEG_INFINITY, f64::max);
            let fin = &state.finished[group];
            if fin.len() >= per_group {
                let worst = fin.last().map_or(f64::NEG_INFINITY, |f| f.final_score);
                let bound = best_live / ((cur_len + 1) as f64).powf(length_penalty);
                if p.early_stopping || worst >= bound {
                    state.group_done[group] = true;
                }
            }
        }
        // Done groups stop growing: their live hypotheses leave the batch.
        let keep: Vec<usize> = (0..next.len())
            .filter(|&i| !state.group_done[next[i].group])
            .collect();
        let rows_kept: Vec<usize> = keep.iter().map(|&i| rows_kept[i]).collect();
        let next: Vec<Hyp> = keep.into_iter().map(|i| next[i].clone()).collect();

        let new_len = cur_len + 1;
        let cap = ctx.max_tokens.min(
            ctx.model
                .llama
                .config
                .context_length
                .saturating_sub(ctx.prefill.len()),
        );
        let finishing = next.is_empty() || new_len >= cap;
        let generated = ctx.generated;
        let (best, path) =
            if finishing {
                state.done = true;
                // The answer: the best finished hypothesis, or a live one cut off by the token budget.
                let live_final = next.iter().enumerate().map(|(i, h)| {
                    (
                        h.score / (h.tokens.len() as f64).powf(length_penalty),
                        Some(i),
                        h,
                    )
                });
                let fin = state
                    .finished
                    .iter()
                    .flatten()
                    .map(|f| (f.final_score, None, &f.hyp));
                let winner = fin.chain(live_final).fold(
                    None,
                    |best: Option<(f64, Option<usize>, &Hyp)>, c| match best {
                        Some(b) if b.0 >= c.0 => Some(b),
                        _ => Some(c),
                    },
                );
                match winner {
                    Some((_, idx, h)) => (idx, h.tokens.clone()),
                    None => (None, Vec::new()),
                }
            } else {
                let best = (0..next.len())
                    .fold(0, |b, i| if next[i].score > next[b].score { i } else { b });
                (Some(best), next[best].tokens.clone())
            };
        follow(&mut record, generated, state.base, &path, |at| {
            format!("the best hypothesis changed to one that differs from token {at} on")
        });

        let hyp_out = |h: &Hyp, score: f64, parent: Option<usize>| BeamHypothesis {
            text: tok.decode(&h.ids()),
            token_ids: h.ids(),
            logprob: h.logprob as f32,
            score: score as f32,
            parent,
            group: h.group,
            last_token: h
                .ids()
                .last()
                .map(|&i| tok.token_text(i))
                .unwrap_or_default(),
        };
        let mut finished: Vec<(f64, BeamHypothesis)> = state
            .finished
            .iter()
            .flatten()
            .map(|f| (f.final_score, hyp_out(&f.hyp, f.final_score, f.hyp.parent)))
            .collect();
        finished.sort_by(|a, b| b.0.total_cmp(&a.0));
        let distinct_2 = if groups > 1 {
            super::diverse_beam::distinct_bigrams(&group_bests(&next, groups))
        } else {
            None
        };
        record.payload = Some(StepPayload::Beams(Box::new(BeamStep {
            groups,
            live: next.iter().map(|h| hyp_out(h, h.score, h.parent)).collect(),
            pruned,
            finished: finished.into_iter().map(|(_, h)| h).collect(),
            best,
            distinct_2,
            done: state.done,
            summary_position: None,
            over_trust: None,
        })));
        if !state.done {
            state.cache.select_batch(&rows_kept)?;
            state.live = next;
        }
        Ok(record)
    }
}

/// Inserts `f` into a best-first list holding at most `cap` entries.
fn add_finished(list: &mut Vec<Finished>, f: Finished, cap: usize) {
    let at = list
        .iter()
        .position(|x| f.final_score > x.final_score)
        .unwrap_or(list.len());
    list.insert(at, f);
    list.truncate(cap);
}

/// The token ids of each group's best live hypothesis (groups with none left are skipped).
fn group_bests(live: &[Hyp], groups: usize) -> Vec<Vec<u32>> {
    (0..groups)
        .filter_map(|g| {
            live.iter()
                .filter(|h| h.group == g)
                .fold(None, |b: Option<&Hyp>, h| match b {
                    Some(b) if b.score >= h.score => Some(b),
                    _ => Some(h),
                })
                .map(Hyp::ids)
        })
        .collect()
}
