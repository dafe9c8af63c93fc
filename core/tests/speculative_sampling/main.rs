//! Exactness of speculative decoding's sampling verifier on the real default model: goodness of fit of the first
//! two generated tokens against the exact target distribution for a chain, a tree, point masses and the lookahead
//! drafter's SJD window with its argmax siblings (and the same test catching a deliberately broken verifier), and
//! measured acceptance against the verifier's alpha. The lookahead drafter's SJD is in `sjd.rs`, measured acceptance
//! in `acceptance.rs`; both use the machinery here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod acceptance;
#[path = "../common/mod.rs"]
mod common;
mod sjd;

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;

use common::{model, spec, speculative_params};
use specula_core::methods::speculative::drafter::{DraftInput, Drafter, Observation};
use specula_core::methods::speculative::layer_skip::draw_siblings;
use specula_core::methods::speculative::lookahead::Lookahead;
use specula_core::methods::speculative::prompt_lookup;
use specula_core::methods::speculative::verifier::{
    DraftTree, DraftTreeNode, Verdict, overlap, verify, verify_broken_for_tests,
};
use specula_core::model::{Capture, KvCache, Logits, Mask, logits_row};
use specula_core::sampling::{RunRng, Warped, argmax, rng_from_seed, top_n, warp};
use specula_core::trace::{DraftKind, SpeculativeParams, StepPayload};
use specula_core::{MethodParams, SamplingParams, generate};

// ------------------------------------------------------------------------------------------------------------
// Lossless sampling: the pure verifier against exact target distributions memoized from the real model.

const LOSSLESS_SAMPLES: usize = 6000;

fn lossless_sampling() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: 0,
        top_p: 0.95,
        min_p: 0.0,
        typical_p: 1.0,
    }
}

/// The warped target p and a layer-skip q after `prompt + suffix`, each computed once. Only the first two
/// generated tokens are tested, so distributions after two generated tokens (which only decide the third) are
/// a placeholder and cost nothing.
struct Oracle {
    prompt: Vec<u32>,
    /// The prompt minus its last token, through every layer.
    base: KvCache,
    skip: Capture,
    params: SamplingParams,
    p: BTreeMap<Vec<u32>, Rc<Warped>>,
    q: BTreeMap<Vec<u32>, Rc<Warped>>,
    placeholder: Rc<Warped>,
    forwards: usize,
}

impl Oracle {
    fn new(prompt: &str, skip: std::ops::Range<usize>) -> Self {
        let mut oracle = Self::target_only(prompt);
        oracle.skip.skip_layers = skip.collect();
        oracle.precompute();
        oracle
    }

    /// The target's distributions only, computed as they are asked for (no layer-skip q).
    fn target_only(prompt: &str) -> Self {
        let llama = &model().llama;
        let prompt = model().tokenizer.encode(prompt).unwrap();
        let mut base = llama.new_cache();
        let n = prompt.len() - 1;
        llama
            .forward(
                &mut base,
                &prompt[..n],
                &(0..n).collect::<Vec<_>>(),
                1,
                &Mask::Causal,
                Logits::Last,
                &Capture::default(),
            )
            .unwrap();
        Self {
            prompt,
            base,
            skip: Capture::default(),
            params: lossless_sampling(),
            p: BTreeMap::new(),
            q: BTreeMap::new(),
            placeholder: Rc::new(Warped::point(0)),
            forwards: 0,
        }
    }

    /// Every first token the verifier can emit or a drafter can propose lies in supp(p) or supp(q) after the
    /// prompt; the distributions after each of them come from a few tree forwards instead of one forward each.
    fn precompute(&mut self) {
        let p0 = self.dist(&[], false);
        let q0 = self.dist(&[], true);
        let mut firsts: Vec<u32> = p0.support.iter().map(|&(t, _)| t).collect();
        firsts.extend(q0.support.iter().map(|&(t, _)| t));
        firsts.sort_unstable();
        firsts.dedup();
        for draft in [false, true] {
            self.after_each(&firsts, draft, false);
        }
    }

