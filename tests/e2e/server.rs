//! `replicate -addr`: `/healthz`, `/readyz`, `/metrics` in Litestream's series names, and the
//! durability barrier (`POST /sync`, `walstream sync`).

use std::collections::HashMap;
use std::time::Duration;

use crate::emulator::request_on;
use crate::harness::*;

fn get(addr: &str, path: &str) -> (u16, String) {
    request_on(addr, "GET", path, None).unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

fn start_serving(scratch: &Scratch, url: &str) -> (Replicator, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let replicator = Replicator::start_with_args(
        &scratch.db(),
        &[url.to_string()],
        scratch.path("replicate.log"),
        &[],
        &["-addr", &addr],
    );
    // The server is bound before the start line is logged.
    (replicator, addr)
}

/// Rows in a restore of the replica as it is now.
fn restored_rows(scratch: &Scratch, name: &str) -> i64 {
    let out = scratch.path(name);
    restore(&scratch.replica_url(), &out);
    let rows = App::open(&out).count();
    std::fs::remove_file(&out).unwrap();
    rows
}

/// A series' samples: labels and value.
type Samples = Vec<(HashMap<String, String>, f64)>;

/// Samples by series name.
fn scrape(addr: &str) -> HashMap<String, Samples> {
    let (status, text) = get(addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format");
    let mut series: HashMap<String, Samples> = HashMap::new();
    for sample in scrape.samples {
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            other => panic!("{}: unexpected sample {other:?}", sample.metric),
        };
        let labels = sample.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        series.entry(sample.metric).or_default().push((labels, value));
    }
    series
}

on_both_backends! {
    fn sync_returns_once_a_restore_holds_every_earlier_commit(backend: Backend) {
        let scratch = Scratch::on(backend);
        let (replicator, addr) = start_serving(&scratch, &scratch.replica_url());
        assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_string()));
        // Nothing is replicated before the database exists: not ready.
        let (status, body) = get(&addr, "/readyz");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains(scratch.db().to_str().unwrap()), "{body}");

        let mut app = App::open(&scratch.db());
        wait_until(Duration::from_secs(20), "/readyz to turn ready", || get(&addr, "/readyz").0 == 200);
        for round in 1..=3 {
            app.insert(300);
            let output = walstream(&["sync", "-addr", &addr, "-timeout", "20s"]);
            assert!(output.status.success(), "round {round}: {}", stderr(&output));
            assert!(stdout(&output).contains(&format!("synced {}", scratch.db().display())), "{}", stdout(&output));
            assert_eq!(restored_rows(&scratch, "synced.db"), app.count(), "round {round}: every row committed before sync is in the replica");
        }

        // The barrier holds with no final flush after it: SIGKILL at once.
        app.insert(500);
        let (status, body) = request_on(&addr, "POST", "/sync?timeout=20s", None).unwrap();
        assert_eq!(status, 200, "{body}");
        replicator.kill();
        assert_eq!(restored_rows(&scratch, "killed.db"), app.count());
    }
}

