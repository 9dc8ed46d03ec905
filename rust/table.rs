//! The entity table: local writes (each key checked against the values its writer saw),
//! replication merges, deletes and the collection of deleted entities, the store's
//! context summary, the change log behind `changes_since` and watcher resume, and event
//! fan-out.
//!
//! A local write is split in two so a batch is all-or-nothing: `prepare` decodes and
//! checks everything that does not depend on the stored state, `commit` applies and can
//! only fail before it changes anything.
//!
//! Dots: the table numbers its node's writes with one counter for its incarnation (a
//! random id per start without state), so no dot is ever issued twice. A state naming a
//! dot of this incarnation beyond the counter is refused.
use crate::causal::{Dot, VersionVector};
use crate::decode::{decode_entity, RawEntity};
use crate::entity::*;
use crate::error::{Error, Result};
use crate::expiry::Expiries;
use crate::hlc::{Clock, Timestamp, WallClock};
use crate::intern::{intern, Sym};
use crate::strategy::{Registry, Rule};
use crate::storage::{NodeState, Stored};
use crate::feed::{Change, Feed};
use crate::watch::{Event, EventKind, Mark, Watch, WatchSpec};
use ahash::AHashMap;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A merged state may hold concurrent siblings of several writers, each within the
/// limit: replicas accept states up to this many times `max_entity_bytes`.
pub const MERGE_SLACK: usize = 4;

/// Entities a watcher that fell behind reads from the log per catch-up step.
const CATCH_UP_STEP: usize = 256;
/// The feed keeps this many watch queues' worth of changes: a watcher whose queue is
/// full still finds the changes that do not fit (and falls behind from the first of
/// them, the queue full) rather than a position already dropped.
const FEED_QUEUES: usize = 2;

/// What a new type/expiry register value counts for in size limits: at most, so a
/// rewrite of an accepted entity is never refused for the register's sake (its value
/// is a type and two timestamps: 40 bytes at most).
const META_SIBLING_BYTES: usize = META_KEY.len() + META_URL.len() + 48 + 40;

