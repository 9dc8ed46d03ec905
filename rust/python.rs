//! The pyo3 bindings behind `meshstore._core`: a thin layer over `Table`. Entities cross
//! as serialized `entity.v1.Entity` bytes; results and events decode lazily in Python.
//!
//! Locking: the table sits behind one mutex. Calls that may run long (batches, lists,
//! scans) release the GIL first; no thread ever waits for the GIL while holding the
//! table lock (watcher and expiry callbacks run after it is released), so the two
//! locks cannot deadlock.
use crate::approval;
use crate::causal::VersionVector;
use crate::pb::ApprovalState;
use crate::durable::Durable;
use crate::storage::{self, PeerAck, Storage};
use crate::entity::WallTime;
use crate::error::Error;
use crate::hlc::system_wall_ns;
use crate::intern::{intern, Sym};
use crate::strategy::{Merge, Rule};
use crate::store::{Notices, Store};
use crate::table::{Options, Table, WriteMode, WriteOutcome};
use crate::watch::{Event, Watch, WatchSpec};
use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

static ENTITY_CLASS: GILOnceCell<Py<PyAny>> = GILOnceCell::new();
static ERRORS: GILOnceCell<Py<PyModule>> = GILOnceCell::new();

/// Decodes entity bytes into an `entity_pb2.Entity` message.
fn decode_entity(py: Python<'_>, bytes: &[u8]) -> PyResult<PyObject> {
    let cls = ENTITY_CLASS.get_or_try_init(py, || -> PyResult<_> {
        Ok(py.import("meshstore.pb.entity_pb2")?.getattr("Entity")?.unbind())
    })?;
    Ok(cls.call_method1(py, "FromString", (PyBytes::new(py, bytes),))?)
}

/// An entity snapshot encoded and decoded only when Python asks, each at most once:
/// results and events are cheap to make, and most are never looked at.
struct LazyEntity {
    bytes: OnceLock<Vec<u8>>,
    message: OnceLock<PyObject>,
}

impl LazyEntity {
    fn new() -> Self {
        LazyEntity { bytes: OnceLock::new(), message: OnceLock::new() }
    }

    fn bytes(&self, encode: impl FnOnce() -> Vec<u8>) -> &[u8] {
        self.bytes.get_or_init(encode)
    }

    fn message(&self, py: Python<'_>, encode: impl FnOnce() -> Vec<u8>) -> PyResult<PyObject> {
        if let Some(m) = self.message.get() {
            return Ok(m.clone_ref(py));
        }
        let m = decode_entity(py, self.bytes(encode))?;
        Ok(self.message.get_or_init(|| m).clone_ref(py))
    }
}

/// Maps a core error onto the exception classes of `meshstore.errors`.
fn py_err(py: Python<'_>, err: Error) -> PyErr {
    let module = match ERRORS.get_or_try_init(py, || py.import("meshstore.errors").map(|m| m.unbind())) {
        Ok(m) => m.bind(py),
        Err(e) => return e,
    };
    let class = err.class_name();
    let (entity_id, keys): (Option<String>, Vec<String>) = match &err {
        Error::Invalid { id, key, .. } => (id.clone(), key.iter().cloned().collect()),
        Error::NotFound(id) | Error::AlreadyExists(id) => (Some(id.clone()), vec![]),
        Error::Stale { id, keys } => (Some(id.clone()), keys.clone()),
        Error::ClockSkew { id, key, .. } | Error::FailedPrecondition { id, key, .. } => {
            (Some(id.clone()), key.iter().cloned().collect())
        }
        Error::CursorExpired { .. } | Error::Storage(_) => (None, vec![]),
    };
    let build = || -> PyResult<PyErr> {
        let exc = module.getattr(class)?.call1((err.to_string(),))?;
        exc.setattr("entity_id", entity_id)?;
        exc.setattr("keys", keys)?;
        Ok(PyErr::from_value(exc))
    };
    build().unwrap_or_else(|e| e)
}

fn names(syms: &[Sym]) -> Vec<&'static str> {
    syms.iter().map(|s| s.as_str()).collect()
}

