//! Every version opens the previous versions' trace files: a file written with schema version 1 reads into
//! today's form with what its panels show unchanged, and saves as the current version. No model needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use specula_core::trace::{ExportOptions, SCHEMA_VERSION, Trace};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn a_version_1_trace_with_attention_reads_as_attention_maps_with_the_same_rows() {
    let path = root().join("tests/fixtures/trace-v1-lens-attention.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let runs = Trace::load(&path).unwrap();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run.header.schema_version, 1);
    let raw_steps: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "step")
        .collect();
    assert_eq!(raw_steps.len(), run.steps.len());
    let mut rows_checked = 0;
    for (step, raw) in run.steps.iter().zip(&raw_steps) {
        let raw_inspections = raw["inspection"].as_array().unwrap();
        assert_eq!(step.inspection.len(), raw_inspections.len());
        for (inspection, raw) in step.inspection.iter().zip(raw_inspections) {
            // The old form is gone once read; the lens is untouched.
            assert!(inspection.attention.is_empty());
            assert_eq!(inspection.lens.len(), raw["lens"].as_array().unwrap().len());
            let map = inspection.attention_map.as_ref().unwrap();
            assert_eq!(map.query(), inspection.position - 1);
            let layers = raw["attention"].as_array().unwrap();
            assert_eq!(map.layers().len(), layers.len());
            for (l, layer) in layers.iter().enumerate() {
                assert_eq!(map.layers()[l] as u64, layer["layer"].as_u64().unwrap());
                let rows = layer["heads"].as_array().unwrap();
                assert_eq!(map.heads() + 2, rows.len());
                for (r, old) in rows.iter().enumerate() {
                    let row = map.row(l, r).unwrap();
                    let keys: Vec<u32> = serde_json::from_value(old["keys"].clone()).unwrap();
                    let weights: Vec<f32> = serde_json::from_value(old["weights"].clone()).unwrap();
                    let covered = old["covered"].as_f64().unwrap() as f32;
                    assert_eq!(row.keys, keys);
                    // Version 1 rounded to 1e-4; the map's steps are 1/65535.
                    for (new, old) in row.weights.iter().zip(&weights) {
                        assert!((new - old).abs() <= 1e-5, "{new} vs {old}");
                    }
                    assert!((row.covered - covered.min(1.0)).abs() <= 1e-5);
                    rows_checked += 1;
                }
            }
        }
    }
    assert_eq!(
        rows_checked,
        31 * 30 * 11,
        "31 positions × 30 layers × 11 rows"
    );

    // Saved again, it is a current-version file that reads back the same.
    let mut bytes = Vec::new();
    run.write_jsonl(&mut bytes, ExportOptions::default())
        .unwrap();
    let again = Trace::read_jsonl(&bytes[..]).unwrap().remove(0);
    assert_eq!(again.header.schema_version, SCHEMA_VERSION);
    assert_eq!(again.steps, run.steps);
    assert!(!String::from_utf8(bytes).unwrap().contains("\"heads\":[{"));
}

#[test]
fn every_example_trace_reads() {
    let dir = root().join("assets/traces");
    let mut read = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "jsonl") {
            let runs = Trace::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                runs.iter()
                    .all(|r| r.header.schema_version <= SCHEMA_VERSION)
            );
            read += 1;
        }
    }
    assert!(read >= 10, "{read} example traces");
}
