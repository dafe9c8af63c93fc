//! This machine's forward costs, measured: what a k-token forward costs against a one-token step, and from it
//! the cost of one drafted token that the cost-aware draft length takes (`SpeculativeParams::draft_cost`), and
//! how that cost grows with the context (`draft_cost_growth`). `specula bench` prints these; the GUI measures
//! them when asked.
//!
//! A run never measures itself: a run that timed its own forwards would draft differently from one run to the
//! next, and the same seed would no longer give the same trace. The measured figure is a suggestion the user
//! takes into the run's parameters.

use std::time::Instant;

use crate::error::Result;
use crate::methods::speculative::MAX_DRAFT_COST;
use crate::model::{Capture, Llama, Logits, Mask};

/// Tokens in the prefix the forwards are timed after.
pub const PREFIX_TOKENS: usize = 64;

/// A longer prefix, where the draft cost is measured again to see how it grows with context (every verified
/// token attends over the whole cache).
pub const LONG_PREFIX_TOKENS: usize = 1024;

/// Draft tokens whose verification the draft cost is measured from.
const VERIFIED: usize = 4;

/// Milliseconds of one forward of k tokens after a `prefix`-token prefill, for each k in `sizes`, the sizes taken
/// in turn `repeats` times (every position's logits, as a verification asks for them).
pub fn forward_ms(
    llama: &Llama,
    prefix: usize,
    sizes: &[usize],
    repeats: usize,
) -> Result<Vec<(usize, f64)>> {
    let vocab = llama.config.vocab_size.max(1) as u32;
    let ids: Vec<u32> = (0..prefix as u32).map(|i| (300 + 7 * i) % vocab).collect();
    let positions: Vec<usize> = (0..prefix).collect();
    let mut cache = llama.new_cache();
    llama.forward(
        &mut cache,
        &ids,
        &positions,
        1,
        &Mask::Causal,
        Logits::Last,
        &Capture::default(),
    )?;
    sizes
        .iter()
        .cycle()
        .take(sizes.len() * repeats.max(1))
        .map(|&k| {
            let tokens: Vec<u32> = ids.iter().copied().cycle().take(k).collect();
            let pos: Vec<usize> = (prefix..prefix + k).collect();
            let started = Instant::now();
            llama.forward(
                &mut cache,
                &tokens,
                &pos,
                1,
                &Mask::Causal,
                Logits::All,
                &Capture::default(),
            )?;
            let elapsed = started.elapsed().as_secs_f64() * 1000.0;
            // Back to the prefix in place (a clone would share rows and make the next append copy them).
            cache.truncate(prefix)?;
            Ok((k, elapsed))
        })
        .collect()
}

/// What one drafted token adds to a verification forward, in one-token steps, from a 4-token forward's time over
/// a one-token step's: `(t4 / t1 − 1) / 3`, as measured (`specula bench` prints it unclamped).
pub fn raw_draft_cost(four_over_step: f64) -> f64 {
    (four_over_step - 1.0) / (VERIFIED - 1) as f64
}

/// The cost-aware policy's figures for this machine (`SpeculativeParams::draft_cost` and `draft_cost_growth`):
/// a drafted token costs `cost + growth · n / 1000` one-token steps after n tokens of context.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DraftCost {
    pub cost: f32,
    pub growth: f32,
}

impl DraftCost {
    /// The line through the raw costs measured at two context lengths, `(context, raw cost)`, each figure
    /// within `0..=MAX_DRAFT_COST` (0 when not measurable; no growth from a single length).
    pub fn through(short: (usize, f64), long: (usize, f64)) -> Self {
        let within = |x: f64| {
            if x.is_finite() {
                (x as f32).clamp(0.0, MAX_DRAFT_COST)
            } else {
                0.0
            }
        };
        let growth = raw_growth(short, long).map_or(0.0, within);
        Self {
            cost: within(short.1 - f64::from(growth) * short.0 as f64 / 1000.0),
            growth,
        }
    }
}

/// The raw draft costs' growth per 1,000 tokens of context between two `(context, raw cost)` measurements, as
/// measured (`specula bench` prints it unclamped); `None` when the second is not after a longer context.
pub fn raw_growth(short: (usize, f64), long: (usize, f64)) -> Option<f64> {
    let span = long.0.saturating_sub(short.0) as f64 / 1000.0;
    (span > 0.0).then(|| (long.1 - short.1) / span)
}

/// The raw draft cost after a `prefix`-token context: from the medians of `repeats` one-token steps and 4-token
/// forwards.
pub fn raw_draft_cost_after(llama: &Llama, prefix: usize, repeats: usize) -> Result<f64> {
    let (mut steps, mut fours) = (Vec::new(), Vec::new());
    for (k, ms) in forward_ms(llama, prefix, &[1, VERIFIED], repeats)? {
        if k == 1 {
            steps.push(ms);
        } else {
            fours.push(ms);
        }
    }
    Ok(raw_draft_cost(median(&mut fours) / median(&mut steps)))
}

/// The long prefix the growth is measured after: [`LONG_PREFIX_TOKENS`], or as long a prefix as the model's
/// context leaves room for; `None` when that is too short to tell a growth from noise.
pub fn long_prefix(llama: &Llama) -> Option<usize> {
    let prefix = LONG_PREFIX_TOKENS.min(llama.config.context_length.saturating_sub(VERIFIED + 1));
    (prefix >= 2 * PREFIX_TOKENS).then_some(prefix)
}

/// Measures [`DraftCost`] on this machine: the draft cost after [`PREFIX_TOKENS`] and after [`long_prefix`]
/// (no growth for a model whose context is too short for it).
pub fn measure_draft_cost(llama: &Llama, repeats: usize) -> Result<DraftCost> {
    let short = raw_draft_cost_after(llama, PREFIX_TOKENS, repeats)?;
    let Some(prefix) = long_prefix(llama) else {
        return Ok(DraftCost::through(
            (PREFIX_TOKENS, short),
            (PREFIX_TOKENS, short),
        ));
    };
    let long = raw_draft_cost_after(llama, prefix, repeats)?;
    Ok(DraftCost::through((PREFIX_TOKENS, short), (prefix, long)))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_cost_is_a_line_through_two_context_lengths() {
        assert!((raw_draft_cost(1.6) - 0.2).abs() < 1e-12);
        let line = DraftCost::through((0, 0.1), (1000, 0.3));
        assert!((line.cost - 0.1).abs() < 1e-6 && (line.growth - 0.2).abs() < 1e-6);
        // Measured at 64 and 1,064 tokens: the line's value at 64 is the short cost.
        let line = DraftCost::through((64, 0.2), (1064, 0.45));
        assert!((line.growth - 0.25).abs() < 1e-6);
        assert!((line.cost + line.growth * 0.064 - 0.2).abs() < 1e-6);
        let flat = DraftCost::through((64, 0.2), (1064, 0.1));
        assert_eq!(
            flat.growth, 0.0,
            "a cost that falls with context does not grow"
        );
        assert_eq!(
            DraftCost::through((64, 0.2), (64, 0.9)),
            DraftCost {
                cost: 0.2,
                growth: 0.0
            },
            "one length gives no growth"
        );
        assert_eq!(
            DraftCost::through((64, -0.1), (1064, f64::NAN)),
            DraftCost {
                cost: 0.0,
                growth: 0.0
            },
            "a faster 4-token forward costs nothing; no step time, no figure"
        );
        assert_eq!(
            DraftCost::through((64, 9.0), (1064, 9.0)).cost,
            MAX_DRAFT_COST
        );
    }
}
