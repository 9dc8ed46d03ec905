//! The state of one entity: an LWW-element-map of cells (one per component key), a
//! presence register (the highest version of any write), a tombstone, and a metadata
//! register (type, expiry). Joining two states is a per-part max, so it is a CRDT join.
//! Also the conversions between that state and `entity.v1.Entity` wire bytes.
use crate::hlc::Timestamp;
use crate::intern::{intern, Sym};
use crate::decode::{RawEntity, RawVersion};
use crate::strategy::Registry;
use crate::wire::*;
use std::cmp::Ordering;
use std::sync::Arc;

/// The `versions` key that carries the metadata register's version on the wire.
pub const META_KEY: &str = "@entity";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub ts: Timestamp,
    /// Causal depth, used by `max` strategies only (0 elsewhere).
    pub epoch: u32,
    /// The entity tombstone this write was made over.
    pub after_delete: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub key: Sym,
    pub type_url: Sym,
    pub version: Version,
    /// Shared, so snapshots of a state (results, events) cost no copy of the values.
    pub value: Arc<[u8]>,
}

impl Cell {
    /// The total order every merge strategy is (see `strategy`).
    pub fn cmp_merge(&self, other: &Cell, reg: &Registry) -> Ordering {
        let (a, b) = (&self.version, &other.version);
        if a == b && self.type_url == other.type_url && Arc::ptr_eq(&self.value, &other.value) {
            return Ordering::Equal; // the same cell (a snapshot or a re-delivery)
        }
        let (ra, rb) = (reg.order_of(self.type_url, &self.value), reg.order_of(other.type_url, &other.value));
        a.after_delete
            .cmp(&b.after_delete)
            .then(a.epoch.cmp(&b.epoch))
            .then(ra.rank.cmp(&rb.rank))
            .then_with(|| a.ts.cmp(&b.ts))
            .then(ra.tiebreak.cmp(&rb.tiebreak))
            .then_with(|| self.type_url.as_str().cmp(other.type_url.as_str()))
            .then_with(|| self.value.cmp(&other.value))
    }

    /// What the cell counts for in size limits.
    pub fn bytes(&self) -> usize {
        cell_bytes(self.key, self.type_url, self.value.len())
    }

    /// Alive unless written at or before the tombstone.
    pub fn is_live(&self, tombstone: Option<Timestamp>) -> bool {
        tombstone.is_none_or(|t| self.version.ts > t)
    }
}

/// Approximate bytes of one cell in memory and on the wire: value, key, type URL and version.
pub fn cell_bytes(key: Sym, type_url: Sym, value_len: usize) -> usize {
    value_len + key.as_str().len() + type_url.as_str().len() + 48
}

/// A protobuf Timestamp (seconds, nanos).
pub type WallTime = (i64, i32);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityState {
    pub id: Arc<str>,
    pub etype: i32,
    pub expiry: Option<WallTime>,
    /// Version of the metadata register (type, expiry).
    pub meta_version: Option<Timestamp>,
    pub presence: Option<Timestamp>,
    pub tombstone: Option<Timestamp>,
    pub created_at: Option<WallTime>,
    /// Sorted by key string, one cell per key.
    pub cells: Vec<Cell>,
    /// The table's change sequence of this entity's latest change.
    pub seq: u64,
    /// Node the latest change came from (echo suppression).
    pub source: Sym,
}

