//! A node's data dir: one SQLite database (WAL mode) holding what the table needs to
//! come back after a restart or a crash, and a lock file that keeps a second process
//! from writing it.
//!
//! Tables (readable with any SQLite tool):
//! - `entities(id, seq, state)`: each entity's replica state (the `entity.v1.Entity`
//!   replica encoding: siblings, causal context, delete record) and its change seq.
//! - `context(node, incarnation, counter)`: the store's context summary (incarnation as
//!   16 hex digits, so an operator reads it as the logs print it).
//! - `peers(peer, node_id, incarnation, acked_seq)`: how far each mesh peer (by address)
//!   acknowledged this node's log, and which life of which node it was.
//! - `meta(key, value)`: node id, incarnation, dot counter, seq, floor, clean shutdown.
//!
//! Invariants:
//! - Each commit is one transaction holding every change up to its `seq`, with the
//!   summary, counter and acknowledgements of that same moment: a crash leaves the file
//!   at one of those moments, never between.
//! - Nothing is written before the file is recognised as ours and of a format we know;
//!   a foreign, newer or corrupt file is refused, never overwritten.
//! - `clean` is 0 from open until a close that committed everything: a node that finds
//!   it 0 may have issued (and replicated) dots after its last commit, so it takes a new
//!   incarnation instead of resuming the counter.
use crate::intern::Sym;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The data format this build reads and writes (`PRAGMA user_version`).
pub const FORMAT: i64 = 1;
/// `PRAGMA application_id`: "MSH1".
pub const APPLICATION_ID: i64 = 0x4d53_4831;
pub const DB_FILE: &str = "meshstore.db";
pub const LOCK_FILE: &str = "meshstore.lock";

const SCHEMA: &str = "
    CREATE TABLE meta(key TEXT PRIMARY KEY, value ANY) STRICT, WITHOUT ROWID;
    CREATE TABLE entities(id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state BLOB NOT NULL) STRICT;
    CREATE TABLE context(node TEXT NOT NULL, incarnation TEXT NOT NULL, counter INTEGER NOT NULL,
                         PRIMARY KEY(node, incarnation)) STRICT, WITHOUT ROWID;
    CREATE TABLE peers(peer TEXT PRIMARY KEY, node_id TEXT NOT NULL, incarnation TEXT NOT NULL,
                       acked_seq INTEGER NOT NULL) STRICT, WITHOUT ROWID;
";

#[derive(Debug, Clone, PartialEq)]
pub struct StorageError(pub String);

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StorageError {}

pub type Result<T> = std::result::Result<T, StorageError>;

fn sql<'a>(what: &str, path: &'a Path) -> impl Fn(rusqlite::Error) -> StorageError + 'a {
    let what = what.to_owned();
    move |e| {
        let corrupt = matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase));
        let advice = if corrupt { " (the file is corrupt: restore it from a backup)" } else { "" };
        StorageError(format!("{what} {}: {e}{advice}", path.display()))
    }
}

/// u64 values (counters, seqs) are stored as SQLite's signed 64-bit integers, bit for bit.
fn to_sql(v: u64) -> i64 {
    v as i64
}

fn from_sql(v: i64) -> u64 {
    v as u64
}

/// Incarnations are stored as the logs print them: 16 hex digits.
fn hex(incarnation: u64) -> String {
    format!("{incarnation:016x}")
}

fn unhex(column: usize, text: &str) -> rusqlite::Result<u64> {
    u64::from_str_radix(text, 16).map_err(|_| {
        rusqlite::Error::InvalidColumnType(column, format!("incarnation {text:?}"), rusqlite::types::Type::Text)
    })
}

/// The node's identity and position in its own history.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeState {
    pub node_id: String,
    pub incarnation: u64,
    /// The last dot counter of `incarnation` covered by the stored states.
    pub counter: u64,
    pub seq: u64,
    /// Seq of the newest forgotten deleted entity (cursors before it cannot resume).
    pub floor: u64,
    /// Whether the node ever exchanged states with a peer.
    pub replicating: bool,
}

/// Everything a data dir holds, as loaded at open.
#[derive(Debug, Default)]
pub struct Stored {
    pub meta: NodeState,
    /// False if the last run did not close the file (a crash or a kill).
    pub clean: bool,
    /// How the last run committed (`commit`, `interval:<ms>`): says what a crash may have lost.
    pub durability: String,
    pub context: Vec<(String, u64, u64)>,
    pub peer_acks: Vec<PeerAck>,
}

/// How far a mesh peer (by address) acknowledged this node's log, and which node and
/// incarnation it was then.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerAck {
    pub peer: String,
    pub node_id: String,
    pub incarnation: u64,
    pub acked_seq: u64,
}

