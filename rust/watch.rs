//! Watchers: a bounded event queue per subscriber that never drops silently.
//!
//! A watcher fills its queue itself, from the table's feed (`feed`), when its consumer
//! asks for events: writes never touch it, so a hundred watchers cost a writer what one
//! does. When the queue is full and more changes wait, or the feed has dropped changes
//! the watcher did not read, it falls *behind*, and once its consumer has drained the
//! queue it *catches up* from the table's change log
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
use crate::entity::{meta_key, EntityState, View};
use crate::feed::{Change, Feed, Unread};
use crate::strategy::Registry;
use crate::intern::Sym;
use parking_lot::{Condvar, Mutex};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use crate::wire::{put_bytes_field, put_len_prefix, put_varint_field};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
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
    /// The event a watcher with `spec` sees of `state` after a change of `kind`. `shared`
    /// is the unprojected encoding every watcher of that change shares; None (snapshot,
    /// catch-up) encodes for this watcher alone.
    pub fn new(state: &Arc<EntityState>, kind: EventKind, registry: &Arc<Registry>, spec: &WatchSpec,
               shared: Option<&Arc<OnceLock<Vec<u8>>>>) -> Event {
        Event {
            seq: state.seq,
            cursor: state.seq,
            kind,
            id: state.id.clone(),
            source: state.source,
            state: state.clone(),
            projection: spec.projection.clone(),
            registry: registry.clone(),
            encoded: shared.filter(|_| spec.projection.is_none()).cloned().unwrap_or_default(),
        }
    }

    /// The event a watcher with `spec` sees of a change from the feed.
    pub fn of(change: &Change, spec: &WatchSpec) -> Event {
        Event::new(&change.state, change.kind, &change.registry, spec, Some(&change.encoded))
    }

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
    /// The feed position of the next change to read.
    position: u64,
    /// The seq of the last change read from the feed (or caught up to): every change
    /// after it is still to be read.
    read_seq: u64,
    /// The table's count of changes of the watched type up to `position`.
    matched: u64,
    /// Registered with the feed to be woken by its next change.
    parked: bool,
    /// A Python async consumer waits to be told when the queue stops being empty.
    armed: bool,
    /// A Rust async consumer's waker (`poll_ready`), woken on the same occasions.
    waker: Option<Waker>,
    closed: bool,
}

pub struct Watch {
    pub id: u64,
    pub spec: WatchSpec,
    feed: Arc<Feed>,
    /// Itself, as the feed parks it.
    me: Weak<Watch>,
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

/// Where a watcher starts (or resumes after a catch-up) reading the feed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mark {
    /// The feed position of the next change.
    pub position: u64,
    /// The table's seq: every change after it is still to be read.
    pub seq: u64,
    /// The table's count of changes of the watched type so far.
    pub matched: u64,
}

