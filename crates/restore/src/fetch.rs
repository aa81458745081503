//! Downloading a plan's objects in bounded memory: every object comes as parts of at most
//! [`PART`] stored bytes, a few in flight, decoded from LZ4 as they arrive in order. The snapshot
//! is written block by block into the database file; a WAL index's frames are checked against
//! its checksum chain as they are decoded and passed on in batches, so they are applied while
//! later ones still download and no index, however long its life was, is held anywhere.

use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc;
use walstream_format::age::{self, AgeKeys, OpenError};
use walstream_format::lz4;
use walstream_store::ObjectStore;

use crate::index::{ChainCheck, FramePool, Segments, WalEvent};
use crate::plan::{IndexPlan, SegmentRef};
use crate::progress::{Progress, TimeSplit};
use crate::Error;

/// Stored bytes asked for per GET (ranged for larger objects), and how many GETs are in
/// flight (the snapshot's, then the WAL's): enough to keep a link busy, while what a restore
/// holds stays a few MiB whatever the sizes (in flight, one queued, a decoder's block).
const PART: u64 = 1 << 20;
const PARTS_IN_FLIGHT: usize = 4;

/// The parts of an object: its ranges of at most [`PART`] bytes (one whole GET when small).
fn parts(object: &SegmentRef) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
    let count = object.size.div_ceil(PART).max(1);
    (0..count).map(move |i| (i * PART, PART.min(object.size.saturating_sub(i * PART)), i + 1 == count))
}

async fn get_part(
    store: &dyn ObjectStore,
    pool: &PartPool,
    object: &SegmentRef,
    offset: u64,
    len: u64,
) -> Result<Bytes, Error> {
    Ok(if object.size <= PART {
        store.get(&object.key).await?
    } else {
        store.get_range_into(&object.key, offset, len, pool.take()).await?
    })
}

/// The buffers of parts the decoder is done with, handed back for the next ranged GETs. Fresh
/// 1 MiB buffers are above glibc's mmap threshold (which `restore` keeps low so freed memory
/// leaves the process), so each one cost an mmap, a page fault and a zeroed page for every
/// 4 KiB, and a munmap: a fifth of a large snapshot's restore CPU. As many are kept as parts
/// are in flight: with two, a WAL-heavy restore still allocated fresh buffers (a tenth of its
/// CPU in page faults and zeroing); more than that only stayed resident (docs/benchmarks.md).
/// Keeps nothing for a store that does not read into the buffers it is given.
struct PartPool {
    kept: std::sync::Mutex<Vec<BytesMut>>,
    enabled: bool,
}

impl PartPool {
    const KEEP: usize = PARTS_IN_FLIGHT;

    fn for_store(store: &dyn ObjectStore) -> PartPool {
        PartPool { kept: Default::default(), enabled: store.reads_into_buffers() }
    }

    fn take(&self) -> BytesMut {
        self.kept.lock().expect("part pool lock").pop().unwrap_or_default()
    }

    /// Keeps `part`'s buffer if nothing else still refers to it.
    fn give(&self, part: Bytes) {
        if !self.enabled {
            return;
        }
        let Ok(buf) = part.try_into_mut() else { return };
        let mut kept = self.kept.lock().expect("part pool lock");
        if buf.capacity() >= PART as usize && kept.len() < Self::KEEP {
            kept.push(buf);
        }
    }
}

fn decode_error(key: &str, path: &Path) -> impl Fn(lz4::FeedError) -> Error {
    let (key, path) = (key.to_string(), path.to_path_buf());
    move |e| match e {
        lz4::FeedError::Corrupt(source) => Error::CorruptObject { key: key.clone(), source },
        lz4::FeedError::Sink(source) => Error::Io { op: "write", path: path.clone(), source },
    }
}

