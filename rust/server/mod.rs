//! The gRPC data plane: `store.v1.EntityStoreService`, the receiving side of
//! `mesh.v1.MeshService`, gRPC health and server reflection, served by tonic on a tokio
//! runtime the server owns, over the `Store` the Python API shares (no copy).
//!
//! What stays outside is reached through `Host` (the Python node implements it): waking
//! Python watchers and arming expiry timers after a write, structured logs, the numbers
//! GetStats adds, and the mesh relay's view of its peers. Calls to it that may block run
//! on tokio's blocking pool, never on the runtime's workers.
//!
//! Lifecycle: `Server::start` binds and serves; `begin_shutdown` turns health to
//! NOT_SERVING and ends every open watch (UNAVAILABLE with its resume cursor), publish
//! (answered with its summary) and mesh stream (UNAVAILABLE), refusing new ones;
//! `stop(grace)` stops accepting and gives in-flight calls `grace`, then drops them.
pub mod auth;
pub mod rpc;
mod conn;
mod entity_store;
mod mesh;
mod watch_stream;

use crate::error::{Error, Result as CoreResult};
use crate::store::{Notices, Store};
use crate::table::Table;
pub use mesh::{MeshStats, PeerIn};
use rpc::{Authorize, Caller, HttpResponse, Identity, Metrics};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tonic::body::BoxBody;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

pub const STORE_SERVICE: &str = "store.v1.EntityStoreService";
pub const MESH_SERVICE: &str = "mesh.v1.MeshService";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warning,
    Error,
}

/// What the server needs from the process that runs it.
pub trait Host: Send + Sync + 'static {
    /// Delivers what a write left to do (wake Python watchers, arm expiry timers). Must
    /// not block.
    fn notify(&self, notices: Notices);
    /// Logs one structured event. Must not block.
    fn log(&self, level: Level, logger: &'static str, message: &'static str, fields: Vec<(&'static str, String)>);
    /// The numbers GetStats reports besides the server's own. May block.
    fn stats(&self) -> Vec<(String, f64)>;
    /// A peer opened a Push stream: true if it must resync (send everything). May block.
    fn mesh_opened(&self, sender: &str) -> bool;
    /// A peer pushed a batch: false if its stream must end (it owes a resync). May block.
    fn mesh_batch(&self, sender: &str) -> bool;
    /// A peer that was asked to resync has sent its whole state. Must not block.
    fn mesh_resynced(&self, sender: &str);
}

pub struct ServerOptions {
    pub host: String,
    pub port: u16,
    /// The largest request message accepted (bigger: RESOURCE_EXHAUSTED).
    pub max_message_bytes: usize,
    pub reflection: bool,
    /// Each watch stream's queue bound before it coalesces (per entity).
    pub watch_queue: usize,
    /// Threads of the runtime that serves every connection (None: one per CPU the
    /// process may use, as `std::thread::available_parallelism` counts them: affinity
    /// and cgroup quota included).
    pub workers: Option<usize>,
    pub authorize: Option<Authorize>,
    /// TLS (mutual with a client CA); None: plaintext.
    pub tls: Option<auth::Tls>,
}

/// What every handler shares.
pub(crate) struct Context {
    pub store: Arc<Store>,
    /// The store's node id (fixed for its life), for answers and log lines.
    pub node_id: &'static str,
    pub host: Arc<dyn Host>,
    pub max_message_bytes: usize,
    pub watch_queue: usize,
    /// True once shutdown began: streams end, new ones are refused.
    pub closing: tokio::sync::watch::Sender<bool>,
    pub metrics: Metrics,
    pub authorize: Option<Authorize>,
    pub watch_streams: AtomicUsize,
    pub publish_streams: AtomicUsize,
    pub mesh: mesh::Receiver,
    pub started: Instant,
    /// Where watch streams are fed from (see `FANOUT_THREADS`).
    pub fanout: tokio::runtime::Handle,
}

impl Context {
    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Runs a write on the table: admitted by storage (waiting off the workers while it
    /// is behind or failing), its notices delivered, and answered only once it is as
    /// durable as the store promises.
    pub async fn write<T, F>(&self, op: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Table) -> CoreResult<T> + Send + 'static,
    {
        let mut op = Some(|t: &mut Table| (op(t), t.seq()));
        let ((out, seq), notices) = loop {
            if let Some(done) = self.store.try_write(&mut op) {
                break done;
            }
            let store = self.store.clone();
            let admitted = tokio::task::spawn_blocking(move || store.gate()).await;
            admitted.map_err(|e| Status::internal(format!("storage wait failed: {e}")))?.map_err(|e| rpc::status_of(&e))?;
        };
        if !notices.is_empty() {
            self.host.notify(notices);
        }
        let out = out.map_err(|e| rpc::status_of(&e))?;
        self.store.durable(seq).await.map_err(|e| rpc::status_of(&e))?;
        Ok(out)
    }

    /// Runs a host call that may block, off the runtime's workers.
    pub async fn blocking<T: Send + 'static>(&self, call: impl FnOnce(&dyn Host) -> T + Send + 'static) -> T {
        let host = self.host.clone();
        tokio::task::spawn_blocking(move || call(&*host)).await.expect("host calls do not panic")
    }

    pub fn log(&self, level: Level, logger: &'static str, message: &'static str, fields: Vec<(&'static str, String)>) {
        self.host.log(level, logger, message, fields);
    }
}

/// How a peer is named in logs (as gRPC's own `context.peer()` does).
pub(crate) fn peer_name(peer: Option<SocketAddr>) -> String {
    match peer {
        Some(SocketAddr::V4(a)) => format!("ipv4:{a}"),
        Some(SocketAddr::V6(a)) => format!("ipv6:{a}"),
        None => "unknown".into(),
    }
}

fn remote_addr<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    match req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
        Some(tls) => tls.get_ref().remote_addr(),
        None => req.extensions().get::<TcpConnectInfo>().and_then(|i| i.remote_addr()),
    }
}

