//! The state of one entity, a delta-state map of multi-value registers (Almeida, Shoker,
//! Baquero, "Delta State Replicated Data Types", 2018), and its wire form.
//!
//! - Each component key holds a set of *siblings*: (dot, HLC stamp, type URL, value).
//!   Writes that did not see each other survive side by side; the key's merge strategy
//!   picks the one readers see (`strategy`).
//! - `ctx`, the entity's causal context, names every write to the entity this replica
//!   has seen, kept or replaced (see `causal`). Every sibling's dot is in it.
//! - `deleted`, the latest delete: its dot is in `ctx` (so the siblings the deleter saw
//!   are gone for good), and its stamp removes every sibling stamped before it, including
//!   concurrent ones the deleter never saw: deletes win over older concurrent writes,
//!   newer writes resurrect. A record that arrives again after it was forgotten (a
//!   delayed copy) is taken back: harmless, since a record is only forgotten once the
//!   clock has passed its stamp, so every later write is stamped after it.
//! - The type, expiry and creation time live in a register of their own, the reserved
//!   key `@entity`, with siblings like any key: a delete clears them, a new life writes
//!   them afresh, concurrent changes merge.
//!
//! `join` keeps a sibling iff both sides hold it or the other side has not seen its dot,
//! joins the contexts, keeps the later delete and drops what it removes: commutative,
//! associative and idempotent (`tests/properties.rs`).
use crate::causal::{Dot, VersionVector};
use crate::decode::{RawDot, RawEntity, RawVersion};
use crate::hlc::Timestamp;
use crate::intern::{intern, Sym};
use crate::strategy::Registry;
use crate::wire::*;
use std::cmp::Ordering;
use std::sync::Arc;

/// The reserved key of the type/expiry register; its version travels in `versions`.
pub const META_KEY: &str = "@entity";
/// Type URL of the type/expiry register's values: `Entity` bytes with fields 2, 4 and 10.
pub const META_URL: &str = "type.googleapis.com/meshstore.EntityMeta";

/// `META_KEY` and `META_URL` interned once: every write and every meta read uses them.
pub fn meta_key() -> Sym {
    static SYM: std::sync::LazyLock<Sym> = std::sync::LazyLock::new(|| intern(META_KEY));
    *SYM
}

pub fn meta_url() -> Sym {
    static SYM: std::sync::LazyLock<Sym> = std::sync::LazyLock::new(|| intern(META_URL));
    *SYM
}

/// A protobuf Timestamp (seconds, nanos).
pub type WallTime = (i64, i32);

