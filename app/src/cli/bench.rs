//! `specula bench`: the engine's speed and memory figures, printed as numbers and ratios (never asserted in
//! tests). Every timed figure is measured `--runs` times and reported as min / median / max; with `--reference`
//! llama.cpp (../shared/reference/run.sh) decodes the same prompt with the same threads in the same process run,
//! and the ratios to it are printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use specula_core::calibrate;
use specula_core::model::{Capture, Kernels, KvCache, Llama, Logits, Mask, logits_row};
use specula_core::sampling::argmax;
use specula_core::{MethodParams, Model, PromptSpec, Run, RunSpec, SamplingParams};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Tokens to decode for each decode figure.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Measurements of each figure (min / median / max are reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Also run llama.cpp on the same prompt and print our figures as ratios to its.
    #[arg(long)]
    pub reference: bool,
    /// The llama.cpp runner (prints one JSON line per prompt).
    #[arg(long, default_value = "../shared/reference/run.sh")]
    pub reference_script: PathBuf,
    /// Skip the peak-memory figure (four 2,000-token runs; about a minute).
    #[arg(long)]
    pub no_memory: bool,
    #[command(flatten)]
    pub spec: super::spec_bench::SpecBenchArgs,
}

const FORWARD_SIZES: [usize; 5] = [1, 2, 4, 8, 16];
/// Context length of each of the four runs held open for the memory figure.
const MEMORY_RUN_TOKENS: usize = 2000;
const MEMORY_RUNS: usize = 4;

/// A prose passage: the prompt of every decode figure, ours and llama.cpp's.
const BENCH_TEXT: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of \
oil and a notebook in which he recorded the weather, the ships that passed, and the small events of the island. \
Over forty years the notebook became a library: gulls that nested on the railing, storms that took the jetty, a \
whale that surfaced beside the rocks one still morning in June.";

/// Measurements of one figure.
#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.0.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        v
    }

    fn median(&self) -> f64 {
        let v = self.sorted();
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    /// The median over runs of `1 − self / base`, run by run: what `self` costs against `base`, measured
    /// back to back within each run, so that the VM's drift from run to run cancels.
    fn paired_cost(&self, base: &Samples) -> f64 {
        let costs: Samples = Samples(
            self.0
                .iter()
                .zip(&base.0)
                .map(|(&with, &without)| 1.0 - with / without)
                .collect(),
        );
        costs.median()
    }

    fn json(&self) -> Value {
        let v = self.sorted();
        json!({
            "min": round(v.first().copied().unwrap_or(f64::NAN)),
            "median": round(self.median()),
            "max": round(v.last().copied().unwrap_or(f64::NAN)),
        })
    }

    fn text(&self) -> String {
        let v = self.sorted();
        format!(
            "{:.2} / {:.2} / {:.2}",
            v.first().copied().unwrap_or(f64::NAN),
            self.median(),
            v.last().copied().unwrap_or(f64::NAN)
        )
    }
}

