//! Specula's engine, with no GUI dependency. Data flows one way:
//!
//! ```text
//! store (where is the GGUF?) -> engine::Model::load (model + tokenizer)
//!   -> engine::Run (steps a methods::DecodingMethod, writes a trace::Trace)
//!   -> worker (runs on its own thread, streams worker::Event to the UI)
//! ```
//!
//! The trace is the contract: everything the app shows can be rebuilt from an exported trace file.

pub mod attention;
pub mod calibrate;
pub mod engine;
pub mod error;
pub mod ggml_float;
pub mod inspect;
pub mod kernels;
pub mod kv_cache;
pub mod methods;
pub mod model;
pub mod sampling;
pub mod store;
pub mod tokenizer;
pub mod trace;
pub mod worker;

pub use engine::{Fork, Model, PromptSpec, Run, RunSpec, generate, set_kernels};
pub use error::{Error, Result};
pub use trace::{MethodParams, SamplingParams, Trace};

/// Sets how many threads the model's matmuls use (the calling thread included). Must run before the first forward,
/// which is why the binary calls it first thing in `main`.
///
/// Our own quantized matmuls ([`kernels`]) split across these threads without ever waiting for a helper to start,
/// so a busy core slows them down gracefully. candle's remaining operations (attention, norms) stay on one thread:
/// its barrier pool collapses when another thread competes for the same two cores (65 -> 1.8 tokens/s measured).
pub fn set_compute_threads(threads: usize) {
    kernels::set_threads(threads);
    // SAFETY-free: std::env::set_var is unsafe in Rust 2024 only because other threads may read the environment;
    // callers run this before spawning any thread.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}
