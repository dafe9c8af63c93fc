//! `specula bench --spec-bench N`: Spec-Bench's table on this machine. For each category, the first N prompts
//! (first turn, in the chat template) are decoded greedily by plain decoding and by each drafter; the table gives
//! mean accepted tokens per target forward (MAT, hardware-independent; the prompt's prefill forwards count) and
//! wall-clock speedup over plain decoding (total time over total time, as Spec-Bench reports it), then a row of
//! tokens per draft-and-verify step (Spec-Bench's own "mean accepted tokens", which leaves the prefill out), and
//! counts outputs that are not token-identical to plain greedy (there should be none: verification is lossless
//! and our forwards are row-independent).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;
use serde_json::json;
use specula_core::trace::{SamplingParams, SpeculativeParams, Trace};
use specula_core::{MethodParams, Model, PromptSpec, RunSpec};

#[derive(Args, Debug, Clone)]
pub struct SpecBenchArgs {
    /// Run Spec-Bench with this many prompts per category (the first N of each).
    #[arg(long, value_name = "N")]
    pub spec_bench: Option<usize>,
    /// Only this category (translation, summarization, qa, math_reasoning, rag, writing, ...).
    #[arg(long, requires = "spec_bench")]
    pub category: Option<String>,
    /// Drafters to compare, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "prompt-lookup,token-recycling,layer-skip,early-exit"
    )]
    pub drafters: Vec<String>,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Draft length (tree depth for token-recycling).
    #[arg(long, default_value_t = 4)]
    pub draft_len: usize,
    /// Adaptive draft length up to --draft-len: stop drafting when the estimated probability that some draft
    /// token is rejected passes H.
    #[arg(long, conflicts_with = "draft_cost")]
    pub adaptive: Option<f32>,
    /// Cost-aware draft length up to --draft-len: each drafted token costs C one-token steps (`specula bench`
    /// prints it as verify_token_cost).
    #[arg(long, value_name = "C")]
    pub draft_cost: Option<f32>,
    /// With --draft-cost: the cost grows by G per 1,000 tokens of context (`specula bench` prints it as
    /// verify_token_cost_growth).
    #[arg(long, value_name = "G", requires = "draft_cost")]
    pub draft_cost_growth: Option<f32>,
    /// Node budget of tree drafters (token-recycling).
    #[arg(long, default_value_t = 16)]
    pub tree_size: usize,
    /// Token recycling's tree template: scored or paper (Luo et al.'s 80-node tree, cut to --tree-size).
    #[arg(long, default_value = "scored")]
    pub tree_template: String,
    /// Token recycling keeps its matrix from one question to the next (the paper's hot start); questions run in
    /// the file's order either way.
    #[arg(long)]
    pub keep_matrix: bool,
    /// Spec-Bench's question.jsonl.
    #[arg(long, default_value = "assets/spec-bench/question.jsonl")]
    pub questions: PathBuf,
}

#[derive(Deserialize)]
struct Question {
    question_id: u64,
    category: String,
    turns: Vec<String>,
}

/// Sums over the prompts of one (drafter, category) cell.
#[derive(Default, Clone, Copy)]
struct Cell {
    prompts: usize,
    generated: u64,
    target_forwards: u64,
    /// Draft-and-verify rounds: the target forwards without the prompt's prefill.
    steps: u64,
    wall_ms: f64,
    plain_wall_ms: f64,
    not_identical: usize,
}

impl Cell {
    fn add(&mut self, other: &Cell) {
        self.prompts += other.prompts;
        self.generated += other.generated;
        self.target_forwards += other.target_forwards;
        self.steps += other.steps;
        self.wall_ms += other.wall_ms;
        self.plain_wall_ms += other.plain_wall_ms;
        self.not_identical += other.not_identical;
    }

    fn mat(&self) -> f64 {
        self.generated as f64 / self.target_forwards.max(1) as f64
    }

    /// Tokens per draft-and-verify round: Spec-Bench's "mean accepted tokens", which leaves the prefill out.
    fn per_step(&self) -> f64 {
        self.generated as f64 / self.steps.max(1) as f64
    }

    fn speedup(&self) -> f64 {
        if self.wall_ms > 0.0 {
            self.plain_wall_ms / self.wall_ms
        } else {
            f64::NAN
        }
    }
}

