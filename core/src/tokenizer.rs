//! The tokenizer, built from the GGUF's own metadata so that it always matches the weights.
//!
//! candle's GGUF bridge builds the byte-level BPE from the vocabulary and merges, but it only knows a few
//! pre-tokenizers and falls back to GPT-2's with a prefix space, which llama.cpp never adds: for SmolLM2
//! (`tokenizer.ggml.pre = "smollm"`) `<|im_start|>user` would become `<|im_start|> Ġuser`. We replace the
//! pre-tokenizer with llama.cpp's definition for the names we know. A test checks the ids against llama.cpp on
//! all Spec-Bench prompts.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use crate::error::{Error, Result};
use crate::trace::TokenizerInfo;

/// Control tokens that end a turn in the chat formats we know (llama.cpp's end-of-generation set).
const END_OF_GENERATION: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
    "<end_of_turn>",
    "<|end|>",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    info: TokenizerInfo,
    /// Display text of every token id, decoded once at load.
    pieces: Vec<String>,
    chat: ChatTemplate,
}

/// The chat template, reduced to what Specula renders: one optional system message and one user turn.
#[derive(Clone, Debug, PartialEq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\n...<|im_end|>\n`, with the template's default system prompt if it has one.
    ChatMl { default_system: Option<String> },
    /// The GGUF has no template we understand; `--chat` leaves the text as it is.
    None,
}

impl Tokenizer {
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let mut inner = <tokenizers::Tokenizer as TokenizerFromGguf>::from_gguf(ct)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let get = |key: &str| ct.metadata.get(key);
        let pre = get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "gpt2".into());
        match pre.as_str() {
            // llama.cpp: digits split one by one, then the GPT-2 regex, no prefix space.
            "smollm" | "starcoder" | "refact" | "codeshell" | "falcon3" => {
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            // candle implements these as llama.cpp does.
            "qwen2" | "smaug-bpe" | "lfm2" | "llama3" | "llama-bpe" => {}
            // GPT-2's regex without the prefix space candle's fallback adds.
            _ => {
                inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
        }
        let model = get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        let vocab_size = inner.get_vocab_size(true);
        let id = |key: &str| get(key).and_then(|v| v.to_u32().ok());
        let add_bos = get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let mut eos_token_ids: Vec<u32> =
            ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
                .iter()
                .filter_map(|k| id(k))
                .collect();
        for name in END_OF_GENERATION {
            if let Some(i) = inner.token_to_id(name) {
                eos_token_ids.push(i);
            }
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        let pieces = (0..vocab_size as u32)
            .map(|i| inner.decode(&[i], false).unwrap_or_default())
            .collect();
        let template = get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default();
        let info = TokenizerInfo {
            model,
            pre,
            vocab_size,
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            add_bos,
            eos_token_ids,
        };
        Ok(Self {
            inner,
            info,
            pieces,
            chat: ChatTemplate::from_jinja(&template),
        })
    }

    pub fn info(&self) -> &TokenizerInfo {
        &self.info
    }

    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their ids; BOS is
    /// prepended when the GGUF asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.info.add_bos
            && let Some(bos) = self.info.bos_token_id
        {
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of a token sequence (special tokens kept, so the stream shows `<|im_end|>`).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner
            .decode(ids, false)
            .unwrap_or_else(|_| ids.iter().map(|&i| self.token_text(i)).collect())
    }

    /// One token's text; a token holding part of a UTF-8 character shows as U+FFFD.
    pub fn token_text(&self, id: u32) -> String {
        self.pieces
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| format!("<{id}>"))
    }

    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.info.eos_token_ids.contains(&id)
    }

    pub fn vocab_size(&self) -> usize {
        self.info.vocab_size
    }

    /// The prompt text for one user message in the model's chat template, ending where the assistant speaks.
    pub fn render_chat(&self, user: &str, system: Option<&str>) -> String {
        match &self.chat {
            ChatTemplate::ChatMl { default_system } => {
                let mut s = String::new();
                if let Some(sys) = system.or(default_system.as_deref()) {
                    s += &format!("<|im_start|>system\n{sys}<|im_end|>\n");
                }
                s += &format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n");
                s
            }
            ChatTemplate::None => match system {
                Some(sys) => format!("{sys}\n\n{user}"),
                None => user.to_owned(),
            },
        }
    }
}

impl ChatTemplate {
    /// Recognises ChatML templates and pulls out the default system prompt a template inserts when the
    /// conversation has none. A Jinja engine for one template shape would be more code than this.
    pub fn from_jinja(template: &str) -> Self {
        if !template.contains("<|im_start|>") {
            return Self::None;
        }
        const OPEN: &str = "<|im_start|>system\n";
        let default_system = template.find(OPEN).and_then(|start| {
            let rest = &template[start + OPEN.len()..];
            let end = rest.find("<|im_end|>")?;
            let text = &rest[..end];
            // A system block that interpolates a message is not a default.
            (!text.contains("{{") && !text.contains("{%")).then(|| text.to_owned())
        });
        Self::ChatMl { default_system }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_default_system_prompt_is_extracted() {
        let t = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
        assert_eq!(
            ChatTemplate::from_jinja(t),
            ChatTemplate::ChatMl {
                default_system: Some(
                    "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into()
                )
            }
        );
        assert_eq!(
            ChatTemplate::from_jinja("{{ bos_token }}[INST]"),
            ChatTemplate::None
        );
    }
}
