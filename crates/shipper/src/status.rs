//! What a running shipper can be asked from outside: its counters and positions for metrics and
//! readiness, and the durability barrier ([`Handle::sync`]). Everything here is read on demand,
//! so a process nobody scrapes pays only for a few atomic adds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use walstream_format::Pos;

use crate::protocol::{ShadowState, Wake};

/// How long `/healthz` and `walstream_disk_full` go on saying the disk is full after a pass
/// last met it. On a nearly full disk a spell may last a few milliseconds (shipped bytes are
/// freed, the next write fills the room again): shown only while it lasts, no probe or scrape
/// would see it. A minute, as the warning is logged once a minute while spells recur.
pub(crate) const DISK_FULL_SHOWN_FOR: Duration = crate::throttle::LOG_EVERY;

/// Counters the capturer keeps for one database.
#[derive(Debug, Default)]
pub(crate) struct DbCounters {
    /// Capture passes, failed passes, and the time spent in them.
    pub(crate) passes: AtomicU64,
    pub(crate) failed_passes: AtomicU64,
    pub(crate) pass_nanos: AtomicU64,
    /// Committed WAL bytes appended to the shadow.
    pub(crate) shadow_bytes: AtomicU64,
    /// Set while capture passes meet a full local disk (see [`DbCounters::record_disk_full`]).
    disk_full: AtomicBool,
    /// When a pass last met it, and how many spells of it began.
    disk_full_last: Mutex<Option<Instant>>,
    disk_full_spells: AtomicU64,
    /// Why replication of the database stopped on its own (a worker failed, a replica was
    /// taken over), for `/healthz` until the process exits.
    pub(crate) stopped: Mutex<Option<String>>,
}

impl DbCounters {
    pub(crate) fn record_failure(&self, e: &crate::Error) {
        self.stopped.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| e.to_string());
    }

    /// Records whether the latest pass met a full local disk; returns whether the one before
    /// had.
    pub(crate) fn record_disk_full(&self, full: bool) -> bool {
        self.record_disk_full_at(full, Instant::now())
    }

    fn record_disk_full_at(&self, full: bool, now: Instant) -> bool {
        let was_full = self.disk_full.swap(full, Relaxed);
        if full {
            *self.disk_full_last.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
            if !was_full {
                self.disk_full_spells.fetch_add(1, Relaxed);
            }
        }
        was_full
    }

    /// Whether the disk is full, or was within [`DISK_FULL_SHOWN_FOR`].
    fn shows_disk_full_at(&self, now: Instant) -> bool {
        self.disk_full.load(Relaxed)
            || self
                .disk_full_last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|last| now.saturating_duration_since(last) < DISK_FULL_SHOWN_FOR)
    }

    pub(crate) fn record_pass(&self, took: Duration, ok: bool) {
        self.passes.fetch_add(1, Relaxed);
        if !ok {
            self.failed_passes.fetch_add(1, Relaxed);
        }
        self.pass_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
    }
}

/// What one uploader reports.
#[derive(Debug, Default)]
pub(crate) struct ReplicaCounters {
    /// Uncompressed WAL bytes uploaded.
    pub(crate) wal_bytes: AtomicU64,
    /// Set once the replica has held everything the capturer published at some moment.
    pub(crate) caught_up_once: AtomicBool,
    /// Since when the replica has been missing a commit the capturer had published.
    pub(crate) behind_since: Mutex<Option<Instant>>,
    /// The newest local snapshot the replica is known to hold, and since when: once every
    /// replica holds it, the capturer frees its local copy (and times the upload).
    pub(crate) snapshot_held: Mutex<Option<(crate::meta::LocalSnapshot, Instant)>>,
    /// Background validations (`validation-interval`) that found the replica equal to the
    /// database, and those that did not or could not run.
    pub(crate) validations_ok: AtomicU64,
    pub(crate) validations_failed: AtomicU64,
    /// Why the last validation failed, until one passes.
    pub(crate) validation_failure: Mutex<Option<String>>,
}

