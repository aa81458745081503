//! Shadow WAL files: per-index local copies of every committed, checksum-valid WAL frame.
//!
//! A shadow index file is a byte copy of one WAL life, header included, cut after its last
//! committed frame. It is the durable staging area between the live WAL, which SQLite may
//! overwrite after a checkpoint, and the uploads, which may lag behind a slow store.
//!
//! A shipped shadow file is kept as a [`SpareFile`] for the next index to write over.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use walstream_format::wal::{FrameChain, WalHeader};
use walstream_format::{name, WAL_HEADER_SIZE};

use crate::error::{io_err, Error};

/// Reads of the live WAL go through one reusable buffer of about this size.
pub(crate) const COPY_CHUNK_BYTES: usize = 1 << 20;

/// A pass reads this much of the live WAL first, then twice as much each time every frame read
/// was valid. After a restart the WAL file keeps the old life's length, and the frames past the
/// new life's end are stale: reading whole chunks, a saturated writer's passes read 1 MiB each
/// to find a few new frames, and those reads were 29% of walstream's CPU samples.
const FIRST_READ_BYTES: usize = 64 << 10;

/// The least time between two fsyncs of a shadow file while it grows. The page cache already
/// carries the shadow through a crash of walstream; an fsync only shortens what a power loss
/// can take, and after one the continuity checks start a new generation where the shadow lost
/// frames the WAL no longer holds. Synced on every pass, a saturated writer cost walstream an
/// fsync every few milliseconds.
const SYNC_SPACING: Duration = Duration::from_secs(1);

/// How long a spare waits for the next index before it is deleted: a quiet database keeps no
/// stale copy on its disk (on an in-memory volume, in its RAM).
const SPARE_KEEP: Duration = Duration::from_secs(10);

/// A shipped file longer than this is cut to it before it is kept: the bound on what a spare
/// holds on disk.
const SPARE_MAX_BYTES: u64 = 64 << 20;

/// The open shadow file of one index.
///
/// Invariants: after every pass the file holds `committed_len` bytes of this WAL life ending on a
/// commit frame (or only the header), and `chain` is positioned at `committed_len`. What lies
/// beyond (frames of a transaction not yet committed, or a recycled file's older life) is never
/// read as this index: an older life's frames carry other salts, so the chain rejects them, as
/// SQLite rejects its own WAL's stale frames. Once the index is finished the file is cut to
/// `committed_len` exactly. Bytes below `committed_len` never change again, which is what lets
/// uploaders read them without a lock.
pub(crate) struct ShadowIndex {
    pub(crate) index: u32,
    path: PathBuf,
    file: File,
    pub(crate) header: WalHeader,
    header_bytes: [u8; WAL_HEADER_SIZE],
    pub(crate) committed_len: u64,
    chain: FrameChain,
    /// Set when walstream knows this WAL life ended with nothing left uncopied, so a restart or
    /// truncation of the live WAL continues the generation instead of breaking it.
    pub(crate) sealed: bool,
    /// Set while the live WAL is truncated and SQLite's wal-index shows this life ended exactly
    /// at the shadow's end: the salt-1 the next life will get. An idle TRUNCATE checkpoint adds 1
    /// without writing a frame, so the next life may be more than one restart away.
    pub(crate) next_salt1: Option<u32>,
    /// When the oldest bytes not yet fsynced were appended; `None` when all are synced.
    unsynced_since: Option<Instant>,
}