/// The client's verified certificate (DER) under mutual TLS.
fn client_certificate<B>(req: &http::Request<B>) -> Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>> {
    req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|tls| tls.peer_certs())
}

/// Routes one service's calls: the authentication hook first (a refusal is counted,
/// logged and answered at once; the identity it names reaches the handlers as an
/// `rpc::Identity` extension), then the method, then the counters and (for failures) a
/// log line.
async fn route<B, Fut>(ctx: Arc<Context>, mut req: http::Request<B>, handle: impl FnOnce(Arc<Context>, http::Request<B>, SocketAddr) -> Fut) -> HttpResponse
where
    Fut: std::future::Future<Output = HttpResponse>,
{
    let started = Instant::now();
    let path = req.uri().path().to_owned();
    let peer = remote_addr(&req);
    if let Some(authorize) = &ctx.authorize {
        let certs = client_certificate(&req);
        let certificate = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        match authorize(&Caller { method: &path, headers: req.headers(), peer, certificate }) {
            Ok(identity) => {
                if let Some(name) = identity {
                    req.extensions_mut().insert(Identity(name));
                }
            }
            Err(status) => {
                ctx.metrics.method(&path).observe(started, status.code());
                log_call(&ctx, Level::Warning, "request refused", &path, status.code(), status.message().into(), peer);
                return status.into_http();
            }
        }
    }
    let mut response = handle(ctx.clone(), req, peer.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))).await;
    if rpc::response_code(&response) == tonic::Code::OutOfRange {
        if let Some(status) = Status::from_header_map(response.headers()) {
            response = rpc::limit_status(status).into_http();
        }
    }
    let code = rpc::response_code(&response);
    ctx.metrics.method(&path).observe(started, code);
    if code != tonic::Code::Ok {
        let message = Status::from_header_map(response.headers()).map(|s| s.message().to_string()).unwrap_or_default();
        let level = match code {
            tonic::Code::Internal => Level::Error,
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => Level::Warning,
            _ => Level::Info,
        };
        log_call(&ctx, level, "request failed", &path, code, message, peer);
    }
    response
}

/// One log line about a call that did not succeed (never its headers: they may hold a token).
fn log_call(ctx: &Context, level: Level, message: &'static str, path: &str, code: tonic::Code, error: String, peer: Option<SocketAddr>) {
    let method = path.rsplit('/').next().unwrap_or_default().to_string();
    let fields = vec![("method", method), ("code", rpc::code_name(code).into()), ("error", error), ("peer", peer_name(peer))];
    ctx.log(level, "meshstore.grpc.server", message, fields);
}

/// A tonic service over `Context`, named `N::NAME`, whose calls go to `N::handle`.
macro_rules! service {
    ($name:ident, $service:expr, $handler:path) => {
        #[derive(Clone)]
        pub(crate) struct $name(pub Arc<Context>);

        impl NamedService for $name {
            const NAME: &'static str = $service;
        }

        impl<B> tower_service::Service<http::Request<B>> for $name
        where
            B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
            B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
        {
            type Response = http::Response<BoxBody>;
            type Error = Infallible;
            type Future = rpc::BoxFuture<Result<Self::Response, Infallible>>;

            fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: http::Request<B>) -> Self::Future {
                Box::pin(route(self.0.clone(), req, $handler).map(Ok))
            }
        }
    };
}
use futures_util::{FutureExt, StreamExt};
service!(EntityStoreService, STORE_SERVICE, entity_store::handle);
service!(MeshService, MESH_SERVICE, mesh::handle);

