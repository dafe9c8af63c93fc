//! The logit lens (nostalgebraist, 2020): what the model would predict if it stopped after each layer, read by
//! applying the final norm and the LM head to that layer's residual stream. Not a decoding method: the GUI calls
//! it on demand for the step under the cursor, so it recomputes the prefix from scratch and keeps no state.

use serde::{Deserialize, Serialize};

use crate::engine::Model;
use crate::error::{Error, Result};
use crate::model::{Capture, Logits, Mask, logits_row};
use crate::sampling::{argmax, log_softmax};

/// The lens at one depth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerTop {
    /// 0 = the embeddings, i + 1 = after layer i; the last is the model's output.
    pub layer: usize,
    /// The most likely token at this depth (ties to the lower id).
    pub token_id: u32,
    pub token: String,
    pub prob: f32,
    /// Probability at this depth of the token actually at `position`, when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_prob: Option<f32>,
}

/// The lens for the token at absolute `position` (as in `TokenRecord::position`): the prefix
/// `prompt_ids ++ generated` up to `position` is fed, and every layer's state at its last token is read.
pub fn logit_lens(
    model: &Model,
    prompt_ids: &[u32],
    generated: &[u32],
    position: usize,
) -> Result<Vec<LayerTop>> {
    let llama = &model.llama;
    let sequence: Vec<u32> = prompt_ids.iter().chain(generated).copied().collect();
    if position == 0 || position > sequence.len() {
        return Err(Error::InvalidInput(format!(
            "the logit lens needs a position between 1 and {} (prompt and output), not {position}",
            sequence.len()
        )));
    }
    let prefix = &sequence[..position];
    let mut cache = llama.new_cache();
    let capture = Capture {
        hidden_states: true,
        ..Capture::default()
    };
    // The whole prefix in one forward: the lens is asked for one step at a time, and a chunked prefill would
    // have to keep every chunk's states anyway.
    let out = llama.forward(
        &mut cache,
        prefix,
        &(0..position).collect::<Vec<_>>(),
        1,
        &Mask::Causal,
        Logits::Last,
        &capture,
    )?;
    let last: Vec<candle_core::Tensor> = out
        .hidden_states
        .iter()
        .map(|h| h.narrow(1, position - 1, 1))
        .collect::<candle_core::Result<_>>()?;
    // One LM-head product for all depths: (layers + 1, 1, dim).
    let logits = llama.head(&candle_core::Tensor::cat(&last, 0)?)?;
    let actual = sequence.get(position).copied();
    (0..last.len())
        .map(|layer| {
            let row = logits_row(&logits, layer, 0)?;
            let logprobs = log_softmax(&row);
            let id = argmax(&logprobs);
            Ok(LayerTop {
                layer,
                token_id: id,
                token: model.tokenizer.token_text(id),
                prob: logprobs[id as usize].exp(),
                actual_prob: actual
                    .and_then(|a| logprobs.get(a as usize))
                    .map(|lp| lp.exp()),
            })
        })
        .collect()
}
