//! `walstream-bench replicate`: walstream and litestream v0.3.13 replicating the same workloads
//! to the same fake-gcs-server, one tool after the other, each phase with a fresh database,
//! bucket and replicator process:
//!
//! - idle: the replicator after start-up, with nothing committed for `--idle-secs`; then single
//!   commits 1.2–1.7 s apart, each timed from its commit's start to the bucket's last upload
//!   before the next commit (the emulator logs a request once it has answered it, to the
//!   millisecond);
//! - saturated: one connection committing `--transactions` 200-byte rows flat out (the same
//!   load for both, and first with no replicator at all); the app's transaction rate, the
//!   replicator's CPU over the load and its drain, its peak RSS, and the drain: from the
//!   writer's stop to the last upload before a restore with the tool itself, made while the
//!   replicator still runs, equals the source;
//! - trickle: one commit a second for `--trickle-secs`: uploads, lease renewals and listings
//!   (walstream also with `-no-lease`, `-sync-interval 100ms` and `-sync-interval 10s`);
//! - many: `--dbs` databases in one process, each committing every 2 s, for `--many-secs`.
//!
//! Requests are counted from the emulator's request log (`emulator`), CPU and memory from
//! /proc. Run it through `scripts/bench-replicate.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};
use rand::{Rng, SeedableRng};

use crate::common::{fingerprint, median, millis, quantile};
use crate::emulator::{Emulator, Op, Request};
use crate::proc_stats;
use crate::replicator::{app_connection, create_db, Harness, Phase, Server, Tool, INSERT_ROW};

struct Options {
    bins: crate::common::Binaries,
    chart: Option<PathBuf>,
    idle_secs: u64,
    lag_samples: usize,
    transactions: u64,
    /// Saturated runs per tool (and with no replicator), alternating which tool goes first: one
    /// run of either tool's CPU moved by a third from one bench to the next.
    saturated_runs: usize,
    trickle_secs: u64,
    dbs: usize,
    many_secs: u64,
}

