//! Errors of the core. Each names the entity (and key) it is about; the Python layer
//! maps them to its exception classes and the server to gRPC status codes.
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// Bad input: malformed bytes, empty id, oversize entity, unparsable component.
    /// `msg` says it all; `id` and `key` name the entity and component when known.
    Invalid { msg: String, id: Option<String>, key: Option<String> },
    NotFound(String),
    AlreadyExists(String),
    /// `strict` update with stale keys: nothing was applied.
    Stale { id: String, keys: Vec<String> },
    /// A version from the future (beyond the max clock offset).
    ClockSkew { id: String, key: Option<String>, what: String, ahead_ms: f64, max_ms: f64 },
    /// A `since_seq` cursor older than a collected tombstone.
    CursorExpired { seq: u64, floor: u64 },
    /// The request does not apply to the entity's state (e.g. no pending approval).
    FailedPrecondition { id: String, key: Option<String>, msg: String },
    /// The data dir cannot be opened, read or written (the message says which and why).
    Storage(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Error::Invalid { msg, .. } => write!(f, "{msg}"),
            Error::NotFound(id) => write!(f, "entity '{id}' not found"),
            Error::AlreadyExists(id) => write!(f, "entity '{id}' already exists"),
            Error::Stale { id, keys } => {
                write!(f, "entity '{id}': stale write of {keys:?} (a newer version is stored); nothing applied")
            }
            Error::ClockSkew { id, what, ahead_ms, max_ms, .. } => write!(
                f,
                "entity '{id}': {what} is {ahead_ms:.1} ms ahead of the local clock (max offset {max_ms:.1} ms)"
            ),
            Error::Storage(msg) | Error::FailedPrecondition { msg, .. } => write!(f, "{msg}"),
            Error::CursorExpired { seq, floor } => write!(
                f,
                "cursor {seq} is older than collected tombstones (up to seq {floor}); take a fresh snapshot"
            ),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The name of the exception class `meshstore.errors` raises for it (also what the
    /// mesh reports a refused state as).
    pub fn class_name(&self) -> &'static str {
        match self {
            Error::Invalid { .. } => "InvalidEntityError",
            Error::NotFound(_) => "NotFoundError",
            Error::AlreadyExists(_) => "AlreadyExistsError",
            Error::Stale { .. } => "StaleWriteError",
            Error::ClockSkew { .. } => "ClockSkewError",
            Error::CursorExpired { .. } => "CursorExpiredError",
            Error::FailedPrecondition { .. } => "NoPendingApprovalError",
            Error::Storage(_) => "StorageError",
        }
    }

    pub fn invalid(id: Option<&str>, key: Option<&str>, msg: String) -> Error {
        Error::Invalid { msg, id: id.map(str::to_owned), key: key.map(str::to_owned) }
    }
}
