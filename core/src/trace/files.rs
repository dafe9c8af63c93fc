//! Trace files: JSON Lines read and write (several runs per file), CSV export, atomic saves.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{RunHeader, RunSummary, SCHEMA_VERSION, StepRecord, Trace, TraceError};

/// One line of a trace file.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TraceLine {
    Header(Box<RunHeader>),
    Step(Box<StepRecord>),
    Summary(Box<RunSummary>),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// Leave out every wall-clock measurement, so that the same seed gives the same bytes.
    pub deterministic: bool,
}

impl Trace {
    pub fn write_jsonl(&self, w: &mut dyn Write, opts: ExportOptions) -> std::io::Result<()> {
        let mut header = self.header.clone();
        // A run read from an older file was upgraded on reading (`read_jsonl`): it is written in this schema.
        header.schema_version = SCHEMA_VERSION;
        let mut summary = self.summary.clone();
        if opts.deterministic {
            header.created_unix_ms = None;
            if let Some(s) = summary.as_mut() {
                s.timing = None;
            }
        }
        write_line(w, &TraceLine::Header(Box::new(header)))?;
        for step in &self.steps {
            if opts.deterministic && step.timing.is_some() {
                let mut step = step.clone();
                step.timing = None;
                write_line(w, &TraceLine::Step(Box::new(step)))?;
            } else {
                write_line(w, &TraceLine::Step(Box::new(step.clone())))?;
            }
        }
        if let Some(s) = summary {
            write_line(w, &TraceLine::Summary(Box::new(s)))?;
        }
        Ok(())
    }

    /// One row per generated token, for spreadsheets and plotting scripts.
    pub fn write_csv(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let mut out = csv::Writer::from_writer(w);
        out.write_record([
            "run",
            "step",
            "position",
            "token_id",
            "token",
            "logprob",
            "prob",
            "rank",
            "entropy",
            "sampling_prob",
            "source",
            "top1_token",
            "top1_logprob",
            "step_ms",
        ])?;
        for step in &self.steps {
            for t in &step.tokens {
                let top1 = t.top_logprobs.first();
                out.write_record([
                    self.header.label.clone(),
                    step.index.to_string(),
                    t.position.to_string(),
                    t.id.to_string(),
                    t.token.clone(),
                    t.logprob.to_string(),
                    t.prob().to_string(),
                    t.rank.to_string(),
                    t.entropy.to_string(),
                    t.sampling_prob.map(|p| p.to_string()).unwrap_or_default(),
                    serde_json::to_string(&t.source)
                        .unwrap_or_default()
                        .trim_matches('"')
                        .to_owned(),
                    top1.map(|c| c.token.clone()).unwrap_or_default(),
                    top1.map(|c| c.logprob.to_string()).unwrap_or_default(),
                    step.timing
                        .map(|t| format!("{:.3}", t.total_ms))
                        .unwrap_or_default(),
                ])?;
            }
        }
        out.flush()
    }

    /// Reads every run of a JSONL trace. Errors name the line and, through serde, the field.
    pub fn read_jsonl(r: impl BufRead) -> Result<Vec<Trace>, TraceError> {
        let mut runs: Vec<Trace> = Vec::new();
        for (i, line) in r.lines().enumerate() {
            let line_no = i + 1;
            let line = line.map_err(|e| TraceError::Parse {
                line: line_no,
                message: e.to_string(),
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let parsed: TraceLine = serde_json::from_str(&line).map_err(|e| TraceError::Parse {
                line: line_no,
                message: describe_json_error(&line, &e),
            })?;
            match parsed {
                TraceLine::Header(h) => {
                    if h.schema_version > SCHEMA_VERSION {
                        return Err(TraceError::TooNew {
                            line: line_no,
                            found: h.schema_version,
                            supported: SCHEMA_VERSION,
                        });
                    }
                    runs.push(Trace::new(*h));
                }
                TraceLine::Step(mut s) => match runs.last_mut() {
                    Some(run) => {
                        upgrade(&mut s).map_err(|message| TraceError::Parse {
                            line: line_no,
                            message,
                        })?;
                        run.steps.push(*s);
                    }
                    None => {
                        return Err(TraceError::NoHeader {
                            line: line_no,
                            kind: "step",
                        });
                    }
                },
                TraceLine::Summary(s) => match runs.last_mut() {
                    Some(run) => run.summary = Some(*s),
                    None => {
                        return Err(TraceError::NoHeader {
                            line: line_no,
                            kind: "summary",
                        });
                    }
                },
            }
        }
        if runs.is_empty() {
            return Err(TraceError::Empty);
        }
        Ok(runs)
    }

    pub fn load(path: &Path) -> Result<Vec<Trace>, TraceError> {
        let file = std::fs::File::open(path).map_err(|source| TraceError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::read_jsonl(std::io::BufReader::new(file))
    }
}

/// Brings a step read from an older schema to this one, so that nothing past the reader sees old forms.
fn upgrade(step: &mut StepRecord) -> Result<(), String> {
    for inspection in &mut step.inspection {
        inspection.upgrade().map_err(|e| {
            format!(
                "in a `step` record: the version-1 attention at position {}: {e}",
                inspection.position
            )
        })?;
    }
    Ok(())
}

fn write_line(w: &mut dyn Write, line: &TraceLine) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, line)?;
    w.write_all(b"\n")
}

/// serde_json says "missing field `token` at line 1 column 80"; the line is ours to name, so keep the field and
/// the column, and add which record kind it was.
fn describe_json_error(line: &str, e: &serde_json::Error) -> String {
    let kind = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned));
    match kind {
        Some(kind) => format!("in a `{kind}` record: {e}"),
        None => format!("not a trace record: {e}"),
    }
}

/// The file formats a set of runs can be saved in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    Jsonl,
    Csv,
}

impl FileFormat {
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("csv") => Self::Csv,
            _ => Self::Jsonl,
        }
    }
}

/// Saves runs so that a crash or a full disk never leaves a half-written file where a good one was: the data
/// goes to a temporary file in the same folder, is flushed to disk, then renamed over the target.
pub fn save_runs(
    path: &Path,
    runs: &[&Trace],
    format: FileFormat,
    opts: ExportOptions,
) -> Result<(), TraceError> {
    write_atomically(path, |w| {
        for run in runs {
            match format {
                FileFormat::Jsonl => run.write_jsonl(w, opts)?,
                FileFormat::Csv => run.write_csv(w)?,
            }
        }
        Ok(())
    })
}

/// Writes through `body` into a temporary sibling of `path`, then renames it into place.
pub fn write_atomically(
    path: &Path,
    body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), TraceError> {
    let err = |source| TraceError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        body(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        // The temporary file is ours and incomplete; failing to remove it changes nothing for the user.
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}
