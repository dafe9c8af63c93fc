//! Diverse beam search (Vijayakumar et al., 2016): the beams are split into G groups of B/G, and the groups
//! take turns at every step. Group g runs ordinary beam search, except that each token's log-probability is
//! lowered by λ for every earlier group that chose the same token at this step (Hamming diversity), so later
//! groups are pushed off the paths earlier ones took. Group 1 is plain beam search; with λ = 0 every group is
//! the same beam search of width B/G. The penalties accumulate in each hypothesis' score, as in the paper's
//! diversity-augmented objective and Hugging Face's implementation; its `logprob` stays the plain one.
//!
//! The search itself lives in `beam.rs`; this file holds what is specific to diversity.

use super::beam::Beam;
use crate::engine::Model;

/// Builds diverse beam search. `search.groups` is fixed at the first step (hypotheses belong to groups);
/// `search.diversity` may change between steps.
pub fn new(model: &Model) -> Beam {
    Beam::new(model, true)
}

/// How different the groups' best hypotheses are: the distinct bigrams among all their bigrams (distinct-2 of
/// Li et al., 2016, over the union of the groups). 1 means no two groups share a bigram; 1/G means every group
/// holds the same text. `None` when there are no bigrams yet.
pub fn distinct_bigrams(hypotheses: &[Vec<u32>]) -> Option<f32> {
    let mut all: Vec<(u32, u32)> = hypotheses
        .iter()
        .flat_map(|h| h.windows(2).map(|w| (w[0], w[1])))
        .collect();
    if all.is_empty() {
        return None;
    }
    let total = all.len();
    all.sort_unstable();
    all.dedup();
    Some(all.len() as f32 / total as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_bigrams_spans_one_over_groups_to_one() {
        assert_eq!(distinct_bigrams(&[vec![1, 2, 3], vec![1, 2, 3]]), Some(0.5));
        assert_eq!(distinct_bigrams(&[vec![1, 2, 3], vec![4, 5, 6]]), Some(1.0));
        assert_eq!(distinct_bigrams(&[vec![1], vec![2]]), None);
    }
}
