//! Watchers: a bounded event queue per subscriber that never drops silently.
//!
//! When a queue is full its watcher falls *behind*: writes stop queueing events for it
//! (they skip it with one atomic load, so a stuck watcher costs a writer nothing), and
//! once its consumer has drained the queue it *catches up* from the table's change log
//! (`Table::catch_up`): the latest state of every entity changed since it fell behind,
//! in change order, as UPDATED (DELETED if gone), like a resume. Every change skipped
//! meanwhile and not delivered one by one is counted (`coalesced`). Memory is then
//! bounded by the queue size, a slow consumer still ends on the true state, and once
//! caught up the watcher is plain again. `min_interval` holds back an entity's events
//! until the interval since its last one has passed, then releases the latest.
//!
//! Both reorder events, so an event's change seq is not a safe resume point: a held
//! event can jump ahead of older pending ones. Each delivered event therefore carries a
//! `cursor`: the highest seq such that every change up to it has been delivered (the
//! first change folded into each pending slot bounds it). Resuming from the last
//! delivered cursor misses nothing; it equals the change seq when nothing was reordered.
use crate::entity::{EntityState, View};
use crate::strategy::Registry;
use crate::intern::Sym;
use parking_lot::{Condvar, Mutex};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use crate::wire::{put_bytes_field, put_len_prefix, put_varint_field};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Created = 1,
    Updated = 2,
    Deleted = 3,
}