pub fn bench(model_path: Option<&Path>, threads: usize, args: BenchArgs) -> Result<()> {
    if let Some(n) = args.spec.spec_bench {
        return super::spec_bench::spec_bench(model_path, n, &args.spec);
    }
    let path = super::resolve_model(model_path)?;
    let load_started = Instant::now();
    let model = Model::load(&path)?;
    let load_ms = ms(load_started);
    let llama = &model.llama;
    let prompt = model.tokenizer.encode(BENCH_TEXT)?;
    let runs = args.runs.max(1);
    let n = args.decode_tokens.max(2);

    let mut figures: BTreeMap<&str, Samples> = BTreeMap::new();
    let mut record = |name: &'static str, v: f64| figures.entry(name).or_default().push(v);
    let mut forward_ms: BTreeMap<usize, Samples> = BTreeMap::new();
    let attention_layers: Vec<usize> =
        (llama.config.n_layers.saturating_sub(2)..llama.config.n_layers).collect();
    for _ in 0..runs {
        let (prefilled, prefill) = timed_prefill(llama, &prompt)?;
        record(
            "prefill_tokens_per_s",
            prompt.len() as f64 * 1000.0 / prefill,
        );
        for (k, t) in calibrate::forward_ms(llama, calibrate::PREFIX_TOKENS, &FORWARD_SIZES, 1)? {
            forward_ms.entry(k).or_default().push(t);
        }
        record("decode_tokens_per_s", engine_decode(&model, n, None)?);
        let raw = raw_decode(llama, &prefilled, n, &Capture::default())?;
        record("forward_only_tokens_per_s", raw);
        let capture = Capture {
            attention_layers: attention_layers.iter().copied().collect(),
            ..Capture::default()
        };
        record(
            "attention_capture_tokens_per_s",
            raw_decode(llama, &prefilled, n, &capture)?,
        );
        record(
            "busy_thread_decode_tokens_per_s",
            engine_decode(&model, n, Some(BusyThread::start()))?,
        );
    }
    let step = forward_ms.get(&1).map_or(f64::NAN, Samples::median);
    let ratio_to_step = |k: usize| forward_ms.get(&k).map_or(f64::NAN, |s| s.median() / step);
    let median = |name: &str| figures.get(name).map_or(f64::NAN, Samples::median);
    let decode = median("decode_tokens_per_s");
    let cost = |name: &str| match (figures.get(name), figures.get("forward_only_tokens_per_s")) {
        (Some(with), Some(without)) => with.paired_cost(without),
        _ => f64::NAN,
    };

    // The same cost after a long context (attention over the cache grows with every verified token), and the
    // slope between the two, unclamped; not measured for a model whose context is too short.
    let short_cost = calibrate::raw_draft_cost(ratio_to_step(4));
    let (long_cost, growth) = match calibrate::long_prefix(llama) {
        Some(prefix) => {
            let long = calibrate::raw_draft_cost_after(llama, prefix, runs)?;
            let growth =
                calibrate::raw_growth((calibrate::PREFIX_TOKENS, short_cost), (prefix, long));
            (long, growth.unwrap_or(f64::NAN))
        }
        None => (f64::NAN, f64::NAN),
    };

    let memory = if args.no_memory {
        None
    } else {
        Some(peak_memory(&model)?)
    };
    let reference = if args.reference {
        Some(run_reference(
            &args.reference_script,
            &path,
            runs,
            n,
            threads,
        )?)
    } else {
        None
    };

    let mut report = json!({
        "model": llama.info.file_name,
        "weight_format": llama.info.weight_format,
        // The matmul arithmetic (`--matmul`): block sums or ggml's `vec_dot`.
        "matmul": llama.info.matmul.as_deref().unwrap_or(Kernels::VecDot.name()),
        "threads": threads,
        "runs": runs,
        "load_ms": round(load_ms),
        "prompt_tokens": prompt.len(),
        "decode_tokens": n,
        "forward_ms_after_64_token_prefill": forward_ms.iter()
            .map(|(k, s)| (k.to_string(), s.json())).collect::<BTreeMap<_, _>>(),
        "verify8_over_step": round(ratio_to_step(8)),
        "verify16_over_step": round(ratio_to_step(16)),
        // What one drafted token adds to a 4-token verification, in one-token steps: the cost `--draft-cost`
        // takes.
        "verify_token_cost": round(short_cost),
        // The same after a 1,024-token context, and its growth per 1,000 tokens: what `--draft-cost-growth`
        // takes.
        "verify_token_cost_after_1024_tokens": round(long_cost),
        "verify_token_cost_growth": round(growth),
        // What recording the trace costs: the engine's decode against bare forwards with an argmax, run by run.
        "trace_capture_cost": round(cost("decode_tokens_per_s")),
        "attention_capture_cost_last_2_layers": round(cost("attention_capture_tokens_per_s")),
        "busy_thread_over_idle": round(median("busy_thread_decode_tokens_per_s") / decode),
    });
    for (name, samples) in &figures {
        report[*name] = samples.json();
    }
    if let Some(m) = &memory {
        report["peak_memory_mb"] = json!(round(m.peak_mb));
        report["memory_runs"] = json!(format!("{MEMORY_RUNS} runs of {MEMORY_RUN_TOKENS} tokens"));
        report["resident_before_memory_runs_mb"] = json!(round(m.resident_before_mb));
    }
    if let Some(r) = &reference {
        report["llama_cpp"] = json!({
            "decode_tokens_per_s": r.decode.json(),
            "prefill_tokens_per_s": r.prefill.json(),
        });
        report["decode_ratio_to_llama_cpp"] = json!(round(decode / r.decode.median()));
        report["prefill_ratio_to_llama_cpp"] =
            json!(round(median("prefill_tokens_per_s") / r.prefill.median()));
        report["greedy_ids_equal_llama_cpp"] = json!(r.ids == greedy_ids(llama, &prompt, n)?);
    }
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "model {} ({}), {threads} thread(s), {runs} runs, figures are min / median / max",
        llama.info.file_name, llama.info.weight_format
    );
    for (name, samples) in &figures {
        println!("{name:<36} {}", samples.text());
    }
    for (k, s) in &forward_ms {
        println!(
            "forward of {k:>2} tokens (ms)              {}  ({:.2}x one step)",
            s.text(),
            s.median() / step
        );
    }
    for key in [
        "verify_token_cost",
        "verify_token_cost_after_1024_tokens",
        "verify_token_cost_growth",
        "trace_capture_cost",
        "attention_capture_cost_last_2_layers",
        "busy_thread_over_idle",
        "peak_memory_mb",
        "resident_before_memory_runs_mb",
        "decode_ratio_to_llama_cpp",
        "prefill_ratio_to_llama_cpp",
        "greedy_ids_equal_llama_cpp",
    ] {
        if let Some(v) = report.get(key) {
            println!("{key:<36} {v}");
        }
    }
    if let Some(r) = &reference {
        println!("llama.cpp decode tokens/s             {}", r.decode.text());
        println!("llama.cpp prefill tokens/s            {}", r.prefill.text());
    }
    Ok(())
}

