//! Command-line arguments: clap definitions plus the shim that accepts Litestream's Go-style
//! single-dash long flags (`-if-db-not-exists`, `-timestamp`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "walstream", version, about = "Continuous replication of a SQLite database by shipping its WAL (Litestream v0.3.13 compatible)")]
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
    /// Print the version.
    Version,
}

#[derive(Args, Debug)]
pub(crate) struct ReplicateArgs {
    /// The database to replicate. It may not exist yet: walstream waits for it.
    pub(crate) db_path: PathBuf,
    /// Where to replicate: file:///path (more schemes to come).
    #[arg(required = true, value_name = "REPLICA_URL")]
    pub(crate) replica_urls: Vec<String>,
    /// How long the final flush may take after SIGTERM, e.g. 8s or 500ms.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub(crate) shutdown_timeout: Duration,
}

#[derive(Args, Debug)]
pub(crate) struct RestoreArgs {
    /// Where to write the database; it must not exist.
    #[arg(short = 'o', value_name = "PATH")]
    pub(crate) output: PathBuf,
    /// Exit successfully, without touching the network, if the output already exists.
    #[arg(long)]
    pub(crate) if_db_not_exists: bool,
    /// Exit successfully if the replica holds no backup.
    #[arg(long)]
    pub(crate) if_replica_exists: bool,
    /// The replica to restore from: file:///path.
    pub(crate) replica_url: String,
}

/// Go-style durations: "8s", "500ms", "2m", "1h", "1.5s".
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(|| format!("invalid duration {s:?}: missing unit (e.g. 8s, 500ms)"))?;
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("invalid duration {s:?}: unit must be ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(seconds))
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
    let Some(body) = s.strip_prefix('-') else { return false };
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
        assert_eq!(argv(&["w", "-timestamp=2020-01-01T00:00:00Z", "-1", "--x", "--", "-keep"]), ["w", "--timestamp=2020-01-01T00:00:00Z", "-1", "--x", "--", "-keep"]);
    }

    #[test]
    fn litestream_restore_line_parses() {
        let cli = Cli::try_parse_from(argv(&["walstream", "restore", "-if-db-not-exists", "-if-replica-exists", "-o", "/data/db", "file:///backup/db"])).unwrap();
        let Command::Restore(args) = cli.command else { panic!("not restore") };
        assert!(args.if_db_not_exists && args.if_replica_exists);
        assert_eq!(args.output, PathBuf::from("/data/db"));
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("8s").unwrap(), Duration::from_secs(8));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("8").is_err());
        assert!(parse_duration("8 parsecs").is_err());
    }
}
