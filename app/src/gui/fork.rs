//! Fork from a token: keep a run's tokens up to a position, force another candidate there, and let the model go
//! on from it. Pure data work, so it is tested without a model.

use specula_core::trace::{ForkOrigin, TokenSource, Trace};
use specula_core::{Fork, PromptSpec, RunSpec};

/// A fork near the end of its parent still decodes at least this many tokens after the forced one.
pub const MIN_TOKENS_AFTER_FORK: usize = 16;

/// Builds the spec of a run that keeps the first `token_index` generated tokens of `parent`, then forces
/// candidate `candidate` (an index into that position's `top_logprobs`), and continues with the parent's
/// method, parameters, seed and token budget.
pub fn fork_spec(parent: &Trace, token_index: usize, candidate: usize) -> Result<RunSpec, String> {
    let tokens: Vec<_> = parent.tokens().collect();
    let original = tokens.get(token_index).ok_or_else(|| {
        format!(
            "the run has no token {token_index} (it has {})",
            tokens.len()
        )
    })?;
    let choice = original
        .top_logprobs
        .get(candidate)
        .ok_or_else(|| format!("token {token_index} has no candidate {candidate}"))?;
    if choice.id == original.id {
        return Err(format!(
            "\"{}\" is already the token at this position",
            choice.token
        ));
    }
    let mut forced = (*original).clone();
    forced.id = choice.id;
    forced.token = choice.token.clone();
    forced.logprob = choice.logprob;
    forced.rank = u32::try_from(candidate).unwrap_or(u32::MAX);
    // The original's warped probability belongs to the original token; the candidate carries its own.
    forced.sampling_prob = choice.warped_prob;
    forced.source = TokenSource::Forced;

    let mut kept: Vec<_> = tokens[..token_index].iter().map(|t| (*t).clone()).collect();
    kept.push(forced);

    let header = &parent.header;
    let parent_label = if header.label.is_empty() {
        header.method.clone()
    } else {
        header.label.clone()
    };
    Ok(RunSpec {
        label: format!(
            "fork of {parent_label} at {token_index}: {}",
            super::panels::tokens::quoted(&choice.token)
        ),
        method: header.method.clone(),
        params: header.params.clone(),
        prompt: PromptSpec {
            text: header.prompt.text.clone(),
            chat: header.prompt.chat,
            system: header.prompt.system.clone(),
        },
        seed: header.seed,
        // The parent's budget, but always room to see where the forced token leads.
        max_tokens: header
            .max_tokens
            .max(token_index + 1 + MIN_TOKENS_AFTER_FORK),
        fork: Some(Fork {
            origin: ForkOrigin {
                parent_label,
                kept_tokens: token_index,
                forced_token_id: choice.id,
            },
            tokens: kept,
        }),
    })
}
