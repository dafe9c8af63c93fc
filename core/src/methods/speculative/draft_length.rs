//! How long a draft pays: the i.i.d. speedup model of Leviathan et al. and the cost-aware draft length, whose
//! cost per drafted token may grow with the context every verified token attends over.

use super::MAX_DRAFT_COST;
use crate::trace::SpeculativeParams;

impl SpeculativeParams {
    /// The cost-aware policy's cost of one drafted token, in one-token steps, when `context` tokens precede the
    /// draft: `draft_cost`, grown by `draft_cost_growth` per 1,000 tokens, at most [`MAX_DRAFT_COST`]. `None`
    /// when the policy is off.
    pub fn draft_cost_at(&self, context: usize) -> Option<f64> {
        let cost = f64::from(self.draft_cost?);
        let growth = f64::from(self.draft_cost_growth.unwrap_or(0.0));
        Some((cost + growth * context as f64 / 1000.0).min(f64::from(MAX_DRAFT_COST)))
    }
}

/// A drafter's note, with the cost the cost-aware policy priced a drafted token at when that cost grows with the
/// context (so the panel can say why drafts thin out as a run gets long).
pub(super) fn with_priced_cost(note: String, params: &SpeculativeParams, context: usize) -> String {
    match (params.draft_cost_growth, params.draft_cost_at(context)) {
        (Some(_), Some(cost)) => {
            format!("{note}; a drafted token costs {cost:.2} steps after {context} tokens")
        }
        _ => note,
    }
}

/// Expected tokens committed per draft-and-verify round when each of `k` drafts is accepted independently with
/// probability `alpha` (the accepted prefix plus the verifier's own token): (1 - a^(k+1)) / (1 - a).
pub fn expected_tokens_per_round(alpha: f64, k: f64) -> f64 {
    if (1.0 - alpha).abs() < 1e-9 {
        k + 1.0
    } else {
        (1.0 - alpha.powf(k + 1.0)) / (1.0 - alpha)
    }
}

/// The speedup the i.i.d. model of Leviathan et al. predicts, (1 - a^(k+1)) / ((1 - a)(k c + 1)), with `c` the
/// cost of drafting one token relative to a verification forward (assumed to cost one plain step).
pub fn predicted_speedup(alpha: f64, k: f64, c: f64) -> f64 {
    expected_tokens_per_round(alpha, k) / (k * c + 1.0)
}

/// The cost-aware draft length: the k in 0..=`max_len` that maximises the predicted speedup at per-token
/// acceptance `alpha` and per-token cost `c`; 0 (a plain step) when no draft pays for its verification. Ties go to
/// the shorter draft.
pub fn cost_aware_length(alpha: f64, c: f64, max_len: usize) -> usize {
    let chain: Vec<usize> = (0..=max_len).collect();
    cost_aware_depth(alpha, c, &chain)
}

/// The draft length in 1..=`max_len` with the highest predicted speedup at acceptance `alpha` and per-token cost
/// `c` (ties to the shorter), and that speedup: the length a drafter that always drafts takes. `(0, 1.0)`, a plain
/// step, when `max_len` is 0.
pub fn best_length(alpha: f64, c: f64, max_len: usize) -> (usize, f64) {
    let chain: Vec<usize> = (0..=max_len).collect();
    best_depth(alpha, c, &chain, 1)
}

/// The cost-aware depth of a draft tree whose cut to depth d holds `nodes[d]` nodes (`nodes[0]` = 0): the d that
/// maximises the expected tokens per round at per-level acceptance `alpha` over the verification's cost in
/// one-token steps, 1 + c · nodes[d]. A chain (one node per level) gives [`cost_aware_length`]; a tree pays for
/// every node it verifies, not only for its depth.
pub fn cost_aware_depth(alpha: f64, c: f64, nodes: &[usize]) -> usize {
    best_depth(alpha, c, nodes, 0).0
}

