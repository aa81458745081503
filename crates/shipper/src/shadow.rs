//! Shadow WAL files: per-index local copies of every committed, checksum-valid WAL frame.
//!
//! A shadow index file is a byte copy of one WAL life, header included, cut after its last
//! committed frame. It is the durable staging area between the live WAL, which SQLite may
//! overwrite after a checkpoint, and the uploads, which may lag behind a slow store. Under the
//! capturer's pin the live WAL itself holds the newest frames (`live_from`), and they are written
//! here only when the pin must go before the replicas have them: the file then has holes where
//! bytes went up straight from the live WAL.
//!
//! Bytes every replica holds are no use locally: they are punched out of the file
//! ([`discard_shipped`]), so the shadow takes disk (on an in-memory volume, RAM) only for what
//! some replica still lacks. Offsets do not move: a punched range reads as zeros, and nothing
//! reads it again.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use walstream_format::wal::{FrameChain, FrameHeader, WalHeader};
use walstream_format::{name, WAL_HEADER_SIZE};

use crate::error::{io_err, is_disk_full, Error};

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
const FSYNC_SPACING: Duration = Duration::from_secs(1);

/// Punching is done in whole filesystem blocks, and a shipped range shorter than this is left
/// for a later pass, so a busy database does not make a system call per pass for a few frames.
const DISCARD_UNIT: u64 = 64 << 10;

/// The block size punched ranges are aligned to; the header's block is never punched.
const BLOCK: u64 = 4096;

/// The open shadow file of one index.
///
/// Invariants: after every pass the file holds `committed_len` bytes of this WAL life ending on a
/// commit frame (or only the header), and `chain` is positioned at `committed_len`. What lies
/// beyond (frames of a transaction not yet committed) is never read as this index. Once the
/// index is finished the file is cut to `committed_len` exactly. Bytes below `committed_len`
/// never change again, which is what lets uploaders read them without a lock, except that
/// bytes below `discarded` (every replica's position) are punched out; the last frame is never
/// punched, since the capturer compares it with the live WAL.
pub(crate) struct ShadowIndex {
    pub(crate) index: u32,
    path: PathBuf,
    /// `None` while the database rests ([`ShadowIndex::close_file`]); reopened on next use.
    file: Option<File>,
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
    /// When the oldest bytes not yet fsynced were appended; `None` when all are fsynced.
    dirty_since: Option<Instant>,
    /// Bytes below this are punched out of the file (every replica has them); 0 if none are.
    discarded: u64,
    /// Set while bytes from here to `committed_len` are not in the file, only in the live WAL,
    /// which the capturer's pin keeps from being overwritten until every replica has them or
    /// they are stored ([`ShadowIndex::store_deferred`]). Uploaders read them there. Why is
    /// `deferred`.
    pub(crate) live_from: Option<u64>,
    /// True when `live_from` was set by choice, under the pin (see [`ShadowIndex::append_from`]);
    /// false when the disk was full.
    pub(crate) deferred: bool,
    /// The checksum chain at `live_from`, from which a deferred range is read again to store it.
    live_chain: FrameChain,
    /// While `live_from` is set: the last committed frame, which the file may not hold.
    live_last_frame: Vec<u8>,
    /// The bytes the last transaction copied from the live WAL added: how far the next commit
    /// may take the life (see `Capturer::let_busy_wal_restart`).
    pub(crate) last_transaction: u64,
}

/// What [`ShadowIndex::copy_from`] reads: the shadow file itself, to find where its valid
/// frames end (nothing is written), or the live WAL, whose new frames it appends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    OwnShadow,
    /// `defer`: see [`ShadowIndex::append_from`]. `to_hint`: stop after the first commit past
    /// `committed_hint` (a pass's copy; see `append_from`), or read every valid frame.
    LiveWal {
        defer: bool,
        to_hint: bool,
    },
}

