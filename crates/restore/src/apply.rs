//! Building the database: the snapshot, then the WAL indexes written straight into the file.
//!
//! Applying one index is what SQLite's recovery plus a full checkpoint does (spec §6.4): follow
//! the checksum chain, keep frames up to the last commit, write each page's last version in
//! place and set the file to the committed size. Applying a run of indexes is that, once per
//! index, in order. [`Replay`] does exactly that as the frames arrive: each transaction's frames
//! are written in place once its commit frame is in (frames after an index's last commit never
//! are), and an index's end sets the file to its committed size, so a page a truncation cut off
//! reads as zeros if the file grows again, as in SQLite. No WAL file, no `-shm`, no checkpoint,
//! and nothing of an index kept but the frames of an open transaction; the tests hold it to
//! SQLite's own replay, byte for byte, after every index.
//!
//! (It used to assemble each index in a spill file and apply it newest first, writing each page
//! once; writing and reading back every WAL byte cost more than writing superseded pages.)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;
use walstream_format::age::AgeKeys;
use walstream_format::FRAME_HEADER_SIZE;
use walstream_store::ObjectStore;

use crate::fetch;
use crate::index::{FramePool, IndexBytes, IndexEnd, WalEvent};
use crate::plan::RestorePlan;
use crate::progress::{Progress, TimeSplit};
use crate::Error;

/// Builds `temp` from the plan: snapshot, the indexes in order, fsync, integrity check.
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
    let split = Arc::new(TimeSplit::default());

    let pieces = SmallWrites { file: create_new(temp)?, piece: SmallWrites::piece_before(plan.indexes.len()) };
    let (SmallWrites { file, .. }, _) =
        fetch::snapshot_into(store, age, &plan.snapshot, pieces, temp, parallelism, progress, &split).await?;
    let page_size = db_page_size(&file).ok_or_else(|| not_a_database(&plan.snapshot.key))?;
    let spill_dir = temp.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let mut replay = Replay::new(file, page_size, spill_dir);

    // The WAL downloads start once the snapshot's have ended, so their buffers never add up
    // (the bound on restore's memory), and go on while earlier frames are written. One batch
    // of frames waiting keeps the writer busy; more would only hold memory.
    let (sender, mut fetched) = mpsc::channel(1);
    let frames = Arc::new(FramePool::default());
    let returned = frames.clone();
    let downloads = fetch::fetch_indexes(
        store,
        age,
        plan.indexes.iter().collect(),
        fetch::IndexCheck { page_size: Some(page_size), lz4_checksums: false },
        frames,
        parallelism,
        progress,
        &split,
        sender,
    );
    let temp_path = temp.to_path_buf();
    let write_error = move |op, source| Error::Io { op, path: temp_path.clone(), source };
    let build = tokio::task::spawn_blocking(move || {
        while let Some(event) = fetched.blocking_recv() {
            match event? {
                WalEvent::Frames(batch) => {
                    replay.frames(&batch).map_err(|e| write_error("write", e))?;
                    returned.give(batch);
                }
                WalEvent::Ended(end) => replay.end_index(&end).map_err(|e| write_error("write", e))?,
            }
        }
        Ok::<_, Error>((replay.finish(), write_error))
    });
    // Joined, not spawned: downloads progress while frames are being written, and dropping
    // this future (a signal) stops the downloads, whose end stops the writer.
    let ((), built) = tokio::join!(downloads, build);
    let (file, write_error) = built.expect("apply task panicked")?;
    split.report(progress);
    progress.finish();
    // The check reads the file from the page cache while the fsync writes it back: on a disk
    // each took about 0.1 s of a 205 MB restore, one after the other. Both must succeed.
    let temp = temp.to_path_buf();
    let synced = tokio::task::spawn_blocking(move || file.sync_all().map_err(|e| write_error("fsync", e)));
    let checked = tokio::task::spawn_blocking(move || integrity_check(&temp, check));
    let (synced, checked) = tokio::join!(synced, checked);
    synced.expect("fsync task panicked")?;
    checked.expect("check task panicked")
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

/// A file written in pieces of at most `piece` bytes. A write puts its pages in folios of its
/// size (ext4 since Linux 6.16), and every later write of one page into such a folio walks all
/// of its blocks: 350,000 random page writes into a file written 1 MiB at a time took 1.9 s
/// instead of 0.46 s, 4 MiB at a time 3.7 s, and at 64 KiB that walk was still a sixth of a
/// WAL-heavy restore's CPU. Smaller pieces cost a lone snapshot more system calls
/// (docs/benchmarks.md).
struct SmallWrites {
    file: File,
    piece: usize,
}

