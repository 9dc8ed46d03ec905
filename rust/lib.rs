//! meshstore's core: the hot path of a replicated entity-component store.
//!
//! - `hlc`: hybrid logical clock.
//! - `causal`: dots and version vectors (what a replica has seen).
//! - `strategy`: merge strategies dispatched on a component's Any type URL.
//! - `decode`: entity wire bytes read in place (the write and merge paths).
//! - `entity`: one entity's CRDT state (siblings, context, delete) and its wire form.
//! - `table`: the entity table (writes, merges, deletes, context summary, change log).
//! - `watch`: bounded, coalescing watcher queues.
//! - `storage`: the data dir (SQLite, WAL) a table is saved to and loaded from.
//! - `durable`: group commit of a table to its storage, backpressure, durable waits.
//! - `python` (feature "python"): the pyo3 bindings behind `meshstore._core`.
pub mod causal;
pub mod decode;
pub mod durable;
pub mod entity;
pub mod error;
pub mod hlc;
pub mod intern;
pub mod strategy;
pub mod storage;
pub mod table;
pub mod watch;
pub mod wire;

#[cfg(feature = "python")]
mod python;

/// Types generated from proto/entity/v1/entity.proto.
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/entity.v1.rs"));
}
