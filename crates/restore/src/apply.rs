//! Building the database: the snapshot, then the WAL indexes written straight into the file.
//!
//! Applying one index is what SQLite's recovery plus a full checkpoint does (spec §6.4): follow
//! the checksum chain, keep frames up to the last commit, write each page's last version in
//! place and set the file to the committed size. Applying a run of indexes is that, once per
//! index, in order. [`Image`] gets the same bytes with each page written at most once: it
//! takes the indexes newest first, keeps a page's newest version, skips versions a later index
//! superseded or a later truncation cut off, and zeroes the pages a truncation emptied. No
//! WAL file, no `-shm`, no checkpoint; the tests hold it to SQLite's own replay, byte for byte,
//! after every index.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tokio::sync::mpsc;
use walstream_format::age::AgeKeys;
use walstream_format::wal::WalHeader;
use walstream_format::{FRAME_HEADER_SIZE, WAL_HEADER_SIZE};
use walstream_store::ObjectStore;

use crate::fetch;
use crate::index::VerifiedIndex;
use crate::plan::RestorePlan;
use crate::progress::Progress;
use crate::Error;

/// Builds `temp` from the plan: snapshot, the indexes newest first, fsync, integrity check.
pub(crate) async fn apply(
    store: &dyn ObjectStore,
    age: Option<&AgeKeys>,
    plan: &RestorePlan,
    temp: &Path,
    parallelism: usize,
    progress: &dyn Progress,
    check: crate::IntegrityCheck,
) -> Result<(), Error> {
    let (objects, bytes) = plan.stored();
    progress.start(objects, bytes);

    let (file, snapshot_len) =
        fetch::snapshot_into(store, age, &plan.snapshot, create_new(temp)?, temp, parallelism, progress).await?;
    let page_size = db_page_size(&file).ok_or_else(|| not_a_database(&plan.snapshot.key))?;
    let mut image = Image::new(file, page_size, snapshot_len);

    // The WAL downloads start once the snapshot's have ended, so their buffers never add up
    // (the bound on restore's memory), and go on while earlier indexes are applied. One
    // verified index waiting keeps the writer busy; more would only hold memory (or spill files).
    let (sender, mut fetched) = mpsc::channel(1);
    let spill_dir = temp.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let downloads =
        fetch::fetch_indexes(store, age, plan.indexes.iter().rev().collect(), spill_dir, parallelism, progress, sender);
    let build = async move {
        while let Some(index) = fetched.recv().await {
            let index = index?;
            image = tokio::task::spawn_blocking(move || image.apply_older(&index).map(|()| image))
                .await
                .expect("apply task panicked")?;
        }
        let write_error = |source| Error::Io { op: "write", path: temp.to_path_buf(), source };
        let file = tokio::task::spawn_blocking(move || image.finish())
            .await
            .expect("apply task panicked")
            .map_err(write_error)?;
        file.sync_all().map_err(|source| Error::Io { op: "fsync", path: temp.to_path_buf(), source })?;
        Ok::<(), Error>(())
    };
    // Joined, not spawned: downloads progress while an index is being applied, and dropping
    // this future (a signal) stops both.
    let ((), built) = tokio::join!(downloads, build);
    built?;
    progress.finish();
    let temp = temp.to_path_buf();
    tokio::task::spawn_blocking(move || integrity_check(&temp, check)).await.expect("check task panicked")
}

/// The page size in the database header the file starts with.
fn db_page_size(db: &File) -> Option<u32> {
    let mut head = [0u8; 18];
    db.read_exact_at(&mut head, 0).ok()?;
    header_page_size(&head)
}

/// The page size in a database header's first bytes (offset 16, big-endian, where 1 means
/// 65536), if it is a valid one.
fn header_page_size(head: &[u8]) -> Option<u32> {
    let size = match u16::from_be_bytes(head.get(16..18)?.try_into().ok()?) {
        1 => 65536,
        raw => u32::from(raw),
    };
    (size.is_power_of_two() && size >= 512).then_some(size)
}

/// The error for a snapshot that decodes to something other than a SQLite database.
pub(crate) fn not_a_database(key: &str) -> Error {
    Error::CorruptObject {
        key: key.to_string(),
        source: walstream_format::Error::Lz4("snapshot is not a SQLite database".into()),
    }
}

fn create_new(path: &Path) -> Result<File, Error> {
    std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(|source| Error::Io {
        op: "create",
        path: path.to_path_buf(),
        source,
    })
}

/// A snapshot's destination when only its validity matters (`verify`): keeps the database
/// header, counts the rest.
#[derive(Default)]
pub(crate) struct HeaderOnly {
    head: Vec<u8>,
}

impl HeaderOnly {
    /// The bytes begin as a SQLite database does, with a valid page size.
    pub(crate) fn is_database(&self) -> bool {
        self.head.starts_with(b"SQLite format 3\0") && header_page_size(&self.head).is_some()
    }
}