impl ShadowIndex {
    /// Starts index `index` with a WAL header just read from the live WAL, in the spare file if
    /// there is one.
    pub(crate) fn create(wal_dir: &Path, index: u32, header_bytes: [u8; WAL_HEADER_SIZE], header: WalHeader, spare: &mut SpareFile) -> Result<ShadowIndex, Error> {
        let path = wal_dir.join(name::shadow_wal_file_name(index));
        let file = match spare.take(&path, &header_bytes) {
            Some(file) => file,
            None => {
                let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).map_err(io_err("create", &path))?;
                file.write_all_at(&header_bytes, 0).map_err(io_err("write", &path))?;
                file.sync_data().map_err(io_err("fsync", &path))?;
                file
            }
        };
        Ok(ShadowIndex::header_only(index, path, file, header_bytes, header))
    }

    /// Reopens an index after a restart of walstream, cutting any tail a crash left after the
    /// last commit. `None` if the file is missing or holds no valid header.
    pub(crate) fn open(wal_dir: &Path, index: u32) -> Result<Option<ShadowIndex>, Error> {
        let path = wal_dir.join(name::shadow_wal_file_name(index));
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        let mut header_bytes = [0u8; WAL_HEADER_SIZE];
        if len < WAL_HEADER_SIZE as u64 || file.read_exact_at(&mut header_bytes, 0).is_err() {
            return Ok(None);
        }
        let Ok(header) = WalHeader::parse(&header_bytes) else { return Ok(None) };
        let mut shadow = ShadowIndex::header_only(index, path, file, header_bytes, header);
        // Re-validate the whole file: it is the source of every future upload of this index.
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        let reader = shadow.file.try_clone().map_err(io_err("open", &shadow.path))?;
        shadow.copy_from(&reader, len, len, &mut buf, false)?;
        Ok(Some(shadow))
    }

    /// The state of a file holding `header_bytes` and no frame yet.
    fn header_only(index: u32, path: PathBuf, file: File, header_bytes: [u8; WAL_HEADER_SIZE], header: WalHeader) -> ShadowIndex {
        ShadowIndex { index, path, file, header, header_bytes, committed_len: WAL_HEADER_SIZE as u64, chain: FrameChain::new(header), sealed: false, next_salt1: None, unsynced_since: None }
    }

    pub(crate) fn header_bytes(&self) -> &[u8; WAL_HEADER_SIZE] {
        &self.header_bytes
    }

    /// The WAL's running checksum at `committed_len`.
    pub(crate) fn end_checksum(&self) -> (u32, u32) {
        self.chain.checksum()
    }

    /// The last frame of the shadow, to compare with the live WAL at the same offset; `None` if
    /// the shadow holds only the header.
    pub(crate) fn last_frame(&self) -> Result<Option<Vec<u8>>, Error> {
        let frame = self.header.frame_size();
        if self.committed_len < WAL_HEADER_SIZE as u64 + frame {
            return Ok(None);
        }
        let mut buf = vec![0u8; frame as usize];
        self.file.read_exact_at(&mut buf, self.committed_len - frame).map_err(io_err("read", &self.path))?;
        Ok(Some(buf))
    }

    /// Copies valid frames of `source` (a WAL of the same life, `source_len` bytes long) from
    /// `committed_len` on, keeps those through the last commit, and fsyncs them. Returns the
    /// number of bytes newly committed.
    ///
    /// `committed_hint` is how far SQLite's wal-index says this life is committed, 0 if unknown.
    /// It only plans the reads: up to it in whole chunks, past it one frame first, doubling. A
    /// restarted WAL keeps the old life's length, so without it a pass reads on past the new
    /// life's end, doubling from [`FIRST_READ_BYTES`]: under a saturated writer the passes read
    /// 1.29 times what they copied, 1.09 times with it.
    pub(crate) fn append_from(&mut self, source: &impl FileExt, source_len: u64, committed_hint: u64, buf: &mut [u8]) -> Result<u64, Error> {
        self.copy_from(source, source_len, committed_hint, buf, true)
    }

    /// The shared loop of [`ShadowIndex::open`] (reading the shadow itself, `write = false`) and
    /// [`ShadowIndex::append_from`].
    fn copy_from(&mut self, source: &impl FileExt, source_len: u64, committed_hint: u64, buf: &mut [u8], write: bool) -> Result<u64, Error> {
        let frame = self.header.frame_size() as usize;
        let frames_per_chunk = (buf.len() / frame).max(1);
        let mut frames_per_read = match committed_hint {
            0 => (FIRST_READ_BYTES / frame).clamp(1, frames_per_chunk),
            _ => 1,
        };
        let mut offset = self.committed_len;
        let mut chain = self.chain;
        let (mut commit_end, mut commit_chain) = (self.committed_len, self.chain);
        'chunks: while offset + frame as u64 <= source_len {
            let frames_left = ((source_len - offset) / frame as u64) as usize;
            let n_frames = match committed_hint.min(source_len).saturating_sub(offset) / frame as u64 {
                0 => {
                    let n = frames_per_read.min(frames_left);
                    frames_per_read = (frames_per_read * 2).min(frames_per_chunk);
                    n
                }
                hinted => (hinted as usize).min(frames_per_chunk),
            };
            let chunk = &mut buf[..n_frames * frame];
            if source.read_exact_at(chunk, offset).is_err() {
                break; // the WAL shrank under us; the next pass sees why
            }
            let mut n_valid = 0;
            for bytes in chunk.chunks_exact(frame) {
                let Some(frame_header) = chain.accept(bytes) else { break };
                n_valid += 1;
                if frame_header.is_commit() {
                    commit_end = offset + (n_valid * frame) as u64;
                    commit_chain = chain;
                }
            }
            if write && n_valid > 0 {
                self.file.write_all_at(&chunk[..n_valid * frame], offset).map_err(io_err("write", &self.path))?;
            }
            offset += (n_valid * frame) as u64;
            if n_valid < n_frames {
                break 'chunks;
            }
        }
        // Frames after the last commit belong to a transaction still being written (or one a
        // crash cut short); a pass reads them again. A pass leaves them in the file, whose pages
        // the next frames reuse; reopening after a crash cuts them off.
        if !write && source_len != commit_end {
            self.file.set_len(commit_end).map_err(io_err("truncate", &self.path))?;
        }
        let newly_committed = commit_end - self.committed_len;
        self.committed_len = commit_end;
        self.chain = commit_chain;
        if newly_committed > 0 && write {
            let since = *self.unsynced_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= SYNC_SPACING {
                self.sync()?;
            }
        }
        Ok(newly_committed)
    }

    /// Ends the index: cuts the file to its committed length, so an uploader may take a
    /// finished index's file length for its end, and fsyncs it.
    pub(crate) fn finish(&mut self) -> Result<(), Error> {
        if self.file.metadata().map_err(io_err("stat", &self.path))?.len() != self.committed_len {
            self.file.set_len(self.committed_len).map_err(io_err("truncate", &self.path))?;
            self.unsynced_since.get_or_insert_with(Instant::now);
        }
        self.sync()
    }

    /// Fsyncs what [`SYNC_SPACING`] left unsynced: when the database is quiet, when a WAL life
    /// ends, and at shutdown.
    pub(crate) fn sync(&mut self) -> Result<(), Error> {
        if self.unsynced_since.is_some() {
            self.file.sync_data().map_err(io_err("fsync", &self.path))?;
            self.unsynced_since = None;
        }
        Ok(())
    }
}

