//! The synthetic speculative trace of the GUI tests: the header of assets/traces/greedy.jsonl with method
//! "speculative", a first step with a two-branch draft tree and a rejection (residual distribution), a second
//! step whose drafts are all accepted (bonus token), then ten chain steps with varied acceptance.

use std::path::Path;

use specula_core::trace::{
    Candidate, DraftKind, DraftNode, DraftStatus, Rejection, RunSummary, SpeculativeStep,
    StepPayload, StepRecord, StepTiming, StopReason, TokenRecord, TokenSource, Trace,
};

fn trace_path(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/traces")
        .join(name)
}

fn cand(id: u32, token: &str, p: f32) -> Candidate {
    Candidate {
        id,
        token: token.into(),
        logprob: p.ln(),
        warped_prob: Some(p),
    }
}

fn token(id: u32, text: &str, p: f32, source: TokenSource) -> TokenRecord {
    TokenRecord {
        id,
        token: text.into(),
        position: 0,
        logprob: p.ln(),
        rank: 0,
        entropy: 1.0 - p,
        sampling_prob: Some(p),
        warped_kept: Some(40),
        top_logprobs: vec![cand(id, text, p), cand(id + 1, " other", (1.0 - p) / 2.0)],
        source,
    }
}

fn node(
    token: &str,
    parent: Option<usize>,
    depth: usize,
    q: f32,
    p: Option<f32>,
    status: DraftStatus,
) -> DraftNode {
    DraftNode {
        id: 100 + depth as u32,
        token: token.into(),
        parent,
        depth,
        q,
        p,
        residual: None,
        status,
        kind: DraftKind::Unlabelled,
    }
}

fn step(
    nodes: Vec<DraftNode>,
    accepted_path: Vec<usize>,
    rejection: Rejection,
    alpha: Vec<f32>,
    tokens: Vec<TokenRecord>,
) -> StepRecord {
    let draft_n = nodes.len();
    let draft_n_accepted = accepted_path.len();
    StepRecord {
        index: 0,
        tokens,
        target_forward_calls: 1,
        draft_forward_calls: draft_n as u32,
        prefill_tokens: 0,
        draft_n,
        draft_n_accepted,
        param_changes: Vec::new(),
        rollback: None,
        payload: Some(StepPayload::Speculative(Box::new(SpeculativeStep {
            drafter: "layer-skip".into(),
            verifier: "sampling".into(),
            draft_len: 4,
            nodes,
            accepted_path,
            rejection: Some(rejection),
            alpha,
            note: "skipped layers 8–23 of 30".into(),
            exit_layers: None,
        }))),
        inspection: Vec::new(),
        timing: Some(StepTiming {
            total_ms: 30.0 + draft_n as f64 * 4.0,
            draft_ms: draft_n as f64 * 4.0,
            verify_ms: 30.0,
        }),
    }
}

/// A chain of four drafts of which the first `k` are accepted (all four: a bonus token).
fn chain_step(words: &[&str; 5], k: usize, seed: usize) -> StepRecord {
    use DraftStatus::{Accepted, Rejected, Unverified};
    let mut nodes = Vec::new();
    for (d, w) in words[..4].iter().enumerate() {
        let q = 0.5 + 0.1 * ((seed + d) % 4) as f32;
        let (p, status) = match d.cmp(&k) {
            std::cmp::Ordering::Less => (Some(q.min(0.95) + 0.03), Accepted),
            std::cmp::Ordering::Equal => (Some(q * 0.3), Rejected),
            std::cmp::Ordering::Greater => (None, Unverified),
        };
        nodes.push(node(w, d.checked_sub(1), d + 1, q, p, status));
    }
    let bonus = k == 4;
    let own = if bonus { words[4] } else { " and" };
    let rejection = Rejection {
        depth: k + 1,
        bonus,
        distribution: vec![
            cand(900, own, 0.55),
            cand(901, " so", 0.25),
            cand(902, " then", 0.12),
        ],
        token_id: 900,
    };
    let mut tokens: Vec<TokenRecord> = words[..k]
        .iter()
        .map(|w| token(500, w, 0.8, TokenSource::DraftAccepted))
        .collect();
    let source = if bonus {
        TokenSource::Bonus
    } else {
        TokenSource::Corrected
    };
    tokens.push(token(900, own, 0.55, source));
    let alpha = (0..=k.min(3))
        .map(|d| 0.9 - 0.12 * d as f32 - 0.05 * (seed % 3) as f32)
        .collect();
    step(nodes, (0..k).collect(), rejection, alpha, tokens)
}

pub fn speculative_trace() -> Trace {
    use DraftStatus::{Accepted, Rejected, Unverified};
    let mut header = Trace::load(&trace_path("greedy.jsonl"))
        .unwrap()
        .remove(0)
        .header;
    header.method = "speculative".into();
    header.label = "speculative (layer-skip)".into();
    header.params.sampling = specula_core::SamplingParams::default();
    header.params.speculative.drafter = "layer-skip".into();
    // Step 1: a two-branch tree; ' The' accepted, both depth-2 drafts rejected, ' color' drawn from the residual.
    let first = step(
        vec![
            node(" The", None, 1, 0.81, Some(0.92), Accepted),
            node(" sky", Some(0), 2, 0.62, Some(0.31), Rejected),
            node(" blue", Some(1), 3, 0.55, None, Unverified),
            node(" air", Some(0), 2, 0.20, Some(0.05), Rejected),
        ],
        vec![0],
        Rejection {
            depth: 2,
            bonus: false,
            distribution: vec![
                cand(3240, " color", 0.45),
                cand(3241, " light", 0.30),
                cand(3242, " sun", 0.15),
                cand(3243, " reason", 0.10),
            ],
            token_id: 3240,
        },
        vec![0.88, 0.52],
        vec![
            token(101, " The", 0.92, TokenSource::DraftAccepted),
            token(3240, " color", 0.45, TokenSource::Corrected),
        ],
    );
    // Step 2: every draft accepted, the bonus ' is' drawn from p.
    let second = chain_step(&[" of", " the", " sky", " during", " is"], 4, 1);
    let mut steps = vec![first, second];
    for (i, k) in [2, 0, 3, 1, 4, 2, 0, 3, 4, 1].into_iter().enumerate() {
        steps.push(chain_step(
            &[" the", " day", " comes", " from", " light"],
            k,
            i,
        ));
    }
    for (i, s) in steps.iter_mut().enumerate() {
        s.index = i;
    }
    steps[0].prefill_tokens = header.prompt.token_ids.len();
    let mut trace = Trace::new(header);
    trace.steps = steps;
    let text = trace.text();
    trace.summary = Some(RunSummary::from_steps(
        &trace.steps,
        StopReason::MaxTokens,
        None,
        text,
    ));
    trace
}
