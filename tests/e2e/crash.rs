//! Crashes: SIGKILL at random moments under load, and SIGTERM right after a burst.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::harness::*;

on_both_backends! {
    fn sigkill_at_random_points_under_load_loses_nothing(backend: Backend) {
        crash_under_load(backend, 8);
    }
}

/// The nightly-style run: many more crashes than CI can afford. `cargo nextest run --run-ignored
/// only nightly_` (about 4 minutes).
#[test]
#[ignore = "nightly: 100 crashes on each backend"]
fn nightly_sigkill_at_random_points_under_load_loses_nothing() {
    crash_under_load(Backend::File, 100);
    crash_under_load(Backend::Gcs, 100);
}

/// SIGKILL `rounds` times at seeded random moments while the app writes and checkpoints, then
/// restore and compare.
fn crash_under_load(backend: Backend, rounds: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let scratch = Scratch::on(backend);
    App::open(&scratch.db()).insert(1);
    // Build walstream now: a build while the writer runs would pile up a backlog the final
    // flush cannot ship within its deadline.
    walstream_bin();

    // The application keeps writing, and checkpointing, through every crash.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop, mut rng) = (scratch.db(), stop.clone(), rand::rngs::StdRng::seed_from_u64(rng.gen()));
        std::thread::spawn(move || {
            let mut app = App::open(&db);
            let mut commits = 0u64;
            while !stop.load(Ordering::Relaxed) {
                app.insert(rng.gen_range(1..20));
                commits += 1;
                match rng.gen_range(0..200) {
                    0 => {
                        app.checkpoint("TRUNCATE");
                    }
                    1 => app.insert_large(5 << 20),
                    2..=4 => {
                        app.checkpoint("PASSIVE");
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_micros(rng.gen_range(0..2000)));
            }
            commits
        })
    };

    for round in 0..rounds {
        let replicator = scratch.start_replicator();
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..700)));
        replicator.kill();
        eprintln!("round {round}: killed");
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..200)));
    }
    stop.store(true, Ordering::Relaxed);
    let commits = writer.join().unwrap();
    assert!(commits > 100, "the writer made only {commits} commits");

    // Catch up on the backlog the crashes left (the barrier), then a clean stop, whose flush
    // deadline is not meant for minutes of backlog.
    let addr = format!("127.0.0.1:{}", free_port());
    let replicator = Replicator::start_with_args(
        &scratch.db(),
        &[scratch.replica_url()],
        scratch.path("replicate.log"),
        &[],
        &["-addr", &addr],
    );
    let synced = walstream(&["sync", "-addr", &addr, "-timeout", "300s"]);
    assert!(synced.status.success(), "{}", stderr(&synced));
    replicator.stop_ok();
    scratch.assert_restores_source();
}

on_both_backends! {
    fn sigterm_right_after_a_burst_ships_every_commit(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        app.insert(1);
        let replicator = scratch.start_replicator();
        wait_for_snapshot(&scratch);
        for _ in 0..500 {
            app.insert(1);
        }
        app.insert_large(2 << 20);
        let committed = app.count();
        // No pause: the signal races the file events of the last commits.
        replicator.stop_ok();
        let restored = scratch.assert_restores_source();
        assert_eq!(App::open(&restored).count(), committed);
    }
}

