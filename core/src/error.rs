//! Typed errors of the core crate. Each message is a sentence a user can act on; the app adds context.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read model file {path}: {message}")]
    ModelFile { path: PathBuf, message: String },

    #[error("{path} is a {architecture} model; Specula runs Llama-architecture GGUF files only")]
    UnsupportedArchitecture { path: PathBuf, architecture: String },

    #[error("the model file {path} is missing metadata `{key}` (is it a complete GGUF?)")]
    MissingMetadata { path: PathBuf, key: String },

    #[error(
        "the model file {path} is missing tensor `{name}` (is it truncated or from another architecture?)"
    )]
    MissingTensor { path: PathBuf, name: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error(
        "the prompt has {prompt_tokens} tokens, but the model's context holds only {context_length} \
         (prompt and output together); shorten the prompt"
    )]
    PromptTooLong {
        prompt_tokens: usize,
        context_length: usize,
    },

    #[error("the prompt is empty: give at least one token of text")]
    EmptyPrompt,

    #[error("unknown decoding method `{0}`; known methods: {known}", known = crate::methods::METHOD_NAMES.join(", "))]
    UnknownMethod(String),

    #[error("bad parameter {name} = {value}: {reason}")]
    BadParameter {
        name: &'static str,
        value: String,
        reason: String,
    },

    #[error("invalid model input: {0}")]
    InvalidInput(String),

    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Trace(#[from] crate::trace::TraceError),

    #[error(transparent)]
    Store(#[from] crate::store::StoreError),

    #[error(
        "the decoding method panicked: {0} (this is a bug in Specula; the worker keeps running)"
    )]
    MethodPanicked(String),

    #[error("the run was cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Refuses a count outside `1..=max`: "must be between 1 and {max}{unit}".
pub fn count_in_range(name: &'static str, value: usize, max: usize, unit: &str) -> Result<()> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(bad_param(
            name,
            value,
            format!("must be between 1 and {max}{unit}"),
        ))
    }
}

/// Shorthand for a bad-parameter error.
pub fn bad_param(name: &'static str, value: impl ToString, reason: impl Into<String>) -> Error {
    Error::BadParameter {
        name,
        value: value.to_string(),
        reason: reason.into(),
    }
}