pub struct Options {
    pub node_id: String,
    /// This start's incarnation (part of every dot this table issues); never 0.
    pub incarnation: u64,
    pub max_clock_offset_ns: u64,
    /// A peer silent this long no longer holds back the collection of deleted entities.
    pub peer_expiry_ns: u64,
    pub max_entity_bytes: usize,
    pub max_id_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            node_id: "node".into(),
            incarnation: 1,
            max_clock_offset_ns: 500_000_000,
            peer_expiry_ns: 86_400_000_000_000,
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

/// What the writer of a key saw of it.
#[derive(Debug)]
enum Base {
    /// Nothing named: the write replaces whatever the key holds.
    Blind,
    /// The values it read (their dots, sorted): anything else in the key makes it stale.
    Dots(Vec<Dot>),
    /// An entity-level HLC stamp (clients that send no versions): stale if the key
    /// holds a value stamped after it.
    Stamp(Timestamp),
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
    base: Base,
}

impl NewCell {
    fn bytes(&self) -> usize {
        sibling_bytes(self.key, self.type_url, self.value.len())
    }
}

/// The type registry and limits a write is checked against before it meets the stored
/// state. A front end holding a copy checks writes without the table lock (the registry
/// is copied on change, so a copy taken just before is as good as the table's own).
#[derive(Clone)]
pub struct WriteRules {
    registry: Arc<Registry>,
    max_entity_bytes: usize,
    max_id_bytes: usize,
}

impl WriteRules {
    pub fn prepare(&self, bytes: &[u8]) -> Result<Prepared> {
        prepare(bytes, &self.registry, self.max_entity_bytes, self.max_id_bytes)
    }
}

/// Decodes and checks a write against everything but the stored state.
fn prepare(bytes: &[u8], registry: &Registry, max_entity_bytes: usize, max_id_bytes: usize) -> Result<Prepared> {
    if bytes.len() > max_entity_bytes {
        let msg = format!("entity is {} bytes, over the limit of {} bytes", bytes.len(), max_entity_bytes);
        return Err(Error::invalid(None, None, msg));
    }
    let e = decode_entity(bytes).map_err(|err| Error::invalid(None, None, format!("malformed entity bytes: {err}")))?;
    check_identity(&e, max_id_bytes)?;
    prepare_cells(&e, registry)
}

/// A stamp for a local change of entity `stored`: the clock's, unless the entity holds a
/// delete stamped at or after it (from a clock far ahead): then just after the entity's
/// latest stamp, so the change outlives the delete it saw (the clock itself never jumps).
/// Fails only if no such stamp exists (a delete at the end of time); the caller counts it.
fn stamp_after(clock: &mut Clock, stored: Option<&EntityState>) -> Result<Timestamp> {
    let (Some(latest), Some(state)) = (stored.and_then(|s| s.max_stamp()), stored.filter(|s| s.deleted.is_some())) else {
        return Ok(clock.now());
    };
    let ts = clock.now_after(latest);
    if ts <= latest {
        let id = &state.id;
        let msg = format!("entity '{id}' was deleted at the end of the clock's range; it cannot be written again");
        return Err(Error::invalid(Some(id), None, msg));
    }
    Ok(ts)
}

/// Gives `state`'s latest change the table's next seq (`seq`): its entry in the change
/// log moves there.
fn next_seq(log: &mut BTreeMap<u64, Arc<str>>, seq: &mut u64, state: &mut EntityState) {
    *seq = seq.saturating_add(1);
    if state.seq != 0 {
        log.remove(&state.seq);
    }
    state.seq = *seq;
    log.insert(*seq, state.id.clone());
}

/// Names the batch item an error is about.
fn at_item(i: usize, e: Error) -> Error {
    match e {
        Error::Invalid { msg, id, key } => Error::Invalid { msg: format!("batch item {i}: {msg}"), id, key },
        other => other,
    }
}

/// The id and type checks every write and merge passes.
fn check_identity(e: &RawEntity, max_id_bytes: usize) -> Result<()> {
    if e.id.is_empty() {
        return Err(Error::invalid(None, None, "entity id is empty".into()));
    }
    if e.id.len() > max_id_bytes {
        let msg = format!("entity id is {} bytes, over the limit of {}", e.id.len(), max_id_bytes);
        return Err(Error::invalid(None, None, msg));
    }
    if !(0..=3).contains(&e.etype) {
        return Err(Error::invalid(Some(e.id), None, format!("entity '{}': unknown entity type {}", e.id, e.etype)));
    }
    Ok(())
}

fn prepare_cells(e: &RawEntity, registry: &Registry) -> Result<Prepared> {
    let invalid = |id: Option<&str>, key: Option<&str>, msg: String| Err(Error::invalid(id, key, msg));
    let id = e.id;
    let fallback_base = entity_hlc(e);
    let mut cells = Vec::with_capacity(e.components.len());
    for &(key, url, value) in &e.components {
        if key.is_empty() || key.starts_with('@') {
            return invalid(Some(id), Some(key), format!("entity '{id}': component key {key:?} is empty or reserved ('@...')"));
        }
        if url.is_empty() {
            return invalid(Some(id), Some(key), format!("entity '{id}': component '{key}' has an empty type URL"));
        }
        let type_url = intern(url);
        if let Err(m) = registry.rank(type_url, value) {
            return invalid(Some(id), Some(key), format!("entity '{id}': component '{key}' ({url}): {m}"));
        }
        let base = match (e.version(key), fallback_base) {
            (Some(v), _) if v.counter > 0 => {
                let mut dots = Vec::with_capacity(1 + v.concurrent.len());
                for d in std::iter::once((v.node, v.incarnation, v.counter)).chain(v.concurrent.iter().copied()) {
                    match dot_of(&d) {
                        Ok(d) => dots.push(d),
                        Err(m) => return invalid(Some(id), Some(key), format!("entity '{id}': version of '{key}': {m}")),
                    }
                }
                // Sorted, so checking a key's values against them stays O(n log m)
                // however many the writer names.
                dots.sort_unstable_by_key(Dot::sort_key);
                Base::Dots(dots)
            }
            (Some(v), _) => match stamp_of(v) {
                Ok(t) => Base::Stamp(t),
                Err(m) => return invalid(Some(id), Some(key), format!("entity '{id}': version of '{key}': {m}")),
            },
            (None, Some(t)) => Base::Stamp(t),
            (None, None) => Base::Blind,
        };
        cells.push(NewCell { key: intern(key), type_url, value: value.into(), base });
    }
    let expiry = e.expiry_time.map(|t| (t != (0, 0)).then_some(t));
    Ok(Prepared { id: Arc::from(id), etype: e.etype, expiry, cells })
}

#[derive(Debug)]
pub struct WriteOutcome {
    pub id: Arc<str>,
    /// The entity after the write (encoded only if asked: `entity_bytes`).
    pub snapshot: Arc<EntityState>,
    pub registry: Arc<Registry>,
    pub applied: Vec<Sym>,
    pub stale: Vec<Sym>,
    pub unchanged: Vec<Sym>,
    /// The write created (or resurrected) the entity.
    pub created: bool,
}

impl WriteOutcome {
    /// The entity after the write (user view), as `entity.v1.Entity` bytes.
    pub fn entity_bytes(&self) -> Vec<u8> {
        self.snapshot.to_bytes(View::USER, &self.registry)
    }
}

/// What storage needs beyond the table itself, kept only once it asked (`persist`).
#[derive(Default)]
struct Persist {
    forgotten: Vec<Arc<str>>,
    summary_changed: bool,
}

/// Every change after a seq, as one group commit takes it (see `Table::pending`).
pub struct Pending {
    pub meta: NodeState,
    /// Snapshots of the entities changed since, in seq order.
    pub states: Vec<Arc<EntityState>>,
    pub forgotten: Vec<Arc<str>>,
    /// The summary, if it changed since the last take.
    pub context: Option<VersionVector>,
    pub registry: Arc<Registry>,
}

#[derive(Default, Debug, Clone)]
pub struct Counters {
    pub writes: u64,
    pub stale_keys: u64,
    pub rejected: u64,
    pub merges: u64,
    pub merges_changed: u64,
    /// Merged stamps further ahead of the wall clock than the offset (not adopted by the clock).
    pub skewed_stamps: u64,
    pub collected: u64,
    pub expired: u64,
    pub adopted: u64,
    /// Changes by the event they are (created, updated, deleted), watched or not.
    pub events: [u64; 3],
}

pub struct Table {
    clock: Clock,
    registry: Arc<Registry>,
    opts: Options,
    /// The last dot counter issued.
    counter: u64,
    /// The store's context summary (module docs of `causal`).
    seen: VersionVector,
    /// Shared with snapshots (events, group commits): a write copies an entity only
    /// while a snapshot of it is still held (`Arc::make_mut`).
    entities: AHashMap<Arc<str>, Arc<EntityState>>,
    /// seq -> entity whose latest change has that seq.
    log: BTreeMap<u64, Arc<str>>,
    seq: u64,
    /// Seq of the newest collected entity: cursors before it cannot resume.
    floor: u64,
    /// Deleted entities (no values) -> wall ns when they died.
    dead: AHashMap<Arc<str>, u64>,
    /// Set once the store exchanges states with anyone: from then on deleted entities
    /// wait for the peers' acknowledgements (or `peer_expiry`) before they are forgotten.
    replicating: bool,
    /// Kept for storage (see `pending`): forgotten entities since the last take, and
    /// whether the summary changed since.
    persist: Option<Persist>,
    watchers: Vec<Arc<Watch>>,
    /// How many watchers have a projection (changes then keep the keys they touched).
    projected: usize,
    /// The recent changes the watchers read, and those of the current operation, not
    /// yet published to it (`publish`).
    feed: Arc<Feed>,
    fresh: Vec<Arc<Change>>,
    /// Changes watchers were told of, in all and per entity type (what a watcher that
    /// fell behind skipped is the difference since it did). `changes` numbers the
    /// feed's positions.
    changes: u64,
    changes_by_type: AHashMap<i32, u64>,
    next_watch_id: u64,
    /// Watchers whose async consumer must be woken (drained by the caller).
    pub wake: Vec<u64>,
    /// When live entities expire (one host timer at the earliest, see `expiry`).
    expiries: Expiries,
    pub counters: Counters,
}

impl Table {
    pub fn new(opts: Options, wall: WallClock) -> Self {
        let node = intern(&opts.node_id);
        Table {
            clock: Clock::new(node, opts.max_clock_offset_ns, wall),
            registry: Arc::new(Registry::default()),
            opts: Options { incarnation: opts.incarnation.max(1), ..opts },
            counter: 0,
            seen: VersionVector::new(),
            entities: AHashMap::new(),
            log: BTreeMap::new(),
            seq: 0,
            floor: 0,
            dead: AHashMap::new(),
            replicating: false,
            persist: None,
            watchers: Vec::new(),
            projected: 0,
            feed: Arc::default(),
            fresh: Vec::new(),
            changes: 0,
            changes_by_type: AHashMap::new(),
            next_watch_id: 1,
            wake: Vec::new(),
            expiries: Expiries::default(),
            counters: Counters::default(),
        }
    }

