//! OPERA (Huang et al., CVPR 2024), adapted to text: beam search with an over-trust penalty and retrospection.
//!
//! Hallucinations tend to follow a "summary token": a column of the self-attention map that every later token
//! attends to strongly, as if the model stopped reading anything else. For each beam's top candidates, one
//! batched forward gives the candidate's last-layer attention (max over heads) over the output so far. Within a
//! local window of output tokens, rows renormalised and scaled by σ = 50, each column's product down the lower
//! triangle (×1e-7, as the authors' code does) measures that pattern; the largest is the candidate's penalty,
//! subtracted α times from its log-probability score. Retrospection: when the same column has been the best
//! beam's summary position for `retrospect` steps, the search rolls back to just after that token and chooses
//! again there without the token it took before (at most `candidates` times per position).
//!
//! Adaptations, as the paper's image-attention term has no text counterpart: the window is the output only
//! (the prompt plays the image's role and is not penalised), and a rollback continues from the best beam alone
//! (the official code truncates every beam).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::search::follow;
use super::{DecodingMethod, StepContext, empty_step, prefill_cache};
use crate::engine::Model;
use crate::error::{Error, Result};
use crate::model::{Capture, KvCache, Logits, Mask, logits_row};
use crate::sampling::{PositionStats, top_n};
use crate::trace::{
    BeamCandidate, BeamHypothesis, BeamStep, OverTrustMap, StepPayload, StepRecord, TokenRecord,
    TokenSource,
};

const SIGMA: f64 = 50.0;
const SCALE: f64 = 1e-7;
/// Output tokens the penalty looks back over.
const WINDOW: usize = 64;
/// Keeps α·penalty finite, so that scores stay comparable (a penalty this size already rules a token out).
const MAX_PENALTY: f64 = 1e30;
const PRUNED_SHOWN: usize = 8;
/// Rows and columns of the over-trust map the trace keeps (more when the summary column lies further back).
const MAP_SHOWN: usize = 16;

pub struct Opera {
    state: Option<State>,
}

#[derive(Clone)]
struct Beam {
    tokens: Vec<Arc<TokenRecord>>,
    /// Score (log-probability minus penalties) after each token, so a rollback can cut it exactly.
    scores: Vec<f64>,
    logprobs: Vec<f64>,
    /// Attention of each output token over the output up to itself (last layer, max over heads).
    attention: Vec<Vec<f32>>,
    /// Next-token logits.
    logits: Vec<f32>,
    parent: Option<usize>,
    /// Summary position found when the newest token was scored.
    summary: usize,
}

impl Beam {
    fn score(&self) -> f64 {
        self.scores.last().copied().unwrap_or(0.0)
    }
    fn logprob(&self) -> f64 {
        self.logprobs.last().copied().unwrap_or(0.0)
    }
    fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }
}

struct State {
    /// One row per live beam, holding every token of it (candidates are fed when they are scored).
    cache: KvCache,
    live: Vec<Beam>,
    /// Best first: (score / length^length_penalty, hypothesis).
    finished: Vec<(f64, Beam)>,
    base: usize,
    /// The best beam's summary positions since the last rollback.
    history: Vec<usize>,
    /// Tokens already tried at an output position, excluded after a rollback there.
    tried: BTreeMap<usize, Vec<u32>>,
    rollbacks_at: BTreeMap<usize, usize>,
    /// After a rollback the cache lacks the kept beam's newest token, which is fed again for its logits.
    refeed: bool,
    done: bool,
}

impl Opera {
    pub fn new(_model: &Model) -> Self {
        Self { state: None }
    }
}