/// Feeds `tokens` after what `cache` holds, as a chain, and returns the last position's logits.
fn feed(llama: &Llama, cache: &mut KvCache, tokens: &[u32], capture: &Capture) -> Result<Vec<f32>> {
    let start = cache.len();
    let positions: Vec<usize> = (start..start + tokens.len()).collect();
    let out = llama.forward(
        cache,
        tokens,
        &positions,
        1,
        &Mask::Causal,
        Logits::Last,
        capture,
    )?;
    Ok(logits_row(&out.logits, 0, 0)?)
}

/// Plain greedy decoding of `text` through the real engine, as users run it.
fn greedy_spec(text: String, max_tokens: usize) -> RunSpec {
    RunSpec {
        method: "greedy".into(),
        params: MethodParams {
            sampling: SamplingParams::greedy(),
            ..MethodParams::default()
        },
        prompt: PromptSpec {
            text,
            chat: false,
            system: None,
        },
        max_tokens,
        ..RunSpec::default()
    }
}

fn timed_prefill(llama: &Llama, prompt: &[u32]) -> Result<(KvCache, f64)> {
    let mut cache = llama.new_cache();
    let t = Instant::now();
    feed(llama, &mut cache, prompt, &Capture::default())?;
    Ok((cache, ms(t)))
}

fn engine_decode(model: &Model, n: usize, busy: Option<BusyThread>) -> Result<f64> {
    let mut run = Run::new(model, greedy_spec(BENCH_TEXT.into(), n))?;
    let never = AtomicBool::new(false);
    while !run.is_finished() {
        run.step(&never)?;
    }
    drop(busy);
    let trace = run.into_trace();
    let timing = trace
        .summary
        .as_ref()
        .and_then(|s| s.timing)
        .context("the decode run recorded no timing")?;
    Ok(timing.decode_tokens_per_s)
}

