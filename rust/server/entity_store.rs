//! `store.v1.EntityStoreService`: the seed system's eight RPCs with their bare messages
//! (its clients work unchanged), and meshstore's additions: UpdateEntityDetailed,
//! PublishEntities, GetStats and WatchEntityBatches (in `watch_stream`).
//!
//! Requests are read in place: the entity a request carries is sliced out of its bytes
//! and handed to the table, which decodes it once. Responses are the table's own
//! encoding. Every write is answered once it is as durable as the store promises.
use super::rpc::{self, grpc, malformed, BoxStream, ClientStreaming, HttpResponse, Reply, ServerStreaming, Unary};
use super::{watch_stream, Context, Level, Open};
use crate::approval;
use crate::pb::store::v1 as pb;
use crate::pb::{ApprovalState, EntityType};
use crate::error::Result as CoreResult;
use crate::table::{Prepared, WriteMode, WriteOutcome, WriteRules};
use crate::entity::View;
use crate::intern::{existing, Sym};
use crate::wire::{put_bytes_field, scan, Field};
use bytes::Bytes;
use prost::Message;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};

/// PublishEntities upserts this many entities per table call...
const PUBLISH_CHUNK: usize = 1024;
/// ...or whatever arrived within this time, so a slow publisher is applied promptly.
const PUBLISH_FLUSH_DELAY: Duration = Duration::from_millis(5);
/// How many rejection messages a PublishSummary carries.
const PUBLISH_MAX_ERRORS: usize = 10;
/// Metadata of UpdateEntity: a serialized UpdateResult without the entity.
pub const UPDATE_RESULT_METADATA: &str = "meshstore-update-result-bin";

/// Every method of the service, by full path.
pub(crate) const METHODS: [&str; 13] = [
    "/store.v1.EntityStoreService/CreateEntity",
    "/store.v1.EntityStoreService/GetEntity",
    "/store.v1.EntityStoreService/ListEntities",
    "/store.v1.EntityStoreService/UpdateEntity",
    "/store.v1.EntityStoreService/UpdateEntityDetailed",
    "/store.v1.EntityStoreService/DeleteEntity",
    "/store.v1.EntityStoreService/ApproveAction",
    "/store.v1.EntityStoreService/DenyAction",
    "/store.v1.EntityStoreService/GetStats",
    "/store.v1.EntityStoreService/PublishEntities",
    "/store.v1.EntityStoreService/WatchEntities",
    "/store.v1.EntityStoreService/WatchEntityBatches",
    "/store.v1.EntityStoreService/UpdateEntities",
];

pub(crate) async fn handle<B>(ctx: Arc<Context>, req: http::Request<B>, peer: SocketAddr) -> HttpResponse
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let mut g = grpc(ctx.max_message_bytes);
    let method = req.uri().path().strip_prefix("/store.v1.EntityStoreService/").unwrap_or("").to_string();
    let c = ctx.clone();
    match method.as_str() {
        "CreateEntity" => g.unary(Unary(Some(|r| create(c, r))), req).await,
        "GetEntity" => g.unary(Unary(Some(|r| get(c, r))), req).await,
        "ListEntities" => g.unary(Unary(Some(|r| list(c, r))), req).await,
        "UpdateEntity" => g.unary(Unary(Some(|r| update(c, r, false))), req).await,
        "UpdateEntityDetailed" => g.unary(Unary(Some(|r| update(c, r, true))), req).await,
        "DeleteEntity" => g.unary(Unary(Some(|r| delete(c, r))), req).await,
        "ApproveAction" => g.unary(Unary(Some(|r| decide(c, r, ApprovalState::Approved))), req).await,
        "DenyAction" => g.unary(Unary(Some(|r| decide(c, r, ApprovalState::Denied))), req).await,
        "UpdateEntities" => g.unary(Unary(Some(|r| update_many(c, r))), req).await,
        "GetStats" => g.unary(Unary(Some(|r| stats(c, r))), req).await,
        "PublishEntities" => g.client_streaming(ClientStreaming(Some(move |r| publish(c, r, peer))), req).await,
        "WatchEntities" => g.server_streaming(ServerStreaming(Some(|r| watch(c, r, false))), req).await,
        "WatchEntityBatches" => g.server_streaming(ServerStreaming(Some(|r| watch(c, r, true))), req).await,
        _ => rpc::unimplemented(),
    }
}

