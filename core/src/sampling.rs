//! Turning logits into a choice: the plain distribution, the warpers (temperature, top-k, typical, top-p, min-p),
//! seeded draws, and the per-token statistics every trace records.
//!
//! Everything here is deterministic: ties break towards the lower token id, sums run in a fixed order, and the
//! random numbers come from a seeded ChaCha stream, so the same seed gives the same trace.

use rand::Rng;

use crate::error::{Result, bad_param};
use crate::tokenizer::Tokenizer;
use crate::trace::{Candidate, SamplingParams, TOP_CANDIDATES, TokenRecord, TokenSource};

/// The seeded random stream every run draws from.
pub type RunRng = rand_chacha::ChaCha8Rng;

pub fn rng_from_seed(seed: u64) -> RunRng {
    <RunRng as rand::SeedableRng>::seed_from_u64(seed)
}

impl SamplingParams {
    /// Refuses values that would make the warped distribution meaningless.
    pub fn validate(&self) -> Result<()> {
        let finite = |name: &'static str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(bad_param(name, v, "must be a finite number"))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("typical_p", self.typical_p)?;
        if self.temperature < 0.0 || self.temperature > 100.0 {
            return Err(bad_param(
                "temperature",
                self.temperature,
                "must be between 0 (greedy) and 100",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad_param(
                "top_p",
                self.top_p,
                "must be in (0, 1]; 1 turns it off",
            ));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(bad_param(
                "min_p",
                self.min_p,
                "must be in [0, 1); 0 turns it off",
            ));
        }
        if !(self.typical_p > 0.0 && self.typical_p <= 1.0) {
            return Err(bad_param(
                "typical_p",
                self.typical_p,
                "must be in (0, 1]; 1 turns it off",
            ));
        }
        Ok(())
    }
}

/// log softmax of a logits row, computed in f64 so that every entry is finite.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    logits
        .iter()
        .map(|&l| (f64::from(l) - log_z) as f32)
        .collect()
}

/// Entropy in nats of a distribution given by its log-probabilities.
pub fn entropy(logprobs: &[f32]) -> f32 {
    let h: f64 = logprobs
        .iter()
        .map(|&lp| -f64::from(lp) * f64::from(lp).exp())
        .sum();
    h.max(0.0) as f32
}

/// The argmax, ties to the lowest id.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Ids of the `n` largest values, best first (ties to the lower id).
///
/// One scan that keeps the best `n` so far: almost every value fails the first comparison with the current
/// n-th, so this costs about one pass over the vocabulary (it runs several times per committed token).
pub fn top_n(values: &[f32], n: usize) -> Vec<u32> {
    let n = n.min(values.len());
    if n > 64 {
        // Insertion into a long list would be quadratic: select, then sort.
        let by_value_desc = |a: &u32, b: &u32| {
            values[*b as usize]
                .total_cmp(&values[*a as usize])
                .then(a.cmp(b))
        };
        let mut ids: Vec<u32> = (0..values.len() as u32).collect();
        if n < ids.len() {
            ids.select_nth_unstable_by(n - 1, by_value_desc);
            ids.truncate(n);
        }
        ids.sort_unstable_by(by_value_desc);
        return ids;
    }
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    for (i, &v) in values.iter().enumerate() {
        // Ids arrive in increasing order, so an equal value ranks after everything kept: skip it when full.
        if best.len() == n
            && best
                .last()
                .is_none_or(|&(worst, _)| v.total_cmp(&worst).is_le())
        {
            continue;
        }
        let at = best.partition_point(|&(b, _)| b.total_cmp(&v).is_ge());
        best.insert(at, (v, i as u32));
        best.truncate(n);
    }
    best.into_iter().map(|(_, id)| id).collect()
}

/// A warped distribution: the tokens that survived the warpers with their renormalised probabilities, most
/// likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct Warped {
    pub support: Vec<(u32, f32)>,
}

