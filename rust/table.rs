//! The entity table: local writes (per-key stale check), replication merges (with the
//! quarantine for versions from the future), deletes and tombstone collection, the
//! change log behind `changes_since` and watcher resume, and event fan-out.
//!
//! A local write is split in two so a batch is all-or-nothing: `prepare` decodes and
//! checks everything that does not depend on the stored state, `commit` applies and can
//! only fail before it changes anything.
use crate::entity::*;
use crate::error::{Error, Result};
use crate::hlc::{Clock, Timestamp, WallClock};
use crate::intern::{intern, Sym};
use crate::decode::{decode_entity, RawEntity};
use crate::strategy::Registry;
use crate::watch::{Event, EventKind, Watch, WatchSpec};
use ahash::{AHashMap, AHashSet};
use std::collections::BTreeMap;
use std::sync::Arc;

pub struct Options {
    pub node_id: String,
    pub max_clock_offset_ns: u64,
    pub tombstone_ttl_ns: u64,
    pub max_entity_bytes: usize,
    pub max_id_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            node_id: "node".into(),
            max_clock_offset_ns: 500_000_000,
            tombstone_ttl_ns: 3_600_000_000_000,
            max_entity_bytes: 1 << 20,
            max_id_bytes: 1024,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WriteMode {
    Create,
    Update,
    Put,
}

/// A checked local write, not yet applied.
pub struct Prepared {
    id: Arc<str>,
    etype: i32,
    /// Some(None) clears the expiry; None leaves it.
    expiry: Option<Option<WallTime>>,
    cells: Vec<NewCell>,
}

struct NewCell {
    key: Sym,
    type_url: Sym,
    value: Arc<[u8]>,
    /// The version the writer based this key on; None for a blind write.
    base: Option<Timestamp>,
}

impl NewCell {
    fn bytes(&self) -> usize {
        cell_bytes(self.key, self.type_url, self.value.len())
    }
}

#[derive(Debug)]
pub struct WriteOutcome {
    pub id: Arc<str>,
    /// The entity after the write (encoded only if asked: `entity_bytes`).
    pub snapshot: Arc<EntityState>,
    pub applied: Vec<Sym>,
    pub stale: Vec<Sym>,
    pub unchanged: Vec<Sym>,
    /// The write created (or resurrected) the entity.
    pub created: bool,
}

impl WriteOutcome {
    /// The entity after the write (user view), as `entity.v1.Entity` bytes.
    pub fn entity_bytes(&self) -> Vec<u8> {
        self.snapshot.to_bytes(View::USER)
    }
}

#[derive(Default, Debug, Clone)]
pub struct Counters {
    pub writes: u64,
    pub stale_keys: u64,
    pub rejected: u64,
    pub merges: u64,
    pub merges_changed: u64,
    pub quarantined: u64,
    pub released: u64,
    pub collected: u64,
    pub expired: u64,
}

pub struct Table {
    clock: Clock,
    pub registry: Registry,
    opts: Options,
    entities: AHashMap<Arc<str>, EntityState>,
    /// seq -> entity whose latest change has that seq.
    log: BTreeMap<u64, Arc<str>>,
    seq: u64,
    /// Seq of the newest collected tombstone: cursors before it cannot resume.
    floor: u64,
    tombstoned: AHashSet<Arc<str>>,
    quarantine: AHashMap<Arc<str>, EntityState>,
    watchers: Vec<Arc<Watch>>,
    next_watch_id: u64,
    /// Watchers whose async consumer must be woken (drained by the caller).
    pub wake: Vec<u64>,
    /// Entities whose expiry changed: (id, new expiry or None), drained by the caller.
    pub expiry_changes: Vec<(Arc<str>, Option<WallTime>)>,
    pub counters: Counters,
}

impl Table {
    pub fn new(opts: Options, wall: WallClock) -> Self {
        let node = intern(&opts.node_id);
        Table {
            clock: Clock::new(node, opts.max_clock_offset_ns, wall),
            registry: Registry::default(),
            opts,
            entities: AHashMap::new(),
            log: BTreeMap::new(),
            seq: 0,
            floor: 0,
            tombstoned: AHashSet::new(),
            quarantine: AHashMap::new(),
            watchers: Vec::new(),
            next_watch_id: 1,
            wake: Vec::new(),
            expiry_changes: Vec::new(),
            counters: Counters::default(),
        }
    }