impl ShadowIndex {
    /// Starts index `index` with a WAL header just read from the live WAL.
    pub(crate) fn create(
        wal_dir: &Path,
        index: u32,
        header_bytes: [u8; WAL_HEADER_SIZE],
        header: WalHeader,
    ) -> Result<ShadowIndex, Error> {
        let path = wal_dir.join(name::shadow_wal_file_name(index));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        match file.write_all_at(&header_bytes, 0).and_then(|()| file.sync_data()) {
            Ok(()) => Ok(ShadowIndex::header_only(index, path, file, header_bytes, header)),
            // Not even the header fits: the whole index is served from the live WAL.
            Err(e) if is_disk_full(&e) => Ok(ShadowIndex {
                live_from: Some(0),
                ..ShadowIndex::header_only(index, path, file, header_bytes, header)
            }),
            Err(e) => Err(io_err("write", &path)(e)),
        }
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
        let Ok(header) = WalHeader::parse(&header_bytes) else {
            return Ok(None);
        };
        let file_for_scan = file.try_clone().map_err(io_err("open", &path))?;
        let mut shadow = ShadowIndex::header_only(index, path, file, header_bytes, header);
        // Shipped bytes were punched out: the chain resumes from the first whole frame after
        // them, whose header carries the running checksum through it.
        let data_from = first_data(&file_for_scan, BLOCK).unwrap_or(len);
        if data_from > BLOCK && data_from < len {
            let frame = header.frame_size();
            let first = first_frame_from(data_from, frame);
            let chain = (first + frame <= len).then(|| chain_through(&file_for_scan, first, header)).flatten();
            let Some(chain) = chain else { return Ok(None) };
            shadow.committed_len = first + frame;
            shadow.chain = chain;
            shadow.discarded = first;
        }
        // Re-validate the rest of the file: it is the source of every future upload of this index.
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        shadow.copy_from(&file_for_scan, len, len, &mut buf, Reading::OwnShadow)?;
        if shadow.discarded > 0 {
            // Resumed mid-file: the end must still be a commit.
            let last = shadow.last_frame()?.and_then(|frame| walstream_format::wal::FrameHeader::parse(&frame).ok());
            if !last.is_some_and(|h| h.is_commit()) {
                return Ok(None);
            }
        }
        Ok(Some(shadow))
    }

    /// The state of a file holding `header_bytes` and no frame yet.
    fn header_only(
        index: u32,
        path: PathBuf,
        file: File,
        header_bytes: [u8; WAL_HEADER_SIZE],
        header: WalHeader,
    ) -> ShadowIndex {
        ShadowIndex {
            index,
            path,
            file: Some(file),
            header,
            header_bytes,
            committed_len: WAL_HEADER_SIZE as u64,
            chain: FrameChain::new(header),
            sealed: false,
            next_salt1: None,
            dirty_since: None,
            discarded: 0,
            live_from: None,
            deferred: false,
            live_chain: FrameChain::new(header),
            live_last_frame: Vec::new(),
            last_transaction: 0,
        }
    }

