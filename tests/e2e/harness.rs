//! Shared fixtures: paths to the binaries, an application writing to SQLite, a replicator
//! process, restore, and the comparison every test ends with.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `walstream` binary, built from the current sources with this test binary's profile.
///
/// `cargo nextest run` / `cargo test` rebuild test targets but not the CLI's binary, so a test
/// could silently run a stale `walstream`. Each test process asks cargo once; when the binary is
/// fresh that is a no-op of a few hundred milliseconds. It asks for the whole workspace with all
/// targets, as `scripts/test.sh` builds it: with only `-p walstream-cli`, cargo would resolve
/// the store without the tests' `conformance` feature and relink everything, twice per run.
pub fn walstream_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // target/<profile>/deps/e2e-<hash> -> target/<profile>/walstream
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build.current_dir(workspace_root()).args(["build", "--quiet", "--workspace", "--all-targets"]);
            // Cargo describes this test's package to it in the environment, and build scripts
            // that watch those variables (ring's watches CARGO_MANIFEST_DIR) would rerun and
            // rebuild half the graph: 70 s in a fresh run, while the first tests wait on the build lock.
            for (key, _) in std::env::vars_os() {
                let key_str = key.to_string_lossy();
                if key_str.starts_with("CARGO_PKG_")
                    || [
                        "CARGO_MANIFEST_DIR",
                        "CARGO_MANIFEST_PATH",
                        "CARGO_CRATE_NAME",
                        "CARGO_BIN_NAME",
                        "CARGO_TARGET_TMPDIR",
                        "CARGO_PRIMARY_PACKAGE",
                    ]
                    .contains(&&*key_str)
                {
                    build.env_remove(&key);
                }
            }
            if release {
                build.arg("--release");
            }
            let status = build.status().expect("running cargo to build walstream");
            assert!(status.success(), "building walstream failed");
            profile_dir.join("walstream")
        })
        .clone()
}

/// The binary the container image holds (`scripts/build-release.sh`, which `scripts/test.sh`
/// runs and announces in `WALSTREAM_RELEASE_BIN`); the debug build when run outside it.
pub fn release_bin() -> PathBuf {
    match std::env::var_os("WALSTREAM_RELEASE_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            eprintln!("WALSTREAM_RELEASE_BIN is not set (scripts/test.sh sets it): using the debug build");
            walstream_bin()
        }
    }
}

/// The litestream v0.3.13 binary installed by `scripts/install-tools.sh`.
pub fn litestream_bin() -> PathBuf {
    let bin = std::env::var_os("LITESTREAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/litestream/litestream"));
    assert!(
        bin.exists(),
        "{} is missing: run scripts/install-tools.sh (the README's test command does)",
        bin.display()
    );
    bin
}

/// Where a test's replica lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A directory in the scratch dir.
    File,
    /// A fresh bucket on the emulator.
    Gcs,
    /// A fresh bucket on the S3 server (moto).
    S3,
}

impl Backend {
    /// The replica type, as URLs, logs and metric labels name it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::File => "file",
            Backend::Gcs => "gcs",
            Backend::S3 => "s3",
        }
    }
}

