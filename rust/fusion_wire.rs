//! fusion_wire: the fusion service's intake and output on the wire, without I/O. Watch
//! events (an `EntityEventBatch`'s bytes) and listed entities go in, through the
//! correlator; fused entities (encoded `Entity` bytes) come out. It keeps what the
//! service must remember between them: the dots of what it took in, the position stamps
//! (for the lag), what it wrote and what it still owes the store.
//!
//! What it skips, and why it may: an event showing the same position and source dots as
//! the last one taken in (dots name writes, so the values are the same: another service
//! wrote a key fusion does not read); any fused entity on the watch (the echo of fusion's
//! own write; fused entities are adopted only from a listing, so a late echo of one since
//! deleted never comes back).
use crate::fusion::{valid_position, Correlator, Fused, Id, Obs, PassResult};
use crate::pb::store::v1::{EntityEventBatch, EventType};
use crate::pb::{Entity, EntityType, FusionComponent, PositionComponent, SourceComponent};
use ahash::{AHashMap, AHashSet};
use prost::Message;

pub const POSITION: &str = "position";
pub const SOURCE: &str = "source";
pub const FUSION: &str = "fusion";
const TYPE_PREFIX: &str = "type.googleapis.com/";

/// What the service should log about an input it ignored.
#[derive(Debug, PartialEq)]
pub enum Notice {
    /// A component of another type than its key's, or bytes that do not parse.
    UnexpectedComponent { entity_id: String, key: &'static str, expected: &'static str, problem: String },
    /// A position not finite or out of range (reported once per track until a valid one).
    InvalidPosition { entity_id: String, lat: f64, lon: f64, alt: f64 },
}

/// What a batch of watch events did.
#[derive(Debug, Default)]
pub struct Taken {
    pub events: u64,
    pub skipped_echo: u64,
    pub skipped_unchanged: u64,
    pub invalid_positions: u64,
    /// (deleted source track, fused id built on it): fused entities to delete now.
    pub cascades: Vec<(Id, Id)>,
    pub notices: Vec<Notice>,
    /// The highest seq in the batch (heartbeats included): the watch's cursor after it.
    pub last_seq: u64,
}

/// The (node, incarnation, counter) of a value: it names that one write.
type Dot = (String, u64, u64);

/// A fused track as written, to the precision that matters (sub-nanodegree noise is not news).
#[derive(Clone, Debug, PartialEq)]
struct Written {
    source_ids: Vec<Id>,
    lat: f64,
    lon: f64,
    alt: f64,
    confidence: f64,
}

impl Written {
    fn of(f: &Fused) -> Self {
        let round = |x: f64, scale: f64| (x * scale).round() / scale;
        Written { source_ids: f.source_ids.clone(), lat: round(f.lat, 1e9), lon: round(f.lon, 1e9), alt: round(f.alt, 1e3), confidence: f.confidence }
    }
}

pub struct FusionFeed {
    pub correlator: Correlator,
    /// track id -> the dots of its position and source as taken in
    seen: AHashMap<Id, (Option<Dot>, Option<Dot>)>,
    /// source track id -> its position's HLC physical time (Unix ns) as taken in
    stamps: AHashMap<Id, u64>,
    warned: AHashSet<Id>,
    /// fused id -> what was last written (None: found in the listing; rewritten)
    written: AHashMap<Id, Option<Written>>,
    /// fused id -> the newest source position stamp its last write answered
    answered: AHashMap<Id, u64>,
    /// fused ids the store may not hold as they are now
    unsynced: AHashSet<Id>,
    /// the writes prepared and not yet confirmed: (fused id, what, the stamp it answers)
    pending: Vec<(Id, Written, u64)>,
}

fn dots(entity: &Entity) -> (Option<Dot>, Option<Dot>) {
    let dot = |key| entity.versions.get(key).map(|v| (v.node.clone(), v.incarnation, v.counter));
    (dot(POSITION), dot(SOURCE))
}

/// The component under `key` as `M` (full name `name`): None when absent, or (with a
/// notice) when it holds another type or bytes that do not parse. Type URLs match on the
/// message name, as protobuf's `Any.Unpack` does.
fn read<M: Message + Default>(entity: &Entity, key: &'static str, name: &'static str, notices: &mut Vec<Notice>) -> Option<M> {
    let any = entity.components.get(key)?;
    let problem = if any.type_url.rsplit('/').next() == Some(name) {
        match M::decode(any.value.as_slice()) {
            Ok(m) => return Some(m),
            Err(e) => format!("unparsable: {e}"),
        }
    } else {
        format!("holds {}", any.type_url)
    };
    notices.push(Notice::UnexpectedComponent { entity_id: entity.id.clone(), key, expected: name, problem });
    None
}

