//! Layer-skip self-speculation (SWIFT-style): the target itself with a block of intermediate layers skipped
//! drafts a chain, with a real q (warped exactly like the target's p, so rejection sampling stays exact).
//! Drafting runs on a clone of the target's cache: skipped layers add nothing to it and the clone is dropped,
//! so the draft never pollutes the cache the target verifies with.

use std::collections::BTreeSet;

use super::drafter::{Draft, DraftInput, Drafter};
use super::verifier::{DraftTree, DraftTreeNode};
use crate::error::{Error, Result};
use crate::model::{Capture, KvCache, Llama, Logits, Mask, logits_row};
use crate::sampling::{RunRng, Warped, argmax, top_n, warp};
use crate::trace::DraftKind;

/// Steps of the optimization phase: one candidate skip set is scored per step, then the best one drafts.
const SEARCH_STEPS: usize = 12;
/// Verified tokens each candidate is scored on.
const SEARCH_WINDOW: usize = 16;

/// The on-the-fly search (SWIFT's optimization phase, simplified): while the user gave no skip set, each of the
/// first steps scores one candidate set by teacher forcing the tokens already verified through the skipped
/// model (one forward) and counting how often its argmax is the next verified token; the best set drafts.
/// Candidates keep the default's size, so drafting cost stays put: contiguous blocks at other offsets first,
/// then the best set with one layer swapped (seeded, so runs repeat).
pub struct LayerSkip {
    best: Option<(BTreeSet<usize>, f64)>,
    tried: usize,
    rng: crate::sampling::RunRng,
}

impl Default for LayerSkip {
    fn default() -> Self {
        Self {
            best: None,
            tried: 0,
            rng: crate::sampling::rng_from_seed(0x5717),
        }
    }
}

impl LayerSkip {
    fn candidate(&mut self, n_layers: usize) -> BTreeSet<usize> {
        let size = n_layers / 3;
        let blocks = [
            n_layers / 4,
            n_layers / 2 - size / 2 + 2,
            n_layers / 6,
            n_layers / 3 - 2,
        ];
        if let Some(&start) = blocks.get(self.tried) {
            return (start..(start + size).min(n_layers - 1)).collect();
        }
        let mut set = self
            .best
            .as_ref()
            .map_or_else(|| default_skip_set(n_layers), |(s, _)| s.clone());
        // Swap one skipped layer for one kept layer, never the first or the last layer (they matter most).
        let skipped: Vec<usize> = set.iter().copied().collect();
        let kept: Vec<usize> = (1..n_layers - 1).filter(|l| !set.contains(l)).collect();
        if !skipped.is_empty() && !kept.is_empty() {
            let out = skipped[rand::Rng::random_range(&mut self.rng, 0..skipped.len())];
            let inn = kept[rand::Rng::random_range(&mut self.rng, 0..kept.len())];
            set.remove(&out);
            set.insert(inn);
        }
        set
    }

    /// Fraction of the last verified tokens the skipped model predicts (greedy match under teacher forcing).
    fn score(&self, input: &DraftInput<'_>, skip: &BTreeSet<usize>) -> Result<Option<f64>> {
        let root = input.root_position();
        let window = SEARCH_WINDOW.min(root);
        if window < 4 {
            return Ok(None);
        }
        let from = root - window;
        let mut cache = input.cache.clone();
        cache.truncate(from)?;
        let tokens = &input.context[from..=root];
        let positions: Vec<usize> = (from..=root).collect();
        let out = input.llama.forward(
            &mut cache,
            tokens,
            &positions,
            1,
            &Mask::Causal,
            Logits::All,
            &Capture {
                skip_layers: skip.clone(),
                ..Capture::default()
            },
        )?;
        let mut hits = 0u32;
        for i in 0..window {
            if argmax(&logits_row(&out.logits, 0, i)?) == tokens[i + 1] {
                hits += 1;
            }
        }
        Ok(Some(f64::from(hits) / window as f64))
    }
}

/// The default skip set: the middle third of the layers (10..20 of 30). The first and last layers matter most
/// for the output distribution, so a contiguous middle block is the usual training-free starting point.
pub fn default_skip_set(n_layers: usize) -> BTreeSet<usize> {
    (n_layers / 3..2 * n_layers / 3).collect()
}