/// One group commit: every change since the previous one.
#[derive(Default)]
pub struct Batch {
    pub meta: NodeState,
    /// (id, change seq, replica state bytes)
    pub states: Vec<(Arc<str>, u64, Vec<u8>)>,
    /// Deleted entities forgotten since the last commit.
    pub forgotten: Vec<Arc<str>>,
    /// The context summary, if it changed.
    pub context: Option<Vec<(Sym, u64, u64)>>,
    pub peer_acks: Vec<PeerAck>,
}

pub struct Storage {
    conn: Connection,
    dir: PathBuf,
    /// Held (flock) while open: one writer per data dir.
    _lock: File,
}

impl Storage {
    /// Opens (creating if needed) the data dir `dir`. Returns the storage and what it
    /// held (None: a new data dir). Takes the dir's lock first; refuses a dir holding
    /// other files, a foreign or newer database, or one it cannot read in full.
    pub fn open(dir: &Path) -> Result<(Storage, Option<Stored>)> {
        let lock = lock_dir(dir)?;
        let db = dir.join(DB_FILE);
        let existed = db.exists();
        let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE)
            .map_err(sql("cannot open", &db))?;
        let stored = match recognise(&conn, &db)? {
            true => Some(load(&conn, &db)?),
            false if existed && std::fs::metadata(&db).map(|m| m.len() > 0).unwrap_or(false) => {
                return Err(StorageError(format!("{} is an SQLite database but not a meshstore data file", db.display())))
            }
            false => None,
        };
        configure(&conn, &db)?;
        if stored.is_none() {
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA} PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {FORMAT}; COMMIT;"
            ))
            .map_err(sql("cannot initialise", &db))?;
        }
        Ok((Storage { conn, dir: dir.to_owned(), _lock: lock }, stored))
    }

    /// Records the start of a run: identity, durability, and `clean = 0` until `close`.
    pub fn begin(&mut self, meta: &NodeState, durability: &str) -> Result<()> {
        let db = self.dir.join(DB_FILE);
        let tx = self.conn.transaction().map_err(sql("cannot write", &db))?;
        write_meta(&tx, meta).map_err(sql("cannot write", &db))?;
        set(&tx, "clean", 0).map_err(sql("cannot write", &db))?;
        set(&tx, "durability", durability).map_err(sql("cannot write", &db))?;
        tx.commit().map_err(sql("cannot write", &db))
    }

    /// Writes one group commit in one transaction.
    pub fn commit(&mut self, b: &Batch) -> Result<()> {
        let db = self.dir.join(DB_FILE);
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut forget = tx.prepare_cached("DELETE FROM entities WHERE id = ?1")?;
                for id in &b.forgotten {
                    forget.execute([&**id])?;
                }
                // An upsert rewrites the row in place (measured 1.4x faster than INSERT OR
                // REPLACE, and a rowid table 2x faster than WITHOUT ROWID for ~700-byte rows).
                let mut put = tx.prepare_cached(
                    "INSERT INTO entities(id, seq, state) VALUES (?1, ?2, ?3) \
                     ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, state = excluded.state",
                )?;
                for (id, seq, state) in &b.states {
                    put.execute(params![&**id, to_sql(*seq), state])?;
                }
                if let Some(context) = &b.context {
                    tx.execute("DELETE FROM context", [])?;
                    let mut add = tx.prepare_cached("INSERT INTO context(node, incarnation, counter) VALUES (?1, ?2, ?3)")?;
                    for (node, incarnation, counter) in context {
                        add.execute(params![node.as_str(), hex(*incarnation), to_sql(*counter)])?;
                    }
                }
                let mut ack = tx.prepare_cached(
                    "INSERT OR REPLACE INTO peers(peer, node_id, incarnation, acked_seq) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for a in &b.peer_acks {
                    ack.execute(params![a.peer, a.node_id, hex(a.incarnation), to_sql(a.acked_seq)])?;
                }
                write_meta(&tx, &b.meta)?;
            }
            tx.commit()
        };
        run(&mut self.conn).map_err(sql("cannot commit to", &db))
    }

    /// Marks the file cleanly closed (every change committed) and closes it.
    pub fn close(self) -> Result<()> {
        let db = self.dir.join(DB_FILE);
        set(&self.conn, "clean", 1).map_err(sql("cannot write", &db))?;
        // Fold the WAL into the database so the file alone is the whole state.
        self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").map_err(sql("cannot checkpoint", &db))?;
        self.conn.close().map_err(|(_, e)| StorageError(format!("cannot close {}: {e}", db.display())))
    }

    /// Calls `f` with every stored entity state and its change seq (streamed: a million
    /// states are never all in memory as bytes at once). Stops at `f`'s first error.
    pub fn each_state(&self, f: impl FnMut(&[u8], u64) -> std::result::Result<(), String>) -> Result<()> {
        each_state(&self.conn, &self.dir.join(DB_FILE), f)
    }

    /// How many entity states the data dir holds.
    pub fn entity_count(&self) -> Result<usize> {
        let db = self.dir.join(DB_FILE);
        let n: i64 = self.conn.query_row("SELECT count(*) FROM entities", [], |r| r.get(0)).map_err(sql("cannot read", &db))?;
        Ok(n as usize)
    }

    /// Bytes the data dir's database takes on disk (WAL included).
    pub fn size_bytes(&self) -> u64 {
        size_bytes(&self.dir)
    }
}

