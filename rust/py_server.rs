//! The pyo3 face of the gRPC server (`meshstore._core.GrpcServer`) and the `Host` it
//! serves for: a Python object the node passes in (`log`, `stats`, `mesh_opened`,
//! `mesh_batch`, `mesh_resynced`) and the store's Python watchers and expiry timers.
//!
//! Work the server hands to Python without waiting (wake-ups, expiry changes, logs)
//! goes through one thread that takes the GIL per job, in order; calls the server
//! waits for run on tokio's blocking pool and take the GIL there.
use crate::python::Core;
use crate::server::auth::{Policy, Tls};
use crate::server::{Host, Level, Server, ServerOptions};
use crate::store::Notices;
use parking_lot::Mutex;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc;
use std::time::Duration;

/// Roles by method path or by identity.
type Roles = HashMap<String, BTreeSet<String>>;

/// Work handed to Python without waiting, done in order by one thread.
enum Job {
    Notify(Notices),
    Log(i32, &'static str, &'static str, Vec<(&'static str, String)>),
    Resynced(String),
}

struct PyHost {
    host: PyObject,
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl PyHost {
    fn new(py: Python<'_>, core: Py<Core>, host: PyObject) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let hooks = host.clone_ref(py);
        std::thread::Builder::new()
            .name("meshstore-grpc-py".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    Python::with_gil(|py| {
                        let done = match job {
                            Job::Notify(notices) => core.get().deliver(py, notices),
                            Job::Log(level, logger, message, fields) => (|| {
                                let d = PyDict::new(py);
                                for (k, v) in fields {
                                    d.set_item(k, v)?;
                                }
                                hooks.call_method1(py, "log", (level, logger, message, d)).map(drop)
                            })(),
                            Job::Resynced(sender) => hooks.call_method1(py, "mesh_resynced", (sender,)).map(drop),
                        };
                        if let Err(e) = done {
                            e.write_unraisable(py, None);
                        }
                    });
                }
            })
            .expect("a thread starts");
        PyHost { host, jobs: Mutex::new(tx) }
    }

    fn later(&self, job: Job) {
        let _ = self.jobs.lock().send(job);
    }

    /// Calls `hooks.<name>(sender)` for a bool; a failing hook gives `default` (reported).
    fn ask(&self, name: &str, sender: &str, default: bool) -> bool {
        Python::with_gil(|py| match self.host.call_method1(py, name, (sender,)).and_then(|r| r.extract::<bool>(py)) {
            Ok(answer) => answer,
            Err(e) => {
                e.write_unraisable(py, None);
                default
            }
        })
    }
}

impl Host for PyHost {
    fn notify(&self, notices: Notices) {
        self.later(Job::Notify(notices));
    }

    fn log(&self, level: Level, logger: &'static str, message: &'static str, fields: Vec<(&'static str, String)>) {
        let level = match level {
            Level::Debug => 10,
            Level::Info => 20,
            Level::Warning => 30,
            Level::Error => 40,
        };
        self.later(Job::Log(level, logger, message, fields));
    }

    fn stats(&self) -> Vec<(String, f64)> {
        Python::with_gil(|py| match self.host.call_method0(py, "stats").and_then(|r| r.extract::<Vec<(String, f64)>>(py)) {
            Ok(values) => values,
            Err(e) => {
                e.write_unraisable(py, None);
                vec![]
            }
        })
    }

    fn mesh_opened(&self, sender: &str) -> bool {
        self.ask("mesh_opened", sender, false)
    }

    fn mesh_batch(&self, sender: &str) -> bool {
        self.ask("mesh_batch", sender, true)
    }

    fn mesh_resynced(&self, sender: &str) {
        self.later(Job::Resynced(sender.to_string()));
    }
}

/// The gRPC server over a store's core (see `crate::server`).
#[pyclass(module = "meshstore._core", frozen, name = "GrpcServer")]
pub struct PyGrpcServer {
    server: Server,
}

#[pymethods]
impl PyGrpcServer {
    /// Binds and starts serving; OSError if `host:port` cannot be bound or the TLS
    /// material is unusable. `tls`: (certificate chain PEM, key PEM, client CA PEM or
    /// None, client certificate optional). `policy`: (roles per method path, roles per
    /// identity, identity per token SHA-256), enforced before every call (see
    /// `crate::server::auth`); None allows every call.
    #[new]
    #[pyo3(signature = (core, host_hooks, host, port, max_message_bytes, reflection, watch_queue, workers = None, tls = None, policy = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        core: Py<Core>,
        host_hooks: PyObject,
        host: String,
        port: u16,
        max_message_bytes: usize,
        reflection: bool,
        watch_queue: usize,
        workers: Option<usize>,
        tls: Option<(Vec<u8>, Vec<u8>, Option<Vec<u8>>, bool)>,
        policy: Option<(Roles, Roles, HashMap<String, String>)>,
    ) -> PyResult<Self> {
        let store = core.get().store.clone();
        let hooks = std::sync::Arc::new(PyHost::new(py, core, host_hooks));
        let tls = tls.map(|(cert_pem, key_pem, client_ca_pem, client_cert_optional)| Tls { cert_pem, key_pem, client_ca_pem, client_cert_optional });
        let authorize = policy.map(|(methods, identities, tokens)| Policy { methods, identities, tokens }.into_authorize());
        let opts = ServerOptions { host, port, max_message_bytes, reflection, watch_queue, workers, authorize, tls };
        let server = py.allow_threads(|| Server::start(store, hooks, opts)).map_err(PyOSError::new_err)?;
        Ok(PyGrpcServer { server })
    }

