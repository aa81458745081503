//! Native application against SQLite's own replay (write the WAL beside the database, then a
//! TRUNCATE checkpoint), on random workloads: the files must be identical, byte for byte.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;

use super::*;
use walstream_format::WAL_HEADER_SIZE;

use crate::index::{ChainCheck, Segments};
use crate::test_wal::synthetic_wal;

fn side(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What SQLite makes of `wal` applied to `db`: recovery, then a full checkpoint.
fn sqlite_replay(db: &Path, wal: &[u8]) {
    std::fs::write(side(db, "-wal"), wal).unwrap();
    let conn = Connection::open(db).unwrap();
    let (busy, log, done): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
    assert_eq!((busy, log), (0, done), "the reference checkpoint must finish");
    drop(conn);
    let _ = std::fs::remove_file(side(db, "-shm"));
}

/// Applies `wals` (oldest first) to `db` the way a restore does: each one's frames through its
/// [`ChainCheck`] into a [`Replay`], in pieces of odd sizes, as decoded blocks arrive. Each WAL
/// is split into two segments to check that errors name the right one.
fn native_apply(db: &Path, wals: &[Vec<u8>], page_size: u32) -> Result<(), Error> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(db).unwrap();
    let spill = tempfile::tempdir().unwrap();
    let mut replay = Replay::new(file, page_size, spill.path().to_path_buf());
    for wal in wals {
        let second = (WAL_HEADER_SIZE + 2 * (page_size as usize + FRAME_HEADER_SIZE)) as u64;
        let mut segments = Segments::default();
        segments.push("seg-a".into(), 0);
        segments.push("seg-b".into(), second);
        let mut check = ChainCheck::new(Some(page_size));
        // Batches as fetch sends them: whole frames, about `size` bytes each.
        let size = page_size as usize * 3 + 1000;
        let mut batch = Vec::new();
        for piece in wal.chunks(7919) {
            check.feed(piece, &mut |frame| batch.extend_from_slice(frame));
            if batch.len() >= size {
                replay.frames(&std::mem::take(&mut batch)).unwrap();
            }
        }
        replay.frames(&batch).unwrap();
        let end = check.verified(wal.len() as u64, &segments)?;
        replay.end_index(&end).unwrap();
    }
    replay.finish();
    Ok(())
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
                conn.execute(
                    "UPDATE t SET v = randomblob(?1) WHERE id % 7 = ?2",
                    [rng.gen_range(1..500), rng.gen_range(0..7)],
                )
                .unwrap();
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

        let snapshot = std::fs::read(&source).unwrap();
        let reference = dir.path().join("reference.db");
        std::fs::write(&reference, &snapshot).unwrap();
        let (mut wals, mut states) = (Vec::new(), Vec::new());
        let indexes = rng.gen_range(1..7);
        for index in 0..indexes {
            random_transactions(&conn, &mut rng);
            let mut wal = std::fs::read(side(&source, "-wal")).unwrap();
            if index + 1 == indexes && rng.gen_bool(0.5) {
                // Cut at a frame boundary: a tail of frames after the last commit is ignored.
                let frame = page_size as usize + FRAME_HEADER_SIZE;
                let frames = (wal.len() - WAL_HEADER_SIZE) / frame;
                wal.truncate(WAL_HEADER_SIZE + rng.gen_range(0..=frames) * frame);
            }
            sqlite_replay(&reference, &wal);
            states.push(std::fs::read(&reference).unwrap());
            wals.push(wal);
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        }
        // Every prefix of the run, so each index is at some point the newest and the oldest.
        let native = dir.path().join("native.db");
        for n in 1..=wals.len() {
            std::fs::write(&native, &snapshot).unwrap();
            native_apply(&native, &wals[..n], page_size).unwrap();
            assert!(
                std::fs::read(&native).unwrap() == states[n - 1],
                "seed {seed}: native apply of {n} indexes differs from SQLite's replay"
            );
        }
        let check: String =
            Connection::open(&native).unwrap().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
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
        native_apply(&restored, &[std::fs::read(side(&source, "-wal")).unwrap()], 4096).unwrap();
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        assert!(
            std::fs::read(&restored).unwrap() == std::fs::read(&source).unwrap(),
            "the restored file must equal the checkpointed source"
        );
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
    // A flipped byte in the fourth frame: it lies in the second segment, which starts at the third.
    wal[WAL_HEADER_SIZE + 3 * (4096 + FRAME_HEADER_SIZE) + 200] ^= 0x55;
    match native_apply(&copy, &[wal.clone()], 4096) {
        Err(Error::ChecksumBreak { key, offset }) => {
            assert_eq!(key, "seg-b");
            assert_eq!(offset, (WAL_HEADER_SIZE + 3 * (4096 + FRAME_HEADER_SIZE)) as u64);
        }
        other => panic!("expected a checksum break, got {other:?}"),
    }
    assert!(
        matches!(native_apply(&copy, &[wal[..WAL_HEADER_SIZE].to_vec()], 8192), Err(Error::CorruptObject { .. })),
        "a page size that differs from the database's is corrupt"
    );
}

