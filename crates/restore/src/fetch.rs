//! Downloading a plan's objects in bounded memory: every object comes as parts of at most
//! [`PART`] stored bytes, a few in flight, decoded from LZ4 as they arrive in order. The snapshot
//! is written block by block into the database file; WAL indexes are assembled one at a time,
//! in the order asked for, in memory up to [`SPILL_AT`](crate::index::SPILL_AT) and in an unlinked file beside the
//! output beyond it, so application can start while later indexes are still downloading and no
//! index, however long its life was, has to fit in memory.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc;
use walstream_format::age::{self, AgeKeys, OpenError};
use walstream_format::lz4;
use walstream_store::ObjectStore;

use crate::index::{ChainCheck, FetchedIndex, IndexBytes, VerifiedIndex};
use crate::plan::{IndexPlan, SegmentRef};
use crate::progress::Progress;
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

async fn get_part(store: &dyn ObjectStore, object: &SegmentRef, offset: u64, len: u64) -> Result<Bytes, Error> {
    Ok(if object.size <= PART {
        store.get(&object.key).await?
    } else {
        store.get_range(&object.key, offset, len).await?
    })
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
) -> Result<(W, u64), Error> {
    let (parts_tx, mut parts_rx) = mpsc::channel::<Bytes>(1);
    let (key, path) = (snapshot.key.clone(), path.to_path_buf());
    let age = age.cloned();
    let writer = tokio::task::spawn_blocking(move || {
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
                while let Some(part) = parts_rx.blocking_recv() {
                    if std::mem::take(&mut first) && age::is_sealed(&part) {
                        return Err(Error::Encryption { key, problem: OpenError::NoIdentity });
                    }
                    decoder.feed(&part, &mut sink).map_err(decode_error(&key, &path))?;
                }
            }
            Some(keys) => {
                let parts = PartsReader::new(std::iter::from_fn(|| parts_rx.blocking_recv()));
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
        .map(|(offset, len, _)| get_part(store, snapshot, offset, len))
        .buffered(parallelism.clamp(1, PARTS_IN_FLIGHT));
    while let Some(part) = downloads.next().await {
        let part = part?;
        progress.downloading(part.len() as u64);
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

/// One downloaded part of a WAL segment, in plan order.
struct SegmentPart {
    index: u32,
    segment: SegmentRef,
    /// The segment's first and last parts.
    first: bool,
    last: bool,
    /// The index's last segment.
    ends_index: bool,
    body: Bytes,
}

/// Sends every index of `indexes`, in the order given, to `out` once it is whole and verified.
/// Stops at the first error, which it sends too; stops quietly if `out` is closed. Indexes
/// larger than [`SPILL_AT`](crate::index::SPILL_AT) are kept in unlinked files in `spill_dir`.
pub(crate) async fn fetch_indexes(
    store: &dyn ObjectStore,
    age: Option<&AgeKeys>,
    indexes: Vec<&IndexPlan>,
    spill_dir: PathBuf,
    parallelism: usize,
    progress: &dyn Progress,
    out: mpsc::Sender<Result<VerifiedIndex, Error>>,
) {
    let (parts_tx, parts_rx) = mpsc::channel::<Result<SegmentPart, Error>>(1);
    let age = age.cloned();
    let assembler = tokio::task::spawn_blocking(move || assemble(parts_rx, age.as_ref(), &spill_dir, out));
    let all_parts = indexes.iter().flat_map(|plan| {
        let last_segment = plan.segments.len().saturating_sub(1);
        plan.segments.iter().enumerate().flat_map(move |(n, segment)| {
            parts(segment).map(move |(offset, len, last)| (plan.index, segment, offset, len, last, n == last_segment))
        })
    });
    let mut downloads = stream::iter(all_parts)
        .map(|(index, segment, offset, len, last, ends_index)| async move {
            let body = get_part(store, segment, offset, len).await?;
            Ok(SegmentPart {
                index,
                segment: segment.clone(),
                first: offset == 0,
                last,
                ends_index: ends_index && last,
                body,
            })
        })
        .buffered(parallelism.clamp(1, PARTS_IN_FLIGHT));
    while let Some(part) = downloads.next().await {
        let failed = part.is_err();
        if let Ok(part) = &part {
            progress.downloading(part.body.len() as u64);
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

/// The blocking half of [`fetch_indexes`]: decodes parts into the current index, following its
/// checksum chain as the bytes go by, and hands it on once its last segment is in.
fn assemble(
    mut parts: mpsc::Receiver<Result<SegmentPart, Error>>,
    age: Option<&AgeKeys>,
    spill_dir: &Path,
    out: mpsc::Sender<Result<VerifiedIndex, Error>>,
) {
    let mut current: Option<(FetchedIndex, ChainCheck)> = None;
    let mut decoder = lz4::FrameDecoder::new();
    while let Some(part) = parts.blocking_recv() {
        // An encrypted segment is read whole here, its later parts pulled from the channel
        // through the decryptor, and handed on as one plaintext part.
        let part = match (age, part) {
            (Some(keys), Ok(part)) if part.first => match open_segment(keys, part, &mut parts) {
                Some(part) => part,
                None => return,
            },
            (None, Ok(part)) if part.first && age::is_sealed(&part.body) => {
                Err(Error::Encryption { key: part.segment.key.clone(), problem: OpenError::NoIdentity })
            }
            (_, part) => part,
        };
        let step = part.and_then(|part| {
            let (fetched, check) = current.get_or_insert_with(|| {
                (
                    FetchedIndex { index: part.index, wal: IndexBytes::default(), segments: Vec::new() },
                    ChainCheck::default(),
                )
            });
            if part.first {
                let expected = fetched.wal.len();
                if part.segment.offset != expected {
                    return Err(Error::SegmentGap {
                        key: part.segment.key.clone(),
                        expected,
                        found: part.segment.offset,
                    });
                }
                fetched.segments.push((part.segment.key.clone(), expected));
                decoder = lz4::FrameDecoder::new();
            }
            let wal = &mut fetched.wal;
            decoder
                .feed(&part.body, &mut |block| {
                    check.feed(block);
                    wal.append(block, spill_dir)
                })
                .map_err(decode_error(&part.segment.key, spill_dir))?;
            if part.last {
                decoder.finish().map_err(|source| Error::CorruptObject { key: part.segment.key.clone(), source })?;
            }
            Ok(part.ends_index)
        });
        let ready = match step {
            Ok(false) => continue,
            Ok(true) => {
                let (fetched, check) = current.take().expect("an index was started");
                check.verified(fetched)
            }
            Err(e) => Err(e),
        };
        let failed = ready.is_err();
        if out.blocking_send(ready).is_err() || failed {
            return;
        }
    }
}

/// The whole of the encrypted segment whose first part is `first`, decrypted and LZ4-decoded
/// back into one part (plaintext LZ4, so the caller decodes it as usual: the decoder sees the
/// same bytes as for a plain replica). `None` when the download stopped (its receiver went away)
/// before the segment was whole.
fn open_segment(
    keys: &AgeKeys,
    first: SegmentPart,
    parts: &mut mpsc::Receiver<Result<SegmentPart, Error>>,
) -> Option<Result<SegmentPart, Error>> {
    let key = first.segment.key.clone();
    let (mut last, mut ends_index) = (first.last, first.ends_index);
    let (mut failed, mut stopped) = (None, false);
    let mut head = Some(first.body.clone());
    let bodies = std::iter::from_fn(|| {
        if let Some(body) = head.take() {
            return Some(body);
        }
        if last || failed.is_some() || stopped {
            return None;
        }
        match parts.blocking_recv() {
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
    let mut framed = Vec::new();
    let opened = keys
        .opening_reader(PartsReader::new(bodies))
        .map_err(|problem| Error::Encryption { key: key.clone(), problem })
        .and_then(|plain| {
            feed_plain(plain, &key, &mut |bytes| {
                framed.extend_from_slice(bytes);
                Ok(())
            })
        });
    if let Some(e) = failed {
        return Some(Err(e));
    }
    if stopped {
        return None;
    }
    Some(opened.map(|()| SegmentPart { first: true, last: true, ends_index, body: Bytes::from(framed), ..first }))
}
