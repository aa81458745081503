//! Choosing what to restore from a replica listing (spec §6.1–6.3).

use std::collections::BTreeMap;
use std::time::SystemTime;

use walstream_format::name::{self, ObjectKind};
use walstream_format::GenerationId;
use walstream_store::{ObjectMeta, ObjectStore};

use crate::Error;

/// One object to download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentRef {
    /// The object's key.
    pub key: String,
    /// Where its bytes start within the index (0 for a snapshot).
    pub offset: u64,
    /// Its stored, compressed size.
    pub size: u64,
}

/// The segments of one WAL index, in offset order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexPlan {
    /// The index.
    pub index: u32,
    /// Its segments, the first at offset 0.
    pub segments: Vec<SegmentRef>,
}

/// What a restore will apply: a snapshot, then every index from the snapshot's on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePlan {
    /// The generation chosen.
    pub generation: GenerationId,
    /// Its snapshot's index.
    pub snapshot_index: u32,
    /// The snapshot object.
    pub snapshot: SegmentRef,
    /// The WAL indexes to replay, ascending and contiguous.
    pub indexes: Vec<IndexPlan>,
}

#[derive(Default)]
struct GenerationListing {
    snapshots: Vec<(u32, ObjectMeta)>,
    segments: Vec<(u32, u64, ObjectMeta)>,
    updated: Option<SystemTime>,
}

/// Lists the replica and picks, as Litestream does, the generation whose newest object is the
/// newest, its most recent snapshot, and every WAL segment at or after the snapshot's index.
pub async fn plan(store: &dyn ObjectStore) -> Result<RestorePlan, Error> {
    let mut generations: BTreeMap<GenerationId, GenerationListing> = BTreeMap::new();
    for object in store.list(&name::generations_prefix()).await? {
        let Some(parsed) = name::parse_key(&object.key) else { continue };
        let listing = generations.entry(parsed.generation).or_default();
        listing.updated = listing.updated.max(Some(object.created));
        match parsed.kind {
            ObjectKind::Snapshot { index } => listing.snapshots.push((index, object)),
            ObjectKind::Segment { index, offset } => listing.segments.push((index, offset, object)),
        }
    }
    // Strictly greater wins, so on a tie the first generation listed is kept, as in Litestream.
    let mut chosen: Option<(GenerationId, GenerationListing)> = None;
    for (generation, listing) in generations {
        if listing.snapshots.is_empty() {
            continue;
        }
        if chosen.as_ref().is_none_or(|(_, best)| listing.updated > best.updated) {
            chosen = Some((generation, listing));
        }
    }
    let (generation, listing) = chosen.ok_or(Error::NoBackups)?;
    let (snapshot_index, snapshot) = listing
        .snapshots
        .into_iter()
        .max_by_key(|(index, meta)| (meta.created, *index))
        .expect("generations without snapshots were skipped");

    let mut by_index: BTreeMap<u32, Vec<SegmentRef>> = BTreeMap::new();
    for (index, offset, meta) in listing.segments {
        if index >= snapshot_index {
            by_index.entry(index).or_default().push(SegmentRef { key: meta.key, offset, size: meta.size });
        }
    }
    let mut indexes = Vec::with_capacity(by_index.len());
    if let Some(&max_index) = by_index.keys().next_back() {
        for index in snapshot_index..=max_index {
            let mut segments = by_index.remove(&index).ok_or(Error::MissingIndex { generation, index })?;
            segments.sort_by_key(|s| s.offset);
            if segments[0].offset != 0 {
                return Err(Error::MissingInitialSegment { generation, index, offset: segments[0].offset });
            }
            indexes.push(IndexPlan { index, segments });
        }
    }
    Ok(RestorePlan { generation, snapshot_index, snapshot: SegmentRef { key: snapshot.key, offset: 0, size: snapshot.size }, indexes })
}
