//! B1: Rust-native merge throughput of 5-component track entities (`cargo bench --bench merge`).
//!
//! A source table (node "a") writes N tracks with position, velocity, threat,
//! classification and source, then rewrites position+velocity of every track (as an
//! ingest feed does). Its `changes_since` replica states are the input:
//!
//! - gen1: the first state of every track (5 values and the type register, one dot each,
//!   the context of node "a");
//! - gen2: the state after the rewrite (2 of the values replaced by new dots).
//!
//! Measured, N operations per repetition, after a warm-up, best and median of the reps:
//!
//! - baseline: `pb::Entity::decode` of the gen1 bytes (prost, no validation);
//! - `decode_entity` + `state_from_replica` (what `Table::merge` does before it joins);
//! - `Table::merge` of bytes: new entities into an empty table, gen2 over gen1 (the
//!   steady state of replication), gen1 over gen1 (a duplicate delivery, no change);
//! - `EntityState::join(&other, &seen)` on pre-decoded states, the same three cases.
//!
//! No criterion: `std::time::Instant`, harness = false. Target: >= 5M entity merges/s.
//! For profiling one path: `B1_ONLY=<part of a row name> B1_REPS=20 perf record ...`.
use _core::causal::VersionVector;
use _core::decode::decode_entity;
use _core::entity::{state_from_replica, EntityState};
use _core::hlc::system_wall_ns;
use _core::intern::intern;
use _core::pb;
use _core::strategy::Registry;
use _core::table::{Options, Table, WriteMode};
use prost::Message;
use std::hint::black_box;
use std::time::{Duration, Instant};