/// Writes the test `fn $name(backend: Backend)` once and runs it on each backend listed, as
/// `$name::file` and so on: `on_backends! { [file: File, gcs: Gcs] fn name(backend: Backend) {...} }`.
macro_rules! on_backends {
    ([$($test:ident: $variant:ident),+] $(#[$meta:meta])* fn $name:ident($backend:ident: Backend) $body:block) => {
        $(#[$meta])*
        mod $name {
            use super::*;
            fn run($backend: Backend) $body
            $(
                #[test]
                fn $test() {
                    run(Backend::$variant)
                }
            )+
        }
    };
}
pub(crate) use on_backends;

/// [`on_backends!`] on every backend: `$name::file`, `$name::gcs` and `$name::s3`.
macro_rules! on_both_backends {
    ($($item:tt)*) => {
        crate::harness::on_backends! { [file: File, gcs: Gcs, s3: S3] $($item)* }
    };
}
pub(crate) use on_both_backends;

/// A scratch directory with a database path, and a replica on the chosen backend.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    /// The bucket of a gcs or s3 replica.
    pub bucket: Option<String>,
    pub backend: Backend,
}

/// The path inside the bucket that gcs replicas use, so prefixes are exercised.
pub const GCS_REPLICA_PATH: &str = "apps/db";

impl Scratch {
    /// A scratch dir with a file:// replica.
    pub fn new() -> Scratch {
        Scratch::on(Backend::File)
    }
    pub fn on(backend: Backend) -> Scratch {
        let bucket = match backend {
            Backend::File => None,
            Backend::Gcs => Some(crate::emulator::fresh_bucket()),
            Backend::S3 => Some(crate::s3::fresh_bucket()),
        };
        Scratch { dir: tempfile::tempdir().unwrap(), bucket, backend }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn db(&self) -> PathBuf {
        self.path("app.db")
    }
    pub fn replica_url(&self) -> String {
        match (&self.bucket, self.backend) {
            (Some(bucket), Backend::S3) => format!("s3://{bucket}.localhost:{}/{GCS_REPLICA_PATH}", crate::s3::port()),
            (Some(bucket), _) => format!("gcs://{bucket}/{GCS_REPLICA_PATH}"),
            (None, _) => format!("file://{}", self.path("replica").display()),
        }
    }
    /// Writes `walstream.yml`: this database, replicated to this replica with `replica_keys`
    /// (`"retention: 3s"`, …) added to the replica's entry; returns its path.
    pub fn write_config(&self, replica_keys: &[&str]) -> PathBuf {
        let mut text =
            format!("dbs:\n  - path: {}\n    replicas:\n      - url: {}\n", self.db().display(), self.replica_url());
        for key in replica_keys {
            text.push_str(&format!("        {key}\n"));
        }
        let config = self.path("walstream.yml");
        std::fs::write(&config, text).unwrap();
        config
    }

    /// `walstream replicate` of this database to this replica, logging to `replicate.log`.
    pub fn start_replicator(&self) -> Replicator {
        Replicator::start(&self.db(), &[self.replica_url()], self.path("replicate.log"))
    }

    /// A `file://` replica no write can reach (its directory would be below a regular file).
    pub fn unwritable_replica_url(&self) -> String {
        std::fs::write(self.path("blocker"), b"").unwrap();
        format!("file://{}/replica", self.path("blocker").display())
    }

    /// Restores the replica to `restored.db` with walstream, asserts it equals the source
    /// database, and returns its path.
    pub fn assert_restores_source(&self) -> PathBuf {
        let restored = self.path("restored.db");
        restore(&self.replica_url(), &restored);
        assert_same_database(&self.db(), &restored);
        restored
    }

    /// Whether a restore of the replica now equals the source; for waiting on a replicator
    /// that has not shipped everything yet. A restore that fails counts as not yet.
    pub fn restores_source_now(&self) -> bool {
        let restored = self.path("restored-now.db");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", restored.display()));
        }
        let output = walstream(&["restore", "-o", restored.to_str().unwrap(), &self.replica_url()]);
        output.status.success() && dump(&self.db()) == dump(&restored)
    }

    /// Restores the replica with litestream v0.3.13 and asserts it equals `expected`.
    pub fn assert_litestream_restores(&self, expected: &Path) {
        let restored = self.path("by-litestream.db");
        let output = with_emulator(&mut Command::new(litestream_bin()))
            .args(["restore", "-o"])
            .arg(&restored)
            .arg(self.replica_url())
            .output()
            .unwrap();
        assert!(output.status.success(), "litestream restore failed: {}", stderr(&output));
        assert_same_database(expected, &restored);
    }

    /// Keys of every object in the replica, relative to its root, sorted.
    pub fn replica_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = match &self.bucket {
            Some(bucket) if self.backend == Backend::S3 => crate::s3::keys(bucket, GCS_REPLICA_PATH),
            Some(bucket) => crate::emulator::list(bucket, &format!("{GCS_REPLICA_PATH}/"))
                .into_iter()
                .map(|name| name[GCS_REPLICA_PATH.len() + 1..].to_string())
                .collect(),
            None => {
                let root = self.path("replica");
                files_under(&root)
                    .into_iter()
                    .map(|p| p.strip_prefix(&root).unwrap().to_string_lossy().into_owned())
                    .collect()
            }
        };
        keys.sort();
        keys
    }
    /// How many generations the replica holds.
    pub fn generation_count(&self) -> usize {
        let mut generations: Vec<String> = self
            .replica_keys()
            .iter()
            .filter_map(|k| k.strip_prefix("generations/")?.split('/').next().map(str::to_string))
            .collect();
        generations.dedup();
        generations.len()
    }
    /// Replaces one replica object's bytes.
    pub fn overwrite_object(&self, key: &str, body: &[u8]) {
        match &self.bucket {
            Some(bucket) if self.backend == Backend::S3 => {
                crate::s3::put(bucket, &format!("{GCS_REPLICA_PATH}/{key}"), body)
            }
            Some(bucket) => crate::emulator::put(bucket, &format!("{GCS_REPLICA_PATH}/{key}"), body),
            None => std::fs::write(self.path("replica").join(key), body).unwrap(),
        }
    }
    /// One replica object's bytes.
    pub fn read_object(&self, key: &str) -> Vec<u8> {
        match &self.bucket {
            Some(bucket) if self.backend == Backend::S3 => crate::s3::get(bucket, &format!("{GCS_REPLICA_PATH}/{key}")),
            Some(bucket) => crate::emulator::get(bucket, &format!("{GCS_REPLICA_PATH}/{key}")),
            None => std::fs::read(self.path("replica").join(key)).unwrap(),
        }
    }
}

