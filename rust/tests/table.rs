//! Focused tests of the entity table through the crate's public API, for the causal
//! model (dots, causal contexts, siblings, delete records):
//!
//! - every failure case of issue 8 at the table level (concurrent HIGH / DENIED kept,
//!   delete-recreate-delete vs a later write, no resurrection after collection, stale
//!   updates across a delete + re-create, big values across delete + re-create, far-future
//!   and extreme stamps, no quarantine, bounded churn);
//! - local writes: the per-key stale check (dots, the legacy entity-level HLC base, blind
//!   writes), strict atomicity, unchanged writes, modes, batches;
//! - deletes, collection of deleted entities, cursors, the context summary;
//! - merges: echo termination, source attribution, `unless_seen`, watchers, own dots;
//! - input limits and validation (sizes, range checks, malformed bytes), clock skew, HLC.
//!
//! Every table gets an injected wall clock (an AtomicU64 in ns) so time is explicit.
use _core::causal::VersionVector;
use _core::error::Error;
use _core::hlc::Timestamp;
use _core::intern::{intern, Sym};
use _core::pb;
use _core::table::{Options, Table, WriteMode, WriteOutcome, MERGE_SLACK};
use _core::watch::{EventKind, WatchSpec};
use prost::Message;
use prost_types::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const BASE: u64 = 1_700_000_000 * SEC;
/// Options::default().max_clock_offset_ns
const MAX_OFFSET: u64 = 500 * MS;

const POSITION: &str = "type.googleapis.com/entity.v1.PositionComponent";
const VELOCITY: &str = "type.googleapis.com/entity.v1.VelocityComponent";
const FUSION: &str = "type.googleapis.com/entity.v1.FusionComponent";
const THREAT: &str = "type.googleapis.com/entity.v1.ThreatComponent";
const APPROVAL: &str = "type.googleapis.com/entity.v1.ApprovalComponent";
const CLASSIFICATION: &str = "type.googleapis.com/entity.v1.ClassificationComponent";
const WIDGET: &str = "type.googleapis.com/acme.Widget";

// ThreatLevel and ApprovalState values (entity.proto).
const NONE_LEVEL: u8 = 1;
const LOW: u8 = 2;
const MEDIUM: u8 = 3;
const HIGH: u8 = 4;
const AUTO_APPROVED: u8 = 1;
const PENDING: u8 = 2;
const APPROVED: u8 = 3;
const DENIED: u8 = 4;
const TIMED_OUT: u8 = 5;
const TRACK: i32 = 2;

struct Node {
    t: Table,
    wall: Arc<AtomicU64>,
}

impl Node {
    fn new(id: &str) -> Node {
        Node::with(id, |_| {})
    }

    fn with(id: &str, tweak: impl FnOnce(&mut Options)) -> Node {
        let wall = Arc::new(AtomicU64::new(BASE));
        let w = wall.clone();
        let mut opts = Options { node_id: id.into(), ..Options::default() };
        tweak(&mut opts);
        Node { t: Table::new(opts, Box::new(move || w.load(Ordering::SeqCst))), wall }
    }

    fn advance(&self, ns: u64) {
        self.wall.fetch_add(ns, Ordering::SeqCst);
    }

    fn set_wall(&self, ns: u64) {
        self.wall.store(ns, Ordering::SeqCst);
    }

    fn put(&mut self, e: &pb::Entity) -> WriteOutcome {
        self.t.write(&e.encode_to_vec(), WriteMode::Put, false).expect("put")
    }

    fn get(&mut self, id: &str) -> pb::Entity {
        decode(&self.t.get(id).expect("get"))
    }

    /// The replica state of `id` (deleted ones too, until collected).
    fn replica(&self, id: &str) -> Option<pb::Entity> {
        self.t.replica_state(id).map(|(b, _)| decode(&b))
    }

    fn replica_bytes(&self, id: &str) -> Option<Vec<u8>> {
        self.t.replica_state(id).map(|(b, _)| b)
    }

    fn states(&mut self) -> Vec<Vec<u8>> {
        self.t.changes_since(0, usize::MAX, None, None).unwrap().0
    }

    /// Merges every replica state of `from` (as from its node); true if any changed us.
    fn pull(&mut self, from: &mut Node) -> bool {
        let source = from.t.node().as_str();
        let mut changed = false;
        for s in from.states() {
            changed |= self.t.merge(&s, source).expect("merge");
        }
        changed
    }
}

/// Pulls both ways until neither changes (the echo must end).
fn sync(a: &mut Node, b: &mut Node) {
    for _ in 0..6 {
        let x = a.pull(b);
        let y = b.pull(a);
        if !x && !y {
            return;
        }
    }
    panic!("{} and {} did not quiesce", a.t.node().as_str(), b.t.node().as_str());
}

fn decode(b: &[u8]) -> pb::Entity {
    pb::Entity::decode(b).expect("the table emits valid entity bytes")
}

fn any(url: &str, value: Vec<u8>) -> Any {
    Any { type_url: url.into(), value }
}

fn threat(level: u8) -> Any {
    any(THREAT, if level == 0 { vec![] } else { vec![0x08, level] })
}

fn approval(state: u8) -> Any {
    any(APPROVAL, vec![0x08, state])
}

fn position(lat: f64) -> Any {
    let mut v = vec![0x09];
    v.extend_from_slice(&lat.to_le_bytes());
    any(POSITION, v)
}

/// A Widget (lww) holding `n` bytes of `fill` in field 2.
fn blob(n: usize, fill: u8) -> Any {
    let mut v = vec![0x12];
    prost::encoding::encode_varint(n as u64, &mut v);
    v.extend(std::iter::repeat_n(fill, n));
    any(WIDGET, v)
}

fn entity(id: &str, comps: Vec<(&str, Any)>) -> pb::Entity {
    let mut e = pb::Entity { id: id.into(), ..Default::default() };
    for (k, a) in comps {
        e.components.insert(k.into(), a);
    }
    e
}

/// `e` with `versions[key]` taken from a previous read.
fn based_on(mut e: pb::Entity, read: &pb::Entity, keys: &[&str]) -> pb::Entity {
    for k in keys {
        e.versions.insert((*k).into(), read.versions[*k].clone());
    }
    e
}

/// `e` with the entity-level HLC fields (6-8) of a previous read (legacy clients).
fn with_hlc(mut e: pb::Entity, read: &pb::Entity) -> pb::Entity {
    (e.hlc_physical, e.hlc_logical, e.hlc_node) = (read.hlc_physical, read.hlc_logical, read.hlc_node.clone());
    e
}

fn names(syms: &[Sym]) -> Vec<&'static str> {
    syms.iter().map(|s| s.as_str()).collect()
}

fn ts(v: &pb::Version) -> Timestamp {
    Timestamp { physical: v.physical, logical: v.logical, node: intern(&v.node) }
}

fn lat(e: &pb::Entity, key: &str) -> f64 {
    f64::from_le_bytes(e.components[key].value[1..9].try_into().unwrap())
}

fn level(e: &pb::Entity, key: &str) -> u8 {
    e.components[key].value.get(1).copied().unwrap_or(0)
}

fn keys(e: &pb::Entity) -> Vec<&str> {
    e.components.keys().map(String::as_str).collect()
}

type DotT = (String, u64, u64);

fn dot(v: &pb::Version) -> DotT {
    (v.node.clone(), v.incarnation, v.counter)
}

/// Every value `key` holds in a replica state: the shown one and its siblings.
fn key_dots(e: &pb::Entity, key: &str) -> Vec<DotT> {
    let mut out: Vec<DotT> = e.versions.get(key).filter(|_| e.components.contains_key(key)).map(dot).into_iter().collect();
    out.extend(e.siblings.iter().filter(|s| s.key == key).map(|s| dot(s.version.as_ref().unwrap())));
    out.sort();
    out
}

fn context(e: &pb::Entity) -> Vec<DotT> {
    let mut out: Vec<DotT> = e.context.iter().map(|d| (d.node.clone(), d.incarnation, d.counter)).collect();
    out.sort();
    out
}

fn spec() -> WatchSpec {
    WatchSpec { type_filter: 0, projection: None, min_interval: Duration::ZERO, capacity: 64 }
}

/// A hand-made replica state of one value, as a peer would send it.
#[allow(clippy::too_many_arguments)]
fn remote_state(id: &str, key: &str, value: Any, physical: u64, logical: u32, node: &str, incarnation: u64, counter: u64) -> pb::Entity {
    let mut e = entity(id, vec![(key, value)]);
    e.versions.insert(key.into(), pb::Version { physical, logical, node: node.into(), incarnation, counter, concurrent: vec![] });
    e.context.push(pb::Dot { node: node.into(), incarnation, counter });
    e
}

// ==== issue 8, case by case ==========================================================

/// NONE, LOW, MEDIUM, LOW on one replica vs a concurrent HIGH elsewhere: HIGH on both.
#[test]
fn a_run_of_lower_threat_writes_does_not_beat_a_concurrent_high() {
    let mut a = Node::new("i8-threat-a");
    let mut b = Node::new("i8-threat-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    b.pull(&mut a);
    b.advance(MS);
    b.put(&entity("t1", vec![("threat", threat(HIGH))]));
    for lvl in [NONE_LEVEL, LOW, MEDIUM, LOW] {
        a.advance(2 * MS);
        a.put(&entity("t1", vec![("threat", threat(lvl))]));
    }
    sync(&mut a, &mut b);
    for n in [&mut a, &mut b] {
        let e = n.get("t1");
        assert_eq!(level(&e, "threat"), HIGH, "{}: the concurrent HIGH was lost", n.t.node().as_str());
        assert_eq!(e.versions["threat"].concurrent.len(), 1, "the user view names the LOW sibling beside HIGH");
        assert_eq!(lat(&e, "position"), 1.0);
    }
    assert_eq!(a.replica_bytes("t1"), b.replica_bytes("t1"));
    assert_eq!(key_dots(&a.replica("t1").unwrap(), "threat").len(), 2, "both writes survive as siblings");
}

/// APPROVED, PENDING, APPROVED vs a concurrent DENIED: DENIED on both.
#[test]
fn a_run_of_approvals_does_not_beat_a_concurrent_denial() {
    let mut a = Node::new("i8-appr-a");
    let mut b = Node::new("i8-appr-b");
    a.put(&entity("t1", vec![("approval", approval(PENDING))]));
    b.pull(&mut a);
    b.advance(MS);
    b.put(&entity("t1", vec![("approval", approval(DENIED))]));
    for s in [APPROVED, PENDING, APPROVED] {
        a.advance(2 * MS);
        a.put(&entity("t1", vec![("approval", approval(s))]));
    }
    sync(&mut a, &mut b);
    for n in [&mut a, &mut b] {
        assert_eq!(level(&n.get("t1"), "approval"), DENIED, "{}", n.t.node().as_str());
    }
    assert_eq!(a.replica_bytes("t1"), b.replica_bytes("t1"));
}

/// A: delete, re-create, delete; B, which saw none of it, later writes position: B's
/// write survives on both (and only it: the older values died with the deletes).
#[test]
fn delete_recreate_delete_does_not_lose_a_later_concurrent_write() {
    let mut a = Node::new("i8-drd-a");
    let mut b = Node::new("i8-drd-b");
    let mut e = entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]);
    e.r#type = TRACK;
    a.put(&e);
    b.pull(&mut a);
    a.advance(MS);
    a.t.delete("t1").unwrap();
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0)), ("velocity", any(VELOCITY, vec![]))]));
    a.advance(MS);
    a.t.delete("t1").unwrap();
    b.advance(10 * MS);
    b.put(&entity("t1", vec![("position", position(5.0))]));
    sync(&mut a, &mut b);
    for n in [&mut a, &mut b] {
        let got = n.get("t1");
        assert_eq!(keys(&got), ["position"], "{}: only the write made after the deletes lives", n.t.node().as_str());
        assert_eq!(lat(&got, "position"), 5.0, "{}: B's write was lost", n.t.node().as_str());
    }
    assert_eq!(a.get("t1"), b.get("t1"), "the replicas show different entities");
    assert_eq!(a.replica_bytes("t1"), b.replica_bytes("t1"));
    assert_eq!(a.t.entity_count(), (1, 0));
}