pub fn run(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut o = Options {
        bins: Default::default(),
        chart: None,
        idle_secs: 60,
        lag_samples: 20,
        transactions: 300_000,
        saturated_runs: 3,
        trickle_secs: 30,
        dbs: 100,
        many_secs: 30,
    };
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            binary if o.bins.take(binary, &value) => {}
            "--chart" => o.chart = Some(value.into()),
            "--idle-secs" => o.idle_secs = value.parse()?,
            "--lag-samples" => o.lag_samples = value.parse()?,
            "--transactions" => o.transactions = value.parse()?,
            "--saturated-runs" => o.saturated_runs = value.parse()?,
            "--trickle-secs" => o.trickle_secs = value.parse()?,
            "--dbs" => o.dbs = value.parse()?,
            "--many-secs" => o.many_secs = value.parse()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    o.bins.check()?;
    ensure!(
        o.lag_samples >= 2 && o.dbs >= 1 && o.saturated_runs >= 1,
        "--lag-samples must be at least 2, --dbs and --saturated-runs at least 1"
    );

    let temp = tempfile::tempdir()?;
    let dir = temp.path().to_path_buf();
    // WALSTREAM_BENCH_KEEP=1 keeps the databases and the replicators' logs, to look into a run.
    let _removed_at_exit = match std::env::var_os("WALSTREAM_BENCH_KEEP") {
        Some(_) => {
            eprintln!("keeping {}", temp.keep().display());
            None
        }
        None => Some(temp),
    };
    let emulator = Emulator::start(&o.bins.fake_gcs, &dir)?;
    let walstream = Tool {
        label: "walstream",
        bin: o.bins.walstream.clone(),
        prefix: "ws",
        flags: vec![],
        hold: Duration::from_secs(1),
    };
    let paced = Tool {
        label: "walstream -sync-interval 100ms",
        bin: o.bins.walstream.clone(),
        prefix: "ws100ms",
        flags: vec!["-sync-interval".into(), "100ms".into()],
        hold: Duration::from_millis(100),
    };
    let coalescing = Tool {
        label: "walstream -sync-interval 10s",
        bin: o.bins.walstream.clone(),
        prefix: "ws10",
        flags: vec!["-sync-interval".into(), "10s".into()],
        hold: Duration::from_secs(10),
    };
    let unleased = Tool {
        label: "walstream -no-lease",
        bin: o.bins.walstream.clone(),
        prefix: "wsnl",
        flags: vec!["-no-lease".into()],
        hold: Duration::from_secs(1),
    };
    let litestream = Tool {
        label: "litestream v0.3.13",
        bin: o.bins.litestream.clone(),
        prefix: "ls",
        flags: vec![],
        hold: Duration::ZERO,
    };
    let harness = Harness { dir: dir.clone(), server: Server::Gcs(emulator) };
    let bench = Bench { o: &o, h: &harness };

    let (mut unreplicated, mut saturated) = (Vec::new(), [Vec::new(), Vec::new()]);
    for run in 0..o.saturated_runs {
        eprintln!("no replicator: {} transactions (run {} of {})", o.transactions, run + 1, o.saturated_runs);
        unreplicated.push(bench.unreplicated()?);
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let tool = [&walstream, &litestream][i];
            eprintln!(
                "{}: {} transactions flat out (run {} of {})",
                tool.label,
                o.transactions,
                run + 1,
                o.saturated_runs
            );
            saturated[i].push(bench.saturated(tool, run)?);
        }
    }
    let mut results = Vec::new();
    for (tool, saturated) in [&walstream, &litestream].into_iter().zip(saturated) {
        eprintln!("{}: idle for {} s, then {} single commits", tool.label, o.idle_secs, o.lag_samples);
        let idle = bench.idle(tool)?;
        eprintln!("{}: 1 commit/s for {} s", tool.label, o.trickle_secs);
        let trickle = bench.trickle(tool)?;
        eprintln!("{}: {} databases for {} s", tool.label, o.dbs, o.many_secs);
        let many = bench.many(tool)?;
        results.push(ToolResults { label: tool.label, idle, saturated, trickle, many });
    }
    let mut windowed = Vec::new();
    for tool in [&unleased, &paced, &coalescing] {
        eprintln!("{}: 1 commit/s for {} s", tool.label, o.trickle_secs);
        windowed.push((tool.label, bench.trickle(tool)?));
    }

    report(&o, &unreplicated, &results[0], &results[1], &windowed);
    if let Some(path) = &o.chart {
        std::fs::write(path, crate::chart::svg(&results[0].chart_values(), &results[1].chart_values()))?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(())
}

struct ToolResults {
    label: &'static str,
    idle: Idle,
    /// One per saturated run, in run order.
    saturated: Vec<Saturated>,
    trickle: Trickle,
    many: Many,
}

struct Idle {
    /// Requests of any kind while idle.
    requests: usize,
    lags: Vec<Duration>,
}

struct Saturated {
    tx_per_sec: f64,
    cpu: Duration,
    peak_rss_kib: u64,
    /// Writer stopped → the last upload before a restore equal to the source.
    drain: Duration,
    /// Restores made until one equalled the source.
    restores_needed: usize,
    uploads: usize,
    lists: usize,
    restore: Duration,
}

struct Trickle {
    commits: usize,
    /// Segment and snapshot uploads.
    uploads: usize,
    /// Lease renewals (walstream only; off with `-no-lease`).
    lease_uploads: usize,
    lists: usize,
}

impl Trickle {
    fn puts(&self) -> usize {
        self.uploads + self.lease_uploads
    }

    fn uploads_cell(&self) -> String {
        match self.lease_uploads {
            0 => self.uploads.to_string(),
            n => format!("{} + {n} lease", self.uploads),
        }
    }
}

