//! The store every front end shares: the entity table, its storage, and the rules of a
//! write (admitted by storage first, the storage writer told after). The Python bindings
//! and the gRPC server both hold an `Arc<Store>`; neither copies the table.
//!
//! A table operation leaves work for its caller (`Notices`): Python watchers to wake
//! and expiry timers to re-arm. They are handed back rather than done here, because
//! doing them needs the GIL, and no thread may wait for the GIL while holding the table
//! lock (the Python side holds the GIL while it waits for the table lock).
use crate::durable::Durable;
use crate::entity::WallTime;
use crate::error::Result;
use crate::table::Table;
use crate::watch::{Watch, WatchStats};
use parking_lot::Mutex;
use std::sync::OnceLock;
use std::time::Duration;

/// How long a write waits for a storage writer that is `max_pending` changes behind.
pub const BACKPRESSURE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a table operation leaves for its caller to do once the lock is released.
#[derive(Default)]
pub struct Notices {
    /// Watchers whose (Python, async) consumer must be woken.
    pub wake: Vec<u64>,
    /// The earliest entity expiry moved earlier: the host's timer must be armed for it.
    pub expiry_due: Option<WallTime>,
}

impl Notices {
    pub fn is_empty(&self) -> bool {
        self.wake.is_empty() && self.expiry_due.is_none()
    }
}

pub struct Store {
    pub table: Mutex<Table>,
    /// Set once, when a data dir is attached.
    pub durable: OnceLock<Durable>,
}

impl Store {
    pub fn new(table: Table) -> Self {
        Store { table: Mutex::new(table), durable: OnceLock::new() }
    }

    /// Runs `op` on the table; returns its output and the notices it left.
    pub fn run<T>(&self, op: impl FnOnce(&mut Table) -> T) -> (T, Notices) {
        let mut t = self.table.lock();
        let out = op(&mut t);
        let notices = Notices { wake: std::mem::take(&mut t.wake), expiry_due: t.take_expiry_notice() };
        (out, notices)
    }

    /// Runs the write `op` if storage admits it now (checked inside the lock the write
    /// takes anyway: two atomic loads), and tells the storage writer. None leaves `op`
    /// unrun: the caller waits in `gate`, then tries again.
    pub fn try_write<T, F: FnOnce(&mut Table) -> T>(&self, op: &mut Option<F>) -> Option<(T, Notices)> {
        let durable = self.durable.get();
        let (out, notices) = self.run(|t| {
            if durable.is_some_and(|d| !d.admits(t.seq())) {
                return None;
            }
            Some((op.take().expect("a write runs once"))(t))
        });
        let out = out?;
        if let Some(d) = durable {
            d.changed.notify_one();
        }
        Some((out, notices))
    }

    /// Blocks until storage admits writes (backlog within `max_pending`, storage healthy):
    /// StorageError if it fails or stays behind for `BACKPRESSURE_TIMEOUT`.
    pub fn gate(&self) -> Result<()> {
        match self.durable.get() {
            Some(d) => d.gate(|| self.table.lock().seq(), BACKPRESSURE_TIMEOUT),
            None => Ok(()),
        }
    }

    /// Returns once change `seq` is as durable as the store promises: on disk under
    /// `commit`, at once otherwise. StorageError if storage fails or closes first.
    pub async fn durable(&self, seq: u64) -> Result<()> {
        match self.durable.get() {
            Some(d) if d.mode == "commit" => d.committed_async(seq).await,
            _ => Ok(()),
        }
    }

    pub fn seq(&self) -> u64 {
        self.table.lock().seq()
    }

    /// A watcher's counters. It first reads the feed as its consumer would, outside the
    /// table lock (a hundred stuck watchers filling their queues must not stall writers);
    /// the lock is then taken to add the changes it skipped while behind.
    pub fn watch_stats(&self, w: &Watch) -> WatchStats {
        let mut s = w.stats();
        s.coalesced += self.table.lock().folded(w);
        s
    }
}
