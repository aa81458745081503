//! Native application against SQLite's own replay (write the WAL beside the database, then a
//! TRUNCATE checkpoint), on random workloads: the files must be identical, byte for byte.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;

use super::*;

fn side(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What SQLite makes of `wal` applied to `db`: recovery, then a full checkpoint.
fn sqlite_replay(db: &Path, wal: &[u8]) {
    std::fs::write(side(db, "-wal"), wal).unwrap();
    let conn = Connection::open(db).unwrap();
    let (busy, log, done): (i64, i64, i64) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
    assert_eq!((busy, log), (0, done), "the reference checkpoint must finish");
    drop(conn);
    let _ = std::fs::remove_file(side(db, "-shm"));
}

fn native_apply(db: &Path, wal: &[u8], page_size: u32) -> Result<(), Error> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(db).unwrap();
    let index = FetchedIndex { index: 0, wal: wal.to_vec(), segments: vec![("seg-a".into(), 0), ("seg-b".into(), (WAL_HEADER_SIZE + 2 * (page_size as usize + FRAME_HEADER_SIZE)) as u64)] };
    apply_index(&file, page_size, &index)
}

/// A few random transactions: inserts of any size (overflow pages), updates, deletes, and now
/// and then a VACUUM, which shrinks the file and so exercises truncation.
fn random_transactions(conn: &Connection, rng: &mut StdRng) {
    for _ in 0..rng.gen_range(1..25) {
        match rng.gen_range(0..20) {
            0..=9 => {
                conn.execute("INSERT INTO t (v) VALUES (randomblob(?1))", [rng.gen_range(1..6000)]).unwrap();
            }
            10..=13 => {
                conn.execute("UPDATE t SET v = randomblob(?1) WHERE id % 7 = ?2", [rng.gen_range(1..500), rng.gen_range(0..7)]).unwrap();
            }
            14..=17 => {
                conn.execute("DELETE FROM t WHERE id % 5 = ?1", [rng.gen_range(0..5)]).unwrap();
            }
            18 => {
                let tx = conn.unchecked_transaction().unwrap();
                for _ in 0..rng.gen_range(1..50) {
                    tx.execute("INSERT INTO t (v) VALUES (randomblob(?1))", [rng.gen_range(1..300)]).unwrap();
                }
                tx.commit().unwrap();
            }
            _ => conn.execute_batch("VACUUM").unwrap(),
        }
    }
}

/// A database in WAL mode whose WAL only a test checkpoints, with an empty table `t`.
fn wal_database(path: &Path, page_size: u32) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "page_size", page_size).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB); PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    conn
}

#[test]
fn native_apply_matches_sqlite_replay_on_random_workloads() {
    for seed in 0..16u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let page_size = [512u32, 1024, 4096, 8192][seed as usize % 4];
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source.db");
        let conn = wal_database(&source, page_size);
        random_transactions(&conn, &mut rng);
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();

        let (native, reference) = (dir.path().join("native.db"), dir.path().join("reference.db"));
        std::fs::copy(&source, &native).unwrap();
        std::fs::copy(&source, &reference).unwrap();
        let indexes = rng.gen_range(1..6);
        for index in 0..indexes {
            random_transactions(&conn, &mut rng);
            let mut wal = std::fs::read(side(&source, "-wal")).unwrap();
            let last = index + 1 == indexes;
            if last && rng.gen_bool(0.5) {
                // Cut at a frame boundary: a tail of frames after the last commit is ignored.
                let frame = page_size as usize + FRAME_HEADER_SIZE;
                let frames = (wal.len() - WAL_HEADER_SIZE) / frame;
                wal.truncate(WAL_HEADER_SIZE + rng.gen_range(0..=frames) * frame);
            }
            native_apply(&native, &wal, page_size).unwrap();
            sqlite_replay(&reference, &wal);
            assert!(std::fs::read(&native).unwrap() == std::fs::read(&reference).unwrap(), "seed {seed}, index {index}: native apply differs from SQLite's replay");
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        }
        let check: String = Connection::open(&native).unwrap().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok", "seed {seed}");
    }
}

#[test]
fn uncut_replay_reproduces_the_source_file() {
    let mut rng = StdRng::seed_from_u64(99);
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.db");
    let conn = wal_database(&source, 4096);
    let restored = dir.path().join("restored.db");
    std::fs::copy(&source, &restored).unwrap();
    for _ in 0..8 {
        random_transactions(&conn, &mut rng);
        native_apply(&restored, &std::fs::read(side(&source, "-wal")).unwrap(), 4096).unwrap();
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        assert!(std::fs::read(&restored).unwrap() == std::fs::read(&source).unwrap(), "the restored file must equal the checkpointed source");
    }
}

#[test]
fn a_broken_chain_names_the_segment_holding_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let conn = wal_database(&db, 4096);
    let copy = dir.path().join("copy");
    std::fs::copy(&db, &copy).unwrap();
    for n in 0..6 {
        conn.execute("INSERT INTO t (v) VALUES (randomblob(?1))", [n * 100]).unwrap();
    }
    let mut wal = std::fs::read(side(&db, "-wal")).unwrap();
    let before = std::fs::read(&copy).unwrap();
    // A flipped byte in the fourth frame: it lies in the second segment, which starts at the third.
    wal[WAL_HEADER_SIZE + 3 * (4096 + FRAME_HEADER_SIZE) + 200] ^= 0x55;
    match native_apply(&copy, &wal, 4096) {
        Err(Error::ChecksumBreak { key, offset }) => {
            assert_eq!(key, "seg-b");
            assert_eq!(offset, (WAL_HEADER_SIZE + 3 * (4096 + FRAME_HEADER_SIZE)) as u64);
        }
        other => panic!("expected a checksum break, got {other:?}"),
    }
    assert!(std::fs::read(&copy).unwrap() == before, "nothing is written from a corrupt index");
    assert!(matches!(native_apply(&copy, &wal[..WAL_HEADER_SIZE], 8192), Err(Error::CorruptObject { .. })), "a page size that differs from the database's is corrupt");
}