struct Many {
    cpu: Duration,
    peak_rss_kib: u64,
}

struct Bench<'a> {
    o: &'a Options,
    h: &'a Harness,
}

impl Bench<'_> {
    fn idle(&self, tool: &Tool) -> anyhow::Result<Idle> {
        let phase = self.h.start(tool, "idle")?;
        let quiet_from = SystemTime::now();
        std::thread::sleep(Duration::from_secs(self.o.idle_secs));
        let requests = phase.requests_since(quiet_from)?.len();

        let conn = app_connection(&phase.db)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut commits = Vec::new();
        for _ in 0..self.o.lag_samples {
            // Timed from the commit's start: the log's timestamps are cut to the millisecond, so
            // an upload within the commit's own millisecond can log before the commit returns.
            commits.push(SystemTime::now());
            conn.execute(INSERT_ROW, [])?;
            std::thread::sleep(Duration::from_millis(rng.gen_range(1200..1700)));
        }
        let uploads: Vec<SystemTime> =
            phase.requests_since(commits[0])?.into_iter().filter(|r| r.op == Op::Upload).map(|r| r.at).collect();
        let mut lags = Vec::new();
        for (n, committed) in commits.iter().enumerate() {
            let next = commits.get(n + 1).copied().unwrap_or(SystemTime::now());
            let slack = Duration::from_millis(1);
            let last = uploads
                .iter()
                .filter(|at| **at + slack > *committed && **at + slack <= next)
                .max()
                .with_context(|| format!("{}: commit {n} was not uploaded before the next commit", tool.label))?;
            lags.push(last.duration_since(*committed).unwrap_or_default());
        }
        phase.stop();
        Ok(Idle { requests, lags })
    }

    /// The app's rate with nothing replicating its database.
    fn unreplicated(&self) -> anyhow::Result<f64> {
        let db = self.h.dir.join("unreplicated.db");
        create_db(&db)?;
        let elapsed = commit_flat_out(&db, self.o.transactions)?;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        Ok(self.o.transactions as f64 / elapsed.as_secs_f64())
    }

    fn saturated(&self, tool: &Tool, run: usize) -> anyhow::Result<Saturated> {
        let phase = self.h.start(tool, &format!("saturated{run}"))?;
        let pid = phase.child.id();
        let before = proc_stats::read(pid)?;
        let began = SystemTime::now();
        let elapsed = commit_flat_out(&phase.db, self.o.transactions)?;
        let stopped = SystemTime::now();
        let expected = fingerprint(&phase.db)?;
        // Drained when a restore made after the uploads pause equals the source; until then the
        // replicator may be between uploads (litestream compresses a whole second of WAL first).
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut attempt = 0;
        let mut first_restore_at = None;
        let (last_upload, restore) = loop {
            let last_upload = phase.wait_for_quiet(stopped, Duration::from_secs(3), Duration::from_secs(600))?;
            attempt += 1;
            let restored = self.h.dir.join(format!("{}-restored-{attempt}.db", phase.bucket));
            let restore_started = Instant::now();
            first_restore_at.get_or_insert_with(SystemTime::now);
            let output = self
                .h
                .server
                .configure(Command::new(&tool.bin).args(["restore", "-o"]).arg(&restored))
                .arg(self.h.server.url(&phase.bucket, "db"))
                .stderr(Stdio::piped())
                .output()?;
            let restore = restore_started.elapsed();
            ensure!(
                output.status.success(),
                "{} restore failed: {}",
                tool.label,
                String::from_utf8_lossy(&output.stderr)
            );
            let equal = fingerprint(&restored)? == expected;
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", restored.display()));
            }
            if equal {
                break (last_upload, restore);
            }
            ensure!(
                Instant::now() < deadline,
                "{}: no restore equal to the source within 600 s of the writer stopping",
                tool.label
            );
            eprintln!(
                "{}: restore {attempt} after the writer stopped is not yet equal to the source; waiting",
                tool.label
            );
            std::thread::sleep(Duration::from_secs(1));
        };
        let after = proc_stats::read(pid)?;
        // Only the replicator uploads; the restores list the same bucket, so LISTs are counted
        // until the first restore (litestream may still be uploading after it).
        let first_restore_at = first_restore_at.expect("the loop restores at least once");
        let requests: Vec<Request> = phase.requests_since(began)?;
        phase.stop();
        Ok(Saturated {
            tx_per_sec: self.o.transactions as f64 / elapsed.as_secs_f64(),
            cpu: after.cpu - before.cpu,
            peak_rss_kib: after.peak_rss_kib,
            drain: last_upload.duration_since(stopped).unwrap_or_default(),
            restores_needed: attempt,
            uploads: requests.iter().filter(|r| matches!(r.op, Op::Upload | Op::ConditionalUpload)).count(),
            lists: requests.iter().filter(|r| r.op == Op::List && r.at < first_restore_at).count(),
            restore,
        })
    }

    fn trickle(&self, tool: &Tool) -> anyhow::Result<Trickle> {
        let phase = self.h.start(tool, "trickle")?;
        let conn = app_connection(&phase.db)?;
        let began = SystemTime::now();
        let start = Instant::now();
        let commits = self.o.trickle_secs as usize;
        for n in 0..commits {
            std::thread::sleep((start + Duration::from_secs(n as u64)).saturating_duration_since(Instant::now()));
            conn.execute(INSERT_ROW, [])?;
        }
        std::thread::sleep(tool.hold);
        phase.wait_for_quiet(SystemTime::now(), Duration::from_secs(3), Duration::from_secs(60))?;
        let requests = phase.requests_since(began)?;
        phase.stop();
        let count = |op: Op| requests.iter().filter(|r| r.op == op).count();
        Ok(Trickle {
            commits,
            uploads: count(Op::Upload),
            lease_uploads: count(Op::ConditionalUpload),
            lists: count(Op::List),
        })
    }

    fn many(&self, tool: &Tool) -> anyhow::Result<Many> {
        let bucket = format!("{}-many", tool.prefix);
        self.h.server.create_bucket(&bucket)?;
        let dbs: Vec<PathBuf> = (0..self.o.dbs).map(|n| self.h.dir.join(format!("{bucket}-{n}.db"))).collect();
        let mut config = String::from("dbs:\n");
        for (n, db) in dbs.iter().enumerate() {
            create_db(db)?;
            let url = self.h.server.url(&bucket, &format!("db-{n}"));
            config.push_str(&format!("  - path: {}\n    replicas:\n      - url: {url}\n", db.display()));
        }
        let config_path = self.h.dir.join(format!("{bucket}.yml"));
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(self.h.dir.join(format!("{bucket}.log")))?;
        let child = self
            .h
            .server
            .configure(Command::new(&tool.bin).args(["replicate", "-config"]).arg(&config_path))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let phase = Phase { harness: self.h, bucket, db: dbs[0].clone(), child };
        phase.settle(self.o.dbs)?;
        let pid = phase.child.id();
        let before = proc_stats::read(pid)?;
        let conns = dbs.iter().map(|db| app_connection(db)).collect::<anyhow::Result<Vec<_>>>()?;
        // Each database commits once every 2 s, spread evenly.
        let gap = Duration::from_secs(2) / self.o.dbs as u32;
        let start = Instant::now();
        let mut n = 0usize;
        while start.elapsed() < Duration::from_secs(self.o.many_secs) {
            std::thread::sleep((start + gap * n as u32).saturating_duration_since(Instant::now()));
            conns[n % conns.len()].execute(INSERT_ROW, [])?;
            n += 1;
        }
        let after = proc_stats::read(pid)?;
        phase.stop();
        Ok(Many { cpu: after.cpu - before.cpu, peak_rss_kib: after.peak_rss_kib })
    }
}

