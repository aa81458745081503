//! Building the database: snapshot, then each WAL index in turn, checked before SQLite sees it.

use std::path::{Path, PathBuf};

use walstream_format::{lz4, wal};
use walstream_store::ObjectStore;

use crate::plan::{IndexPlan, RestorePlan};
use crate::Error;

pub(crate) async fn apply(store: &dyn ObjectStore, plan: &RestorePlan, temp: &Path) -> Result<(), Error> {
    let snapshot = download(store, &plan.snapshot.key).await?;
    let page_size = db_page_size(&snapshot);
    write_new(temp, &snapshot)?;
    drop(snapshot);
    for index in &plan.indexes {
        let wal = download_index(store, index, page_size).await?;
        let temp = temp.to_path_buf();
        let index = index.index;
        tokio::task::spawn_blocking(move || checkpoint_wal(&temp, index, &wal)).await.expect("apply task panicked")?;
    }
    let temp = temp.to_path_buf();
    tokio::task::spawn_blocking(move || integrity_check(&temp)).await.expect("check task panicked")
}

async fn download(store: &dyn ObjectStore, key: &str) -> Result<Vec<u8>, Error> {
    let body = store.get(key).await?;
    lz4::decompress(&body).map_err(|source| Error::CorruptObject { key: key.to_string(), source })
}

/// Downloads and concatenates one index, then verifies it as SQLite's recovery would, so that a
/// corrupt segment is an error naming it rather than WAL that SQLite silently ignores.
async fn download_index(store: &dyn ObjectStore, index: &IndexPlan, page_size: Option<u32>) -> Result<Vec<u8>, Error> {
    let mut wal = Vec::new();
    for segment in &index.segments {
        if segment.offset != wal.len() as u64 {
            return Err(Error::SegmentGap { key: segment.key.clone(), expected: wal.len() as u64, found: segment.offset });
        }
        wal.extend_from_slice(&download(store, &segment.key).await?);
    }
    let first = &index.segments[0].key;
    let scan = wal::scan(&wal).map_err(|source| Error::CorruptObject { key: first.clone(), source })?;
    if page_size.is_some_and(|size| size != scan.header.page_size) {
        return Err(Error::CorruptObject { key: first.clone(), source: walstream_format::Error::BadPageSize { page_size: scan.header.page_size } });
    }
    if scan.valid_len < wal.len() as u64 {
        let culprit = index.segments.iter().rev().find(|s| s.offset <= scan.valid_len).unwrap_or(&index.segments[0]);
        return Err(Error::ChecksumBreak { key: culprit.key.clone(), offset: scan.valid_len });
    }
    Ok(wal)
}

/// The page size in a database header (offset 16, big-endian, where 1 means 65536).
fn db_page_size(db: &[u8]) -> Option<u32> {
    let raw = u16::from_be_bytes(db.get(16..18)?.try_into().ok()?);
    Some(if raw == 1 { 65536 } else { u32::from(raw) })
}

fn side_file(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn write_new(path: &Path, data: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let io = |op: &'static str| move |source| Error::Io { op, path: path.to_path_buf(), source };
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(io("create"))?;
    file.write_all(data).map_err(io("write"))?;
    file.sync_all().map_err(io("fsync"))
}

/// Lets SQLite replay one index: the WAL goes beside the database and a TRUNCATE checkpoint
/// copies every committed frame in. SQLite itself decides what is committed.
fn checkpoint_wal(db: &Path, index: u32, wal: &[u8]) -> Result<(), Error> {
    let wal_path = side_file(db, "-wal");
    let _ = std::fs::remove_file(side_file(db, "-shm"));
    std::fs::write(&wal_path, wal).map_err(|source| Error::Io { op: "write", path: wal_path.clone(), source })?;
    let conn = rusqlite::Connection::open(db)?;
    let (busy, log, checkpointed): (i64, i64, i64) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    conn.close().map_err(|(_, e)| e)?;
    if busy != 0 || log != checkpointed {
        return Err(Error::CheckpointIncomplete { index, busy, log, checkpointed });
    }
    Ok(())
}

fn integrity_check(db: &Path) -> Result<(), Error> {
    let conn = rusqlite::Connection::open(db)?;
    let result: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    conn.close().map_err(|(_, e)| e)?;
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(side_file(db, suffix));
    }
    if result != "ok" {
        return Err(Error::IntegrityCheck { detail: result });
    }
    Ok(())
}