    pub fn node(&self) -> Sym {
        self.clock.node()
    }

    pub fn incarnation(&self) -> u64 {
        self.opts.incarnation
    }

    /// The last dot counter this table issued.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn clock(&mut self) -> &mut Clock {
        &mut self.clock
    }

    /// Sets the strategy of a type URL (events already made keep the old registry).
    pub fn register(&mut self, type_url: &str, rule: Rule) {
        Arc::make_mut(&mut self.registry).register(type_url, rule);
    }

    fn next_dot(&mut self) -> Result<u64> {
        self.counter = self.counter.checked_add(1).ok_or_else(|| {
            Error::invalid(None, None, "this node's dot counter is exhausted; restart it with a new incarnation".into())
        })?;
        let own = Dot { node: self.node(), incarnation: self.opts.incarnation, counter: self.counter };
        self.seen.add(&own);
        self.summary_changed();
        Ok(self.counter)
    }

    // ---- local writes ----------------------------------------------------------------

    fn invalid<T>(&mut self, id: Option<&str>, key: Option<&str>, msg: String) -> Result<T> {
        self.counters.rejected += 1;
        Err(Error::invalid(id, key, msg))
    }

    /// Decodes and checks a write against everything but the stored state.
    pub fn prepare(&mut self, bytes: &[u8]) -> Result<Prepared> {
        let p = prepare(bytes, &self.registry, self.opts.max_entity_bytes, self.opts.max_id_bytes);
        if p.is_err() {
            self.counters.rejected += 1;
        }
        p
    }

    /// What `prepare` needs, for checking writes outside the table lock.
    pub fn write_rules(&self) -> WriteRules {
        WriteRules {
            registry: self.registry.clone(),
            max_entity_bytes: self.opts.max_entity_bytes,
            max_id_bytes: self.opts.max_id_bytes,
        }
    }

