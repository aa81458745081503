//! The capturer's pin, as policy: when it is let go so the application's checkpoint can restart
//! a busy writer's WAL, when a pass takes it again, and what a pin taken at a given wal-index
//! vouches for. `source` holds the pin's connections; this decides what they do.

use std::time::{Duration, Instant};

use tracing::debug;
use walstream_format::WAL_HEADER_SIZE;

use super::copy::{committed_hint, shadow_holds_life, Continuity};
use super::{disk_space, Capturer, STORE_ROOM_MARGIN};
use crate::source::WalIndexHeader;

/// A pin with a read-mark above 0 keeps SQLite from ever restarting the WAL (Litestream #1536),
/// so walstream moves its pin to read-mark 0 whenever the application's checkpoint has
/// back-filled the whole WAL ([`Capturer::follow_backfill`]). A writer that never pauses leaves
/// no such moment: once one WAL life holds this many frames, walstream drops its pin after
/// copying so the application's checkpoint can restart the WAL (only while the capturer polls a
/// busy writer, see `let_busy_wal_restart`). It is SQLite's default
/// `wal_autocheckpoint`, where the life of a WAL no one pins ends: at 32 MiB, a 1,000 tx/s
/// writer's WAL grew to 32 MiB against 4 MiB without walstream. A TRUNCATE checkpoint landing
/// in that gap right after a commit walstream has not copied costs a new generation, never data.
pub(super) const DROP_PIN_WAL_FRAMES: u64 = 1000;

/// How long a WAL life of a writer the capturer does not poll stays past
/// [`DROP_PIN_WAL_FRAMES`] before the pin is dropped: such a writer's commits each run SQLite's
/// autocheckpoint, which back-fills up to the pin and never all of it, so its WAL grew to
/// [`DROP_PIN_ANY_WRITER_BYTES`].
pub(super) const DROP_PIN_AFTER_SLOW: Duration = Duration::from_secs(1);

/// Any writer's WAL life is let go at this size, polled or not: a writer committing every 20 ms
/// is not polled, and without this its WAL grew without end (9.4 MiB in 12 s, and on).
const DROP_PIN_ANY_WRITER_BYTES: u64 = 32 << 20;

/// While a dropped pin waits for the WAL to restart (see [`PinDrop`]) the capturer passes this
/// often, not every [`PASS_SPACING`](crate::protocol::PASS_SPACING): a flat-out writer fills a restarted WAL life to SQLite's
/// checkpoint size in about 15 ms, and with a pass 10 ms after the drop the WAL restarted twice
/// unseen (a new generation) in 1 of 3 bench runs.
pub(super) const AFTER_DROP_SPACING: Duration = Duration::from_millis(1);

/// The longest a dropped pin waits for the WAL to restart before a pass pins again. The
/// application's checkpoint of a large life (10,000-row updates back to back) takes a good
/// part of this; with a pin taken again 50 ms after the drop, it held a read-mark past 0
/// when that checkpoint ended, and the WAL grew to 464 MiB in 3 s against 4 MiB alone.
pub(super) const UNPINNED_AFTER_DROP: Duration = Duration::from_secs(1);

/// After a drop in which the WAL did not restart (the application did not write, or wrote
/// without a checkpoint), the pin is held this long before the next drop. Dropping on every
/// pass left a large life unpinned nearly all the time, so an application's TRUNCATE
/// checkpoint right after a commit usually beat the pass that would copy it (a new
/// generation; seen in the 200 MB restore test under the suite's load).
const DROP_PIN_RETRY: Duration = Duration::from_secs(1);

/// Where SQLite's autocheckpoint begins, in WAL bytes (see [`DROP_PIN_WAL_FRAMES`]).
pub(super) fn checkpoint_size(frame: u64) -> u64 {
    WAL_HEADER_SIZE as u64 + DROP_PIN_WAL_FRAMES * frame
}

/// A pin let go so the application's checkpoint can restart a large WAL life
/// (`Capturer::let_busy_wal_restart`). Until the restart, or the back-fill that frees it, no
/// pin outlives a pass, and none is taken while the application's checkpoint runs (see
/// `Capturer::may_pin_after_drop`): one taken then holds a read-mark past 0, which forbids the
/// restart, and the application's checkpoint of a large life outlasted the passes that let go
/// again; a pin that would still hold off the restart is let go and the wait goes on
/// (`Capturer::keep_waiting_if_the_pin_holds_off_the_restart`). Each pass begins unpinned, so
/// its copy is checked as any unpinned one (`Continuity::Unproven`).
#[derive(Clone, Copy, Debug)]
pub(super) struct PinDrop {
    /// The shadow index of the life let go, and its salt-1: a wal-index with another has restarted.
    pub(super) index: u32,
    pub(super) salt1: u32,
    pub(super) at: Instant,
    /// The life's frames when it was let go (see `Capturer::reader_holds_drop_back`).
    pub(super) at_frame: u32,
    /// When a pass pinned again; `None` while none has.
    pub(super) pinned_again: Option<Instant>,
}

/// Whether a pin taken just before the wal-index read `at_pin` keeps the WAL from restarting
/// while it is held. With a frame not back-filled it does: a read-mark past 0 holds off the
/// restart, and read-mark 0 holds off the back-fill a restart needs. With the WAL back-filled
/// whole, SQLite may have given it read-mark 0, and the application may restart the WAL at once.
pub(super) fn pin_holds_off_a_restart(at_pin: Option<WalIndexHeader>) -> bool {
    at_pin.is_some_and(|h| h.max_frame == 0 || h.backfilled < h.max_frame)
}

