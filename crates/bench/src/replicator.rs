//! A replicator under test: a fresh database and bucket per phase, the tool replicating it to
//! the bench's object server (fake-gcs-server, or moto behind a counting proxy), and its
//! requests read back from that server's log. Shared by the `replicate` and `cost` benches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime};

use anyhow::ensure;
use rusqlite::Connection;

use crate::emulator::{Emulator, Op, Request};
use crate::s3_server::S3Server;

/// A replicator and how to run it.
pub(crate) struct Tool {
    pub(crate) label: &'static str,
    pub(crate) bin: PathBuf,
    /// Bucket and file name prefix, so each run has its own.
    pub(crate) prefix: &'static str,
    pub(crate) flags: Vec<String>,
    /// How long it may hold commits back on purpose (`-sync-interval`).
    pub(crate) hold: Duration,
}

/// Where phases keep their files, and the server they replicate to.
pub(crate) struct Harness {
    pub(crate) dir: PathBuf,
    pub(crate) server: Server,
}

/// The object server a bench replicates to, with its request log.
pub(crate) enum Server {
    Gcs(Emulator),
    S3(S3Server),
}

impl Server {
    /// The replica type, as the tools' URLs name it.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Server::Gcs(_) => "gcs",
            Server::S3(_) => "s3",
        }
    }

    pub(crate) fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        match self {
            Server::Gcs(emulator) => emulator.create_bucket(name),
            Server::S3(s3) => s3.create_bucket(name),
        }
    }

    /// Every request for objects of `bucket` so far.
    pub(crate) fn requests(&self, bucket: &str) -> anyhow::Result<Vec<Request>> {
        match self {
            Server::Gcs(emulator) => emulator.requests(bucket),
            Server::S3(s3) => Ok(s3.requests(bucket)),
        }
    }

    /// The replica URL both tools accept for `path` in `bucket`: for S3, Litestream's
    /// `BUCKET.localhost:PORT` form, which means path style and no region lookup.
    pub(crate) fn url(&self, bucket: &str, path: &str) -> String {
        match self {
            Server::Gcs(_) => format!("gcs://{bucket}/{path}"),
            Server::S3(s3) => format!("s3://{bucket}.localhost:{}/{path}", s3.proxy_port),
        }
    }

    /// What a tool's process needs to reach the server.
    pub(crate) fn configure<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        match self {
            Server::Gcs(emulator) => command.env("STORAGE_EMULATOR_HOST", &emulator.host),
            // moto takes any key pair; both tools must still find one.
            Server::S3(_) => command.env("AWS_ACCESS_KEY_ID", "bench").env("AWS_SECRET_ACCESS_KEY", "bench"),
        }
    }
}

/// A phase's database, bucket and running replicator.
pub(crate) struct Phase<'a> {
    pub(crate) harness: &'a Harness,
    pub(crate) bucket: String,
    pub(crate) db: PathBuf,
    pub(crate) child: Child,
}

impl Harness {
    /// A database with a table and a few rows, its bucket, and `tool` replicating it; returns
    /// once start-up traffic has settled.
    pub(crate) fn start(&self, tool: &Tool, phase: &str) -> anyhow::Result<Phase<'_>> {
        let bucket = format!("{}-{phase}", tool.prefix);
        self.server.create_bucket(&bucket)?;
        let db = self.dir.join(format!("{bucket}.db"));
        create_db(&db)?;
        let log = std::fs::File::create(self.dir.join(format!("{bucket}.log")))?;
        let child = self
            .server
            .configure(
                Command::new(&tool.bin).arg("replicate").args(&tool.flags).arg(&db).arg(self.server.url(&bucket, "db")),
            )
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let phase = Phase { harness: self, bucket, db, child };
        phase.settle(1)?;
        Ok(phase)
    }
}

impl Phase<'_> {
    pub(crate) fn requests_since(&self, since: SystemTime) -> anyhow::Result<Vec<Request>> {
        Ok(self.harness.server.requests(&self.bucket)?.into_iter().filter(|r| r.at >= since).collect())
    }

    /// Warnings and generation changes the replicator logged, which explain extra requests.
    pub(crate) fn report_log(&self) {
        let log = std::fs::read_to_string(self.harness.dir.join(format!("{}.log", self.bucket))).unwrap_or_default();
        let notable: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || (l.contains("new generation") && !l.contains("no generation exists")))
            .collect();
        for line in notable.iter().take(5) {
            eprintln!("{}: {line}", self.bucket);
        }
        if notable.len() > 5 {
            eprintln!("{}: … {} more such lines", self.bucket, notable.len() - 5);
        }
    }

    /// Waits for at least `uploads` uploads, then for 3 s without a request.
    pub(crate) fn settle(&self, uploads: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let requests = self.harness.server.requests(&self.bucket)?;
            let uploaded = requests.iter().filter(|r| r.op == Op::Upload).count();
            let quiet = requests.last().is_some_and(|r| r.at.elapsed().unwrap_or_default() > Duration::from_secs(3));
            if uploaded >= uploads && quiet {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "{}: start-up did not settle ({uploaded} uploads)", self.bucket);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until no upload has come for `quiet` after `from`; returns the last upload's time.
    pub(crate) fn wait_for_quiet(
        &self,
        from: SystemTime,
        quiet: Duration,
        limit: Duration,
    ) -> anyhow::Result<SystemTime> {
        let deadline = Instant::now() + limit;
        loop {
            let last = self
                .harness
                .server
                .requests(&self.bucket)?
                .iter()
                .filter(|r| r.op == Op::Upload)
                .map(|r| r.at)
                .max()
                .unwrap_or(from)
                .max(from);
            if last.elapsed().unwrap_or_default() > quiet {
                return Ok(last);
            }
            ensure!(Instant::now() < deadline, "{}: uploads did not stop within {limit:?}", self.bucket);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit, or SIGKILL after 30 s. litestream v0.3.13 often exits 1 after its
    /// final sync ("context canceled"), and once hung in it, so the status is not checked: the
    /// restores are.
    pub(crate) fn stop(mut self) {
        self.report_log();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{}: the replicator did not exit 30 s after SIGTERM; killing it", self.bucket);
    }
}

impl Drop for Phase<'_> {
    /// A phase that failed must not leave its replicator running (it would hold the binary).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every phase's transaction: one row with a 200-byte body.
pub(crate) const INSERT_ROW: &str = "INSERT INTO items (body) VALUES (hex(randomblob(100)))";

pub(crate) fn create_db(db: &Path) -> anyhow::Result<()> {
    let conn = Connection::open(db)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.execute_batch(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT NOT NULL); INSERT INTO items (body) VALUES ('first');",
    )?;
    Ok(())
}

/// The application's connection, as Litestream advises: WAL, synchronous=NORMAL, a busy timeout.
pub(crate) fn app_connection(db: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "synchronous", "normal")?;
    Ok(conn)
}
