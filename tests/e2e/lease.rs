//! One writer per replica across machines: two replicators of different databases (as two
//! hosts would be) pointed at the same replica path.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;

fn generations_of(scratch: &Scratch) -> Vec<String> {
    let mut ids: Vec<String> = scratch
        .replica_keys()
        .iter()
        .filter_map(|k| k.strip_prefix("generations/")?.split('/').next().map(String::from))
        .collect();
    ids.dedup();
    ids
}

on_both_backends! {
    fn a_second_replicator_refuses_or_waits_and_takes_over_once_the_first_lets_go(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut first_app = App::open(&scratch.db());
        first_app.insert(100);
        let first = scratch.start_replicator();
        wait_for_snapshot(&scratch);

        let other_db = scratch.path("other.db");
        let mut second_app = App::open(&other_db);
        second_app.insert(30);
        // Told not to wait: exit 15 at once, naming the holder, without writing anything.
        let output = walstream(&["replicate", "-lease-timeout", "0s", other_db.to_str().unwrap(), &scratch.replica_url()]);
        assert_eq!(output.status.code(), Some(15), "{}", stderr(&output));
        assert!(stderr(&output).contains("is leased by") && stderr(&output).contains("another walstream is replicating to it"), "{}", stderr(&output));
        assert_eq!(generations_of(&scratch).len(), 1, "the refused replicator wrote nothing");

        // Told to wait: it captures locally meanwhile and ships once the first hands over.
        let second = Replicator::start_with_args(&other_db, &[scratch.replica_url()], scratch.path("second.log"), &[], &["-lease-timeout", "60s"]);
        wait_until(Duration::from_secs(20), "the second replicator to wait for the lease", || second.log_text().contains("replica is leased by another walstream"));
        second_app.insert(20);
        first_app.insert(10);
        first.stop_ok();
        wait_until(Duration::from_secs(20), "the second replicator to take the lease", || second.log_text().contains("replica lease taken"));
        second_app.insert(5);
        second.stop_ok();

        assert_eq!(generations_of(&scratch).len(), 2);
        let restored = scratch.path("restored.db");
        restore(&scratch.replica_url(), &restored);
        assert_same_database(&other_db, &restored);
        // The lease object does not disturb Litestream.
        let by_litestream = scratch.path("by-litestream.db");
        let output = with_emulator(&mut Command::new(litestream_bin())).args(["restore", "-o"]).arg(&by_litestream).arg(scratch.replica_url()).output().unwrap();
        assert!(output.status.success(), "litestream restore: {}", stderr(&output));
        assert_same_database(&other_db, &by_litestream);
    }
}

#[test]
fn a_holder_whose_lease_was_taken_while_idle_stops_without_writing() {
    let scratch = Scratch::new();
    let mut first_app = App::open(&scratch.db());
    first_app.insert(10);
    let first = Replicator::start_with_args(
        &scratch.db(),
        &[scratch.replica_url()],
        scratch.path("first.log"),
        &[],
        &["-lease-ttl", "1s"],
    );
    wait_for_snapshot(&scratch);
    let first_generation = generations_of(&scratch).pop().unwrap();
    let objects_of_first = || scratch.replica_keys().iter().filter(|k| k.contains(&first_generation)).count();
    // Idle past its lease's term: a newcomer may take it.
    let other_db = scratch.path("other.db");
    let mut second_app = App::open(&other_db);
    second_app.insert(10);
    let second = Replicator::start_with_args(
        &other_db,
        &[scratch.replica_url()],
        scratch.path("second.log"),
        &[],
        &["-lease-timeout", "30s"],
    );
    wait_until(Duration::from_secs(20), "the newcomer to take the expired lease", || {
        second.log_text().contains("replica lease taken")
    });
    wait_until(Duration::from_secs(20), "the newcomer's generation", || generations_of(&scratch).len() == 2);
    let before = objects_of_first();

    // The first holder's next upload finds the lease gone: it stops, exit 15, and writes nothing.
    first_app.insert(10);
    let log = scratch.path("first.log");
    let status = first.wait_for_exit();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(15), "{text}");
    assert!(text.contains("lost the lease of replica file") && text.contains("now held by"), "{text}");
    assert_eq!(objects_of_first(), before, "nothing written after the lease was lost");
    second.stop_ok();
    let restored = scratch.path("restored.db");
    restore(&scratch.replica_url(), &restored);
    assert_same_database(&other_db, &restored);
}

/// An idle holder's retention confirms the lease itself before it deletes anything: once another
/// replicator has taken the expired lease, the idle holder's retention check finds it lost,
/// stops, and deletes nothing. It used to check only that its own uploader was running, never
/// the lease (issue 21); without the check this test fails on the log line.
#[test]
fn an_idle_holder_whose_lease_was_taken_deletes_nothing_of_the_new_holder() {
    let scratch = Scratch::new();
    let mut first_app = App::open(&scratch.db());
    first_app.insert(10);
    // Retention of 1 s, checked every second, and a lease of 1 s that an idle holder lets lapse.
    let config = scratch.write_config(&["retention: 1s", "retention-check-interval: 1s"]);
    let first = Replicator::start_args(
        &["-lease-ttl".into(), "1s".into(), "-config".into(), config.into()],
        scratch.path("first.log"),
        &[],
    );
    wait_for_snapshot(&scratch);
    let other_db = scratch.path("other.db");
    let mut second_app = App::open(&other_db);
    second_app.insert(10);
    let second = Replicator::start_with_args(
        &other_db,
        &[scratch.replica_url()],
        scratch.path("second.log"),
        &[],
        &["-lease-timeout", "30s"],
    );
    wait_until(Duration::from_secs(20), "the newcomer's generation", || generations_of(&scratch).len() == 2);
    let before = scratch.replica_keys();
    // Until the first holder's first retention check after the takeover (a check before it still
    // finds the lease its own).
    let first_log = || std::fs::read_to_string(scratch.path("first.log")).unwrap();
    wait_until(Duration::from_secs(20), "the idle holder's retention check after the takeover", || {
        first_log().contains("retention stopped")
    });
    let first_log = first_log();
    assert!(
        !first_log.contains("retention removed objects"),
        "the idle holder deleted objects without its lease:\n{first_log}"
    );
    // Nothing deleted: every object there before is there still. The newcomer may have added
    // some meanwhile, and one of `before` may have been an upload in progress (a `.tmp` the
    // file store then renamed), which is not an object yet.
    let after = scratch.replica_keys();
    let deleted: Vec<&String> = before.iter().filter(|k| !k.ends_with(".tmp") && !after.contains(k)).collect();
    assert!(deleted.is_empty(), "deleted {deleted:?}; before {before:?}, after {after:?}");
    assert!(
        first_log.contains("retention stopped") && first_log.contains("lost the lease"),
        "the idle holder says why it stopped deleting: {first_log}"
    );
    second.stop_ok();
    drop(first);
    let restored = scratch.path("restored.db");
    restore(&scratch.replica_url(), &restored);
    assert_same_database(&other_db, &restored);
}