/// The outcome of one write: the entity after it (decoded on first access) and which
/// keys were applied, skipped as stale, or left unchanged (same bytes).
#[pyclass(module = "meshstore._core", frozen, name = "UpdateResult")]
pub struct PyUpdateResult {
    outcome: WriteOutcome,
    entity: LazyEntity,
}

#[pymethods]
impl PyUpdateResult {
    #[getter]
    fn entity(&self, py: Python<'_>) -> PyResult<PyObject> {
        self.entity.message(py, || self.outcome.entity_bytes())
    }
    #[getter]
    fn entity_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.entity.bytes(|| self.outcome.entity_bytes()))
    }
    #[getter]
    fn entity_id(&self) -> &str {
        &self.outcome.id
    }
    #[getter]
    fn applied(&self) -> Vec<&'static str> {
        names(&self.outcome.applied)
    }
    #[getter]
    fn stale(&self) -> Vec<&'static str> {
        names(&self.outcome.stale)
    }
    #[getter]
    fn unchanged(&self) -> Vec<&'static str> {
        names(&self.outcome.unchanged)
    }
    #[getter]
    fn created(&self) -> bool {
        self.outcome.created
    }
    fn __repr__(&self) -> String {
        format!(
            "UpdateResult(id={:?}, applied={:?}, stale={:?}, unchanged={:?}, created={})",
            &*self.outcome.id,
            self.applied(),
            self.stale(),
            self.unchanged(),
            self.outcome.created
        )
    }
}

fn result(outcome: WriteOutcome) -> PyUpdateResult {
    PyUpdateResult { outcome, entity: LazyEntity::new() }
}

/// One change seen by a watcher.
#[pyclass(module = "meshstore._core", frozen, name = "Event")]
pub struct PyEvent {
    event: Event,
    entity: LazyEntity,
}

#[pymethods]
impl PyEvent {
    /// `store_pb2.EventType`: 1 CREATED, 2 UPDATED, 3 DELETED.
    #[getter]
    fn r#type(&self) -> i32 {
        self.event.kind as i32
    }
    /// The resume cursor: `watch(since_seq=event.seq)` misses nothing after this event.
    #[getter]
    fn seq(&self) -> u64 {
        self.event.cursor
    }
    /// The store seq of the (latest) change this event reports.
    #[getter]
    fn change_seq(&self) -> u64 {
        self.event.seq
    }
    #[getter]
    fn entity_id(&self) -> &str {
        &self.event.id
    }
    #[getter]
    fn origin_node(&self) -> &'static str {
        self.event.source.as_str()
    }
    #[getter]
    fn entity(&self, py: Python<'_>) -> PyResult<PyObject> {
        self.entity.message(py, || self.event.entity_bytes().to_vec())
    }
    #[getter]
    fn entity_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.entity.bytes(|| self.event.entity_bytes().to_vec()))
    }
    fn __repr__(&self) -> String {
        let kind = ["", "CREATED", "UPDATED", "DELETED"][self.event.kind as usize];
        format!("Event({kind} {:?} seq={} from {:?})", &*self.event.id, self.event.seq, self.event.source.as_str())
    }
}

/// A watcher's queue, as seen from Python.
#[pyclass(module = "meshstore._core", frozen)]
pub struct WatchHandle {
    watch: Arc<Watch>,
    core: Py<Core>,
}

