//! The capturer: the only code that touches the live database, a turn at a time on the capture
//! pool (`pool`). It copies committed WAL frames into the shadow WAL, decides when a WAL restart
//! starts a new index and when lost continuity starts a new generation, and publishes the
//! shadow's end for the uploaders.
//!
//! This module holds the turns, passes, rests and housekeeping; `copy` what a pass makes of the
//! live WAL and how a generation starts; `pin` when the pin is dropped and taken again;
//! `snapshot` the snapshots a generation takes after its first.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{debug, info, warn};
use walstream_format::{name, GenerationId, Pos, WAL_HEADER_SIZE};

use crate::error::Error;
use crate::meta::{LocalSnapshot, MetaDir};
use crate::protocol::{ShadowState, Wake, PASS_SPACING};
use crate::shadow::{self, ShadowIndex, COPY_CHUNK_BYTES};
use crate::source::{wal_path, AtPath, FileStamp, SourceDb, WalIndexHeader};
use crate::spool::Spooling;
use crate::status::DbCounters;
use crate::watch::Subscription;

mod copy;
mod pin;
mod snapshot;

use copy::{shadow_holds_life, LiveWal};
use pin::{pin_holds_off_a_restart, PinDrop, AFTER_DROP_SPACING};
use snapshot::SnapshotUpload;

/// How long the capturer sleeps between passes when no event arrives.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// How often the lock probe runs while walstream pins the WAL and the database is busy. This
    /// bounds how long an application's FULL/RESTART/TRUNCATE checkpoint waits for walstream.
    probe_active: Duration,
    /// The same when nothing has changed for `active_window`.
    probe_idle: Duration,
    active_window: Duration,
    /// With no pin held, the WAL is still polled this often in case file events are lost or
    /// unsupported (network filesystems).
    poll: Duration,
    /// A pass keeps a pin younger than this instead of rolling it. Each roll lets the
    /// application's next automatic checkpoint back-fill up to the new pin, which costs it two
    /// fsyncs; rolled on every pass, a busy writer (whose WAL stays above the auto-checkpoint
    /// size while pinned) paid that on nearly every commit and ran at less than half its speed.
    /// Any held pin keeps the WAL from restarting, so copying under an older pin is as safe as
    /// copying under a new one.
    pin_roll: Duration,
    /// The least time from one pass's start to the next. A commit after a quiet spell is copied
    /// at once; a busy writer's commits wait up to this long and are copied together. Unspaced,
    /// every commit of a saturated writer woke a pass, and the fixed cost of 20,000 passes a
    /// second (open, stat, fsync, publish, an upload wake-up) was most of walstream's CPU.
    pass_spacing: Duration,
}

const TIMING: Timing = Timing {
    probe_active: Duration::from_millis(10),
    probe_idle: Duration::from_millis(50),
    active_window: Duration::from_millis(250),
    poll: Duration::from_secs(1),
    pin_roll: Duration::from_millis(250),
    pass_spacing: PASS_SPACING,
};

/// How often a resting database is looked at (`RestFingerprint`) in case a file event was lost.
/// Events wake it at once, and an overflowed event queue wakes every database; this only bounds
/// how late an event the kernel never queued could be noticed. At 30 s, 10,000 resting databases
/// took 4% of a core for it.
const REST_POLL: Duration = Duration::from_secs(300);

/// Copy buffers not lent out, lent to a capturer for the length of a turn: held by each
/// database, they took a mebibyte of memory per database woken, and kept it; kept by each pool
/// thread, a mebibyte per thread that ever ran a turn (8 on two cores) for a single database.
/// Shared, there are only as many as turns ever ran at once.
static COPY_BUFS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// How soon a resting database looks again after a file event that found nothing changed: the
/// WAL is written before the wal-index says so. After an event on the WAL it keeps looking, each
/// wait as long as the time since the event, for [`REST_WATCH`]: between SQLite's last write to
/// the WAL (the last event) and its wal-index update (none) comes the WAL's fsync, as long as a
/// busy disk makes it, and a WAL restarted over a longer file keeps its length (and, on coarse
/// clocks, its modification time), so only the wal-index tells. Not after an event on the
/// database file alone, which every rest's back-fill makes: at 10,000 databases that would be
/// some 100,000 looks for nothing.
const REST_RECHECK: Duration = Duration::from_millis(20);

/// How long after a file event a resting database keeps looking (see [`REST_RECHECK`]).
const REST_WATCH: Duration = Duration::from_secs(10);

/// How soon a database that must wake, and may not yet (see `awake`), asks again if the queue
/// for leave has not woken it first.
const AWAKE_RETRY: Duration = Duration::from_secs(1);

/// How long the final copy at shutdown goes on retrying while the disk is full. Within the
/// default shutdown deadline (8 s), which bounds the uploads that follow it.
const FULL_DISK_FINAL_COPY: Duration = Duration::from_secs(4);

/// How often the shadow's size is looked at, at most, while it may be past `max-local-wal` (see
/// `Capturer::enforce_local_bound`): a look lists the shadow's files, one per WAL life an
/// outage has kept.
const BOUND_LOOK_SPACING: Duration = Duration::from_millis(50);

/// The shadow's size as last looked at (`Capturer::enforce_local_bound`): when, what had been
/// copied by then (`DbCounters::shadow_bytes`), and the bytes its files took, with the current
/// index's whole length.
#[derive(Clone, Copy, Debug)]
struct BoundLook {
    at: Instant,
    copied: u64,
    used: u64,
}

/// Passes in a row, each within two pass spacings of the one before and each finding new
/// commits, after which the capturer stops taking file events and passes every
/// [`PASS_SPACING`] on its own (see [`Capturer::follow_events_or_poll`]).
const BUSY_PASSES_TO_POLL: u32 = 3;

struct Generation {
    id: GenerationId,
    snapshot: LocalSnapshot,
    /// The shadow of the current WAL life; `None` until the first WAL header is seen.
    shadow: Option<ShadowIndex>,
    /// The wal-index as the generation found it with no WAL life on disk (see
    /// [`nothing_committed_since`](copy::nothing_committed_since)); `None` for a resumed generation, which cannot tell.
    index_before_first_life: Option<WalIndexHeader>,
    /// The database file as stamped before a WAL read that found no life and proved nothing
    /// lost (see [`FILE_STAMP_SETTLED`](copy::FILE_STAMP_SETTLED)); `None` for a resumed generation, or when the file had
    /// changed too recently to tell.
    file_before_first_life: Option<FileStamp>,
    /// `DbCounters::shadow_bytes` when the snapshot's index began (0 for a resumed generation):
    /// a restore from the snapshot replays everything captured since.
    wal_at_snapshot: u64,
    /// `DbCounters::shadow_bytes` when the current index began.
    index_started_at: u64,
    /// The lengths of the indexes this run has ended that some replica may still lack, oldest
    /// first: what an uploader's backlog is made of (see [`ShadowState::ended`]).
    ended: Vec<(u32, u64)>,
}

impl Generation {
    /// The committed end of the shadow: where the current index is, and how far it is copied.
    /// An index holding only its WAL header ends at offset 0: SQLite writes a new WAL's header
    /// before its first frame, and shipping the header alone cost one more PUT per WAL life.
    fn end(&self) -> Pos {
        match &self.shadow {
            Some(shadow) if shadow.committed_len > WAL_HEADER_SIZE as u64 => {
                Pos { generation: self.id, index: shadow.index, offset: shadow.committed_len }
            }
            Some(shadow) => Pos { generation: self.id, index: shadow.index, offset: 0 },
            None => Pos { generation: self.id, index: self.snapshot.index, offset: 0 },
        }
    }
}

