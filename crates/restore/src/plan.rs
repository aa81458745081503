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

impl RestorePlan {
    /// How many objects the plan reads (the snapshot and every segment), and their stored
    /// (compressed) bytes: what a restore downloads.
    pub fn stored(&self) -> (u64, u64) {
        let segments = self.indexes.iter().flat_map(|i| &i.segments);
        (1 + segments.clone().count() as u64, self.snapshot.size + segments.map(|s| s.size).sum::<u64>())
    }
}

/// Which state to restore. The default is the latest state of the latest generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// Restore from this generation only.
    pub generation: Option<GenerationId>,
    /// Replay WAL up to and including this index (which must exist).
    pub index: Option<u32>,
    /// Restore the database as it was at this moment.
    pub timestamp: Option<SystemTime>,
}

/// Everything the replica holds, grouped by generation: what `plan` and the listing commands
/// read.
#[derive(Clone, Debug, Default)]
pub struct ReplicaListing {
    /// Generations in name order.
    pub generations: BTreeMap<GenerationId, GenerationListing>,
}

/// One generation's objects.
#[derive(Clone, Debug, Default)]
pub struct GenerationListing {
    /// Snapshots, by (index, object), in listing order.
    pub snapshots: Vec<(u32, ObjectMeta)>,
    /// WAL segments, by (index, offset, object), in (index, offset) order.
    pub segments: Vec<(u32, u64, ObjectMeta)>,
}

impl GenerationListing {
    /// The earliest creation time of any of its objects.
    pub fn created(&self) -> Option<SystemTime> {
        self.objects().map(|o| o.created).min()
    }
    /// The latest creation time of any of its objects.
    pub fn updated(&self) -> Option<SystemTime> {
        self.objects().map(|o| o.created).max()
    }
    /// When its first snapshot was created: the earliest moment it can restore.
    pub fn first_snapshot(&self) -> Option<SystemTime> {
        self.snapshots.iter().map(|(_, o)| o.created).min()
    }
    fn objects(&self) -> impl Iterator<Item = &ObjectMeta> {
        self.snapshots.iter().map(|(_, o)| o).chain(self.segments.iter().map(|(_, _, o)| o))
    }
}

/// Lists every generation of the replica.
pub async fn list_replica(store: &dyn ObjectStore) -> Result<ReplicaListing, Error> {
    let mut listing = ReplicaListing::default();
    for object in store.list(&name::generations_prefix()).await? {
        let Some(parsed) = name::parse_key(&object.key) else { continue };
        let generation = listing.generations.entry(parsed.generation).or_default();
        match parsed.kind {
            ObjectKind::Snapshot { index } => generation.snapshots.push((index, object)),
            ObjectKind::Segment { index, offset } => generation.segments.push((index, offset, object)),
        }
    }
    for generation in listing.generations.values_mut() {
        generation.segments.sort_by_key(|(index, offset, _)| (*index, *offset));
    }
    Ok(listing)
}

/// Lists the replica and chooses what to restore for `target` (spec §6.1–6.3, with the fixes
/// below).
pub async fn plan(store: &dyn ObjectStore, target: &Target) -> Result<RestorePlan, Error> {
    plan_from(list_replica(store).await?, target)
}