#[pymethods]
impl WatchHandle {
    #[getter]
    fn id(&self) -> u64 {
        self.watch.id
    }
    /// Up to `max` events, waiting up to `timeout` seconds for the first (GIL released).
    /// A watcher that fell behind is caught up from the table's log first.
    fn poll(&self, py: Python<'_>, max: usize, timeout: f64) -> Vec<PyEvent> {
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
        let (watch, store) = (&self.watch, &self.core.get().store);
        let take = || loop {
            if watch.is_behind() {
                // Only this watcher can be woken by its own catch-up: nothing to deliver.
                let _ = store.run(|t| t.catch_up(watch));
            }
            let events = watch.poll(max, deadline.saturating_duration_since(Instant::now()));
            // Behind and nothing queued: catch up before giving up, even at the deadline.
            let done = Instant::now() >= deadline && !watch.is_behind();
            if !events.is_empty() || watch.is_closed() || done {
                return events;
            }
        };
        let events = if timeout <= 0.0 { take() } else { py.allow_threads(take) };
        events.into_iter().map(|event| PyEvent { event, entity: LazyEntity::new() }).collect()
    }
    /// For async consumers: (ready, seconds until a held event falls due). When not ready,
    /// `waker` is called (with no arguments) on the next event.
    fn arm(&self, waker: PyObject) -> (bool, Option<f64>) {
        let core = self.core.get();
        core.wakers.lock().insert(self.watch.id, waker);
        let (ready, due) = self.watch.arm();
        if ready {
            core.wakers.lock().remove(&self.watch.id);
        }
        (ready, due.map(|d| d.as_secs_f64()))
    }
    /// Closes the watcher and wakes its consumers (iteration ends).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let core = self.core.get();
        py.allow_threads(|| core.store.table.lock().unwatch(self.watch.id));
        let waker = core.wakers.lock().remove(&self.watch.id);
        match waker {
            Some(w) => w.call0(py).map(drop),
            None => Ok(()),
        }
    }
    #[getter]
    fn closed(&self) -> bool {
        self.watch.is_closed()
    }
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.core.get().store.watch_stats(&self.watch);
        let d = PyDict::new(py);
        d.set_item("queued", s.queued)?;
        d.set_item("held", s.held)?;
        d.set_item("coalesced", s.coalesced)?;
        d.set_item("delivered", s.delivered)?;
        d.set_item("coalescing", s.coalescing)?;
        Ok(d)
    }
}

#[pyclass(module = "meshstore._core", frozen)]
pub struct Core {
    pub(crate) store: Arc<Store>,
    wakers: Mutex<HashMap<u64, PyObject>>,
    on_expiry: Mutex<Option<PyObject>>,
    wall_offset_ns: Arc<AtomicI64>,
}

