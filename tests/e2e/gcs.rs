//! What only gcs:// has: the store contract against the emulator, paged listings, a missing
//! bucket, rejected credentials, and an emulator that is down when walstream starts.

use std::time::Duration;

use bytes::Bytes;
use walstream_store::{GcsStore, ObjectStore};

use crate::emulator;
use crate::harness::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A store on a fresh bucket of the shared emulator. `GcsStore` reads `STORAGE_EMULATOR_HOST`
/// when it is made; every test of this process points it at the same emulator, so setting the
/// variable here is race-free.
fn store(prefix: &str) -> (String, GcsStore) {
    let bucket = emulator::fresh_bucket();
    std::env::set_var("STORAGE_EMULATOR_HOST", emulator::host());
    let store = GcsStore::new(bucket.clone(), prefix);
    (bucket, store)
}

#[test]
fn gcs_store_passes_conformance_at_the_root_and_under_a_prefix() {
    let rt = runtime();
    for prefix in ["", "apps/db"] {
        let (bucket, store) = store(prefix);
        rt.block_on(walstream_store::conformance::run(&store));
        if !prefix.is_empty() {
            assert!(
                emulator::list(&bucket, "").iter().all(|name| name.starts_with("apps/db/")),
                "objects must stay under the prefix"
            );
        }
    }
}

#[test]
fn listing_follows_pages_past_a_thousand_objects() {
    let (bucket, store) = store("db");
    let store = std::sync::Arc::new(store);
    let rt = runtime();
    const OBJECTS: u32 = 1_500;
    rt.block_on(async {
        let mut puts = tokio::task::JoinSet::new();
        for i in 0..OBJECTS {
            let store = store.clone();
            puts.spawn(async move {
                store
                    .put(
                        &format!("generations/0000000000000001/wal/00000000_{i:08x}.wal.lz4"),
                        Bytes::from_static(b"x"),
                    )
                    .await
            });
            while puts.len() >= 32 {
                puts.join_next().await.unwrap().unwrap().unwrap();
            }
        }
        while let Some(put) = puts.join_next().await {
            put.unwrap().unwrap();
        }
    });
    // The emulator really pages at 1,000, so the listing below had to follow a token.
    assert!(
        emulator::first_page_has_next(&bucket, "db/generations/"),
        "the emulator returned every object in one page; the test would prove nothing"
    );
    let listed = rt.block_on(store.list("generations/")).unwrap();
    eprintln!("listed {} objects", listed.len());
    assert_eq!(listed.len(), OBJECTS as usize);
    assert!(listed.windows(2).all(|w| w[0].key < w[1].key), "sorted by key");
    assert!(listed.iter().all(|m| m.created > std::time::SystemTime::UNIX_EPOCH), "timeCreated is reported");
}

#[test]
fn a_missing_bucket_is_named_with_its_own_exit_code_and_leaves_nothing() {
    emulator::host();
    let scratch = Scratch::new();
    let out = scratch.path("out.db");
    let output = walstream(&["restore", "-o", out.to_str().unwrap(), "gcs://no-such-bucket/db"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(9), "{stderr}");
    assert!(stderr.contains("bucket \"no-such-bucket\" does not exist"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.contains("ERROR")).count(), 1, "one error line: {stderr}");
    assert_eq!(list_dir(scratch.dir.path()), Vec::<String>::new());

    // Replicate keeps the data safe locally, says why it cannot ship, and reports what it could
    // not flush.
    let mut app = App::open(&scratch.db());
    app.insert(5);
    let replicator =
        Replicator::start(&scratch.db(), &["gcs://no-such-bucket/db".to_string()], scratch.path("replicate.log"));
    wait_until(Duration::from_secs(20), "the missing bucket to be logged", || {
        replicator.log_text().contains("bucket \"no-such-bucket\" does not exist")
    });
}

#[test]
fn credentials_that_cannot_be_used_are_named_with_their_own_exit_code() {
    let scratch = Scratch::new();
    let out = scratch.path("out.db");
    let output = std::process::Command::new(walstream_bin())
        .args(["restore", "-o", out.to_str().unwrap(), "gcs://some-bucket/db"])
        .env_remove("STORAGE_EMULATOR_HOST")
        .env("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(10), "{stderr}");
    assert!(
        stderr.contains("GOOGLE_APPLICATION_CREDENTIALS=/nonexistent/key.json"),
        "the error must say which credentials: {stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn an_emulator_down_at_start_is_caught_up_with_once_it_is_up() {
    let scratch = Scratch::new();
    let port = emulator::free_port();
    let host = format!("127.0.0.1:{port}");
    let url = "gcs://late-bucket/db".to_string();
    let mut app = App::open(&scratch.db());
    let replicator = Replicator::start_with_env(
        &scratch.db(),
        std::slice::from_ref(&url),
        scratch.path("replicate.log"),
        &[("STORAGE_EMULATOR_HOST", &host)],
    );
    for _ in 0..50 {
        app.insert(4);
    }
    app.checkpoint("TRUNCATE");
    for _ in 0..50 {
        app.insert(4);
    }
    wait_until(Duration::from_secs(20), "a failed upload to be logged", || {
        replicator.log_text().contains("replica upload failed")
    });

    emulator::start(port);
    emulator::create_bucket_on(&host, "late-bucket");
    app.insert(4);
    replicator.stop_ok();

    let restored = scratch.path("restored.db");
    let output = std::process::Command::new(walstream_bin())
        .args(["restore", "-o", restored.to_str().unwrap(), &url])
        .env("STORAGE_EMULATOR_HOST", &host)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_same_database(&scratch.db(), &restored);
}
