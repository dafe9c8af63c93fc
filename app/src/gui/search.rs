//! The search and inspection payloads as the panels need them, with no egui: which step carries what, the
//! momentum token graph and its circuits, the inspections visible at a step.

use std::collections::BTreeMap;

use specula_core::trace::{
    BeamStep, CadStep, ContrastiveStep, EntropyAdaptiveStep, Inspection, MomentumStep, StepPayload,
    StepRecord, Trace,
};

pub fn beams(step: &StepRecord) -> Option<&BeamStep> {
    match &step.payload {
        Some(StepPayload::Beams(b)) => Some(b),
        _ => None,
    }
}

pub fn contrastive(step: &StepRecord) -> Option<&ContrastiveStep> {
    match &step.payload {
        Some(StepPayload::Contrastive(c)) => Some(c),
        _ => None,
    }
}

pub fn momentum(step: &StepRecord) -> Option<&MomentumStep> {
    match &step.payload {
        Some(StepPayload::Momentum(m)) => Some(m),
        _ => None,
    }
}

pub fn cad(step: &StepRecord) -> Option<&CadStep> {
    match &step.payload {
        Some(StepPayload::Cad(c)) => Some(c),
        _ => None,
    }
}

pub fn entropy_adaptive(step: &StepRecord) -> Option<&EntropyAdaptiveStep> {
    match &step.payload {
        Some(StepPayload::EntropyAdaptive(e)) => Some(e),
        _ => None,
    }
}

/// The text of every position (prompt, then the output as it stood after `step`), for labelling keys and
/// columns by absolute position.
pub fn position_texts(trace: &Trace, step: usize) -> Vec<String> {
    let mut texts = trace.header.prompt.tokens.clone();
    texts.extend(
        super::store::output_at(trace, step)
            .into_iter()
            .map(|t| t.token.token.clone()),
    );
    texts
}

/// The inspections recorded up to `step`, one per position (a later one wins after a rollback), limited to the
/// positions of the output as it stood after `step`.
pub fn inspections_at(trace: &Trace, step: usize) -> BTreeMap<usize, &Inspection> {
    let end = trace.header.prompt.token_ids.len() + super::store::output_at(trace, step).len();
    let mut map = BTreeMap::new();
    for s in trace.steps.iter().take(step + 1) {
        for i in &s.inspection {
            map.insert(i.position, i);
        }
    }
    map.retain(|&p, _| p < end);
    map
}

/// True when any step recorded the lens (or attention).
pub fn has_lens(trace: &Trace) -> bool {
    trace
        .steps
        .iter()
        .any(|s| s.inspection.iter().any(|i| !i.lens.is_empty()))
}

pub fn has_attention(trace: &Trace) -> bool {
    trace
        .steps
        .iter()
        .any(|s| s.inspection.iter().any(|i| i.attention_map.is_some()))
}

/// Momentum decoding's view of the text: a walk on a graph of tokens. `nodes` are the distinct token ids in order
/// of first appearance, `edges` every transition with how often the text took it, `circuits` the n-grams (n ≥ 2)
/// the text repeats, longest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenGraph {
    pub nodes: Vec<u32>,
    /// (from, to) node indices → times taken.
    pub edges: BTreeMap<(usize, usize), usize>,
    pub circuits: Vec<Circuit>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Circuit {
    pub ids: Vec<u32>,
    pub count: usize,
}

/// Longest repeated n-gram listed (momentum decoding looks up to 5).
const MAX_CIRCUIT: usize = 5;

impl TokenGraph {
    pub fn of(text: &[u32]) -> Self {
        let mut g = TokenGraph::default();
        let mut index: BTreeMap<u32, usize> = BTreeMap::new();
        for &id in text {
            index.entry(id).or_insert_with(|| {
                g.nodes.push(id);
                g.nodes.len() - 1
            });
        }
        for w in text.windows(2) {
            if let (Some(&a), Some(&b)) = (index.get(&w[0]), index.get(&w[1])) {
                *g.edges.entry((a, b)).or_default() += 1;
            }
        }
        let mut counts: BTreeMap<Vec<u32>, usize> = BTreeMap::new();
        for n in 2..=MAX_CIRCUIT {
            for w in text.windows(n) {
                *counts.entry(w.to_vec()).or_default() += 1;
            }
        }
        let mut circuits: Vec<Circuit> = counts
            .into_iter()
            .filter(|(_, c)| *c >= 2)
            .map(|(ids, count)| Circuit { ids, count })
            .collect();
        // A repeated n-gram makes each of its sub-grams repeat too; list only those not inside a longer one
        // that repeats as often.
        let kept: Vec<Circuit> = circuits
            .iter()
            .filter(|c| {
                !circuits.iter().any(|o| {
                    o.ids.len() > c.ids.len()
                        && o.count >= c.count
                        && o.ids.windows(c.ids.len()).any(|w| w == c.ids.as_slice())
                })
            })
            .cloned()
            .collect();
        circuits = kept;
        circuits.sort_by(|a, b| {
            b.ids
                .len()
                .cmp(&a.ids.len())
                .then(b.count.cmp(&a.count))
                .then(a.ids.cmp(&b.ids))
        });
        g.circuits = circuits;
        g
    }

    pub fn node_of(&self, id: u32) -> Option<usize> {
        self.nodes.iter().position(|&n| n == id)
    }

    /// True when the transition a → b belongs to a repeated n-gram.
    pub fn in_circuit(&self, a: u32, b: u32) -> bool {
        self.circuits
            .iter()
            .any(|c| c.ids.windows(2).any(|w| w[0] == a && w[1] == b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_counts_transitions_and_finds_the_longest_repeats() {
        let g = TokenGraph::of(&[1, 2, 3, 4, 1, 2, 3, 5]);
        assert_eq!(g.nodes, vec![1, 2, 3, 4, 5]);
        assert_eq!(g.edges.get(&(0, 1)), Some(&2));
        assert_eq!(g.circuits.len(), 1, "{:?}", g.circuits);
        assert_eq!(g.circuits[0].ids, vec![1, 2, 3]);
        assert!(g.in_circuit(2, 3));
        assert!(!g.in_circuit(3, 4));
    }
}
