//! `walstream-bench many`: one replicator process carrying many databases (issue 24), each
//! replicated to its own `file://` replica, at each count of `--dbs`.
//!
//! For each count and tool: creates the databases, starts `replicate -config` with an entry per
//! database, waits until every replica has its first snapshot and then `--settle-secs`, then
//! measures the idle process (descriptors, threads, RSS, CPU over `--idle-secs`), commits once to every database spread
//! over `--commit-secs`, and measures the lag of a sample of those commits (from the commit to a
//! new WAL segment in that database's replica), the CPU and peak RSS of the phase, and how many
//! databases' commits reached their replicas. litestream runs up to `--litestream-max`
//! databases. A replicator that cannot carry a count (it exits, say, out of descriptors under
//! the machine's hard limit) gets a row saying so, with its last log line.
//!
//! Run it through `scripts/bench-many.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use crate::common::*;
use crate::replicator::{create_db, INSERT_ROW};

struct Options {
    dbs: Vec<usize>,
    /// From every replica's first snapshot to the idle window: longer than walstream's default
    /// `idle-release` with many databases (10 s), so the window sees them at rest.
    settle_secs: u64,
    idle_secs: u64,
    commit_secs: u64,
    lag_samples: usize,
    litestream_max: usize,
    walstream: PathBuf,
    litestream: PathBuf,
}

