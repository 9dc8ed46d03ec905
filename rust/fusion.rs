//! fusion: the correlator of the fusion service. Source tracks in, fused tracks out; no I/O.
//!
//! The rules (as `meshstore.services.fusion` documents them for users):
//! - candidates are pairs of tracks of different sensor types within `max_distance`
//!   metres (equirectangular distance), found through a grid of cells never smaller than
//!   that distance (3x3 neighbourhood, longitude wrapping at the antimeridian);
//! - groups form greedily, closest pair first (ties by id), at most one track per sensor
//!   type, a joiner within the distance of every member; only free tracks are candidates;
//! - a group stands while its members stay within `hysteresis x max_distance`;
//! - a group's fused track is the 1/sigma^2-weighted mean of its members (in id order, so
//!   the rounding is the same whichever pass fuses it), its id `fused-` + 16 hex of the
//!   sha1 of the sorted member ids.
//!
//! Invariant of the incremental pass (`correlate(false)`): it gives exactly what a full
//! pass over the same tracks gives. Two tracks free after a pass have no candidate pair
//! (greedy would have grouped them), so a new pair always has a track touched or freed
//! since; a group none of whose members was touched passes its checks again and fuses to
//! the same point. Groups adopted from the store are the only ones that may overlap
//! others: they are checked after every standing group, in adoption order.
use ahash::{AHashMap, AHashSet};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

pub const EARTH_RADIUS_M: f64 = 6_371_008.8;
pub const M_PER_DEG: f64 = EARTH_RADIUS_M * std::f64::consts::PI / 180.0;
pub const FUSED_PREFIX: &str = "fused-";
/// Position accuracy (1 sigma, metres) of a sensor type with none configured.
pub const DEFAULT_SIGMA: f64 = 100.0;

pub type Id = Arc<str>;

/// A source track as fusion sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Obs {
    pub id: Id,
    pub sensor_type: Id,
    pub lat: f64,
    pub lon: f64,
    pub alt: f64,
    pub sensor_id: Id,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fused {
    pub id: Id,
    pub source_ids: Vec<Id>,
    pub lat: f64,
    pub lon: f64,
    pub alt: f64,
    pub confidence: f64,
    pub sigma_m: f64,
}

/// Python's float `%` (the sign of the divisor): the wrap of longitudes.
fn py_mod(x: f64, m: f64) -> f64 {
    let r = x % m;
    if r == 0.0 {
        0.0f64.copysign(m)
    } else if (r < 0.0) != (m < 0.0) {
        r + m
    } else {
        r
    }
}

/// Equirectangular distance in metres (longitude difference wrapped to +-180).
pub fn distance_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let dlon = py_mod(lon2 - lon1 + 180.0, 360.0) - 180.0;
    let x = dlon.to_radians() * ((lat1 + lat2) / 2.0).to_radians().cos();
    let y = (lat2 - lat1).to_radians();
    EARTH_RADIUS_M * x.hypot(y)
}

fn dist(a: &Obs, b: &Obs) -> f64 {
    distance_m(a.lat, a.lon, b.lat, b.lon)
}

/// `fused-` + 16 hex digits of sha1 over the sorted ids joined by U+001F: the same set,
/// the same id, whoever computes it.
pub fn fused_id<S: AsRef<str>>(source_ids: &[S]) -> String {
    let mut ids: Vec<&str> = source_ids.iter().map(|s| s.as_ref()).collect();
    ids.sort_unstable();
    ids.dedup();
    let digest = sha1_smol::Sha1::from(ids.join("\x1f")).hexdigest();
    format!("{FUSED_PREFIX}{}", &digest[..16])
}

pub fn valid_position(lat: f64, lon: f64) -> bool {
    lat.is_finite() && lon.is_finite() && (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)
}

/// Python's `round(x, 2)`: the decimal rounding of the binary value, ties to even.
fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().unwrap_or(x)
}

// ---- candidate search ----------------------------------------------------------------------

type Cell = (i64, i64);

/// A grid's geometry: rows of `max_distance` in latitude; columns (a whole number around
/// the globe) never narrower than `max_distance` at latitudes up to `bound`.
#[derive(Clone, Debug)]
struct Cells {
    height: f64,
    width: f64,
    cols: i64,
    col_offsets: Vec<i64>,
}