/// The entity (field 1) and `strict` (field 2) of a Create/UpdateEntityRequest. An
/// embedded message sent in several pieces is their concatenation (protobuf merges them).
fn entity_request(raw: &Bytes, type_name: &str) -> Result<(Bytes, bool), Status> {
    let mut pieces: Vec<&[u8]> = Vec::new();
    let mut strict = false;
    scan(raw, |number, field| match (number, field) {
        (1, Field::Bytes(b)) => pieces.push(b),
        (2, Field::Varint(v)) => strict = v != 0,
        _ => {}
    })
    .map_err(|_| malformed(type_name))?;
    let entity = match pieces.as_slice() {
        [] => return Err(Status::invalid_argument("request has no entity")),
        [one] => raw.slice_ref(one),
        many => Bytes::from(many.concat()),
    };
    Ok((entity, strict))
}

fn decode<M: Message + Default>(raw: &Bytes, type_name: &str) -> Result<M, Status> {
    M::decode(raw.as_ref()).map_err(|_| malformed(type_name))
}

fn check_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("entity id is empty"));
    }
    Ok(())
}

async fn create(ctx: Arc<Context>, req: Request<Bytes>) -> Reply {
    let (entity, _) = entity_request(req.get_ref(), "store.v1.CreateEntityRequest")?;
    let out = ctx.write(move |t| t.write(&entity, WriteMode::Create, false)).await?;
    Ok(Response::new(out.entity_bytes().into()))
}

async fn update(ctx: Arc<Context>, req: Request<Bytes>, detailed: bool) -> Reply {
    let (entity, strict) = entity_request(req.get_ref(), "store.v1.UpdateEntityRequest")?;
    let out = ctx.write(move |t| t.write(&entity, WriteMode::Update, strict)).await?;
    if detailed {
        // UpdateResult{entity = 1, ...}: the keys, then the entity bytes as field 1.
        let mut bytes = update_keys(&out).encode_to_vec();
        put_bytes_field(&mut bytes, 1, &out.entity_bytes());
        return Ok(Response::new(bytes.into()));
    }
    let mut response = Response::new(out.entity_bytes().into());
    let result = tonic::metadata::MetadataValue::from_bytes(&update_keys(&out).encode_to_vec());
    response.metadata_mut().insert_bin(UPDATE_RESULT_METADATA, result);
    Ok(response)
}

/// The keys of an update's outcome, as an UpdateResult without the entity.
fn update_keys(o: &WriteOutcome) -> pb::UpdateResult {
    let names = |keys: &[Sym]| keys.iter().map(|s| s.as_str().to_string()).collect();
    pb::UpdateResult { applied: names(&o.applied), stale: names(&o.stale), unchanged: names(&o.unchanged), ..Default::default() }
}

