//! Reads `entity.v1.Entity` wire bytes into borrowed slices, for the write and merge
//! paths. prost's generated decoder allocates a String for every component key, type
//! URL and node id and builds two maps per entity; this reads the same fields in place,
//! with the same proto3 rules (last value wins, unknown fields skipped, strings UTF-8),
//! and the table interns what it keeps. Errors name the field that is wrong.
//!
//! No message here nests itself, so decoding never recurses deeper than the schema
//! (Entity > Sibling > Version > Dot): no input can exhaust the stack, and the work is
//! linear in the input (plus a sort of the map entries).
use crate::entity::WallTime;
use crate::wire::{scan, Field};

/// A dot as sent: (node, incarnation, counter).
pub type RawDot<'a> = (&'a str, u64, u64);

/// A version as sent: an HLC stamp, the value's dot (counter 0: none) and the dots of
/// the key's other values the reader saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawVersion<'a> {
    pub physical: u64,
    pub logical: u32,
    pub node: &'a str,
    pub incarnation: u64,
    pub counter: u64,
    pub concurrent: Vec<RawDot<'a>>,
}

/// The fields of an Entity the store reads (`updated_at` and `origin_node` are outputs).
#[derive(Debug, Default)]
pub struct RawEntity<'a> {
    pub id: &'a str,
    pub etype: i32,
    /// (key, type URL, value), one per key, sorted by key.
    pub components: Vec<(&'a str, &'a str, &'a [u8])>,
    pub created_at: Option<WallTime>,
    pub hlc: (u64, u32, &'a str),
    /// (key, version), one per key, sorted by key.
    pub versions: Vec<(&'a str, RawVersion<'a>)>,
    pub expiry_time: Option<WallTime>,
    pub deleted_version: Option<RawVersion<'a>>,
    /// Replica states: (key, type URL, value, version) of the values beside the chosen ones.
    pub siblings: Vec<(&'a str, &'a str, &'a [u8], RawVersion<'a>)>,
    /// Replica states: the entity's causal context.
    pub context: Vec<RawDot<'a>>,
}

impl<'a> RawEntity<'a> {
    pub fn version(&self, key: &str) -> Option<&RawVersion<'a>> {
        self.versions.binary_search_by(|(k, _)| (*k).cmp(key)).ok().map(|i| &self.versions[i].1)
    }
}

fn wrong(field: &str) -> String {
    format!("field {field} has the wrong wire type")
}

fn text<'a>(f: Field<'a>, field: &str) -> Result<&'a str, String> {
    match f {
        Field::Bytes(b) => std::str::from_utf8(b).map_err(|_| format!("field {field} is not valid UTF-8")),
        _ => Err(wrong(field)),
    }
}

fn bytes<'a>(f: Field<'a>, field: &str) -> Result<&'a [u8], String> {
    match f {
        Field::Bytes(b) => Ok(b),
        _ => Err(wrong(field)),
    }
}

fn varint(f: Field, field: &str) -> Result<u64, String> {
    match f {
        Field::Varint(v) => Ok(v),
        _ => Err(wrong(field)),
    }
}

/// Runs `visit` over every field of `msg`, stopping at the first error it returns.
fn fields<'a>(msg: &'a [u8], mut visit: impl FnMut(u32, Field<'a>) -> Result<(), String>) -> Result<(), String> {
    let mut failed = None;
    scan(msg, |n, f| {
        if failed.is_none() {
            failed = visit(n, f).err();
        }
    })?;
    failed.map_or(Ok(()), Err)
}

fn wall_time(msg: &[u8], field: &str) -> Result<WallTime, String> {
    let (mut seconds, mut nanos) = (0i64, 0i32);
    fields(msg, |n, f| {
        match n {
            1 => seconds = varint(f, field)? as i64,
            2 => nanos = varint(f, field)? as i32,
            _ => {}
        }
        Ok(())
    })?;
    if !(0..1_000_000_000).contains(&nanos) {
        return Err(format!("{field}: nanos {nanos} out of range"));
    }
    Ok((seconds, nanos))
}

fn fixed64(f: Field, field: &str) -> Result<u64, String> {
    match f {
        Field::Fixed64(v) => Ok(v),
        _ => Err(wrong(field)),
    }
}

fn logical(f: Field, field: &str) -> Result<u32, String> {
    u32::try_from(varint(f, field)?).map_err(|_| format!("field {field}: logical clock over 2^32"))
}