impl Cells {
    fn new(max_distance: f64, bound: f64) -> Self {
        let height = max_distance / M_PER_DEG;
        let c = bound.to_radians().cos();
        // The distance scales longitude by cos(mean latitude) >= c, so pairs within
        // max_distance are within max_distance / (M_PER_DEG * c) degrees of longitude.
        let needed = if c > 1e-9 { max_distance / (M_PER_DEG * c) } else { 360.0 };
        // Floor division as Python does it (exact: never more columns than fit).
        let cols = if needed < 360.0 {
            let div = (360.0 - 360.0 % needed) / needed;
            let mut floor = div.floor();
            if div - floor > 0.5 {
                floor += 1.0;
            }
            (floor as i64).max(1)
        } else {
            1
        };
        let mut col_offsets: Vec<i64> = [-1i64, 0, 1].iter().map(|d| d.rem_euclid(cols)).collect();
        col_offsets.sort_unstable();
        col_offsets.dedup();
        Cells { height, width: 360.0 / cols as f64, cols, col_offsets }
    }

    fn key(&self, lat: f64, lon: f64) -> Cell {
        (((lat + 90.0) / self.height).floor() as i64, (((lon + 180.0) / self.width).floor() as i64).rem_euclid(self.cols))
    }

    fn around(&self, (row, col): Cell) -> impl Iterator<Item = Cell> + '_ {
        // A row beyond i64 holds no track (a tiny max_distance saturates rows at its edge).
        (-1..=1)
            .filter_map(move |dr| row.checked_add(dr))
            .flat_map(move |r| self.col_offsets.iter().map(move |dc| (r, (col + dc).rem_euclid(self.cols))))
    }
}

fn by_distance_then_ids<T: Ord>(a: &(f64, T, T), b: &(f64, T, T)) -> Ordering {
    a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)).then_with(|| a.2.cmp(&b.2))
}

/// Every (distance, i, j), i < j, of tracks of different sensor types within
/// `max_distance`, sorted; through the grid (3x3 neighbourhood per track).
pub fn candidate_pairs_grid(tracks: &[Obs], max_distance: f64) -> Vec<(f64, usize, usize)> {
    if max_distance <= 0.0 || tracks.len() < 2 {
        return Vec::new();
    }
    let bound = tracks.iter().map(|t| t.lat.abs()).fold(0.0, f64::max);
    let grid = Cells::new(max_distance, bound);
    let keys: Vec<Cell> = tracks.iter().map(|t| grid.key(t.lat, t.lon)).collect();
    let mut cells: AHashMap<Cell, Vec<usize>> = AHashMap::new();
    for (i, key) in keys.iter().enumerate() {
        cells.entry(*key).or_default().push(i);
    }
    let mut out = Vec::new();
    for (i, t) in tracks.iter().enumerate() {
        for key in grid.around(keys[i]) {
            for &j in cells.get(&key).map(Vec::as_slice).unwrap_or_default() {
                if j > i && tracks[j].sensor_type != t.sensor_type {
                    let d = dist(t, &tracks[j]);
                    if d <= max_distance {
                        out.push((d, i, j));
                    }
                }
            }
        }
    }
    out.sort_by(by_distance_then_ids);
    out
}

/// The all-pairs reference of `candidate_pairs_grid` (same output, O(n^2)).
pub fn candidate_pairs_brute(tracks: &[Obs], max_distance: f64) -> Vec<(f64, usize, usize)> {
    let mut out = Vec::new();
    for (i, t) in tracks.iter().enumerate() {
        for (j, u) in tracks.iter().enumerate().skip(i + 1) {
            if u.sensor_type != t.sensor_type {
                let d = dist(t, u);
                if d <= max_distance {
                    out.push((d, i, j));
                }
            }
        }
    }
    out.sort_by(by_distance_then_ids);
    out
}

/// Every track's id by grid cell, kept as tracks come, move and go: the incremental
/// pass's neighbour search. Its cells are sized for a latitude bound (whole degrees) that
/// only grows; a track beyond it rebuilds the grid (wider cells, still right below it).
struct TrackGrid {
    max_distance: f64,
    bound: f64,
    geometry: Cells,
    cells: AHashMap<Cell, AHashSet<Id>>,
    at: AHashMap<Id, Cell>,
}