impl Warped {
    /// A distribution with all its mass on one token (greedy choice, or an n-gram drafter's guess).
    pub fn point(id: u32) -> Self {
        Self {
            support: vec![(id, 1.0)],
        }
    }

    pub fn prob(&self, id: u32) -> f32 {
        self.support
            .iter()
            .find(|(t, _)| *t == id)
            .map_or(0.0, |(_, p)| *p)
    }

    /// The most likely token, ties to the lower id; `None` for an empty support. `warp` puts it first, but a
    /// `Warped` built elsewhere need not, so this looks at every entry.
    pub fn most_likely(&self) -> Option<u32> {
        heaviest(self.support.iter().copied())
    }

    /// The distribution with the tokens in `taken` removed and the rest renormalised: what the next of several
    /// siblings is drawn from when they are drawn without replacement. Empty when nothing else has mass.
    pub fn without(&self, taken: &[u32]) -> Warped {
        let mut support: Vec<(u32, f32)> = self
            .support
            .iter()
            .copied()
            .filter(|(t, p)| !taken.contains(t) && *p > 0.0)
            .collect();
        let total: f32 = support.iter().map(|(_, p)| p).sum();
        for (_, p) in &mut support {
            *p /= total;
        }
        Warped { support }
    }

    /// Draws a token: inverse CDF over the support in its fixed order.
    pub fn sample(&self, rng: &mut RunRng) -> u32 {
        let r: f64 = rng.random();
        let mut cum = 0.0f64;
        for &(id, p) in &self.support {
            cum += f64::from(p);
            if r < cum {
                return id;
            }
        }
        // Rounding left the total a hair under 1: the last token takes the remainder.
        self.support.last().map_or(0, |(id, _)| *id)
    }
}

/// Applies temperature, top-k, typical, top-p and min-p, in that order. Greedy parameters give the point mass
/// on the argmax.
pub fn warp(logits: &[f32], params: &SamplingParams) -> Warped {
    if params.is_greedy() || logits.is_empty() {
        return Warped::point(argmax(logits));
    }
    let t = f64::from(params.temperature);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| (f64::from(l - max) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut support: Vec<(u32, f64)> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| (i as u32, w / total))
        .filter(|(_, p)| *p > 0.0)
        .collect();
    // Top-k and top-p keep only the head of the sorted order, so only the head is sorted: a full sort of the
    // vocabulary costs more than the rest of the warp, and the drafters and the verifier warp many rows a step.
    // The head is exactly the full sort's (a total order: ties go to the lower id), so the result is the same.
    if params.top_k > 0 && params.top_k < support.len() {
        sort_head(&mut support, params.top_k);
        support.truncate(params.top_k);
        renormalize(&mut support);
    } else if params.typical_p < 1.0 || params.top_p >= 1.0 {
        sort_desc(&mut support);
    } else {
        // Only top-p cuts next. The tokens lighter than (1 - top_p) / n weigh less than 1 - top_p together, so
        // the top-p prefix lies among the heavier ones; rounding can leave it short, and then everything is sorted.
        let floor = (1.0 - f64::from(params.top_p)) / support.len() as f64;
        let mut head: Vec<(u32, f64)> = support.iter().copied().filter(|w| w.1 >= floor).collect();
        sort_desc(&mut head);
        if reaching_within(&head, f64::from(params.top_p)).is_some() {
            support = head;
        } else {
            sort_desc(&mut support);
        }
    }
    if params.typical_p < 1.0 {
        // Locally typical sampling: keep the tokens whose surprisal is closest to the entropy.
        let h: f64 = support.iter().map(|(_, p)| -p * p.ln()).sum();
        let mut by_typicality = support.clone();
        by_typicality.sort_by(|a, b| {
            (-a.1.ln() - h)
                .abs()
                .total_cmp(&(-b.1.ln() - h).abs())
                .then(a.0.cmp(&b.0))
        });
        let keep = prefix_reaching(&by_typicality, f64::from(params.typical_p));
        by_typicality.truncate(keep);
        support = by_typicality;
        sort_desc(&mut support);
        renormalize(&mut support);
    }
    if params.top_p < 1.0 {
        let keep = prefix_reaching(&support, f64::from(params.top_p));
        support.truncate(keep);
        renormalize(&mut support);
    }
    if params.min_p > 0.0
        && let Some(&(_, p_max)) = support.first()
    {
        let floor = p_max * f64::from(params.min_p);
        support.retain(|(_, p)| *p >= floor);
        renormalize(&mut support);
    }
    Warped {
        support: support.into_iter().map(|(id, p)| (id, p as f32)).collect(),
    }
}