pub fn size_bytes(dir: &Path) -> u64 {
    ["", "-wal"].iter().filter_map(|s| std::fs::metadata(dir.join(format!("{DB_FILE}{s}"))).ok()).map(|m| m.len()).sum()
}

fn each_state(conn: &Connection, db: &Path, mut f: impl FnMut(&[u8], u64) -> std::result::Result<(), String>) -> Result<()> {
    let mut q = conn.prepare("SELECT state, seq FROM entities").map_err(sql("cannot read", db))?;
    let mut rows = q.query([]).map_err(sql("cannot read", db))?;
    while let Some(row) = rows.next().map_err(sql("cannot load (corrupt?)", db))? {
        let state = row.get_ref(0).and_then(|v| v.as_blob().map_err(Into::into)).map_err(sql("cannot load", db))?;
        let seq = from_sql(row.get(1).map_err(sql("cannot load", db))?);
        f(state, seq).map_err(|m| StorageError(format!("{}: {m}", db.display())))?;
    }
    Ok(())
}

/// Reads a data dir without taking its lock (a running node may hold it): what an
/// export needs. The read is one transaction, so it sees one commit. Returns what
/// `open` would load and every entity state with its change seq.
pub fn read(dir: &Path) -> Result<(Stored, Vec<(Vec<u8>, u64)>)> {
    let (conn, db) = open_read_only(dir)?;
    let stored = load(&conn, &db)?;
    let mut states = Vec::new();
    each_state(&conn, &db, |b, seq| {
        states.push((b.to_vec(), seq));
        Ok(())
    })?;
    Ok((stored, states))
}

/// Copies a data dir's database to `dest` with SQLite's online backup, in one step so the
/// copy is one consistent commit even while the node writes. Returns the pages copied.
pub fn backup(dir: &Path, dest: &Path) -> Result<u64> {
    if dest.exists() {
        return Err(StorageError(format!("{} exists; not overwriting it", dest.display())));
    }
    let (src, db) = open_read_only(dir)?;
    let mut out = Connection::open(dest).map_err(sql("cannot create", dest))?;
    let copy = rusqlite::backup::Backup::new(&src, &mut out).map_err(sql("cannot back up", &db))?;
    copy.step(-1).map_err(sql("cannot back up", &db))?;
    let pages = copy.progress().pagecount as u64;
    drop(copy);
    // The copy is a database file of its own, out of WAL mode, and never "cleanly
    // closed": the original may go on issuing dots after the copy, so a node restored
    // from it takes a new incarnation rather than reuse them.
    out.execute_batch("PRAGMA journal_mode = DELETE; UPDATE meta SET value = 0 WHERE key = 'clean';")
        .map_err(sql("cannot finish", dest))?;
    Ok(pages)
}

/// What `read` gives without the entity states (the node's identity and position).
pub fn read_node_state(dir: &Path) -> Result<Stored> {
    let (conn, db) = open_read_only(dir)?;
    load(&conn, &db)
}

/// A read-only connection inside one read transaction, on a recognised database.
fn open_read_only(dir: &Path) -> Result<(Connection, PathBuf)> {
    let db = existing_db(dir)?;
    let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql("cannot open", &db))?;
    if !recognise(&conn, &db)? {
        return Err(StorageError(format!("{} is not a meshstore data file", db.display())));
    }
    conn.execute_batch("BEGIN").map_err(sql("cannot read", &db))?;
    Ok((conn, db))
}

fn existing_db(dir: &Path) -> Result<PathBuf> {
    let db = dir.join(DB_FILE);
    if !db.is_file() {
        return Err(StorageError(format!("{} is not a meshstore data dir (no {DB_FILE})", dir.display())));
    }
    Ok(db)
}