pub fn wall_time_of(ns: u64) -> WallTime {
    ((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as i32)
}

#[derive(Clone, Debug)]
pub struct Sibling {
    pub key: Sym,
    pub type_url: Sym,
    /// The write's HLC stamp; its node is the dot's node.
    pub ts: Timestamp,
    pub incarnation: u64,
    pub counter: u64,
    /// Shared, so snapshots of a state (results, events) cost no copy of the values.
    pub value: Arc<[u8]>,
}

impl PartialEq for Sibling {
    fn eq(&self, o: &Self) -> bool {
        self.key == o.key
            && self.dot() == o.dot()
            && self.ts == o.ts
            && self.type_url == o.type_url
            && (Arc::ptr_eq(&self.value, &o.value) || self.value == o.value)
    }
}

impl Eq for Sibling {}

impl Sibling {
    pub fn dot(&self) -> Dot {
        Dot { node: self.ts.node, incarnation: self.incarnation, counter: self.counter }
    }

    /// The order readers see siblings of one key in: the greatest is shown (module docs
    /// of `strategy`).
    pub fn cmp_rank(&self, other: &Sibling, reg: &Registry) -> Ordering {
        let (ra, rb) = (reg.order_of(self.type_url, &self.value), reg.order_of(other.type_url, &other.value));
        ra.rank
            .cmp(&rb.rank)
            .then_with(|| self.ts.cmp(&other.ts))
            .then(ra.tiebreak.cmp(&rb.tiebreak))
            .then_with(|| self.type_url.as_str().cmp(other.type_url.as_str()))
            .then_with(|| self.value.cmp(&other.value))
            .then_with(|| (self.incarnation, self.counter).cmp(&(other.incarnation, other.counter)))
    }

    /// An arbitrary total order on the content of two copies of one dot.
    fn cmp_content(&self, other: &Sibling) -> Ordering {
        (self.ts, self.type_url.as_str(), &self.value).cmp(&(other.ts, other.type_url.as_str(), &other.value))
    }

    /// Storage order: by key name, then dot.
    fn cmp_slot(&self, other: &Sibling) -> Ordering {
        self.key.as_str().cmp(other.key.as_str()).then_with(|| self.dot().sort_key().cmp(&other.dot().sort_key()))
    }

    /// What the sibling counts for in size limits: value, key, type URL and version.
    pub fn bytes(&self) -> usize {
        sibling_bytes(self.key, self.type_url, self.value.len())
    }

    pub fn is_meta(&self) -> bool {
        self.key.as_str() == META_KEY
    }
}

pub fn sibling_bytes(key: Sym, type_url: Sym, value_len: usize) -> usize {
    value_len + key.as_str().len() + type_url.as_str().len() + 48
}

/// What a join did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Joined {
    pub changed: bool,
    /// The result holds something the other side did not.
    pub other_lacks: bool,
    /// Some of the other side's values were dropped only because the store's summary
    /// had seen them: the entity's own context does not say so (see `Table::merge`).
    pub removed_by_summary: bool,
}

/// Bytes a context entry counts for in size limits.
pub const CONTEXT_ENTRY_BYTES: usize = 32;

/// An entity's latest delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeleteRecord {
    pub ts: Timestamp,
    pub incarnation: u64,
    pub counter: u64,
}

impl DeleteRecord {
    pub fn dot(&self) -> Dot {
        Dot { node: self.ts.node, incarnation: self.incarnation, counter: self.counter }
    }
}

/// The later of two deletes (stamp, then dot: a total order).
fn later(a: Option<DeleteRecord>, b: Option<DeleteRecord>) -> Option<DeleteRecord> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if (y.ts, y.incarnation, y.counter) > (x.ts, x.incarnation, x.counter) { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// What the type/expiry register holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub etype: i32,
    pub expiry: Option<WallTime>,
    /// When this life of the entity began.
    pub created_at: Option<WallTime>,
}

