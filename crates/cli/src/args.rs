//! Command-line arguments: clap definitions plus the shim that accepts Litestream's Go-style
//! single-dash long flags (`-if-db-not-exists`, `-timestamp`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use walstream_format::GenerationId;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "walstream",
    version,
    about = "Continuous replication of a SQLite database by shipping its WAL (Litestream v0.3.13 compatible)"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Replicate a database to one or more replica URLs until SIGTERM/SIGINT.
    Replicate(ReplicateArgs),
    /// Restore a database from a replica URL.
    Restore(RestoreArgs),
    /// List the generations of a replica.
    Generations(ListArgs),
    /// List the snapshots of a replica.
    Snapshots(ListArgs),
    /// List the WAL segments of a replica.
    Wal(ListArgs),
    /// List the databases of the config file and their replicas.
    Databases(ConfigArgs),
    /// Wait until every transaction committed so far is in every replica (asks the running
    /// `walstream replicate` on its addr; exit 14 on timeout).
    Sync(SyncArgs),
    /// Download and check every object a restore would read (the latest restorable chain, or
    /// -generation's), without writing a database; exit 6 naming the first bad object.
    Verify(VerifyArgs),
    /// Check a config file without starting anything: `walstream config check`.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the version.
    Version,
}

#[derive(Args, Debug)]
pub(crate) struct ReplicateArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
    /// The database to replicate (it may not exist yet: walstream waits for it). Without it,
    /// every database of the config file is replicated.
    pub(crate) db_path: Option<PathBuf>,
    /// Where to replicate: file:///path or gcs://bucket/path.
    #[arg(value_name = "REPLICA_URL")]
    pub(crate) replica_urls: Vec<String>,
    /// How long the final flush may take after SIGTERM, e.g. 8s or 500ms.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub(crate) shutdown_timeout: Duration,
    /// Run this command (the application) once replication is running, pass SIGTERM/SIGINT on
    /// to it, and exit with its exit code after the final flush. Overrides the config's `exec`.
    #[arg(long, value_name = "CMD")]
    pub(crate) exec: Option<String>,
    /// Serve /metrics, /healthz, /readyz and POST /sync on HOST:PORT (or :PORT). Overrides the
    /// config's `addr`.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_addr)]
    pub(crate) addr: Option<String>,
    /// How long to wait for a replica's lease held by another walstream (a rollout's overlap,
    /// a crashed holder's lease running out) before exiting with code 15. 0s: refuse at once.
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    pub(crate) lease_timeout: Duration,
    /// How long a replica lease lasts without renewal; it is renewed before uploads, so an
    /// idle replicator makes no requests.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub(crate) lease_ttl: Duration,
    /// The least time between two WAL uploads to each replica (the config's `sync-interval`):
    /// commits arriving sooner are shipped together, trading lag for fewer PUTs. A commit after
    /// a quiet spell, `walstream sync` and shutdown ship at once. 0s ships every commit at once.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub(crate) sync_interval: Duration,
    /// `/healthz` fails while a replica has held back a captured commit for longer than this
    /// (a store outage, a stuck upload), e.g. 1m or 30s; 0s never. Overrides the config's
    /// `health-lag`; default 1m.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) health_lag: Option<Duration>,
    /// A URL to GET every -heartbeat-interval while every replica is healthy (a dead-man's
    /// switch: healthchecks.io and the like alert when the pings stop). Overrides the config's
    /// `heartbeat-url`.
    #[arg(long, value_name = "URL")]
    pub(crate) heartbeat_url: Option<String>,
    /// How often to send the heartbeat (at least 1s; default 5m, as in Litestream 0.5). Overrides the config's
    /// `heartbeat-interval`.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) heartbeat_interval: Option<Duration>,
    /// Do not take the replica lease (the `walstream-lease` object at the replica's root).
    #[arg(long)]
    pub(crate) no_lease: bool,
    /// The most local disk the shadow WAL may take while a replica cannot keep up (a store
    /// outage), e.g. 64MiB or 1GB; 0 for no bound. Past it the unshipped history is dropped and
    /// a new generation starts, whose snapshot holds every commit: restores lose the points in
    /// time between, never a commit.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub(crate) max_local_wal: u64,
    /// Take a new snapshot once the WAL captured since the last one passes RATIO times the
    /// database's size (and at least 256 MiB), so a restore never replays more than about that:
    /// restore time stays flat however long the history. Costs one snapshot upload per that
    /// much WAL, spaced so that snapshots take at most a tenth of the time. 0 takes snapshots
    /// only at start and on `snapshot-interval`.
    #[arg(long, value_name = "RATIO", default_value_t = walstream_shipper::DEFAULT_SNAPSHOT_WAL_RATIO, value_parser = parse_ratio)]
    pub(crate) snapshot_wal_ratio: f64,
    /// Once a database has been idle this long and its replicas hold all of it, let go of its
    /// read pin and connections until its next change: an idle database then holds one open
    /// file and costs no CPU. 0 holds them always. Default: 10s when the process replicates
    /// more than one database, 0 for one. Overrides the config's `idle-release`.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) idle_release: Option<Duration>,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(ratio) if ratio.is_finite() && ratio >= 0.0 => Ok(ratio),
        _ => Err(format!("invalid ratio {s:?}: give a number such as 1 or 0.5, or 0 for none")),
    }
}