/// A program `scripts/install-tools.sh` puts under `.tools/` (`rel` is relative to it); fails
/// the test, naming the fix, when it is missing.
pub fn installed_tool(rel: &str) -> PathBuf {
    let bin = workspace_root().join(".tools").join(rel);
    assert!(
        bin.exists(),
        "{} is missing: run scripts/install-tools.sh (the README's test command does)",
        bin.display()
    );
    bin
}

/// Starts a server for the rest of this test process: a thread that never ends holds the child,
/// and the child gets SIGKILL when this process dies, however it dies.
pub fn spawn_for_life(mut command: Command, what: &'static str) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
        ready_tx.send(()).unwrap();
        let _keep = child;
        loop {
            std::thread::park();
        }
    });
    ready_rx.recv().unwrap_or_else(|_| panic!("{what} did not start"));
}

/// `command` with `STORAGE_EMULATOR_HOST` set when this test process uses the emulator.
pub fn with_emulator(command: &mut Command) -> &mut Command {
    if let Some(host) = crate::emulator::host_if_started() {
        command.env("STORAGE_EMULATOR_HOST", host);
    }
    if crate::s3::started() {
        // moto takes any key pair; walstream and litestream must still find one.
        command.env("AWS_ACCESS_KEY_ID", "test").env("AWS_SECRET_ACCESS_KEY", "test");
    }
    command
}

/// The application: a plain SQLite connection in WAL mode with a busy timeout, as apps that
/// follow Litestream's advice have.
pub struct App {
    pub conn: Connection,
    next_id: i64,
}

