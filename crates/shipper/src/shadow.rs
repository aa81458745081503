//! Shadow WAL files: per-index local copies of every committed, checksum-valid WAL frame.
//!
//! A shadow index file is a byte copy of one WAL life, header included, cut after its last
//! committed frame. It is the durable staging area between the live WAL, which SQLite may
//! overwrite after a checkpoint, and the uploads, which may lag behind a slow store.

use std::fs::{File, OpenOptions};
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

/// The open shadow file of one index.
///
/// Invariants: after every pass the file is exactly `committed_len` bytes long, ends on a commit
/// frame (or is only the header), and `chain` is positioned at `committed_len`. Bytes below
/// `committed_len` never change again, which is what lets uploaders read them without a lock.
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
    /// Starts index `index` with a WAL header just read from the live WAL.
    pub(crate) fn create(wal_dir: &Path, index: u32, header_bytes: [u8; WAL_HEADER_SIZE], header: WalHeader) -> Result<ShadowIndex, Error> {
        let path = wal_dir.join(name::shadow_wal_file_name(index));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).map_err(io_err("create", &path))?;
        file.write_all_at(&header_bytes, 0).map_err(io_err("write", &path))?;
        file.sync_data().map_err(io_err("fsync", &path))?;
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
        shadow.copy_from(&reader, len, &mut buf, false)?;
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
    pub(crate) fn append_from(&mut self, source: &File, source_len: u64, buf: &mut [u8]) -> Result<u64, Error> {
        self.copy_from(source, source_len, buf, true)
    }

    /// The shared loop of [`ShadowIndex::open`] (reading the shadow itself, `write = false`) and
    /// [`ShadowIndex::append_from`].
    fn copy_from(&mut self, source: &File, source_len: u64, buf: &mut [u8], write: bool) -> Result<u64, Error> {
        let frame = self.header.frame_size() as usize;
        let frames_per_chunk = (buf.len() / frame).max(1);
        let mut frames_per_read = (FIRST_READ_BYTES / frame).clamp(1, frames_per_chunk);
        let mut offset = self.committed_len;
        let mut chain = self.chain;
        let (mut commit_end, mut commit_chain) = (self.committed_len, self.chain);
        'chunks: while offset + frame as u64 <= source_len {
            let n_frames = frames_per_read.min(((source_len - offset) / frame as u64) as usize);
            frames_per_read = (frames_per_read * 2).min(frames_per_chunk);
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
        let file_len = if write { offset } else { source_len };
        if file_len != commit_end {
            // Frames after the last commit belong to a transaction still being written (or one
            // a crash cut short); they are read again on the next pass.
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