/// The same, but B's write is older than A's delete: the delete wins over an older
/// concurrent write.
#[test]
fn a_delete_wins_over_an_older_concurrent_write() {
    let mut a = Node::new("dwin-a");
    let mut b = Node::new("dwin-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    b.pull(&mut a);
    b.advance(MS);
    b.put(&entity("t1", vec![("position", position(2.0)), ("threat", threat(HIGH))]));
    a.advance(2 * MS);
    a.t.delete("t1").unwrap();
    sync(&mut a, &mut b);
    for n in [&mut a, &mut b] {
        assert_eq!(n.t.get("t1").unwrap_err(), Error::NotFound("t1".into()), "{}", n.t.node().as_str());
        assert!(n.t.list(0).is_empty());
    }
    assert_eq!(a.replica_bytes("t1"), b.replica_bytes("t1"));
    let dead = a.replica("t1").unwrap();
    assert!(dead.components.is_empty() && dead.siblings.is_empty() && dead.deleted_version.is_some());
}

/// After a delete is collected (acknowledged), an old pre-delete state brings nothing
/// back, here or anywhere it goes through this node; its sender learns of the removal.
#[test]
fn a_collected_delete_and_an_old_state_bring_nothing_back() {
    let mut a = Node::new("i8-gc-a");
    let mut b = Node::new("i8-gc-b");
    let mut c = Node::new("i8-gc-c");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(HIGH))]));
    b.pull(&mut a);
    a.advance(MS);
    a.t.delete("t1").unwrap();
    let del_seq = a.t.seq();
    assert_eq!(a.t.collect_deleted(Some(del_seq)), 1, "acknowledged and covered by a's own dots");
    assert_eq!(a.t.entity_count(), (0, 0));
    assert!(a.replica("t1").is_none(), "forgotten");
    // c gets the old state from b first: news to c.
    c.pull(&mut b);
    assert_eq!(level(&c.get("t1"), "threat"), HIGH);
    // The old state reaches a, from b and from c.
    a.advance(MS);
    a.pull(&mut b);
    a.pull(&mut c);
    assert_eq!(a.t.get("t1").unwrap_err(), Error::NotFound("t1".into()), "a collected delete was undone");
    assert!(a.t.list(0).is_empty());
    // a records the removal, so its senders learn of it.
    let dead = a.replica("t1").expect("a dead state is recorded to answer the old one");
    assert!(dead.components.is_empty() && dead.siblings.is_empty());
    b.pull(&mut a);
    c.pull(&mut a);
    for n in [&mut b, &mut c] {
        assert_eq!(n.t.get("t1").unwrap_err(), Error::NotFound("t1".into()), "{} kept the deleted entity", n.t.node().as_str());
    }
    sync(&mut a, &mut b);
    sync(&mut a, &mut c);
    assert!(a.t.get("t1").is_err() && b.t.get("t1").is_err() && c.t.get("t1").is_err());
    assert_eq!(a.replica_bytes("t1"), b.replica_bytes("t1"));
}

/// A peer silent past `peer_expiry` no longer holds the delete record back; when it
/// returns with its old state, nothing comes back either.
#[test]
fn a_delete_collected_after_peer_expiry_is_not_undone_by_the_returning_peer() {
    let mut a = Node::with("i8-exp-a", |o| o.peer_expiry_ns = 60 * SEC);
    let mut b = Node::with("i8-exp-b", |o| o.peer_expiry_ns = 60 * SEC);
    a.put(&entity("t1", vec![("position", position(1.0))]));
    a.put(&entity("t0", vec![("position", position(0.0))]));
    b.pull(&mut a);
    a.t.delete("t1").unwrap();
    let del_seq = a.t.seq();
    a.advance(59 * SEC);
    assert_eq!(a.t.collect_deleted(None), 0, "peer not expired yet");
    assert_eq!(a.t.entity_count(), (1, 1));
    a.advance(SEC);
    assert_eq!(a.t.collect_deleted(None), 1);
    assert_eq!(a.t.entity_count(), (1, 0));
    assert!(matches!(a.t.changes_since(del_seq - 1, 10, None, None), Err(Error::CursorExpired { .. })));
    // Meanwhile b, cut off, wrote a new entity and updated one a also holds.
    b.advance(3600 * SEC);
    b.put(&entity("t2", vec![("position", position(2.0))]));
    b.put(&entity("t0", vec![("threat", threat(MEDIUM))]));
    a.pull(&mut b);
    assert!(a.t.get("t1").is_err(), "the partitioned peer resurrected the delete");
    b.pull(&mut a);
    assert!(b.t.get("t1").is_err(), "the returning peer did not learn of the delete");
    sync(&mut a, &mut b);
    for n in [&mut a, &mut b] {
        assert!(n.t.get("t1").is_err());
        assert_eq!(lat(&n.get("t2"), "position"), 2.0, "{}: the returning peer's own write was lost", n.t.node().as_str());
        assert_eq!(level(&n.get("t0"), "threat"), MEDIUM);
    }
    assert_eq!(a.t.list(0), b.t.list(0));
}

/// `update` with an entity read before a delete + re-create is stale.
#[test]
fn an_update_based_on_a_read_before_delete_and_recreate_is_stale() {
    let mut a = Node::new("i8-life-a");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    let read = a.get("t1");
    a.advance(MS);
    a.t.delete("t1").unwrap();
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    let (seq, before) = (a.t.seq(), a.replica_bytes("t1"));
    // Per-key versions of the old life.
    let e = based_on(entity("t1", vec![("position", position(3.0))]), &read, &["position"]);
    let err = a.t.write(&e.encode_to_vec(), WriteMode::Update, true).unwrap_err();
    assert_eq!(err, Error::Stale { id: "t1".into(), keys: vec!["position".into()] });
    assert_eq!((a.t.seq(), a.replica_bytes("t1")), (seq, before.clone()), "a strict stale write changed the table");
    let out = a.t.write(&e.encode_to_vec(), WriteMode::Update, false).unwrap();
    assert_eq!(names(&out.stale), ["position"]);
    assert_eq!(lat(&a.get("t1"), "position"), 2.0, "the old position was written into the new life");
    // The legacy entity-level HLC of the old read: stale too.
    let e = with_hlc(entity("t1", vec![("position", position(4.0))]), &read);
    assert!(matches!(a.t.write(&e.encode_to_vec(), WriteMode::Update, true), Err(Error::Stale { .. })));
    assert_eq!(lat(&a.get("t1"), "position"), 2.0);
}

/// A 600 kB blob deleted and re-created with another 600 kB key: the local write and
/// every peer accept it (dead values are gone, not counted).
#[test]
fn big_values_across_delete_and_recreate_replicate() {
    let mut a = Node::new("i8-big-a");
    let mut b = Node::new("i8-big-b");
    let mut c = Node::new("i8-big-c");
    a.put(&entity("t1", vec![("blob", blob(600_000, 1))]));
    b.pull(&mut a);
    a.advance(MS);
    a.t.delete("t1").unwrap();
    a.advance(MS);
    let out = a.t.write(&entity("t1", vec![("blob2", blob(600_000, 2))]).encode_to_vec(), WriteMode::Put, false).unwrap();
    assert!(out.created);
    let state = a.replica_bytes("t1").unwrap();
    assert!(state.len() < 700_000, "the replica state carries a dead value: {} bytes", state.len());
    for n in [&mut b, &mut c] {
        let source = a.t.node().as_str();
        assert!(n.t.merge(&state, source).expect("a peer with the same options refused the state"));
        assert_eq!(keys(&n.get("t1")), ["blob2"]);
    }
    sync(&mut a, &mut b);
    assert_eq!(a.replica_bytes("t1"), b.replica_bytes("t1"));
}

/// Replica states with extreme stamps and counters merge without a panic: at once,
/// counted when far ahead, never moving the clock past the offset; the next local write
/// stamps after them (no wrap) and replaces them everywhere.
#[test]
fn extreme_stamps_and_counters_merge_without_panic_or_wrap() {
    let mut a = Node::new("i8-far-a");
    let mut far = Node::new("i8-far-relay");
    let hour = 3600 * SEC;
    let cases: Vec<(&str, u64, u32, u64, u64, bool)> = vec![
        // (id, physical, logical, incarnation, counter, beyond the offset)
        ("hour", BASE + hour, 0, 1, 1, true),
        ("decade", BASE + 10 * 365 * 24 * hour, 0, 1, 1, true),
        ("end-of-time", u64::MAX, u32::MAX, 1, 1, true),
        ("zero", 0, 0, 1, 1, false),
        ("logical-max", BASE + 100 * MS, u32::MAX, 1, 1, false),
        ("counter-max", BASE, 0, 1, u64::MAX, false),
        ("incarnation-max", BASE, 0, u64::MAX, 5, false),
    ];
    let mut skewed = 0;
    for (id, physical, logical, inc, counter, ahead) in &cases {
        let s = remote_state(id, "position", position(7.0), *physical, *logical, "i8-far-peer", *inc, *counter);
        let changed = a.t.merge(&s.encode_to_vec(), "i8-far-peer").unwrap_or_else(|e| panic!("{id}: {e:?}"));
        assert!(changed, "{id}");
        assert_eq!(lat(&a.get(id), "position"), 7.0, "{id}: not merged at once");
        skewed += *ahead as u64;
        assert_eq!(a.t.counters.skewed_stamps, skewed, "{id}");
        assert!(a.t.clock().last().physical <= BASE + MAX_OFFSET, "{id}: the clock was dragged ahead");
        far.t.merge(&s.encode_to_vec(), "").unwrap();
    }
    // The stamp within the offset with logical u32::MAX was adopted: later ones follow it.
    let t = a.t.clock().now();
    assert!(t > Timestamp { physical: BASE + 100 * MS, logical: u32::MAX, node: intern("i8-far-peer") }, "{t:?}");
    // Local writes over each: applied (they saw the value), shown, and they win on every
    // replica, however far ahead the value they replaced was stamped.
    a.advance(MS);
    for (id, ..) in &cases {
        let out = a.put(&entity(id, vec![("position", position(1.0))]));
        assert_eq!(names(&out.applied), ["position"], "{id}");
        assert_eq!(lat(&a.get(id), "position"), 1.0, "{id}");
    }
    assert!(a.t.clock().last().physical <= BASE + MAX_OFFSET);
    sync(&mut a, &mut far);
    for (id, ..) in &cases {
        assert_eq!(lat(&far.get(id), "position"), 1.0, "{id}: the far-future value beat a write that saw it");
        assert_eq!(a.replica_bytes(id), far.replica_bytes(id), "{id}");
    }
}

