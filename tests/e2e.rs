//! End-to-end tests of the `specula` binary on the real default model: the `specula run` contract, clear errors
//! on bad input, `specula bench`, lookahead's SJD under sampling, and the real window under Xvfb.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn specula(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_specula"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("specula starts")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The last stdout line of `--json` runs, parsed.
fn json_line(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "specula failed: {}", stderr(out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("valid JSON")
}

#[test]
fn run_json_keeps_its_contract_and_writes_a_trace() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.jsonl");
    let out = specula(&[
        "run",
        "--chat",
        "--prompt",
        "Name a colour.",
        "--max-tokens",
        "12",
        "--json",
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let v = json_line(&out);
    for key in [
        "prompt_ids",
        "token_ids",
        "text",
        "steps",
        "target_forward_calls",
        "wall_ms",
        "decode_tokens_per_s",
    ] {
        assert!(v.get(key).is_some(), "--json lacks `{key}`: {v}");
    }
    let ids = v["token_ids"].as_array().unwrap();
    assert!(!ids.is_empty() && ids.len() <= 12);
    assert_eq!(
        v["prompt_ids"][0], 1,
        "chat prompts start with <|im_start|>"
    );
    let runs = specula_core::Trace::load(&trace).unwrap();
    assert_eq!(
        runs[0].token_ids().map(u64::from).collect::<Vec<_>>(),
        ids.iter().map(|i| i.as_u64().unwrap()).collect::<Vec<_>>()
    );

    // Seeded sampling is reproducible through the CLI too, byte for byte with --deterministic.
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.jsonl");
    for path in [&a, &b] {
        let out = specula(&[
            "run",
            "--prompt",
            "Once upon a time",
            "--method",
            "sample",
            "--temperature",
            "0.8",
            "--top-p",
            "0.95",
            "--seed",
            "11",
            "--max-tokens",
            "10",
            "--deterministic",
            "--trace",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "run".into(),
                "--prompt".into(),
                "hi".into(),
                "--method".into(),
                "nope".into(),
            ],
            "unknown decoding method",
        ),
        (
            vec![
                "run".into(),
                "--prompt".into(),
                "hi".into(),
                "--method".into(),
                "sample".into(),
                "--top-p".into(),
                "1.5".into(),
            ],
            "top_p",
        ),
        (
            vec![
                "run".into(),
                "--prompt-file".into(),
                "/no/such/prompt.txt".into(),
            ],
            "cannot read the prompt file",
        ),
        (
            vec!["run".into(), "--prompt".into(), "word ".repeat(9000)],
            "context holds only 8192",
        ),
        (
            vec![
                "--model".into(),
                "/no/such/model.gguf".into(),
                "run".into(),
                "--prompt".into(),
                "hi".into(),
            ],
            "/no/such/model.gguf",
        ),
        (
            vec![
                "run".into(),
                "--prompt".into(),
                "hi".into(),
                "--max-tokens".into(),
                "0".into(),
            ],
            "max_tokens",
        ),
    ];
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF but not really").unwrap();
    let mut cases = cases;
    cases.push((
        vec![
            "--model".into(),
            junk.to_string_lossy().into(),
            "run".into(),
            "--prompt".into(),
            "hi".into(),
        ],
        "junk.gguf",
    ));
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = specula(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains(expected),
            "{args:?}: stderr lacks `{expected}`:\n{err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    }
}

#[test]
fn bench_prints_its_figures() {
    let v = json_line(&specula(&[
        "bench",
        "--json",
        "--decode-tokens",
        "16",
        "--runs",
        "1",
        "--no-memory",
    ]));
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "forward_only_tokens_per_s",
        "attention_capture_tokens_per_s",
        "busy_thread_decode_tokens_per_s",
    ] {
        let median = v[key]["median"].as_f64();
        assert!(
            median.is_some_and(|m| m > 0.0),
            "bench --json lacks `{key}`: {v}"
        );
    }
    for key in [
        "verify8_over_step",
        "verify16_over_step",
        "verify_token_cost",
        "verify_token_cost_after_1024_tokens",
        "verify_token_cost_growth",
        "trace_capture_cost",
        "attention_capture_cost_last_2_layers",
        "busy_thread_over_idle",
    ] {
        assert!(v[key].is_f64(), "bench --json lacks `{key}`: {v}");
    }
    for k in ["1", "2", "4", "8", "16"] {
        let ms = v["forward_ms_after_64_token_prefill"][k]["median"].as_f64();
        assert!(
            ms.is_some_and(|ms| ms > 0.0),
            "no {k}-token forward time: {v}"
        );
    }
}

/// `bench --spec-bench` prints Spec-Bench's table (MAT and speedup per category, a JSON row per drafter) and takes
/// the draft-length policies; the two adaptive policies exclude each other, and the cost's growth needs the cost.
#[test]
fn spec_bench_prints_its_table_with_a_cost_aware_drafter() {
    let out = specula(&[
        "bench",
        "--spec-bench",
        "1",
        "--category",
        "writing",
        "--drafters",
        "prompt-lookup,layer-skip",
        "--max-tokens",
        "12",
        "--draft-cost",
        "0.3",
        "--draft-cost-growth",
        "0.2",
        "--draft-len",
        "6",
    ]);
    let table = json_line(&out);
    for drafter in ["prompt-lookup", "layer-skip"] {
        let cell = &table[drafter]["writing"];
        assert_eq!(cell["prompts"], 1, "{table}");
        assert_eq!(cell["not_identical_to_greedy"], 0, "{table}");
        // Per draft-and-verify step at least the verifier's own token (MAT also counts the prefill forward).
        assert!(
            cell["tokens_per_step"].as_f64().is_some_and(|m| m >= 1.0),
            "{table}"
        );
        assert!(
            cell["mean_accepted_tokens"]
                .as_f64()
                .is_some_and(|m| m > 0.5),
            "{table}"
        );
        assert!(cell["speedup"].as_f64().is_some_and(|s| s > 0.0), "{table}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| prompt-lookup "), "{stdout}");

    let both = specula(&[
        "bench",
        "--spec-bench",
        "1",
        "--adaptive",
        "0.5",
        "--draft-cost",
        "0.3",
    ]);
    assert!(!both.status.success());
    assert!(
        stderr(&both).contains("cannot be used with"),
        "{}",
        stderr(&both)
    );
    // The cost's growth with context prices nothing without the cost itself.
    let growth_alone = specula(&["bench", "--spec-bench", "1", "--draft-cost-growth", "0.2"]);
    assert!(!growth_alone.status.success());
    assert!(
        stderr(&growth_alone).contains("--draft-cost <C>"),
        "{}",
        stderr(&growth_alone)
    );
}

/// Lookahead under sampling follows SJD: `--json` reports acceptance, and in the trace the Jacobi window's
/// guesses carry the q they were sampled from (greedy lookahead's guesses are point masses, q = 1), and their
/// argmax siblings are labelled as such.
#[test]
fn lookahead_sampling_reports_acceptance_and_records_q() {
    use specula_core::trace::{DraftKind, DraftStatus};
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("sjd.jsonl");
    let v = json_line(&specula(&[
        "run",
        "--chat",
        "--prompt",
        "Explain how a bicycle works.",
        "--max-tokens",
        "48",
        "--method",
        "speculative",
        "--drafter",
        "lookahead",
        "--temperature",
        "0.8",
        "--top-p",
        "0.95",
        "--seed",
        "7",
        "--json",
        "--trace",
        trace.to_str().unwrap(),
    ]));
    for key in [
        "draft_n",
        "draft_n_accepted",
        "acceptance_rate",
        "mean_accepted_tokens",
        "mean_alpha",
    ] {
        assert!(v[key].is_number(), "--json lacks `{key}`: {v}");
    }
    assert!(v["draft_n"].as_u64().is_some_and(|n| n > 0), "{v}");
    // The measured speedup: the plain run's wall clock over the speculative run's.
    let (speedup, plain, wall) = (
        v["speedup"].as_f64().unwrap(),
        v["plain_wall_ms"].as_f64().unwrap(),
        v["wall_ms"].as_f64().unwrap(),
    );
    assert!(plain > 0.0 && wall > 0.0, "{v}");
    assert!((speedup - plain / wall).abs() < 1e-9, "{v}");
    let runs = specula_core::Trace::load(&trace).unwrap();
    let run = runs
        .iter()
        .find(|r| r.header.method == "speculative")
        .expect("the speculative run is in the trace");
    let mut sampled = 0;
    let (mut siblings, mut siblings_tested) = (0, 0);
    for step in &run.steps {
        let Some(specula_core::trace::StepPayload::Speculative(p)) = &step.payload else {
            continue;
        };
        assert_eq!(p.verifier, "sampling");
        assert!(p.note.starts_with("SJD window"), "{}", p.note);
        assert!(p.note.contains("argmax sibling(s)"), "{}", p.note);
        sampled += p
            .nodes
            .iter()
            .filter(|n| n.q < 1.0 && n.status != DraftStatus::Unverified)
            .count();
        // Argmax siblings are labelled point masses, each right after a sampled guess under the same parent;
        // once tested, the trace gives the residual they met.
        for (i, n) in p.nodes.iter().enumerate() {
            if n.kind != DraftKind::ArgmaxSibling {
                continue;
            }
            siblings += 1;
            assert_eq!(n.q, 1.0);
            let guess = p
                .nodes
                .iter()
                .take(i)
                .rposition(|m| m.parent == n.parent)
                .expect("a sibling follows its guess");
            assert_eq!(p.nodes[guess].kind, DraftKind::Sampled);
            assert_ne!(p.nodes[guess].id, n.id);
            if n.status != DraftStatus::Unverified {
                siblings_tested += 1;
                assert_eq!(p.nodes[guess].status, DraftStatus::Rejected);
                assert!(
                    n.residual.is_some(),
                    "a tested sibling without its residual"
                );
            }
        }
    }
    assert!(sampled > 0, "no verified window guess had q below 1");
    assert!(
        siblings_tested > 0,
        "no argmax sibling was tested ({siblings} drafted)"
    );
}

/// The real window under Xvfb: loads the default model, decodes 32 greedy tokens, exports the Plots panel as PNG
/// through the app's export command (what kittest cannot check: the real window's screenshot, cropped in its
/// pixels), saves a screenshot. The script checks the PNG against the screen; this checks it decodes at the size
/// the app reported. The test script (scripts/test.sh) and CI install Xvfb, xdotool and ImageMagick.
#[test]
fn real_window_under_xvfb_runs_greedy_and_exports_a_panel_as_png() {
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("xvfb-greedy.png");
    let png = dir.path().join("plots.png");
    let out = Command::new("bash")
        .arg(repo().join("scripts/xvfb_smoke.sh"))
        .arg(&shot)
        .arg(format!("Plots={}", png.display()))
        .env("SPECULA_BIN", env!("CARGO_BIN_EXE_specula"))
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "xvfb smoke test failed:\n{stdout}\n{}",
        stderr(&out)
    );
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "the screenshot is empty"
    );
    // "specula-export: pane="Plots" x=.. y=.. width=W height=H ok: Exported Plots (W×H pixels) to ..."
    let line = stdout
        .lines()
        .find(|l| l.contains("specula-export:"))
        .expect("the app reported the export");
    let field = |name: &str| -> u32 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    let (width, height) = (field("width"), field("height"));
    let image = image::open(&png).expect("the export is a PNG").to_rgba8();
    assert_eq!(image.dimensions(), (width, height), "{line}");
    assert!(
        width >= 200 && height >= 100 && width <= 1280 && height <= 800,
        "{line}"
    );
    let first = image.get_pixel(0, 0);
    assert!(
        image.pixels().filter(|p| *p != first).count() > (width * height / 10) as usize,
        "the exported panel is nearly blank"
    );
}
