//! Per-replica upkeep: periodic snapshots and retention (Litestream's `snapshot-interval`,
//! `retention` and `retention-check-interval`, spec §5).
//!
//! Retention only ever deletes what a restore of the current generation cannot need: snapshots
//! and WAL below the oldest retained snapshot of a generation, and whole generations with no
//! retained snapshot, never the current one. When nothing is retained it asks the capturer for
//! a snapshot and deletes nothing until that snapshot is on the replica.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};
use walstream_format::name::{self, ObjectKind};
use walstream_format::GenerationId;
use walstream_store::ObjectMeta;

use crate::protocol::{ShadowState, Wake};
use crate::replica::Replica;
use crate::Error;

/// How long a requested snapshot may take before it is asked for again.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(60);

/// What one retention check decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct RetentionPlan {
    /// Keys to delete, snapshots last within each generation so an interrupted run never leaves
    /// WAL without the snapshot it starts from.
    pub(crate) delete: Vec<String>,
    /// The current generation has no retained snapshot on this replica.
    pub(crate) need_snapshot: bool,
}

#[derive(Default)]
struct Listing<'a> {
    snapshots: Vec<(u32, &'a ObjectMeta)>,
    segments: Vec<(u32, &'a ObjectMeta)>,
}

/// Decides what to delete from a listing of `generations/`.
pub(crate) fn plan(objects: &[ObjectMeta], current: GenerationId, cutoff: SystemTime) -> RetentionPlan {
    let mut generations: BTreeMap<GenerationId, Listing> = BTreeMap::new();
    for object in objects {
        let Some(key) = name::parse_key(&object.key) else { continue };
        let listing = generations.entry(key.generation).or_default();
        match key.kind {
            ObjectKind::Snapshot { index } => listing.snapshots.push((index, object)),
            ObjectKind::Segment { index, .. } => listing.segments.push((index, object)),
        }
    }
    let oldest_retained = |listing: &Listing| {
        listing.snapshots.iter().filter(|(_, o)| o.created >= cutoff).map(|(index, _)| *index).min()
    };
    let Some(current_min) = generations.get(&current).and_then(oldest_retained) else {
        // Without a retained snapshot of the current generation on the replica, the other
        // generations may still be all a restore has: keep everything.
        return RetentionPlan { delete: Vec::new(), need_snapshot: true };
    };
    let mut delete = Vec::new();
    for (generation, listing) in &generations {
        let min_index = if *generation == current { Some(current_min) } else { oldest_retained(listing) };
        let below = |index: u32| min_index.is_none_or(|min| index < min);
        delete.extend(listing.segments.iter().filter(|(i, _)| below(*i)).map(|(_, o)| o.key.clone()));
        delete.extend(listing.snapshots.iter().filter(|(i, _)| below(*i)).map(|(_, o)| o.key.clone()));
    }
    RetentionPlan { delete, need_snapshot: false }
}

/// Runs the replica's snapshot timer and retention checks until the state channel closes.
/// Deletes only under `right`, confirmed before each deletion (the lease, when leases are on).
pub(crate) async fn run(
    replica: Replica,
    mut state: watch::Receiver<ShadowState>,
    wake: crate::pool::WakeSender,
    right: std::sync::Arc<crate::lease::WriteRight>,
) {
    let policy = replica.policy;
    let retention = policy.retention.filter(|r| !r.is_zero());
    let check_every = retention.map(|r| policy.check_interval.min(r).max(Duration::from_millis(100)));
    let mut next_check = check_every.map(|every| tokio::time::Instant::now() + every);
    loop {
        let snapshot_due = policy.snapshot_interval.filter(|i| !i.is_zero()).and_then(|interval| {
            let taken = state.borrow().snapshot.as_ref()?.created;
            let age = SystemTime::now().duration_since(taken).unwrap_or_default();
            Some(tokio::time::Instant::now() + interval.saturating_sub(age))
        });
        let sleep_until = [snapshot_due, next_check].into_iter().flatten().min();
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() || state.borrow().is_final {
                    return;
                }
                continue;
            }
            () = sleep_opt(sleep_until) => {}
        }
        let now = tokio::time::Instant::now();
        if snapshot_due.is_some_and(|due| due <= now) {
            let before = state.borrow().snapshot.clone();
            let _ = wake.send(Wake::Snapshot);
            // The next deadline comes from the new snapshot once it is published.
            let _ = tokio::time::timeout(SNAPSHOT_WAIT, state.wait_for(|s| s.snapshot != before || s.is_final)).await;
        }
        if let (Some(every), Some(due), Some(retention)) = (check_every, next_check, retention) {
            if due <= now {
                next_check = Some(now + every);
                let current = state.borrow().generation;
                if let Some(current) = current {
                    crate::fail_point::hit("retention");
                    match enforce(&replica, current, retention, &wake, &right).await {
                        Ok(Some(expiry)) => {
                            let until = expiry.duration_since(SystemTime::now()).unwrap_or_default();
                            next_check = Some((now + every).max(tokio::time::Instant::now() + until));
                        }
                        Ok(None) => {}
                        // The uploader stops on its next write; nothing more is deleted meanwhile.
                        Err(e @ Error::LeaseLost { .. }) => {
                            warn!(replica = %replica.name, error = %e, "retention stopped");
                            return;
                        }
                        Err(e) => {
                            warn!(replica = %replica.name, error = %e, "retention check failed; retrying at the next check")
                        }
                    }
                }
            }
        }
    }
}