impl EventKind {
    /// The kind of one event standing for `self` followed by `next`.
    fn then(self, next: EventKind) -> EventKind {
        match (self, next) {
            (EventKind::Created, EventKind::Updated) => EventKind::Created,
            _ => next,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Event {
    /// The change this event reports (the latest one folded into it).
    pub seq: u64,
    /// Resume point, set on delivery (see the module docs).
    pub cursor: u64,
    pub kind: EventKind,
    pub id: Arc<str>,
    /// Node the change came from.
    pub source: Sym,
    /// The entity after the change, shared by every watcher's event.
    pub state: Arc<EntityState>,
    /// The watcher's component projection.
    pub projection: Option<Arc<[Sym]>>,
    /// The strategies in force when the event was made (they pick the values shown).
    pub registry: Arc<Registry>,
    /// The entity's bytes, encoded once: shared by the events of one change for every
    /// watcher that sees it the same way (no projection), so a hundred watchers cost one
    /// encoding.
    pub encoded: Arc<OnceLock<Vec<u8>>>,
}

impl Event {
    /// The entity (user view, projected) as `entity.v1.Entity` bytes.
    pub fn entity_bytes(&self) -> &[u8] {
        self.encoded.get_or_init(|| {
            self.state.to_bytes(View { full: false, projection: self.projection.as_deref() }, &self.registry)
        })
    }

    /// The event as `store.v1.EntityEvent` bytes around the given entity bytes: type,
    /// entity, origin node and the resume cursor as `seq`.
    pub fn to_wire(&self, entity: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(entity.len() + 32);
        put_varint_field(&mut out, 1, self.kind as u64);
        put_len_prefix(&mut out, 2, entity.len());
        out.extend_from_slice(entity);
        put_bytes_field(&mut out, 3, self.source.as_str().as_bytes());
        put_varint_field(&mut out, 4, self.cursor);
        out
    }
}

pub struct WatchSpec {
    pub type_filter: i32,
    pub projection: Option<Arc<[Sym]>>,
    pub min_interval: Duration,
    pub capacity: usize,
}

/// A pending event and the seq of the first change folded into it.
struct Slot {
    event: Event,
    first_seq: u64,
}

#[derive(Default)]
struct Queue {
    /// Pending events, in order.
    events: VecDeque<Slot>,
    live: usize,
    /// While behind: the seq from which the table's log still has to be read.
    catch_from: u64,
    /// Entities changed up to this seq belong to the watcher's initial snapshot
    /// (`include_existing`): caught up, they are CREATED.
    snapshot_until: u64,
    /// Events delivered by catch-up since the watcher fell behind.
    caught_up: u64,
    /// The table's count of changes this watcher matches, as it fell behind (`Table`
    /// keeps the count: the changes skipped since are the difference).
    behind_mark: u64,
    coalesced: u64,
    delivered: u64,
    last_sent: HashMap<Arc<str>, Instant>,
    held: HashMap<Arc<str>, Slot>,
    held_due: BinaryHeap<Reverse<(Instant, u64)>>,
    held_ids: HashMap<u64, Arc<str>>,
    held_serial: u64,
    /// A Python async consumer waits to be told when the queue stops being empty.
    armed: bool,
    /// A Rust async consumer's waker (`poll_ready`), woken on the same occasions.
    waker: Option<Waker>,
    closed: bool,
}

pub struct Watch {
    pub id: u64,
    pub spec: WatchSpec,
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Mirrors of "behind" and "closed", read without the queue lock.
    behind: AtomicBool,
    closed: AtomicBool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct WatchStats {
    pub queued: usize,
    pub held: usize,
    pub coalesced: u64,
    pub delivered: u64,
    pub coalescing: bool,
}

impl Watch {
    pub fn new(id: u64, spec: WatchSpec) -> Self {
        Watch {
            id,
            spec,
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            behind: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    pub fn matches(&self, etype: i32) -> bool {
        self.spec.type_filter == 0 || self.spec.type_filter == etype
    }

    /// Whether writes skip this watcher (its queue filled up: it catches up later).
    pub fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// Queues an event. Returns true if an armed async consumer must be woken.
    pub fn push(&self, event: Event) -> bool {
        let mut q = self.queue.lock();
        if q.closed || self.is_behind() {
            return false;
        }
        let now = Instant::now();
        match self.pace(&mut q, event, now) {
            Ok(event) => {
                let first_seq = event.seq;
                self.enqueue(&mut q, Slot { event, first_seq }, now)
            }
            Err(newly_held) => newly_held && std::mem::take(&mut q.armed),
        }
    }

    /// `min_interval`: an event of an entity sent less than the interval ago is held
    /// until then (folded into the one held already, if any). Returns the event if it
    /// goes now, else whether it was newly held (its consumer was told the new due time).
    fn pace(&self, q: &mut Queue, event: Event, now: Instant) -> Result<Event, bool> {
        if self.spec.min_interval.is_zero() {
            return Ok(event);
        }
        if let Some(held) = q.held.get_mut(&event.id) {
            held.event = Event { kind: held.event.kind.then(event.kind), ..event };
            q.coalesced += 1;
            return Err(false);
        }
        if let Some(&last) = q.last_sent.get(&event.id) {
            if now < last + self.spec.min_interval {
                q.held_serial += 1;
                let serial = q.held_serial;
                q.held_due.push(Reverse((last + self.spec.min_interval, serial)));
                q.held_ids.insert(serial, event.id.clone());
                let first_seq = event.seq;
                q.held.insert(event.id.clone(), Slot { event, first_seq });
                // Waiting consumers must learn the new due time: a sleeping poll
                // re-computes its deadline, an armed async consumer re-arms.
                self.ready.notify_one();
                wake_rust(q);
                return Err(true);
            }
        }
        Ok(event)
    }

    /// Queues a slot (the queue has room); with `min_interval`, its entity's next event
    /// waits from now.
    fn queue_slot(&self, q: &mut Queue, slot: Slot, now: Instant) {
        if !self.spec.min_interval.is_zero() {
            q.last_sent.insert(slot.event.id.clone(), now);
        }
        q.events.push_back(slot);
        q.live += 1;
    }

    fn enqueue(&self, q: &mut Queue, slot: Slot, now: Instant) -> bool {
        if q.live >= self.spec.capacity {
            // Full: fall behind. This change and every later one come from the table's
            // log once the consumer has drained the queue.
            q.catch_from = slot.first_seq;
            q.caught_up = 0;
            self.behind.store(true, Ordering::Release);
            // The consumer must learn it has to catch up even if it is waiting.
            self.ready.notify_one();
            wake_rust(q);
            return std::mem::take(&mut q.armed);
        }
        self.queue_slot(q, slot, now);
        self.ready.notify_one();
        wake_rust(q);
        std::mem::take(&mut q.armed)
    }

    /// While behind: the seq its catch-up has still to read the log from.
    pub fn catch_from(&self) -> Option<u64> {
        self.is_behind().then(|| self.queue.lock().catch_from)
    }

    /// Marks changes up to `seq` as the initial snapshot (before any event is pushed).
    pub fn set_snapshot_until(&self, seq: u64) {
        self.queue.lock().snapshot_until = seq;
    }

    /// For `Table::catch_up`: the seq to read the log from and the end of the initial
    /// snapshot (alive entities up to it are CREATED), if this watcher is behind and its
    /// consumer has drained the queue (else None: nothing to do now).
    pub fn catch_up_from(&self) -> Option<(u64, u64)> {
        let q = self.queue.lock();
        self.catch_up_due(&q).then_some((q.catch_from, q.snapshot_until))
    }

    /// Queues the events read from the log by one catch-up step (the queue has room: the
    /// caller reads at most `spec.capacity` after `catch_up_from`), paced by
    /// `min_interval` as live events are: a watcher behind gets an entity no more often.
    pub fn push_caught_up(&self, events: Vec<Event>) -> bool {
        let mut q = self.queue.lock();
        q.caught_up += events.len() as u64;
        let now = Instant::now();
        for event in events {
            if let Ok(event) = self.pace(&mut q, event, now) {
                self.queue_slot(&mut q, Slot { first_seq: event.seq, event }, now);
            }
        }
        self.ready.notify_one();
        wake_rust(&mut q);
        std::mem::take(&mut q.armed)
    }

    /// Records the table's count of matching changes as the watcher fell behind.
    pub fn set_behind_mark(&self, changes: u64) {
        self.queue.lock().behind_mark = changes;
    }

    /// Changes skipped while behind and not delivered one by one, given the table's
    /// count of matching changes now (0 when not behind).
    pub fn folded_since_behind(&self, changes: u64) -> u64 {
        let q = self.queue.lock();
        if !self.is_behind() {
            return 0;
        }
        changes.saturating_sub(q.behind_mark).saturating_sub(q.caught_up)
    }

    /// Ends a catch-up step: `next` is where the next step reads from, None once the
    /// log is read to its end (`changes`: the table's count of matching changes; the
    /// watcher is plain again: called under the table lock, so no write comes in
    /// between).
    pub fn caught_up(&self, next: Option<u64>, changes: u64) {
        let mut q = self.queue.lock();
        match next {
            Some(seq) => q.catch_from = seq,
            None => {
                let skipped = changes.saturating_sub(q.behind_mark);
                q.coalesced += skipped.saturating_sub(q.caught_up);
                q.caught_up = 0;
                self.behind.store(false, Ordering::Release);
            }
        }
    }

    fn release_held(&self, q: &mut Queue, now: Instant) -> bool {
        let mut wake = false;
        while let Some(&Reverse((due, serial))) = q.held_due.peek() {
            if due > now {
                break;
            }
            q.held_due.pop();
            let id = q.held_ids.remove(&serial).expect("held serial has an id");
            if let Some(slot) = q.held.remove(&id) {
                wake |= self.enqueue(q, slot, now);
            }
        }
        wake
    }

    /// When the next held event falls due (the consumer must look again by itself then).
    fn next_due(q: &Queue) -> Option<Instant> {
        q.held_due.peek().map(|Reverse((due, _))| *due)
    }

    /// Behind with a drained queue: the consumer catches up before taking more.
    fn catch_up_due(&self, q: &Queue) -> bool {
        self.is_behind() && q.live == 0 && !q.closed
    }

    fn take(&self, q: &mut Queue, max: usize) -> Vec<Event> {
        let mut out = Vec::with_capacity(max.min(q.live));
        let held_first = q.held.values().map(|s| s.first_seq).min().unwrap_or(u64::MAX);
        // While behind, nothing from `catch_from` on has been delivered yet.
        let unread = if self.is_behind() { q.catch_from } else { u64::MAX };
        while out.len() < max {
            let Some(Slot { mut event, .. }) = q.events.pop_front() else { break };
            q.live -= 1;
            let next_first = q.events.front().map_or(u64::MAX, |s| s.first_seq);
            event.cursor = event.seq.min(next_first.min(held_first).min(unread).saturating_sub(1));
            out.push(event);
        }
        q.delivered += out.len() as u64;
        out
    }

    /// Takes up to `max` events, waiting up to `timeout` for the first one.
    /// Returns an empty list on timeout or once closed.
    pub fn poll(&self, max: usize, timeout: Duration) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        let mut q = self.queue.lock();
        loop {
            let now = Instant::now();
            self.release_held(&mut q, now);
            // Behind with an empty queue: return so the caller catches up.
            if q.live > 0 || q.closed || now >= deadline || self.catch_up_due(&q) {
                return self.take(&mut q, max.max(1));
            }
            let until = Self::next_due(&q).map_or(deadline, |d| d.min(deadline));
            self.ready.wait_until(&mut q, until);
        }
    }

    /// For async consumers: true if events are ready now; otherwise arms the waker
    /// (the next push reports it) and returns false. Also returns when the next held
    /// event falls due, so the consumer can sleep until then.
    pub fn arm(&self) -> (bool, Option<Duration>) {
        let mut q = self.queue.lock();
        let now = Instant::now();
        self.release_held(&mut q, now);
        if q.live > 0 || q.closed || self.catch_up_due(&q) {
            return (true, None);
        }
        q.armed = true;
        (false, Self::next_due(&q).map(|d| d.saturating_duration_since(now)))
    }

    /// For async consumers in Rust: true if events are ready now (or the watch is
    /// closed); otherwise `waker` is woken on the next event, and the time until the next
    /// held event falls due is returned (the consumer wakes itself then).
    pub fn poll_ready(&self, waker: &Waker) -> (bool, Option<Duration>) {
        let mut q = self.queue.lock();
        let now = Instant::now();
        self.release_held(&mut q, now);
        if q.live > 0 || q.closed || self.catch_up_due(&q) {
            return (true, None);
        }
        if !q.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            q.waker = Some(waker.clone());
        }
        (false, Self::next_due(&q).map(|d| d.saturating_duration_since(now)))
    }

    pub fn close(&self) {
        let mut q = self.queue.lock();
        q.closed = true;
        self.closed.store(true, Ordering::Release);
        q.events.clear();
        q.live = 0;
        self.ready.notify_all();
        wake_rust(&mut q);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> WatchStats {
        let q = self.queue.lock();
        WatchStats {
            queued: q.live,
            held: q.held.len(),
            // Up to the last catch-up pass; `Table::watch_stats` adds what is skipped now.
            coalesced: q.coalesced,
            delivered: q.delivered,
            coalescing: self.is_behind(),
        }
    }
}

fn wake_rust(q: &mut Queue) {
    if let Some(w) = q.waker.take() {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intern::intern;

    fn ev(seq: u64, id: &str, kind: EventKind) -> Event {
        let state = Arc::new(EntityState::new(Arc::from(id), intern("n")));
        let registry = Arc::new(Registry::default());
        Event {
            seq,
            cursor: seq,
            kind,
            id: Arc::from(id),
            source: intern("n"),
            state,
            projection: None,
            registry,
            encoded: Arc::default(),
        }
    }

    fn watch(capacity: usize, min_interval: Duration) -> Watch {
        Watch::new(1, WatchSpec { type_filter: 0, projection: None, min_interval, capacity })
    }

    #[test]
    fn a_full_queue_falls_behind_and_asks_for_a_catch_up_once_drained() {
        let w = watch(2, Duration::ZERO);
        w.push(ev(1, "a", EventKind::Created));
        w.push(ev(2, "b", EventKind::Created));
        w.push(ev(3, "a", EventKind::Updated)); // full: behind from seq 3
        w.set_behind_mark(2); // the table had counted 3 matching changes; this one was skipped
        assert!(w.is_behind() && w.stats().coalescing);
        assert!(!w.push(ev(4, "c", EventKind::Created)), "skipped while behind");
        assert_eq!(w.catch_up_from(), None, "not before the queue is drained");
        let got: Vec<_> = w.poll(10, Duration::ZERO).into_iter().map(|e| (e.seq, e.cursor)).collect();
        assert_eq!(got, [(1, 1), (2, 2)]);
        assert_eq!(w.catch_up_from(), Some((3, 0)));
        // The table queues what changed since (here: a and c), then it is plain again.
        w.push_caught_up(vec![ev(3, "a", EventKind::Updated), ev(4, "c", EventKind::Updated)]);
        w.caught_up(None, 4);
        assert!(!w.is_behind());
        assert_eq!(w.poll(10, Duration::ZERO).iter().map(|e| (e.seq, e.cursor)).collect::<Vec<_>>(), [(3, 3), (4, 4)]);
        w.push(ev(5, "a", EventKind::Updated));
        assert_eq!(w.stats().queued, 1, "queues again");
        assert_eq!(w.stats().coalesced, 0, "every skipped change was delivered");
    }

    #[test]
    fn skipped_changes_not_delivered_one_by_one_count_as_coalesced() {
        let w = watch(1, Duration::ZERO);
        w.push(ev(1, "a", EventKind::Created));
        w.push(ev(2, "a", EventKind::Updated)); // behind
        w.set_behind_mark(1);
        assert_eq!(w.folded_since_behind(4), 3, "three changes skipped, none delivered yet");
        w.poll(10, Duration::ZERO);
        w.catch_up_from();
        w.push_caught_up(vec![ev(4, "a", EventKind::Updated)]);
        w.caught_up(None, 4);
        assert_eq!(w.stats().coalesced, 2, "three changes of a, one event");
    }

    #[test]
    fn min_interval_holds_then_releases_latest() {
        let w = watch(100, Duration::from_millis(30));
        w.push(ev(1, "a", EventKind::Updated));
        w.push(ev(2, "a", EventKind::Updated));
        w.push(ev(3, "a", EventKind::Updated));
        assert_eq!(w.poll(10, Duration::ZERO).iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
        let later = w.poll(10, Duration::from_secs(2));
        assert_eq!(later.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn arm_reports_wake_once() {
        let w = watch(10, Duration::ZERO);
        assert_eq!(w.arm(), (false, None));
        assert!(w.push(ev(1, "a", EventKind::Created)));
        assert!(!w.push(ev(2, "a", EventKind::Updated)), "already woken");
        assert!(w.arm().0);
    }

    #[test]
    fn close_wakes_a_blocked_poll() {
        let w = Arc::new(watch(10, Duration::ZERO));
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.poll(1, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        w.close();
        assert!(t.join().unwrap().is_empty());
    }
}