    /// Once every replica holds everything copied, the index is stored in its file again from
    /// here on: the last frame is written where it belongs (the capturer compares it with the
    /// live WAL) and the bytes in between, all shipped, are left out. False if even that frame
    /// does not fit yet.
    pub(crate) fn leave_live(&mut self) -> bool {
        let Some(from) = self.live_from else { return true };
        let frame = self.header.frame_size();
        let Ok(file) = opened(&mut self.file, &self.path) else { return false };
        if self.committed_len >= from + frame
            && file.write_all_at(&self.live_last_frame, self.committed_len - frame).is_err()
        {
            return false;
        }
        if from == 0 && file.write_all_at(&self.header_bytes, 0).is_err() {
            return false;
        }
        let wrote = self.committed_len >= from + frame || from == 0;
        self.live_from = None;
        self.deferred = false;
        self.live_last_frame = Vec::new();
        if wrote {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
        true
    }

    /// Stores in the file what a deferred copy left in the live WAL (`source`, `source_len`
    /// bytes long, still under the pin that vouched for it), before the pin goes. A disk too
    /// full for all of it leaves the rest served from the live WAL as a full disk does. False
    /// if the live WAL no longer holds those bytes: then nothing vouches for them.
    ///
    /// Bytes below `shipped` (every replica holds them) are left out, but for the last frame:
    /// the file resumes at the first frame of `shipped`'s block, where [`ShadowIndex::open`] would resume it too, its
    /// chain taken from the frame before, as SQLite's running checksum allows.
    pub(crate) fn store_deferred(
        &mut self,
        source: &impl FileExt,
        source_len: u64,
        buf: &mut [u8],
        shipped: u64,
    ) -> Result<bool, Error> {
        let (Some(from), true) = (self.live_from, self.deferred) else { return Ok(true) };
        let end = self.committed_len;
        (self.committed_len, self.chain) = (from, self.live_chain);
        let frame = self.header.frame_size();
        // The last frame is always stored: the capturer compares it with the live WAL.
        let shipped = shipped.min(end.saturating_sub(frame));
        let resume_at = first_frame_from(shipped / BLOCK * BLOCK, frame);
        if shipped <= end && resume_at <= shipped && resume_at >= from + frame {
            if let Some(chain) = chain_through(source, resume_at - frame, self.header) {
                (self.committed_len, self.chain) = (resume_at, chain);
            }
        }
        self.live_from = None;
        self.deferred = false;
        self.live_last_frame = Vec::new();
        self.copy_from(source, source_len, end, buf, Reading::LiveWal { defer: false, to_hint: false })?;
        Ok(self.committed_len >= end)
    }

    /// Punches out what every replica holds (everything below `shipped`) but the last frame.
    pub(crate) fn discard_below(&mut self, shipped: u64) {
        let keep_from = shipped.min(self.committed_len.saturating_sub(self.header.frame_size()));
        if keep_from >= self.discarded.max(BLOCK) + DISCARD_UNIT
            && opened(&mut self.file, &self.path).is_ok_and(|file| punch(file, keep_from).is_ok())
        {
            self.discarded = keep_from;
        }
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
        if self.live_from.is_some_and(|from| self.committed_len >= from + frame) {
            return Ok(Some(self.live_last_frame.clone()));
        }
        let mut buf = vec![0u8; frame as usize];
        let read = match &self.file {
            Some(file) => file.read_exact_at(&mut buf, self.committed_len - frame),
            None => File::open(&self.path).and_then(|file| file.read_exact_at(&mut buf, self.committed_len - frame)),
        };
        read.map_err(io_err("read", &self.path))?;
        Ok(Some(buf))
    }

    /// Copies valid frames of `source` (a WAL of the same life, `source_len` bytes long) from
    /// `committed_len` on, keeps those through the last commit, and fsyncs them. Returns the
    /// number of bytes newly committed.
    ///
    /// With `defer` (the caller holds the pin, and will until the bytes are shipped or stored)
    /// the new frames are checked and counted but left in the live WAL: most are shipped before
    /// the pin must go, and a copy would only take as much room again beside the app's WAL.
    ///
    /// `committed_hint` is how far SQLite's wal-index says this life is committed, 0 if unknown.
    /// It plans the reads: up to it in whole chunks, past it one frame first, doubling. And it
    /// ends them at the first commit past it: that one may be a commit the wal-index does not
    /// show yet, and anything later came after the pass began, whose file events (or the next
    /// poll) bring another pass. Read on to the file's end, a pass chased a writer that appended
    /// faster than it read into a WAL file a larger earlier life had grown, holding its pin, and
    /// so the application's back-fill, back all the while: 250 ms once beside 10,000-row
    /// updates and a replica on the GCS emulator, and such lives grew to 58–83 MiB. A
    /// restarted WAL keeps the old life's length, so without it a pass reads on past the new
    /// life's end, doubling from [`FIRST_READ_BYTES`]: under a saturated writer the passes read
    /// 1.29 times what they copied, 1.09 times with it.
    pub(crate) fn append_from(
        &mut self,
        source: &impl FileExt,
        source_len: u64,
        committed_hint: u64,
        buf: &mut [u8],
        defer: bool,
    ) -> Result<u64, Error> {
        self.copy_from(source, source_len, committed_hint, buf, Reading::LiveWal { defer, to_hint: true })
    }

    /// The shared loop of [`ShadowIndex::open`] (reading the shadow itself) and
    /// [`ShadowIndex::append_from`] (appending from the live WAL).
    fn copy_from(
        &mut self,
        source: &impl FileExt,
        source_len: u64,
        committed_hint: u64,
        buf: &mut [u8],
        reading: Reading,
    ) -> Result<u64, Error> {
        let write = reading != Reading::OwnShadow;
        // Where a pass's copy ends at the first commit past (see `append_from`).
        let stop_past = match reading {
            Reading::LiveWal { to_hint: true, .. } if committed_hint > 0 => committed_hint,
            _ => u64::MAX,
        };
        if matches!(reading, Reading::LiveWal { defer: true, .. }) && self.live_from.is_none() {
            (self.live_from, self.live_chain, self.deferred) = (Some(self.committed_len), self.chain, true);
        }
        let frame = self.header.frame_size() as usize;
        let frames_per_chunk = (buf.len() / frame).max(1);
        let mut frames_per_read = match committed_hint {
            0 => (FIRST_READ_BYTES / frame).clamp(1, frames_per_chunk),
            _ => 1,
        };
        let mut offset = self.committed_len;
        let mut chain = self.chain;
        let (mut commit_end, mut commit_chain) = (self.committed_len, self.chain);
        let mut storing = write && self.live_from.is_none();
        let file = opened(&mut self.file, &self.path)?;
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
            let chain_at_chunk = chain;
            let (mut n_valid, mut chunk_commit) = (0, None);
            for bytes in chunk.chunks_exact(frame) {
                let Some(frame_header) = chain.accept(bytes) else {
                    break;
                };
                n_valid += 1;
                if frame_header.is_commit() {
                    let previous_end = chunk_commit.map_or(commit_end, |(n, _)| offset + (n * frame) as u64);
                    if write {
                        self.last_transaction = offset + (n_valid * frame) as u64 - previous_end;
                    }
                    chunk_commit = Some((n_valid, chain));
                    if offset + (n_valid * frame) as u64 > stop_past {
                        break;
                    }
                }
            }
            if storing && n_valid > 0 {
                if let Err(e) = file.write_all_at(&chunk[..n_valid * frame], offset) {
                    if !is_disk_full(&e) {
                        return Err(io_err("write", &self.path)(e));
                    }
                    // A full disk: keep every whole transaction that fits, and serve the rest
                    // of this WAL life from the live WAL until the replicas have it.
                    let fitted = chunk[..n_valid * frame]
                        .chunks_exact(frame)
                        .enumerate()
                        .take_while(|(i, bytes)| file.write_all_at(bytes, offset + (i * frame) as u64).is_ok())
                        .count();
                    let (mut stored_end, mut stored_chain, mut refit) = (commit_end, commit_chain, chain_at_chunk);
                    for (i, bytes) in chunk[..fitted * frame].chunks_exact(frame).enumerate() {
                        if refit.accept(bytes).is_some_and(|h| h.is_commit()) {
                            (stored_end, stored_chain) = (offset + ((i + 1) * frame) as u64, refit);
                        }
                    }
                    (self.live_from, self.live_chain, self.deferred) = (Some(stored_end), stored_chain, false);
                    storing = false;
                }
            }
            if let Some((n, at_commit)) = chunk_commit {
                (commit_end, commit_chain) = (offset + (n * frame) as u64, at_commit);
                if write && !storing {
                    self.live_last_frame = chunk[(n - 1) * frame..n * frame].to_vec();
                }
            }
            offset += (n_valid * frame) as u64;
            if n_valid < n_frames || commit_end > stop_past {
                break 'chunks;
            }
        }
        // Frames after the last commit belong to a transaction still being written (or one a
        // crash cut short); a pass reads them again. A pass leaves them in the file, whose pages
        // the next frames reuse; reopening after a crash cuts them off.
        if !write && source_len != commit_end {
            file.set_len(commit_end).map_err(io_err("truncate", &self.path))?;
        }
        let newly_committed = commit_end - self.committed_len;
        // Only bytes written to the file need an fsync, not those left in the live WAL.
        let stored = self.live_from.map_or(commit_end, |from| from.min(commit_end)) > self.committed_len;
        self.committed_len = commit_end;
        self.chain = commit_chain;
        if stored && write {
            let since = *self.dirty_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= FSYNC_SPACING {
                self.fsync()?;
            }
        }
        Ok(newly_committed)
    }

