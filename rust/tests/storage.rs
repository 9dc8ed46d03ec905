//! The data dir and group commit, through the crate's public API: a table committed and
//! loaded again is the same table (states, summary, seq, counter); an unclean stop gives
//! a new incarnation; a commit is all or nothing; foreign, newer, corrupt and locked
//! data dirs are refused and left byte for byte as they were; a backup is one commit.
use _core::durable::Durable;
use _core::hlc::system_wall_ns;
use _core::pb;
use _core::storage::{self, Storage, DB_FILE};
use _core::table::{Options, Table, WriteMode};
use parking_lot::Mutex;
use prost::Message;
use std::path::{Path, PathBuf};
use std::time::Duration;

const POSITION: &str = "type.googleapis.com/entity.v1.PositionComponent";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshstore-storage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn table(node: &str, incarnation: u64) -> Mutex<Table> {
    let opts = Options { node_id: node.into(), incarnation, ..Options::default() };
    Mutex::new(Table::new(opts, Box::new(system_wall_ns)))
}

fn put(t: &Mutex<Table>, id: &str, lat: f64) {
    let position = pb::PositionComponent { lat, lon: 1.0, alt: 0.0 };
    let mut e = pb::Entity { id: id.into(), r#type: 2, ..Default::default() };
    e.components.insert("position".into(), prost_types::Any { type_url: POSITION.into(), value: position.encode_to_vec() });
    t.lock().write(&e.encode_to_vec(), WriteMode::Put, false).expect("put");
}

/// Opens `dir` into a new table of `node` (incarnation `fresh` unless a clean stop left one).
fn open(dir: &Path, node: &str, fresh: u64) -> (Mutex<Table>, Durable, usize) {
    let (mut storage, stored) = Storage::open(dir).expect("open");
    let t = table(node, fresh);
    t.lock().persist(stored.as_ref()).expect("load");
    let mut loaded = 0;
    storage.each_state(|b, seq| t.lock().restore(b, seq).map(|_| loaded += 1)).expect("load states");
    storage.begin(&t.lock().node_state(), "commit").expect("begin");
    let seq = t.lock().seq();
    let acks = stored.map(|s| s.peer_acks).unwrap_or_default();
    (t, Durable::new(storage, seq, acks, 1000, "commit".into()), loaded)
}

fn all_states(t: &Mutex<Table>) -> Vec<Vec<u8>> {
    t.lock().changes_since(0, usize::MAX, None, None).unwrap().0
}

#[test]
fn a_committed_table_loads_back_the_same_and_resumes_its_counter_after_a_clean_close() {
    let dir = temp_dir("roundtrip");
    let (t, d, loaded) = open(&dir, "a", 7);
    assert_eq!(loaded, 0);
    for i in 0..50 {
        put(&t, &format!("e{i}"), i as f64);
    }
    t.lock().delete("e3").unwrap();
    let seq = t.lock().seq();
    assert_eq!(d.commit_pending(&t, Duration::ZERO).unwrap(), seq);
    let before = all_states(&t);
    let counter = t.lock().counter();
    let summary = t.lock().context_summary().clone();
    d.close(&t).unwrap();
    assert!(d.gate(|| 0, Duration::ZERO).is_err(), "a closed storage takes no writes");

    let (t2, d2, loaded) = open(&dir, "a", 99);
    assert_eq!(loaded, 50, "49 live entities and one deleted");
    assert_eq!(all_states(&t2), before);
    let t2l = t2.lock();
    assert_eq!((t2l.incarnation(), t2l.counter(), t2l.seq()), (7, counter, seq));
    assert_eq!(t2l.context_summary(), &summary);
    drop(t2l);
    put(&t2, "e0", 5.0);
    assert_eq!(t2.lock().counter(), counter + 1, "the counter resumes: no dot is issued twice");
    d2.close(&t2).unwrap();
}

#[test]
fn after_an_unclean_stop_the_node_takes_a_new_incarnation() {
    let dir = temp_dir("unclean");
    let (t, d, _) = open(&dir, "a", 7);
    put(&t, "x", 1.0);
    d.commit_pending(&t, Duration::ZERO).unwrap();
    put(&t, "y", 2.0); // issued, maybe replicated, never committed
    drop((d, t)); // no close: as after kill -9
    let (t2, d2, loaded) = open(&dir, "a", 8);
    assert_eq!(loaded, 1, "only what was committed");
    assert_eq!(t2.lock().incarnation(), 8, "the old counter may have gone past the file");
    put(&t2, "y", 3.0);
    d2.close(&t2).unwrap();
}

#[test]
fn forgotten_entities_leave_the_file_and_peer_acks_never_pass_the_committed_seq() {
    let dir = temp_dir("forget");
    let (t, d, _) = open(&dir, "a", 7);
    put(&t, "gone", 1.0);
    put(&t, "kept", 1.0);
    d.commit_pending(&t, Duration::ZERO).unwrap();
    t.lock().delete("gone").unwrap();
    assert_eq!(t.lock().collect_deleted(None), 1, "never replicated: forgotten at once");
    let seq = t.lock().seq();
    d.note_peer_ack(storage::PeerAck { peer: "b:1".into(), node_id: "b".into(), incarnation: 5, acked_seq: seq + 10 });
    d.commit_pending(&t, Duration::ZERO).unwrap();
    drop((d, t));
    let (stored, states) = storage::read(&dir).unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(stored.peer_acks[0].acked_seq, seq, "clamped to what the file holds");
    assert_eq!(stored.meta.floor, stored.meta.seq, "a cursor before the forgotten delete (the last change) cannot resume");
}

#[test]
fn foreign_newer_and_corrupt_files_are_refused_and_left_untouched() {
    let cases: [(&str, Box<dyn Fn(&Path)>, &str); 4] = [
        (
            "foreign-sqlite",
            Box::new(|db| {
                rusqlite::Connection::open(db).unwrap().execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);").unwrap()
            }),
            "not a meshstore data file",
        ),
        (
            "newer",
            Box::new(|db| {
                rusqlite::Connection::open(db)
                    .unwrap()
                    .execute_batch(&format!("PRAGMA application_id = {}; PRAGMA user_version = 9; CREATE TABLE t(x);", storage::APPLICATION_ID))
                    .unwrap()
            }),
            "newer than this meshstore",
        ),
        ("garbage", Box::new(|db| std::fs::write(db, vec![0x5a; 8192]).unwrap()), "not an SQLite database"),
        (
            "truncated",
            Box::new(|db| {
                let dir = db.parent().unwrap();
                let (t, d, _) = open(dir, "a", 7);
                for i in 0..400 {
                    put(&t, &format!("e{i}"), i as f64 / 10.0);
                }
                d.close(&t).unwrap();
                let bytes = std::fs::read(db).unwrap();
                std::fs::write(db, &bytes[..bytes.len() / 2]).unwrap();
            }),
            "corrupt",
        ),
    ];
    for (name, make, expected) in cases {
        let dir = temp_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join(DB_FILE);
        make(&db);
        let before = std::fs::read(&db).unwrap();
        let err = Storage::open(&dir).err().unwrap_or_else(|| panic!("{name}: opened"));
        assert!(err.0.contains(expected), "{name}: {err}");
        assert_eq!(std::fs::read(&db).unwrap(), before, "{name}: the file was changed");
    }
}

