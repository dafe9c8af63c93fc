//! Method-specific step data: the story behind a step's committed tokens (draft trees, beams, candidates).

use serde::{Deserialize, Serialize};

use super::{AttentionMap, Candidate};

/// What a drafter proposed and what the verifier made of it, in one step. The step's `tokens` are the committed
/// result (accepted drafts, then the corrected or bonus token); this is the story behind them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeculativeStep {
    /// The drafter's name, as `--drafter` takes it ("prompt-lookup", "layer-skip", ...).
    pub drafter: String,
    /// "greedy" (accept while the draft is the target's argmax) or "sampling" (lossless rejection sampling).
    pub verifier: String,
    /// Draft length asked for this step (the adaptive policy may stop earlier).
    pub draft_len: usize,
    /// The draft tree in the order it was fed to the target; a chain is a tree whose nodes each have the
    /// previous one as parent. `parent: None` hangs off the last committed token.
    pub nodes: Vec<DraftNode>,
    /// Indices into `nodes` of the accepted path, root first.
    pub accepted_path: Vec<usize>,
    /// The verifier's draw after the last accepted node: from the residual at a rejection, or the bonus token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<Rejection>,
    /// Per depth along the verified path: alpha = sum over tokens of min(p, q), the probability that a draft
    /// drawn from q is accepted at that position.
    #[serde(default)]
    pub alpha: Vec<f32>,
    /// Drafter-specific notes shown in the panel (the skipped layers, the matched n-gram, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// The early-exit drafter: its acceptance estimate for every candidate exit and the exit it drafted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_layers: Option<ExitLayers>,
}

/// DEL's view before an early-exit draft: for each candidate exit, the acceptance its drafts would have, estimated
/// from "shadow tokens" (the final norm and LM head applied to that layer's hidden state of the verified roots of
/// earlier steps), and the draft length that maximises expected tokens per unit of cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitLayers {
    /// One per candidate exit, shallowest first.
    pub exits: Vec<ExitEstimate>,
    /// Layers the draft ran before its exit.
    pub chosen: usize,
    /// True when `chosen` (and the draft length) maximised expected tokens per unit of cost; false when the exit
    /// was fixed (`--skip-layers`).
    pub dynamic: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitEstimate {
    /// Layers run before this exit (the drafter exits after layer `layers - 1`, counting from 0).
    pub layers: usize,
    /// Estimated acceptance of a draft token from this exit.
    pub acceptance: f32,
    /// The weight behind `acceptance`: 1 for the prior at the start, then each shadow token adds 1 as older
    /// weight decays.
    pub samples: f32,
    /// The previous step's shadow token at this exit, the newest observation in `acceptance`: 1 or 0 when
    /// greedy (did this exit's top token equal the target's?), sum min(p, q) when sampling. `None` when that
    /// step did not observe this exit (exits take turns) or its root was not verified (the first step, whose
    /// root the prefill fed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<f32>,
    /// The draft length (0 = none) that maximises expected tokens per unit of cost from this exit.
    pub best_len: usize,
    /// Expected tokens per unit of cost (one plain step = 1) at `best_len`.
    pub tokens_per_cost: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DraftNode {
    pub id: u32,
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<usize>,
    /// 1 for the first drafted token after the committed text.
    pub depth: usize,
    /// The drafter's probability of this token (1 for point-mass drafters such as n-gram lookup).
    pub q: f32,
    /// The target's (warped) probability of this token at this position, once verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p: Option<f32>,
    /// Sampling, for a node tested after an earlier sibling was rejected: its probability under the residual
    /// norm(max(0, p - q)) those rejections left, which its test min(1, residual / q) used in place of `p`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual: Option<f32>,
    pub status: DraftStatus,
    /// How the drafter came by the token, when it says (left out otherwise, and in older traces).
    #[serde(default, skip_serializing_if = "DraftKind::is_unlabelled")]
    pub kind: DraftKind,
}

/// How a drafter proposed a node. The verifier tests every node against its own q whatever the kind; the kind
/// tells a reader which q that was. Kinds a reader does not know read as `Unlabelled`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftKind {
    /// Drawn at random from q, which the node carries (lookahead's SJD window guesses; a chain drafter's first
    /// draft and its siblings, each sibling's q being what the ones before it left).
    Sampled,
    /// The argmax of the q its sampled sibling (the sibling just before it) was drawn from, proposed as a point
    /// mass (q = 1) and tested after that sibling is rejected, against the residual it left.
    ArgmaxSibling,
    /// The drafter did not say. (Last: serde's catch-all for unknown kinds must be.)
    #[default]
    #[serde(other)]
    Unlabelled,
}