    /// Memoizes the distribution after the prompt and each token of `firsts` (the layer-skip one with `draft`),
    /// from tree forwards with up to 64 of them as siblings of the last prompt token. With `raw` it also returns
    /// the logits.
    fn after_each(
        &mut self,
        firsts: &[u32],
        draft: bool,
        raw: bool,
    ) -> BTreeMap<u32, Rc<Vec<f32>>> {
        let llama = &model().llama;
        let root = *self.prompt.last().unwrap();
        let at = self.prompt.len() - 1;
        let capture = if draft {
            self.skip.clone()
        } else {
            Capture::default()
        };
        let mut logits = BTreeMap::new();
        for chunk in firsts.chunks(64) {
            let mut cache = self.base.clone();
            let mut tokens = vec![root];
            tokens.extend_from_slice(chunk);
            let mut parents = vec![None];
            parents.extend(chunk.iter().map(|_| Some(0)));
            let mut positions = vec![at];
            positions.extend(chunk.iter().map(|_| at + 1));
            let out = llama
                .forward(
                    &mut cache,
                    &tokens,
                    &positions,
                    1,
                    &Mask::Tree(parents),
                    Logits::All,
                    &capture,
                )
                .unwrap();
            self.forwards += 1;
            for (i, &t) in chunk.iter().enumerate() {
                let row = logits_row(&out.logits, 0, i + 1).unwrap();
                let w = Rc::new(warp(&row, &self.params));
                let memo = if draft { &mut self.q } else { &mut self.p };
                memo.insert(vec![t], w);
                if raw {
                    logits.insert(t, Rc::new(row));
                }
            }
        }
        logits
    }

    /// The warped target after the prompt with each of `tokens` in place of its last token, from tree forwards
    /// with up to 64 of them hanging off the prompt's other tokens.
    fn instead_of_last(&mut self, tokens: &[u32]) -> Vec<Warped> {
        let llama = &model().llama;
        let at = self.prompt.len() - 1;
        let mut out = Vec::with_capacity(tokens.len());
        for chunk in tokens.chunks(64) {
            let out_chunk = llama
                .forward(
                    &mut self.base.clone(),
                    chunk,
                    &vec![at; chunk.len()],
                    1,
                    &Mask::Tree(vec![None; chunk.len()]),
                    Logits::All,
                    &Capture::default(),
                )
                .unwrap();
            self.forwards += 1;
            for i in 0..chunk.len() {
                out.push(warp(
                    &logits_row(&out_chunk.logits, 0, i).unwrap(),
                    &self.params,
                ));
            }
        }
        out
    }

    fn dist(&mut self, suffix: &[u32], draft: bool) -> Rc<Warped> {
        if suffix.len() >= 2 {
            return self.placeholder.clone();
        }
        let memo = if draft { &self.q } else { &self.p };
        if let Some(w) = memo.get(suffix) {
            return w.clone();
        }
        let llama = &model().llama;
        let mut cache = self.base.clone();
        let mut tokens = vec![*self.prompt.last().unwrap()];
        tokens.extend_from_slice(suffix);
        let start = self.prompt.len() - 1;
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let capture = if draft {
            self.skip.clone()
        } else {
            Capture::default()
        };
        let out = llama
            .forward(
                &mut cache,
                &tokens,
                &positions,
                1,
                &Mask::Causal,
                Logits::Last,
                &capture,
            )
            .unwrap();
        self.forwards += 1;
        let w = Rc::new(warp(&logits_row(&out.logits, 0, 0).unwrap(), &self.params));
        let memo = if draft { &mut self.q } else { &mut self.p };
        memo.insert(suffix.to_vec(), w.clone());
        w
    }
}

type DraftFn = fn(&mut Oracle, &[u32], &mut RunRng) -> DraftTree;

/// Layer-skip chain of two drafts, each from the real q.
fn chain_draft(o: &mut Oracle, done: &[u32], rng: &mut RunRng) -> DraftTree {
    let mut nodes = Vec::new();
    let mut ctx = done.to_vec();
    for i in 0..2usize {
        let q = o.dist(&ctx, true);
        let x = q.sample(rng);
        nodes.push(DraftTreeNode {
            token: x,
            parent: i.checked_sub(1),
            q: (*q).clone(),
            kind: DraftKind::Sampled,
        });
        ctx.push(x);
    }
    DraftTree { nodes }
}

/// RSD-style tree: three siblings drawn without replacement from q (the first from q, the others by the chain
/// drafters' own `draw_siblings`), each with one child from q after it.
fn tree_draft(o: &mut Oracle, done: &[u32], rng: &mut RunRng) -> DraftTree {
    let q = o.dist(done, true);
    let first = q.sample(rng);
    let mut nodes: Vec<DraftTreeNode> = std::iter::once((first, (*q).clone()))
        .chain(draw_siblings(&q, first, 2, rng))
        .map(|(token, q)| DraftTreeNode {
            token,
            parent: None,
            q,
            kind: DraftKind::Sampled,
        })
        .collect();
    for parent in 0..nodes.len() {
        let mut ctx = done.to_vec();
        ctx.push(nodes[parent].token);
        let q = o.dist(&ctx, true);
        let x = q.sample(rng);
        nodes.push(DraftTreeNode {
            token: x,
            parent: Some(parent),
            q: (*q).clone(),
            kind: DraftKind::Sampled,
        });
    }
    DraftTree { nodes }
}