impl SmallWrites {
    /// The piece for a snapshot followed by `indexes` WAL indexes, whose frames are written
    /// a page at a time.
    fn piece_before(indexes: usize) -> usize {
        if indexes == 0 {
            64 << 10
        } else {
            16 << 10
        }
    }
}

impl std::io::Write for SmallWrites {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(&buf[..buf.len().min(self.piece)])
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
        self.head.starts_with(b"SQLite format 3\0") && self.page_size().is_some()
    }

    /// The page size its header gives, if a valid one.
    pub(crate) fn page_size(&self) -> Option<u32> {
        header_page_size(&self.head)
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

/// The database file being built from a snapshot and the frames of its indexes, in order.
pub(crate) struct Replay {
    file: File,
    page_size: u32,
    /// The frames of the transaction whose commit frame has not arrived yet.
    open: IndexBytes,
    /// Where `open` spills a transaction too large to keep in memory.
    spill_dir: PathBuf,
    /// Scratch for [`write_frames`](Replay::write_frames): page numbers and frame positions.
    order: Vec<(u32, usize)>,
}

impl Replay {
    /// A replay onto `file`, which holds the snapshot, of pages of `page_size` bytes.
    pub(crate) fn new(file: File, page_size: u32, spill_dir: PathBuf) -> Replay {
        Replay { file, page_size, open: IndexBytes::default(), spill_dir, order: Vec::new() }
    }

    fn frame_size(&self) -> usize {
        self.page_size as usize + FRAME_HEADER_SIZE
    }

    /// Takes the next whole frames of the current index, each one continuing its checksum
    /// chain: writes every transaction they commit.
    pub(crate) fn frames(&mut self, batch: &[u8]) -> std::io::Result<()> {
        let frame_size = self.frame_size();
        let is_commit = |frame: &[u8]| frame[4..8] != [0; 4];
        // Everything through the batch's last commit frame is committed.
        let committed = match batch.chunks_exact(frame_size).rposition(is_commit) {
            Some(last) => (last + 1) * frame_size,
            None => 0,
        };
        if committed > 0 {
            self.write_open()?;
            self.write_frames(&batch[..committed])?;
        }
        self.open.append(&batch[committed..], &self.spill_dir)
    }

    /// The current index ended, its chain verified: what follows its last commit is dropped,
    /// and the file takes the size that commit gave the database.
    pub(crate) fn end_index(&mut self, end: &IndexEnd) -> std::io::Result<()> {
        self.open.clear();
        // An index without a commit changes nothing, not even the size, as in SQLite.
        if end.committed.frames > 0 {
            self.file.set_len(u64::from(end.committed.db_pages) * u64::from(self.page_size))?;
        }
        Ok(())
    }

    /// The file, every index applied.
    pub(crate) fn finish(self) -> File {
        self.file
    }

    /// Writes the frames of the open transaction, whose commit frame has just arrived.
    fn write_open(&mut self) -> std::io::Result<()> {
        let frame_size = self.frame_size() as u64;
        let len = self.open.len();
        let per_read = (FRAMES_READ as u64 / frame_size).max(1) * frame_size;
        let mut buf = Vec::new();
        let mut at = 0;
        while at < len {
            let n = per_read.min(len - at) as usize;
            buf.resize(n, 0);
            self.open.read_at(&mut buf, at)?;
            self.write_frames(&buf)?;
            at += n as u64;
        }
        self.open.clear();
        Ok(())
    }

    /// Writes `frames`, all committed, in place: each page's last version among them, in page
    /// order (340,000 one-frame transactions took 1.41 s written one by one in WAL order).
    fn write_frames(&mut self, frames: &[u8]) -> std::io::Result<()> {
        let frame_size = self.frame_size();
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        order.extend(
            frames
                .chunks_exact(frame_size)
                .enumerate()
                .map(|(n, frame)| (u32::from_be_bytes(frame[..4].try_into().expect("4 bytes")), n))
                .filter(|&(pgno, _)| pgno != 0),
        );
        order.sort_unstable();
        let written = order.iter().enumerate().try_for_each(|(at, &(pgno, n))| {
            // A later version of the same page follows in `order`: it wins.
            if order.get(at + 1).is_some_and(|next| next.0 == pgno) {
                return Ok(());
            }
            let page = &frames[n * frame_size + FRAME_HEADER_SIZE..(n + 1) * frame_size];
            self.file.write_all_at(page, u64::from(pgno - 1) * u64::from(self.page_size))
        });
        self.order = order;
        written
    }
}

/// Bytes of an open transaction read back at once when its commit arrives.
const FRAMES_READ: usize = 256 << 10;

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