/// Sizes: bytes, or a number with B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB (of 1024).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use B, KB, MB, GB, KiB, MiB or GiB, e.g. 64MiB)"
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("invalid size {s:?}: expected a whole number and a unit, e.g. 64MiB"))
}

/// `walstream verify`: is the replica restorable?
#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
    /// Check this generation's chain (16 hex digits) instead of the latest.
    #[arg(long, value_name = "NAME")]
    pub(crate) generation: Option<GenerationId>,
    /// How many objects to download at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) parallelism: u32,
    /// Only the replica of this name (with a URL, its scheme: file or gcs).
    #[arg(long, value_name = "NAME")]
    pub(crate) replica: Option<String>,
    /// A replica URL, or a database path from the config file to check each of its replicas.
    #[arg(value_name = "DB_PATH|REPLICA_URL")]
    pub(crate) source: String,
}

/// `walstream sync`: wait until everything committed so far is in every replica.
#[derive(Args, Debug)]
pub(crate) struct SyncArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
    /// Only this database (default: every database the replicator serves).
    pub(crate) db_path: Option<PathBuf>,
    /// The running replicator's address; default: the config file's `addr`.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_addr)]
    pub(crate) addr: Option<String>,
    /// Give up (exit 14) when the replicas have not confirmed within this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,
}

fn parse_integrity_check(s: &str) -> Result<walstream_restore::IntegrityCheck, String> {
    use walstream_restore::IntegrityCheck;
    match s {
        "full" => Ok(IntegrityCheck::Full),
        "quick" => Ok(IntegrityCheck::Quick),
        "none" => Ok(IntegrityCheck::None),
        _ => Err(format!("unknown integrity check {s:?}: use full, quick or none")),
    }
}

fn parse_addr(s: &str) -> Result<String, String> {
    crate::config::check_addr(s).map(|()| s.to_string())
}

#[derive(Subcommand, Debug)]
pub(crate) enum ConfigCommand {
    /// Read and check the config file; print what it replicates.
    Check(ConfigArgs),
}

/// `-config` and `-no-expand-env`, shared by every command that can read the config file.
#[derive(Args, Debug, Clone)]
pub(crate) struct ConfigArgs {
    /// The config file (litestream.yml keys). Default: $WALSTREAM_CONFIG, $LITESTREAM_CONFIG,
    /// /etc/walstream.yml, or /etc/litestream.yml if only that exists.
    #[arg(long, value_name = "PATH")]
    pub(crate) config: Option<PathBuf>,
    /// Do not expand $VAR and ${VAR} in the config file.
    #[arg(long)]
    pub(crate) no_expand_env: bool,
}

