//! Repeats one k-token forward after a 64-token prefill, for profilers:
//! `perf record -g target/release/examples/forward_profile 16 200` (k = 16, 200 forwards).
//! Prints the median time so a change can be checked without the full `specula bench`.

use std::time::Instant;

use specula_core::Model;
use specula_core::model::{Capture, Logits, Mask};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let k = args.next().transpose()?.unwrap_or(16);
    let repeats = args.next().transpose()?.unwrap_or(100);
    let model = Model::load(std::path::Path::new(
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
    ))?;
    let llama = &model.llama;
    let prefix: Vec<u32> = (0..64).map(|i| 300 + 7 * i).collect();
    let mut prefilled = llama.new_cache();
    let positions: Vec<usize> = (0..64).collect();
    let capture = Capture::default();
    llama.forward(
        &mut prefilled,
        &prefix,
        &positions,
        1,
        &Mask::Causal,
        Logits::Last,
        &capture,
    )?;
    let tokens: Vec<u32> = prefix.iter().copied().take(k).collect();
    let positions: Vec<usize> = (64..64 + k).collect();
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let mut cache = prefilled.clone();
        let started = Instant::now();
        llama.forward(
            &mut cache,
            &tokens,
            &positions,
            1,
            &Mask::Causal,
            Logits::All,
            &capture,
        )?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "forward of {k} tokens: median {:.2} ms over {repeats}",
        times[times.len() / 2]
    );
    Ok(())
}
