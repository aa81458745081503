//! s3:// against a real S3 server: moto in server mode (PyPI `moto[server]`, installed into the
//! project's venv by scripts/install-tools.sh) on 127.0.0.1, one per run under scripts/test.sh
//! (else one per test process), a fresh bucket per test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use walstream_store::{ObjectStore, S3Settings, S3Store};

use crate::emulator::request_on;
use crate::harness::*;

fn moto_bin() -> PathBuf {
    installed_tool("venv/bin/moto_server")
}

static HOST: OnceLock<String> = OnceLock::new();

/// Whether some test of this process uses the S3 server: commands get a key pair only then.
pub fn started() -> bool {
    HOST.get().is_some()
}

/// The S3 server's port.
pub fn port() -> &'static str {
    host().rsplit_once(':').unwrap().1
}

/// `host:port` of the moto server: the run's when `scripts/test.sh` started one (it exports
/// `WALSTREAM_TEST_S3_HOST`), else this process's own, started on first use.
pub fn host() -> &'static str {
    HOST.get_or_init(|| {
        if let Ok(host) = std::env::var("WALSTREAM_TEST_S3_HOST") {
            if !host.is_empty() {
                return host;
            }
        }
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let mut command = Command::new(moto_bin());
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        spawn_for_life(command, "moto_server");
        wait_until(Duration::from_secs(30), "moto_server to answer", || request_on(&host, "GET", "/", None).is_ok());
        host
    })
}

/// A new bucket on the moto server.
pub fn fresh_bucket() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "t{}-{}-{:06x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>() & 0xff_ffff
    );
    let (status, body) = request_on(host(), "PUT", &format!("/{name}"), Some("")).unwrap();
    assert_eq!(status, 200, "creating bucket {name}: {body}");
    name
}

