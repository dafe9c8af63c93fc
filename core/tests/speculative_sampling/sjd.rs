//! SJD: the lookahead drafter itself under sampling, fitted like the verifier's other drafts.

use super::*;

// ------------------------------------------------------------------------------------------------------------
// SJD: the lookahead drafter itself, under sampling. Its window guesses were drawn from the target's distribution
// in the previous iteration, whose context held that iteration's guesses; they carry it as q, so q != p here. Each
// guess off its q's argmax has that argmax as a point-mass sibling, tested after it.

/// The target's logits the lookahead drafter is shown after its verification forwards.
struct SjdRows {
    /// The warm-up step's window: the tokens an empty drafter pads it with, and the tokens whose logits it is
    /// shown instead.
    warm_window: Vec<u32>,
    shown_window: Vec<u32>,
    /// The logits after the prompt minus its last token, then after each token of `shown_window`.
    warm: Vec<Vec<f32>>,
    /// After the prompt.
    prompt: Rc<Vec<f32>>,
    /// After the prompt and one more token: every token the first SJD guess can be, computed up front.
    after: BTreeMap<u32, Rc<Vec<f32>>>,
    /// Sampled window nodes the verifier tested, and how many it rejected, over the runs with both verifiers.
    tested: usize,
    rejected: usize,
    /// Argmax siblings the real verifier tested (after their sampled guess was rejected) at one of the two fitted
    /// positions, and how many it accepted.
    siblings_tested: usize,
    siblings_accepted: usize,
    /// Sum and count of alpha = sum min(p, q) at depth 1 when the first guess was sampled.
    alpha: f64,
    alpha_n: usize,
}

/// Draft length of the SJD test: the window then covers exactly the two tokens tested.
const SJD_DRAFT_LEN: usize = 2;
/// Tokens the SJD test considers for the first token of the window it shows the drafter.
const SJD_CANDIDATES: usize = 256;

/// A draft of the real lookahead drafter on `context`. Lookahead never runs the model while drafting, so the
/// cache (which the interface asks for) is the oracle's, whatever the context.
fn lookahead_draft(la: &mut Lookahead, o: &Oracle, context: &[u32], rng: &mut RunRng) -> DraftTree {
    let params = MethodParams {
        sampling: o.params,
        speculative: SpeculativeParams {
            drafter: "lookahead".into(),
            draft_len: SJD_DRAFT_LEN,
            ..SpeculativeParams::default()
        },
        ..MethodParams::default()
    };
    let cancel = AtomicBool::new(false);
    let mut input = DraftInput {
        llama: &model().llama,
        cache: &o.base,
        context,
        params: &params,
        max_len: SJD_DRAFT_LEN,
        acceptance: 0.5,
        rng,
        cancel: &cancel,
    };
    la.draft(&mut input).unwrap().tree
}

/// The logits after each of `tokens[from..]`, from one causal forward.
fn causal_rows(tokens: &[u32], from: usize) -> Vec<Vec<f32>> {
    let llama = &model().llama;
    let out = llama
        .forward(
            &mut llama.new_cache(),
            tokens,
            &(0..tokens.len()).collect::<Vec<_>>(),
            1,
            &Mask::Causal,
            Logits::All,
            &Capture::default(),
        )
        .unwrap();
    (from..tokens.len())
        .map(|i| logits_row(&out.logits, 0, i).unwrap())
        .collect()
}