/// Streams a snapshot into `file`, decoded on a blocking thread in order as its parts arrive,
/// each block written as soon as it is decoded. Returns the file and how many bytes the
/// snapshot holds.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn snapshot_into<W: std::io::Write + Send + 'static>(
    store: &dyn ObjectStore,
    age: Option<&AgeKeys>,
    snapshot: &SegmentRef,
    file: W,
    path: &Path,
    parallelism: usize,
    progress: &dyn Progress,
    split: &Arc<TimeSplit>,
) -> Result<(W, u64), Error> {
    let (parts_tx, mut parts_rx) = mpsc::channel::<Bytes>(1);
    let (key, path) = (snapshot.key.clone(), path.to_path_buf());
    let age = age.cloned();
    let pool = std::sync::Arc::new(PartPool::for_store(store));
    let returned = pool.clone();
    let timing = split.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut last = std::time::Instant::now();
        let mut file = file;
        let mut decoder = lz4::FrameDecoder::new();
        let mut written = 0u64;
        let mut sink = |block: &[u8]| {
            written += block.len() as u64;
            file.write_all(block)
        };
        match &age {
            None => {
                let mut first = true;
                while let Some(part) = timing.recv(&mut parts_rx, &mut last) {
                    if std::mem::take(&mut first) && age::is_sealed(&part) {
                        return Err(Error::Encryption { key, problem: OpenError::NoIdentity });
                    }
                    decoder.feed(&part, &mut sink).map_err(decode_error(&key, &path))?;
                    returned.give(part);
                }
            }
            Some(keys) => {
                let parts = PartsReader::new(std::iter::from_fn(|| timing.recv(&mut parts_rx, &mut last)));
                let plain =
                    keys.opening_reader(parts).map_err(|problem| Error::Encryption { key: key.clone(), problem })?;
                feed_plain(plain, &key, &mut |bytes| {
                    decoder.feed(bytes, &mut sink).map_err(decode_error(&key, &path))
                })?;
            }
        }
        decoder.finish().map_err(|source| Error::CorruptObject { key: key.clone(), source })?;
        Ok::<_, Error>((file, written))
    });
    let mut downloads = stream::iter(parts(snapshot))
        .map(|(offset, len, _)| get_part(store, &pool, snapshot, offset, len))
        .buffered(parallelism.clamp(1, PARTS_IN_FLIGHT));
    while let Some(part) = downloads.next().await {
        let part = part?;
        progress.downloading(part.len() as u64);
        split.report(progress);
        // Closed only when the writer failed: its error says why.
        if parts_tx.send(part).await.is_err() {
            break;
        }
    }
    drop(parts_tx);
    let written = writer.await.expect("snapshot writer panicked")?;
    progress.downloaded(0);
    Ok(written)
}

/// The bytes of an object's parts, in order, as one reader: what age's decryptor reads from.
struct PartsReader<I> {
    parts: I,
    current: Bytes,
}

impl<I: Iterator<Item = Bytes>> PartsReader<I> {
    fn new(parts: I) -> Self {
        PartsReader { parts, current: Bytes::new() }
    }
}

impl<I: Iterator<Item = Bytes>> std::io::Read for PartsReader<I> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.parts.next() {
                Some(part) => self.current = part,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Feeds what `plain` decrypts to `feed`, a chunk at a time; a chunk that fails to decrypt (or
/// a stream cut short) is a corrupt object.
fn feed_plain(
    mut plain: impl std::io::Read,
    key: &str,
    feed: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match plain.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Encryption { key: key.to_string(), problem: OpenError::Corrupt(e.to_string()) })
            }
        };
        feed(&buf[..n])?;
    }
}

/// How WAL indexes are checked beyond their checksum chains.
pub(crate) struct IndexCheck {
    /// The database's page size: an index of another is corrupt.
    pub(crate) page_size: Option<u32>,
    /// Whether every segment's LZ4 content checksum is computed too, not only each index's
    /// last one's ([`Assembly::begin`] says why that is enough): `verify` vouches for every
    /// checksum.
    pub(crate) lz4_checksums: bool,
}

/// One downloaded part of a WAL segment, in plan order.
struct SegmentPart {
    segment: SegmentRef,
    /// The segment's first and last parts.
    first: bool,
    last: bool,
    /// The index's last segment.
    ends_index: bool,
    /// The segment is its index's last in the plan.
    last_of_index: bool,
    body: Bytes,
}