impl App {
    pub fn open(path: &Path) -> App {
        let conn = Connection::open(path).unwrap();
        // First: walstream switches a database it finds in rollback mode to WAL itself, and the
        // two switches at once left the app's, with no timeout yet, busy (once in a fresh-clone
        // run, on a database replaced under walstream).
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, body TEXT NOT NULL, blob BLOB)")
            .unwrap();
        let next_id = conn.query_row("SELECT coalesce(max(id), 0) + 1 FROM items", [], |r| r.get(0)).unwrap();
        App { conn, next_id }
    }

    /// Commits one transaction of `rows` rows with ~200-byte bodies.
    pub fn insert(&mut self, rows: usize) {
        let tx = self.conn.transaction().unwrap();
        for _ in 0..rows {
            tx.execute(
                "INSERT INTO items (id, body) VALUES (?1, printf('%.200c', ?1 % 26 + 65) || ?1)",
                [self.next_id],
            )
            .unwrap();
            self.next_id += 1;
        }
        tx.commit().unwrap();
    }

    /// One transaction larger than an LZ4 block and a segment: `bytes` of random blobs.
    pub fn insert_large(&mut self, bytes: usize) {
        let tx = self.conn.transaction().unwrap();
        let chunk = 64 * 1024;
        for _ in 0..bytes / chunk {
            tx.execute(
                "INSERT INTO items (id, body, blob) VALUES (?1, 'large', randomblob(?2))",
                rusqlite::params![self.next_id, chunk as i64],
            )
            .unwrap();
            self.next_id += 1;
        }
        tx.commit().unwrap();
    }

    pub fn checkpoint(&self, mode: &str) -> (i64, i64, i64) {
        self.conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
    }

    pub fn count(&self) -> i64 {
        self.conn.query_row("SELECT count(*) FROM items", [], |r| r.get(0)).unwrap()
    }
}

/// `count` databases with a few rows each, and a config file (`walstream.yml`, starting with
/// the lines `top`) replicating each to its own file:// replica `replica-N`; returns the
/// config's path and the databases.
pub fn many_databases(scratch: &Scratch, count: usize, top: &str) -> (PathBuf, Vec<PathBuf>) {
    let mut config = format!("{top}dbs:\n");
    let dbs: Vec<PathBuf> = (0..count).map(|n| scratch.path(&format!("db-{n}.db"))).collect();
    for (n, db) in dbs.iter().enumerate() {
        App::open(db).insert(3);
        config.push_str(&format!(
            "  - path: {}\n    replicas:\n      - url: file://{}\n",
            db.display(),
            scratch.path(&format!("replica-{n}")).display()
        ));
    }
    let path = scratch.path("walstream.yml");
    std::fs::write(&path, config).unwrap();
    (path, dbs)
}

/// Restores every `step`-th of [`many_databases`]' replicas and compares it with its database.
pub fn assert_many_databases_restore(scratch: &Scratch, dbs: &[PathBuf], step: usize) {
    for (n, db) in dbs.iter().enumerate().step_by(step) {
        let restored = scratch.path(&format!("restored-{n}.db"));
        restore(&format!("file://{}", scratch.path(&format!("replica-{n}")).display()), &restored);
        assert_same_database(db, &restored);
    }
}

/// A running `walstream replicate`, its log kept in a file for failure messages.
pub struct Replicator {
    child: Option<Child>,
    log: PathBuf,
}

impl Replicator {
    pub fn start(db: &Path, urls: &[String], log: PathBuf) -> Replicator {
        Replicator::start_with_env(db, urls, log, &[])
    }

    /// The same, with extra environment variables (which win over the harness's own).
    pub fn start_with_env(db: &Path, urls: &[String], log: PathBuf, env: &[(&str, &str)]) -> Replicator {
        Replicator::start_with_args(db, urls, log, env, &[])
    }

    /// The same, with extra flags before the database path.
    pub fn start_with_args(
        db: &Path,
        urls: &[String],
        log: PathBuf,
        env: &[(&str, &str)],
        flags: &[&str],
    ) -> Replicator {
        let mut args: Vec<std::ffi::OsString> = flags.iter().map(Into::into).collect();
        args.push(db.into());
        args.extend(urls.iter().map(Into::into));
        Replicator::start_args(&args, log, env)
    }

