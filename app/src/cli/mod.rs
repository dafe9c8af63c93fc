//! Command-line interface. The names of `specula run`'s options are a contract (scripts and tests use them).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use specula_core::model::Kernels;
use specula_core::store::{ModelSource, ModelStore};

mod bench;
mod run;
mod spec_bench;

#[derive(Parser, Debug)]
#[command(
    name = "specula",
    version,
    about = "Watch a language model decode, step by step, and compare decoding methods"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// GGUF model for the GUI (default: the default model, found under models/ or in the Hugging Face cache).
    #[arg(long, global = true)]
    pub model: Option<PathBuf>,
    /// Compute threads. 1 keeps decoding steady while the GUI renders on the same cores; 2 is faster on an idle
    /// machine.
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,
    /// Matmul arithmetic: `auto` picks what llama.cpp runs on this CPU (its AMX kernels' per-block integer
    /// sums where the CPU has AMX, ggml's `vec_dot` elsewhere), so greedy output equals llama.cpp's here; the
    /// trace's model info records the choice. Block sums need AVX-512 VNNI and make verifying drafts cheap.
    #[arg(long, global = true, value_enum, default_value_t = Matmul::Auto)]
    pub matmul: Matmul,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matmul {
    Auto,
    VecDot,
    BlockSums,
}

impl Matmul {
    fn kernels(self) -> Kernels {
        match self {
            Self::Auto => Kernels::llama_cpp_here(),
            Self::VecDot => Kernels::VecDot,
            Self::BlockSums => Kernels::BlockSums,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Decode one prompt headless, print the text (or a JSON summary) and optionally write the trace.
    // Boxed: the run flags outgrow the other commands' (clippy's large_enum_variant).
    Run(Box<run::RunArgs>),
    /// Measure prefill and decode speed and the cost of multi-token forwards.
    Bench(bench::BenchArgs),
    /// Download the default model from the Hugging Face hub into its cache.
    FetchModel(FetchArgs),
}

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Hub repository (default: the default model's).
    #[arg(long)]
    pub repo: Option<String>,
    /// File in the repository.
    #[arg(long)]
    pub file: Option<String>,
}

pub fn main(cli: Cli) -> Result<()> {
    specula_core::set_kernels(cli.matmul.kernels())?;
    match cli.command {
        Some(Command::Run(args)) => run::run(cli.model.as_deref(), *args),
        Some(Command::Bench(args)) => bench::bench(cli.model.as_deref(), cli.threads, args),
        Some(Command::FetchModel(args)) => fetch_model(args),
        None => crate::gui::run(cli.model, cli.threads),
    }
}

/// The model file to use: `--model`, else the default model wherever the store finds it.
pub fn resolve_model(explicit: Option<&Path>) -> Result<PathBuf> {
    let store = ModelStore::new();
    let source = match explicit {
        Some(p) => ModelSource::Path(p.to_owned()),
        None => ModelSource::Default,
    };
    Ok(store.resolve(&source)?)
}

fn fetch_model(args: FetchArgs) -> Result<()> {
    let mut store = ModelStore::new();
    let mut hub = store.hub().clone();
    if let Some(repo) = args.repo {
        hub.repo = repo;
    }
    if let Some(file) = args.file {
        hub.file = file;
    }
    store = store.with_hub(hub.clone());
    eprintln!("downloading {} from {} ...", hub.file, hub.repo);
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let mut last_percent = u64::MAX;
    let path = store
        .download(
            &mut |done, total| {
                let percent = (done * 100).checked_div(total).unwrap_or(0);
                if percent != last_percent && percent.is_multiple_of(10) {
                    eprintln!("  {percent}% of {} MB", total / 1_000_000);
                    last_percent = percent;
                }
            },
            &cancel,
        )
        .context("the download failed (without internet access, use models/fetch.sh, which needs only PyPI)")?;
    println!("{}", path.display());
    Ok(())
}
