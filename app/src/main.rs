//! `specula`: the GUI with no subcommand, or a headless subcommand (`run`, `bench`, `fetch-model`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = specula::cli::Cli::parse();
    // candle reads its thread count once, at the first tensor operation: set it before anything else runs.
    specula_core::set_compute_threads(cli.threads);
    match specula::cli::main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
