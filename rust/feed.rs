//! The feed: the table's recent changes, kept once for every watcher.
//!
//! A write appends its change to the table's buffer, and the table publishes the buffer
//! here once per operation (one lock for a whole batch); each watcher then *pulls* from
//! its own position when its consumer asks for events (`Watch::poll`, `poll_ready`,
//! `arm`). So a write costs the same whatever the number of watchers: it never touches
//! a watcher's queue, and the only per-watcher work it does is to wake the consumers
//! that wait (each once per wait, not once per change).
//!
//! Positions count the changes announced to watchers (`Table::changes`): the feed holds
//! positions `first..first + len`. It drops a change once every watcher reading it has
//! read it (a change kept holds its entity's state, which the next write of the entity
//! would then have to copy), and keeps at most the last `keep` changes (twice the largest
//! watch queue): a watcher whose position has been dropped unread falls behind and
//! catches up from the table's log, as one whose queue filled up does.
//!
//! Lock order: a watcher's queue, then the feed. Publishing takes the feed lock alone
//! and wakes the parked watchers after releasing it.
use crate::entity::EntityState;
use crate::intern::Sym;
use crate::strategy::Registry;
use crate::watch::{EventKind, Watch};
use ahash::AHashMap;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock, Weak};

/// One change as every watcher sees it.
pub struct Change {
    pub kind: EventKind,
    /// The entity type shown (what type filters match).
    pub etype: i32,
    /// The entity after the change (its `seq` is the change's).
    pub state: Arc<EntityState>,
    /// The keys an update touched, kept only while a watcher has a projection (None:
    /// unknown or not needed, every projected watcher is told).
    pub changed: Option<Arc<[Sym]>>,
    /// The strategies in force (they pick the values shown).
    pub registry: Arc<Registry>,
    /// The entity's bytes as unprojected watchers see them, encoded once for all.
    pub encoded: Arc<OnceLock<Vec<u8>>>,
}

#[derive(Default)]
pub struct Feed {
    ring: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    changes: VecDeque<Arc<Change>>,
    /// Position of `changes[0]`.
    first: u64,
    /// The table's seq as of the last publication: a watcher that has read every change
    /// has read up to it (the changes in between announced nothing).
    seq: u64,
    keep: usize,
    /// The next position of each watcher reading the feed (not behind), by watch id.
    readers: AHashMap<u64, u64>,
    /// Watchers whose consumer waits for the next change.
    parked: Vec<Weak<Watch>>,
}

/// What a watcher found in the feed from its position on.
pub enum Unread {
    /// The changes from the position on.
    Changes(Vec<Arc<Change>>),
    /// None: every change published is read, up to this seq of the table.
    UpToDate(u64),
    /// The position was dropped: the watcher must catch up from the log.
    Dropped,
}

impl Feed {
    /// Keeps at least `n` changes from now on (a watcher with a queue that long joined).
    pub fn keep_at_least(&self, n: usize) {
        let mut r = self.ring.lock();
        r.keep = r.keep.max(n);
    }

    /// Appends changes at positions `head..` (the table's seq now `seq`), drops what is
    /// past `keep`, and returns the watchers that were waiting if there are changes (the
    /// caller wakes them, the feed lock released).
    pub fn publish(&self, head: u64, seq: u64, fresh: impl ExactSizeIterator<Item = Arc<Change>>) -> Vec<Weak<Watch>> {
        let mut r = self.ring.lock();
        r.seq = seq;
        if fresh.len() == 0 {
            return Vec::new();
        }
        if r.changes.is_empty() {
            r.first = head;
        }
        debug_assert_eq!(r.first + r.changes.len() as u64, head, "positions are contiguous");
        r.changes.extend(fresh);
        // What every reader has read goes (a reader whose position is dropped already
        // falls behind when it next reads), and what is past `keep`.
        let first = r.first;
        let end = first + r.changes.len() as u64;
        let read = r.readers.values().copied().filter(|&p| p >= first).min().unwrap_or(end);
        let drop = ((read - first) as usize).max(r.changes.len().saturating_sub(r.keep));
        r.changes.drain(..drop);
        r.first += drop as u64;
        std::mem::take(&mut r.parked)
    }