    /// Counts writes refused before they reached the table (checked with `write_rules`).
    pub fn count_rejected(&mut self, n: u64) {
        self.counters.rejected += n;
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

    /// Refuses a stamp base (an HLC the writer claims to have read) ahead of our clock by
    /// more than the offset, unless this store handed it out (the entity holds it).
    fn check_bases(&mut self, p: &Prepared) -> Result<()> {
        if !p.cells.iter().any(|c| matches!(c.base, Base::Stamp(_))) {
            return Ok(());
        }
        let latest = self.entities.get(&p.id).and_then(|s| s.max_stamp());
        for c in &p.cells {
            if let Base::Stamp(t) = c.base {
                if latest.is_none_or(|l| t > l) {
                    let key = c.key.as_str();
                    self.check_skew(&p.id, Some(key), || format!("the base version of '{key}'"), t)?;
                }
            }
        }
        Ok(())
    }

    /// Applies a prepared write. Fails only before changing anything.
    pub fn commit(&mut self, p: Prepared, mode: WriteMode, strict: bool) -> Result<WriteOutcome> {
        let out = self.apply(p, mode, strict, false);
        self.publish();
        out
    }

    /// Applies prepared writes one by one, each against the state the ones before it
    /// left (one failing leaves the others), and publishes them to the watchers at once.
    pub fn commit_each(&mut self, batch: impl IntoIterator<Item = Result<Prepared>>, mode: WriteMode,
                       strict: bool) -> Vec<Result<WriteOutcome>> {
        let out = batch.into_iter().map(|p| p.and_then(|p| self.apply(p, mode, strict, false))).collect();
        self.publish();
        out
    }

    /// `commit`; `checked`: the caller already checked bases and sizes (`check_batch`).
    fn apply(&mut self, p: Prepared, mode: WriteMode, strict: bool, checked: bool) -> Result<WriteOutcome> {
        if !checked {
            self.check_bases(&p)?;
        }
        // Everything that can refuse the write reads the stored entity through this one
        // lookup (failures are counted through `self.counters` alone: the borrow holds).
        let stored = self.entities.get(&p.id).map(|s| &**s);
        let was_alive = stored.is_some_and(|s| s.is_alive());
        match mode {
            WriteMode::Create if was_alive => return Err(Error::AlreadyExists(p.id.to_string())),
            WriteMode::Update if !was_alive => return Err(Error::NotFound(p.id.to_string())),
            _ => {}
        }
        let (mut applied, mut stale, mut unchanged) = (vec![], vec![], vec![]);
        for c in &p.cells {
            let run = stored.map_or(&[][..], |s| s.siblings(c.key));
            let is_stale = match &c.base {
                Base::Blind => false,
                Base::Dots(seen) => run.iter().any(|s| seen.binary_search_by_key(&s.dot().sort_key(), Dot::sort_key).is_err()),
                Base::Stamp(t) => run.iter().any(|s| s.ts > *t),
            };
            if is_stale {
                stale.push(c.key);
            } else if run.len() == 1 && run[0].type_url == c.type_url && *run[0].value == *c.value {
                unchanged.push(c.key);
            } else {
                applied.push(c.key);
            }
        }
        if strict && !stale.is_empty() {
            self.counters.stale_keys += stale.len() as u64;
            return Err(Error::Stale { id: p.id.to_string(), keys: stale.iter().map(|k| k.as_str().to_string()).collect() });
        }
        // The type/expiry register: written when the entity (re)starts a life or the
        // write changes either. A new life does not inherit the expiry of the old one.
        let current = stored.filter(|_| was_alive).map_or(Meta::default(), EntityState::current_meta);
        let mut meta = Meta {
            etype: if p.etype != 0 { p.etype } else { current.etype },
            expiry: p.expiry.unwrap_or(current.expiry),
            created_at: current.created_at,
        };
        let write_meta = !was_alive || meta.etype != current.etype || meta.expiry != current.expiry;
        let changed = !applied.is_empty() || write_meta;
        if !checked && changed {
            let cells = p.cells.iter().filter(|c| applied.contains(&c.key)).map(|c| (c.key, c.bytes()));
            let sizes = cells.chain(write_meta.then_some((meta_key(), META_SIBLING_BYTES)));
            self.size_check(&p.id, stored, sizes).inspect_err(|_| self.counters.rejected += 1)?;
        }
        self.counters.writes += 1;
        self.counters.stale_keys += stale.len() as u64;
        let registry = self.registry.clone();
        if !changed {
            let snapshot = self.entities[&p.id].clone();
            return Ok(WriteOutcome { id: p.id, snapshot, registry, applied, stale, unchanged, created: false });
        }
        let needed = applied.len() as u64 + write_meta as u64;
        if self.counter.checked_add(needed).is_none() {
            return self.invalid(Some(&p.id), None, "this node's dot counter is exhausted; restart it with a new incarnation".into());
        }
        let ts = stamp_after(&mut self.clock, stored).inspect_err(|_| self.counters.rejected += 1)?;
        let expiry_before = stored.filter(|s| s.is_alive()).and_then(|s| s.expiry);
        // The write's dots, in order: its applied cells', then the register's.
        let first = self.counter + 1;
        for _ in 0..needed {
            self.next_dot()?;
        }
        let incarnation = self.opts.incarnation;
        if write_meta && !was_alive {
            meta.created_at = Some(wall_time_of(ts.physical));
        }
        let register = write_meta.then(|| {
            let counter = first + applied.len() as u64;
            Sibling { key: meta_key(), type_url: meta_url(), ts, incarnation, counter, value: meta.to_bytes().into() }
        });
        let entry = self.entities.entry(p.id.clone()).or_insert_with(|| Arc::new(EntityState::new(p.id.clone(), ts.node)));
        let state = Arc::make_mut(entry);
        // Exactly the room the new values need: a vector doubling past five values would
        // cost a track hundreds of bytes of empty slots.
        let added = applied.iter().chain(register.as_ref().map(|r| &r.key)).filter(|&&k| state.key_range(k).is_empty()).count();
        state.sibs.reserve_exact(added);
        let cells = p.cells.into_iter().filter(|c| applied.contains(&c.key));
        let new_sibs = cells.zip(first..).map(|(c, counter)| Sibling { key: c.key, type_url: c.type_url, ts, incarnation, counter, value: c.value });
        for s in new_sibs.chain(register) {
            state.ctx.add(&s.dot());
            state.replace_key(s);
        }
        // Only the register's value feeds what `refresh` derives.
        if write_meta {
            state.refresh(&registry);
        }
        state.source = ts.node;
        next_seq(&mut self.log, &mut self.seq, state);
        // The entity is alive now: its expiry is the register's. (What `note_expiry` does,
        // from values at hand instead of two more lookups.)
        let expiry_after = state.expiry;
        let snapshot = entry.clone();
        self.expiries.moved(&p.id, expiry_before, expiry_after);
        if !was_alive {
            self.dead.remove(&p.id);
        }
        let kind = if was_alive { EventKind::Updated } else { EventKind::Created };
        // What a projected watcher needs to know: the keys this write changed, and the
        // type. A new expiry alone is not news to it: sims move every track's expiry on
        // every tick, and a classifier reading velocities must not wake for that.
        let with_type: Vec<Sym>;
        let changed = if write_meta && meta.etype != current.etype {
            with_type = applied.iter().copied().chain([meta_key()]).collect();
            &with_type
        } else {
            &applied
        };
        self.announce(&snapshot, kind, Some(changed));
        Ok(WriteOutcome { id: p.id, snapshot, registry, applied, stale, unchanged, created: !was_alive })
    }

    pub fn write(&mut self, bytes: &[u8], mode: WriteMode, strict: bool) -> Result<WriteOutcome> {
        let p = self.prepare(bytes)?;
        self.commit(p, mode, strict)
    }

    /// Fails if replacing the keys in `writes` (key, bytes of its new value) would take
    /// entity `id` (`stored`) past the size limit: the values it keeps, the new ones,
    /// and its context with this node's entry. The caller counts the refusal.
    fn size_check(&self, id: &str, stored: Option<&EntityState>, writes: impl Iterator<Item = (Sym, usize)> + Clone) -> Result<()> {
        let written = |key: Sym| writes.clone().any(|w| w.0 == key);
        let own = Dot { node: self.node(), incarnation: self.opts.incarnation, counter: 1 };
        let mut total = id.len() + writes.clone().map(|w| w.1).sum::<usize>();
        match stored {
            Some(s) => {
                total += s.sibs.iter().filter(|x| !written(x.key)).map(Sibling::bytes).sum::<usize>();
                total += (s.ctx.len() + !s.ctx.contains(&own) as usize) * CONTEXT_ENTRY_BYTES;
            }
            None => total += CONTEXT_ENTRY_BYTES,
        }
        if total > self.opts.max_entity_bytes {
            let msg = format!("entity '{id}' would hold {total} bytes, over the limit of {}", self.opts.max_entity_bytes);
            return Err(Error::invalid(Some(id), None, msg));
        }
        Ok(())
    }

    /// Upserts a batch: every entity is checked before any is applied.
    pub fn put_many(&mut self, batch: &[&[u8]]) -> Result<Vec<WriteOutcome>> {
        let mut prepared = Vec::with_capacity(batch.len());
        for (i, bytes) in batch.iter().enumerate() {
            prepared.push(self.prepare(bytes).map_err(|e| at_item(i, e))?);
        }
        self.check_batch(&prepared)?;
        let out = self.apply_batch(prepared);
        self.publish();
        out
    }

    /// Checks a prepared batch against the stored state (bases, sizes), as if its items
    /// were applied in order; changes nothing.
    fn check_batch(&mut self, batch: &[Prepared]) -> Result<()> {
        // The keys (and their bytes) earlier items of the batch write to each entity.
        let mut written: AHashMap<&Arc<str>, Vec<(Sym, usize)>> = AHashMap::with_capacity(batch.len());
        for (i, p) in batch.iter().enumerate() {
            self.check_bases(p).map_err(|e| at_item(i, e))?;
            let sizes = written.entry(&p.id).or_insert_with(|| vec![(meta_key(), META_SIBLING_BYTES)]);
            for c in &p.cells {
                match sizes.iter_mut().find(|(key, _)| *key == c.key) {
                    Some(size) => size.1 = c.bytes(),
                    None => sizes.push((c.key, c.bytes())),
                }
            }
            if !p.cells.is_empty() {
                let stored = self.entities.get(&p.id).map(|s| &**s);
                self.size_check(&p.id, stored, sizes.iter().copied()).map_err(|e| {
                    self.counters.rejected += 1;
                    at_item(i, e)
                })?;
            }
        }
        Ok(())
    }

    /// Applies a batch `check_batch` accepted.
    fn apply_batch(&mut self, batch: Vec<Prepared>) -> Result<Vec<WriteOutcome>> {
        // Checked, sizes included; only an exhausted dot counter could fail here.
        batch.into_iter().map(|p| self.apply(p, WriteMode::Put, false, false)).collect()
    }

    pub fn delete(&mut self, id: &str) -> Result<()> {
        let Some(state) = self.entities.get(id).filter(|s| s.is_alive()) else {
            return Err(Error::NotFound(id.into()));
        };
        let ts = stamp_after(&mut self.clock, Some(state)).inspect_err(|_| self.counters.rejected += 1)?;
        let id = state.id.clone();
        let expiry_before = self.live_expiry(&id);
        let counter = self.next_dot()?;
        let record = DeleteRecord { ts, incarnation: self.opts.incarnation, counter };
        let state = Arc::make_mut(self.entities.get_mut(&id).expect("checked above"));
        state.sibs.clear();
        state.ctx.add(&record.dot());
        state.deleted = Some(record);
        state.refresh(&self.registry);
        state.source = ts.node;
        let wall = self.clock.wall_ns();
        self.dead.insert(id.clone(), wall);
        self.note_expiry(&id, expiry_before);
        self.record(&id, Some(EventKind::Deleted));
        self.publish();
        Ok(())
    }

    /// Deletes up to `limit` entities whose expiry is at or before `now` (the host's
    /// timer); returns how many it deleted and the earliest expiry left, which the timer
    /// must wait for next (at or before `now` when the limit cut the pass short: the lock
    /// is released between passes).
    pub fn expire_due(&mut self, now: WallTime, limit: usize) -> (usize, Option<WallTime>) {
        let mut deleted = 0;
        while deleted < limit {
            let Some((_, id)) = self.expiries.pop_due(now) else { break };
            // Only an exhausted dot counter fails a delete; the entity then stays, as any
            // delete refused would leave it.
            if self.delete(&id).is_ok() {
                deleted += 1;
            }
        }
        self.counters.expired += deleted as u64;
        (deleted, self.expiries.rearm())
    }

    /// The earliest expiry the host's timer must now be armed for, if writes moved it
    /// earlier since the last call (drained with the other notices).
    pub fn take_expiry_notice(&mut self) -> Option<WallTime> {
        self.expiries.take_notice()
    }

    /// Gives a stored entity's latest change the next seq and tells the watchers (`kind`:
    /// the event it is; None: none, e.g. a merge that only widened the context).
    fn record(&mut self, id: &Arc<str>, kind: Option<EventKind>) {
        let entry = self.entities.get_mut(id).expect("a recorded entity is stored");
        next_seq(&mut self.log, &mut self.seq, Arc::make_mut(entry));
        if let Some(kind) = kind {
            let snapshot = entry.clone();
            self.announce(&snapshot, kind, None);
        }
    }

    /// Counts a change and tells the watchers of it. `changed`: the keys the change
    /// touched, when known (a projected watcher that reads none of them is not told of an
    /// update).
    fn announce(&mut self, snapshot: &Arc<EntityState>, kind: EventKind, changed: Option<&[Sym]>) {
        self.counters.events[kind as usize - 1] += 1;
        if !self.watchers.is_empty() {
            self.emit(snapshot, kind, changed);
        }
    }

    fn live_expiry(&self, id: &str) -> Option<WallTime> {
        self.entities.get(id).filter(|s| s.is_alive()).and_then(|s| s.expiry)
    }

    fn note_expiry(&mut self, id: &Arc<str>, before: Option<WallTime>) {
        let after = self.live_expiry(id);
        self.expiries.moved(id, before, after);
    }

    // ---- reads -----------------------------------------------------------------------

    pub fn get(&self, id: &str) -> Result<Vec<u8>> {
        match self.entities.get(id) {
            Some(s) if s.is_alive() => Ok(s.to_bytes(View::USER, &self.registry)),
            _ => Err(Error::NotFound(id.into())),
        }
    }

    pub fn list(&self, type_filter: i32) -> Vec<Vec<u8>> {
        let mut alive: Vec<&EntityState> = self
            .entities
            .values()
            .map(|s| &**s)
            .filter(|s| s.is_alive() && (type_filter == 0 || s.shown_type() == type_filter))
            .collect();
        alive.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        alive.into_iter().map(|s| s.to_bytes(View::USER, &self.registry)).collect()
    }

    /// Every entity changed after `seq`, in its current replica state and seq order, up
    /// to `limit` of them, skipping those whose latest change came from `skip_source` and
    /// those whose every write `unless_seen` (a peer's context summary) covers. Returns
    /// them with the seq the caller has now seen.
    pub fn changes_since(
        &mut self,
        seq: u64,
        limit: usize,
        skip_source: Option<Sym>,
        unless_seen: Option<&VersionVector>,
    ) -> Result<(Vec<Vec<u8>>, u64)> {
        if self.cursor_expired(seq) {
            return Err(Error::CursorExpired { seq, floor: self.floor });
        }
        self.replicating = true;
        let mut out = Vec::new();
        let mut last = self.seq;
        for (&s, id) in self.log.range(seq + 1..) {
            if out.len() == limit {
                last = s - 1;
                break;
            }
            let state = &self.entities[id];
            if skip_source == Some(state.source) || unless_seen.is_some_and(|v| state.ctx.covered_by(v)) {
                continue;
            }
            out.push(state.to_bytes(View::REPLICA, &self.registry));
        }
        Ok((out, last))
    }

    /// One entity's replica state (deleted ones too, until collected), with its change seq.
    pub fn replica_state(&self, id: &str) -> Option<(Vec<u8>, u64)> {
        self.entities.get(id).map(|s| (s.to_bytes(View::REPLICA, &self.registry), s.seq))
    }

    // ---- replication -----------------------------------------------------------------

    /// Joins a replica's state received from node `source` (empty: the node of its latest
    /// change). Returns true if ours changed.
    pub fn merge(&mut self, bytes: &[u8], source: &str) -> Result<bool> {
        let changed = self.join_replica(bytes, source);
        self.publish();
        changed
    }

    /// `merge` of each state of a batch (one refused leaves the others), published to the
    /// watchers at once.
    pub fn merge_each<'a>(&mut self, states: impl IntoIterator<Item = &'a [u8]>, source: &str) -> Vec<Result<bool>> {
        let out = states.into_iter().map(|s| self.join_replica(s, source)).collect();
        self.publish();
        out
    }