    /// Ends the index: cuts the file to its committed length, so an uploader may take a
    /// finished index's file length for its end, and fsyncs it.
    pub(crate) fn finish(&mut self) -> Result<(), Error> {
        let file = opened(&mut self.file, &self.path)?;
        if file.metadata().map_err(io_err("stat", &self.path))?.len() != self.committed_len {
            file.set_len(self.committed_len).map_err(io_err("truncate", &self.path))?;
            self.dirty_since.get_or_insert_with(Instant::now);
        }
        self.fsync()
    }

    /// Lets the file's descriptor go, fsynced first: a resting database holds none. The next use
    /// opens the file again.
    pub(crate) fn close_file(&mut self) -> Result<(), Error> {
        self.fsync()?;
        self.file = None;
        Ok(())
    }

    /// Fsyncs what [`FSYNC_SPACING`] left not fsynced: when the database is quiet, when a WAL life
    /// ends, and at shutdown.
    pub(crate) fn fsync(&mut self) -> Result<(), Error> {
        if self.dirty_since.is_some() {
            opened(&mut self.file, &self.path)?.sync_data().map_err(io_err("fsync", &self.path))?;
            self.dirty_since = None;
        }
        Ok(())
    }
}

/// The indexes of the raw shadow files in `wal_dir`, ascending.
pub(crate) fn indexes_in(wal_dir: &Path) -> Vec<u32> {
    let mut indexes: Vec<u32> = std::fs::read_dir(wal_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| name::parse_shadow_wal_file_name(&e.file_name().to_string_lossy()))
        .collect();
    indexes.sort_unstable();
    indexes
}