impl Meta {
    /// The register's value bytes (`Entity` fields 2, 4 and 10).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint_field(&mut out, 2, self.etype as u64);
        if let Some(t) = self.created_at {
            put_wall(&mut out, 4, t);
        }
        if let Some(t) = self.expiry {
            put_wall(&mut out, 10, t);
        }
        out
    }

    pub fn parse(value: &[u8]) -> Result<Meta, String> {
        let e = crate::decode::decode_entity(value)?;
        if !(0..=3).contains(&e.etype) {
            return Err(format!("unknown entity type {}", e.etype));
        }
        Ok(Meta { etype: e.etype, expiry: e.expiry_time, created_at: e.created_at })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityState {
    pub id: Arc<str>,
    /// Sorted by (key name, dot): a key's siblings are one run.
    pub sibs: Vec<Sibling>,
    pub ctx: VersionVector,
    pub deleted: Option<DeleteRecord>,
    /// Type, expiry and creation time as the register shows them (derived by `refresh`).
    pub etype: i32,
    pub expiry: Option<WallTime>,
    pub created_at: Option<WallTime>,
    /// Local, not replicated: the last non-zero type this replica saw, so watchers
    /// filtering on type still see the entity's delete.
    pub last_type: i32,
    /// The table's change sequence of this entity's latest change.
    pub seq: u64,
    /// Node the latest change came from (echo suppression).
    pub source: Sym,
}

impl EntityState {
    pub fn new(id: Arc<str>, source: Sym) -> Self {
        EntityState {
            id,
            sibs: Vec::new(),
            ctx: VersionVector::new(),
            deleted: None,
            created_at: None,
            etype: 0,
            expiry: None,
            last_type: 0,
            seq: 0,
            source,
        }
    }

    /// Alive while any key holds a value.
    pub fn is_alive(&self) -> bool {
        !self.sibs.is_empty()
    }

    /// The run of `key`'s siblings.
    pub fn key_range(&self, key: Sym) -> std::ops::Range<usize> {
        // An entity holds a handful of values: comparing symbols beats a binary search
        // on strings. Only an absent key needs its place in key order.
        match self.sibs.iter().position(|s| s.key == key) {
            Some(start) => start..start + self.sibs[start..].iter().take_while(|s| s.key == key).count(),
            None => {
                let k = key.as_str();
                let at = self.sibs.partition_point(|s| s.key.as_str() < k);
                at..at
            }
        }
    }

    pub fn siblings(&self, key: Sym) -> &[Sibling] {
        &self.sibs[self.key_range(key)]
    }

    /// Each key's run of siblings, in key order.
    pub fn runs(&self) -> impl Iterator<Item = &[Sibling]> {
        self.sibs.chunk_by(|a, b| a.key == b.key)
    }

    /// The value readers see among a key's siblings.
    pub fn winner<'a>(run: &'a [Sibling], reg: &Registry) -> &'a Sibling {
        if run.len() == 1 {
            return &run[0];
        }
        run.iter().max_by(|a, b| a.cmp_rank(b, reg)).expect("a run is never empty")
    }

    /// Replaces every sibling of `s.key` with `s`.
    pub fn replace_key(&mut self, s: Sibling) {
        let r = self.key_range(s.key);
        let at = r.start;
        self.sibs.splice(r, std::iter::once(s));
        debug_assert!(self.sibs[at].key.as_str() == META_KEY || at == 0 || self.sibs[at - 1].key != self.sibs[at].key);
    }

    /// The type/expiry register's value (none: type 0, no expiry, no creation time).
    pub fn meta(&self, reg: &Registry) -> Meta {
        let r = self.key_range(meta_key());
        if r.is_empty() {
            return Meta::default();
        }
        Meta::parse(&Self::winner(&self.sibs[r], reg).value).unwrap_or_default()
    }

    /// The register's value as `refresh` last read it (no decoding).
    pub fn current_meta(&self) -> Meta {
        Meta { etype: self.etype, expiry: self.expiry, created_at: self.created_at }
    }

    /// Re-reads the type/expiry register after a change.
    pub fn refresh(&mut self, reg: &Registry) {
        let m = self.meta(reg);
        (self.etype, self.expiry, self.created_at) = (m.etype, m.expiry, m.created_at);
        if m.etype != 0 {
            self.last_type = m.etype;
        }
    }

    /// The type readers and watchers see: the register's while alive (every replica
    /// agrees on it), the last one this replica knew once deleted (its delete event
    /// still carries, and is filtered by, the type it had).
    pub fn shown_type(&self) -> i32 {
        if self.is_alive() { self.etype } else { self.last_type }
    }

    /// The latest stamp of any value or delete: the entity-level HLC.
    pub fn max_stamp(&self) -> Option<Timestamp> {
        self.sibs.iter().map(|s| s.ts).chain(self.deleted.map(|d| d.ts)).max()
    }

    /// The latest stamp of any value (the entity-level HLC of a live entity).
    fn latest_value_stamp(&self) -> Option<Timestamp> {
        self.sibs.iter().map(|s| s.ts).max()
    }

    /// Drops every sibling stamped before the delete (their dots stay in the context).
    fn apply_delete(&mut self) {
        if let Some(d) = self.deleted {
            self.sibs.retain(|s| s.ts > d.ts);
        }
    }

    /// Joins `other` into `self`. `seen` is the store's context summary: a dot it covers
    /// was seen by this store even when `self.ctx` does not name it (the entity was
    /// forgotten after its delete). Returns whether `self` changed, and whether it now
    /// holds something `other` did not.
    pub fn join(&mut self, other: &EntityState, seen: &VersionVector) -> Joined {
        let mut out: Vec<Sibling> = Vec::with_capacity(self.sibs.len().max(other.sibs.len()));
        let (a, b) = (&self.sibs, &other.sibs);
        let (mut i, mut j) = (0, 0);
        let mut changed = false;
        let mut other_lacks = false;
        let mut removed_by_summary = false;
        while i < a.len() || j < b.len() {
            let order = match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) => x.cmp_slot(y),
                (Some(_), None) => Ordering::Less,
                _ => Ordering::Greater,
            };
            match order {
                Ordering::Less => {
                    // Ours only: kept unless the other side saw it (and so removed it).
                    if other.ctx.contains(&a[i].dot()) {
                        changed = true;
                    } else {
                        out.push(a[i].clone());
                        other_lacks = true;
                    }
                    i += 1;
                }
                Ordering::Greater => {
                    // Theirs only: kept unless we saw it (and so removed it).
                    let d = b[j].dot();
                    if self.ctx.contains(&d) {
                        other_lacks = true;
                    } else if seen.contains(&d) {
                        other_lacks = true;
                        removed_by_summary = true;
                    } else {
                        out.push(b[j].clone());
                        changed = true;
                    }
                    j += 1;
                }
                Ordering::Equal => {
                    // One dot is one write; should two copies differ (a corrupt peer),
                    // both sides keep the same one.
                    if a[i] == b[j] || a[i].cmp_content(&b[j]) == Ordering::Greater {
                        out.push(a[i].clone());
                        other_lacks |= a[i] != b[j];
                    } else {
                        out.push(b[j].clone());
                        changed = true;
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        self.sibs = out;
        // The later delete stays: it removes all the earlier one would.
        let deleted = later(self.deleted, other.deleted);
        changed |= deleted != self.deleted;
        other_lacks |= deleted != other.deleted;
        self.deleted = deleted;
        changed |= self.ctx.join(&other.ctx);
        other_lacks |= !self.ctx.covered_by(&other.ctx);
        let before = self.sibs.len();
        self.apply_delete();
        if self.sibs.len() != before {
            changed = true;
        }
        Joined { changed, other_lacks, removed_by_summary }
    }

    /// What size limits count: every value that replicates and the context.
    pub fn replica_bytes(&self) -> usize {
        self.id.len() + self.sibs.iter().map(Sibling::bytes).sum::<usize>() + self.ctx.len() * CONTEXT_ENTRY_BYTES
    }

    /// Approximate bytes in memory beyond the struct (for stats).
    pub fn payload_bytes(&self) -> usize {
        self.id.len() + self.sibs.iter().map(|s| s.value.len()).sum::<usize>() + self.ctx.bytes()
    }
}

// ---- from wire ---------------------------------------------------------------------

fn timestamp_of(physical: u64, logical: u32, node: &str) -> Result<Timestamp, String> {
    if node.is_empty() {
        return Err("version has an empty node".into());
    }
    Ok(Timestamp { physical, logical, node: intern(node) })
}

/// A version's stamp (its node must be set).
pub fn stamp_of(v: &RawVersion) -> Result<Timestamp, String> {
    timestamp_of(v.physical, v.logical, v.node)
}

pub fn dot_of(d: &RawDot) -> Result<Dot, String> {
    if d.0.is_empty() || d.2 == 0 {
        return Err(format!("dot ({:?}, {}, {}) has an empty node or a zero counter", d.0, d.1, d.2));
    }
    Ok(Dot { node: intern(d.0), incarnation: d.1, counter: d.2 })
}

/// A version that names a value: its stamp and dot.
fn stamped_dot(v: &RawVersion) -> Result<(Timestamp, u64, u64), String> {
    let ts = stamp_of(v)?;
    if v.counter == 0 {
        return Err("version has no dot (counter 0): not a replica state".into());
    }
    Ok((ts, v.incarnation, v.counter))
}

/// The entity-level HLC fields (6-8) as a timestamp, if the sender set them.
pub fn entity_hlc(e: &RawEntity) -> Option<Timestamp> {
    let (physical, logical, node) = e.hlc;
    (!node.is_empty()).then(|| Timestamp { physical, logical, node: intern(node) })
}

/// A replica's state (as `changes_since` and the relay carry it), received from `source`
/// (None: the node of its latest change). Validates every value for its strategy.
pub fn state_from_replica(e: &RawEntity, reg: &Registry, source: Option<Sym>) -> Result<EntityState, String> {
    let mut s = EntityState::new(Arc::from(e.id), intern(""));
    s.sibs.reserve_exact(e.components.len() + e.siblings.len() + 1);
    let mut push = |key: &str, url: &str, value: &[u8], v: &RawVersion| -> Result<(), String> {
        let type_url = intern(url);
        if key == META_KEY {
            Meta::parse(value).map_err(|m| format!("the type/expiry register: {m}"))?;
        } else {
            if key.is_empty() || key.starts_with('@') {
                return Err(format!("component key {key:?} is empty or reserved"));
            }
            reg.rank(type_url, value).map_err(|m| format!("component '{key}' ({url}): {m}"))?;
        }
        let (ts, incarnation, counter) = stamped_dot(v).map_err(|m| format!("component '{key}': {m}"))?;
        s.sibs.push(Sibling { key: intern(key), type_url, ts, incarnation, counter, value: value.into() });
        Ok(())
    };
    for &(key, url, value) in &e.components {
        let v = e.version(key).ok_or_else(|| format!("component '{key}' has no version (not a replica state; use put)"))?;
        push(key, url, value, v)?;
    }
    if let Some(v) = e.version(META_KEY) {
        let meta = Meta { etype: e.etype, expiry: e.expiry_time, created_at: e.created_at };
        push(META_KEY, META_URL, &meta.to_bytes(), v)?;
    }
    for (key, url, value, v) in &e.siblings {
        push(key, url, value, v)?;
    }
    let mut ctx = Vec::with_capacity(e.context.len() + s.sibs.len() + 1);
    for d in &e.context {
        let d = dot_of(d).map_err(|m| format!("context: {m}"))?;
        ctx.push((d.node, d.incarnation, d.counter));
    }
    if let Some(v) = &e.deleted_version {
        let (ts, incarnation, counter) = stamped_dot(v).map_err(|m| format!("deleted_version: {m}"))?;
        s.deleted = Some(DeleteRecord { ts, incarnation, counter });
    }
    ctx.extend(s.sibs.iter().map(|x| (x.ts.node, x.incarnation, x.counter)));
    ctx.extend(s.deleted.map(|d| (d.ts.node, d.incarnation, d.counter)));
    s.ctx = VersionVector::from_entries(ctx);
    if s.ctx.is_empty() {
        return Err("replica state names no write (no versioned value, delete or context)".into());
    }
    s.sibs.sort_by(Sibling::cmp_slot);
    s.sibs.dedup_by(|later, first| later.key == first.key && later.dot() == first.dot());
    s.apply_delete();
    s.refresh(reg);
    s.source = match source {
        Some(node) => node,
        None => s.max_stamp().map(|t| t.node).unwrap_or_else(|| intern("")),
    };
    Ok(s)
}

// ---- to wire -----------------------------------------------------------------------

/// Which view of a state to write.
#[derive(Clone, Copy)]
pub struct View<'a> {
    /// The replica view: every sibling, the delete and the context.
    pub full: bool,
    /// Only these component keys (None: all).
    pub projection: Option<&'a [Sym]>,
}

