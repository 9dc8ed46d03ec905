//! Merge strategies, dispatched on a component's Any type URL.
//!
//! Every strategy is a *total order on cells*, and merging two cells keeps the greater,
//! so merge is commutative, associative and idempotent by construction. The order is
//! one lexicographic key for every cell (see `Registry::rank`):
//!
//!   (after_delete, epoch, field rank, version, tie-break, type URL, value bytes)
//!
//! - `lww` (default, unknown type URLs): epoch and field rank are 0, so version decides.
//! - `max(field[, order])`: epoch (causal depth) first, then the field's value (or its
//!   position in `order`), then version. Concurrent writes from the same state tie on
//!   epoch and the higher value wins; a writer who saw the value can lower it (epoch+1).
//! - `lww_tiebreak(field)`: lww, the field's value breaks an exact version tie.
//! - `after_delete` puts every write made after a delete above every cell written
//!   before it, so a dead cell never shadows a resurrecting write.
//! Type URL and bytes come last only to make the order total.
use crate::intern::{intern, Sym};
use crate::wire::{scan, Field};
use ahash::AHashMap as HashMap;

#[derive(Clone, Debug, PartialEq)]
pub enum Merge {
    Lww,
    /// Keep the greater value of wire field `field`; with `order`, values rank by their
    /// position in it and values outside it are refused as bad input.
    Max { field: u32, order: Option<Vec<u64>> },
    /// Last writer wins; field `field` (a float) breaks an exact version tie.
    LwwTieBreak { field: u32 },
}

impl Merge {
    /// Strategies of one class share the epoch rule; a component key keeps its class.
    pub fn uses_epoch(&self) -> bool {
        matches!(self, Merge::Max { .. })
    }

    pub fn describe(&self) -> String {
        match self {
            Merge::Lww => "lww".into(),
            Merge::Max { field, order: None } => format!("max({field})"),
            Merge::Max { field, order: Some(o) } => format!("max({field}, order={o:?})"),
            Merge::LwwTieBreak { field } => format!("lww_tiebreak({field})"),
        }
    }
}

/// How to merge and validate one type URL.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub merge: Merge,
    /// Double/float fields that must be finite (NaN and infinities are refused).
    pub finite: Vec<u32>,
}

pub struct Registry {
    rules: HashMap<Sym, Rule>,
    default: Rule,
}

const PREFIX: &str = "type.googleapis.com/entity.v1.";

impl Default for Registry {
    fn default() -> Self {
        let mut r = Registry { rules: HashMap::new(), default: Rule { merge: Merge::Lww, finite: vec![] } };
        let lww = |finite: Vec<u32>| Rule { merge: Merge::Lww, finite };
        r.register(&format!("{PREFIX}PositionComponent"), lww(vec![1, 2, 3]));
        r.register(&format!("{PREFIX}VelocityComponent"), lww(vec![1, 2]));
        r.register(&format!("{PREFIX}FusionComponent"), lww(vec![2, 3, 4]));
        // ThreatLevel: UNSPECIFIED < NONE < LOW < MEDIUM < HIGH, other values refused.
        r.register(
            &format!("{PREFIX}ThreatComponent"),
            Rule { merge: Merge::Max { field: 1, order: Some(vec![0, 1, 2, 3, 4]) }, finite: vec![] },
        );
        // ApprovalState ranks: a decision beats a pending request, a denial beats an approval.
        // UNSPECIFIED=0 PENDING=2 AUTO_APPROVED=1 APPROVED=3 TIMED_OUT=5 DENIED=4.
        r.register(
            &format!("{PREFIX}ApprovalComponent"),
            Rule { merge: Merge::Max { field: 1, order: Some(vec![0, 2, 1, 3, 5, 4]) }, finite: vec![] },
        );
        r.register(
            &format!("{PREFIX}ClassificationComponent"),
            Rule { merge: Merge::LwwTieBreak { field: 2 }, finite: vec![2] },
        );
        r
    }
}

/// What orders a cell, apart from its version: see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct FieldRank {
    pub rank: u64,
    pub tiebreak: u64,
}

impl Registry {
    pub fn register(&mut self, type_url: &str, rule: Rule) {
        self.rules.insert(intern(type_url), rule);
    }

    pub fn rule(&self, type_url: Sym) -> &Rule {
        self.rules.get(&type_url).unwrap_or(&self.default)
    }

    /// What an already validated cell orders by (no scan of the bytes for lww types).
    pub fn order_of(&self, type_url: Sym, value: &[u8]) -> FieldRank {
        match self.rule(type_url).merge {
            Merge::Lww => FieldRank::default(),
            _ => self.rank(type_url, value).unwrap_or_default(),
        }
    }