/// A delete stamped far ahead (an hour) from a skewed peer: a local write that saw it is
/// stamped after it (without moving the clock) and survives on both.
#[test]
fn a_write_after_a_far_future_delete_outlives_it() {
    let mut a = Node::new("fd-a");
    let mut b = Node::new("fd-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    b.pull(&mut a);
    b.advance(3600 * SEC);
    b.t.delete("t1").unwrap();
    a.pull(&mut b);
    assert!(a.t.get("t1").is_err());
    assert_eq!(a.t.counters.skewed_stamps, 1);
    a.advance(MS);
    let out = a.put(&entity("t1", vec![("position", position(2.0))]));
    assert!(out.created);
    let r = a.replica("t1").unwrap();
    assert!(ts(&r.versions["position"]) > ts(r.deleted_version.as_ref().unwrap()), "the write is not stamped after the delete");
    assert!(a.t.clock().now().physical < BASE + SEC, "the clock jumped to the delete's stamp");
    sync(&mut a, &mut b);
    for n in [&mut a, &mut b] {
        assert_eq!(lat(&n.get("t1"), "position"), 2.0, "{}", n.t.node().as_str());
    }
}

/// After a far-future delete, each local write must still be stamped after the one
/// before it: the legacy HLC stale check (and lww among concurrent values) relies on
/// stamps that only grow.
#[test]
fn successive_writes_after_a_far_future_delete_keep_increasing_stamps() {
    let mut a = Node::new("fd2-a");
    let mut b = Node::new("fd2-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    b.pull(&mut a);
    b.advance(3600 * SEC);
    b.t.delete("t1").unwrap();
    a.pull(&mut b);
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    let r1 = a.get("t1");
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(3.0))]));
    let r2 = a.get("t1");
    assert!(ts(&r2.versions["position"]) > ts(&r1.versions["position"]), "{:?} then {:?}", r1.versions["position"], r2.versions["position"]);
    // A legacy client's write based on r1 did not see position 3.0: stale.
    let e = with_hlc(entity("t1", vec![("position", position(9.0))]), &r1);
    let out = a.t.write(&e.encode_to_vec(), WriteMode::Update, false).unwrap();
    assert_eq!(names(&out.stale), ["position"], "a write based on an outdated read overwrote position 3.0");
    assert_eq!(lat(&a.get("t1"), "position"), 3.0);
}

/// A delete stamped at the very end of the clock's range leaves no stamp after it. A
/// local write on the entity must then either be refused or survive; a write reported
/// as applied that every replica then drops is a silent loss.
#[test]
fn a_write_after_a_delete_at_the_end_of_time_is_not_silently_lost() {
    let mut a = Node::new("eot-a");
    let mut c = Node::new("eot-c");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let mut dead = entity("t1", vec![]);
    dead.deleted_version = Some(pb::Version {
        physical: u64::MAX,
        logical: u32::MAX,
        node: "eot-evil".into(),
        incarnation: 1,
        counter: 1,
        concurrent: vec![],
    });
    dead.context.push(pb::Dot { node: "eot-evil".into(), incarnation: 1, counter: 1 });
    assert!(a.t.merge(&dead.encode_to_vec(), "eot-evil").unwrap());
    assert!(a.t.get("t1").is_err(), "the delete wins over the older value");
    a.advance(MS);
    let e = entity("t1", vec![("position", position(2.0))]);
    match a.t.write(&e.encode_to_vec(), WriteMode::Put, false) {
        Err(_) => {} // refused: the caller knows
        Ok(out) => {
            assert_eq!(names(&out.applied), ["position"]);
            sync(&mut a, &mut c);
            for n in [&mut a, &mut c] {
                let got = n.t.get("t1").map(|b| decode(&b));
                assert!(
                    got.as_ref().is_ok_and(|e| e.components.contains_key("position")),
                    "{}: the write was accepted, then lost to the delete it saw: {got:?}",
                    n.t.node().as_str()
                );
            }
        }
    }
}

/// A legacy client (entity-level HLC fields only) reads an entity whose latest value
/// came from a peer whose clock runs ahead, and writes back based on that read: the
/// stamp is one this store handed out itself, so the write is checked for staleness
/// like any other, not refused for clock skew.
#[test]
fn a_legacy_client_can_write_back_what_it_read_from_a_skewed_peer() {
    let mut a = Node::new("legacy-a");
    let mut b = Node::new("legacy-b");
    b.advance(10 * SEC);
    b.put(&entity("t1", vec![("position", position(1.0))]));
    a.pull(&mut b);
    let read = a.get("t1");
    assert_eq!(read.hlc_physical, BASE + 10 * SEC);
    a.advance(MS);
    let e = with_hlc(entity("t1", vec![("position", position(2.0)), ("threat", threat(LOW))]), &read);
    let r = a.t.write(&e.encode_to_vec(), WriteMode::Update, true);
    assert!(r.is_ok(), "a write based on this store's own read was refused: {r:?}");
    assert_eq!(lat(&a.get("t1"), "position"), 2.0);
}

/// The quarantine is gone: 4k far-future states merge at once, later merges are not
/// slowed, and a local write that saw one replaces it everywhere.
#[test]
fn thousands_of_far_future_states_merge_at_once_and_do_not_slow_later_merges() {
    let mut f = Node::new("q4k-future");
    let mut b = Node::new("q4k-b");
    let mut n = Node::new("q4k-now");
    f.advance(10 * SEC);
    for i in 0..4000 {
        f.put(&entity(&format!("f{i}"), vec![("position", position(1.0))]));
    }
    for i in 0..1000 {
        n.put(&entity(&format!("n{i}"), vec![("position", position(3.0))]));
    }
    assert!(b.pull(&mut f));
    assert_eq!(b.t.entity_count(), (4000, 0), "every far-future state is visible at once");
    assert_eq!(b.t.counters.skewed_stamps, 4000);
    assert!(b.t.clock().last().physical <= BASE + MAX_OFFSET);
    let start = Instant::now();
    assert!(b.pull(&mut n));
    let took = start.elapsed();
    assert_eq!(b.t.entity_count(), (5000, 0));
    assert!(took < Duration::from_secs(5), "1000 normal merges took {took:?} after 4000 far-future ones");
    // b writes over a far-future value it saw: b's (earlier-stamped) write replaces it.
    b.advance(MS);
    let out = b.put(&entity("f7", vec![("position", position(2.0))]));
    assert_eq!(names(&out.applied), ["position"]);
    assert_eq!(lat(&b.get("f7"), "position"), 2.0);
    f.pull(&mut b);
    assert_eq!(lat(&f.get("f7"), "position"), 2.0, "the writer of the far-future value kept it over a write that saw it");
    assert_eq!(f.replica_bytes("f7"), b.replica_bytes("f7"));
}

