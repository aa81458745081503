use std::os::unix::fs::FileExt;

use rusqlite::Connection;

use super::copy::{nothing_committed_since, Continuity, FILE_STAMP_SETTLED};
use super::pin::{checkpoint_size, DROP_PIN_AFTER_SLOW, UNPINNED_AFTER_DROP};
use super::*;

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
    assert_eq!(state_rx.borrow().end, first.end, "the capturer ran a pass before shutdown; the test proves nothing");

    wake_tx.send(Wake::Shutdown).unwrap();
    thread.join().unwrap().unwrap();
    let last = state_rx.borrow().clone();
    assert!(last.is_final);
    assert_eq!(last.generation, first.generation);
    assert_eq!(last.end.map(|p| p.offset), Some(wal_len), "the final state must end where the WAL's last commit does");
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
            + reader.wal_index_header().unwrap().max_frame as usize * (4096 + walstream_format::wal::FRAME_HEADER_SIZE))
            as u64
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
        self.capturer.last_drop = Some(PinDrop { index, salt1, at: Instant::now(), at_frame: 0, pinned_again: None });
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
        assert_eq!(self.capturer.continuity(), Continuity::Pinned, "the pin does not vouch; the test proves nothing");
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

/// After a drop, the application's checkpoint back-fills the life whole, but its writer's next
/// transaction reads past read-mark 0 (begun before the back-fill ended, or its restart met a
/// copying pass's pin; here an open file description's lock on read-mark 1 in its place), so it
/// appends to this life. A pin taken again on read-mark 0 then forbade its commit's checkpoint
/// any back-fill, and so every later restart: the WAL grew on until the next drop, 1.2 to 1.8 s
/// on. The pass lets go and waits on; the commit's checkpoint back-fills the life, and the next
/// write restarts the WAL.
#[test]
fn a_pin_taken_again_while_the_apps_writer_reads_past_read_mark_0_does_not_hold_off_the_restart() {
    let mut h = Harness::new();
    let salt1 = h.copied_then_dropped();
    crate::source::backfill_whole(&h.app, "the app's checkpoint did not back-fill everything");
    let writer = crate::source::hold_read_mark_1(&h.capturer.db_path);
    h.capturer.pass().unwrap();
    assert!(h.capturer.waiting_for_restart(), "a pin on read-mark 0 beside a writer past it ended the wait");
    assert!(!h.capturer.db.is_pinned(), "a pin on read-mark 0 beside a writer past it outlived the pass");
    h.insert();
    drop(writer);
    crate::source::backfill_whole(&h.app, "the writer's commit could not be back-filled");
    h.insert();
    let index = h.capturer.db.wal_index_header().unwrap();
    assert_ne!(index.salt1, salt1, "the application's next write did not restart the WAL");
}

/// A drop's wait runs out while the application's checkpoint runs (its lock held from an open
/// file description): the pass does not pin again then, for that pin would read past read-mark
/// 0 and forbid the restart the checkpoint is about to allow. It pins once the checkpoint ends.
#[test]
fn a_drops_wait_runs_out_but_no_pin_is_kept_while_the_apps_checkpoint_runs() {
    let mut h = Harness::new();
    h.copied_then_dropped();
    h.capturer.last_drop.as_mut().unwrap().at -= UNPINNED_AFTER_DROP;
    let checkpoint = crate::source::hold_checkpoint_lock(&h.capturer.db_path);
    h.insert();
    h.capturer.pass().unwrap();
    assert!(h.capturer.waiting_for_restart(), "the wait ended while the application's checkpoint ran");
    assert!(!h.capturer.db.is_pinned(), "a pin taken while the application's checkpoint ran outlived the pass");
    drop(checkpoint);
    h.capturer.pass().unwrap();
    assert!(!h.capturer.waiting_for_restart(), "the wait did not end once the checkpoint had");
    assert!(h.capturer.db.is_pinned(), "no pin after the wait ran out");
}

