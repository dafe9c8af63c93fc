//! Greedy decoding: the target's most likely token, every step. The reference every other method is checked
//! against (a lossless speculative method must reproduce it token for token).

use super::{DecodingMethod, Sequence, StepContext, advance, empty_step};
use crate::engine::Model;
use crate::error::Result;
use crate::sampling::{PositionStats, argmax};
use crate::trace::{StepRecord, TokenSource};

pub struct Greedy {
    seq: Sequence,
}

impl Greedy {
    pub fn new(model: &Model) -> Self {
        Self {
            seq: Sequence::new(model),
        }
    }
}

impl DecodingMethod for Greedy {
    fn name(&self) -> &'static str {
        "greedy"
    }

    fn step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepRecord> {
        let mut record = empty_step();
        let logits = advance(&mut self.seq, ctx, &mut record)?;
        let id = argmax(&logits);
        let stats = PositionStats::new(&logits);
        record.tokens.push(stats.record(
            &ctx.model.tokenizer,
            id,
            ctx.next_position(),
            None,
            TokenSource::Greedy,
        ));
        Ok(record)
    }
}
