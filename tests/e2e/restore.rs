//! Restore's own surface: point in time, generation and index, the listing commands, dry runs
//! and the readiness mode Cloud Run's startup probe waits on.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::harness::*;

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// Rows in `items`, or 0 before the table exists: a replica caught between its first snapshot
/// and its first segment restores the database as it was before the app's CREATE TABLE.
fn rows_in(path: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    let tables: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'items'", [], |r| r.get(0)).unwrap();
    if tables == 0 {
        return 0;
    }
    conn.query_row("SELECT count(*) FROM items", [], |r| r.get(0)).unwrap()
}

/// `walstream restore EXTRA... -o OUT URL`: the row count restored, or the failed output.
fn restore_rows(scratch: &Scratch, name: &str, extra: &[&str]) -> Result<i64, std::process::Output> {
    let out = scratch.path(name);
    let mut args = vec!["restore"];
    args.extend_from_slice(extra);
    let url = scratch.replica_url();
    args.extend_from_slice(&["-o", out.to_str().unwrap(), &url]);
    let output = walstream(&args);
    if !output.status.success() {
        assert!(!out.exists(), "a failed restore left {}", out.display());
        return Err(output);
    }
    let rows = rows_in(&out);
    std::fs::remove_file(&out).unwrap();
    Ok(rows)
}

/// Waits until a restore of the latest state holds `rows` rows, and returns the moment after.
fn shipped(scratch: &Scratch, rows: i64) -> SystemTime {
    wait_until(Duration::from_secs(20), &format!("{rows} rows in the replica"), || {
        restore_rows(scratch, "probe.db", &[]).ok() == Some(rows)
    });
    let at = SystemTime::now();
    // Objects written from now on are created strictly after `at`.
    std::thread::sleep(Duration::from_millis(30));
    at
}

/// The generation ids the `generations` command lists, checking its columns on the way.
fn listed_generations(scratch: &Scratch, backend: Backend) -> Vec<String> {
    let output = walstream(&["generations", &scratch.replica_url()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["name", "generation", "lag", "start", "end"]
    );
    lines
        .map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(cells.len(), 5, "{line}");
            assert_eq!(cells[0], backend.name());
            assert!(cells[3] <= cells[4] && cells[4].ends_with('Z'), "start <= end, RFC 3339 UTC: {line}");
            cells[1].to_string()
        })
        .collect()
}

on_both_backends! {
    fn point_in_time_restores_each_moment_across_generations(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        // S3 lists creation times in whole seconds (LastModified), so there moments a restore
        // must tell apart are more than a second apart; Litestream reads the same field.
        let gap = if backend == Backend::S3 { Duration::from_millis(1100) } else { Duration::from_millis(30) };
        let replicator = scratch.start_replicator();
        app.insert(10);
        let t1 = shipped(&scratch, 10);
        std::thread::sleep(gap);
        // A new WAL index, so -index has something to choose.
        app.checkpoint("TRUNCATE");
        app.insert(10);
        let t2 = shipped(&scratch, 20);
        replicator.stop_ok();
        let between = SystemTime::now();
        std::thread::sleep(gap);
        // Without its generation file the replicator cannot resume: a second generation.
        std::fs::remove_file(scratch.path(".app.db-walstream/generation")).unwrap();
        let replicator = scratch.start_replicator();
        app.insert(10);
        let t3 = shipped(&scratch, 30);
        replicator.stop_ok();
        // Both runs' logs, debug level: a third generation came once in a fresh-clone run
        // (GCS, 2026-12-07) and not in 75 runs after, so its reason must show when it does.
        let log = std::fs::read_to_string(scratch.path("replicate.log")).unwrap_or_default();
        assert_eq!(scratch.generation_count(), 2, "{log}");

        let at = |t: SystemTime| restore_rows(&scratch, "pitr.db", &["-timestamp", &rfc3339(t)]).unwrap_or_else(|o| panic!("restore at {}: {}", rfc3339(t), stderr(&o)));
        assert_eq!(at(t1), 10);
        assert_eq!(at(t2), 20);
        assert_eq!(at(between), 20, "between two generations: the first one's last state");
        assert_eq!(at(t3), 30);
        assert_eq!(at(SystemTime::now() + Duration::from_secs(3600)), 30, "after the last write: the latest state (litestream fails here)");
        let failed = restore_rows(&scratch, "pitr.db", &["-timestamp", "2001-02-03T04:05:06Z"]).unwrap_err();
        assert_eq!(failed.status.code(), Some(11), "{}", stderr(&failed));
        assert!(stderr(&failed).contains("earliest restorable time is 20"), "{}", stderr(&failed));

        let generations = listed_generations(&scratch, backend);
        assert_eq!(generations.len(), 2);
        // Listed by name, which is random: find the first by what it restores.
        let first = generations.iter().find(|g| restore_rows(&scratch, "g.db", &["-generation", g]).unwrap() == 20).expect("a generation holding 20 rows").clone();
        assert_eq!(restore_rows(&scratch, "g.db", &["-generation", &first, "-index", "0"]).unwrap(), 10, "index 0 holds the first ten rows");
        assert_eq!(restore_rows(&scratch, "g.db", &["-generation", &first, "-index", "1", "-parallelism", "1"]).unwrap(), 20);
        for (args, what) in [
            (vec!["-generation", &first, "-index", "7f"], "index 0000007f not found"),
            (vec!["-generation", "0123456789abcdef"], "generation 0123456789abcdef not found"),
            (vec!["-index", "0", "-timestamp", "2030-01-01T00:00:00Z"], "cannot specify index & timestamp"),
        ] {
            let failed = restore_rows(&scratch, "g.db", &args).unwrap_err();
            assert_eq!(failed.status.code(), Some(11), "{args:?}: {}", stderr(&failed));
            assert!(stderr(&failed).contains(what), "{args:?}: {}", stderr(&failed));
        }
        assert_eq!(list_dir(scratch.dir.path()).iter().filter(|n| n.contains("walstream-restore")).count(), 0, "no temporary files remain");

        let output = walstream(&["snapshots", &scratch.replica_url()]);
        let text = String::from_utf8(output.stdout).unwrap();
        assert_eq!(text.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(), ["replica", "generation", "index", "size", "created"]);
        assert_eq!(text.lines().count(), 3, "one snapshot per generation:\n{text}");
        let output = walstream(&["wal", "-generation", &first, &scratch.replica_url()]);
        let text = String::from_utf8(output.stdout).unwrap();
        assert_eq!(text.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(), ["replica", "generation", "index", "offset", "size", "created"]);
        let indexes: Vec<&str> = text.lines().skip(1).map(|l| l.split_whitespace().nth(2).unwrap()).collect();
        assert!(indexes.contains(&"0") && indexes.contains(&"1"), "{text}");
        assert!(text.lines().skip(1).all(|l| l.contains(&first)), "-generation filters:\n{text}");
    }
}