impl DecodingMethod for Opera {
    fn name(&self) -> &'static str {
        "opera"
    }

    fn step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepRecord> {
        let llama = &ctx.model.llama;
        let tok = &ctx.model.tokenizer;
        let p = &ctx.params.search;
        let (width, n_can, alpha) = (p.beams.max(1), p.candidates.max(1), f64::from(p.alpha));
        let length_penalty = f64::from(p.length_penalty);
        let prompt_len = ctx.prefill.len();
        let mut record = empty_step();
        let state = match &mut self.state {
            Some(s) => s,
            None => {
                let (cache, logits) = prefill_cache(ctx, &mut record)?;
                self.state.insert(State {
                    cache,
                    live: vec![Beam {
                        tokens: Vec::new(),
                        scores: Vec::new(),
                        logprobs: Vec::new(),
                        attention: Vec::new(),
                        logits,
                        parent: None,
                        summary: 0,
                    }],
                    finished: Vec::new(),
                    base: ctx.generated.len(),
                    history: Vec::new(),
                    tried: BTreeMap::new(),
                    rollbacks_at: BTreeMap::new(),
                    refeed: false,
                    done: false,
                })
            }
        };
        if state.done {
            return Err(Error::MethodPanicked(
                "OPERA was stepped after it had finished".into(),
            ));
        }
        if state.refeed {
            let beam = &mut state.live[0];
            let last = beam.tokens.last().map_or(0, |t| t.id);
            let out = llama.forward(
                &mut state.cache,
                &[last],
                &[prompt_len + beam.tokens.len() - 1],
                1,
                &Mask::Causal,
                Logits::Last,
                &Capture::default(),
            )?;
            record.target_forward_calls += 1;
            beam.logits = logits_row(&out.logits, 0, 0)?;
            state.refeed = false;
        }
        let cur_len = state.live[0].tokens.len();
        let position = prompt_len + cur_len;

        // Each beam's top candidates (minus tokens a rollback already tried here), scored in one forward.
        let excluded = state.tried.get(&cur_len).cloned().unwrap_or_default();
        let stats: Vec<PositionStats> = state
            .live
            .iter()
            .map(|b| PositionStats::new(&b.logits))
            .collect();
        let mut rows: Vec<(usize, u32)> = Vec::new();
        for (b, s) in stats.iter().enumerate() {
            let ids = top_n(&s.logprobs, n_can + excluded.len());
            rows.extend(
                ids.into_iter()
                    .filter(|id| !excluded.contains(id))
                    .take(n_can)
                    .map(|id| (b, id)),
            );
        }
        ctx.check_cancel()?;
        let last_layer = llama.config.n_layers - 1;
        let mut ahead = state.cache.clone();
        ahead.select_batch(&rows.iter().map(|r| r.0).collect::<Vec<_>>())?;
        let tokens: Vec<u32> = rows.iter().map(|r| r.1).collect();
        let out = llama.forward(
            &mut ahead,
            &tokens,
            &vec![position; rows.len()],
            rows.len(),
            &Mask::Causal,
            Logits::Last,
            &Capture {
                attention_layers: [last_layer].into_iter().collect(),
                ..Capture::default()
            },
        )?;
        record.target_forward_calls += 1;
        let attention = match out.attention.first() {
            // (rows, heads, 1, keys) -> the strongest head per key, output columns only.
            Some((_, probs)) => probs.max(1)?.squeeze(1)?.to_vec2::<f32>()?,
            None => {
                return Err(Error::MethodPanicked(
                    "the forward returned no attention".into(),
                ));
            }
        };

        struct Scored {
            score: f64,
            row: usize,
            penalty: f64,
            summary: usize,
        }
        let mut scored: Vec<Scored> = rows
            .iter()
            .enumerate()
            .map(|(row, &(b, id))| {
                let own = attention[row].get(prompt_len..).unwrap_or_default();
                let (penalty, summary) = over_trust(&state.live[b].attention, own);
                let lp = f64::from(stats[b].logprobs[id as usize]);
                Scored {
                    score: state.live[b].score() + lp - alpha * penalty,
                    row,
                    penalty,
                    summary,
                }
            })
            .collect();
        scored.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.row.cmp(&b.row)));

        let mut next: Vec<Beam> = Vec::new();
        let mut kept_rows: Vec<usize> = Vec::new();
        let mut pruned: Vec<BeamCandidate> = Vec::new();
        for (rank, s) in scored.iter().enumerate() {
            let (b, id) = rows[s.row];
            let parent = &state.live[b];
            let extend = || -> Result<Beam> {
                let mut beam = parent.clone();
                beam.tokens.push(Arc::new(stats[b].record(
                    tok,
                    id,
                    position,
                    None,
                    TokenSource::Search,
                )));
                beam.scores.push(s.score);
                beam.logprobs
                    .push(parent.logprob() + f64::from(stats[b].logprobs[id as usize]));
                beam.attention.push(
                    attention[s.row]
                        .get(prompt_len..)
                        .unwrap_or_default()
                        .to_vec(),
                );
                beam.logits = logits_row(&out.logits, s.row, 0)?;
                beam.parent = (cur_len > 0).then_some(b);
                beam.summary = s.summary;
                Ok(beam)
            };
            if next.len() < width && tok.is_end_of_generation(id) {
                if rank < width {
                    let beam = extend()?;
                    let final_score = s.score / (beam.tokens.len() as f64).powf(length_penalty);
                    let at = state
                        .finished
                        .iter()
                        .position(|f| final_score > f.0)
                        .unwrap_or(state.finished.len());
                    state.finished.insert(at, (final_score, beam));
                    state.finished.truncate(width);
                }
            } else if next.len() < width {
                next.push(extend()?);
                kept_rows.push(s.row);
            } else if pruned.len() < PRUNED_SHOWN {
                pruned.push(BeamCandidate {
                    parent: (cur_len > 0).then_some(b),
                    token_id: id,
                    token: tok.token_text(id),
                    logprob: (parent.logprob() + f64::from(stats[b].logprobs[id as usize])) as f32,
                    score: s.score as f32,
                    group: 0,
                    penalty: s.penalty as f32,
                });
            } else {
                break;
            }
        }

        let new_len = cur_len + 1;
        let cap = ctx
            .max_tokens
            .min(llama.config.context_length.saturating_sub(prompt_len));
        let best_live = next
            .iter()
            .map(Beam::score)
            .fold(f64::NEG_INFINITY, f64::max);
        let settled = state.finished.len() >= width
            && (p.early_stopping
                || state
                    .finished
                    .last()
                    .is_some_and(|f| f.0 >= best_live / (new_len as f64).powf(length_penalty)));
        let generated = ctx.generated;
        let mut best = None;
        let mut summary_position = None;
        let mut over_trust = None;
        if next.is_empty() || settled || new_len >= cap {
            state.done = true;
            let live = next.iter().enumerate().map(|(i, b)| {
                (
                    b.score() / (new_len as f64).powf(length_penalty),
                    Some(i),
                    b,
                )
            });
            let finished = state.finished.iter().map(|(s, b)| (*s, None, b));
            let winner =
                finished
                    .chain(live)
                    .fold(
                        None,
                        |acc: Option<(f64, Option<usize>, &Beam)>, c| match acc {
                            Some(a) if a.0 >= c.0 => Some(a),
                            _ => Some(c),
                        },
                    );
            if let Some((_, index, beam)) = winner {
                best = index;
                follow(&mut record, generated, state.base, &beam.tokens, |at| {
                    format!("the final answer differs from token {at} on")
                });
            }
        } else {
            let top = (0..next.len()).fold(0, |b, i| {
                if next[i].score() > next[b].score() {
                    i
                } else {
                    b
                }
            });
            let summary = next[top].summary;
            summary_position = Some(summary);
            // The map and the candidates of the best hypothesis' parent, for the panel.
            let b = next[top].parent.unwrap_or(0);
            let candidates = scored
                .iter()
                .filter(|s| rows[s.row].0 == b)
                .map(|s| {
                    let id = rows[s.row].1;
                    BeamCandidate {
                        parent: next[top].parent,
                        token_id: id,
                        token: tok.token_text(id),
                        logprob: (state.live[b].logprob()
                            + f64::from(stats[b].logprobs[id as usize]))
                            as f32,
                        score: s.score as f32,
                        group: 0,
                        penalty: s.penalty as f32,
                    }
                })
                .collect();
            over_trust = Some(over_trust_map(&next[top].attention, summary, candidates));
            state.history.push(summary);
            let count = state.history.iter().filter(|&&s| s == summary).count();
            let tries = state.rollbacks_at.get(&summary).copied().unwrap_or(0);
            if p.retrospect > 0 && count >= p.retrospect && tries < n_can && summary + 1 < new_len {
                // Retrospection: back to just after the summary token, and choose again there.
                *state.rollbacks_at.entry(summary).or_default() += 1;
                let mut beam = next.swap_remove(top);
                let dropped = beam.tokens.get(summary + 1).map_or(0, |t| t.id);
                state.tried.entry(summary + 1).or_default().push(dropped);
                beam.tokens.truncate(summary + 1);
                beam.scores.truncate(summary + 1);
                beam.logprobs.truncate(summary + 1);
                beam.attention.truncate(summary + 1);
                ahead.select_batch(&[kept_rows[top]])?;
                // Without the summary token itself: the next step feeds it again for its logits.
                ahead.truncate(prompt_len + summary)?;
                state.cache = ahead;
                state.refeed = true;
                state.history.clear();
                follow(&mut record, generated, state.base, &beam.tokens, |_| {
                    format!(
                        "OPERA: output token {} was the summary token {count} times; choosing token {} again without `{}`",
                        summary + 1,
                        summary + 2,
                        tok.token_text(dropped)
                    )
                });
                best = Some(0);
                next = vec![beam];
            } else {
                follow(
                    &mut record,
                    generated,
                    state.base,
                    &next[top].tokens,
                    |at| {
                        format!(
                            "the best hypothesis changed to one that differs from token {at} on"
                        )
                    },
                );
                best = Some(top);
                ahead.select_batch(&kept_rows)?;
                state.cache = ahead;
            }
        }

        let hyp = |b: &Beam, score: f64| BeamHypothesis {
            text: tok.decode(&b.ids()),
            token_ids: b.ids(),
            logprob: b.logprob() as f32,
            score: score as f32,
            parent: b.parent,
            group: 0,
            last_token: b.tokens.last().map(|t| t.token.clone()).unwrap_or_default(),
        };
        record.payload = Some(StepPayload::Beams(Box::new(BeamStep {
            groups: 1,
            live: next.iter().map(|b| hyp(b, b.score())).collect(),
            pruned,
            finished: state.finished.iter().map(|(s, b)| hyp(b, *s)).collect(),
            best,
            distinct_2: None,
            done: state.done,
            summary_position,
            over_trust,
        })));
        if !state.done {
            state.live = next;
        }
        Ok(record)
    }
}