    #[getter]
    fn port(&self) -> u16 {
        self.server.port()
    }

    /// The threads serving connections (`workers`, or one per CPU the process may use).
    #[getter]
    fn workers(&self) -> usize {
        self.server.workers()
    }

    /// Health NOT_SERVING, open streams ended, new ones refused (still listening).
    fn begin_shutdown(&self, py: Python<'_>) {
        py.allow_threads(|| self.server.begin_shutdown())
    }

    /// Stops: in-flight calls get `grace` seconds (None: dropped at once). Blocks.
    #[pyo3(signature = (grace = None))]
    fn stop(&self, py: Python<'_>, grace: Option<f64>) {
        py.allow_threads(|| self.server.stop(grace.map(|g| Duration::from_secs_f64(g.max(0.0)))))
    }

    /// Drops every call at once (also while a graceful `stop` waits).
    fn abort(&self, py: Python<'_>) {
        py.allow_threads(|| self.server.abort())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.server.stats();
        let d = PyDict::new(py);
        d.set_item("watch_streams", s.watch_streams)?;
        d.set_item("publish_streams", s.publish_streams)?;
        d.set_item("uptime_seconds", (s.uptime_s * 1000.0).round() / 1000.0)?;
        let methods = PyDict::new(py);
        for (path, calls, failed, buckets, sum_s) in s.methods {
            let m = PyDict::new(py);
            m.set_item("calls", calls)?;
            m.set_item("failed", failed.into_iter().collect::<Vec<_>>())?;
            m.set_item("latency_buckets", buckets)?;
            m.set_item("latency_sum_s", sum_s)?;
            methods.set_item(path, m)?;
        }
        d.set_item("methods", methods)?;
        d.set_item("latency_bounds_s", crate::histogram::LATENCY_BOUNDS_S.to_vec())?;
        Ok(d)
    }

    /// The mesh receiver's counters: totals and, per sending node, its streams,
    /// batches, states (received, changed ours, rejected), bytes and last seq.
    fn mesh_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.server.mesh_stats();
        let d = PyDict::new(py);
        d.set_item("streams_open", s.streams_open)?;
        d.set_item("refused_self", s.refused_self)?;
        d.set_item("refused_invalid", s.refused_invalid)?;
        d.set_item("rejected_states", s.rejected_states)?;
        d.set_item("contexts_adopted", s.contexts_adopted)?;
        let peers = PyDict::new(py);
        for (node, p) in s.peers {
            let e = PyDict::new(py);
            e.set_item("node_id", &node)?;
            e.set_item("incarnation", p.incarnation)?;
            e.set_item("streams", p.streams)?;
            e.set_item("open_streams", p.open_streams)?;
            e.set_item("batches", p.batches)?;
            e.set_item("states", p.states)?;
            e.set_item("changed", p.changed)?;
            e.set_item("rejected", p.rejected)?;
            e.set_item("bytes", p.bytes)?;
            e.set_item("last_seq", p.last_seq)?;
            e.set_item("last_error", p.last_error)?;
            e.set_item("last_seen", p.last_seen)?;
            peers.set_item(node, e)?;
        }
        d.set_item("peers", peers)?;
        Ok(d)
    }
}
