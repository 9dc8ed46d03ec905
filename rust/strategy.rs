//! Merge strategies, dispatched on a component's Any type URL.
//!
//! Concurrent writes to a key survive side by side as siblings (see `entity`); a
//! strategy only picks which one readers see. Every strategy is a *total order on
//! siblings*, the same on every replica, so every replica shows the same value:
//!
//!   (field rank, HLC stamp, tie-break, type URL, value bytes)
//!
//! - `lww` (default, unknown type URLs): the rank is 0, so the highest stamp wins.
//! - `max(field[, order])`: the field's value (or its position in `order`) first, the
//!   stamp breaks ties. A concurrent HIGH threat is never hidden by lower writes made
//!   without seeing it, while a writer who saw HIGH replaces it (the write removes the
//!   siblings it saw, whatever their rank).
//! - `lww_tiebreak(field)`: lww, the field's value breaks an exact stamp tie.
//! Type URL and bytes come last only to make the order total.
//!
//! A rule also bounds the numeric fields of its type (latitude within +-90, ...): a
//! value outside them, NaN or an infinity, is refused as bad input.
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
    /// (field, min, max) of double/float fields: NaN, infinities and values outside
    /// [min, max] are refused.
    pub bounds: Vec<(u32, f64, f64)>,
}

impl Rule {
    pub fn new(merge: Merge, bounds: Vec<(u32, f64, f64)>) -> Self {
        Rule { merge, bounds }
    }

    fn bounds_of(&self, field: u32) -> Option<(f64, f64)> {
        self.bounds.iter().find(|b| b.0 == field).map(|b| (b.1, b.2))
    }
}

const ANY: f64 = f64::MAX;

#[derive(Clone, Debug)]
pub struct Registry {
    rules: HashMap<Sym, Rule>,
    default: Rule,
}

const PREFIX: &str = "type.googleapis.com/entity.v1.";

impl Default for Registry {
    fn default() -> Self {
        let mut r = Registry { rules: HashMap::new(), default: Rule::new(Merge::Lww, vec![]) };
        let lat = (-90.0, 90.0);
        let lon = (-180.0, 180.0);
        let unit = (0.0, 1.0);
        let b = |f: u32, (lo, hi): (f64, f64)| (f, lo, hi);
        // Position: lat, lon, alt (any finite altitude).
        r.register(&format!("{PREFIX}PositionComponent"), Rule::new(Merge::Lww, vec![b(1, lat), b(2, lon), b(3, (-ANY, ANY))]));
        // Velocity: speed (knots, not negative), heading (degrees, either convention).
        r.register(&format!("{PREFIX}VelocityComponent"), Rule::new(Merge::Lww, vec![b(1, (0.0, ANY)), b(2, (-360.0, 360.0))]));
        r.register(&format!("{PREFIX}FusionComponent"), Rule::new(Merge::Lww, vec![b(2, lat), b(3, lon), b(4, unit)]));
        // ThreatLevel: UNSPECIFIED < NONE < LOW < MEDIUM < HIGH, other values refused.
        r.register(&format!("{PREFIX}ThreatComponent"), Rule::new(Merge::Max { field: 1, order: Some(vec![0, 1, 2, 3, 4]) }, vec![]));
        // ApprovalState ranks: a decision beats a pending request, a denial beats an approval.
        // UNSPECIFIED=0 PENDING=2 AUTO_APPROVED=1 APPROVED=3 TIMED_OUT=5 DENIED=4.
        r.register(
            &format!("{PREFIX}ApprovalComponent"),
            Rule::new(Merge::Max { field: 1, order: Some(vec![0, 2, 1, 3, 5, 4]) }, vec![]),
        );
        r.register(&format!("{PREFIX}ClassificationComponent"), Rule::new(Merge::LwwTieBreak { field: 2 }, vec![b(2, unit)]));
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
        let mut out_of_bounds: Option<String> = None;
        scan(value, |n, f| {
            if n == wanted {
                found = Some(f);
            }
            if let Some((lo, hi)) = rule.bounds_of(n) {
                if out_of_bounds.is_none() {
                    out_of_bounds = check_bounds(n, f, lo, hi);
                }
            }
        })?;
        if let Some(m) = out_of_bounds {
            return Err(m);
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

/// Why a float field's value is refused, if it is.
fn check_bounds(n: u32, f: Field, lo: f64, hi: f64) -> Option<String> {
    let v = match f {
        Field::Fixed64(bits) => f64::from_bits(bits),
        Field::Fixed32(bits) => f32::from_bits(bits) as f64,
        _ => return None,
    };
    if !v.is_finite() {
        return Some(format!("field {n} is not a finite number"));
    }
    if v < lo || v > hi {
        let bound = |x: f64| if x.abs() == ANY { "any".to_string() } else { x.to_string() };
        return Some(format!("field {n} is {v}, outside [{}, {}]", bound(lo), bound(hi)));
    }
    None
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
        assert!(conf(0.1).unwrap() > conf(0.0).unwrap());
        assert!(conf(f32::NAN).is_err());
        assert!(conf(-0.5).unwrap_err().contains("outside [0, 1]"), "confidence is range checked");
    }

    #[test]
    fn position_refuses_nan_and_unknown_types_are_lww() {
        let reg = Registry::default();
        let pos = intern("type.googleapis.com/entity.v1.PositionComponent");
        let mut m = vec![0x09];
        m.extend_from_slice(&f64::NAN.to_le_bytes());
        assert!(reg.rank(pos, &m).unwrap_err().contains("field 1"));
        let mut far = vec![0x09];
        far.extend_from_slice(&91f64.to_le_bytes());
        assert!(reg.rank(pos, &far).unwrap_err().contains("outside [-90, 90]"), "latitude is range checked");
        let unknown = intern("type.googleapis.com/acme.Widget");
        assert_eq!(reg.rank(unknown, &[0x08, 0x01]).unwrap(), FieldRank::default());
        assert!(reg.rank(unknown, &[0x0a, 0x09]).is_err(), "malformed bytes refused for any type");
    }

    #[test]
    fn registered_rules_replace_defaults() {
        let mut reg = Registry::default();
        reg.register("x/Y", Rule::new(Merge::Max { field: 2, order: None }, vec![]));
        let r = |v: u8| reg.rank(intern("x/Y"), &[0x10, v]).unwrap();
        assert!(r(7) > r(3));
    }
}