impl View<'_> {
    pub const USER: View<'static> = View { full: false, projection: None };
    pub const REPLICA: View<'static> = View { full: true, projection: None };
}

fn ts_len(t: Timestamp) -> usize {
    varint_field_len(1, t.physical) + varint_field_len(2, t.logical as u64) + bytes_field_len(3, t.node.as_str().as_bytes())
}

fn put_ts(out: &mut Vec<u8>, t: Timestamp) {
    put_varint_field(out, 1, t.physical);
    put_varint_field(out, 2, t.logical as u64);
    put_bytes_field(out, 3, t.node.as_str().as_bytes());
}

fn dot_len(d: &Dot) -> usize {
    bytes_field_len(1, d.node.as_str().as_bytes()) + fixed64_field_len(2, d.incarnation) + varint_field_len(3, d.counter)
}

fn put_dot(out: &mut Vec<u8>, tag: u32, d: &Dot) {
    put_len_prefix(out, tag, dot_len(d));
    put_bytes_field(out, 1, d.node.as_str().as_bytes());
    put_fixed64_field(out, 2, d.incarnation);
    put_varint_field(out, 3, d.counter);
}

/// A Version: stamp, dot and the dots of the key's other siblings.
struct VersionOut<'a> {
    ts: Timestamp,
    incarnation: u64,
    counter: u64,
    concurrent: &'a [Dot],
}

