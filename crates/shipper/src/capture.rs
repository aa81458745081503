//! The capturer: the only code that touches the live database, a turn at a time on the capture
//! pool (`pool`). It copies committed WAL frames
//! into the shadow WAL, decides when a WAL restart starts a new index and when lost continuity
//! starts a new generation, and publishes the shadow's end for the uploaders.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::{debug, info, warn};
use walstream_format::wal::WalHeader;
use walstream_format::{name, GenerationId, Pos, WAL_HEADER_SIZE};

use crate::error::{io_err, Error};
use crate::meta::{LocalSnapshot, MetaDir};
use crate::protocol::{ShadowState, Wake, PASS_SPACING};
use crate::shadow::{self, ShadowIndex, COPY_CHUNK_BYTES};
use crate::source::{wal_path, AtPath, FileStamp, SourceDb, WalIndexHeader};
use crate::spool::Spooling;
use crate::status::DbCounters;
use crate::watch::Subscription;

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

/// A pin with a read-mark above 0 keeps SQLite from ever restarting the WAL (Litestream #1536),
/// so walstream moves its pin to read-mark 0 whenever the application's checkpoint has
/// back-filled the whole WAL ([`Capturer::follow_backfill`]). A writer that never pauses leaves
/// no such moment: once one WAL life holds this many frames, walstream drops its pin after
/// copying so the application's checkpoint can restart the WAL (only while the capturer polls a
/// busy writer, see `let_busy_wal_restart`). It is SQLite's default
/// `wal_autocheckpoint`, where the life of a WAL no one pins ends: at 32 MiB, a 1,000 tx/s
/// writer's WAL grew to 32 MiB against 4 MiB without walstream. A TRUNCATE checkpoint landing
/// in that gap right after a commit walstream has not copied costs a new generation, never data.
const DROP_PIN_WAL_FRAMES: u64 = 1000;

/// A generation with no WAL life yet proves its first life first by the database file
/// (`Generation::file_before_first_life`): a life leaves the WAL only through a restart or a
/// truncation, and SQLite does either only once the life is back-filled whole into the file, a
/// write that moves its change time. So while the file's stamp is the one taken before a WAL
/// read that found no life, every commit since that read is still in the WAL. A database that
/// began with no WAL and rested till its first write otherwise had nothing to prove that life
/// by (its writer's new connection picks random salts) and took a second generation, with a
/// snapshot, at that write. The kernel stamps a write with a clock that moves in ticks (a few
/// ms): a file changed less than this long before its stamp was taken proves nothing, as a
/// write right after could carry the same times (on a filesystem that keeps whole seconds, 3 s:
/// `FileStamp::settled`).
const FILE_STAMP_SETTLED: Duration = Duration::from_millis(100);

/// How long a WAL life of a writer the capturer does not poll stays past
/// [`DROP_PIN_WAL_FRAMES`] before the pin is dropped: such a writer's commits each run SQLite's
/// autocheckpoint, which back-fills up to the pin and never all of it, so its WAL grew to
/// [`DROP_PIN_ANY_WRITER_BYTES`].
const DROP_PIN_AFTER_SLOW: Duration = Duration::from_secs(1);

/// Any writer's WAL life is let go at this size, polled or not: a writer committing every 20 ms
/// is not polled, and without this its WAL grew without end (9.4 MiB in 12 s, and on).
const DROP_PIN_ANY_WRITER_BYTES: u64 = 32 << 20;

/// While a dropped pin waits for the WAL to restart (see [`PinDrop`]) the capturer passes this
/// often, not every [`PASS_SPACING`]: a flat-out writer fills a restarted WAL life to SQLite's
/// checkpoint size in about 15 ms, and with a pass 10 ms after the drop the WAL restarted twice
/// unseen (a new generation) in 1 of 3 bench runs.
const AFTER_DROP_SPACING: Duration = Duration::from_millis(1);

/// The longest a dropped pin waits for the WAL to restart before a pass pins again. The
/// application's checkpoint of a large life (10,000-row updates back to back) takes a good
/// part of this; with a pin taken again 50 ms after the drop, it held a read-mark past 0
/// when that checkpoint ended, and the WAL grew to 464 MiB in 3 s against 4 MiB alone.
const UNPINNED_AFTER_DROP: Duration = Duration::from_secs(1);

/// After a drop in which the WAL did not restart (the application did not write, or wrote
/// without a checkpoint), the pin is held this long before the next drop. Dropping on every
/// pass left a large life unpinned nearly all the time, so an application's TRUNCATE
/// checkpoint right after a commit usually beat the pass that would copy it (a new
/// generation; seen in the 200 MB restore test under the suite's load).
const DROP_PIN_RETRY: Duration = Duration::from_secs(1);

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

/// Where SQLite's autocheckpoint begins, in WAL bytes (see [`DROP_PIN_WAL_FRAMES`]).
fn checkpoint_size(frame: u64) -> u64 {
    WAL_HEADER_SIZE as u64 + DROP_PIN_WAL_FRAMES * frame
}

/// Start a new generation before an index's offsets stop fitting the 8 hex digits of a name.
const MAX_INDEX_BYTES: u64 = name::MAX_SEGMENT_OFFSET - (256 << 20);

/// What a copy may assume about the WAL since the previous copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Continuity {
    /// A pin was held throughout: no frame the previous copy did not see can have been lost.
    Pinned,
    /// No pin was held: the copy checks the live WAL still holds the shadow's last frame.
    Unproven,
}

/// A pin let go so the application's checkpoint can restart a large WAL life
/// (`Capturer::let_busy_wal_restart`). Until the restart, or the back-fill that frees it, no
/// pin outlives a pass, and none is taken while the application's checkpoint runs (see
/// `Capturer::may_pin_after_drop`): one taken then holds a read-mark past 0, which forbids the
/// restart, and the application's checkpoint of a large life outlasted the passes that let go
/// again; a pin that still reads past 0 is let go and the wait goes on
/// (`Capturer::keep_waiting_if_pinned_past_mark0`). Each pass begins unpinned, so its copy is
/// checked as any unpinned one (`Continuity::Unproven`).
#[derive(Clone, Copy, Debug)]
struct PinDrop {
    /// The shadow index of the life let go, and its salt-1: a wal-index with another has restarted.
    index: u32,
    salt1: u32,
    at: Instant,
    /// The life's frames when it was let go (see `Capturer::reader_holds_drop_back`).
    at_frame: u32,
    /// When a pass pinned again; `None` while none has.
    pinned_again: Option<Instant>,
}

