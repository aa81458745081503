//! No silent failure: a worker that dies stops its database loudly (an error naming the
//! database and the worker, `/healthz` 503, a non-zero exit, never "everything committed was
//! shipped"), and a replica held back past `-health-lag` turns `/healthz` unhealthy until it
//! catches up. The worker panics come from the test build's fail points
//! (`crates/shipper/src/fail_point.rs`).

use std::time::{Duration, Instant};

use crate::emulator::{self, request_on};
use crate::fault_proxy::FaultProxy;
use crate::harness::*;

/// The exit code of `Error::WorkerFailed` (crates/cli/src/exit.rs).
const WORKER_FAILED: i32 = 17;

fn healthz(addr: &str) -> (u16, String) {
    request_on(addr, "GET", "/healthz", None).unwrap_or((0, String::new()))
}

/// Asserts how a failed worker was reported: its error names the database and the worker, the
/// exit code is WORKER_FAILED, and nothing claims the commits were shipped.
fn assert_failed_loudly(scratch: &Scratch, status: std::process::ExitStatus, log: &str, worker: &str) {
    let db = scratch.db().display().to_string();
    assert_eq!(status.code(), Some(WORKER_FAILED), "a failed {worker} worker exits {WORKER_FAILED}; log:\n{log}");
    let error = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains(&format!("the {worker} failed")))
        .unwrap_or_else(|| panic!("no error line for the {worker} worker; log:\n{log}"));
    assert!(error.contains(&db) && error.contains("fail point"), "the error names the database and why: {error}");
    assert!(
        !log.contains("everything committed was shipped"),
        "a failed worker is never reported as a finished flush; log:\n{log}"
    );
}

/// The one-container deployment: while walstream stops the app after its capture worker died,
/// `/healthz` says why; then it exits non-zero.
#[test]
fn a_capture_worker_that_panics_fails_its_database_loudly() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    app.insert(10);
    let addr = format!("127.0.0.1:{}", free_port());
    // The app takes 3 s to stop: the window in which /healthz is read.
    let exec = "sh -c 'trap \"sleep 3; exit 0\" TERM; while true; do sleep 0.1; done'";
    let replicator = Replicator::start_with_args(
        &scratch.db(),
        &[scratch.replica_url()],
        scratch.path("replicate.log"),
        &[("WALSTREAM_FAIL_POINT", "capture")],
        &["-addr", &addr, "-exec", exec],
    );
    wait_until(Duration::from_secs(20), "the first sync", || {
        request_on(&addr, "GET", "/readyz", None).is_ok_and(|(status, _)| status == 200)
    });
    assert_eq!(healthz(&addr), (200, "ok\n".to_string()), "healthy before the fault");

    // The fail point panics on a pass that copies, except the capturer's first pass after start,
    // which may come after /readyz said ready (that needs only the snapshot) and take a commit
    // made now with it (1 run in 15 on a loaded machine): commits go on until the panic.
    let mut unhealthy = None;
    wait_until(Duration::from_secs(20), "/healthz to report the failed capture worker", || {
        app.insert(1);
        let (status, body) = healthz(&addr);
        if status == 503 {
            unhealthy = Some(body);
        }
        unhealthy.is_some()
    });
    let body = unhealthy.unwrap();
    assert!(body.contains(&scratch.db().display().to_string()) && body.contains("the capture worker failed"), "{body}");
    let status = replicator_exit(replicator);
    assert_failed_loudly(
        &scratch,
        status,
        &std::fs::read_to_string(scratch.path("replicate.log")).unwrap(),
        "capture worker",
    );
}

#[test]
fn an_upload_worker_that_panics_fails_its_database_loudly() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    let replicator = Replicator::start_with_env(
        &scratch.db(),
        &[scratch.replica_url()],
        scratch.path("replicate.log"),
        &[("WALSTREAM_FAIL_POINT", "upload")],
    );
    app.insert(10);
    app.insert(10);
    let status = replicator_exit(replicator);
    assert_failed_loudly(
        &scratch,
        status,
        &std::fs::read_to_string(scratch.path("replicate.log")).unwrap(),
        "uploader of replica file",
    );
}

#[test]
fn an_upkeep_worker_that_panics_fails_its_database_loudly() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    app.insert(10);
    let config = scratch.write_config(&["retention: 1s", "retention-check-interval: 1s"]);
    let replicator = Replicator::start_args(
        &["-config".into(), config.into()],
        scratch.path("replicate.log"),
        &[("WALSTREAM_FAIL_POINT", "retention")],
    );
    let status = replicator_exit(replicator);
    assert_failed_loudly(
        &scratch,
        status,
        &std::fs::read_to_string(scratch.path("replicate.log")).unwrap(),
        "upkeep worker of replica file",
    );
}

