//! Snapshots of the database file: taken under the pin at the current index, sealed after the
//! pass's drop, taken again by themselves when the WAL a restore would replay outgrows the
//! database (`snapshot-wal-ratio`), and the local copy emptied once every replica holds it.

use std::time::Instant;

use tracing::{debug, info};

use super::{disk_is_tight, Capturer};
use crate::error::Error;
use crate::meta::LocalSnapshot;

/// The least WAL since a snapshot that makes a new one: as much as `max-local-wal`'s default, so
/// a small database under a busy writer is snapshotted about once per 256 MiB of WAL, one upload
/// against the hundreds of segments that carried it.
const AUTO_SNAPSHOT_MIN_WAL: u64 = 256 << 20;

/// The last snapshot this process took, timed from when it was taken to when every replica
/// held it. Automatic snapshots take at most a tenth of the time this way: a writer flat out
/// makes the 256 MiB of WAL that call for one in about a second, and a snapshot each time (a
/// compressed copy of the database written locally, then uploaded) took the replicator's CPU
/// in the saturated bench from about 2 to up to 5 CPU-s (docs/benchmarks.md). A fixed spacing
/// would also space the cheap snapshots of a small database on a fast store, whose restores
/// it keeps short.
#[derive(Clone, Debug)]
pub(super) struct SnapshotUpload {
    snapshot: LocalSnapshot,
    taken_at: Instant,
}

impl SnapshotUpload {
    pub(super) fn started(snapshot: &LocalSnapshot) -> SnapshotUpload {
        SnapshotUpload { snapshot: snapshot.clone(), taken_at: Instant::now() }
    }

    /// Whether an automatic snapshot may follow `current`, the generation's snapshot, which
    /// every replica has held since `held_since` (`None`: some replica lacks it yet).
    fn allows_another(&self, current: &LocalSnapshot, held_since: Option<Instant>) -> bool {
        if self.snapshot != *current {
            // Taken by an earlier process: nothing to go by.
            return true;
        }
        held_since.is_some_and(|held| {
            held.elapsed() >= held.saturating_duration_since(self.taken_at) * AUTO_SNAPSHOT_IDLE_FACTOR
        })
    }
}

/// How many times as long as the last snapshot took from being taken to being held by every
/// replica an automatic one waits after it.
const AUTO_SNAPSHOT_IDLE_FACTOR: u32 = 9;

/// [`AUTO_SNAPSHOT_MIN_WAL`]; test builds may lower it, so a test need not write 256 MiB.
fn auto_snapshot_min_wal() -> u64 {
    #[cfg(feature = "fail-points")]
    if let Some(bytes) = std::env::var("WALSTREAM_TEST_AUTO_SNAPSHOT_MIN_WAL").ok().and_then(|v| v.parse().ok()) {
        return bytes;
    }
    AUTO_SNAPSHOT_MIN_WAL
}

impl Capturer {
    /// See [`Capturer::wal_outgrew_snapshot`]; zero: never.
    pub(crate) fn snapshot_after_wal_ratio(&mut self, ratio: f64) {
        self.snapshot_wal_ratio = ratio;
    }

    /// Whether the WAL a restore replays on top of the generation's snapshot has passed
    /// `snapshot_wal_ratio` times the database's size (and at least [`AUTO_SNAPSHOT_MIN_WAL`]):
    /// without a new snapshot restore time grows with history. Only once the WAL has restarted
    /// since the snapshot: a snapshot is taken at the current index, which a restore replays
    /// whole, so one at the same index would save nothing. Not before the last snapshot this
    /// process took is held by every replica, and then only after nine times as long as that
    /// took ([`SnapshotUpload::allows_another`]). Not on a tight disk, where the local
    /// copy of the snapshot could fill it (every new instance on a memory volume starts a
    /// generation, with its own snapshot, anyway).
    pub(super) fn wal_outgrew_snapshot(&mut self) -> bool {
        let Some(generation) = &self.generation else { return false };
        if self.snapshot_wal_ratio <= 0.0 || generation.end().index <= generation.snapshot.index {
            return false;
        }
        let (id, since) = (
            generation.id,
            self.counters
                .shadow_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(generation.wal_at_snapshot),
        );
        if since < auto_snapshot_min_wal() {
            return false;
        }
        // After the counter: this locks every replica's counters, and runs on every pass.
        let held_since = self.snapshot_held_since();
        if self.snapshot_upload.as_ref().is_some_and(|upload| !upload.allows_another(&generation.snapshot, held_since))
        {
            return false;
        }
        // The database as its last commit left it, WAL included; the file alone lags behind.
        let pages = self.db.wal_index_header().map_or(0, |h| u64::from(h.db_pages));
        let db_size = (pages * u64::from(self.db.page_size())).max(self.db.db_file().metadata().map_or(0, |m| m.len()));
        if (since as f64) < db_size as f64 * self.snapshot_wal_ratio || disk_is_tight(&self.meta.wal_dir(&id)) {
            return false;
        }
        info!(db = %self.db_path.display(), generation = %id, wal_since_snapshot = since, db_size, "the wal since the last snapshot passed snapshot-wal-ratio times the database; taking a snapshot so restores stay short");
        true
    }

