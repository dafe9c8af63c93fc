//! This machine's forward costs, measured: what a k-token forward costs against a one-token step, and from it
//! the cost of one drafted token that the cost-aware draft length takes (`SpeculativeParams::draft_cost`).
//! `specula bench` prints these; the GUI measures the draft cost when asked.
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

/// Draft tokens whose verification the draft cost is measured from.
const VERIFIED: usize = 4;

/// Milliseconds of one forward of k tokens after one [`PREFIX_TOKENS`]-token prefill, for each k in `sizes`, the
/// sizes taken in turn `repeats` times (every position's logits, as a verification asks for them).
pub fn forward_ms(llama: &Llama, sizes: &[usize], repeats: usize) -> Result<Vec<(usize, f64)>> {
    let ids: Vec<u32> = (0..PREFIX_TOKENS as u32).map(|i| 300 + 7 * i).collect();
    let positions: Vec<usize> = (0..PREFIX_TOKENS).collect();
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
            let pos: Vec<usize> = (PREFIX_TOKENS..PREFIX_TOKENS + k).collect();
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
            cache.truncate(PREFIX_TOKENS)?;
            Ok((k, elapsed))
        })
        .collect()
}

/// What one drafted token adds to a verification forward, in one-token steps, from a 4-token forward's time over
/// a one-token step's: `(t4 / t1 − 1) / 3`, as measured (`specula bench` prints it unclamped).
pub fn raw_draft_cost(four_over_step: f64) -> f64 {
    (four_over_step - 1.0) / (VERIFIED - 1) as f64
}

/// [`raw_draft_cost`] as a run's parameter takes it: within `0..=MAX_DRAFT_COST`, 0 when not measurable.
pub fn draft_cost(step_ms: f64, four_ms: f64) -> f32 {
    let cost = raw_draft_cost(four_ms / step_ms);
    if cost.is_finite() {
        (cost as f32).clamp(0.0, MAX_DRAFT_COST)
    } else {
        0.0
    }
}

/// Measures [`draft_cost`] on this machine: the medians of `repeats` one-token steps and 4-token forwards.
pub fn measure_draft_cost(llama: &Llama, repeats: usize) -> Result<f32> {
    let (mut steps, mut fours) = (Vec::new(), Vec::new());
    for (k, ms) in forward_ms(llama, &[1, VERIFIED], repeats)? {
        if k == 1 {
            steps.push(ms);
        } else {
            fours.push(ms);
        }
    }
    Ok(draft_cost(median(&mut steps), median(&mut fours)))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_cost_is_the_share_of_a_step_per_drafted_token() {
        assert_eq!(draft_cost(10.0, 16.0), 0.2);
        assert_eq!(
            draft_cost(10.0, 9.0),
            0.0,
            "a faster 4-token forward costs nothing"
        );
        assert_eq!(draft_cost(10.0, 100.0), MAX_DRAFT_COST);
        assert_eq!(draft_cost(0.0, 16.0), 0.0, "no step time, no figure");
    }
}