    fn join_replica(&mut self, bytes: &[u8], source: &str) -> Result<bool> {
        let limit = self.opts.max_entity_bytes.saturating_mul(MERGE_SLACK);
        if bytes.len() > limit {
            return self.invalid(None, None, format!("replica state is {} bytes, over the limit of {limit}", bytes.len()));
        }
        let e = match decode_entity(bytes) {
            Ok(e) => e,
            Err(err) => return self.invalid(None, None, format!("malformed entity bytes: {err}")),
        };
        if let Err(err) = check_identity(&e, self.opts.max_id_bytes) {
            self.counters.rejected += 1;
            return Err(err);
        }
        let source = (!source.is_empty()).then(|| intern(source));
        let remote = match state_from_replica(&e, &self.registry, source) {
            Ok(s) => s,
            Err(m) => return self.invalid(Some(e.id), None, format!("entity '{}': {m}", e.id)),
        };
        self.check_own_dots(&remote.ctx).map_err(|m| {
            self.counters.rejected += 1;
            Error::invalid(Some(e.id), None, format!("entity '{}': {m}", e.id))
        })?;
        self.replicating = true;
        self.counters.merges += 1;
        if let Some(t) = remote.max_stamp() {
            // A stamp too far ahead is merged all the same (it competes only with writes
            // concurrent to it) but never drags our clock forward.
            if self.clock.update(t).is_err() {
                self.counters.skewed_stamps += 1;
            }
        }
        Ok(self.join_state(remote))
    }