/// Creates `dir` if needed, refuses one holding other things, and takes its lock.
fn lock_dir(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(|e| StorageError(format!("cannot create data dir {}: {e}", dir.display())))?;
    let entries = std::fs::read_dir(dir).map_err(|e| StorageError(format!("cannot read data dir {}: {e}", dir.display())))?;
    let ours = |name: &str| name == LOCK_FILE || name.starts_with(DB_FILE);
    let foreign: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !ours(n))
        .collect();
    if !foreign.is_empty() && !dir.join(DB_FILE).exists() {
        return Err(StorageError(format!(
            "{} is not a meshstore data dir: it holds other files ({}) and no {DB_FILE}",
            dir.display(),
            foreign.join(", ")
        )));
    }
    let path = dir.join(LOCK_FILE);
    let mut lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError(format!("cannot write data dir {}: {e}", dir.display())))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(StorageError(format!(
                "data dir {} is in use by another process (pid {})",
                dir.display(),
                holder.trim()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(StorageError(format!("cannot lock data dir {}: {e}", dir.display())))
        }
    }
    lock.set_len(0).and_then(|_| write!(lock, "{}", std::process::id())).map_err(|e| {
        StorageError(format!("cannot write data dir {}: {e}", dir.display()))
    })?;
    Ok(lock)
}

/// True if `conn` holds a meshstore database this build can read, false if it is empty;
/// an error for anything else.
fn recognise(conn: &Connection, db: &Path) -> Result<bool> {
    let pragma = |name: &str| -> Result<i64> {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0)).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::NotADatabase => {
                StorageError(format!("{} is not an SQLite database (corrupt or foreign file)", db.display()))
            }
            e => sql("cannot read", db)(e),
        })
    };
    let (app, version) = (pragma("application_id")?, pragma("user_version")?);
    let tables: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0)).map_err(sql("cannot read", db))?;
    if app == 0 && version == 0 && tables == 0 {
        return Ok(false);
    }
    if app != APPLICATION_ID {
        return Err(StorageError(format!("{} is not a meshstore data file (application id {app:#x})", db.display())));
    }
    if version > FORMAT {
        return Err(StorageError(format!(
            "{} has data format {version}, newer than this meshstore reads ({FORMAT}); upgrade meshstore",
            db.display()
        )));
    }
    if version < 1 {
        return Err(StorageError(format!("{} has unknown data format {version}", db.display())));
    }
    Ok(true)
}

fn configure(conn: &Connection, db: &Path) -> Result<()> {
    // FULL: a commit is on disk (WAL synced) when it returns, which `commit` durability promises.
    // 64 MiB of page cache: a group commit touches every changed entity's page.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000; PRAGMA cache_size = -65536;",
    )
        .map_err(sql("cannot configure", db))
}

fn load(conn: &Connection, db: &Path) -> Result<Stored> {
    let read = || -> rusqlite::Result<Stored> {
        let get_text = |k: &str| -> rusqlite::Result<Option<String>> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0)).optional()
        };
        let get_int = |k: &str| -> rusqlite::Result<u64> {
            Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get::<_, i64>(0)).optional()?.map_or(0, from_sql))
        };
        let meta = NodeState {
            node_id: get_text("node_id")?.unwrap_or_default(),
            incarnation: get_int("incarnation")?,
            counter: get_int("counter")?,
            seq: get_int("seq")?,
            floor: get_int("floor")?,
            replicating: get_int("replicating")? != 0,
        };
        let clean = get_int("clean")? != 0;
        let durability = get_text("durability")?.unwrap_or_default();
        let mut q = conn.prepare("SELECT node, incarnation, counter FROM context")?;
        let context = q
            .query_map([], |r| Ok((r.get::<_, String>(0)?, unhex(1, &r.get::<_, String>(1)?)?, from_sql(r.get(2)?))))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut q = conn.prepare("SELECT peer, node_id, incarnation, acked_seq FROM peers")?;
        let peer_acks = q
            .query_map([], |r| {
                Ok(PeerAck {
                    peer: r.get(0)?,
                    node_id: r.get(1)?,
                    incarnation: unhex(2, &r.get::<_, String>(2)?)?,
                    acked_seq: from_sql(r.get(3)?),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Stored { meta, clean, durability, context, peer_acks })
    };
    let stored = read().map_err(sql("cannot load (corrupt?)", db))?;
    if stored.meta.node_id.is_empty() || stored.meta.incarnation == 0 {
        return Err(StorageError(format!("{} lacks the node's identity (corrupt?)", db.display())));
    }
    Ok(stored)
}

fn set(conn: &Connection, key: &str, value: impl rusqlite::ToSql) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)")?.execute(params![key, value])?;
    Ok(())
}

fn write_meta(conn: &Connection, m: &NodeState) -> rusqlite::Result<()> {
    set(conn, "node_id", &m.node_id)?;
    set(conn, "incarnation", to_sql(m.incarnation))?;
    set(conn, "counter", to_sql(m.counter))?;
    set(conn, "seq", to_sql(m.seq))?;
    set(conn, "floor", to_sql(m.floor))?;
    set(conn, "replicating", m.replicating as i64)
}
