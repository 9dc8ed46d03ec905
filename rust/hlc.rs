//! Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).
//!
//! Invariants, each covered by a test below:
//! - `now()` is strictly increasing, whatever the wall clock does (it may jump back).
//! - After `update(r)` succeeds, every later `now()` is greater than `r`.
//! - A remote timestamp more than `max_offset_ns` ahead of the wall clock is refused
//!   (`SkewError`) and not adopted, so one bad peer cannot drag every clock forward.
//! - When the logical counter would overflow, physical advances by 1 ns instead; at the
//!   very top of the range (u64::MAX ns, about the year 2554) it saturates, never wraps.
//! - Timestamps are totally ordered by (physical, logical, node).
use crate::intern::Sym;
use std::cmp::Ordering;

/// One HLC reading. `node` breaks ties, so two nodes never produce equal timestamps.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Timestamp {
    pub physical: u64,
    pub logical: u32,
    pub node: Sym,
}

impl Ord for Timestamp {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.physical, self.logical)
            .cmp(&(other.physical, other.logical))
            .then_with(|| self.node.as_str().cmp(&other.node.as_str()))
    }
}

impl PartialOrd for Timestamp {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A remote timestamp too far ahead of the local wall clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkewError {
    pub ahead_ns: u64,
    pub max_offset_ns: u64,
}

/// The wall clock, in ns since the Unix epoch. Injectable so tests can jump it.
pub type WallClock = Box<dyn Fn() -> u64 + Send + Sync>;

pub fn system_wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub struct Clock {
    node: Sym,
    physical: u64,
    logical: u32,
    max_offset_ns: u64,
    wall: WallClock,
}

impl Clock {
    pub fn new(node: Sym, max_offset_ns: u64, wall: WallClock) -> Self {
        Clock { node, physical: 0, logical: 0, max_offset_ns, wall }
    }

    pub fn node(&self) -> Sym {
        self.node
    }

    pub fn wall_ns(&self) -> u64 {
        (self.wall)()
    }

    pub fn max_offset_ns(&self) -> u64 {
        self.max_offset_ns
    }

    /// The latest timestamp issued or adopted.
    pub fn last(&self) -> Timestamp {
        Timestamp { physical: self.physical, logical: self.logical, node: self.node }
    }

    /// A new timestamp for a local event, greater than every earlier one.
    pub fn now(&mut self) -> Timestamp {
        let wall = self.wall_ns();
        if wall > self.physical {
            self.physical = wall;
            self.logical = 0;
        } else {
            self.tick_logical();
        }
        self.last()
    }

    /// How far `physical` is ahead of the wall clock beyond the allowed offset, if it is.
    pub fn check_skew(&self, physical: u64) -> Result<(), SkewError> {
        if physical <= self.physical {
            return Ok(()); // no later than what this clock already issued or adopted
        }
        let wall = self.wall_ns();
        if physical > wall.saturating_add(self.max_offset_ns) {
            return Err(SkewError { ahead_ns: physical - wall, max_offset_ns: self.max_offset_ns });
        }
        Ok(())
    }

    /// Receive event: adopt a remote timestamp so later local ones order after it.
    pub fn update(&mut self, remote: Timestamp) -> Result<Timestamp, SkewError> {
        self.check_skew(remote.physical)?;
        let wall = self.wall_ns();
        let physical = wall.max(self.physical).max(remote.physical);
        if physical == self.physical && physical == remote.physical {
            self.logical = self.logical.max(remote.logical);
            self.tick_logical();
        } else if physical == self.physical {
            self.tick_logical();
        } else if physical == remote.physical {
            self.physical = physical;
            self.logical = remote.logical;
            self.tick_logical();
        } else {
            self.physical = physical;
            self.logical = 0;
        }
        Ok(self.last())
    }

    fn tick_logical(&mut self) {
        match self.logical.checked_add(1) {
            Some(l) => self.logical = l,
            None if self.physical < u64::MAX => {
                self.physical += 1;
                self.logical = 0;
            }
            None => {}
        }
    }

    /// A stamp for a local write that must order after `t` (a delete the writer saw),
    /// without moving the clock itself past the allowed offset: the clock's next
    /// reading if that is later, else the stamp just after `t`.
    pub fn now_after(&mut self, t: Timestamp) -> Timestamp {
        let now = self.now();
        if now > t {
            return now;
        }
        let (physical, logical) = match t.logical.checked_add(1) {
            Some(l) => (t.physical, l),
            None => (t.physical.saturating_add(1), 0),
        };
        Timestamp { physical, logical, node: self.node }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intern::intern;
    use std::sync::atomic::{AtomicU64, Ordering as AtOrd};
    use std::sync::Arc;

    fn clock_at(node: &str, wall: Arc<AtomicU64>) -> Clock {
        Clock::new(intern(node), 500_000_000, Box::new(move || wall.load(AtOrd::SeqCst)))
    }

    #[test]
    fn now_is_strictly_monotonic_when_wall_clock_jumps_back() {
        let wall = Arc::new(AtomicU64::new(1_000_000_000));
        let mut c = clock_at("a", wall.clone());
        let t1 = c.now();
        wall.store(500, AtOrd::SeqCst);
        let t2 = c.now();
        let t3 = c.now();
        assert!(t1 < t2 && t2 < t3);
        assert_eq!(t2.physical, t1.physical);
    }

    #[test]
    fn update_orders_later_events_after_remote() {
        let wall = Arc::new(AtomicU64::new(1_000));
        let mut c = clock_at("a", wall.clone());
        let remote = Timestamp { physical: 1_000_000, logical: 7, node: intern("b") };
        c.update(remote).unwrap();
        let t = c.now();
        assert!(t > remote, "{t:?} must follow {remote:?}");
    }

    #[test]
    fn update_refuses_remote_too_far_ahead_and_does_not_adopt_it() {
        let wall = Arc::new(AtomicU64::new(10_000_000_000));
        let mut c = clock_at("a", wall.clone());
        let before = c.now();
        let remote = Timestamp { physical: 11_000_000_000, logical: 0, node: intern("b") };
        let err = c.update(remote).unwrap_err();
        assert_eq!(err.ahead_ns, 1_000_000_000);
        assert!(c.now().physical < remote.physical);
        assert!(c.last() > before);
    }

    #[test]
    fn logical_overflow_advances_physical() {
        let wall = Arc::new(AtomicU64::new(5));
        let mut c = clock_at("a", wall.clone());
        c.update(Timestamp { physical: 5, logical: u32::MAX - 1, node: intern("b") }).unwrap();
        assert_eq!(c.last().logical, u32::MAX);
        let t = c.now();
        assert_eq!((t.physical, t.logical), (6, 0));
    }

    #[test]
    fn node_breaks_ties() {
        let a = Timestamp { physical: 1, logical: 1, node: intern("a") };
        let b = Timestamp { physical: 1, logical: 1, node: intern("b") };
        assert!(a < b);
    }
}