/// Commits `transactions` one-row inserts as fast as one connection can; returns how long it took.
fn commit_flat_out(db: &Path, transactions: u64) -> anyhow::Result<Duration> {
    let conn = app_connection(db)?;
    let mut insert = conn.prepare(INSERT_ROW)?;
    let started = Instant::now();
    for _ in 0..transactions {
        insert.execute([])?;
    }
    Ok(started.elapsed())
}

impl ToolResults {
    /// The saturated runs in one: the median of each measure, the highest peak RSS, and the
    /// most LISTs and restores needed.
    fn saturated_median(&self) -> Saturated {
        let runs = &self.saturated;
        let secs = |f: fn(&Saturated) -> Duration| {
            Duration::from_secs_f64(median(runs.iter().map(|r| f(r).as_secs_f64()).collect()))
        };
        Saturated {
            tx_per_sec: median(runs.iter().map(|r| r.tx_per_sec).collect()),
            cpu: secs(|r| r.cpu),
            peak_rss_kib: runs.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0),
            drain: secs(|r| r.drain),
            restores_needed: runs.iter().map(|r| r.restores_needed).max().unwrap_or(0),
            uploads: median(runs.iter().map(|r| r.uploads as f64).collect()) as usize,
            lists: runs.iter().map(|r| r.lists).max().unwrap_or(0),
            restore: secs(|r| r.restore),
        }
    }

    fn lag_p50(&self) -> Duration {
        Duration::from_secs_f64(median(self.idle.lags.iter().map(Duration::as_secs_f64).collect()))
    }

    fn chart_values(&self) -> crate::chart::Values {
        let saturated = self.saturated_median();
        crate::chart::Values {
            label: self.label,
            lag_p50_ms: millis(self.lag_p50()),
            lag_p99_ms: millis(quantile(&self.idle.lags, 0.99)),
            cpu_secs: saturated.cpu.as_secs_f64(),
            peak_rss_mib: saturated.peak_rss_kib as f64 / 1024.0,
        }
    }
}