pub fn run(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut o = Options {
        dbs: vec![1, 1000, 10_000],
        settle_secs: 12,
        idle_secs: 10,
        commit_secs: 20,
        lag_samples: 200,
        litestream_max: 1000,
        walstream: PathBuf::new(),
        litestream: PathBuf::new(),
    };
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--dbs" => o.dbs = comma_separated(&value, "--dbs: database counts such as 1,1000,10000")?,
            "--settle-secs" => o.settle_secs = value.parse()?,
            "--idle-secs" => o.idle_secs = value.parse()?,
            "--commit-secs" => o.commit_secs = value.parse()?,
            "--lag-samples" => o.lag_samples = value.parse()?,
            "--litestream-max" => o.litestream_max = value.parse()?,
            "--walstream" => o.walstream = value.into(),
            "--litestream" => o.litestream = value.into(),
            _ => bail!("unknown flag {flag}"),
        }
    }
    ensure!(o.walstream.is_file() && o.litestream.is_file(), "--walstream and --litestream must name the binaries");
    // Each row as soon as it is measured: a long run stopped early still has its rows.
    println!("one replicator process, {} databases each with a file:// replica; {} s after every first snapshot, idle over {} s, then one commit per database spread over {} s", o.dbs.iter().map(usize::to_string).collect::<Vec<_>>().join(" / "), o.settle_secs, o.idle_secs, o.commit_secs);
    println!();
    println!("| tool | databases | descriptors / db (idle) | threads | RSS idle (MiB) | KiB / db | idle CPU (%) | commit phase CPU (s) | peak RSS (MiB) | lag p50 / p99 (ms) | commits shipped |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &count in &o.dbs {
        for (tool, bin) in [("walstream", &o.walstream), ("litestream v0.3.13", &o.litestream)] {
            if tool.starts_with("litestream") && count > o.litestream_max {
                eprintln!("{tool}: not run at {count} databases (--litestream-max {})", o.litestream_max);
                continue;
            }
            eprintln!("{tool}: {count} databases");
            match measure_fleet(&o, bin, count) {
                Ok(r) => println!(
                    "| {tool} | {count} | {:.2} | {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0} / {:.0} | {} of {count} |",
                    r.fds as f64 / count as f64,
                    r.threads,
                    r.rss_kib as f64 / 1024.0,
                    r.rss_kib as f64 / count as f64,
                    r.idle_cpu_percent,
                    r.commit_cpu.as_secs_f64(),
                    r.peak_rss_kib as f64 / 1024.0,
                    millis(quantile(&r.lags, 0.5)),
                    millis(quantile(&r.lags, 0.99)),
                    r.shipped,
                ),
                Err(e) if e.is::<Failed>() => {
                    println!("| {tool} | {count} | could not run: {} |||||||||", e.root_cause().to_string().replace('|', "/"))
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The replicator could not carry the databases (a result, not a failure of the bench).
#[derive(Debug)]
struct Failed;

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the replicator could not carry the databases")
    }
}

impl std::error::Error for Failed {}

struct Fleet {
    fds: usize,
    threads: usize,
    rss_kib: u64,
    idle_cpu_percent: f64,
    commit_cpu: Duration,
    peak_rss_kib: u64,
    lags: Vec<Duration>,
    shipped: usize,
}

fn measure_fleet(o: &Options, bin: &Path, count: usize) -> anyhow::Result<Fleet> {
    let dir = tempfile::tempdir()?;
    let dbs: Vec<PathBuf> = (0..count).map(|n| dir.path().join(format!("db-{n}.db"))).collect();
    let replicas: Vec<PathBuf> = (0..count).map(|n| dir.path().join("replica").join(format!("db-{n}"))).collect();
    let mut config = String::from("dbs:\n");
    for (db, replica) in dbs.iter().zip(&replicas) {
        create_db(db)?;
        config.push_str(&format!(
            "  - path: {}\n    replicas:\n      - url: file://{}\n",
            db.display(),
            replica.display()
        ));
    }
    let config_path = dir.path().join("replicate.yml");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(dir.path().join("replicate.log"))?;
    let mut command = Command::new(bin);
    command.args(["replicate", "-config"]).arg(&config_path).stdout(log.try_clone()?).stderr(log);
    let mut child = Stopped(command.spawn()?);
    let pid = child.0.id();

    let started = Instant::now();
    let mut exited = None;
    wait_for(Duration::from_secs(900), || {
        exited = child.0.try_wait().ok().flatten();
        exited.is_some()
            || walk(&dir.path().join("replica"))
                .iter()
                .filter(|p| p.to_string_lossy().ends_with(".snapshot.lz4"))
                .count()
                >= count
    })
    .with_context(|| format!("every database's first snapshot; see {}", dir.path().join("replicate.log").display()))?;
    if let Some(status) = exited {
        let log = std::fs::read_to_string(dir.path().join("replicate.log")).unwrap_or_default();
        let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
        return Err(anyhow::anyhow!("exited {status} before every replica had its snapshot: {last}").context(Failed));
    }
    eprintln!("  every replica has its snapshot after {:.1} s", started.elapsed().as_secs_f64());
    let before_bytes: Vec<u64> = replicas.iter().map(|r| replica_bytes(r)).collect();

    std::thread::sleep(Duration::from_secs(o.settle_secs));
    let idle_from = crate::proc_stats::read(pid)?;
    std::thread::sleep(Duration::from_secs(o.idle_secs));
    let idle_to = crate::proc_stats::read(pid)?;
    let (fds, threads, rss_kib) = process_counts(pid)?;
    let idle_cpu_percent = 100.0 * (idle_to.cpu - idle_from.cpu).as_secs_f64() / o.idle_secs as f64;

    // One commit per database, spread evenly; every (count / samples)-th one's lag is timed by
    // a watcher polling its replica's WAL every millisecond.
    let every = (count / o.lag_samples.max(1)).max(1);
    let pending: Arc<Mutex<Vec<(PathBuf, u64, Instant)>>> = Arc::default();
    let lags: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (pending, lags, done) = (pending.clone(), lags.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let now = Instant::now();
                pending.lock().unwrap().retain(|(replica, before, at)| {
                    let shipped = replica_bytes(replica) > *before;
                    if shipped {
                        lags.lock().unwrap().push(now - *at);
                    }
                    !shipped
                });
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let commit_from = crate::proc_stats::read(pid)?;
    let gap = Duration::from_secs(o.commit_secs).div_f64(count as f64);
    let start = Instant::now();
    for (n, db) in dbs.iter().enumerate() {
        std::thread::sleep((start + gap.mul_f64(n as f64)).saturating_duration_since(Instant::now()));
        let conn = rusqlite::Connection::open(db)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute(INSERT_ROW, [])?;
        if n % every == 0 {
            pending.lock().unwrap().push((replicas[n].clone(), before_bytes[n], Instant::now()));
        }
    }
    let wrote = start.elapsed();
    // Every database's commit must reach its replica.
    let drained = wait_for(Duration::from_secs(120), || {
        replicas.iter().zip(&before_bytes).all(|(r, before)| replica_bytes(r) > *before)
    });
    let shipped = replicas.iter().zip(&before_bytes).filter(|(r, before)| replica_bytes(r) > **before).count();
    let commit_to = crate::proc_stats::read(pid)?;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().expect("lag watcher");
    eprintln!("  commits written in {:.1} s", wrote.as_secs_f64());
    let lags = std::mem::take(&mut *lags.lock().unwrap());
    ensure!(!lags.is_empty(), "no sampled commit reached its replica");
    child.stop()?;
    if drained.is_err() {
        // Named, and the directory kept with the replicator's log: a commit that never ships
        // is a fault to find, and whether the shutdown flush shipped it tells how bad it is.
        let late: Vec<String> = dbs
            .iter()
            .zip(replicas.iter().zip(&before_bytes))
            .filter(|(_, (r, before))| replica_bytes(r) <= **before)
            .map(|(db, _)| db.display().to_string())
            .collect();
        eprintln!(
            "  only {shipped} of {count} databases' commits reached their replicas within 120 s; after SIGTERM {} still had not: {late:?}; kept {}",
            late.len(),
            dir.keep().display()
        );
    }
    Ok(Fleet {
        fds,
        threads,
        rss_kib,
        idle_cpu_percent,
        commit_cpu: commit_to.cpu - commit_from.cpu,
        peak_rss_kib: commit_to.peak_rss_kib,
        lags,
        shipped,
    })
}

/// Bytes of WAL segments and snapshots under a replica (both tools' layout: `generations/`): a
/// commit reaches the replica as WAL, or in the snapshot of a generation started after it.
fn replica_bytes(replica: &Path) -> u64 {
    walk(&replica.join("generations")).iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum()
}

/// Open descriptors, threads and resident KiB of a process now.
fn process_counts(pid: u32) -> anyhow::Result<(usize, usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((fds, field("Threads:")? as usize, field("VmRSS:")?))
}

/// A replicator stopped with SIGTERM when the bench is done with it, killed if it errs out.
struct Stopped(Child);

impl Stopped {
    fn stop(&mut self) -> anyhow::Result<()> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.0.try_wait()?.is_none() {
            ensure!(Instant::now() < deadline, "the replicator did not stop within 120 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