/// "10-19" style description of a skip set.
pub fn describe(skip: &BTreeSet<usize>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut iter = skip.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

/// Probability of `id` under the plain softmax of `logits` (the draft's confidence in greedy mode, where q is a
/// point mass and says nothing).
fn plain_prob(logits: &[f32], id: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    logits
        .get(id as usize)
        .map_or(0.0, |&l| f64::from(l - max).exp() / z)
}

impl Drafter for LayerSkip {
    fn name(&self) -> &'static str {
        "layer-skip"
    }

    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft> {
        let n_layers = input.llama.config.n_layers;
        let mut calls = 0;
        let mut search_note = String::new();
        let skip: BTreeSet<usize> = if input.params.speculative.skip_layers.is_empty() {
            if self.tried < SEARCH_STEPS && n_layers >= 6 {
                if self.best.is_none()
                    && let Some(score) = self.score(input, &default_skip_set(n_layers))?
                {
                    calls += 1;
                    self.best = Some((default_skip_set(n_layers), score));
                }
                if self.best.is_some() {
                    let candidate = self.candidate(n_layers);
                    if let Some(score) = self.score(input, &candidate)? {
                        calls += 1;
                        self.tried += 1;
                        if self.best.as_ref().is_none_or(|(_, b)| score > *b) {
                            self.best = Some((candidate, score));
                        }
                    }
                }
                search_note = format!("; search {}/{SEARCH_STEPS}", self.tried);
            }
            match &self.best {
                Some((set, score)) => {
                    search_note += &format!(", best match {score:.2} on the last verified tokens");
                    set.clone()
                }
                None => default_skip_set(n_layers),
            }
        } else {
            input
                .params
                .speculative
                .skip_layers
                .iter()
                .copied()
                .collect()
        };
        let (nodes, chain_calls) = draft_chain(input, &skip)?;
        calls += chain_calls;
        Ok(Draft {
            tree: DraftTree { nodes },
            forward_calls: calls,
            note: format!(
                "skipped layers {} ({} of {n_layers}){search_note}",
                describe(&skip),
                skip.len()
            ),
            exit_layers: None,
        })
    }
}

/// Drafts a chain with the target minus the layers in `skip`, on a clone of the target's cache. Shared by the
/// layer-skip and early-exit drafters.
pub(crate) fn draft_chain(
    input: &mut DraftInput<'_>,
    skip: &BTreeSet<usize>,
) -> Result<(Vec<DraftTreeNode>, u32)> {
    let capture = Capture {
        skip_layers: skip.clone(),
        ..Capture::default()
    };
    let llama = input.llama.clone();
    let mut cache = input.cache.clone();
    draft_chain_on(input, &llama, &mut cache, &capture)
}

/// About how many weights a forward reads (each layer's projections ~12 dim^2, plus the LM head): the cost
/// of a draft forward relative to the target's.
pub(crate) fn forward_weights(config: &crate::model::Config, skipped: &BTreeSet<usize>) -> f64 {
    let layers = config.n_layers.saturating_sub(skipped.len()) as f64;
    let dim = config.dim as f64;
    layers * 12.0 * dim * dim + config.vocab_size as f64 * dim
}