impl ReplicaCounters {
    /// Called by the uploader whenever it compares its position with the published end.
    pub(crate) fn observe(&self, position: Option<Pos>, end: Option<Pos>) {
        let caught_up = end.is_some() && position == end;
        let mut behind_since = self.behind_since.lock().unwrap_or_else(|e| e.into_inner());
        if caught_up {
            self.caught_up_once.store(true, Relaxed);
            *behind_since = None;
        } else if end.is_some() {
            behind_since.get_or_insert_with(Instant::now);
        }
    }
}

/// A cheap, cloneable view of a running (or not yet started) shipper.
#[derive(Clone, Debug)]
pub struct Handle {
    pub(crate) db_path: PathBuf,
    pub(crate) counters: Arc<DbCounters>,
    pub(crate) state: watch::Receiver<ShadowState>,
    pub(crate) replicas: Vec<ReplicaView>,
    pub(crate) wake: crate::pool::WakeSender,
    pub(crate) health_lag: Option<Duration>,
}

#[derive(Clone, Debug)]
pub(crate) struct ReplicaView {
    pub(crate) name: String,
    pub(crate) kind: &'static str,
    pub(crate) position: watch::Receiver<Option<Pos>>,
    pub(crate) counters: Arc<ReplicaCounters>,
    pub(crate) store: Arc<dyn walstream_store::ObjectStore>,
}

/// One database's figures at the moment of asking.
#[derive(Clone, Debug)]
pub struct DbStatus {
    /// The database path, absolute when it could be made so.
    pub db_path: PathBuf,
    /// Size of the database file (0 if it does not exist yet).
    pub db_size: u64,
    /// Size of the live `-wal` file.
    pub wal_size: u64,
    /// Committed WAL bytes copied into the shadow since start.
    pub shadow_bytes_total: u64,
    /// The shadow's current index, if a generation exists.
    pub shadow_index: Option<u32>,
    /// Disk taken by the shadow WAL of the current generation (shipped bytes are punched out).
    pub shadow_size: u64,
    /// Capture passes, failed passes and seconds spent in them.
    pub passes: u64,
    /// Of those, the failed ones.
    pub failed_passes: u64,
    /// Time spent in capture passes.
    pub pass_seconds: f64,
    /// True while capture passes meet a full local disk, and for a minute after.
    pub disk_full: bool,
    /// Spells of a full local disk since start.
    pub disk_full_spells: u64,
    /// Why replication of this database stopped on its own, once it has.
    pub stopped: Option<String>,
    /// One entry per replica, in configuration order.
    pub replicas: Vec<ReplicaStatus>,
    /// This database's own `health-lag`, which [`DbStatus::problems`] takes over the one it is
    /// given.
    pub health_lag: Option<Duration>,
}

/// One replica's figures.
#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    /// The replica's name.
    pub name: String,
    /// The store type (`file`, `gcs`).
    pub kind: &'static str,
    /// Where the replica stands; `None` until known.
    pub position: Option<Pos>,
    /// Uncompressed WAL bytes uploaded since start.
    pub wal_bytes_total: u64,
    /// How long the replica has been missing a commit walstream had copied (0 when caught up).
    pub lag: Duration,
    /// WAL bytes captured but not yet in this replica (all kept locally while its position is
    /// unknown).
    pub pending_bytes: u64,
    /// Whether the replica has once held everything captured (readiness).
    pub caught_up_once: bool,
    /// Requests sent and bytes moved, per operation, by a remote store (retention's and the
    /// lease's included); `None` for local stores.
    pub operations: Option<[(walstream_store::Operation, u64, u64); 4]>,
    /// Background validations that passed.
    pub validations_ok: u64,
    /// Background validations that failed (or could not run).
    pub validations_failed: u64,
    /// Why the last validation failed, until one passes.
    pub validation_failure: Option<String>,
}