pub(crate) struct Capturer {
    db_path: PathBuf,
    wal_path: PathBuf,
    meta: MetaDir,
    db: SourceDb,
    generation: Option<Generation>,
    /// The thread's copy buffer during a turn or pass ([`COPY_BUFS`]); empty between them.
    buf: Vec<u8>,
    state: watch::Sender<ShadowState>,
    replica_positions: Vec<watch::Receiver<Option<Pos>>>,
    last_wal_stat: Option<(u64, SystemTime)>,
    last_change: Instant,
    pending_new_generation: Option<String>,
    pending_snapshot: bool,
    /// The snapshot this pass wrote, for [`Capturer::seal_snapshot`].
    unsealed_snapshot: Option<(GenerationId, crate::meta::UnsealedSnapshot)>,
    /// Other generations' directories are left to delete (`remove_stale_generations`).
    stale_generations: bool,
    /// The wal-index state (salt-1, frames) at which the pin last followed a complete back-fill.
    rolled_at_backfill: Option<(u32, u32)>,
    /// Whether the pin held keeps every frame not yet copied from being overwritten, so that a
    /// copy may count on continuity since the last (see [`Capturer::pin_covers`]). A pin that
    /// SQLite gave read-mark 0 over frames the shadow lacked does not, until the next roll.
    pin_vouches: bool,
    /// Whether the pin held keeps the WAL from restarting for as long as it is held, so that
    /// frames may stay in the live WAL under it (see [`pin_holds_off_a_restart`]).
    pin_may_defer: bool,
    /// Runs once, in the next copy, between reading what the WAL is and acting on it: where an
    /// application's write can race a pass.
    #[cfg(test)]
    after_observe: Option<Box<dyn FnOnce() + Send>>,
    /// Sync barriers waiting for the next successful pass.
    pending_syncs: Vec<tokio::sync::oneshot::Sender<Option<Pos>>>,
    syncs_requested: u64,
    counters: std::sync::Arc<DbCounters>,
    timing: Timing,
    /// This database's file events; `None` where they are unavailable (the WAL is then polled).
    events: Option<Subscription>,
    /// Whether the capturer passes every `pass_spacing` instead of waiting for events.
    polling: bool,
    /// When the last pass that found new commits ran, and how many such passes came in a row.
    last_copy: Option<Instant>,
    busy_passes: u32,
    /// Failed passes, logged once a minute with a count.
    failures: crate::throttle::Throttle,
    /// Times the disk filled up and the live WAL had to serve the uploads, logged the same way.
    disk_full_spells: crate::throttle::Throttle,
    /// The index whose life first reached [`DROP_PIN_WAL_FRAMES`](pin::DROP_PIN_WAL_FRAMES), and when.
    large_wal_since: Option<(u32, Instant)>,
    /// The last pin drop for a WAL life to restart.
    last_drop: Option<PinDrop>,
    /// Whether `reader_holds_drop_back` last said so (logged when it starts).
    held_back_logged: bool,
    /// See [`Capturer::bound_local_wal`]; and the shadow's size when last looked at.
    max_local_wal: Option<u64>,
    bound_checked: BoundLook,
    /// What each replica reports holding, to free the local snapshot once all hold it.
    replica_counters: Vec<std::sync::Arc<crate::status::ReplicaCounters>>,
    /// See [`Capturer::wal_outgrew_snapshot`].
    snapshot_wal_ratio: f64,
    /// The last snapshot this process took, and when every replica held it.
    snapshot_upload: Option<SnapshotUpload>,
    /// The ended shadow index kept, punched, for its length (see `remove_shipped_shadow`).
    ended_kept: Option<PathBuf>,
    /// The slowest replica's position when every replica's was last known.
    slowest_shipped: Option<Pos>,
    /// Ended indexes the store has not taken for a while, compressed (see `spool`).
    spooling: Spooling,
    /// Indexes spooled, logged once a minute with a count.
    spools_logged: crate::throttle::Throttle,
    /// Open while a snapshot framed straight from the database may be read (see `PinGate`).
    pin_gate: std::sync::Arc<crate::protocol::PinGate>,
    /// See [`Capturer::rest_when_idle`].
    idle_release: Option<Duration>,
    /// See [`Capturer::hand_claim_to`].
    claim_keeper: Option<ClaimKeeper>,
    /// Whether the first turn (the first pass) has run.
    started: bool,
    /// Wakes taken from the channel and not handled yet (see [`Capturer::turn`]).
    woken_by: std::collections::VecDeque<Wake>,
    /// A pass some wake asked for that waits for leave to wake (see `awake`).
    owed_pass: bool,
    /// Leave to be awake, held while the database does not rest.
    awake: Option<crate::awake::Awake>,
    /// This capturer's own wakes, for the queue of databases waiting for leave to wake.
    own_wakes: Option<crate::pool::WakeSender>,
    /// Queued for leave to wake, and not yet told it was given back.
    awaiting_leave: bool,
    /// What the database looked like when the last pass began: a resting database wakes when
    /// it looks otherwise. Taken before the copy, so a commit after it shows as a difference
    /// even if the database rests before any pass sees the commit.
    rest_fingerprint: Option<crate::source::RestFingerprint>,
    /// When the last file event found the resting database unchanged (see [`REST_RECHECK`]).
    rest_event_at: Option<Instant>,
}

/// What a turn of the capturer asks for next.
pub(crate) enum Turn {
    /// Another turn once this long has passed, or sooner if something wakes the capturer.
    Again(Duration),
    /// The capturer has stopped, with this outcome.
    Done(Result<(), Error>),
}

/// Where a capturer leaves its claim on the database when it ends (see `SourceDb::claim`).
pub(crate) type ClaimKeeper = std::sync::Arc<std::sync::Mutex<Option<File>>>;

impl Drop for Capturer {
    fn drop(&mut self) {
        if let Some(keeper) = &self.claim_keeper {
            // A duplicate shares the open file and so its flock, which outlives the connections.
            if let Ok(file) = self.db.db_file().try_clone() {
                *keeper.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
            }
        }
    }
}

impl Capturer {
    pub(crate) fn new(
        db_path: PathBuf,
        meta: MetaDir,
        db: SourceDb,
        state: watch::Sender<ShadowState>,
        replica_positions: Vec<watch::Receiver<Option<Pos>>>,
        counters: std::sync::Arc<DbCounters>,
    ) -> Capturer {
        let generation = resume_generation(&meta);
        let resumed = generation.is_some();
        Capturer {
            wal_path: wal_path(&db_path),
            db_path,
            meta,
            db,
            generation,
            buf: Vec::new(),
            state,
            replica_positions,
            last_wal_stat: None,
            last_change: Instant::now(),
            pending_new_generation: None,
            pending_snapshot: false,
            unsealed_snapshot: None,
            // A run that ended between a new generation and its housekeeping left the old one.
            stale_generations: resumed,
            rolled_at_backfill: None,
            pin_vouches: false,
            pin_may_defer: false,
            #[cfg(test)]
            after_observe: None,
            pending_syncs: Vec::new(),
            syncs_requested: 0,
            counters,
            timing: TIMING,
            events: None,
            polling: false,
            last_copy: None,
            busy_passes: 0,
            failures: Default::default(),
            disk_full_spells: Default::default(),
            replica_counters: Vec::new(),
            large_wal_since: None,
            max_local_wal: None,
            bound_checked: BoundLook { at: Instant::now(), copied: 0, used: 0 },
            last_drop: None,
            held_back_logged: false,
            snapshot_wal_ratio: 0.0,
            snapshot_upload: None,
            ended_kept: None,
            slowest_shipped: None,
            spooling: Spooling::default(),
            spools_logged: Default::default(),
            pin_gate: Default::default(),
            idle_release: None,
            claim_keeper: None,
            started: false,
            woken_by: Default::default(),
            owed_pass: false,
            awake: None,
            own_wakes: None,
            awaiting_leave: false,
            rest_fingerprint: None,
            rest_event_at: None,
        }
    }