const N: usize = 100_000;
const WARMUP: usize = 1;
/// Repetitions; `B1_REPS` overrides (e.g. more of them under a profiler).
fn reps() -> usize {
    std::env::var("B1_REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(7)
}
/// `B1_ONLY=<substring>`: run only the rows whose name contains it (and the baseline),
/// so a profiler sees one code path.
fn selected(name: &str) -> bool {
    std::env::var("B1_ONLY").map_or(true, |f| name.contains(f.as_str()))
}
const TARGET_PER_S: f64 = 5e6;

fn any<M: Message>(name: &str, m: &M) -> prost_types::Any {
    prost_types::Any { type_url: format!("type.googleapis.com/entity.v1.{name}"), value: m.encode_to_vec() }
}

fn id(i: usize) -> String {
    format!("track-{i:06}")
}

fn kinematics(e: &mut pb::Entity, i: usize, gen: u32) {
    let f = i as f64;
    let g = gen as f64;
    let position = pb::PositionComponent { lat: 30.0 + f * 1e-5 + g * 1e-4, lon: -120.0 + f * 2e-5 + g * 1e-4, alt: 500.0 + g };
    let velocity = pb::VelocityComponent { speed: 100.0 + (i % 50) as f64 + g, heading: (i % 360) as f64 };
    e.components.insert("position".into(), any("PositionComponent", &position));
    e.components.insert("velocity".into(), any("VelocityComponent", &velocity));
}

/// A track write with all five components (a blind put, as a sensor feed sends it).
fn full_track(i: usize) -> Vec<u8> {
    let mut e = pb::Entity { id: id(i), r#type: pb::EntityType::Track as i32, ..Default::default() };
    kinematics(&mut e, i, 0);
    let threat = pb::ThreatComponent { level: 1 + (i % 4) as i32 };
    let class = pb::ClassificationComponent { label: ["vehicle", "aircraft", "vessel"][i % 3].into(), confidence: 0.5 + (i % 5) as f32 * 0.1 };
    let source = pb::SourceComponent { sensor_id: format!("radar-{}", i % 8), sensor_type: "radar".into() };
    e.components.insert("threat".into(), any("ThreatComponent", &threat));
    e.components.insert("classification".into(), any("ClassificationComponent", &class));
    e.components.insert("source".into(), any("SourceComponent", &source));
    e.encode_to_vec()
}

/// A position + velocity rewrite of track `i`.
fn kinematics_update(i: usize) -> Vec<u8> {
    let mut e = pb::Entity { id: id(i), ..Default::default() };
    kinematics(&mut e, i, 1);
    e.encode_to_vec()
}

fn table(node: &str) -> Table {
    Table::new(Options { node_id: node.into(), ..Options::default() }, Box::new(system_wall_ns))
}

struct Input {
    gen1: Vec<Vec<u8>>,
    gen2: Vec<Vec<u8>>,
}

fn make_input() -> Input {
    let mut a = table("a");
    for i in 0..N {
        a.write(&full_track(i), WriteMode::Put, false).expect("put");
    }
    let (gen1, seq1) = a.changes_since(0, usize::MAX, None, None).expect("changes");
    for i in 0..N {
        a.write(&kinematics_update(i), WriteMode::Put, false).expect("update");
    }
    let (gen2, _) = a.changes_since(seq1, usize::MAX, None, None).expect("changes");
    assert_eq!((gen1.len(), gen2.len()), (N, N));
    Input { gen1, gen2 }
}

fn states(bytes: &[Vec<u8>], reg: &Registry) -> Vec<EntityState> {
    bytes
        .iter()
        .map(|b| state_from_replica(&decode_entity(b).unwrap(), reg, None).unwrap())
        .collect()
}

fn merged(bytes: &[Vec<u8>]) -> Table {
    let mut t = table("b");
    for b in bytes {
        t.merge(b, "").unwrap();
    }
    t
}

/// Seconds per repetition; `setup` builds what one repetition consumes (not timed),
/// `run` does N operations on it; what `run` returns is dropped after the clock stops.
fn measure<S, R>(mut setup: impl FnMut() -> S, mut run: impl FnMut(&mut S) -> R) -> Vec<f64> {
    let mut times = Vec::with_capacity(reps());
    for rep in 0..WARMUP + reps() {
        let mut s = setup();
        let start = Instant::now();
        let out = run(&mut s);
        let elapsed = start.elapsed();
        drop(black_box(out));
        drop(s);
        if rep >= WARMUP {
            times.push(elapsed.as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times
}

struct Row {
    name: &'static str,
    best: f64,
    median: f64,
}

impl Row {
    fn new(name: &'static str, times: &[f64]) -> Row {
        Row { name, best: times[0] / N as f64, median: times[times.len() / 2] / N as f64 }
    }
}

const DECODE: &str = "baseline: prost Entity::decode (gen1 bytes)";
const TO_STATE: &str = "decode_entity + state_from_replica (gen1)";
const MERGE_NEW: &str = "Table::merge bytes: new entity (gen1 -> empty)";
const MERGE_UPDATE: &str = "Table::merge bytes: newer state (gen2 -> gen1)";
const MERGE_DUP: &str = "Table::merge bytes: duplicate (gen1 -> gen1)";
const JOIN_NEW: &str = "EntityState::join: new entity (gen1 -> empty)";
const JOIN_UPDATE: &str = "EntityState::join: newer state (gen2 -> gen1)";
const JOIN_DUP: &str = "EntityState::join: duplicate (gen1 -> gen1)";

fn main() {
    // `cargo bench` passes `--bench`; rows are chosen with B1_ONLY, not arguments.
    let t0 = Instant::now();
    let reg = Registry::default();
    let input = make_input();
    let gen1_states = states(&input.gen1, &reg);
    let gen2_states = states(&input.gen2, &reg);
    let bytes_per_state = input.gen1.iter().map(Vec::len).sum::<usize>() / N;
    let source = intern("b");
    // No entity was forgotten here: the store's context summary adds nothing.
    let empty = VersionVector::new();
    let mut rows = Vec::new();

    let decode = measure(
        || (),
        |_| {
            let mut cells = 0usize;
            for b in &input.gen1 {
                cells += black_box(pb::Entity::decode(b.as_slice()).unwrap()).components.len();
            }
            cells
        },
    );
    rows.push(Row::new(DECODE, &decode));

    if selected(TO_STATE) {
        let t = measure(
            || Vec::with_capacity(N),
            |out: &mut Vec<EntityState>| {
                for b in &input.gen1 {
                    out.push(state_from_replica(&decode_entity(b).unwrap(), &reg, None).unwrap());
                }
            },
        );
        rows.push(Row::new(TO_STATE, &t));
    }

    let merge_all = |t: &mut Table, bytes: &[Vec<u8>], expect_changed: usize| {
        let mut changed = 0usize;
        for b in bytes {
            changed += t.merge(b, "").unwrap() as usize;
        }
        assert_eq!(changed, expect_changed);
    };
    if selected(MERGE_NEW) {
        let t = measure(|| table("b"), |t: &mut Table| merge_all(t, &input.gen1, N));
        rows.push(Row::new(MERGE_NEW, &t));
    }
    if selected(MERGE_UPDATE) {
        let t = measure(|| merged(&input.gen1), |t: &mut Table| merge_all(t, &input.gen2, N));
        rows.push(Row::new(MERGE_UPDATE, &t));
    }
    if selected(MERGE_DUP) {
        let mut at_gen1 = merged(&input.gen1);
        let t = measure(|| (), |_| merge_all(&mut at_gen1, &input.gen1, 0));
        rows.push(Row::new(MERGE_DUP, &t));
    }

    let join_all = |targets: &mut Vec<EntityState>, remote: &[EntityState], expect_changed: usize| {
        let mut changed = 0usize;
        for (t, r) in targets.iter_mut().zip(remote) {
            changed += t.join(r, &empty).changed as usize;
        }
        assert_eq!(changed, expect_changed);
    };
    if selected(JOIN_NEW) {
        let t = measure(
            || gen1_states.iter().map(|s| EntityState::new(s.id.clone(), source)).collect::<Vec<_>>(),
            |targets: &mut Vec<EntityState>| join_all(targets, &gen1_states, N),
        );
        rows.push(Row::new(JOIN_NEW, &t));
    }
    if selected(JOIN_UPDATE) {
        let t = measure(|| gen1_states.clone(), |targets: &mut Vec<EntityState>| join_all(targets, &gen2_states, N));
        rows.push(Row::new(JOIN_UPDATE, &t));
    }
    if selected(JOIN_DUP) {
        let mut targets = gen1_states.clone();
        let t = measure(|| (), |_| join_all(&mut targets, &gen1_states, 0));
        rows.push(Row::new(JOIN_DUP, &t));
    }

    let base = rows[0].median;
    println!();
    println!(
        "B1 merge throughput: {N} tracks x 5 components (position, velocity, threat, classification, source), \
         {bytes_per_state} B per replica state, best/median of {} reps after {WARMUP} warm-up",
        reps()
    );
    println!(
        "{:<48} {:>10} {:>10} {:>11} {:>11} {:>9}",
        "operation (per entity)", "ns med", "ns best", "M/s med", "M/s best", "x decode"
    );
    println!("{}", "-".repeat(48 + 11 + 11 + 12 + 12 + 10));
    for r in &rows {
        println!(
            "{:<48} {:>10.1} {:>10.1} {:>11.3} {:>11.3} {:>9.2}",
            r.name,
            r.median * 1e9,
            r.best * 1e9,
            1e-6 / r.median,
            1e-6 / r.best,
            r.median / base
        );
    }
    println!("x decode = median time per entity / median time of a bare prost decode of the same kind of bytes");
    println!("           (merge/decode ratio: > 1 means the merge costs more than decoding alone)");
    // The best reps: the least disturbed by other load on the machine.
    let best = |name: &str| rows.iter().find(|r| r.name == name).map(|r| r.best * 1e9);
    if let (Some(to_state), Some(join), Some(merge)) = (best(TO_STATE), best(JOIN_UPDATE), best(MERGE_UPDATE)) {
        println!();
        println!("where a steady-state Table::merge (gen2 -> gen1, {merge:.0} ns) goes, from the best reps above:");
        println!(
            "  decode in place + state_from_replica          {to_state:>8.0} ns  {:>5.1}%",
            100.0 * to_state / merge
        );
        println!("  EntityState::join                             {join:>8.0} ns  {:>5.1}%", 100.0 * join / merge);
        let rest = merge - to_state - join;
        println!(
            "  table: checks, map lookup, refresh, change     {rest:>8.0} ns  {:>5.1}%\n    log, clock, drop of the remote state",
            100.0 * rest / merge
        );
    }
    println!();
    for (what, name) in [
        ("Table::merge of replica bytes (gen2 -> gen1)", MERGE_UPDATE),
        ("Table::merge of replica bytes (new entity)", MERGE_NEW),
        ("EntityState::join on decoded states (gen2 -> gen1)", JOIN_UPDATE),
        ("EntityState::join on decoded states (new entity)", JOIN_NEW),
    ] {
        let Some(r) = rows.iter().find(|r| r.name == name) else { continue };
        let (rate, top) = (1.0 / r.median, 1.0 / r.best);
        println!(
            "B1 target >= {:.0}M merges/s | {what:<52} {:>6.3}M/s median ({:.3}M/s best) -> {:<6} ({:.2}x of target)",
            TARGET_PER_S / 1e6,
            rate / 1e6,
            top / 1e6,
            if rate >= TARGET_PER_S { "MET" } else { "MISSED" },
            rate / TARGET_PER_S
        );
    }
    println!("total bench time {:.1?}", Duration::from_secs_f64(t0.elapsed().as_secs_f64()));
}
