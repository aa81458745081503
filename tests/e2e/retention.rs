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
        let config = scratch.path("walstream.yml");
        std::fs::write(&config, format!(
            "dbs:\n  - path: {}\n    replicas:\n      - url: {}\n        snapshot-interval: 1s\n        retention: 3s\n        retention-check-interval: 500ms\n",
            scratch.db().display(), scratch.replica_url(),
        )).unwrap();
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
        wait_until(Duration::from_secs(30), "every snapshot before the last index to expire", || {
            let found = snapshots(&scratch);
            found.len() == 1 && found[0].1 > 0
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
