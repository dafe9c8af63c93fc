//! `specula run`: one prompt, one method, headless.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use clap::Args;
use specula_core::trace::{ExportOptions, FileFormat, SamplingParams, save_runs};
use specula_core::{MethodParams, Model, PromptSpec, Run, RunSpec};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The prompt text (special tokens such as <|im_start|> are parsed).
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    /// Decoding method.
    #[arg(long, default_value = "greedy")]
    pub method: String,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy). Default for --method sample: 0.8.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus: keep the smallest set of tokens reaching probability P (1 = off). Default for sample: 0.95.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one (0 = off).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Locally typical sampling mass (1 = off).
    #[arg(long)]
    pub typical_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the step trace (JSONL; a .csv name writes one row per token).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Leave wall-clock times out of the trace, so that the same seed writes the same bytes.
    #[arg(long)]
    pub deterministic: bool,
    /// Print a JSON summary as the last line instead of streaming the text.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// The sampling parameters: the method's defaults, overridden by the flags given.
    pub fn sampling(&self) -> SamplingParams {
        let mut s = if self.method == "greedy" {
            SamplingParams::greedy()
        } else {
            SamplingParams::default()
        };
        if let Some(t) = self.temperature {
            s.temperature = t;
        }
        if let Some(k) = self.top_k {
            s.top_k = k;
        }
        if let Some(p) = self.top_p {
            s.top_p = p;
        }
        if let Some(p) = self.min_p {
            s.min_p = p;
        }
        if let Some(p) = self.typical_p {
            s.typical_p = p;
        }
        s
    }

    fn prompt_text(&self) -> Result<String> {
        match (&self.prompt, &self.prompt_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the prompt file {}", path.display())),
            (None, None) => bail!("give --prompt TEXT or --prompt-file PATH"),
        }
    }
}

pub fn run(model_path: Option<&Path>, args: RunArgs) -> Result<()> {
    let spec = RunSpec {
        label: String::new(),
        method: args.method.clone(),
        params: MethodParams {
            sampling: args.sampling(),
        },
        prompt: PromptSpec {
            text: args.prompt_text()?,
            chat: args.chat,
            system: args.system.clone(),
        },
        seed: args.seed,
        max_tokens: args.max_tokens,
        fork: None,
    };
    // Check what needs no model first, so a typo fails fast.
    spec.params.sampling.validate()?;
    if !specula_core::methods::METHOD_NAMES.contains(&spec.method.as_str()) {
        bail!(specula_core::Error::UnknownMethod(spec.method.clone()));
    }
    let path = super::resolve_model(model_path)?;
    let model = Model::load(&path)?;
    let mut run = Run::new(&model, spec)?;
    let never = AtomicBool::new(false);
    let mut stdout = std::io::stdout().lock();
    while !run.is_finished() {
        let step = run.step(&never)?;
        if !args.json
            && let Some(step) = step
        {
            for t in &step.tokens {
                if !model.tokenizer.is_end_of_generation(t.id) {
                    write!(stdout, "{}", t.token)?;
                }
            }
            stdout.flush()?;
        }
    }
    let trace = run.into_trace();
    if let Some(out) = &args.trace {
        let opts = ExportOptions {
            deterministic: args.deterministic,
        };
        save_runs(out, &[&trace], FileFormat::from_path(out), opts)?;
    }
    let summary = trace
        .summary
        .as_ref()
        .context("the run ended without a summary")?;
    if let Some(error) = &summary.error {
        bail!("the run failed: {error}");
    }
    let timing = summary.timing.unwrap_or_default();
    if args.json {
        let json = serde_json::json!({
            "model": trace.header.model.file_name,
            "method": trace.header.method,
            "prompt_ids": trace.header.prompt.token_ids,
            "token_ids": summary.token_ids,
            "text": summary.text,
            "stop_reason": summary.stop_reason,
            "steps": summary.steps,
            "generated_tokens": summary.generated_tokens,
            "target_forward_calls": summary.target_forward_calls,
            "mean_accepted_tokens": summary.mean_accepted_tokens,
            "mean_entropy": summary.mean_entropy,
            "wall_ms": timing.wall_ms,
            "prefill_ms": timing.prefill_ms,
            "decode_tokens_per_s": timing.decode_tokens_per_s,
        });
        writeln!(stdout, "{json}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "[{} tokens, {:?}, prefill {:.0} ms for {} prompt tokens, decode {:.1} tokens/s]",
            summary.generated_tokens,
            summary.stop_reason,
            timing.prefill_ms,
            trace.header.prompt.token_ids.len(),
            timing.decode_tokens_per_s
        );
    }
    Ok(())
}
