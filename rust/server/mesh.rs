//! The receiving side of the mesh: `mesh.v1.MeshService/Push` (see proto/mesh/v1).
//!
//! A peer's relay opens Push and says Hello; this side answers with its own Hello (its
//! context summary, and `resync` when the host says the sender must send everything),
//! merges every state of each batch in one table call with the sender as their source,
//! adopts the sender's context summary when a batch carries one (unless a state of the
//! stream was refused), and acknowledges each batch once it is durable.
//!
//! Bad input never takes the node down: a Hello with this node's own id is
//! FAILED_PRECONDITION; an empty id, a stream not starting with Hello or an undecodable
//! message is INVALID_ARGUMENT; a state the store refuses is counted, logged (the first
//! few per stream, then every 1000th) and skipped, and its batch is still acknowledged
//! with the count, so a sender never stalls or resends it forever.
use super::rpc::{grpc, BidiStreaming, BoxStream, HttpResponse};
use super::{peer_name, Context, Level};
use crate::causal::VersionVector;
use crate::intern::intern;
use crate::pb::mesh::v1::{self as pb, push_response, raw_push_request};
use crate::pb::Dot;
use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;
use tonic::{Request, Response, Status, Streaming};

pub(crate) const PUSH: &str = "/mesh.v1.MeshService/Push";
const LOG_FIRST: u64 = 5;
const LOG_EVERY: u64 = 1000;
const LOGGER: &str = "meshstore.mesh.receiver";

/// What one sending node did to us (all its streams).
#[derive(Clone, Default, Debug)]
pub struct PeerIn {
    pub incarnation: u64,
    pub streams: u64,
    pub open_streams: u64,
    pub batches: u64,
    pub states: u64,
    pub changed: u64,
    pub rejected: u64,
    pub bytes: u64,
    pub last_seq: u64,
    pub last_error: String,
    /// Unix seconds.
    pub last_seen: f64,
}

#[derive(Clone, Default, Debug)]
pub struct MeshStats {
    pub streams_open: u64,
    pub refused_self: u64,
    pub refused_invalid: u64,
    pub rejected_states: u64,
    pub contexts_adopted: u64,
    pub peers: BTreeMap<String, PeerIn>,
}

/// The receiver's counters.
#[derive(Default)]
pub(crate) struct Receiver {
    stats: Mutex<MeshStats>,
}

impl Receiver {
    pub fn stats(&self) -> MeshStats {
        self.stats.lock().clone()
    }
}

pub(crate) async fn handle<B>(ctx: Arc<Context>, req: http::Request<B>, peer: SocketAddr) -> HttpResponse
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    if req.uri().path() != PUSH {
        return super::rpc::unimplemented();
    }
    let mut g = grpc(ctx.max_message_bytes);
    g.streaming(BidiStreaming(Some(move |r| push(ctx, r, peer))), req).await
}

fn summary_of(v: &VersionVector) -> Vec<Dot> {
    v.entries().iter().map(|&(n, i, c)| Dot { node: n.as_str().into(), incarnation: i, counter: c }).collect()
}

fn vector_of(dots: &[Dot]) -> VersionVector {
    VersionVector::from_entries(dots.iter().filter(|d| !d.node.is_empty()).map(|d| (intern(&d.node), d.incarnation, d.counter)).collect())
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn response(kind: push_response::Kind) -> Bytes {
    pb::PushResponse { kind: Some(kind) }.encode_to_vec().into()
}

/// Refuses a stream: counted by the caller, logged here.
fn refuse(ctx: &Context, peer: SocketAddr, status: Status, sender: Option<&str>) -> Status {
    let mut fields = vec![
        ("code", super::rpc::code_name(status.code()).to_string()),
        ("reason", status.message().to_string()),
        ("peer_address", peer_name(Some(peer))),
        ("node_id", ctx.node_id.to_string()),
    ];
    if let Some(sender) = sender {
        fields.push(("peer", sender.to_string()));
    }
    ctx.log(Level::Warning, LOGGER, "mesh stream refused", fields);
    status
}

fn what(kind: &Option<raw_push_request::Kind>) -> &'static str {
    match kind {
        Some(raw_push_request::Kind::Hello(_)) => "a Hello",
        Some(raw_push_request::Kind::Batch(_)) => "a Batch",
        None => "an empty message",
    }
}