    /// `walstream replicate ARGS...`, e.g. config mode with no database on the command line.
    pub fn start_args(args: &[std::ffi::OsString], log: PathBuf, env: &[(&str, &str)]) -> Replicator {
        let started = |log: &Path| std::fs::read_to_string(log).unwrap_or_default().matches("walstream v").count();
        let earlier_starts = started(&log);
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = with_emulator(&mut Command::new(walstream_bin()))
            .envs(env.iter().copied())
            .arg("replicate")
            .args(args)
            .env("WALSTREAM_LOG", "debug")
            // In config mode the daemon logs to stdout (as Litestream does): keep both.
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let replicator = Replicator { child: Some(child), log };
        // Until walstream handles signals, a SIGTERM would kill it without a flush.
        wait_until(Duration::from_secs(10), "walstream to start", || started(&replicator.log) > earlier_starts);
        replicator
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(30))
    }

    /// SIGTERM, and asserts a clean exit, showing the log's tail if not.
    pub fn stop_ok(self) {
        let log = self.log.clone();
        let status = self.stop();
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            // What moved the generation on is often long before the tail.
            let generations: Vec<&str> = text.lines().filter(|l| l.contains("new generation")).collect();
            panic!(
                "replicate exited {status}; generations started:\n{}\nlog tail:\n{}",
                generations.join("\n"),
                tail.join("\n")
            );
        }
    }

    /// Waits (bounded) for an exit the test already caused.
    pub fn wait_for_exit(mut self) -> ExitStatus {
        self.wait(Duration::from_secs(30))
    }

    /// SIGKILL: no chance to flush.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(10));
    }

    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("replicator did not exit within {limit:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Peak resident memory of a running process, from /proc.
pub fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// Waits until `cond` holds, failing the test after `limit`.
/// The `before` lines of a replicator's log that lead up to each generation after the first,
/// each with its own line: a second generation's race is in what the capturer did just before.
pub fn log_before_later_generations(log: &str, before: usize) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("new generation"))
        .skip(1)
        .flat_map(|(at, _)| lines[at.saturating_sub(before)..=at].iter().copied())
        .collect()
}

pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the replicator has uploaded its first snapshot.
pub fn wait_for_snapshot(scratch: &Scratch) {
    wait_until(Duration::from_secs(60), "the first snapshot", || {
        scratch.replica_keys().iter().any(|k| k.ends_with(".snapshot.lz4"))
    });
}

/// Every file under `dir`, at any depth.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .flat_map(|e| {
            let path = e.path();
            if path.is_dir() {
                files_under(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

/// A finished command's stderr, as text.
/// Disk the files under `dir` take (allocated blocks: punched holes do not count).
pub fn disk_under(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    files_under(dir).iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.blocks() * 512).sum()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A finished command's stdout, as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `walstream ARGS...`, waited for.
pub fn walstream(args: &[&str]) -> Output {
    with_emulator(&mut Command::new(walstream_bin())).args(args).output().unwrap()
}

/// `walstream restore -o OUT URL`; panics with the output if it fails.
pub fn restore(url: &str, out: &Path) {
    let output = walstream(&["restore", "-o", out.to_str().unwrap(), url]);
    assert!(
        output.status.success(),
        "walstream restore failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every row of every table, in rowid order: what "the same database" means for these tests.
pub fn dump(path: &Path) -> Vec<(String, Vec<Vec<rusqlite::types::Value>>)> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    tables.sort();
    tables
        .into_iter()
        .map(|table| {
            let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid")).unwrap();
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| (0..n).map(|i| r.get::<_, rusqlite::types::Value>(i)).collect())
                .unwrap()
                .map(Result::unwrap)
                .collect();
            (table, rows)
        })
        .collect()
}

/// Asserts the restored database passes integrity_check and holds exactly the source's rows.
pub fn assert_same_database(source: &Path, restored: &Path) {
    let conn = Connection::open(restored).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok", "integrity_check of {}", restored.display());
    drop(conn);
    let (want, got) = (dump(source), dump(restored));
    let summary = |d: &Vec<(String, Vec<Vec<rusqlite::types::Value>>)>| {
        d.iter().map(|(t, rows)| format!("{t}:{}", rows.len())).collect::<Vec<_>>().join(",")
    };
    assert!(
        want == got,
        "restored database differs from the source: source has {}, restored has {}",
        summary(&want),
        summary(&got)
    );
}

/// Files in `dir` (not recursive), sorted, for "nothing was left behind" checks.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A random seed for a test, printed so a failure can be replayed with WALSTREAM_TEST_SEED.
pub fn seed() -> u64 {
    let seed = std::env::var("WALSTREAM_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("WALSTREAM_TEST_SEED={seed}");
    seed
}