/// Waits for an exit the worker's failure must cause by itself (no signal is sent).
fn replicator_exit(replicator: Replicator) -> std::process::ExitStatus {
    let started = Instant::now();
    let status = replicator.wait_for_exit();
    eprintln!("replicate exited {status} {:?} after the fault was armed", started.elapsed());
    status
}

/// The store frozen (connections accepted, never answered) while the app commits: `/healthz`
/// turns 503 naming the database and the replica once the commit has waited longer than
/// `-health-lag`, and 200 again once the replica has it.
#[test]
fn a_replica_held_back_past_the_health_lag_is_unhealthy_until_it_catches_up() {
    let scratch = Scratch::on(Backend::Gcs);
    let proxy = FaultProxy::start(emulator::host(), seed());
    let mut app = App::open(&scratch.db());
    app.insert(10);
    let addr = format!("127.0.0.1:{}", free_port());
    let replicator = Replicator::start_with_args(
        &scratch.db(),
        &[scratch.replica_url()],
        scratch.path("replicate.log"),
        &[("STORAGE_EMULATOR_HOST", &proxy.addr), ("WALSTREAM_GCS_TIMEOUT", "2s")],
        &["-addr", &addr, "-health-lag", "2s"],
    );
    wait_until(Duration::from_secs(20), "the first sync", || {
        request_on(&addr, "GET", "/readyz", None).is_ok_and(|(status, _)| status == 200)
    });
    assert_eq!(healthz(&addr), (200, "ok\n".to_string()));

    let frozen_for = Duration::from_secs(10);
    proxy.black_hole(frozen_for);
    let frozen_at = Instant::now();
    app.insert(10);
    // Healthy for the first two seconds of the outage: a lag under the limit is not a failure.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(healthz(&addr).0, 200, "a commit held back for less than -health-lag is not a failure");
    let mut unhealthy = None;
    wait_until(Duration::from_secs(8), "/healthz to report the held-back replica", || {
        let (status, body) = healthz(&addr);
        (status == 503).then(|| unhealthy = Some((body, frozen_at.elapsed()))).is_some()
    });
    let (body, after) = unhealthy.unwrap();
    assert!(after >= Duration::from_secs(2), "unhealthy only past the health lag, not after {after:?}");
    assert!(
        body.contains(&scratch.db().display().to_string())
            && body.contains("replica gcs")
            && body.contains("health lag"),
        "{body}"
    );

    wait_until(frozen_for + Duration::from_secs(30), "/healthz to recover once the store answers", || {
        healthz(&addr) == (200, "ok\n".to_string())
    });
    replicator.stop_ok();
    scratch.assert_restores_source();
}

/// A local stand-in for a dead-man's switch service: the moments it was pinged.
fn ping_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Instant>>>) {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/ping/walstream", listener.local_addr().unwrap());
    let pings = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = pings.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_ok() && line.starts_with("GET /ping/walstream ") {
                seen.lock().unwrap().push(Instant::now());
            }
            // The rest of the head, then an empty answer.
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let _ = (&stream).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, pings)
}

/// `heartbeat-url`: pinged every interval while healthy, not while a replica is held back past
/// the health lag (the store frozen), and again once it has caught up.
#[test]
fn the_heartbeat_is_sent_only_while_every_replica_is_healthy() {
    let scratch = Scratch::on(Backend::Gcs);
    let proxy = FaultProxy::start(emulator::host(), seed());
    let (url, pings) = ping_server();
    let mut app = App::open(&scratch.db());
    app.insert(10);
    let config = scratch.path("walstream.yml");
    std::fs::write(&config, format!("heartbeat-url: {url}\nheartbeat-interval: 1s\nhealth-lag: 2s\ndbs:\n  - path: {}\n    replicas:\n      - url: {}\n", scratch.db().display(), scratch.replica_url())).unwrap();
    let replicator = Replicator::start_args(
        &["-config".into(), config.into()],
        scratch.path("replicate.log"),
        &[("STORAGE_EMULATOR_HOST", &proxy.addr), ("WALSTREAM_GCS_TIMEOUT", "2s")],
    );
    let count = || pings.lock().unwrap().len();
    wait_until(Duration::from_secs(20), "two heartbeats while healthy", || count() >= 2);

    proxy.black_hole(Duration::from_secs(10));
    let frozen_at = Instant::now();
    app.insert(10);
    std::thread::sleep(Duration::from_secs(7));
    let during: Vec<Duration> =
        pings.lock().unwrap().iter().filter(|t| **t > frozen_at).map(|t| t.duration_since(frozen_at)).collect();
    assert!(
        during.iter().all(|d| *d < Duration::from_millis(3500)),
        "no heartbeat once the commit was held back past the 2 s health lag (pings at {during:?} after the freeze)"
    );
    let before_recovery = count();
    wait_until(Duration::from_secs(40), "heartbeats again after the store came back", || {
        count() >= before_recovery + 2
    });
    replicator.stop_ok();
    scratch.assert_restores_source();
    let log = std::fs::read_to_string(scratch.path("replicate.log")).unwrap();
    assert!(log.contains("heartbeat withheld"), "a withheld heartbeat is logged: {log}");
}