on_both_backends! {
    fn dry_run_prints_the_plan_and_restores_nothing(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        let replicator = scratch.start_replicator();
        app.insert(50);
        replicator.stop_ok();
        let out = scratch.path("dry.db");
        let output = walstream(&["restore", "-dry-run", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
        assert!(output.status.success(), "{}", stderr(&output));
        let text = String::from_utf8(output.stdout).unwrap();
        for line in ["generation  ", "snapshot    index 00000000", "wal         indexes 00000000..", "download    ", "estimate    "] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(!out.exists());
        let output = walstream(&["restore", "-replica", "abs", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
        assert_eq!(output.status.code(), Some(12));
        assert!(stderr(&output).contains("replica \"abs\" not found"), "{}", stderr(&output));
    }
}

/// `walstream restore -serve-ready ADDR ...` as a child.
fn spawn_restore(scratch: &Scratch, addr: &str, extra: &[&str], out: &std::path::Path) -> std::process::Child {
    let log = std::fs::File::create(scratch.path("restore.log")).unwrap();
    with_emulator(&mut Command::new(walstream_bin()))
        .arg("restore")
        .args(extra)
        .args(["-serve-ready", addr, "-o", out.to_str().unwrap(), &scratch.replica_url()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "restore did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

on_both_backends! {
    fn serve_ready_listens_only_once_the_database_is_in_place(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        let replicator = scratch.start_replicator();
        for _ in 0..20 {
            app.insert(500);
        }
        app.insert_large(3 << 20);
        replicator.stop_ok();

        let out = scratch.path("served.db");
        let addr = format!("127.0.0.1:{}", free_port());
        let mut child = spawn_restore(&scratch, &addr, &["-if-db-not-exists", "-if-replica-exists"], &out);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stream = loop {
            if let Ok(stream) = TcpStream::connect(&addr) {
                break stream;
            }
            assert!(child.try_wait().unwrap().is_none(), "restore exited before listening: {}", std::fs::read_to_string(scratch.path("restore.log")).unwrap());
            assert!(Instant::now() < deadline, "never ready");
            std::thread::sleep(Duration::from_millis(2));
        };
        // The first moment a probe gets through, the whole database is already there.
        assert_same_database(&scratch.db(), &out);
        stream.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(TcpStream::connect(&addr).is_ok(), "still serving after a probe");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(wait_exit(&mut child, Duration::from_secs(5)).code(), Some(0));

        // A warm restart: the database exists, so it is ready at once without the replica.
        let mut child = spawn_restore(&scratch, &addr, &["-if-db-not-exists"], &out);
        wait_until(Duration::from_secs(10), "readiness after a skip", || TcpStream::connect(&addr).is_ok());
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(wait_exit(&mut child, Duration::from_secs(5)).code(), Some(0));
    }
}

on_both_backends! {
    fn serve_ready_never_listens_when_restore_fails(backend: Backend) {
        let scratch = Scratch::on(backend);
        let out = scratch.path("never.db");
        let addr = format!("127.0.0.1:{}", free_port());
        let connected = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let prober = {
            let (addr, connected, done) = (addr.clone(), connected.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if TcpStream::connect(&addr).is_ok() {
                        connected.store(true, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        // An empty replica without -if-replica-exists: no backup is a failure.
        let mut child = spawn_restore(&scratch, &addr, &[], &out);
        assert_eq!(wait_exit(&mut child, Duration::from_secs(20)).code(), Some(3));
        done.store(true, Ordering::Relaxed);
        prober.join().unwrap();
        assert!(!connected.load(Ordering::Relaxed), "a failed restore must never answer a probe");
        assert!(!out.exists());
    }
}

#[test]
fn sigterm_during_a_restore_abandons_it_and_leaves_nothing() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    let replicator = scratch.start_replicator();
    // Random blobs: a snapshot large enough that the restore is still writing when signalled.
    app.insert_large(40 << 20);
    replicator.stop_ok();
    let out = scratch.path("interrupted.db");
    let mut child = with_emulator(&mut Command::new(walstream_bin()))
        .args(["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.path("restore.log")).unwrap())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "the restore to start", || {
        std::fs::read_to_string(scratch.path("restore.log")).unwrap().contains("restoring")
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let log = std::fs::read_to_string(scratch.path("restore.log")).unwrap();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("nothing was written"), "{log}");
    let left: Vec<String> = list_dir(scratch.dir.path()).into_iter().filter(|n| n.contains("interrupted")).collect();
    assert!(left.is_empty(), "an abandoned restore left {left:?}");
}

/// Peak RSS (KiB) of `walstream ARGS...`, from `wait4`, and its stderr; panics with the
/// stderr if it fails.
// Waited for with wait4, which clippy cannot see, to read the child's peak RSS.
#[allow(clippy::zombie_processes)]
pub fn peak_rss_of_walstream(args: &[&str]) -> (i64, String) {
    let child = with_emulator(&mut Command::new(walstream_bin()))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut stderr_pipe = child.stderr.unwrap();
    let mut err = String::new();
    stderr_pipe.read_to_string(&mut err).unwrap();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waiting for our own child, with valid out-pointers.
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "walstream {args:?} failed ({status}): {err}");
    (usage.ru_maxrss, err)
}

on_both_backends! {
    /// Restore's memory grows neither with the database nor with its history: a 200 MB snapshot
    /// streams through the LZ4 decoder into the file in ranged GETs, and a 48 MiB WAL index is
    /// assembled in a spill file (issue 20); both used to be held whole (619 MiB peak on GCS,
    /// 422 MiB on file:// for the snapshot alone).
    fn a_200_mb_database_with_a_48_mib_wal_index_restores_in_under_32_mib_of_memory(backend: Backend) {
        let scratch = Scratch::on(backend);
        let app = App::open(&scratch.db());
        for batch in 0..5 {
            let first = batch * 20_000;
            app.conn.execute_batch(&format!("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) INSERT INTO items (id, body, blob) SELECT {first} + i, 'big', randomblob(2000) FROM n")).unwrap();
        }
        app.checkpoint("TRUNCATE");
        // Opened again to number its rows after the bulk insert's.
        let mut app = App::open(&scratch.db());
        let size = std::fs::metadata(scratch.db()).unwrap().len();
        assert!(size >= 200_000_000, "the database is {size} bytes");
        // A generation started over (see below) must still ship its 200 MB snapshot in the flush.
        let replicator = Replicator::start_with_args(&scratch.db(), &[scratch.replica_url()], scratch.path("replicate.log"), &[], &["-shutdown-timeout", "60s"]);
        wait_for_snapshot(&scratch);
        // History on top: a reader keeps the WAL from restarting while 48 MiB of random rows
        // are committed, so one index is far larger than memory may hold, then a few small ones.
        let reader = rusqlite::Connection::open(scratch.db()).unwrap();
        reader.execute_batch("BEGIN; SELECT count(*) FROM items;").unwrap();
        for _ in 0..48 {
            app.insert_large(1 << 20);
        }
        reader.execute_batch("COMMIT").unwrap();
        for _ in 0..3 {
            app.insert(100);
            app.checkpoint("TRUNCATE");
            // A TRUNCATE checkpoint before a capture pass has copied the commit (the pin is let
            // go after a 48 MiB life) starts a new generation; seen once at 50 ms in a full-suite
            // run. This test is about restore, so it leaves the capturer time.
            std::thread::sleep(Duration::from_millis(300));
        }
        app.insert(100);
        replicator.stop_ok();

        let out = scratch.path("restored.db");
        let (peak_kib, log) = peak_rss_of_walstream(&["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
        eprintln!("restore of a {size}-byte database: peak RSS {peak_kib} KiB");
        assert!(peak_kib <= 32 << 10, "restore peaked at {peak_kib} KiB; the bound is 32 MiB");
        // No terminal here, as on Cloud Run: progress comes as log lines.
        assert!(log.contains("restore progress") && log.contains("total_mb=") && log.contains("restore: everything downloaded"), "progress lines without a terminal: {log}");
        let done = log.lines().find(|l| l.contains("restore: everything downloaded")).unwrap();
        assert!(done.contains("waiting_for_store_s=") && done.contains("applying_s="), "the split between the store and applying: {done}");
        assert_same_database(&scratch.db(), &out);
    }
}

on_both_backends! {
    /// `walstream verify` reads every object of the chain a restore would, writes nothing, and
    /// names the first bad one with the corrupt-replica exit code (issue 21).
    fn verify_proves_a_replica_restorable_and_names_a_corrupt_object(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        app.insert(50);
        let replicator = scratch.start_replicator();
        wait_for_snapshot(&scratch);
        for _ in 0..5 {
            app.insert(50);
        }
        replicator.stop_ok();
        let url = scratch.replica_url();
        let output = walstream(&["verify", &url]);
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(stdout(&output).contains(": ok, generation") && stdout(&output).contains("every checksum holds"), "{}", stdout(&output));

        // One byte flipped in the middle of a segment: its LZ4 content checksum no longer holds.
        let segment = scratch.replica_keys().into_iter().rfind(|k| k.ends_with(".wal.lz4")).unwrap();
        let mut body = scratch.read_object(&segment);
        let middle = body.len() / 2;
        body[middle] ^= 0x55;
        scratch.overwrite_object(&segment, &body);
        let output = walstream(&["verify", &url]);
        assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
        assert!(stderr(&output).contains(&segment), "the error names the object: {}", stderr(&output));

        // A snapshot that is not an LZ4 frame at all.
        let snapshot = scratch.replica_keys().into_iter().find(|k| k.ends_with(".snapshot.lz4")).unwrap();
        scratch.overwrite_object(&snapshot, b"not a snapshot");
        let output = walstream(&["verify", &url]);
        assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
        assert!(stderr(&output).contains(&snapshot), "the error names the object: {}", stderr(&output));
        assert!(!scratch.path("restored.db").exists());
    }
}

/// `-integrity-check` (Litestream 0.5's spelling): a snapshot whose b-tree is damaged, though
/// its LZ4 frame and checksums are sound, fails the full check (the default) and the quick one
/// with the corrupt-replica code and nothing left behind; `none` restores it as it is.
#[test]
fn integrity_check_full_quick_and_none() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    app.insert(500);
    app.checkpoint("TRUNCATE");
    let replicator = scratch.start_replicator();
    wait_for_snapshot(&scratch);
    replicator.stop_ok();
    let snapshot = scratch.replica_keys().into_iter().find(|k| k.ends_with(".snapshot.lz4")).unwrap();
    let mut db = walstream_format::lz4::decompress(&scratch.read_object(&snapshot)).unwrap();
    // Page 3's first cell: its rowid varint now runs off the end of the page.
    let page_size = usize::from(u16::from_be_bytes([db[16], db[17]]));
    let page = 2 * page_size;
    let cell = usize::from(u16::from_be_bytes([db[page + 8], db[page + 9]]));
    db[page + cell + 1] = 0xff;
    scratch.overwrite_object(&snapshot, &walstream_format::lz4::compress(&db));
    let out = scratch.path("checked.db");
    for check in [None, Some("full"), Some("quick")] {
        let mut args = vec!["restore", "-o", out.to_str().unwrap()];
        if let Some(check) = check {
            args.extend(["-integrity-check", check]);
        }
        let url = scratch.replica_url();
        args.push(&url);
        let output = walstream(&args);
        assert_eq!(output.status.code(), Some(6), "{check:?}: {}", stderr(&output));
        assert!(stderr(&output).contains("Extends off end of page"), "{check:?}: {}", stderr(&output));
        assert!(!out.exists(), "{check:?}: a failed check leaves nothing");
    }
    let output =
        walstream(&["restore", "-integrity-check", "none", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(out.exists());
    let output = walstream(&[
        "restore",
        "-integrity-check",
        "thorough",
        "-o",
        scratch.path("x.db").to_str().unwrap(),
        &scratch.replica_url(),
    ]);
    assert_eq!(output.status.code(), Some(2), "an unknown check is a usage error: {}", stderr(&output));
}