#[test]
fn a_dir_holding_other_files_or_locked_by_another_open_is_refused() {
    let dir = temp_dir("other-files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    assert!(Storage::open(&dir).err().unwrap().0.contains("not a meshstore data dir"));
    assert!(!dir.join(DB_FILE).exists());

    let dir = temp_dir("locked");
    let (_held, _) = Storage::open(&dir).unwrap();
    let err = Storage::open(&dir).err().unwrap();
    assert!(err.0.contains("in use by another process"), "{err}");
}

#[test]
fn a_backup_taken_between_commits_holds_exactly_one_commit() {
    let dir = temp_dir("backup");
    let (t, d, _) = open(&dir, "a", 7);
    for i in 0..100 {
        put(&t, &format!("e{i}"), 1.0);
    }
    d.commit_pending(&t, Duration::ZERO).unwrap();
    for i in 100..150 {
        put(&t, &format!("e{i}"), 1.0); // applied, not committed: not in the backup
    }
    let dest = temp_dir("backup-copy").with_extension("db");
    storage::backup(&dir, &dest).unwrap();
    assert!(storage::backup(&dir, &dest).err().unwrap().0.contains("not overwriting"));
    let restored = temp_dir("backup-restored");
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::copy(&dest, restored.join(DB_FILE)).unwrap();
    let (stored, states) = storage::read(&restored).unwrap();
    assert_eq!(states.len(), 100);
    assert_eq!(stored.meta.seq, 100);
    assert!(!stored.clean, "a copy of a running node restores as after a crash: with a new incarnation");
    d.close(&t).unwrap();
}