fn any<M: Message>(name: &str, m: &M) -> prost_types::Any {
    prost_types::Any { type_url: format!("{TYPE_PREFIX}{name}"), value: m.encode_to_vec() }
}

/// A fused track as the store holds it: a TRACK with its fusion and position components.
pub fn encode_fused(f: &Fused) -> Vec<u8> {
    let fusion = FusionComponent {
        source_ids: f.source_ids.iter().map(|s| s.to_string()).collect(),
        fused_lat: f.lat,
        fused_lon: f.lon,
        confidence: f.confidence as f32,
    };
    let position = PositionComponent { lat: f.lat, lon: f.lon, alt: f.alt };
    let entity = Entity {
        id: f.id.to_string(),
        r#type: EntityType::Track as i32,
        components: [
            (FUSION.to_string(), any("entity.v1.FusionComponent", &fusion)),
            (POSITION.to_string(), any("entity.v1.PositionComponent", &position)),
        ]
        .into(),
        ..Entity::default()
    };
    entity.encode_to_vec()
}

impl FusionFeed {
    pub fn new(correlator: Correlator) -> Self {
        FusionFeed {
            correlator,
            seen: AHashMap::new(),
            stamps: AHashMap::new(),
            warned: AHashSet::new(),
            written: AHashMap::new(),
            answered: AHashMap::new(),
            unsynced: AHashSet::new(),
            pending: Vec::new(),
        }
    }

    /// Before a listing (a complete picture follows): forgets every track and what was
    /// written; the groups stay, for the next (full) pass to check.
    pub fn reset(&mut self) {
        self.correlator.clear_tracks();
        self.seen.clear();
        self.stamps.clear();
        self.written.clear();
        self.answered.clear();
        self.unsynced.clear();
        self.pending.clear();
    }

    /// One listed entity (encoded `Entity`): a fused one is adopted (and rewritten by the
    /// next pass), a source track taken in.
    pub fn take_listed(&mut self, entity: &[u8]) -> Result<Vec<Notice>, String> {
        let entity = Entity::decode(entity).map_err(|e| format!("listed entity does not parse: {e}"))?;
        let mut notices = Vec::new();
        let mut invalid = 0;
        let id: Id = entity.id.as_str().into();
        if entity.components.contains_key(FUSION) {
            self.written.insert(id.clone(), None);
        } else {
            self.seen.insert(id.clone(), dots(&entity));
        }
        self.ingest(&entity, id, None, &mut notices, &mut invalid);
        Ok(notices)
    }

    /// One message of a batched watch (encoded `EntityEventBatch`).
    pub fn take_batch(&mut self, batch: &[u8]) -> Result<Taken, String> {
        let batch = EntityEventBatch::decode(batch).map_err(|e| format!("watch batch does not parse: {e}"))?;
        let mut taken = Taken::default();
        for ev in batch.events {
            taken.last_seq = taken.last_seq.max(ev.seq);
            let Some(entity) = ev.entity else { continue };
            match EventType::try_from(ev.r#type) {
                Ok(EventType::Heartbeat) => continue,
                Ok(EventType::Deleted) => {
                    let source: Id = entity.id.as_str().into();
                    for fid in self.forget(&source) {
                        taken.cascades.push((source.clone(), fid));
                    }
                    continue;
                }
                _ => {}
            }
            taken.events += 1;
            if entity.components.contains_key(FUSION) {
                taken.skipped_echo += 1;
                continue;
            }
            let now = dots(&entity);
            let id: Id = entity.id.as_str().into();
            let before = self.seen.insert(id.clone(), now.clone());
            if before.as_ref() == Some(&now) {
                taken.skipped_unchanged += 1;
                continue;
            }
            // A moved track whose source is the one taken in before: not parsed again.
            let known = before.filter(|b| b.1 == now.1).and_then(|_| self.correlator.track(&id)).cloned();
            for fid in self.ingest(&entity, id.clone(), known, &mut taken.notices, &mut taken.invalid_positions) {
                taken.cascades.push((id.clone(), fid));
            }
        }
        Ok(taken)
    }