/// Prompt lookup's point masses (up to three tokens copied from the context).
fn lookup_draft(o: &mut Oracle, done: &[u32], _rng: &mut RunRng) -> DraftTree {
    let mut ctx = o.prompt.clone();
    ctx.extend_from_slice(done);
    let tokens = prompt_lookup::find_match(&ctx).map_or(&[][..], |(_, from)| {
        prompt_lookup::continuation(&ctx, from, 3)
    });
    DraftTree::point_chain(tokens)
}

/// A tree of point masses like token recycling's: the draft model's top 3 as deterministic siblings.
fn point_tree_draft(o: &mut Oracle, done: &[u32], _rng: &mut RunRng) -> DraftTree {
    let q = o.dist(done, true);
    DraftTree {
        nodes: q
            .support
            .iter()
            .take(3)
            .map(|&(t, _)| DraftTreeNode {
                token: t,
                parent: None,
                q: Warped::point(t),
                kind: DraftKind::Unlabelled,
            })
            .collect(),
    }
}

/// The verifier a lossless run samples with: the real one, or the deliberately broken one the test must catch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    Real,
    Broken,
}

impl Check {
    fn verify(
        self,
        tree: &DraftTree,
        p: &[&Warped],
        params: &SamplingParams,
        rng: &mut RunRng,
    ) -> Option<Verdict> {
        match self {
            Check::Real => verify(tree, p, params, rng),
            Check::Broken => verify_broken_for_tests(tree, p, params, rng),
        }
    }
}

/// The verifier's p: the target after `done`, then after each node's path.
fn target_at_nodes(o: &mut Oracle, done: &[u32], tree: &DraftTree) -> Vec<Rc<Warped>> {
    let mut p = vec![o.dist(done, false)];
    for i in 0..tree.nodes.len() {
        let mut path = vec![tree.nodes[i].token];
        let mut cur = tree.nodes[i].parent;
        while let Some(c) = cur {
            path.push(tree.nodes[c].token);
            cur = tree.nodes[c].parent;
        }
        path.reverse();
        let mut ctx = done.to_vec();
        ctx.extend(path);
        p.push(o.dist(&ctx, false));
    }
    p
}

/// The first two generated tokens of speculative decoding with `draft` and `verify`.
fn first_two(o: &mut Oracle, draft: DraftFn, check: Check, rng: &mut RunRng) -> (u32, u32) {
    let mut out: Vec<u32> = Vec::new();
    while out.len() < 2 {
        let tree = draft(o, &out, rng);
        let p = target_at_nodes(o, &out, &tree);
        let p_refs: Vec<&Warped> = p.iter().map(|w| &**w).collect();
        let v = check.verify(&tree, &p_refs, &o.params, rng).unwrap();
        out.extend(v.accepted_path.iter().map(|&i| tree.nodes[i].token));
        out.push(v.token);
    }
    (out[0], out[1])
}

/// ln Γ (Lanczos), for the chi-square tail.
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 6] = [
        76.180_091_729_471_46,
        -86.505_320_329_416_77,
        24.014_098_240_830_91,
        -1.231_739_572_450_155,
        0.120_865_097_386_617_9e-2,
        -0.539_523_938_495_3e-5,
    ];
    let mut y = x;
    let tmp = x + 5.5;
    let tmp = tmp - (x + 0.5) * tmp.ln();
    let mut ser = 1.000_000_000_190_015;
    for c in C {
        y += 1.0;
        ser += c / y;
    }
    -tmp + (2.506_628_274_631_000_5 * ser / x).ln()
}

/// P(X > x) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, x/2).
fn chi2_sf(x: f64, df: f64) -> f64 {
    let (a, x) = (df / 2.0, x / 2.0);
    if x <= 0.0 {
        return 1.0;
    }
    let gln = ln_gamma(a);
    if x < a + 1.0 {
        let (mut ap, mut sum, mut del) = (a, 1.0 / a, 1.0 / a);
        for _ in 0..1000 {
            ap += 1.0;
            del *= x / ap;
            sum += del;
            if del.abs() < sum.abs() * 1e-14 {
                break;
            }
        }
        1.0 - sum * (-x + a * x.ln() - gln).exp()
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < 1e-14 {
                break;
            }
        }
        (-x + a * x.ln() - gln).exp() * h
    }
}

