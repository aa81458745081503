//! Spooled indexes: an ended shadow index the store has not taken for a while, compressed into
//! the very segments it will go up as.
//!
//! During a store outage every committed WAL byte waits locally, and on a memory volume that is
//! RAM the instance pays for. The current index stays raw (the capturer appends to it and
//! compares its last frame with the live WAL), but an ended one never changes again: the
//! capturer frames it, a step per pass, into records that are each a finished segment object,
//! then removes the raw file. An uploader sends a record as it is; only a replica whose position
//! falls inside a record (an upload that looked failed but reached the store) has that record
//! decoded and framed again from its position.
//!
//! Layout: [`MAGIC`], the first offset the records may be read from (`valid_from`, u64
//! little-endian), the index's WAL header, then records: raw offset (u64), raw length (u32),
//! framed length (u32), the LZ4 frame. It is written under a temporary name, fsynced and renamed
//! before the raw file goes, so a spool file is always whole and the index is never in neither.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use walstream_format::{lz4, name, WAL_HEADER_SIZE};

use crate::segment::{frame_segment, Piece};

const MAGIC: &[u8; 8] = b"WSSPOOL1";
const VALID_FROM_AT: u64 = MAGIC.len() as u64;
const RECORDS_AT: u64 = VALID_FROM_AT + 8 + WAL_HEADER_SIZE as u64;
const RECORD_HEAD_LEN: usize = 16;

/// An ended index is spooled once it has waited this long. A healthy store takes an ended index
/// within a sync interval (1 s by default), so only an outage, or a store slower than the app's
/// writes, leaves one waiting this long. What waits raw during an outage is about this much of
/// the app's WAL, plus [`LOOK_EVERY`]: at 3 s and a look a second, 18 MB at 1,000 one-page
/// commits a second.
pub(crate) const SPOOL_AFTER: Duration = Duration::from_secs(2);

/// How often the ended indexes are listed for spooling: one directory read.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// Raw WAL per record at most (a segment's own bound is 16 MiB): a replica positioned inside a
/// record has that record decoded whole in memory.
const RECORD_RAW_MAX: u64 = 4 << 20;

/// Raw bytes framed per pass of the capturer, about 1.5 ms of LZ4, so a pass is never held up
/// for long: the capturer still has a live WAL to follow and a pin to roll. At one pass every
/// 10 ms while busy that is up to 400 MB/s, far more than an app's WAL grows.
const STEP_RAW_BYTES: u64 = 4 << 20;

/// A spool must come out at most this fraction of the raw bytes, or the index stays raw:
/// WAL of random or already compressed data would cost CPU and save nothing.
const WORTH_RATIO: f64 = 0.8;

/// What the ratio is judged on: the first this many raw bytes, or the whole index if smaller.
const JUDGE_AFTER: u64 = 4 << 20;

/// Frames one ended index into a spool file, a step at a time.
pub(crate) struct Spooler {
    index: u32,
    raw: File,
    raw_path: PathBuf,
    temp: File,
    temp_path: PathBuf,
    start: u64,
    at: u64,
    end: u64,
    framed_bytes: u64,
}

/// What a [`Spooler::step`] came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    More,
    Done,
    /// The index does not compress enough to be worth spooling.
    NotWorth,
}

impl Spooler {
    /// Begins spooling index `index` from `from` (or from the first byte not yet punched out, if
    /// later); `None` when there is nothing left to spool.
    pub(crate) fn start(wal_dir: &Path, index: u32, from: u64) -> io::Result<Option<Spooler>> {
        let raw_path = wal_dir.join(name::shadow_wal_file_name(index));
        let raw = File::open(&raw_path)?;
        let end = raw.metadata()?.len();
        let start = from.max(crate::shadow::punched_to(&raw));
        let mut header = [0u8; WAL_HEADER_SIZE];
        if end <= start.max(WAL_HEADER_SIZE as u64) || raw.read_exact_at(&mut header, 0).is_err() {
            return Ok(None);
        }
        let temp_path = wal_dir.join(format!("{}.tmp", name::spool_file_name(index)));
        let mut temp = OpenOptions::new().write(true).create(true).truncate(true).open(&temp_path)?;
        let written = (|| {
            temp.write_all(MAGIC)?;
            temp.write_all(&start.to_le_bytes())?;
            temp.write_all(&header)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp_path);
            return Err(e);
        }
        Ok(Some(Spooler { index, raw, raw_path, temp, temp_path, start, at: start, end, framed_bytes: 0 }))
    }