/// Sends the frames of every index of `indexes`, in the order given, to `out` as they arrive
/// and continue their index's checksum chain, then each index's verified end
/// ([`WalEvent`]). `check.page_size` is the database's: an index of another is corrupt. Stops
/// at the first error, which it sends too; stops quietly if `out` is closed.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn fetch_indexes(
    store: &dyn ObjectStore,
    age: Option<&AgeKeys>,
    indexes: Vec<&IndexPlan>,
    check: IndexCheck,
    frames: Arc<FramePool>,
    parallelism: usize,
    progress: &dyn Progress,
    split: &Arc<TimeSplit>,
    out: mpsc::Sender<Result<WalEvent, Error>>,
) {
    let (parts_tx, parts_rx) = mpsc::channel::<Result<SegmentPart, Error>>(1);
    let age = age.cloned();
    let pool = Arc::new(PartPool::for_store(store));
    let returned = pool.clone();
    let timing = split.clone();
    let assembler = tokio::task::spawn_blocking(move || {
        let assembly = Assembly {
            timing,
            last_part: std::time::Instant::now(),
            current: None,
            decoder: lz4::FrameDecoder::new(),
            check,
            batch: frames.take(),
            frames: &frames,
            out: &out,
            closed: false,
        };
        assemble(parts_rx, age.as_ref(), &returned, assembly)
    });
    let all_parts = indexes.iter().flat_map(|plan| {
        let last_segment = plan.segments.len().saturating_sub(1);
        plan.segments.iter().enumerate().flat_map(move |(n, segment)| {
            parts(segment).map(move |(offset, len, last)| (segment, offset, len, last, n == last_segment))
        })
    });
    let mut downloads = stream::iter(all_parts)
        .map(|(segment, offset, len, last, ends_index)| {
            let pool = &pool;
            async move {
                let body = get_part(store, pool, segment, offset, len).await?;
                Ok(SegmentPart {
                    segment: segment.clone(),
                    first: offset == 0,
                    last,
                    ends_index: ends_index && last,
                    last_of_index: ends_index,
                    body,
                })
            }
        })
        .buffered(parallelism.clamp(1, PARTS_IN_FLIGHT));
    while let Some(part) = downloads.next().await {
        let failed = part.is_err();
        if let Ok(part) = &part {
            progress.downloading(part.body.len() as u64);
            split.report(progress);
            if part.last {
                progress.downloaded(0);
            }
        }
        if parts_tx.send(part).await.is_err() || failed {
            break;
        }
    }
    drop(parts_tx);
    let _ = assembler.await;
}

/// The blocking half of [`fetch_indexes`]: decodes parts, follows the current index's checksum
/// chain as the bytes go by, and sends on what continues it.
fn assemble(
    mut parts: mpsc::Receiver<Result<SegmentPart, Error>>,
    age: Option<&AgeKeys>,
    pool: &PartPool,
    mut assembly: Assembly<'_>,
) {
    while let Some(part) = assembly.next_part(&mut parts) {
        let done = match (age, part) {
            (_, Err(e)) => Err(e),
            // An encrypted segment: its later parts are pulled from the channel through the
            // decryptor, and the plaintext decoded as it comes.
            (Some(keys), Ok(part)) if part.first => match open_segment(keys, part, &mut parts, &mut assembly) {
                Some(done) => done,
                None => return,
            },
            (None, Ok(part)) if part.first && age::is_sealed(&part.body) => {
                Err(Error::Encryption { key: part.segment.key.clone(), problem: OpenError::NoIdentity })
            }
            (_, Ok(part)) => (|| {
                if part.first {
                    assembly.begin(&part.segment, part.last_of_index)?;
                }
                assembly.feed(&part.segment, &part.body)?;
                if part.last {
                    assembly.end(&part.segment, part.ends_index)?;
                }
                pool.give(part.body);
                Ok(())
            })(),
        };
        if let Err(e) = done {
            let _ = assembly.out.blocking_send(Err(e));
            return;
        }
        if assembly.closed {
            return;
        }
    }
}

/// The index being assembled, the decoder of its current segment, and the frames not sent yet.
struct Assembly<'a> {
    timing: Arc<TimeSplit>,
    /// When the last part arrived.
    last_part: std::time::Instant,
    current: Option<OpenIndex>,
    decoder: lz4::FrameDecoder,
    check: IndexCheck,
    /// Frames that continue the chain, sent once [`FramePool::BATCH`] bytes are in.
    batch: Vec<u8>,
    frames: &'a FramePool,
    out: &'a mpsc::Sender<Result<WalEvent, Error>>,
    /// `out`'s receiver went away: the restore stopped.
    closed: bool,
}

/// An index some of whose segments are in.
struct OpenIndex {
    len: u64,
    segments: Segments,
    check: ChainCheck,
    /// The segment just decoded, if its length is checked by where the next one starts (in
    /// place of its LZ4 content checksum), and where it started.
    length_unchecked: Option<(String, u64)>,
}