/// Disk the shadow files in `wal_dir` take (spooled ones too), but `except`'s raw file (an
/// index): shipped ranges are punched out and shipped indexes deleted, so this is what some
/// replica still lacks, plus each index's last frame. One listing, not a stat per index a long
/// generation ever had.
pub(crate) fn disk_bytes(wal_dir: &Path, except: Option<u32>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(wal_dir) else { return 0 };
    let except = except.map(name::shadow_wal_file_name);
    entries
        .flatten()
        .filter(|e| except.as_deref() != Some(&*e.file_name().to_string_lossy()))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Punches out of a shipped index file everything below `shipped` (whole blocks, the header's
/// first block kept), so bytes every replica holds take no disk. Filesystems that cannot punch
/// holes keep the bytes; nothing else changes.
pub(crate) fn discard_shipped(path: &Path, shipped: u64) {
    if let Ok(file) = OpenOptions::new().write(true).open(path) {
        let _ = punch(&file, shipped);
    }
}

/// Punches out a finished index file through its end, keeping its header block and its length.
pub(crate) fn discard_whole(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        discard_shipped(path, meta.len().div_ceil(BLOCK) * BLOCK);
    }
}

/// The shadow file, opened again if it was closed for a rest.
fn opened<'f>(slot: &'f mut Option<File>, path: &Path) -> Result<&'f File, Error> {
    match slot {
        Some(file) => Ok(file),
        None => Ok(slot.insert(OpenOptions::new().read(true).write(true).open(path).map_err(io_err("open", path))?)),
    }
}

