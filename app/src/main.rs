//! `specula`: the GUI with no subcommand, or a headless subcommand (`run`, `bench`, `fetch-model`).

use clap::Parser;

/// mimalloc instead of glibc's allocator: glibc keeps freed prompt-sized buffers and grown key-value rows
/// fragmented in its heap, which put a quarter more resident memory on four long runs (`specula bench`'s peak).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