fn dot<'a>(msg: &'a [u8], field: &str) -> Result<RawDot<'a>, String> {
    let mut d: RawDot = ("", 0, 0);
    fields(msg, |n, f| {
        match n {
            1 => d.0 = text(f, field)?,
            2 => d.1 = fixed64(f, field)?,
            3 => d.2 = varint(f, field)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(d)
}

fn version<'a>(msg: &'a [u8], field: &str) -> Result<RawVersion<'a>, String> {
    let mut v = RawVersion::default();
    fields(msg, |n, f| {
        match n {
            1 => v.physical = varint(f, field)?,
            2 => v.logical = logical(f, field)?,
            3 => v.node = text(f, field)?,
            6 => v.incarnation = fixed64(f, field)?,
            7 => v.counter = varint(f, field)?,
            8 => v.concurrent.push(dot(bytes(f, field)?, field)?),
            _ => {} // 4 and 5 (epoch, after_delete) are retired: skipped like unknown fields
        }
        Ok(())
    })?;
    Ok(v)
}

/// One `Any`: (type URL, value).
fn any<'a>(msg: &'a [u8], field: &str) -> Result<(&'a str, &'a [u8]), String> {
    let (mut type_url, mut value) = ("", &[][..]);
    fields(msg, |n, f| {
        match n {
            1 => type_url = text(f, field)?,
            2 => value = bytes(f, field)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok((type_url, value))
}

fn sibling<'a>(msg: &'a [u8]) -> Result<(&'a str, &'a str, &'a [u8], RawVersion<'a>), String> {
    let (mut key, mut value, mut v) = ("", ("", &[][..]), RawVersion::default());
    fields(msg, |n, f| {
        match n {
            1 => key = text(f, "siblings.key")?,
            2 => value = any(bytes(f, "siblings.value")?, "siblings.value")?,
            3 => v = version(bytes(f, "siblings.version")?, "siblings.version")?,
            _ => {}
        }
        Ok(())
    })?;
    Ok((key, value.0, value.1, v))
}

/// One map entry: (key, value bytes); proto3 defaults when a part is missing.
fn entry<'a>(msg: &'a [u8], field: &str) -> Result<(&'a str, &'a [u8]), String> {
    let (mut key, mut value) = ("", &[][..]);
    fields(msg, |n, f| {
        match n {
            1 => key = text(f, field)?,
            2 => value = bytes(f, field)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok((key, value))
}

/// Keeps the last entry of each key (proto3 map semantics), sorted by key, in place.
fn last_per_key<T>(mut entries: Vec<(&str, T)>) -> Vec<(&str, T)> {
    // Reversed, a stable sort puts the last arrival of each key first in its run, and
    // `dedup_by` keeps the first of a run.
    entries.reverse();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries.dedup_by(|later, kept| later.0 == kept.0);
    entries
}

pub fn decode_entity(msg: &[u8]) -> Result<RawEntity<'_>, String> {
    let mut e = RawEntity::default();
    let mut components = Vec::new();
    let mut versions = Vec::new();
    fields(msg, |n, f| {
        match n {
            1 => e.id = text(f, "id")?,
            2 => e.etype = varint(f, "type")? as i32,
            3 => {
                let (key, value) = entry(bytes(f, "components")?, "components")?;
                components.push((key, any(value, "components")?));
            }
            4 => e.created_at = Some(wall_time(bytes(f, "created_at")?, "created_at")?),
            6 => e.hlc.0 = varint(f, "hlc_physical")?,
            7 => e.hlc.1 = logical(f, "hlc_logical")?,
            8 => e.hlc.2 = text(f, "hlc_node")?,
            9 => {
                let (key, v) = entry(bytes(f, "versions")?, "versions")?;
                versions.push((key, version(v, "versions")?));
            }
            10 => e.expiry_time = Some(wall_time(bytes(f, "expiry_time")?, "expiry_time")?),
            12 => e.deleted_version = Some(version(bytes(f, "deleted_version")?, "deleted_version")?),
            13 => e.siblings.push(sibling(bytes(f, "siblings")?)?),
            14 => e.context.push(dot(bytes(f, "context")?, "context")?),
            _ => {} // updated_at and origin_node are outputs; unknown fields are skipped
        }
        Ok(())
    })?;
    e.components = last_per_key(components).into_iter().map(|(k, (url, value))| (k, url, value)).collect();
    e.versions = last_per_key(versions);
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use prost::Message;
    use std::collections::BTreeMap;

    fn version(physical: u64, node: &str) -> pb::Version {
        pb::Version { physical, logical: 3, node: node.into(), incarnation: 9, counter: 4, concurrent: vec![] }
    }

    #[test]
    fn reads_what_prost_writes() {
        let mut v = version(7, "n");
        v.concurrent = vec![pb::Dot { node: "m".into(), incarnation: 1, counter: 2 }];
        let e = pb::Entity {
            id: "t1".into(),
            r#type: 2,
            components: BTreeMap::from([
                ("b".into(), prost_types::Any { type_url: "x/B".into(), value: vec![8, 1] }),
                ("a".into(), prost_types::Any { type_url: "x/A".into(), value: vec![] }),
            ]),
            created_at: Some(prost_types::Timestamp { seconds: -4, nanos: 9 }),
            hlc_physical: 11,
            hlc_logical: 12,
            hlc_node: "h".into(),
            versions: BTreeMap::from([("b".into(), v)]),
            expiry_time: Some(prost_types::Timestamp { seconds: 99, nanos: 0 }),
            deleted_version: Some(version(3, "d")),
            siblings: vec![pb::Sibling {
                key: "b".into(),
                value: Some(prost_types::Any { type_url: "x/B".into(), value: vec![8, 2] }),
                version: Some(version(6, "o")),
            }],
            context: vec![pb::Dot { node: "n".into(), incarnation: 9, counter: 4 }],
            ..Default::default()
        };
        let bytes = e.encode_to_vec();
        let raw = decode_entity(&bytes).unwrap();
        assert_eq!((raw.id, raw.etype, raw.hlc), ("t1", 2, (11, 12, "h")));
        assert_eq!(raw.components, [("a", "x/A", &[][..]), ("b", "x/B", &[8, 1][..])]);
        assert_eq!(raw.created_at, Some((-4, 9)));
        assert_eq!(raw.expiry_time, Some((99, 0)));
        let b = raw.version("b").unwrap();
        assert_eq!((b.physical, b.logical, b.node, b.incarnation, b.counter), (7, 3, "n", 9, 4));
        assert_eq!(b.concurrent, [("m", 1, 2)]);
        assert_eq!(raw.deleted_version.as_ref().unwrap().node, "d");
        assert_eq!(raw.siblings.len(), 1);
        assert_eq!((raw.siblings[0].0, raw.siblings[0].1, raw.siblings[0].2, raw.siblings[0].3.node), ("b", "x/B", &[8, 2][..], "o"));
        assert_eq!(raw.context, [("n", 9, 4)]);
        assert!(raw.version("a").is_none());
    }

    #[test]
    fn the_last_entry_of_a_repeated_key_wins() {
        let one = |v: u8| {
            pb::Entity {
                components: BTreeMap::from([("k".into(), prost_types::Any { type_url: "x/K".into(), value: vec![8, v] })]),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let both = [one(1), one(2)].concat();
        assert_eq!(decode_entity(&both).unwrap().components, [("k", "x/K", &[8, 2][..])]);
    }

    #[test]
    fn refuses_bad_utf8_wrong_wire_types_and_bad_nanos() {
        assert!(decode_entity(&[0x0a, 1, 0xff]).unwrap_err().contains("UTF-8"));
        assert!(decode_entity(&[0x10, 0x01, 0x0a, 0x01]).is_err(), "truncated");
        assert!(decode_entity(&[0x0d, 0, 0, 0, 0]).unwrap_err().contains("field id"), "id as fixed32");
        let bad_nanos = pb::Entity { created_at: Some(prost_types::Timestamp { seconds: 1, nanos: -1 }), ..Default::default() };
        assert!(decode_entity(&bad_nanos.encode_to_vec()).unwrap_err().contains("nanos"));
    }

    #[test]
    fn a_deeply_nested_retired_field_is_skipped_without_recursion() {
        // Version.after_delete (field 5) nested 100k deep: once a recursive message, now
        // an unknown field whose bytes are never parsed.
        let mut v: Vec<u8> = vec![];
        for _ in 0..100_000 {
            let mut outer = vec![0x2a];
            prost::encoding::encode_varint(v.len() as u64, &mut outer);
            outer.extend_from_slice(&v);
            v = outer;
        }
        let mut entry = vec![0x0a, 1, b'k', 0x12];
        prost::encoding::encode_varint(v.len() as u64, &mut entry);
        entry.extend_from_slice(&v);
        let mut msg = vec![0x0a, 1, b'e', 0x4a];
        prost::encoding::encode_varint(entry.len() as u64, &mut msg);
        msg.extend_from_slice(&entry);
        let raw = decode_entity(&msg).unwrap();
        assert_eq!(raw.version("k").unwrap().counter, 0);
    }
}