    /// Frames about `budget` more raw bytes into records (a record may run past it).
    pub(crate) fn step(&mut self, budget: u64, framed: &mut BytesMut) -> io::Result<Step> {
        let stop = self.end.min(self.at.saturating_add(budget));
        while self.at < stop {
            let limit = self.end.min(self.at + RECORD_RAW_MAX);
            let (body, len) = frame_segment(Piece::Mapped(&self.raw), self.at, limit, framed)?;
            let mut head = [0u8; RECORD_HEAD_LEN];
            head[..8].copy_from_slice(&self.at.to_le_bytes());
            head[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            head[12..].copy_from_slice(&(body.len() as u32).to_le_bytes());
            self.temp.write_all(&head)?;
            self.temp.write_all(&body)?;
            self.at += len;
            self.framed_bytes += body.len() as u64;
        }
        let raw_bytes = self.at - self.start;
        if (raw_bytes >= JUDGE_AFTER || self.at == self.end)
            && self.framed_bytes as f64 > raw_bytes as f64 * WORTH_RATIO
        {
            return Ok(Step::NotWorth);
        }
        Ok(if self.at == self.end { Step::Done } else { Step::More })
    }

    /// Puts the finished spool in place and removes the raw file: (raw, framed) bytes.
    pub(crate) fn finish(self) -> io::Result<(u64, u64)> {
        // Bytes the capturer punched out meanwhile (every replica had them) were framed as
        // zeros: no reader may start below them.
        let valid_from = self.start.max(crate::shadow::punched_to(&self.raw));
        let finished = (|| {
            self.temp.write_all_at(&valid_from.to_le_bytes(), VALID_FROM_AT)?;
            self.temp.sync_all()?;
            let path = self.raw_path.with_file_name(name::spool_file_name(self.index));
            std::fs::rename(&self.temp_path, &path)?;
            // The spool is durably in place before the raw file goes.
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok::<_, io::Error>(())
        })();
        if let Err(e) = finished {
            let _ = std::fs::remove_file(&self.temp_path);
            return Err(e);
        }
        let _ = std::fs::remove_file(&self.raw_path);
        Ok((self.end - self.start, self.framed_bytes))
    }

    /// Gives up, leaving the raw file as it was.
    pub(crate) fn abandon(self) {
        let _ = std::fs::remove_file(&self.temp_path);
    }
}

/// One record of a spool file.
#[derive(Clone, Copy, Debug)]
struct Record {
    raw_offset: u64,
    raw_len: u64,
    framed_at: u64,
    framed_len: usize,
}

/// A spool file, open for an uploader.
pub(crate) struct SpoolReader {
    file: File,
    valid_from: u64,
    records: Vec<Record>,
}

impl SpoolReader {
    /// The spool of index `index`, if it has one.
    pub(crate) fn open(wal_dir: &Path, index: u32) -> io::Result<Option<SpoolReader>> {
        let file = match File::open(wal_dir.join(name::spool_file_name(index))) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let mut head = [0u8; RECORDS_AT as usize];
        file.read_exact_at(&mut head, 0)?;
        if &head[..MAGIC.len()] != MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a walstream spool file"));
        }
        let valid_from = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let mut records = Vec::new();
        let mut at = RECORDS_AT;
        while at < len {
            let mut head = [0u8; RECORD_HEAD_LEN];
            file.read_exact_at(&mut head, at)?;
            let raw_offset = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            let raw_len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as u64;
            let framed_len = u32::from_le_bytes(head[12..].try_into().expect("4 bytes")) as usize;
            let framed_at = at + RECORD_HEAD_LEN as u64;
            if framed_at + framed_len as u64 > len
                || records.last().is_some_and(|r: &Record| r.raw_offset + r.raw_len != raw_offset)
            {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a spool file's records do not follow on"));
            }
            records.push(Record { raw_offset, raw_len, framed_at, framed_len });
            at = framed_at + framed_len as u64;
        }
        Ok(Some(SpoolReader { file, valid_from, records }))
    }

    /// The index's length: where its last record ends.
    pub(crate) fn raw_len(&self) -> u64 {
        self.records.last().map_or(self.valid_from, |r| r.raw_offset + r.raw_len)
    }

