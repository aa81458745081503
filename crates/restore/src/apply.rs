//! Building the database: the snapshot, then each WAL index written straight into the file.
//!
//! Applying an index does what SQLite's recovery plus a full checkpoint would do (spec §6.4):
//! follow the checksum chain, keep frames up to the last commit, write each page's last
//! version in place and set the file to the committed size. Doing it here instead of through
//! SQLite means one write per changed page per index, no WAL file, no `-shm` and no checkpoint;
//! the test below holds it to SQLite's own replay, byte for byte.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tokio::sync::mpsc;
use walstream_format::wal::{FrameChain, WalHeader};
use walstream_format::{FRAME_HEADER_SIZE, WAL_HEADER_SIZE};
use walstream_store::ObjectStore;

use crate::fetch::{self, FetchedIndex};
use crate::plan::RestorePlan;
use crate::progress::Progress;
use crate::Error;

/// Builds `temp` from the plan: snapshot, every index in order, fsync, integrity check.
pub(crate) async fn apply(store: &dyn ObjectStore, plan: &RestorePlan, temp: &Path, parallelism: usize, progress: &dyn Progress) -> Result<(), Error> {
    let objects = 1 + plan.indexes.iter().map(|i| i.segments.len() as u64).sum::<u64>();
    let bytes = plan.snapshot.size + plan.indexes.iter().flat_map(|i| &i.segments).map(|s| s.size).sum::<u64>();
    progress.start(objects, bytes);

    // The WAL downloads start with the snapshot's, not after it.
    let (sender, mut fetched) = mpsc::channel(parallelism.max(2));
    let downloads = fetch::fetch_indexes(store, &plan.indexes, parallelism, progress, sender);
    let build = async move {
        let snapshot = fetch::fetch_object(store, &plan.snapshot.key, progress).await?;
        let page_size = db_page_size(&snapshot).ok_or_else(|| Error::CorruptObject { key: plan.snapshot.key.clone(), source: walstream_format::Error::Lz4("snapshot is not a SQLite database".into()) })?;
        let file = std::sync::Arc::new(write_new(temp, &snapshot)?);
        drop(snapshot);
        while let Some(index) = fetched.recv().await {
            let (index, file) = (index?, file.clone());
            tokio::task::spawn_blocking(move || apply_index(&file, page_size, &index)).await.expect("apply task panicked")?;
        }
        file.sync_all().map_err(|source| Error::Io { op: "fsync", path: temp.to_path_buf(), source })?;
        Ok::<(), Error>(())
    };
    // Joined, not spawned: downloads progress while an index is being applied, and dropping
    // this future (a signal) stops both.
    let ((), built) = tokio::join!(downloads, build);
    built?;
    progress.finish();
    let temp = temp.to_path_buf();
    tokio::task::spawn_blocking(move || integrity_check(&temp)).await.expect("check task panicked")
}

/// The page size in a database header (offset 16, big-endian, where 1 means 65536).
fn db_page_size(db: &[u8]) -> Option<u32> {
    let raw = u16::from_be_bytes(db.get(16..18)?.try_into().ok()?);
    let size = if raw == 1 { 65536 } else { u32::from(raw) };
    (size.is_power_of_two() && size >= 512).then_some(size)
}

fn write_new(path: &Path, data: &[u8]) -> Result<File, Error> {
    use std::io::Write;
    let io = |op: &'static str| move |source| Error::Io { op, path: path.to_path_buf(), source };
    let mut file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(io("create"))?;
    file.write_all(data).map_err(io("write"))?;
    Ok(file)
}

/// Applies one index to the database file, after checking it as SQLite's recovery would, so
/// that a corrupt segment is an error naming it rather than WAL that is silently cut short.
pub(crate) fn apply_index(db: &File, page_size: u32, index: &FetchedIndex) -> Result<(), Error> {
    let first_key = || index.segment_at(0).to_string();
    let header = WalHeader::parse(&index.wal).map_err(|source| Error::CorruptObject { key: first_key(), source })?;
    if header.page_size != page_size {
        return Err(Error::CorruptObject { key: first_key(), source: walstream_format::Error::BadPageSize { page_size: header.page_size } });
    }
    let committed = committed_frames(&index.wal, header);
    if committed.valid_len < index.wal.len() as u64 {
        return Err(Error::ChecksumBreak { key: index.segment_at(committed.valid_len).to_string(), offset: committed.valid_len });
    }
    write_pages(db, &index.wal, header, &committed).map_err(|source| Error::Io { op: "write", path: format!("wal index {:08x}", index.index).into(), source })
}

/// What SQLite's recovery keeps of a WAL.
pub(crate) struct Committed {
    /// Bytes through the last frame that continues the checksum chain.
    pub(crate) valid_len: u64,
    /// Frames through the last commit frame.
    pub(crate) frames: usize,
    /// The database size in pages after that commit.
    pub(crate) db_pages: u32,
}

pub(crate) fn committed_frames(wal: &[u8], header: WalHeader) -> Committed {
    let mut chain = FrameChain::new(header);
    let mut committed = Committed { valid_len: WAL_HEADER_SIZE as u64, frames: 0, db_pages: 0 };
    for (n, frame) in wal[WAL_HEADER_SIZE..].chunks_exact(header.frame_size() as usize).enumerate() {
        let Some(frame_header) = chain.accept(frame) else { break };
        committed.valid_len += header.frame_size();
        if frame_header.is_commit() {
            committed.frames = n + 1;
            committed.db_pages = frame_header.commit_size;
        }
    }
    committed
}

/// Writes the last committed version of each page, newest first so each page is written once,
/// then sets the file to the committed size, as SQLite's checkpoint does.
pub(crate) fn write_pages(db: &File, wal: &[u8], header: WalHeader, committed: &Committed) -> std::io::Result<()> {
    if committed.frames == 0 {
        return Ok(());
    }
    let frame_size = header.frame_size() as usize;
    let mut written = HashSet::new();
    for n in (0..committed.frames).rev() {
        let frame = &wal[WAL_HEADER_SIZE + n * frame_size..][..frame_size];
        let pgno = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes"));
        // Pages past the committed size are cut off below anyway; SQLite skips them too.
        if pgno > committed.db_pages || !written.insert(pgno) {
            continue;
        }
        db.write_all_at(&frame[FRAME_HEADER_SIZE..], u64::from(pgno - 1) * u64::from(header.page_size))?;
    }
    db.set_len(u64::from(committed.db_pages) * u64::from(header.page_size))
}

fn integrity_check(db: &Path) -> Result<(), Error> {
    let conn = rusqlite::Connection::open(db)?;
    let result: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    conn.close().map_err(|(_, e)| e)?;
    for suffix in ["-wal", "-shm"] {
        let mut side = db.as_os_str().to_owned();
        side.push(suffix);
        let _ = std::fs::remove_file(side);
    }
    if result != "ok" {
        return Err(Error::IntegrityCheck { detail: result });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