    /// Watch `id` reads the feed from `position` on (registered, or caught up).
    pub fn join(&self, id: u64, position: u64) {
        self.ring.lock().readers.insert(id, position);
    }

    /// Watch `id` no longer reads the feed (behind, or closed).
    pub fn leave(&self, id: u64) {
        let mut r = self.ring.lock();
        r.readers.remove(&id);
        r.parked.retain(|w| w.upgrade().is_some_and(|w| w.id != id));
    }

    /// The table's seq a watcher at `position` has read up to, if it has read every
    /// change published.
    pub fn read_up_to(&self, position: u64) -> Option<u64> {
        let r = self.ring.lock();
        (position >= r.first + r.changes.len() as u64).then_some(r.seq)
    }

    /// Forgets every change (the last watcher left: nothing may keep old states alive).
    pub fn clear(&self) {
        let mut r = self.ring.lock();
        let len = r.changes.len() as u64;
        r.changes.clear();
        r.first += len;
        r.parked.clear();
    }

    /// Up to `max` changes for watch `id` from `position` on (the watcher reads them:
    /// its position moves past them); with none, `park` is registered to be returned by
    /// the next `publish` with changes (checked and parked under one lock: no change can
    /// slip in between).
    pub fn read(&self, id: u64, position: u64, max: usize, park: Option<&Weak<Watch>>) -> Unread {
        let mut r = self.ring.lock();
        if position < r.first {
            return Unread::Dropped;
        }
        let from = ((position - r.first) as usize).min(r.changes.len());
        if from == r.changes.len() {
            if let Some(w) = park {
                r.parked.push(w.clone());
            }
            return Unread::UpToDate(r.seq);
        }
        let unread: Vec<_> = r.changes.range(from..).take(max).cloned().collect();
        r.readers.insert(id, position + unread.len() as u64);
        Unread::Changes(unread)
    }

    #[cfg(test)]
    pub fn parked(&self) -> usize {
        self.ring.lock().parked.len()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ring.lock().changes.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::intern::intern;

    /// An update of entity `id` (type 1, from node "n") at `seq`, for tests.
    pub(crate) fn update(seq: u64, id: &str) -> Change {
        let mut state = EntityState::new(Arc::from(id), intern("n"));
        state.seq = seq;
        Change {
            kind: EventKind::Updated,
            etype: 1,
            state: Arc::new(state),
            changed: None,
            registry: Arc::default(),
            encoded: Arc::default(),
        }
    }

    fn change(seq: u64) -> Arc<Change> {
        Arc::new(update(seq, "a"))
    }

    #[test]
    fn a_change_every_reader_has_read_is_dropped_at_the_next_publication() {
        let feed = Feed::default();
        feed.keep_at_least(100);
        feed.join(1, 0);
        feed.join(2, 0);
        feed.publish(0, 1, [change(1), change(2)].into_iter());
        assert!(matches!(feed.read(1, 0, 10, None), Unread::Changes(c) if c.len() == 2));
        feed.publish(2, 3, [change(3)].into_iter());
        assert_eq!(feed.len(), 3, "reader 2 has read nothing yet");
        assert!(matches!(feed.read(2, 0, 10, None), Unread::Changes(c) if c.len() == 3));
        feed.publish(3, 4, [change(4)].into_iter());
        assert_eq!(feed.len(), 2, "both read 1 and 2; reader 1 has still to read 3");
        feed.leave(1);
        feed.publish(4, 5, [change(5)].into_iter());
        assert_eq!(feed.len(), 2, "reader 2 has still to read 4 and 5");
    }

    #[test]
    fn past_keep_a_change_goes_read_or_not_and_its_reader_learns_it_was_dropped() {
        let feed = Feed::default();
        feed.keep_at_least(2);
        feed.join(1, 0);
        feed.publish(0, 3, [change(1), change(2), change(3)].into_iter());
        assert_eq!(feed.len(), 2);
        assert!(matches!(feed.read(1, 0, 10, None), Unread::Dropped));
        assert!(matches!(feed.read(1, 3, 10, None), Unread::UpToDate(3)));
    }
}