on_both_backends! {
    /// The replicator is frozen (SIGSTOP) while the app commits, then gets SIGTERM and SIGCONT
    /// together: none of those commits was copied before the signal, so only the final flush can
    /// ship them.
    fn sigterm_ships_commits_made_while_the_replicator_could_not_run(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        app.insert(1);
        let replicator = scratch.start_replicator();
        wait_for_snapshot(&scratch);
        for round in 0..3 {
            replicator.signal(libc::SIGSTOP);
            for _ in 0..50 {
                app.insert(2);
            }
            if round == 2 {
                app.insert_large(3 << 20);
            } else {
                replicator.signal(libc::SIGCONT);
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let committed = app.count();
        replicator.signal(libc::SIGTERM);
        replicator.signal(libc::SIGCONT);
        let status = replicator.wait_for_exit();
        assert!(status.success(), "replicate exited {status}");
        let restored = scratch.assert_restores_source();
        assert_eq!(App::open(&restored).count(), committed);
    }
}

#[test]
fn a_flush_that_cannot_finish_in_time_is_reported_and_a_second_signal_exits_at_once() {
    let scratch = Scratch::new();
    let url = scratch.unwritable_replica_url();
    let mut app = App::open(&scratch.db());
    app.insert(50);

    let replicator = Replicator::start_with_args(
        &scratch.db(),
        std::slice::from_ref(&url),
        scratch.path("deadline.log"),
        &[],
        &["-shutdown-timeout", "1s"],
    );
    app.insert(50);
    replicator.signal(libc::SIGTERM);
    let log = scratch.path("deadline.log");
    let status = replicator.wait_for_exit();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(8), "{text}");
    assert!(
        text.contains("shutdown deadline passed with 1 replica(s) not fully shipped: replica #1 at"),
        "names what it could not ship:\n{text}"
    );

    // A 60 s budget, cut short by a second signal (wait_for_exit gives up after 30 s).
    let replicator = Replicator::start_with_args(
        &scratch.db(),
        &[url],
        scratch.path("twice.log"),
        &[],
        &["-shutdown-timeout", "60s"],
    );
    replicator.signal(libc::SIGTERM);
    wait_until(Duration::from_secs(10), "the graceful shutdown to begin", || {
        replicator.log_text().contains("shutting down")
    });
    replicator.signal(libc::SIGTERM);
    let log = scratch.path("twice.log");
    let status = replicator.wait_for_exit();
    assert_eq!(status.code(), Some(130), "{}", std::fs::read_to_string(&log).unwrap());
}

on_both_backends! {
    /// While walstream is down the app commits and closes its last connection: SQLite
    /// checkpoints those commits into the file and deletes the WAL, so they exist nowhere
    /// walstream could copy them from as WAL. The restarted replicator must notice and start
    /// over from a snapshot.
    fn commits_checkpointed_away_while_walstream_was_down_are_shipped(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        app.insert(100);
        let replicator = scratch.start_replicator();
        wait_for_snapshot(&scratch);
        app.insert(100);
        replicator.kill();
        app.insert(300);
        drop(app);
        let wal = format!("{}-wal", scratch.db().display());
        assert!(!std::path::Path::new(&wal).exists(), "closing the last connection deletes the WAL");

        let replicator = scratch.start_replicator();
        let mut app = App::open(&scratch.db());
        app.insert(10);
        replicator.stop_ok();
        let restored = scratch.assert_restores_source();
        assert_eq!(App::open(&restored).count(), 510);
    }
}

on_both_backends! {
    /// SIGKILL right after a new generation begins, while its 40 MiB snapshot is being written
    /// and uploaded: the next start must leave a restorable replica with every row.
    fn sigkill_during_a_generation_switch_loses_nothing(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        app.insert_large(40 << 20);
        app.checkpoint("TRUNCATE");
        app.insert(10);
        let replicator = scratch.start_replicator();
        wait_for_snapshot(&scratch);
        app.insert(10);
        replicator.stop_ok();
        // Without its generation file the next start switches to a new generation.
        std::fs::remove_file(scratch.path(".app.db-walstream/generation")).unwrap();
        app.insert(10);
        let replicator = scratch.start_replicator();
        wait_until(Duration::from_secs(20), "the second generation to begin", || replicator.log_text().matches("new generation").count() == 2);
        replicator.kill();
        // For the record: whether the kill landed before the new snapshot was uploaded.
        eprintln!("snapshots uploaded before the kill: {}", std::fs::read_to_string(scratch.path("replicate.log")).unwrap().matches("snapshot uploaded").count());
        app.insert(10);

        let replicator = scratch.start_replicator();
        app.insert(10);
        replicator.stop_ok();
        let restored = scratch.assert_restores_source();
        assert_eq!(App::open(&restored).count(), App::open(&scratch.db()).count());
    }
}

/// A steady stream's new WAL life waits for the next upload slot, so a replica can end exactly
/// where the old life ended while the shadow already holds only the new one. A SIGKILL then
/// must not cost a generation: the restart knows the old life's length and goes on at the new
/// life, and the replica still restores every row.
#[test]
fn a_crash_between_two_wal_lives_keeps_the_generation() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    app.insert(10);
    let log = scratch.path("replicate.log");
    let replicator = Replicator::start_with_args(
        &scratch.db(),
        &[scratch.replica_url()],
        log.clone(),
        &[],
        &["-sync-interval", "3s"],
    );
    wait_for_snapshot(&scratch);
    let segments = |scratch: &Scratch| scratch.replica_keys().into_iter().filter(|k| k.ends_with(".wal.lz4")).count();
    wait_until(Duration::from_secs(10), "the first segment", || segments(&scratch) > 0);
    // A quiet start: this commit ships at once and opens a 3 s slot.
    std::thread::sleep(Duration::from_millis(500));
    app.insert(1);
    wait_until(Duration::from_secs(10), "the commit after a quiet spell", || segments(&scratch) > 1);
    let before_slot = segments(&scratch);
    // Within the slot: more of this life, its end (the app's TRUNCATE checkpoint), and the
    // start of the next life.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        app.insert(1);
    }
    app.checkpoint("TRUNCATE");
    // The slot ships the old life's tail alone; the new life, still being written to, waits
    // for the slot after it (a writer quiet at the slot would have it go up with the tail).
    let deadline = Instant::now() + Duration::from_secs(10);
    while segments(&scratch) == before_slot {
        assert!(Instant::now() < deadline, "the old life's tail never went up");
        app.insert(1);
        std::thread::sleep(Duration::from_millis(20));
    }
    // One more commit, held for the next slot too: its capture pass frees what was shipped.
    app.insert(1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(segments(&scratch), before_slot + 1, "the new life waited for its slot");
    replicator.kill();

    let replicator = Replicator::start(&scratch.db(), &[scratch.replica_url()], log.clone());
    app.insert(5);
    replicator.stop_ok();
    let text = std::fs::read_to_string(&log).unwrap();
    let generations: Vec<&str> = text.lines().filter(|l| l.contains("new generation db=")).collect();
    assert_eq!(generations.len(), 1, "the restart kept the generation: {generations:#?}");
    assert_eq!(scratch.generation_count(), 1);
    scratch.assert_restores_source();
}