impl TrackGrid {
    fn new(max_distance: f64) -> Self {
        TrackGrid { max_distance, bound: 0.0, geometry: Cells::new(max_distance, 0.0), cells: AHashMap::new(), at: AHashMap::new() }
    }

    /// Puts `t` (already in `tracks`) in its cell.
    fn place(&mut self, t: &Obs, tracks: &AHashMap<Id, Obs>) {
        if t.lat.abs() > self.bound {
            self.bound = t.lat.abs().ceil().min(90.0);
            self.geometry = Cells::new(self.max_distance, self.bound);
            self.cells.clear();
            self.at.clear();
            for u in tracks.values() {
                self.put(&u.id, self.geometry.key(u.lat, u.lon));
            }
            return;
        }
        let key = self.geometry.key(t.lat, t.lon);
        if self.at.get(&t.id) != Some(&key) {
            self.drop(&t.id);
            self.put(&t.id, key);
        }
    }

    fn put(&mut self, id: &Id, key: Cell) {
        self.at.insert(id.clone(), key);
        self.cells.entry(key).or_default().insert(id.clone());
    }

    fn drop(&mut self, id: &str) {
        if let Some(key) = self.at.remove(id) {
            let cell = self.cells.get_mut(&key).expect("a placed track's cell");
            cell.remove(id);
            if cell.is_empty() {
                self.cells.remove(&key);
            }
        }
    }
}

// ---- the correlator ------------------------------------------------------------------------

/// A pass's outcome: the fused ids it (re)computed (the only ones that can differ from
/// before it), the fused ids it dissolved, the candidate pairs it considered.
#[derive(Debug, Default, PartialEq)]
pub struct PassResult {
    pub changed: Vec<Id>,
    pub removed: Vec<Id>,
    pub candidates: usize,
    pub full: bool,
}

#[derive(Clone, Debug)]
struct Group {
    /// When it formed or was adopted (the order full passes check groups in).
    order: u64,
    ids: Vec<Id>,
}

pub struct Correlator {
    pub max_distance: f64,
    pub hysteresis: f64,
    pub sigmas: HashMap<String, f64>,
    pub default_sigma: f64,
    tracks: AHashMap<Id, Obs>,
    groups: AHashMap<Id, Group>,
    next_order: u64,
    fused: AHashMap<Id, Fused>,
    /// source id -> its group (exact for the groups a pass kept; adopted ones may overlap)
    member_of: AHashMap<Id, Id>,
    grid: TrackGrid,
    // Since the last pass: tracks upserted or removed, and members of groups dissolved by
    // a removal (free again); groups adopted; whether the next pass must be full.
    touched: AHashSet<Id>,
    adopted: AHashSet<Id>,
    full_next: bool,
}

impl Correlator {
    pub fn new(max_distance: f64, hysteresis: f64, sigmas: HashMap<String, f64>, default_sigma: f64) -> Result<Self, String> {
        if !max_distance.is_finite() || max_distance <= 0.0 {
            return Err(format!("max distance must be > 0 metres, got {max_distance}"));
        }
        if !hysteresis.is_finite() || hysteresis < 1.0 {
            return Err(format!("hysteresis must be >= 1, got {hysteresis}"));
        }
        Ok(Correlator {
            max_distance,
            hysteresis,
            sigmas,
            default_sigma,
            tracks: AHashMap::new(),
            groups: AHashMap::new(),
            next_order: 0,
            fused: AHashMap::new(),
            member_of: AHashMap::new(),
            grid: TrackGrid::new(max_distance),
            touched: AHashSet::new(),
            adopted: AHashSet::new(),
            full_next: false,
        })
    }

    pub fn tracks(&self) -> &AHashMap<Id, Obs> {
        &self.tracks
    }

    pub fn track(&self, id: &str) -> Option<&Obs> {
        self.tracks.get(id)
    }

    pub fn fused(&self) -> &AHashMap<Id, Fused> {
        &self.fused
    }

    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    pub fn has_group(&self, fid: &str) -> bool {
        self.groups.contains_key(fid)
    }