pub fn spec_bench(model_path: Option<&Path>, n: usize, args: &SpecBenchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.questions)
        .with_context(|| format!("cannot read {}", args.questions.display()))?;
    // The first N of each category, in the file's order: with --keep-matrix each question inherits the matrix
    // the questions before it left, as in the paper's runs.
    let mut taken: BTreeMap<String, usize> = BTreeMap::new();
    let mut questions: Vec<Question> = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let q: Question = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", args.questions.display(), i + 1))?;
        if args.category.as_ref().is_some_and(|c| *c != q.category) {
            continue;
        }
        let count = taken.entry(q.category.clone()).or_default();
        if *count < n.max(1) {
            *count += 1;
            questions.push(q);
        }
    }
    if questions.is_empty() {
        bail!("no Spec-Bench prompts in category {:?}", args.category);
    }
    let path = super::resolve_model(model_path)?;
    let model = Model::load(&path)?;

    // cells[drafter][category]
    let mut cells: BTreeMap<String, BTreeMap<String, Cell>> = BTreeMap::new();
    for q in &questions {
        let category = &q.category;
        let Some(prompt) = q.turns.first() else {
            continue;
        };
        let plain = decode(&model, prompt, "greedy", None, args)?;
        let plain_wall = wall_ms(&plain);
        let plain_ids = plain
            .summary
            .as_ref()
            .map(|s| s.token_ids.clone())
            .unwrap_or_default();
        for drafter in &args.drafters {
            let run = decode(&model, prompt, "speculative", Some(drafter), args)?;
            let summary = run
                .summary
                .as_ref()
                .context("a run ended without a summary")?;
            let identical = summary.token_ids == plain_ids;
            if !identical {
                eprintln!(
                    "question {} ({category}), {drafter}: output differs from plain greedy",
                    q.question_id
                );
            }
            // One line per run as it finishes, so an interrupted benchmark still leaves its data.
            println!(
                "{}",
                json!({
                    "question_id": q.question_id,
                    "category": category,
                    "drafter": drafter,
                    "generated": summary.generated_tokens,
                    "target_forwards": summary.target_forward_calls,
                    "steps": summary.steps,
                    "wall_ms": wall_ms(&run),
                    "plain_wall_ms": plain_wall,
                    "identical": identical,
                })
            );
            let cell = Cell {
                prompts: 1,
                generated: summary.generated_tokens as u64,
                target_forwards: summary.target_forward_calls,
                steps: summary.steps as u64,
                wall_ms: wall_ms(&run),
                plain_wall_ms: plain_wall,
                not_identical: usize::from(!identical),
            };
            cells
                .entry(drafter.clone())
                .or_default()
                .entry(category.clone())
                .or_default()
                .add(&cell);
        }
        eprintln!("question {} ({category}) done", q.question_id);
    }
    print_table(&cells, taken.keys());
    Ok(())
}

fn decode(
    model: &Model,
    prompt: &str,
    method: &str,
    drafter: Option<&str>,
    args: &SpecBenchArgs,
) -> Result<Trace> {
    let spec = RunSpec {
        method: method.into(),
        params: MethodParams {
            sampling: SamplingParams::greedy(),
            speculative: SpeculativeParams {
                drafter: drafter.unwrap_or("prompt-lookup").into(),
                draft_len: args.draft_len,
                adaptive: args.adaptive,
                draft_cost: args.draft_cost,
                draft_cost_growth: args.draft_cost_growth,
                tree_size: args.tree_size,
                tree_template: args.tree_template.clone(),
                keep_matrix: args.keep_matrix,
                ..SpeculativeParams::default()
            },
            ..MethodParams::default()
        },
        prompt: PromptSpec {
            text: prompt.into(),
            chat: true,
            system: None,
        },
        max_tokens: args.max_tokens,
        ..RunSpec::default()
    };
    let trace = specula_core::generate(model, spec)?;
    if let Some(error) = trace.summary.as_ref().and_then(|s| s.error.as_ref()) {
        bail!("{method} {drafter:?} failed: {error}");
    }
    Ok(trace)
}

fn wall_ms(trace: &Trace) -> f64 {
    trace
        .summary
        .as_ref()
        .and_then(|s| s.timing)
        .map_or(0.0, |t| t.wall_ms)
}

fn print_table<'a>(
    cells: &BTreeMap<String, BTreeMap<String, Cell>>,
    categories: impl Iterator<Item = &'a String> + Clone,
) {
    let mut header = format!("| {:<16} |", "drafter (MAT / speedup)");
    for c in categories.clone() {
        header.push_str(&format!(" {c} |"));
    }
    header.push_str(" overall | not identical |");
    println!("{header}");
    println!("|{}", "---|".repeat(categories.clone().count() + 3));
    let mut json_rows = serde_json::Map::new();
    for (drafter, row) in cells {
        let mut line = format!("| {drafter:<16} |");
        let mut overall = Cell::default();
        let mut json_row = serde_json::Map::new();
        for c in categories.clone() {
            let cell = row.get(c).copied().unwrap_or_default();
            overall.add(&cell);
            line.push_str(&format!(" {:.2} / {:.2}x |", cell.mat(), cell.speedup()));
            json_row.insert(c.clone(), cell_json(&cell));
        }
        line.push_str(&format!(
            " {:.2} / {:.2}x | {} of {} |",
            overall.mat(),
            overall.speedup(),
            overall.not_identical,
            overall.prompts
        ));
        json_row.insert("overall".into(), cell_json(&overall));
        json_rows.insert(drafter.clone(), serde_json::Value::Object(json_row));
        println!("{line}");
        // Spec-Bench's "mean accepted tokens": tokens per draft-and-verify step, the prefill left out.
        let mut per_step = format!("| {:<16} |", format!("{drafter} per step"));
        for c in categories.clone() {
            let cell = row.get(c).copied().unwrap_or_default();
            per_step.push_str(&format!(" {:.2} |", cell.per_step()));
        }
        per_step.push_str(&format!(" {:.2} | |", overall.per_step()));
        println!("{per_step}");
    }
    println!("{}", serde_json::Value::Object(json_rows));
}

fn cell_json(cell: &Cell) -> serde_json::Value {
    json!({
        "prompts": cell.prompts,
        "mean_accepted_tokens": (cell.mat() * 1000.0).round() / 1000.0,
        "tokens_per_step": (cell.per_step() * 1000.0).round() / 1000.0,
        "speedup": (cell.speedup() * 1000.0).round() / 1000.0,
        "not_identical_to_greedy": cell.not_identical,
    })
}