/// Create+delete churn with no peers: deleted entities are forgotten at once, so
/// memory stays flat. `CHURN_PAIRS` runs it longer.
#[test]
fn churn_without_peers_stays_bounded() {
    let pairs: usize = std::env::var("CHURN_PAIRS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let mut a = Node::new("churn-a");
    a.put(&entity("keep", vec![("position", position(1.0))]));
    let mut peak = (0usize, 0usize, 0usize);
    for i in 0..pairs {
        let id = format!("c{i}");
        a.put(&entity(&id, vec![("position", position(1.0)), ("blob", blob(200, 3))]));
        a.advance(MS);
        a.t.delete(&id).unwrap();
        if i % 100 == 99 {
            a.t.collect_deleted(None);
            let (alive, dead) = a.t.entity_count();
            peak = (peak.0.max(dead), peak.1.max(a.t.log_len()), peak.2.max(a.t.payload_bytes()));
            assert_eq!(alive, 1);
        }
    }
    a.t.collect_deleted(None);
    assert_eq!(a.t.entity_count(), (1, 0));
    assert_eq!(a.t.log_len(), 1);
    assert!(peak.0 == 0 && peak.1 <= 1, "dead entities or log entries were kept: {peak:?}");
    assert!(peak.2 < 1_000, "payload grew to {} bytes", peak.2);
    assert_eq!(a.t.counters.collected, pairs as u64);
    assert_eq!(lat(&a.get("keep"), "position"), 1.0);
}

/// With peers: every delete waits for the acknowledgements (bounded by what is not yet
/// acknowledged), a silent peer holds them back only until `peer_expiry`.
#[test]
fn churn_with_peers_is_bounded_by_acks_or_peer_expiry() {
    let mut a = Node::with("churn-p", |o| o.peer_expiry_ns = 10 * SEC);
    a.t.changes_since(0, usize::MAX, None, None).unwrap(); // a replicates from now on
    for round in 0..50 {
        for i in 0..100 {
            let id = format!("r{round}-{i}");
            a.put(&entity(&id, vec![("position", position(1.0))]));
            a.t.delete(&id).unwrap();
        }
        // Every peer acknowledged what was sent up to here.
        let acked = a.t.seq();
        a.t.collect_deleted(Some(acked));
        assert_eq!(a.t.entity_count(), (0, 0), "round {round}");
    }
    // One peer silent: nothing acknowledged, the records stay until peer_expiry.
    for i in 0..500 {
        let id = format!("s{i}");
        a.put(&entity(&id, vec![("position", position(1.0)), ("blob", blob(200, 1))]));
        a.t.delete(&id).unwrap();
        a.advance(10 * MS);
    }
    assert_eq!(a.t.collect_deleted(None), 0);
    assert_eq!(a.t.entity_count(), (0, 500));
    assert!(a.t.payload_bytes() < 500 * 200, "more than a few dozen bytes per delete record: {}", a.t.payload_bytes());
    a.advance(10 * SEC);
    assert_eq!(a.t.collect_deleted(None), 500);
    assert_eq!(a.t.entity_count(), (0, 0));
}

// ==== concurrent values and strategies ================================================

#[test]
fn concurrent_lww_writes_survive_as_siblings_until_a_write_that_saw_them() {
    let mut a = Node::new("sib-a");
    let mut b = Node::new("sib-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    b.pull(&mut a);
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    b.advance(2 * MS);
    b.put(&entity("t1", vec![("position", position(3.0))]));
    let stale_read = a.get("t1");
    sync(&mut a, &mut b);
    let read = a.get("t1");
    assert_eq!(lat(&read, "position"), 3.0, "lww shows the later stamp");
    let v = &read.versions["position"];
    assert_eq!(v.node, "sib-b");
    assert_eq!(v.concurrent.len(), 1);
    assert_eq!((v.concurrent[0].node.as_str(), v.concurrent[0].counter), ("sib-a", stale_read.versions["position"].counter));
    assert_eq!(key_dots(&a.replica("t1").unwrap(), "position").len(), 2);
    assert_eq!(b.get("t1"), read, "both show the same");
    // Based on the shown value only (its concurrent sibling not named): stale.
    let mut partial = read.versions["position"].clone();
    partial.concurrent.clear();
    let mut e = entity("t1", vec![("position", position(4.0))]);
    e.versions.insert("position".into(), partial);
    assert!(matches!(a.t.write(&e.encode_to_vec(), WriteMode::Update, true), Err(Error::Stale { .. })));
    // Based on a read from before the merge: stale.
    let e = based_on(entity("t1", vec![("position", position(4.0))]), &stale_read, &["position"]);
    assert!(matches!(a.t.write(&e.encode_to_vec(), WriteMode::Update, true), Err(Error::Stale { .. })));
    // Based on the full read: replaces both, even with the bytes of one of them.
    a.advance(MS);
    let e = based_on(entity("t1", vec![("position", position(2.0))]), &read, &["position"]);
    let out = a.t.write(&e.encode_to_vec(), WriteMode::Update, true).unwrap();
    assert_eq!(names(&out.applied), ["position"]);
    assert_eq!(key_dots(&a.replica("t1").unwrap(), "position").len(), 1);
    sync(&mut a, &mut b);
    for n in [&mut a, &mut b] {
        let e = n.get("t1");
        assert_eq!(lat(&e, "position"), 2.0, "{}", n.t.node().as_str());
        assert!(e.versions["position"].concurrent.is_empty());
    }
    assert_eq!(a.replica_bytes("t1"), b.replica_bytes("t1"));
}

/// A writer that saw HIGH replaces it with a lower level, and the lower level replicates.
#[test]
fn a_writer_who_saw_high_can_lower_it() {
    let mut a = Node::new("lower-a");
    let mut b = Node::new("lower-b");
    a.put(&entity("t1", vec![("threat", threat(HIGH))]));
    b.pull(&mut a);
    a.advance(MS);
    let read = a.get("t1");
    let out = a.put(&based_on(entity("t1", vec![("threat", threat(LOW))]), &read, &["threat"]));
    assert_eq!(names(&out.applied), ["threat"]);
    assert_eq!(level(&a.get("t1"), "threat"), LOW);
    assert!(b.pull(&mut a));
    assert_eq!(level(&b.get("t1"), "threat"), LOW, "the peer kept HIGH over a write that saw it");
    // A blind local write also replaces whatever the key holds here.
    b.advance(MS);
    b.put(&entity("t1", vec![("threat", threat(NONE_LEVEL))]));
    a.pull(&mut b);
    assert_eq!(level(&a.get("t1"), "threat"), NONE_LEVEL);
}

/// Concurrent approvals: DENIED > TIMED_OUT > APPROVED > AUTO_APPROVED > PENDING,
/// whichever was written later.
#[test]
fn concurrent_approvals_show_the_documented_order() {
    let order = [PENDING, AUTO_APPROVED, APPROVED, TIMED_OUT, DENIED];
    for (i, &lo) in order.iter().enumerate() {
        for &hi in &order[i + 1..] {
            for hi_later in [false, true] {
                let tag = format!("ap-{lo}-{hi}-{hi_later}");
                let mut a = Node::new(&format!("{tag}-a"));
                let mut b = Node::new(&format!("{tag}-b"));
                a.advance(if hi_later { MS } else { 2 * MS });
                a.put(&entity("t1", vec![("approval", approval(hi))]));
                b.advance(if hi_later { 2 * MS } else { MS });
                b.put(&entity("t1", vec![("approval", approval(lo))]));
                sync(&mut a, &mut b);
                for n in [&mut a, &mut b] {
                    assert_eq!(level(&n.get("t1"), "approval"), hi, "{tag}");
                }
            }
        }
    }
}

/// Concurrent writes to different keys of one entity both apply.
#[test]
fn concurrent_writes_to_different_keys_both_apply() {
    let mut a = Node::new("keys-a");
    let mut b = Node::new("keys-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    b.pull(&mut a);
    a.advance(MS);
    a.put(&entity("t1", vec![("threat", threat(LOW))]));
    b.advance(MS);
    b.put(&entity("t1", vec![("class", any(CLASSIFICATION, vec![0x0a, 3, b'c', b'a', b'r']))]));
    sync(&mut a, &mut b);
    for n in [&mut a, &mut b] {
        assert_eq!(keys(&n.get("t1")), ["class", "position", "threat"]);
    }
}

// ==== local writes ======================================================================

#[test]
fn stale_base_skips_that_key_and_applies_the_others() {
    let mut a = Node::new("stale-a");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    let read = a.get("t1");
    a.advance(MS);
    a.put(&based_on(entity("t1", vec![("position", position(2.0))]), &read, &["position"]));
    a.advance(MS);
    // Based on the first read: position is stale now, threat is not.
    let seq = a.t.seq();
    let out = a.put(&based_on(
        entity("t1", vec![("position", position(3.0)), ("threat", threat(HIGH))]),
        &read,
        &["position", "threat"],
    ));
    assert_eq!(names(&out.stale), ["position"]);
    assert_eq!(names(&out.applied), ["threat"]);
    assert_eq!(a.t.seq(), seq + 1);
    let now = a.get("t1");
    assert_eq!(lat(&now, "position"), 2.0, "the stale key was skipped");
    assert_eq!(level(&now, "threat"), HIGH);
    assert_eq!(a.t.counters.stale_keys, 1);
}

/// A write whose base names a concurrent value it saw elsewhere but that this replica
/// never held is not stale because of it.
#[test]
fn stale_means_a_value_the_writer_did_not_see() {
    let mut a = Node::new("unseen-a");
    let mut b = Node::new("unseen-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    b.pull(&mut a);
    let read_a = a.get("t1");
    // b writes: a's read did not see it.
    b.advance(MS);
    b.put(&entity("t1", vec![("position", position(2.0))]));
    a.pull(&mut b);
    let e = based_on(entity("t1", vec![("position", position(3.0))]), &read_a, &["position"]);
    assert!(matches!(a.t.write(&e.encode_to_vec(), WriteMode::Update, true), Err(Error::Stale { .. })));
    // A read of b's value is a valid base on a (same value, same dot).
    let read_b = b.get("t1");
    let e = based_on(entity("t1", vec![("position", position(3.0))]), &read_b, &["position"]);
    assert_eq!(names(&a.t.write(&e.encode_to_vec(), WriteMode::Update, true).unwrap().applied), ["position"]);
}

#[test]
fn strict_update_with_a_stale_key_fails_whole_and_changes_nothing() {
    let mut a = Node::new("strict-a");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    let read = a.get("t1");
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    let (seq, before, counter) = (a.t.seq(), a.replica_bytes("t1"), a.t.counter());
    let w = a.t.watch(spec(), false, None).unwrap();
    let e = based_on(entity("t1", vec![("position", position(3.0)), ("threat", threat(HIGH))]), &read, &["position", "threat"]);
    let err = a.t.write(&e.encode_to_vec(), WriteMode::Update, true).unwrap_err();
    assert_eq!(err, Error::Stale { id: "t1".into(), keys: vec!["position".into()] });
    assert_eq!(a.t.seq(), seq, "seq unchanged");
    assert_eq!(a.replica_bytes("t1"), before, "nothing applied (threat neither)");
    assert_eq!(a.t.counter(), counter, "no dot issued");
    assert!(w.poll(10, Duration::ZERO).is_empty(), "no event");
}

#[test]
fn blind_write_always_applies() {
    let mut a = Node::new("blind-a");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    let out = a.put(&entity("t1", vec![("position", position(3.0))]));
    assert_eq!(names(&out.applied), ["position"]);
    assert!(out.stale.is_empty());
    assert_eq!(lat(&a.get("t1"), "position"), 3.0);
}

/// Clients that send only the entity-level HLC fields (6-8) keep the HLC rule: a key is
/// stale iff it holds a value stamped after that HLC.
#[test]
fn entity_hlc_fields_are_the_base_when_versions_are_absent() {
    let mut a = Node::new("hlc-a");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    let old = a.get("t1");
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    let current = a.get("t1");
    // Old hlc: position (written since) is stale; threat (not written since) applies.
    let out = a.put(&with_hlc(entity("t1", vec![("position", position(9.0)), ("threat", threat(MEDIUM))]), &old));
    assert_eq!((names(&out.stale), names(&out.applied)), (vec!["position"], vec!["threat"]));
    // versions[key] wins over the hlc fields for its key.
    let e = based_on(with_hlc(entity("t1", vec![("position", position(8.0))]), &old), &current, &["position"]);
    let out = a.put(&e);
    assert_eq!(names(&out.applied), ["position"]);
    // A current hlc applies everything.
    let now = a.get("t1");
    let out = a.put(&with_hlc(entity("t1", vec![("position", position(7.0)), ("threat", threat(HIGH))]), &now));
    assert_eq!(names(&out.applied), ["position", "threat"]);
    assert!(out.stale.is_empty());
}

#[test]
fn writing_equal_bytes_is_unchanged_without_a_dot_seq_bump_or_event() {
    let mut a = Node::new("same-a");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    let w = a.t.watch(spec(), false, None).unwrap();
    let (seq, before, counter) = (a.t.seq(), a.replica_bytes("t1"), a.t.counter());
    let out = a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    assert_eq!(names(&out.unchanged), ["position", "threat"]);
    assert!(out.applied.is_empty() && !out.created);
    assert_eq!(a.t.seq(), seq);
    assert_eq!(a.t.counter(), counter, "no dot issued");
    assert_eq!(a.replica_bytes("t1"), before, "versions untouched");
    assert!(w.poll(10, Duration::ZERO).is_empty(), "no event");
    // One key equal, one new: only the new one takes a dot.
    let out = a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(HIGH))]));
    assert_eq!((names(&out.unchanged), names(&out.applied)), (vec!["position"], vec!["threat"]));
    assert_eq!(a.t.counter(), counter + 1);
}