/// Drafts a chain from the root with `llama` on `cache` (which holds the context before the root), each token
/// drawn from the warped q (argmax for greedy), stopping early under the adaptive threshold or the cost-aware
/// policy; with `siblings` above 1, more drafts at the first position follow the chain in the node list (parent
/// `None`). Returns the nodes and the number of draft forwards; `cache` is left holding the root and the chain.
pub(crate) fn draft_chain_on(
    input: &mut DraftInput<'_>,
    llama: &Llama,
    cache: &mut KvCache,
    capture: &Capture,
) -> Result<(Vec<DraftTreeNode>, u32)> {
    let sampling = input.params.sampling;
    let mut token = *input
        .context
        .last()
        .ok_or_else(|| Error::InvalidInput("nothing to draft from".into()))?;
    let mut nodes: Vec<DraftTreeNode> = Vec::new();
    let extra = input.params.speculative.siblings.saturating_sub(1);
    let mut first_logits = None;
    let mut calls = 0;
    let mut confidence = 1.0f64;
    // Expected tokens a round commits with the drafts so far (the verifier's own token, then each draft while
    // all before it hold), and what a drafted token costs: its verification plus its own draft forward.
    let mut expected = 1.0f64;
    let verify_cost = input.draft_cost();
    let token_cost = verify_cost.map(|verify| {
        verify
            + forward_weights(&llama.config, &capture.skip_layers)
                / forward_weights(&input.llama.config, &BTreeSet::new())
    });
    // A token that costs a whole step or more cannot pay even if certain (2 tokens for 1 + cost): no forward.
    let max_len = if token_cost.is_some_and(|c| c >= 1.0) {
        0
    } else {
        input.max_len
    };
    let limit = max_len.min(
        llama
            .config
            .context_length
            .saturating_sub(input.root_position() + 2),
    );
    for depth in 0..limit {
        let position = input.root_position() + depth;
        if input.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let out = llama.forward(
            cache,
            &[token],
            &[position],
            1,
            &Mask::Causal,
            Logits::Last,
            capture,
        )?;
        calls += 1;
        let logits = logits_row(&out.logits, 0, 0)?;
        let q = warp(&logits, &sampling);
        if depth == 0 && extra > 0 {
            first_logits = Some(logits.clone());
        }
        let (x, conf) = if sampling.is_greedy() {
            let x = argmax(&logits);
            (x, plain_prob(&logits, x))
        } else {
            let x = q.sample(input.rng);
            (x, f64::from(q.prob(x)))
        };
        // The cost-aware policy with the draft's confidence as the acceptance estimate: keep this token only
        // if it raises the expected tokens per unit of cost (its draft forward is spent either way).
        if let Some(cost) = token_cost {
            let drafted = nodes.len() as f64;
            let now = expected / (1.0 + drafted * cost);
            let with = (expected + confidence * conf) / (1.0 + (drafted + 1.0) * cost);
            if with <= now {
                break;
            }
            expected += confidence * conf;
        }
        nodes.push(DraftTreeNode {
            token: x,
            parent: depth.checked_sub(1),
            q,
            kind: DraftKind::Unlabelled,
        });
        confidence *= conf;
        // SpecDec++'s threshold policy with the draft's own confidence standing in for the trained
        // acceptance head: stop once P(some draft rejected) ~ 1 - prod(conf) passes h.
        if let Some(h) = input.params.speculative.adaptive
            && 1.0 - confidence > f64::from(h)
        {
            break;
        }
        token = x;
    }
    // Siblings of the first draft, verified in the same forward (they cost no draft forward: the first one's gave
    // their q). Greedy, the next likeliest tokens there, as point masses like every greedy draft.
    if let (Some(first), Some(logits)) = (nodes.first(), first_logits) {
        let (first_token, greedy) = (first.token, sampling.is_greedy());
        // Each with the chance it is the one accepted, as the chain estimates it: its probability under q.
        let siblings: Vec<(u32, Warped, f64)> = if greedy {
            top_n(&logits, extra + 1)
                .into_iter()
                .filter(|&t| t != first_token)
                .take(extra)
                .map(|t| (t, Warped::point(t), plain_prob(&logits, t)))
                .collect()
        } else {
            draw_siblings(&first.q, first_token, extra, input.rng)
                .into_iter()
                .map(|(t, rest)| (t, rest, f64::from(first.q.prob(t))))
                .collect()
        };
        // The cost-aware policy prices a sibling as one more verified token and keeps it only while the expected
        // tokens per unit of cost still rise.
        let mut cost = 1.0 + nodes.len() as f64 * token_cost.unwrap_or(0.0);
        let chain_len = nodes.len();
        for (token, q, chance) in siblings {
            if let Some(c) = verify_cost {
                if (expected + chance) / (cost + c) <= expected / cost {
                    break;
                }
                expected += chance;
                cost += c;
            }
            nodes.push(DraftTreeNode {
                token,
                parent: None,
                q,
                kind: if greedy {
                    DraftKind::Unlabelled
                } else {
                    DraftKind::Sampled
                },
            });
        }
        // Sampled siblings: the first one was drawn the same way, and says so too.
        if !greedy
            && nodes.len() > chain_len
            && let Some(first) = nodes.first_mut()
        {
            first.kind = DraftKind::Sampled;
        }
    }
    Ok((nodes, calls))
}

/// `count` more siblings after `first` (drawn from `q`), each drawn from q without the siblings before it,
/// renormalised, and carrying that distribution as its own q: recursive speculative decoding's sampling without
/// replacement, which the verifier's recursive rejection test expects. Stops early when q has no other token.
pub fn draw_siblings(q: &Warped, first: u32, count: usize, rng: &mut RunRng) -> Vec<(u32, Warped)> {
    let mut taken = vec![first];
    let mut siblings = Vec::with_capacity(count);
    for _ in 0..count {
        let rest = q.without(&taken);
        if rest.support.is_empty() {
            break;
        }
        let token = rest.sample(rng);
        taken.push(token);
        siblings.push((token, rest));
    }
    siblings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::rng_from_seed;

    #[test]
    fn siblings_are_drawn_without_replacement_each_from_what_was_left() {
        let q = Warped {
            support: vec![(5, 0.5), (7, 0.3), (9, 0.2)],
        };
        let mut rng = rng_from_seed(1);
        let mut second_is_7 = 0;
        let draws = 4000;
        for _ in 0..draws {
            let siblings = draw_siblings(&q, 5, 4, &mut rng);
            // Only two other tokens have mass.
            assert_eq!(siblings.len(), 2);
            let mut taken = vec![5];
            for (token, rest) in &siblings {
                assert!(!taken.contains(token));
                assert_eq!(rest, &q.without(&taken));
                let total: f32 = rest.support.iter().map(|&(_, p)| p).sum();
                assert!((total - 1.0).abs() < 1e-6);
                taken.push(*token);
            }
            second_is_7 += usize::from(siblings[0].0 == 7);
        }
        // P(7 | 5 taken) = 0.3 / 0.5; four standard deviations is 0.031.
        let share = second_is_7 as f64 / f64::from(draws);
        assert!((share - 0.6).abs() < 0.031, "{share}");
    }
}
