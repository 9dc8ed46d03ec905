//! The pyo3 face of fusion (`meshstore._core.Correlator` and the geometry functions): the
//! correlator and its wire feed behind one object, which `meshstore.services.fusion`
//! wraps. Tracks cross as tuples (id, sensor_type, lat, lon, alt, sensor_id), fused
//! tracks as (id, source_ids, lat, lon, alt, confidence, sigma_m); watch batches and
//! fused entities as encoded bytes. Calls over many tracks release the GIL.
use crate::fusion::{self, Correlator, Fused, Id, Obs, DEFAULT_SIGMA};
use crate::fusion_wire::{FusionFeed, Notice};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use std::collections::HashMap;

type TrackTuple = (String, String, f64, f64, f64, String);
type FusedTuple<'py> = (String, Bound<'py, PyTuple>, f64, f64, f64, f64, f64);

fn ids(v: &[Id]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn track_tuple(t: &Obs) -> TrackTuple {
    (t.id.to_string(), t.sensor_type.to_string(), t.lat, t.lon, t.alt, t.sensor_id.to_string())
}

fn fused_tuple<'py>(py: Python<'py>, f: &Fused) -> PyResult<FusedTuple<'py>> {
    let sources = PyTuple::new(py, f.source_ids.iter().map(|s| &**s))?;
    Ok((f.id.to_string(), sources, f.lat, f.lon, f.alt, f.confidence, f.sigma_m))
}

fn notice_tuple(py: Python<'_>, n: &Notice) -> PyResult<PyObject> {
    Ok(match n {
        Notice::UnexpectedComponent { entity_id, key, expected, problem } => {
            ("component", entity_id, *key, *expected, problem).into_pyobject(py)?.into_any().unbind()
        }
        Notice::InvalidPosition { entity_id, lat, lon, alt } => ("position", entity_id, *lat, *lon, *alt).into_pyobject(py)?.into_any().unbind(),
    })
}

/// Fusion's state and rules without I/O: source tracks in, fused tracks out.
#[pyclass(module = "meshstore._core", name = "Correlator")]
pub struct PyCorrelator {
    feed: FusionFeed,
}

#[pymethods]
impl PyCorrelator {
    #[new]
    #[pyo3(signature = (max_distance, hysteresis=1.5, sigmas=HashMap::new(), default_sigma=DEFAULT_SIGMA))]
    fn new(max_distance: f64, hysteresis: f64, sigmas: HashMap<String, f64>, default_sigma: f64) -> PyResult<Self> {
        let c = Correlator::new(max_distance, hysteresis, sigmas, default_sigma).map_err(PyValueError::new_err)?;
        Ok(PyCorrelator { feed: FusionFeed::new(c) })
    }

    // ---- the correlator ------------------------------------------------------------

    /// Adds or moves a source track; ValueError for a position not finite or out of range.
    #[pyo3(signature = (id, sensor_type, lat, lon, alt=0.0, sensor_id=""))]
    fn upsert(&mut self, id: &str, sensor_type: &str, lat: f64, lon: f64, alt: f64, sensor_id: &str) -> PyResult<()> {
        if !fusion::valid_position(lat, lon) || !alt.is_finite() {
            return Err(PyValueError::new_err(format!("track {id:?}: position ({lat}, {lon}, {alt}) is not finite or out of range")));
        }
        self.feed.correlator.upsert(Obs { id: id.into(), sensor_type: sensor_type.into(), lat, lon, alt, sensor_id: sensor_id.into() });
        Ok(())
    }

    /// Forgets a source track; returns the fused ids built on it (now dissolved).
    fn remove(&mut self, id: &str) -> Vec<String> {
        ids(&self.feed.correlator.remove(id))
    }

    fn adopt(&mut self, fid: &str, source_ids: Vec<String>) {
        let sources: Vec<Id> = source_ids.iter().map(|s| s.as_str().into()).collect();
        self.feed.correlator.adopt(fid, &sources);
    }

    fn clear_tracks(&mut self) {
        self.feed.correlator.clear_tracks();
    }

    /// One pass: (changed, removed, candidates, full).
    #[pyo3(signature = (full=false, brute=false))]
    fn correlate(&mut self, py: Python<'_>, full: bool, brute: bool) -> (Vec<String>, Vec<String>, usize, bool) {
        let r = py.allow_threads(|| self.feed.correlator.correlate(full, brute));
        (ids(&r.changed), ids(&r.removed), r.candidates, r.full)
    }

    fn tracks(&self) -> Vec<TrackTuple> {
        self.feed.correlator.tracks().values().map(track_tuple).collect()
    }

    fn track(&self, id: &str) -> Option<TrackTuple> {
        self.feed.correlator.track(id).map(track_tuple)
    }

    /// Every group (fused id, sorted source ids), in the order they formed or were adopted.
    fn groups(&self) -> Vec<(String, Vec<String>)> {
        self.feed.correlator.groups().into_iter().map(|(fid, sources)| (fid.to_string(), ids(sources))).collect()
    }