    /// The index's WAL header.
    pub(crate) fn header(&self) -> io::Result<[u8; WAL_HEADER_SIZE]> {
        let mut header = [0u8; WAL_HEADER_SIZE];
        self.file.read_exact_at(&mut header, VALID_FROM_AT + 8)?;
        Ok(header)
    }

    /// The segment that starts at `offset`, framed, and the raw bytes it holds; `None` when the
    /// spool no longer holds `offset` (every replica had shipped past it when it was made).
    pub(crate) fn segment_at(&self, offset: u64, framed: &mut BytesMut) -> io::Result<Option<(Bytes, u64)>> {
        if offset < self.valid_from {
            return Ok(None);
        }
        let Some(record) = self.records.iter().find(|r| r.raw_offset <= offset && offset < r.raw_offset + r.raw_len)
        else {
            return Ok(None);
        };
        framed.clear();
        framed.resize(record.framed_len, 0);
        self.file.read_exact_at(framed, record.framed_at)?;
        let body = framed.split().freeze();
        if record.raw_offset == offset {
            return Ok(Some((body, record.raw_len)));
        }
        // A replica inside the record: decode it and frame what it lacks.
        let raw = lz4::decompress(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        drop(body);
        let skip = offset - record.raw_offset;
        frame_segment(Piece::Slice(&raw), skip, raw.len() as u64, framed).map(|(body, len)| Some((body, len)))
    }
}

/// Writes, in place of the spool of `index`, a raw shadow file of the index's length that holds
/// only its header, as a shipped index punched through its end does: the newest ended index is
/// kept that way for its length (see `Capturer::remove_shipped_shadow`).
pub(crate) fn keep_length_only(wal_dir: &Path, index: u32) -> io::Result<()> {
    let spool_path = wal_dir.join(name::spool_file_name(index));
    let Some(spool) = SpoolReader::open(wal_dir, index)? else { return Ok(()) };
    let raw_path = wal_dir.join(name::shadow_wal_file_name(index));
    let temp = raw_path.with_extension("wal.tmp");
    let file = File::create(&temp)?;
    file.write_all_at(&spool.header()?, 0)?;
    file.set_len(spool.raw_len())?;
    file.sync_all()?;
    std::fs::rename(&temp, &raw_path)?;
    std::fs::remove_file(spool_path)
}

/// The WAL length of ended index `index`: its raw file's, or where its spool's records end.
pub(crate) fn index_len(wal_dir: &Path, index: u32) -> Option<u64> {
    match std::fs::metadata(wal_dir.join(name::shadow_wal_file_name(index))) {
        Ok(meta) => Some(meta.len()),
        Err(_) => SpoolReader::open(wal_dir, index).ok().flatten().map(|spool| spool.raw_len()),
    }
}

/// Clears what a crash left: a temporary spool file, or a raw file whose spool was already in
/// place.
pub(crate) fn tidy(wal_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(wal_dir) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if file_name.ends_with(".spool.tmp") || file_name.ends_with(".wal.tmp") {
            let _ = std::fs::remove_file(entry.path());
        } else if let Some(index) = name::parse_spool_file_name(&file_name) {
            let _ = std::fs::remove_file(wal_dir.join(name::shadow_wal_file_name(index)));
        }
    }
}

/// The capturer's side: which ended indexes wait, and the one being spooled.
#[derive(Default)]
pub(crate) struct Spooling {
    current: Option<Spooler>,
    /// Ended indexes that have waited [`SPOOL_AFTER`], oldest first.
    due: VecDeque<u32>,
    /// When each ended index was first seen waiting (or may be tried again).
    waiting_since: BTreeMap<u32, Instant>,
    /// Indexes that do not compress enough.
    not_worth: BTreeSet<u32>,
    looked: Option<Instant>,
    framed: BytesMut,
}

/// What a [`Spooling::step`] did.
#[derive(Default)]
pub(crate) struct Spooled {
    /// Indexes put into their spools, and their raw and framed bytes.
    pub(crate) indexes: u32,
    pub(crate) raw: u64,
    pub(crate) framed: u64,
    /// An index that failed (a full disk, say); it is tried again after [`SPOOL_AFTER`].
    pub(crate) failure: Option<(u32, io::Error)>,
}

