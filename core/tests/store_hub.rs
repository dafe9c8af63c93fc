#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The model store against a fake Hugging Face hub on loopback.
//!
//! The fake hub answers the way huggingface.co does for an LFS file, which
//! is what hf-hub 0.5 expects:
//! - `GET /{repo}/resolve/{revision}/{file}` answers `302` with `X-Repo-Commit`,
//!   `X-Linked-Etag` (the file's sha256), `X-Linked-Size` and a `Location`
//!   pointing at a CDN URL (`/cdn/{sha256}` on the same server);
//! - the CDN URL serves the bytes and honours `Range: bytes=a-b` / `bytes=a-`
//!   with `206` and `Content-Range: bytes a-b/total` (hf-hub reads the size
//!   from `bytes=0-0`, then downloads with `bytes=N-`, resuming partial files);
//! - anything else is a `404` with `X-Error-Code: EntryNotFound`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use specula_core::store::{
    DEFAULT_HUB_REPO, DEFAULT_MODEL_FILE, HubConfig, ModelSource, ModelStore, StoreError,
    sha256_file,
};

const REPO: &str = "test-org/test-model";
const FILE: &str = "tiny.gguf";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const FILE_LEN: usize = 64 * 1024;
/// How long the server holds back the rest of a stalled body. A download that
/// cannot be cancelled mid-transfer takes at least this long.
const STALL: Duration = Duration::from_secs(10);

fn tiny_bytes() -> Vec<u8> {
    // Deterministic, not constant, so an offset bug in range handling shows.
    let mut state: u32 = 0x1234_5678;
    (0..FILE_LEN)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect()
}

struct FakeFile {
    bytes: Vec<u8>,
    sha256: String,
}