    /// Takes in one entity as read; returns fused ids to delete (a source lost its
    /// position or its source). `known`: the track as taken in before, if its source has
    /// not changed since.
    fn ingest(&mut self, entity: &Entity, id: Id, known: Option<Obs>, notices: &mut Vec<Notice>, invalid: &mut u64) -> Vec<Id> {
        if let Some(fusion) = read::<FusionComponent>(entity, FUSION, "entity.v1.FusionComponent", notices) {
            if !self.correlator.has_group(&id) {
                let ids: Vec<Id> = fusion.source_ids.iter().map(|s| s.as_str().into()).collect();
                self.correlator.adopt(&id, &ids);
            }
            return Vec::new();
        }
        let (sensor_type, sensor_id): (Id, Id) = match known {
            Some(k) => (k.sensor_type, k.sensor_id),
            None => match read::<SourceComponent>(entity, SOURCE, "entity.v1.SourceComponent", notices) {
                Some(s) => (s.sensor_type.as_str().into(), s.sensor_id.as_str().into()),
                None => ("".into(), "".into()),
            },
        };
        let position = read::<PositionComponent>(entity, POSITION, "entity.v1.PositionComponent", notices);
        let Some(p) = position.filter(|_| !sensor_type.is_empty()) else {
            self.stamps.remove(&id);
            let tracked = self.correlator.track(&id).is_some();
            return if tracked { self.correlator.remove(&id) } else { Vec::new() };
        };
        if !valid_position(p.lat, p.lon) || !p.alt.is_finite() {
            if self.warned.insert(id.clone()) {
                notices.push(Notice::InvalidPosition { entity_id: id.to_string(), lat: p.lat, lon: p.lon, alt: p.alt });
            }
            *invalid += 1;
            return Vec::new(); // ignored: the last valid position (if any) stands
        }
        self.warned.remove(&id);
        let stamp = entity.versions.get(POSITION).map_or(0, |v| v.physical);
        self.stamps.insert(id.clone(), stamp);
        self.correlator.upsert(Obs { id, sensor_type, lat: p.lat, lon: p.lon, alt: p.alt, sensor_id });
        Vec::new()
    }

    /// A DELETED event: a source's fused entities go (returned: delete them); a fused one
    /// whose group stands is written again by the next pass.
    pub fn forget(&mut self, id: &Id) -> Vec<Id> {
        self.written.remove(id);
        self.answered.remove(id);
        self.seen.remove(id);
        self.stamps.remove(id);
        self.warned.remove(id);
        if self.correlator.has_group(id) {
            self.unsynced.insert(id.clone());
        }
        self.correlator.remove(id)
    }

    /// One correlation pass; what it changed is owed to the store. Also returns, after a
    /// full pass, the fused entities of the listing that no group stands for (orphans).
    pub fn correlate(&mut self, full: bool) -> (PassResult, Vec<Id>) {
        let result = self.correlator.correlate(full, false);
        let orphans = if result.full {
            self.written.keys().filter(|fid| !self.correlator.has_group(fid)).cloned().collect()
        } else {
            Vec::new()
        };
        self.unsynced.extend(result.changed.iter().cloned());
        (result, orphans)
    }

    /// A fused entity deleted from the store (or found gone).
    pub fn deleted(&mut self, fid: &str) {
        self.written.remove(fid);
        self.answered.remove(fid);
    }

    /// The fused entities owed to the store that differ from what was written, encoded;
    /// held as pending until `commit_writes` (or `abort_writes`).
    pub fn prepare_writes(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        self.pending.clear();
        for fid in std::mem::take(&mut self.unsynced) {
            let Some(f) = self.correlator.fused().get(&fid) else { continue }; // dissolved since
            let state = Written::of(f);
            if self.written.get(&fid).and_then(Option::as_ref) == Some(&state) {
                continue;
            }
            let stamp = f.source_ids.iter().map(|sid| self.stamps.get(sid).copied().unwrap_or(0)).max().unwrap_or(0);
            out.push(encode_fused(f));
            self.pending.push((fid, state, stamp));
        }
        out
    }

    /// The prepared writes landed: returns the fused ids written for the first time and,
    /// for the lag, the source stamps first answered by these writes.
    pub fn commit_writes(&mut self) -> (Vec<Id>, Vec<u64>) {
        let (mut created, mut stamps) = (Vec::new(), Vec::new());
        for (fid, state, stamp) in self.pending.drain(..) {
            if self.written.insert(fid.clone(), Some(state)).is_none() {
                created.push(fid.clone());
            }
            let answered = self.answered.entry(fid).or_insert(0);
            if stamp > *answered {
                *answered = stamp;
                stamps.push(stamp);
            }
        }
        (created, stamps)
    }