    fn fused<'py>(&self, py: Python<'py>) -> PyResult<Vec<FusedTuple<'py>>> {
        self.feed.correlator.fused().values().map(|f| fused_tuple(py, f)).collect()
    }

    fn fused_track<'py>(&self, py: Python<'py>, fid: &str) -> PyResult<Option<FusedTuple<'py>>> {
        self.feed.correlator.fused().get(fid).map(|f| fused_tuple(py, f)).transpose()
    }

    #[getter]
    fn track_count(&self) -> usize {
        self.feed.correlator.tracks().len()
    }

    #[getter]
    fn group_count(&self) -> usize {
        self.feed.correlator.group_count()
    }

    // ---- the service's feed --------------------------------------------------------

    /// Before a listing: forgets every track and what was written (the groups stay).
    fn reset(&mut self) {
        self.feed.reset();
    }

    /// One listed entity (encoded `Entity`); returns notices to log.
    fn take_listed(&mut self, py: Python<'_>, entity: &[u8]) -> PyResult<Vec<PyObject>> {
        let notices = self.feed.take_listed(entity).map_err(PyValueError::new_err)?;
        notices.iter().map(|n| notice_tuple(py, n)).collect()
    }

    /// One watch message (encoded `EntityEventBatch`): returns (counts, cascades
    /// [(source id, fused id)], notices, last seq); counts is (events, skipped_echo,
    /// skipped_unchanged, invalid_positions).
    #[allow(clippy::type_complexity)]
    fn take_batch(
        &mut self,
        py: Python<'_>,
        batch: &[u8],
    ) -> PyResult<((u64, u64, u64, u64), Vec<(String, String)>, Vec<PyObject>, u64)> {
        let t = py.allow_threads(|| self.feed.take_batch(batch)).map_err(PyValueError::new_err)?;
        let notices = t.notices.iter().map(|n| notice_tuple(py, n)).collect::<PyResult<_>>()?;
        let cascades = t.cascades.iter().map(|(s, f)| (s.to_string(), f.to_string())).collect();
        Ok(((t.events, t.skipped_echo, t.skipped_unchanged, t.invalid_positions), cascades, notices, t.last_seq))
    }

    /// A DELETED event for `id`: returns the fused ids to delete.
    fn forget(&mut self, id: &str) -> Vec<String> {
        ids(&self.feed.forget(&id.into()))
    }

    /// One pass whose changes are owed to the store: (changed, removed, candidates, full,
    /// orphans: after a full pass, listed fused entities no group stands for).
    #[pyo3(signature = (full=false))]
    fn run_pass(&mut self, py: Python<'_>, full: bool) -> (Vec<String>, Vec<String>, usize, bool, Vec<String>) {
        let (r, orphans) = py.allow_threads(|| self.feed.correlate(full));
        (ids(&r.changed), ids(&r.removed), r.candidates, r.full, ids(&orphans))
    }

    /// A fused entity deleted from the store.
    fn deleted(&mut self, fid: &str) {
        self.feed.deleted(fid);
    }

    /// The fused entities owed that differ from what was written, encoded (pending until
    /// `commit_writes` or `abort_writes`).
    fn prepare_writes<'py>(&mut self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        let writes = py.allow_threads(|| self.feed.prepare_writes());
        writes.iter().map(|w| PyBytes::new(py, w)).collect()
    }

    /// The prepared writes landed: (fused ids new to the store, source stamps answered).
    fn commit_writes(&mut self) -> (Vec<String>, Vec<u64>) {
        let (created, stamps) = self.feed.commit_writes();
        (ids(&created), stamps)
    }

    fn abort_writes(&mut self) {
        self.feed.abort_writes();
    }
}

/// Equirectangular distance in metres (longitude difference wrapped to +-180).
#[pyfunction]
fn distance_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    fusion::distance_m(lat1, lon1, lat2, lon2)
}

/// `fused-` + 16 hex digits of sha1 over the sorted ids: the same set, the same id.
#[pyfunction]
fn fused_id(source_ids: Vec<String>) -> String {
    fusion::fused_id(&source_ids)
}

/// Candidate pairs (distance, i, j) of tracks given as (sensor_type, lat, lon), through
/// the grid or (`brute`) all pairs.
#[pyfunction]
#[pyo3(signature = (tracks, max_distance, brute=false))]
fn candidate_pairs(py: Python<'_>, tracks: Vec<(String, f64, f64)>, max_distance: f64, brute: bool) -> Vec<(f64, usize, usize)> {
    let obs: Vec<Obs> = tracks
        .into_iter()
        .map(|(kind, lat, lon)| Obs { id: "".into(), sensor_type: kind.into(), lat, lon, alt: 0.0, sensor_id: "".into() })
        .collect();
    py.allow_threads(|| if brute { fusion::candidate_pairs_brute(&obs, max_distance) } else { fusion::candidate_pairs_grid(&obs, max_distance) })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCorrelator>()?;
    m.add_function(wrap_pyfunction!(distance_m, m)?)?;
    m.add_function(wrap_pyfunction!(fused_id, m)?)?;
    m.add_function(wrap_pyfunction!(candidate_pairs, m)?)?;
    Ok(())
}