struct FakeHub {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// "GET <path> <range>" per request, in arrival order.
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    /// Serves `files` (path in repo -> bytes) for [`REPO`]. With `stall`, the
    /// first full body (a range starting at 0 that is not the `0-0` probe)
    /// sends half the bytes, then waits up to [`STALL`] for the client to hang up.
    fn start(files: Vec<(&str, Vec<u8>)>, stall: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files: HashMap<String, FakeFile> = files
            .into_iter()
            .map(|(name, bytes)| {
                let path = dir.path().join("f");
                std::fs::write(&path, &bytes).unwrap();
                let sha256 = sha256_file(&path).unwrap();
                (name.to_owned(), FakeFile { bytes, sha256 })
            })
            .collect();

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));

        let thread = {
            let stop = Arc::clone(&stop);
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut stall_pending = stall;
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut served = 0;
                // Bounded three ways: stop flag, deadline, connection count.
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && served < 64 {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            served += 1;
                            serve(stream, addr, &files, &log, &mut stall_pending);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self {
            addr,
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request per connection (`Connection: close`), like a minimal HTTP/1.1 server.
fn serve(
    mut stream: TcpStream,
    addr: SocketAddr,
    files: &HashMap<String, FakeFile>,
    log: &Mutex<Vec<String>>,
    stall_pending: &mut bool,
) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let range = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
        .map(|(_, v)| v.trim().to_owned());
    log.lock().unwrap().push(format!(
        "{method} {path} {}",
        range.as_deref().unwrap_or("-")
    ));

    let resolve_prefix = format!("/{REPO}/resolve/main/");
    if let Some(name) = path.strip_prefix(&resolve_prefix)
        && let Some(file) = files.get(name)
    {
        let headers = format!(
            "X-Repo-Commit: {COMMIT}\r\nX-Linked-Etag: \"{sha}\"\r\nX-Linked-Size: {len}\r\n\
             ETag: \"gitsha-of-pointer\"\r\nLocation: http://{addr}/cdn/{sha}?signed=1\r\n",
            sha = file.sha256,
            len = file.bytes.len(),
        );
        respond(&mut stream, "302 Found", &headers, b"");
        return;
    }
    if let Some(sha) = path
        .strip_prefix("/cdn/")
        .and_then(|rest| rest.split('?').next())
        && let Some(file) = files.values().find(|f| f.sha256 == sha)
    {
        serve_bytes(&mut stream, &file.bytes, range.as_deref(), stall_pending);
        return;
    }
    respond(
        &mut stream,
        "404 Not Found",
        "X-Error-Code: EntryNotFound\r\nX-Error-Message: Entry not found\r\n",
        b"Entry not found",
    );
}

fn serve_bytes(stream: &mut TcpStream, bytes: &[u8], range: Option<&str>, stall: &mut bool) {
    let total = bytes.len();
    let Some(range) = range else {
        respond(stream, "200 OK", "Accept-Ranges: bytes\r\n", bytes);
        return;
    };
    let parsed = range.strip_prefix("bytes=").and_then(|r| {
        let (start, end) = r.split_once('-')?;
        let start: usize = start.parse().ok()?;
        let end: usize = if end.is_empty() {
            total.checked_sub(1)?
        } else {
            end.parse::<usize>().ok()?.min(total.checked_sub(1)?)
        };
        (start <= end).then_some((start, end))
    });
    let Some((start, end)) = parsed else {
        let headers = format!("Content-Range: bytes */{total}\r\n");
        respond(stream, "416 Range Not Satisfiable", &headers, b"");
        return;
    };
    let body = &bytes[start..=end];
    let headers = format!("Accept-Ranges: bytes\r\nContent-Range: bytes {start}-{end}/{total}\r\n");
    if *stall && start == 0 && end > 0 {
        *stall = false;
        let half = body.len() / 2;
        write_head(stream, "206 Partial Content", &headers, body.len());
        let _ = stream.write_all(&body[..half]);
        let _ = stream.flush();
        // A client that aborts closes the socket: read returns 0 or an error
        // at once. One that does not will wait out the whole stall.
        let _ = stream.set_read_timeout(Some(STALL));
        let mut sink = [0u8; 64];
        if let Ok(n) = stream.read(&mut sink)
            && n > 0
        {
            return;
        }
        let _ = stream.write_all(&body[half..]);
        return;
    }
    respond(stream, "206 Partial Content", &headers, body);
}

fn write_head(stream: &mut TcpStream, status: &str, headers: &str, len: usize) {
    let head =
        format!("HTTP/1.1 {status}\r\n{headers}Content-Length: {len}\r\nConnection: close\r\n\r\n");
    let _ = stream.write_all(head.as_bytes());
}

fn respond(stream: &mut TcpStream, status: &str, headers: &str, body: &[u8]) {
    write_head(stream, status, headers, body.len());
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

fn hub_config(hub: &FakeHub, file: &str) -> HubConfig {
    HubConfig {
        endpoint: Some(hub.endpoint()),
        repo: REPO.to_owned(),
        file: file.to_owned(),
        revision: None,
    }
}

fn hub_source(file: &str) -> ModelSource {
    ModelSource::Hub {
        repo: REPO.to_owned(),
        file: file.to_owned(),
        revision: None,
    }
}

/// A store that sees only `cache` (no search dirs, never the real home).
fn store_for(hub: &FakeHub, cache: &Path, file: &str) -> ModelStore {
    ModelStore::with_dirs(Vec::new(), Some(cache.to_path_buf())).with_hub(hub_config(hub, file))
}

#[test]
fn download_fills_hf_cache_then_resolves_offline() {
    let bytes = tiny_bytes();
    let mut hub = FakeHub::start(vec![(FILE, bytes.clone())], false);
    let cache = tempfile::tempdir().unwrap();
    let store = store_for(&hub, cache.path(), FILE);

    let mut reports = Vec::new();
    let cancel = AtomicBool::new(false);
    let path = store
        .download(&mut |done, total| reports.push((done, total)), &cancel)
        .unwrap();

    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(reports.last(), Some(&(FILE_LEN as u64, FILE_LEN as u64)));
    assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0), "{reports:?}");
    assert!(reports.iter().all(|&(_, total)| total == FILE_LEN as u64));

    // hf-hub's layout: refs/main -> commit, snapshots/<commit>/<file> -> blobs/<etag>.
    let repo_dir = cache.path().join("models--test-org--test-model");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    assert_eq!(path, repo_dir.join("snapshots").join(COMMIT).join(FILE));
    let sha = sha256_file(&path).unwrap();
    assert_eq!(
        std::fs::read(repo_dir.join("blobs").join(&sha)).unwrap(),
        bytes
    );
    #[cfg(unix)]
    assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());

    // The probe and the body both went through the hub redirect to the CDN.
    let requests = hub.requests();
    assert!(requests.contains(&format!("GET /{REPO}/resolve/main/{FILE} bytes=0-0")));
    assert!(requests.contains(&format!("GET /cdn/{sha}?signed=1 bytes=0-")));

    hub.shutdown();
    assert_eq!(store.resolve(&hub_source(FILE)).unwrap(), path);
}