impl std::io::Write for HeaderOnly {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let take = 100usize.saturating_sub(self.head.len()).min(buf.len());
        self.head.extend_from_slice(&buf[..take]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes of WAL read at once when an index is applied.
const FRAMES_READ: usize = 256 << 10;

/// How many frames `FRAMES_READ` holds (at least one).
fn frames_per_read(header: WalHeader) -> usize {
    (FRAMES_READ / header.frame_size() as usize).max(1)
}

/// The database file being built from a snapshot and indexes given newest first.
pub(crate) struct Image {
    file: File,
    page_size: u32,
    /// Pages the snapshot filled.
    snapshot_pages: u32,
    /// By page number: whether the file already holds the page's final content.
    settled: Vec<bool>,
    /// The smallest committed size of the indexes applied so far: a page above it was cut off
    /// by a truncation after any older version of it.
    smallest: u32,
    /// The newest index's committed size: the final size of the file.
    final_pages: Option<u32>,
}

impl Image {
    /// An image whose file already holds the snapshot, `snapshot_len` bytes.
    pub(crate) fn new(file: File, page_size: u32, snapshot_len: u64) -> Image {
        let snapshot_pages = u32::try_from(snapshot_len / u64::from(page_size)).unwrap_or(u32::MAX);
        Image { file, page_size, snapshot_pages, settled: Vec::new(), smallest: u32::MAX, final_pages: None }
    }

    /// Applies an index older than every index applied so far.
    pub(crate) fn apply_older(&mut self, index: &VerifiedIndex) -> Result<(), Error> {
        if index.header.page_size != self.page_size {
            return Err(Error::CorruptObject {
                key: index.fetched.segment_at(0).to_string(),
                source: walstream_format::Error::BadPageSize { page_size: index.header.page_size },
            });
        }
        let committed = &index.committed;
        // An index without a commit changes nothing, not even the size, as in SQLite.
        if committed.frames == 0 {
            return Ok(());
        }
        self.final_pages.get_or_insert(committed.db_pages);
        self.smallest = self.smallest.min(committed.db_pages);
        let frame_size = index.header.frame_size() as usize;
        let per_read = frames_per_read(index.header);
        let mut buf = vec![0u8; per_read.min(committed.frames) * frame_size];
        // Newest frame first, a read's worth of frames at a time from the end.
        let mut end = committed.frames;
        while end > 0 {
            let start = end.saturating_sub(per_read);
            let bytes = &mut buf[..(end - start) * frame_size];
            index.fetched.wal.read_at(bytes, (WAL_HEADER_SIZE + start * frame_size) as u64).map_err(|source| {
                Error::Io {
                    op: "read",
                    path: format!("downloaded wal index {:08x}", index.fetched.index).into(),
                    source,
                }
            })?;
            for frame in bytes.chunks_exact(frame_size).rev() {
                let pgno = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes"));
                if pgno == 0 || pgno > self.smallest || self.is_settled(pgno) {
                    continue;
                }
                self.write_page(pgno, &frame[FRAME_HEADER_SIZE..]).map_err(|source| Error::Io {
                    op: "write",
                    path: format!("page {pgno} from wal index {:08x}", index.fetched.index).into(),
                    source,
                })?;
            }
            end = start;
        }
        Ok(())
    }

    /// Zeroes the snapshot's pages that a truncation emptied and nothing rewrote, sets the final
    /// size, and returns the file.
    pub(crate) fn finish(mut self) -> std::io::Result<File> {
        let Some(final_pages) = self.final_pages else { return Ok(self.file) };
        let zeros = vec![0u8; self.page_size as usize];
        for pgno in self.smallest.saturating_add(1)..=self.snapshot_pages.min(final_pages) {
            if !self.is_settled(pgno) {
                self.write_page(pgno, &zeros)?;
            }
        }
        self.file.set_len(u64::from(final_pages) * u64::from(self.page_size))?;
        Ok(self.file)
    }

    fn is_settled(&self, pgno: u32) -> bool {
        self.settled.get(pgno as usize).copied().unwrap_or(false)
    }

    fn write_page(&mut self, pgno: u32, page: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(page, u64::from(pgno - 1) * u64::from(self.page_size))?;
        if self.settled.len() <= pgno as usize {
            self.settled.resize(pgno as usize + 1, false);
        }
        self.settled[pgno as usize] = true;
        Ok(())
    }
}

fn integrity_check(db: &Path, check: crate::IntegrityCheck) -> Result<(), Error> {
    let pragma = match check {
        crate::IntegrityCheck::Full => "PRAGMA integrity_check",
        crate::IntegrityCheck::Quick => "PRAGMA quick_check",
        crate::IntegrityCheck::None => return Ok(()),
    };
    let conn = rusqlite::Connection::open(db)?;
    let result: String = conn.query_row(pragma, [], |r| r.get(0))?;
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