/// When the plan can next change: the moment the oldest snapshot inside the window leaves it.
/// Until then a listing finds nothing new to delete, since this replicator is the replica's only
/// writer and what it uploads is newer still; so an idle replica is not listed again before
/// then.
fn next_expiry(objects: &[ObjectMeta], cutoff: SystemTime, retention: Duration) -> Option<SystemTime> {
    let kept_snapshots = objects.iter().filter(|o| {
        o.created >= cutoff && matches!(name::parse_key(&o.key).map(|k| k.kind), Some(ObjectKind::Snapshot { .. }))
    });
    Some(kept_snapshots.map(|o| o.created).min()? + retention)
}

async fn sleep_opt(until: Option<tokio::time::Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

/// One check; returns when the next one could find something to do, if it can tell.
async fn enforce(
    replica: &Replica,
    current: GenerationId,
    retention: Duration,
    wake: &crate::pool::WakeSender,
    right: &crate::lease::WriteRight,
) -> Result<Option<SystemTime>, Error> {
    let store_err = |source| Error::Store { replica: replica.name.clone(), source };
    if !right.confirm(replica).await? {
        return Ok(None);
    }
    let objects = replica.store.list(&name::generations_prefix()).await.map_err(store_err)?;
    let cutoff = SystemTime::now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
    let plan = plan(&objects, current, cutoff);
    if plan.need_snapshot {
        info!(replica = %replica.name, "no snapshot inside the retention window; taking one");
        let _ = wake.send(Wake::Snapshot);
    }
    let next = if plan.need_snapshot { None } else { next_expiry(&objects, cutoff, retention) };
    for key in &plan.delete {
        // The lease is confirmed before each deletion: it may have been taken over while this
        // replicator idled, and the new holder's generation is old enough for this one's
        // retention to delete.
        if !right.confirm(replica).await? {
            return Ok(None);
        }
        replica.store.delete(key).await.map_err(store_err)?;
    }
    if !plan.delete.is_empty() {
        info!(replica = %replica.name, deleted = plan.delete.len(), "retention removed objects outside the window");
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111";
    const B: &str = "2222222222222222";

    fn object(key: String, created_secs: u64) -> ObjectMeta {
        ObjectMeta { key, size: 1, created: SystemTime::UNIX_EPOCH + Duration::from_secs(created_secs) }
    }

    /// Generation A (old): snapshot 0 at t=10, WAL 0 and 1. Generation B (current): snapshot 0
    /// at t=100, WAL 0..=2, snapshot 2 at t=200, WAL 2 and 3.
    fn listing() -> Vec<ObjectMeta> {
        let (a, b): (GenerationId, GenerationId) = (A.parse().unwrap(), B.parse().unwrap());
        vec![
            object(name::snapshot_key(&a, 0), 10),
            object(name::segment_key(&a, 0, 0), 11),
            object(name::segment_key(&a, 1, 0), 12),
            object(name::snapshot_key(&b, 0), 100),
            object(name::segment_key(&b, 0, 0), 101),
            object(name::segment_key(&b, 0, 4152), 102),
            object(name::segment_key(&b, 1, 0), 103),
            object(name::segment_key(&b, 2, 0), 150),
            object(name::snapshot_key(&b, 2), 200),
            object(name::segment_key(&b, 3, 0), 201),
        ]
    }

    fn deleted(cutoff: u64) -> RetentionPlan {
        plan(&listing(), B.parse().unwrap(), SystemTime::UNIX_EPOCH + Duration::from_secs(cutoff))
    }

    #[test]
    fn everything_inside_the_window_is_kept() {
        assert_eq!(deleted(5), RetentionPlan::default());
    }

    #[test]
    fn an_old_generation_goes_and_the_current_one_keeps_its_oldest_retained_chain() {
        let plan = deleted(50);
        assert!(!plan.need_snapshot);
        assert_eq!(plan.delete.len(), 3, "all of generation A: {:?}", plan.delete);
        assert!(plan.delete.iter().all(|k| k.contains(A)));
    }

    #[test]
    fn wal_and_snapshots_below_the_oldest_retained_snapshot_go() {
        let plan = deleted(150);
        let b: Vec<&String> = plan.delete.iter().filter(|k| k.contains(B)).collect();
        assert_eq!(b.len(), 4, "snapshot 0 and WAL of indexes 0 and 1: {b:?}");
        assert!(b.iter().all(|k| !k.contains("/00000002") && !k.contains("/00000003")), "{b:?}");
        // The snapshot is deleted after the WAL it starts.
        assert!(plan.delete.last().unwrap().ends_with(".snapshot.lz4"));
    }

    #[test]
    fn nothing_goes_while_the_current_generation_has_no_retained_snapshot() {
        let plan = deleted(300);
        assert_eq!(plan, RetentionPlan { delete: Vec::new(), need_snapshot: true });
        let only_old = plan_of_generation_without_snapshot();
        assert!(only_old.need_snapshot && only_old.delete.is_empty());
    }

    #[test]
    fn the_next_listing_waits_for_the_oldest_kept_snapshot_to_expire() {
        let at = |secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let retention = Duration::from_secs(1000);
        // Cutoff 50: generation A's snapshot (t=10) goes; B's snapshot 0 (t=100) is the oldest kept.
        assert_eq!(next_expiry(&listing(), at(50), retention), Some(at(1100)));
        // Cutoff 150: B's snapshot 2 (t=200) is all that is kept; WAL times do not count.
        assert_eq!(next_expiry(&listing(), at(150), retention), Some(at(1200)));
        assert_eq!(next_expiry(&listing(), at(300), retention), None);
    }

    fn plan_of_generation_without_snapshot() -> RetentionPlan {
        // The current generation's snapshot is still uploading: generation A is all there is.
        let objects: Vec<ObjectMeta> = listing().into_iter().filter(|o| o.key.contains(A)).collect();
        plan(&objects, B.parse().unwrap(), SystemTime::UNIX_EPOCH)
    }
}
