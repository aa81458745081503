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