impl Spooling {
    /// Spools up to [`STEP_RAW_BYTES`] of the ended indexes below `current` that have waited
    /// [`SPOOL_AFTER`] (looked for every [`LOOK_EVERY`] at most). `slowest` is the slowest replica's
    /// last known position (index, offset): bytes below it need no spooling.
    pub(crate) fn step(&mut self, wal_dir: &Path, current: u32, slowest: Option<(u32, u64)>) -> Spooled {
        let mut report = Spooled::default();
        self.look_for_work(wal_dir, current);
        let mut budget = STEP_RAW_BYTES;
        while budget > 0 && (self.current.is_some() || self.start_next(wal_dir, slowest)) {
            let spooler = self.current.as_mut().expect("started");
            let (index, before) = (spooler.index, spooler.at);
            let outcome = spooler.step(budget, &mut self.framed);
            budget = budget.saturating_sub(spooler.at - before);
            if matches!(outcome, Ok(Step::More)) {
                continue;
            }
            let spooler = self.current.take().expect("started");
            let failure = match outcome {
                Ok(Step::Done) => match spooler.finish() {
                    Ok((raw, framed)) => {
                        self.waiting_since.remove(&index);
                        report.indexes += 1;
                        report.raw += raw;
                        report.framed += framed;
                        None
                    }
                    Err(e) => Some(e),
                },
                Ok(_) => {
                    spooler.abandon();
                    self.not_worth.insert(index);
                    None
                }
                Err(e) => {
                    spooler.abandon();
                    Some(e)
                }
            };
            if let Some(error) = failure {
                self.waiting_since.insert(index, Instant::now());
                report.failure = Some((index, error));
            }
        }
        report
    }

    /// Queues the ended indexes that have waited long enough.
    fn look_for_work(&mut self, wal_dir: &Path, current: u32) {
        let now = Instant::now();
        if self.looked.is_some_and(|at| now.duration_since(at) < LOOK_EVERY) {
            return;
        }
        self.looked = Some(now);
        let ended: Vec<u32> = crate::shadow::indexes_in(wal_dir).into_iter().filter(|&i| i < current).collect();
        self.waiting_since.retain(|index, _| ended.contains(index));
        for index in ended {
            let since = *self.waiting_since.entry(index).or_insert(now);
            let queued = self.due.contains(&index) || self.current.as_ref().is_some_and(|s| s.index == index);
            if now.duration_since(since) >= SPOOL_AFTER && !queued && !self.not_worth.contains(&index) {
                self.due.push_back(index);
            }
        }
    }

    /// Starts on the next due index; whether one is being spooled.
    fn start_next(&mut self, wal_dir: &Path, slowest: Option<(u32, u64)>) -> bool {
        while let Some(index) = self.due.pop_front() {
            let from = match slowest {
                Some((at, offset)) if at == index => offset,
                _ => 0,
            };
            match Spooler::start(wal_dir, index, from) {
                Ok(Some(spooler)) => {
                    self.current = Some(spooler);
                    return true;
                }
                Ok(None) => {
                    self.not_worth.insert(index);
                }
                // Shipped and deleted meanwhile, or a passing failure: looked at again later.
                Err(_) => {
                    self.waiting_since.insert(index, Instant::now());
                }
            }
        }
        false
    }

    /// Every replica holds the indexes below `index`: spooling one of them is no use.
    pub(crate) fn shipped_below(&mut self, index: u32) {
        if self.current.as_ref().is_some_and(|s| s.index < index) {
            self.current.take().expect("checked").abandon();
        }
        self.due.retain(|&i| i >= index);
        self.not_worth.retain(|&i| i >= index);
    }