impl SjdRows {
    fn new(o: &mut Oracle) -> Self {
        let n = o.prompt.len();
        let before = o.prompt[..n - 1].to_vec();
        // An empty drafter draws nothing: its first window is context tokens.
        let warm_window: Vec<u32> =
            lookahead_draft(&mut Lookahead::default(), o, &before, &mut rng_from_seed(0))
                .nodes
                .iter()
                .map(|node| node.token)
                .collect();
        // Iterating from that padding would give nonsense contexts ("and and") whose q hardly overlaps p, and a
        // broken verifier hides there. The drafter is shown the forward of a likely window instead, the state it
        // is in after an iteration that guessed those tokens there, as it does mid-run: of the model's
        // `SJD_CANDIDATES` favourites at the prompt's last position (the prompt's own token excluded), one whose q
        // the broken verifier gets wrong and whose argmax sibling the real verifier often accepts (the larger the
        // smaller of the two), then the model's favourite after it. The sibling is accepted at depth 1 with
        // probability max(0, p(a) - q(a)), a the argmax of q: the guesses after the model's very favourites are
        // peakier than p there and leave their sibling nothing, so the search goes further down.
        let last = o.prompt[n - 1];
        let at_last = causal_rows(&before, n - 2).remove(0);
        let p0 = o.dist(&[], false);
        let candidates: Vec<u32> = top_n(&at_last, SJD_CANDIDATES + 1)
            .into_iter()
            .filter(|&t| t != last)
            .take(SJD_CANDIDATES)
            .collect();
        let score = |q: &Warped| {
            let sibling = q
                .most_likely()
                .map_or(0.0, |a| f64::from(p0.prob(a) - q.prob(a)).max(0.0));
            broken_error(&p0, q).min(sibling)
        };
        let b = candidates
            .iter()
            .zip(o.instead_of_last(&candidates))
            .map(|(&t, q)| (t, score(&q)))
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .unwrap()
            .0;
        let mut with_b = before.clone();
        with_b.push(b);
        let c = argmax(&causal_rows(&with_b, n - 1)[0]);
        let shown_window = vec![b, c];
        let mut tokens = before.clone();
        tokens.extend_from_slice(&shown_window);
        let warm = causal_rows(&tokens, n - 2);
        let prompt = Rc::new(causal_rows(&o.prompt, n - 1).remove(0));
        o.forwards += 4;
        // The first SJD guess is drawn from the warm-up's distribution after its first window token.
        let firsts: Vec<u32> = warp(&warm[1], &o.params)
            .support
            .iter()
            .map(|&(t, _)| t)
            .collect();
        let after = o.after_each(&firsts, false, true);
        Self {
            warm_window,
            shown_window,
            warm,
            prompt,
            after,
            tested: 0,
            rejected: 0,
            siblings_tested: 0,
            siblings_accepted: 0,
            alpha: 0.0,
            alpha_n: 0,
        }
    }
}

/// Total variation between p and what a verifier that redraws from p after a rejection outputs for a draft from
/// q: min(p, q) + (1 - alpha) p, alpha = sum min(p, q). Zero when q = p and when they are disjoint.
fn broken_error(p: &Warped, q: &Warped) -> f64 {
    let alpha = overlap(p, q);
    let mut tokens: Vec<u32> = p
        .support
        .iter()
        .chain(&q.support)
        .map(|&(t, _)| t)
        .collect();
    tokens.sort_unstable();
    tokens.dedup();
    tokens
        .iter()
        .map(|&t| {
            let (pt, qt) = (f64::from(p.prob(t)), f64::from(q.prob(t)));
            (pt.min(qt) - alpha * pt).abs()
        })
        .sum::<f64>()
        / 2.0
}

