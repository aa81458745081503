//! Downloading a plan's objects in bounded memory: every object comes as parts of at most
//! [`PART`] stored bytes, a few in flight, decoded from LZ4 as they arrive in order. The snapshot
//! is written block by block into the database file; WAL indexes are assembled one at a time,
//! in the order asked for, in memory up to [`SPILL_AT`] and in an unlinked file beside the
//! output beyond it, so application can start while later indexes are still downloading and no
//! index, however long its life was, has to fit in memory.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc;
use walstream_format::lz4;
use walstream_store::ObjectStore;

use crate::apply::{ChainCheck, VerifiedIndex};
use crate::plan::{IndexPlan, SegmentRef};
use crate::progress::Progress;
use crate::Error;

/// Stored bytes asked for per GET (ranged for larger objects), and how many GETs are in
/// flight (the snapshot's, then the WAL's): enough to keep a link busy, while what a restore
/// holds stays a few MiB whatever the sizes (in flight, one queued, a decoder's block).
const PART: u64 = 1 << 20;
const PARTS_IN_FLIGHT: usize = 4;

/// How much of one index is kept in memory before the rest goes to a temporary file.
pub(crate) const SPILL_AT: usize = 1 << 20;

/// One index's WAL bytes, its segments concatenated.
pub(crate) struct FetchedIndex {
    pub(crate) index: u32,
    pub(crate) wal: IndexBytes,
    /// Each segment's key and where it starts in `wal`, to name the culprit of a bad frame.
    pub(crate) segments: Vec<(String, u64)>,
}

impl FetchedIndex {
    /// The segment holding byte `offset`.
    pub(crate) fn segment_at(&self, offset: u64) -> &str {
        self.segments.iter().rev().find(|(_, start)| *start <= offset).map_or("", |(key, _)| key.as_str())
    }
}

/// Bytes appended in order and read back at any offset: in memory until [`SPILL_AT`], then in
/// an unlinked temporary file (nothing is left behind, whatever happens to the process).
#[derive(Default)]
pub(crate) struct IndexBytes {
    memory: Vec<u8>,
    spill: Option<File>,
    len: u64,
}

impl From<Vec<u8>> for IndexBytes {
    fn from(memory: Vec<u8>) -> IndexBytes {
        IndexBytes { len: memory.len() as u64, memory, spill: None }
    }
}

impl IndexBytes {
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn append(&mut self, bytes: &[u8], spill_dir: &Path) -> std::io::Result<()> {
        if self.spill.is_none() && self.memory.len() + bytes.len() > SPILL_AT {
            let file = tempfile::tempfile_in(spill_dir)?;
            file.write_all_at(&self.memory, 0)?;
            self.memory = Vec::new();
            self.spill = Some(file);
        }
        match &self.spill {
            Some(file) => file.write_all_at(bytes, self.len)?,
            None => self.memory.extend_from_slice(bytes),
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Fills `buf` from `offset`, which with `buf` must lie within the bytes appended.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match &self.spill {
            Some(file) => file.read_exact_at(buf, offset),
            None => {
                let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
                buf.copy_from_slice(
                    self.memory.get(start..start + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?,
                );
                Ok(())
            }
        }
    }
}

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
pub(crate) async fn snapshot_into<W: std::io::Write + Send + 'static>(
    store: &dyn ObjectStore,
    snapshot: &SegmentRef,
    file: W,
    path: &Path,
    parallelism: usize,
    progress: &dyn Progress,
) -> Result<(W, u64), Error> {
    let (parts_tx, mut parts_rx) = mpsc::channel::<Bytes>(1);
    let (key, path) = (snapshot.key.clone(), path.to_path_buf());
    let writer = tokio::task::spawn_blocking(move || {
        let mut file = file;
        let mut decoder = lz4::FrameDecoder::new();
        let mut written = 0u64;
        while let Some(part) = parts_rx.blocking_recv() {
            decoder
                .feed(&part, &mut |block| {
                    written += block.len() as u64;
                    file.write_all(block)
                })
                .map_err(decode_error(&key, &path))?;
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
/// larger than [`SPILL_AT`] are kept in unlinked files in `spill_dir`.
pub(crate) async fn fetch_indexes(
    store: &dyn ObjectStore,
    indexes: Vec<&IndexPlan>,
    spill_dir: PathBuf,
    parallelism: usize,
    progress: &dyn Progress,
    out: mpsc::Sender<Result<VerifiedIndex, Error>>,
) {
    let (parts_tx, parts_rx) = mpsc::channel::<Result<SegmentPart, Error>>(1);
    let assembler = tokio::task::spawn_blocking(move || assemble(parts_rx, &spill_dir, out));
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
    spill_dir: &Path,
    out: mpsc::Sender<Result<VerifiedIndex, Error>>,
) {
    let mut current: Option<(FetchedIndex, ChainCheck)> = None;
    let mut decoder = lz4::FrameDecoder::new();
    while let Some(part) = parts.blocking_recv() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_past_the_spill_size_moves_to_a_file_and_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 * SPILL_AT + 777) as u32).map(|i| (i % 251) as u8 ^ (i >> 11) as u8).collect();
        let mut bytes = IndexBytes::default();
        for piece in data.chunks(100_000) {
            bytes.append(piece, dir.path()).unwrap();
        }
        assert!(bytes.spill.is_some() && bytes.memory.is_empty(), "past SPILL_AT nothing stays in memory");
        assert_eq!(bytes.len(), data.len() as u64);
        let mut back = vec![0u8; data.len()];
        bytes.read_at(&mut back, 0).unwrap();
        assert!(back == data);
        let mut tail = [0u8; 10];
        bytes.read_at(&mut tail, data.len() as u64 - 10).unwrap();
        assert_eq!(tail, data[data.len() - 10..]);
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "the spill file is unlinked: nothing to leave behind"
        );
    }
}