on_both_backends! {
    fn metrics_carry_litestreams_series_and_the_replicas_lag(backend: Backend) {
        let scratch = Scratch::on(backend);
        let mut app = App::open(&scratch.db());
        app.insert(400);
        let (replicator, addr) = start_serving(&scratch, &scratch.replica_url());
        app.insert(100);
        let (status, body) = request_on(&addr, "POST", "/sync", None).unwrap();
        assert_eq!(status, 200, "{body}");

        let series = scrape(&addr);
        let db = scratch.db().display().to_string();
        let name = backend.name();
        let value = |metric: &str, replica: bool| -> f64 {
            let samples = series.get(metric).unwrap_or_else(|| panic!("no {metric} in {:?}", series.keys()));
            let sample = samples.iter().find(|(labels, _)| labels.get("db") == Some(&db) && (!replica || labels.get("name").map(String::as_str) == Some(name)));
            sample.unwrap_or_else(|| panic!("{metric}: no sample for db {db}: {samples:?}")).1
        };
        assert_eq!(value("litestream_db_size", false), std::fs::metadata(scratch.db()).unwrap().len() as f64);
        assert!(value("litestream_wal_size", false) > 0.0);
        assert!(value("litestream_total_wal_bytes", false) > 0.0);
        assert!(value("litestream_shadow_wal_size", false) > 0.0);
        assert!(value("litestream_sync_count", false) >= 1.0);
        assert_eq!(value("litestream_sync_error_count", false), 0.0);
        assert!(value("litestream_sync_seconds", false) > 0.0);
        assert_eq!(value("litestream_shadow_wal_index", false), value("litestream_replica_wal_index", true));
        assert!(value("litestream_replica_wal_offset", true) > 0.0);
        assert_eq!(value("litestream_replica_wal_bytes", true), value("litestream_total_wal_bytes", false), "everything captured was uploaded");
        assert_eq!(value("walstream_replica_pending_bytes", true), 0.0, "synced: nothing pending");
        assert_eq!(value("walstream_replica_lag_seconds", true), 0.0, "synced: no lag");
        let operation = |op: &str| series.get("litestream_replica_operation_total").and_then(|s| s.iter().find(|(l, _)| l.get("operation").map(String::as_str) == Some(op) && l.get("replica_type").map(String::as_str) == Some(name))).map(|s| s.1);
        let put_bytes = series.get("litestream_replica_operation_bytes").and_then(|s| s.iter().find(|(l, _)| l.get("operation").map(String::as_str) == Some("PUT"))).map(|s| s.1);
        if backend != Backend::File {
            assert!(operation("PUT").is_some_and(|n| n >= 2.0), "a snapshot and a segment at least: {:?}", series.get("litestream_replica_operation_total"));
            assert!(operation("LIST").is_some_and(|n| n >= 1.0));
            assert!(put_bytes.is_some_and(|b| b > 0.0));
        } else {
            assert_eq!(operation("PUT"), None, "the file client's operations are not counted, as in Litestream");
        }
        // walstream's own footprint, under the standard process_* names, against /proc.
        let process = |metric: &str| series.get(metric).and_then(|s| s.first()).map(|s| s.1).unwrap_or_else(|| panic!("no {metric}"));
        let rss = process("process_resident_memory_bytes");
        let hwm_kib = peak_rss_kib(replicator.pid()) as f64;
        assert!(rss > 1e6 && rss <= hwm_kib * 1024.0, "resident memory {rss} within the process's peak {hwm_kib} KiB");
        assert!(process("process_open_fds") >= 3.0 && process("process_open_fds") <= process("process_max_fds"));
        // CPU in clock ticks (usually 10 ms) may still be 0 this early: bound it by /proc read after.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", replicator.pid())).unwrap();
        let ticks: Vec<f64> = stat.rsplit_once(')').unwrap().1.split_whitespace().skip(11).take(2).map(|v| v.parse().unwrap()).collect();
        let cpu = process("process_cpu_seconds_total");
        assert!(cpu >= 0.0 && cpu <= (ticks[0] + ticks[1]) / 100.0 + 0.01, "cpu {cpu} s against /proc's {ticks:?} ticks");
        assert!(process("process_threads") >= 2.0);
        let started = process("process_start_time_seconds");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(started <= now + 1.0 && started > now - 600.0, "started {started}, now {now}");
        replicator.stop_ok();
    }
}

