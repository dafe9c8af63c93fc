//! Repeats one k-token forward after a prefill (64 tokens unless a third argument says otherwise), for profilers:
//! `perf record -g target/release/examples/forward_profile 16 200` (k = 16, 200 forwards).
//! `forward_profile matmul 8 [vec-dot|block-sums]` times the matmul kernels alone, in one arithmetic or both (an
//! FFN-sized Q4_1 matrix and the LM head's Q8_0 shape, 8 activation rows). `--matmul block-sums` anywhere loads
//! the model in the block-sums arithmetic (`vec_dot` otherwise), as the binary's flag does. Prints medians, so a change can be checked without the full
//! `specula bench`.

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use specula_core::Model;
use specula_core::kernels::QuantMatrix;
use specula_core::model::{Capture, Kernels, Logits, Mask};

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The arithmetics `matmul` can time.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kernel {
    VecDot,
    BlockSums,
}

fn matmuls(t: usize, only: Option<Kernel>) -> Result<(), Box<dyn std::error::Error>> {
    for (name, rows, cols, dtype) in [
        ("gate/up Q4_1", 3072, 576, GgmlDType::Q4_1),
        ("down Q4_1", 576, 1536, GgmlDType::Q4_1),
        ("lm head Q8_0", 49152, 576, GgmlDType::Q8_0),
    ] {
        let weights = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu)?;
        let matrix = QuantMatrix::from_qtensor(&QTensor::quantize(&weights, dtype)?)?
            .ok_or("format not covered")?;
        let interleaved = Arc::new(matrix.clone().interleaved());
        let matrix = Arc::new(matrix);
        let x: Vec<f32> = (0..t * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let repeats = (100_000_000 / (rows * cols)).max(20);
        for kernel in [Kernel::VecDot, Kernel::BlockSums] {
            if only.is_some_and(|o| o != kernel) {
                continue;
            }
            let matrix = match kernel {
                Kernel::VecDot => &matrix,
                Kernel::BlockSums => &interleaved,
            };
            let mut times = Vec::new();
            for _ in 0..repeats {
                let started = Instant::now();
                std::hint::black_box(matrix.matmul(&x, t));
                times.push(started.elapsed().as_secs_f64());
            }
            // The fastest run: the kernel's own cost, least disturbed by the rest of the machine.
            let seconds = times.iter().copied().fold(f64::INFINITY, f64::min);
            let row_blocks = (rows * cols / 32 * t) as f64;
            println!(
                "{name:>13} {rows}x{cols}, {t} rows, {kernel:?}: {:.3} ms, {:.2} ns per weight block and row",
                seconds * 1e3,
                seconds * 1e9 / row_blocks
            );
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let block_sums = args.windows(2).any(|w| w == ["--matmul", "block-sums"]);
    if let Some(at) = args.iter().position(|a| a == "--matmul") {
        args.drain(at..(at + 2).min(args.len()));
    }
    if args.first().map(String::as_str) == Some("matmul") {
        let only = match args.get(2).map(String::as_str) {
            Some("vec-dot") => Some(Kernel::VecDot),
            Some("block-sums") => Some(Kernel::BlockSums),
            _ => None,
        };
        return matmuls(
            args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(8),
            only,
        );
    }
    let mut args = args.iter().map(|a| a.parse::<usize>());
    let k = args.next().transpose()?.unwrap_or(16);
    let repeats = args.next().transpose()?.unwrap_or(100);
    let prefix_len = args.next().transpose()?.unwrap_or(64);
    let kernels = if block_sums {
        Kernels::BlockSums
    } else {
        Kernels::VecDot
    };
    let model = Model::load_with(
        std::path::Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        kernels,
    )?;
    let llama = &model.llama;
    let prefix: Vec<u32> = (0..prefix_len as u32)
        .map(|i| 300 + (7 * i) % 20_000)
        .collect();
    let mut prefilled = llama.new_cache();
    let positions: Vec<usize> = (0..prefix_len).collect();
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
    let positions: Vec<usize> = (prefix_len..prefix_len + k).collect();
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let started = Instant::now();
        llama.forward(
            &mut prefilled,
            &tokens,
            &positions,
            1,
            &Mask::Causal,
            Logits::All,
            &capture,
        )?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        // Back to the prefix in place: a clone would share rows, and the next append would copy them all.
        prefilled.truncate(prefix_len)?;
    }
    println!(
        "forward of {k} tokens: median {:.2} ms over {repeats}",
        median(times)
    );
    Ok(())
}