/// The depth d >= `shallowest` of a tree holding `nodes[d]` nodes when cut to depth d that maximises the expected
/// tokens per round over the verification's cost, 1 + c · nodes[d], with that figure (ties to the shallower);
/// `(0, 1.0)` when no depth is allowed. Depth 0, a plain step, scores exactly 1.
fn best_depth(alpha: f64, c: f64, nodes: &[usize], shallowest: usize) -> (usize, f64) {
    let mut best: Option<(usize, f64)> = None;
    for (d, &n) in nodes.iter().enumerate().skip(shallowest) {
        let speedup = expected_tokens_per_round(alpha, d as f64) / (n as f64 * c + 1.0);
        if best.is_none_or(|(_, b)| speedup > b + 1e-12) {
            best = Some((d, speedup));
        }
    }
    best.unwrap_or((0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A drafted token's cost grows with the context it is verified after, up to the ceiling, and prices longer
    /// drafts out; the growth is refused without the cost or outside its range.
    #[test]
    fn draft_cost_grows_with_context_up_to_its_ceiling() {
        let params = |cost, growth| SpeculativeParams {
            draft_cost: cost,
            draft_cost_growth: growth,
            ..SpeculativeParams::default()
        };
        assert_eq!(params(None, None).draft_cost_at(500), None);
        assert_eq!(
            params(Some(0.1), None).draft_cost_at(5000),
            Some(f64::from(0.1f32))
        );
        let growing = params(Some(0.125), Some(0.25));
        assert_eq!(growing.draft_cost_at(0), Some(0.125));
        assert_eq!(growing.draft_cost_at(1000), Some(0.375));
        assert_eq!(
            growing.draft_cost_at(100_000),
            Some(f64::from(MAX_DRAFT_COST))
        );
        // At the cost a long context brings, the same acceptance pays for a shorter draft.
        let a = 0.6;
        let short = cost_aware_length(a, growing.draft_cost_at(100).unwrap_or(0.0), 8);
        let long = cost_aware_length(a, growing.draft_cost_at(2000).unwrap_or(0.0), 8);
        assert!(
            long < short,
            "{long} drafts at 2,000 tokens, {short} at 100"
        );
        assert!(params(Some(0.1), Some(0.2)).validate(30).is_ok());
        assert!(
            params(None, Some(0.2)).validate(30).is_err(),
            "growth alone"
        );
        assert!(params(Some(0.1), Some(f32::NAN)).validate(30).is_err());
        assert!(params(Some(0.1), Some(-0.1)).validate(30).is_err());
        assert!(
            params(Some(0.1), Some(MAX_DRAFT_COST + 0.1))
                .validate(30)
                .is_err()
        );
    }

    /// The cost-aware length drafts nothing when one drafted token costs more than its acceptance is worth,
    /// everything when drafting is free, and never less when acceptance rises.
    #[test]
    fn cost_aware_length_follows_acceptance_and_cost() {
        assert_eq!(cost_aware_length(0.2, 0.3, 8), 0);
        assert_eq!(cost_aware_length(0.5, 0.0, 8), 8);
        assert_eq!(cost_aware_length(0.9, 1.0, 8), 0);
        assert_eq!(cost_aware_length(0.8, 0.28, 16), 3);
        let mut last = 0;
        for a in (0..100).map(|i| f64::from(i) / 100.0) {
            let k = cost_aware_length(a, 0.3, 16);
            assert!(
                k >= last,
                "length fell from {last} to {k} at acceptance {a}"
            );
            last = k;
        }
        assert!(last >= 8);
    }

    /// A tree pays for each node it verifies: where a chain of two pays, a tree of 8 then 29 nodes stops at
    /// its first level, and at a cost of 0.2 per node not even that.
    #[test]
    fn cost_aware_depth_counts_nodes() {
        assert_eq!(cost_aware_length(0.6, 0.05, 2), 2);
        assert_eq!(cost_aware_depth(0.6, 0.05, &[0, 1, 2]), 2);
        assert_eq!(cost_aware_depth(0.6, 0.05, &[0, 8, 29]), 1);
        assert_eq!(cost_aware_depth(0.6, 0.2, &[0, 8, 29]), 0);
        assert_eq!(cost_aware_depth(0.6, 0.0, &[0, 8, 29]), 2);
    }
}