#[derive(Args, Debug)]
pub(crate) struct RestoreArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
    /// Where to write the database; it must not exist. Required with a replica URL; with a
    /// database path, defaults to that path.
    #[arg(short = 'o', value_name = "PATH")]
    pub(crate) output: Option<PathBuf>,
    /// Exit successfully, without touching the network, if the output already exists.
    #[arg(long)]
    pub(crate) if_db_not_exists: bool,
    /// Exit successfully if the replica holds no backup.
    #[arg(long)]
    pub(crate) if_replica_exists: bool,
    /// Restore from this generation (16 hex digits).
    #[arg(long, value_name = "NAME")]
    pub(crate) generation: Option<GenerationId>,
    /// Replay WAL up to and including this index (hex, as Litestream prints it in names).
    #[arg(long, value_name = "HEX", value_parser = parse_hex_index)]
    pub(crate) index: Option<u32>,
    /// Restore the database as it was at this moment (RFC 3339, e.g. 2026-11-22T13:07:31.5Z).
    #[arg(long, value_name = "RFC3339", value_parser = parse_timestamp)]
    pub(crate) timestamp: Option<SystemTime>,
    /// How many objects to download at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) parallelism: u32,
    /// Only from the replica of this name (with a URL, its scheme: file or gcs).
    #[arg(long, value_name = "NAME")]
    pub(crate) replica: Option<String>,
    /// Print what would be restored, and an estimate of how long it takes, without restoring.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// The check SQLite runs on the restored file before it is put in place: full
    /// (`integrity_check`, the default), quick (`quick_check`) or none (Litestream 0.5's
    /// spelling). Every object's checksums are verified whichever is chosen.
    #[arg(long, value_name = "full|quick|none", default_value = "full", value_parser = parse_integrity_check)]
    pub(crate) integrity_check: walstream_restore::IntegrityCheck,
    /// Log each step of the restore (debug level), as Litestream 0.3.9's `-v` did; guides and
    /// the original Cloud Run manifest pass it, and v0.3.13 rejected it.
    #[arg(short = 'v', long)]
    pub(crate) verbose: bool,
    /// After a successful restore (or an allowed skip), listen on ADDR (host:port) and answer
    /// every TCP connection, and HTTP GET with 200, until SIGTERM; then exit 0. For a startup
    /// probe of a container that depends on this one (Cloud Run).
    #[arg(long, value_name = "ADDR")]
    pub(crate) serve_ready: Option<String>,
    /// A replica URL (file:///path, gcs://bucket/path), or a database path from the config file
    /// to restore from its replicas.
    #[arg(value_name = "DB_PATH|REPLICA_URL")]
    pub(crate) source: String,
}

#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    pub(crate) config: ConfigArgs,
    /// Only the replica of this name (with a URL, its scheme: file or gcs).
    #[arg(long, value_name = "NAME")]
    pub(crate) replica: Option<String>,
    /// Only this generation (wal).
    #[arg(long, value_name = "NAME")]
    pub(crate) generation: Option<GenerationId>,
    /// A replica URL, or a database path from the config file.
    #[arg(value_name = "DB_PATH|REPLICA_URL")]
    pub(crate) source: String,
}

/// Litestream's test for a URL rather than a path: `^\w+://`.
pub(crate) fn is_url(s: &str) -> bool {
    s.split_once("://")
        .is_some_and(|(scheme, _)| !scheme.is_empty() && scheme.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

fn parse_hex_index(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| format!("invalid -index {s:?}: expected a hex WAL index such as 0000002a or 2a"))
}

/// RFC 3339 with optional fractional seconds and any offset, as Go's `time.RFC3339` parses.
pub(crate) fn parse_timestamp(s: &str) -> Result<SystemTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| format!("invalid -timestamp {s:?}, must specify in ISO 8601 format (e.g. 2000-01-01T00:00:00Z)"))
}

/// Go-style durations: "8s", "500ms", "2m", "1h30m".
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::go_duration::parse(s)
}

/// Rewrites `-long-flag` to `--long-flag` so clap accepts Litestream's spelling. Single-letter
/// flags (`-o`), values that are negative numbers, and everything after `--` are left alone.
pub(crate) fn litestream_style_argv(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut rest_verbatim = false;
    for (i, arg) in args.into_iter().enumerate() {
        let rewritten = match arg.to_str() {
            Some("--") => {
                rest_verbatim = true;
                None
            }
            Some(s) if i > 0 && !rest_verbatim && is_go_long_flag(s) => Some(OsString::from(format!("-{s}"))),
            _ => None,
        };
        out.push(rewritten.unwrap_or(arg));
    }
    out
}