fn punch(file: &File, below: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let end = below / BLOCK * BLOCK;
    if end <= BLOCK {
        return Ok(());
    }
    // SAFETY: fallocate(2) on a descriptor the caller owns; no memory is involved.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            BLOCK as libc::off_t,
            (end - BLOCK) as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Where the punched-out start of a shadow file ends: bytes below it read as zeros (0 when
/// nothing is punched).
pub(crate) fn punched_to(file: &File) -> u64 {
    match first_data(file, BLOCK) {
        Some(at) if at > BLOCK => at,
        Some(_) => 0,
        // No data past the header's block: punched through its end (or no longer than it).
        None => file.metadata().map_or(0, |m| m.len()),
    }
}

/// Where the first whole frame of a WAL life at or after `offset` begins.
fn first_frame_from(offset: u64, frame: u64) -> u64 {
    WAL_HEADER_SIZE as u64 + offset.saturating_sub(WAL_HEADER_SIZE as u64).div_ceil(frame) * frame
}

/// The checksum chain of the life with `header` through the frame at `at` of `source`, whose
/// header carries the running checksum; `None` if that frame cannot be read or belongs to
/// another life. The bytes before it need not be there (punched out, or never stored).
fn chain_through(source: &impl FileExt, at: u64, header: WalHeader) -> Option<FrameChain> {
    let mut bytes = vec![0u8; header.frame_size() as usize];
    source.read_exact_at(&mut bytes, at).ok()?;
    let frame = FrameHeader::parse(&bytes).ok()?;
    ((frame.salt1, frame.salt2) == (header.salt1, header.salt2)).then(|| FrameChain::resume(header, frame.checksum))
}

/// The first offset at or after `from` that holds data rather than a punched hole; `None` if
/// there is none (or the filesystem cannot tell, in which case nothing was punched either).
pub(crate) fn first_data(file: &File, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek(2) on a descriptor the caller owns; no memory is involved.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    (at >= 0).then_some(at as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use std::fs;

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

        /// A shadow of the live WAL's life as index `index`.
        fn shadow(&self, index: u32) -> ShadowIndex {
            let (file, bytes) = self.wal();
            let header_bytes: [u8; WAL_HEADER_SIZE] = bytes[..WAL_HEADER_SIZE].try_into().unwrap();
            let mut shadow =
                ShadowIndex::create(self.dir.path(), index, header_bytes, WalHeader::parse(&header_bytes).unwrap())
                    .unwrap();
            assert_eq!(
                shadow.append_from(&file, bytes.len() as u64, 0, &mut vec![0; COPY_CHUNK_BYTES], false).unwrap(),
                bytes.len() as u64 - WAL_HEADER_SIZE as u64
            );
            shadow
        }
    }

    fn disk_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).unwrap().blocks() * 512
    }

    /// The capturer predicts where the next commit takes a WAL life from the last transaction's
    /// size, however many transactions one copy reads.
    #[test]
    fn the_last_transaction_copied_is_measured_in_whole_frames() {
        let db = Db::new();
        db.new_life(3);
        db.app.execute_batch("BEGIN; INSERT INTO t SELECT randomblob(1000) FROM t, t AS u; COMMIT;").unwrap();
        let before_large = db.wal().1.len() as u64;
        db.app.execute("INSERT INTO t VALUES (randomblob(1000))", []).unwrap();
        let (_, wal) = db.wal();
        let shadow = db.shadow(1);
        assert_eq!(shadow.last_transaction, wal.len() as u64 - before_large, "the last of five, read in one copy");
        assert_eq!(shadow.last_transaction % shadow.header.frame_size(), 0);
        let mut later = db.shadow(2);
        db.app.execute_batch("BEGIN; INSERT INTO t SELECT randomblob(1000) FROM t, t AS u LIMIT 50; COMMIT;").unwrap();
        let (file, grown) = db.wal();
        later.append_from(&file, grown.len() as u64, 0, &mut vec![0; COPY_CHUNK_BYTES], false).unwrap();
        assert_eq!(later.last_transaction, (grown.len() - wal.len()) as u64, "a copy that reads one transaction");
        assert!(later.last_transaction > 10 * later.header.frame_size());
    }

    /// Shipped bytes leave the disk, the last frame stays for the capturer's comparison, and a
    /// restarted walstream resumes the index from what is left, as if nothing were punched.
    #[test]
    fn shipped_bytes_are_punched_out_and_the_rest_still_resumes() {
        let db = Db::new();
        db.new_life(300);
        let mut shadow = db.shadow(1);
        let (_, wal) = db.wal();
        let (len, checksum) = (shadow.committed_len, shadow.end_checksum());
        let before = disk_bytes(&shadow.path);
        assert!(before >= len / 4096 * 4096, "the copy is sparse already; the test proves nothing");
        shadow.discard_below(len);
        let after = disk_bytes(&shadow.path);
        let frame = shadow.header.frame_size();
        assert!(after <= 2 * 4096 + 2 * frame, "{after} bytes still on disk of {before}");
        assert_eq!(
            shadow.last_frame().unwrap().unwrap(),
            wal[(len - frame) as usize..len as usize],
            "the last frame must survive"
        );
        let reopened = ShadowIndex::open(db.dir.path(), 1).unwrap().unwrap();
        assert_eq!((reopened.committed_len, reopened.end_checksum()), (len, checksum));
        // The file still reads at its offsets, header included; the punched part reads as zeros.
        let bytes = fs::read(&shadow.path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(bytes[..WAL_HEADER_SIZE], wal[..WAL_HEADER_SIZE]);
        assert!(first_data(shadow.file.as_ref().unwrap(), 4096).unwrap() > 4096);
        // More commits after a punch: they are copied and resume the same way.
        for _ in 0..5 {
            db.app.execute("INSERT INTO t VALUES (randomblob(1000))", []).unwrap();
        }
        let (file, wal) = db.wal();
        shadow.append_from(&file, wal.len() as u64, 0, &mut vec![0; COPY_CHUNK_BYTES], false).unwrap();
        assert_eq!(shadow.committed_len, wal.len() as u64);
        let reopened = ShadowIndex::open(db.dir.path(), 1).unwrap().unwrap();
        assert_eq!((reopened.committed_len, reopened.end_checksum()), (shadow.committed_len, shadow.end_checksum()));
    }

    /// A finished index is punched through its very end; the header block stays.
    #[test]
    fn a_finished_index_is_punched_through_its_end() {
        let db = Db::new();
        db.new_life(100);
        let mut shadow = db.shadow(1);
        shadow.finish().unwrap();
        discard_shipped(&shadow.path, shadow.committed_len);
        assert!(disk_bytes(&shadow.path) <= 2 * 4096);
        assert_eq!(fs::metadata(&shadow.path).unwrap().len(), shadow.committed_len);
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

    /// A pass reads to the first commit past where the wal-index says the life is committed (a
    /// commit it does not show yet) and stops there: the later ones came after the pass began,
    /// and read on, a pass chased a writer faster than itself while its pin held the app's
    /// back-fill back. Told nothing, it reads every valid frame, as before a drop.
    #[test]
    fn a_pass_reads_one_commit_past_the_wal_index_and_no_further() {
        let db = Db::new();
        for _ in 0..6 {
            db.app.execute("INSERT INTO t VALUES (randomblob(3000))", []).unwrap();
        }
        let (file, bytes) = db.wal();
        let scan = walstream_format::wal::scan(&bytes).unwrap();
        let frame = scan.header.frame_size();
        let header_bytes: [u8; WAL_HEADER_SIZE] = bytes[..WAL_HEADER_SIZE].try_into().unwrap();
        // Where each transaction's commit frame ends.
        let mut commits = Vec::new();
        let mut chain = FrameChain::new(scan.header);
        for (i, bytes) in bytes[WAL_HEADER_SIZE..scan.committed_len as usize].chunks_exact(frame as usize).enumerate() {
            if chain.accept(bytes).unwrap().is_commit() {
                commits.push(WAL_HEADER_SIZE as u64 + (i as u64 + 1) * frame);
            }
        }
        assert!(commits.len() >= 6, "{} commits; the test proves nothing", commits.len());
        let len = bytes.len() as u64;
        let mut shadow = ShadowIndex::create(db.dir.path(), 1, header_bytes, scan.header).unwrap();
        shadow.append_from(&file, len, commits[1], &mut vec![0; COPY_CHUNK_BYTES], false).unwrap();
        assert_eq!(shadow.committed_len, commits[2], "the copy did not stop at the first commit past the hint");
        let mut whole = ShadowIndex::create(db.dir.path(), 2, header_bytes, scan.header).unwrap();
        whole.append_from(&file, len, 0, &mut vec![0; COPY_CHUNK_BYTES], false).unwrap();
        assert_eq!(whole.committed_len, scan.committed_len);
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
        assert!(
            bytes.len() > scan.committed_len as usize + 64 * frame,
            "the old life is not there; the test proves nothing"
        );
        let header_bytes: [u8; WAL_HEADER_SIZE] = bytes[..WAL_HEADER_SIZE].try_into().unwrap();
        let mut read = Vec::new();
        for (index, hint) in [(1, scan.committed_len), (2, 0)] {
            let mut shadow = ShadowIndex::create(db.dir.path(), index, header_bytes, scan.header).unwrap();
            let source = CountingReader(&file, Default::default());
            shadow.append_from(&source, bytes.len() as u64, hint, &mut vec![0; COPY_CHUNK_BYTES], false).unwrap();
            assert_eq!(shadow.committed_len, scan.committed_len);
            read.push(source.1.get());
        }
        assert_eq!(read[0], scan.committed_len as usize - WAL_HEADER_SIZE + frame);
        assert!(read[1] >= FIRST_READ_BYTES / frame * frame, "without the hint {} bytes were read", read[1]);
    }
}
