//! Recording the model's insides for the panels: the logit lens and every layer's attention at the position that
//! predicted each committed token. The inspector keeps a KV cache of its own and feeds each step's new tokens once
//! more, so any method can be inspected without knowing it, and the method's own forwards stay as they were.
//!
//! Attention is recorded for every position of the prompt (every prefill chunk) and of the output, each as an
//! [`AttentionMap`] of the largest weights per row, reduced inside the forward as each layer is computed. The
//! lens costs an LM-head product per layer and position, so it covers the output and only the prompt's last
//! positions.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;

use crate::engine::Model;
use crate::error::{Error, Result};
use crate::methods::PREFILL_CHUNK;
use crate::model::{Capture, KvCache, Logits, Mask};
use crate::sampling::{argmax, log_softmax, top_n};
use crate::trace::{AttentionMap, InspectParams, Inspection, LensCell};

/// Prompt positions whose lens is recorded at the first step, so the lens grid starts with some context.
const PROMPT_POSITIONS: usize = 8;

pub struct Inspector {
    cache: KvCache,
    /// The tokens the cache holds, in order.
    fed: Vec<u32>,
}

impl Inspector {
    pub fn new(model: &Model) -> Self {
        Self {
            cache: model.llama.new_cache(),
            fed: Vec::new(),
        }
    }

    /// Inspects the tokens at positions `new_from..sequence.len()` of `sequence` (prompt then output): for each,
    /// the lens and attention of the position before it. At the first call, the earlier positions too: the
    /// attention of every one, the lens of the last few.
    pub fn inspect(
        &mut self,
        model: &Model,
        sequence: &[u32],
        new_from: usize,
        params: &InspectParams,
        cancel: &AtomicBool,
    ) -> Result<Vec<Inspection>> {
        let llama = &model.llama;
        if !params.any() || new_from == 0 || new_from >= sequence.len() {
            return Ok(Vec::new());
        }
        let first = self.fed.is_empty();
        // A rollback may have changed tokens the cache holds: keep only the prefix both agree on.
        let common = self
            .fed
            .iter()
            .zip(sequence)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(new_from - 1);
        self.cache.truncate(keep)?;
        self.fed.truncate(keep);
        // The first query position (the one before the token it predicts) each kind of record covers.
        let new_query = new_from - 1;
        let lens_from = if first {
            new_query.saturating_sub(PROMPT_POSITIONS - 1)
        } else {
            new_query
        };
        let attention_from = if first { 0 } else { new_query };
        let inspect_from = match (params.lens, params.attention) {
            (true, true) => lens_from.min(attention_from),
            (true, false) => lens_from,
            _ => attention_from,
        };
        let layers = params.recorded_layers(llama.config.n_layers);
        let mut inspections = Vec::new();
        // Fed in the chunks the methods feed (`Sequence`), so that the lens's last layer is the decoding's own
        // output and not a rounding away from it.
        let end = sequence.len() - 1;
        for chunk in sequence[keep..end].chunks(PREFILL_CHUNK) {
            let start = self.fed.len();
            let stop = start + chunk.len();
            let capture = Capture {
                attention_layers: if params.attention && stop > attention_from {
                    layers.iter().copied().collect()
                } else {
                    Default::default()
                },
                attention_top_k: Some(params.attention_top_k.max(1)),
                hidden_states: params.lens && stop > lens_from,
                ..Capture::default()
            };
            let out = self.feed(model, chunk, &capture, cancel)?;
            let mut maps = out.attention_maps.into_iter();
            for query in start..stop {
                let map = maps.next();
                if query < inspect_from {
                    continue;
                }
                let mut inspection = Inspection {
                    position: query + 1,
                    lens: Vec::new(),
                    attention: Vec::new(),
                    attention_map: map.filter(|_| params.attention && query >= attention_from),
                };
                if params.lens && query >= lens_from {
                    let actual = sequence[query + 1];
                    let states: Vec<Tensor> = out
                        .hidden_states
                        .iter()
                        .map(|h| h.narrow(1, query - start, 1))
                        .collect::<candle_core::Result<_>>()?;
                    // One LM-head product for every depth: (layers + 1, 1, vocab).
                    let logits = llama
                        .head(&Tensor::cat(&states, 0)?)?
                        .squeeze(1)?
                        .to_vec2::<f32>()?;
                    inspection.lens = logits
                        .iter()
                        .map(|row| {
                            let logprobs = log_softmax(row);
                            let id = argmax(&logprobs);
                            LensCell {
                                token_id: id,
                                token: model.tokenizer.token_text(id),
                                prob: logprobs[id as usize].exp(),
                                actual_prob: logprobs
                                    .get(actual as usize)
                                    .map_or(0.0, |lp| lp.exp()),
                            }
                        })
                        .collect();
                }
                inspections.push(inspection);
            }
        }
        Ok(inspections)
    }

    fn feed(
        &mut self,
        model: &Model,
        tokens: &[u32],
        capture: &Capture,
        cancel: &AtomicBool,
    ) -> Result<crate::model::ForwardOutput> {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let start = self.fed.len();
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let out = model.llama.forward(
            &mut self.cache,
            tokens,
            &positions,
            1,
            &Mask::Causal,
            Logits::Last,
            capture,
        )?;
        self.fed.extend_from_slice(tokens);
        Ok(out)
    }
}

/// Adds one layer of a fed token's attention to its map: `heads` holds each head's weights over `cells` (the
/// positions the token sees); the map keeps each head's, the max's and the mean's largest weights.
pub(crate) fn push_layer(
    map: &mut AttentionMap,
    layer: usize,
    heads: &[Vec<f32>],
    cells: &[usize],
) -> Result<()> {
    let width = map.width();
    let n = cells.len();
    let mut max = vec![0f32; n];
    let mut mean = vec![0f32; n];
    for head in heads {
        for ((m, s), &w) in max.iter_mut().zip(mean.iter_mut()).zip(head) {
            *m = m.max(w);
            *s += w;
        }
    }
    let inverse = 1.0 / heads.len().max(1) as f32;
    mean.iter_mut().for_each(|s| *s *= inverse);
    let rows = heads.len() + 2;
    let mut keys = Vec::with_capacity(rows * width);
    let mut weights = Vec::with_capacity(rows * width);
    let mut covered = Vec::with_capacity(rows);
    for row in heads
        .iter()
        .map(Vec::as_slice)
        .chain([max.as_slice(), mean.as_slice()])
    {
        // Ties go to the earlier position.
        let top = top_n(row, width);
        let mut kept = 0.0;
        for &j in &top {
            let w = row.get(j as usize).copied().unwrap_or(0.0);
            kept += w;
            weights.push(w);
            keys.push(cells.get(j as usize).map_or(0, |&c| c as u32));
        }
        covered.push(kept);
    }
    map.push_layer(layer, &keys, &weights, &covered)
        .map_err(Error::InvalidInput)
}