fn is_go_long_flag(s: &str) -> bool {
    let Some(body) = s.strip_prefix('-') else {
        return false;
    };
    let name = body.split('=').next().unwrap_or("");
    !body.starts_with('-') && name.len() > 1 && name.starts_with(|c: char| c.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        litestream_style_argv(args.iter().map(OsString::from)).into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn single_dash_long_flags_become_double_dash() {
        assert_eq!(
            argv(&["walstream", "restore", "-if-db-not-exists", "-if-replica-exists", "-o", "/data/db", "file:///r"]),
            ["walstream", "restore", "--if-db-not-exists", "--if-replica-exists", "-o", "/data/db", "file:///r"]
        );
        assert_eq!(
            argv(&["w", "-timestamp=2020-01-01T00:00:00Z", "-1", "--x", "--", "-keep"]),
            ["w", "--timestamp=2020-01-01T00:00:00Z", "-1", "--x", "--", "-keep"]
        );
    }

    #[test]
    fn litestream_restore_line_parses() {
        let cli = Cli::try_parse_from(argv(&[
            "walstream",
            "restore",
            "-if-db-not-exists",
            "-if-replica-exists",
            "-o",
            "/data/db",
            "file:///backup/db",
        ]))
        .unwrap();
        let Command::Restore(args) = cli.command else { panic!("not restore") };
        assert!(args.if_db_not_exists && args.if_replica_exists);
        assert_eq!(args.output, Some(PathBuf::from("/data/db")));
    }

    /// The seed's restore container, verbatim: Litestream 0.3.9 accepted `-v`.
    #[test]
    fn the_cloud_run_guides_restore_line_parses() {
        let cli = Cli::try_parse_from(argv(&[
            "walstream",
            "restore",
            "-if-db-not-exists",
            "-if-replica-exists",
            "-v",
            "-o",
            "/var/lib/myapp/db",
            "gcs://litestream-example/db",
        ]))
        .unwrap();
        let Command::Restore(args) = cli.command else { panic!("not restore") };
        assert!(args.verbose && args.if_db_not_exists && args.if_replica_exists);
        for flag in ["--verbose", "-verbose"] {
            let cli = Cli::try_parse_from(argv(&["walstream", "restore", flag, "-o", "/d", "file:///r"])).unwrap();
            let Command::Restore(args) = cli.command else { panic!("not restore") };
            assert!(args.verbose, "{flag}");
        }
    }

    #[test]
    fn point_in_time_flags_parse_like_litestream() {
        let cli = Cli::try_parse_from(argv(&[
            "walstream",
            "restore",
            "-generation",
            "00000000000000aa",
            "-index",
            "0000002a",
            "-parallelism",
            "4",
            "-o",
            "/d",
            "gcs://b/db",
        ]))
        .unwrap();
        let Command::Restore(args) = cli.command else { panic!("not restore") };
        assert_eq!(args.generation.unwrap().to_string(), "00000000000000aa");
        assert_eq!(args.index, Some(42));
        assert_eq!(args.parallelism, 4);
        let t = parse_timestamp("2026-11-22T13:07:31.5Z").unwrap();
        assert_eq!(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() % 1000, 500);
        assert_eq!(
            parse_timestamp("2026-11-22T15:07:31+02:00").unwrap(),
            parse_timestamp("2026-11-22T13:07:31Z").unwrap()
        );
        assert!(parse_timestamp("yesterday").unwrap_err().contains("ISO 8601"));
        assert!(Cli::try_parse_from(argv(&["walstream", "restore", "-index", "zz", "-o", "/d", "file:///r"])).is_err());
        assert!(Cli::try_parse_from(argv(&["walstream", "restore", "-generation", "nope", "-o", "/d", "file:///r"]))
            .is_err());
    }

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("12 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("MiB").unwrap_err().contains("whole number"));
    }

    #[test]
    fn replicate_defaults_to_the_shippers_sync_interval_and_zero_means_at_once() {
        let sync_interval = |extra: &[&str]| {
            let cli = Cli::try_parse_from(argv(&[&["walstream", "replicate"], extra, &["/d", "gcs://b/db"]].concat()))
                .unwrap();
            let Command::Replicate(args) = cli.command else { panic!("not replicate") };
            args.sync_interval
        };
        assert_eq!(sync_interval(&[]), walstream_shipper::DEFAULT_SYNC_INTERVAL);
        assert_eq!(sync_interval(&["-sync-interval", "0s"]), Duration::ZERO);
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("8s").unwrap(), Duration::from_secs(8));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("8").is_err());
        assert!(parse_duration("8 parsecs").is_err());
        assert!(is_url("gcs://b/db") && is_url("file:///r") && !is_url("/data/db") && !is_url("://x"));
    }
}