    /// Refuses writes of this incarnation that it never made.
    fn check_own_dots(&self, ctx: &VersionVector) -> std::result::Result<(), String> {
        let claimed = ctx.get(self.node(), self.opts.incarnation);
        if claimed > self.counter {
            return Err(format!(
                "names write {claimed} of this node ({}, incarnation {:016x}), which has made only {}",
                self.node().as_str(),
                self.opts.incarnation,
                self.counter
            ));
        }
        Ok(())
    }

    fn join_state(&mut self, remote: EntityState) -> bool {
        let node = self.node();
        let wall = self.clock.wall_ns();
        let mut fresh = None;
        let state = match self.entities.get_mut(&remote.id) {
            Some(s) => Arc::make_mut(s),
            None => fresh.insert(EntityState::new(remote.id.clone(), remote.source)),
        };
        let (was_alive, expiry_before) = (state.is_alive(), state.expiry.filter(|_| state.is_alive()));
        let joined = state.join(&remote, &self.seen);
        if !joined.changed {
            return false;
        }
        let remote_lacks = joined.other_lacks;
        if joined.removed_by_summary {
            // We dropped values of theirs that only our summary had seen (the entity was
            // forgotten here after its delete). Our answer must carry that news, and a
            // context they have seen all of would not (a peer filters on contexts): a
            // fresh dot of ours marks it.
            if let Some(counter) = self.counter.checked_add(1) {
                self.counter = counter;
                let dot = Dot { node, incarnation: self.opts.incarnation, counter };
                self.seen.add(&dot);
                state.ctx.add(&dot);
                if let Some(p) = &mut self.persist {
                    p.summary_changed = true;
                }
            }
        }
        state.refresh(&self.registry);
        state.source = if remote_lacks { node } else { remote.source };
        let is_alive = state.is_alive();
        if let Some(s) = fresh {
            self.entities.insert(s.id.clone(), Arc::new(s));
        }
        self.counters.merges_changed += 1;
        let kind = match (was_alive, is_alive) {
            (false, true) => Some(EventKind::Created),
            (true, true) => Some(EventKind::Updated),
            (true, false) => Some(EventKind::Deleted),
            (false, false) => None,
        };
        if is_alive {
            self.dead.remove(&remote.id);
        } else {
            self.dead.entry(remote.id.clone()).or_insert(wall);
        }
        self.note_expiry(&remote.id, expiry_before);
        self.record(&remote.id, kind);
        true
    }

    /// The store's context summary: every write it has seen all of.
    pub fn context_summary(&self) -> &VersionVector {
        &self.seen
    }