/// What `Server::stats` reports.
pub struct ServerStats {
    pub watch_streams: usize,
    pub publish_streams: usize,
    pub uptime_s: f64,
    /// Per method path: calls, failures by code, latency buckets and sum (µs).
    pub methods: Vec<(String, u64, BTreeMap<&'static str, u64>, Vec<u64>, f64)>,
}

/// The threads that feed watch streams (events taken from the watchers' queues, caught up
/// from the log, encoded): one. Everything else the server does (ingest, unary calls, the
/// mesh, writing frames to sockets) runs on the runtime's workers. With more watchers
/// reading than the CPU can feed, the fan-out gets at most this thread's share and
/// watchers fall behind and coalesce, instead of a hundred readers taking the CPU from
/// ingest; one thread feeds millions of events a second when there is CPU to spare.
const FANOUT_THREADS: usize = 1;
/// The fan-out thread's nice value. Under contention it gets about a tenth of a core
/// against an ingest thread (CFS weights 110 to 1024) rather than half: watchers behind
/// coalesce more and ingest keeps its rate. With CPU to spare it runs as fast as ever.
const FANOUT_NICE: i32 = 10;

/// Lowers the calling thread's priority to `FANOUT_NICE` (Linux: a thread's own nice
/// value; where that fails, the thread keeps the default priority).
fn yield_to_ingest() {
    // SAFETY: setpriority only reads its arguments; `who` 0 names the calling thread.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, FANOUT_NICE) };
}

pub struct Server {
    ctx: Arc<Context>,
    runtime: tokio::runtime::Runtime,
    fanout: parking_lot::Mutex<Option<tokio::runtime::Runtime>>,
    port: u16,
    health: tokio::sync::Mutex<tonic_health::server::HealthReporter>,
    stop: parking_lot::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    serving: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    abort: tokio::task::AbortHandle,
}

fn bind(host: &str, port: u16) -> std::result::Result<std::net::TcpListener, String> {
    let wanted = if host.contains(':') && !host.starts_with('[') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let addrs: Vec<SocketAddr> = (host.trim_start_matches('[').trim_end_matches(']'), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot listen on {wanted}: {e}"))?
        .collect();
    let mut last = format!("cannot listen on {wanted}: no address");
    for addr in addrs {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = format!("cannot listen on {wanted}: {e}"),
        }
    }
    Err(last)
}

impl Server {
    /// Binds `host:port` and starts serving. Err: the address cannot be bound (the
    /// message says which and why).
    pub fn start(store: Arc<Store>, host: Arc<dyn Host>, opts: ServerOptions) -> std::result::Result<Server, String> {
        let listener = bind(&opts.host, opts.port)?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let workers = opts.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("meshstore-grpc")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the server's runtime: {e}"))?;
        let fanout = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(FANOUT_THREADS)
            .thread_name("meshstore-fanout")
            .on_thread_start(yield_to_ingest)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the server's runtime: {e}"))?;
        let node_id = store.table.lock().node().as_str();
        let ctx = Arc::new(Context {
            store,
            node_id,
            host,
            max_message_bytes: opts.max_message_bytes,
            watch_queue: opts.watch_queue.max(1),
            closing: tokio::sync::watch::channel(false).0,
            metrics: Metrics::new(&entity_store::METHODS.iter().chain(&[mesh::PUSH]).copied().collect::<Vec<_>>()),
            authorize: opts.authorize,
            watch_streams: AtomicUsize::new(0),
            publish_streams: AtomicUsize::new(0),
            mesh: mesh::Receiver::default(),
            started: Instant::now(),
            fanout: fanout.handle().clone(),
        });
        let (mut reporter, health_service) = tonic_health::server::health_reporter();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let reflection = opts.reflection;
        let serving = runtime.block_on(async {
            // "" (the whole server) starts SERVING; setting it again would make every
            // Watch see a change that is none.
            for name in [STORE_SERVICE, MESH_SERVICE] {
                reporter.set_service_status(name, tonic_health::ServingStatus::Serving).await;
            }
            let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
                s.map(conn::Conn::new)
            });
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = &opts.tls {
                builder = builder.tls_config(tls.config()).map_err(|e| format!("cannot use the TLS certificate and key: {e}"))?;
            }
            let mut router = builder
                // Receive windows big enough for a publisher of many small messages: h2
                // refuses a peer that has more small DATA frames in flight than the window
                // allows for, and ends its connection.
                .initial_connection_window_size(Some(8 << 20))
                .initial_stream_window_size(Some(4 << 20))
                .add_service(EntityStoreService(ctx.clone()))
                .add_service(MeshService(ctx.clone()))
                .add_service(health_service);
            if reflection {
                let v1 = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1()
                    .map_err(|e| e.to_string())?;
                let v1alpha = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1alpha()
                    .map_err(|e| e.to_string())?;
                router = router.add_service(v1).add_service(v1alpha);
            }
            let ctx = ctx.clone();
            Ok::<_, String>(tokio::spawn(async move {
                let served = router.serve_with_incoming_shutdown(incoming, stop_rx.map(drop)).await;
                if let Err(e) = served {
                    ctx.log(Level::Error, "meshstore.grpc.server", "server failed", vec![("error", e.to_string())]);
                }
            }))
        })?;
        Ok(Server {
            ctx,
            runtime,
            fanout: parking_lot::Mutex::new(Some(fanout)),
            port,
            health: tokio::sync::Mutex::new(reporter),
            stop: parking_lot::Mutex::new(Some(stop_tx)),
            abort: serving.abort_handle(),
            serving: parking_lot::Mutex::new(Some(serving)),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The threads serving connections.
    pub fn workers(&self) -> usize {
        self.runtime.metrics().num_workers()
    }

    /// Health NOT_SERVING; open watch, publish and mesh streams ended; new ones refused.
    /// Still listening. Idempotent.
    pub fn begin_shutdown(&self) {
        if self.ctx.closing.send_replace(true) {
            return;
        }
        self.runtime.block_on(async {
            let mut health = self.health.lock().await;
            for name in ["", STORE_SERVICE, MESH_SERVICE] {
                health.set_service_status(name, tonic_health::ServingStatus::NotServing).await;
            }
        });
    }

    /// Stops accepting calls; in-flight ones get `grace` (None: dropped at once). Blocks
    /// until done. Idempotent.
    pub fn stop(&self, grace: Option<Duration>) {
        self.begin_shutdown();
        let Some(serving) = self.serving.lock().take() else { return };
        self.runtime.block_on(async {
            // Health Watch streams end once their service is gone (after NOT_SERVING).
            let mut health = self.health.lock().await;
            for name in ["", STORE_SERVICE, MESH_SERVICE] {
                health.clear_service_status(name).await;
            }
        });
        if let Some(stop) = self.stop.lock().take() {
            let _ = stop.send(());
        }
        let finished = self.runtime.block_on(async {
            match grace {
                Some(grace) => tokio::time::timeout(grace, serving).await.is_ok(),
                None => false,
            }
        });
        if !finished {
            self.abort();
        }
        // Its streams have ended with the calls (closing, or their client gone).
        if let Some(fanout) = self.fanout.lock().take() {
            fanout.shutdown_background();
        }
    }

    /// Drops every connection and call at once (also while `stop` waits out its grace).
    pub fn abort(&self) {
        self.begin_shutdown();
        self.abort.abort();
    }

    pub fn stats(&self) -> ServerStats {
        let methods = self
            .ctx
            .metrics
            .called()
            .map(|(path, m)| {
                let (buckets, sum_s) = m.latency.snapshot();
                (path.to_string(), m.calls.load(Ordering::Relaxed), m.failed.lock().clone(), buckets, sum_s)
            })
            .collect();
        ServerStats {
            watch_streams: self.ctx.watch_streams.load(Ordering::Relaxed),
            publish_streams: self.ctx.publish_streams.load(Ordering::Relaxed),
            uptime_s: self.ctx.started.elapsed().as_secs_f64(),
            methods,
        }
    }

    pub fn mesh_stats(&self) -> MeshStats {
        self.ctx.mesh.stats()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(None);
    }
}

/// One count of open streams (`counter` picks which), held for as long as the stream is open.
pub(crate) struct Open(Arc<Context>, fn(&Context) -> &AtomicUsize);

impl Open {
    pub fn new(ctx: &Arc<Context>, counter: fn(&Context) -> &AtomicUsize) -> Self {
        counter(ctx).fetch_add(1, Ordering::Relaxed);
        Open(ctx.clone(), counter)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::Relaxed);
    }
}

/// Core errors as statuses, for `?` in handlers.
impl From<Error> for Status {
    fn from(e: Error) -> Status {
        rpc::status_of(&e)
    }
}