impl Core {
    /// Runs `op` on the table (without the GIL if `release_gil`), then delivers its notices.
    fn run<T>(&self, py: Python<'_>, release_gil: bool, op: impl FnOnce(&mut Table) -> T + Send) -> PyResult<T>
    where
        T: Send,
    {
        let (out, notices) = if release_gil { py.allow_threads(|| self.store.run(op)) } else { self.store.run(op) };
        self.deliver(py, notices)?;
        Ok(out)
    }

    /// Wakes the async watchers a table operation named and reports expiry changes to
    /// Python (the GIL held, the table lock not).
    pub(crate) fn deliver(&self, py: Python<'_>, notices: Notices) -> PyResult<()> {
        if !notices.wake.is_empty() {
            let wakers: Vec<PyObject> = {
                let mut w = self.wakers.lock();
                notices.wake.iter().filter_map(|id| w.remove(id)).collect()
            };
            for waker in wakers {
                // A consumer's broken waker must not fail the write that woke it.
                if let Err(e) = waker.call0(py) {
                    e.write_unraisable(py, None);
                }
            }
        }
        if let Some(due) = notices.expiry_due {
            let hook = self.on_expiry.lock().as_ref().map(|h| h.clone_ref(py));
            if let Some(hook) = hook {
                hook.call1(py, (due,))?;
            }
        }
        Ok(())
    }

    /// `run` for an operation that changes the table: admitted by storage first (see
    /// `Store::try_write`); a write that must wait (backlog, failing disk) waits in
    /// `Store::gate` without the GIL, then tries again.
    fn run_write<T>(&self, py: Python<'_>, release_gil: bool, op: impl FnOnce(&mut Table) -> T + Send) -> PyResult<T>
    where
        T: Send,
    {
        let mut op = Some(op);
        loop {
            let store = &self.store;
            let done = if release_gil { py.allow_threads(|| store.try_write(&mut op)) } else { store.try_write(&mut op) };
            if let Some((out, notices)) = done {
                self.deliver(py, notices)?;
                return Ok(out);
            }
            py.allow_threads(|| store.gate()).map_err(|e| py_err(py, e))?;
        }
    }

    fn write(&self, py: Python<'_>, bytes: &[u8], mode: WriteMode, strict: bool) -> PyResult<PyUpdateResult> {
        self.run_write(py, false, |t| t.write(bytes, mode, strict))?.map(result).map_err(|e| py_err(py, e))
    }

    fn durable(&self, py: Python<'_>) -> PyResult<&Durable> {
        self.store.durable.get().ok_or_else(|| py_err(py, Error::Storage("this store has no storage".into())))
    }
}

#[pymethods]
impl Core {
    #[new]
    #[pyo3(signature = (node_id, incarnation, max_clock_offset, peer_expiry, max_entity_bytes))]
    fn new(node_id: String, incarnation: u64, max_clock_offset: f64, peer_expiry: f64, max_entity_bytes: usize) -> PyResult<Self> {
        if node_id.is_empty() {
            return Err(PyValueError::new_err("node_id must not be empty"));
        }
        if incarnation == 0 {
            return Err(PyValueError::new_err("incarnation must not be 0"));
        }
        let offset = Arc::new(AtomicI64::new(0));
        let shift = offset.clone();
        let wall = Box::new(move || system_wall_ns().saturating_add_signed(shift.load(Ordering::Relaxed)));
        let opts = Options {
            node_id,
            incarnation,
            max_clock_offset_ns: (max_clock_offset * 1e9) as u64,
            peer_expiry_ns: (peer_expiry * 1e9) as u64,
            max_entity_bytes,
            ..Options::default()
        };
        Ok(Core {
            store: Arc::new(Store::new(Table::new(opts, wall))),
            wakers: Mutex::new(HashMap::new()),
            on_expiry: Mutex::new(None),
            wall_offset_ns: offset,
        })
    }

    fn create(&self, py: Python<'_>, bytes: &[u8]) -> PyResult<PyUpdateResult> {
        self.write(py, bytes, WriteMode::Create, false)
    }

    fn update(&self, py: Python<'_>, bytes: &[u8], strict: bool) -> PyResult<PyUpdateResult> {
        self.write(py, bytes, WriteMode::Update, strict)
    }

    fn put(&self, py: Python<'_>, bytes: &[u8]) -> PyResult<PyUpdateResult> {
        self.write(py, bytes, WriteMode::Put, false)
    }

    /// Upserts a batch of serialized entities atomically (all checked before any applies).
    fn put_many<'py>(&self, py: Python<'py>, batch: Vec<Bound<'py, PyBytes>>) -> PyResult<Bound<'py, PyList>> {
        // Borrowed straight from the bytes objects (which `batch` keeps alive): no copy.
        let slices: Vec<&[u8]> = batch.iter().map(|b| b.as_bytes()).collect();
        let outcomes = self.run_write(py, true, |t| t.put_many(&slices))?.map_err(|e| py_err(py, e))?;
        PyList::new(py, outcomes.into_iter().map(result))
    }

    fn delete(&self, py: Python<'_>, entity_id: &str) -> PyResult<()> {
        self.run_write(py, false, |t| t.delete(entity_id))?.map_err(|e| py_err(py, e))
    }

    /// Moves the entity's pending approval to `state` (entity.v1.ApprovalState APPROVED or
    /// DENIED), recording `decided_by`; the result of the write (see `approval::decide`).
    #[pyo3(signature = (entity_id, state, decided_by = ""))]
    fn decide(&self, py: Python<'_>, entity_id: &str, state: i32, decided_by: &str) -> PyResult<PyUpdateResult> {
        let state = ApprovalState::try_from(state)
            .map_err(|_| PyValueError::new_err(format!("a decision is APPROVED or DENIED, got {state}")))?;
        self.run_write(py, false, |t| approval::decide(t, entity_id, state, decided_by))?.map(result).map_err(|e| py_err(py, e))
    }

    fn get<'py>(&self, py: Python<'py>, entity_id: &str) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.run(py, false, |t| t.get(entity_id))?.map_err(|e| py_err(py, e))?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn list<'py>(&self, py: Python<'py>, type_filter: i32) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let all = self.run(py, true, |t| t.list(type_filter))?;
        Ok(all.iter().map(|b| PyBytes::new(py, b)).collect())
    }

    /// Joins a replica state received from node `source`; True if ours changed.
    fn merge(&self, py: Python<'_>, bytes: &[u8], source: &str) -> PyResult<bool> {
        self.run_write(py, false, |t| t.merge(bytes, source))?.map_err(|e| py_err(py, e))
    }

    /// Replica states changed after `seq` (module docs of `table`); `unless_seen`: a
    /// peer's context summary, whose covered entities are skipped.
    #[pyo3(signature = (seq, limit = usize::MAX, skip_source = None, unless_seen = None))]
    fn changes_since<'py>(
        &self,
        py: Python<'py>,
        seq: u64,
        limit: usize,
        skip_source: Option<&str>,
        unless_seen: Option<Vec<(String, u64, u64)>>,
    ) -> PyResult<(Vec<Bound<'py, PyBytes>>, u64)> {
        let skip = skip_source.map(intern);
        let seen = unless_seen.map(vector_of);
        let (states, last) =
            self.run(py, true, |t| t.changes_since(seq, limit, skip, seen.as_ref()))?.map_err(|e| py_err(py, e))?;
        Ok((states.iter().map(|b| PyBytes::new(py, b)).collect(), last))
    }

    /// (seq, [(node, incarnation, counter), ...]): the store's context summary, valid as
    /// of that seq.
    fn context_summary(&self) -> (u64, Vec<(&'static str, u64, u64)>) {
        let t = self.store.table.lock();
        (t.seq(), t.context_summary().entries().iter().map(|&(n, i, c)| (n.as_str(), i, c)).collect())
    }

    /// Adds a peer's context summary to ours (see `Table::adopt`); True if ours grew.
    fn adopt_context(&self, py: Python<'_>, summary: Vec<(String, u64, u64)>) -> PyResult<bool> {
        let v = vector_of(summary);
        self.run_write(py, false, |t| t.adopt(&v))?.map_err(|e| py_err(py, e))
    }

    /// One entity's replica state and its change seq, or None if unknown.
    fn replica_state<'py>(&self, py: Python<'py>, entity_id: &str) -> PyResult<Option<(Bound<'py, PyBytes>, u64)>> {
        let found = self.run(py, false, |t| t.replica_state(entity_id))?;
        Ok(found.map(|(b, seq)| (PyBytes::new(py, &b), seq)))
    }

    /// Deletes up to `limit` entities whose expiry is at or before `now` (seconds,
    /// nanos); returns how many it deleted and the earliest expiry left, if any.
    fn expire_due(&self, py: Python<'_>, now: WallTime, limit: usize) -> PyResult<(usize, Option<WallTime>)> {
        self.run_write(py, false, |t| t.expire_due(now, limit))
    }

    #[pyo3(signature = (acked_seq = None))]
    fn collect_tombstones(&self, py: Python<'_>, acked_seq: Option<u64>) -> PyResult<usize> {
        self.run_write(py, true, |t| t.collect_deleted(acked_seq))
    }

    #[pyo3(signature = (type_filter, components, min_interval, capacity, include_existing, since_seq))]
    fn watch(
        slf: &Bound<'_, Self>,
        type_filter: i32,
        components: Option<Vec<String>>,
        min_interval: f64,
        capacity: usize,
        include_existing: bool,
        since_seq: Option<u64>,
    ) -> PyResult<WatchHandle> {
        let py = slf.py();
        let spec = WatchSpec {
            type_filter,
            projection: components.map(|c| c.iter().map(|k| intern(k)).collect()),
            min_interval: Duration::from_secs_f64(min_interval.max(0.0)),
            capacity: capacity.max(1),
        };
        let watch = slf.get().run(py, true, |t| t.watch(spec, include_existing, since_seq))?.map_err(|e| py_err(py, e))?;
        Ok(WatchHandle { watch, core: slf.clone().unbind() })
    }

    /// Registers the merge strategy of a type URL: "lww", "max" or "lww_tiebreak".
    #[pyo3(signature = (type_url, merge, field = None, order = None, finite = None))]
    fn register(
        &self,
        type_url: &str,
        merge: &str,
        field: Option<u32>,
        order: Option<Vec<u64>>,
        finite: Option<Vec<u32>>,
    ) -> PyResult<()> {
        if type_url.is_empty() {
            return Err(PyValueError::new_err("type_url must not be empty"));
        }
        let need_field = || {
            field.filter(|f| *f > 0).ok_or_else(|| PyValueError::new_err(format!("merge '{merge}' needs a field number > 0")))
        };
        let merge = match merge {
            "lww" => Merge::Lww,
            "max" => Merge::Max { field: need_field()?, order },
            "lww_tiebreak" => Merge::LwwTieBreak { field: need_field()? },
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown merge strategy '{other}' (expected lww, max or lww_tiebreak)"
                )))
            }
        };
        let bounds = finite.unwrap_or_default().into_iter().map(|f| (f, f64::MIN, f64::MAX)).collect();
        self.store.table.lock().register(type_url, Rule::new(merge, bounds));
        Ok(())
    }

    /// Called with (seconds, nanos) when the earliest entity expiry moves earlier than
    /// the last one reported or returned by `expire_due`: the time to arm a timer for.
    #[pyo3(signature = (hook = None))]
    fn set_expiry_hook(&self, hook: Option<PyObject>) {
        *self.on_expiry.lock() = hook;
    }

    /// Shifts this store's wall clock (tests: clock jumps and skew).
    fn set_wall_offset(&self, seconds: f64) {
        self.wall_offset_ns.store((seconds * 1e9) as i64, Ordering::Relaxed);
    }

    #[getter]
    fn node_id(&self) -> &'static str {
        self.store.table.lock().node().as_str()
    }

    #[getter]
    fn seq(&self) -> u64 {
        self.store.table.lock().seq()
    }

    #[getter]
    fn incarnation(&self) -> u64 {
        self.store.table.lock().incarnation()
    }

    // ---- storage -----------------------------------------------------------------------

    /// Attaches the data dir `dir` to this new, empty store and loads what it holds.
    /// `mode`: how commits are made (`commit`, `interval:<ms>`), recorded so the next
    /// start can say what a crash may have lost. Returns what was found: entities
    /// loaded, whether the last run closed cleanly, and its durability mode.
    fn open_storage<'py>(&self, py: Python<'py>, dir: &str, mode: String, max_pending: u64) -> PyResult<Bound<'py, PyDict>> {
        if self.store.durable.get().is_some() {
            return Err(py_err(py, Error::Storage("storage is already attached".into())));
        }
        let opened = py.allow_threads(|| -> Result<_, Error> {
            let (mut storage, stored) = Storage::open(Path::new(dir)).map_err(|e| Error::Storage(e.0))?;
            let mut t = self.store.table.lock();
            if let Some(s) = stored.as_ref().filter(|s| s.meta.node_id != t.node().as_str()) {
                let msg = format!("data dir {dir} belongs to node '{}', not '{}'", s.meta.node_id, t.node().as_str());
                return Err(Error::Storage(msg));
            }
            t.persist(stored.as_ref()).map_err(|e| Error::Storage(format!("data dir {dir}: {e}")))?;
            let mut loaded = 0;
            if stored.is_some() {
                t.reserve(storage.entity_count().map_err(|e| Error::Storage(e.0))?);
                storage.each_state(|bytes, seq| t.restore(bytes, seq).map(|_| loaded += 1)).map_err(|e| Error::Storage(e.0))?;
            }
            storage.begin(&t.node_state(), &mode).map_err(|e| Error::Storage(e.0))?;
            let (clean, previous, acks) = stored.map_or((true, String::new(), vec![]), |s| (s.clean, s.durability, s.peer_acks));
            let _ = self.store.durable.set(Durable::new(storage, t.seq(), acks, max_pending, mode));
            Ok((loaded, clean, previous))
        });
        let (loaded, clean, previous) = opened.map_err(|e| py_err(py, e))?;
        // Loaded entities with an expiry need their timers.
        self.run(py, false, |_| ())?;
        let d = PyDict::new(py);
        d.set_item("entities", loaded)?;
        d.set_item("clean", clean)?;
        d.set_item("previous_durability", previous)?;
        Ok(d)
    }

    /// Commits every change since the last commit (waiting up to `wait` seconds for one
    /// if none is pending); returns the seq now durable. StorageError if the write fails.
    fn commit_pending(&self, py: Python<'_>, wait: f64) -> PyResult<u64> {
        let d = self.durable(py)?;
        let wait = Duration::try_from_secs_f64(wait).unwrap_or_default();
        py.allow_threads(|| d.commit_pending(&self.store.table, wait)).map_err(|e| py_err(py, e))
    }

    /// True once `seq` is committed, False after `timeout` seconds; StorageError if
    /// storage fails first.
    fn wait_committed(&self, py: Python<'_>, seq: u64, timeout: f64) -> PyResult<bool> {
        let d = self.durable(py)?;
        let timeout = Duration::try_from_secs_f64(timeout).unwrap_or_default();
        py.allow_threads(|| d.wait_committed(seq, timeout)).map_err(|e| py_err(py, e))
    }

    #[getter]
    fn committed_seq(&self) -> Option<u64> {
        self.store.durable.get().map(|d| d.committed())
    }

    /// Wakes a writer thread waiting in `commit_pending` (so it can see it must stop).
    fn wake_writer(&self) {
        if let Some(d) = self.store.durable.get() {
            d.changed.notify_all();
        }
    }

    /// Commits what is left, marks the data dir cleanly closed and releases it; later
    /// writes are refused. No-op without storage.
    fn close_storage(&self, py: Python<'_>) -> PyResult<()> {
        match self.store.durable.get() {
            Some(d) => py.allow_threads(|| d.close(&self.store.table)).map_err(|e| py_err(py, e)),
            None => Ok(()),
        }
    }

    /// Records how far the mesh peer at `peer` (node `node_id`, `incarnation`)
    /// acknowledged this node's log, for storage.
    fn note_peer_ack(&self, peer: String, node_id: String, incarnation: u64, acked_seq: u64) {
        if let Some(d) = self.store.durable.get() {
            d.note_peer_ack(PeerAck { peer, node_id, incarnation, acked_seq });
        }
    }

    /// The peers' acknowledgements as stored: [(peer, node_id, incarnation, acked_seq)]
    /// (empty without storage).
    fn peer_acks(&self) -> Vec<(String, String, u64, u64)> {
        let acks = self.store.durable.get().map(|d| d.peer_acks()).unwrap_or_default();
        acks.into_iter().map(|a| (a.peer, a.node_id, a.incarnation, a.acked_seq)).collect()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if let Some(durable) = self.store.durable.get() {
            let s = durable.stats();
            d.set_item("durability", &durable.mode)?;
            d.set_item("committed_seq", s.committed_seq)?;
            d.set_item("commits", s.commits)?;
            d.set_item("storage_error", s.error)?;
            d.set_item("last_commit_age_s", s.last_commit_age_s)?;
            d.set_item("commit_ms_p50", s.commit_ms_p50)?;
            d.set_item("commit_ms_p99", s.commit_ms_p99)?;
            let (buckets, sum_s) = durable.commit_latency.snapshot();
            d.set_item("commit_latency_buckets", buckets)?;
            d.set_item("commit_latency_sum_s", sum_s)?;
            d.set_item("storage_bytes", s.storage_bytes)?;
            d.set_item("max_pending", durable.max_pending)?;
        }
        let watchers = self.store.table.lock().watchers().to_vec();
        let watch_stats: Vec<_> = watchers.iter().map(|w| self.store.watch_stats(w)).collect();
        let t = self.store.table.lock();
        if let Some(committed) = self.committed_seq() {
            d.set_item("pending_changes", t.seq().saturating_sub(committed))?;
        }
        let (alive, dead) = t.entity_count();
        let c = &t.counters;
        d.set_item("node_id", t.node().as_str())?;
        d.set_item("entities", alive)?;
        d.set_item("tombstones", dead)?;
        d.set_item("seq", t.seq())?;
        d.set_item("log_entries", t.log_len())?;
        d.set_item("payload_bytes", t.payload_bytes())?;
        d.set_item("writes", c.writes)?;
        d.set_item("stale_keys", c.stale_keys)?;
        d.set_item("rejected", c.rejected)?;
        d.set_item("merges", c.merges)?;
        d.set_item("merges_changed", c.merges_changed)?;
        d.set_item("skewed_stamps", c.skewed_stamps)?;
        d.set_item("incarnation", t.incarnation())?;
        d.set_item("dot_counter", t.counter())?;
        d.set_item("context_nodes", t.context_summary().len())?;
        d.set_item("contexts_adopted", c.adopted)?;
        d.set_item("tombstones_collected", c.collected)?;
        d.set_item("expired", c.expired)?;
        d.set_item("watchers", watchers.len())?;
        d.set_item("coalesced", watch_stats.iter().map(|s| s.coalesced).sum::<u64>())?;
        d.set_item("watch_queued", watch_stats.iter().map(|s| s.queued).sum::<usize>())?;
        d.set_item("events_created", c.events[0])?;
        d.set_item("events_updated", c.events[1])?;
        d.set_item("events_deleted", c.events[2])?;
        Ok(d)
    }
}