    /// Adds a peer's context summary to ours, once everything it covers has been merged
    /// here (the caller's promise: see the mesh protocol). Returns true if ours grew.
    pub fn adopt(&mut self, summary: &VersionVector) -> Result<bool> {
        if let Err(m) = self.check_own_dots(summary) {
            self.counters.rejected += 1;
            return Err(Error::invalid(None, None, format!("context summary {m}")));
        }
        let grew = self.seen.join(summary);
        self.counters.adopted += grew as u64;
        if grew {
            self.summary_changed();
        }
        Ok(grew)
    }

    // ---- persistence -----------------------------------------------------------------

    fn summary_changed(&mut self) {
        if let Some(p) = &mut self.persist {
            p.summary_changed = true;
        }
    }

    /// Starts keeping what storage needs (forgotten entities, summary changes) and, with
    /// `stored`, takes a data dir's node state into this still empty table: summary,
    /// seq, floor; the dot counter only if the last run closed cleanly (otherwise this
    /// table keeps its fresh incarnation, so no dot issued after the last commit can be
    /// issued again). The caller checked the node id; the entities follow (`restore`).
    pub fn persist(&mut self, stored: Option<&Stored>) -> Result<()> {
        if self.seq != 0 || !self.entities.is_empty() || self.persist.is_some() {
            return Err(Error::invalid(None, None, "storage must be attached to a new, empty store".into()));
        }
        self.persist = Some(Persist { summary_changed: true, ..Persist::default() });
        let Some(stored) = stored else { return Ok(()) };
        let m = &stored.meta;
        if stored.clean {
            self.opts.incarnation = m.incarnation;
            self.counter = m.counter;
        }
        self.seen = VersionVector::from_entries(stored.context.iter().map(|(n, i, c)| (intern(n), *i, *c)).collect());
        self.check_own_dots(&self.seen.clone()).map_err(|m| Error::invalid(None, None, format!("stored summary {m}")))?;
        (self.seq, self.floor, self.replicating) = (m.seq, m.floor, m.replicating);
        Ok(())
    }

    /// Makes room for `n` more entities (a load knows how many it brings).
    pub fn reserve(&mut self, n: usize) {
        self.entities.reserve(n);
    }

    /// Loads one stored entity state (after `persist`), checked as a peer's state would be.
    pub fn restore(&mut self, bytes: &[u8], seq: u64) -> std::result::Result<(), String> {
        let e = decode_entity(bytes).map_err(|err| format!("stored entity (seq {seq}) is malformed: {err}"))?;
        let bad = |m: String| format!("stored entity '{}' (seq {seq}): {m}", e.id);
        let mut state = state_from_replica(&e, &self.registry, None).map_err(bad)?;
        self.check_own_dots(&state.ctx).map_err(bad)?;
        if let Some(t) = state.max_stamp() {
            // Our own stamps are never ahead of our clock: keep it monotonic across runs.
            let _ = self.clock.update(t);
        }
        state.seq = seq;
        let id = state.id.clone();
        let (alive, expiry) = (state.is_alive(), state.expiry.filter(|_| state.is_alive()));
        // A duplicate id or seq means a damaged file; the load fails as a whole.
        match self.entities.entry(id.clone()) {
            std::collections::hash_map::Entry::Occupied(_) => return Err(bad("stored twice".into())),
            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(Arc::new(state)),
        };
        if self.log.insert(seq, id.clone()).is_some() {
            return Err(bad("shares its seq with another entity".into()));
        }
        if !alive {
            self.dead.insert(id.clone(), self.clock.wall_ns());
        }
        self.expiries.moved(&id, None, expiry);
        self.seq = self.seq.max(seq);
        Ok(())
    }

    /// What changed after `seq` (the last commit) for the next group commit: snapshots of
    /// the changed entities, the forgotten ones, and the summary if it changed. All of
    /// one moment, so a commit of it is consistent.
    pub fn pending(&mut self, seq: u64) -> Pending {
        let p = self.persist.get_or_insert_with(Persist::default);
        let forgotten = std::mem::take(&mut p.forgotten);
        let context = std::mem::take(&mut p.summary_changed).then(|| self.seen.clone());
        let states = self.log.range(seq + 1..).map(|(_, id)| self.entities[id].clone()).collect();
        Pending { meta: self.node_state(), states, forgotten, context, registry: self.registry.clone() }
    }

    /// Whether anything awaits a commit after `seq`.
    pub fn has_pending(&self, seq: u64) -> bool {
        self.seq > seq || self.persist.as_ref().is_some_and(|p| p.summary_changed || !p.forgotten.is_empty())
    }

    pub fn node_state(&self) -> NodeState {
        NodeState {
            node_id: self.node().as_str().to_owned(),
            incarnation: self.opts.incarnation,
            counter: self.counter,
            seq: self.seq,
            floor: self.floor,
            replicating: self.replicating,
        }
    }

    // ---- deleted entities ------------------------------------------------------------

    /// A cursor before a collected entity would miss its delete. Seq 0 asks for a full
    /// snapshot, which the log always holds.
    fn cursor_expired(&self, seq: u64) -> bool {
        seq != 0 && seq < self.floor
    }

    /// Forgets deleted entities that no replica can need any more: their every write is
    /// covered by the store's context summary (so no old state can bring one back), and
    /// with `acked` (a relay's mark, expired peers already left out) every peer
    /// acknowledged the delete (change seq <= `acked`); without it, the store never
    /// replicated or the delete is older than `peer_expiry`. Returns how many.
    pub fn collect_deleted(&mut self, acked: Option<u64>) -> usize {
        let wall = self.clock.wall_ns();
        // A watcher that fell behind still has to read the deletes from where it fell
        // behind: they wait for it, as for a peer that has not acknowledged them.
        let behind = self.watchers.iter().map(|w| w.unread_from()).min().unwrap_or(u64::MAX);
        let expiry = self.opts.peer_expiry_ns;
        let mut gone = Vec::new();
        self.dead.retain(|id, died| {
            let Some(s) = self.entities.get(id) else { return false };
            if s.is_alive() {
                return false;
            }
            let released = s.seq < behind
                && match acked {
                    Some(mark) => s.seq <= mark,
                    None => !self.replicating || died.saturating_add(expiry) <= wall,
                };
            // A delete stamped ahead of our clock stays until the clock passes it: new
            // writes are then stamped after it even here, where it is forgotten.
            let current = s.deleted.is_none_or(|d| d.ts.physical <= wall);
            if released && current && s.ctx.covered_by(&self.seen) {
                gone.push((id.clone(), s.seq));
                return false;
            }
            true
        });
        for (id, seq) in gone.iter() {
            self.floor = self.floor.max(*seq);
            self.log.remove(seq);
            self.entities.remove(id);
        }
        if let Some(p) = &mut self.persist {
            p.forgotten.extend(gone.iter().map(|(id, _)| id.clone()));
        }
        self.counters.collected += gone.len() as u64;
        gone.len()
    }