/// Pearson chi-square p-value of the sampled pairs against the exact p(a) p(b | a). Bins with an expected count
/// under 5 are pooled into one "other" bin.
fn pair_fit(o: &mut Oracle, counts: &BTreeMap<(u32, u32), usize>, n: usize) -> (f64, usize) {
    let n = n as f64;
    let first = o.dist(&[], false);
    let mut expected: BTreeMap<(u32, u32), f64> = BTreeMap::new();
    for &(a, pa) in &first.support {
        if n * f64::from(pa) < 5.0 {
            continue;
        }
        let second = o.dist(&[a], false);
        for &(b, pb) in &second.support {
            let e = n * f64::from(pa) * f64::from(pb);
            if e >= 5.0 {
                expected.insert((a, b), e);
            }
        }
    }
    let (mut stat, mut seen_in_bins) = (0.0, 0.0);
    let expected_in_bins: f64 = expected.values().sum();
    for (pair, &e) in &expected {
        let c = counts.get(pair).copied().unwrap_or(0) as f64;
        seen_in_bins += c;
        stat += (c - e) * (c - e) / e;
    }
    let (c, e) = (n - seen_in_bins, n - expected_in_bins);
    let mut bins = expected.len();
    if e > 1.0 {
        stat += (c - e) * (c - e) / e;
        bins += 1;
    }
    (chi2_sf(stat, (bins - 1) as f64), bins)
}

fn lossless_case(
    name: &str,
    prompt: &str,
    skip: std::ops::Range<usize>,
    draft: DraftFn,
    broken_must_fail: bool,
) {
    let started = std::time::Instant::now();
    let mut oracle = Oracle::new(prompt, skip);
    lossless_fit(
        name,
        &mut oracle,
        started,
        |o, check, rng| first_two(o, draft, check, rng),
        broken_must_fail,
    );
}

/// Samples the first two tokens `LOSSLESS_SAMPLES` times with the real verifier and with the broken one, fits
/// both against the exact p(a) p(b | a) and asserts the first fits and (when asked) the second does not.
/// Returns both p-values.
fn lossless_fit(
    name: &str,
    oracle: &mut Oracle,
    started: std::time::Instant,
    mut sample: impl FnMut(&mut Oracle, Check, &mut RunRng) -> (u32, u32),
    broken_must_fail: bool,
) -> (f64, f64) {
    let setup_s = started.elapsed().as_secs_f64();
    let mut run = |check: Check, seed: u64| {
        let mut rng = rng_from_seed(seed);
        let mut counts: BTreeMap<(u32, u32), usize> = BTreeMap::new();
        for _ in 0..LOSSLESS_SAMPLES {
            *counts.entry(sample(oracle, check, &mut rng)).or_default() += 1;
        }
        pair_fit(oracle, &counts, LOSSLESS_SAMPLES)
    };
    let (good, bins) = run(Check::Real, 12);
    let (bad, _) = run(Check::Broken, 11);
    eprintln!(
        "{name}: p-value {good:.4} ({bins} bins); broken verifier {bad:.2e}; {} forwards ({setup_s:.1} s); {:.1} s",
        oracle.forwards,
        started.elapsed().as_secs_f64()
    );
    assert!(
        good > 1e-3,
        "{name}: the verifier's output does not follow p (p-value {good})"
    );
    if broken_must_fail {
        assert!(
            bad < 1e-6,
            "{name}: the test cannot tell a broken verifier (p-value {bad})"
        );
    }
    (good, bad)
}

#[test]
fn lossless_sampling_layer_skip_chain() {
    lossless_case(
        "layer-skip chain",
        "She opened the door and saw",
        10..20,
        chain_draft,
        true,
    );
}

#[test]
fn lossless_sampling_rsd_tree() {
    lossless_case(
        "RSD tree",
        "She opened the door and saw",
        10..20,
        tree_draft,
        true,
    );
}

#[test]
fn lossless_sampling_point_masses() {
    lossless_case(
        "prompt lookup",
        "The cat sat on the mat. The dog sat on the mat. The cat sat on the",
        10..20,
        lookup_draft,
        true,
    );
    lossless_case(
        "point-mass tree",
        "She opened the door and saw",
        10..20,
        point_tree_draft,
        true,
    );
}