impl DbStatus {
    /// Why the database is unhealthy, one line each naming it (and the replica); empty when it
    /// is healthy. A replica is unhealthy once it has held back a captured commit for longer
    /// than `health_lag` (zero: never), or the database's own.
    pub fn problems(&self, health_lag: Duration) -> Vec<String> {
        let health_lag = self.health_lag.unwrap_or(health_lag);
        let db = self.db_path.display();
        let mut problems = Vec::new();
        if let Some(why) = &self.stopped {
            problems.push(format!("{db}: replication stopped: {why}"));
        }
        if self.disk_full {
            problems.push(format!("{db}: local disk full within the last minute; free space on its volume"));
        }
        for replica in &self.replicas {
            if let Some(why) = &replica.validation_failure {
                problems.push(format!("{db}: replica {} failed validation: {why}", replica.name));
            }
        }
        for replica in self.replicas.iter().filter(|r| !health_lag.is_zero() && r.lag > health_lag) {
            problems.push(format!("{db}: replica {} has held back a captured commit for {}s, more than the health lag of {}s; check that its store is reachable and accepts writes", replica.name, replica.lag.as_secs(), health_lag.as_secs_f64()));
        }
        problems
    }
}

/// Why [`Handle::sync`] could not confirm.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The deadline passed first.
    #[error("not every replica of {db} confirmed within {timeout:?}: {behind}")]
    Timeout {
        /// The database.
        db: String,
        /// The deadline.
        timeout: Duration,
        /// The replicas still behind, with their positions.
        behind: String,
    },
    /// The shipper has stopped (or never started).
    #[error("{db} is not being replicated (walstream is shutting down or the database does not exist yet)")]
    NotRunning {
        /// The database.
        db: String,
    },
}

impl Handle {
    /// The database this handle reports on.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// The end of what the capturer last published (everything committed before its last pass).
    pub fn shadow_end(&self) -> Option<Pos> {
        self.state.borrow().end
    }

    /// Where replica `replica` (in configuration order) stands, once known.
    pub fn replica_position(&self, replica: usize) -> Option<Pos> {
        self.replicas.get(replica).and_then(|r| *r.position.borrow())
    }

    /// Replica `replica`'s name and store (in configuration order), to read it back.
    pub fn replica_store(&self, replica: usize) -> Option<(String, Arc<dyn walstream_store::ObjectStore>)> {
        self.replicas.get(replica).map(|r| (r.name.clone(), r.store.clone()))
    }