    /// When the capturer ends, its claim on the database passes to `keeper`: the uploaders
    /// drain after the capturer's last pass, and a second replicator must not start on the
    /// shadow they read before they are done.
    pub(crate) fn hand_claim_to(&mut self, keeper: ClaimKeeper) {
        self.claim_keeper = Some(keeper);
    }

    /// Lets the database rest once nothing has changed for `after` and every replica holds all
    /// of it: the pin is let go and only the database file stays open (see `SourceDb::rest`), so
    /// an idle database costs one descriptor and no lock probes. A file event wakes it. `None`:
    /// the pin is always held.
    pub(crate) fn rest_when_idle(&mut self, after: Option<Duration>) {
        self.idle_release = after;
    }

    /// The leave to be awake that the database was opened under, and where the queue for leave
    /// tells this capturer it may ask again.
    pub(crate) fn hold_awake(&mut self, awake: crate::awake::Awake, own_wakes: crate::pool::WakeSender) {
        self.awake = Some(awake);
        self.own_wakes = Some(own_wakes);
    }

    /// Leave to wake the resting database; false while none is free: the capturer is then
    /// queued (once) and woken when some is given back, or asks again after [`AWAKE_RETRY`].
    fn leave_to_wake(&mut self) -> bool {
        if !self.db.is_resting() || self.awake.is_some() {
            return true;
        }
        let queue = if self.awaiting_leave { None } else { self.own_wakes.as_ref() };
        self.awake = crate::awake::try_acquire(queue);
        self.awaiting_leave = self.awake.is_none() && (self.awaiting_leave || queue.is_some());
        self.awake.is_some()
    }

    /// The gate the uploaders read a snapshot framed from the database through.
    pub(crate) fn share_pin_gate(&mut self, gate: std::sync::Arc<crate::protocol::PinGate>) {
        self.pin_gate = gate;
    }

    /// Runs on this thread until [`Wake::Shutdown`] (or every sender is gone), then makes a
    /// last copy: the capture pool's turns, waiting between them here (the tests' driver).
    #[cfg(test)]
    pub(crate) fn run(mut self, wakes: Receiver<Wake>) -> Result<(), Error> {
        loop {
            match self.turn(&wakes) {
                Turn::Again(wait) => {
                    if let Ok(wake) = wakes.recv_timeout(wait) {
                        self.woken_by.push_back(wake);
                    }
                }
                Turn::Done(result) => return result,
            }
        }
    }

    /// How long the capturer may wait for a wake before it has something to do on its own.
    fn timeout(&self) -> Duration {
        let after_drop = self.passes_fast();
        match (self.db.is_pinned(), self.last_change.elapsed() < self.timing.active_window) {
            _ if after_drop => AFTER_DROP_SPACING,
            _ if self.db.is_resting() => REST_POLL,
            _ if self.polling => self.timing.pass_spacing,
            (true, true) => self.timing.probe_active,
            (true, false) => self.timing.probe_idle,
            (false, _) => self.timing.poll,
        }
    }

    /// One turn: handles every wake waiting (or, with none, what the timeout is for) and says
    /// when the next turn is due if nothing wakes the capturer first. Never waits for a wake
    /// itself, so a few threads can take turns for thousands of databases (`pool`).
    pub(crate) fn turn(&mut self, wakes: &Receiver<Wake>) -> Turn {
        self.with_copy_buf(|capturer| capturer.turn_with_buf(wakes))
    }

    fn turn_with_buf(&mut self, wakes: &Receiver<Wake>) -> Turn {
        if !self.started {
            self.started = true;
            self.pass_logged();
            return Turn::Again(self.timeout());
        }
        let after_drop = self.passes_fast();
        // A barrier waiting through a blocked pass keeps asking for one; polling, every
        // wake-up is a pass.
        let mut changed = self.owed_pass || !self.pending_syncs.is_empty() || self.polling || after_drop;
        let mut shutdown = false;
        let mut file_event = false;
        let mut wal_event = false;
        let first = match self.woken_by.pop_front().map(Ok).unwrap_or_else(|| wakes.try_recv()) {
            Ok(wake) => {
                // A commit right after the last pass waits for the pass spacing, with whatever
                // else comes meanwhile; after a drop only as long as the timer would
                // (`passes_fast`). A writer the capturer does not poll sends an event with each
                // commit, and each held the pass that would see the restart for the whole
                // spacing, 10 ms where the timer alone passes every 1.
                let spacing = if after_drop { AFTER_DROP_SPACING } else { self.timing.pass_spacing };
                if let Some(wait) = spacing.checked_sub(self.last_change.elapsed()) {
                    if !wait.is_zero() && !matches!(wake, Wake::Shutdown) {
                        self.woken_by.push_front(wake);
                        return Turn::Again(wait);
                    }
                }
                Some(wake)
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Wake::Shutdown),
        };
        // Coalesce a burst of events into one pass.
        let more = std::iter::from_fn(|| self.woken_by.pop_front()).collect::<Vec<_>>();
        for wake in first.into_iter().chain(more).chain(std::iter::from_fn(|| wakes.try_recv().ok())) {
            match wake {
                Wake::Changed => file_event = true,
                Wake::WalChanged => {
                    file_event = true;
                    wal_event = true;
                }
                Wake::NewGeneration(reason) => {
                    self.pending_new_generation = Some(reason);
                    changed = true;
                }
                Wake::Snapshot => {
                    self.pending_snapshot = true;
                    changed = true;
                }
                Wake::Sync(reply) => {
                    self.pending_syncs.push(reply);
                    self.syncs_requested += 1;
                    changed = true;
                }
                Wake::Shutdown => shutdown = true,
                Wake::LeaveFree => self.awaiting_leave = false,
            }
        }
        if self.db.is_resting() && !changed && !shutdown {
            // A file event, or the rest poll. Other databases' connections, the application
            // opening its own, a full event queue: most wake nothing here, and a resting database
            // stays at rest unless its WAL or wal-index moved.
            if self.rest_undisturbed() {
                // The event may come before the writer updates the wal-index: look again.
                if wal_event {
                    self.rest_event_at = Some(Instant::now());
                }
                return Turn::Again(if file_event { REST_RECHECK } else { self.rest_recheck() });
            }
            file_event = true;
        }
        changed |= file_event;
        if shutdown {
            // A resting database nothing has written to since is left resting: it was shipped
            // whole before it rested, and waking thousands at once for nothing would take as
            // many descriptors.
            let needs_pass = !self.db.is_resting() || changed || !self.rest_undisturbed();
            if needs_pass && !self.leave_to_wake() {
                self.owed_pass = true;
                self.woken_by.push_front(Wake::Shutdown);
                return Turn::Again(AWAKE_RETRY);
            }
            return Turn::Done(self.final_pass(needs_pass));
        }
        if self.db.blocking_checkpoint_waiting() {
            // Unpinned (the pin was dropped for a large WAL life), the commits since the last
            // pass are still in the WAL until the checkpoint truncates or restarts it: a pin
            // taken now holds that off (the checkpoint waits for readers) while they are
            // copied. If the checkpoint has already back-filled everything, the pin cannot
            // hold it, and the continuity checks see what was lost.
            if !self.db.is_pinned() && self.db.roll_pin() {
                self.judge_new_pin();
                debug!(db = %self.db_path.display(), "pinned for a checkpoint that began while unpinned");
            }
            if self.db.is_pinned() {
                self.step_aside();
            }
            // Until the checkpoint finishes nothing can be appended: nothing to protect.
            return Turn::Again(self.timeout());
        }
        if changed || self.wal_stat_changed() {
            if !self.leave_to_wake() {
                self.owed_pass = true;
                return Turn::Again(AWAKE_RETRY);
            }
            self.owed_pass = false;
            self.last_change = Instant::now();
            let before = self.shadow_end();
            self.pass_logged();
            let copied = self.shadow_end() != before;
            if copied {
                crate::fail_point::hit("capture");
            }
            self.follow_events_or_poll(copied);
            if crate::awake::contended() && self.may_rest() {
                self.rest();
            }
        } else {
            self.follow_backfill();
            // What uploads that landed since the last pass shipped leaves the disk now, not at
            // the next commit (in the replicate bench an index the replica already held was
            // spooled when the writer stopped).
            let shipped = self.generation.as_ref().and_then(|g| slowest_position(&self.replica_positions, g.id));
            if shipped.is_some() && shipped != self.slowest_shipped && !self.waiting_for_restart() {
                self.remove_shipped_shadow();
                self.free_held_snapshot();
            }
            if !self.waiting_for_restart() {
                self.remove_stale_generations();
            }
            self.spool_waiting();
            if let Err(e) = self.fsync_shadow() {
                warn!(db = %self.db_path.display(), error = %e, "cannot fsync the shadow wal; retrying");
            } else if self.may_rest() {
                self.rest();
            }
        }
        Turn::Again(self.timeout())
    }