fn vector_of(entries: Vec<(String, u64, u64)>) -> VersionVector {
    VersionVector::from_entries(entries.iter().filter(|e| !e.0.is_empty()).map(|(n, i, c)| (intern(n), *i, *c)).collect())
}

/// The node id a data dir belongs to, or None if `dir` holds no meshstore data (read
/// without the lock: a running node may hold it).
#[pyfunction]
fn stored_node_id(py: Python<'_>, dir: &str) -> PyResult<Option<String>> {
    let db = Path::new(dir).join(storage::DB_FILE);
    if !db.is_file() {
        return Ok(None);
    }
    py.allow_threads(|| storage::read_node_state(Path::new(dir)))
        .map(|s| Some(s.meta.node_id))
        .map_err(|e| py_err(py, Error::Storage(e.0)))
}

/// Everything a data dir holds, in one consistent read: (node state dict, clean,
/// context summary, [(replica state bytes, seq)]).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn read_data_dir<'py>(
    py: Python<'py>,
    dir: &str,
) -> PyResult<(Bound<'py, PyDict>, bool, Vec<(String, u64, u64)>, Vec<(Bound<'py, PyBytes>, u64)>)> {
    let (s, states) = py.allow_threads(|| storage::read(Path::new(dir))).map_err(|e| py_err(py, Error::Storage(e.0)))?;
    let meta = PyDict::new(py);
    meta.set_item("node_id", &s.meta.node_id)?;
    meta.set_item("incarnation", s.meta.incarnation)?;
    meta.set_item("counter", s.meta.counter)?;
    meta.set_item("seq", s.meta.seq)?;
    let states = states.iter().map(|(b, seq)| (PyBytes::new(py, b), *seq)).collect();
    Ok((meta, s.clean, s.context, states))
}

