//! Speculative decoding as the panels need it, with no egui: the payload of a step, the run's acceptance
//! figures, the draft tree's layout and the plain-words explanation of each verdict.

use specula_core::trace::{
    DraftKind, DraftStatus, SpeculativeStep, StepRecord, TokenSource, Trace,
};

use super::panels::tokens::display_text;

/// The draft-and-verify record of a step, if the step has one.
pub fn payload(step: &StepRecord) -> Option<&SpeculativeStep> {
    match &step.payload {
        Some(specula_core::trace::StepPayload::Speculative(s)) => Some(s),
        _ => None,
    }
}

/// True when any step of the run drafted (a payload, a draft count or a draft-made token).
pub fn is_speculative(trace: &Trace) -> bool {
    trace.header.method == "speculative"
        || trace.steps.iter().any(|s| {
            payload(s).is_some()
                || s.draft_n > 0
                || s.tokens.iter().any(|t| {
                    matches!(
                        t.source,
                        TokenSource::DraftAccepted | TokenSource::Corrected | TokenSource::Bonus
                    )
                })
        })
}

/// A token as the panels quote it: `' the'`, newlines and tabs made visible.
pub fn quote(token: &str) -> String {
    format!("'{}'", display_text(token))
}

/// Mean alpha over the depths of a step (None when the step has no alpha).
pub fn mean_alpha(step: &StepRecord) -> Option<f64> {
    let alpha = &payload(step)?.alpha;
    (!alpha.is_empty())
        .then(|| alpha.iter().map(|a| f64::from(*a)).sum::<f64>() / alpha.len() as f64)
}

/// The acceptance figures of the steps so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecStats {
    pub steps: usize,
    pub generated: usize,
    pub draft_n: usize,
    pub draft_n_accepted: usize,
    pub target_forward_calls: u64,
    pub draft_forward_calls: u64,
    /// Steps that ended with a rejection (a corrected token) or with every draft accepted (a bonus token).
    pub rejections: usize,
    pub bonuses: usize,
    /// `histogram[n]` = steps that committed n tokens.
    pub histogram: Vec<u64>,
    pub draft_ms: f64,
    pub verify_ms: f64,
    pub has_timing: bool,
}

impl SpecStats {
    pub fn of(steps: &[StepRecord]) -> Self {
        let mut s = Self {
            steps: steps.len(),
            ..Self::default()
        };
        for step in steps {
            s.generated += step.tokens.len();
            s.draft_n += step.draft_n;
            s.draft_n_accepted += step.draft_n_accepted;
            s.target_forward_calls += u64::from(step.target_forward_calls);
            s.draft_forward_calls += u64::from(step.draft_forward_calls);
            match payload(step)
                .filter(|p| !p.nodes.is_empty())
                .and_then(|p| p.rejection.as_ref())
            {
                Some(r) if r.bonus => s.bonuses += 1,
                Some(_) => s.rejections += 1,
                None => {}
            }
            let n = step.tokens.len();
            if s.histogram.len() <= n {
                s.histogram.resize(n + 1, 0);
            }
            s.histogram[n] += 1;
            if let Some(t) = step.timing {
                s.has_timing = true;
                s.draft_ms += t.draft_ms;
                s.verify_ms += t.verify_ms;
            }
        }
        s
    }

    /// Accepted drafts over drafted tokens (None before anything was drafted).
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.draft_n > 0).then(|| self.draft_n_accepted as f64 / self.draft_n as f64)
    }

    /// Mean accepted tokens per target forward pass (MAT): generated tokens over target forward calls.
    pub fn mat(&self) -> Option<f64> {
        (self.target_forward_calls > 0)
            .then(|| self.generated as f64 / self.target_forward_calls as f64)
    }
}