/// The shutdown deadline bounds the whole flush, the capturer's last copy included (it may
/// write a snapshot): with that copy stalled (a fail point), SIGTERM ends in exit 8 naming it,
/// inside the deadline, not when the copy ends.
#[test]
fn a_final_copy_that_overruns_the_shutdown_deadline_is_reported_in_time() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    app.insert(10);
    let replicator = Replicator::start_with_args(
        &scratch.db(),
        &[scratch.replica_url()],
        scratch.path("replicate.log"),
        &[("WALSTREAM_FAIL_POINT", "final-pass")],
        &["-shutdown-timeout", "2s"],
    );
    wait_for_snapshot(&scratch);
    let stopped_at = Instant::now();
    let status = replicator.stop();
    let took = stopped_at.elapsed();
    let log = std::fs::read_to_string(scratch.path("replicate.log")).unwrap();
    assert_eq!(status.code(), Some(8), "{log}");
    assert!(
        log.contains("the capturer's last copy") && log.contains("did not finish within the shutdown deadline"),
        "{log}"
    );
    assert!(
        took < Duration::from_secs(5),
        "exit within the 2 s deadline (and the process's own exit), not after the stalled copy: took {took:?}"
    );
}

/// The `ok` or `error` count of `litestream_replica_validation_total` on `/metrics`.
fn validations(addr: &str, status: &str) -> u64 {
    let (_, text) = request_on(addr, "GET", "/metrics", None).unwrap_or((0, String::new()));
    let label = format!("status=\"{status}\"");
    text.lines()
        .filter(|l| l.starts_with("litestream_replica_validation_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

on_both_backends! {
    /// `validation-interval`: the replica is restored in the background and compared with the
    /// database. A writer committing between validations never fails one; a corrupted segment
    /// in the replica does, and turns `/healthz` unhealthy naming the replica and the object.
    fn validation_interval_proves_the_replica_and_a_corrupt_segment_fails_it_loudly(backend: Backend) {
        let scratch = Scratch::on(backend);
        let addr = format!("127.0.0.1:{}", free_port());
        let config = scratch.write_config(&["validation-interval: 300ms"]);
        let mut app = App::open(&scratch.db());
        app.insert(50);
        let replicator = Replicator::start_args(&["-config".into(), config.into(), "-addr".into(), addr.clone().into()], scratch.path("replicate.log"), &[]);
        wait_until(Duration::from_secs(30), "a validation to pass", || validations(&addr, "ok") >= 1);
        assert_eq!(healthz(&addr).0, 200);

        // Commits a few times a second, across several validations.
        let passed = validations(&addr, "ok");
        for _ in 0..30 {
            app.insert(1);
            std::thread::sleep(Duration::from_millis(100));
        }
        wait_until(Duration::from_secs(30), "a validation after the writes to pass", || validations(&addr, "ok") > passed);
        assert_eq!(validations(&addr, "error"), 0, "a validation failed while the app wrote; log:\n{}", replicator.log_text());

        let segment = scratch.replica_keys().into_iter().filter(|k| k.contains("/wal/")).max().expect("a WAL segment in the replica");
        scratch.overwrite_object(&segment, b"not an LZ4 frame");
        wait_until(Duration::from_secs(30), "a validation to fail", || validations(&addr, "error") >= 1);
        let (status, body) = healthz(&addr);
        let object = segment.rsplit('/').next().unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("replica") && body.contains("failed validation") && body.contains(object), "{body}");
        let log = replicator.log_text();
        assert!(log.lines().any(|l| l.contains("ERROR") && l.contains("replica validation failed") && l.contains(object)), "the failure is logged naming the object; log:\n{log}");
        replicator.stop_ok();
    }
}