/// The over-trust penalty of a token whose attention over the output is `own`, after tokens whose rows are
/// `rows` (row i covers output tokens 0..=i), and the column it comes from: within the window, rows
/// renormalised, the largest SCALE·Π_{i ≥ j} σ·a(i, j) over columns j.
fn over_trust(rows: &[Vec<f32>], own: &[f32]) -> (f64, usize) {
    let all: Vec<&[f32]> = rows.iter().map(Vec::as_slice).chain([own]).collect();
    let n = all.len();
    let start = n.saturating_sub(WINDOW);
    let sums: Vec<f64> = (0..n)
        .map(|i| {
            all[i]
                .get(start..=i)
                .unwrap_or_default()
                .iter()
                .map(|&a| f64::from(a))
                .sum()
        })
        .collect();
    let mut best = (0.0, start);
    for j in start..n {
        let mut product = SCALE;
        for i in j..n {
            let a = all[i].get(j).map_or(0.0, |&a| f64::from(a));
            product *= SIGMA * if sums[i] > 0.0 { a / sums[i] } else { 0.0 };
        }
        if product > best.0 {
            best = (product, j);
        }
    }
    (best.0.min(MAX_PENALTY), best.1)
}

/// The map of the best hypothesis: rows renormalised within the penalty window, as `over_trust` computes them,
/// from the last `MAP_SHOWN` tokens or the summary column, whichever comes first; each column's score in log10.
fn over_trust_map(
    rows: &[Vec<f32>],
    summary: usize,
    candidates: Vec<BeamCandidate>,
) -> OverTrustMap {
    let n = rows.len();
    let window_start = n.saturating_sub(WINDOW);
    let value = |i: usize, j: usize| rows[i].get(j).map_or(0.0, |&a| f64::from(a));
    let sums: Vec<f64> = (0..n)
        .map(|i| (window_start..=i).map(|j| value(i, j)).sum())
        .collect();
    let normalised = |i: usize, j: usize| {
        if sums[i] > 0.0 {
            value(i, j) / sums[i]
        } else {
            0.0
        }
    };
    let start = summary.min(n.saturating_sub(MAP_SHOWN)).max(window_start);
    let round = |x: f64| ((x * 1e4).round() / 1e4) as f32;
    OverTrustMap {
        start,
        rows: (start..n)
            .map(|i| (start..=i).map(|j| round(normalised(i, j))).collect())
            .collect(),
        log10_scores: (start..n)
            .map(|j| {
                (j..n)
                    .try_fold(SCALE.log10(), |acc, i| {
                        let v = SIGMA * normalised(i, j);
                        (v > 0.0).then(|| acc + v.log10())
                    })
                    .map(|x| x as f32)
            })
            .collect(),
        winner: summary.saturating_sub(start),
        candidates,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_everyone_attends_to_is_the_summary() {
        // Tokens 1.. all attend mostly to token 1.
        let rows = vec![
            vec![1.0],
            vec![0.1, 0.9],
            vec![0.05, 0.9, 0.05],
            vec![0.05, 0.85, 0.05, 0.05],
        ];
        let (penalty, column) = over_trust(&rows, &[0.05, 0.8, 0.05, 0.05, 0.05]);
        assert_eq!(column, 1);
        assert!(penalty > over_trust(&rows[..1], &[0.5, 0.5]).0);
    }
}
