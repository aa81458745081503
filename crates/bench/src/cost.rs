//! `walstream-bench cost`: the object-store operations each tool makes at steady write rates,
//! which is most of a small deployment's replication bill, and what each commit waits for them.
//!
//! For every rate (`--rates`, commits a second) and every tool (walstream with its defaults,
//! walstream with `-sync-interval 100ms`, litestream v0.3.13 with its defaults), a fresh
//! database, bucket and replicator: after start-up settles, one connection commits a 200-byte row
//! at that rate for `--secs` (at least 12 commits), then the replicator is stopped with SIGTERM.
//! Each backend (`--backends gcs,s3`) gets its own server: fake-gcs-server, whose log does the
//! counting, and moto, behind a proxy that counts (`s3_server`). Requests are counted by billing
//! class: over the steady part (from the first commit until uploads pause), and over the whole
//! run (start-up and shutdown too). A commit's lag runs from its start to the first segment
//! upload answered after it returned; an upload already under way when the commit returned is
//! counted as carrying it, so a lag may read short by one upload's duration (a few ms against
//! the local emulator).
//! Run it through `scripts/bench-cost.sh`.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};

use crate::common::comma_separated;
use crate::emulator::{Emulator, Op, Request};
use crate::replicator::{app_connection, Harness, Server, Tool, INSERT_ROW};
use crate::s3_server::S3Server;

/// GCS Standard storage list prices, USD per 1,000 operations (Class A: uploads and listings;
/// Class B: reads; deletes are free). S3 Standard's are the same: $0.005 per 1,000 PUT, COPY,
/// POST and LIST requests, $0.0004 per 1,000 GETs, DELETE free.
const CLASS_A_PER_1000: f64 = 0.005;
const CLASS_B_PER_1000: f64 = 0.0004;
const MINUTES_PER_MONTH: f64 = 30.0 * 24.0 * 60.0;

struct Options {
    bins: crate::common::Binaries,
    rates: Vec<f64>,
    secs: u64,
    backends: Vec<String>,
}

pub fn run(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let mut o = Options {
        bins: Default::default(),
        rates: vec![0.1, 1.0, 10.0, 100.0, 1000.0],
        secs: 60,
        backends: vec!["gcs".into(), "s3".into()],
    };
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            binary if o.bins.take(binary, &value) => {}
            "--rates" => o.rates = comma_separated(&value, "--rates: commits a second, comma-separated")?,
            "--secs" => o.secs = value.parse()?,
            "--backends" => o.backends = comma_separated(&value, "--backends: gcs and/or s3, comma-separated")?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    o.bins.check()?;
    ensure!(
        !o.rates.is_empty() && o.rates.iter().all(|r| *r > 0.0 && *r <= 5000.0),
        "--rates must be between 0 and 5000 commits a second"
    );

    ensure!(
        !o.backends.is_empty() && o.backends.iter().all(|b| b == "gcs" || b == "s3"),
        "--backends takes gcs and s3"
    );
    ensure!(
        !o.backends.iter().any(|b| b == "s3") || o.bins.moto.is_file(),
        "--moto-server must name moto_server to run on s3"
    );
    let temp = tempfile::tempdir()?;
    let tools = [
        Tool {
            label: "walstream",
            bin: o.bins.walstream.clone(),
            prefix: "ws",
            flags: vec![],
            hold: Duration::from_secs(1),
        },
        Tool {
            label: "walstream -sync-interval 100ms",
            bin: o.bins.walstream.clone(),
            prefix: "wsfast",
            flags: vec!["-sync-interval".into(), "100ms".into()],
            hold: Duration::from_millis(100),
        },
        Tool {
            label: "litestream v0.3.13",
            bin: o.bins.litestream.clone(),
            prefix: "ls",
            flags: vec![],
            hold: Duration::from_secs(2),
        },
    ];
    let mut rows = Vec::new();
    for backend in &o.backends {
        let dir = temp.path().join(backend);
        std::fs::create_dir(&dir)?;
        let server = match backend.as_str() {
            "gcs" => Server::Gcs(Emulator::start(&o.bins.fake_gcs, &dir)?),
            _ => Server::S3(S3Server::start(&o.bins.moto)?),
        };
        let harness = Harness { dir, server };
        for (n, &rate) in o.rates.iter().enumerate() {
            let secs = o.secs.max((12.0 / rate).ceil() as u64);
            for tool in &tools {
                eprintln!("{} on {backend}: {rate} commits/s for {secs} s", tool.label);
                rows.push(steady(&harness, tool, n, rate, secs)?);
            }
        }
    }
    report(&rows);
    Ok(())
}

/// One tool at one rate.
struct Row {
    backend: &'static str,
    label: &'static str,
    rate: f64,
    commits: usize,
    secs: f64,
    steady: Counts,
    whole_run: Counts,
    lags: Vec<Duration>,
}

#[derive(Clone, Copy, Default)]
struct Counts {
    /// Segment and snapshot uploads (Class A).
    uploads: usize,
    /// walstream's lease writes (Class A), which litestream has no counterpart of.
    lease: usize,
    /// Listings (Class A).
    lists: usize,
    /// Object reads (Class B).
    gets: usize,
    /// Free.
    deletes: usize,
}

