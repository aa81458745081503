//! Snapshot intervals and retention from the config file: old generations and history go, the
//! latest chain stays restorable by walstream and by litestream v0.3.13.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;

/// The snapshot indexes in the replica, per generation, ascending.
fn snapshots(scratch: &Scratch) -> Vec<(String, u32)> {
    let mut found: Vec<(String, u32)> = scratch
        .replica_keys()
        .iter()
        .filter_map(|k| {
            let rest = k.strip_prefix("generations/")?;
            let (generation, file) = rest.split_once("/snapshots/")?;
            Some((generation.to_string(), u32::from_str_radix(file.strip_suffix(".snapshot.lz4")?, 16).ok()?))
        })
        .collect();
    found.sort();
    found
}

on_both_backends! {
    fn retention_drops_old_generations_and_history_and_keeps_the_latest_chain(backend: Backend) {
        let scratch = Scratch::on(backend);
        let config = scratch.write_config(&["snapshot-interval: 1s", "retention: 3s", "retention-check-interval: 500ms"]);
        let start = || Replicator::start_args(&["-config".into(), config.clone().into()], scratch.path("replicate.log"), &[]);
        let mut app = App::open(&scratch.db());
        app.insert(5);

        // An older generation: replicate, stop, and forget the local state so the next run
        // cannot continue it.
        let replicator = start();
        wait_for_snapshot(&scratch);
        app.insert(5);
        replicator.stop_ok();
        let old_generation = snapshots(&scratch)[0].0.clone();
        std::fs::remove_dir_all(scratch.path(".app.db-walstream")).unwrap();

        let replicator = start();
        // Writes across several WAL lives, so later snapshots sit at later indexes.
        for i in 0..30 {
            app.insert(3);
            if i % 5 == 4 {
                app.checkpoint("TRUNCATE");
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        wait_until(Duration::from_secs(30), "retention to delete the old generation", || scratch.replica_keys().iter().all(|k| !k.contains(&old_generation)));
        // Once writes stop, interval snapshots land at the last index and the older ones expire.
        // The uploader may still be a slot (1 s) behind, with a later snapshot to come after
        // the WAL it waits for: the single snapshot must stay single for 2 s.
        wait_until(Duration::from_secs(30), "every snapshot before the last index to expire", || {
            let found = snapshots(&scratch);
            if !(found.len() == 1 && found[0].1 > 0) {
                return false;
            }
            std::thread::sleep(Duration::from_secs(2));
            snapshots(&scratch) == found
        });
        replicator.stop_ok();
        let log = std::fs::read_to_string(scratch.path("replicate.log")).unwrap();
        assert!(log.matches("snapshot taken").count() >= 3, "the 1 s snapshot interval took too few snapshots:\n{log}");
        let found = snapshots(&scratch);
        assert_eq!(found.len(), 1, "{found:?}");
        let (generation, min_index) = found[0].clone();
        assert_ne!(generation, old_generation);
        let keys = scratch.replica_keys();
        let stale: Vec<&String> = keys.iter().filter(|k| k.contains("/wal/") && u32::from_str_radix(&k.rsplit('/').next().unwrap()[..8], 16).unwrap() < min_index).collect();
        assert!(stale.is_empty(), "WAL below the oldest snapshot (index {min_index}) survived retention: {stale:?}");

        scratch.assert_restores_source();
        let restored = scratch.path("by-litestream.db");
        let output = with_emulator(&mut Command::new(litestream_bin())).args(["restore", "-o"]).arg(&restored).arg(scratch.replica_url()).output().unwrap();
        assert!(output.status.success(), "litestream restore failed: {}", String::from_utf8_lossy(&output.stderr));
        assert_same_database(&scratch.db(), &restored);
    }
}

/// Retention racing a restore, end to end: the restore's GETs go through the fault proxy, which
/// holds one GET of a snapshot (then, in a second restore, of a WAL segment) for 3 s while
/// the replicator, with a 1 s snapshot interval and 1 s retention, deletes what the restore
/// planned on. Each restore must notice, plan again and produce a consistent database; after
/// the writer stops, a restore must equal the source.
#[test]
fn retention_deleting_what_a_running_restore_planned_on_does_not_fail_the_restore() {
    use crate::fault_proxy::{Fault, FaultProxy};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let scratch = Scratch::on(Backend::Gcs);
    let config = scratch.write_config(&["snapshot-interval: 1s", "retention: 1s", "retention-check-interval: 200ms"]);
    let mut app = App::open(&scratch.db());
    app.insert(20);
    let replicator = Replicator::start_args(&["-config".into(), config.into()], scratch.path("replicate.log"), &[]);
    wait_for_snapshot(&scratch);

    // The app keeps writing, and checkpoints so that indexes advance and retention has WAL
    // below each new snapshot to delete.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                app.insert(10);
                round += 1;
                if round % 15 == 0 {
                    app.checkpoint("TRUNCATE");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            app
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    let proxy = FaultProxy::start(crate::emulator::host(), seed());
    for (n, object) in ["snapshot.lz4", "wal.lz4"].into_iter().enumerate() {
        let out = scratch.path(&format!("racing-{n}.db"));
        let hold = Fault::Delay(Duration::from_secs(3));
        let held = || proxy.injected().get(&(hold, "GET")).copied().unwrap_or(0);
        proxy.target("GET", object, hold, 1);
        let restore = || {
            let _ = std::fs::remove_file(&out);
            let output = Command::new(walstream_bin())
                .env("STORAGE_EMULATOR_HOST", &proxy.addr)
                .args(["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()])
                .output()
                .unwrap();
            let log = stderr(&output);
            (output, log)
        };
        // Whether a given restore races depends on timing: its plan may start at a snapshot
        // whose WAL has not gone up yet (the 1 s sync interval), or retention may not reach
        // the held object within the 3 s. Such a restore must still succeed; the race is then
        // tried again a little later, a few times at most, until one restore had to plan again.
        // One GET is held at a time: the hold is armed again only once a restore has used it.
        let mut before = held();
        let (mut output, mut log) = restore();
        for _ in 0..10 {
            if !output.status.success() || log.contains("planning again") {
                break;
            }
            if held() > before {
                proxy.target("GET", object, hold, 1);
            }
            std::thread::sleep(Duration::from_millis(300));
            before = held();
            (output, log) = restore();
        }
        assert!(output.status.success(), "the restore racing retention on {object} failed ({}): {log}", output.status);
        assert!(
            log.contains("planning again"),
            "retention never deleted the {object} the restore planned on, so nothing raced:\n{log}"
        );
        // A consistent database: rows 1..=k, each as the app wrote it (restore itself ran
        // integrity_check before the rename).
        let restored = rusqlite::Connection::open(&out).unwrap();
        let (count, max, wrong): (i64, i64, i64) = restored
            .query_row(
                "SELECT count(*), max(id), sum(body != printf('%.200c', id % 26 + 65) || id) FROM items",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert!(
            count >= 20 && count == max && wrong == 0,
            "restore racing {object}: {count} rows, max id {max}, {wrong} bodies wrong"
        );
    }

    stop.store(true, Ordering::Relaxed);
    let app = writer.join().unwrap();
    replicator.stop_ok();
    scratch.assert_restores_source();
    drop(app);
}

/// An idle database costs no requests, even with a retention check every 200 ms: the check
/// after the first knows nothing can expire for an hour. Counted at the proxy, not from
/// walstream's own metrics.
#[test]
fn an_idle_replica_is_not_listed_at_every_retention_check() {
    use crate::fault_proxy::FaultProxy;

    let scratch = Scratch::on(Backend::Gcs);
    let proxy = FaultProxy::start(crate::emulator::host(), seed());
    let config = scratch.write_config(&["retention: 1h", "retention-check-interval: 200ms"]);
    let mut app = App::open(&scratch.db());
    app.insert(10);
    let replicator = Replicator::start_args(
        &["-config".into(), config.into()],
        scratch.path("replicate.log"),
        &[("STORAGE_EMULATOR_HOST", &proxy.addr)],
    );
    wait_for_snapshot(&scratch);
    // Start-up: lease, listings, snapshot, WAL, and the first retention check.
    std::thread::sleep(Duration::from_secs(1));
    let settled = proxy.forwarded();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(proxy.forwarded(), settled, "an idle replicator made requests over 3 s (15 retention checks)");

    app.insert(1);
    wait_until(Duration::from_secs(20), "the commit to be shipped", || proxy.forwarded() > settled);
    replicator.stop_ok();
    scratch.assert_restores_source();
}
