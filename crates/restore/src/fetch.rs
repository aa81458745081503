//! Downloading a plan's WAL: many objects in flight at once, delivered one whole index at a
//! time in the order asked for, so application can start while later indexes are still downloading.

use futures_util::stream::{self, StreamExt};
use tokio::sync::mpsc;
use walstream_format::lz4;
use walstream_store::ObjectStore;

use crate::apply::{verify_index, VerifiedIndex};
use crate::plan::{IndexPlan, SegmentRef};
use crate::progress::Progress;
use crate::Error;

/// One index's WAL bytes, its segments concatenated.
pub(crate) struct FetchedIndex {
    pub(crate) index: u32,
    pub(crate) wal: Vec<u8>,
    /// Each segment's key and where it starts in `wal`, to name the culprit of a bad frame.
    pub(crate) segments: Vec<(String, u64)>,
}

impl FetchedIndex {
    /// The segment holding byte `offset`.
    pub(crate) fn segment_at(&self, offset: u64) -> &str {
        self.segments.iter().rev().find(|(_, start)| *start <= offset).map_or("", |(key, _)| key.as_str())
    }
}

/// Downloads one object and decodes its LZ4 frame off the async threads.
pub(crate) async fn fetch_object(store: &dyn ObjectStore, key: &str, progress: &dyn Progress) -> Result<Vec<u8>, Error> {
    let body = store.get(key).await?;
    progress.downloaded(body.len() as u64);
    let owned_key = key.to_string();
    tokio::task::spawn_blocking(move || lz4::decompress(&body).map_err(|source| Error::CorruptObject { key: owned_key, source })).await.expect("lz4 task panicked")
}

/// Bytes asked for per ranged GET of a snapshot, and how many such GETs are in flight: enough
/// to keep a link busy, while what a restore holds stays a few MiB whatever the snapshot's size
/// (in flight, one queued, and the decoder's block).
const SNAPSHOT_RANGE: u64 = 1 << 20;
const SNAPSHOT_RANGES_IN_FLIGHT: usize = 4;

/// Streams a snapshot into `file`: ranged GETs, several in flight, decoded from LZ4 on a
/// blocking thread in order as they arrive, each block written as soon as it is decoded.
/// Returns the file and how many bytes the snapshot holds.
pub(crate) async fn snapshot_into(store: &dyn ObjectStore, snapshot: &SegmentRef, file: std::fs::File, path: &std::path::Path, parallelism: usize, progress: &dyn Progress) -> Result<(std::fs::File, u64), Error> {
    let (parts_tx, mut parts_rx) = mpsc::channel::<bytes::Bytes>(1);
    let (key, path) = (snapshot.key.clone(), path.to_path_buf());
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut file = file;
        let mut decoder = lz4::FrameDecoder::new();
        let mut written = 0u64;
        while let Some(part) = parts_rx.blocking_recv() {
            decoder
                .feed(&part, &mut |block| {
                    written += block.len() as u64;
                    file.write_all(block)
                })
                .map_err(|e| match e {
                    lz4::FeedError::Corrupt(source) => Error::CorruptObject { key: key.clone(), source },
                    lz4::FeedError::Sink(source) => Error::Io { op: "write", path: path.clone(), source },
                })?;
        }
        decoder.finish().map_err(|source| Error::CorruptObject { key: key.clone(), source })?;
        Ok::<_, Error>((file, written))
    });
    let ranges = (0..snapshot.size.div_ceil(SNAPSHOT_RANGE)).map(|i| (i * SNAPSHOT_RANGE, SNAPSHOT_RANGE.min(snapshot.size - i * SNAPSHOT_RANGE)));
    let mut parts = stream::iter(ranges).map(|(offset, len)| store.get_range(&snapshot.key, offset, len)).buffered(parallelism.clamp(1, SNAPSHOT_RANGES_IN_FLIGHT));
    while let Some(part) = parts.next().await {
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

/// An index being verified on a blocking thread.
pub(crate) type Verifying = tokio::task::JoinHandle<Result<VerifiedIndex, Error>>;

/// Sends every index of `indexes`, in the order given, to `out` as it is verified, keeping up to
/// `parallelism` downloads in flight. Stops at the first error, which it sends too; stops
/// quietly if `out` is closed.
pub(crate) async fn fetch_indexes(store: &dyn ObjectStore, indexes: Vec<&IndexPlan>, parallelism: usize, progress: &dyn Progress, out: mpsc::Sender<Verifying>) {
    let segments = indexes.iter().flat_map(|plan| plan.segments.iter().map(move |segment| (plan.index, segment)));
    let mut downloads = stream::iter(segments).map(|(index, segment): (u32, &SegmentRef)| async move { (index, segment, fetch_object(store, &segment.key, progress).await) }).buffered(parallelism.max(1));
    let mut current: Option<FetchedIndex> = None;
    let mut remaining = indexes.iter().map(|plan| plan.segments.len());
    let mut left_in_index = 0;
    while let Some((index, segment, body)) = downloads.next().await {
        let step = body.and_then(|body| {
            if left_in_index == 0 {
                left_in_index = remaining.next().unwrap_or(0);
                current = Some(FetchedIndex { index, wal: Vec::new(), segments: Vec::new() });
            }
            let fetched = current.as_mut().expect("started above");
            let expected = fetched.wal.len() as u64;
            if segment.offset != expected {
                return Err(Error::SegmentGap { key: segment.key.clone(), expected, found: segment.offset });
            }
            fetched.segments.push((segment.key.clone(), expected));
            fetched.wal.extend_from_slice(&body);
            left_in_index -= 1;
            Ok(())
        });
        let failed = step.is_err();
        let ready = match step {
            Err(e) => Some(tokio::task::spawn(std::future::ready(Err(e)))),
            Ok(()) if left_in_index == 0 => current.take().map(|index| tokio::task::spawn_blocking(move || verify_index(index))),
            Ok(()) => None,
        };
        if let Some(item) = ready {
            if out.send(item).await.is_err() || failed {
                return;
            }
        }
    }
}