impl Counts {
    fn of(requests: &[Request]) -> Counts {
        let mut c = Counts::default();
        for r in requests {
            match r.op {
                Op::Upload => c.uploads += 1,
                Op::ConditionalUpload => c.lease += 1,
                Op::List => c.lists += 1,
                Op::Get => c.gets += 1,
                Op::Delete => c.deletes += 1,
            }
        }
        c
    }

    fn class_a(&self) -> usize {
        self.uploads + self.lease + self.lists
    }

    fn all(&self) -> usize {
        self.class_a() + self.gets + self.deletes
    }
}

fn steady(harness: &Harness, tool: &Tool, n: usize, rate: f64, secs: u64) -> anyhow::Result<Row> {
    let phase = harness.start(tool, &format!("cost{n}"))?;
    let conn = app_connection(&phase.db)?;
    let mut insert = conn.prepare(INSERT_ROW)?;
    let commits = (rate * secs as f64).round() as usize;
    let gap = Duration::from_secs_f64(1.0 / rate);
    let (began, start) = (SystemTime::now(), Instant::now());
    let mut committed = Vec::with_capacity(commits);
    for k in 0..commits {
        std::thread::sleep((start + gap * k as u32).saturating_duration_since(Instant::now()));
        let at = SystemTime::now();
        insert.execute([])?;
        committed.push((at, SystemTime::now()));
    }
    let writing = start.elapsed();
    std::thread::sleep(tool.hold);
    let quiet = phase.wait_for_quiet(SystemTime::now(), Duration::from_secs(3), Duration::from_secs(120))?;
    let steady: Vec<Request> = phase.requests_since(began)?.into_iter().filter(|r| r.at <= quiet).collect();
    let bucket = phase.bucket.clone();
    phase.stop();
    let whole_run = harness.server.requests(&bucket)?;

    let mut uploads: Vec<SystemTime> = steady.iter().filter(|r| r.op == Op::Upload).map(|r| r.at).collect();
    uploads.sort();
    let mut lags = Vec::with_capacity(commits);
    for (k, (started, returned)) in committed.iter().enumerate() {
        // The log has millisecond stamps: an upload in the commit's own millisecond counts.
        let from = *returned - Duration::from_millis(1);
        let first = uploads.partition_point(|at| *at < from);
        let shipped = uploads
            .get(first)
            .with_context(|| format!("{}: commit {k} at {rate}/s was never followed by an upload", tool.label))?;
        lags.push(shipped.duration_since(*started).unwrap_or_default());
    }
    Ok(Row {
        backend: harness.server.name(),
        label: tool.label,
        rate,
        commits,
        secs: writing.as_secs_f64(),
        steady: Counts::of(&steady),
        whole_run: Counts::of(&whole_run),
        lags,
    })
}

impl Row {
    fn per_minute(&self, count: usize) -> f64 {
        count as f64 * 60.0 / self.secs
    }

    /// The steady part's list-price cost over 30 days, in USD.
    fn monthly_usd(&self) -> f64 {
        let a = self.per_minute(self.steady.class_a()) * MINUTES_PER_MONTH;
        let b = self.per_minute(self.steady.gets) * MINUTES_PER_MONTH;
        a / 1000.0 * CLASS_A_PER_1000 + b / 1000.0 * CLASS_B_PER_1000
    }

    fn lag_ms(&self, q: f64) -> f64 {
        crate::common::millis(crate::common::quantile(&self.lags, q))
    }
}

fn report(rows: &[Row]) {
    let verdict = |met: bool| if met { "met" } else { "**not met**" };
    println!("one run, same machine, one server per backend; each row a fresh database, bucket and process");
    println!();
    println!("| backend | commits/s | tool | commits | requests/min | of which uploads / lease / lists / gets / deletes | whole run incl. start and stop | commit → bucket p50 / p99 / max (ms) | 30 days at list price |");
    println!("|---|---:|---|---:|---:|---|---:|---|---:|");
    for r in rows {
        let s = &r.steady;
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1} / {:.1} / {:.1} / {:.1} / {:.1} | {} | {:.0} / {:.0} / {:.0} | ${:.2} |",
            r.backend,
            r.rate,
            r.label,
            r.commits,
            r.per_minute(s.all()),
            r.per_minute(s.uploads),
            r.per_minute(s.lease),
            r.per_minute(s.lists),
            r.per_minute(s.gets),
            r.per_minute(s.deletes),
            r.whole_run.all(),
            r.lag_ms(0.5),
            r.lag_ms(0.99),
            r.lag_ms(1.0),
            r.monthly_usd()
        );
    }
    println!();
    println!("walstream's defaults against litestream's, requests (steady / whole run):");
    for r in rows.iter().filter(|r| r.label == "walstream") {
        let Some(ls) =
            rows.iter().find(|l| l.backend == r.backend && l.rate == r.rate && l.label.starts_with("litestream"))
        else {
            continue;
        };
        let (ws_steady, ls_steady) = (r.per_minute(r.steady.all()), ls.per_minute(ls.steady.all()));
        println!(
            "- {} at {} commits/s: steady {} against {} ({:.1} against {:.1} a minute), {} against {} in all: {}",
            r.backend,
            r.rate,
            r.steady.all(),
            ls.steady.all(),
            ws_steady,
            ls_steady,
            r.whole_run.all(),
            ls.whole_run.all(),
            // Counts, not rates: both wrote the same commits, in slightly different times.
            verdict(r.steady.all() <= ls.steady.all() && r.whole_run.all() <= ls.whole_run.all())
        );
    }
}