#[test]
fn every_write_takes_a_new_dot_of_this_node() {
    let mut a = Node::with("dots-a", |o| o.incarnation = 0xfeed);
    assert_eq!(a.t.incarnation(), 0xfeed);
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let first = a.replica("t1").unwrap();
    let d1 = dot(&first.versions["position"]);
    assert_eq!((d1.0.as_str(), d1.1), ("dots-a", 0xfeed));
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    let d2 = dot(&a.replica("t1").unwrap().versions["position"]);
    assert!(d2.2 > d1.2, "{d2:?} after {d1:?}");
    a.t.delete("t1").unwrap();
    let dead = a.replica("t1").unwrap();
    let dd = dot(dead.deleted_version.as_ref().unwrap());
    assert!(dd.2 > d2.2);
    assert_eq!(dd.2, a.t.counter(), "the delete took the last dot");
    assert!(context(&dead).contains(&("dots-a".to_string(), 0xfeed, a.t.counter())));
    assert_eq!(a.t.context_summary().get(intern("dots-a"), 0xfeed), a.t.counter(), "own dots are in the summary");
}

#[test]
fn create_update_put_modes() {
    let mut a = Node::new("modes-a");
    let e = entity("t1", vec![("position", position(1.0))]).encode_to_vec();
    assert_eq!(a.t.write(&e, WriteMode::Update, false).unwrap_err(), Error::NotFound("t1".into()));
    assert_eq!(a.t.seq(), 0);
    let out = a.t.write(&e, WriteMode::Create, false).unwrap();
    assert!(out.created);
    assert_eq!(a.t.write(&e, WriteMode::Create, false).unwrap_err(), Error::AlreadyExists("t1".into()));
    let e2 = entity("t1", vec![("position", position(2.0))]).encode_to_vec();
    assert!(!a.t.write(&e2, WriteMode::Update, false).unwrap().created);
    assert!(!a.t.write(&entity("t1", vec![("threat", threat(LOW))]).encode_to_vec(), WriteMode::Put, false).unwrap().created);
    assert!(a.t.write(&entity("t2", vec![]).encode_to_vec(), WriteMode::Put, false).unwrap().created, "put creates");
    a.t.delete("t1").unwrap();
    assert_eq!(a.t.write(&e2, WriteMode::Update, false).unwrap_err(), Error::NotFound("t1".into()), "update of a deleted entity");
    assert!(a.t.write(&e2, WriteMode::Create, false).unwrap().created, "create over a deleted entity");
}

#[test]
fn entity_type_and_expiry_are_kept_and_a_new_life_starts_fresh() {
    let mut a = Node::new("meta-a");
    let mut b = Node::new("meta-b");
    let mut e = entity("t1", vec![("position", position(1.0))]);
    e.r#type = TRACK;
    e.expiry_time = Some(prost_types::Timestamp { seconds: 1_800_000_000, nanos: 0 });
    a.put(&e);
    a.put(&entity("t1", vec![("threat", threat(LOW))]));
    let got = a.get("t1");
    assert_eq!((got.r#type, got.expiry_time.as_ref().map(|t| t.seconds)), (TRACK, Some(1_800_000_000)));
    b.pull(&mut a);
    assert_eq!(b.get("t1").r#type, TRACK);
    assert_eq!(b.t.list(TRACK).len(), 1);
    assert!(b.t.list(1).is_empty());
    a.t.delete("t1").unwrap();
    a.put(&entity("t1", vec![("position", position(2.0))]));
    let got = a.get("t1");
    assert_eq!((got.r#type, got.expiry_time), (0, None), "a new life inherits neither type nor expiry");
}

/// The entity type lives in a register that a delete clears like any value: replicas
/// that reach the same state by different histories show the same type.
#[test]
fn the_entity_type_converges_across_deletes() {
    let mut a = Node::new("etype-a");
    let mut b = Node::new("etype-b");
    let mut c = Node::new("etype-c");
    let mut e = entity("t1", vec![("position", position(1.0))]);
    e.r#type = TRACK;
    a.put(&e);
    b.pull(&mut a);
    a.advance(MS);
    a.t.delete("t1").unwrap();
    b.pull(&mut a); // b had the live entity, c never did
    c.pull(&mut a);
    assert_eq!(b.replica_bytes("t1"), a.replica_bytes("t1"), "b's dead state differs from a's");
    assert_eq!(c.replica_bytes("t1"), a.replica_bytes("t1"), "c's dead state differs from a's");
    // A later write on c (which never saw the type) resurrects the entity: all show it alike.
    c.advance(5 * MS);
    c.put(&entity("t1", vec![("threat", threat(LOW))]));
    sync(&mut a, &mut c);
    sync(&mut b, &mut c);
    assert_eq!(a.get("t1"), c.get("t1"));
    assert_eq!(b.get("t1"), c.get("t1"), "b shows another entity type than c");
    assert_eq!(b.replica_bytes("t1"), c.replica_bytes("t1"));
}

#[test]
fn delete_then_resurrect() {
    let mut a = Node::new("del-a");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(HIGH))]));
    a.advance(MS);
    a.t.delete("t1").unwrap();
    assert_eq!(a.t.get("t1").unwrap_err(), Error::NotFound("t1".into()));
    assert!(a.t.list(0).is_empty());
    assert_eq!(a.t.delete("t1").unwrap_err(), Error::NotFound("t1".into()), "deleting twice");
    assert_eq!(a.t.delete("nope").unwrap_err(), Error::NotFound("nope".into()));
    let dead = a.replica("t1").unwrap();
    assert!(dead.deleted_version.is_some());
    assert!(dead.components.is_empty() && dead.siblings.is_empty(), "the replica state keeps no dead values");
    assert!(!dead.context.is_empty(), "but it remembers what was removed");
    assert_eq!(a.t.entity_count(), (0, 1));
    a.advance(MS);
    let out = a.put(&entity("t1", vec![("position", position(5.0))]));
    assert!(out.created);
    let e = a.get("t1");
    assert_eq!(keys(&e), ["position"], "values written before the delete stay dead");
    assert_eq!(lat(&e, "position"), 5.0);
    assert!(e.deleted_version.is_none(), "the user view carries no delete record");
    assert_eq!(a.t.list(0).len(), 1);
    assert_eq!(a.t.entity_count(), (1, 0));
}

#[test]
fn a_delete_replicates_and_a_concurrent_later_write_resurrects() {
    let mut a = Node::new("delrep-a");
    let mut b = Node::new("delrep-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    b.pull(&mut a);
    a.advance(MS);
    a.t.delete("t1").unwrap();
    let mut c = Node::new("delrep-c");
    c.pull(&mut b); // c holds the old life
    b.pull(&mut a);
    assert!(b.t.get("t1").is_err(), "delete replicated");
    // c, not having seen the delete, writes later: concurrent with it, c's write lives.
    c.advance(2 * MS);
    c.put(&entity("t1", vec![("velocity", any(WIDGET, vec![0x08, 1]))]));
    a.pull(&mut c);
    assert_eq!(keys(&a.get("t1")), ["velocity"]);
    sync(&mut a, &mut c);
    sync(&mut a, &mut b);
    assert_eq!(a.replica_bytes("t1"), c.replica_bytes("t1"));
    assert_eq!(a.replica_bytes("t1"), b.replica_bytes("t1"));
}

#[test]
fn put_many_is_all_or_nothing() {
    let mut a = Node::with("batch-a", |o| o.max_entity_bytes = 600);
    let ok = entity("t1", vec![("position", position(1.0))]).encode_to_vec();
    let bad = entity("t2", vec![("threat", threat(9))]).encode_to_vec();
    let err = a.t.put_many(&[&ok, &bad]).unwrap_err();
    assert!(matches!(&err, Error::Invalid { msg, .. } if msg.contains("batch item 1")), "{err:?}");
    assert_eq!((a.t.seq(), a.t.entity_count(), a.t.counter()), (0, (0, 0), 0), "nothing applied");
    let mid = |k: &str| entity("t1", vec![(k, any(WIDGET, [vec![0x12, 100], vec![7; 100]].concat()))]).encode_to_vec();
    let m1 = mid("m1");
    let out = a.t.put_many(&[&ok, &m1, &entity("t3", vec![]).encode_to_vec()]).unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(a.t.entity_count(), (2, 0));
    assert_eq!(keys(&a.get("t1")), ["m1", "position"]);
}

/// Each item of a batch fits the size limit, together they do not: the batch fails
/// whole, nothing applied (as `a.put` of the same items one by one refuses the last).
#[test]
fn a_batch_over_the_size_limit_fails_whole() {
    let mut a = Node::with("batch-size-a", |o| o.max_entity_bytes = 600);
    let ok = entity("t1", vec![("position", position(1.0))]).encode_to_vec();
    let mid = |k: &str| entity("t1", vec![(k, any(WIDGET, [vec![0x12, 100], vec![7; 100]].concat()))]).encode_to_vec();
    let (m1, m2) = (mid("m1"), mid("m2"));
    let r = a.t.put_many(&[&ok, &m1, &m2]);
    assert!(matches!(r, Err(Error::Invalid { .. })), "{r:?}");
    assert_eq!((a.t.seq(), a.t.entity_count(), a.t.counter()), (0, (0, 0), 0), "part of a failed batch was applied");
}

/// Whatever size of value a write is accepted with, a rewrite of the same key with a
/// value of the same size is accepted too (the limit counts what the entity will hold).
#[test]
fn an_accepted_value_can_be_rewritten_at_the_same_size() {
    let mut first_refused = None;
    for n in (200..600).step_by(4) {
        let mut a = Node::with(&format!("resize-{n}"), |o| o.max_entity_bytes = 600);
        if a.t.write(&entity("t1", vec![("blob", blob(n, 1))]).encode_to_vec(), WriteMode::Put, false).is_err() {
            first_refused = Some(n);
            break;
        }
        let r = a.t.write(&entity("t1", vec![("blob", blob(n, 2))]).encode_to_vec(), WriteMode::Put, false);
        assert!(r.is_ok(), "a {n}-byte value was accepted, a rewrite of the same size is refused: {r:?}");
    }
    assert!(first_refused.is_some(), "the limit was never reached");
}

// ==== merges ============================================================================

#[test]
fn merge_of_nothing_new_returns_false_without_seq_bump_or_event() {
    let mut a = Node::new("echo-a");
    let mut b = Node::new("echo-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let w = b.t.watch(spec(), false, None).unwrap();
    assert!(b.pull(&mut a));
    assert_eq!(w.poll(10, Duration::ZERO).len(), 1);
    let seq = b.t.seq();
    assert!(!b.pull(&mut a), "the same state again");
    assert_eq!(b.t.seq(), seq);
    assert!(w.poll(10, Duration::ZERO).is_empty(), "no event for a no-op merge");
    // The echo back to a ends there too.
    let seq_a = a.t.seq();
    assert!(!a.pull(&mut b));
    assert_eq!(a.t.seq(), seq_a);
    assert_eq!(a.t.counters.merges_changed, 0);
    // An older state of an entity already replaced changes nothing either.
    let old = b.states();
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    let seq_a = a.t.seq();
    for s in &old {
        assert!(!a.t.merge(s, "echo-b").unwrap(), "an old state changed a");
    }
    assert_eq!(a.t.seq(), seq_a);
}

#[test]
fn source_attribution_of_merges() {
    let mut a = Node::new("src-a");
    let mut b = Node::new("src-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let w = b.t.watch(spec(), false, None).unwrap();
    b.pull(&mut a);
    let ev = w.poll(10, Duration::ZERO);
    assert_eq!((ev.len(), ev[0].kind, ev[0].source.as_str()), (1, EventKind::Created, "src-a"));
    // A dominated state is attributed to its sender, so b does not echo it back to a.
    let (skip_a, _) = b.t.changes_since(0, usize::MAX, Some(intern("src-a")), None).unwrap();
    assert!(skip_a.is_empty(), "b's only change came from a");
    assert_eq!(b.t.changes_since(0, usize::MAX, None, None).unwrap().0.len(), 1);
    // Without an explicit source, the node of the latest change is the source.
    let mut c = Node::new("src-c");
    for s in a.states() {
        c.t.merge(&s, "").unwrap();
    }
    assert!(c.t.changes_since(0, usize::MAX, Some(intern("src-a")), None).unwrap().0.is_empty());
    // b adds a key, a writes another: a's state merged into b leaves b with more than a
    // has, so the change is b's own and must still go back to a.
    b.advance(MS);
    b.put(&entity("t1", vec![("threat", threat(LOW))]));
    a.advance(2 * MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    assert!(b.pull(&mut a));
    let (to_a, _) = b.t.changes_since(0, usize::MAX, Some(intern("src-a")), None).unwrap();
    assert_eq!(to_a.len(), 1, "b's merged state holds threat, which a lacks");
    let ev = w.poll(10, Duration::ZERO);
    assert_eq!(ev.last().unwrap().source.as_str(), "src-b");
    assert!(a.pull(&mut b));
    assert_eq!(a.replica_bytes("t1"), b.replica_bytes("t1"));
}

/// `unless_seen`: states whose every write a peer's context summary covers are skipped.
#[test]
fn changes_since_skips_what_the_peer_has_seen() {
    let mut a = Node::new("seen-a");
    let mut b = Node::new("seen-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    a.put(&entity("t2", vec![("position", position(1.0))]));
    b.pull(&mut a);
    assert!(b.t.adopt(a.t.context_summary()).unwrap());
    assert!(!b.t.adopt(a.t.context_summary()).unwrap(), "adopting again adds nothing");
    let summary = b.t.context_summary().clone();
    assert!(a.t.changes_since(0, usize::MAX, None, Some(&summary)).unwrap().0.is_empty(), "b has seen all of a");
    a.put(&entity("t2", vec![("threat", threat(LOW))]));
    let (states, _) = a.t.changes_since(0, usize::MAX, None, Some(&summary)).unwrap();
    assert_eq!(states.iter().map(|s| decode(s).id).collect::<Vec<_>>(), ["t2"]);
    assert!(!a.t.changes_since(0, usize::MAX, None, Some(&VersionVector::new())).unwrap().0.is_empty());
}

#[test]
fn watchers_see_created_updated_and_deleted_from_merges() {
    let mut a = Node::new("wev-a");
    let mut b = Node::new("wev-b");
    let w = b.t.watch(spec(), false, None).unwrap();
    a.put(&entity("t1", vec![("position", position(1.0))]));
    b.pull(&mut a);
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    b.pull(&mut a);
    a.advance(MS);
    a.t.delete("t1").unwrap();
    b.pull(&mut a);
    let ev = w.poll(10, Duration::ZERO);
    let kinds: Vec<EventKind> = ev.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Created, EventKind::Updated, EventKind::Deleted]);
    assert_eq!(lat(&decode(&ev[1].entity_bytes()), "position"), 2.0);
    assert!(ev.windows(2).all(|p| p[0].seq < p[1].seq));
    // A watcher resuming from a cursor gets the current state of what changed after it.
    let w2 = b.t.watch(spec(), false, Some(ev[0].seq)).unwrap();
    let ev2 = w2.poll(10, Duration::ZERO);
    assert_eq!(ev2.iter().map(|e| e.kind).collect::<Vec<_>>(), [EventKind::Deleted]);
}

/// Replica states round-trip between tables: siblings, delete record, context, type.
#[test]
fn replica_states_round_trip_between_tables() {
    let mut a = Node::new("rt-a");
    let mut b = Node::new("rt-b");
    let mut e = entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]);
    e.r#type = TRACK;
    a.put(&e);
    a.advance(MS);
    a.t.delete("t1").unwrap();
    b.pull(&mut a);
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    b.advance(5 * MS);
    b.put(&entity("t1", vec![("position", position(3.0)), ("threat", threat(MEDIUM))]));
    sync(&mut a, &mut b);
    let state = a.replica("t1").unwrap();
    assert!(state.deleted_version.is_some() && !state.siblings.is_empty() && !state.context.is_empty(), "{state:?}");
    let mut c = Node::new("rt-c");
    assert!(c.t.merge(&a.replica_bytes("t1").unwrap(), "rt-a").unwrap());
    assert_eq!(c.replica_bytes("t1"), a.replica_bytes("t1"), "a replica state survives the wire unchanged");
    assert_eq!(c.t.get("t1").unwrap(), a.t.get("t1").unwrap());
    // The prost encoding of the same message is accepted too (field order, map order).
    let mut d = Node::new("rt-d");
    assert!(d.t.merge(&state.encode_to_vec(), "rt-a").unwrap());
    assert_eq!(d.replica("t1"), Some(state));
}

/// A node restarted without its state takes a new incarnation: its new writes are new
/// dots, concurrent with what its previous life wrote, and nothing is lost or refused.
#[test]
fn a_restarted_node_takes_a_new_incarnation_and_loses_nothing() {
    let mut a = Node::with("restart-a", |o| o.incarnation = 1);
    let mut b = Node::new("restart-b");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(HIGH))]));
    b.pull(&mut a);
    // a restarts empty, as a new incarnation, and writes before it syncs.
    let mut a2 = Node::with("restart-a", |o| o.incarnation = 2);
    a2.advance(MS);
    a2.put(&entity("t1", vec![("threat", threat(LOW))]));
    assert_eq!(a2.t.counter(), 2, "counting starts over in the new incarnation");
    sync(&mut a2, &mut b);
    for n in [&mut a2, &mut b] {
        let e = n.get("t1");
        assert_eq!(lat(&e, "position"), 1.0, "{}", n.t.node().as_str());
        assert_eq!(level(&e, "threat"), HIGH, "{}: the previous life's concurrent HIGH was lost", n.t.node().as_str());
        assert_eq!(e.versions["threat"].concurrent.len(), 1);
    }
    assert_eq!(a2.replica_bytes("t1"), b.replica_bytes("t1"));
}