#[test]
fn sync_times_out_naming_the_replica_that_cannot_keep_up() {
    let scratch = Scratch::new();
    let url = scratch.unwritable_replica_url();
    let mut app = App::open(&scratch.db());
    app.insert(10);
    let (replicator, addr) = start_serving(&scratch, &url);
    let output = walstream(&["sync", "-addr", &addr, "-timeout", "1s"]);
    assert_eq!(output.status.code(), Some(14), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("not every replica of") && stderr(&output).contains("replica file at"),
        "{}",
        stderr(&output)
    );
    let (status, body) = request_on(&addr, "POST", "/sync?timeout=300ms", None).unwrap();
    assert_eq!(status, 504, "{body}");
    assert_eq!(get(&addr, "/readyz").0, 503, "never synced: not ready");
    replicator.kill();

    // No addr anywhere: the config error names the key.
    std::fs::write(scratch.path("walstream.yml"), "dbs: []\n").unwrap();
    let output = walstream(&["sync", "-config", scratch.path("walstream.yml").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(12), "{}", stderr(&output));
    assert!(stderr(&output).contains("no addr; set addr there or give -addr HOST:PORT"), "{}", stderr(&output));
    // Nobody listening (port 1 is privileged and unused; the replicator's old port could be
    // taken by another test by now): says what to check.
    let output = walstream(&["sync", "-addr", "127.0.0.1:1"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("is `walstream replicate` running with addr"), "{}", stderr(&output));
}

#[test]
fn an_addr_in_use_fails_at_start() {
    let scratch = Scratch::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = walstream(&["replicate", "-addr", &addr, scratch.db().to_str().unwrap(), &scratch.replica_url()]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains(&format!("addr: cannot listen on \"{addr}\"")), "{}", stderr(&output));
    let output =
        walstream(&["replicate", "-addr", "localhost", scratch.db().to_str().unwrap(), &scratch.replica_url()]);
    assert_eq!(output.status.code(), Some(2), "clap rejects it: {}", stderr(&output));
    assert!(stderr(&output).contains("must specify port for bind address"), "{}", stderr(&output));
}

on_both_backends! {
    fn sync_interval_holds_commits_for_one_upload_and_a_sync_or_shutdown_ships_them_at_once(backend: Backend) {
        let scratch = Scratch::on(backend);
        let wal_objects = || scratch.replica_keys().iter().filter(|k| k.contains("/wal/")).count();
        let mut app = App::open(&scratch.db());
        app.insert(10);
        let addr = format!("127.0.0.1:{}", free_port());
        let replicator = Replicator::start_with_args(&scratch.db(), &[scratch.replica_url()], scratch.path("replicate.log"), &[], &["-sync-interval", "60s", "-addr", &addr]);
        wait_for_snapshot(&scratch);
        // The start's WAL goes up right behind the snapshot; that upload opens a 60 s window.
        wait_until(Duration::from_secs(20), "the initial WAL to be shipped", || wal_objects() > 0);
        std::thread::sleep(Duration::from_millis(300));
        let before = wal_objects();

        for _ in 0..20 {
            app.insert(1);
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(wal_objects(), before, "commits inside the sync interval were uploaded one by one");
        assert!(restored_rows(&scratch, "held.db") < app.count(), "the held commits are already in the replica");

        // A sync barrier ends the wait: one upload carries all 20 commits.
        let output = walstream(&["sync", "-addr", &addr, "-timeout", "20s"]);
        assert!(output.status.success(), "{}", stderr(&output));
        assert_eq!(wal_objects(), before + 1, "the held commits should go up together");
        assert_eq!(restored_rows(&scratch, "synced.db"), app.count());

        // So does shutdown.
        app.insert(5);
        replicator.stop_ok();
        scratch.assert_restores_source();
    }
}

/// With several databases, `/healthz`, `/readyz` and `/sync` answer for the one `db` names,
/// and `/metrics` keeps series of their own for the most troubled within `metrics-db-limit`; a
/// database's own `health-lag` takes over the process's.
#[test]
fn health_readiness_sync_and_metrics_answer_for_the_database_named() {
    let scratch = Scratch::new();
    let (good, other, stuck) = (scratch.path("good.db"), scratch.path("other.db"), scratch.path("stuck.db"));
    let lenient = scratch.path("lenient.db");
    for db in [&good, &other, &stuck, &lenient] {
        App::open(db).insert(5);
    }
    let config = scratch.path("walstream.yml");
    let entry =
        |db: &std::path::Path, url: &str| format!("  - path: {}\n    replicas: [{{url: {url}}}]\n", db.display());
    std::fs::write(
        &config,
        format!(
            "health-lag: 1s\nmetrics-db-limit: 1\ndbs:\n{}{}{}{}    health-lag: 1h\n",
            entry(&good, &scratch.replica_url()),
            entry(&other, &format!("{}-other", scratch.replica_url())),
            entry(&stuck, &scratch.unwritable_replica_url()),
            entry(&lenient, &format!("{}-lenient", scratch.unwritable_replica_url())),
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let replicator = Replicator::start_args(
        &["-config".into(), config.into(), "-addr".into(), addr.clone().into()],
        scratch.path("replicate.log"),
        &[],
    );
    let query = |db: &std::path::Path| format!("db={}", db.display());
    wait_until(Duration::from_secs(20), "the good database to turn ready", || {
        get(&addr, &format!("/readyz?{}", query(&good))).0 == 200
    });
    let (status, body) = get(&addr, &format!("/readyz?{}", query(&stuck)));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("stuck.db") && !body.contains("good.db"), "{body}");
    assert_eq!(get(&addr, "/readyz").0, 503, "all of them: one is not ready");

    App::open(&lenient).insert(1);
    App::open(&stuck).insert(1);
    wait_until(Duration::from_secs(20), "the stuck database to turn unhealthy", || {
        get(&addr, &format!("/healthz?{}", query(&stuck))).0 == 503
    });
    assert_eq!(get(&addr, &format!("/healthz?{}", query(&good))), (200, "ok\n".to_string()));
    assert_eq!(
        get(&addr, &format!("/healthz?{}", query(&lenient))),
        (200, "ok\n".to_string()),
        "held back as long as the stuck one, within its own health-lag of 1h"
    );
    assert_eq!(get(&addr, "/healthz").0, 503);

    // Four databases, one unhealthy, a limit of one: only the unhealthy one has its series.
    let series = scrape(&addr);
    let by_state = |state: &str| {
        series["walstream_databases"].iter().find(|(labels, _)| labels["state"] == state).map(|(_, v)| *v)
    };
    assert_eq!((by_state("all"), by_state("unhealthy"), by_state("omitted")), (Some(4.0), Some(1.0), Some(3.0)));
    let dbs: Vec<&str> = series["litestream_db_size"].iter().map(|(labels, _)| labels["db"].as_str()).collect();
    assert_eq!(dbs, [stuck.to_str().unwrap()], "only the most troubled database keeps its series");
    assert!(
        series["walstream_fleet_replica_lag_seconds_max"][0].1 > 1.0,
        "{:?}",
        series["walstream_fleet_replica_lag_seconds_max"]
    );
    assert!(series["walstream_fleet_replica_pending_bytes"][0].1 > 0.0);

    let (status, body) = request_on(&addr, "POST", &format!("/sync?timeout=5s&{}", query(&good)), None).unwrap();
    assert_eq!((status, body.trim()), (200, format!("synced {}", good.display()).as_str()));
    let (status, body) = request_on(&addr, "POST", &format!("/sync?timeout=300ms&{}", query(&stuck)), None).unwrap();
    assert_eq!(status, 504, "{body}");

    let missing = scratch.path("missing.db");
    for path in ["/healthz", "/readyz"] {
        let (status, body) = get(&addr, &format!("{path}?{}", query(&missing)));
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("missing.db"), "{path}: {body}");
        let (status, body) = get(&addr, &format!("{path}?timeout=1s"));
        assert_eq!((status, body.as_str()), (400, "unknown parameter \"timeout\": use db\n"), "{path}");
    }
    replicator.kill();
}