    /// Every group (fused id, its sorted source ids), in the order they formed or were adopted.
    pub fn groups(&self) -> Vec<(&Id, &[Id])> {
        let mut out: Vec<_> = self.groups.iter().collect();
        out.sort_by_key(|(_, g)| g.order);
        out.into_iter().map(|(fid, g)| (fid, g.ids.as_slice())).collect()
    }

    // ---- input ---------------------------------------------------------------------

    pub fn upsert(&mut self, obs: Obs) {
        if self.tracks.get(&obs.id) == Some(&obs) {
            return;
        }
        let id = obs.id.clone();
        self.tracks.insert(id.clone(), obs);
        self.grid.place(&self.tracks[&id], &self.tracks);
        self.touched.insert(id);
    }

    /// Forgets a source track; returns the fused ids built on it (now dissolved).
    pub fn remove(&mut self, track_id: &str) -> Vec<Id> {
        if let Some(t) = self.tracks.remove(track_id) {
            self.grid.drop(track_id);
            self.touched.insert(t.id);
        }
        let Some(fid) = self.member_of.get(track_id).cloned() else { return Vec::new() };
        self.touched.extend(self.groups[&fid].ids.iter().cloned());
        self.dissolve(&fid);
        vec![fid]
    }

    /// Takes over a fused entity found in the store (a restart); the next pass keeps it if
    /// its sources are still there and close, else dissolves it.
    pub fn adopt(&mut self, fid: &str, source_ids: &[Id]) {
        if self.groups.contains_key(fid) {
            return;
        }
        let mut ids = source_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let fid: Id = fid.into();
        for sid in &ids {
            self.member_of.entry(sid.clone()).or_insert_with(|| fid.clone());
        }
        self.new_group(fid.clone(), ids);
        self.adopted.insert(fid);
    }

    /// Forgets every source track (a snapshot follows). The groups stay: the next pass is
    /// a full one and checks them all.
    pub fn clear_tracks(&mut self) {
        self.tracks.clear();
        self.grid = TrackGrid::new(self.max_distance);
        self.touched.clear();
        self.full_next = true;
    }

    fn new_group(&mut self, fid: Id, ids: Vec<Id>) {
        self.next_order += 1;
        let order = self.next_order;
        self.groups.entry(fid).and_modify(|g| g.ids = ids.clone()).or_insert(Group { order, ids });
    }

    fn dissolve(&mut self, fid: &Id) {
        self.fused.remove(fid);
        if let Some(group) = self.groups.remove(fid) {
            for sid in &group.ids {
                if self.member_of.get(sid) == Some(fid) {
                    self.member_of.remove(sid);
                }
            }
        }
    }

    // ---- a pass --------------------------------------------------------------------

    /// The largest distance between two members (in the given order: rounding).
    fn spread(members: &[&Obs]) -> f64 {
        let mut out = 0.0f64;
        for (k, a) in members.iter().enumerate() {
            for b in &members[k + 1..] {
                out = out.max(dist(a, b));
            }
        }
        out
    }