    pub fn node(&self) -> Sym {
        self.clock.node()
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn clock(&mut self) -> &mut Clock {
        &mut self.clock
    }

    // ---- local writes ----------------------------------------------------------------

    fn invalid<T>(&mut self, id: Option<&str>, key: Option<&str>, msg: String) -> Result<T> {
        self.counters.rejected += 1;
        Err(Error::invalid(id, key, msg))
    }

    /// Decodes and checks a write against everything but the stored state.
    pub fn prepare(&mut self, bytes: &[u8]) -> Result<Prepared> {
        if bytes.len() > self.opts.max_entity_bytes {
            return self.invalid(None, None, format!(
                "entity is {} bytes, over the limit of {} bytes",
                bytes.len(),
                self.opts.max_entity_bytes
            ));
        }
        let e = match decode_entity(bytes) {
            Ok(e) => e,
            Err(err) => return self.invalid(None, None, format!("malformed entity bytes: {err}")),
        };
        self.check_identity(&e)?;
        let id = e.id;
        let fallback_base = entity_hlc(&e);
        let mut cells = Vec::with_capacity(e.components.len());
        for &(key, url, value) in &e.components {
            if key.is_empty() || key.starts_with('@') {
                let msg = format!("entity '{id}': component key {key:?} is empty or reserved ('@...')");
                return self.invalid(Some(id), Some(key), msg);
            }
            if url.is_empty() {
                let msg = format!("entity '{id}': component '{key}' has an empty type URL");
                return self.invalid(Some(id), Some(key), msg);
            }
            let type_url = intern(url);
            if let Err(m) = self.registry.rank(type_url, value) {
                let msg = format!("entity '{id}': component '{key}' ({url}): {m}");
                return self.invalid(Some(id), Some(key), msg);
            }
            let base = match e.version(key) {
                Some(v) => match version_of(v) {
                    Ok(v) => Some(v.ts),
                    Err(m) => {
                        let msg = format!("entity '{id}': version of '{key}': {m}");
                        return self.invalid(Some(id), Some(key), msg);
                    }
                },
                None => fallback_base,
            };
            if let Some(b) = base {
                self.check_skew(id, Some(key), || format!("the base version of '{key}'"), b)?;
            }
            cells.push(NewCell { key: intern(key), type_url, value: value.into(), base });
        }
        let expiry = e.expiry_time.map(|t| (t != (0, 0)).then_some(t));
        Ok(Prepared { id: Arc::from(id), etype: e.etype, expiry, cells })
    }

    fn check_identity(&mut self, e: &RawEntity) -> Result<()> {
        if e.id.is_empty() {
            return self.invalid(None, None, "entity id is empty".into());
        }
        if e.id.len() > self.opts.max_id_bytes {
            let msg = format!("entity id is {} bytes, over the limit of {}", e.id.len(), self.opts.max_id_bytes);
            return self.invalid(None, None, msg);
        }
        if !(0..=3).contains(&e.etype) {
            return self.invalid(Some(e.id), None, format!("entity '{}': unknown entity type {}", e.id, e.etype));
        }
        Ok(())
    }

    fn check_skew(&mut self, id: &str, key: Option<&str>, what: impl FnOnce() -> String, t: Timestamp) -> Result<()> {
        self.clock.check_skew(t.physical).map_err(|s| {
            self.counters.rejected += 1;
            Error::ClockSkew {
                id: id.into(),
                key: key.map(str::to_owned),
                what: what(),
                ahead_ms: s.ahead_ns as f64 / 1e6,
                max_ms: s.max_offset_ns as f64 / 1e6,
            }
        })
    }

    /// Applies a prepared write. Fails only before changing anything.
    pub fn commit(&mut self, p: Prepared, mode: WriteMode, strict: bool) -> Result<WriteOutcome> {
        self.release_quarantine();
        let stored = self.entities.get(&p.id);
        let was_alive = stored.is_some_and(EntityState::is_alive);
        match mode {
            WriteMode::Create if was_alive => return Err(Error::AlreadyExists(p.id.to_string())),
            WriteMode::Update if !was_alive => return Err(Error::NotFound(p.id.to_string())),
            _ => {}
        }
        let (mut applied, mut stale, mut unchanged) = (vec![], vec![], vec![]);
        for c in &p.cells {
            match stored.and_then(|s| s.live_cell(c.key)) {
                Some(s) if c.base.is_some_and(|b| s.version.ts > b) => stale.push(c.key),
                Some(s) if s.type_url == c.type_url && *s.value == *c.value => unchanged.push(c.key),
                _ => applied.push(c.key),
            }
        }
        if strict && !stale.is_empty() {
            self.counters.stale_keys += stale.len() as u64;
            return Err(Error::Stale { id: p.id.to_string(), keys: stale.iter().map(|k| k.as_str().to_string()).collect() });
        }
        let type_change = p.etype != 0 && p.etype != stored.map_or(0, |s| s.etype);
        // A write that brings an entity back does not inherit the expiry of its old life.
        let expiry = if was_alive { p.expiry } else { Some(p.expiry.flatten()) };
        let expiry_change = expiry.is_some_and(|x| x != stored.and_then(|s| s.expiry));
        let changed = !applied.is_empty() || type_change || expiry_change || !was_alive;
        if !applied.is_empty() {
            self.check_size(&p.id, &[], &p.cells)?;
        }
        self.counters.writes += 1;
        self.counters.stale_keys += stale.len() as u64;
        if !changed {
            let snapshot = Arc::new(self.entities[&p.id].clone());
            return Ok(WriteOutcome { id: p.id, snapshot, applied, stale, unchanged, created: false });
        }

        let ts = self.clock.now();
        let state = self.entities.entry(p.id.clone()).or_insert_with(|| EntityState::new(p.id.clone(), ts.node));
        let expiry_before = state.is_alive().then_some(state.expiry).flatten();
        for c in p.cells.into_iter().filter(|c| applied.contains(&c.key)) {
            let stored = state.cell(c.key);
            // Epochs count causal depth for max strategies. A key that held a max cell
            // keeps counting whatever its new type, so the new cell outranks the old one.
            let stored_epoch = stored.map_or(0, |s| s.version.epoch);
            let epoch = if self.registry.rule(c.type_url).merge.uses_epoch() || stored_epoch > 0 {
                stored_epoch + 1
            } else {
                0
            };
            // The stored cell may have been written over a tombstone we do not hold yet
            // (quarantined): the new cell must outrank it all the same.
            let after_delete = state.tombstone.max(stored.and_then(|s| s.version.after_delete));
            let version = Version { ts, epoch, after_delete };
            state.set_cell(Cell { key: c.key, type_url: c.type_url, version, value: c.value });
        }
        if type_change || expiry_change || state.meta_version.is_none() {
            if type_change {
                state.etype = p.etype;
            }
            if let Some(x) = expiry {
                state.expiry = x;
            }
            state.meta_version = Some(ts);
        }
        state.presence = Some(ts);
        state.created_at = state.created_at.or(Some(wall_time_of(ts.physical)));
        state.source = ts.node;
        if !was_alive {
            self.tombstoned.remove(&p.id);
        }
        self.note_expiry(&p.id, expiry_before);
        let kind = if was_alive { EventKind::Updated } else { EventKind::Created };
        let snapshot = self.record(&p.id, Some(kind), true).expect("a snapshot was asked for");
        Ok(WriteOutcome { id: p.id, snapshot, applied, stale, unchanged, created: !was_alive })
    }

    pub fn write(&mut self, bytes: &[u8], mode: WriteMode, strict: bool) -> Result<WriteOutcome> {
        let p = self.prepare(bytes)?;
        self.commit(p, mode, strict)
    }

    /// Fails if writing `cells` over the entity's live cells, and over the `earlier`
    /// cells (key, bytes; one per key) of the same batch, would take it past the size limit.
    fn check_size(&mut self, id: &Arc<str>, earlier: &[(Sym, usize)], cells: &[NewCell]) -> Result<()> {
        let written = |key: Sym| cells.iter().any(|c| c.key == key);
        let mut total = id.len() + cells.iter().map(NewCell::bytes).sum::<usize>();
        // Earlier writes of the batch (one entry per key) that this one does not replace.
        total += earlier.iter().filter(|&&(key, _)| !written(key)).map(|&(_, bytes)| bytes).sum::<usize>();
        if let Some(s) = self.entities.get(id) {
            total += s
                .cells
                .iter()
                .filter(|c| c.is_live(s.tombstone) && !written(c.key) && !earlier.iter().any(|&(k, _)| k == c.key))
                .map(Cell::bytes)
                .sum::<usize>();
        }
        if total > self.opts.max_entity_bytes {
            let msg = format!("entity '{id}' would hold {total} bytes, over the limit of {}", self.opts.max_entity_bytes);
            return self.invalid(Some(id), None, msg);
        }
        Ok(())
    }

    /// Upserts a batch: every entity is checked before any is applied.
    pub fn put_many(&mut self, batch: &[&[u8]]) -> Result<Vec<WriteOutcome>> {
        let mut prepared = Vec::with_capacity(batch.len());
        // The cells (key, bytes) earlier items of the batch write to each entity, one per key.
        let mut written: AHashMap<Arc<str>, Vec<(Sym, usize)>> = AHashMap::with_capacity(batch.len());
        for (i, bytes) in batch.iter().enumerate() {
            let item = |e: Error| match e {
                Error::Invalid { msg, id, key } => Error::Invalid { msg: format!("batch item {i}: {msg}"), id, key },
                other => other,
            };
            let p = self.prepare(bytes).map_err(item)?;
            let earlier = written.get(&p.id).map_or(&[][..], Vec::as_slice);
            if !p.cells.is_empty() {
                self.check_size(&p.id, earlier, &p.cells).map_err(item)?;
            }
            let sizes = written.entry(p.id.clone()).or_default();
            for c in &p.cells {
                match sizes.iter_mut().find(|(key, _)| *key == c.key) {
                    Some(size) => size.1 = c.bytes(),
                    None => sizes.push((c.key, c.bytes())),
                }
            }
            prepared.push(p);
        }
        Ok(prepared
            .into_iter()
            .map(|p| self.commit(p, WriteMode::Put, false).expect("a put of a prepared entity cannot fail"))
            .collect())
    }

    pub fn delete(&mut self, id: &str) -> Result<()> {
        self.release_quarantine();
        let Some(state) = self.entities.get_mut(id).filter(|s| s.is_alive()) else {
            return Err(Error::NotFound(id.into()));
        };
        let ts = self.clock.now();
        let expiry_before = state.expiry;
        state.tombstone = Some(ts);
        state.source = ts.node;
        let id = state.id.clone();
        self.tombstoned.insert(id.clone());
        self.note_expiry(&id, expiry_before);
        self.record(&id, Some(EventKind::Deleted), false);
        Ok(())
    }

    /// Deletes the entity if it is alive and its expiry is still `when` (a timer's check).
    pub fn expire(&mut self, id: &str, when: WallTime) -> bool {
        let due = self.entities.get(id).is_some_and(|s| s.is_alive() && s.expiry == Some(when));
        if due && self.delete(id).is_ok() {
            self.counters.expired += 1;
            return true;
        }
        false
    }

    /// Gives a stored entity's latest change the next seq and tells the watchers.
    /// Returns a snapshot of it if `snapshot` is asked for (or None).
    fn record(&mut self, id: &Arc<str>, kind: Option<EventKind>, snapshot: bool) -> Option<Arc<EntityState>> {
        self.seq += 1;
        let state = self.entities.get_mut(id).expect("a recorded entity is stored");
        if state.seq != 0 {
            self.log.remove(&state.seq);
        }
        state.seq = self.seq;
        self.log.insert(self.seq, state.id.clone());
        let emit = kind.filter(|_| !self.watchers.is_empty());
        if !snapshot && emit.is_none() {
            return None;
        }
        let snap = Arc::new(state.clone());
        if let Some(kind) = emit {
            self.emit(&snap, kind);
        }
        Some(snap)
    }

    fn note_expiry(&mut self, id: &Arc<str>, before: Option<WallTime>) {
        let state = &self.entities[id];
        let after = state.is_alive().then_some(state.expiry).flatten();
        if after != before {
            self.expiry_changes.push((id.clone(), after));
        }
    }

    // ---- reads -----------------------------------------------------------------------

    pub fn get(&mut self, id: &str) -> Result<Vec<u8>> {
        self.release_quarantine();
        match self.entities.get(id) {
            Some(s) if s.is_alive() => Ok(s.to_bytes(View::USER)),
            _ => Err(Error::NotFound(id.into())),
        }
    }

    pub fn list(&mut self, type_filter: i32) -> Vec<Vec<u8>> {
        self.release_quarantine();
        let mut alive: Vec<&EntityState> = self
            .entities
            .values()
            .filter(|s| s.is_alive() && (type_filter == 0 || s.etype == type_filter))
            .collect();
        alive.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        alive.into_iter().map(|s| s.to_bytes(View::USER)).collect()
    }

    /// Every entity changed after `seq`, in its current replica state and seq order, up
    /// to `limit` of them, skipping those whose latest change came from `skip_source`.
    /// Returns them with the seq the caller has now seen.
    pub fn changes_since(&mut self, seq: u64, limit: usize, skip_source: Option<Sym>) -> Result<(Vec<Vec<u8>>, u64)> {
        self.release_quarantine();
        if self.cursor_expired(seq) {
            return Err(Error::CursorExpired { seq, floor: self.floor });
        }
        let mut out = Vec::new();
        let mut last = self.seq;
        for (&s, id) in self.log.range(seq + 1..) {
            if out.len() == limit {
                last = s - 1;
                break;
            }
            let state = &self.entities[id];
            if skip_source != Some(state.source) {
                out.push(state.to_bytes(View::REPLICA));
            }
        }
        Ok((out, last))
    }

    /// One entity's replica state (tombstoned ones too), with its change seq.
    pub fn replica_state(&mut self, id: &str) -> Option<(Vec<u8>, u64)> {
        self.release_quarantine();
        self.entities.get(id).map(|s| (s.to_bytes(View::REPLICA), s.seq))
    }

    // ---- replication -----------------------------------------------------------------

    /// Joins a replica's state received from node `source` (empty: the node of its latest
    /// change). Returns true if ours changed.
    pub fn merge(&mut self, bytes: &[u8], source: &str) -> Result<bool> {
        if bytes.len() > self.opts.max_entity_bytes {
            return self.invalid(None, None, format!("replica state is {} bytes, over the limit", bytes.len()));
        }
        let e = match decode_entity(bytes) {
            Ok(e) => e,
            Err(err) => return self.invalid(None, None, format!("malformed entity bytes: {err}")),
        };
        self.check_identity(&e)?;
        let source = (!source.is_empty()).then(|| intern(source));
        let remote = match state_from_replica(&e, &self.registry, source) {
            Ok(s) => s,
            Err(m) => return self.invalid(Some(e.id), None, format!("entity '{}': {m}", e.id)),
        };
        self.counters.merges += 1;
        self.release_quarantine();
        let (now, future) = self.split_future(remote);
        if let Some(future) = future {
            self.counters.quarantined += 1;
            match self.quarantine.get_mut(&future.id) {
                Some(q) => {
                    q.join(&future, &self.registry);
                }
                None => {
                    self.quarantine.insert(future.id.clone(), future);
                }
            }
        }
        Ok(now.is_some_and(|s| self.join_state(s)))
    }

    fn join_state(&mut self, remote: EntityState) -> bool {
        if let Some(t) = remote.max_timestamp() {
            self.clock.update(t).expect("quarantine keeps future versions out of the clock");
        }
        let node = self.node();
        let state = self.entities.entry(remote.id.clone()).or_insert_with(|| EntityState::new(remote.id.clone(), remote.source));
        let (was_alive, expiry_before) = (state.is_alive(), state.is_alive().then_some(state.expiry).flatten());
        let (changed, remote_lacks) = state.join(&remote, &self.registry);
        if !changed {
            if state.presence.is_none() && state.tombstone.is_none() {
                self.entities.remove(&remote.id); // an empty remote state made nothing
            }
            return false;
        }
        self.counters.merges_changed += 1;
        state.source = if remote_lacks { node } else { remote.source };
        let is_alive = state.is_alive();
        let kind = match (was_alive, is_alive) {
            (false, true) => Some(EventKind::Created),
            (true, true) => Some(EventKind::Updated),
            (true, false) => Some(EventKind::Deleted),
            (false, false) => None,
        };
        if is_alive {
            self.tombstoned.remove(&remote.id);
        } else {
            self.tombstoned.insert(remote.id.clone());
        }
        self.note_expiry(&remote.id, expiry_before);
        self.record(&remote.id, kind, false);
        true
    }

    /// Splits off the parts of a remote state stamped beyond the clock offset.
    fn split_future(&self, mut s: EntityState) -> (Option<EntityState>, Option<EntityState>) {
        let limit = self.clock.wall_ns().saturating_add(self.clock.max_offset_ns());
        let ahead = |t: &Option<Timestamp>| t.is_some_and(|t| t.physical > limit);
        if s.max_timestamp().is_none_or(|t| t.physical <= limit) {
            return (Some(s), None);
        }
        let mut future = EntityState::new(s.id.clone(), s.source);
        let (keep, later): (Vec<Cell>, Vec<Cell>) = s.cells.drain(..).partition(|c| c.version.ts.physical <= limit);
        s.cells = keep;
        future.cells = later;
        if ahead(&s.presence) {
            future.presence = s.presence.take();
            s.presence = s.cells.iter().map(|c| c.version.ts).max();
        }
        if ahead(&s.tombstone) {
            future.tombstone = s.tombstone.take();
        }
        if ahead(&s.meta_version) {
            future.meta_version = s.meta_version.take();
            future.etype = s.etype;
            future.expiry = s.expiry.take();
        }
        future.created_at = s.created_at;
        if s.presence.is_none() && s.tombstone.is_none() {
            // Nothing left to merge now: the metadata waits with the rest, or it would be
            // lost (and a later re-encoding would invent a register from the presence).
            future.meta_version = future.meta_version.or(s.meta_version.take());
            future.etype = s.etype;
            future.expiry = future.expiry.or(s.expiry.take());
            return (None, Some(future));
        }
        (Some(s), Some(future))
    }

    /// Merges quarantined parts whose time has come.
    pub fn release_quarantine(&mut self) {
        if self.quarantine.is_empty() {
            return;
        }
        let ids: Vec<Arc<str>> = self.quarantine.keys().cloned().collect();
        for id in ids {
            let q = self.quarantine.remove(&id).expect("listed id");
            let (now, future) = self.split_future(q);
            if let Some(f) = future {
                self.quarantine.insert(id, f);
            }
            if let Some(n) = now {
                self.counters.released += 1;
                self.join_state(n);
            }
        }
    }

    pub fn quarantined_entities(&self) -> usize {
        self.quarantine.len()
    }

    // ---- tombstones ------------------------------------------------------------------

    /// A cursor before a collected tombstone would miss that delete. Seq 0 asks for a
    /// full snapshot, which the log always holds.
    fn cursor_expired(&self, seq: u64) -> bool {
        seq != 0 && seq < self.floor
    }

    /// Forgets deleted entities acknowledged by every peer (change seq <= `acked`) or
    /// older than the tombstone TTL. Returns how many were collected.
    pub fn collect_tombstones(&mut self, acked: Option<u64>) -> usize {
        let wall = self.clock.wall_ns();
        let ttl = self.opts.tombstone_ttl_ns;
        let ids: Vec<Arc<str>> = self.tombstoned.iter().cloned().collect();
        let mut collected = 0;
        for id in ids {
            let Some(s) = self.entities.get(&id) else {
                self.tombstoned.remove(&id);
                continue;
            };
            if s.is_alive() {
                self.tombstoned.remove(&id);
                continue;
            }
            let expired = s.tombstone.is_some_and(|t| t.physical.saturating_add(ttl) <= wall);
            if expired || acked.is_some_and(|a| s.seq <= a) {
                self.floor = self.floor.max(s.seq);
                self.log.remove(&s.seq);
                self.entities.remove(&id);
                self.tombstoned.remove(&id);
                collected += 1;
            }
        }
        self.counters.collected += collected as u64;
        collected
    }

    // ---- watchers --------------------------------------------------------------------

    /// Registers a watcher; with `since`, first queues every entity changed after that
    /// cursor (current state), else with `include_existing` every live entity.
    pub fn watch(&mut self, spec: WatchSpec, include_existing: bool, since: Option<u64>) -> Result<Arc<Watch>> {
        self.release_quarantine();
        if let Some(seq) = since {
            if self.cursor_expired(seq) {
                return Err(Error::CursorExpired { seq, floor: self.floor });
            }
        }
        let w = Arc::new(Watch::new(self.next_watch_id, spec));
        self.next_watch_id += 1;
        let start = match (since, include_existing) {
            (Some(seq), _) => Some(seq),
            (None, true) => Some(0),
            (None, false) => None,
        };
        if let Some(seq) = start {
            for id in self.log.range(seq + 1..).map(|(_, id)| id) {
                let s = &self.entities[id];
                let kind = match (s.is_alive(), since.is_some()) {
                    (true, true) => EventKind::Updated,
                    (true, false) => EventKind::Created,
                    (false, true) => EventKind::Deleted,
                    (false, false) => continue,
                };
                if w.matches(s.etype) {
                    w.push(event_for(&w, &Arc::new(s.clone()), kind));
                }
            }
        }
        self.watchers.push(w.clone());
        Ok(w)
    }

    pub fn unwatch(&mut self, id: u64) {
        self.watchers.retain(|w| {
            if w.id == id {
                w.close();
            }
            w.id != id
        });
    }

    fn emit(&mut self, state: &Arc<EntityState>, kind: EventKind) {
        self.watchers.retain(|w| !w.is_closed());
        for w in &self.watchers {
            if w.matches(state.etype) && w.push(event_for(w, state, kind)) {
                self.wake.push(w.id);
            }
        }
    }

    pub fn watchers(&self) -> &[Arc<Watch>] {
        &self.watchers
    }

    pub fn entity_count(&self) -> (usize, usize) {
        let dead = self.tombstoned.len();
        (self.entities.len() - dead, dead)
    }

    pub fn payload_bytes(&self) -> usize {
        self.entities.values().map(|s| s.payload_bytes()).sum()
    }

    pub fn log_len(&self) -> usize {
        self.log.len()
    }
}

/// The event for one watcher: a shared snapshot, encoded only when delivered.
fn event_for(w: &Watch, s: &Arc<EntityState>, kind: EventKind) -> Event {
    Event {
        seq: s.seq,
        cursor: s.seq,
        kind,
        id: s.id.clone(),
        source: s.source,
        state: s.clone(),
        projection: w.spec.projection.clone(),
    }
}