impl Watch {
    pub fn new(id: u64, spec: WatchSpec, feed: Arc<Feed>, start: Mark) -> Arc<Self> {
        let queue = Queue { position: start.position, read_seq: start.seq, matched: start.matched, ..Queue::default() };
        feed.join(id, start.position);
        Arc::new_cyclic(|me| Watch {
            id,
            spec,
            feed,
            me: me.clone(),
            queue: Mutex::new(queue),
            ready: Condvar::new(),
            behind: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    pub fn matches(&self, etype: i32) -> bool {
        self.spec.type_filter == 0 || self.spec.type_filter == etype
    }

    /// Whether a change (of the watched type) is news to this watcher: an update of keys
    /// a projected watcher does not read changes nothing it sees.
    fn wants(&self, c: &Change) -> bool {
        match (c.kind, &c.changed, &self.spec.projection) {
            (EventKind::Updated, Some(keys), Some(projection)) => {
                keys.iter().any(|k| *k == meta_key() || projection.contains(k))
            }
            _ => true,
        }
    }

    /// Whether the watcher is behind: it catches up from the log before it reads the feed
    /// again.
    pub fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// Queues an event of the initial snapshot (`Table::watch`, before any consumer).
    pub fn push(&self, event: Event) {
        let mut q = self.queue.lock();
        if q.closed || self.is_behind() {
            return;
        }
        let now = Instant::now();
        if let Some(event) = self.pace(&mut q, event, now) {
            self.enqueue(&mut q, Slot { first_seq: event.seq, event }, now);
        }
    }

    /// Fills the queue from the feed, from the watcher's position on; falls behind if
    /// the queue fills up while changes remain, or the feed dropped some unread. With
    /// `park` and nothing to deliver, registers with the feed to be woken by its next
    /// change (`wake`).
    fn pull(&self, q: &mut Queue, now: Instant, park: bool) {
        loop {
            if q.closed || self.is_behind() {
                return;
            }
            let me = (park && !q.parked && q.live == 0).then_some(&self.me);
            let room = self.spec.capacity.saturating_sub(q.live);
            let changes = match self.feed.read(self.id, q.position, room + 1, me) {
                Unread::Dropped => return self.fall_behind(q, q.read_seq + 1),
                Unread::UpToDate(seq) => {
                    q.read_seq = q.read_seq.max(seq);
                    q.parked |= me.is_some();
                    return;
                }
                Unread::Changes(changes) => changes,
            };
            for c in changes {
                let matched = self.matches(c.etype);
                if matched && self.wants(&c) {
                    match self.pace(q, Event::of(&c, &self.spec), now) {
                        Some(_) if q.live >= self.spec.capacity => return self.fall_behind(q, c.state.seq),
                        Some(event) => self.queue_slot(q, Slot { first_seq: event.seq, event }, now),
                        None => {}
                    }
                }
                q.position += 1;
                q.read_seq = c.state.seq;
                q.matched += matched as u64;
            }
        }
    }

    /// The queue is full (or the feed dropped what the watcher had to read): from
    /// `from`, changes come from the table's log once the consumer has drained it.
    fn fall_behind(&self, q: &mut Queue, from: u64) {
        q.catch_from = from;
        q.caught_up = 0;
        q.behind_mark = q.matched;
        self.behind.store(true, Ordering::Release);
        self.feed.leave(self.id);
    }

    /// The feed has new changes: wakes the consumer. Returns true if an armed async
    /// (Python) consumer must be woken.
    pub fn wake(&self) -> bool {
        let mut q = self.queue.lock();
        q.parked = false;
        self.ready.notify_one();
        wake_rust(&mut q);
        std::mem::take(&mut q.armed)
    }

    /// `min_interval`: an event of an entity sent less than the interval ago is held
    /// until then (folded into the one held already, if any). Returns the event if it
    /// goes now (the consumer, who paces as it reads, then looks at the next due time).
    fn pace(&self, q: &mut Queue, event: Event, now: Instant) -> Option<Event> {
        if self.spec.min_interval.is_zero() {
            return Some(event);
        }
        if let Some(held) = q.held.get_mut(&event.id) {
            held.event = Event { kind: held.event.kind.then(event.kind), ..event };
            q.coalesced += 1;
            return None;
        }
        if let Some(&last) = q.last_sent.get(&event.id) {
            if now < last + self.spec.min_interval {
                q.held_serial += 1;
                let serial = q.held_serial;
                q.held_due.push(Reverse((last + self.spec.min_interval, serial)));
                q.held_ids.insert(serial, event.id.clone());
                let first_seq = event.seq;
                q.held.insert(event.id.clone(), Slot { event, first_seq });
                return None;
            }
        }
        Some(event)
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

    fn enqueue(&self, q: &mut Queue, slot: Slot, now: Instant) {
        if q.live >= self.spec.capacity {
            return self.fall_behind(q, slot.first_seq);
        }
        self.queue_slot(q, slot, now);
    }

    /// The lowest seq this watcher may still have to read from the table's log (a delete
    /// from it on must not be forgotten yet).
    pub fn unread_from(&self) -> u64 {
        let q = self.queue.lock();
        if self.is_behind() {
            return q.catch_from;
        }
        // A consumer waiting has read everything: it must not hold deletes back.
        self.feed.read_up_to(q.position).unwrap_or(q.read_seq).max(q.read_seq) + 1
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
    pub fn push_caught_up(&self, events: Vec<Event>) {
        let mut q = self.queue.lock();
        q.caught_up += events.len() as u64;
        let now = Instant::now();
        for event in events {
            if let Some(event) = self.pace(&mut q, event, now) {
                self.queue_slot(&mut q, Slot { first_seq: event.seq, event }, now);
            }
        }
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

    /// Ends a catch-up step: `next` is where the next step reads from; None once the
    /// log is read to its end, and the watcher reads the feed again from `now` (called
    /// under the table lock, so no write comes in between).
    pub fn caught_up(&self, next: Option<u64>, now: Mark) {
        let mut q = self.queue.lock();
        match next {
            Some(seq) => q.catch_from = seq,
            None => {
                let skipped = now.matched.saturating_sub(q.behind_mark);
                q.coalesced += skipped.saturating_sub(q.caught_up);
                q.caught_up = 0;
                q.position = now.position;
                q.read_seq = now.seq;
                q.matched = now.matched;
                self.behind.store(false, Ordering::Release);
                self.feed.join(self.id, now.position);
            }
        }
    }

    fn release_held(&self, q: &mut Queue, now: Instant) {
        while let Some(&Reverse((due, serial))) = q.held_due.peek() {
            if due > now {
                break;
            }
            q.held_due.pop();
            let id = q.held_ids.remove(&serial).expect("held serial has an id");
            if let Some(slot) = q.held.remove(&id) {
                self.enqueue(q, slot, now);
            }
        }
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
            self.pull(&mut q, now, true);
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
        self.pull(&mut q, now, true);
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
        self.pull(&mut q, now, true);
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
        self.feed.leave(self.id);
        q.events.clear();
        q.live = 0;
        self.ready.notify_all();
        wake_rust(&mut q);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The watcher's counters, once it has read the feed (a consumer that does not read
    /// shows its queue full, and behind once the changes overflow it). With nothing
    /// queued, held or behind, every change published so far has been delivered.
    pub fn stats(&self) -> WatchStats {
        let mut q = self.queue.lock();
        self.pull(&mut q, Instant::now(), false);
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
    use crate::feed::tests::update as change;

    /// The table's side of a feed, in miniature: publishes one change per write.
    #[derive(Default)]
    struct Writer {
        feed: Arc<Feed>,
        head: u64,
    }

    impl Writer {
        fn write(&mut self, seq: u64, id: &str, kind: EventKind) -> Vec<Weak<Watch>> {
            let change = Change { kind, ..change(seq, id) };
            self.head += 1;
            self.feed.publish(self.head - 1, seq, std::iter::once(Arc::new(change)))
        }

        fn watch(&self, capacity: usize, min_interval: Duration) -> Arc<Watch> {
            self.feed.keep_at_least(2 * capacity);
            let spec = WatchSpec { type_filter: 0, projection: None, min_interval, capacity };
            Watch::new(1, spec, self.feed.clone(), Mark { position: self.head, ..Mark::default() })
        }
    }

    fn seqs(events: Vec<Event>) -> Vec<(u64, u64)> {
        events.into_iter().map(|e| (e.seq, e.cursor)).collect()
    }

    #[test]
    fn a_full_queue_falls_behind_and_asks_for_a_catch_up_once_drained() {
        let mut t = Writer::default();
        let w = t.watch(2, Duration::ZERO);
        t.write(1, "a", EventKind::Created);
        t.write(2, "b", EventKind::Created);
        t.write(3, "a", EventKind::Updated); // no room: behind from seq 3 once read
        assert_eq!(seqs(w.poll(10, Duration::ZERO)), [(1, 1), (2, 2)]);
        assert!(w.is_behind() && w.stats().coalescing);
        assert_eq!(w.unread_from(), 3, "the log is read from the first change not queued");
        assert_eq!(w.catch_up_from(), Some((3, 0)));
        // The table queues what changed since (here: a and c), then it is plain again.
        t.write(4, "c", EventKind::Created);
        w.push_caught_up(vec![Event::of(&change(3, "a"), &w.spec), Event::of(&change(4, "c"), &w.spec)]);
        w.caught_up(None, Mark { position: t.head, seq: 4, matched: 4 });
        assert!(!w.is_behind());
        assert_eq!(seqs(w.poll(10, Duration::ZERO)), [(3, 3), (4, 4)]);
        t.write(5, "a", EventKind::Updated);
        assert_eq!(w.stats().queued, 1, "reads the feed again");
        assert_eq!(w.stats().coalesced, 0, "every skipped change was delivered");
    }

    #[test]
    fn skipped_changes_not_delivered_one_by_one_count_as_coalesced() {
        let mut t = Writer::default();
        let w = t.watch(1, Duration::ZERO);
        t.write(1, "a", EventKind::Created);
        t.write(2, "a", EventKind::Updated);
        assert_eq!(w.poll(10, Duration::ZERO).len(), 1); // change 2 found no room
        assert_eq!(w.folded_since_behind(4), 3, "three changes skipped, none delivered yet");
        assert!(w.catch_up_from().is_some());
        w.push_caught_up(vec![Event::of(&change(4, "a"), &w.spec)]);
        w.caught_up(None, Mark { position: 4, seq: 4, matched: 4 });
        assert_eq!(w.stats().coalesced, 2, "three changes of a, one event");
    }

    #[test]
    fn a_position_the_feed_dropped_falls_behind_from_the_last_change_read() {
        let mut t = Writer::default();
        let w = t.watch(2, Duration::ZERO);
        t.write(1, "a", EventKind::Created);
        assert_eq!(w.stats().queued, 1);
        for seq in 2..=6 {
            t.write(seq, "b", EventKind::Updated); // the feed keeps the last 4
        }
        assert_eq!(seqs(w.poll(10, Duration::ZERO)), [(1, 1)]);
        assert_eq!(w.catch_up_from(), Some((2, 0)));
    }

    #[test]
    fn a_type_filter_skips_other_changes_without_using_the_queue() {
        let mut t = Writer::default();
        t.feed.keep_at_least(8);
        let spec = WatchSpec { type_filter: 2, projection: None, min_interval: Duration::ZERO, capacity: 1 };
        let w = Watch::new(1, spec, t.feed.clone(), Mark::default());
        for seq in 1..=5 {
            t.write(seq, "a", EventKind::Updated); // type 1
        }
        let s = w.stats();
        assert_eq!((s.queued, s.coalescing), (0, false));
        assert_eq!(w.unread_from(), 6, "read past them");
    }

    #[test]
    fn min_interval_holds_then_releases_latest() {
        let mut t = Writer::default();
        let w = t.watch(100, Duration::from_millis(30));
        for seq in 1..=3 {
            t.write(seq, "a", EventKind::Updated);
        }
        assert_eq!(w.poll(10, Duration::ZERO).iter().map(|e| e.seq).collect::<Vec<_>>(), [1]);
        let later = w.poll(10, Duration::from_secs(2));
        assert_eq!(later.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn an_armed_consumer_is_woken_once_by_the_next_publication() {
        let mut t = Writer::default();
        let w = t.watch(10, Duration::ZERO);
        assert_eq!(w.arm(), (false, None));
        let parked = t.write(1, "a", EventKind::Created);
        assert_eq!(parked.len(), 1);
        assert!(parked[0].upgrade().unwrap().wake(), "armed: its consumer is told");
        assert!(t.write(2, "a", EventKind::Updated).is_empty(), "woken already");
        assert!(w.arm().0);
    }

    #[test]
    fn a_publication_wakes_a_blocked_poll() {
        let mut t = Writer::default();
        let w = t.watch(10, Duration::ZERO);
        let w2 = w.clone();
        let reader = std::thread::spawn(move || w2.poll(1, Duration::from_secs(30)));
        while t.feed.parked() == 0 {
            std::thread::sleep(Duration::from_millis(1)); // until the poll waits
        }
        for parked in t.write(1, "a", EventKind::Created) {
            parked.upgrade().unwrap().wake();
        }
        assert_eq!(seqs(reader.join().unwrap()), [(1, 1)]);
    }

    #[test]
    fn close_wakes_a_blocked_poll() {
        let t = Writer::default();
        let w = t.watch(10, Duration::ZERO);
        let w2 = w.clone();
        let reader = std::thread::spawn(move || w2.poll(1, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        w.close();
        assert!(reader.join().unwrap().is_empty());
    }
}