    /// One pass. Incremental unless `full` (or the first after `clear_tracks`): the same
    /// result, from the groups and free tracks touched since the last pass only.
    /// `brute`: a full pass with all-pairs candidates (the reference).
    pub fn correlate(&mut self, full: bool, brute: bool) -> PassResult {
        let full = full || brute || self.full_next;
        self.full_next = false;
        let touched = std::mem::take(&mut self.touched);
        let adopted = std::mem::take(&mut self.adopted);
        let mut result = PassResult { full, ..PassResult::default() };
        let mut check: Vec<(u64, Id)>;
        if full {
            check = self.groups.iter().map(|(fid, g)| (g.order, fid.clone())).collect();
            check.sort_unstable();
            self.member_of.clear(); // rebuilt from the groups kept
            self.fused.clear();
        } else {
            let mut standing: AHashSet<&Id> = touched.iter().filter_map(|t| self.member_of.get(t)).collect();
            standing.retain(|fid| !adopted.contains(*fid));
            check = standing.into_iter().map(|fid| (self.groups[fid].order, fid.clone())).collect();
            check.sort_unstable();
            // Adopted groups after the others, in adoption order.
            let mut late: Vec<(u64, Id)> =
                adopted.iter().filter_map(|fid| self.groups.get(fid).map(|g| (g.order, fid.clone()))).collect();
            late.sort_unstable();
            check.extend(late);
        }
        let check: Vec<Id> = check.into_iter().map(|(_, fid)| fid).collect();
        let (mut kept, freed) = self.check(&check, &mut result.removed);
        let pairs: Vec<(Id, Id)> = if full {
            let mut free: Vec<&Obs> = self.tracks.values().filter(|t| !self.member_of.contains_key(&t.id)).collect();
            free.sort_unstable_by(|a, b| a.id.cmp(&b.id));
            let owned: Vec<Obs> = free.iter().map(|t| (*t).clone()).collect();
            let found = if brute { candidate_pairs_brute(&owned, self.max_distance) } else { candidate_pairs_grid(&owned, self.max_distance) };
            found.into_iter().map(|(_, i, j)| (owned[i].id.clone(), owned[j].id.clone())).collect()
        } else {
            let mut seeds = touched;
            seeds.extend(freed);
            self.pairs_near(&seeds)
        };
        result.candidates = pairs.len();
        for ids in self.greedy(&pairs) {
            let fid: Id = fused_id(&ids).into();
            for sid in &ids {
                self.member_of.insert(sid.clone(), fid.clone());
            }
            self.new_group(fid.clone(), ids);
            kept.push((fid, None));
        }
        for (fid, spread) in &kept {
            let f = self.fuse(fid, &self.groups[fid].ids, *spread);
            self.fused.insert(fid.clone(), f);
        }
        result.changed = kept.into_iter().map(|(fid, _)| fid).collect();
        result
    }

    /// Keeps each of `fids` (in order) whose members are all present, of distinct sensor
    /// types, within `hysteresis x max_distance` of each other and not in a group kept
    /// before it or not checked (only adopted groups overlap others); dissolves the others
    /// (into `removed`). Returns the kept ids with their spread, and the dissolved groups'
    /// members.
    fn check(&mut self, fids: &[Id], removed: &mut Vec<Id>) -> (Vec<(Id, Option<f64>)>, AHashSet<Id>) {
        let limit = self.hysteresis * self.max_distance;
        let checking: AHashSet<&Id> = fids.iter().collect();
        let mut kept: Vec<(Id, Option<f64>)> = Vec::new();
        let mut kept_set: AHashSet<Id> = AHashSet::new();
        let mut freed: AHashSet<Id> = AHashSet::new();
        for fid in fids {
            let ids = self.groups[fid].ids.clone();
            let members: Option<Vec<&Obs>> = ids.iter().map(|sid| self.tracks.get(sid)).collect();
            let mut spread = f64::INFINITY;
            if let Some(members) = members.filter(|m| m.len() >= 2) {
                let kinds: AHashSet<&Id> = members.iter().map(|m| &m.sensor_type).collect();
                let overlaps = ids.iter().any(|sid| {
                    self.member_of.get(sid).is_some_and(|g| g != fid && (kept_set.contains(g) || !checking.contains(g)))
                });
                if kinds.len() == members.len() && !overlaps {
                    spread = Self::spread(&members);
                }
            }
            if spread > limit {
                self.dissolve(fid);
                removed.push(fid.clone());
                freed.extend(ids);
                continue;
            }
            for sid in &ids {
                self.member_of.insert(sid.clone(), fid.clone());
            }
            kept.push((fid.clone(), Some(spread)));
            kept_set.insert(fid.clone());
        }
        (kept, freed)
    }

    /// The candidate pairs with a free track of `seeds` (through the track grid), as the
    /// full pass has them: (lower id, higher id), by distance, then ids.
    fn pairs_near(&self, seeds: &AHashSet<Id>) -> Vec<(Id, Id)> {
        let limit = self.max_distance;
        let mut found: Vec<(f64, &Id, &Id)> = Vec::new();
        for sid in seeds {
            let Some(t) = self.tracks.get(sid) else { continue };
            if self.member_of.contains_key(sid) {
                continue;
            }
            for key in self.grid.geometry.around(self.grid.at[sid]) {
                let Some(cell) = self.grid.cells.get(&key) else { continue };
                for uid in cell {
                    if uid == sid || self.member_of.contains_key(uid) {
                        continue;
                    }
                    let u = &self.tracks[uid];
                    if u.sensor_type == t.sensor_type {
                        continue;
                    }
                    let (a, b) = if sid < uid { (t, u) } else { (u, t) }; // the distance's rounding depends on the order
                    let d = dist(a, b);
                    if d <= limit {
                        found.push((d, &a.id, &b.id));
                    }
                }
            }
        }
        found.sort_by(by_distance_then_ids);
        found.dedup();
        found.into_iter().map(|(_, a, b)| (a.clone(), b.clone())).collect()
    }