/// Chooses from a listing:
///
/// - the generation: `target.generation`; else, with a timestamp, the generation current at
///   that moment (the one whose first snapshot is the latest at or before it), so a moment after
///   the last write restores the latest state (Litestream fails there, #564); else the generation
///   whose newest object is the newest, as Litestream does;
/// - the snapshot: the latest (by creation time) at or before the timestamp, or the highest index
///   at or below `target.index`;
/// - the WAL: every index from the snapshot's on, up to `target.index`, cut at the first segment
///   created after the timestamp.
pub fn plan_from(listing: ReplicaListing, target: &Target) -> Result<RestorePlan, Error> {
    if target.index.is_some() && target.timestamp.is_some() {
        return Err(Error::IndexAndTimestamp);
    }
    let mut generations = listing.generations;
    let (generation, listing) = match (target.generation, target.timestamp) {
        (Some(generation), _) => {
            let listing = generations
                .remove(&generation)
                .filter(|l| !l.snapshots.is_empty())
                .ok_or(Error::GenerationNotFound { generation })?;
            (generation, listing)
        }
        (None, Some(at)) => {
            let earliest =
                generations.values().filter_map(GenerationListing::first_snapshot).min().ok_or(Error::NoBackups)?;
            // Strictly greater wins, so on a tie the first generation listed is kept.
            let mut chosen: Option<(GenerationId, SystemTime)> = None;
            for (id, g) in &generations {
                if let Some(first) = g.first_snapshot().filter(|first| *first <= at) {
                    // Ids ascend: on a tie (S3's whole seconds) the later, newer id wins.
                    if chosen.is_none_or(|(_, best)| first >= best) {
                        chosen = Some((*id, first));
                    }
                }
            }
            let (id, _) = chosen.ok_or(Error::BeforeFirstSnapshot { timestamp: at, earliest })?;
            (id, generations.remove(&id).expect("chosen from the map"))
        }
        (None, None) => {
            let mut chosen: Option<(GenerationId, Option<SystemTime>)> = None;
            for (id, g) in &generations {
                // Ids ascend: on a tie (S3's whole seconds) the later one wins, which for
                // walstream's time-ordered ids is the newer generation.
                if !g.snapshots.is_empty() && chosen.is_none_or(|(_, best)| g.updated() >= best) {
                    chosen = Some((*id, g.updated()));
                }
            }
            let (id, _) = chosen.ok_or(Error::NoBackups)?;
            (id, generations.remove(&id).expect("chosen from the map"))
        }
    };

    if let Some(index) = target.index {
        let exists =
            listing.snapshots.iter().any(|(i, _)| *i == index) || listing.segments.iter().any(|(i, _, _)| *i == index);
        if !exists {
            return Err(Error::IndexNotFound { generation, index });
        }
    }
    let at = target.timestamp;
    let snapshot = match target.index {
        Some(max) => listing.snapshots.iter().filter(|(i, _)| *i <= max).max_by_key(|(i, _)| *i),
        None => listing
            .snapshots
            .iter()
            .filter(|(_, o)| at.is_none_or(|at| o.created <= at))
            .max_by_key(|(index, o)| (o.created, *index)),
    };
    let Some((snapshot_index, snapshot)) = snapshot.cloned() else {
        let earliest = listing.first_snapshot().expect("generations without snapshots were not chosen");
        return Err(Error::BeforeFirstSnapshot { timestamp: at.unwrap_or(earliest), earliest });
    };

    let mut by_index: BTreeMap<u32, Vec<SegmentRef>> = BTreeMap::new();
    for (index, offset, meta) in listing.segments {
        if at.is_some_and(|at| meta.created > at) || target.index.is_some_and(|max| index > max) {
            // Segments are in (index, offset) order, and times grow with it: nothing after this
            // one belongs to the target.
            break;
        }
        if index >= snapshot_index {
            by_index.entry(index).or_default().push(SegmentRef { key: meta.key, offset, size: meta.size });
        }
    }
    let mut indexes = Vec::with_capacity(by_index.len());
    if let Some(&max_index) = by_index.keys().next_back() {
        for index in snapshot_index..=max_index {
            let segments = by_index.remove(&index).ok_or(Error::MissingIndex { generation, index })?;
            if segments[0].offset != 0 {
                return Err(Error::MissingInitialSegment { generation, index, offset: segments[0].offset });
            }
            indexes.push(IndexPlan { index, segments });
        }
    }
    Ok(RestorePlan {
        generation,
        snapshot_index,
        snapshot: SegmentRef { key: snapshot.key, offset: 0, size: snapshot.size },
        indexes,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const A: &str = "00000000000000aa";
    const B: &str = "00000000000000bb";

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + seconds)
    }

    /// Generation A: snapshot at t=10, index 0 segments at 11, 12, index 1 at 13, a second
    /// snapshot (index 2) at 20, index 2 at 21. Generation B: snapshot at 30, index 0 at 31.
    fn listing() -> ReplicaListing {
        let mut listing = ReplicaListing::default();
        let object = |key: String, t: u64| ObjectMeta { key, size: 1, created: at(t) };
        let (a, b): (GenerationId, GenerationId) = (A.parse().unwrap(), B.parse().unwrap());
        listing.generations.insert(
            a,
            GenerationListing {
                snapshots: vec![(0, object(name::snapshot_key(&a, 0), 10)), (2, object(name::snapshot_key(&a, 2), 20))],
                segments: [(0, 0, 11), (0, 100, 12), (1, 0, 13), (2, 0, 21)]
                    .into_iter()
                    .map(|(i, o, t)| (i, o, object(name::segment_key(&a, i, o), t)))
                    .collect(),
            },
        );
        listing.generations.insert(
            b,
            GenerationListing {
                snapshots: vec![(0, object(name::snapshot_key(&b, 0), 30))],
                segments: vec![(0, 0, object(name::segment_key(&b, 0, 0), 31))],
            },
        );
        listing
    }

    /// (generation, snapshot index, [(index, [segment offsets])]).
    type Summary = (String, u32, Vec<(u32, Vec<u64>)>);

    fn summary(plan: &RestorePlan) -> Summary {
        (
            plan.generation.to_string(),
            plan.snapshot_index,
            plan.indexes.iter().map(|i| (i.index, i.segments.iter().map(|s| s.offset).collect())).collect(),
        )
    }

    fn plan_at(target: Target) -> Result<Summary, Error> {
        plan_from(listing(), &target).map(|p| summary(&p))
    }

    /// S3 lists creation times in whole seconds, so a generation started within a second of
    /// the last write to the one before ties with it; walstream's ids ascend with time, and the
    /// newer (larger) id wins the tie.
    #[test]
    fn a_tie_in_time_goes_to_the_newer_generation_id() {
        let mut listing = ReplicaListing::default();
        let (older, newer) = (GenerationId::time_ordered(), GenerationId::time_ordered());
        // Inserted newer first, so map order, not insertion, decides.
        for id in [newer, older] {
            let object = |key: String| ObjectMeta { key, size: 1, created: at(5) };
            let generation = GenerationListing {
                snapshots: vec![(0, object(name::snapshot_key(&id, 0)))],
                segments: vec![(0, 0, object(name::segment_key(&id, 0, 0)))],
            };
            listing.generations.insert(id, generation);
        }
        let plan = plan_from(listing.clone(), &Target::default()).unwrap();
        assert_eq!(plan.generation, newer);
        let plan = plan_from(listing, &Target { timestamp: Some(at(5)), ..Target::default() }).unwrap();
        assert_eq!(plan.generation, newer);
    }

    #[test]
    fn latest_state_of_the_latest_generation_by_default() {
        assert_eq!(plan_at(Target::default()).unwrap(), (B.into(), 0, vec![(0, vec![0])]));
    }

    #[test]
    fn timestamps_pick_the_generation_snapshot_and_segments_current_then() {
        let t = |s| Target { timestamp: Some(at(s)), ..Target::default() };
        assert_eq!(plan_at(t(10)).unwrap(), (A.into(), 0, vec![]), "the snapshot alone");
        assert_eq!(plan_at(t(11)).unwrap(), (A.into(), 0, vec![(0, vec![0])]));
        assert_eq!(plan_at(t(12)).unwrap(), (A.into(), 0, vec![(0, vec![0, 100])]));
        assert_eq!(plan_at(t(15)).unwrap(), (A.into(), 0, vec![(0, vec![0, 100]), (1, vec![0])]));
        assert_eq!(plan_at(t(20)).unwrap(), (A.into(), 2, vec![]), "the later snapshot");
        assert_eq!(
            plan_at(t(25)).unwrap(),
            (A.into(), 2, vec![(2, vec![0])]),
            "between two generations: the earlier one's end"
        );
        assert_eq!(plan_at(t(30)).unwrap(), (B.into(), 0, vec![]));
        assert_eq!(
            plan_at(t(10_000)).unwrap(),
            (B.into(), 0, vec![(0, vec![0])]),
            "after the last write: the latest state"
        );
        match plan_at(t(5)) {
            Err(Error::BeforeFirstSnapshot { earliest, .. }) => assert_eq!(earliest, at(10)),
            other => panic!("expected BeforeFirstSnapshot, got {other:?}"),
        }
    }

    #[test]
    fn generation_and_index_narrow_the_plan() {
        let a: GenerationId = A.parse().unwrap();
        let target = |index| Target { generation: Some(a), index, timestamp: None };
        assert_eq!(plan_at(target(None)).unwrap(), (A.into(), 2, vec![(2, vec![0])]));
        assert_eq!(plan_at(target(Some(0))).unwrap(), (A.into(), 0, vec![(0, vec![0, 100])]));
        assert_eq!(plan_at(target(Some(1))).unwrap(), (A.into(), 0, vec![(0, vec![0, 100]), (1, vec![0])]));
        assert!(matches!(plan_at(target(Some(7))), Err(Error::IndexNotFound { index: 7, .. })));
        let missing: GenerationId = "0000000000000001".parse().unwrap();
        assert!(matches!(
            plan_at(Target { generation: Some(missing), ..Target::default() }),
            Err(Error::GenerationNotFound { .. })
        ));
        assert!(matches!(
            plan_at(Target { index: Some(0), timestamp: Some(at(12)), ..Target::default() }),
            Err(Error::IndexAndTimestamp)
        ));
        assert!(matches!(plan_from(ReplicaListing::default(), &Target::default()), Err(Error::NoBackups)));
    }

    #[test]
    fn holes_in_the_wal_are_errors_naming_where() {
        let a: GenerationId = A.parse().unwrap();
        let only_a = |edit: &dyn Fn(&mut GenerationListing)| {
            let mut listing = listing();
            listing.generations.retain(|id, _| *id == a);
            edit(listing.generations.get_mut(&a).unwrap());
            plan_from(listing, &Target { generation: Some(a), index: Some(1), timestamp: None })
        };
        // Index 0 without its offset-0 segment.
        match only_a(&|g| g.segments.retain(|(i, o, _)| !(*i == 0 && *o == 0))) {
            Err(e @ Error::MissingInitialSegment { index: 0, offset: 100, .. }) => {
                assert!(e.to_string().contains("generations/00000000000000aa/wal/00000000_00000000.wal.lz4"), "{e}")
            }
            other => panic!("expected a missing initial segment, got {other:?}"),
        }
        // Index 0 gone entirely while index 1 remains.
        match only_a(&|g| g.segments.retain(|(i, _, _)| *i != 0)) {
            Err(e @ Error::MissingIndex { index: 0, .. }) => {
                assert!(e.to_string().contains("generations/00000000000000aa/wal/00000000_00000000.wal.lz4"), "{e}")
            }
            other => panic!("expected a missing index, got {other:?}"),
        }
    }
}
