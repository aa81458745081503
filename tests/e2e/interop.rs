//! Byte compatibility with the real litestream v0.3.13, both ways, on file:// replicas.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// `checkpoint` is the app's checkpoint mode. Under litestream it is PASSIVE: litestream's
/// permanent read lock makes an app TRUNCATE wait out its whole busy timeout (#724).
fn load(app: &mut App, checkpoint: &str) {
    for round in 0..5 {
        for _ in 0..30 {
            app.insert(4);
        }
        if round == 2 {
            app.checkpoint(checkpoint);
            app.insert_large(5 << 20);
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

on_both_backends! {
    fn litestream_restores_what_walstream_wrote(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        app.insert(1);
        let replicator = scratch.start_replicator();
        wait_for_snapshot(&scratch);
        load(&mut app, "TRUNCATE");
        replicator.stop_ok();

        let restored = scratch.path("by-litestream.db");
        let output = with_emulator(&mut Command::new(litestream_bin())).args(["restore", "-o"]).arg(&restored).arg(scratch.replica_url()).output().unwrap();
        assert!(output.status.success(), "litestream restore failed: {}", String::from_utf8_lossy(&output.stderr));
        assert_same_database(&scratch.db(), &restored);
    }
}

on_both_backends! {
    fn walstream_restores_what_litestream_wrote(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        app.insert(1);
        let log = std::fs::File::create(scratch.path("litestream.log")).unwrap();
        let mut litestream = with_emulator(&mut Command::new(litestream_bin())).arg("replicate").arg(scratch.db()).arg(scratch.replica_url()).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        wait_for_snapshot(&scratch);
        load(&mut app, "PASSIVE");
        // Litestream polls once a second; its final sync on SIGTERM ships the rest. v0.3.13 often
        // exits 1 after that sync ("release read lock: context canceled"), so its exit status says
        // nothing about the data: the restore below does.
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(litestream.id() as i32, libc::SIGTERM) }, 0);
        litestream.wait().unwrap();

        let restored = scratch.path("by-walstream.db");
        restore(&scratch.replica_url(), &restored);
        assert_same_database(&scratch.db(), &restored);
    }
}

/// 4 MiB of new rows in 64 KiB transactions, with the app's own checkpoints restarting its
/// WAL: the database ends near 4 MiB, and the WAL passes its size on the way.
pub(crate) fn write_wal_past_the_database(app: &mut App) {
    for round in 0..64 {
        app.insert_large(64 << 10);
        app.insert(2);
        if round % 8 == 7 {
            app.checkpoint("TRUNCATE");
            // Each WAL life seen before the next: lives restarted faster than walstream
            // looks start a new generation instead (no commit lost, but not this test).
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

on_both_backends! {
    /// `-snapshot-wal-ratio`: once the WAL since the last snapshot passes the database's size
    /// (the 256 MiB floor lowered to 256 KiB in this test build), walstream snapshots again in
    /// the same generation, and litestream still restores the replica, from the newest snapshot.
    fn automatic_snapshots_keep_one_generation_and_litestream_restores_them(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        app.insert(1);
        let replicator = Replicator::start_with_args(&scratch.db(), &[scratch.replica_url()], scratch.path("replicate.log"), &[("WALSTREAM_TEST_AUTO_SNAPSHOT_MIN_WAL", "262144")], &["-snapshot-wal-ratio", "1"]);
        wait_for_snapshot(&scratch);
        let snapshots = || scratch.replica_keys().iter().filter(|k| k.contains("/snapshots/")).count();
        write_wal_past_the_database(&mut app);
        wait_until(Duration::from_secs(30), "a second snapshot in the replica", || snapshots() >= 2);
        app.insert(3);
        replicator.stop_ok();
        let log = std::fs::read_to_string(scratch.path("replicate.log")).unwrap();
        assert_eq!(scratch.generation_count(), 1, "an automatic snapshot stays in its generation: {:?}; log:\n{log}", scratch.replica_keys());
        assert!(log.contains("passed snapshot-wal-ratio times the database"), "the snapshot says why it was taken; log:\n{log}");

        scratch.assert_restores_source();
        let restored = scratch.path("by-litestream.db");
        let output = with_emulator(&mut Command::new(litestream_bin())).args(["restore", "-o"]).arg(&restored).arg(scratch.replica_url()).output().unwrap();
        assert!(output.status.success(), "litestream restore failed: {}", String::from_utf8_lossy(&output.stderr));
        assert_same_database(&scratch.db(), &restored);
    }
}