/// One shipped shadow file, kept for the next index to write over instead of being deleted.
///
/// A new file's writes allocate page-cache pages and filesystem blocks, and deleting it frees
/// them; under a saturated writer that bookkeeping, not the copying, was most of the shadow's
/// cost. Writing over a spare took the shadow's writes from 17% to 10% of walstream's CPU
/// samples, and its deletes (4%) to none.
pub(crate) struct SpareFile {
    path: PathBuf,
    /// When the spare was kept; `None` when there is none.
    kept_since: Option<Instant>,
}

impl SpareFile {
    /// The spare at `path`; one a previous run left counts as kept now.
    pub(crate) fn new(path: PathBuf) -> SpareFile {
        let kept_since = path.is_file().then(Instant::now);
        SpareFile { path, kept_since }
    }

    /// Keeps `shipped`, a shadow file every replica has shipped, as the spare, or deletes it if
    /// a spare is kept already.
    pub(crate) fn keep_or_remove(&mut self, shipped: &Path) {
        if self.kept_since.is_none() {
            let cut = OpenOptions::new().write(true).open(shipped).and_then(|file| match file.metadata()?.len() > SPARE_MAX_BYTES {
                true => file.set_len(SPARE_MAX_BYTES),
                false => Ok(()),
            });
            if cut.is_ok() && fs::rename(shipped, &self.path).is_ok() {
                self.kept_since = Some(Instant::now());
                return;
            }
        }
        let _ = fs::remove_file(shipped);
    }