    /// Empties the local snapshot once every replica holds it: it is a compressed copy of the
    /// whole database, which on a memory volume is RAM. The empty file still records which
    /// snapshot the generation has, so a restart resumes the generation; a replica that lacks
    /// it later gets a new generation (`Error::SnapshotDiscarded`).
    pub(super) fn free_held_snapshot(&mut self) {
        if !self.snapshot_held_by_all() {
            return;
        }
        let Some(generation) = &self.generation else { return };
        if generation.snapshot.from_database {
            // Nothing local to free (and the path is the database itself): the pin may go.
            self.pin_gate.set(false);
            return;
        }
        if std::fs::metadata(&generation.snapshot.path).is_ok_and(|m| m.len() > 0) {
            let freed =
                std::fs::OpenOptions::new().write(true).open(&generation.snapshot.path).and_then(|f| f.set_len(0));
            if let Err(e) = freed {
                debug!(db = %self.db_path.display(), error = %e, "cannot free the local snapshot");
            }
        }
    }

    /// Whether every replica reports holding the generation's snapshot.
    fn snapshot_held_by_all(&self) -> bool {
        self.snapshot_held_since().is_some()
    }

    /// Since when every replica has reported holding the generation's snapshot (the last one's
    /// report), if every one has.
    fn snapshot_held_since(&self) -> Option<Instant> {
        let generation = self.generation.as_ref()?;
        let held = |counters: &std::sync::Arc<crate::status::ReplicaCounters>| match counters
            .snapshot_held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some((snapshot, since)) if *snapshot == generation.snapshot => Some(*since),
            _ => None,
        };
        // No replica, or one that lacks it: `None`; otherwise the latest report.
        self.replica_counters
            .iter()
            .try_fold(None, |latest, counters| held(counters).map(|since| latest.max(Some(since))))?
    }

    /// A snapshot framed straight from the database (see `LocalSnapshot::from_database`) that
    /// some replica lacks: the pin must hold until it is shipped, as for bytes only the live WAL
    /// holds.
    pub(super) fn database_snapshot_pending(&self) -> bool {
        self.generation.as_ref().is_some_and(|g| g.snapshot.from_database) && !self.snapshot_held_by_all()
    }

    /// Snapshots the database file at the current index, under the pin (see
    /// [`MetaDir::write_unsealed_snapshot`](crate::meta::MetaDir::write_unsealed_snapshot) for why the label is right); [`Capturer::seal_snapshot`]
    /// puts it in place.
    pub(super) fn snapshot(&mut self) -> Result<(), Error> {
        let Some(generation) = self.generation.as_ref() else {
            return Ok(());
        };
        let index = generation.end().index;
        let unsealed = self.meta.write_unsealed_snapshot(&generation.id, index, self.db.db_file(), &mut self.buf)?;
        self.unsealed_snapshot = Some((generation.id, unsealed));
        Ok(())
    }

    /// Fsyncs the snapshot the pass wrote and puts it in place, after the pass's drop: the
    /// pin a snapshot holds keeps the application's checkpoints from ending the WAL life, and
    /// beside 10,000-row updates (one every 12 ms) the life it fell in was the longest of every
    /// run. Keeps the previous local snapshot for an upload that may still be reading it.
    pub(super) fn seal_snapshot(&mut self) -> Result<(), Error> {
        let Some((id, unsealed)) = self.unsealed_snapshot.take() else {
            return Ok(());
        };
        let Some(generation) = self.generation.as_mut().filter(|g| g.id == id) else {
            return Ok(());
        };
        let snapshot = unsealed.seal()?;
        let index = snapshot.index;
        // A snapshot framed from the database, if still uploading, is replaced, and the pin may
        // move from the next pass on: see `new_generation`.
        self.pin_gate.set(false);
        self.meta.remove_snapshots_below(&generation.id, generation.snapshot.index);
        info!(db = %self.db_path.display(), generation = %generation.id, index, "snapshot taken");
        self.snapshot_upload = Some(SnapshotUpload::started(&snapshot));
        generation.snapshot = snapshot;
        // Taken at the current index, which a restore from it replays from its start.
        generation.wal_at_snapshot = generation.index_started_at;
        self.pending_snapshot = false;
        Ok(())
    }
}
