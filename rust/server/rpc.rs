//! The plumbing every RPC of the server shares: a codec that passes message bytes
//! through (requests are read by the handlers, responses are written by them: entities
//! travel as the table encodes them, never decoded and re-encoded), adapters from async
//! closures to tonic's four kinds of method, the mapping of core errors to status codes,
//! and per-method counters with the hook authentication plugs into (`super::auth`).
use crate::error::Error;
use crate::histogram::Histogram;
use bytes::{Buf, BufMut, Bytes};
use futures_util::Stream;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tonic::body::BoxBody;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::{ClientStreamingService, Grpc, ServerStreamingService, StreamingService, UnaryService};
use tonic::{Code, Request, Response, Status, Streaming};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub type BoxStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;
pub type Reply = Result<Response<Bytes>, Status>;
pub type HttpResponse = http::Response<BoxBody>;

/// Message bytes in, message bytes out.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The gRPC machinery of one call, with the server's message size limit.
pub fn grpc(max_message_bytes: usize) -> Grpc<RawCodec> {
    Grpc::new(RawCodec).max_decoding_message_size(max_message_bytes).max_encoding_message_size(usize::MAX)
}

/// A unary method from an async closure.
pub struct Unary<F>(pub Option<F>);
impl<F, Fut> UnaryService<Bytes> for Unary<F>
where
    F: FnOnce(Request<Bytes>) -> Fut,
    Fut: Future<Output = Reply> + Send + 'static,
{
    type Response = Bytes;
    type Future = Fut;
    fn call(&mut self, request: Request<Bytes>) -> Fut {
        (self.0.take().expect("a method is called once"))(request)
    }
}

/// A server-streaming method from an async closure.
pub struct ServerStreaming<F>(pub Option<F>);
impl<F, Fut> ServerStreamingService<Bytes> for ServerStreaming<F>
where
    F: FnOnce(Request<Bytes>) -> Fut,
    Fut: Future<Output = Result<Response<BoxStream>, Status>> + Send + 'static,
{
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = Fut;
    fn call(&mut self, request: Request<Bytes>) -> Fut {
        (self.0.take().expect("a method is called once"))(request)
    }
}

/// A client-streaming method from an async closure.
pub struct ClientStreaming<F>(pub Option<F>);
impl<F, Fut> ClientStreamingService<Bytes> for ClientStreaming<F>
where
    F: FnOnce(Request<Streaming<Bytes>>) -> Fut,
    Fut: Future<Output = Reply> + Send + 'static,
{
    type Response = Bytes;
    type Future = Fut;
    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Fut {
        (self.0.take().expect("a method is called once"))(request)
    }
}

/// A bidirectional-streaming method from an async closure.
pub struct BidiStreaming<F>(pub Option<F>);
impl<F, Fut> StreamingService<Bytes> for BidiStreaming<F>
where
    F: FnOnce(Request<Streaming<Bytes>>) -> Fut,
    Fut: Future<Output = Result<Response<BoxStream>, Status>> + Send + 'static,
{
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = Fut;
    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Fut {
        (self.0.take().expect("a method is called once"))(request)
    }
}

/// The answer to a method this server does not have.
pub fn unimplemented() -> HttpResponse {
    let mut response = http::Response::new(tonic::body::empty_body());
    let headers = response.headers_mut();
    headers.insert(Status::GRPC_STATUS, (Code::Unimplemented as i32).into());
    headers.insert(http::header::CONTENT_TYPE, tonic::metadata::GRPC_CONTENT_TYPE);
    response
}

/// The status a core error is answered with (nothing a client sends becomes UNKNOWN or
/// INTERNAL), with the error's message on one line.
pub fn status_of(err: &Error) -> Status {
    let code = match err {
        Error::Invalid { .. } => Code::InvalidArgument,
        Error::NotFound(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::Stale { .. } => Code::Aborted,
        Error::ClockSkew { .. } | Error::CursorExpired { .. } => Code::OutOfRange,
        Error::FailedPrecondition { .. } => Code::FailedPrecondition,
        // A full or failing disk: retry later, or elsewhere.
        Error::Storage(_) => Code::Unavailable,
    };
    Status::new(code, one_line(&err.to_string()))
}

pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// tonic answers a request over the size limit with OUT_OF_RANGE; gRPC's own servers
/// (and clients' expectations) say RESOURCE_EXHAUSTED. Other statuses pass unchanged.
pub fn limit_status(status: Status) -> Status {
    if status.code() == Code::OutOfRange && status.message().contains("message length too large") {
        return Status::resource_exhausted(format!("request too large: {}", status.message()));
    }
    status
}

/// INVALID_ARGUMENT for request bytes that are not the message the method takes.
pub fn malformed(type_name: &str) -> Status {
    Status::invalid_argument(format!("malformed request: the bytes are not a {type_name}"))
}

/// Who calls, as the authentication hook sees a call.
pub struct Caller<'a> {
    /// The full method path, e.g. `/store.v1.EntityStoreService/UpdateEntity`.
    pub method: &'a str,
    pub headers: &'a http::HeaderMap,
    pub peer: Option<std::net::SocketAddr>,
    /// The client's certificate (DER), verified against the server's CA, under mutual TLS.
    pub certificate: Option<&'a [u8]>,
}

/// Decides whether a call may proceed: Ok(the caller's identity, if known) lets it
/// through, Err(UNAUTHENTICATED / PERMISSION_DENIED) refuses it before any handler runs.
/// The server allows every call without one.
pub type Authorize = Arc<dyn Fn(&Caller<'_>) -> Result<Option<String>, Status> + Send + Sync>;

/// The identity the hook let a call through as, in the request's extensions for the
/// handlers (an approval records who decided). Absent without a hook.
#[derive(Clone)]
pub struct Identity(pub String);

/// One method's counters: calls, failures by status code, and a latency histogram
/// (time to the response head: for streams, the time to open them).
#[derive(Default)]
pub struct MethodStats {
    pub calls: AtomicU64,
    pub failed: Mutex<BTreeMap<&'static str, u64>>,
    pub latency: Histogram,
}

impl MethodStats {
    pub fn observe(&self, started: Instant, code: Code) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.latency.observe(started.elapsed());
        if code != Code::Ok {
            *self.failed.lock().entry(code_name(code)).or_default() += 1;
        }
    }
}

/// The counters of every method, by full method path: made once for the methods the
/// server has (looked up without a lock or an allocation per call); calls to any other
/// path count under "other".
pub struct Metrics {
    methods: BTreeMap<&'static str, MethodStats>,
    other: MethodStats,
}

impl Metrics {
    pub fn new(paths: &[&'static str]) -> Self {
        Metrics { methods: paths.iter().map(|p| (*p, MethodStats::default())).collect(), other: MethodStats::default() }
    }

    pub fn method(&self, path: &str) -> &MethodStats {
        self.methods.get(path).unwrap_or(&self.other)
    }

    /// Every method with at least one call.
    pub fn called(&self) -> impl Iterator<Item = (&'static str, &MethodStats)> {
        self.methods.iter().map(|(p, m)| (*p, m)).chain(std::iter::once(("other", &self.other)))
            .filter(|(_, m)| m.calls.load(Ordering::Relaxed) > 0)
    }
}

/// The upper-case name of a status code, as logs and counters show it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The grpc-status of a finished unary response (0 when the head carries none: the
/// status then travels in the trailers, which means OK for a unary call that answered).
pub fn response_code(response: &HttpResponse) -> Code {
    response
        .headers()
        .get(Status::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}
