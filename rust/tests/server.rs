//! The gRPC server (feature "server") over a real socket on 127.0.0.1, driven by a tonic
//! client: what the Python integration tests cannot reach, the authentication hook, and
//! the batched watch's framing and shutdown.
#![cfg(feature = "server")]
use _core::pb;
use _core::server::auth::{sha256_hex, Policy};
use _core::server::rpc::{Authorize, RawCodec};
use _core::server::{Host, Level, Server, ServerOptions};
use _core::store::{Notices, Store};
use _core::table::{Options, Table};
use bytes::Bytes;
use prost::Message;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

/// A host with nothing outside the server: no Python watchers, logs dropped.
struct Alone;

impl Host for Alone {
    fn notify(&self, _: Notices) {}
    fn log(&self, _: Level, _: &'static str, _: &'static str, _: Vec<(&'static str, String)>) {}
    fn stats(&self) -> Vec<(String, f64)> {
        vec![("answer".into(), 42.0)]
    }
    fn mesh_opened(&self, _: &str) -> bool {
        false
    }
    fn mesh_batch(&self, _: &str) -> bool {
        true
    }
    fn mesh_resynced(&self, _: &str) {}
}

fn serve(authorize: Option<Authorize>) -> (Server, Arc<Store>) {
    let store = Arc::new(Store::new(Table::new(Options::default(), Box::new(_core::hlc::system_wall_ns))));
    let opts = ServerOptions {
        host: "127.0.0.1".into(),
        port: 0,
        max_message_bytes: 1 << 20,
        reflection: true,
        watch_queue: 1000,
        workers: Some(1),
        authorize,
        tls: None,
    };
    (Server::start(store.clone(), Arc::new(Alone), opts).expect("binds"), store)
}

fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn connect(port: u16) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await.unwrap();
    tonic::client::Grpc::new(channel)
}

fn path(method: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_static(method)
}

fn track(id: &str, lat: f64) -> pb::Entity {
    let position = pb::PositionComponent { lat, lon: 1.0, ..Default::default() };
    let mut e = pb::Entity { id: id.into(), r#type: pb::EntityType::Track as i32, ..Default::default() };
    e.components.insert(
        "position".into(),
        prost_types::Any { type_url: "type.googleapis.com/entity.v1.PositionComponent".into(), value: position.encode_to_vec() },
    );
    e
}

#[test]
fn the_authentication_hook_refuses_before_any_handler_runs() {
    let deny_writes: Authorize = Arc::new(|caller| {
        if caller.method.ends_with("/CreateEntity") && caller.headers.get("authorization").is_none() {
            return Err(tonic::Status::unauthenticated("CreateEntity needs a token"));
        }
        Ok(None)
    });
    let (server, store) = serve(Some(deny_writes));
    client_runtime().block_on(async {
        let mut client = connect(server.port()).await;
        let request = pb::store::v1::CreateEntityRequest { entity: Some(track("t1", 1.0)) }.encode_to_vec();
        client.ready().await.unwrap();
        let refused = client
            .unary(tonic::Request::new(Bytes::from(request.clone())), path("/store.v1.EntityStoreService/CreateEntity"), RawCodec)
            .await
            .unwrap_err();
        assert_eq!((refused.code(), refused.message()), (Code::Unauthenticated, "CreateEntity needs a token"));
        assert_eq!(store.seq(), 0, "nothing was written");

        let mut with_token = tonic::Request::new(Bytes::from(request));
        with_token.metadata_mut().insert("authorization", "Bearer x".parse().unwrap());
        client.ready().await.unwrap();
        client.unary(with_token, path("/store.v1.EntityStoreService/CreateEntity"), RawCodec).await.unwrap();
        assert_eq!(store.seq(), 1);
    });
    let stats = server.stats();
    let create = stats.methods.iter().find(|m| m.0.ends_with("/CreateEntity")).expect("counted");
    assert_eq!((create.1, create.2.get("UNAUTHENTICATED").copied()), (2, Some(1)));
}

/// One unary call with an optional bearer token.
async fn call(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    token: Option<&str>,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Bytes, tonic::Status> {
    let mut request = tonic::Request::new(Bytes::from(body));
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    client.ready().await.unwrap();
    client.unary(request, path(method), RawCodec).await.map(|r| r.into_inner())
}

#[test]
fn the_policy_names_the_caller_by_token_checks_its_roles_and_hands_it_to_the_approval() {
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let policy = Policy {
        methods: HashMap::from([
            ("/store.v1.EntityStoreService/CreateEntity".to_string(), set(&["ingest"])),
            ("/store.v1.EntityStoreService/ApproveAction".to_string(), set(&["operator"])),
        ]),
        identities: HashMap::from([("sim".to_string(), set(&["ingest"])), ("ops".to_string(), set(&["operator"]))]),
        tokens: HashMap::from([(sha256_hex("sim-token"), "sim".to_string()), (sha256_hex("ops-token"), "ops".to_string())]),
    };
    let (server, store) = serve(Some(policy.into_authorize()));
    let mut entity = track("t1", 1.0);
    let pending = pb::ApprovalComponent { state: pb::ApprovalState::Pending as i32, ..Default::default() };
    entity.components.insert(
        "approval".into(),
        prost_types::Any { type_url: "type.googleapis.com/entity.v1.ApprovalComponent".into(), value: pending.encode_to_vec() },
    );
    let create = pb::store::v1::CreateEntityRequest { entity: Some(entity) }.encode_to_vec();
    let approve = pb::store::v1::ApproveActionRequest { entity_id: "t1".into() }.encode_to_vec();
    const CREATE: &str = "/store.v1.EntityStoreService/CreateEntity";
    const APPROVE: &str = "/store.v1.EntityStoreService/ApproveAction";
    client_runtime().block_on(async {
        let mut client = connect(server.port()).await;
        let anonymous = call(&mut client, None, CREATE, create.clone()).await.unwrap_err();
        assert_eq!(anonymous.code(), Code::Unauthenticated);
        let unknown = call(&mut client, Some("guess"), CREATE, create.clone()).await.unwrap_err();
        assert_eq!((unknown.code(), unknown.message()), (Code::Unauthenticated, "unknown bearer token"));
        let denied = call(&mut client, Some("ops-token"), CREATE, create.clone()).await.unwrap_err();
        assert_eq!(
            (denied.code(), denied.message()),
            (Code::PermissionDenied, "'ops' may not call CreateEntity: it needs the role ingest or admin and has roles operator")
        );
        assert_eq!(store.seq(), 0, "nothing was written");
        call(&mut client, Some("sim-token"), CREATE, create).await.unwrap();
        let decided = call(&mut client, Some("ops-token"), APPROVE, approve).await.unwrap();
        let decided = pb::Entity::decode(decided).unwrap();
        let approval = pb::ApprovalComponent::decode(decided.components["approval"].value.as_slice()).unwrap();
        assert_eq!((approval.state(), approval.decided_by.as_str()), (pb::ApprovalState::Approved, "ops"));
    });
}

#[test]
fn a_batched_watch_gets_every_ready_event_then_its_resume_cursor_at_shutdown() {
    let (server, store) = serve(None);
    for i in 0..50 {
        let bytes = track(&format!("t{i}"), i as f64).encode_to_vec();
        store.table.lock().write(&bytes, _core::table::WriteMode::Put, false).unwrap();
    }
    let events = client_runtime().block_on(async {
        let mut client = connect(server.port()).await;
        let request = pb::store::v1::WatchEntitiesRequest { include_existing: true, ..Default::default() }.encode_to_vec();
        client.ready().await.unwrap();
        let mut stream = client
            .server_streaming(tonic::Request::new(Bytes::from(request)), path("/store.v1.EntityStoreService/WatchEntityBatches"), RawCodec)
            .await
            .unwrap()
            .into_inner();
        let mut events = Vec::new();
        while events.len() < 50 {
            let batch = pb::store::v1::EntityEventBatch::decode(stream.message().await.unwrap().unwrap()).unwrap();
            events.extend(batch.events);
        }
        // The server blocks on its own runtime: begun from a plain thread.
        std::thread::scope(|s| s.spawn(|| server.begin_shutdown()).join().unwrap());
        let end = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("the stream ends").unwrap_err();
        assert_eq!(end.code(), Code::Unavailable);
        assert_eq!(end.message(), "server shutting down; resume with since_seq=50");
        events
    });
    assert_eq!(events.len(), 50, "every entity once, in a few messages");
    assert!(events.iter().all(|e| e.r#type == pb::store::v1::EventType::Created as i32));
    assert_eq!(events.last().unwrap().seq, 50);
}