/// The first two generated tokens of speculative decoding with the lookahead drafter. A warm-up step on the
/// prompt minus its last token, which committed that token, leaves the drafter with an iteration whose context
/// differed from the prompt's: the first step's window is drawn from it (q = p after the warm-up's guesses), the
/// second step's from the first step's forward (q = p after the first step's guess, where that was rejected).
fn first_two_sjd(o: &mut Oracle, rows: &mut SjdRows, check: Check, rng: &mut RunRng) -> (u32, u32) {
    let n = o.prompt.len();
    let mut la = Lookahead::default();
    let before = o.prompt[..n - 1].to_vec();
    let warm = lookahead_draft(&mut la, o, &before, rng);
    assert_eq!(
        warm.nodes.iter().map(|node| node.token).collect::<Vec<_>>(),
        rows.warm_window
    );
    let mut fed = vec![o.prompt[n - 2]];
    fed.extend_from_slice(&rows.shown_window);
    la.observe(&Observation {
        tokens: &fed,
        logits: &rows.warm,
        accepted_path: &[],
        sampling: &o.params,
        p: &[],
        root_states: &[],
    })
    .unwrap();
    let mut out: Vec<u32> = Vec::new();
    while out.len() < 2 {
        let mut context = o.prompt.clone();
        context.extend_from_slice(&out);
        let tree = lookahead_draft(&mut la, o, &context, rng);
        let p = target_at_nodes(o, &out, &tree);
        let p_refs: Vec<&Warped> = p.iter().map(|w| &**w).collect();
        let v = check.verify(&tree, &p_refs, &o.params, rng).unwrap();
        for (i, node) in tree.nodes.iter().enumerate() {
            let rejected = v.rejected.contains(&i);
            let accepted = v.accepted_path.contains(&i);
            match node.kind {
                DraftKind::Sampled => {
                    rows.tested += usize::from(rejected || accepted);
                    rows.rejected += usize::from(rejected);
                }
                // Siblings whose test decided one of the two tokens fitted (deeper ones meet a placeholder p).
                DraftKind::ArgmaxSibling
                    if check == Check::Real && out.len() + tree.depth(i) <= 2 =>
                {
                    rows.siblings_tested += usize::from(rejected || accepted);
                    rows.siblings_accepted += usize::from(accepted);
                }
                _ => {}
            }
        }
        if tree
            .nodes
            .first()
            .is_some_and(|node| node.kind == DraftKind::Sampled)
            && let Some(&a) = v.alpha.first()
        {
            rows.alpha += f64::from(a);
            rows.alpha_n += 1;
        }
        let root = *context.last().unwrap();
        out.extend(v.accepted_path.iter().map(|&i| tree.nodes[i].token));
        out.push(v.token);
        if out.len() < 2 {
            // Only the first step gets here (it committed one token): show the drafter its forward. Rows past
            // depth 1 would only decide the third token, so the prompt's row stands in for them.
            let mut fed = vec![root];
            let mut logits = vec![(*rows.prompt).clone()];
            for node in &tree.nodes {
                fed.push(node.token);
                let row = if node.parent.is_none() {
                    match rows.after.get(&node.token) {
                        Some(row) => row.clone(),
                        None => o
                            .after_each(&[node.token], false, true)
                            .remove(&node.token)
                            .unwrap(),
                    }
                } else {
                    rows.prompt.clone()
                };
                logits.push((*row).clone());
            }
            la.observe(&Observation {
                tokens: &fed,
                logits: &logits,
                accepted_path: &v.accepted_path,
                sampling: &o.params,
                p: &[],
                root_states: &[],
            })
            .unwrap();
        }
    }
    (out[0], out[1])
}

#[test]
fn lossless_sampling_sjd_lookahead() {
    let started = std::time::Instant::now();
    let mut oracle = Oracle::target_only("She opened the door and saw");
    let mut rows = SjdRows::new(&mut oracle);
    let support = rows.after.len();
    let window: Vec<String> = rows
        .shown_window
        .iter()
        .map(|&t| model().tokenizer.token_text(t))
        .collect();
    lossless_fit(
        "SJD lookahead",
        &mut oracle,
        started,
        |o, check, rng| first_two_sjd(o, &mut rows, check, rng),
        true,
    );
    let steps = 2 * LOSSLESS_SAMPLES;
    eprintln!(
        "SJD lookahead: {} sampled window guesses tested, {} rejected ({:.2}); argmax siblings: {} tested, {} \
         accepted (real verifier); first guess supported on {support} tokens; mean alpha at depth 1 {:.3}; warm-up \
         window shown {window:?}",
        rows.tested,
        rows.rejected,
        rows.rejected as f64 / rows.tested as f64,
        rows.siblings_tested,
        rows.siblings_accepted,
        rows.alpha / rows.alpha_n.max(1) as f64
    );
    // Every first step tests a sampled guess whose q came from another context (q != p), and many are rejected.
    assert!(
        rows.tested >= steps,
        "only {} SJD guesses tested",
        rows.tested
    );
    assert!(
        rows.rejected as f64 >= 0.1 * rows.tested as f64,
        "SJD guesses were hardly ever rejected ({} of {}): q and p barely differ, the test proves little",
        rows.rejected,
        rows.tested
    );
    // The argmax siblings take part: the fit covers outputs where a sibling, tested with its own point-mass q
    // against the residual its guess left, was accepted.
    assert!(
        rows.siblings_accepted >= 30,
        "argmax siblings were accepted {} times of {} tested: the fit hardly covers them",
        rows.siblings_accepted,
        rows.siblings_tested
    );
}