async fn push(ctx: Arc<Context>, req: Request<Streaming<Bytes>>, peer: SocketAddr) -> Result<Response<BoxStream>, Status> {
    if ctx.is_closing() {
        return Err(Status::unavailable("node shutting down"));
    }
    let mut input = req.into_inner();
    let Some(first) = input.message().await? else {
        return Ok(Response::new(Box::pin(futures_util::stream::empty()))); // gone before a word
    };
    let invalid = |message: String| {
        ctx.mesh.stats.lock().refused_invalid += 1;
        refuse(&ctx, peer, Status::invalid_argument(message), None)
    };
    let hello = match pb::RawPushRequest::decode(first.as_ref()) {
        Err(_) => return Err(invalid("a Push stream must start with a Hello, got an undecodable message".into())),
        Ok(pb::RawPushRequest { kind: Some(raw_push_request::Kind::Hello(hello)) }) => hello,
        Ok(other) => return Err(invalid(format!("a Push stream must start with a Hello, got {}", what(&other.kind)))),
    };
    if hello.node_id.is_empty() {
        return Err(invalid("Hello.node_id is empty".into()));
    }
    let own = ctx.node_id;
    let (incarnation, summary) = {
        let t = ctx.store.table.lock();
        (t.incarnation(), summary_of(t.context_summary()))
    };
    if hello.node_id == own {
        ctx.mesh.stats.lock().refused_self += 1;
        let message = format!(
            "peer claims this node's own id '{own}': two nodes share a node id, or a node lists itself as a peer"
        );
        return Err(refuse(&ctx, peer, Status::failed_precondition(message), Some(&hello.node_id)));
    }
    let sender = hello.node_id.clone();
    let restarted = {
        let mut s = ctx.mesh.stats.lock();
        s.streams_open += 1;
        let p = s.peers.entry(sender.clone()).or_default();
        let restarted = p.incarnation != 0 && p.incarnation != hello.incarnation;
        p.incarnation = hello.incarnation;
        p.streams += 1;
        p.open_streams += 1;
        restarted
    };
    let stream = PushStream {
        ctx: ctx.clone(),
        peer,
        sender: sender.clone(),
        input,
        closing: ctx.closing.subscribe(),
        logged: 0,
        refused_any: false,
        resync_until: None,
        done: false,
    };
    ctx.log(
        Level::Info,
        LOGGER,
        "mesh peer stream opened",
        vec![
            ("node_id", own.into()),
            ("peer", sender.clone()),
            ("peer_incarnation", format!("{:016x}", hello.incarnation)),
            ("peer_restarted", if restarted { "True" } else { "False" }.into()),
            ("peer_address", peer_name(Some(peer))),
        ],
    );
    let opened = sender.clone();
    let resync = ctx.blocking(move |host| host.mesh_opened(&opened)).await;
    let mut stream = stream;
    stream.resync_until = resync.then_some(hello.seq);
    let answer = response(push_response::Kind::Hello(pb::Hello {
        node_id: own.into(),
        incarnation,
        context: summary,
        resync,
        seq: 0,
    }));
    let rest = futures_util::stream::unfold(stream, |mut s| async move { s.next().await.map(|m| (m, s)) });
    Ok(Response::new(Box::pin(futures_util::StreamExt::chain(futures_util::stream::once(async { Ok(answer) }), rest))))
}

struct PushStream {
    ctx: Arc<Context>,
    peer: SocketAddr,
    sender: String,
    input: Streaming<Bytes>,
    closing: tokio::sync::watch::Receiver<bool>,
    logged: u64,
    /// A state of this stream was refused: its summaries cannot be adopted.
    refused_any: bool,
    /// The sender was asked to resync: its whole state is here once a batch reaches this seq.
    resync_until: Option<u64>,
    done: bool,
}

impl Drop for PushStream {
    fn drop(&mut self) {
        let (batches, states, rejected) = {
            let mut s = self.ctx.mesh.stats.lock();
            s.streams_open -= 1;
            let p = s.peers.entry(self.sender.clone()).or_default();
            p.open_streams -= 1;
            (p.batches, p.states, p.rejected)
        };
        let fields = vec![("batches", batches.to_string()), ("states", states.to_string()), ("rejected", rejected.to_string())];
        self.log(Level::Info, "mesh peer stream closed", fields);
    }
}