/// Bare forwards with an argmax, no trace: the model's own decode speed.
fn raw_decode(llama: &Llama, prefilled: &KvCache, n: usize, capture: &Capture) -> Result<f64> {
    let mut cache = prefilled.clone();
    let mut token = 504u32;
    let t = Instant::now();
    for _ in 0..n {
        token = argmax(&feed(llama, &mut cache, &[token], capture)?);
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Our greedy continuation of the prompt (stopping where llama.cpp's runner stops: before an end token).
fn greedy_ids(llama: &Llama, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut cache = llama.new_cache();
    let mut ids = vec![argmax(&feed(
        llama,
        &mut cache,
        prompt,
        &Capture::default(),
    )?)];
    while ids.len() < n {
        let Some(&last) = ids.last() else { break };
        if last == 0 || last == 2 {
            break;
        }
        ids.push(argmax(&feed(
            llama,
            &mut cache,
            &[last],
            &Capture::default(),
        )?));
    }
    ids.retain(|&id| id != 0 && id != 2);
    Ok(ids)
}

/// A thread that spins until dropped: the "one busy thread beside it" of the contention figure.
struct BusyThread {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl BusyThread {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut x = 0u64;
            while !flag.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for BusyThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct Memory {
    peak_mb: f64,
    /// Resident before the four runs: the model and what the other figures left allocated.
    resident_before_mb: f64,
}

/// Peak resident memory with the model loaded and four runs open whose contexts hold 2,000 tokens each
/// (a long prompt plus 128 decoded steps with their trace records).
fn peak_memory(model: &Model) -> Result<Memory> {
    let resident_before_mb = status_mb("VmRSS:")?;
    let unit = model.tokenizer.encode(BENCH_TEXT)?.len().max(1);
    let decoded = 128;
    let repeats = (MEMORY_RUN_TOKENS - decoded) / unit;
    let text = vec![BENCH_TEXT; repeats].join(" ");
    let never = AtomicBool::new(false);
    let mut open = Vec::new();
    for _ in 0..MEMORY_RUNS {
        let max_tokens = MEMORY_RUN_TOKENS.saturating_sub(repeats * unit + 1);
        let mut run = Run::new(model, greedy_spec(text.clone(), max_tokens))?;
        while !run.is_finished() {
            run.step(&never)?;
        }
        open.push(run);
    }
    let peak_mb = status_mb("VmHWM:")?;
    drop(open);
    Ok(Memory {
        peak_mb,
        resident_before_mb,
    })
}

/// A memory figure of this process from /proc/self/status, in MB.
fn status_mb(key: &str) -> Result<f64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .context("memory figures need /proc/self/status (Linux)")
}

struct Reference {
    decode: Samples,
    prefill: Samples,
    ids: Vec<u32>,
}

/// Runs llama.cpp on the bench prompt `runs` times (one process, one model load) with the same threads.
fn run_reference(
    script: &Path,
    model: &Path,
    runs: usize,
    n: usize,
    threads: usize,
) -> Result<Reference> {
    if !script.is_file() {
        bail!(
            "the llama.cpp runner {} is missing (pass --reference-script)",
            script.display()
        );
    }
    let prompts = std::env::temp_dir().join(format!("specula-bench-{}.jsonl", std::process::id()));
    let line = json!({"id": "bench", "text": BENCH_TEXT}).to_string();
    std::fs::write(&prompts, vec![line; runs].join("\n") + "\n")
        .with_context(|| format!("writing {}", prompts.display()))?;
    let output = Command::new(script)
        .arg("--model")
        .arg(model)
        .arg("--prompts")
        .arg(&prompts)
        .args([
            "--max-tokens",
            &n.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .output()
        .with_context(|| format!("running {}", script.display()));
    let _ = std::fs::remove_file(&prompts);
    let output = output?;
    if !output.status.success() {
        bail!(
            "llama.cpp runner failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut reference = Reference {
        decode: Samples::default(),
        prefill: Samples::default(),
        ids: Vec::new(),
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(row) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let number = |key: &str| row.get(key).and_then(Value::as_f64);
        let prompt_len = row
            .get("prompt_ids")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if let (Some(decode), Some(prefill_ms)) = (number("decode_tok_s"), number("prefill_ms")) {
            reference.decode.push(decode);
            reference
                .prefill
                .push(prompt_len as f64 * 1000.0 / prefill_ms);
        }
        if let Some(ids) = row.get("ids").and_then(Value::as_array) {
            reference.ids = ids
                .iter()
                .filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
                .collect();
        }
    }
    if reference.decode.0.is_empty() {
        bail!(
            "the llama.cpp runner printed no measurements: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(reference)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cost is taken run by run: a run in which both sides ran slower costs what its own pair says.
    #[test]
    fn capture_cost_pairs_each_run_with_its_own_base() {
        let with = Samples(vec![95.0, 47.5, 190.0]);
        let without = Samples(vec![100.0, 50.0, 200.0]);
        assert!((with.paired_cost(&without) - 0.05).abs() < 1e-12);
        // The same figures paired with the wrong runs: slow against fast looks like a 52% cost.
        let misordered = Samples(vec![47.5, 190.0, 95.0]);
        assert!((misordered.paired_cost(&without) - 0.525).abs() < 1e-12);
        assert!(Samples(vec![]).paired_cost(&without).is_nan());
    }
}