/// What [`Capturer::observe`] found the live WAL to be, relative to the shadow.
enum Observed<'w> {
    /// Continuity is lost, or the generation must end: a new one starts, for this reason.
    NewGeneration(&'static str),
    /// The generation has seen no WAL life yet, and there is none.
    NoLife,
    /// The generation's first WAL life: its index is the snapshot's.
    FirstLife { live: &'w LiveWal, header_bytes: [u8; WAL_HEADER_SIZE], header: WalHeader },
    /// Gone (a TRUNCATE checkpoint, or the last connection closed) exactly where the shadow
    /// ends: the index is sealed, and the next life must carry `next_salt1` where the wal-index
    /// said which.
    Ended { next_salt1: Option<u32> },
    /// The shadow's own life, maybe with new frames.
    SameLife { live: &'w LiveWal },
    /// SQLite restarted the WAL once: the index ends (after the old life's tail, where the new
    /// life has not overwritten it) and the next begins.
    Restarted { live: &'w LiveWal, header_bytes: [u8; WAL_HEADER_SIZE], header: WalHeader, tail_intact: bool },
}

struct Generation {
    id: GenerationId,
    snapshot: LocalSnapshot,
    /// The shadow of the current WAL life; `None` until the first WAL header is seen.
    shadow: Option<ShadowIndex>,
    /// The wal-index as the generation found it with no WAL life on disk (see
    /// [`nothing_committed_since`]); `None` for a resumed generation, which cannot tell.
    index_before_first_life: Option<WalIndexHeader>,
    /// The database file as stamped before a WAL read that found no life and proved nothing
    /// lost (see [`FILE_STAMP_SETTLED`]); `None` for a resumed generation, or when the file had
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
    /// The index whose life first reached [`DROP_PIN_WAL_FRAMES`], and when.
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
                // else comes meanwhile.
                if let Some(wait) = self.timing.pass_spacing.checked_sub(self.last_change.elapsed()) {
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
    fn wal_outgrew_snapshot(&mut self) -> bool {
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
            self.keep_waiting_if_pinned_past_mark0();
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
        if result.is_ok() && self.pending_snapshot && self.db.is_pinned() {
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

    /// Empties the local snapshot once every replica holds it: it is a compressed copy of the
    /// whole database, which on a memory volume is RAM. The empty file still records which
    /// snapshot the generation has, so a restart resumes the generation; a replica that lacks
    /// it later gets a new generation (`Error::SnapshotDiscarded`).
    fn free_held_snapshot(&mut self) {
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
    fn database_snapshot_pending(&self) -> bool {
        self.generation.as_ref().is_some_and(|g| g.snapshot.from_database) && !self.snapshot_held_by_all()
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

    /// Snapshots the database file at the current index, under the pin (see
    /// [`MetaDir::write_unsealed_snapshot`] for why the label is right); [`Capturer::seal_snapshot`]
    /// puts it in place.
    fn snapshot(&mut self) -> Result<(), Error> {
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
    fn seal_snapshot(&mut self) -> Result<(), Error> {
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

    /// See [`DROP_PIN_WAL_FRAMES`].
    fn let_busy_wal_restart(&mut self) {
        let Some(shadow) = self.generation.as_ref().and_then(|g| g.shadow.as_ref()) else {
            return;
        };
        let (index, len, salt1) = (shadow.index, shadow.committed_len, shadow.header.salt1);
        let frame = shadow.header.frame_size();
        // Let go before the commit that takes the life past SQLite's checkpoint size, if one as
        // large as the last would: that commit's checkpoint then meets no pin, and the WAL
        // restarts where it does without walstream. Let go after it, the life went on through
        // another transaction or more (10,000-row updates: 3 to 6 of them, not 2).
        if len + shadow.last_transaction < checkpoint_size(frame) {
            self.large_wal_since = None;
            return;
        }
        // Only for a writer that keeps committing (the capturer polls it) for a while past the
        // size: after a burst, such as a VACUUM and a few commits, the application may run a
        // TRUNCATE checkpoint, which the pin hands off cleanly (`step_aside`) while a dropped pin
        // could lose the last commits to it (a new generation; seen in 1 of 8 runs without this,
        // and in 1 of 6 without the polling condition). A writer too slow to be polled (one
        // commit every 20 ms, or a second) is let go once its life has stayed past the size for
        // `DROP_PIN_AFTER_SLOW`, and any writer at `DROP_PIN_ANY_WRITER_BYTES`.
        let since = match self.large_wal_since {
            Some((large, since)) if large == index => since,
            _ => self.large_wal_since.insert((index, Instant::now())).1,
        };
        let busy = self.polling;
        let slow = since.elapsed() >= DROP_PIN_AFTER_SLOW;
        // A drop that did not end the life is tried again once the pin has been back a while.
        let retry_due = self.last_drop.is_none_or(|drop| {
            let pinned_again = drop.pinned_again.unwrap_or(drop.at + UNPINNED_AFTER_DROP);
            drop.index != index || Instant::now().saturating_duration_since(pinned_again) >= DROP_PIN_RETRY
        });
        if (busy || slow || len >= DROP_PIN_ANY_WRITER_BYTES)
            && retry_due
            && self.db.is_pinned()
            && !self.restarted_since_copy()
            && !self.reader_holds_drop_back(index)
        {
            // What the replicas lack is stored, not shipped at once: a life ends about every
            // second at 1,000 commits/s, and each one's last bytes shipped on their own would be
            // a request more a second than litestream makes (issue 26). A full disk keeps the pin.
            if self.store_deferred().is_err() || self.live_pending() {
                return;
            }
            debug!(db = %self.db_path.display(), index, "wal life is large and never fully back-filled; dropping the pin so the application's checkpoint can restart it");
            let at_frame = self.db.wal_index_header().map_or(0, |h| h.max_frame);
            self.last_drop = Some(PinDrop { index, salt1, at: Instant::now(), at_frame, pinned_again: None });
            self.db.release_all();
            self.backfill_on_a_full_disk();
        }
    }

    /// Whether the application restarted the WAL after this pass's copy, which a pin with
    /// read-mark 0 allows (one taken on a life SQLite had back-filled whole). A drop then would
    /// let go of the only thing keeping the new life's frames, which no copy has read, from
    /// being back-filled and written over: the next pass could not tell that apart from a lost
    /// life and would start a new generation. Beside 10,000-row updates the WAL restarted so
    /// during each new generation's 86 ms snapshot, and each such start, in a store outage past
    /// `max-local-wal`, was followed 90 ms later by a second generation and a second snapshot
    /// (22 of 24 in one run). Kept, the pin lets a copy follow the restart first: the one the
    /// pass makes after its snapshot (see `pass_with_buf`), or the next pass's.
    fn restarted_since_copy(&mut self) -> bool {
        let Some(salt1) = self.generation.as_ref().and_then(|g| g.shadow.as_ref()).map(|s| s.header.salt1) else {
            return false;
        };
        self.db.wal_index_header().is_some_and(|index| index.salt1 != salt1)
    }

    /// Whether the last drop of this life failed because another process reads the WAL from
    /// before it (a long read transaction): that reader holds the back-fill, and with it the
    /// restart, back to its read-mark, so another drop would free nothing and only store what
    /// the pin kept in the live WAL. Beside a reader holding one transaction for 10 s, drops
    /// every 2 s stored nearly the whole 3 GB WAL again (3,236 writes), doubling what went to
    /// the app's disk. The app's writer reads from where its transaction began, so one begun
    /// before the drop counts too, until it commits.
    fn reader_holds_drop_back(&mut self, index: u32) -> bool {
        let Some(drop) = self.last_drop.filter(|d| d.index == index) else {
            return false;
        };
        let held_back = self.db.reader_older_than(drop.at_frame);
        if held_back && !self.held_back_logged {
            debug!(db = %self.db_path.display(), dropped_at_frame = drop.at_frame, "a reader older than the last drop holds the wal's back-fill back; keeping the pin");
        }
        self.held_back_logged = held_back;
        held_back
    }

    /// Right after a drop on a disk without room: the application's WAL has grown past the
    /// space its earlier lives took while pinned, so its commits fail with SQLITE_FULL, and
    /// SQLite's autocheckpoint, which runs only after a commit, never comes to restart it. A
    /// PASSIVE checkpoint does its work (never waiting, as in rule 9) once the shadow holds the
    /// whole life, so the app's next write restarts the WAL into the space it already has.
    fn backfill_on_a_full_disk(&mut self) {
        let Some(generation) = &self.generation else { return };
        let Some(shadow) = &generation.shadow else { return };
        if disk_space(&self.meta.wal_dir(&generation.id)).is_none_or(|(_, free)| free >= STORE_ROOM_MARGIN) {
            return;
        }
        let index = self.db.wal_index_header();
        if index.is_some_and(|index| index.backfilled < index.max_frame && shadow_holds_life(&index, shadow)) {
            self.db.backfill();
            debug!(db = %self.db_path.display(), "disk full: back-filled the wal so the application's next write can restart it");
        }
    }

    /// Once SQLite has back-filled every frame, a read transaction begun now takes read-mark 0:
    /// the application's next write may then restart the WAL, but nothing can be back-filled,
    /// so the WAL cannot restart again unseen. The old pin is held until the new one exists, and
    /// a complete back-fill under it means no frame was appended since it began, so everything
    /// in the WAL has been copied.
    fn follow_backfill(&mut self) {
        self.leave_live_if_shipped();
        if !self.db.is_pinned() || self.live_pending() {
            return;
        }
        let Some(index) = self.db.wal_index_header() else {
            return;
        };
        if index.max_frame == 0 || index.backfilled != index.max_frame {
            return;
        }
        let at = (index.salt1, index.max_frame);
        if self.rolled_at_backfill != Some(at) {
            self.rolled_at_backfill = Some(at);
            if self.db.roll_pin() {
                self.judge_new_pin();
                self.db.release_previous();
                // Rolled as the application's checkpoint ended, the pin can still read past 0
                // (see `keep_waiting_if_pinned_past_mark0`): the next look rolls again.
                if self.db.pin_reads_past_mark0() {
                    self.rolled_at_backfill = None;
                }
            }
        }
    }

    /// After a pin taken outside a pass's copy: what it vouches for (`pin_vouches`) and whether
    /// frames may stay in the live WAL under it (`pin_may_defer`), from the wal-index it was
    /// taken at.
    fn judge_new_pin(&mut self) {
        let at_pin = self.db.index_at_pin();
        self.pin_vouches = self.pin_covers(at_pin);
        self.pin_may_defer = pin_holds_off_a_restart(at_pin);
    }

    /// Whether new frames may stay in the live WAL now: under a pin that holds off a restart,
    /// and that stays after the pass.
    fn may_defer(&self) -> bool {
        self.db.is_pinned() && self.pin_may_defer && !self.waiting_for_restart()
    }

    /// Whether passes come every [`AFTER_DROP_SPACING`]: from a drop until the restart it let
    /// happen is seen, and while a busy writer's next commit may bring its life to the drop
    /// (see `let_busy_wal_restart`). Seen a pass spacing late, a writer of 10,000-row updates
    /// had committed the next one meanwhile, and its lives were 3 transactions long, not 2.
    fn passes_fast(&self) -> bool {
        let Some(shadow) = self.generation.as_ref().and_then(|g| g.shadow.as_ref()) else { return false };
        // Until a pass has pinned again, not only until one has seen the restart: the pass that
        // sees it may not pin (the app's checkpoint still ran when it asked), and the next, a
        // busy writer's 10 ms later, came after the app's commits and TRUNCATE, which then met no
        // pin to step aside (a new generation; the VACUUM test, 2 runs in 60 alone).
        let restart_due = self.last_drop.is_some_and(|drop| {
            (drop.index == shadow.index || drop.pinned_again.is_none())
                && drop.at.elapsed() < UNPINNED_AFTER_DROP + AFTER_DROP_SPACING
        });
        let size = checkpoint_size(shadow.header.frame_size());
        let (len, last) = (shadow.committed_len, shadow.last_transaction);
        let drop_due_at_next_commit = self.polling && len + last < size && len + 2 * last >= size;
        restart_due || drop_due_at_next_commit
    }

    /// True while a dropped pin waits for the WAL to restart (see [`PinDrop`]).
    fn waiting_for_restart(&self) -> bool {
        self.last_drop.is_some_and(|drop| drop.pinned_again.is_none())
    }

    /// Whether a pass may pin now. After a drop, a pass pins again to keep once the application
    /// has restarted the WAL (the wal-index carries another salt-1), or its checkpoint has
    /// back-filled the whole life (a pin then takes read-mark 0, which leaves the restart free
    /// and holds off the next back-fill, so the WAL cannot restart twice unseen), or
    /// [`UNPINNED_AFTER_DROP`] has passed. Until then a pass pins only while it copies
    /// (`release_pass_pin`), and only when the wal-index shows a commit to copy
    /// (`commit_to_copy`).
    ///
    /// That holds while the application's checkpoint of the dropped life runs, too. Such a
    /// copy is often the commit that started the checkpoint, a VACUUM's thousand frames or a
    /// large update, and checksumming them under load took 15 to 40 ms: unpinned, the
    /// checkpoint ended meanwhile, and the VACUUM test's next commits restarted the WAL and its
    /// TRUNCATE ended that life too before the next pass (a new generation, in 3 to 8 runs in
    /// 100 beside two busy loops; 0 in 160 with the pin). A pin that meets the checkpoint's end
    /// holds the restart back only until the pass ends: beside 10,000-row updates the WAL
    /// restarted as often with it (a median of 68 lives in 3 s against 66).
    fn may_pin_after_drop(&mut self) -> bool {
        if !self.waiting_for_restart() {
            return true;
        }
        // No header is no news: walstream's own connections keep the wal-index there, so it
        // was read while a writer was between its two copies. Taken as leave to pin, that
        // pinned mid-life in 2 of 30 runs of 10,000-row updates, holding off the restart until
        // the next drop, a second later at the earliest: WALs of 151 and 217 MiB (4 MiB alone).
        let index = self.db.wal_index_header();
        let Some(drop) = self.last_drop.as_mut() else { return true };
        let let_go = index.is_some_and(|h| h.salt1 != drop.salt1 || h.backfilled >= h.max_frame);
        let timed_out = drop.at.elapsed() >= UNPINNED_AFTER_DROP;
        if let_go || timed_out {
            drop.pinned_again = Some(Instant::now());
            debug!(db = %self.db_path.display(), after_ms = drop.at.elapsed().as_millis() as u64, index = ?index.map(|h| (h.salt1 != drop.salt1, h.backfilled, h.max_frame)), "pinning again after a drop");
        }
        if timed_out && !let_go {
            // No checkpoint came: the drop was early for this writer (its last transaction was
            // larger than the next). It waits for the life to pass the checkpoint size again.
            if let Some(shadow) = self.generation.as_mut().and_then(|g| g.shadow.as_mut()) {
                shadow.last_transaction = 0;
            }
        }
        let_go || timed_out || self.commit_to_copy(index)
    }

    /// Whether the wal-index shows a commit the shadow lacks, or cannot say. A pass that has none
    /// to copy pins for nothing, and a pin held as the application's next commit runs its
    /// checkpoint keeps that checkpoint from back-filling the life whole, so the WAL goes on.
    fn commit_to_copy(&self, index: Option<WalIndexHeader>) -> bool {
        let Some(shadow) = self.generation.as_ref().and_then(|g| g.shadow.as_ref()) else { return true };
        // 0: no header, or another life's.
        let committed = committed_hint(index, &shadow.header);
        committed == 0 || committed > shadow.committed_len
    }

    /// After a pass pinned again because the application's checkpoint back-filled the dropped
    /// life whole: a pin taken as that checkpoint ends still gets a read-mark past 0 (the
    /// checkpoint holds read-mark 0 until just after it wrote the back-fill; see
    /// `SourceDb::pin_reads_past_mark0`), and held, that pin forbids the restart the drop was for
    /// until the next drop, a second on at the earliest: WALs of 120 to 293 MB where the
    /// application alone keeps 4 MB, in about 1 run in 25 of 10,000-row updates. The wait goes on
    /// instead, and this pin goes at the pass's end (`release_pass_pin`).
    fn keep_waiting_if_pinned_past_mark0(&mut self) {
        let Some(drop) = self.last_drop.as_mut() else { return };
        let same_life = self.db.index_at_pin().is_some_and(|h| h.salt1 == drop.salt1);
        let by_backfill = drop.at.elapsed() < UNPINNED_AFTER_DROP;
        if drop.pinned_again.is_some() && same_life && by_backfill && self.db.pin_reads_past_mark0() {
            drop.pinned_again = None;
            debug!(db = %self.db_path.display(), "the pin taken again after a drop reads past read-mark 0; waiting on for the restart");
        }
    }

    /// After a pass that pinned only to copy (see [`Capturer::may_pin_after_drop`]): lets go
    /// again. Nothing was left in the live WAL under it by choice (`may_defer`); what a full disk
    /// left there keeps it until the replicas have it (rule 7).
    fn release_pass_pin(&mut self) {
        if self.waiting_for_restart() && self.db.is_pinned() && !self.live_pending() {
            self.db.release_all();
        }
    }

    /// What a copy may assume since the last one: only a pin that vouches (see `pin_vouches`).
    fn continuity(&self) -> Continuity {
        if self.db.is_pinned() && self.pin_vouches {
            Continuity::Pinned
        } else {
            Continuity::Unproven
        }
    }

    /// Whether the pin taken when the wal-index read `at_pin` keeps every frame walstream has not
    /// copied from being overwritten: whether the shadow now holds every frame the index then said
    /// was committed in its life. A pin taken while SQLite had back-filled the whole WAL gets
    /// read-mark 0, which holds off back-fill but not a restart: the application may restart the
    /// WAL over those frames (already in the database file) before the copy reads them, and a
    /// copy that then finds fewer than the index said shows it happened. Once the shadow holds
    /// them, a restart loses nothing, and frames appended later cannot be back-filled, so cannot
    /// be lost, while that pin holds. A shadow already in a later life saw that restart in the
    /// copy, which checked it as the previous pin allowed.
    fn pin_covers(&self, at_pin: Option<WalIndexHeader>) -> bool {
        let Some(at_pin) = at_pin else { return false };
        if at_pin.max_frame == 0 {
            return true;
        }
        let Some(shadow) = self.generation.as_ref().and_then(|g| g.shadow.as_ref()) else { return false };
        if shadow.header.salt1 != at_pin.salt1 {
            // One restart adds 1 to salt-1: a later life is at most a few restarts on.
            return (shadow.header.salt1.wrapping_sub(at_pin.salt1) as i32) > 0;
        }
        let frame = walstream_format::wal::frame_size(self.db.page_size());
        shadow.committed_len >= WAL_HEADER_SIZE as u64 + u64::from(at_pin.max_frame) * frame
    }

    /// The database file's stamp, unless it changed within [`FILE_STAMP_SETTLED`].
    fn settled_file_stamp(&self) -> Option<FileStamp> {
        self.db.file_stamp().filter(|stamp| stamp.settled(FILE_STAMP_SETTLED))
    }

    fn wal_stat_changed(&mut self) -> bool {
        let stat =
            std::fs::metadata(&self.wal_path).ok().map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
        let changed = stat != self.last_wal_stat;
        self.last_wal_stat = stat;
        changed
    }

    /// Copies new committed frames into the shadow, following restarts and starting a new
    /// generation where continuity is lost: [`observe`](Capturer::observe) decides what the live
    /// WAL is to the shadow, and this acts on it.
    fn copy(&mut self, since_last_copy: Continuity, defer: bool) -> Result<(), Error> {
        if let Some(reason) = self.pending_new_generation.take() {
            return self.start_new_generation(reason);
        }
        // Taken before the WAL is read: a first life proven absent in that read stands for
        // everything committed before the stamp, too.
        let file_stamp = match &self.generation {
            Some(generation) if generation.shadow.is_none() => self.settled_file_stamp(),
            _ => None,
        };
        let wal = LiveWal::open(&self.wal_path)?;
        // Read after the WAL was opened, so it describes that file or a later state of it.
        let wal_index = self.db.wal_index_header();
        let observed = self.observe(since_last_copy, wal.as_ref(), wal_index)?;
        #[cfg(test)]
        if let Some(race) = self.after_observe.take() {
            race();
        }
        let Some(generation) = self.generation.as_mut() else {
            return self.start_new_generation("no generation exists".into());
        };
        let hint = |header: &WalHeader| committed_hint(wal_index, header);
        let shadow_bytes = &self.counters.shadow_bytes;
        let added = |bytes: u64| shadow_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        match observed {
            Observed::NewGeneration(reason) => self.start_new_generation(reason.into()),
            Observed::NoLife => {
                // Nothing was committed up to this read (observe proved it): the next life is
                // checked against it, so restarts with no commit between passes cost nothing.
                if wal_index.is_some() {
                    generation.index_before_first_life = wal_index;
                }
                if file_stamp.is_some() {
                    generation.file_before_first_life = file_stamp;
                }
                Ok(())
            }
            Observed::FirstLife { live, header_bytes, header } => {
                let wal_dir = self.meta.wal_dir(&generation.id);
                let mut shadow = ShadowIndex::create(&wal_dir, generation.snapshot.index, header_bytes, header)?;
                added(WAL_HEADER_SIZE as u64);
                added(shadow.append_from(&live.file, live.len, hint(&shadow.header), &mut self.buf, defer)?);
                generation.shadow = Some(shadow);
                Ok(())
            }
            Observed::Ended { next_salt1 } => {
                let shadow = generation.shadow.as_mut().expect("observed against a shadow");
                shadow.sealed = true;
                if next_salt1.is_some() {
                    shadow.next_salt1 = next_salt1;
                }
                Ok(())
            }
            Observed::SameLife { live } => {
                let shadow = generation.shadow.as_mut().expect("observed against a shadow");
                shadow.sealed = false;
                shadow.next_salt1 = None;
                added(shadow.append_from(&live.file, live.len, hint(&shadow.header), &mut self.buf, defer)?);
                Ok(())
            }
            Observed::Restarted { live, header_bytes, header, tail_intact } => {
                let shadow = generation.shadow.as_mut().expect("observed against a shadow");
                // The new life overwrites from the front; frames of the old life beyond its
                // reach may still be there, and carry the old salts, so the chain check
                // accepts only them.
                // No pin vouches for those: they are stored.
                if tail_intact {
                    added(shadow.append_from(&live.file, live.len, hint(&shadow.header), &mut self.buf, false)?);
                }
                // A life that ends with bytes only the live WAL held (the disk was full) and
                // that some replica lacks: the restart writes over them, so nothing vouches for
                // them any more.
                if live_tail_unshipped(shadow, generation.id, &self.replica_positions) {
                    return self.start_new_generation(
                        "the wal restarted while the disk was full, before every replica had its last frames".into(),
                    );
                }
                shadow.finish()?;
                generation.ended.push((shadow.index, shadow.committed_len));
                let mut next =
                    ShadowIndex::create(&self.meta.wal_dir(&generation.id), shadow.index + 1, header_bytes, header)?;
                // A steady writer's next transaction is as large as its last (see
                // `let_busy_wal_restart`); one past the checkpoint size on its own says nothing.
                if shadow.last_transaction < checkpoint_size(shadow.header.frame_size()) {
                    next.last_transaction = shadow.last_transaction;
                }
                generation.index_started_at = added(WAL_HEADER_SIZE as u64);
                debug!(db = %self.db_path.display(), index = next.index, "wal restarted; new index");
                let shadow = generation.shadow.insert(next);
                added(shadow.append_from(&live.file, live.len, hint(&shadow.header), &mut self.buf, defer)?);
                Ok(())
            }
        }
    }

    /// Starts a new generation. Until one has started nothing may be appended to the old one,
    /// so a start that fails (a full disk cannot take the snapshot) is the first thing the next
    /// pass tries again, whatever the live WAL looks like by then.
    fn start_new_generation(&mut self, reason: String) -> Result<(), Error> {
        // Deleted since the pass began (see `pass`): a WAL that went with it is no truncation.
        if self.db.at_path() == AtPath::Gone {
            return Ok(());
        }
        // A generation starts under a pin (see `new_generation`) and keeps it: after a drop a
        // pass may hold none (`may_pin_after_drop`), and one it holds would go at its end. And a
        // drop names an index of the old generation, whose numbers the new one uses again: kept,
        // a drop of index 0 held off the new generation's first drop for `DROP_PIN_RETRY`, and
        // beside 10,000-row updates in a store outage the WAL grew to 233 MB meanwhile.
        self.last_drop = None;
        if !self.db.is_pinned() && self.db.roll_pin() {
            self.judge_new_pin();
        }
        let mut result = self.new_generation(&reason);
        if result.as_ref().err().is_some_and(Error::is_disk_full) {
            // The old generations' files are the room a new one needs, and hold nothing it will
            // not (its snapshot and first index hold every commit). Closed first: a deleted file
            // still takes its space while open.
            self.generation = None;
            self.meta.clean_all();
            result = self.new_generation(&reason);
        }
        if result.is_err() {
            self.pending_new_generation = Some(reason);
        }
        result
    }

    /// What the live WAL is to the current generation's shadow. Reads the WAL, changes nothing.
    fn observe<'w>(
        &self,
        since_last_copy: Continuity,
        wal: Option<&'w LiveWal>,
        wal_index: Option<WalIndexHeader>,
    ) -> Result<Observed<'w>, Error> {
        let Some(generation) = self.generation.as_ref() else {
            return Ok(Observed::NewGeneration("no generation exists"));
        };
        let page_size = self.db.page_size();
        let pinned = since_last_copy == Continuity::Pinned;
        let Some(shadow) = generation.shadow.as_ref() else {
            // No WAL life seen yet in this generation: the first one is the snapshot's index.
            // Unless a pin vouches, a life may have come, been checkpointed into the file and
            // truncated since the snapshot (a database resting, woken by a commit, its pass late
            // for the app's TRUNCATE right after): taken for no life, it was lost, and each one
            // after it, until a pass saw a life before it went.
            let live = wal.and_then(|live| live.header.map(|h| (live, h)));
            let first_since_snapshot = pinned
                || generation.index_before_first_life.is_some_and(|then| {
                    nothing_committed_since(then, wal_index, live.map(|(_, (_, header))| header.salt1))
                })
                // Stamped after the WAL was read (`copy` opens it before this): a back-fill between
                // that read and a stamp taken earlier could have removed a life unseen.
                || generation.file_before_first_life.is_some_and(|then| self.db.file_stamp() == Some(then));
            return Ok(match live {
                _ if !first_since_snapshot => Observed::NewGeneration(
                    "the wal restarted with commits walstream had not copied before its first life",
                ),
                Some((_, (_, header))) if header.page_size != page_size => Observed::NewGeneration("page size changed"),
                Some((live, (header_bytes, header))) => Observed::FirstLife { live, header_bytes, header },
                None => Observed::NoLife,
            });
        };
        if shadow.committed_len >= MAX_INDEX_BYTES {
            return Ok(Observed::NewGeneration("max index size exceeded"));
        }
        let Some((live, (header_bytes, header))) = wal.and_then(|live| live.header.map(|h| (live, h))) else {
            // Truncated (TRUNCATE checkpoint) or deleted (last connection closed).
            let (ended_at_shadow, next_salt1) = match wal_index {
                // A restart keeps the running checksum, and any frame written since the shadow's
                // end would have changed it: this holds however the pin fared meanwhile.
                Some(index) => {
                    let ended = index.max_frame == 0
                        && index.salt1 != shadow.header.salt1
                        && index.frame_checksum == shadow.end_checksum();
                    (ended, Some(index.salt1))
                }
                // No wal-index left to ask (the last connection closed): only the pin can vouch.
                None => (pinned || shadow.sealed, None),
            };
            // Bytes only the live WAL held went with it unless every replica had them (rule 7).
            if ended_at_shadow && !live_tail_unshipped(shadow, generation.id, &self.replica_positions) {
                return Ok(Observed::Ended { next_salt1 });
            }
            return Ok(Observed::NewGeneration("wal truncated with commits walstream had not copied"));
        };
        if header_bytes == *shadow.header_bytes() {
            // Within one WAL life committed frames are never rewritten, so a matching header
            // means continuity unless the file was replaced; the last frame vouches for that.
            let has_frames = shadow.committed_len > WAL_HEADER_SIZE as u64;
            if !pinned && !shadow.sealed && has_frames && !live.still_holds_last_frame(shadow)? {
                return Ok(Observed::NewGeneration("wal overwritten by another process"));
            }
            return Ok(Observed::SameLife { live });
        }
        // The header changed: SQLite restarted the WAL. One restart adds exactly 1 to salt-1;
        // restarts of a WAL already seen empty add more without losing anything.
        if header.salt1 != shadow.next_salt1.unwrap_or(shadow.header.salt1.wrapping_add(1)) {
            return Ok(Observed::NewGeneration("wal restarted more than once while unobserved"));
        }
        if header.page_size != page_size {
            return Ok(Observed::NewGeneration("page size changed"));
        }
        let tail_intact = live.still_holds_last_frame(shadow)?;
        // The new life's first transaction, until it commits, leaves the wal-index as the restart
        // left it: empty, with the old life's running checksum, which any frame committed after
        // the shadow's end would have changed (as for a truncated WAL above). Seen so, the old
        // life ended at the shadow's end. Without this, an app's TRUNCATE right after a pin drop
        // and its next transaction's first frames, both between two passes, cost a new generation
        // (`a_writer_outrunning…`, about 1 run in 40).
        let ended_at_shadow = [wal_index, self.db.index_at_pin()].into_iter().flatten().any(|index| {
            index.max_frame == 0 && index.salt1 == header.salt1 && index.frame_checksum == shadow.end_checksum()
        });
        if !(tail_intact || pinned || shadow.sealed || ended_at_shadow) {
            return Ok(Observed::NewGeneration("wal overwritten by another process"));
        }
        Ok(Observed::Restarted { live, header_bytes, header, tail_intact })
    }

    /// Starts a generation: the current WAL life becomes index 0, then the database file is
    /// snapshotted. Runs under the caller's pin, so no frame can be back-filled into the file
    /// that index 0 does not also hold.
    fn new_generation(&mut self, reason: &str) -> Result<(), Error> {
        // The gate is open only while the current generation's snapshot comes from the database
        // and holds the pin (`live_pending`); that ends here, and an upload still reading for the
        // old generation must fail rather than read what the pin may no longer cover.
        self.pin_gate.set(false);
        let id = GenerationId::time_ordered();
        info!(db = %self.db_path.display(), generation = %id, reason, "new generation");
        self.spooling.reset();
        // Index 0 begins here: a restore from this generation's snapshot replays it from the start.
        let index_started_at = self.counters.shadow_bytes.load(std::sync::atomic::Ordering::Relaxed);
        self.meta.create_generation(&id)?;
        let mut shadow = None;
        let file_before_first_life = self.settled_file_stamp();
        let live = LiveWal::open(&self.wal_path)?;
        // Read after the WAL was opened, as in `copy`. None would cost the next unpinned pass a
        // generation.
        let index_before_first_life = self.db.settled_wal_index_header();
        if let Some(live) = live {
            if let Some((bytes, header)) = live.header {
                let mut index = ShadowIndex::create(&self.meta.wal_dir(&id), 0, bytes, header)?;
                self.counters.shadow_bytes.fetch_add(WAL_HEADER_SIZE as u64, std::sync::atomic::Ordering::Relaxed);
                let defer = self.may_defer();
                self.counters.shadow_bytes.fetch_add(
                    index.append_from(&live.file, live.len, 0, &mut self.buf, defer)?,
                    std::sync::atomic::Ordering::Relaxed,
                );
                shadow = Some(index);
            }
        }
        let snapshot = match self.meta.write_snapshot(&id, 0, self.db.db_file(), &mut self.buf) {
            Err(e) if e.is_disk_full() => {
                // No room for a compressed copy: the uploaders frame the database itself, under
                // this pin, which stays until every replica has it (`live_pending`).
                warn!(db = %self.db_path.display(), generation = %id, "no room on the local disk for the snapshot: shipping it straight from the database file, holding the application's wal until every replica has it");
                LocalSnapshot { index: 0, path: self.db_path.clone(), created: SystemTime::now(), from_database: true }
            }
            other => other?,
        };
        self.pending_snapshot = false;
        self.meta.write_generation(&id)?;
        self.stale_generations = true;
        // Opened only once the generation is in place, whose pending snapshot holds the pin.
        self.pin_gate.set(snapshot.from_database);
        self.snapshot_upload = Some(SnapshotUpload::started(&snapshot));
        self.generation = Some(Generation {
            id,
            snapshot,
            shadow,
            index_before_first_life,
            file_before_first_life,
            wal_at_snapshot: index_started_at,
            index_started_at,
            ended: Vec::new(),
        });
        // Whatever the pin vouched for before, index 0 was read after it was taken.
        self.pin_vouches = self.db.is_pinned() && self.pin_covers(self.db.index_at_pin());
        Ok(())
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

/// Whether the wal-index `now` shows that nothing was committed since it read `then`, when the
/// WAL had no life on disk, other than in the life now in the live WAL (salt-1 `live_salt1`),
/// whose committed frames are all still there. That life is the first since `then` if it has
/// `then`'s salt-1: SQLite writes the header of the life after a restart with the salt-1 the
/// restart set. Otherwise no commit may have happened at all: a restart adds to salt-1 but keeps
/// the running checksum, and any commit changes it. A zero checksum is a wal-index SQLite
/// rebuilt with no WAL (the last connection closed), and proves nothing: closing checkpoints and
/// deletes the WAL, so commits before it leave no trace there either.
fn nothing_committed_since(then: WalIndexHeader, now: Option<WalIndexHeader>, live_salt1: Option<u32>) -> bool {
    if live_salt1 == Some(then.salt1) {
        return true;
    }
    now.is_some_and(|now| {
        now.max_frame == 0 && now.frame_checksum == then.frame_checksum && then.frame_checksum != (0, 0)
    })
}

/// Whether `shadow` ends with bytes only the live WAL held (the disk was full) that some replica
/// still lacks.
fn live_tail_unshipped(
    shadow: &ShadowIndex,
    generation: GenerationId,
    positions: &[watch::Receiver<Option<Pos>>],
) -> bool {
    shadow.live_from.is_some_and(|from| shadow.committed_len > from)
        && !all_hold(positions, Pos { generation, index: shadow.index, offset: shadow.committed_len })
}

/// Whether `shadow` holds, to its end, the WAL life the wal-index header `index` describes.
fn shadow_holds_life(index: &WalIndexHeader, shadow: &ShadowIndex) -> bool {
    index.max_frame > 0
        && index.salt1 == shadow.header.salt1
        && shadow.committed_len == WAL_HEADER_SIZE as u64 + u64::from(index.max_frame) * shadow.header.frame_size()
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
struct SnapshotUpload {
    snapshot: LocalSnapshot,
    taken_at: Instant,
}

impl SnapshotUpload {
    fn started(snapshot: &LocalSnapshot) -> SnapshotUpload {
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

/// Whether a pin taken just before the wal-index read `at_pin` keeps the WAL from restarting
/// while it is held. With a frame not back-filled it does: a read-mark past 0 holds off the
/// restart, and read-mark 0 holds off the back-fill a restart needs. With the WAL back-filled
/// whole, SQLite may have given it read-mark 0, and the application may restart the WAL at once.
fn pin_holds_off_a_restart(at_pin: Option<WalIndexHeader>) -> bool {
    at_pin.is_some_and(|h| h.max_frame == 0 || h.backfilled < h.max_frame)
}

/// Room kept free beside what the pin keeps in the live WAL before it counts as having no room
/// to store it (see `Capturer::live_for_space_pending`).
const STORE_ROOM_MARGIN: u64 = 1 << 20;

/// How far SQLite's wal-index says the WAL life with `header` is committed, or 0 if the index
/// is unreadable or describes another life: a plan for the reads, never trusted for what to copy.
fn committed_hint(wal_index: Option<WalIndexHeader>, header: &WalHeader) -> u64 {
    match wal_index {
        Some(index) if index.salt1 == header.salt1 => {
            WAL_HEADER_SIZE as u64 + u64::from(index.max_frame) * header.frame_size()
        }
        _ => 0,
    }
}

/// The live `-wal` file as one pass sees it.
struct LiveWal {
    file: File,
    len: u64,
    /// The header, if the file has a valid one.
    header: Option<([u8; WAL_HEADER_SIZE], WalHeader)>,
}

impl LiveWal {
    fn open(path: &std::path::Path) -> Result<Option<LiveWal>, Error> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", path)(e)),
        };
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut bytes = [0u8; WAL_HEADER_SIZE];
        let header = if len >= WAL_HEADER_SIZE as u64 && file.read_exact_at(&mut bytes, 0).is_ok() {
            WalHeader::parse(&bytes).ok().map(|h| (bytes, h))
        } else {
            None
        };
        Ok(Some(LiveWal { file, len, header }))
    }

    /// True if the shadow's last frame is still byte-for-byte in the live WAL at its offset.
    /// A header-only shadow has no frame to vouch for it, so it is false.
    fn still_holds_last_frame(&self, shadow: &ShadowIndex) -> Result<bool, Error> {
        let Some(last) = shadow.last_frame()? else {
            return Ok(false);
        };
        if self.len < shadow.committed_len {
            return Ok(false);
        }
        let mut live = vec![0u8; last.len()];
        if self.file.read_exact_at(&mut live, shadow.committed_len - last.len() as u64).is_err() {
            return Ok(false);
        }
        Ok(live == last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// With no event and no timer able to wake the capturer, only the copy made on shutdown
    /// can carry the last commits into the final state.
    #[test]
    fn shutdown_copies_what_was_committed_since_the_last_pass() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("db");
        let app = Connection::open(&db_path).unwrap();
        app.execute_batch("PRAGMA journal_mode=wal; CREATE TABLE t(x); INSERT INTO t VALUES (1);").unwrap();

        let source = SourceDb::open(&db_path).unwrap();
        let (state_tx, mut state_rx) = watch::channel(ShadowState::default());
        let mut capturer = Capturer::new(
            db_path.clone(),
            MetaDir::for_db(&db_path, None),
            source,
            state_tx,
            Vec::new(),
            Default::default(),
        );
        let never = Duration::from_secs(3600);
        capturer.timing = Timing {
            probe_active: never,
            probe_idle: never,
            active_window: never,
            poll: never,
            pin_roll: Duration::ZERO,
            pass_spacing: Duration::ZERO,
        };
        let (wake_tx, wake_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || capturer.run(wake_rx));

        let first = wait_for(&mut state_rx, |s| s.end.is_some());
        for i in 0..100 {
            app.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        let wal_len = std::fs::metadata(wal_path(&db_path)).unwrap().len();
        assert_eq!(
            state_rx.borrow().end,
            first.end,
            "the capturer ran a pass before shutdown; the test proves nothing"
        );

        wake_tx.send(Wake::Shutdown).unwrap();
        thread.join().unwrap().unwrap();
        let last = state_rx.borrow().clone();
        assert!(last.is_final);
        assert_eq!(last.generation, first.generation);
        assert_eq!(
            last.end.map(|p| p.offset),
            Some(wal_len),
            "the final state must end where the WAL's last commit does"
        );
    }

    /// A writer committing without pause turns the capturer's file events off; once it
    /// pauses they are back, and the commit made just as it paused is copied all the same.
    #[test]
    fn a_busy_writer_is_polled_and_its_last_commit_still_copied() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("db");
        let app = Connection::open(&db_path).unwrap();
        app.execute_batch("PRAGMA journal_mode=wal; PRAGMA synchronous=normal; CREATE TABLE t(x);").unwrap();
        let source = SourceDb::open(&db_path).unwrap();
        let (state_tx, mut state_rx) = watch::channel(ShadowState::default());
        let (wake_tx, wake_rx) = crate::pool::wake_channel();
        let mut capturer = Capturer::new(
            db_path.clone(),
            MetaDir::for_db(&db_path, None),
            source,
            state_tx,
            Vec::new(),
            Default::default(),
        );
        capturer.take_events(crate::watch::watch(&db_path, wake_tx.clone()).unwrap());
        let thread = std::thread::spawn(move || capturer.run(wake_rx));
        wait_for(&mut state_rx, |s| s.end.is_some());

        let deadline = Instant::now() + Duration::from_secs(30);
        while crate::watch::is_watched(dir.path()) {
            assert!(Instant::now() < deadline, "30 s of commits without pause and the capturer still takes events");
            app.execute("INSERT INTO t VALUES (randomblob(100))", []).unwrap();
        }
        // Where the WAL's last commit ends, from SQLite's wal-index: the file may run on past
        // it, from a longer life before a restart.
        let mut reader = SourceDb::open(&db_path).unwrap();
        let mut committed_end = || {
            (WAL_HEADER_SIZE
                + reader.wal_index_header().unwrap().max_frame as usize
                    * (4096 + walstream_format::wal::FRAME_HEADER_SIZE)) as u64
        };
        app.execute("INSERT INTO t VALUES ('last')", []).unwrap();
        let end = committed_end();
        wait_for(&mut state_rx, |s| s.end.is_some_and(|p| p.offset == end));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !crate::watch::is_watched(dir.path()) {
            assert!(Instant::now() < deadline, "events stayed off for 10 s after the writer paused");
            std::thread::sleep(Duration::from_millis(5));
        }
        app.execute("INSERT INTO t VALUES ('after')", []).unwrap();
        let end = committed_end();
        wait_for(&mut state_rx, |s| s.end.is_some_and(|p| p.offset == end));
        wake_tx.send(Wake::Shutdown).unwrap();
        thread.join().unwrap().unwrap();
    }

    /// A capturer driven pass by pass, with an application connection in the same process.
    struct Harness {
        _dir: tempfile::TempDir,
        app: Connection,
        capturer: Capturer,
    }

    impl Harness {
        fn new() -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let db_path = dir.path().join("db");
            let app = crate::source::app_with_one_row(&db_path);
            let source = SourceDb::open(&db_path).unwrap();
            let (state_tx, _) = watch::channel(ShadowState::default());
            let capturer = Capturer::new(
                db_path.clone(),
                MetaDir::for_db(&db_path, None),
                source,
                state_tx,
                Vec::new(),
                Default::default(),
            );
            Harness { _dir: dir, app, capturer }
        }

        fn insert(&self) {
            self.app.execute("INSERT INTO t VALUES (randomblob(100))", []).unwrap();
        }

        /// The application's TRUNCATE checkpoint, which must not be held back.
        fn truncate(&self) {
            let busy: i64 = self.app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).unwrap();
            assert_eq!(busy, 0, "the checkpoint was blocked; the test proves nothing");
            assert_eq!(std::fs::metadata(wal_path(&self.capturer.db_path)).unwrap().len(), 0);
        }

        /// 200 commits copied into index 0, which the app's TRUNCATE checkpoint ends, and one
        /// into index 1; returns index 0's shadow file.
        fn ended_index_0(&mut self) -> PathBuf {
            self.pass_then_unpin();
            for _ in 0..200 {
                self.insert();
            }
            self.pass_then_unpin();
            self.truncate();
            self.pass_then_unpin();
            self.insert();
            self.pass_then_unpin();
            assert_eq!(self.capturer.shadow_end().unwrap().0, 1);
            self.capturer.meta.wal_dir(&self.generation()).join(name::shadow_wal_file_name(0))
        }

        /// Unseen by any pass: a whole WAL life with a commit, gone again (then, if asked, a
        /// commit in the next); the pass after must start a new generation.
        fn assert_an_unseen_life_breaks_the_generation(&mut self, then_write_again: bool) {
            let generation = self.generation();
            self.insert();
            self.truncate();
            if then_write_again {
                self.insert();
            }
            self.pass_then_unpin();
            assert_ne!(
                self.generation(),
                generation,
                "the unseen commit (then_write_again={then_write_again}) must break the generation"
            );
        }

        /// A commit copied by an unpinned pass, then the application's TRUNCATE checkpoint;
        /// returns the generation.
        fn copied_then_truncated(&mut self) -> GenerationId {
            self.pass_then_unpin();
            let generation = self.generation();
            self.insert();
            self.pass_then_unpin();
            self.truncate();
            generation
        }

        /// 20 commits copied, then the pin dropped as `let_busy_wal_restart` drops it; returns the
        /// dropped life's salt-1.
        fn copied_then_dropped(&mut self) -> u32 {
            self.capturer.pass().unwrap();
            for _ in 0..20 {
                self.insert();
            }
            self.capturer.pass().unwrap();
            self.capturer.store_deferred().unwrap();
            let shadow = self.capturer.generation.as_ref().unwrap().shadow.as_ref().unwrap();
            let (index, salt1) = (shadow.index, shadow.header.salt1);
            self.capturer.last_drop =
                Some(PinDrop { index, salt1, at: Instant::now(), at_frame: 0, pinned_again: None });
            self.capturer.db.release_all();
            salt1
        }

        /// One capture pass, then walstream lets go of the WAL, as it does for a while after a
        /// pass on a huge WAL life or after stepping aside.
        fn pass_then_unpin(&mut self) {
            self.capturer.pass().unwrap();
            self.capturer.store_deferred().unwrap();
            self.capturer.db.release_all();
        }

        /// A commit copied under a pin rolled to the WAL's end, then the application's passive
        /// checkpoint, which back-fills it all; returns the WAL's frames.
        fn backfill_under_a_rolled_pin(&mut self) -> i64 {
            self.capturer.timing.pin_roll = Duration::ZERO;
            self.capturer.pass().unwrap();
            self.insert();
            self.capturer.pass().unwrap();
            crate::source::backfill_whole(
                &self.app,
                "walstream's pin sits at the end of the WAL, so the app's checkpoint back-fills it all",
            )
        }

        /// A pin rolled onto a life the application has back-filled whole: read-mark 0, which
        /// holds off no restart, and which vouches, the shadow holding the whole life.
        fn pinned_on_read_mark_0(&mut self) {
            self.backfill_under_a_rolled_pin();
            self.capturer.pass().unwrap();
            let at_pin = self.capturer.db.index_at_pin();
            assert!(!pin_holds_off_a_restart(at_pin), "the pin holds off a restart; the test proves nothing");
            assert_eq!(
                self.capturer.continuity(),
                Continuity::Pinned,
                "the pin does not vouch; the test proves nothing"
            );
        }

        /// The shadow ends where the live WAL's life does (the file may be longer: a restarted
        /// life overwrites it from the start).
        fn assert_copied_to_the_wal_end(&mut self) {
            let index = self.capturer.db.wal_index_header().unwrap();
            let frame = walstream_format::wal::frame_size(self.capturer.db.page_size());
            let life_end = WAL_HEADER_SIZE as u64 + u64::from(index.max_frame) * frame;
            assert_eq!(self.capturer.shadow_end().unwrap().1, life_end);
        }

        fn generation(&self) -> GenerationId {
            self.capturer.generation.as_ref().unwrap().id
        }
    }

    /// Waking on a WAL life the application has already back-filled, walstream's pin gets
    /// read-mark 0, which does not hold off a restart: the application's next write may overwrite
    /// the life before the copy reads it (here between reading its header and its frames). That
    /// pin must not vouch for continuity, or the next pass takes the restart for a harmless one
    /// and the replica lacks the life's commits (seen as 10 rows missing from a restore under
    /// heavy disk load). Continuity is unproven, so a new generation holds every commit.
    #[test]
    fn a_pin_on_a_backfilled_wal_vouches_only_for_frames_it_saw_copied() {
        let mut h = Harness::new();
        for _ in 0..10 {
            h.insert();
        }
        h.pass_then_unpin();
        let generation = h.generation();
        let passive = |app: &Connection| {
            crate::source::backfill_whole(app, "the app's checkpoint did not back-fill everything");
        };
        // Unpinned, the application back-fills, restarts the WAL with a commit and back-fills that.
        passive(&h.app);
        h.insert();
        passive(&h.app);
        let db_path = h.capturer.db_path.clone();
        h.capturer.after_observe = Some(Box::new(move || {
            let salt1 = || std::fs::read(wal_path(&db_path)).unwrap()[16..20].to_vec();
            let before = salt1();
            let app = Connection::open(&db_path).unwrap();
            app.execute("INSERT INTO t VALUES (randomblob(100))", []).unwrap();
            assert_ne!(salt1(), before, "the write did not restart the WAL; the test proves nothing");
        }));
        // The pass's copy finds the life's frames overwritten; it, or the copy that follows the
        // restart in the same pass, must not take the restart for a harmless one.
        h.capturer.pass().unwrap();
        assert!(h.capturer.after_observe.is_none(), "the pass copied nothing; the test proves nothing");
        h.capturer.pass().unwrap();
        assert_ne!(h.generation(), generation, "a restart over frames never copied continued the generation");
    }

    /// A large life copied whole and back-filled, then a pin rolled onto it (read-mark 0) and
    /// a restart by the application that no copy has followed, as during a new generation's
    /// snapshot: the drop must wait for a pass to copy the new life, or the pass after the drop
    /// finds the old life's tail overwritten unguarded and starts a new generation.
    #[test]
    fn no_drop_lets_go_of_a_restart_no_copy_has_followed() {
        let mut h = Harness::new();
        h.capturer.timing.pin_roll = Duration::ZERO;
        h.capturer.pass().unwrap();
        // One transaction of about 1,100 pages: a life past SQLite's checkpoint size.
        let large = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1100) INSERT INTO t SELECT randomblob(3000) FROM n";
        h.app.execute(large, []).unwrap();
        h.capturer.pass().unwrap();
        let generation = h.generation();
        let (index, salt1) = {
            let shadow = h.capturer.generation.as_ref().unwrap().shadow.as_ref().unwrap();
            assert!(
                shadow.committed_len >= checkpoint_size(shadow.header.frame_size()),
                "the life is too small to drop; the test proves nothing"
            );
            (shadow.index, shadow.header.salt1)
        };
        crate::source::backfill_whole(&h.app, "the pin sits at the WAL's end, so the whole life back-fills");
        h.capturer.pass().unwrap();
        assert!(
            !pin_holds_off_a_restart(h.capturer.db.index_at_pin()),
            "the pin holds off a restart; the test proves nothing"
        );
        // The application restarts the WAL under that pin, writing over the old life's tail.
        h.app.execute(&large.replace("1100", "1300"), []).unwrap();
        assert_ne!(
            h.capturer.db.wal_index_header().unwrap().salt1,
            salt1,
            "the WAL did not restart; the test proves nothing"
        );
        // The life has been past the checkpoint size longer than a slow writer's drop waits.
        h.capturer.large_wal_since = Some((index, Instant::now() - 2 * DROP_PIN_AFTER_SLOW));
        h.capturer.let_busy_wal_restart();
        assert!(h.capturer.db.is_pinned(), "the pin was let go over a restart no copy had followed");
        h.capturer.pass().unwrap();
        assert_eq!(h.generation(), generation, "the restart, held under the pin, cost a new generation");
        assert_eq!(h.capturer.shadow_end().unwrap().0, index + 1);
        h.assert_copied_to_the_wal_end();
    }

    /// Stepping aside under a pin with read-mark 0: the application's TRUNCATE does not wait
    /// for such a pin, and here it ends, and the application commits into the next life, right
    /// after the step-aside's copy. The step-aside must follow that restart before it lets go.
    #[test]
    fn a_checkpoint_that_ends_under_a_mark0_pin_is_followed_before_stepping_aside() {
        let mut h = Harness::new();
        h.pinned_on_read_mark_0();
        let generation = h.generation();
        let db_path = h.capturer.db_path.clone();
        h.capturer.after_observe = Some(Box::new(move || {
            let app = Connection::open(&db_path).unwrap();
            let busy: i64 = app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).unwrap();
            assert_eq!(busy, 0, "the pin held the TRUNCATE off; the test proves nothing");
            app.execute("INSERT INTO t VALUES (randomblob(100))", []).unwrap();
        }));
        h.capturer.with_copy_buf(Capturer::step_aside);
        assert!(h.capturer.after_observe.is_none(), "the step-aside copied nothing; the test proves nothing");
        h.capturer.pass().unwrap();
        assert_eq!(h.generation(), generation, "a checkpoint that ended under the pin cost a new generation");
        h.assert_copied_to_the_wal_end();
    }

    /// A new generation leaves the old one's directory to the pass's housekeeping, which runs
    /// after the pin may go, and that deletes it.
    #[test]
    fn an_old_generation_is_deleted_by_housekeeping_not_under_the_new_ones_pin() {
        let mut h = Harness::new();
        h.insert();
        h.capturer.pass().unwrap();
        let old = h.generation();
        let old_dir = h.capturer.meta.wal_dir(&old).parent().unwrap().to_path_buf();
        assert!(old_dir.exists(), "no directory for the first generation; the test proves nothing");
        h.capturer.with_copy_buf(|c| c.start_new_generation("a test".into())).unwrap();
        assert_ne!(h.generation(), old);
        assert!(old_dir.exists(), "the old generation was deleted while the new one started");
        h.capturer.pass().unwrap();
        assert!(!old_dir.exists(), "the pass's housekeeping left the old generation");
        assert!(h.capturer.meta.wal_dir(&h.generation()).exists());
    }

    /// Under a pin with read-mark 0 the application restarts the WAL right after a pass's
    /// copy (as it did during a new generation's snapshot): the same pass follows the restart,
    /// so its drop can let the new life go, not a pass later.
    #[test]
    fn a_restart_right_after_the_copy_is_followed_in_the_same_pass() {
        let mut h = Harness::new();
        h.pinned_on_read_mark_0();
        h.capturer.timing.pin_roll = Duration::from_secs(3600);
        let (generation, index) = (h.generation(), h.capturer.shadow_end().unwrap().0);
        let db_path = h.capturer.db_path.clone();
        h.capturer.after_observe = Some(Box::new(move || {
            let app = Connection::open(&db_path).unwrap();
            app.execute("INSERT INTO t VALUES (randomblob(100))", []).unwrap();
        }));
        h.capturer.pass().unwrap();
        assert!(h.capturer.after_observe.is_none(), "the pass copied nothing; the test proves nothing");
        assert_eq!(h.generation(), generation);
        assert_eq!(h.capturer.shadow_end().unwrap().0, index + 1, "the restart was left to the next pass");
        h.assert_copied_to_the_wal_end();
    }

    /// An ended index past `max-local-wal` well within a second of the last look: what was
    /// copied since says the shadow may be past the bound, so it is looked at again without
    /// waiting for the second, and a new generation is due.
    #[test]
    fn a_shadow_copied_past_max_local_wal_is_looked_at_within_the_second() {
        let mut h = Harness::new();
        h.capturer.bound_local_wal(Some(100 << 10));
        h.ended_index_0();
        let ended = crate::shadow::disk_bytes(&h.capturer.meta.wal_dir(&h.generation()), Some(1));
        assert!(ended > 100 << 10, "index 0 takes only {ended} bytes; the test proves nothing");
        // Looked at last a little longer ago than the sooner look waits, much less than a second.
        h.capturer.bound_checked.at = Instant::now() - 2 * BOUND_LOOK_SPACING;
        h.capturer.enforce_local_bound();
        assert!(h.capturer.pending_new_generation.is_some(), "the shadow passed the bound unnoticed");
        // With nothing copied since, the next look waits for the second.
        h.capturer.pending_new_generation = None;
        h.capturer.bound_local_wal(Some(10 << 20));
        h.capturer.bound_checked.at = Instant::now() - 2 * BOUND_LOOK_SPACING;
        let looked = h.capturer.bound_checked.at;
        h.capturer.enforce_local_bound();
        assert_eq!(h.capturer.bound_checked.at, looked, "looked again though nothing could have passed the bound");
    }

    /// While a dropped pin waits for the WAL to restart, a wal-index header read between its two
    /// copies (a writer mid-update) says nothing, and must not end the wait: taken as leave to
    /// pin, it pinned mid-life and held off the restart until the next drop.
    #[test]
    fn after_a_drop_a_torn_wal_index_header_does_not_end_the_wait_for_the_restart() {
        let mut h = Harness::new();
        h.copied_then_dropped();
        // Nothing is back-filled (the harness turns autocheckpoint off), so only a header that
        // cannot be read could end the wait. Torn as a writer leaves it between its two copies:
        // the second copy's frame count one ahead of the first's.
        let shm_path = format!("{}-shm", h.capturer.db_path.display());
        let shm = std::fs::OpenOptions::new().read(true).write(true).open(shm_path).unwrap();
        let second_copys_frames = (crate::source::WAL_INDEX_HDR_SIZE + crate::source::WAL_INDEX_MAX_FRAME_AT) as u64;
        let mut frames = [0u8; 4];
        shm.read_exact_at(&mut frames, second_copys_frames).unwrap();
        shm.write_all_at(&(u32::from_ne_bytes(frames) + 1).to_ne_bytes(), second_copys_frames).unwrap();
        let torn = h.capturer.db.wal_index_header().is_none();
        h.capturer.may_pin_after_drop();
        shm.write_all_at(&frames, second_copys_frames).unwrap();
        assert!(torn, "the header still read; the test proves nothing");
        assert!(h.capturer.waiting_for_restart(), "a torn wal-index header ended the wait for the restart");
        assert!(h.capturer.db.wal_index_header().is_some(), "the header was not put back");
    }

    /// After a drop, the application's checkpoint back-fills the life whole, and a pass pins
    /// again while that checkpoint still holds read-mark 0 (here an open file description's lock
    /// in its place): the pin reads past 0. Kept, it forbade the application's next write to
    /// restart the WAL, which grew on until the next drop (WALs of 120 to 293 MB). The pass lets
    /// it go and waits on, and the write restarts the WAL.
    #[test]
    fn a_pin_taken_again_as_the_apps_checkpoint_ends_does_not_hold_off_the_restart() {
        let mut h = Harness::new();
        let salt1 = h.copied_then_dropped();
        crate::source::backfill_whole(&h.app, "the app's checkpoint did not back-fill everything");
        let held = crate::source::hold_read_mark_0(&h.capturer.db_path);
        h.capturer.pass().unwrap();
        drop(held);
        assert!(h.capturer.waiting_for_restart(), "a pin past read-mark 0 ended the wait for the restart");
        assert!(!h.capturer.db.is_pinned(), "a pin past read-mark 0 outlived the pass");
        h.insert();
        let index = h.capturer.db.wal_index_header().unwrap();
        assert_ne!(index.salt1, salt1, "the application's write did not restart the WAL");
        h.capturer.pass().unwrap();
        assert!(!h.capturer.waiting_for_restart(), "the pass after the restart did not pin again");
    }

    /// While a drop waits, a pass with no commit to copy takes no pin: beside 10,000-row updates
    /// such pins, held while the application wrote its next transaction, were often still held
    /// when that commit's checkpoint ran, which then could not back-fill the life whole, and
    /// the WAL went on for another transaction or more.
    #[test]
    fn a_pass_with_no_commit_to_copy_takes_no_pin_while_a_drop_waits() {
        let mut h = Harness::new();
        h.copied_then_dropped();
        let db_path = h.capturer.db_path.clone();
        let checkpoint = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = checkpoint.clone();
        // The application commits and its autocheckpoint runs while the pass reads the WAL.
        h.capturer.after_observe = Some(Box::new(move || {
            let app = Connection::open(&db_path).unwrap();
            app.execute("INSERT INTO t VALUES (randomblob(100))", []).unwrap();
            let frames: (i64, i64) =
                app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?))).unwrap();
            *seen.lock().unwrap() = Some(frames);
        }));
        h.capturer.pass().unwrap();
        let (frames, backfilled) = checkpoint.lock().unwrap().expect("the pass did not read the WAL");
        assert_eq!(backfilled, frames, "a pin taken with no commit to copy held back the application's checkpoint");
    }

    /// While a drop waits and the application's checkpoint of the dropped life runs, a pass with
    /// a commit to copy pins for its copy: that checkpoint may end while the copy runs, and the
    /// app may then restart the WAL and truncate it again before the next pass, ending a life no
    /// copy has read (`Capturer::may_pin_after_drop`). Here all of that happens as the copy
    /// reads the WAL; the app's TRUNCATE finds the pin and leaves the WAL alone.
    #[test]
    fn a_copy_while_the_apps_checkpoint_runs_holds_off_a_second_restart() {
        let mut h = Harness::new();
        h.copied_then_dropped();
        let generation = h.generation();
        // The commit whose checkpoint now runs.
        h.insert();
        let checkpoint = crate::source::hold_checkpoint_lock(&h.capturer.db_path);
        let db_path = h.capturer.db_path.clone();
        let truncate_busy = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = truncate_busy.clone();
        h.capturer.after_observe = Some(Box::new(move || {
            // The checkpoint ends; the app's next commits restart the WAL if they may, and its
            // TRUNCATE ends the new life.
            drop(checkpoint);
            let app = Connection::open(&db_path).unwrap();
            app.busy_timeout(Duration::ZERO).unwrap();
            crate::source::backfill_whole(&app, "the app's checkpoint did not back-fill the dropped life");
            for _ in 0..3 {
                app.execute("INSERT INTO t VALUES (randomblob(100))", []).unwrap();
            }
            let busy: i64 = app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).unwrap();
            *seen.lock().unwrap() = Some(busy);
        }));
        h.capturer.pass().unwrap();
        let busy = truncate_busy.lock().unwrap().expect("the pass did not read the WAL");
        assert_eq!(busy, 1, "the app's TRUNCATE met no pin while the pass copied");
        assert!(!h.capturer.db.is_pinned(), "the pin taken for the copy outlived the pass");
        h.capturer.pass().unwrap();
        assert_eq!(h.generation(), generation, "the commits made while the pass copied were lost to the replicas");
    }

    /// A new generation numbers its indexes from 0 again: a drop of the old generation's index 0,
    /// kept, held off the new generation's first drop for `DROP_PIN_RETRY`, and the WAL grew to
    /// 233 MB meanwhile beside 10,000-row updates in a store outage.
    #[test]
    fn a_new_generation_forgets_the_old_generations_drop() {
        let mut h = Harness::new();
        h.copied_then_dropped();
        // Pinned again a while after the drop, as when the restart came (not by the back-fill).
        let drop = h.capturer.last_drop.as_mut().unwrap();
        drop.at -= UNPINNED_AFTER_DROP;
        drop.pinned_again = Some(Instant::now());
        let dropped_index = drop.index;
        h.capturer.pending_new_generation = Some("a test".into());
        h.capturer.pass().unwrap();
        let first = h.capturer.generation.as_ref().unwrap().snapshot.index;
        assert_eq!(first, dropped_index, "the new generation reuses no index of the drop; the test proves nothing");
        assert!(h.capturer.last_drop.is_none(), "the old generation's drop still holds off the new one's");
    }

    #[test]
    fn an_index_holding_only_its_wal_header_has_nothing_to_ship() {
        let mut h = Harness::new();
        h.pass_then_unpin();
        let wal_dir = h.capturer.meta.wal_dir(&h.generation());
        let generation = h.capturer.generation.as_mut().unwrap();
        let shadow = generation.shadow.as_ref().unwrap();
        let (index, len) = (shadow.index, shadow.committed_len);
        assert!(len > WAL_HEADER_SIZE as u64, "the first pass copied no frame; the test proves nothing");
        assert_eq!(generation.end(), Pos { generation: generation.id, index, offset: len });
        let next = ShadowIndex::create(&wal_dir, index + 1, *shadow.header_bytes(), shadow.header).unwrap();
        generation.shadow = Some(next);
        assert_eq!(generation.end(), Pos { generation: generation.id, index: index + 1, offset: 0 });
    }

    /// A pin taken on a WAL life the application has back-filled whole may have read-mark 0,
    /// which does not hold off a restart: frames read under it are stored, not left in the live
    /// WAL, where the application's next write could overwrite them before a replica has them.
    #[test]
    fn frames_read_under_a_pin_on_a_backfilled_wal_are_stored() {
        let mut h = Harness::new();
        let (_position, replica) = watch::channel(None);
        h.capturer.replica_positions = vec![replica];
        h.pass_then_unpin();
        let generation = h.generation();
        for _ in 0..5 {
            h.insert();
        }
        crate::source::backfill_whole(&h.app, "the app's checkpoint did not back-fill everything");
        h.capturer.pass().unwrap();
        h.assert_copied_to_the_wal_end();
        let shadow = h.capturer.generation.as_ref().unwrap().shadow.as_ref().unwrap();
        assert_eq!(shadow.live_from, None, "frames left in the live WAL under a pin that may not hold off a restart");
        let (index, len) = (shadow.index, shadow.committed_len);
        let path = h.capturer.meta.wal_dir(&generation).join(name::shadow_wal_file_name(index));
        let stored = std::fs::read(&path).unwrap();
        let live = std::fs::read(wal_path(&h.capturer.db_path)).unwrap();
        assert!(stored.len() as u64 == len && stored[..] == live[..len as usize], "the shadow does not hold the life");
        // The app restarts the WAL over those frames; the generation goes on, the life is kept.
        h.insert();
        h.capturer.pass().unwrap();
        assert_eq!(h.generation(), generation);
        assert_eq!(std::fs::read(&path).unwrap(), stored);
    }

    /// Under the pin, new frames stay in the live WAL while a replica lacks them: the shadow
    /// takes no room for them beside the application's own WAL. Before the pin goes they are
    /// stored byte for byte, but for what every replica holds, and a restart resumes the file
    /// to its end; the application's checkpoint may then truncate the WAL and the generation
    /// goes on.
    #[test]
    fn frames_stay_in_the_live_wal_under_the_pin_and_are_stored_before_it_goes() {
        use std::os::unix::fs::MetadataExt;
        let mut h = Harness::new();
        let (position, replica) = watch::channel(None);
        h.capturer.replica_positions = vec![replica];
        h.capturer.pass().unwrap();
        for _ in 0..100 {
            h.insert();
        }
        h.capturer.pass().unwrap();
        let generation = h.generation();
        let shadow = h.capturer.generation.as_ref().unwrap().shadow.as_ref().unwrap();
        let (index, len) = (shadow.index, shadow.committed_len);
        assert!(shadow.deferred && shadow.live_from.is_some_and(|from| from < len));
        let path = h.capturer.meta.wal_dir(&generation).join(name::shadow_wal_file_name(index));
        h.assert_copied_to_the_wal_end();
        assert!(len > 100 * 4096, "the commits were not seen; the test proves nothing");
        let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(on_disk <= 8192, "{on_disk} bytes of the shadow on disk while the pin keeps {len} in the live WAL");

        // The replica holds the first 40 frames: those are not stored.
        let frame = walstream_format::wal::frame_size(h.capturer.db.page_size());
        let shipped = WAL_HEADER_SIZE as u64 + 40 * frame;
        position.send_replace(Some(Pos { generation, index, offset: shipped }));
        h.capturer.store_deferred().unwrap();
        h.capturer.db.release_all();
        let stored = std::fs::read(&path).unwrap();
        let live = std::fs::read(wal_path(&h.capturer.db_path)).unwrap();
        assert_eq!(stored.len() as u64, len);
        let data_from = crate::shadow::first_data(&std::fs::File::open(&path).unwrap(), 4096).unwrap();
        let resumed = WAL_HEADER_SIZE as u64 + (data_from - WAL_HEADER_SIZE as u64).div_ceil(frame) * frame;
        assert!(resumed <= shipped && data_from > shipped - 4096, "stored from {data_from}");
        let resumed = resumed as usize;
        assert!(stored[resumed..] == live[resumed..len as usize], "the stored bytes differ from the live WAL's");
        let reopened = ShadowIndex::open(&h.capturer.meta.wal_dir(&generation), index).unwrap().unwrap();
        assert_eq!(reopened.committed_len, len, "a restart would not resume the stored index to its end");
        // The replica holds everything: still the last frame is stored, which the next pass
        // compares with the live WAL.
        h.insert();
        h.capturer.pass().unwrap();
        let len = h.capturer.shadow_end().unwrap().1;
        position.send_replace(Some(Pos { generation, index, offset: len }));
        h.capturer.store_deferred().unwrap();
        h.capturer.db.release_all();
        let live = std::fs::read(wal_path(&h.capturer.db_path)).unwrap();
        let last = h.capturer.generation.as_ref().unwrap().shadow.as_ref().unwrap().last_frame().unwrap().unwrap();
        assert!(last == live[(len - frame) as usize..len as usize], "the last frame is not stored");
        h.truncate();
        h.capturer.pass().unwrap();
        assert_eq!(h.generation(), generation);
    }

    /// Once every replica is past an index, it takes no disk: the newest such file stays as a
    /// punched length, older ones are gone; what the slowest replica has shipped of the index
    /// it is in takes no disk either.
    #[test]
    fn shipped_shadow_leaves_the_disk() {
        use std::os::unix::fs::MetadataExt;
        let mut h = Harness::new();
        let (position, replica) = watch::channel(None);
        h.capturer.replica_positions = vec![replica];
        let (other, second_replica) = watch::channel(None);
        h.capturer.replica_positions.push(second_replica);
        let index_0 = h.ended_index_0();
        let generation = h.generation();
        let wal_dir = h.capturer.meta.wal_dir(&generation);
        let len_0 = std::fs::metadata(&index_0).unwrap().len();
        assert!(
            std::fs::metadata(&index_0).unwrap().blocks() * 512 >= len_0 / 4096 * 4096,
            "index 0 is sparse already; the test proves nothing"
        );

        // One replica is done with index 0, the other halfway: half of it may go.
        position.send_replace(Some(Pos { generation, index: 1, offset: 0 }));
        other.send_replace(Some(Pos { generation, index: 0, offset: len_0 / 2 }));
        h.pass_then_unpin();
        let on_disk = std::fs::metadata(&index_0).unwrap().blocks() * 512;
        assert!(on_disk <= len_0 / 2 + 16384 && on_disk >= len_0 / 2 - 16384, "{on_disk} bytes of {len_0} on disk");
        // A replica whose position is unknown keeps everything.
        other.send_replace(None);
        position.send_replace(Some(Pos { generation, index: 1, offset: 0 }));
        h.pass_then_unpin();
        assert!(index_0.exists());
        other.send_replace(Some(Pos { generation, index: 1, offset: 0 }));
        h.pass_then_unpin();
        // The newest ended index keeps its length (a restart reads it) and its header block only.
        assert_eq!(std::fs::metadata(&index_0).unwrap().len(), len_0);
        let on_disk = std::fs::metadata(&index_0).unwrap().blocks() * 512;
        assert!(on_disk <= 4096, "{on_disk} bytes of a shipped index stay on disk");
        // Once a later index has ended and been shipped too, index 0 goes.
        h.truncate();
        h.pass_then_unpin();
        h.insert();
        h.pass_then_unpin();
        assert_eq!(h.capturer.shadow_end().unwrap().0, 2);
        for replica in [&position, &other] {
            replica.send_replace(Some(Pos { generation, index: 2, offset: 0 }));
        }
        h.pass_then_unpin();
        assert!(!index_0.exists(), "index 0 was kept although every replica has shipped a later one");
        assert!(wal_dir.join(name::shadow_wal_file_name(1)).exists(), "the newest ended index keeps its length");
    }

    /// Uploads that land while the writer is idle free what they shipped at the capturer's
    /// next turn, with no commit to wake a pass: nothing every replica holds stays on the
    /// disk to be spooled.
    #[test]
    fn an_idle_turn_frees_what_the_replicas_shipped_meanwhile() {
        use std::os::unix::fs::MetadataExt;
        let mut h = Harness::new();
        let (position, replica) = watch::channel(None);
        h.capturer.replica_positions = vec![replica];
        let index_0 = h.ended_index_0();
        let generation = h.generation();
        let on_disk = || std::fs::metadata(&index_0).unwrap().blocks() * 512;
        assert!(on_disk() > 100 * 4096, "index 0 takes {} bytes; the test proves nothing", on_disk());
        let (_wake_tx, wake_rx) = std::sync::mpsc::channel();
        // The first turn passes, and so does the second, which first sees the WAL's stat.
        for _ in 0..2 {
            assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(_)));
        }
        assert!(on_disk() > 100 * 4096, "index 0 was freed before the replica had it");
        assert!(!h.capturer.wal_stat_changed(), "the next turn would pass; the test proves nothing");

        position.send_replace(Some(Pos { generation, index: 1, offset: 0 }));
        assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(_)));
        assert!(on_disk() <= 8192, "{} bytes of index 0 stay on disk after the replica shipped it", on_disk());
    }

    #[test]
    fn truncation_after_everything_was_copied_keeps_the_generation() {
        let mut h = Harness::new();
        let generation = h.copied_then_truncated();
        h.pass_then_unpin();
        assert_eq!(h.generation(), generation, "nothing was lost, so the generation must go on");
        // Idle TRUNCATE checkpoints restart an empty WAL again; seen by a pass each, the next
        // life still follows.
        for _ in 0..2 {
            h.truncate();
            h.pass_then_unpin();
        }
        h.insert();
        h.pass_then_unpin();
        assert_eq!(h.generation(), generation);
        assert_eq!(h.capturer.shadow_end().unwrap().0, 1, "the life after the truncation is the next index");
        // Two restarts between passes look the same as a life written and truncated unseen.
        h.truncate();
        h.pass_then_unpin();
        h.truncate();
        h.truncate();
        h.insert();
        h.pass_then_unpin();
        assert_ne!(h.generation(), generation, "an unverifiable salt jump must not be taken on trust");
    }

    /// A generation that began on an empty WAL has no life to compare the next one with: the
    /// wal-index as it found it stands in. Seen by a pass that holds no pin (a database resting,
    /// woken by a commit, its pass late for the app's TRUNCATE right after), a life committed
    /// and truncated meanwhile was taken for no life at all, and its rows never reached the
    /// replica (the idle e2e test lost 27 of 35 with its wake delayed by 100 ms).
    #[test]
    fn a_first_life_gone_before_a_pass_saw_it_breaks_the_generation() {
        let began_on_an_empty_wal = || {
            let mut h = Harness::new();
            h.truncate();
            h.pass_then_unpin();
            assert!(h.capturer.generation.as_ref().unwrap().shadow.is_none(), "the generation began with a life");
            h
        };
        let mut h = began_on_an_empty_wal();
        let generation = h.generation();
        // Restarts with no commit keep the generation; so does the first life, seen. (A restart
        // and then a commit, both unseen, cannot be told from a lost life.)
        h.truncate();
        h.pass_then_unpin();
        h.insert();
        h.pass_then_unpin();
        assert_eq!(h.generation(), generation, "nothing was committed that the passes did not see");
        for then_write_again in [false, true] {
            began_on_an_empty_wal().assert_an_unseen_life_breaks_the_generation(then_write_again);
        }
    }

    /// The database file proves what the wal-index cannot: a first life written by a new
    /// connection, which picks random salts, seen by a pass that holds no pin (a database that
    /// began with no WAL and rested till its first write, as thousands do in the many-databases
    /// bench) continues the generation while the file is as stamped before a read that found no
    /// life; a life committed and truncated unseen still breaks it, since its back-fill wrote
    /// the file.
    #[test]
    fn a_first_life_on_a_database_file_untouched_since_no_life_continues_the_generation() {
        let began_on_an_empty_wal_long_after_the_last_write = || {
            let mut h = Harness::new();
            h.truncate();
            std::thread::sleep(FILE_STAMP_SETTLED + Duration::from_millis(50));
            h.pass_then_unpin();
            let generation = h.capturer.generation.as_ref().unwrap();
            assert!(generation.shadow.is_none(), "the generation began with a life");
            assert!(generation.file_before_first_life.is_some(), "no stamp for a file unchanged for 150 ms");
            h
        };
        let mut h = began_on_an_empty_wal_long_after_the_last_write();
        let generation = h.generation();
        let then = h.capturer.generation.as_ref().unwrap().index_before_first_life.unwrap();
        let writer = Connection::open(&h.capturer.db_path).unwrap();
        writer.execute("INSERT INTO t VALUES (randomblob(100))", []).unwrap();
        let live_salt1 = LiveWal::open(&h.capturer.wal_path).unwrap().unwrap().header.unwrap().1.salt1;
        assert!(
            !nothing_committed_since(then, h.capturer.db.wal_index_header(), Some(live_salt1)),
            "the wal-index proves the first life; the test proves nothing"
        );
        h.pass_then_unpin();
        assert_eq!(h.generation(), generation, "the file was untouched: the first life is the snapshot's");
        h.assert_copied_to_the_wal_end();
        for then_write_again in [false, true] {
            began_on_an_empty_wal_long_after_the_last_write()
                .assert_an_unseen_life_breaks_the_generation(then_write_again);
        }
    }

    /// An app's TRUNCATE checkpoint, then the first frames of its next transaction (spilled from
    /// a small page cache before it commits), all between two unpinned passes: the live WAL has
    /// a new header and is shorter than the shadow, so it cannot show the old life's end. The
    /// wal-index can, until that transaction commits.
    #[test]
    fn a_restart_seen_before_the_new_lifes_first_commit_keeps_the_generation() {
        let spill_uncommitted = |h: &Harness| {
            h.app
                .execute_batch(
                    "PRAGMA cache_size=2; BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) INSERT INTO t SELECT randomblob(1000) FROM n;",
                )
                .unwrap()
        };
        let mut h = Harness::new();
        let generation = h.copied_then_truncated();
        spill_uncommitted(&h);
        let wal_len = std::fs::metadata(wal_path(&h.capturer.db_path)).unwrap().len();
        assert!(wal_len > WAL_HEADER_SIZE as u64, "the transaction spilled nothing; the test proves nothing");
        assert_eq!(h.capturer.db.wal_index_header().unwrap().max_frame, 0, "the spill was committed");
        h.pass_then_unpin();
        assert_eq!(h.generation(), generation, "the old life ended where the shadow did");
        h.app.execute_batch("COMMIT").unwrap();
        h.pass_then_unpin();
        assert_eq!(h.generation(), generation);
        assert_eq!(h.capturer.shadow_end().unwrap().0, 1, "the life after the truncation is the next index");
        // A commit the passes never saw changes the running checksum the restart keeps.
        h.insert();
        h.truncate();
        spill_uncommitted(&h);
        h.pass_then_unpin();
        assert_ne!(h.generation(), generation, "a commit walstream never saw is gone from the WAL");
    }

    #[test]
    fn truncation_after_an_uncopied_commit_starts_a_new_generation() {
        let mut h = Harness::new();
        h.pass_then_unpin();
        let generation = h.generation();
        h.insert();
        h.truncate();
        h.pass_then_unpin();
        assert_ne!(h.generation(), generation, "a commit walstream never saw is gone from the WAL");
    }

    #[test]
    fn a_life_written_and_truncated_between_passes_is_not_taken_for_an_idle_restart() {
        for then_write_again in [false, true] {
            let mut h = Harness::new();
            h.insert();
            h.pass_then_unpin();
            h.truncate();
            h.pass_then_unpin();
            assert!(h.capturer.generation.as_ref().unwrap().shadow.as_ref().unwrap().sealed);
            h.assert_an_unseen_life_breaks_the_generation(then_write_again);
        }
    }

    #[test]
    fn the_wal_restarts_after_the_apps_checkpoint_while_walstream_stays_pinned() {
        let mut h = Harness::new();
        h.backfill_under_a_rolled_pin();
        let generation = h.generation();
        let wal = wal_path(&h.capturer.db_path);
        let wal_header = || std::fs::read(&wal).unwrap()[..WAL_HEADER_SIZE].to_vec();
        let before = wal_header();
        h.capturer.follow_backfill();
        assert!(h.capturer.db.is_pinned(), "walstream must never leave the WAL unprotected here");
        h.insert();
        assert_ne!(wal_header(), before, "the application's write should have restarted the WAL");
        h.capturer.pass().unwrap();
        assert_eq!(h.generation(), generation);
        assert_eq!(h.capturer.shadow_end().unwrap().0, 1, "the restarted WAL is the next index");
    }

    /// The same, with the roll made while read-mark 0 is still held exclusively, as the app's
    /// checkpoint holds it just after it has written the back-fill: that pin reads past 0 and
    /// would hold off the restart, so the next look rolls again, once read-mark 0 is free.
    #[test]
    fn a_roll_that_lands_past_read_mark_0_is_made_again() {
        let mut h = Harness::new();
        h.backfill_under_a_rolled_pin();
        let held = crate::source::hold_read_mark_0(&h.capturer.db_path);
        h.capturer.follow_backfill();
        assert!(
            h.capturer.db.pin_reads_past_mark0(),
            "the roll got read-mark 0 although it was held; the test proves nothing"
        );
        drop(held);
        h.capturer.follow_backfill();
        assert!(!h.capturer.db.pin_reads_past_mark0(), "the pin past read-mark 0 was kept");
        let before = h.capturer.db.wal_index_header().unwrap().salt1;
        h.insert();
        assert_ne!(
            h.capturer.db.wal_index_header().unwrap().salt1,
            before,
            "the application's write did not restart the WAL"
        );
    }

    #[test]
    fn a_pass_soon_after_the_last_roll_keeps_the_pin_so_checkpoints_have_nothing_new_to_do() {
        let mut h = Harness::new();
        h.capturer.timing.pin_roll = Duration::from_secs(3600);
        h.capturer.pass().unwrap();
        let checkpoint = |h: &Harness| -> (i64, i64) {
            h.app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?))).unwrap()
        };
        let (_, backfilled) = checkpoint(&h);
        for _ in 0..5 {
            h.insert();
            h.capturer.pass().unwrap();
        }
        let (frames, backfilled_after) = checkpoint(&h);
        assert_eq!(backfilled_after, backfilled, "the pin moved although it was younger than pin_roll");
        assert!(frames > backfilled_after);
        // Copying went on under the old pin: the shadow has every commit.
        h.assert_copied_to_the_wal_end();
        h.capturer.timing.pin_roll = Duration::ZERO;
        h.capturer.pass().unwrap();
        assert_eq!(checkpoint(&h), (frames, frames), "once rolled, the pin sits at the end");
    }

    /// The harness's capturer, resting as soon as it is idle, driven turn by turn through the
    /// channel returned (with no pass spacing), after the first turn's pass.
    fn turned_after_a_first_pass(
        h: &mut Harness,
    ) -> (std::sync::mpsc::Receiver<Wake>, std::sync::mpsc::Sender<Wake>, std::sync::mpsc::Receiver<Wake>) {
        let events = resting_at_once(h);
        h.capturer.timing.pass_spacing = Duration::ZERO;
        let (wake_tx, wake_rx) = std::sync::mpsc::channel();
        assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(_)), "the first turn passes");
        (events, wake_tx, wake_rx)
    }

    /// Lets the harness's capturer rest as soon as it is idle, as it would with file events.
    fn resting_at_once(h: &mut Harness) -> std::sync::mpsc::Receiver<Wake> {
        let (wake_tx, wake_rx) = crate::pool::wake_channel();
        h.capturer.take_events(crate::watch::watch(&h.capturer.db_path, wake_tx).unwrap());
        h.capturer.rest_when_idle(Some(Duration::ZERO));
        wake_rx
    }

    /// The application back-fills the whole WAL under walstream's pin, then walstream rests:
    /// the life is sealed, so the next one, which overwrites its frames before any pass sees
    /// them, still continues the generation.
    #[test]
    fn a_database_resting_on_a_backfilled_wal_continues_its_generation_after_a_restart() {
        let mut h = Harness::new();
        let _events = resting_at_once(&mut h);
        let frames = h.backfill_under_a_rolled_pin();
        let generation = h.generation();
        assert!(h.capturer.may_rest());
        h.capturer.rest();
        assert!(h.capturer.db.is_resting());
        assert!(h.capturer.generation.as_ref().unwrap().shadow.as_ref().unwrap().sealed);
        // A new life longer than the old one: the old life's last frame is overwritten.
        for _ in 0..(frames + 5) {
            h.insert();
        }
        h.capturer.pass().unwrap();
        assert!(!h.capturer.db.is_resting(), "the pass must wake the database");
        assert_eq!(h.generation(), generation, "a sealed life's successor continues the generation");
        let (index, len) = h.capturer.shadow_end().unwrap();
        assert_eq!(index, 1, "the restarted WAL is the next index");
        assert_eq!(len, std::fs::metadata(wal_path(&h.capturer.db_path)).unwrap().len());
    }

    /// Resting where the WAL is not back-filled (another reader held the back-fill back) proves
    /// nothing about what comes next: the application may append, checkpoint and restart unseen,
    /// so a successor that has overwritten the last frame walstream copied starts a new
    /// generation.
    #[test]
    fn a_database_resting_on_a_wal_not_backfilled_takes_no_overwritten_successor_on_trust() {
        let mut h = Harness::new();
        let _events = resting_at_once(&mut h);
        h.capturer.pass().unwrap();
        h.insert();
        h.capturer.pass().unwrap();
        let generation = h.generation();
        // A reader that began before the last commit keeps walstream's back-fill from reaching
        // the end of the life as it rests.
        let reader = Connection::open(&h.capturer.db_path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0)).unwrap();
        h.insert();
        h.capturer.pass().unwrap();
        h.capturer.rest();
        reader.execute_batch("COMMIT").unwrap();
        assert!(h.capturer.db.is_resting());
        assert!(!h.capturer.generation.as_ref().unwrap().shadow.as_ref().unwrap().sealed);
        // Unseen: one more commit, a complete checkpoint, and a longer new life.
        h.insert();
        let frames: i64 = h.app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1)).unwrap();
        for _ in 0..(frames + 5) {
            h.insert();
        }
        h.capturer.pass().unwrap();
        assert_ne!(h.generation(), generation, "the commit walstream never saw must break the generation");
    }

    /// A resting database that nobody wrote to wakes (a sync, a snapshot request) into the same
    /// life, and commits made while it rested are copied by the pass that wakes it.
    #[test]
    fn a_resting_database_wakes_into_the_same_life_and_copies_what_came_meanwhile() {
        let mut h = Harness::new();
        let _events = resting_at_once(&mut h);
        h.capturer.pass().unwrap();
        let generation = h.generation();
        h.capturer.rest();
        assert!(h.capturer.db.is_resting());
        assert!(h.capturer.buf.is_empty(), "a resting database keeps no copy buffer");
        h.capturer.pass().unwrap();
        assert!(!h.capturer.db.is_resting());
        h.capturer.rest();
        for _ in 0..3 {
            h.insert();
        }
        h.capturer.pass().unwrap();
        assert_eq!(h.generation(), generation);
        h.assert_copied_to_the_wal_end();
    }

    /// A file event that changed nothing (another database's, the application opening a
    /// connection, a full event queue waking everyone) leaves a resting database at rest; a
    /// commit wakes it.
    #[test]
    fn only_a_change_to_the_wal_wakes_a_resting_database() {
        let mut h = Harness::new();
        let (_events, wake_tx, wake_rx) = turned_after_a_first_pass(&mut h);
        h.capturer.rest();
        assert!(h.capturer.db.is_resting());
        wake_tx.send(Wake::Changed).unwrap();
        assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(wait) if wait == REST_RECHECK));
        assert!(h.capturer.db.is_resting(), "an event that changed nothing must not wake the database");
        h.insert();
        wake_tx.send(Wake::Changed).unwrap();
        assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(_)));
        assert!(!h.capturer.db.is_resting(), "a commit must wake the database");
        h.assert_copied_to_the_wal_end();
    }

    /// The last event of a commit comes with its last WAL write; the wal-index update that
    /// follows the WAL's fsync raises none, and a busy disk can make that fsync long. A resting
    /// database keeps looking, at growing intervals, for [`REST_WATCH`] after an event on the
    /// WAL, and wakes for a commit that shows only then; later, or after an event on the
    /// database file alone, it looks only every [`REST_POLL`].
    #[test]
    fn a_resting_database_keeps_looking_for_a_while_after_an_event() {
        let mut h = Harness::new();
        let (_events, wake_tx, wake_rx) = turned_after_a_first_pass(&mut h);
        h.capturer.rest();
        wake_tx.send(Wake::WalChanged).unwrap();
        assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(wait) if wait == REST_RECHECK));
        let mut waits = Vec::new();
        for _ in 0..3 {
            let Turn::Again(wait) = h.capturer.turn(&wake_rx) else { panic!("the capturer ended") };
            waits.push(wait);
            std::thread::sleep(wait.min(Duration::from_millis(200)));
        }
        assert!(h.capturer.db.is_resting());
        assert!(
            waits.iter().all(|w| *w >= REST_RECHECK && *w < Duration::from_secs(1)),
            "a resting database stops looking too soon after an event: {waits:?}"
        );
        assert!(waits[2] > waits[0], "the looks do not space out: {waits:?}");
        // The commit, with no event of its own.
        h.insert();
        assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(_)));
        assert!(!h.capturer.db.is_resting(), "the commit must wake the database");
        h.assert_copied_to_the_wal_end();
        // An event on the database file (every rest's back-fill makes one) gets one look.
        h.capturer.rest();
        h.capturer.rest_event_at = None;
        wake_tx.send(Wake::Changed).unwrap();
        assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(wait) if wait == REST_RECHECK));
        assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(wait) if wait == REST_POLL));
        // Long after an event on the WAL, a resting database looks only every REST_POLL.
        h.capturer.rest_event_at = Some(Instant::now() - REST_WATCH);
        assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(wait) if wait == REST_POLL));
    }

    /// A commit after the last pass and before the rest (its event still on its way) is in
    /// neither the shadow nor what the database looked like at that pass: the event wakes it.
    #[test]
    fn a_commit_between_the_last_pass_and_the_rest_wakes_the_database() {
        let mut h = Harness::new();
        let (_events, wake_tx, wake_rx) = turned_after_a_first_pass(&mut h);
        h.insert();
        h.capturer.rest();
        assert!(h.capturer.db.is_resting());
        wake_tx.send(Wake::Changed).unwrap();
        assert!(matches!(h.capturer.turn(&wake_rx), Turn::Again(_)));
        assert!(!h.capturer.db.is_resting(), "the commit's event must wake the database");
        h.assert_copied_to_the_wal_end();
    }

    fn wait_for(rx: &mut watch::Receiver<ShadowState>, ready: impl Fn(&ShadowState) -> bool) -> ShadowState {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state = rx.borrow_and_update().clone();
            if ready(&state) {
                return state;
            }
            assert!(Instant::now() < deadline, "no capture pass within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