    /// When a resting database that nothing woke looks next: at growing intervals while the
    /// last file event is recent (see [`REST_RECHECK`]), then after [`REST_POLL`].
    fn rest_recheck(&self) -> Duration {
        match self.rest_event_at.map(|at| at.elapsed()) {
            Some(since) if since < REST_WATCH => since.max(REST_RECHECK),
            _ => REST_POLL,
        }
    }

    /// Whether the resting database looks as it did when the last pass began.
    fn rest_undisturbed(&mut self) -> bool {
        self.rest_fingerprint.as_ref() == Some(&self.db.rest_fingerprint())
    }

    /// The last copy at shutdown, unless a resting database needs none.
    fn final_pass(&mut self, needs_pass: bool) -> Result<(), Error> {
        if !needs_pass {
            self.publish(true);
            self.answer_syncs();
            return Ok(());
        }
        crate::fail_point::stall("final-pass");
        // The pin goes at the end of this: what it kept in the live WAL is stored first.
        let mut result = self.timed_pass().and_then(|()| self.store_deferred()).and_then(|()| self.fsync_shadow());
        // On a full disk each pass copies what fits, and the uploads free the shadow's
        // space as they ship it: the last commits still go out if passes go on a while.
        let retry_until = Instant::now() + FULL_DISK_FINAL_COPY;
        while result.as_ref().err().is_some_and(Error::is_disk_full) && Instant::now() < retry_until {
            std::thread::sleep(self.timing.pass_spacing.max(Duration::from_millis(5)));
            result = self.timed_pass().and_then(|()| self.store_deferred()).and_then(|()| self.fsync_shadow());
        }
        self.publish(true);
        if result.is_ok() {
            self.answer_syncs();
        }
        // The uploads read what only the live WAL holds: the pin stays until they have.
        while self.live_pending() && Instant::now() < retry_until + FULL_DISK_FINAL_COPY {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.database_snapshot_pending() {
            // Out of time, and the snapshot only the database file holds is not shipped:
            // once the pin goes, the file no longer matches it.
            self.pin_gate.set(false);
            self.db.release_all();
            return Err(Error::FlushIncomplete {
                unshipped: 1,
                detail: "the local disk is full, and the new generation's snapshot, read straight from the database file, had not reached every replica before the deadline".into(),
            });
        }
        if self.live_pending() {
            // Out of time: once the pin goes, nothing vouches for those bytes. They are
            // withdrawn (the published end goes back to what the shadow file holds), so
            // no uploader reads them anywhere, and the flush is reported incomplete.
            let withdrawn = self.generation.as_mut().and_then(|g| g.shadow.as_mut()).and_then(|shadow| {
                let from = shadow.live_from.take()?;
                let to = std::mem::replace(&mut shadow.committed_len, from);
                Some((shadow.index, from, to))
            });
            self.publish(true);
            self.db.release_all();
            if let Some((index, from, to)) = withdrawn {
                return Err(Error::FlushIncomplete {
                    unshipped: 1,
                    detail: format!("the local disk is full, and committed WAL of index {index:08x} from offset {from} to {to} was only in the application's WAL; the replicas did not take it before the deadline"),
                });
            }
        }
        self.db.release_all();
        result
    }

    /// Whether the database may rest now (see [`Capturer::rest_when_idle`]): idle long enough,
    /// watched by file events, nothing asked of the capturer, nothing the pin protects waiting,
    /// and every replica holding everything. While other databases wait to wake (see `awake`),
    /// at once, and once everything is in the shadow: the uploaders read that without the pin,
    /// and the shipped shadow is cleared at the next wake instead of now.
    fn may_rest(&self) -> bool {
        let Some(after) = self.idle_release else { return false };
        let Some(generation) = &self.generation else { return false };
        let pressed = crate::awake::contended();
        !self.db.is_resting()
            && (pressed || self.last_change.elapsed() >= after)
            && self.events.is_some()
            && !self.polling
            && self.pending_syncs.is_empty()
            && self.pending_new_generation.is_none()
            && !self.pending_snapshot
            && !self.waiting_for_restart()
            && generation.shadow.as_ref().is_none_or(|s| s.live_from.is_none() || s.deferred)
            && !self.database_snapshot_pending()
            && (pressed || all_hold(&self.replica_positions, generation.end()))
    }

    /// Lets the pin and every descriptor but the database file go. If SQLite has back-filled the
    /// whole WAL life, which the shadow holds to its end, and no other process reads WAL frames,
    /// the application's next write restarts the WAL (a reader that starts now takes read-mark 0)
    /// and nothing can be appended to this life: it is sealed, so the next life continues the
    /// generation though it overwrites the old one's frames before the pass that wakes sees them.
    fn rest(&mut self) {
        // A generation with no WAL life yet stamps the database file by a pass first (the stamp
        // counts only before a read that found no life), unless the file changed too recently
        // to stamp: a first life written while it rests is then proven by the file, not taken
        // for a lost one that costs a generation and its snapshot.
        let stamp_owed =
            self.generation.as_ref().is_some_and(|g| g.shadow.is_none() && g.file_before_first_life.is_none());
        if stamp_owed && self.settled_file_stamp().is_some() {
            self.pass_logged();
            if !self.may_rest() {
                return;
            }
        }
        // What the pin kept in the live WAL for the replicas is stored first (under contention a
        // database rests before the replicas have everything); a disk without room for it keeps
        // the pin.
        self.leave_live_if_shipped();
        if let Err(e) = self.store_deferred() {
            debug!(db = %self.db_path.display(), error = %e, "cannot store what the pin kept; staying awake");
            return;
        }
        if self.live_pending() {
            return;
        }
        self.db.release_all();
        // A life not yet back-filled is back-filled now, so that it can be sealed: otherwise an
        // application checkpoint while the database rests, then a commit, restarts the WAL over
        // frames no pass saw end, and costs a new generation and its snapshot. The shadow holds
        // the whole life, so SQLite may write those frames into the file (rule 9 in
        // ARCHITECTURE.md). Not while other databases wait to wake: their wait would include
        // its two fsyncs (in the bench at 10,000 databases, runs with it had commit lag p50 up to
        // 75 ms; the cause is not established).
        let shadow = self.generation.as_ref().and_then(|g| g.shadow.as_ref());
        let mut before = self.db.wal_index_header();
        if let (Some(index), Some(shadow), false) = (before, shadow, crate::awake::contended()) {
            if index.backfilled < index.max_frame && shadow_holds_life(&index, shadow) {
                self.db.backfill();
                before = self.db.wal_index_header();
            }
        }
        let life_ends_here = match (before, shadow) {
            (Some(index), Some(shadow)) => index.backfilled == index.max_frame && shadow_holds_life(&index, shadow),
            _ => false,
        };
        // Asked once the pin is gone (the probe sees only other processes' locks), and the header
        // read again: a reader that took a read-mark past 0 before the back-fill completed, or a
        // write since, shows here.
        let sealed = life_ends_here && !self.db.wal_readers_past_mark0() && self.db.wal_index_header() == before;
        let shadow_closed = match self.generation.as_mut().and_then(|g| g.shadow.as_mut()) {
            Some(shadow) => shadow.close_file(),
            None => Ok(()),
        };
        match shadow_closed.and_then(|()| self.db.rest()) {
            Ok(()) => {
                if let (true, Some(shadow)) = (sealed, self.generation.as_mut().and_then(|g| g.shadow.as_mut())) {
                    shadow.sealed = true;
                }
                self.rolled_at_backfill = None;
                self.awake = None;
                crate::trim::after_rest();
                debug!(db = %self.db_path.display(), sealed, "idle: resting (pin and connections released)");
            }
            Err(e) => {
                // The file is locked exclusively right now (an application closing, or one in
                // exclusive locking mode): stay awake and try again later.
                debug!(db = %self.db_path.display(), error = %e, "cannot rest; staying awake");
                self.last_change = Instant::now();
                if let Err(e) = self.db.wake() {
                    warn!(db = %self.db_path.display(), error = %e, "cannot reopen the database; retrying on the next change");
                }
            }
        }
    }

    /// The most disk the shadow may take while a replica cannot keep up. Past it, the history
    /// the replicas lack is dropped and a new generation starts: its snapshot holds every
    /// commit, so nothing committed is lost, only the points in time between (and the WAL the
    /// replicas lack is deleted with the old generation's directory). On a memory volume that
    /// history dies with the instance anyway; an unbounded shadow would fill the app's disk.
    pub(crate) fn bound_local_wal(&mut self, bytes: Option<u64>) {
        self.max_local_wal = bytes;
    }

    /// Frees the local snapshot once all of `replicas` report holding it.
    pub(crate) fn free_snapshots_held_by(&mut self, replicas: Vec<std::sync::Arc<crate::status::ReplicaCounters>>) {
        self.replica_counters = replicas;
    }

    /// Receives the database's file events from now on.
    pub(crate) fn take_events(&mut self, events: Subscription) {
        self.events = Some(events);
    }

    /// Stops taking file events once passes keep finding new commits ([`BUSY_PASSES_TO_POLL`]),
    /// and passes every `pass_spacing` instead; takes them again once passes have found nothing
    /// for `active_window`, then passes once more, so a commit made before the watch was back
    /// is not missed. A saturated writer's every write queued an inotify event, a tenth of its
    /// own CPU, while the pass spacing made them useless. Its checkpoints' fsyncs pause it for
    /// a few milliseconds; taking events back at the first empty pass, the capturer switched
    /// back and forth and the events still cost the writer 3.5% of its CPU.
    fn follow_events_or_poll(&mut self, copied: bool) {
        let Some(events) = &self.events else { return };
        if !copied {
            self.busy_passes = 0;
            let quiet = self.last_copy.is_none_or(|last| last.elapsed() >= self.timing.active_window);
            if self.polling && quiet {
                match events.set_polling(false) {
                    Ok(()) => {
                        debug!(db = %self.db_path.display(), "the writer paused; taking file events again")
                    }
                    Err(e) => {
                        // Without events, the WAL is polled every second (as when they never worked).
                        warn!(db = %self.db_path.display(), error = %e, "file events unavailable; polling the WAL every second");
                        self.events = None;
                    }
                }
                self.polling = false;
                self.pass_logged();
            }
            return;
        }
        let now = Instant::now();
        let in_a_row = self.last_copy.is_some_and(|last| now.duration_since(last) <= 2 * self.timing.pass_spacing);
        self.last_copy = Some(now);
        self.busy_passes = if in_a_row { self.busy_passes.saturating_add(1) } else { 1 };
        if !self.polling && self.busy_passes >= BUSY_PASSES_TO_POLL {
            // Unwatching cannot fail in a way that loses events: at worst they keep coming.
            if events.set_polling(true).is_ok() {
                self.polling = true;
                debug!(db = %self.db_path.display(), "a busy writer; passing every {:?} instead of taking file events", self.timing.pass_spacing);
            }
        }
    }

    /// Fsyncs the shadow's tail not yet fsynced (see `shadow::FSYNC_SPACING`).
    fn fsync_shadow(&mut self) -> Result<(), Error> {
        match self.generation.as_mut().and_then(|g| g.shadow.as_mut()) {
            Some(shadow) => shadow.fsync(),
            None => Ok(()),
        }
    }

    fn pass_logged(&mut self) {
        match self.timed_pass() {
            Ok(()) => {
                if let Some(unlogged) = self.failures.recovered() {
                    info!(db = %self.db_path.display(), unlogged_failures = unlogged, "capture pass recovered");
                }
                self.answer_syncs()
            }
            Err(e) => {
                if let Some(unlogged) = self.failures.failed() {
                    warn!(db = %self.db_path.display(), error = %e, disk_full = e.is_disk_full(), failures_since_last_logged = unlogged, "capture pass failed; retrying on the next change (logged once a minute while it lasts)");
                }
            }
        }
    }

    fn timed_pass(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        let result = self.pass();
        self.counters.record_pass(started.elapsed(), result.is_ok());
        let live = self
            .generation
            .as_ref()
            .and_then(|g| g.shadow.as_ref())
            .is_some_and(|s| s.live_from.is_some() && !s.deferred);
        let was_full = self.counters.record_disk_full(live || result.as_ref().err().is_some_and(Error::is_disk_full));
        if live && !was_full {
            if let Some(unlogged) = self.disk_full_spells.failed() {
                warn!(db = %self.db_path.display(), disk_full = true, spells_since_last_logged = unlogged, "local disk full: shipping straight from the live wal, and holding the application's wal until the replicas have it (logged once a minute while it recurs)");
            }
        }
        result
    }

    /// After a successful pass: everything committed before the barriers asked is in the
    /// published end.
    fn answer_syncs(&mut self) {
        let end = self.generation.as_ref().map(Generation::end);
        for reply in self.pending_syncs.drain(..) {
            let _ = reply.send(end);
        }
    }

    /// One pass: pin, copy, release the old pin, publish.
    fn pass(&mut self) -> Result<(), Error> {
        self.with_copy_buf(Capturer::pass_with_buf)
    }

    /// Runs `f` with `buf` lent from the thread's copy buffer, unless it already holds it.
    fn with_copy_buf<T>(&mut self, f: impl FnOnce(&mut Capturer) -> T) -> T {
        if !self.buf.is_empty() {
            return f(self);
        }
        let lent = COPY_BUFS.lock().unwrap_or_else(|e| e.into_inner()).pop();
        self.buf = lent.unwrap_or_else(|| vec![0u8; COPY_CHUNK_BYTES]);
        let result = f(self);
        let buf = std::mem::take(&mut self.buf);
        COPY_BUFS.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
        result
    }

    fn pass_with_buf(&mut self) -> Result<(), Error> {
        match self.db.at_path() {
            AtPath::Opened => {}
            AtPath::Replaced => self.follow_replaced_file()?,
            // A deleted database has nothing more to replicate, and its WAL's absence says
            // nothing of what the replicas hold: read as a truncation, it started a new
            // generation from the unlinked file, older than the commits already shipped from its
            // WAL, and restores then lost them. A file created at the path later is followed as a
            // replaced one.
            AtPath::Gone => return Ok(()),
        }
        if self.idle_release.is_some() {
            self.rest_fingerprint = Some(self.db.rest_fingerprint());
        }
        if self.db.is_resting() {
            self.db.wake()?;
            debug!(db = %self.db_path.display(), "woke from rest");
            crate::fail_point::pause("slow-wake");
        }
        // The pin held now, if any, was taken before the previous copy and held ever since, so the
        // WAL cannot have lost a frame that copy did not see (see `SourceDb`), if it vouches.
        let since_last_copy = self.continuity();
        self.leave_live_if_shipped();
        // While the live WAL holds bytes a replica lacks, the pin that protects them stays.
        let rolled = !self.live_pending()
            && self.may_pin_after_drop()
            && self.db.pin_age().is_none_or(|age| age >= self.timing.pin_roll)
            && self.db.roll_pin();
        if rolled {
            self.pin_may_defer = pin_holds_off_a_restart(self.db.index_at_pin());
            self.keep_waiting_if_the_pin_holds_off_the_restart();
        }
        // Under a pin that holds off a restart the new frames stay in the live WAL until shipped
        // (see `store_deferred`). Under one that may not, what earlier pins kept there is stored
        // first, while the previous pin still holds.
        let defer = self.may_defer();
        let mut result = if defer { Ok(()) } else { self.store_deferred() };
        if result.is_ok() {
            result = self.copy(since_last_copy, defer);
        }
        if rolled {
            self.pin_vouches = result.is_ok() && self.pin_covers(self.db.index_at_pin());
        }
        self.db.release_previous();
        if result.is_ok() && !self.pending_snapshot && self.wal_outgrew_snapshot() {
            self.pending_snapshot = true;
        }
        // Not while a drop waits for the restart: a snapshot holds this pass's pin for as long as
        // it reads the database (370 ms beside 10,000-row updates under load), so the
        // application's checkpoints back-filled only up to it, the wait timed out, and the WAL
        // went on until the next drop, 1.7 s on (a 307 MiB life where most are under 20 MiB).
        // The first pass pinned again takes it.
        if result.is_ok() && self.pending_snapshot && self.db.is_pinned() && !self.waiting_for_restart() {
            result = self.snapshot();
        }
        // A snapshot, or a new generation's start, holds the pin tens of milliseconds, and one on
        // read-mark 0 lets the app restart the WAL meanwhile: followed now, the new life can be
        // let go below rather than a pass later.
        if result.is_ok() && self.db.is_pinned() && self.restarted_since_copy() {
            result = self.copy(self.continuity(), self.may_defer());
        }
        self.publish(false);
        // Before the housekeeping: the drop must come before the application's next commit runs
        // its checkpoint, and beside 10,000-row updates (a commit every 12 ms) the housekeeping's
        // 1.5 to 3 ms after a 4 to 6 ms copy often made it late, and the life went on.
        if result.is_ok() {
            self.let_busy_wal_restart();
        }
        if self.unsealed_snapshot.is_some() {
            result = self.seal_snapshot();
            self.publish(false);
        }
        // Housekeeping waits while a drop does (see `PinDrop`): deleting a shipped index or a
        // 70 MB local snapshot took up to 14 ms, and a flat-out writer restarted its WAL twice
        // before the pass after the drop (a new generation).
        if !self.waiting_for_restart() {
            self.remove_stale_generations();
            self.remove_shipped_shadow();
            self.free_held_snapshot();
            self.spool_waiting();
            self.enforce_local_bound();
        }
        self.release_pass_pin();
        result
    }

    /// Compresses, a step at a time, an ended index the store has not taken for a while: during
    /// an outage the backlog then takes its compressed size on the local disk, not its raw size.
    fn spool_waiting(&mut self) {
        // After a pin drop passes come every millisecond to catch the next WAL life.
        if self.waiting_for_restart() {
            return;
        }
        let Some(generation) = &self.generation else { return };
        let Some(current) = generation.shadow.as_ref().map(|s| s.index) else { return };
        let slowest = self.slowest_shipped.filter(|p| p.generation == generation.id).map(|p| (p.index, p.offset));
        let spooled = self.spooling.step(&self.meta.wal_dir(&generation.id), current, slowest);
        if spooled.indexes > 0 {
            debug!(db = %self.db_path.display(), generation = %generation.id, indexes = spooled.indexes, raw = spooled.raw, framed = spooled.framed, "spooled ended wal indexes");
            if let Some(unlogged) = self.spools_logged.failed() {
                info!(db = %self.db_path.display(), generation = %generation.id, raw_bytes = spooled.raw, spooled_bytes = spooled.framed, spooled_since_last_logged = unlogged, "the replicas have not taken ended wal indexes for a while: they wait compressed (logged once a minute while it lasts)");
            }
        }
        if let Some((index, error)) = spooled.failure {
            debug!(db = %self.db_path.display(), generation = %generation.id, index, error = %error, "cannot spool an ended wal index; it stays raw for now");
        }
    }

    /// See [`Capturer::bound_local_wal`]. Looking lists the shadow files, so it is done once a
    /// second, and sooner (at most every [`BOUND_LOOK_SPACING`]) once what was copied since the
    /// last look may have taken the shadow past the bound: looked at only once a second, beside
    /// 10,000-row updates (150 MB of WAL a second) in an outage, a 48 MiB bound was passed by
    /// 58 to 124 MiB before the new generation started; looked at sooner, by 1.7 to 14.1 MiB.
    fn enforce_local_bound(&mut self) {
        let (Some(bound), Some(generation)) = (self.max_local_wal, &self.generation) else { return };
        if self.pending_new_generation.is_some() {
            return;
        }
        // Every byte copied counts, stored or not: the shadow cannot have grown by more.
        let copied = self.counters.shadow_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let last = self.bound_checked;
        let may_be_past = last.used + copied.saturating_sub(last.copied) > bound;
        let due = if may_be_past { BOUND_LOOK_SPACING } else { Duration::from_secs(1) };
        if last.at.elapsed() < due {
            return;
        }
        let shadow = generation.shadow.as_ref();
        // The current index is the WAL life the app's own WAL holds too, needed whatever happens.
        let used = crate::shadow::disk_bytes(&self.meta.wal_dir(&generation.id), shadow.map(|s| s.index));
        // Once it ends it counts, whole if no replica has taken it, stored or still in the live WAL.
        let current = shadow.map_or(0, |s| s.committed_len);
        self.bound_checked = BoundLook { at: Instant::now(), copied, used: used + current };
        if used > bound {
            warn!(db = %self.db_path.display(), generation = %generation.id, used, bound, "the local shadow wal passed max-local-wal while a replica could not take it: the history it lacks is dropped, and a new generation's snapshot holds every commit");
            self.pending_new_generation =
                Some(format!("the local shadow wal passed max-local-wal ({used} bytes > {bound})"));
        }
    }

    /// The database path names a new file: its history is not the old file's. walstream
    /// reopens it and the pass starts a new generation from it.
    fn follow_replaced_file(&mut self) -> Result<(), Error> {
        // Opened first, so a file that is not a database leaves the old connections in place
        // and the error is retried on the next pass.
        let replacement = SourceDb::open(&self.db_path)?;
        replacement.claim()?;
        // The old connections, and the pin with them, go: what it kept in the old file's WAL
        // is stored first, so that no uploader reads the new file's WAL for it.
        if let Err(e) = self.store_deferred() {
            debug!(db = %self.db_path.display(), error = %e, "cannot store what the pin kept before following the replaced file");
        }
        // The path now names another file: no snapshot may be framed from it for the old one.
        self.pin_gate.set(false);
        drop(std::mem::replace(&mut self.db, replacement));
        self.last_wal_stat = None;
        self.rolled_at_backfill = None;
        self.pending_new_generation = Some("database file replaced".into());
        Ok(())
    }

    /// A FULL/RESTART/TRUNCATE checkpoint of another process waits for walstream's pin. It holds
    /// the write lock, so one more copy captures the WAL life to its end; then walstream steps
    /// aside and the checkpoint proceeds.
    ///
    /// A pin with read-mark 0 (taken on a life SQLite had back-filled whole, as a pin taken for a
    /// checkpoint already waiting often is) does not hold off a TRUNCATE's last step, so the
    /// checkpoint can end, and the application commit into the next life, while the pin is
    /// held. If the checkpoint is no longer waiting after the copy, one more copy under that
    /// pin follows the restart: let go first, the next pass found the old life's tail gone,
    /// nothing to vouch for it, and started a new generation (`faults::a_replica_down_beside…`,
    /// about 1 run in 50 under load).
    fn step_aside(&mut self) {
        let result = self.store_deferred().and_then(|()| self.copy(self.continuity(), false));
        if self.live_pending() {
            // The checkpoint waits until the replicas hold what only the live WAL has.
            self.publish(false);
            return;
        }
        if result.is_ok() {
            if self.db.blocking_checkpoint_waiting() {
                if let Some(shadow) = self.generation.as_mut().and_then(|g| g.shadow.as_mut()) {
                    shadow.sealed = true;
                }
            } else if self.copy(self.continuity(), false).is_err() {
                debug!(db = %self.db_path.display(), "cannot copy again after a checkpoint that ended under the pin");
            }
        }
        self.db.release_all();
        self.publish(false);
        debug!(db = %self.db_path.display(), "stepped aside for a checkpoint");
    }

    /// True while the live WAL holds committed bytes that are not in the shadow file and that
    /// some replica lacks: until they are shipped, the pin must not move.
    fn live_pending(&self) -> bool {
        if self.database_snapshot_pending() {
            return true;
        }
        let Some(generation) = &self.generation else { return false };
        let Some(shadow) = generation.shadow.as_ref() else { return false };
        let Some(from) = shadow.live_from else { return false };
        shadow.committed_len > from && !all_hold(&self.replica_positions, generation.end())
    }

    /// Whether the live WAL holds bytes of the current index that the disk had no room for, or
    /// would have none for when the pin must go, and some replica lacks: the uploaders ship
    /// them at once. On a full disk the application's WAL can only restart once they have.
    fn live_for_space_pending(&self) -> bool {
        if self.database_snapshot_pending() {
            return true;
        }
        let Some(generation) = &self.generation else { return false };
        let Some(shadow) = &generation.shadow else { return false };
        let Some(from) = shadow.live_from.filter(|_| self.live_pending()) else { return false };
        let unstored = shadow.committed_len - from;
        !shadow.deferred
            || disk_space(&self.meta.wal_dir(&generation.id))
                .is_some_and(|(_, free)| free < unstored + STORE_ROOM_MARGIN)
    }

    /// Before the pin goes: stores what the passes left in the live WAL under it (see
    /// `ShadowIndex::append_from`), so that nothing but the shadow needs the old WAL life. A disk
    /// too full for it serves the rest from the live WAL as rule 7 does, and the pin stays.
    fn store_deferred(&mut self) -> Result<(), Error> {
        self.with_copy_buf(Capturer::store_deferred_with_buf)
    }

    fn store_deferred_with_buf(&mut self) -> Result<(), Error> {
        let Some(generation) = self.generation.as_mut() else { return Ok(()) };
        let generation_id = generation.id;
        let Some(shadow) = generation.shadow.as_mut() else { return Ok(()) };
        if !shadow.deferred {
            return Ok(());
        }
        let before = shadow.committed_len;
        // What every replica holds of this index need not be stored.
        let shipped = self
            .replica_positions
            .iter()
            .map(|p| {
                p.borrow().filter(|p| p.generation == generation_id && p.index == shadow.index).map_or(0, |p| p.offset)
            })
            .min()
            .unwrap_or(0);
        let intact = match LiveWal::open(&self.wal_path)? {
            Some(live) => shadow.store_deferred(&live.file, live.len, &mut self.buf, shipped)?,
            None => false,
        };
        // Commits since the last pass come along: they count as copied (`wal_outgrew_snapshot`).
        let newly = shadow.committed_len.saturating_sub(before);
        self.counters.shadow_bytes.fetch_add(newly, std::sync::atomic::Ordering::Relaxed);
        if !intact {
            // The pin held since these bytes were read, so this should not happen; if it does,
            // nothing vouches for them, and a new generation's snapshot holds every commit.
            self.pending_new_generation =
                Some("the wal no longer held bytes walstream's pin kept for the replicas".into());
        }
        // Published before the pin can go: an uploader that read those bytes from the live WAL
        // checks after the read that they are still served there, and reads them again from the
        // shadow if not. Published only after the release, a read of a WAL the app had already
        // restarted could pass that check.
        self.publish(false);
        Ok(())
    }

    /// Stores the current index in its file again once the replicas hold what the live WAL
    /// served (see `ShadowIndex::leave_live`).
    fn leave_live_if_shipped(&mut self) {
        if self.live_pending() {
            return;
        }
        if let Some(shadow) = self.generation.as_mut().and_then(|g| g.shadow.as_mut()) {
            let for_space = !shadow.deferred;
            if shadow.live_from.is_some() && shadow.leave_live() && for_space {
                debug!(db = %self.db_path.display(), index = shadow.index, "disk space again; the shadow wal is stored locally again");
            }
        }
    }

    /// Where the shadow of the current WAL life ends: (index, committed length).
    fn shadow_end(&self) -> Option<(u32, u64)> {
        let shadow = self.generation.as_ref()?.shadow.as_ref()?;
        Some((shadow.index, shadow.committed_len))
    }

    fn wal_stat_changed(&mut self) -> bool {
        let stat =
            std::fs::metadata(&self.wal_path).ok().map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
        let changed = stat != self.last_wal_stat;
        self.last_wal_stat = stat;
        changed
    }

    fn publish(&mut self, is_final: bool) {
        let state = match &self.generation {
            None => ShadowState { is_final, syncs_requested: self.syncs_requested, ..ShadowState::default() },
            Some(generation) => ShadowState {
                generation: Some(generation.id),
                wal_dir: self.meta.wal_dir(&generation.id),
                snapshot: Some(generation.snapshot.clone()),
                end: Some(generation.end()),
                is_final,
                syncs_requested: self.syncs_requested,
                // A life served from the live WAL from its first frame is served whole from
                // there, its header too: the pin keeps that header as it is, and a header shipped
                // from the shadow would be an object of its own, a request more per WAL life.
                live_from: generation.shadow.as_ref().and_then(|s| {
                    let from = s.live_from?;
                    Some((s.index, if from <= WAL_HEADER_SIZE as u64 { 0 } else { from }))
                }),
                ship_now: self.live_for_space_pending(),
                wal_path: self.wal_path.clone(),
                disk_tight: disk_is_tight(&self.meta.wal_dir(&generation.id)),
                ended: generation.ended.clone(),
                end_moved_at: None,
            },
        };
        self.state.send_if_modified(|current| {
            let mut state = state;
            state.end_moved_at = if state.end != current.end { Some(Instant::now()) } else { current.end_moved_at };
            let modified = *current != state;
            *current = state;
            modified
        });
    }

    /// Deletes the directories of generations before the current one, as housekeeping (after
    /// the pass's drop): done as a generation started, under its pin, deleting the old one's
    /// shadow took 20 to 28 ms of the 47 to 62 the start took beside 10,000-row updates in an
    /// outage past `max-local-wal` (the 55 to 60 MB of ended lives the bound let through).
    fn remove_stale_generations(&mut self) {
        if !self.stale_generations {
            return;
        }
        if let Some(generation) = &self.generation {
            self.meta.clean(&generation.id);
            self.stale_generations = false;
        }
    }

    /// Deletes the shadow indexes every replica has shipped, and punches out of the one the
    /// slowest replica is in what it has shipped of it: on a memory volume the shadow takes RAM
    /// only for what some replica still lacks.
    fn remove_shipped_shadow(&mut self) {
        let Some(generation) = self.generation.as_mut() else {
            return;
        };
        let Some(shipped) = slowest_position(&self.replica_positions, generation.id) else { return };
        generation.ended.retain(|&(index, _)| index >= shipped.index);
        let current = generation.shadow.as_ref().map_or(u32::MAX, |s| s.index);
        self.slowest_shipped = Some(shipped);
        self.spooling.shipped_below(shipped.index);
        let wal_dir = self.meta.wal_dir(&generation.id);
        let ended = self.meta.shadow_files_below(&generation.id, shipped.index.min(current));
        let newest = ended.last().map(|&(index, _)| index);
        for (index, path) in ended {
            if Some(index) != newest {
                let _ = std::fs::remove_file(path);
            }
        }
        // The newest ended index stays, punched through its end: a replica's position is the
        // end of its last segment, so after a restart only that file's length shows a replica
        // ending there holds the whole index and goes on at the next (a steady stream's new
        // life waits for the next slot). Without it the restart would start a new generation.
        // A spooled one becomes such a file; where that fails the spool serves the same end.
        if let Some(newest) = newest {
            let raw = wal_dir.join(name::shadow_wal_file_name(newest));
            if self.ended_kept.as_ref() != Some(&raw) {
                if let Err(e) = crate::spool::keep_length_only(&wal_dir, newest) {
                    debug!(db = %self.db_path.display(), error = %e, "cannot replace a shipped spool by its length");
                }
                shadow::discard_whole(&raw);
                self.ended_kept = Some(raw);
            }
        }
        match generation.shadow.as_mut() {
            Some(shadow) if shadow.index == shipped.index => shadow.discard_below(shipped.offset),
            _ if shipped.index < current => shadow::discard_shipped(
                &self.meta.wal_dir(&generation.id).join(name::shadow_wal_file_name(shipped.index)),
                shipped.offset,
            ),
            _ => {}
        }
    }
}

/// The position every replica of `generation` has reached: `None` while one's is unknown or
/// in another generation.
fn slowest_position(positions: &[watch::Receiver<Option<Pos>>], generation: GenerationId) -> Option<Pos> {
    let mut slowest: Option<Pos> = None;
    for position in positions {
        let pos = (*position.borrow()).filter(|p| p.generation == generation)?;
        slowest = Some(slowest.map_or(pos, |s| s.min(pos)));
    }
    slowest
}

/// True when every replica's position is at or past `at` (in its generation).
fn all_hold(positions: &[watch::Receiver<Option<Pos>>], at: Pos) -> bool {
    positions.iter().all(|p| p.borrow().is_some_and(|pos| pos.generation == at.generation && pos >= at))
}

/// Picks up the generation a previous run left, if its snapshot was completed.
fn resume_generation(meta: &MetaDir) -> Option<Generation> {
    let id = meta.read_generation()?;
    let snapshot = meta.local_snapshot(&id)?;
    crate::spool::tidy(&meta.wal_dir(&id));
    let shadow = match meta.shadow_indexes(&id).last() {
        Some(&index) => match ShadowIndex::open(&meta.wal_dir(&id), index) {
            Ok(Some(shadow)) => Some(shadow),
            _ => return None,
        },
        None => None,
    };
    // What a replica may still lack of the indexes the last run ended, raw or spooled.
    let wal_dir = meta.wal_dir(&id);
    let current = shadow.as_ref().map_or(0, |s| s.index);
    let mut ended: Vec<(u32, u64)> = meta
        .shadow_files_below(&id, current)
        .into_iter()
        .filter_map(|(index, _)| Some((index, crate::spool::index_len(&wal_dir, index)?)))
        .collect();
    ended.dedup_by_key(|&mut (index, _)| index);
    info!(generation = %id, "resuming generation");
    Some(Generation {
        id,
        snapshot,
        shadow,
        index_before_first_life: None,
        file_before_first_life: None,
        wal_at_snapshot: 0,
        index_started_at: 0,
        ended,
    })
}

/// Free space under which the disk counts as tight: a quarter of the filesystem, but at least
/// 16 MiB and at most 256 MiB. A memory volume as small as the Cloud Run guide's 8 MiB is always
/// tight, so its commits go up once half a MiB waits rather than at the next slot (held for a
/// second at 1,000 commits/s they filled it); an ordinary disk is tight only when nearly full.
const TIGHT_DISK_MIN: u64 = 16 << 20;
const TIGHT_DISK_MAX: u64 = 256 << 20;

/// Whether the filesystem holding `dir` has less free space than the tight mark above; false
/// when it cannot tell.
fn disk_is_tight(dir: &Path) -> bool {
    disk_space(dir).is_some_and(|(size, free)| free < (size / 4).clamp(TIGHT_DISK_MIN, TIGHT_DISK_MAX))
}

/// (size, bytes free) of the filesystem holding `dir`; `None` when it cannot tell.
fn disk_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid C string and an out-pointer to a zeroed struct of the right type.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    let block = stat.f_frsize as u64;
    Some((stat.f_blocks as u64 * block, stat.f_bavail as u64 * block))
}

/// Room kept free beside what the pin keeps in the live WAL before it counts as having no room
/// to store it (see `Capturer::live_for_space_pending`).
const STORE_ROOM_MARGIN: u64 = 1 << 20;

#[cfg(test)]
mod tests;
