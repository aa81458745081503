//! The open-file limit: walstream raises its soft limit to the hard one for many databases, as
//! litestream (Go) does silently, and names the limit when even the hard one is too low.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

const DATABASES: usize = 40;

/// `walstream replicate -config CONFIG` started with an open-file limit of `soft`:`hard`.
fn replicate_with_limit(config: &std::path::Path, soft: u64, hard: u64, log: &std::path::Path) -> Command {
    let mut command = Command::new(walstream_bin());
    command.arg("replicate").arg("-config").arg(config).env("WALSTREAM_LOG", "debug");
    command.stdout(std::fs::File::create(log).unwrap()).stderr(Stdio::piped());
    with_limit(&mut command, soft, hard);
    command
}

/// Makes `command` start with an open-file limit of `soft`:`hard`.
fn with_limit(command: &mut Command, soft: u64, hard: u64) {
    // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: soft as libc::rlim_t, rlim_max: hard as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits until each of the `DATABASES` replicas holds a snapshot.
fn wait_for_every_snapshot(scratch: &Scratch, limit: Duration) {
    let snapshots = || {
        (0..DATABASES)
            .filter(|n| {
                files_under(&scratch.path(&format!("replica-{n}")))
                    .iter()
                    .any(|p| p.to_string_lossy().ends_with(".snapshot.lz4"))
            })
            .count()
    };
    wait_until(limit, "every database's snapshot", || snapshots() == DATABASES);
}

/// One more commit to every database, then SIGTERM to the replicator; its output.
fn commit_to_each_then_stop(dbs: &[PathBuf], child: std::process::Child) -> std::process::Output {
    for db in dbs {
        App::open(db).insert(2);
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait_with_output().unwrap()
}

/// 40 databases need more than a soft limit of 256: walstream raises it to the hard limit,
/// replicates every one, and holds no more descriptors than `fd_limit` budgets (64, and 10 a
/// database).
#[test]
fn replicate_raises_its_soft_open_file_limit_for_many_databases() {
    let scratch = Scratch::new();
    let (config, dbs) = many_databases(&scratch, DATABASES, "");
    let log = scratch.path("replicate.log");
    let child = replicate_with_limit(&config, 256, 4096, &log).spawn().unwrap();
    let pid = child.id();
    wait_for_every_snapshot(&scratch, Duration::from_secs(60));
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    let words: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(words[3..5], ["4096", "4096"], "the soft limit was raised to the hard one: {open_files}");
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    eprintln!("{DATABASES} databases: {descriptors} descriptors");
    assert!(descriptors <= 64 + 10 * DATABASES, "{descriptors} descriptors for {DATABASES} databases");

    let output = commit_to_each_then_stop(&dbs, child);
    assert!(output.status.success(), "replicate exited {}: {}", output.status, stderr(&output));
    assert_many_databases_restore(&scratch, &dbs, 13);
}

/// A hard limit that lets only some of the databases be awake at once: 40 databases under 300
/// open files, of which 19 may be awake (a resting one holds its database file alone). Every
/// one still starts, takes its snapshot and ships the commits that wake it later, the awake
/// ones resting as soon as they are shipped while others wait; nothing fails for descriptors.
#[test]
fn databases_beyond_what_the_open_file_limit_keeps_awake_take_turns() {
    let scratch = Scratch::new();
    let (config, dbs) = many_databases(&scratch, DATABASES, "");
    let log = scratch.path("replicate.log");
    let child = replicate_with_limit(&config, 300, 300, &log).spawn().unwrap();
    wait_for_every_snapshot(&scratch, Duration::from_secs(120));
    let output = commit_to_each_then_stop(&dbs, child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(output.status.success(), "replicate exited {}: {}\n{text}", output.status, stderr(&output));
    assert!(text.contains("awake=19"), "the budget is not the one expected:\n{text}");
    assert!(!text.contains("Too many open files"), "{text}");
    assert_many_databases_restore(&scratch, &dbs, 1);
}

/// A hard limit too low for the databases asked for: one line naming it and the fix, exit 19,
/// before anything is replicated.
#[test]
fn a_hard_open_file_limit_too_low_for_the_databases_is_named() {
    let scratch = Scratch::new();
    let (config, _) = many_databases(&scratch, DATABASES, "");
    let log = scratch.path("replicate.log");
    let output = replicate_with_limit(&config, 256, 256, &log).output().unwrap();
    // In config mode walstream logs to stdout, as Litestream does.
    let text = format!("{}{}", std::fs::read_to_string(&log).unwrap(), stderr(&output));
    assert_eq!(output.status.code(), Some(19), "{text}");
    assert!(
        text.contains(&format!("replicating {DATABASES} databases needs about"))
            && text.contains("hard limit is 256")
            && text.contains("ulimit -Hn"),
        "{text}"
    );
    assert_eq!(text.lines().filter(|l| l.contains("ERROR")).count(), 1, "one line: {text}");
    assert!((0..DATABASES).all(|n| !scratch.path(&format!("replica-{n}")).exists()), "something was replicated");
}

/// The `-exec` application starts with the limit walstream started with, not the raised one
/// (as Go's os/exec restores it): an app may count on the usual limit, e.g. for select(2).
#[test]
fn the_exec_application_gets_the_open_file_limit_walstream_started_with() {
    let scratch = Scratch::new();
    App::open(&scratch.db()).insert(1);
    let seen = scratch.path("app-limit");
    let exec = format!("sh -c 'ulimit -Sn > {}'", seen.display());
    let mut command = Command::new(walstream_bin());
    command.args(["replicate", "-exec", &exec]).arg(scratch.db()).arg(scratch.replica_url());
    with_limit(&mut command, 256, 4096);
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(&seen).unwrap().trim(), "256");
}
