//! Recording the model's insides for the panels: the logit lens and every layer's attention at the position that
//! predicted each committed token. The inspector keeps a KV cache of its own and feeds each step's new tokens once
//! more, so any method can be inspected without knowing it, and the method's own forwards stay as they were.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;

use crate::engine::Model;
use crate::error::{Error, Result};
use crate::methods::PREFILL_CHUNK;
use crate::model::{Capture, KvCache, Logits, Mask};
use crate::sampling::{argmax, log_softmax, top_n};
use crate::trace::{InspectParams, Inspection, LayerAttention, LensCell, SparseRow};

/// Prompt positions inspected at the first step, so the lens grid starts with some context.
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
    /// the lens and attention of the position before it. At the first call, the last prompt positions too.
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
        // Fed in the chunks the methods feed (`Sequence`), so that the lens's last layer is the decoding's own
        // output and not a rounding away from it; only the last chunk is captured (a 2,000-token prompt's
        // attention at every layer would not fit in memory).
        let chunks: Vec<&[u32]> = sequence[keep..sequence.len() - 1]
            .chunks(PREFILL_CHUNK)
            .collect();
        let Some((last, before)) = chunks.split_last() else {
            return Ok(Vec::new());
        };
        for chunk in before {
            self.feed(model, chunk, &Capture::default(), cancel)?;
        }
        let chunk_start = self.fed.len();
        let capture_from = if first {
            (new_from - 1).saturating_sub(PROMPT_POSITIONS - 1)
        } else {
            new_from - 1
        }
        .max(chunk_start);
        let offset = capture_from - chunk_start;
        let capture = Capture {
            attention_layers: if params.attention {
                (0..llama.config.n_layers).collect()
            } else {
                Default::default()
            },
            hidden_states: params.lens,
            ..Capture::default()
        };
        let out = self.feed(model, last, &capture, cancel)?;
        let mut inspections: Vec<Inspection> = (0..sequence.len() - 1 - capture_from)
            .map(|r| Inspection {
                position: capture_from + r + 1,
                lens: Vec::new(),
                attention: Vec::new(),
            })
            .collect();
        if params.lens {
            for (r, inspection) in inspections.iter_mut().enumerate() {
                let actual = sequence[inspection.position];
                let states: Vec<Tensor> = out
                    .hidden_states
                    .iter()
                    .map(|h| h.narrow(1, offset + r, 1))
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
                            actual_prob: logprobs.get(actual as usize).map_or(0.0, |lp| lp.exp()),
                        }
                    })
                    .collect();
            }
        }
        if params.attention {
            let k = params.attention_top_k.max(1);
            for (layer, probs) in &out.attention {
                // (1, heads, rows, keys) -> [heads][rows][keys]
                let probs = probs.squeeze(0)?.to_vec3::<f32>()?;
                for (r, inspection) in inspections.iter_mut().enumerate() {
                    let keys = capture_from + r + 1;
                    let per_head: Vec<&[f32]> = probs
                        .iter()
                        .map(|h| h[offset + r].get(..keys).unwrap_or_default())
                        .collect();
                    let n_heads = per_head.len().max(1) as f32;
                    let max: Vec<f32> = (0..keys)
                        .map(|j| {
                            per_head
                                .iter()
                                .map(|h| h.get(j).copied().unwrap_or(0.0))
                                .fold(0.0, f32::max)
                        })
                        .collect();
                    let mean: Vec<f32> = (0..keys)
                        .map(|j| {
                            per_head
                                .iter()
                                .map(|h| h.get(j).copied().unwrap_or(0.0))
                                .sum::<f32>()
                                / n_heads
                        })
                        .collect();
                    let mut heads: Vec<SparseRow> = per_head.iter().map(|h| sparse(h, k)).collect();
                    heads.push(sparse(&max, k));
                    heads.push(sparse(&mean, k));
                    inspection.attention.push(LayerAttention {
                        layer: *layer,
                        heads,
                    });
                }
            }
        }
        // The prompt positions are inspected once only, at the first step.
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

/// The `k` largest weights of a row, rounded to 1e-4 (ties to the lower position).
fn sparse(row: &[f32], k: usize) -> SparseRow {
    let keys = top_n(row, k.min(row.len()));
    let weights: Vec<f32> = keys.iter().map(|&j| round4(row[j as usize])).collect();
    SparseRow {
        covered: round4(keys.iter().map(|&j| row[j as usize]).sum()),
        keys,
        weights,
    }
}

fn round4(x: f32) -> f32 {
    (x * 1e4).round() / 1e4
}
