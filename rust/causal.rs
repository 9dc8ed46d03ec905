//! Dots and causal contexts: which writes a replica has seen.
//!
//! Every write to a component key, and every delete, gets a *dot*: (node, incarnation,
//! counter). A node's counter only grows and its incarnation is random for each start
//! without state, so a dot names one write, forever.
//!
//! Invariants (tests below and in `tests/properties.rs`):
//! - A `VersionVector` maps (node, incarnation) to a counter and is sorted by that pair,
//!   with no zero entries. `join` is the per-entry max: commutative, associative,
//!   idempotent.
//! - An entity's context is a version vector with a per-entity reading: counter `c` for
//!   (n, i) means "every write *to this entity* by (n, i) numbered up to c has been seen".
//!   That is exact, not an approximation, because a node issues its dots for an entity
//!   in order and any state of the entity that knows dot c descends from the writer's own
//!   state at c, which had seen all of that node's earlier dots for the entity.
//! - A store's context summary is a version vector with the global reading: "every write
//!   by (n, i) up to c, to any entity, is reflected in this store". It is a lower bound,
//!   grown only by the node's own writes and by adopting a peer's summary once the peer's
//!   stream up to it has been merged without refusal.
use crate::intern::Sym;
use std::cmp::Ordering;

/// One write's identity. `node` is also the node of the write's HLC stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dot {
    pub node: Sym,
    pub incarnation: u64,
    pub counter: u64,
}

impl Dot {
    /// A total order for sorting within one process (Sym ids are process-local).
    pub fn sort_key(&self) -> (Sym, u64, u64) {
        (self.node, self.incarnation, self.counter)
    }
}

/// (node, incarnation) -> highest counter, sorted by (node, incarnation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionVector(Vec<(Sym, u64, u64)>);

impl VersionVector {
    pub fn new() -> Self {
        VersionVector(Vec::new())
    }

    /// From arbitrary entries (any order, duplicates, zeros): normalized.
    pub fn from_entries(mut entries: Vec<(Sym, u64, u64)>) -> Self {
        entries.retain(|e| e.2 > 0);
        entries.sort_unstable();
        let mut out: Vec<(Sym, u64, u64)> = Vec::with_capacity(entries.len());
        for e in entries {
            match out.last_mut() {
                Some(last) if (last.0, last.1) == (e.0, e.1) => last.2 = last.2.max(e.2),
                _ => out.push(e),
            }
        }
        VersionVector(out)
    }

    pub fn entries(&self) -> &[(Sym, u64, u64)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    fn find(&self, node: Sym, incarnation: u64) -> Result<usize, usize> {
        self.0.binary_search_by(|e| (e.0, e.1).cmp(&(node, incarnation)))
    }

    /// The highest counter seen of (node, incarnation); 0 if none.
    pub fn get(&self, node: Sym, incarnation: u64) -> u64 {
        self.find(node, incarnation).map_or(0, |i| self.0[i].2)
    }

    pub fn contains(&self, dot: &Dot) -> bool {
        dot.counter <= self.get(dot.node, dot.incarnation)
    }

    /// Records a dot as seen. Returns true if that raised the vector.
    pub fn add(&mut self, dot: &Dot) -> bool {
        match self.find(dot.node, dot.incarnation) {
            Ok(i) if self.0[i].2 >= dot.counter => false,
            Ok(i) => {
                self.0[i].2 = dot.counter;
                true
            }
            Err(i) => {
                if dot.counter == 0 {
                    return false;
                }
                self.0.insert(i, (dot.node, dot.incarnation, dot.counter));
                true
            }
        }
    }

    /// The per-entry max with `other`. Returns true if `self` grew.
    pub fn join(&mut self, other: &VersionVector) -> bool {
        if other.0.iter().all(|&(n, i, c)| self.get(n, i) >= c) {
            return false;
        }
        let (a, b) = (&self.0, &other.0);
        let mut out = Vec::with_capacity(a.len().max(b.len()));
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            let order = match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) => (x.0, x.1).cmp(&(y.0, y.1)),
                (Some(_), None) => Ordering::Less,
                _ => Ordering::Greater,
            };
            match order {
                Ordering::Less => {
                    out.push(a[i]);
                    i += 1;
                }
                Ordering::Greater => {
                    out.push(b[j]);
                    j += 1;
                }
                Ordering::Equal => {
                    out.push((a[i].0, a[i].1, a[i].2.max(b[j].2)));
                    i += 1;
                    j += 1;
                }
            }
        }
        self.0 = out;
        true
    }

    /// True if every write this vector names is also named by `other`.
    pub fn covered_by(&self, other: &VersionVector) -> bool {
        self.0.iter().all(|&(n, i, c)| other.get(n, i) >= c)
    }

    /// Approximate bytes in memory.
    pub fn bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<(Sym, u64, u64)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intern::intern;

    fn dot(n: &str, c: u64) -> Dot {
        Dot { node: intern(n), incarnation: 7, counter: c }
    }

    #[test]
    fn add_and_contains_are_prefixes() {
        let mut v = VersionVector::new();
        assert!(v.add(&dot("a", 3)));
        assert!(!v.add(&dot("a", 2)), "a lower dot of a seen prefix adds nothing");
        assert!(v.contains(&dot("a", 1)) && v.contains(&dot("a", 3)) && !v.contains(&dot("a", 4)));
        assert!(!v.contains(&Dot { incarnation: 8, ..dot("a", 1) }), "another incarnation is another replica");
        assert!(!v.add(&dot("b", 0)), "counter 0 names no write");
    }

    #[test]
    fn join_is_the_entrywise_max() {
        let a = VersionVector::from_entries(vec![(intern("a"), 1, 5), (intern("b"), 1, 2)]);
        let b = VersionVector::from_entries(vec![(intern("b"), 1, 9), (intern("c"), 2, 1), (intern("a"), 1, 0)]);
        let mut ab = a.clone();
        assert!(ab.join(&b));
        let mut ba = b.clone();
        ba.join(&a);
        assert_eq!(ab, ba);
        assert_eq!((ab.get(intern("a"), 1), ab.get(intern("b"), 1), ab.get(intern("c"), 2)), (5, 9, 1));
        assert!(!ab.clone().join(&a), "idempotent");
        assert!(a.covered_by(&ab) && b.covered_by(&ab) && !ab.covered_by(&a));
    }
}