/// A state naming writes of this node's incarnation that it never made is refused; the
/// same node's other incarnations are other replicas.
#[test]
fn dots_of_this_node_it_never_issued_are_refused() {
    let mut a = Node::with("own-a", |o| o.incarnation = 3);
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let issued = a.t.counter();
    let (seq, before) = (a.t.seq(), a.replica_bytes("t1"));
    let forged = remote_state("t1", "position", position(9.0), BASE, 0, "own-a", 3, issued + 1);
    let err = a.t.merge(&forged.encode_to_vec(), "x").unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
    let mut in_ctx = a.replica("t1").unwrap();
    in_ctx.context.push(pb::Dot { node: "own-a".into(), incarnation: 3, counter: u64::MAX });
    assert!(matches!(a.t.merge(&in_ctx.encode_to_vec(), "x"), Err(Error::Invalid { .. })), "a forged context entry");
    assert_eq!((a.t.seq(), a.replica_bytes("t1")), (seq, before));
    assert_eq!(a.t.counter(), issued);
    let forged = VersionVector::from_entries(vec![(intern("own-a"), 3, issued + 1)]);
    assert!(matches!(a.t.adopt(&forged), Err(Error::Invalid { .. })));
    assert_eq!(a.t.context_summary().get(intern("own-a"), 3), issued);
    // A previous incarnation of the same node: another replica, accepted.
    let old_life = remote_state("t2", "position", position(9.0), BASE, 0, "own-a", 2, 100);
    assert!(a.t.merge(&old_life.encode_to_vec(), "x").unwrap());
    // And the next local write still takes a fresh dot.
    a.put(&entity("t2", vec![("position", position(1.0))]));
    assert_eq!(a.t.counter(), issued + 1);
}

// ==== collection, cursors ==============================================================

#[test]
fn collected_by_acked_seq_expire_older_cursors() {
    let mut a = Node::new("gc-a");
    a.t.changes_since(0, usize::MAX, None, None).unwrap(); // a peer is attached
    a.put(&entity("t1", vec![("position", position(1.0))]));
    a.put(&entity("t2", vec![("position", position(1.0))]));
    a.t.delete("t1").unwrap();
    let del_seq = a.t.seq();
    a.put(&entity("t3", vec![]));
    assert_eq!(a.t.collect_deleted(Some(del_seq - 1)), 0, "not acked yet");
    assert_eq!(a.t.collect_deleted(None), 0, "peer_expiry not reached");
    assert_eq!(a.t.entity_count(), (2, 1));
    assert_eq!(a.t.collect_deleted(Some(del_seq)), 1);
    assert_eq!(a.t.entity_count(), (2, 0));
    assert_eq!(a.t.counters.collected, 1);
    let (after, _) = a.t.changes_since(del_seq, usize::MAX, None, None).unwrap();
    assert!(after.iter().all(|b| decode(b).id != "t1"), "t1 forgotten");
    assert_eq!(
        a.t.changes_since(del_seq - 1, usize::MAX, None, None).unwrap_err(),
        Error::CursorExpired { seq: del_seq - 1, floor: del_seq }
    );
    let (snapshot, _) = a.t.changes_since(0, usize::MAX, None, None).unwrap();
    assert_eq!(snapshot.len(), 2, "seq 0 is a full snapshot of what survives: t2 and t3");
    let (states, last) = a.t.changes_since(del_seq, usize::MAX, None, None).unwrap();
    assert_eq!((states.len(), last), (1, a.t.seq()), "t3 only");
    assert!(matches!(a.t.watch(spec(), false, Some(del_seq - 1)), Err(Error::CursorExpired { .. })));
    // Forgotten, yet its writes are still known: re-creating it is a new life.
    a.put(&entity("t1", vec![("threat", threat(LOW))]));
    assert_eq!(keys(&a.get("t1")), ["threat"]);
}

/// A deleted entity holding writes of a peer is kept until the store's context summary
/// covers them (the peer's summary adopted), so no old state can bring them back.
#[test]
fn collection_waits_for_the_context_summary_to_cover_the_entity() {
    let mut a = Node::new("cover-a");
    let mut b = Node::new("cover-b");
    b.put(&entity("t1", vec![("position", position(1.0))]));
    a.pull(&mut b);
    a.advance(MS);
    a.t.delete("t1").unwrap();
    assert_eq!(a.t.collect_deleted(Some(u64::MAX)), 0, "b's dots are not in a's summary");
    assert_eq!(a.t.entity_count(), (0, 1));
    assert!(a.t.adopt(b.t.context_summary()).unwrap());
    assert_eq!(a.t.counters.adopted, 1);
    assert_eq!(a.t.collect_deleted(Some(u64::MAX)), 1);
    a.pull(&mut b);
    assert!(a.t.get("t1").is_err(), "b's old state resurrected the collected entity");
    b.pull(&mut a);
    assert!(b.t.get("t1").is_err());
}

