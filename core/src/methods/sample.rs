//! Ancestral sampling from the warped distribution (temperature, top-k, typical, top-p, min-p), with the
//! parameters read afresh every step so that a change in the GUI applies at the next token.

use super::{DecodingMethod, Sequence, StepContext, advance, empty_step};
use crate::engine::Model;
use crate::error::Result;
use crate::sampling::{PositionStats, warp};
use crate::trace::{StepRecord, TokenSource};

pub struct Sample {
    seq: Sequence,
}

impl Sample {
    pub fn new(model: &Model) -> Self {
        Self {
            seq: Sequence::new(model),
        }
    }
}

impl DecodingMethod for Sample {
    fn name(&self) -> &'static str {
        "sample"
    }

    fn step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepRecord> {
        let mut record = empty_step();
        let logits = advance(&mut self.seq, ctx, &mut record)?;
        let warped = warp(&logits, &ctx.params.sampling);
        let id = warped.sample(ctx.rng);
        let source = if ctx.params.sampling.is_greedy() {
            TokenSource::Greedy
        } else {
            TokenSource::Sampled
        };
        let stats = PositionStats::new(&logits);
        let shown = (!ctx.params.sampling.is_greedy()).then_some(&warped);
        record.tokens.push(stats.record(
            &ctx.model.tokenizer,
            id,
            ctx.next_position(),
            shown,
            source,
        ));
        Ok(record)
    }
}