impl DraftKind {
    pub fn is_unlabelled(&self) -> bool {
        *self == DraftKind::Unlabelled
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftStatus {
    Accepted,
    Rejected,
    /// Never reached: an ancestor or an earlier sibling decided the step first.
    Unverified,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// Depth of the position where the verifier drew its own token.
    pub depth: usize,
    /// True when every draft on the path was accepted and the token is the bonus from the next distribution.
    pub bonus: bool,
    /// The most likely tokens of the distribution the verifier drew from: norm(max(0, p - q)) after a
    /// rejection, p for a bonus token. Probabilities in `warped_prob`.
    pub distribution: Vec<Candidate>,
    /// The token drawn.
    pub token_id: u32,
}

/// One step of (diverse) beam search. The step's `tokens` follow the best live hypothesis (after a rollback when
/// the best changed to one that diverged earlier); this is the whole search state behind them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BeamStep {
    /// Groups of diverse beam search (1 for plain beam search).
    pub groups: usize,
    /// Live hypotheses after this step, best first within each group, groups in order.
    pub live: Vec<BeamHypothesis>,
    /// Candidates of this step that were neither kept nor finished, best first (a few per group).
    #[serde(default)]
    pub pruned: Vec<BeamCandidate>,
    /// Finished hypotheses so far (ended by an end-of-generation token), best first.
    #[serde(default)]
    pub finished: Vec<BeamHypothesis>,
    /// Index into `live` of the hypothesis the output follows, or `None` when the search ended on a finished one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<usize>,
    /// Diverse beam search: distinct bigrams / all bigrams over the best live hypothesis of each group (1 = the
    /// groups share no bigram, 1/groups = they are identical). Absent for one group or fewer than two tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distinct_2: Option<f32>,
    /// True on the step that ended the search (the output is the final answer).
    #[serde(default)]
    pub done: bool,
    /// OPERA: the output position (0 = first generated token) of the summary token the best hypothesis'
    /// newest token over-trusts, i.e. the column with the largest attention product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary_position: Option<usize>,
    /// OPERA: the best hypothesis' over-trust map at this step (what the penalty was computed from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_trust: Option<OverTrustMap>,
}

/// OPERA's view of the best hypothesis at one step: its newest tokens' last-layer attention (max over heads) over
/// the output tokens in the penalty window, each row renormalised within the window, and the score of each column.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OverTrustMap {
    /// Output position (0 = first generated token) of the first row and column shown.
    pub start: usize,
    /// Row i covers output tokens `start..=start + i` (a lower triangle); values rounded to 1e-4 to keep the
    /// trace small.
    pub rows: Vec<Vec<f32>>,
    /// log10 of each shown column's product SCALE·Π σ·a(i, j) down the rows (the over-trust score; the penalty is
    /// 10^this for the winning column). `None` where the product underflowed to 0.
    pub log10_scores: Vec<Option<f32>>,
    /// Index into the columns of the winning (summary) column.
    pub winner: usize,
    /// The candidates the best hypothesis' parent scored at this step, with their over-trust penalties, best score
    /// first.
    #[serde(default)]
    pub candidates: Vec<BeamCandidate>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BeamHypothesis {
    /// The generated tokens of the hypothesis (the prompt is not repeated).
    pub token_ids: Vec<u32>,
    pub text: String,
    /// Sum of ln p of its tokens under the model.
    pub logprob: f32,
    /// What the search ranks by: the log-probability plus diversity penalties, divided by
    /// length^length_penalty for finished hypotheses.
    pub score: f32,
    /// Index into the previous step's `live` of the hypothesis this one extends (`None` on the first step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<usize>,
    #[serde(default)]
    pub group: usize,
    /// The text of its newest token (for the beam tree's nodes; empty in traces written before it was kept).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_token: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BeamCandidate {
    /// Index into the previous step's `live` (`None` on the first step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<usize>,
    pub token_id: u32,
    pub token: String,
    /// The hypothesis' log-probability if extended by this token.
    pub logprob: f32,
    pub score: f32,
    #[serde(default)]
    pub group: usize,
    /// The penalty this token paid: the diversity penalty (diverse beam search) or the over-trust penalty
    /// (OPERA).
    #[serde(default)]
    pub penalty: f32,
}

/// Contrastive search: each of the top-k tokens scored by (1 - alpha) p - alpha max-similarity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContrastiveStep {
    pub alpha: f32,
    /// The candidates, most likely first.
    pub candidates: Vec<ContrastiveCandidate>,
    /// Index into `candidates` of the chosen one.
    pub chosen: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContrastiveCandidate {
    pub id: u32,
    pub token: String,
    /// The model's probability of the candidate.
    pub prob: f32,
    /// Largest cosine similarity between the candidate's last hidden state and those of the earlier tokens.
    pub max_similarity: f32,
    /// Position (absolute) of the earlier token it is most similar to.
    pub most_similar_position: usize,
    pub score: f32,
}

/// Momentum decoding: each of the top-k tokens scored by p(v) - alpha R(L(v)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MomentumStep {
    pub alpha: f32,
    /// The candidates, most likely first.
    pub candidates: Vec<MomentumCandidate>,
    /// Index into `candidates` of the chosen one.
    pub chosen: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MomentumCandidate {
    pub id: u32,
    pub token: String,
    pub prob: f32,
    /// Length of the longest n-gram that choosing this token would repeat (0 = none).
    pub loop_len: usize,
    /// R(loop_len); `None` stands for an infinite resistance (the candidate is barred).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resistance: Option<f32>,
    /// p - alpha R; `None` when barred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// Context-aware decoding: logits = (1 + alpha) logits(context + prompt) - alpha logits(prompt).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CadStep {
    pub alpha: f32,
    /// Most likely tokens with the context; `logprob` under that distribution.
    pub with_context: Vec<Candidate>,
    /// Most likely tokens without the context.
    pub without_context: Vec<Candidate>,
    /// Most likely tokens of the adjusted distribution the token was chosen from.
    pub adjusted: Vec<Candidate>,
}

/// Entropy-adaptive decoding: which model produced the step's token and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntropyAdaptiveStep {
    /// Threshold τ (nats) on the rolling mean entropy: at or above it the full model decodes.
    pub threshold: f32,
    pub window: usize,
    pub min_dwell: usize,
    /// Rolling mean of the entropies of the last `window` tokens (nats) that made the decision; `None` before
    /// the first token, which the full model decodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_entropy: Option<f32>,
    /// True when the full model decoded this step, false when the layer-skipped one did.
    pub full_model: bool,
    /// True when this step changed model.
    pub switched: bool,
    /// The layers the small model skips.
    pub skip_layers: Vec<usize>,
    /// Tokens the model in use had to read first, because the other model decoded them (its own cache lacked
    /// them); the prompt counts on a model's first step.
    #[serde(default)]
    pub caught_up: usize,
}

