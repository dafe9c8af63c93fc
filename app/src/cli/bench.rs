//! `specula bench`: the engine's speed figures, printed as numbers and ratios (never asserted in tests).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use specula_core::model::{Capture, Logits, Mask};
use specula_core::{MethodParams, Model, PromptSpec, RunSpec, SamplingParams};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Tokens to decode for the decode figure.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Repetitions of each timed forward (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}

const PREFILL_TOKENS: usize = 64;
const FORWARD_SIZES: [usize; 5] = [1, 2, 4, 8, 16];

/// A prose passage long enough for a 64-token prefill.
const BENCH_TEXT: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of \
oil and a notebook in which he recorded the weather, the ships that passed, and the small events of the island. \
Over forty years the notebook became a library: gulls that nested on the railing, storms that took the jetty, a \
whale that surfaced beside the rocks one still morning in June.";

pub fn bench(model_path: Option<&Path>, threads: usize, args: BenchArgs) -> Result<()> {
    let path = super::resolve_model(model_path)?;
    let load_started = Instant::now();
    let model = Model::load(&path)?;
    let load_ms = ms(load_started);
    let llama = &model.llama;
    let ids = model.tokenizer.encode(BENCH_TEXT)?;
    let prompt: Vec<u32> = ids.iter().copied().cycle().take(PREFILL_TOKENS).collect();
    let positions: Vec<usize> = (0..PREFILL_TOKENS).collect();
    let repeats = args.repeats.max(1);

    let mut prefill_ms = Vec::new();
    let mut prefilled = llama.new_cache();
    for _ in 0..repeats {
        let mut cache = llama.new_cache();
        let t = Instant::now();
        llama.forward(
            &mut cache,
            &prompt,
            &positions,
            1,
            &Mask::Causal,
            Logits::Last,
            &Capture::default(),
        )?;
        prefill_ms.push(ms(t));
        prefilled = cache;
    }
    let prefill_ms = median(&mut prefill_ms);

    let mut forward_ms = BTreeMap::new();
    for k in FORWARD_SIZES {
        let tokens: Vec<u32> = prompt.iter().copied().take(k).collect();
        let pos: Vec<usize> = (PREFILL_TOKENS..PREFILL_TOKENS + k).collect();
        let mut times = Vec::new();
        for _ in 0..repeats {
            let mut cache = prefilled.clone();
            let t = Instant::now();
            llama.forward(
                &mut cache,
                &tokens,
                &pos,
                1,
                &Mask::Causal,
                Logits::All,
                &Capture::default(),
            )?;
            times.push(ms(t));
        }
        forward_ms.insert(k.to_string(), median(&mut times));
    }
    let step_ms = forward_ms.get("1").copied().unwrap_or(f64::NAN);
    let ratio = |k: &str| forward_ms.get(k).map_or(f64::NAN, |&v| v / step_ms);

    // Decode through the real engine (trace records included), as users run it.
    let spec = RunSpec {
        method: "greedy".into(),
        params: MethodParams {
            sampling: SamplingParams::greedy(),
            ..MethodParams::default()
        },
        prompt: PromptSpec {
            text: BENCH_TEXT.into(),
            chat: false,
            system: None,
        },
        max_tokens: args.decode_tokens,
        ..RunSpec::default()
    };
    let mut run = specula_core::Run::new(&model, spec)?;
    let never = AtomicBool::new(false);
    while !run.is_finished() {
        run.step(&never)?;
    }
    let trace = run.into_trace();
    let timing = trace
        .summary
        .as_ref()
        .and_then(|s| s.timing)
        .context("the decode run recorded no timing")?;

    let report = serde_json::json!({
        "model": llama.info.file_name,
        "weight_format": llama.info.weight_format,
        "threads": threads,
        "load_ms": round(load_ms),
        "prefill_tokens": PREFILL_TOKENS,
        "prefill_ms": round(prefill_ms),
        "prefill_tokens_per_s": round(PREFILL_TOKENS as f64 * 1000.0 / prefill_ms),
        "decode_tokens": trace.generated_len(),
        "decode_tokens_per_s": round(timing.decode_tokens_per_s),
        "forward_ms": forward_ms.iter().map(|(k, v)| (k.clone(), round(*v))).collect::<BTreeMap<_, _>>(),
        "verify8_over_step": round(ratio("8")),
        "verify16_over_step": round(ratio("16")),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "model               {} ({}), {threads} thread(s)",
            llama.info.file_name, llama.info.weight_format
        );
        println!("load                {load_ms:.0} ms");
        println!(
            "prefill             {:.1} tokens/s ({PREFILL_TOKENS} tokens in {prefill_ms:.1} ms)",
            PREFILL_TOKENS as f64 * 1000.0 / prefill_ms
        );
        println!(
            "decode              {:.1} tokens/s ({} tokens)",
            timing.decode_tokens_per_s,
            trace.generated_len()
        );
        for (k, v) in &forward_ms {
            println!(
                "forward of {k:>2} tokens {v:>7.2} ms  ({:.2}x one step)",
                v / step_ms
            );
        }
    }
    Ok(())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
