//! Watchers: a bounded event queue per subscriber that never drops silently.
//!
//! When a queue is full it switches to coalescing: each entity keeps one pending event
//! (its latest state) at the position of its first pending one, and every event folded
//! into another is counted. Memory is then bounded by the number of entities, and a
//! slow consumer still ends on the true state. Once drained the queue is plain again.
//! `min_interval` holds back an entity's events until the interval since its last one
//! has passed, then releases the latest.
//!
//! Both reorder events, so an event's change seq is not a safe resume point: a folded
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
use std::sync::Arc;
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
}

impl Event {
    /// The entity (user view, projected) as `entity.v1.Entity` bytes.
    pub fn entity_bytes(&self) -> Vec<u8> {
        self.state.to_bytes(View { full: false, projection: self.projection.as_deref() }, &self.registry)
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
    /// Pending events in first-pending order; `None` marks a slot folded into an earlier one.
    events: VecDeque<Option<Slot>>,
    /// Ticket of the first slot in `events` (tickets only grow).
    base: u64,
    /// While coalescing: entity -> ticket of its pending event.
    pending: Option<HashMap<Arc<str>, u64>>,
    live: usize,
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
        Watch { id, spec, queue: Mutex::new(Queue::default()), ready: Condvar::new() }
    }

    pub fn matches(&self, etype: i32) -> bool {
        self.spec.type_filter == 0 || self.spec.type_filter == etype
    }

    /// Queues an event. Returns true if an armed async consumer must be woken.
    pub fn push(&self, event: Event) -> bool {
        let mut q = self.queue.lock();
        if q.closed {
            return false;
        }
        if !self.spec.min_interval.is_zero() {
            let now = Instant::now();
            if let Some(held) = q.held.get_mut(&event.id) {
                held.event = Event { kind: held.event.kind.then(event.kind), ..event };
                q.coalesced += 1;
                return false;
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
                    wake_rust(&mut q);
                    return std::mem::take(&mut q.armed);
                }
            }
            q.last_sent.insert(event.id.clone(), now);
        }
        let first_seq = event.seq;
        self.enqueue(&mut q, Slot { event, first_seq })
    }

    fn enqueue(&self, q: &mut Queue, slot: Slot) -> bool {
        let event = slot.event;
        if q.pending.is_none() && q.live >= self.spec.capacity {
            start_coalescing(q);
        }
        let ticket = q.base + q.events.len() as u64;
        if let Some(pending) = &mut q.pending {
            if let Some(&t) = pending.get(&event.id) {
                let pending = q.events[(t - q.base) as usize].as_mut().expect("pending slot holds an event");
                pending.event = Event { kind: pending.event.kind.then(event.kind), ..event };
                q.coalesced += 1;
                return false;
            }
            pending.insert(event.id.clone(), ticket);
        }
        q.events.push_back(Some(Slot { event, first_seq: slot.first_seq }));
        q.live += 1;
        self.ready.notify_one();
        wake_rust(q);
        std::mem::take(&mut q.armed)
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
                q.last_sent.insert(id, now);
                wake |= self.enqueue(q, slot);
            }
        }
        wake
    }

    fn next_due(q: &Queue) -> Option<Instant> {
        q.held_due.peek().map(|Reverse((due, _))| *due)
    }

    fn take(q: &mut Queue, max: usize) -> Vec<Event> {
        let mut out = Vec::with_capacity(max.min(q.live));
        let held_first = q.held.values().map(|s| s.first_seq).min().unwrap_or(u64::MAX);
        while out.len() < max {
            let Some(slot) = q.events.pop_front() else { break };
            q.base += 1;
            let Some(Slot { mut event, .. }) = slot else { continue };
            if let Some(pending) = &mut q.pending {
                pending.remove(&event.id);
            }
            q.live -= 1;
            let next_first = q.events.iter().flatten().next().map_or(u64::MAX, |s| s.first_seq);
            event.cursor = event.seq.min(next_first.min(held_first).saturating_sub(1));
            out.push(event);
        }
        if q.live == 0 {
            q.events.clear();
            q.pending = None; // drained: back to a plain queue
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
            if q.live > 0 || q.closed || now >= deadline {
                return Self::take(&mut q, max.max(1));
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
        if q.live > 0 || q.closed {
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
        if q.live > 0 || q.closed {
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
        q.events.clear();
        q.live = 0;
        q.pending = None;
        self.ready.notify_all();
        wake_rust(&mut q);
    }

    pub fn is_closed(&self) -> bool {
        self.queue.lock().closed
    }

    pub fn stats(&self) -> WatchStats {
        let q = self.queue.lock();
        WatchStats {
            queued: q.live,
            held: q.held.len(),
            coalesced: q.coalesced,
            delivered: q.delivered,
            coalescing: q.pending.is_some(),
        }
    }
}

fn wake_rust(q: &mut Queue) {
    if let Some(w) = q.waker.take() {
        w.wake();
    }
}

/// Switches a full queue to coalescing, folding events already queued for one entity.
fn start_coalescing(q: &mut Queue) {
    let mut pending: HashMap<Arc<str>, u64> = HashMap::with_capacity(q.live * 2);
    for i in 0..q.events.len() {
        let Some(slot) = q.events[i].take() else { continue };
        let ticket = q.base + i as u64;
        match pending.get(&slot.event.id) {
            Some(&first) => {
                let kept = q.events[(first - q.base) as usize].as_mut().expect("first slot is live");
                kept.event = Event { kind: kept.event.kind.then(slot.event.kind), ..slot.event };
                q.coalesced += 1;
                q.live -= 1;
            }
            None => {
                pending.insert(slot.event.id.clone(), ticket);
                q.events[i] = Some(slot);
            }
        }
    }
    q.pending = Some(pending);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intern::intern;

    fn ev(seq: u64, id: &str, kind: EventKind) -> Event {
        let state = Arc::new(EntityState::new(Arc::from(id), intern("n")));
        let registry = Arc::new(Registry::default());
        Event { seq, cursor: seq, kind, id: Arc::from(id), source: intern("n"), state, projection: None, registry }
    }

    fn watch(capacity: usize, min_interval: Duration) -> Watch {
        Watch::new(1, WatchSpec { type_filter: 0, projection: None, min_interval, capacity })
    }

    #[test]
    fn full_queue_coalesces_latest_per_entity_in_first_pending_order() {
        let w = watch(2, Duration::ZERO);
        w.push(ev(1, "a", EventKind::Created));
        w.push(ev(2, "b", EventKind::Created));
        w.push(ev(3, "a", EventKind::Updated));
        w.push(ev(4, "c", EventKind::Created));
        w.push(ev(5, "b", EventKind::Deleted));
        let got: Vec<_> =
            w.poll(10, Duration::ZERO).into_iter().map(|e| (e.seq, e.cursor, e.id.to_string(), e.kind)).collect();
        assert_eq!(
            got,
            [
                // a's event jumped ahead of b's first change (seq 2): resuming must start at 1.
                (3, 1, "a".into(), EventKind::Created),
                (5, 3, "b".into(), EventKind::Deleted),
                (4, 4, "c".into(), EventKind::Created)
            ]
        );
        let s = w.stats();
        assert_eq!((s.coalesced, s.coalescing), (2, false));
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
