//! Idle databases rest: once a database has been quiet for `idle-release` and its replicas
//! hold all of it, walstream lets its pin and connections go and keeps one descriptor, the
//! database file, whose lock keeps the application's last close from deleting the WAL. The next
//! commit wakes it, and the generation goes on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

use crate::harness::*;

const DATABASES: usize = 20;

/// How many of `pid`'s descriptors name each of `db`, its `-wal` and its `-shm`.
fn descriptors_of(pid: i32, db: &Path) -> [usize; 3] {
    let names = ["", "-wal", "-shm"].map(|suffix| PathBuf::from(format!("{}{suffix}", db.display())));
    let mut counts = [0; 3];
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            if let Some(at) = names.iter().position(|name| *name == target) {
                counts[at] += 1;
            }
        }
    }
    counts
}

/// The scratch database with a few rows, replicated with `-idle-release idle`.
fn replicating_with_idle_release(scratch: &Scratch, idle: &str) -> (App, Replicator) {
    let mut app = App::open(&scratch.db());
    app.insert(5);
    let replicator = Replicator::start_with_args(
        &scratch.db(),
        &[scratch.replica_url()],
        scratch.path("replicate.log"),
        &[],
        &["-idle-release", idle],
    );
    (app, replicator)
}

fn wait_until_resting(replicator: &Replicator, db: &Path) {
    wait_until(Duration::from_secs(30), "the database resting", || descriptors_of(replicator.pid(), db) == [1, 0, 0]);
}

fn all_resting(pid: i32, dbs: &[PathBuf]) -> bool {
    dbs.iter().all(|db| descriptors_of(pid, db) == [1, 0, 0])
}

/// Twenty databases in one process, each committing now and then: between commits every one
/// rests on its database file alone (and the process on at most 1.5 descriptors a database);
/// an application that opens, reads and closes while they rest finds its WAL still there
/// (without walstream's lock that close would checkpoint and delete it, and the next life would
/// start a new generation); every commit is shipped, one generation each.
#[test]
fn idle_databases_rest_on_one_descriptor_each_and_lose_nothing() {
    let scratch = Scratch::new();
    let (config_path, dbs) = many_databases(&scratch, DATABASES, "idle-release: 200ms\n");
    let replicator =
        Replicator::start_args(&["-config".into(), config_path.into()], scratch.path("replicate.log"), &[]);
    let pid = replicator.pid();
    for round in 0..3 {
        wait_until(Duration::from_secs(30), &format!("every database resting (round {round})"), || {
            all_resting(pid, &dbs)
        });
        let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
        assert!(
            descriptors * 2 <= 64 * 2 + 3 * DATABASES,
            "{descriptors} descriptors for {DATABASES} resting databases"
        );
        for db in &dbs {
            let reader = Connection::open(db).unwrap();
            let _: i64 = reader.query_row("SELECT count(*) FROM items", [], |r| r.get(0)).unwrap();
            drop(reader);
            let wal = PathBuf::from(format!("{}-wal", db.display()));
            assert!(wal.exists(), "the application's last close deleted {} while walstream rested", wal.display());
        }
        for db in &dbs {
            App::open(db).insert(2);
        }
    }
    wait_until(Duration::from_secs(30), "every database resting after the last commits", || all_resting(pid, &dbs));
    let log = replicator.log_text();
    replicator.stop_ok();
    let generations = log.lines().filter(|l| l.contains("new generation")).count();
    assert_eq!(generations, DATABASES, "one generation a database:\n{log}");
    assert!(log.contains("woke from rest"), "no database woke from rest: the test proves nothing");
    assert_many_databases_restore(&scratch, &dbs, 1);
}

on_both_backends! {
    /// `-idle-release` on the command line: a lone database rests too when asked, and its
    /// commits while it rests still reach the replica.
    fn a_database_given_idle_release_rests_and_ships_the_commit_that_wakes_it(backend: Backend) {
        let scratch = Scratch::on(backend);
        let (mut app, replicator) = replicating_with_idle_release(&scratch, "200ms");
        for _ in 0..3 {
            wait_until_resting(&replicator, &scratch.db());
            app.insert(7);
        }
        replicator.stop_ok();
        assert_eq!(scratch.generation_count(), 1);
        scratch.assert_restores_source();
    }
}

on_both_backends! {
    /// The application's TRUNCATE checkpoint right after a commit that wakes a resting database
    /// races the wake: walstream either copies the commit first or loses the WAL's frames and
    /// starts a new generation from the database file. Either way the replica holds every row.
    fn an_apps_truncate_right_after_the_waking_commit_loses_nothing(backend: Backend) {
        let scratch = Scratch::on(backend);
        let (mut app, replicator) = replicating_with_idle_release(&scratch, "100ms");
        for _ in 0..10 {
            wait_until_resting(&replicator, &scratch.db());
            app.insert(3);
            let (busy, _, _) = app.checkpoint("TRUNCATE");
            assert_eq!(busy, 0, "nothing may hold the application's checkpoint back while walstream rests");
        }
        let log = replicator.log_text();
        replicator.stop_ok();
        eprintln!("generations: {}", scratch.generation_count());
        assert!(log.contains("woke from rest"), "no database woke from rest: the test proves nothing");
        scratch.assert_restores_source();
    }
}
