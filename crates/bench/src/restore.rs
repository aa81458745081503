//! `walstream-bench restore`: how long walstream and litestream v0.3.13 take to restore the same
//! replica, in one run on one machine.
//!
//! It builds a database of `--db-mib` MiB, lets `walstream replicate` snapshot it, commits
//! `--transactions` one-row UPDATE transactions (random rows, so most pages change) while it
//! replicates, stops it, then restores the replica `--runs` times with each tool in turn,
//! timing wall clock and reading peak RSS and CPU from `wait4`. Every restore is checked against
//! the source (same rows, `integrity_check` ok) before its time counts.
//!
//! Run it through `scripts/bench-restore.sh`, which installs litestream and builds release
//! binaries first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rand::{Rng, SeedableRng};
use rusqlite::Connection;

use crate::common::*;

struct Options {
    db_mib: u64,
    transactions: u64,
    runs: usize,
    walstream: PathBuf,
    litestream: PathBuf,
}

pub fn run(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut options =
        Options { db_mib: 75, transactions: 350_000, runs: 3, walstream: PathBuf::new(), litestream: PathBuf::new() };
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--db-mib" => options.db_mib = value.parse()?,
            "--transactions" => options.transactions = value.parse()?,
            "--runs" => options.runs = value.parse()?,
            "--walstream" => options.walstream = value.into(),
            "--litestream" => options.litestream = value.into(),
            _ => bail!("unknown flag {flag}"),
        }
    }
    ensure!(
        options.walstream.is_file() && options.litestream.is_file(),
        "--walstream and --litestream must name the binaries"
    );
    restore_bench(&options)
}

fn restore_bench(options: &Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("source.db");
    let replica = dir.path().join("replica");
    let url = format!("file://{}", replica.display());

    eprintln!("building a {} MiB database", options.db_mib);
    let rows = fill(&db, options.db_mib)?;
    let replicate_log = std::fs::File::create(dir.path().join("replicate.log"))?;
    let mut replicator = Command::new(&options.walstream)
        // No snapshot of its own in the middle of the history: the replica stays WAL-heavy,
        // the shape this bench is for, whenever the 256 MiB threshold happens to be crossed.
        .args(["replicate", "-shutdown-timeout", "600s", "-snapshot-wal-ratio", "0"])
        .arg(&db)
        .arg(&url)
        .stderr(replicate_log)
        .spawn()?;
    wait_for(Duration::from_secs(120), || has_file_ending(&replica, ".snapshot.lz4"))?;

    eprintln!("committing {} transactions while walstream replicates", options.transactions);
    let started = Instant::now();
    update_rows(&db, rows, options.transactions)?;
    let write_time = started.elapsed();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(replicator.id() as i32, libc::SIGTERM) };
    let status = replicator.wait()?;
    ensure!(status.success(), "walstream replicate exited {status}; see its log");
    let (segments, wal_bytes, indexes) = replica_wal_stats(&replica)?;
    let expected = fingerprint(&db)?;

    let mut results: Vec<(&str, Vec<Measured>)> = vec![("walstream", Vec::new()), ("litestream v0.3.13", Vec::new())];
    let restored_objects = objects_a_restore_reads(&replica)?;
    let mut download_only = Vec::new();
    for run in 0..options.runs {
        download_only.push(read_all(&restored_objects)?.as_secs_f64());
        for (n, (tool, measured)) in results.iter_mut().enumerate() {
            let out = dir.path().join(format!("restored-{n}-{run}.db"));
            let binary = if n == 0 { &options.walstream } else { &options.litestream };
            let m = measure(
                Command::new(binary).args(["restore", "-o"]).arg(&out).arg(&url).stderr(std::process::Stdio::null()),
            )?;
            ensure!(fingerprint(&out)? == expected, "{tool}'s restore differs from the source");
            eprintln!("{tool} run {}: {:.2}s", run + 1, m.wall.as_secs_f64());
            measured.push(m);
            for suffix in ["", "-wal", "-shm", ".tmp-wal", ".tmp-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", out.display()));
            }
        }
    }

    let db_bytes = std::fs::metadata(&db)?.len();
    println!(
        "restore of a {:.1} MB database ({rows} rows) with {} one-row UPDATE transactions since its snapshot",
        db_bytes as f64 / 1e6,
        options.transactions
    );
    println!(
        "replica: file://, {indexes} WAL indexes, {segments} segments, {:.1} MB of compressed WAL (written in {:.1}s)",
        wal_bytes as f64 / 1e6,
        write_time.as_secs_f64()
    );
    println!("median of {} runs each, alternating; every restore checked against the source", options.runs);
    println!();
    // The limit a restore works against: the time to only read the objects it reads, here
    // from the page cache (file://), so it is the best any tool could do on this machine.
    let stored: u64 = restored_objects.iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
    let mb_per_s = |seconds: f64| stored as f64 / 1e6 / seconds;
    println!("| tool | wall (s) | stored MB/s | CPU (s) | peak RSS (MiB) |");
    println!("|---|---:|---:|---:|---:|");
    let read_only = median(download_only);
    println!(
        "| only reading the {} objects a restore reads ({:.1} MB) | {read_only:.2} | {:.0} | | |",
        restored_objects.len(),
        stored as f64 / 1e6,
        mb_per_s(read_only)
    );
    let mut walls = Vec::new();
    for (tool, measured) in &mut results {
        let wall = median(measured.iter().map(|m| m.wall.as_secs_f64()).collect());
        let cpu = median(measured.iter().map(|m| m.cpu.as_secs_f64()).collect());
        let rss = median(measured.iter().map(|m| m.max_rss_kib as f64 / 1024.0).collect());
        println!("| {tool} | {wall:.2} | {:.0} | {cpu:.2} | {rss:.1} |", mb_per_s(wall));
        walls.push(wall);
    }
    println!();
    println!(
        "walstream's wall time is {:.1}% of litestream's ({:.1}x faster)",
        100.0 * walls[0] / walls[1],
        walls[1] / walls[0]
    );
    Ok(())
}

