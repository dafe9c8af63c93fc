//! `model`: a second, smaller GGUF with the same vocabulary drafts a chain with a real q (classic speculative
//! sampling, Leviathan et al. 2023 / Chen et al. 2023). It keeps its own KV cache across steps: before each draft
//! the cache is cut back to what the target committed and fed the tokens it has not seen.

use std::path::Path;
use std::sync::Arc;

use super::drafter::{Draft, DraftInput, Drafter};
use super::layer_skip::draft_chain_on;
use super::verifier::DraftTree;
use crate::Model;
use crate::error::{Result, bad_param};
use crate::model::{Capture, KvCache, Llama, Logits, Mask};
use crate::tokenizer::Tokenizer;

pub struct DraftModel {
    llama: Arc<Llama>,
    cache: KvCache,
    /// The tokens `cache` holds, in order.
    fed: Vec<u32>,
}

impl DraftModel {
    /// Loads the draft model at `path`, refusing it unless its vocabulary is the target's token for token (a
    /// draft token id must mean the same text to both, or verification compares unrelated tokens).
    pub fn load(path: &Path, target: &Llama, target_tokens: &Tokenizer) -> Result<Self> {
        let draft = Model::load(path)?;
        let refuse = |why: String| Err(bad_param("draft_model", path.display(), why));
        let (ours, theirs) = (draft.llama.config.vocab_size, target.config.vocab_size);
        if ours != theirs {
            return refuse(format!(
                "its vocabulary has {ours} tokens, the target's {theirs}: a draft model must share the \
                 target's tokenizer"
            ));
        }
        if let Some(id) = (0..ours as u32)
            .find(|&id| draft.tokenizer.token_text(id) != target_tokens.token_text(id))
        {
            return refuse(format!(
                "token {id} is {:?} in the draft model but {:?} in the target: a draft model must share the \
                 target's tokenizer",
                draft.tokenizer.token_text(id),
                target_tokens.token_text(id)
            ));
        }
        let cache = draft.llama.new_cache();
        Ok(Self {
            llama: draft.llama,
            cache,
            fed: Vec::new(),
        })
    }
}

impl Drafter for DraftModel {
    fn name(&self) -> &'static str {
        "model"
    }

    fn draft(&mut self, input: &mut DraftInput<'_>) -> Result<Draft> {
        let committed = input.context.len().saturating_sub(1);
        let before_root = input.context.get(..committed).unwrap_or_default();
        // Keep what the draft cache shares with the committed context (rejected drafts are cut off).
        let shared = self
            .fed
            .iter()
            .zip(before_root)
            .take_while(|(a, b)| a == b)
            .count();
        self.cache.truncate(shared)?;
        self.fed.truncate(shared);
        let mut calls = 0;
        if let Some(unseen) = before_root.get(shared..).filter(|u| !u.is_empty()) {
            let positions: Vec<usize> = (shared..committed).collect();
            self.llama.forward(
                &mut self.cache,
                unseen,
                &positions,
                1,
                &Mask::Causal,
                Logits::Last,
                &Capture::default(),
            )?;
            self.fed.extend_from_slice(unseen);
            calls += 1;
        }
        let llama = self.llama.clone();
        let (nodes, chain_calls) =
            draft_chain_on(input, &llama, &mut self.cache, &Capture::default())?;
        // The chain fed the root and all drafts but the last; the root is committed, the drafts are not yet.
        self.cache.truncate(committed)?;
        Ok(Draft {
            tree: DraftTree { nodes },
            forward_calls: calls + chain_calls,
            note: format!(
                "draft model {} ({} layers)",
                llama.info.file_name, llama.config.n_layers
            ),
            exit_layers: None,
        })
    }
}
