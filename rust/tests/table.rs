//! Focused tests of the entity table through the crate's public API: local writes (the
//! per-key stale check, blind writes, the hlc-field base, unchanged writes, modes),
//! strategies' epochs and after_delete, deletes and resurrection, merges (echo
//! termination, source attribution, quarantine), tombstone collection and cursors, input
//! limits and validation, clock skew, and the HLC under wall-clock jumps.
//!
//! Every table gets an injected wall clock (an AtomicU64 in ns) so time is explicit.
use _core::error::Error;
use _core::hlc::Timestamp;
use _core::intern::{intern, Sym};
use _core::pb;
use _core::table::{Options, Table, WriteMode, WriteOutcome};
use _core::watch::{EventKind, WatchSpec};
use prost::Message;
use prost_types::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const BASE: u64 = 1_700_000_000 * SEC;

const POSITION: &str = "type.googleapis.com/entity.v1.PositionComponent";
const THREAT: &str = "type.googleapis.com/entity.v1.ThreatComponent";
const APPROVAL: &str = "type.googleapis.com/entity.v1.ApprovalComponent";
const CLASSIFICATION: &str = "type.googleapis.com/entity.v1.ClassificationComponent";
const WIDGET: &str = "type.googleapis.com/acme.Widget";

// ThreatLevel and ApprovalState values (entity.proto).
const LOW: u8 = 2;
const MEDIUM: u8 = 3;
const HIGH: u8 = 4;
const APPROVED: u8 = 3;
const DENIED: u8 = 4;
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
        pb::Entity::decode(self.t.get(id).expect("get").as_slice()).unwrap()
    }

    /// The replica state of `id` (dead cells and tombstone included).
    fn replica(&mut self, id: &str) -> Option<pb::Entity> {
        let (states, _) = self.t.changes_since(0, usize::MAX, None).unwrap();
        states.iter().map(|b| pb::Entity::decode(b.as_slice()).unwrap()).find(|e| e.id == id)
    }

    fn states(&mut self) -> Vec<Vec<u8>> {
        self.t.changes_since(0, usize::MAX, None).unwrap().0
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

// ---- per-key stale check --------------------------------------------------------------

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

#[test]
fn strict_update_with_a_stale_key_fails_whole_and_changes_nothing() {
    let mut a = Node::new("strict-a");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    let read = a.get("t1");
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    let (seq, before) = (a.t.seq(), a.t.get("t1").unwrap());
    let e = based_on(entity("t1", vec![("position", position(3.0)), ("threat", threat(HIGH))]), &read, &["position", "threat"]);
    let err = a.t.write(&e.encode_to_vec(), WriteMode::Update, true).unwrap_err();
    assert_eq!(err, Error::Stale { id: "t1".into(), keys: vec!["position".into()] });
    assert_eq!(a.t.seq(), seq, "seq unchanged");
    assert_eq!(a.t.get("t1").unwrap(), before, "nothing applied (threat neither)");
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

#[test]
fn entity_hlc_fields_are_the_base_when_versions_are_absent() {
    let mut a = Node::new("hlc-a");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    let old = a.get("t1");
    a.advance(MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    let current = a.get("t1");
    let with_hlc = |mut e: pb::Entity, from: &pb::Entity| {
        (e.hlc_physical, e.hlc_logical, e.hlc_node) = (from.hlc_physical, from.hlc_logical, from.hlc_node.clone());
        e
    };
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
fn writing_equal_bytes_is_unchanged_without_a_seq_bump_or_event() {
    let mut a = Node::new("same-a");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    let w = a.t.watch(WatchSpec { type_filter: 0, projection: None, min_interval: Duration::ZERO, capacity: 16 }, false, None).unwrap();
    let (seq, before) = (a.t.seq(), a.replica("t1"));
    let out = a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    assert_eq!(names(&out.unchanged), ["position", "threat"]);
    assert!(out.applied.is_empty() && !out.created);
    assert_eq!(a.t.seq(), seq);
    assert_eq!(a.replica("t1"), before, "versions untouched");
    assert!(w.poll(10, Duration::ZERO).is_empty(), "no event");
}

// ---- epochs (max strategies) ----------------------------------------------------------

#[test]
fn a_writer_who_saw_high_can_lower_it_with_the_next_epoch() {
    let mut a = Node::new("epoch-a");
    a.put(&entity("t1", vec![("threat", threat(HIGH))]));
    let read = a.get("t1");
    assert_eq!(read.versions["threat"].epoch, 1);
    a.advance(MS);
    let out = a.put(&based_on(entity("t1", vec![("threat", threat(LOW))]), &read, &["threat"]));
    assert_eq!(names(&out.applied), ["threat"]);
    let now = a.get("t1");
    assert_eq!(level(&now, "threat"), LOW, "lowered");
    assert_eq!(now.versions["threat"].epoch, 2);
    // And the lowered value replicates: a peer holding HIGH (epoch 1) takes LOW (epoch 2).
    let mut b = Node::new("epoch-b");
    // (a user-view read of a live entity without dead cells is also its replica state)
    b.t.merge(&read.encode_to_vec(), "epoch-a").unwrap();
    assert_eq!(level(&b.get("t1"), "threat"), HIGH);
    assert!(b.pull(&mut a));
    assert_eq!(level(&b.get("t1"), "threat"), LOW);
}

#[test]
fn concurrent_writes_from_the_same_state_tie_on_epoch_and_the_higher_value_wins() {
    let mut a = Node::new("tie-a");
    let mut b = Node::new("tie-b");
    a.put(&entity("t1", vec![("threat", threat(LOW)), ("approval", approval(2))]));
    b.pull(&mut a);
    // b writes the higher values first; a writes lower values later (higher versions).
    b.advance(MS);
    b.put(&entity("t1", vec![("threat", threat(MEDIUM)), ("approval", approval(DENIED))]));
    a.advance(2 * MS);
    a.put(&entity("t1", vec![("threat", threat(NONE_LEVEL)), ("approval", approval(APPROVED))]));
    let (ra, rb) = (a.get("t1"), b.get("t1"));
    assert_eq!(ra.versions["threat"].epoch, rb.versions["threat"].epoch, "same depth");
    assert!(ts(&ra.versions["threat"]) > ts(&rb.versions["threat"]), "a's write is the later one");
    a.pull(&mut b);
    b.pull(&mut a);
    for n in [&mut a, &mut b] {
        let e = n.get("t1");
        assert_eq!(level(&e, "threat"), MEDIUM, "higher threat wins over the later write");
        assert_eq!(level(&e, "approval"), DENIED, "denial beats approval");
    }
}

const NONE_LEVEL: u8 = 1;

// ---- after_delete ---------------------------------------------------------------------

#[test]
fn a_write_after_a_delete_outranks_a_dead_cell_with_a_higher_epoch() {
    let mut a = Node::new("ad-a");
    let mut b = Node::new("ad-b");
    a.put(&entity("t1", vec![("threat", threat(LOW))]));
    b.pull(&mut a);
    // b climbs to epoch 3 without seeing what a does.
    for lvl in [MEDIUM, HIGH] {
        b.advance(MS);
        b.put(&entity("t1", vec![("threat", threat(lvl))]));
    }
    assert_eq!(b.get("t1").versions["threat"].epoch, 3);
    // a deletes, then writes threat LOW again (epoch 2, after its delete).
    a.advance(5 * MS);
    a.t.delete("t1").unwrap();
    a.advance(MS);
    let out = a.put(&entity("t1", vec![("threat", threat(LOW))]));
    assert!(out.created, "resurrected");
    let ra = a.replica("t1").unwrap();
    assert_eq!(ra.versions["threat"].epoch, 2);
    assert_eq!(ts(ra.versions["threat"].after_delete.as_ref().unwrap()), ts(ra.deleted_version.as_ref().unwrap()));
    a.pull(&mut b);
    b.pull(&mut a);
    for n in [&mut a, &mut b] {
        let e = n.get("t1");
        assert_eq!(level(&e, "threat"), LOW, "the write after the delete wins over epoch 3");
    }
    assert_eq!(a.replica("t1"), b.replica("t1"));
}

// ---- modes, delete, resurrect ---------------------------------------------------------

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
    assert!(a.t.write(&e2, WriteMode::Create, false).unwrap().created, "create over a tombstone");
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
    assert_eq!(dead.components.len(), 2, "the replica view keeps dead cells");
    a.advance(MS);
    let out = a.put(&entity("t1", vec![("position", position(5.0))]));
    assert!(out.created);
    let e = a.get("t1");
    assert_eq!(e.components.keys().collect::<Vec<_>>(), ["position"], "cells written before the delete stay dead");
    assert_eq!(lat(&e, "position"), 5.0);
    assert!(e.deleted_version.is_none());
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
    b.pull(&mut a);
    assert!(b.t.get("t1").is_err(), "delete replicated");
    // b, not having seen the delete, writes later: concurrent with it, b's write lives.
    b.advance(2 * MS);
    b.put(&entity("t1", vec![("velocity", any(WIDGET, vec![0x08, 1]))]));
    a.pull(&mut b);
    assert_eq!(a.get("t1").components.keys().collect::<Vec<_>>(), ["velocity"]);
    assert_eq!(a.replica("t1"), b.replica("t1"));
}

// ---- merge: echo termination and source attribution ---------------------------------

#[test]
fn merge_of_nothing_new_returns_false_without_seq_bump_or_event() {
    let mut a = Node::new("echo-a");
    let mut b = Node::new("echo-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let w = b.t.watch(WatchSpec { type_filter: 0, projection: None, min_interval: Duration::ZERO, capacity: 16 }, false, None).unwrap();
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
}

#[test]
fn source_attribution_of_merges() {
    let mut a = Node::new("src-a");
    let mut b = Node::new("src-b");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let w = b.t.watch(WatchSpec { type_filter: 0, projection: None, min_interval: Duration::ZERO, capacity: 16 }, false, None).unwrap();
    b.pull(&mut a);
    let ev = w.poll(10, Duration::ZERO);
    assert_eq!((ev.len(), ev[0].kind, ev[0].source.as_str()), (1, EventKind::Created, "src-a"));
    // A dominating state is attributed to its sender, so b does not echo it back to a.
    let (skip_a, _) = b.t.changes_since(0, usize::MAX, Some(intern("src-a"))).unwrap();
    assert!(skip_a.is_empty(), "b's only change came from a");
    assert_eq!(b.t.changes_since(0, usize::MAX, None).unwrap().0.len(), 1);
    // Without an explicit source, the node of the latest change is the source.
    let mut c = Node::new("src-c");
    for s in a.states() {
        c.t.merge(&s, "").unwrap();
    }
    assert!(c.t.changes_since(0, usize::MAX, Some(intern("src-a"))).unwrap().0.is_empty());
    // b adds a key, a writes another: a's state merged into b leaves b with more than a
    // has, so the change is b's own and must still go back to a.
    b.advance(MS);
    b.put(&entity("t1", vec![("threat", threat(LOW))]));
    a.advance(2 * MS);
    a.put(&entity("t1", vec![("position", position(2.0))]));
    assert!(b.pull(&mut a));
    let (to_a, _) = b.t.changes_since(0, usize::MAX, Some(intern("src-a"))).unwrap();
    assert_eq!(to_a.len(), 1, "b's merged state holds threat, which a lacks");
    let ev = w.poll(10, Duration::ZERO);
    assert_eq!(ev.last().unwrap().source.as_str(), "src-b");
    assert!(a.pull(&mut b));
    assert_eq!(a.replica("t1"), b.replica("t1"));
}

// ---- quarantine -----------------------------------------------------------------------

#[test]
fn states_beyond_the_max_offset_are_quarantined_then_released() {
    let mut a = Node::new("q-a");
    let mut b = Node::new("q-b");
    a.advance(10 * SEC);
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let ahead = ts(&a.get("t1").versions["position"]);
    assert!(!b.pull(&mut a), "nothing merged yet");
    assert!(b.t.get("t1").is_err());
    assert_eq!(b.t.quarantined_entities(), 1);
    assert_eq!(b.t.counters.quarantined, 1);
    assert!(b.t.clock().last().physical < BASE + SEC, "the clock did not adopt the future version");
    let t = b.t.clock().now();
    assert!(t < ahead);
    // Merging it again keeps one quarantined entity, counted again.
    b.pull(&mut a);
    assert_eq!((b.t.quarantined_entities(), b.t.counters.quarantined), (1, 2));
    // Still too far ahead after 9.4 s.
    b.advance(9_400 * MS);
    b.t.release_quarantine();
    assert_eq!(b.t.quarantined_entities(), 1);
    b.advance(200 * MS);
    b.t.release_quarantine();
    assert_eq!(b.t.quarantined_entities(), 0);
    assert_eq!(b.t.counters.released, 1);
    assert_eq!(lat(&b.get("t1"), "position"), 1.0);
    assert!(b.t.clock().now() > ahead, "adopted once released");
    assert_eq!(a.replica("t1"), b.replica("t1"));
}

#[test]
fn quarantine_splits_a_state_and_merges_the_present_part() {
    let mut a = Node::new("qs-a");
    let mut b = Node::new("qs-b");
    a.put(&entity("t1", vec![("position", position(1.0)), ("threat", threat(LOW))]));
    a.advance(10 * SEC);
    a.put(&entity("t1", vec![("threat", threat(HIGH))]));
    assert!(b.pull(&mut a), "the present part merges");
    let e = b.get("t1");
    assert_eq!(lat(&e, "position"), 1.0);
    // a's state holds only the newest threat cell, which is in b's future: held back.
    assert!(!e.components.contains_key("threat"), "the future threat is held");
    assert_eq!(b.t.quarantined_entities(), 1);
    assert!(b.t.clock().now().physical < BASE + SEC);
    b.set_wall(BASE + 10 * SEC);
    assert_eq!(level(&b.get("t1"), "threat"), HIGH, "reads release what is due");
    assert_eq!(b.t.quarantined_entities(), 0);
}

/// The metadata register (entity type, expiry) of a state whose every cell and whose
/// presence are in the future, but whose metadata is not, must survive the quarantine.
#[test]
fn quarantine_keeps_the_metadata_register() {
    let mut a = Node::new("qm-a");
    let mut b = Node::new("qm-b");
    let mut e = entity("t1", vec![("threat", threat(LOW))]);
    e.r#type = TRACK;
    a.put(&e);
    a.advance(10 * SEC);
    a.put(&entity("t1", vec![("threat", threat(HIGH))]));
    let truth = a.replica("t1").unwrap();
    assert_eq!((truth.r#type, truth.versions["@entity"].physical), (TRACK, BASE));
    b.pull(&mut a);
    b.set_wall(BASE + 10 * SEC);
    b.t.release_quarantine();
    let got = b.get("t1");
    assert_eq!(got.r#type, TRACK, "b lost the entity type: {got:?}");
    assert_eq!(b.replica("t1"), Some(truth), "b's replica state differs from a's");
}

/// Same set-up, then b's state goes back to a: a must keep its own entity type.
#[test]
fn quarantine_does_not_make_the_origin_lose_its_entity_type() {
    let mut a = Node::new("qo-a");
    let mut b = Node::new("qo-b");
    let mut e = entity("t1", vec![("threat", threat(LOW))]);
    e.r#type = TRACK;
    a.put(&e);
    a.advance(10 * SEC);
    a.put(&entity("t1", vec![("threat", threat(HIGH))]));
    b.pull(&mut a);
    b.set_wall(BASE + 10 * SEC);
    b.t.release_quarantine();
    a.pull(&mut b);
    assert_eq!(a.get("t1").r#type, TRACK, "a's entity type was overwritten by b's echo");
    b.pull(&mut a);
    assert_eq!(a.replica("t1"), b.replica("t1"));
}

/// A cell kept from a split state can carry `after_delete` of a tombstone the receiver
/// does not hold (the state's tombstone moved on and is quarantined). A local write of
/// that key must still outrank the cell it replaces, or the next merge of the same
/// state undoes the write.
#[test]
fn a_local_write_over_a_cell_from_a_split_state_is_not_undone() {
    let mut a = Node::new("qd-a");
    let mut b = Node::new("qd-b");
    a.put(&entity("t1", vec![("misc", position(1.0))]));
    a.advance(MS);
    a.t.delete("t1").unwrap();
    a.advance(MS);
    a.put(&entity("t1", vec![("misc", position(2.0))]));
    a.advance(10 * SEC);
    a.t.delete("t1").unwrap(); // the newer tombstone is in b's future
    b.pull(&mut a);
    assert_eq!(lat(&b.get("t1"), "misc"), 2.0);
    b.advance(MS);
    let out = b.put(&entity("t1", vec![("misc", position(3.0))]));
    assert_eq!(names(&out.applied), ["misc"]);
    assert_eq!(lat(&b.get("t1"), "misc"), 3.0);
    let seq = b.t.seq();
    assert!(!b.pull(&mut a), "re-merging a state b already merged changed b");
    assert_eq!(b.t.seq(), seq);
    assert_eq!(lat(&b.get("t1"), "misc"), 3.0, "b's own later write was undone by an older cell");
}

// ---- tombstone collection and cursors -----------------------------------------------

#[test]
fn tombstones_collected_by_acked_seq_expire_older_cursors() {
    let mut a = Node::new("gc-a");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    a.put(&entity("t2", vec![("position", position(1.0))]));
    a.t.delete("t1").unwrap();
    let del_seq = a.t.seq();
    a.put(&entity("t3", vec![]));
    assert_eq!(a.t.collect_tombstones(Some(del_seq - 1)), 0, "not acked yet");
    assert_eq!(a.t.collect_tombstones(None), 0, "ttl not reached");
    assert_eq!(a.t.entity_count(), (2, 1));
    assert_eq!(a.t.collect_tombstones(Some(del_seq)), 1);
    assert_eq!(a.t.entity_count(), (2, 0));
    assert_eq!(a.t.counters.collected, 1);
    let (after, _) = a.t.changes_since(del_seq, usize::MAX, None).unwrap();
    assert!(after.iter().all(|b| pb::Entity::decode(b.as_slice()).unwrap().id != "t1"), "t1 forgotten");
    assert_eq!(
        a.t.changes_since(del_seq - 1, usize::MAX, None).unwrap_err(),
        Error::CursorExpired { seq: del_seq - 1, floor: del_seq }
    );
    let (snapshot, _) = a.t.changes_since(0, usize::MAX, None).unwrap();
    assert_eq!(snapshot.len(), 2, "seq 0 is a full snapshot of what survives: t2 and t3");
    let (states, last) = a.t.changes_since(del_seq, usize::MAX, None).unwrap();
    assert_eq!((states.len(), last), (1, a.t.seq()), "t3 only");
    let spec = WatchSpec { type_filter: 0, projection: None, min_interval: Duration::ZERO, capacity: 16 };
    assert!(matches!(a.t.watch(spec, false, Some(del_seq - 1)), Err(Error::CursorExpired { .. })));
}

#[test]
fn tombstones_collected_by_ttl() {
    let mut a = Node::with("ttl-a", |o| o.tombstone_ttl_ns = 60 * SEC);
    a.put(&entity("t1", vec![("position", position(1.0))]));
    a.t.delete("t1").unwrap();
    let del_seq = a.t.seq();
    a.advance(59 * SEC);
    assert_eq!(a.t.collect_tombstones(None), 0);
    a.advance(SEC);
    assert_eq!(a.t.collect_tombstones(None), 1);
    assert_eq!(a.t.entity_count(), (0, 0));
    assert!(matches!(a.t.changes_since(del_seq - 1, 10, None), Err(Error::CursorExpired { .. })));
    assert!(a.t.changes_since(del_seq, 10, None).unwrap().0.is_empty());
}

#[test]
fn changes_since_pages_with_limit() {
    let mut a = Node::new("page-a");
    for i in 0..5 {
        a.put(&entity(&format!("t{i}"), vec![]));
    }
    let (first, cursor) = a.t.changes_since(0, 2, None).unwrap();
    assert_eq!((first.len(), cursor), (2, 2));
    let (rest, cursor) = a.t.changes_since(cursor, usize::MAX, None).unwrap();
    assert_eq!((rest.len(), cursor), (3, 5));
    a.put(&entity("t0", vec![("threat", threat(LOW))]));
    let (again, cursor) = a.t.changes_since(5, usize::MAX, None).unwrap();
    assert_eq!((again.len(), cursor), (1, 6), "an entity's latest change only");
    assert_eq!(a.t.log_len(), 5);
}

// ---- limits and validation ------------------------------------------------------------

#[test]
fn oversize_input_is_refused_and_nothing_changes() {
    let mut a = Node::with("size-a", |o| o.max_entity_bytes = 300);
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let (seq, before) = (a.t.seq(), a.replica("t1"));
    let big = entity("t1", vec![("blob", any(WIDGET, [vec![0x12, 0xc8, 0x02], vec![7; 328]].concat()))]);
    assert!(matches!(a.t.write(&big.encode_to_vec(), WriteMode::Put, false), Err(e @ Error::Invalid { .. }) if e.to_string().contains("limit")));
    // Each write fits, together they do not.
    let mid = |k: &str| entity("t1", vec![(k, any(WIDGET, [vec![0x12, 100], vec![7; 100]].concat()))]);
    a.put(&mid("m1"));
    let (seq2, before2) = (a.t.seq(), a.replica("t1"));
    assert!(matches!(a.t.write(&mid("m2").encode_to_vec(), WriteMode::Put, false), Err(e @ Error::Invalid { .. }) if e.to_string().contains("limit")));
    assert_eq!((a.t.seq(), a.replica("t1")), (seq2, before2));
    assert_eq!(seq + 1, seq2);
    let _ = before;
    let mut b = Node::with("size-b", |o| o.max_entity_bytes = 300);
    let mut state = a.replica("t1").unwrap();
    state.components.insert("blob".into(), big.components["blob"].clone());
    state.versions.insert("blob".into(), state.versions["m1"].clone());
    assert!(matches!(b.t.merge(&state.encode_to_vec(), ""), Err(Error::Invalid { .. })));
    assert_eq!((b.t.seq(), b.t.entity_count()), (0, (0, 0)));
}

#[test]
fn malformed_or_invalid_input_is_refused_and_nothing_changes() {
    let mut a = Node::new("bad-a");
    a.put(&entity("t1", vec![("threat", threat(LOW)), ("position", position(1.0))]));
    let (seq, before) = (a.t.seq(), a.replica("t1"));
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
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff, 0xff, 0xff]),
        ("truncated", entity("t1", vec![("threat", threat(HIGH))]).encode_to_vec()[..10].to_vec()),
        ("empty id", entity("", vec![]).encode_to_vec()),
        ("reserved key", entity("t1", vec![("@entity", threat(HIGH))]).encode_to_vec()),
        ("empty type url", entity("t1", vec![("x", any("", vec![]))]).encode_to_vec()),
        ("malformed component", entity("t1", vec![("x", any(WIDGET, vec![0x0a, 0x09]))]).encode_to_vec()),
        ("unknown threat level", entity("t1", vec![("threat", threat(9))]).encode_to_vec()),
        ("nan position", entity("t1", vec![("position", nan)]).encode_to_vec()),
        ("infinite confidence", entity("t1", vec![("class", bad_conf)]).encode_to_vec()),
        ("unknown entity type", wrong_type.encode_to_vec()),
    ];
    for (what, bytes) in &cases {
        let r = a.t.write(bytes, WriteMode::Put, false);
        assert!(matches!(r, Err(Error::Invalid { .. })), "{what}: {r:?}");
        assert_eq!((a.t.seq(), a.replica("t1")), (seq, before.clone()), "{what} changed the table");
    }
    assert_eq!(a.t.counters.rejected, cases.len() as u64);
    // Merges refuse malformed states too.
    let mut state = before.clone().unwrap();
    state.components.insert("threat".into(), threat(9));
    for (what, bytes) in [("garbage", vec![0xff, 0xff]), ("bad component", state.encode_to_vec())] {
        assert!(matches!(a.t.merge(&bytes, ""), Err(Error::Invalid { .. })), "{what}");
    }
    let mut no_version = before.clone().unwrap();
    no_version.versions.remove("threat");
    assert!(matches!(a.t.merge(&no_version.encode_to_vec(), ""), Err(e @ Error::Invalid { .. }) if e.to_string().contains("no version")));
    assert_eq!((a.t.seq(), a.replica("t1")), (seq, before));
}

#[test]
fn a_base_version_from_the_future_is_refused() {
    let mut a = Node::new("skew-a");
    a.put(&entity("t1", vec![("position", position(1.0))]));
    let (seq, before) = (a.t.seq(), a.replica("t1"));
    let future = pb::Version { physical: BASE + 2 * SEC, node: "x".into(), ..Default::default() };
    let mut e = entity("t1", vec![("position", position(2.0))]);
    e.versions.insert("position".into(), future);
    let err = a.t.write(&e.encode_to_vec(), WriteMode::Put, false).unwrap_err();
    assert!(matches!(&err, Error::ClockSkew { id, ahead_ms, .. } if id == "t1" && (*ahead_ms - 2000.0).abs() < 1.0), "{err:?}");
    let mut e = entity("t1", vec![("position", position(2.0))]);
    (e.hlc_physical, e.hlc_node) = (BASE + SEC, "x".into());
    assert!(matches!(a.t.write(&e.encode_to_vec(), WriteMode::Put, false), Err(Error::ClockSkew { .. })));
    assert_eq!((a.t.seq(), a.replica("t1")), (seq, before));
    assert!(a.t.clock().now().physical < BASE + SEC, "the clock was not dragged forward");
    // Within the offset it is fine.
    let mut e = entity("t1", vec![("position", position(3.0))]);
    e.versions.insert("position".into(), pb::Version { physical: BASE + 400 * MS, node: "x".into(), ..Default::default() });
    assert_eq!(names(&a.put(&e).applied), ["position"]);
}

// ---- HLC ------------------------------------------------------------------------------

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
        let v = ts(&pb::Entity::decode(out.entity_bytes().as_slice()).unwrap().versions["position"]);
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
            let v = ts(&pb::Entity::decode(out.entity_bytes().as_slice()).unwrap().versions["position"]);
            assert!(v > peer && v > last.unwrap());
            last = Some(v);
        }
    }
    // Deletes are stamped by the same clock.
    a.set_wall(BASE);
    a.t.delete("t1").unwrap();
    let tomb = ts(a.replica("t1").unwrap().deleted_version.as_ref().unwrap());
    assert!(tomb > last.unwrap());
}