impl VersionOut<'_> {
    fn len(&self) -> usize {
        ts_len(self.ts)
            + fixed64_field_len(6, self.incarnation)
            + varint_field_len(7, self.counter)
            + self.concurrent.iter().map(|d| len_field_len(8, dot_len(d))).sum::<usize>()
    }

    fn put(&self, out: &mut Vec<u8>) {
        put_ts(out, self.ts);
        put_fixed64_field(out, 6, self.incarnation);
        put_varint_field(out, 7, self.counter);
        for d in self.concurrent {
            put_dot(out, 8, d);
        }
    }
}

fn version_out<'a>(s: &Sibling, concurrent: &'a [Dot]) -> VersionOut<'a> {
    VersionOut { ts: s.ts, incarnation: s.incarnation, counter: s.counter, concurrent }
}

fn wall_len(t: WallTime) -> usize {
    varint_field_len(1, t.0 as u64) + varint_field_len(2, t.1 as u64)
}

fn put_wall(out: &mut Vec<u8>, tag: u32, t: WallTime) {
    put_len_prefix(out, tag, wall_len(t));
    put_varint_field(out, 1, t.0 as u64);
    put_varint_field(out, 2, t.1 as u64);
}

fn any_len(s: &Sibling) -> usize {
    bytes_field_len(1, s.type_url.as_str().as_bytes()) + bytes_field_len(2, &s.value)
}