fn by_weight_desc(a: &(u32, f64), b: &(u32, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

fn sort_desc(v: &mut [(u32, f64)]) {
    v.sort_unstable_by(by_weight_desc);
}

/// Puts the `n` heaviest entries first, sorted as `sort_desc` would; the rest follow in no order.
fn sort_head(v: &mut [(u32, f64)], n: usize) {
    if n == 0 {
        return;
    }
    if n < v.len() {
        v.select_nth_unstable_by(n - 1, by_weight_desc);
    }
    if let Some(head) = v.get_mut(..n) {
        sort_desc(head);
    }
}

fn renormalize(v: &mut [(u32, f64)]) {
    let total: f64 = v.iter().map(|(_, p)| p).sum();
    if total > 0.0 {
        for (_, p) in v.iter_mut() {
            *p /= total;
        }
    }
}

/// Length of the shortest prefix whose mass reaches `mass` (at least 1).
fn prefix_reaching(v: &[(u32, f64)], mass: f64) -> usize {
    reaching_within(v, mass).unwrap_or(v.len().max(1))
}

/// Length of the shortest prefix whose mass reaches `mass`, if one does.
fn reaching_within(v: &[(u32, f64)], mass: f64) -> Option<usize> {
    let mut cum = 0.0;
    for (i, (_, p)) in v.iter().enumerate() {
        cum += p;
        if cum >= mass {
            return Some(i + 1);
        }
    }
    None
}

/// What the model thought at one position, computed once from the logits and reused for every choice made there.
pub struct PositionStats {
    pub logprobs: Vec<f32>,
    pub entropy: f32,
    pub top: Vec<u32>,
}

impl PositionStats {
    pub fn new(logits: &[f32]) -> Self {
        // One pass of exponentials gives both the normaliser and the entropy (H = log Z − Σ p·l): this runs on
        // every committed token, and a second pass over the vocabulary cost ~4% of decode speed.
        // The exponentials 16 at a time (libm's bits, so the sums and every trace byte are unchanged).
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut exps: Vec<f32> = logits.iter().map(|&l| l - max).collect();
        crate::kernels::vector::exp_in_place(&mut exps);
        let (mut sum, mut weighted) = (0f64, 0f64);
        for (&e, &l) in exps.iter().zip(logits) {
            let e = f64::from(e);
            sum += e;
            weighted += e * f64::from(l - max);
        }
        let log_z = f64::from(max) + sum.ln();
        let logprobs: Vec<f32> = logits
            .iter()
            .map(|&l| (f64::from(l) - log_z) as f32)
            .collect();
        let entropy = (sum.ln() - weighted / sum).max(0.0) as f32;
        let top = top_n(&logprobs, TOP_CANDIDATES);
        Self {
            logprobs,
            entropy,
            top,
        }
    }

    /// 0 for the most likely token; ties rank by id, as everywhere else.
    pub fn rank(&self, id: u32) -> u32 {
        let Some(&lp) = self.logprobs.get(id as usize) else {
            return u32::MAX;
        };
        self.logprobs
            .iter()
            .enumerate()
            .filter(|&(i, &other)| other > lp || (other == lp && (i as u32) < id))
            .count() as u32
    }

    /// The trace record of choosing `id` at `position`.
    pub fn record(
        &self,
        tokenizer: &Tokenizer,
        id: u32,
        position: usize,
        warped: Option<&Warped>,
        source: TokenSource,
    ) -> TokenRecord {
        let top_logprobs = self
            .top
            .iter()
            .map(|&c| Candidate {
                id: c,
                token: tokenizer.token_text(c),
                logprob: self.logprobs.get(c as usize).copied().unwrap_or(f32::MIN),
                warped_prob: warped.map(|w| w.prob(c)),
            })
            .collect();
        TokenRecord {
            id,
            token: tokenizer.token_text(id),
            position,
            logprob: self.logprobs.get(id as usize).copied().unwrap_or(f32::MIN),
            rank: self.rank(id),
            entropy: self.entropy,
            sampling_prob: warped.map(|w| w.prob(id)),
            warped_kept: warped.map(|w| w.support.len()),
            top_logprobs,
            source,
        }
    }
}

/// The token with the largest weight, ties to the lower id (so the choice never depends on the support's order);
/// `None` for an empty support.
pub fn heaviest<W: PartialOrd + Copy>(weights: impl IntoIterator<Item = (u32, W)>) -> Option<u32> {
    weights
        .into_iter()
        .fold(None::<(u32, W)>, |best, (t, w)| match best {
            Some((bt, bw)) if bw > w || (bw == w && bt < t) => Some((bt, bw)),
            _ => Some((t, w)),
        })
        .map(|(t, _)| t)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            typical_p: 1.0,
        }
    }

    #[test]
    fn log_softmax_is_normalised_and_finite() {
        let lp = log_softmax(&[1000.0, 0.0, -1000.0]);
        assert!(lp.iter().all(|x| x.is_finite()));
        let total: f64 = lp.iter().map(|&x| f64::from(x).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn warpers_cut_where_they_should() {
        // probabilities 0.5, 0.25, 0.125, 0.125 at T = 1
        let logits = [2f32.ln() * 3.0, 2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
        let w = warp(&logits, &params(1.0));
        assert_eq!(w.support.len(), 4);
        assert!((w.prob(0) - 0.5).abs() < 1e-6);
        let w = warp(
            &logits,
            &SamplingParams {
                top_k: 2,
                ..params(1.0)
            },
        );
        assert_eq!(
            w.support.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert!((w.prob(0) - 2.0 / 3.0).abs() < 1e-6);
        let w = warp(
            &logits,
            &SamplingParams {
                top_p: 0.7,
                ..params(1.0)
            },
        );
        assert_eq!(w.support.len(), 2, "0.5 + 0.25 reaches 0.7");
        let w = warp(
            &logits,
            &SamplingParams {
                min_p: 0.3,
                ..params(1.0)
            },
        );
        assert_eq!(w.support.len(), 2, "0.125 < 0.3 * 0.5");
        assert_eq!(warp(&logits, &params(0.0)), Warped::point(0));
    }

    /// `warp` as it was before the partial sort: the whole support sorted first.
    fn warp_full_sort(logits: &[f32], params: &SamplingParams) -> Warped {
        let t = f64::from(params.temperature);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits
            .iter()
            .map(|&l| (f64::from(l - max) / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut support: Vec<(u32, f64)> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| (i as u32, w / total))
            .filter(|(_, p)| *p > 0.0)
            .collect();
        sort_desc(&mut support);
        if params.top_k > 0 && params.top_k < support.len() {
            support.truncate(params.top_k);
            renormalize(&mut support);
        }
        if params.typical_p < 1.0 {
            let h: f64 = support.iter().map(|(_, p)| -p * p.ln()).sum();
            let mut by_typicality = support.clone();
            by_typicality.sort_by(|a, b| {
                (-a.1.ln() - h)
                    .abs()
                    .total_cmp(&(-b.1.ln() - h).abs())
                    .then(a.0.cmp(&b.0))
            });
            let keep = prefix_reaching(&by_typicality, f64::from(params.typical_p));
            by_typicality.truncate(keep);
            support = by_typicality;
            sort_desc(&mut support);
            renormalize(&mut support);
        }
        if params.top_p < 1.0 {
            let keep = prefix_reaching(&support, f64::from(params.top_p));
            support.truncate(keep);
            renormalize(&mut support);
        }
        if params.min_p > 0.0
            && let Some(&(_, p_max)) = support.first()
        {
            let floor = p_max * f64::from(params.min_p);
            support.retain(|(_, p)| *p >= floor);
            renormalize(&mut support);
        }
        Warped {
            support: support.into_iter().map(|(id, p)| (id, p as f32)).collect(),
        }
    }

    #[test]
    fn sorting_only_the_head_changes_nothing() {
        let mut rng = rng_from_seed(5);
        for case in 0..60 {
            // Vocabulary-sized rows, flat or peaked, with repeated values so ties are exercised.
            let spread = [2.0f32, 8.0, 30.0][case % 3];
            let logits: Vec<f32> = (0..49_152)
                .map(|_| (rng.random::<f32>() * spread * 64.0).round() / 64.0)
                .collect();
            for p in [
                SamplingParams {
                    top_p: 0.95,
                    ..params(0.8)
                },
                SamplingParams {
                    top_p: 0.999,
                    ..params(1.3)
                },
                SamplingParams {
                    top_k: 40,
                    top_p: 0.9,
                    ..params(1.0)
                },
                SamplingParams {
                    top_p: 0.9,
                    min_p: 0.05,
                    ..params(0.7)
                },
                SamplingParams {
                    top_p: 0.9,
                    typical_p: 0.8,
                    ..params(1.0)
                },
                params(1.0),
            ] {
                assert_eq!(warp(&logits, &p), warp_full_sort(&logits, &p), "{p:?}");
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0];
        let w = warp(&logits, &params(1.0));
        let mut rng = rng_from_seed(7);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[w.sample(&mut rng) as usize] += 1;
        }
        for (id, &c) in counts.iter().enumerate() {
            let expected = w.prob(id as u32) as f64 * 30_000.0;
            assert!(
                (c as f64 - expected).abs() < 4.0 * expected.sqrt() + 1.0,
                "{counts:?} vs {w:?}"
            );
        }
    }

    #[test]
    fn ranks_and_top_n_agree() {
        let logits = [0.5f32, 3.0, 3.0, -1.0, 2.0];
        let s = PositionStats::new(&logits);
        assert_eq!(top_n(&s.logprobs, 3), vec![1, 2, 4]);
        assert_eq!(s.rank(1), 0);
        assert_eq!(s.rank(2), 1);
        assert_eq!(s.rank(3), 4);
    }

    #[test]
    fn top_n_equals_a_full_sort_with_ties_to_the_lower_id() {
        let values: Vec<f32> = (0..3000).map(|i| ((i * 7919 % 613) / 5) as f32).collect();
        for n in [0, 1, 5, 20, 3000, 4000] {
            let mut ids: Vec<u32> = (0..values.len() as u32).collect();
            ids.sort_by(|&a, &b| {
                values[b as usize]
                    .total_cmp(&values[a as usize])
                    .then(a.cmp(&b))
            });
            ids.truncate(n);
            assert_eq!(top_n(&values, n), ids, "n = {n}");
        }
    }

    #[test]
    fn one_pass_stats_equal_the_two_pass_definitions() {
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let s = PositionStats::new(&logits);
        let reference = log_softmax(&logits);
        for (a, b) in s.logprobs.iter().zip(&reference) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let h = entropy(&reference);
        assert!((s.entropy - h).abs() < 1e-4, "{} vs {h}", s.entropy);
    }

    #[test]
    fn validation_refuses_nonsense() {
        assert!(
            SamplingParams {
                temperature: -1.0,
                ..params(1.0)
            }
            .validate()
            .is_err()
        );
        assert!(
            SamplingParams {
                top_p: 0.0,
                ..params(1.0)
            }
            .validate()
            .is_err()
        );
        assert!(
            SamplingParams {
                min_p: f32::NAN,
                ..params(1.0)
            }
            .validate()
            .is_err()
        );
        assert!(params(0.7).validate().is_ok());
    }
}