/// Running MAT after each step: tokens so far over target forward calls so far.
pub fn running_mat(steps: &[StepRecord]) -> Vec<f64> {
    let (mut tokens, mut calls) = (0usize, 0u64);
    steps
        .iter()
        .map(|s| {
            tokens += s.tokens.len();
            calls += u64::from(s.target_forward_calls);
            if calls == 0 {
                0.0
            } else {
                tokens as f64 / calls as f64
            }
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------------------
// The draft tree

/// What the user can pick in the draft tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreePick {
    Node(usize),
    /// The verifier's own token: the corrected token after a rejection, or the bonus token.
    Verifier,
}

/// A slot of the laid-out tree: column = depth (0 is the committed text), row = leaf order (a parent sits
/// midway between its first and last child).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slot {
    pub column: usize,
    pub row: f32,
}

/// The tree's layout: the root, each node in `nodes` order, and the verifier's token when there is one.
#[derive(Clone, Debug, PartialEq)]
pub struct TreeLayout {
    pub root: Slot,
    pub nodes: Vec<Slot>,
    pub verifier: Option<Slot>,
    /// Parent slot of each node and of the verifier token: `None` = the root.
    pub node_parents: Vec<Option<usize>>,
    pub verifier_parent: Option<usize>,
    pub rows: usize,
    pub columns: usize,
}

/// Lays out the tree: x = depth, y = sibling order, each parent centred on its children. The verifier's token
/// hangs off the last accepted node (or the root), after the drafts at that position. A parent index that does
/// not come before its node is treated as the root, so a malformed payload cannot loop.
pub fn layout(step: &SpeculativeStep) -> TreeLayout {
    let n = step.nodes.len();
    let node_parents: Vec<Option<usize>> = step
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| node.parent.filter(|&p| p < i))
        .collect();
    let verifier_parent = step.accepted_path.last().copied().filter(|&p| p < n);
    let has_verifier = step.rejection.is_some();
    // Ids: 0 = root, 1..=n = nodes, n + 1 = verifier.
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n + 2];
    for (i, parent) in node_parents.iter().enumerate() {
        children[parent.map_or(0, |p| p + 1)].push(i + 1);
    }
    if has_verifier {
        children[verifier_parent.map_or(0, |p| p + 1)].push(n + 1);
    }
    let mut slots = vec![
        Slot {
            column: 0,
            row: 0.0
        };
        n + 2
    ];
    let mut next_row = 0usize;
    // Iterative post-order walk: (id, depth, children visited).
    let mut stack: Vec<(usize, usize, bool)> = vec![(0, 0, false)];
    while let Some((id, depth, done)) = stack.pop() {
        let kids = &children[id];
        if kids.is_empty() {
            slots[id] = Slot {
                column: depth,
                row: next_row as f32,
            };
            next_row += 1;
        } else if done {
            let first = slots[kids[0]].row;
            let last = slots[kids[kids.len() - 1]].row;
            slots[id] = Slot {
                column: depth,
                row: (first + last) / 2.0,
            };
        } else {
            stack.push((id, depth, true));
            stack.extend(kids.iter().rev().map(|&k| (k, depth + 1, false)));
        }
    }
    let columns = slots.iter().map(|s| s.column).max().unwrap_or(0) + 1;
    TreeLayout {
        root: slots[0],
        nodes: slots[1..=n].to_vec(),
        verifier: has_verifier.then(|| slots[n + 1]),
        node_parents,
        verifier_parent,
        rows: next_row.max(1),
        columns,
    }
}

/// The text of the verifier's token: the step's corrected or bonus token, else the distribution's entry.
pub fn verifier_token(step: &StepRecord, spec: &SpeculativeStep) -> Option<String> {
    let rejection = spec.rejection.as_ref()?;
    step.tokens
        .iter()
        .rev()
        .find(|t| t.id == rejection.token_id)
        .map(|t| t.token.clone())
        .or_else(|| {
            rejection
                .distribution
                .iter()
                .find(|c| c.id == rejection.token_id)
                .map(|c| c.token.clone())
        })
}

/// True when the pick was drawn from `rejection.distribution` (the rejected draft at the verifier's position,
/// or the verifier's token itself).
pub fn shows_distribution(spec: &SpeculativeStep, pick: TreePick) -> bool {
    let Some(rejection) = &spec.rejection else {
        return false;
    };
    match pick {
        TreePick::Verifier => true,
        TreePick::Node(i) => spec.nodes.get(i).is_some_and(|n| {
            !rejection.bonus && n.status == DraftStatus::Rejected && n.depth == rejection.depth
        }),
    }
}