#[test]
fn endpoint_comes_from_explicit_config() {
    let config = HubConfig {
        endpoint: Some("http://127.0.0.1:9/mirror/".to_owned()),
        ..HubConfig::default()
    };
    assert_eq!(config.resolved_endpoint(), "http://127.0.0.1:9/mirror");
    assert_eq!(config.repo, DEFAULT_HUB_REPO);
    assert_eq!(config.file, DEFAULT_MODEL_FILE);
}

#[test]
fn cancel_before_download_makes_no_request() {
    let hub = FakeHub::start(vec![(FILE, tiny_bytes())], false);
    let cache = tempfile::tempdir().unwrap();
    let store = store_for(&hub, cache.path(), FILE);

    let mut calls = 0;
    let cancel = AtomicBool::new(true);
    let err = store.download(&mut |_, _| calls += 1, &cancel).unwrap_err();

    assert!(matches!(err, StoreError::Cancelled), "{err:?}");
    assert_eq!(calls, 0);
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
    assert!(store.resolve(&hub_source(FILE)).is_err());
}

#[test]
fn cancel_mid_transfer_stops_at_once_and_a_later_download_resumes() {
    let bytes = tiny_bytes();
    let hub = FakeHub::start(vec![(FILE, bytes.clone())], true);
    let cache = tempfile::tempdir().unwrap();
    let store = store_for(&hub, cache.path(), FILE);

    let cancel = AtomicBool::new(false);
    let mut reported_after_cancel = false;
    let started = Instant::now();
    let err = store
        .download(
            &mut |done, _| {
                reported_after_cancel |= cancel.load(Ordering::Relaxed);
                if done > 0 {
                    cancel.store(true, Ordering::Relaxed);
                }
            },
            &cancel,
        )
        .unwrap_err();

    assert!(matches!(err, StoreError::Cancelled), "{err:?}");
    assert!(!reported_after_cancel);
    // The server held the second half back for STALL; only a real abort is quick.
    assert!(
        started.elapsed() < STALL / 2,
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(
        store.resolve(&hub_source(FILE)),
        Err(StoreError::NotFound { .. })
    ));

    let mut last = (0, 0);
    let path = store
        .download(
            &mut |done, total| last = (done, total),
            &AtomicBool::new(false),
        )
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(last, (FILE_LEN as u64, FILE_LEN as u64));
    // The second attempt asked only for what the first had not written.
    let resumed = hub
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /cdn/"))
        .any(|r| !r.ends_with(" bytes=0-0") && !r.ends_with(" bytes=0-"));
    assert!(resumed, "{:?}", hub.requests());
}

#[test]
fn missing_file_on_hub_is_a_hub_error_naming_the_url() {
    let hub = FakeHub::start(vec![(FILE, tiny_bytes())], false);
    let cache = tempfile::tempdir().unwrap();
    let store = store_for(&hub, cache.path(), "missing.gguf");

    let err = store
        .download(&mut |_, _| {}, &AtomicBool::new(false))
        .unwrap_err();

    let StoreError::Hub { message } = &err else {
        panic!("expected a hub error, got {err:?}");
    };
    let url = format!("{}/{REPO}/resolve/main/missing.gguf", hub.endpoint());
    assert!(message.contains(&url), "{message}");
    assert!(message.contains("404"), "{message}");
    assert!(err.to_string().contains("Check the repository"), "{err}");
}

