//! `walstream-bench history`: restore time as a replica's history grows, for walstream with its
//! default `-snapshot-wal-ratio`, walstream without automatic snapshots, and litestream v0.3.13.
//!
//! Each tool replicates its own copy of a `--db-mib` MiB database to a file:// replica while the
//! app rewrites every row once per round (10,000-row transactions, the app's own
//! checkpoints). After rounds 1, 10 and 100 (`--rounds`) writing pauses, the replica is let
//! catch up (`walstream sync`; for litestream, its replica unchanged for 3 s), and the tool
//! restores it, timed and checked against the source. Run it through
//! `scripts/bench-history.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};
use rusqlite::Connection;

use crate::common::*;

struct Options {
    db_mib: u64,
    rounds: Vec<u32>,
    walstream: PathBuf,
    litestream: PathBuf,
}

pub fn run(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut o = Options { db_mib: 16, rounds: vec![1, 10, 100], walstream: PathBuf::new(), litestream: PathBuf::new() };
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--db-mib" => o.db_mib = value.parse()?,
            "--rounds" => o.rounds = comma_separated(&value, "--rounds: comma-separated round counts")?,
            "--walstream" => o.walstream = value.into(),
            "--litestream" => o.litestream = value.into(),
            _ => bail!("unknown flag {flag}"),
        }
    }
    ensure!(o.walstream.is_file() && o.litestream.is_file(), "--walstream and --litestream must name the binaries");
    ensure!(!o.rounds.is_empty() && o.rounds.windows(2).all(|w| w[0] < w[1]), "--rounds must be ascending");
    let tools = [
        ("walstream", o.walstream.clone(), vec![]),
        (
            "walstream -snapshot-wal-ratio 0",
            o.walstream.clone(),
            vec!["-snapshot-wal-ratio".to_string(), "0".to_string()],
        ),
        ("litestream v0.3.13", o.litestream.clone(), vec![]),
    ];
    let mut results = Vec::new();
    for (label, bin, flags) in &tools {
        results.push((label, history(&o, label, bin, flags)?));
    }
    println!("restore of a {} MiB database after N rounds of rewriting every row; file:// replicas; every restore checked against the source", o.db_mib);
    println!();
    let header: Vec<String> = o
        .rounds
        .iter()
        .map(|r| format!("after {r} round{}: s (snapshots / MB read)", if *r == 1 { "" } else { "s" }))
        .collect();
    println!("| tool | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(o.rounds.len()));
    for (label, points) in &results {
        let cells: Vec<String> = points
            .iter()
            .map(|p| format!("{:.2} ({} / {:.0})", p.wall.as_secs_f64(), p.snapshots, p.chain_bytes as f64 / 1e6))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
    Ok(())
}

/// One restore after some rounds.
struct Point {
    wall: Duration,
    /// Snapshots in the replica's newest generation, and the bytes of that generation's objects
    /// from the newest snapshot on (what a restore of the latest state reads).
    snapshots: usize,
    chain_bytes: u64,
}

fn history(o: &Options, label: &str, bin: &Path, flags: &[String]) -> anyhow::Result<Vec<Point>> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("source.db");
    let replica = dir.path().join("replica");
    let url = format!("file://{}", replica.display());
    let rows = crate::restore::fill(&db, o.db_mib)?;
    let walstream = label.starts_with("walstream");
    let addr = format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    let mut command = Command::new(bin);
    command.arg("replicate").args(flags);
    if walstream {
        command.args(["-addr", &addr]);
    }
    let log = std::fs::File::create(dir.path().join("replicate.log"))?;
    let mut replicator = Replicator(command.arg(&db).arg(&url).stdout(Stdio::null()).stderr(log).spawn()?);
    wait_for(Duration::from_secs(120), || {
        walk(&replica).iter().any(|p| p.to_string_lossy().ends_with(".snapshot.lz4"))
    })?;

    let conn = Connection::open(&db)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "synchronous", "normal")?;
    let mut points = Vec::new();
    let mut done = 0;
    for &target in &o.rounds {
        while done < target {
            for first in (1..=rows).step_by(10_000) {
                conn.execute(
                    "UPDATE items SET body = hex(randomblob(100)) WHERE id BETWEEN ?1 AND ?2",
                    [first, first + 9_999],
                )?;
            }
            done += 1;
        }
        eprintln!("{label}: {done} rounds written; waiting for the replica");
        if walstream {
            let status = Command::new(bin)
                .args(["sync", "-addr", &addr, "-timeout", "600s"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            ensure!(status.success(), "walstream sync failed");
        } else {
            wait_until_unchanged(&replica, Duration::from_secs(3))?;
        }
        let expected = fingerprint(&db)?;
        let out = dir.path().join(format!("restored-{done}.db"));
        // litestream may still be shipping when its replica has paused: restore again until equal.
        let mut attempt = 0;
        let m = loop {
            attempt += 1;
            let m = measure(Command::new(bin).args(["restore", "-o"]).arg(&out).arg(&url).stderr(Stdio::null()))?;
            if fingerprint(&out)? == expected {
                break m;
            }
            ensure!(
                attempt < 10,
                "{label}'s restore after {done} rounds still differs from the source after {attempt} tries"
            );
            eprintln!("{label}: restore {attempt} after {done} rounds is not yet equal to the source; waiting");
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", out.display()));
            }
            std::thread::sleep(Duration::from_secs(3));
        };
        let (snapshots, chain_bytes) = newest_chain(&replica);
        eprintln!(
            "{label}: restore after {done} rounds took {:.2}s ({snapshots} snapshots, {:.0} MB to read)",
            m.wall.as_secs_f64(),
            chain_bytes as f64 / 1e6
        );
        points.push(Point { wall: m.wall, snapshots, chain_bytes });
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", out.display()));
        }
    }
    replicator.stop();
    Ok(points)
}

