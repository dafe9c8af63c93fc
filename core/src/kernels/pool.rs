//! A small compute pool for splitting one matmul's weight rows across threads.
//!
//! The caller always works too, and never waits for a helper to start: helpers claim chunks of rows from a shared
//! counter, so when a helper is descheduled (another program, or the GUI's software renderer, busy on the same
//! cores) the caller simply takes its share. The caller waits only for chunks a helper has already claimed. This is
//! what keeps decoding from collapsing under contention, as candle's barrier pool does.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A unit of parallel work: `run_chunk(i)` for every `i < chunks()`, each exactly once, on any thread.
pub trait Job: Send + Sync {
    fn chunks(&self) -> usize;
    fn run_chunk(&self, index: usize);
}

/// How long an idle helper spins before parking. The matmuls of one forward follow each other within tens of
/// microseconds; between decode steps the helper parks and the first matmul pays one wake-up.
const SPIN: Duration = Duration::from_micros(300);

struct Active {
    job: Arc<dyn Job>,
    next: AtomicUsize,
    done: AtomicUsize,
    /// A chunk panicked on a helper thread; the caller re-raises it so it surfaces where errors are handled.
    panicked: AtomicBool,
}

impl Active {
    /// Claims and runs chunks until none is left.
    fn work(&self) {
        let total = self.job.chunks();
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= total {
                return;
            }
            let ran =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.job.run_chunk(i)));
            if ran.is_err() {
                self.panicked.store(true, Ordering::Release);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

struct Shared {
    current: Mutex<Option<Arc<Active>>>,
    generation: AtomicU64,
    shutdown: AtomicBool,
}

struct Helper {
    handle: JoinHandle<()>,
    sleeping: Arc<AtomicBool>,
}

pub struct ComputePool {
    shared: Arc<Shared>,
    helpers: Vec<Helper>,
    /// One job at a time; a second caller (another run's thread) computes alone rather than waiting.
    busy: Mutex<()>,
}

impl ComputePool {
    /// A pool where `threads` threads (the caller included) share each job.
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
        });
        let helpers = (1..threads.max(1))
            .filter_map(|i| {
                let sleeping = Arc::new(AtomicBool::new(false));
                let (s, z) = (shared.clone(), sleeping.clone());
                std::thread::Builder::new()
                    .name(format!("specula-compute-{i}"))
                    .spawn(move || helper_loop(&s, &z))
                    .ok()
                    .map(|handle| Helper { handle, sleeping })
            })
            .collect();
        Self {
            shared,
            helpers,
            busy: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    pub fn run(&self, job: Arc<dyn Job>) {
        let guard = match self.busy.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if self.helpers.is_empty() || guard.is_none() || job.chunks() < 2 {
            for i in 0..job.chunks() {
                job.run_chunk(i);
            }
            return;
        }
        let active = Arc::new(Active {
            job,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        });
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(active.clone());
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        for helper in &self.helpers {
            if helper.sleeping.load(Ordering::SeqCst) {
                helper.handle.thread().unpark();
            }
        }
        active.work();
        // Only chunks a helper already claimed are outstanding; it is running them.
        let total = active.job.chunks();
        let mut spins = 0u32;
        while active.done.load(Ordering::Acquire) < total {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        if active.panicked.load(Ordering::Acquire) {
            panic!("a compute thread panicked while running a matmul chunk");
        }
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for helper in self.helpers.drain(..) {
            helper.handle.thread().unpark();
            // A helper that panicked has nothing left to clean up.
            let _ = helper.handle.join();
        }
    }
}

fn helper_loop(shared: &Shared, sleeping: &AtomicBool) {
    let mut seen = 0u64;
    loop {
        let idle_since = Instant::now();
        loop {
            if shared.shutdown.load(Ordering::SeqCst) {
                return;
            }
            let generation = shared.generation.load(Ordering::SeqCst);
            if generation != seen {
                seen = generation;
                break;
            }
            if idle_since.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            // Announce sleep, then re-check: the caller bumps the generation before it looks at `sleeping`, so
            // one of the two sides always sees the other.
            sleeping.store(true, Ordering::SeqCst);
            if shared.generation.load(Ordering::SeqCst) == seen
                && !shared.shutdown.load(Ordering::SeqCst)
            {
                std::thread::park_timeout(Duration::from_millis(50));
            }
            sleeping.store(false, Ordering::SeqCst);
        }
        let active = shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(active) = active {
            active.work();
        }
    }
}