    /// New groups (their sorted ids) from candidate pairs of free tracks, closest first.
    fn greedy(&self, pairs: &[(Id, Id)]) -> Vec<Vec<Id>> {
        let mut groups: Vec<Vec<&Obs>> = Vec::new();
        let mut owner: AHashMap<&Id, usize> = AHashMap::new();
        for (a, b) in pairs {
            let (a, b) = (&self.tracks[a], &self.tracks[b]);
            let (ga, gb) = (owner.get(&a.id).copied(), owner.get(&b.id).copied());
            let (g, joiner) = match (ga, gb) {
                (None, None) => {
                    owner.insert(&a.id, groups.len());
                    owner.insert(&b.id, groups.len());
                    groups.push(vec![a, b]);
                    continue;
                }
                (Some(_), Some(_)) => continue, // both grouped already
                (None, Some(g)) => (g, a),
                (Some(g), None) => (g, b),
            };
            let members = &groups[g];
            if members.iter().any(|m| m.sensor_type == joiner.sensor_type) {
                continue;
            }
            if members.iter().all(|m| dist(m, joiner) <= self.max_distance) {
                groups[g].push(joiner);
                owner.insert(&joiner.id, g);
            }
        }
        groups
            .into_iter()
            .map(|members| {
                let mut ids: Vec<Id> = members.iter().map(|m| m.id.clone()).collect();
                ids.sort_unstable();
                ids
            })
            .collect()
    }

    /// The weighted (1/sigma^2) mean position of the tracks `ids` (sorted: the sums'
    /// rounding depends on the order). `spread`: theirs, if already known.
    fn fuse(&self, fid: &Id, ids: &[Id], spread: Option<f64>) -> Fused {
        let members: Vec<&Obs> = ids.iter().map(|sid| &self.tracks[sid]).collect();
        let reference = members[0].lon;
        let (mut total, mut lat, mut lon, mut alt) = (0.0, 0.0, 0.0, 0.0);
        for m in &members {
            let sigma = self.sigmas.get(&*m.sensor_type).copied().unwrap_or(self.default_sigma);
            let w = 1.0 / (sigma * sigma);
            total += w;
            lat += w * m.lat;
            lon += w * (reference + (py_mod(m.lon - reference + 180.0, 360.0) - 180.0)); // unwrap across the antimeridian
            alt += w * m.alt;
        }
        let (lat, mut lon, alt) = (lat / total, lon / total, alt / total);
        if !(-180.0..=180.0).contains(&lon) {
            lon = py_mod(lon + 180.0, 360.0) - 180.0;
        }
        let spread = spread.unwrap_or_else(|| Self::spread(&members));
        let confidence = round2((1.0 - spread / (self.hysteresis * self.max_distance)).max(0.05));
        Fused { id: fid.clone(), source_ids: ids.to_vec(), lat, lon, alt, confidence, sigma_m: 1.0 / total.sqrt() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(id: &str, kind: &str, lat: f64, lon: f64) -> Obs {
        Obs { id: id.into(), sensor_type: kind.into(), lat, lon, alt: 0.0, sensor_id: "".into() }
    }

    /// A small deterministic generator (the tests need no crate for it).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn range(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * self.next()
        }
    }

    fn correlator() -> Correlator {
        let sigmas = HashMap::from([("eo".to_string(), 10.0), ("radar".to_string(), 50.0)]);
        Correlator::new(500.0, 1.5, sigmas, DEFAULT_SIGMA).unwrap()
    }