/// UpdateEntities: every entity checked outside the table lock, then all updated under
/// one; each result is its UpdateResult, or the error it failed with alone.
async fn update_many(ctx: Arc<Context>, req: Request<Bytes>) -> Reply {
    let raw = req.get_ref();
    let (mut entities, mut strict, mut components, mut projected) = (Vec::new(), false, Vec::new(), false);
    let mut bad_key = false;
    scan(raw, |number, field| match (number, field) {
        (1, Field::Bytes(b)) => entities.push(b),
        (2, Field::Varint(v)) => strict = v != 0,
        (3, Field::Bytes(b)) => {
            projected = true;
            match std::str::from_utf8(b) {
                Ok(key) => components.extend(existing(key)),
                Err(_) => bad_key = true,
            }
        }
        _ => {}
    })
    .map_err(|_| malformed("store.v1.UpdateEntitiesRequest"))?;
    if bad_key {
        return Err(malformed("store.v1.UpdateEntitiesRequest"));
    }
    let rules = ctx.store.table.lock().write_rules();
    let prepared: Vec<CoreResult<Prepared>> = entities.iter().map(|b| rules.prepare(b)).collect();
    let refused = prepared.iter().filter(|p| p.is_err()).count() as u64;
    let projection: Option<Arc<[Sym]>> = projected.then(|| components.into());
    let encoded = ctx
        .write(move |t| {
            t.count_rejected(refused);
            let view = View { full: false, projection: projection.as_deref() };
            Ok(t.commit_each(prepared, WriteMode::Update, strict)
                .into_iter()
                .map(|result| {
                    let mut out = Vec::new();
                    match result {
                        Ok(o) => {
                            update_keys(&o).encode(&mut out).expect("a Vec grows");
                            put_bytes_field(&mut out, 1, &o.snapshot.to_bytes(view, &o.registry));
                        }
                        Err(e) => {
                            let status = rpc::status_of(&e);
                            let failed = pb::UpdateResult {
                                error_code: status.code() as i32,
                                error: status.message().to_string(),
                                ..Default::default()
                            };
                            failed.encode(&mut out).expect("a Vec grows");
                        }
                    }
                    out
                })
                .collect::<Vec<_>>())
        })
        .await?;
    let mut response = Vec::with_capacity(encoded.iter().map(|r| r.len() + 6).sum());
    for result in &encoded {
        put_bytes_field(&mut response, 1, result);
    }
    Ok(Response::new(response.into()))
}

async fn get(ctx: Arc<Context>, req: Request<Bytes>) -> Reply {
    let r: pb::GetEntityRequest = decode(req.get_ref(), "store.v1.GetEntityRequest")?;
    check_id(&r.id)?;
    Ok(Response::new(ctx.store.table.lock().get(&r.id)?.into()))
}

fn check_type(type_filter: i32) -> Result<(), Status> {
    if EntityType::try_from(type_filter).is_err() {
        let known: Vec<i32> = (0..64).filter(|v| EntityType::try_from(*v).is_ok()).collect();
        return Err(Status::invalid_argument(format!("type_filter must be an EntityType value {known:?}, got {type_filter}")));
    }
    Ok(())
}

async fn list(ctx: Arc<Context>, req: Request<Bytes>) -> Reply {
    let r: pb::ListEntitiesRequest = decode(req.get_ref(), "store.v1.ListEntitiesRequest")?;
    check_type(r.type_filter)?;
    let store = ctx.store.clone();
    // A full list can be large: encoded off the runtime's workers.
    let bytes = tokio::task::spawn_blocking(move || {
        let entities = store.table.lock().list(r.type_filter);
        let mut out = Vec::with_capacity(entities.iter().map(|e| e.len() + 6).sum());
        for e in &entities {
            put_bytes_field(&mut out, 1, e);
        }
        out
    })
    .await
    .map_err(|e| Status::internal(format!("list failed: {e}")))?;
    Ok(Response::new(bytes.into()))
}

async fn delete(ctx: Arc<Context>, req: Request<Bytes>) -> Reply {
    let r: pb::DeleteEntityRequest = decode(req.get_ref(), "store.v1.DeleteEntityRequest")?;
    check_id(&r.id)?;
    ctx.write(move |t| t.delete(&r.id)).await?;
    Ok(Response::new(Bytes::new())) // google.protobuf.Empty
}

async fn decide(ctx: Arc<Context>, req: Request<Bytes>, state: ApprovalState) -> Reply {
    // ApproveActionRequest and DenyActionRequest are the same message: entity_id = 1.
    let name = if state == ApprovalState::Approved { "store.v1.ApproveActionRequest" } else { "store.v1.DenyActionRequest" };
    let r: pb::ApproveActionRequest = decode(req.get_ref(), name)?;
    check_id(&r.entity_id)?;
    let decided_by = req.extensions().get::<rpc::Identity>().map(|i| i.0.clone()).unwrap_or_default();
    let out = ctx.write(move |t| approval::decide(t, &r.entity_id, state, &decided_by)).await?;
    Ok(Response::new(out.entity_bytes().into()))
}