    /// Deletes a spare no index has taken for [`SPARE_KEEP`].
    pub(crate) fn expire(&mut self) {
        if self.kept_since.is_some_and(|since| since.elapsed() >= SPARE_KEEP) {
            let _ = fs::remove_file(&self.path);
            self.kept_since = None;
        }
    }

    /// The spare, renamed to `path` with `header_bytes` written and synced first, so an index
    /// file never holds an older life's header, not even after a crash. `None` if there is no
    /// spare or it cannot be used; the caller then creates a fresh file.
    fn take(&mut self, path: &Path, header_bytes: &[u8; WAL_HEADER_SIZE]) -> Option<File> {
        self.kept_since.take()?;
        let taken = OpenOptions::new().read(true).write(true).open(&self.path).and_then(|file| {
            file.write_all_at(header_bytes, 0)?;
            file.sync_data()?;
            fs::rename(&self.path, path)?;
            Ok(file)
        });
        if taken.is_err() {
            let _ = fs::remove_file(&self.path);
        }
        taken.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// A database whose WAL the test fills and empties; `wal()` is the live WAL's bytes.
    struct Db {
        dir: tempfile::TempDir,
        app: Connection,
    }

    impl Db {
        fn new() -> Db {
            let dir = tempfile::tempdir().unwrap();
            let app = Connection::open(dir.path().join("db")).unwrap();
            app.execute_batch("PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x);").unwrap();
            Db { dir, app }
        }

        /// Ends the WAL life: the next commit starts a new one from offset 0.
        fn new_life(&self, rows: usize) {
            self.app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
            for _ in 0..rows {
                self.app.execute("INSERT INTO t VALUES (randomblob(1000))", []).unwrap();
            }
        }

        fn wal(&self) -> (File, Vec<u8>) {
            let path = self.dir.path().join("db-wal");
            (File::open(&path).unwrap(), fs::read(&path).unwrap())
        }

        /// A shadow of the live WAL's life as index `index`, taking the spare if there is one.
        fn shadow(&self, index: u32, spare: &mut SpareFile) -> ShadowIndex {
            let (file, bytes) = self.wal();
            let header_bytes: [u8; WAL_HEADER_SIZE] = bytes[..WAL_HEADER_SIZE].try_into().unwrap();
            let mut shadow = ShadowIndex::create(self.dir.path(), index, header_bytes, WalHeader::parse(&header_bytes).unwrap(), spare).unwrap();
            assert_eq!(shadow.append_from(&file, bytes.len() as u64, 0, &mut vec![0; COPY_CHUNK_BYTES]).unwrap(), bytes.len() as u64 - WAL_HEADER_SIZE as u64);
            shadow
        }
    }

    /// A long life is shipped and kept; a short one is written over it. Only the short life's
    /// bytes are ever its index: right after the spare is taken (a crash there), after copying,
    /// and once finished, whatever of the long life is left in the file.
    #[test]
    fn an_index_written_over_a_spare_holds_only_its_own_life() {
        let db = Db::new();
        let mut spare = SpareFile::new(db.dir.path().join("spare.wal"));
        db.new_life(200);
        let mut long = db.shadow(1, &mut spare);
        long.finish().unwrap();
        let long_len = long.committed_len;
        spare.keep_or_remove(&long.path);
        assert!(!long.path.exists() && spare.path.exists());

        db.new_life(3);
        let (_, short_wal) = db.wal();
        let header_bytes: [u8; WAL_HEADER_SIZE] = short_wal[..WAL_HEADER_SIZE].try_into().unwrap();
        let header = WalHeader::parse(&header_bytes).unwrap();
        let taken = ShadowIndex::create(db.dir.path(), 2, header_bytes, header, &mut spare).unwrap();
        assert!(!spare.path.exists(), "the spare was not taken");
        assert_eq!(fs::metadata(&taken.path).unwrap().len(), long_len, "the test proves nothing unless the old life is still in the file");
        // A crash now: reopened (a copy, as reopening cuts the file), the index is its header.
        fs::copy(&taken.path, db.dir.path().join(name::shadow_wal_file_name(3))).unwrap();
        let reopened = ShadowIndex::open(db.dir.path(), 3).unwrap().unwrap();
        assert_eq!((reopened.header_bytes(), reopened.committed_len), (&header_bytes, WAL_HEADER_SIZE as u64));

        let mut spare = SpareFile::new(db.dir.path().join("spare.wal"));
        spare.keep_or_remove(&taken.path);
        let mut short = db.shadow(2, &mut spare);
        assert_eq!(short.committed_len, short_wal.len() as u64);
        assert!(fs::metadata(&short.path).unwrap().len() > short.committed_len);
        let reopened = ShadowIndex::open(db.dir.path(), 2).unwrap().unwrap();
        assert_eq!((reopened.committed_len, reopened.end_checksum()), (short.committed_len, short.end_checksum()));
        short.finish().unwrap();
        assert_eq!(fs::read(&short.path).unwrap(), short_wal);
    }

    /// Counts the bytes read through it.
    struct CountingReader<'a>(&'a File, std::cell::Cell<usize>);