    /// Validates a component's bytes for its type and returns what its strategy orders by.
    pub fn rank(&self, type_url: Sym, value: &[u8]) -> Result<FieldRank, String> {
        let rule = self.rule(type_url);
        let wanted = match &rule.merge {
            Merge::Lww => 0,
            Merge::Max { field, .. } | Merge::LwwTieBreak { field } => *field,
        };
        let mut found: Option<Field> = None;
        let mut not_finite: Option<u32> = None;
        scan(value, |n, f| {
            if n == wanted {
                found = Some(f);
            }
            if rule.finite.contains(&n) && !is_finite(f) {
                not_finite = Some(n);
            }
        })?;
        if let Some(n) = not_finite {
            return Err(format!("field {n} is not a finite number"));
        }
        let key = match found {
            None => 0,
            Some(f) => sort_key(f).ok_or_else(|| format!("field {wanted} has the wrong wire type"))?,
        };
        Ok(match &rule.merge {
            Merge::Lww => FieldRank::default(),
            Merge::LwwTieBreak { .. } => FieldRank { rank: 0, tiebreak: key },
            Merge::Max { order: None, .. } => FieldRank { rank: key, tiebreak: 0 },
            Merge::Max { field, order: Some(order) } => {
                let pos = order
                    .iter()
                    .position(|&v| v == key)
                    .ok_or_else(|| format!("field {field} has value {key}, not one of {order:?}"))?;
                FieldRank { rank: pos as u64, tiebreak: 0 }
            }
        })
    }
}

fn is_finite(f: Field) -> bool {
    match f {
        Field::Fixed64(bits) => f64::from_bits(bits).is_finite(),
        Field::Fixed32(bits) => f32::from_bits(bits).is_finite(),
        _ => true,
    }
}

/// An unsigned key that orders like the field's value: varints as integers, fixed
/// fields as IEEE floats (the total order, so -0 < +0 and the key is never NaN-confused).
fn sort_key(f: Field) -> Option<u64> {
    match f {
        Field::Varint(v) => Some(v),
        Field::Fixed32(bits) => {
            let flipped = if bits >> 31 == 1 { !bits } else { bits | 1 << 31 };
            Some(flipped as u64)
        }
        Field::Fixed64(bits) => Some(if bits >> 63 == 1 { !bits } else { bits | 1 << 63 }),
        Field::Bytes(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threat(level: u8) -> Vec<u8> {
        if level == 0 { vec![] } else { vec![0x08, level] }
    }

    #[test]
    fn threat_ranks_by_level_and_refuses_unknown_levels() {
        let reg = Registry::default();
        let url = intern("type.googleapis.com/entity.v1.ThreatComponent");
        assert!(reg.rank(url, &threat(4)).unwrap() > reg.rank(url, &threat(2)).unwrap());
        assert_eq!(reg.rank(url, &threat(0)).unwrap().rank, 0);
        let err = reg.rank(url, &threat(9)).unwrap_err();
        assert!(err.contains("value 9"), "{err}");
        assert!(reg.rank(url, &[0x08]).is_err(), "truncated bytes");
    }

    #[test]
    fn approval_denial_beats_approval_beats_pending() {
        let reg = Registry::default();
        let url = intern("type.googleapis.com/entity.v1.ApprovalComponent");
        let r = |s: u8| reg.rank(url, &[0x08, s]).unwrap();
        assert!(r(4) > r(3) && r(3) > r(2) && r(5) > r(3) && r(4) > r(5));
    }

    #[test]
    fn classification_confidence_orders_as_float() {
        let reg = Registry::default();
        let url = intern("type.googleapis.com/entity.v1.ClassificationComponent");
        let conf = |c: f32| {
            let mut m = vec![0x15];
            m.extend_from_slice(&c.to_le_bytes());
            reg.rank(url, &m)
        };
        assert!(conf(0.9).unwrap() > conf(0.2).unwrap());
        assert!(conf(0.1).unwrap() > conf(-0.5).unwrap());
        assert!(conf(f32::NAN).is_err());
    }

    #[test]
    fn position_refuses_nan_and_unknown_types_are_lww() {
        let reg = Registry::default();
        let pos = intern("type.googleapis.com/entity.v1.PositionComponent");
        let mut m = vec![0x09];
        m.extend_from_slice(&f64::NAN.to_le_bytes());
        assert!(reg.rank(pos, &m).unwrap_err().contains("field 1"));
        let unknown = intern("type.googleapis.com/acme.Widget");
        assert_eq!(reg.rank(unknown, &[0x08, 0x01]).unwrap(), FieldRank::default());
        assert!(reg.rank(unknown, &[0x0a, 0x09]).is_err(), "malformed bytes refused for any type");
    }

    #[test]
    fn registered_rules_replace_defaults() {
        let mut reg = Registry::default();
        reg.register("x/Y", Rule { merge: Merge::Max { field: 2, order: None }, finite: vec![] });
        let r = |v: u8| reg.rank(intern("x/Y"), &[0x10, v]).unwrap();
        assert!(r(7) > r(3));
    }
}