pub fn wall_time_of(ns: u64) -> WallTime {
    ((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as i32)
}

impl EntityState {
    pub fn new(id: Arc<str>, source: Sym) -> Self {
        EntityState {
            id,
            etype: 0,
            expiry: None,
            meta_version: None,
            presence: None,
            tombstone: None,
            created_at: None,
            cells: Vec::new(),
            seq: 0,
            source,
        }
    }

    pub fn is_alive(&self) -> bool {
        match (self.presence, self.tombstone) {
            (Some(p), Some(t)) => p > t,
            (Some(_), None) => true,
            _ => false,
        }
    }

    pub fn cell(&self, key: Sym) -> Option<&Cell> {
        self.cells.iter().find(|c| c.key == key)
    }

    pub fn live_cell(&self, key: Sym) -> Option<&Cell> {
        self.cell(key).filter(|c| c.is_live(self.tombstone))
    }

    /// Inserts or replaces the cell for its key, keeping cells sorted by key.
    pub fn set_cell(&mut self, cell: Cell) {
        match self.cells.binary_search_by(|c| c.key.as_str().cmp(cell.key.as_str())) {
            Ok(i) => self.cells[i] = cell,
            Err(i) => self.cells.insert(i, cell),
        }
    }

    /// Every timestamp in this state (to advance the clock past a merged state).
    pub fn max_timestamp(&self) -> Option<Timestamp> {
        let cells = self.cells.iter().flat_map(|c| [Some(c.version.ts), c.version.after_delete]);
        cells.chain([self.presence, self.tombstone, self.meta_version]).flatten().max()
    }

    /// Joins `other` into `self`. Returns (changed, other_lacks): whether `self` changed,
    /// and whether `self` now holds something `other` did not (so `other` still needs it).
    pub fn join(&mut self, other: &EntityState, reg: &Registry) -> (bool, bool) {
        let mut changed = false;
        let mut other_lacks = false;
        let mut max_reg = |mine: &mut Option<Timestamp>, theirs: Option<Timestamp>| match (*mine).cmp(&theirs) {
            Ordering::Less => {
                *mine = theirs;
                changed = true;
            }
            Ordering::Greater => other_lacks = true,
            Ordering::Equal => {}
        };
        max_reg(&mut self.presence, other.presence);
        max_reg(&mut self.tombstone, other.tombstone);
        match self.meta_version.cmp(&other.meta_version) {
            Ordering::Less => {
                self.meta_version = other.meta_version;
                self.etype = other.etype;
                self.expiry = other.expiry;
                changed = true;
            }
            Ordering::Greater => other_lacks = true,
            Ordering::Equal => {}
        }
        match (self.created_at, other.created_at) {
            (Some(a), Some(b)) if b < a => {
                self.created_at = Some(b);
                changed = true;
            }
            (None, Some(b)) => {
                self.created_at = Some(b);
                changed = true;
            }
            (Some(a), b) if b.is_none_or(|b| a < b) => other_lacks = true,
            _ => {}
        }
        for theirs in &other.cells {
            match self.cells.iter().position(|c| c.key == theirs.key) {
                Some(i) => match self.cells[i].cmp_merge(theirs, reg) {
                    Ordering::Less => {
                        self.cells[i] = theirs.clone();
                        changed = true;
                    }
                    Ordering::Greater => other_lacks = true,
                    Ordering::Equal => {}
                },
                None => {
                    self.set_cell(theirs.clone());
                    changed = true;
                }
            }
        }
        // After the loop self holds every key of other, so more cells means a key other lacks.
        if self.cells.len() > other.cells.len() {
            other_lacks = true;
        }
        (changed, other_lacks)
    }

    /// Approximate bytes held in memory and on the wire: what size limits count.
    pub fn payload_bytes(&self) -> usize {
        self.id.len() + self.cells.iter().map(Cell::bytes).sum::<usize>()
    }
}

// ---- from wire ---------------------------------------------------------------------

fn timestamp_of(physical: u64, logical: u32, node: &str) -> Result<Timestamp, String> {
    if node.is_empty() {
        return Err("version has an empty node".into());
    }
    Ok(Timestamp { physical, logical, node: intern(node) })
}

pub fn version_of(v: &RawVersion) -> Result<Version, String> {
    Ok(Version {
        ts: timestamp_of(v.physical, v.logical, v.node)?,
        epoch: v.epoch,
        after_delete: v.after_delete.map(|(p, l, n)| timestamp_of(p, l, n)).transpose()?,
    })
}

/// The entity-level HLC fields (6-8) as a timestamp, if the sender set them.
pub fn entity_hlc(e: &RawEntity) -> Option<Timestamp> {
    let (physical, logical, node) = e.hlc;
    (!node.is_empty()).then(|| Timestamp { physical, logical, node: intern(node) })
}

/// A replica's full state, as `changes_since` and the relay carry it, received from
/// `source` (None: the node of its latest change).
pub fn state_from_replica(e: &RawEntity, reg: &Registry, source: Option<Sym>) -> Result<EntityState, String> {
    let mut s = EntityState::new(Arc::from(e.id), intern(""));
    s.etype = e.etype;
    s.presence = entity_hlc(e);
    s.tombstone = e.deleted_version.map(|v| timestamp_of(v.physical, v.logical, v.node)).transpose()?;
    s.created_at = e.created_at;
    s.expiry = e.expiry_time;
    s.meta_version = match e.version(META_KEY) {
        Some(v) => Some(timestamp_of(v.physical, v.logical, v.node)?),
        None => s.presence,
    };
    s.cells.reserve_exact(e.components.len());
    for &(key, url, value) in &e.components {
        let v = e.version(key).ok_or_else(|| format!("component '{key}' has no version"))?;
        let type_url = intern(url);
        reg.rank(type_url, value).map_err(|m| format!("component '{key}' ({url}): {m}"))?;
        // Components arrive sorted by key, the order cells keep.
        s.cells.push(Cell { key: intern(key), type_url, version: version_of(v)?, value: value.into() });
    }
    let latest = s.presence.max(s.tombstone).ok_or("replica state has neither a version (hlc fields) nor a tombstone")?;
    s.source = source.unwrap_or(latest.node);
    Ok(s)
}

// ---- to wire -----------------------------------------------------------------------

/// Which view of a state to write.
#[derive(Clone, Copy)]
pub struct View<'a> {
    /// The replica view: every cell (dead ones too) and the tombstone.
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

fn version_len(v: &Version) -> usize {
    ts_len(v.ts) + varint_field_len(4, v.epoch as u64) + v.after_delete.map_or(0, |a| len_field_len(5, ts_len(a)))
}

fn put_version(out: &mut Vec<u8>, v: &Version) {
    put_ts(out, v.ts);
    put_varint_field(out, 4, v.epoch as u64);
    if let Some(a) = v.after_delete {
        put_len_prefix(out, 5, ts_len(a));
        put_ts(out, a);
    }
}

fn wall_len(t: WallTime) -> usize {
    varint_field_len(1, t.0 as u64) + varint_field_len(2, t.1 as u64)
}

fn put_wall(out: &mut Vec<u8>, tag: u32, t: WallTime) {
    put_len_prefix(out, tag, wall_len(t));
    put_varint_field(out, 1, t.0 as u64);
    put_varint_field(out, 2, t.1 as u64);
}

fn any_len(c: &Cell) -> usize {
    bytes_field_len(1, c.type_url.as_str().as_bytes()) + bytes_field_len(2, &c.value)
}

fn entry_len(key: &str, value_len: usize) -> usize {
    bytes_field_len(1, key.as_bytes()) + len_field_len(2, value_len)
}

impl EntityState {
    fn shown_cells<'a>(&'a self, view: View<'a>) -> impl Iterator<Item = &'a Cell> + 'a {
        self.cells.iter().filter(move |c| {
            (view.full || c.is_live(self.tombstone)) && view.projection.is_none_or(|p| p.contains(&c.key))
        })
    }

    fn meta_version_shown(&self) -> Option<Version> {
        self.meta_version.map(|ts| Version { ts, epoch: 0, after_delete: None })
    }

    /// Writes the state as `entity.v1.Entity` bytes.
    pub fn encode(&self, view: View, out: &mut Vec<u8>) {
        let tombstone = if view.full || !self.is_alive() { self.tombstone } else { None };
        let updated = self.presence.map(|p| wall_time_of(p.physical));
        let meta = self.meta_version_shown();
        put_bytes_field(out, 1, self.id.as_bytes());
        put_varint_field(out, 2, self.etype as u64);
        for c in self.shown_cells(view) {
            let key = c.key.as_str();
            put_len_prefix(out, 3, entry_len(key, any_len(c)));
            put_bytes_field(out, 1, key.as_bytes());
            put_len_prefix(out, 2, any_len(c));
            put_bytes_field(out, 1, c.type_url.as_str().as_bytes());
            put_bytes_field(out, 2, &c.value);
        }
        if let Some(t) = self.created_at {
            put_wall(out, 4, t);
        }
        if let Some(t) = updated {
            put_wall(out, 5, t);
        }
        if let Some(p) = self.presence {
            put_ts_fields_6_7_8(out, p);
        }
        for c in self.shown_cells(view) {
            let key = c.key.as_str();
            put_len_prefix(out, 9, entry_len(key, version_len(&c.version)));
            put_bytes_field(out, 1, key.as_bytes());
            put_len_prefix(out, 2, version_len(&c.version));
            put_version(out, &c.version);
        }
        if let Some(m) = meta {
            put_len_prefix(out, 9, entry_len(META_KEY, version_len(&m)));
            put_bytes_field(out, 1, META_KEY.as_bytes());
            put_len_prefix(out, 2, version_len(&m));
            put_version(out, &m);
        }
        if let Some(t) = self.expiry {
            put_wall(out, 10, t);
        }
        if let Some(p) = self.presence {
            put_bytes_field(out, 11, p.node.as_str().as_bytes());
        }
        if let Some(t) = tombstone {
            put_len_prefix(out, 12, ts_len(t));
            put_ts(out, t);
        }
    }

    pub fn to_bytes(&self, view: View) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.payload_bytes() * 2);
        self.encode(view, &mut out);
        out
    }
}