    // ---- watchers --------------------------------------------------------------------

    /// Registers a watcher; with `since`, first queues every entity changed after that
    /// cursor (current state), else with `include_existing` every live entity.
    pub fn watch(&mut self, spec: WatchSpec, include_existing: bool, since: Option<u64>) -> Result<Arc<Watch>> {
        if let Some(seq) = since {
            if self.cursor_expired(seq) {
                return Err(Error::CursorExpired { seq, floor: self.floor });
            }
        }
        self.feed.keep_at_least(FEED_QUEUES * spec.capacity);
        let start = self.mark(spec.type_filter);
        let w = Watch::new(self.next_watch_id, spec, self.feed.clone(), start);
        self.next_watch_id += 1;
        if include_existing && since.is_none() {
            w.set_snapshot_until(self.seq);
        }
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
                if w.matches(s.shown_type()) {
                    // (A snapshot that does not fit is caught up, not counted as folded.)
                    w.push(Event::new(s, kind, &self.registry, &w.spec, None));
                }
            }
        }
        self.watchers.push(w.clone());
        self.projected += w.spec.projection.is_some() as usize;
        Ok(w)
    }

    pub fn unwatch(&mut self, id: u64) {
        self.watchers.retain(|w| {
            if w.id == id {
                w.close();
            }
            w.id != id
        });
        self.projected = self.watchers.iter().filter(|w| w.spec.projection.is_some()).count();
        if self.watchers.is_empty() {
            // Old changes must not keep old states alive (a write would copy them).
            self.feed.clear();
        }
    }

    /// Where a watcher of `type_filter` reads the feed from, as of now.
    fn mark(&self, type_filter: i32) -> Mark {
        Mark { position: self.changes, seq: self.seq, matched: self.changes_for(type_filter) }
    }

    /// Publishes the current operation's changes to the feed (once per operation: a
    /// batch takes the feed's lock once) and wakes the watchers waiting for them; every
    /// public operation that changes entities ends with it.
    fn publish(&mut self) {
        if self.watchers.is_empty() {
            return;
        }
        let head = self.changes - self.fresh.len() as u64;
        for w in self.feed.publish(head, self.seq, self.fresh.drain(..)) {
            if let Some(w) = w.upgrade() {
                if w.wake() {
                    self.wake.push(w.id);
                }
            }
        }
    }

    /// Changes watchers of `type_filter` were told of (see `changes`).
    fn changes_for(&self, type_filter: i32) -> u64 {
        if type_filter == 0 {
            self.changes
        } else {
            self.changes_by_type.get(&type_filter).copied().unwrap_or(0)
        }
    }

    /// The changes `w` skipped so far while behind (not yet in its `coalesced`).
    pub fn folded(&self, w: &Watch) -> u64 {
        w.folded_since_behind(self.changes_for(w.spec.type_filter))
    }

    /// Adds a change to the feed's next publication: the watchers read it from there,
    /// so whatever their number, a change costs one entry.
    fn emit(&mut self, state: &Arc<EntityState>, kind: EventKind, changed: Option<&[Sym]>) {
        let etype = state.shown_type();
        self.changes += 1;
        *self.changes_by_type.entry(etype).or_default() += 1;
        self.fresh.push(Arc::new(Change {
            kind,
            etype,
            state: state.clone(),
            changed: changed.filter(|_| self.projected > 0).map(Arc::from),
            registry: self.registry.clone(),
            encoded: Arc::default(),
        }));
    }

    /// Catches a watcher that fell behind up from the change log, once its consumer has
    /// drained its queue: queues the latest state of up to `CATCH_UP_STEP` entities
    /// changed since (UPDATED, DELETED if gone, in change order), and makes the watcher
    /// plain again when the log is read to its end. Consumers call it before taking
    /// events; a no-op for a watcher that is not behind.
    pub fn catch_up(&mut self, w: &Arc<Watch>) {
        let Some((from, snapshot_until)) = w.catch_up_from() else { return };
        // A step holds the table lock: short steps let writes in between (a hundred
        // watchers catching up must not stall ingest); the consumer takes the next step
        // once it has drained this one.
        let step = w.spec.capacity.min(CATCH_UP_STEP);
        let mut events = Vec::with_capacity(step.min(self.log.len()));
        let mut next = None;
        for (&seq, id) in self.log.range(from..) {
            if events.len() == step {
                next = Some(seq);
                break;
            }
            let s = &self.entities[id];
            if !w.matches(s.shown_type()) {
                continue;
            }
            let kind = match (s.is_alive(), seq <= snapshot_until) {
                (false, _) => EventKind::Deleted,
                (true, true) => EventKind::Created,
                (true, false) => EventKind::Updated,
            };
            events.push(Event::new(s, kind, &self.registry, &w.spec, None));
        }
        w.push_caught_up(events);
        w.caught_up(next, self.mark(w.spec.type_filter));
    }

    pub fn watchers(&self) -> &[Arc<Watch>] {
        &self.watchers
    }

    /// (alive, deleted and not yet forgotten)
    pub fn entity_count(&self) -> (usize, usize) {
        let dead = self.dead.len();
        (self.entities.len() - dead, dead)
    }

    pub fn payload_bytes(&self) -> usize {
        self.entities.values().map(|s| s.payload_bytes()).sum()
    }

    pub fn log_len(&self) -> usize {
        self.log.len()
    }
}

