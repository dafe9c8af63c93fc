//! Downloading the default model on a background thread, with progress and cancel, so the window stays live.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use specula_core::store::ModelStore;

enum Message {
    Progress { done: u64, total: u64 },
    Finished(Result<PathBuf, String>),
}

pub struct Download {
    messages: Receiver<Message>,
    cancel: Arc<AtomicBool>,
    pub done: u64,
    pub total: u64,
}

impl Download {
    /// Starts the download; `wake` is called whenever there is news (it requests a repaint).
    pub fn start(wake: Arc<dyn Fn() + Send + Sync>) -> Self {
        let (tx, messages) = crossbeam_channel::unbounded();
        let cancel = Arc::new(AtomicBool::new(false));
        let thread_cancel = cancel.clone();
        let spawned = std::thread::Builder::new()
            .name("specula-download".into())
            .spawn(move || {
                let mut last_sent = Instant::now();
                let mut progress = |done: u64, total: u64| {
                    // Progress arrives per network chunk; a few updates a second are plenty for a progress bar.
                    if last_sent.elapsed() >= Duration::from_millis(100) || done == total {
                        last_sent = Instant::now();
                        let _ = tx.send(Message::Progress { done, total });
                        wake();
                    }
                };
                let result = ModelStore::new()
                    .download(&mut progress, &thread_cancel)
                    .map_err(|e| e.to_string());
                let _ = tx.send(Message::Finished(result));
                wake();
            });
        let download = Self {
            messages,
            cancel,
            done: 0,
            total: 0,
        };
        if let Err(e) = spawned {
            // Nothing can run the download; report it through the same path as a failed one.
            let (tx, rx) = crossbeam_channel::bounded(1);
            let _ = tx.send(Message::Finished(Err(format!(
                "could not start the download thread: {e}"
            ))));
            return Self {
                messages: rx,
                ..download
            };
        }
        download
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelling(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Fraction done, when the size is known.
    pub fn fraction(&self) -> Option<f32> {
        (self.total > 0).then(|| self.done as f32 / self.total as f32)
    }

    /// Takes the news; returns the outcome once the download ended.
    pub fn poll(&mut self) -> Option<Result<PathBuf, String>> {
        loop {
            match self.messages.try_recv() {
                Ok(Message::Progress { done, total }) => {
                    self.done = done;
                    self.total = total;
                }
                Ok(Message::Finished(result)) => return Some(result),
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => {
                    return Some(Err(
                        "the download thread stopped without a result".to_owned()
                    ));
                }
            }
        }
    }
}