fn report(o: &Options, unreplicated_runs: &[f64], ws: &ToolResults, ls: &ToolResults, windowed: &[(&str, Trickle)]) {
    let unreplicated = median(unreplicated_runs.to_vec());
    let verdict = |met: bool| if met { "met" } else { "**not met**" };
    let drain = |s: &Saturated| {
        format!(
            "{:.2} ({} restore{})",
            s.drain.as_secs_f64(),
            s.restores_needed,
            if s.restores_needed == 1 { "" } else { "s" }
        )
    };
    let (wl, ll) = (ws.lag_p50(), ls.lag_p50());
    let (wsat, lsat) = (&ws.saturated_median(), &ls.saturated_median());
    println!("one run, same machine, same fake-gcs-server; each phase a fresh database, bucket and process");
    println!(
        "flat-out rows: the median of {} runs per tool (peak RSS, LISTs, restores needed: the most)",
        o.saturated_runs
    );
    println!();
    println!("| measure | walstream | litestream v0.3.13 | target | |");
    println!("|---|---:|---:|---|---|");
    println!(
        "| idle commit → bucket, p50 (ms, {} commits) | {:.0} | {:.0} | ≤ a tenth of litestream's | {} |",
        o.lag_samples,
        millis(wl),
        millis(ll),
        verdict(wl * 10 <= ll)
    );
    println!(
        "| idle commit → bucket, p99 (ms) | {:.0} | {:.0} | | |",
        millis(quantile(&ws.idle.lags, 0.99)),
        millis(quantile(&ls.idle.lags, 0.99))
    );
    println!(
        "| requests while idle for {} s | {} | {} | 0 | {} |",
        o.idle_secs,
        ws.idle.requests,
        ls.idle.requests,
        verdict(ws.idle.requests == 0)
    );
    println!(
        "| {} one-row transactions flat out: app tx/s (no replicator: {:.0}) | {:.0} | {:.0} | ≥ litestream's | {} |",
        o.transactions,
        unreplicated,
        wsat.tx_per_sec,
        lsat.tx_per_sec,
        verdict(wsat.tx_per_sec >= lsat.tx_per_sec)
    );
    println!(
        "| replicator CPU-s, load + drain | {:.2} | {:.2} | ≤ a fifth of litestream's | {} |",
        wsat.cpu.as_secs_f64(),
        lsat.cpu.as_secs_f64(),
        verdict(wsat.cpu * 5 <= lsat.cpu)
    );
    println!(
        "| replicator peak RSS (MiB) | {:.1} | {:.1} | ≤ 25 MB (23.8 MiB) | {} |",
        wsat.peak_rss_kib as f64 / 1024.0,
        lsat.peak_rss_kib as f64 / 1024.0,
        verdict(wsat.peak_rss_kib * 1024 <= 25_000_000)
    );
    println!(
        "| writer stops → restore equals source (s) | {} | {} | ≤ 1 s | {} |",
        drain(wsat),
        drain(lsat),
        verdict(wsat.drain <= Duration::from_secs(1))
    );
    println!("| uploads during load + drain / LISTs before the first restore | {} / {} | {} / {} | no LIST in steady state | {} |", wsat.uploads, wsat.lists, lsat.uploads, lsat.lists, verdict(wsat.lists == 0));
    println!(
        "| restore of that replica, by each tool (s) | {:.2} | {:.2} | | |",
        wsat.restore.as_secs_f64(),
        lsat.restore.as_secs_f64()
    );
    println!(
        "| trickle, {} commits at 1/s: PUTs / LISTs | {} / {} | {} / {} | PUTs ≤ litestream's, no LIST | {} |",
        ws.trickle.commits,
        ws.trickle.uploads_cell(),
        ws.trickle.lists,
        ls.trickle.uploads_cell(),
        ls.trickle.lists,
        verdict(ws.trickle.puts() <= ls.trickle.puts() && ws.trickle.lists == 0)
    );
    for (label, trickle) in windowed {
        println!(
            "| the same with {label} | {} / {} | | PUTs ≤ litestream's | {} |",
            trickle.uploads_cell(),
            trickle.lists,
            verdict(trickle.puts() <= ls.trickle.puts())
        );
    }
    let per_db = |m: &Many| (m.cpu.as_secs_f64() * 1000.0 / o.dbs as f64, m.peak_rss_kib as f64 / o.dbs as f64);
    let ((wc, wr), (lc, lr)) = (per_db(&ws.many), per_db(&ls.many));
    println!(
        "| {} databases, one commit each per 2 s, {} s: CPU-ms per database | {:.1} | {:.1} | | |",
        o.dbs, o.many_secs, wc, lc
    );
    println!("| the same: peak RSS per database (KiB) | {:.0} | {:.0} | | |", wr, lr);
    println!(
        "| the same: total CPU-s / peak RSS (MiB) | {:.2} / {:.1} | {:.2} / {:.1} | | |",
        ws.many.cpu.as_secs_f64(),
        ws.many.peak_rss_kib as f64 / 1024.0,
        ls.many.cpu.as_secs_f64(),
        ls.many.peak_rss_kib as f64 / 1024.0
    );
    println!();
    println!("flat-out runs, in order (walstream first in odd runs), app tx/s / CPU-s / uploads:");
    let runs: Vec<String> = unreplicated_runs.iter().map(|tx| format!("{tx:.0}")).collect();
    println!("- no replicator: {}", runs.join("; "));
    for tool in [ws, ls] {
        let runs: Vec<String> = tool
            .saturated
            .iter()
            .map(|r| format!("{:.0} / {:.2} / {}", r.tx_per_sec, r.cpu.as_secs_f64(), r.uploads))
            .collect();
        println!("- {}: {}", tool.label, runs.join("; "));
    }
}