impl Assembly<'_> {
    /// The next downloaded part, the wait for it timed.
    fn next_part<T>(&mut self, parts: &mut mpsc::Receiver<T>) -> Option<T> {
        self.timing.recv(parts, &mut self.last_part)
    }

    /// Starts `segment`, which must begin where the index's bytes so far end.
    ///
    /// The checksum chain covers every byte of a segment, but not how many bytes it decodes
    /// to: a corrupt one could decode short, by whole frames, and still chain. The next
    /// segment's offset pins that length, so only an index's last segment needs its LZ4 content
    /// checksum (unless `check.lz4_checksums` asks for all): hashing every byte took about a
    /// fifth of a WAL-heavy restore's time on two cores (docs/benchmarks.md).
    fn begin(&mut self, segment: &SegmentRef, last_of_index: bool) -> Result<(), Error> {
        let page_size = self.check.page_size;
        let open = self.current.get_or_insert_with(|| OpenIndex {
            len: 0,
            segments: Segments::default(),
            check: ChainCheck::new(page_size),
            length_unchecked: None,
        });
        if segment.offset != open.len {
            return Err(match open.length_unchecked.take() {
                Some((key, start)) => Error::CorruptObject {
                    key,
                    source: walstream_format::Error::Lz4(format!(
                        "decodes to {} bytes of WAL, but the next segment starts {} bytes after it",
                        open.len - start,
                        segment.offset.saturating_sub(start)
                    )),
                },
                None => Error::SegmentGap { key: segment.key.clone(), expected: open.len, found: segment.offset },
            });
        }
        open.segments.push(segment.key.clone(), open.len);
        let check_content = self.check.lz4_checksums || last_of_index;
        open.length_unchecked = (!check_content).then(|| (segment.key.clone(), open.len));
        self.decoder.reset();
        self.decoder.set_content_checked_elsewhere(!check_content);
        Ok(())
    }

    /// Decodes the next LZ4 bytes of the current segment and passes on its frames.
    fn feed(&mut self, segment: &SegmentRef, lz4_bytes: &[u8]) -> Result<(), Error> {
        let Assembly { current, decoder, batch, frames, out, closed, .. } = self;
        let open = current.as_mut().expect("a segment was begun");
        let mut send_frame = |frame: &[u8]| {
            if batch.len() + frame.len() > FramePool::BATCH && !batch.is_empty() {
                let full = std::mem::replace(batch, frames.take());
                *closed |= out.blocking_send(Ok(WalEvent::Frames(full))).is_err();
            }
            batch.extend_from_slice(frame);
        };
        decoder
            .feed(lz4_bytes, &mut |block| {
                open.len += block.len() as u64;
                open.check.feed(block, &mut send_frame);
                Ok(())
            })
            // The sink never fails: only a corrupt frame is an error here.
            .map_err(decode_error(&segment.key, Path::new("")))
    }

    /// Ends the current segment; when it `ends_index`, sends the index's last frames and its
    /// verified end.
    fn end(&mut self, segment: &SegmentRef, ends_index: bool) -> Result<(), Error> {
        self.decoder.finish().map_err(|source| Error::CorruptObject { key: segment.key.clone(), source })?;
        if !ends_index {
            return Ok(());
        }
        let open = self.current.take().expect("an index was started");
        let ended = open.check.verified(open.len, &open.segments)?;
        if !self.batch.is_empty() {
            let full = std::mem::replace(&mut self.batch, self.frames.take());
            self.closed |= self.out.blocking_send(Ok(WalEvent::Frames(full))).is_err();
        }
        self.closed |= self.out.blocking_send(Ok(WalEvent::Ended(ended))).is_err();
        Ok(())
    }
}