impl Capturer {
    /// See [`DROP_PIN_WAL_FRAMES`].
    pub(super) fn let_busy_wal_restart(&mut self) {
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
    pub(super) fn restarted_since_copy(&mut self) -> bool {
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
    pub(super) fn follow_backfill(&mut self) {
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
                // (see `keep_waiting_if_the_pin_holds_off_the_restart`): the next look rolls again.
                if self.db.pin_reads_past_mark0() {
                    self.rolled_at_backfill = None;
                }
            }
        }
    }

    /// After a pin taken outside a pass's copy: what it vouches for (`pin_vouches`) and whether
    /// frames may stay in the live WAL under it (`pin_may_defer`), from the wal-index it was
    /// taken at.
    pub(super) fn judge_new_pin(&mut self) {
        let at_pin = self.db.index_at_pin();
        self.pin_vouches = self.pin_covers(at_pin);
        self.pin_may_defer = pin_holds_off_a_restart(at_pin);
    }

    /// Whether new frames may stay in the live WAL now: under a pin that holds off a restart,
    /// and that stays after the pass.
    pub(super) fn may_defer(&self) -> bool {
        self.db.is_pinned() && self.pin_may_defer && !self.waiting_for_restart()
    }

    /// Whether passes come every [`AFTER_DROP_SPACING`]: from a drop until the restart it let
    /// happen is seen, and while a busy writer's next commit may bring its life to the drop
    /// (see `let_busy_wal_restart`). Seen a pass spacing late, a writer of 10,000-row updates
    /// had committed the next one meanwhile, and its lives were 3 transactions long, not 2.
    pub(super) fn passes_fast(&self) -> bool {
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
    pub(super) fn waiting_for_restart(&self) -> bool {
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
    pub(super) fn may_pin_after_drop(&mut self) -> bool {
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
        // Not while the application's checkpoint runs, unless the wait is twice as old: a pin
        // taken then reads past read-mark 0, and held, it forbade the restart that checkpoint
        // was about to allow, until the next drop 1.3 s on (a 216 MiB life beside 10,000-row
        // updates under load). A TRUNCATE cannot begin while that checkpoint holds its lock.
        let waited = drop.at.elapsed();
        let timed_out =
            waited >= UNPINNED_AFTER_DROP && (waited >= 2 * UNPINNED_AFTER_DROP || !self.db.checkpoint_running());
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
    ///
    /// The same when the pin got read-mark 0 but another process reads past it: the application's
    /// writer whose transaction began before the back-fill ended (or whose restart met the pin a
    /// copying pass held), and which appends to this life whatever walstream does. Its commit's
    /// checkpoint then meets the pin on read-mark 0, which forbids any back-fill, and without a
    /// whole back-fill no later write restarts the WAL: it grew on for 1.2 to 1.8 s, until the
    /// next drop (209 MiB once, beside 10,000-row updates under load).
    pub(super) fn keep_waiting_if_the_pin_holds_off_the_restart(&mut self) {
        let Some(drop) = self.last_drop.as_mut() else { return };
        let same_life = self.db.index_at_pin().is_some_and(|h| h.salt1 == drop.salt1);
        let by_backfill = drop.at.elapsed() < UNPINNED_AFTER_DROP;
        if !(drop.pinned_again.is_some() && same_life && by_backfill) {
            return;
        }
        if self.db.pin_reads_past_mark0() {
            drop.pinned_again = None;
            debug!(db = %self.db_path.display(), "the pin taken again after a drop reads past read-mark 0; waiting on for the restart");
        } else if self.db.wal_readers_past_mark0() {
            drop.pinned_again = None;
            debug!(db = %self.db_path.display(), "another process reads the dropped life past read-mark 0; waiting on for the restart");
        }
    }

    /// After a pass that pinned only to copy (see [`Capturer::may_pin_after_drop`]): lets go
    /// again. Nothing was left in the live WAL under it by choice (`may_defer`); what a full disk
    /// left there keeps it until the replicas have it (rule 7).
    ///
    /// Unless the application's TRUNCATE (or RESTART, FULL) checkpoint began during the pass and
    /// waits for this pin: let go, it would end a life whose last commits, made while the copy
    /// ran, no copy has read. It holds the write lock, so stepping aside copies them first. Seen
    /// as the VACUUM test's known race beside two busy loops: a 20 ms copy after the drop, 8
    /// frames committed during it, and the waiting TRUNCATE done within a millisecond of the
    /// pin's release (a new generation; 2 runs in 160).
    pub(super) fn release_pass_pin(&mut self) {
        if self.waiting_for_restart() && self.db.is_pinned() && !self.live_pending() {
            if self.db.blocking_checkpoint_waiting() {
                self.step_aside();
            } else {
                self.db.release_all();
            }
        }
    }

    /// What a copy may assume since the last one: only a pin that vouches (see `pin_vouches`).
    pub(super) fn continuity(&self) -> Continuity {
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
    pub(super) fn pin_covers(&self, at_pin: Option<WalIndexHeader>) -> bool {
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
}