    #[test]
    fn python_mod_and_distance() {
        assert_eq!(py_mod(-1.0, 360.0), 359.0);
        assert_eq!(py_mod(361.0, 360.0), 1.0);
        assert!(py_mod(-360.0, 360.0).is_sign_positive());
        // 0.001 degree of latitude is ~111 m; across the antimeridian as near as anywhere.
        assert!((distance_m(0.0, 0.0, 0.001, 0.0) - 111.195).abs() < 0.01);
        assert!((distance_m(0.0, 179.9995, 0.0, -179.9995) - 111.195).abs() < 0.01);
    }

    #[test]
    fn fused_ids_are_the_sha1_of_the_sorted_ids() {
        assert_eq!(fused_id(&["radar-1", "eo-1"]), fused_id(&["eo-1", "radar-1"]));
        assert_ne!(fused_id(&["a", "bc"]), fused_id(&["ab", "c"]));
        // sha1("eo-3\x1fradar-3"), as Python's hashlib gives it.
        assert_eq!(fused_id(&["eo-3", "radar-3"]), "fused-529867bbd3b6d128");
    }

    #[test]
    fn grid_candidates_equal_brute_force_near_the_pole_and_the_antimeridian() {
        for (seed, lat, lon) in [(1u64, (50.0, 50.2), (0.0, 0.3)), (2, (-10.0, -9.9), (179.9, 180.0)), (3, (89.0, 89.999), (-180.0, 180.0))] {
            let mut rng = Lcg(seed);
            let kinds = ["eo", "radar", "ais"];
            let tracks: Vec<Obs> = (0..400)
                .map(|i| obs(&format!("t{i}"), kinds[i % 3], rng.range(lat.0, lat.1), rng.range(lon.0, lon.1)))
                .collect();
            for max_distance in [100.0, 500.0, 2000.0] {
                assert_eq!(candidate_pairs_grid(&tracks, max_distance), candidate_pairs_brute(&tracks, max_distance));
            }
        }
    }

    #[test]
    fn incremental_passes_equal_full_passes() {
        let mut rng = Lcg(7);
        let (mut inc, mut full) = (correlator(), correlator());
        let kinds = ["eo", "radar", "ais"];
        let mut ids = Vec::new();
        for round in 0..60 {
            for _ in 0..20 {
                let n = (rng.next() * 150.0) as usize;
                let id = format!("t{n}");
                let o = obs(&id, kinds[n % 3], rng.range(50.0, 50.05), rng.range(0.0, 0.05));
                inc.upsert(o.clone());
                full.upsert(o);
                ids.push(id);
            }
            if round % 7 == 3 {
                let gone = ids[(rng.next() * ids.len() as f64) as usize].clone();
                assert_eq!(inc.remove(&gone), full.remove(&gone));
            }
            assert!(!inc.correlate(false, false).full && full.correlate(true, false).full);
            assert_eq!(inc.fused(), full.fused(), "round {round}");
        }
        assert!(!inc.fused().is_empty());
    }

    #[test]
    fn pairs_closest_first_weighted_by_accuracy_and_kept_with_hysteresis() {
        let mut c = correlator();
        c.upsert(obs("eo-1", "eo", 10.0, 10.0));
        c.upsert(obs("radar-1", "radar", 10.0 + 400.0 / M_PER_DEG, 10.0));
        let pass = c.correlate(false, false);
        let fid: Id = fused_id(&["eo-1", "radar-1"]).into();
        assert_eq!(pass.changed, vec![fid.clone()]);
        let f = &c.fused()[&fid];
        // Weighted toward the EO track: 400 m x (1/50^2) / (1/10^2 + 1/50^2) = 15.4 m.
        assert!((distance_m(10.0, 10.0, f.lat, f.lon) - 400.0 / 26.0).abs() < 0.01);
        assert_eq!(f.confidence, round2(1.0 - 400.0 / 750.0));
        c.upsert(obs("radar-1", "radar", 10.0 + 700.0 / M_PER_DEG, 10.0));
        assert!(c.correlate(false, false).removed.is_empty()); // 1.4x: kept
        c.upsert(obs("radar-1", "radar", 10.0 + 800.0 / M_PER_DEG, 10.0));
        assert_eq!(c.correlate(false, false).removed, vec![fid]); // 1.6x: dissolved
        assert!(c.fused().is_empty());
    }
}