    /// Counts a background validation of replica `replica`; a failure shows in
    /// [`DbStatus::problems`] (so `/healthz` fails) until a validation passes.
    pub fn record_validation(&self, replica: usize, result: Result<(), String>) {
        let Some(counters) = self.replicas.get(replica).map(|r| &r.counters) else { return };
        let mut failure = counters.validation_failure.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                counters.validations_ok.fetch_add(1, Relaxed);
                *failure = None;
            }
            Err(why) => {
                counters.validations_failed.fetch_add(1, Relaxed);
                *failure = Some(why);
            }
        }
    }

    /// True once every replica has held everything captured at some moment since start.
    pub fn ready(&self) -> bool {
        self.replicas.iter().all(|r| r.counters.caught_up_once.load(Relaxed))
    }

    /// Figures for metrics; reads a few file sizes.
    pub fn status(&self) -> DbStatus {
        let state = self.state.borrow().clone();
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let shadow_size = match state.end {
            Some(_) => crate::shadow::disk_bytes(&state.wal_dir, None),
            None => 0,
        };
        let mut wal = self.db_path.clone().into_os_string();
        wal.push("-wal");
        let replicas = self
            .replicas
            .iter()
            .map(|r| {
                let position = *r.position.borrow();
                let pending_bytes = state.wal_lacked(position);
                let behind_since = *r.counters.behind_since.lock().unwrap_or_else(|e| e.into_inner());
                ReplicaStatus {
                    name: r.name.clone(),
                    kind: r.kind,
                    position,
                    wal_bytes_total: r.counters.wal_bytes.load(Relaxed),
                    lag: behind_since.map_or(Duration::ZERO, |t| t.elapsed()),
                    pending_bytes,
                    caught_up_once: r.counters.caught_up_once.load(Relaxed),
                    operations: r.store.operations().map(|o| o.totals()),
                    validations_ok: r.counters.validations_ok.load(Relaxed),
                    validations_failed: r.counters.validations_failed.load(Relaxed),
                    validation_failure: r.counters.validation_failure.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                }
            })
            .collect();
        DbStatus {
            db_path: self.db_path.clone(),
            db_size: len(&self.db_path),
            wal_size: len(Path::new(&wal)),
            shadow_bytes_total: self.counters.shadow_bytes.load(Relaxed),
            shadow_index: state.end.map(|e| e.index),
            shadow_size,
            passes: self.counters.passes.load(Relaxed),
            failed_passes: self.counters.failed_passes.load(Relaxed),
            pass_seconds: self.counters.pass_nanos.load(Relaxed) as f64 / 1e9,
            disk_full: self.counters.shows_disk_full_at(Instant::now()),
            disk_full_spells: self.counters.disk_full_spells.load(Relaxed),
            stopped: self.counters.stopped.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            replicas,
            health_lag: self.health_lag,
        }
    }

    /// The durability barrier: returns once every replica holds every transaction committed
    /// before the call. The capturer makes a pass first, so a commit that no file event has
    /// announced yet is included.
    pub async fn sync(&self, timeout: Duration) -> Result<(), SyncError> {
        let db = self.db_path.display().to_string();
        let confirmed = tokio::time::timeout(timeout, async {
            let (reply_tx, reply_rx) = oneshot::channel();
            self.wake.send(Wake::Sync(reply_tx)).map_err(|_| SyncError::NotRunning { db: db.clone() })?;
            let mut target = reply_rx.await.map_err(|_| SyncError::NotRunning { db: db.clone() })?;
            let mut state = self.state.clone();
            for replica in &self.replicas {
                let mut position = replica.position.clone();
                loop {
                    // A new generation since the pass starts from a snapshot holding every
                    // earlier commit: its end is the target now.
                    let current = state.borrow_and_update().end;
                    if current.map(|c| c.generation) != target.map(|t| t.generation) {
                        target = current;
                    }
                    let Some(target) = target else { break };
                    let at = *position.borrow_and_update();
                    if at.is_some_and(|at| at.generation == target.generation && at >= target) {
                        break;
                    }
                    tokio::select! {
                        changed = position.changed() => changed.map_err(|_| SyncError::NotRunning { db: db.clone() })?,
                        changed = state.changed() => changed.map_err(|_| SyncError::NotRunning { db: db.clone() })?,
                    }
                }
            }
            Ok(())
        })
        .await;
        confirmed.unwrap_or_else(|_| {
            let end = self.state.borrow().end;
            let behind: Vec<String> = self
                .replicas
                .iter()
                .filter(|r| *r.position.borrow() != end)
                .map(|r| {
                    format!(
                        "replica {} at {}",
                        r.name,
                        r.position.borrow().map_or("an unknown position".into(), |p| p.to_string())
                    )
                })
                .collect();
            Err(SyncError::Timeout {
                db: db.clone(),
                timeout,
                behind: format!(
                    "{} (captured up to {})",
                    behind.join(", "),
                    end.map_or("nothing".into(), |p| p.to_string())
                ),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_shows_for_a_while_after_the_spell_and_each_spell_counts() {
        let counters = DbCounters::default();
        let start = Instant::now();
        assert!(!counters.shows_disk_full_at(start));
        assert!(!counters.record_disk_full_at(true, start));
        assert!(counters.record_disk_full_at(true, start + Duration::from_millis(1)), "the same spell");
        assert!(counters.record_disk_full_at(false, start + Duration::from_millis(2)));
        let after = start + Duration::from_millis(1) + DISK_FULL_SHOWN_FOR;
        assert!(counters.shows_disk_full_at(after - Duration::from_millis(1)), "a spell of 1 ms still shows");
        assert!(!counters.shows_disk_full_at(after));
        counters.record_disk_full_at(true, after);
        counters.record_disk_full_at(false, after);
        assert_eq!(counters.disk_full_spells.load(Relaxed), 2);
    }
}