    impl FileExt for CountingReader<'_> {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.1.set(self.1.get() + buf.len());
            self.0.read_at(buf, offset)
        }

        fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<usize> {
            unreachable!("the source is only read")
        }
    }

    /// A short life written over a long one (a RESTART keeps the file's length): told where the
    /// wal-index says the life is committed, a pass reads through there and one frame more;
    /// not told, it reads on into the old life. Both copy the same.
    #[test]
    fn the_wal_index_hint_keeps_a_pass_from_reading_into_the_old_life() {
        let db = Db::new();
        db.new_life(200);
        db.app.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())).unwrap();
        for _ in 0..3 {
            db.app.execute("INSERT INTO t VALUES (randomblob(1000))", []).unwrap();
        }
        let (file, bytes) = db.wal();
        let scan = walstream_format::wal::scan(&bytes).unwrap();
        let frame = scan.header.frame_size() as usize;
        assert!(bytes.len() > scan.committed_len as usize + 64 * frame, "the old life is not there; the test proves nothing");
        let header_bytes: [u8; WAL_HEADER_SIZE] = bytes[..WAL_HEADER_SIZE].try_into().unwrap();
        let mut read = Vec::new();
        for (index, hint) in [(1, scan.committed_len), (2, 0)] {
            let mut shadow = ShadowIndex::create(db.dir.path(), index, header_bytes, scan.header, &mut SpareFile::new(db.dir.path().join("none"))).unwrap();
            let source = CountingReader(&file, Default::default());
            shadow.append_from(&source, bytes.len() as u64, hint, &mut vec![0; COPY_CHUNK_BYTES]).unwrap();
            assert_eq!(shadow.committed_len, scan.committed_len);
            read.push(source.1.get());
        }
        assert_eq!(read[0], scan.committed_len as usize - WAL_HEADER_SIZE + frame);
        assert!(read[1] >= FIRST_READ_BYTES / frame * frame, "without the hint {} bytes were read", read[1]);
    }

    #[test]
    fn one_spare_is_kept_at_most_and_not_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let mut spare = SpareFile::new(dir.path().join("spare.wal"));
        let shipped = |name: &str, len: u64| {
            let path = dir.path().join(name);
            File::create(&path).unwrap().set_len(len).unwrap();
            path
        };
        let (first, second) = (shipped("1.wal", SPARE_MAX_BYTES + 4096), shipped("2.wal", 4096));
        spare.keep_or_remove(&first);
        spare.keep_or_remove(&second);
        assert!(!first.exists() && !second.exists());
        assert_eq!(fs::metadata(&spare.path).unwrap().len(), SPARE_MAX_BYTES);
        spare.expire();
        assert!(spare.path.exists());
        spare.kept_since = Some(Instant::now() - SPARE_KEEP);
        spare.expire();
        assert!(!spare.path.exists());
        assert!(SpareFile::new(spare.path.clone()).take(&dir.path().join("3.wal"), &[0; WAL_HEADER_SIZE]).is_none());
    }
}
