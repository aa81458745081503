//! What the benchmarks share: measuring a child process, comparing databases, small waits,
//! quantiles.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use rusqlite::Connection;

/// The binaries a side-by-side bench runs: `--walstream`, `--litestream`, `--fake-gcs-server`,
/// and `--moto-server` for the benches that also run on S3.
#[derive(Debug, Default)]
pub struct Binaries {
    pub walstream: PathBuf,
    pub litestream: PathBuf,
    pub fake_gcs: PathBuf,
    pub moto: PathBuf,
}

impl Binaries {
    /// Takes `flag` if it names one of the binaries; false for any other flag.
    pub fn take(&mut self, flag: &str, value: &str) -> bool {
        let slot = match flag {
            "--walstream" => &mut self.walstream,
            "--litestream" => &mut self.litestream,
            "--fake-gcs-server" => &mut self.fake_gcs,
            "--moto-server" => &mut self.moto,
            _ => return false,
        };
        *slot = value.into();
        true
    }

    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.walstream.is_file() && self.litestream.is_file() && self.fake_gcs.exists(),
            "--walstream, --litestream and --fake-gcs-server must name the binaries"
        );
        Ok(())
    }
}

/// A flag's comma-separated values (`--rates 0.1,1,10`); `what` names them in the error.
pub fn comma_separated<T: std::str::FromStr>(value: &str, what: &str) -> anyhow::Result<Vec<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    value.split(',').map(str::parse).collect::<Result<_, _>>().with_context(|| what.to_string())
}

/// A finished child's wall time and the kernel's accounting of it.
pub struct Measured {
    pub wall: Duration,
    pub cpu: Duration,
    pub max_rss_kib: i64,
}

/// Runs `command` to completion and measures it.
pub fn measure(command: &mut Command) -> anyhow::Result<Measured> {
    let start = Instant::now();
    let child = command.spawn().context("spawning")?;
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waiting for our own child with valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    ensure!(pid > 0, "wait4 failed");
    ensure!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "{command:?} failed with status {status:#x}");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Measured { wall, cpu: tv(usage.ru_utime) + tv(usage.ru_stime), max_rss_kib: usage.ru_maxrss })
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `q` quantile (nearest rank) of `values`.
pub fn quantile(values: &[Duration], q: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn wal_path(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}-wal", db.display()))
}

/// Row count and a hash of every row: equal fingerprints mean the same data.
pub fn fingerprint(db: &Path) -> anyhow::Result<(i64, u64)> {
    let conn = Connection::open(db)?;
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    ensure!(check == "ok", "{}: integrity_check says {check}", db.display());
    let mut stmt = conn.prepare("SELECT id, body FROM items ORDER BY id")?;
    let mut rows = stmt.query([])?;
    let (mut count, mut hash) = (0i64, 0xcbf29ce484222325u64);
    while let Some(row) = rows.next()? {
        count += 1;
        let (id, body): (i64, String) = (row.get(0)?, row.get(1)?);
        for byte in id.to_le_bytes().iter().chain(body.as_bytes()) {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x100000001b3);
        }
    }
    Ok((count, hash))
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] }).collect()
}

pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !cond() {
        ensure!(Instant::now() < deadline, "timed out after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One HTTP/1.1 request with a JSON body (or none) to a local test server; returns the status.
pub fn http(host: &str, method: &str, path: &str, body: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))
}
