//! meshstore's core: the hot path of a replicated entity-component store.
//!
//! - `hlc`: hybrid logical clock.
//! - `histogram`: lock-free latency histograms (gRPC methods, storage commits).
//! - `causal`: dots and version vectors (what a replica has seen).
//! - `strategy`: merge strategies dispatched on a component's Any type URL.
//! - `decode`: entity wire bytes read in place (the write and merge paths).
//! - `entity`: one entity's CRDT state (siblings, context, delete) and its wire form.
//! - `expiry`: the due-time index of entity expiries (one host timer, not one per entity).
//! - `fusion`: the fusion service's correlator (grid, incremental passes, fused tracks).
//! - `fusion_wire`: fusion's intake of watch batches and its fused entities on the wire.
//! - `approval`: operator decisions on a pending approval.
//! - `table`: the entity table (writes, merges, deletes, context summary, change log).
//! - `feed`: the table's recent changes, kept once for every watcher to read.
//! - `watch`: bounded watcher queues that fall behind and catch up from the log.
//! - `store`: the table and its storage as every front end shares them.
//! - `storage`: the data dir (SQLite, WAL) a table is saved to and loaded from.
//! - `durable`: group commit of a table to its storage, backpressure, durable waits.
//! - `server` (feature "server"): the gRPC data plane on tonic.
//! - `python` (feature "python"): the pyo3 bindings behind `meshstore._core`.
pub mod approval;
pub mod causal;
pub mod decode;
pub mod durable;
pub mod entity;
pub mod error;
pub mod expiry;
pub mod feed;
pub mod fusion;
pub mod fusion_wire;
pub mod histogram;
pub mod hlc;
pub mod intern;
pub mod strategy;
pub mod storage;
pub mod store;
pub mod table;
pub mod watch;
pub mod wire;

#[cfg(feature = "python")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "python")]
mod python;
#[cfg(feature = "python")]
mod py_fusion;
#[cfg(feature = "python")]
mod py_server;
#[cfg(feature = "server")]
pub mod server;

/// Types generated from proto/ (entity.v1's are also re-exported at the top).
pub mod pb {
    pub mod entity {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/entity.v1.rs"));
        }
    }
    pub mod store {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/store.v1.rs"));
        }
    }
    pub mod mesh {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/mesh.v1.rs"));
        }
    }
    pub use entity::v1::*;
    /// The encoded descriptors of every file above (and their imports), for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
}