#[test]
fn default_file_with_wrong_bytes_is_a_checksum_mismatch_and_is_dropped() {
    let hub = FakeHub::start(vec![(DEFAULT_MODEL_FILE, tiny_bytes())], false);
    let cache = tempfile::tempdir().unwrap();
    let store = store_for(&hub, cache.path(), DEFAULT_MODEL_FILE);

    let err = store
        .download(&mut |_, _| {}, &AtomicBool::new(false))
        .unwrap_err();

    let StoreError::ChecksumMismatch { actual, .. } = &err else {
        panic!("expected a checksum mismatch, got {err:?}");
    };
    let expected_actual = {
        let path = cache.path().join("bytes");
        std::fs::write(&path, tiny_bytes()).unwrap();
        sha256_file(&path).unwrap()
    };
    assert_eq!(actual, &expected_actual);
    // The bad file must not be found offline later.
    assert!(store.resolve(&ModelSource::Default).is_err());
    assert!(store.resolve(&hub_source(DEFAULT_MODEL_FILE)).is_err());
}

#[test]
fn resolve_path_requires_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = ModelStore::with_dirs(Vec::new(), None);

    let missing = dir.path().join("nope.gguf");
    let err = store
        .resolve(&ModelSource::Path(missing.clone()))
        .unwrap_err();
    assert!(matches!(&err, StoreError::NotAFile { path } if *path == missing));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let err = store
        .resolve(&ModelSource::Path(dir.path().to_path_buf()))
        .unwrap_err();
    assert!(matches!(err, StoreError::NotAFile { .. }), "{err:?}");

    let file = dir.path().join("m.gguf");
    std::fs::write(&file, b"GGUF").unwrap();
    assert_eq!(
        store.resolve(&ModelSource::Path(file.clone())).unwrap(),
        file
    );
}

#[test]
fn resolve_default_uses_first_search_dir_holding_the_file() {
    let empty = tempfile::tempdir().unwrap();
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    std::fs::write(first.path().join(DEFAULT_MODEL_FILE), b"a").unwrap();
    std::fs::write(second.path().join(DEFAULT_MODEL_FILE), b"b").unwrap();
    let dirs = vec![
        empty.path().to_path_buf(),
        first.path().to_path_buf(),
        second.path().to_path_buf(),
    ];
    let store = ModelStore::with_dirs(dirs, None);

    assert_eq!(
        store.resolve(&ModelSource::Default).unwrap(),
        first.path().join(DEFAULT_MODEL_FILE)
    );
}

#[test]
fn resolve_default_falls_back_to_hf_cache_snapshot() {
    let cache = tempfile::tempdir().unwrap();
    let repo_dir: PathBuf = cache
        .path()
        .join("models--QuantFactory--SmolLM2-135M-Instruct-GGUF");
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
    std::fs::write(snapshot.join(DEFAULT_MODEL_FILE), b"gguf").unwrap();
    let empty = tempfile::tempdir().unwrap();
    let store = ModelStore::with_dirs(
        vec![empty.path().to_path_buf()],
        Some(cache.path().to_path_buf()),
    );

    assert_eq!(
        store.resolve(&ModelSource::Default).unwrap(),
        snapshot.join(DEFAULT_MODEL_FILE)
    );
}

#[test]
fn resolve_default_with_nothing_explains_how_to_get_the_model() {
    let empty = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let store = ModelStore::with_dirs(
        vec![empty.path().to_path_buf()],
        Some(cache.path().to_path_buf()),
    );

    let err = store.resolve(&ModelSource::Default).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    let message = err.to_string();
    for needle in [
        "models/fetch.sh",
        "specula fetch-model",
        "--model PATH",
        &empty.path().display().to_string(),
    ] {
        assert!(message.contains(needle), "missing {needle:?} in: {message}");
    }
}