async fn stats(ctx: Arc<Context>, req: Request<Bytes>) -> Reply {
    let _: pb::GetStatsRequest = decode(req.get_ref(), "store.v1.GetStatsRequest")?;
    let values = ctx.blocking(|host| host.stats()).await;
    let response = pb::GetStatsResponse { node_id: ctx.node_id.into(), values: values.into_iter().collect() };
    Ok(Response::new(response.encode_to_vec().into()))
}

async fn watch(ctx: Arc<Context>, req: Request<Bytes>, batched: bool) -> Result<Response<BoxStream>, Status> {
    let r: pb::WatchEntitiesRequest = decode(req.get_ref(), "store.v1.WatchEntitiesRequest")?;
    check_type(r.type_filter)?;
    Ok(Response::new(watch_stream::open(ctx, r, batched)?))
}

/// The serialized entities of a PublishRequest (`entity`, then `entities`).
fn publish_payloads(raw: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut single: Vec<&[u8]> = Vec::new();
    let mut batch: Vec<&[u8]> = Vec::new();
    scan(raw, |number, field| match (number, field) {
        (1, Field::Bytes(b)) => single.push(b),
        (2, Field::Bytes(b)) => batch.push(b),
        _ => {}
    })
    .map_err(|e| format!("malformed PublishRequest: {e}"))?;
    let mut out = Vec::with_capacity(batch.len() + 1);
    match single.as_slice() {
        [] => {}
        [one] => out.push(raw.slice_ref(one)),
        many => out.push(Bytes::from(many.concat())),
    }
    out.extend(batch.into_iter().map(|b| raw.slice_ref(b)));
    if out.is_empty() {
        return Err("publish request has no entity".into());
    }
    Ok(out)
}

#[derive(Default)]
struct Tally {
    summary: pb::PublishSummary,
}

impl Tally {
    fn count(&mut self, result: CoreResult<WriteOutcome>) {
        match result {
            // Stale: every key written was stale (nothing applied, nothing equal to it).
            Ok(o) if !o.stale.is_empty() && o.applied.is_empty() && o.unchanged.is_empty() => self.summary.stale += 1,
            Ok(_) => self.summary.applied += 1,
            Err(e) => self.reject(rpc::one_line(&e.to_string())),
        }
    }

    fn reject(&mut self, message: String) {
        self.summary.rejected += 1;
        if self.summary.errors.len() < PUBLISH_MAX_ERRORS {
            self.summary.errors.push(message);
        }
    }

    /// Adds a later part of the stream's counts.
    fn add(&mut self, later: Tally) {
        let (s, l) = (&mut self.summary, later.summary);
        (s.applied, s.stale, s.rejected) = (s.applied + l.applied, s.stale + l.stale, s.rejected + l.rejected);
        let room = PUBLISH_MAX_ERRORS.saturating_sub(s.errors.len());
        s.errors.extend(l.errors.into_iter().take(room));
    }
}

/// Entities of a publish stream checked outside the table lock, waiting to be applied.
#[derive(Default)]
struct Chunk {
    prepared: Vec<Prepared>,
    /// Entities refused while checking, not yet in the table's counters.
    rejected: u64,
}

/// One publish stream's writes, in two stages that overlap: the stream's task reads and
/// checks entities (decoding, validation) while the chunk before is applied under the
/// table lock by a task of its own. One chunk at a time is applied, in order.
struct Publisher {
    ctx: Arc<Context>,
    tally: Tally,
    rules: WriteRules,
    chunk: Chunk,
    applying: Option<tokio::task::JoinHandle<Result<Tally, Status>>>,
}

impl Publisher {
    fn new(ctx: Arc<Context>) -> Self {
        let rules = ctx.store.table.lock().write_rules();
        Publisher { ctx, tally: Tally::default(), rules, chunk: Chunk::default(), applying: None }
    }