#[test]
fn changes_since_pages_with_limit() {
    let mut a = Node::new("page-a");
    for i in 0..5 {
        a.put(&entity(&format!("t{i}"), vec![]));
    }
    let (first, cursor) = a.t.changes_since(0, 2, None, None).unwrap();
    assert_eq!((first.len(), cursor), (2, 2));
    let (rest, cursor) = a.t.changes_since(cursor, usize::MAX, None, None).unwrap();
    assert_eq!((rest.len(), cursor), (3, 5));
    a.put(&entity("t0", vec![("threat", threat(LOW))]));
    let (again, cursor) = a.t.changes_since(5, usize::MAX, None, None).unwrap();
    assert_eq!((again.len(), cursor), (1, 6), "an entity's latest change only");
    assert_eq!(a.t.log_len(), 5);
}

// ==== limits and validation ===========================================================

#[test]
fn oversize_input_is_refused_and_nothing_changes() {
    let mut a = Node::with("size-a", |o| o.max_entity_bytes = 600);
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let big = entity("t1", vec![("blob", blob(650, 7))]);
    assert!(matches!(a.t.write(&big.encode_to_vec(), WriteMode::Put, false), Err(e @ Error::Invalid { .. }) if e.to_string().contains("limit")));
    // Each write fits, together they do not.
    let mid = |k: &str| entity("t1", vec![(k, any(WIDGET, [vec![0x12, 100], vec![7; 100]].concat()))]);
    let seq = a.t.seq();
    a.put(&mid("m1"));
    let (seq2, before2) = (a.t.seq(), a.replica_bytes("t1"));
    assert!(matches!(a.t.write(&mid("m2").encode_to_vec(), WriteMode::Put, false), Err(e @ Error::Invalid { .. }) if e.to_string().contains("limit")));
    assert_eq!((a.t.seq(), a.replica_bytes("t1")), (seq2, before2));
    assert_eq!(seq + 1, seq2);
    // Replacing a value with one of the same size fits (the old one is not counted).
    a.put(&entity("t1", vec![("m1", any(WIDGET, [vec![0x12, 100], vec![8; 100]].concat()))]));
    // A replica state beyond MERGE_SLACK x the limit is refused by merge.
    let mut b = Node::with("size-b", |o| o.max_entity_bytes = 600);
    let huge = remote_state("t9", "blob", blob(600 * MERGE_SLACK, 1), BASE, 0, "size-x", 1, 1);
    assert!(matches!(b.t.merge(&huge.encode_to_vec(), ""), Err(Error::Invalid { .. })));
    assert_eq!((b.t.seq(), b.t.entity_count()), (0, (0, 0)));
    // What a accepted locally, b (same options) accepts.
    assert!(b.pull(&mut a));
    assert_eq!(b.replica_bytes("t1"), a.replica_bytes("t1"));
}

/// Concurrent values of several writers, each within the limit, can together exceed it:
/// merges accept them (up to MERGE_SLACK x the limit), so replicas still converge, and a
/// write of that key (which replaces them all) is accepted.
#[test]
fn concurrent_big_values_merge_within_the_slack() {
    let opts = |o: &mut Options| o.max_entity_bytes = 2_000;
    let mut a = Node::with("slack-a", opts);
    let mut b = Node::with("slack-b", opts);
    let mut c = Node::with("slack-c", opts);
    a.put(&entity("t1", vec![("position", position(1.0))]));
    b.pull(&mut a);
    a.advance(MS);
    a.put(&entity("t1", vec![("blob", blob(1_500, 1))]));
    b.advance(MS);
    b.put(&entity("t1", vec![("blob", blob(1_500, 2))]));
    sync(&mut a, &mut b);
    let state = a.replica_bytes("t1").unwrap();
    assert!(state.len() > 2_000, "two siblings: {} bytes", state.len());
    assert_eq!(key_dots(&a.replica("t1").unwrap(), "blob").len(), 2);
    assert!(c.t.merge(&state, "slack-a").expect("a peer with the same options refused a merged state"));
    assert_eq!(c.replica_bytes("t1"), a.replica_bytes("t1"));
    a.advance(MS);
    let out = a.t.write(&entity("t1", vec![("blob", blob(1_500, 3))]).encode_to_vec(), WriteMode::Put, false).unwrap();
    assert_eq!(names(&out.applied), ["blob"]);
    sync(&mut a, &mut b);
    assert_eq!(key_dots(&b.replica("t1").unwrap(), "blob").len(), 1);
}

fn encoded<M: Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

#[test]
fn known_types_are_range_checked() {
    let mut a = Node::new("range-a");
    let pos = |lat: f64, lon: f64| any(POSITION, encoded(&pb::PositionComponent { lat, lon, alt: 100.0 }));
    let vel = |speed: f64, heading: f64| any(VELOCITY, encoded(&pb::VelocityComponent { speed, heading }));
    let class = |c: f32| any(CLASSIFICATION, encoded(&pb::ClassificationComponent { label: "car".into(), confidence: c }));
    let fusion = |lat: f64, lon: f64, c: f32| {
        any(FUSION, encoded(&pb::FusionComponent { source_ids: vec!["s".into()], fused_lat: lat, fused_lon: lon, confidence: c }))
    };
    let good = [
        pos(90.0, 180.0),
        pos(-90.0, -180.0),
        vel(0.0, 359.0),
        vel(12.0, -90.0),
        class(0.0),
        class(1.0),
        fusion(45.0, -170.0, 0.5),
    ];
    let bad = [
        ("lat 90.5", pos(90.5, 0.0)),
        ("lat -91", pos(-91.0, 0.0)),
        ("lon 180.5", pos(0.0, 180.5)),
        ("lon -181", pos(0.0, -181.0)),
        ("lat nan", pos(f64::NAN, 0.0)),
        ("alt inf", any(POSITION, encoded(&pb::PositionComponent { lat: 1.0, lon: 1.0, alt: f64::INFINITY }))),
        ("speed -1", vel(-1.0, 0.0)),
        ("heading 400", vel(1.0, 400.0)),
        ("confidence 1.5", class(1.5)),
        ("confidence -0.1", class(-0.1)),
        ("fusion lat 95", fusion(95.0, 0.0, 0.5)),
        ("fusion lon 200", fusion(0.0, 200.0, 0.5)),
        ("fusion confidence 2", fusion(0.0, 0.0, 2.0)),
    ];
    for (i, v) in good.iter().enumerate() {
        let out = a.put(&entity("ok", vec![("k", v.clone())]));
        assert!(out.applied.len() == 1, "good value {i} refused");
    }
    let (seq, rejected) = (a.t.seq(), a.t.counters.rejected);
    let mut b = Node::new("range-b");
    for (what, v) in &bad {
        let r = a.t.write(&entity("t1", vec![("k", v.clone())]).encode_to_vec(), WriteMode::Put, false);
        assert!(matches!(r, Err(Error::Invalid { .. })), "{what}: {r:?}");
        // And in a replica state from a peer.
        let s = remote_state("t1", "k", v.clone(), BASE, 0, "range-x", 1, 1);
        let r = b.t.merge(&s.encode_to_vec(), "");
        assert!(matches!(r, Err(Error::Invalid { .. })), "merge of {what}: {r:?}");
    }
    assert_eq!(a.t.seq(), seq);
    assert_eq!(a.t.counters.rejected, rejected + bad.len() as u64);
    assert_eq!(b.t.entity_count(), (0, 0));
}

#[test]
fn malformed_or_invalid_input_is_refused_and_nothing_changes() {
    let mut a = Node::new("bad-a");
    a.put(&entity("t1", vec![("threat", threat(LOW)), ("position", position(1.0))]));
    let (seq, before) = (a.t.seq(), a.replica_bytes("t1"));
    let nan = {
        let mut v = vec![0x09];
        v.extend_from_slice(&f64::NAN.to_le_bytes());
        any(POSITION, v)
    };
    let bad_conf = {
        let mut v = vec![0x15];
        v.extend_from_slice(&f32::INFINITY.to_le_bytes());
        any(CLASSIFICATION, v)
    };
    let mut wrong_type = entity("t1", vec![]);
    wrong_type.r#type = 9;
    let mut bad_dot = entity("t1", vec![("threat", threat(HIGH))]);
    bad_dot.versions.insert("threat".into(), pb::Version { node: String::new(), counter: 3, ..Default::default() });
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff, 0xff, 0xff]),
        ("truncated", entity("t1", vec![("threat", threat(HIGH))]).encode_to_vec()[..10].to_vec()),
        ("empty id", entity("", vec![]).encode_to_vec()),
        ("long id", entity(&"x".repeat(2000), vec![]).encode_to_vec()),
        ("reserved key", entity("t1", vec![("@entity", threat(HIGH))]).encode_to_vec()),
        ("empty key", entity("t1", vec![("", threat(HIGH))]).encode_to_vec()),
        ("empty type url", entity("t1", vec![("x", any("", vec![]))]).encode_to_vec()),
        ("malformed component", entity("t1", vec![("x", any(WIDGET, vec![0x0a, 0x09]))]).encode_to_vec()),
        ("unknown threat level", entity("t1", vec![("threat", threat(9))]).encode_to_vec()),
        ("nan position", entity("t1", vec![("position", nan)]).encode_to_vec()),
        ("infinite confidence", entity("t1", vec![("class", bad_conf)]).encode_to_vec()),
        ("unknown entity type", wrong_type.encode_to_vec()),
        ("base dot with an empty node", bad_dot.encode_to_vec()),
    ];
    for (what, bytes) in &cases {
        let r = a.t.write(bytes, WriteMode::Put, false);
        assert!(matches!(r, Err(Error::Invalid { .. })), "{what}: {r:?}");
        assert_eq!((a.t.seq(), a.replica_bytes("t1")), (seq, before.clone()), "{what} changed the table");
    }
    assert_eq!(a.t.counters.rejected, cases.len() as u64);
    // Merges refuse malformed states too.
    let good = a.replica("t1").unwrap();
    let mut bad_value = good.clone();
    bad_value.components.insert("threat".into(), threat(9));
    let mut no_version = good.clone();
    no_version.versions.remove("threat");
    let mut no_dot = good.clone();
    no_dot.versions.get_mut("threat").unwrap().counter = 0;
    let mut nothing = entity("t1", vec![]);
    nothing.r#type = TRACK;
    let mut empty_ctx_node = good.clone();
    empty_ctx_node.context.push(pb::Dot { node: String::new(), incarnation: 1, counter: 1 });
    let mut bad_sibling = good.clone();
    bad_sibling.siblings.push(pb::Sibling { key: "threat".into(), value: Some(threat(9)), version: Some(good.versions["threat"].clone()) });
    for (what, bytes) in [
        ("garbage", vec![0xff, 0xff]),
        ("bad component", bad_value.encode_to_vec()),
        ("no version", no_version.encode_to_vec()),
        ("no dot", no_dot.encode_to_vec()),
        ("names no write", nothing.encode_to_vec()),
        ("context dot without node", empty_ctx_node.encode_to_vec()),
        ("bad sibling", bad_sibling.encode_to_vec()),
    ] {
        let r = a.t.merge(&bytes, "");
        assert!(matches!(r, Err(Error::Invalid { .. })), "{what}: {r:?}");
    }
    assert_eq!((a.t.seq(), a.replica_bytes("t1")), (seq, before));
}

