//! `walstream-bench volume`: what replication costs the app's memory volume. For each write
//! rate, the same app runs three times, each on a fresh tmpfs (the Cloud Run memory volume) and
//! with a fresh bucket: with no replicator, under litestream v0.3.13 and under walstream, both
//! with their defaults (`TOOL replicate DB gcs://BUCKET/db`). The app is the original Cloud Run
//! guide's: 3,000 rows of 200 random bytes, then updates, SQLite's defaults (autocheckpoint at
//! 1,000 pages). Sampled every 2 ms: the volume's use (`statvfs`) and the app's WAL size; and the
//! app's commits per second. Run as root (it mounts the tmpfs); `scripts/bench-volume.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rand::{Rng, SeedableRng};
use rusqlite::Connection;

use crate::emulator::Emulator;

struct Options {
    bins: crate::common::Binaries,
    secs: u64,
    /// Transactions per second; 0 is flat out.
    rates: Vec<u32>,
}

/// One app run's figures.
struct Run {
    commits: u64,
    elapsed: Duration,
    errors: u64,
    peak: u64,
    wal_peak: u64,
}

pub fn run(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut o = Options { bins: Default::default(), secs: 10, rates: vec![1, 100, 1000, 0] };
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            binary if o.bins.take(binary, &value) => {}
            "--secs" => o.secs = value.parse()?,
            "--rates" => o.rates = value.split(',').map(str::parse).collect::<Result<_, _>>()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    o.bins.check()?;
    let dir = tempfile::tempdir()?;
    let emulator = Emulator::start(&o.bins.fake_gcs, dir.path())?;
    let tools: [(&str, Option<&Path>); 3] = [
        ("no replicator", None),
        ("litestream v0.3.13", Some(&o.bins.litestream)),
        ("walstream", Some(&o.bins.walstream)),
    ];
    let mut rows = Vec::new();
    for &rate in &o.rates {
        let mut runs = Vec::new();
        for (n, (label, bin)) in tools.iter().enumerate() {
            eprintln!("{label}: {} for {} s", rate_label(rate), o.secs);
            let bucket = format!("vol-{}-{n}", if rate == 0 { "max".to_string() } else { rate.to_string() });
            emulator.create_bucket(&bucket)?;
            runs.push(one_run(&emulator, dir.path(), *bin, &bucket, rate, Duration::from_secs(o.secs))?);
        }
        rows.push((rate, runs));
    }
    println!("| app rate | volume peak, KiB: no replicator / litestream / walstream | walstream − app alone | WAL peak, KiB: alone / litestream / walstream | app tx/s: alone / litestream / walstream | app errors |");
    println!("|---|---|---:|---|---|---|");
    for (rate, runs) in rows {
        let [alone, ls, ws] = &runs[..] else { unreachable!() };
        let tps = |r: &Run| r.commits as f64 / r.elapsed.as_secs_f64();
        println!(
            "| {} | {} / {} / {} | {:+} | {} / {} / {} | {:.0} / {:.0} / {:.0} | {} / {} / {} |",
            rate_label(rate),
            alone.peak >> 10,
            ls.peak >> 10,
            ws.peak >> 10,
            (ws.peak as i64 - alone.peak as i64) >> 10,
            alone.wal_peak >> 10,
            ls.wal_peak >> 10,
            ws.wal_peak >> 10,
            tps(alone),
            tps(ls),
            tps(ws),
            alone.errors,
            ls.errors,
            ws.errors
        );
    }
    Ok(())
}

fn rate_label(rate: u32) -> String {
    if rate == 0 {
        "flat out".into()
    } else {
        format!("{rate} tx/s")
    }
}

/// A tmpfs for one run, unmounted on drop.
struct Volume(tempfile::TempDir);

impl Volume {
    fn mount() -> anyhow::Result<Volume> {
        let dir = tempfile::tempdir()?;
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"]).arg(dir.path()).status()?;
        ensure!(status.success(), "cannot mount a tmpfs at {} (the bench runs as root)", dir.path().display());
        Ok(Volume(dir))
    }

    fn used(&self) -> u64 {
        let path = std::ffi::CString::new(self.0.path().as_os_str().as_encoded_bytes()).expect("no NUL in a temp path");
        // SAFETY: statvfs fills the struct it is given; the path is a valid C string.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            return 0;
        }
        (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

fn one_run(
    emulator: &Emulator,
    dir: &Path,
    bin: Option<&Path>,
    bucket: &str,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<Run> {
    let volume = Volume::mount()?;
    let db = volume.0.path().join("db");
    let conn = Connection::open(&db)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch("CREATE TABLE rows (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")?;
    let mut child = match bin {
        Some(bin) => {
            let log = std::fs::File::create(dir.join(format!("{bucket}.log")))?;
            Some(
                Command::new(bin)
                    .arg("replicate")
                    .arg(&db)
                    .arg(format!("gcs://{bucket}/db"))
                    .env("STORAGE_EMULATOR_HOST", &emulator.host)
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .stdin(Stdio::null())
                    .spawn()?,
            )
        }
        None => None,
    };
    // Start-up (the first snapshot) is not the app's load.
    std::thread::sleep(Duration::from_millis(500));
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    let mut run = Run { commits: 0, elapsed: Duration::ZERO, errors: 0, peak: volume.used(), wal_peak: 0 };
    let (start, mut rows, mut sampled) = (Instant::now(), 0i64, Instant::now());
    while start.elapsed() < duration {
        let body: Vec<u8> = (0..200).map(|_| rng.gen()).collect();
        let result = if rows < 3000 {
            conn.execute("INSERT INTO rows (id, body) VALUES (?1, ?2)", rusqlite::params![rows + 1, body])
        } else {
            conn.execute("UPDATE rows SET body = ?2 WHERE id = ?1", rusqlite::params![rng.gen_range(1..=rows), body])
        };
        match result {
            Ok(_) => {
                run.commits += 1;
                rows += i64::from(rows < 3000);
            }
            Err(_) => run.errors += 1,
        }
        if rate == 0 {
            // Flat out: sample every 2 ms, not every commit, so the sampling does not set the pace.
            if sampled.elapsed() >= Duration::from_millis(2) {
                sample(&volume, &wal, &mut run);
                sampled = Instant::now();
            }
        } else {
            sample(&volume, &wal, &mut run);
            let due = Duration::from_secs(1) / rate * (run.commits + run.errors) as u32;
            // Sleep in 2 ms steps, sampling: a replicator's writes come between the app's.
            while let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_millis(2)));
                sample(&volume, &wal, &mut run);
            }
        }
    }
    run.elapsed = start.elapsed();
    sample(&volume, &wal, &mut run);
    drop(conn);
    if let Some(child) = child.as_mut() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(run)
}

fn sample(volume: &Volume, wal: &Path, run: &mut Run) {
    run.peak = run.peak.max(volume.used());
    run.wal_peak = run.wal_peak.max(std::fs::metadata(wal).map_or(0, |m| m.len()));
}