    /// A new generation: nothing of the old one is spooled any more.
    pub(crate) fn reset(&mut self) {
        if let Some(spooler) = self.current.take() {
            spooler.abandon();
        }
        self.due.clear();
        self.waiting_since.clear();
        self.not_worth.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shadow-like file: a 32-byte header, then `len` bytes of numbered rows, which compress
    /// several times over as SQLite pages of text do.
    fn raw_index(dir: &Path, index: u32, len: usize) -> Vec<u8> {
        let mut data: Vec<u8> = (0..WAL_HEADER_SIZE as u8).collect();
        let mut row = 0u64;
        while data.len() < WAL_HEADER_SIZE + len {
            row = row.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            data.extend_from_slice(
                format!("{{\"id\":{},\"name\":\"customer {}\",\"plan\":\"basic\"}}", row >> 40, row >> 52).as_bytes(),
            );
        }
        data.truncate(WAL_HEADER_SIZE + len);
        std::fs::write(dir.join(name::shadow_wal_file_name(index)), &data).unwrap();
        data
    }

    fn spool_whole(dir: &Path, index: u32, from: u64) -> (u64, u64) {
        let mut spooler = Spooler::start(dir, index, from).unwrap().unwrap();
        let mut framed = BytesMut::new();
        loop {
            match spooler.step(u64::MAX, &mut framed).unwrap() {
                Step::More => continue,
                Step::Done => return spooler.finish().unwrap(),
                Step::NotWorth => panic!("compressible data judged not worth spooling"),
            }
        }
    }

    /// Every segment read back, from the start and from inside a record, decodes to exactly the
    /// raw bytes it claims; the raw file is gone and the spool is smaller.
    #[test]
    fn a_spooled_index_reads_back_as_the_segments_of_its_raw_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data = raw_index(dir.path(), 3, 19 << 20);
        let (raw, framed) = spool_whole(dir.path(), 3, 1000);
        assert_eq!(raw, data.len() as u64 - 1000);
        assert!(framed * 2 < raw, "{framed} framed of {raw}");
        assert!(!dir.path().join(name::shadow_wal_file_name(3)).exists());
        let spool = SpoolReader::open(dir.path(), 3).unwrap().unwrap();
        assert_eq!(spool.raw_len(), data.len() as u64);
        assert_eq!(spool.header().unwrap(), data[..WAL_HEADER_SIZE]);
        let mut buf = BytesMut::new();
        assert!(spool.segment_at(999, &mut buf).unwrap().is_none(), "below where it was spooled from");
        for start in [1000u64, 1000 + (5 << 20) + 17] {
            let mut at = start;
            while at < data.len() as u64 {
                let (body, len) = spool.segment_at(at, &mut buf).unwrap().unwrap();
                assert!(len > 0);
                assert_eq!(lz4::decompress(&body).unwrap(), data[at as usize..(at + len) as usize], "segment at {at}");
                at += len;
            }
            assert_eq!(at, data.len() as u64);
        }
    }

    #[test]
    fn random_bytes_stay_raw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name::shadow_wal_file_name(1));
        let mut x = 1u64;
        let data: Vec<u8> = (0..6 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&path, &data).unwrap();
        let mut spooler = Spooler::start(dir.path(), 1, 0).unwrap().unwrap();
        assert_eq!(spooler.step(u64::MAX, &mut BytesMut::new()).unwrap(), Step::NotWorth);
        spooler.abandon();
        assert_eq!(std::fs::read(&path).unwrap(), data, "the raw file is untouched");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no spool file left");
    }

    /// The newest ended index keeps its length and header once shipped, as a punched raw file.
    #[test]
    fn a_shipped_spool_becomes_a_raw_file_of_the_same_length() {
        let dir = tempfile::tempdir().unwrap();
        let data = raw_index(dir.path(), 2, 5 << 20);
        spool_whole(dir.path(), 2, 0);
        keep_length_only(dir.path(), 2).unwrap();
        let raw = dir.path().join(name::shadow_wal_file_name(2));
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), data.len() as u64);
        assert_eq!(std::fs::read(&raw).unwrap()[..WAL_HEADER_SIZE], data[..WAL_HEADER_SIZE]);
        assert!(!dir.path().join(name::spool_file_name(2)).exists());
    }

    /// A crash after the spool was renamed into place but before the raw file went: the raw file
    /// goes, and so does a temporary spool.
    #[test]
    fn tidy_clears_what_a_crash_left() {
        let dir = tempfile::tempdir().unwrap();
        raw_index(dir.path(), 4, 1 << 20);
        std::fs::write(dir.path().join(name::spool_file_name(4)), b"x").unwrap();
        raw_index(dir.path(), 5, 1 << 20);
        std::fs::write(dir.path().join(format!("{}.tmp", name::spool_file_name(5))), b"x").unwrap();
        tidy(dir.path());
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, [name::spool_file_name(4), name::shadow_wal_file_name(5)]);
    }
}