    /// The prepared writes did not land: they stay owed.
    pub fn abort_writes(&mut self) {
        for (fid, _, _) in self.pending.drain(..) {
            self.unsynced.insert(fid);
        }
    }

    pub fn owed(&self) -> usize {
        self.unsynced.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::fused_id;
    use crate::pb::store::v1::EntityEvent;
    use crate::pb::Version;
    use std::collections::HashMap;

    fn track(id: &str, kind: &str, lat: f64, counter: u64) -> Entity {
        let source = SourceComponent { sensor_id: format!("{kind}-sensor"), sensor_type: kind.into() };
        let position = PositionComponent { lat, lon: 10.0, alt: 0.0 };
        let version = |c| Version { physical: 1_000 + c, node: "n".into(), incarnation: 1, counter: c, ..Version::default() };
        Entity {
            id: id.into(),
            r#type: EntityType::Track as i32,
            components: [(SOURCE.into(), any("entity.v1.SourceComponent", &source)), (POSITION.into(), any("entity.v1.PositionComponent", &position))].into(),
            versions: [(SOURCE.to_string(), version(1)), (POSITION.to_string(), version(counter))].into(),
            ..Entity::default()
        }
    }

    fn batch(events: Vec<(EventType, Entity)>) -> Vec<u8> {
        let events = events.into_iter().enumerate().map(|(seq, (t, e))| EntityEvent { r#type: t as i32, entity: Some(e), seq: seq as u64 + 1, ..EntityEvent::default() });
        EntityEventBatch { events: events.collect() }.encode_to_vec()
    }

    fn feed() -> FusionFeed {
        FusionFeed::new(Correlator::new(500.0, 1.5, HashMap::new(), 100.0).unwrap())
    }

    #[test]
    fn takes_tracks_skips_repeats_and_echoes_and_writes_each_change_once() {
        let mut f = feed();
        let near = 10.0 + 100.0 / crate::fusion::M_PER_DEG;
        let taken = f.take_batch(&batch(vec![(EventType::Created, track("eo-1", "eo", 10.0, 2)), (EventType::Created, track("radar-1", "radar", near, 2))])).unwrap();
        assert_eq!((taken.events, taken.last_seq, f.correlator.tracks().len()), (2, 2, 2));
        let again = f.take_batch(&batch(vec![(EventType::Updated, track("eo-1", "eo", 10.0, 2))])).unwrap();
        assert_eq!(again.skipped_unchanged, 1);
        let (pass, orphans) = f.correlate(false);
        assert_eq!((pass.changed.len(), orphans.len()), (1, 0));
        let writes = f.prepare_writes();
        assert_eq!(writes.len(), 1);
        let (created, stamps) = f.commit_writes();
        assert_eq!((created.len(), stamps), (1, vec![1_002]));
        let written = Entity::decode(writes[0].as_slice()).unwrap();
        assert_eq!(written.id, fused_id(&["eo-1", "radar-1"]));
        // Its echo is skipped; a pass with nothing new owes nothing.
        let echo = f.take_batch(&batch(vec![(EventType::Updated, written)])).unwrap();
        assert_eq!(echo.skipped_echo, 1);
        f.correlate(false);
        assert!(f.prepare_writes().is_empty());
        // A deleted source cascades to its fused track.
        let gone = f.take_batch(&batch(vec![(EventType::Deleted, track("radar-1", "radar", near, 2))])).unwrap();
        assert_eq!(gone.cascades.len(), 1);
    }

    #[test]
    fn bad_positions_and_components_are_noticed_once_and_change_nothing() {
        let mut f = feed();
        f.take_batch(&batch(vec![(EventType::Created, track("eo-1", "eo", 10.0, 2))])).unwrap();
        let nan = f.take_batch(&batch(vec![(EventType::Updated, track("eo-1", "eo", f64::NAN, 3)), (EventType::Updated, track("eo-1", "eo", 95.0, 4))])).unwrap();
        assert_eq!((nan.invalid_positions, nan.notices.len()), (2, 1));
        assert_eq!(f.correlator.track("eo-1").unwrap().lat, 10.0);
        let mut odd = track("eo-2", "eo", 10.0, 2);
        odd.components.get_mut(POSITION).unwrap().type_url = "type.googleapis.com/entity.v1.VelocityComponent".into();
        let taken = f.take_batch(&batch(vec![(EventType::Created, odd)])).unwrap();
        assert!(matches!(&taken.notices[..], [Notice::UnexpectedComponent { key: POSITION, .. }]));
        assert!(f.correlator.track("eo-2").is_none());
        assert!(f.take_batch(b"\xff\xff").is_err());
    }
}