/// Copies data dir `dir` to the new file `dest` (SQLite online backup, one consistent
/// commit even while a node writes). Returns the pages copied.
#[pyfunction]
fn backup_data_dir(py: Python<'_>, dir: &str, dest: &str) -> PyResult<u64> {
    py.allow_threads(|| storage::backup(Path::new(dir), Path::new(dest))).map_err(|e| py_err(py, Error::Storage(e.0)))
}

/// A batched watch message's (events other than heartbeats, highest seq), without
/// decoding its entities.
#[pyfunction]
fn event_batch_summary(batch: &[u8]) -> PyResult<(u64, u64)> {
    crate::wire::event_batch_summary(batch).map_err(|e| PyValueError::new_err(format!("watch batch does not parse: {e}")))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(stored_node_id, m)?)?;
    m.add_function(wrap_pyfunction!(read_data_dir, m)?)?;
    m.add_function(wrap_pyfunction!(backup_data_dir, m)?)?;
    m.add_class::<Core>()?;
    m.add_class::<PyUpdateResult>()?;
    m.add_class::<PyEvent>()?;
    m.add_class::<WatchHandle>()?;
    m.add_class::<crate::py_server::PyGrpcServer>()?;
    m.add_function(wrap_pyfunction!(event_batch_summary, m)?)?;
    crate::py_fusion::register(m)?;
    Ok(())
}