fn put_any(out: &mut Vec<u8>, tag: u32, s: &Sibling) {
    put_len_prefix(out, tag, any_len(s));
    put_bytes_field(out, 1, s.type_url.as_str().as_bytes());
    put_bytes_field(out, 2, &s.value);
}

fn entry_len(key: &str, value_len: usize) -> usize {
    bytes_field_len(1, key.as_bytes()) + len_field_len(2, value_len)
}

fn put_version_entry(out: &mut Vec<u8>, key: &str, v: &VersionOut) {
    let len = v.len();
    put_len_prefix(out, 9, entry_len(key, len));
    put_bytes_field(out, 1, key.as_bytes());
    put_len_prefix(out, 2, len);
    v.put(out);
}

impl EntityState {
    /// Writes the state as `entity.v1.Entity` bytes: the chosen value of each key in
    /// `components`/`versions`, and in the replica view the other siblings, the delete
    /// and the context.
    pub fn encode(&self, view: View, reg: &Registry, out: &mut Vec<u8>) {
        let shown = |key: Sym| view.projection.is_none_or(|p| p.contains(&key));
        // (winner, the run) of each shown key; the type/expiry register apart.
        let mut chosen: Vec<(&Sibling, &[Sibling])> = Vec::with_capacity(self.sibs.len());
        let mut meta: Option<(&Sibling, &[Sibling])> = None;
        for run in self.runs() {
            let w = Self::winner(run, reg);
            if w.is_meta() {
                meta = Some((w, run));
            } else if shown(w.key) {
                chosen.push((w, run));
            }
        }
        let latest = if self.is_alive() { self.latest_value_stamp() } else { self.max_stamp() };
        put_bytes_field(out, 1, self.id.as_bytes());
        put_varint_field(out, 2, if view.full { self.etype } else { self.shown_type() } as u64);
        for (w, _) in &chosen {
            let key = w.key.as_str();
            put_len_prefix(out, 3, entry_len(key, any_len(w)));
            put_bytes_field(out, 1, key.as_bytes());
            put_any(out, 2, w);
        }
        if let Some(t) = self.created_at {
            put_wall(out, 4, t);
        }
        if let Some(t) = latest {
            put_wall(out, 5, wall_time_of(t.physical));
            put_varint_field(out, 6, t.physical);
            put_varint_field(out, 7, t.logical as u64);
            put_bytes_field(out, 8, t.node.as_str().as_bytes());
        }
        let mut others: Vec<Dot> = Vec::new();
        for (w, run) in chosen.iter().chain(meta.as_ref()) {
            others.clear();
            if !view.full && run.len() > 1 {
                others.extend(run.iter().filter(|s| s.dot() != w.dot()).map(Sibling::dot));
            }
            put_version_entry(out, w.key.as_str(), &version_out(w, &others));
        }
        if let Some(t) = self.expiry {
            put_wall(out, 10, t);
        }
        if let Some(t) = latest {
            put_bytes_field(out, 11, t.node.as_str().as_bytes());
        }
        if !view.full {
            return;
        }
        if let Some(d) = self.deleted {
            let v = VersionOut { ts: d.ts, incarnation: d.incarnation, counter: d.counter, concurrent: &[] };
            put_len_prefix(out, 12, v.len());
            v.put(out);
        }
        for (w, run) in chosen.iter().chain(meta.as_ref()) {
            for s in run.iter().filter(|s| s.dot() != w.dot()) {
                let key = s.key.as_str();
                let v = version_out(s, &[]);
                let len = bytes_field_len(1, key.as_bytes()) + len_field_len(2, any_len(s)) + len_field_len(3, v.len());
                put_len_prefix(out, 13, len);
                put_bytes_field(out, 1, key.as_bytes());
                put_any(out, 2, s);
                put_len_prefix(out, 3, v.len());
                v.put(out);
            }
        }
        for &(node, incarnation, counter) in self.ctx.entries() {
            put_dot(out, 14, &Dot { node, incarnation, counter });
        }
    }