/// The encrypted segment whose first part is `first`, decrypted as its parts arrive and fed to
/// `assembly`. `None` when the download stopped (its receiver
/// went away) before the segment was whole.
fn open_segment(
    keys: &AgeKeys,
    first: SegmentPart,
    parts: &mut mpsc::Receiver<Result<SegmentPart, Error>>,
    assembly: &mut Assembly<'_>,
) -> Option<Result<(), Error>> {
    let segment = first.segment.clone();
    if let Err(e) = assembly.begin(&segment, first.last_of_index) {
        return Some(Err(e));
    }
    let (mut last, mut ends_index) = (first.last, first.ends_index);
    let (mut failed, mut stopped) = (None, false);
    let mut head = Some(first.body);
    let (timing, mut last_part) = (assembly.timing.clone(), assembly.last_part);
    let bodies = std::iter::from_fn(|| {
        if let Some(body) = head.take() {
            return Some(body);
        }
        if last || failed.is_some() || stopped {
            return None;
        }
        match timing.recv(parts, &mut last_part) {
            Some(Ok(part)) => {
                (last, ends_index) = (part.last, part.ends_index);
                Some(part.body)
            }
            Some(Err(e)) => {
                failed = Some(e);
                None
            }
            None => {
                stopped = true;
                None
            }
        }
    });
    let opened = keys
        .opening_reader(PartsReader::new(bodies))
        .map_err(|problem| Error::Encryption { key: segment.key.clone(), problem })
        .and_then(|plain| feed_plain(plain, &segment.key, &mut |bytes| assembly.feed(&segment, bytes)));
    assembly.last_part = last_part;
    if let Some(e) = failed {
        return Some(Err(e));
    }
    if stopped {
        return None;
    }
    Some(opened.and_then(|()| assembly.end(&segment, ends_index)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use walstream_format::WAL_HEADER_SIZE;

    /// What `fetch_indexes` makes of one index stored as `segments` (offset, bytes): the bytes
    /// of WAL it passed on, or the first error.
    async fn fetch_one_index(segments: &[(u64, Vec<u8>)], lz4_checksums: bool) -> Result<u64, Error> {
        let dir = tempfile::tempdir().unwrap();
        let store = walstream_store::FileStore::new(dir.path());
        let mut plan = IndexPlan { index: 0, segments: Vec::new() };
        for (offset, body) in segments {
            let key = format!("generations/0000000000000001/wal/00000000_{offset:08x}.wal.lz4");
            store.put(&key, body.clone().into()).await.unwrap();
            plan.segments.push(SegmentRef { key, offset: *offset, size: body.len() as u64 });
        }
        let (sender, mut events) = mpsc::channel(1);
        let frames = Arc::new(FramePool::default());
        let check = IndexCheck { page_size: Some(512), lz4_checksums };
        let split = Arc::new(TimeSplit::default());
        let fetch =
            fetch_indexes(&store, None, vec![&plan], check, frames, 2, &crate::progress::Silent, &split, sender);
        let read = async {
            let mut applied = 0;
            while let Some(event) = events.recv().await {
                match event? {
                    WalEvent::Frames(batch) => applied += batch.len() as u64,
                    WalEvent::Ended(end) => assert_eq!(end.len, applied + WAL_HEADER_SIZE as u64),
                }
            }
            Ok(applied)
        };
        tokio::join!(fetch, read).1
    }

    /// A segment that decodes to fewer whole frames than its successor's offset says still
    /// chains, and its LZ4 frame is valid: the error must name it, not the next one.
    #[tokio::test]
    async fn a_segment_decoding_short_by_whole_frames_is_named_as_corrupt() {
        // Six transactions of one page each (not page 1, whose header must agree with them).
        let frames: Vec<(u32, u32, u8)> = (2..8).map(|pgno| (pgno, pgno, pgno as u8)).collect();
        let wal = crate::test_wal::synthetic_wal(512, 5, &[], &frames);
        let frame = 512 + walstream_format::FRAME_HEADER_SIZE;
        let (cut, short) = (WAL_HEADER_SIZE + 3 * frame, WAL_HEADER_SIZE + 2 * frame);
        let whole = [(0, lz4::compress(&wal[..cut])), (cut as u64, lz4::compress(&wal[cut..]))];
        assert_eq!(fetch_one_index(&whole, false).await.unwrap(), 6 * frame as u64);
        let shortened = [(0, lz4::compress(&wal[..short])), (cut as u64, lz4::compress(&wal[cut..]))];
        for lz4_checksums in [false, true] {
            match fetch_one_index(&shortened, lz4_checksums).await {
                Err(Error::CorruptObject { key, .. }) if !lz4_checksums => assert!(key.ends_with("_00000000.wal.lz4")),
                // With every content checksum checked the short segment is a valid frame, and
                // the gap is reported where it shows.
                Err(Error::SegmentGap { key, .. }) if lz4_checksums => {
                    assert!(key.ends_with(&format!("_{cut:08x}.wal.lz4")))
                }
                other => panic!("lz4_checksums {lz4_checksums}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_part_read_into_a_handed_back_buffer_reuses_its_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = walstream_store::FileStore::new(dir.path());
        let body: Vec<u8> = (0..3 * PART as usize).map(|i| (i * 31 % 251) as u8).collect();
        store.put("generations/a/snapshots/00000000.snapshot.lz4", body.clone().into()).await.unwrap();
        let object = SegmentRef {
            key: "generations/a/snapshots/00000000.snapshot.lz4".into(),
            offset: 0,
            size: body.len() as u64,
        };
        let pool = PartPool::for_store(&store);
        let first = get_part(&store, &pool, &object, 0, PART).await.unwrap();
        let address = first.as_ptr();
        assert!(first[..] == body[..PART as usize]);
        pool.give(first);
        let second = get_part(&store, &pool, &object, PART, PART).await.unwrap();
        assert!(second[..] == body[PART as usize..2 * PART as usize]);
        assert_eq!(second.as_ptr(), address, "the second part must be read into the first one's buffer");
        // A part something else still refers to is not taken back.
        let held = second.clone();
        pool.give(second);
        assert!(pool.kept.lock().unwrap().is_empty());
        drop(held);
    }
}