/// Truncations and regrowth without rewriting: pages a truncation emptied must read as zeros,
/// never as an older version, exactly as SQLite leaves them.
#[test]
fn truncated_pages_stay_empty_when_the_file_grows_again() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.db");
    let conn = wal_database(&source, 4096);
    conn.execute("INSERT INTO t (v) VALUES (randomblob(60000))", []).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    drop(conn);
    let snapshot = std::fs::read(&source).unwrap();
    assert!(snapshot.len() >= 10 * 4096, "the snapshot needs pages to cut");
    let page1 = &snapshot[..4096];
    let wals = [
        synthetic_wal(4096, 11, page1, &[(2, 0, 0xa1), (1, 3, 0)]), // shrink to 3 pages
        synthetic_wal(4096, 12, page1, &[(8, 0, 0xb2), (1, 10, 0)]), // grow to 10, writing only page 8
        synthetic_wal(4096, 13, page1, &[(5, 0, 0xc3), (3, 0, 0xc4), (1, 6, 0)]), // cut page 8 off again at 6
        synthetic_wal(4096, 14, page1, &[(9, 0, 0xd5), (1, 9, 0), (4, 0, 0xd6)]), // grow to 9; a tail without commit
    ];
    let reference = dir.path().join("reference.db");
    std::fs::write(&reference, &snapshot).unwrap();
    let native = dir.path().join("native.db");
    for n in 1..=wals.len() {
        sqlite_replay(&reference, &wals[n - 1]);
        std::fs::write(&native, &snapshot).unwrap();
        native_apply(&native, &wals[..n], 4096).unwrap();
        let (want, got) = (std::fs::read(&reference).unwrap(), std::fs::read(&native).unwrap());
        assert_eq!(got.len(), want.len(), "size after {n} indexes");
        let differing: Vec<usize> = (0..want.len() / 4096)
            .filter(|p| want[p * 4096..][..4096] != got[p * 4096..][..4096])
            .map(|p| p + 1)
            .collect();
        assert!(differing.is_empty(), "after {n} indexes, pages {differing:?} differ from SQLite's replay");
    }
}

/// A transaction larger than what is kept in memory spills while its frames arrive in many
/// batches, and is written only once its commit frame is in; a large one left open at the end
/// of an index is never written.
#[test]
fn a_transaction_spanning_many_batches_is_written_once_committed() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.db");
    let conn = wal_database(&source, 4096);
    conn.execute("INSERT INTO t (v) VALUES (randomblob(1000))", []).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    let snapshot = std::fs::read(&source).unwrap();
    let big = 3 * crate::index::SPILL_AT as i64;
    conn.execute_batch(&format!(
        "BEGIN; INSERT INTO t (v) VALUES (randomblob({big})); UPDATE t SET v = randomblob(10) WHERE id = 1; COMMIT;"
    ))
    .unwrap();
    let committed = std::fs::read(side(&source, "-wal")).unwrap();
    let frame = 4096 + FRAME_HEADER_SIZE;
    assert!(committed.len() > big as usize, "the transaction's frames must outgrow the spill size");

    let reference = dir.path().join("reference.db");
    std::fs::write(&reference, &snapshot).unwrap();
    sqlite_replay(&reference, &committed);
    let native = dir.path().join("native.db");
    std::fs::write(&native, &snapshot).unwrap();
    native_apply(&native, std::slice::from_ref(&committed), 4096).unwrap();
    assert!(std::fs::read(&native).unwrap() == std::fs::read(&reference).unwrap(), "differs from SQLite's replay");

    // The same frames without the commit frame: nothing of them may reach the file.
    let open = committed[..committed.len() - frame].to_vec();
    std::fs::write(&native, &snapshot).unwrap();
    native_apply(&native, &[open], 4096).unwrap();
    assert!(std::fs::read(&native).unwrap() == snapshot, "an uncommitted transaction was written");
}