fn put_ts_fields_6_7_8(out: &mut Vec<u8>, p: Timestamp) {
    put_varint_field(out, 6, p.physical);
    put_varint_field(out, 7, p.logical as u64);
    put_bytes_field(out, 8, p.node.as_str().as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use prost::Message;

    fn ts(p: u64, node: &str) -> Timestamp {
        Timestamp { physical: p, logical: 0, node: intern(node) }
    }

    fn cell(key: &str, url: &str, value: &[u8], t: Timestamp, epoch: u32) -> Cell {
        Cell { key: intern(key), type_url: intern(url), version: Version { ts: t, epoch, after_delete: None }, value: value.into() }
    }

    #[test]
    fn encode_round_trips_through_prost() {
        let mut s = EntityState::new(Arc::from("t1"), intern("a"));
        s.etype = 2;
        s.presence = Some(ts(5_000_000_123, "a"));
        s.meta_version = s.presence;
        s.created_at = Some((4, 7));
        s.expiry = Some((99, 0));
        s.set_cell(cell("position", "type.googleapis.com/entity.v1.PositionComponent", &[0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f], ts(5, "a"), 0));
        let mut c = cell("threat", "type.googleapis.com/entity.v1.ThreatComponent", &[0x08, 4], ts(6, "b"), 3);
        c.version.after_delete = Some(ts(2, "c"));
        s.set_cell(c);
        s.tombstone = Some(ts(2, "c"));
        let e = pb::Entity::decode(s.to_bytes(View::REPLICA).as_slice()).unwrap();
        assert_eq!(e.id, "t1");
        assert_eq!(e.r#type, 2);
        assert_eq!(e.components.len(), 2);
        assert_eq!(e.versions["threat"].epoch, 3);
        assert_eq!(e.versions["threat"].after_delete.as_ref().unwrap().node, "c");
        assert_eq!((e.hlc_physical, e.hlc_node.as_str()), (5_000_000_123, "a"));
        assert_eq!(e.updated_at.unwrap().nanos, 123);
        assert_eq!(e.deleted_version.as_ref().unwrap().physical, 2);
        let bytes = e.encode_to_vec();
        let back = state_from_replica(&crate::decode::decode_entity(&bytes).unwrap(), &Registry::default(), None).unwrap();
        assert_eq!(back.cells, s.cells);
        assert_eq!((back.presence, back.tombstone, back.meta_version), (s.presence, s.tombstone, s.meta_version));
        assert_eq!((back.created_at, back.expiry, back.etype), (s.created_at, s.expiry, s.etype));
    }

    #[test]
    fn user_view_hides_dead_cells_and_projects() {
        let mut s = EntityState::new(Arc::from("t1"), intern("a"));
        s.presence = Some(ts(10, "a"));
        s.tombstone = Some(ts(5, "a"));
        s.set_cell(cell("old", "x/Y", &[0x08, 1], ts(4, "a"), 0));
        s.set_cell(cell("new", "x/Y", &[0x08, 2], ts(10, "a"), 0));
        s.set_cell(cell("other", "x/Y", &[0x08, 3], ts(9, "a"), 0));
        let user = pb::Entity::decode(s.to_bytes(View::USER).as_slice()).unwrap();
        assert_eq!(user.components.keys().collect::<Vec<_>>(), ["new", "other"]);
        assert!(user.deleted_version.is_none());
        let keys = [intern("new")];
        let projected = s.to_bytes(View { full: false, projection: Some(&keys) });
        let p = pb::Entity::decode(projected.as_slice()).unwrap();
        assert_eq!(p.components.keys().collect::<Vec<_>>(), ["new"]);
    }

    #[test]
    fn join_reports_what_each_side_lacks() {
        let reg = Registry::default();
        let mut a = EntityState::new(Arc::from("e"), intern("a"));
        a.presence = Some(ts(1, "a"));
        a.set_cell(cell("k1", "x/Y", &[8, 1], ts(1, "a"), 0));
        let mut b = a.clone();
        b.presence = Some(ts(2, "b"));
        b.set_cell(cell("k2", "x/Y", &[8, 2], ts(2, "b"), 0));
        let mut a2 = a.clone();
        assert_eq!(a2.join(&b, &reg), (true, false), "b dominates a");
        assert_eq!(a2.join(&b, &reg), (false, false), "idempotent");
        let mut b2 = b.clone();
        assert_eq!(b2.join(&a, &reg), (false, true), "b already has a; a lacks k2");
    }
}