/// What the model computed inside itself for one committed token, recorded when `inspect` asks for it: the
/// logit lens and the attention of the position that predicted the token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inspection {
    /// Absolute position of the token (as `TokenRecord::position`); the lens and attention belong to the
    /// position before it, which predicted it.
    pub position: usize,
    /// The logit lens: one entry per depth, 0 = the embeddings, i + 1 = after layer i (the last is the output).
    #[serde(default)]
    pub lens: Vec<LensCell>,
    /// Schema version 1's attention, one JSON object per row. Only read: the reader moves it into
    /// `attention_map` (`upgrade`), so everything else sees one form, and nothing writes it any more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<LayerAttention>,
    /// Attention of the predicting position over every earlier position, per recorded layer (schema version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_map: Option<AttentionMap>,
}

impl Inspection {
    /// Moves a version-1 `attention` into `attention_map`.
    pub fn upgrade(&mut self) -> Result<(), String> {
        if self.attention.is_empty() {
            return Ok(());
        }
        let query = self
            .position
            .checked_sub(1)
            .ok_or("an inspection at position 0")?;
        self.attention_map = Some(AttentionMap::from_layers(query, &self.attention)?);
        self.attention.clear();
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LensCell {
    pub token_id: u32,
    pub token: String,
    pub prob: f32,
    /// Probability at this depth of the token that actually came next.
    pub actual_prob: f32,
}

/// Schema version 1's attention of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerAttention {
    pub layer: usize,
    /// One row per head, then the max over heads, then the mean over heads.
    pub heads: Vec<SparseRow>,
}

/// The largest weights of one attention row: keys (absolute positions) with their weights, largest first.
/// `covered` is the total weight of the row the kept keys hold. Version 1 stored rows so (weights rounded to
/// 1e-4); now it is what [`AttentionMap::row`] gives the panels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseRow {
    pub keys: Vec<u32>,
    pub weights: Vec<f32>,
    pub covered: f32,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn draft_kinds_are_written_when_known_and_read_when_unknown() {
        let node = DraftNode {
            id: 7,
            token: "x".into(),
            parent: None,
            depth: 1,
            q: 0.5,
            p: Some(0.25),
            residual: None,
            status: DraftStatus::Rejected,
            kind: DraftKind::Sampled,
        };
        let text = serde_json::to_string(&node).unwrap();
        assert!(text.contains(r#""kind":"sampled""#), "{text}");
        assert_eq!(serde_json::from_str::<DraftNode>(&text).unwrap(), node);
        // Unlabelled nodes write nothing, so other drafters' traces are unchanged; older traces read as such.
        let plain = DraftNode {
            kind: DraftKind::Unlabelled,
            ..node.clone()
        };
        let text = serde_json::to_string(&plain).unwrap();
        assert!(!text.contains("kind"), "{text}");
        assert_eq!(serde_json::from_str::<DraftNode>(&text).unwrap(), plain);
        // A kind a later version adds reads as unlabelled.
        let newer = text.replace(r#""status""#, r#""kind":"from_the_future","status""#);
        assert_eq!(serde_json::from_str::<DraftNode>(&newer).unwrap(), plain);
    }
}
