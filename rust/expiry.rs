//! The due-time index of entity expiries: which live entities expire, ordered by when.
//!
//! The table keeps it as writes move expiries, so the host needs a single timer, armed
//! at the earliest due time, rather than one timer per entity: a sim that moves the
//! expiry of every track on every tick then costs a B-tree update per write, not a
//! timer reschedule in Python.
//!
//! Invariants:
//! - `due` holds exactly one `(expiry, id)` per live entity with an expiry (the table
//!   reports every move through `moved`).
//! - `armed` is the earliest due time the host has been told of since its timer last
//!   fired; a move to an earlier time leaves a `notice` to arm it. A move to a later
//!   time leaves none: the timer fires early, finds nothing due and re-arms at `next`.
use crate::entity::WallTime;
use std::collections::BTreeSet;
use std::sync::Arc;

#[derive(Default)]
pub struct Expiries {
    due: BTreeSet<(WallTime, Arc<str>)>,
    armed: Option<WallTime>,
    notice: Option<WallTime>,
}

impl Expiries {
    /// Records that the entity's live expiry went from `before` to `after`.
    pub fn moved(&mut self, id: &Arc<str>, before: Option<WallTime>, after: Option<WallTime>) {
        if before == after {
            return;
        }
        if let Some(b) = before {
            self.due.remove(&(b, id.clone()));
        }
        if let Some(a) = after {
            self.due.insert((a, id.clone()));
            if self.armed.map_or(true, |t| a < t) {
                self.armed = Some(a);
                self.notice = Some(a);
            }
        }
    }

    /// The earliest due time the host must arm a timer for, if it moved earlier since
    /// the last call.
    pub fn take_notice(&mut self) -> Option<WallTime> {
        self.notice.take()
    }

    /// Takes the next entity due at or before `now` (its expiry and id), if any.
    pub fn pop_due(&mut self, now: WallTime) -> Option<(WallTime, Arc<str>)> {
        if self.due.first().is_some_and(|(t, _)| *t <= now) {
            self.due.pop_first()
        } else {
            None
        }
    }

    /// Re-arms at the earliest due time left (what the host's timer must wait for next).
    pub fn rearm(&mut self) -> Option<WallTime> {
        self.armed = self.due.first().map(|(t, _)| *t);
        self.notice = None;
        self.armed
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn only_an_earlier_due_time_is_news() {
        let mut x = Expiries::default();
        x.moved(&id("a"), None, Some((10, 0)));
        assert_eq!(x.take_notice(), Some((10, 0)));
        x.moved(&id("b"), None, Some((20, 0)));
        assert_eq!(x.take_notice(), None, "a later expiry waits for the armed timer");
        x.moved(&id("a"), Some((10, 0)), Some((30, 0)));
        assert_eq!(x.take_notice(), None, "moving the earliest later leaves the timer early, not late");
        x.moved(&id("b"), Some((20, 0)), Some((5, 0)));
        assert_eq!(x.take_notice(), Some((5, 0)));
        assert_eq!(x.pop_due((100, 0)), Some(((5, 0), id("b"))));
        assert_eq!(x.pop_due((100, 0)), Some(((30, 0), id("a"))));
        assert_eq!(x.pop_due((100, 0)), None);
    }

    #[test]
    fn pops_in_due_order_up_to_now_and_rearms_at_the_rest() {
        let mut x = Expiries::default();
        for (name, t) in [("c", 30), ("a", 10), ("b", 20)] {
            x.moved(&id(name), None, Some((t, 0)));
        }
        x.moved(&id("b"), Some((20, 0)), None);
        assert_eq!(x.pop_due((25, 0)), Some(((10, 0), id("a"))));
        assert_eq!(x.pop_due((25, 0)), None, "b no longer expires; c is not due");
        assert_eq!(x.rearm(), Some((30, 0)));
        x.moved(&id("d"), None, Some((40, 0)));
        assert_eq!(x.take_notice(), None);
        assert_eq!(x.pop_due((30, 0)), Some(((30, 0), id("c"))));
        assert_eq!(x.rearm(), Some((40, 0)));
        assert_eq!(x.pop_due((40, 0)).map(|(_, i)| i), Some(id("d")));
        assert_eq!(x.rearm(), None);
        x.moved(&id("e"), None, Some((50, 0)));
        assert_eq!(x.take_notice(), Some((50, 0)), "nothing armed: any expiry is news");
    }
}