/// A snapshot falls due while a drop waits for the restart: the pass that pins to copy does not
/// take it, for it would hold that pin as long as it reads the database, and the application's
/// checkpoints could back-fill only up to it (beside 10,000-row updates the wait then timed out
/// and a life grew to 307 MiB). The first pass pinned again takes it.
#[test]
fn a_snapshot_waits_for_the_pin_taken_again_after_a_drop() {
    let mut h = Harness::new();
    h.copied_then_dropped();
    h.capturer.pending_snapshot = true;
    h.insert();
    h.capturer.pass().unwrap();
    assert!(h.capturer.waiting_for_restart(), "the drop's wait ended; the test proves nothing");
    assert!(h.capturer.pending_snapshot, "a pass that pinned only to copy took the snapshot");
    crate::source::backfill_whole(&h.app, "the app's checkpoint did not back-fill the dropped life");
    h.capturer.pass().unwrap();
    assert!(!h.capturer.waiting_for_restart(), "the pass after the back-fill did not pin again");
    assert!(!h.capturer.pending_snapshot, "the pass pinned again did not take the snapshot");
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

/// While a drop waits, a pass pins for its copy and lets go at its end; commits made during the
/// copy, after it read the WAL, are not in it. An application's TRUNCATE begun meanwhile waits
/// for that pin, holding the write lock: the pass steps aside, copying those commits first,
/// instead of handing the TRUNCATE a life with commits no copy has read
/// (`Capturer::release_pass_pin`). The waiting checkpoint's two locks are held from open file
/// descriptions, as another process's are (this process's own are invisible to the probe).
#[test]
fn a_truncate_waiting_as_a_copying_pass_ends_finds_every_commit_copied() {
    let mut h = Harness::new();
    h.copied_then_dropped();
    let generation = h.generation();
    // A commit for the pass to copy, so that it pins.
    h.insert();
    let db_path = h.capturer.db_path.clone();
    let waiting = std::sync::Arc::new(std::sync::Mutex::new(None));
    let held = waiting.clone();
    h.capturer.after_observe = Some(Box::new(move || {
        let app = Connection::open(&db_path).unwrap();
        for _ in 0..3 {
            app.execute("INSERT INTO t VALUES (randomblob(100))", []).unwrap();
        }
        *held.lock().unwrap() = Some(crate::source::hold_blocking_checkpoint_locks(&db_path));
    }));
    h.capturer.pass().unwrap();
    let locks = waiting.lock().unwrap().take().expect("the pass did not read the WAL");
    assert!(!h.capturer.db.is_pinned(), "the pin taken for the copy outlived the pass");
    h.assert_copied_to_the_wal_end();
    // The checkpoint goes on once no pin is in its way.
    drop(locks);
    let busy: i64 = h.app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).unwrap();
    assert_eq!(busy, 0, "the app's TRUNCATE did not get through");
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
        began_on_an_empty_wal_long_after_the_last_write().assert_an_unseen_life_breaks_the_generation(then_write_again);
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

/// After a drop, a pass woken by a file event comes as soon as the timer's would
/// ([`AFTER_DROP_SPACING`]), not a pass spacing after the last pass: a writer the capturer does
/// not poll sends an event with each commit, and each such event held back the pass that would
/// see the restart.
#[test]
fn after_a_drop_a_file_event_waits_no_longer_than_the_timer() {
    let mut h = Harness::new();
    let (_events, wake_tx, wake_rx) = turned_after_a_first_pass(&mut h);
    h.capturer.timing.pass_spacing = Duration::from_millis(100);
    h.copied_then_dropped();
    h.capturer.last_change = Instant::now();
    h.insert();
    wake_tx.send(Wake::WalChanged).unwrap();
    match h.capturer.turn(&wake_rx) {
        Turn::Again(wait) => assert!(wait <= AFTER_DROP_SPACING, "a file event after a drop waited {wait:?}"),
        Turn::Done(_) => panic!("the capturer stopped"),
    }
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
