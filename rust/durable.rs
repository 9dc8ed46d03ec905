//! Group commit of a table to its storage: a writer thread calls `commit_pending` in a
//! loop (at once for `commit` durability, every interval for `interval`); each call
//! takes every change since the last commit in one snapshot and writes it in one
//! transaction. Writers never wait for the disk, except:
//! - `gate`: with more than `max_pending` uncommitted changes, a write waits for the
//!   writer (bounded backlog, never a silent drop); while storage is failing, writes are
//!   refused with the reason.
//! - `wait_committed`: a caller that must acknowledge durably waits for its seq.
//!
//! Locks: the table mutex is taken first and only briefly (the snapshot); the storage
//! and commit-state mutexes are never held while taking it.
use crate::causal::VersionVector;
use crate::entity::View;
use crate::error::{Error, Result};
use crate::storage::{Batch, PeerAck, Storage, StorageError};
use crate::table::Table;
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::histogram::Histogram;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Commit durations kept for the latency percentiles.
const LATENCY_WINDOW: usize = 1024;

#[derive(Default)]
struct CommitState {
    committed: u64,
    commits: u64,
    error: Option<String>,
    closed: bool,
    last_commit: Option<Instant>,
    latencies_ms: VecDeque<f64>,
    /// By peer address.
    peer_acks: BTreeMap<String, PeerAck>,
    acks_changed: bool,
    /// What a failed commit took from the table and must still write.
    carry_forgotten: Vec<Arc<str>>,
    carry_context: Option<VersionVector>,
}

pub struct Durable {
    storage: Mutex<Option<Storage>>,
    state: Mutex<CommitState>,
    /// Signalled when a commit ends (or fails): durable waiters and gated writers, and
    /// (`commit_notify`) async waiters.
    committed_cv: Condvar,
    commit_notify: tokio::sync::Notify,
    /// Signalled by writers (paired with the table mutex): the writer thread waits on it.
    pub changed: Condvar,
    pub max_pending: u64,
    /// Mirrors of `CommitState::committed` and of "failing or closed", so a write is
    /// admitted with two atomic loads inside the table lock it already holds (`admits`).
    committed_seq: AtomicU64,
    refusing: AtomicBool,
    /// As the user chose it: `commit` or `interval:<ms>`.
    pub mode: String,
    /// Every successful commit's duration, for `/metrics`.
    pub commit_latency: Histogram,
}

/// Storage statistics for `stats`.
pub struct DurableStats {
    pub committed_seq: u64,
    pub commits: u64,
    pub error: Option<String>,
    pub last_commit_age_s: Option<f64>,
    pub commit_ms_p50: Option<f64>,
    pub commit_ms_p99: Option<f64>,
    pub storage_bytes: u64,
}

fn storage_err(e: StorageError) -> Error {
    Error::Storage(e.0)
}

impl Durable {
    /// `committed`: the seq the storage already holds (what was loaded).
    pub fn new(storage: Storage, committed: u64, peer_acks: Vec<PeerAck>, max_pending: u64, mode: String) -> Self {
        let peer_acks = peer_acks.into_iter().map(|a| (a.peer.clone(), a)).collect();
        let state = CommitState { committed, peer_acks, ..CommitState::default() };
        Durable {
            storage: Mutex::new(Some(storage)),
            state: Mutex::new(state),
            committed_cv: Condvar::new(),
            commit_notify: tokio::sync::Notify::new(),
            changed: Condvar::new(),
            max_pending: max_pending.max(1),
            committed_seq: AtomicU64::new(committed),
            refusing: AtomicBool::new(false),
            mode,
            commit_latency: Histogram::default(),
        }
    }

    pub fn committed(&self) -> u64 {
        self.state.lock().committed
    }

    /// Writes everything changed since the last commit, waiting up to `wait` for a change
    /// if there is none. Returns the seq now committed.
    pub fn commit_pending(&self, table: &Mutex<Table>, wait: Duration) -> Result<u64> {
        let (committed, acks_changed) = {
            let s = self.state.lock();
            (s.committed, s.acks_changed)
        };
        if self.storage.lock().is_none() {
            return Ok(committed); // closed
        }
        let pending = {
            let mut t = table.lock();
            if !t.has_pending(committed) && !acks_changed && !wait.is_zero() {
                self.changed.wait_for(&mut t, wait);
            }
            if !t.has_pending(committed) && !self.state.lock().acks_changed {
                return Ok(committed);
            }
            t.pending(committed)
        };
        let started = Instant::now();
        let seq = pending.meta.seq;
        let states = pending
            .states
            .iter()
            .map(|s| (s.id.clone(), s.seq, s.to_bytes(View::REPLICA, &pending.registry)))
            .collect();
        let mut batch = Batch { meta: pending.meta, states, ..Batch::default() };
        {
            let mut s = self.state.lock();
            batch.forgotten = std::mem::take(&mut s.carry_forgotten);
            batch.forgotten.extend(pending.forgotten);
            let context = pending.context.or(s.carry_context.take());
            batch.context = context.as_ref().map(|v| v.entries().to_vec());
            s.carry_context = context;
            // An acknowledgement never names a seq this file does not hold: after a
            // crash the log resumes from here, and a peer's later mark would skip it.
            batch.peer_acks =
                s.peer_acks.values().map(|a| PeerAck { acked_seq: a.acked_seq.min(seq), ..a.clone() }).collect();
            s.acks_changed = false;
        }
        let result = match self.storage.lock().as_mut() {
            Some(storage) => storage.commit(&batch),
            None => Err(StorageError("storage is closed".into())),
        };
        let mut s = self.state.lock();
        match result {
            Ok(()) => {
                s.carry_context = None;
                s.committed = s.committed.max(seq);
                self.committed_seq.store(s.committed, Ordering::Release);
                self.refusing.store(s.closed, Ordering::Release);
                s.commits += 1;
                s.error = None;
                s.last_commit = Some(Instant::now());
                if s.latencies_ms.len() == LATENCY_WINDOW {
                    s.latencies_ms.pop_front();
                }
                s.latencies_ms.push_back(started.elapsed().as_secs_f64() * 1e3);
                self.commit_latency.observe(started.elapsed());
                self.committed_cv.notify_all();
                self.commit_notify.notify_waiters();
                Ok(s.committed)
            }
            Err(e) => {
                s.carry_forgotten = batch.forgotten;
                s.acks_changed = true;
                s.error = Some(e.0.clone());
                self.refusing.store(true, Ordering::Release);
                self.committed_cv.notify_all();
                self.commit_notify.notify_waiters();
                Err(storage_err(e))
            }
        }
    }

