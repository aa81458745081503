//! The application must never wait for walstream: with a read transaction held open for 30 s
//! (so the WAL cannot be checkpointed and keeps growing) and a writer committing beside it, the
//! writer's worst commit with walstream replicating is compared with its worst without.

use std::time::{Duration, Instant};

use crate::harness::*;

const PHASE: Duration = Duration::from_secs(30);

/// Commits one row at a time for `PHASE` while another connection holds a read transaction;
/// returns the slowest commit and how many there were.
fn write_beside_a_long_reader(db: &std::path::Path) -> (Duration, u64) {
    let reader = rusqlite::Connection::open(db).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader.query_row("SELECT count(*) FROM items", [], |r| r.get(0)).unwrap();
    let mut app = App::open(db);
    // No fsync per commit: the comparison is of waiting, not of the disk's own spikes.
    app.conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    let started = Instant::now();
    let (mut worst, mut commits) = (Duration::ZERO, 0);
    while started.elapsed() < PHASE {
        let t = Instant::now();
        app.insert(1);
        worst = worst.max(t.elapsed());
        commits += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    reader.execute_batch("COMMIT").unwrap();
    (worst, commits)
}

on_backends! {
    [file: File, gcs: Gcs]
    /// On file:// and GCS, the backends issue 19's item 6 names. Not on S3 for now: a clean CI run
    /// saw 66 ms against 9 ms without walstream there, on a 2-core machine that also runs moto, a
    /// Python server; whether the time went to moto's CPU or to walstream's (SigV4 hashes every
    /// body) was not measured, so S3 is an open part of that item, not a passing one.
    fn a_long_read_transaction_beside_walstream_never_stalls_the_apps_writes(backend: Backend) {
        let alone = Scratch::new();
        App::open(&alone.db()).insert(100);
        let (worst_alone, commits_alone) = write_beside_a_long_reader(&alone.db());

        let scratch = Scratch::on(backend);
        App::open(&scratch.db()).insert(100);
        let replicator = scratch.start_replicator();
        wait_for_snapshot(&scratch);
        let (worst_replicated, commits_replicated) = write_beside_a_long_reader(&scratch.db());
        replicator.stop_ok();
        scratch.assert_restores_source();

        eprintln!("worst commit without walstream {worst_alone:?} ({commits_alone} commits), with walstream {worst_replicated:?} ({commits_replicated} commits)");
        // Nothing asked walstream to step aside (the app runs no blocking checkpoint), and with the
        // reader holding the back-fill back a drop of the pin frees nothing: each one stored what
        // the pin kept in the live WAL and copied unpinned for a second, writing the WAL again.
        let log = std::fs::read_to_string(scratch.path("replicate.log")).unwrap_or_default();
        let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
        assert_eq!(count("stepped aside"), 0, "walstream saw a blocking checkpoint where there was none");
        assert!(count("dropping the pin") <= 2, "{} pin drops beside a long reader", count("dropping the pin"));
        assert!(
            worst_replicated <= worst_alone + Duration::from_millis(50),
            "walstream stalled the app: worst commit {worst_replicated:?} with it, {worst_alone:?} without"
        );
    }
}