/// A replicator stopped with SIGTERM, or killed if the bench fails first.
struct Replicator(Child);

impl Replicator {
    fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until no file under `dir` has changed for `quiet`.
fn wait_until_unchanged(dir: &Path, quiet: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let newest = walk(dir)
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok()?.modified().ok())
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if newest.elapsed().unwrap_or_default() >= quiet {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{}: still changing after 600 s", dir.display());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// In the newest generation (by its newest object): how many snapshots, and the bytes of the
/// newest snapshot and every segment at or above its index.
fn newest_chain(replica: &Path) -> (usize, u64) {
    let generations = walk(&replica.join("generations"));
    let mut by_generation: std::collections::BTreeMap<String, Vec<PathBuf>> = Default::default();
    for path in generations {
        let Some(generation) = path
            .strip_prefix(replica.join("generations"))
            .ok()
            .and_then(|p| p.components().next())
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
        else {
            continue;
        };
        by_generation.entry(generation).or_default().push(path);
    }
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
    let Some(files) = by_generation.into_values().max_by_key(|files| files.iter().map(modified).max()) else {
        return (0, 0);
    };
    let index = |p: &PathBuf| {
        p.file_name().and_then(|n| n.to_str()).and_then(|n| u32::from_str_radix(n.split(['.', '_']).next()?, 16).ok())
    };
    let snapshots: Vec<&PathBuf> = files.iter().filter(|p| p.to_string_lossy().ends_with(".snapshot.lz4")).collect();
    let Some(newest) = snapshots.iter().filter_map(|p| index(p)).max() else { return (0, 0) };
    let size = |p: &PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
    let snapshot_bytes: u64 = snapshots.iter().filter(|p| index(p) == Some(newest)).map(|p| size(p)).sum();
    let wal_bytes: u64 = files
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".wal.lz4") && index(p).is_some_and(|i| i >= newest))
        .map(size)
        .sum();
    (snapshots.len(), snapshot_bytes + wal_bytes)
}