    pub fn to_bytes(&self, view: View, reg: &Registry) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.replica_bytes() * 2);
        self.encode(view, reg, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use prost::Message;

    fn ts(p: u64, node: &str) -> Timestamp {
        Timestamp { physical: p, logical: 0, node: intern(node) }
    }

    fn sib(key: &str, value: &[u8], t: Timestamp, counter: u64) -> Sibling {
        Sibling { key: intern(key), type_url: intern("x/Y"), ts: t, incarnation: 1, counter, value: value.into() }
    }

    fn state(sibs: Vec<Sibling>) -> EntityState {
        let mut s = EntityState::new(Arc::from("e"), intern("a"));
        s.ctx = VersionVector::from_entries(sibs.iter().map(|x| (x.ts.node, x.incarnation, x.counter)).collect());
        s.sibs = sibs;
        s.sibs.sort_by(Sibling::cmp_slot);
        s
    }

    #[test]
    fn replica_bytes_round_trip_through_prost_and_back() {
        let reg = Registry::default();
        let mut s = state(vec![
            sib("k", &[8, 1], ts(5, "a"), 1),
            sib("k", &[8, 2], ts(6, "b"), 1),
            sib("z", &[8, 3], ts(7, "a"), 2),
            Sibling {
                type_url: meta_url(),
                ..sib(META_KEY, &Meta { etype: 2, expiry: Some((99, 0)), created_at: Some((4, 7)) }.to_bytes(), ts(4, "a"), 3)
            },
        ]);
        s.deleted = Some(DeleteRecord { ts: ts(3, "c"), incarnation: 9, counter: 1 });
        s.ctx.add(&Dot { node: intern("c"), incarnation: 9, counter: 1 });
        s.refresh(&reg);
        assert_eq!((s.etype, s.expiry), (2, Some((99, 0))));
        let bytes = s.to_bytes(View::REPLICA, &reg);
        let e = pb::Entity::decode(bytes.as_slice()).unwrap();
        assert_eq!((e.id.as_str(), e.r#type), ("e", 2));
        assert_eq!(e.components["k"].value, vec![8, 2], "the later stamp is shown (lww)");
        assert_eq!(e.siblings.len(), 1);
        assert_eq!(e.siblings[0].value.as_ref().unwrap().value, vec![8, 1]);
        assert_eq!(e.context.len(), 3);
        assert_eq!(e.versions[META_KEY].counter, 3);
        assert_eq!(e.deleted_version.as_ref().unwrap().node, "c");
        let back = state_from_replica(&crate::decode::decode_entity(&bytes).unwrap(), &reg, None).unwrap();
        assert_eq!((back.sibs.clone(), back.ctx.clone(), back.deleted), (s.sibs.clone(), s.ctx.clone(), s.deleted));
        assert_eq!((back.created_at, back.etype, back.expiry), (s.created_at, s.etype, s.expiry));
    }

    #[test]
    fn the_user_view_names_the_concurrent_siblings_in_the_version() {
        let reg = Registry::default();
        let s = state(vec![sib("k", &[8, 1], ts(5, "a"), 1), sib("k", &[8, 2], ts(6, "b"), 1)]);
        let e = pb::Entity::decode(s.to_bytes(View::USER, &reg).as_slice()).unwrap();
        assert!(e.siblings.is_empty() && e.context.is_empty());
        let v = &e.versions["k"];
        assert_eq!((v.node.as_str(), v.counter), ("b", 1));
        assert_eq!(v.concurrent.len(), 1);
        assert_eq!(v.concurrent[0].node, "a");
    }

    #[test]
    fn join_keeps_unseen_siblings_and_drops_seen_ones() {
        let empty = VersionVector::new();
        let a = state(vec![sib("k", &[8, 1], ts(5, "a"), 1)]);
        // b saw a's write and replaced it
        let mut b = state(vec![sib("k", &[8, 2], ts(6, "b"), 1)]);
        b.ctx.join(&a.ctx);
        let mut a2 = a.clone();
        let flags = |j: Joined| (j.changed, j.other_lacks);
        assert_eq!(flags(a2.join(&b, &empty)), (true, false));
        assert_eq!(a2.sibs, b.sibs);
        assert_eq!(flags(a2.join(&b, &empty)), (false, false), "idempotent");
        // c wrote concurrently: both survive
        let c = state(vec![sib("k", &[8, 3], ts(4, "c"), 1)]);
        let mut bc = b.clone();
        assert_eq!(flags(bc.join(&c, &empty)), (true, true));
        assert_eq!(bc.sibs.len(), 2);
    }

    #[test]
    fn a_delete_removes_older_concurrent_siblings_and_spares_newer_ones() {
        let empty = VersionVector::new();
        let mut d = state(vec![]);
        d.deleted = Some(DeleteRecord { ts: ts(10, "d"), incarnation: 1, counter: 1 });
        d.ctx.add(&d.deleted.unwrap().dot());
        let mut older = state(vec![sib("k", &[8, 1], ts(9, "a"), 1)]);
        older.join(&d, &empty);
        assert!(!older.is_alive());
        let mut newer = state(vec![sib("k", &[8, 1], ts(11, "a"), 1)]);
        newer.join(&d, &empty);
        assert!(newer.is_alive());
    }

    #[test]
    fn a_forgotten_entity_refuses_what_the_store_has_seen() {
        let seen = VersionVector::from_entries(vec![(intern("a"), 1, 10)]);
        let old = state(vec![sib("k", &[8, 1], ts(5, "a"), 3)]);
        let mut forgotten = EntityState::new(Arc::from("e"), intern("x"));
        let j = forgotten.join(&old, &seen);
        assert_eq!((j.changed, j.other_lacks, j.removed_by_summary), (true, true, true), "the context is news, the sibling is not");
        assert!(!forgotten.is_alive());
    }
}