    /// The fast path of `gate`, for a caller holding the table lock: true if a write may
    /// go ahead now (storage healthy, backlog within `max_pending`).
    pub fn admits(&self, table_seq: u64) -> bool {
        !self.refusing.load(Ordering::Acquire)
            && table_seq.saturating_sub(self.committed_seq.load(Ordering::Acquire)) <= self.max_pending
    }

    /// Admits a write: refuses it while storage fails or after close, and waits (up to
    /// `timeout`) while more than `max_pending` changes await the writer.
    pub fn gate(&self, table_seq: impl Fn() -> u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock();
        loop {
            if s.closed {
                return Err(Error::Storage("the store is closed; its storage takes no more writes".into()));
            }
            if let Some(e) = &s.error {
                return Err(Error::Storage(format!("storage is failing ({e}); writes are refused until it recovers")));
            }
            let committed = s.committed;
            let backlog = parking_lot::MutexGuard::unlocked(&mut s, || table_seq().saturating_sub(committed));
            if backlog <= self.max_pending {
                return Ok(());
            }
            if self.committed_cv.wait_until(&mut s, deadline).timed_out() {
                return Err(Error::Storage(format!(
                    "storage is {backlog} changes behind (bound {}); the write was not applied",
                    self.max_pending
                )));
            }
        }
    }

    /// `wait_committed` for async callers, without a timeout: Ok once `seq` is
    /// committed, StorageError if storage fails or closes first.
    pub async fn committed_async(&self, seq: u64) -> Result<()> {
        loop {
            // Registered before the check, so a commit between the two is not missed.
            let mut notified = std::pin::pin!(self.commit_notify.notified());
            notified.as_mut().enable();
            {
                let s = self.state.lock();
                if s.committed >= seq {
                    return Ok(());
                }
                if let Some(e) = &s.error {
                    return Err(Error::Storage(format!("not durable: storage is failing ({e})")));
                }
                if s.closed {
                    return Err(Error::Storage("the store closed before the write was durable".into()));
                }
            }
            notified.await;
        }
    }

    /// Waits until `seq` is committed (true), storage fails (the error) or `timeout` passes (false).
    pub fn wait_committed(&self, seq: u64, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock();
        loop {
            if s.committed >= seq {
                return Ok(true);
            }
            if let Some(e) = &s.error {
                return Err(Error::Storage(format!("not durable: storage is failing ({e})")));
            }
            if s.closed || self.committed_cv.wait_until(&mut s, deadline).timed_out() {
                return Ok(s.committed >= seq);
            }
        }
    }

    /// Records how far a peer acknowledged this node's log (stored with the next commit).
    pub fn note_peer_ack(&self, ack: PeerAck) {
        let mut s = self.state.lock();
        if s.peer_acks.get(&ack.peer) != Some(&ack) {
            s.peer_acks.insert(ack.peer.clone(), ack);
            s.acks_changed = true;
        }
    }

    pub fn peer_acks(&self) -> Vec<PeerAck> {
        self.state.lock().peer_acks.values().cloned().collect()
    }

    /// Refuses later writes, commits what is left, marks the file cleanly closed and
    /// releases the data dir. Idempotent.
    pub fn close(&self, table: &Mutex<Table>) -> Result<()> {
        self.state.lock().closed = true;
        self.refusing.store(true, Ordering::Release);
        if self.storage.lock().is_none() {
            return Ok(());
        }
        // A write admitted just before may still be applying: commit until none is left.
        for _ in 0..3 {
            let committed = self.commit_pending(table, Duration::ZERO)?;
            if !table.lock().has_pending(committed) {
                break;
            }
        }
        let storage = self.storage.lock().take();
        self.committed_cv.notify_all();
        self.commit_notify.notify_waiters();
        storage.map_or(Ok(()), |s| s.close().map_err(storage_err))
    }

    pub fn stats(&self) -> DurableStats {
        let bytes = self.storage.lock().as_ref().map_or(0, |s| s.size_bytes());
        let s = self.state.lock();
        let mut sorted: Vec<f64> = s.latencies_ms.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let pct = |p: f64| (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * p).round() as usize]);
        DurableStats {
            committed_seq: s.committed,
            commits: s.commits,
            error: s.error.clone(),
            last_commit_age_s: s.last_commit.map(|t| t.elapsed().as_secs_f64()),
            commit_ms_p50: pct(0.5),
            commit_ms_p99: pct(0.99),
            storage_bytes: bytes,
        }
    }
}
