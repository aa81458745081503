//! Replicate, then restore, and get the source back: under app checkpoints, large transactions,
//! VACUUM, and a database that does not exist yet when walstream starts.

use std::time::Duration;

use crate::harness::*;

/// A write load with everything that moves the WAL under walstream: app TRUNCATE and PASSIVE
/// checkpoints (restarts), SQLite's own autocheckpoint, a transaction larger than an LZ4 block
/// and a segment, deletes, and VACUUM, which rewrites every page.
fn mixed_load(app: &mut App) {
    for round in 0..6 {
        for _ in 0..40 {
            app.insert(3);
        }
        match round % 3 {
            0 => assert_eq!(app.checkpoint("TRUNCATE").0, 0, "the app's TRUNCATE checkpoint must not be blocked by walstream"),
            1 => {
                app.checkpoint("PASSIVE");
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    app.insert_large(6 << 20);
    app.conn.execute("DELETE FROM items WHERE id % 3 = 0", []).unwrap();
    app.conn.execute("UPDATE items SET body = body || '-updated' WHERE id % 5 = 0", []).unwrap();
    app.conn.execute_batch("VACUUM").unwrap();
    for _ in 0..30 {
        app.insert(5);
    }
    assert_eq!(app.checkpoint("TRUNCATE").0, 0);
    app.insert(10);
}

#[test]
fn restore_equals_source_after_checkpoints_large_transactions_and_vacuum() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    app.insert(1);
    let replicator = Replicator::start(&scratch.db(), &[scratch.replica_url()], scratch.path("replicate.log"));
    wait_for_snapshot(&scratch.path("replica"));
    mixed_load(&mut app);
    let status = replicator.stop();
    assert!(status.success(), "replicate exited {status}");

    let restored = scratch.path("restored.db");
    restore(&scratch.replica_url(), &restored);
    assert_same_database(&scratch.db(), &restored);
    // The app's TRUNCATE checkpoints were followed as new indexes of one generation, not as new
    // generations with full snapshots.
    let generations = std::fs::read_dir(scratch.path("replica/generations")).unwrap().count();
    assert_eq!(generations, 1, "app checkpoints must not start new generations");
}

#[test]
fn database_created_after_walstream_starts_is_replicated() {
    let scratch = Scratch::new();
    let replicator = Replicator::start(&scratch.db(), &[scratch.replica_url()], scratch.path("replicate.log"));
    std::thread::sleep(Duration::from_millis(400));
    assert!(!scratch.db().exists(), "walstream must not create the application's database");
    let mut app = App::open(&scratch.db());
    for _ in 0..50 {
        app.insert(2);
    }
    wait_for_snapshot(&scratch.path("replica"));
    app.insert(1);
    let status = replicator.stop();
    assert!(status.success(), "replicate exited {status}");
    let restored = scratch.path("restored.db");
    restore(&scratch.replica_url(), &restored);
    assert_same_database(&scratch.db(), &restored);
}

#[test]
fn two_replica_urls_each_restore_the_source() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    let second = format!("file://{}", scratch.path("replica2").display());
    let replicator = Replicator::start(&scratch.db(), &[scratch.replica_url(), second.clone()], scratch.path("replicate.log"));
    for _ in 0..100 {
        app.insert(4);
    }
    app.checkpoint("TRUNCATE");
    app.insert(4);
    assert!(replicator.stop().success());
    for (i, url) in [scratch.replica_url(), second].iter().enumerate() {
        let restored = scratch.path(&format!("restored{i}.db"));
        restore(url, &restored);
        assert_same_database(&scratch.db(), &restored);
    }
}

#[test]
fn restart_of_walstream_continues_the_generation() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    let replicator = Replicator::start(&scratch.db(), &[scratch.replica_url()], scratch.path("replicate.log"));
    for _ in 0..50 {
        app.insert(2);
    }
    assert!(replicator.stop().success());
    for _ in 0..50 {
        app.insert(2);
    }
    let replicator = Replicator::start(&scratch.db(), &[scratch.replica_url()], scratch.path("replicate.log"));
    for _ in 0..50 {
        app.insert(2);
    }
    assert!(replicator.stop().success());
    let restored = scratch.path("restored.db");
    restore(&scratch.replica_url(), &restored);
    assert_same_database(&scratch.db(), &restored);
    let generations = std::fs::read_dir(scratch.path("replica/generations")).unwrap().count();
    assert_eq!(generations, 1, "an orderly restart with the WAL intact keeps the generation");
}