    fn add(&mut self, raw: &Bytes) {
        let payloads = match publish_payloads(raw) {
            Ok(payloads) => payloads,
            Err(message) => return self.tally.reject(message),
        };
        if self.chunk.prepared.is_empty() {
            // The type registry as of now, if the table is free (a registration made
            // while a chunk is applied is picked up by the next chunk).
            if let Some(t) = self.ctx.store.table.try_lock() {
                self.rules = t.write_rules();
            }
        }
        for payload in payloads {
            match self.rules.prepare(&payload) {
                Ok(p) => self.chunk.prepared.push(p),
                Err(e) => {
                    self.chunk.rejected += 1;
                    self.tally.reject(rpc::one_line(&e.to_string()));
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.chunk.prepared.is_empty() && self.chunk.rejected == 0
    }

    /// Starts applying the chunk (once the one before it is applied).
    async fn flush(&mut self) -> Result<(), Status> {
        self.settle().await?;
        let chunk = std::mem::take(&mut self.chunk);
        // On a thread of its own (the blocking pool): a task spawned here could be run by
        // this same worker right after this one (tokio's LIFO slot), and the two stages
        // would take turns instead of overlapping.
        let (ctx, runtime) = (self.ctx.clone(), tokio::runtime::Handle::current());
        self.applying = Some(tokio::task::spawn_blocking(move || runtime.block_on(apply(ctx, chunk))));
        Ok(())
    }

    /// Waits for the chunk being applied and counts its outcomes.
    async fn settle(&mut self) -> Result<(), Status> {
        if let Some(applying) = self.applying.take() {
            let applied = applying.await.map_err(|e| Status::internal(format!("publish failed: {e}")))??;
            self.tally.add(applied);
        }
        Ok(())
    }

    /// Applies what is left and returns the summary.
    async fn finish(mut self) -> Result<pb::PublishSummary, Status> {
        if !self.is_empty() {
            self.flush().await?;
        }
        self.settle().await?;
        Ok(self.tally.summary)
    }
}

/// Upserts a chunk in one table call, each entity on its own (checked against the state
/// the ones before it left): the good ones apply and each bad one is counted. The
/// outcomes are counted and dropped after the lock, on the thread that made them (a
/// thread freeing another's allocations pays for it).
async fn apply(ctx: Arc<Context>, chunk: Chunk) -> Result<Tally, Status> {
    let results = ctx
        .write(move |t| {
            t.count_rejected(chunk.rejected);
            Ok(t.commit_each(chunk.prepared.into_iter().map(Ok), WriteMode::Put, false))
        })
        .await?;
    let mut tally = Tally::default();
    results.into_iter().for_each(|r| tally.count(r));
    Ok(tally)
}

async fn publish(ctx: Arc<Context>, req: Request<Streaming<Bytes>>, peer: SocketAddr) -> Reply {
    if ctx.is_closing() {
        return Err(Status::unavailable("server shutting down"));
    }
    let _open = Open::new(&ctx, |c| &c.publish_streams);
    let mut stream = req.into_inner();
    let mut closing = ctx.closing.subscribe();
    let mut publisher = Publisher::new(ctx.clone());
    loop {
        let next = tokio::select! {
            next = stream.message() => Some(next),
            _ = tokio::time::sleep(PUBLISH_FLUSH_DELAY), if !publisher.is_empty() => None,
            _ = closing.wait_for(|c| *c) => {
                // Shutdown drains the stream: stop reading, answer what was applied.
                ctx.log(Level::Info, "meshstore.grpc.server", "publish stream drained at shutdown",
                        vec![("peer", super::peer_name(Some(peer)))]);
                break;
            }
        };
        match next {
            None => publisher.flush().await?,
            Some(Ok(Some(raw))) => {
                publisher.add(&raw);
                if publisher.chunk.prepared.len() >= PUBLISH_CHUNK {
                    publisher.flush().await?;
                }
            }
            Some(Ok(None)) => break,
            Some(Err(status)) => {
                // What arrived is applied, even if the client went away or sent too much.
                publisher.finish().await?;
                return Err(rpc::limit_status(status));
            }
        }
    }
    let summary = publisher.finish().await?;
    let s = &summary;
    if s.rejected > 0 {
        let fields = vec![
            ("rejected", s.rejected.to_string()),
            ("applied", s.applied.to_string()),
            ("stale", s.stale.to_string()),
            ("first_error", s.errors[0].clone()),
            ("peer", super::peer_name(Some(peer))),
        ];
        ctx.log(Level::Info, "meshstore.grpc.server", "publish rejected entities", fields);
    }
    Ok(Response::new(summary.encode_to_vec().into()))
}