/// moto takes any key pair; walstream must still send one.
pub fn settings() -> S3Settings {
    S3Settings {
        endpoint: Some(format!("http://{}", host())),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        ..S3Settings::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn s3_store_passes_conformance_at_the_root_and_under_a_prefix() {
    let rt = runtime();
    for prefix in ["", "apps/db"] {
        let bucket = fresh_bucket();
        let store = S3Store::new(&bucket, prefix, &settings());
        rt.block_on(walstream_store::conformance::run(&store));
        if !prefix.is_empty() {
            let other = S3Store::new(&bucket, "", &settings());
            let everything = rt.block_on(other.list("")).unwrap();
            assert!(
                !everything.is_empty() && everything.iter().all(|m| m.key.starts_with("apps/db/")),
                "objects must stay under the prefix: {everything:?}"
            );
        }
    }
}

#[test]
fn a_missing_bucket_and_an_unreachable_endpoint_are_named() {
    let rt = runtime();
    let store = S3Store::new("no-such-bucket-here", "db", &settings());
    let error = rt.block_on(store.put("generations/x", bytes::Bytes::from_static(b"x"))).unwrap_err();
    assert!(matches!(error, walstream_store::Error::BucketNotFound { .. }), "{error}");
    assert!(error.to_string().contains("bucket \"no-such-bucket-here\" does not exist"), "{error}");

    let down = S3Settings { endpoint: Some(format!("http://127.0.0.1:{}", free_port())), ..settings() };
    let store = S3Store::new("b", "db", &down);
    let error = rt.block_on(store.list("generations/")).unwrap_err();
    assert!(matches!(error, walstream_store::Error::Remote { .. }), "{error}");
}

/// Keys under `prefix` of `bucket`, relative to it, read with walstream's own client.
pub fn keys(bucket: &str, prefix: &str) -> Vec<String> {
    let store = S3Store::new(bucket, prefix, &settings());
    runtime().block_on(store.list("")).unwrap().into_iter().map(|m| m.key).collect()
}

/// One object's bytes.
pub fn get(bucket: &str, key: &str) -> Vec<u8> {
    runtime().block_on(S3Store::new(bucket, "", &settings()).get(key)).unwrap().to_vec()
}

/// Replaces one object's bytes.
pub fn put(bucket: &str, key: &str, body: &[u8]) {
    runtime().block_on(S3Store::new(bucket, "", &settings()).put(key, bytes::Bytes::copy_from_slice(body))).unwrap();
}

fn wait_for_s3_snapshot(bucket: &str, prefix: &str) {
    wait_until(Duration::from_secs(60), "the first snapshot", || {
        keys(bucket, prefix).iter().any(|k| k.ends_with(".snapshot.lz4"))
    });
}

fn load(app: &mut App, checkpoint: &str) {
    for round in 0..4 {
        for _ in 0..20 {
            app.insert(4);
        }
        if round == 1 {
            app.checkpoint(checkpoint);
            app.insert_large(1 << 20);
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// Litestream v0.3.13's keys for an S3-compatible store, which both tools read.
fn s3_config(scratch: &Scratch, db: &Path, bucket: &str, path: &str) -> PathBuf {
    s3_config_via(scratch, db, bucket, path, host(), "")
}

/// The same, reaching the server through `endpoint`, with `extra` replica keys.
fn s3_config_via(scratch: &Scratch, db: &Path, bucket: &str, path: &str, endpoint: &str, extra: &str) -> PathBuf {
    let text = format!(
        "dbs:\n  - path: {}\n    replicas:\n      - type: s3\n        bucket: {bucket}\n        path: {path}\n        endpoint: http://{endpoint}\n        region: us-east-1\n        force-path-style: true\n        access-key-id: test\n        secret-access-key: test\n{extra}",
        db.display(),
    );
    let config = scratch.path(&format!("{path}.yml"));
    std::fs::write(&config, text).unwrap();
    config
}

fn run(program: &Path, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(program).args(args).envs(env.iter().copied()).output().unwrap()
}

#[test]
fn walstream_and_litestream_restore_each_other_on_s3_with_one_config_file() {
    let scratch = Scratch::new();
    let bucket = fresh_bucket();

    // walstream replicates; litestream and walstream restore.
    let db = scratch.db();
    let config = s3_config(&scratch, &db, &bucket, "by-walstream");
    let mut app = App::open(&db);
    app.insert(1);
    let replicator =
        Replicator::start_args(&["-config".into(), config.clone().into()], scratch.path("replicate.log"), &[]);
    wait_for_s3_snapshot(&bucket, "by-walstream");
    load(&mut app, "TRUNCATE");
    replicator.stop_ok();
    for (tool, out) in [(litestream_bin(), "litestream.db"), (walstream_bin(), "walstream.db")] {
        let restored = scratch.path(out);
        let output = run(
            &tool,
            &[
                "restore".as_ref(),
                "-config".as_ref(),
                config.as_os_str(),
                "-o".as_ref(),
                restored.as_os_str(),
                db.as_os_str(),
            ],
            &[],
        );
        assert!(output.status.success(), "{} restore failed: {}", tool.display(), stderr(&output));
        assert_same_database(&db, &restored);
    }

    // litestream replicates; walstream restores.
    let db = scratch.path("theirs.db");
    let config = s3_config(&scratch, &db, &bucket, "by-litestream");
    let mut app = App::open(&db);
    app.insert(1);
    let log = std::fs::File::create(scratch.path("litestream.log")).unwrap();
    let mut litestream = Command::new(litestream_bin())
        .arg("replicate")
        .arg("-config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for_s3_snapshot(&bucket, "by-litestream");
    load(&mut app, "PASSIVE");
    // SAFETY: signalling our own child; its exit status says nothing about the data (interop.rs).
    assert_eq!(unsafe { libc::kill(litestream.id() as i32, libc::SIGTERM) }, 0);
    litestream.wait().unwrap();
    let restored = scratch.path("from-litestream.db");
    let output = run(
        &walstream_bin(),
        &[
            "restore".as_ref(),
            "-config".as_ref(),
            config.as_os_str(),
            "-o".as_ref(),
            restored.as_os_str(),
            db.as_os_str(),
        ],
        &[],
    );
    assert!(output.status.success(), "walstream restore failed: {}", stderr(&output));
    assert_same_database(&db, &restored);
    assert_eq!(
        keys(&bucket, "")
            .iter()
            .filter(|k| !k.starts_with("by-walstream/") && !k.starts_with("by-litestream/"))
            .count(),
        0,
        "everything stays under each replica's path"
    );
}

/// `s3://BUCKET.localhost:PORT/PATH` (Litestream's form for a local S3 server) with the key pair
/// from the AWS environment: no config file at all.
#[test]
fn a_local_s3_url_with_the_aws_environment_replicates_and_restores() {
    let scratch = Scratch::new();
    let bucket = fresh_bucket();
    let port = port();
    let url = format!("s3://{bucket}.localhost:{port}/db");
    let env = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")];
    let mut app = App::open(&scratch.db());
    app.insert(1);
    let replicator =
        Replicator::start_with_env(&scratch.db(), std::slice::from_ref(&url), scratch.path("replicate.log"), &env);
    wait_for_s3_snapshot(&bucket, "db");
    load(&mut app, "TRUNCATE");
    replicator.stop_ok();
    let restored = scratch.path("restored.db");
    let output = run(&walstream_bin(), &["restore".as_ref(), "-o".as_ref(), restored.as_os_str(), url.as_ref()], &env);
    assert!(output.status.success(), "walstream restore failed: {}", stderr(&output));
    assert_same_database(&scratch.db(), &restored);
}

/// A missing bucket exits 9, an unreachable endpoint 1 and rejected credentials 10, each with one line naming the
/// fix. moto checks signatures only once `INITIAL_NO_AUTH_ACTION_COUNT` requests have passed,
/// so the credentials case has a server of its own with that set to 0.
#[test]
fn a_missing_bucket_an_unreachable_endpoint_and_rejected_credentials_exit_with_their_codes() {
    let scratch = Scratch::new();
    App::open(&scratch.db()).insert(1);
    let out = scratch.path("out.db");
    let port = port();
    let env = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")];
    let url = format!("s3://no-such-bucket.localhost:{port}/db");
    let output = run(&walstream_bin(), &["restore".as_ref(), "-o".as_ref(), out.as_os_str(), url.as_ref()], &env);
    assert_eq!(output.status.code(), Some(9), "{}", stderr(&output));
    assert!(stderr(&output).contains("bucket \"no-such-bucket\" does not exist: create it"), "{}", stderr(&output));

    // An endpoint nothing listens on: one line saying so, after the client's bounded retries.
    let url = format!("s3://some-bucket.localhost:{}/db", free_port());
    let output = run(&walstream_bin(), &["restore".as_ref(), "-o".as_ref(), out.as_os_str(), url.as_ref()], &env);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("could not connect to the endpoint"), "{}", stderr(&output));
    assert_eq!(stderr(&output).lines().filter(|l| l.contains(" ERROR ")).count(), 1, "{}", stderr(&output));

    let strict_port = free_port();
    let mut strict = Command::new(moto_bin())
        .args(["-H", "127.0.0.1", "-p", &strict_port.to_string()])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let strict_host = format!("127.0.0.1:{strict_port}");
    wait_until(Duration::from_secs(30), "the strict moto_server to answer", || {
        request_on(&strict_host, "GET", "/", None).is_ok()
    });
    let url = format!("s3://some-bucket.localhost:{strict_port}/db");
    let output = run(&walstream_bin(), &["restore".as_ref(), "-o".as_ref(), out.as_os_str(), url.as_ref()], &env);
    strict.kill().unwrap();
    strict.wait().unwrap();
    assert_eq!(output.status.code(), Some(10), "{}", stderr(&output));
    assert!(stderr(&output).contains("credentials from AWS_ACCESS_KEY_ID were rejected"), "{}", stderr(&output));
    assert!(!out.exists());
}

/// An idle database costs no requests on S3 either, with a retention check every 200 ms.
/// Counted at a proxy in front of the server, not from walstream's own metrics.
#[test]
fn an_idle_replica_makes_no_requests_on_s3() {
    use crate::fault_proxy::FaultProxy;

    let scratch = Scratch::new();
    let bucket = fresh_bucket();
    let proxy = FaultProxy::start(host(), seed());
    let extra = "        retention: 1h\n        retention-check-interval: 200ms\n";
    let config = s3_config_via(&scratch, &scratch.db(), &bucket, "db", &proxy.addr, extra);
    let mut app = App::open(&scratch.db());
    app.insert(10);
    let replicator = Replicator::start_args(&["-config".into(), config.into()], scratch.path("replicate.log"), &[]);
    wait_for_s3_snapshot(&bucket, "db");
    // Start-up: lease, listings, snapshot, WAL, and the first retention check (under load the
    // last of them can come a second or two after the snapshot is listed).
    let settled = proxy.settled(Duration::from_millis(1500));
    assert!(settled > 0, "the proxy saw walstream's requests");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(proxy.forwarded(), settled, "an idle replicator made requests over 3 s: {:?}", proxy.log_from(0));

    app.insert(1);
    wait_until(Duration::from_secs(20), "the commit to be shipped", || proxy.forwarded() > settled);
    replicator.stop_ok();
    let restored = scratch.path("restored.db");
    let output = run(
        &walstream_bin(),
        &[
            "restore".as_ref(),
            "-o".as_ref(),
            restored.as_os_str(),
            format!("s3://{bucket}.localhost:{}/db", port()).as_ref(),
        ],
        &[("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_same_database(&scratch.db(), &restored);
}