impl PushStream {
    /// Logs an event of this stream: this node and the sending peer, then `fields`.
    fn log(&self, level: Level, message: &'static str, fields: Vec<(&'static str, String)>) {
        let mut all = vec![("node_id", self.ctx.node_id.to_string()), ("peer", self.sender.clone())];
        all.extend(fields);
        self.ctx.log(level, LOGGER, message, all);
    }

    fn fail(&mut self, status: Status) -> Option<Result<Bytes, Status>> {
        self.done = true;
        Some(Err(refuse(&self.ctx, self.peer, status, Some(&self.sender))))
    }

    async fn next(&mut self) -> Option<Result<Bytes, Status>> {
        if self.done {
            return None;
        }
        let message = tokio::select! {
            m = self.input.message() => Some(m),
            _ = self.closing.wait_for(|c| *c) => None,
        };
        let raw = match message {
            // The sender's relay retries, here or at this node's successor.
            None => return self.fail(Status::unavailable("node shutting down")),
            Some(Ok(Some(raw))) => raw,
            Some(Ok(None)) => return None,
            Some(Err(status)) => {
                self.done = true;
                return Some(Err(super::rpc::limit_status(status)));
            }
        };
        let batch = match pb::RawPushRequest::decode(raw.as_ref()) {
            Ok(pb::RawPushRequest { kind: Some(raw_push_request::Kind::Batch(b)) }) => b,
            other => {
                self.ctx.mesh.stats.lock().refused_invalid += 1;
                let got = match &other {
                    Err(_) => "an undecodable message",
                    Ok(r) if matches!(r.kind, Some(raw_push_request::Kind::Hello(_))) => "a second Hello",
                    Ok(_) => "an empty message",
                };
                return self.fail(Status::invalid_argument(format!("expected a Batch after the Hello, got {got}")));
            }
        };
        let sender = self.sender.clone();
        if !self.ctx.blocking(move |host| host.mesh_batch(&sender)).await {
            // Deletes were forgotten while this sender was away, after its stream
            // opened: end the stream so it reconnects and is asked to resync.
            return self.fail(Status::unavailable("this node forgot deletes while you were away: reconnect and resync"));
        }
        let bytes: u64 = batch.states.iter().map(|s| s.len() as u64).sum();
        let count = batch.states.len() as u64;
        let adopt = (!batch.context.is_empty() && !self.refused_any).then(|| vector_of(&batch.context));
        let source = self.sender.clone();
        let states = batch.states;
        let merged = self
            .ctx
            .write(move |t| {
                let merged = t.merge_each(states.iter().map(|s| &s[..]), &source);
                let results: Vec<_> = merged.into_iter().zip(&states).map(|(r, s)| r.map_err(|e| (e, s.len()))).collect();
                // A summary is adopted only after a stream whose every state merged.
                let refused = results.iter().any(|r| r.is_err());
                let adopted = match adopt.filter(|_| !refused) {
                    Some(v) => Some(t.adopt(&v)),
                    None => None,
                };
                Ok((results, adopted))
            })
            .await;
        let (results, adopted) = match merged {
            Ok(done) => done,
            // Not the states' fault (a failing disk): no ack, so the sender keeps them and retries.
            Err(status) => return self.fail(status),
        };
        let mut changed = 0u32;
        let mut rejected = 0u32;
        let mut first_error = String::new();
        for result in results {
            match result {
                Ok(true) => changed += 1,
                Ok(false) => {}
                Err((e, len)) => {
                    rejected += 1;
                    let message = format!("{}: {}", e.class_name(), e);
                    let total = {
                        let mut s = self.ctx.mesh.stats.lock();
                        let p = s.peers.entry(self.sender.clone()).or_default();
                        p.last_error = message.clone();
                        p.rejected + rejected as u64
                    };
                    if self.logged < LOG_FIRST || total % LOG_EVERY == 0 {
                        self.logged += 1;
                        let fields = vec![
                            ("error", message.clone()),
                            ("state_bytes", len.to_string()),
                            ("rejected_total", total.to_string()),
                        ];
                        self.log(Level::Warning, "mesh state rejected", fields);
                    }
                    if first_error.is_empty() {
                        first_error = message;
                    }
                }
            }
        }
        self.refused_any |= rejected > 0;
        if self.resync_until.is_some_and(|until| batch.last_seq >= until) {
            self.resync_until = None;
            self.ctx.host.mesh_resynced(&self.sender);
        }
        if let Some(Err(e)) = &adopted {
            self.refused_any = true;
            self.log(Level::Warning, "mesh context summary refused", vec![("error", e.to_string())]);
        }
        {
            let mut s = self.ctx.mesh.stats.lock();
            match adopted {
                Some(Ok(true)) => s.contexts_adopted += 1,
                Some(Err(e)) => {
                    s.peers.entry(self.sender.clone()).or_default().last_error = format!("context summary refused: {e}");
                }
                _ => {}
            }
            s.rejected_states += rejected as u64;
            let p = s.peers.entry(self.sender.clone()).or_default();
            p.batches += 1;
            p.states += count;
            p.changed += changed as u64;
            p.rejected += rejected as u64;
            p.bytes += bytes;
            p.last_seq = batch.last_seq;
            p.last_seen = now_s();
        }
        let first_error: String = first_error.chars().take(500).collect();
        Some(Ok(response(push_response::Kind::Ack(pb::Ack { seq: batch.last_seq, rejected, changed, first_error }))))
    }
}