/// Fills `db` with ~200-byte rows until it is `mib` MiB; returns the row count.
pub(crate) fn fill(db: &Path, mib: u64) -> anyhow::Result<i64> {
    let conn = Connection::open(db)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.execute_batch("CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")?;
    let mut rows = 0i64;
    while std::fs::metadata(db)?.len() + std::fs::metadata(wal_path(db)).map_or(0, |m| m.len()) < mib << 20 {
        let tx = conn.unchecked_transaction()?;
        for _ in 0..10_000 {
            rows += 1;
            tx.execute("INSERT INTO items (id, body) VALUES (?1, hex(randomblob(100)))", [rows])?;
        }
        tx.commit()?;
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    Ok(rows)
}

/// `transactions` transactions, each rewriting one random row's body, as an app would.
fn update_rows(db: &Path, rows: i64, transactions: u64) -> anyhow::Result<()> {
    let conn = Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "synchronous", "normal")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut update = conn.prepare("UPDATE items SET body = hex(randomblob(100)) WHERE id = ?1")?;
    for _ in 0..transactions {
        update.execute([rng.gen_range(1..=rows)])?;
    }
    Ok(())
}

/// The newest generation's last snapshot and the WAL segments from its index on: what a
/// restore of the latest state downloads.
fn objects_a_restore_reads(replica: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let generations = replica.join("generations");
    let newest = std::fs::read_dir(&generations)?
        .filter_map(Result::ok)
        .max_by_key(|entry| entry.metadata().and_then(|m| m.modified()).ok())
        .with_context(|| format!("no generation under {}", generations.display()))?
        .path();
    let snapshot = walk(&newest.join("snapshots"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".snapshot.lz4"))
        .max_by_key(|p| index_of(p))
        .context("no snapshot in the newest generation")?;
    let from = index_of(&snapshot);
    let mut objects: Vec<PathBuf> = walk(&newest.join("wal")).into_iter().filter(|p| index_of(p) >= from).collect();
    objects.sort();
    objects.insert(0, snapshot);
    Ok(objects)
}

/// How long reading every file of `paths` through one 1 MiB buffer takes.
fn read_all(paths: &[PathBuf]) -> anyhow::Result<Duration> {
    use std::io::Read;
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    for path in paths {
        let mut file = std::fs::File::open(path)?;
        while file.read(&mut buf)? > 0 {}
    }
    Ok(started.elapsed())
}

/// The index a snapshot or WAL segment belongs to: its name's first 8 hex digits, which sort
/// as the indexes do.
fn index_of(path: &Path) -> Option<String> {
    path.file_name()?.to_str()?.get(..8).map(str::to_string)
}

fn has_file_ending(dir: &Path, suffix: &str) -> bool {
    walk(dir).iter().any(|p| p.to_string_lossy().ends_with(suffix))
}

/// (segments, their bytes, distinct indexes) of the replica's WAL.
fn replica_wal_stats(replica: &Path) -> anyhow::Result<(usize, u64, usize)> {
    let segments: Vec<PathBuf> =
        walk(replica).into_iter().filter(|p| p.to_string_lossy().ends_with(".wal.lz4")).collect();
    let bytes = segments.iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum();
    let mut indexes: Vec<String> = segments.iter().filter_map(|p| index_of(p)).collect();
    indexes.sort();
    indexes.dedup();
    Ok((segments.len(), bytes, indexes.len()))
}