/// A base *stamp* (legacy HLC fields, or a version without a dot) too far ahead is
/// refused with ClockSkew and nothing changes.
#[test]
fn a_base_stamp_from_the_future_is_refused() {
    let mut a = Node::new("skew-a");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let (seq, before) = (a.t.seq(), a.replica_bytes("t1"));
    let future = pb::Version { physical: BASE + 2 * SEC, node: "x".into(), ..Default::default() };
    let mut e = entity("t1", vec![("position", position(2.0))]);
    e.versions.insert("position".into(), future);
    let err = a.t.write(&e.encode_to_vec(), WriteMode::Put, false).unwrap_err();
    assert!(matches!(&err, Error::ClockSkew { id, ahead_ms, .. } if id == "t1" && (*ahead_ms - 2000.0).abs() < 1.0), "{err:?}");
    let mut e = entity("t1", vec![("position", position(2.0))]);
    (e.hlc_physical, e.hlc_node) = (BASE + SEC, "x".into());
    assert!(matches!(a.t.write(&e.encode_to_vec(), WriteMode::Put, false), Err(Error::ClockSkew { .. })));
    let mut e = entity("t1", vec![("position", position(2.0))]);
    (e.hlc_physical, e.hlc_logical, e.hlc_node) = (u64::MAX, u32::MAX, "x".into());
    assert!(matches!(a.t.write(&e.encode_to_vec(), WriteMode::Put, false), Err(Error::ClockSkew { .. })));
    assert_eq!((a.t.seq(), a.replica_bytes("t1")), (seq, before));
    assert!(a.t.clock().now().physical < BASE + SEC, "the clock was not dragged forward");
    // Within the offset it is fine.
    let mut e = entity("t1", vec![("position", position(3.0))]);
    e.versions.insert("position".into(), pb::Version { physical: BASE + 400 * MS, node: "x".into(), ..Default::default() });
    assert_eq!(names(&a.put(&e).applied), ["position"]);
}

// ==== HLC ===============================================================================

#[test]
fn hlc_versions_strictly_increase_under_wall_jumps() {
    let mut a = Node::new("jump-a");
    let mut b = Node::new("jump-b");
    let mut last: Option<Timestamp> = None;
    // A deterministic walk: forward, far back, tiny steps, stuck, forward again.
    let jumps: [i64; 12] = [0, 5, -3_000, 0, 0, 1, -1, 7_000, -7_000, 0, 2, -10_000];
    for (i, j) in jumps.iter().enumerate() {
        let now = a.wall.load(Ordering::SeqCst);
        a.set_wall(now.saturating_add_signed(j * MS as i64));
        let out = a.put(&entity("t1", vec![("position", position(i as f64))]));
        assert_eq!(names(&out.applied), ["position"]);
        let v = ts(&decode(&out.entity_bytes()).versions["position"]);
        if let Some(prev) = last {
            assert!(v > prev, "write {i}: {v:?} !> {prev:?}");
        }
        last = Some(v);
        // A merge of a peer's state from slightly ahead is adopted too.
        if i % 4 == 3 {
            b.set_wall(a.wall.load(Ordering::SeqCst) + 300 * MS);
            b.put(&entity("t2", vec![("position", position(i as f64))]));
            let peer = ts(&b.get("t2").versions["position"]);
            a.pull(&mut b);
            let out = a.put(&entity("t1", vec![("position", position(-(i as f64)))]));
            let v = ts(&decode(&out.entity_bytes()).versions["position"]);
            assert!(v > peer && v > last.unwrap());
            last = Some(v);
        }
    }
    // Deletes are stamped by the same clock.
    a.set_wall(BASE);
    a.t.delete("t1").unwrap();
    let del = ts(a.replica("t1").unwrap().deleted_version.as_ref().unwrap());
    assert!(del > last.unwrap());
}

// ==== watchers that fall behind ======================================================

#[test]
fn a_watcher_behind_catches_up_from_the_log_with_each_entity_latest_state() {
    let mut a = Node::new("a");
    let w = a.t.watch(WatchSpec { capacity: 2, ..spec() }, false, None).unwrap();
    for (id, lat) in [("e1", 1.0), ("e2", 2.0), ("e3", 3.0)] {
        a.put(&entity(id, vec![("position", position(lat))]));
    }
    let queued: Vec<_> = w.poll(10, Duration::ZERO).into_iter().map(|e| (e.id.to_string(), e.kind)).collect();
    assert_eq!(queued, [("e1".into(), EventKind::Created), ("e2".into(), EventKind::Created)]);
    assert!(w.is_behind(), "the third change found the queue full");
    a.put(&entity("e1", vec![("position", position(11.0))]));
    a.put(&entity("e4", vec![("position", position(4.0))]));
    a.t.delete("e2").unwrap();
    // Deletes wait for the watcher, as for a peer that has not acknowledged them.
    assert_eq!(a.t.collect_deleted(None), 0);
    // A queue's worth at a time, until the log is read to its end.
    let mut caught = Vec::new();
    while w.is_behind() {
        a.t.catch_up(&w);
        caught.extend(w.poll(10, Duration::ZERO).into_iter().map(|e| (e.id.to_string(), e.kind, e.seq, e.cursor)));
    }
    // In change order, each entity's latest state; e2's delete included.
    assert_eq!(
        caught,
        [
            ("e3".into(), EventKind::Updated, 3, 3),
            ("e1".into(), EventKind::Updated, 4, 4),
            ("e4".into(), EventKind::Updated, 5, 5),
            ("e2".into(), EventKind::Deleted, 6, 6)
        ]
    );
    assert_eq!(w.stats().coalesced, 0, "four changes skipped, four delivered");
    assert_eq!(a.t.collect_deleted(None), 1, "caught up: the delete can go");
    a.put(&entity("e5", vec![("position", position(5.0))]));
    assert_eq!(w.poll(10, Duration::ZERO).len(), 1, "plain again");
}

#[test]
fn a_catch_up_step_reads_a_bounded_part_of_the_log_however_large_the_queue() {
    // Each step holds the table lock: a watcher with a big queue behind on many entities
    // catches up in short steps (writes go in between), and still gets every entity.
    let mut a = Node::new("a");
    let w = a.t.watch(WatchSpec { capacity: 1000, ..spec() }, false, None).unwrap();
    for i in 0..2000 {
        a.put(&entity(&format!("e{i}"), vec![("position", position((i % 90) as f64))]));
    }
    assert_eq!(w.poll(5000, Duration::ZERO).len(), 1000);
    assert!(w.is_behind());
    let (mut steps, mut caught) = (0, 0);
    while w.is_behind() {
        a.t.catch_up(&w);
        let step = w.poll(5000, Duration::ZERO).len();
        assert!(step <= 256, "a step of {step} entities");
        steps += 1;
        caught += step;
    }
    assert_eq!((caught, steps), (1000, 4));
}

#[test]
fn a_watcher_behind_gets_an_entity_no_more_often_than_its_min_interval() {
    let mut a = Node::new("a");
    let w = a.t.watch(WatchSpec { capacity: 2, min_interval: Duration::from_secs(3600), ..spec() }, false, None).unwrap();
    a.put(&entity("e1", vec![("position", position(1.0))]));
    assert_eq!(w.poll(10, Duration::ZERO).len(), 1, "e1 sent: its next event waits an hour");
    for (id, lat) in [("e2", 2.0), ("e3", 3.0), ("e1", 11.0), ("e4", 4.0)] {
        a.put(&entity(id, vec![("position", position(lat))]));
    }
    let mut caught: Vec<String> = w.poll(10, Duration::ZERO).into_iter().map(|e| e.id.to_string()).collect();
    assert!(w.is_behind());
    while w.is_behind() {
        a.t.catch_up(&w);
        caught.extend(w.poll(10, Duration::ZERO).into_iter().map(|e| e.id.to_string()));
    }
    assert_eq!(caught, ["e2", "e3", "e4"], "e1's catch-up event is held like a live one");
    assert_eq!(w.stats().held, 1);
}

#[test]
fn a_snapshot_larger_than_the_queue_is_caught_up_as_created() {
    let mut a = Node::new("a");
    for i in 0..5 {
        a.put(&entity(&format!("e{i}"), vec![("position", position(i as f64))]));
    }
    a.put(&entity("e0", vec![("position", position(10.0))]));
    let w = a.t.watch(WatchSpec { capacity: 2, ..spec() }, true, None).unwrap();
    a.put(&entity("e1", vec![("position", position(11.0))])); // after the snapshot
    let mut kinds = Vec::new();
    for _ in 0..4 {
        a.t.catch_up(&w);
        kinds.extend(w.poll(10, Duration::ZERO).into_iter().map(|e| (e.id.to_string(), e.kind)));
    }
    assert_eq!(
        kinds,
        [
            ("e1".into(), EventKind::Created),
            ("e2".into(), EventKind::Created),
            ("e3".into(), EventKind::Created),
            ("e4".into(), EventKind::Created),
            ("e0".into(), EventKind::Created),
            ("e1".into(), EventKind::Updated)
        ]
    );
}

#[test]
fn a_projected_watcher_is_told_only_of_writes_to_the_keys_it_reads() {
    let mut a = Node::new("a");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    let projection: Arc<[Sym]> = Arc::from(vec![intern("threat")]);
    let w = a.t.watch(WatchSpec { projection: Some(projection), ..spec() }, false, None).unwrap();
    a.put(&entity("t1", vec![("position", position(2.0))])); // not read by it
    a.put(&entity("t1", vec![("position", position(3.0)), ("threat", threat(LOW))])); // threat unchanged
    let mut moved_on = entity("t1", vec![("position", position(4.0))]);
    moved_on.expiry_time = Some(prost_types::Timestamp { seconds: 4_000_000_000, nanos: 0 }); // a new expiry alone
    a.put(&moved_on);
    assert!(w.poll(10, Duration::ZERO).is_empty(), "nothing it reads changed");
    let mut retyped = entity("t1", vec![("position", position(5.0))]);
    retyped.r#type = 2; // the type is news to every watcher
    a.put(&retyped);
    a.put(&entity("t1", vec![("threat", threat(HIGH))]));
    a.t.delete("t1").unwrap();
    let kinds: Vec<_> = w.poll(10, Duration::ZERO).into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Updated, EventKind::Updated, EventKind::Deleted]);
}