/// One sentence for a classroom: what the target and the drafter thought of the pick, and what the verifier
/// did with it.
pub fn explain(step: &StepRecord, spec: &SpeculativeStep, pick: TreePick) -> String {
    let greedy = spec.verifier == "greedy";
    let replacement = verifier_token(step, spec).map(|t| quote(&t));
    let rejection = spec.rejection.as_ref();
    match pick {
        TreePick::Verifier => {
            let token = replacement.unwrap_or_else(|| "a token".to_owned());
            match rejection {
                Some(_) if spec.nodes.is_empty() => format!(
                    "The drafter proposed nothing at this step, so the target chose {token} alone, from its \
                     own distribution p."
                ),
                Some(r) if r.bonus => format!(
                    "Every draft was accepted, so the target's distribution at the next position (depth {}) came \
                     for free: the verifier drew the bonus token {token} from p.",
                    r.depth
                ),
                Some(r) if greedy => format!(
                    "The draft at depth {} was not the target's most likely token, so the verifier took the \
                     target's own choice, {token}.",
                    r.depth
                ),
                Some(r) => format!(
                    "After rejecting the draft at depth {}, the verifier drew {token} from the residual \
                     norm(max(0, p − q)): what the target wanted more than the drafter.",
                    r.depth
                ),
                None => "The verifier drew no token of its own in this step.".to_owned(),
            }
        }
        TreePick::Node(i) => {
            let Some(node) = spec.nodes.get(i) else {
                return String::new();
            };
            let token = quote(&node.token);
            let q = node.q;
            let p = node.p;
            // Where the drafter says how it proposed the node, say it first: it tells which q the test used.
            let how = match node.kind {
                DraftKind::Sampled => format!("The drafter sampled {token} from its q. "),
                DraftKind::ArgmaxSibling => format!(
                    "{token} is the most likely token of the q its sampled sibling was drawn from, proposed \
                     after that sibling as a point mass (q = 1). "
                ),
                DraftKind::Unlabelled => String::new(),
            };
            let why = match (node.status, p) {
                (DraftStatus::Unverified, _) | (_, None) => format!(
                    "The drafter proposed {token} (q = {q:.2}) at depth {}, but it was never checked: the \
                     verifier had already decided the step at an earlier position or sibling.",
                    node.depth
                ),
                (status, Some(p)) => {
                    let accepted = status == DraftStatus::Accepted;
                    let verdict = if greedy {
                        if accepted {
                            format!(
                                "the target gave {token} p = {p:.2}, its most likely token here — accepted"
                            )
                        } else {
                            format!(
                                "the target gave {token} p = {p:.2}, not its most likely token — rejected"
                            )
                        }
                    } else if let Some(r) = node.residual {
                        format!(
                            "the target gave {token} p = {p:.2}, but it was tested after an earlier sibling was \
                             rejected, against the residual norm(max(0, p − q)) that left it {r:.2}; the drafter \
                             q = {q:.2}: accepted with probability {:.2} — {}",
                            (r / q).min(1.0),
                            if accepted { "accepted" } else { "rejected" }
                        )
                    } else if p >= q {
                        format!(
                            "the target gave {token} p = {p:.2}, the drafter q = {q:.2}: p ≥ q, so it is always \
                             accepted — {}",
                            if accepted { "accepted" } else { "rejected" }
                        )
                    } else {
                        format!(
                            "the target gave {token} p = {p:.2}, the drafter q = {q:.2}: accepted with \
                             probability p/q = {:.2} — {}",
                            p / q,
                            if accepted { "accepted" } else { "rejected" }
                        )
                    };
                    let tail = match rejection {
                        _ if accepted => String::new(),
                        Some(r) if !r.bonus && r.depth == node.depth && greedy => format!(
                            "; the target's own choice{} replaced it",
                            replacement.map(|t| format!(" {t}")).unwrap_or_default()
                        ),
                        Some(r) if !r.bonus && r.depth == node.depth => format!(
                            "; the replacement{} was drawn from what the target wanted more than the drafter",
                            replacement.map(|t| format!(" {t}")).unwrap_or_default()
                        ),
                        _ => "; the verifier went on with another branch".to_owned(),
                    };
                    let mut s = verdict + &tail + ".";
                    if let Some(first) = s.get(0..1) {
                        s = first.to_uppercase() + &s[1..];
                    }
                    s
                }
            };
            how + &why
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use specula_core::trace::DraftNode;

    fn node(parent: Option<usize>, depth: usize, status: DraftStatus) -> DraftNode {
        DraftNode {
            id: 1,
            token: "x".into(),
            parent,
            depth,
            q: 0.5,
            p: Some(0.25),
            residual: None,
            status,
            kind: DraftKind::Unlabelled,
        }
    }

    #[test]
    fn parents_sit_between_their_children_and_the_verifier_follows_the_accepted_path() {
        let spec = SpeculativeStep {
            drafter: "d".into(),
            verifier: "sampling".into(),
            draft_len: 2,
            nodes: vec![
                node(None, 1, DraftStatus::Accepted),
                node(Some(0), 2, DraftStatus::Rejected),
                node(Some(0), 2, DraftStatus::Rejected),
            ],
            accepted_path: vec![0],
            rejection: Some(specula_core::trace::Rejection {
                depth: 2,
                bonus: false,
                distribution: Vec::new(),
                token_id: 3,
            }),
            alpha: vec![],
            note: String::new(),
            exit_layers: None,
        };
        let l = layout(&spec);
        assert_eq!(
            l.nodes[1],
            Slot {
                column: 2,
                row: 0.0
            }
        );
        assert_eq!(
            l.nodes[2],
            Slot {
                column: 2,
                row: 1.0
            }
        );
        assert_eq!(
            l.verifier,
            Some(Slot {
                column: 2,
                row: 2.0
            })
        );
        assert_eq!(
            l.nodes[0],
            Slot {
                column: 1,
                row: 1.0
            }
        );
        assert_eq!(
            l.root,
            Slot {
                column: 0,
                row: 1.0
            }
        );
        assert_eq!((l.rows, l.columns), (3, 3));
        assert!(shows_distribution(&spec, TreePick::Node(1)));
        assert!(!shows_distribution(&spec, TreePick::Node(0)));
    }

    #[test]
    fn an_argmax_sibling_is_explained_with_the_residual_it_met() {
        let guess = DraftNode {
            q: 0.4,
            kind: DraftKind::Sampled,
            ..node(None, 1, DraftStatus::Rejected)
        };
        let sibling = DraftNode {
            token: "y".into(),
            q: 1.0,
            p: Some(0.6),
            residual: Some(0.5),
            kind: DraftKind::ArgmaxSibling,
            ..node(None, 1, DraftStatus::Accepted)
        };
        let spec = SpeculativeStep {
            drafter: "lookahead".into(),
            verifier: "sampling".into(),
            draft_len: 1,
            nodes: vec![guess, sibling],
            accepted_path: vec![1],
            rejection: Some(specula_core::trace::Rejection {
                depth: 2,
                bonus: true,
                distribution: Vec::new(),
                token_id: 3,
            }),
            alpha: vec![0.8],
            note: String::new(),
            exit_layers: None,
        };
        let step = specula_core::methods::empty_step();
        assert!(
            explain(&step, &spec, TreePick::Node(0))
                .starts_with("The drafter sampled 'x' from its q. ")
        );
        let text = explain(&step, &spec, TreePick::Node(1));
        assert!(
            text.starts_with(
                "'y' is the most likely token of the q its sampled sibling was drawn from"
            ),
            "{text}"
        );
        assert!(
            text.contains("that left it 0.50; the drafter q = 1.00: accepted with probability 0.50 — accepted."),
            "{text}"
        );
    }
}
