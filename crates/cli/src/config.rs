//! The config file: the same YAML keys as `litestream.yml` v0.3.13 (spec §7.3), so an existing
//! file works unchanged. `$VAR` and `${VAR}` are expanded over the whole text first, unless
//! `-no-expand-env`. Unlike Litestream's parser, an unknown key is an error (`config_keys`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use walstream_format::age::AgeKeys;
use walstream_store::S3Settings;

use crate::{go_duration, replica_url};

/// A config file that cannot be used. The message names the file and the key.
#[derive(Debug)]
pub(crate) struct ConfigError(pub(crate) String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The databases a config file names.
#[derive(Debug, Default)]
pub(crate) struct Config {
    /// Every database, those found under a `dir` included once the file is loaded.
    pub(crate) dbs: Vec<DbConfig>,
    /// The `dir` entries without `watch`, until `load` has found their databases.
    pub(crate) dirs: Vec<DirConfig>,
    /// The `dir` entries with `watch`: `replicate` finds their databases as they come and go.
    pub(crate) watched: Vec<DirConfig>,
    /// The `exec` command, if any.
    pub(crate) exec: Option<String>,
    /// `addr`: where to serve metrics, health and the sync barrier (`host:port`, `:port`).
    pub(crate) addr: Option<String>,
    /// `health-lag`: how long a replica may hold back a captured commit before `/healthz` fails.
    pub(crate) health_lag: Option<Duration>,
    /// `metrics-db-limit`: how many databases get series of their own on `/metrics`.
    pub(crate) metrics_db_limit: Option<usize>,
    /// `heartbeat-url` and `heartbeat-interval` (Litestream 0.5's keys).
    pub(crate) heartbeat_url: Option<String>,
    pub(crate) heartbeat_interval: Option<Duration>,
    /// `idle-release`: how long a database stays idle before walstream lets its pin go.
    pub(crate) idle_release: Option<Duration>,
    pub(crate) logging: LoggingConfig,
    /// Keys accepted and ignored, each with why; logged when the file is loaded.
    pub(crate) warnings: Vec<String>,
}

/// The `logging` keys.
#[derive(Debug, Default)]
pub(crate) struct LoggingConfig {
    /// `debug`, `info`, `warn` (or `warning`), `error`.
    pub(crate) level: Option<String>,
    /// JSON lines instead of text.
    pub(crate) json: bool,
    /// Logs to stderr instead of stdout (the daemon's default, as in Litestream).
    pub(crate) stderr: bool,
}

#[derive(Debug)]
pub(crate) struct DbConfig {
    /// Absolute, with `~` expanded.
    pub(crate) path: PathBuf,
    /// `meta-path`: where walstream keeps its local state for this database.
    pub(crate) meta_path: Option<PathBuf>,
    pub(crate) replicas: Vec<ReplicaConfig>,
    /// Found in a watched directory when the file was loaded: listed and restorable like the
    /// others, but `replicate` leaves it to the directory's watch (`fleet`).
    pub(crate) watched: bool,
    /// `health-lag` for this database alone; `None`: the process's.
    pub(crate) health_lag: Option<Duration>,
}

#[derive(Clone, Debug)]
pub(crate) struct ReplicaConfig {
    /// Unique within its database; the type when not given.
    pub(crate) name: String,
    /// The replica as a URL, however the file spelled it (`url`, or `type` with `path`/`bucket`).
    pub(crate) url: String,
    /// `snapshot-interval`, `retention`, `retention-check-interval`.
    pub(crate) policy: walstream_shipper::RetentionPolicy,
    /// `sync-interval`: the least time between two WAL uploads; zero when not given.
    pub(crate) sync_interval: Duration,
    /// `validation-interval`: how often the replica is restored in the background and compared
    /// with the database; zero (the default) never.
    pub(crate) validation_interval: Duration,
    /// The `age` block's keys: encryption to its recipients, decryption with its identities.
    pub(crate) age: Option<Arc<AgeKeys>>,
    /// `region`, `endpoint`, `force-path-style`, `skip-verify` and the key pair, for s3 URLs.
    pub(crate) s3: S3Settings,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawConfig {
    #[serde(default)]
    dbs: Vec<RawDb>,
    exec: Option<String>,
    addr: Option<String>,
    health_lag: Option<String>,
    metrics_db_limit: Option<usize>,
    heartbeat_url: Option<String>,
    heartbeat_interval: Option<String>,
    idle_release: Option<String>,
    logging: Option<RawLogging>,
    /// S3 keys for every s3 replica that does not set its own (Litestream's global settings).
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawLogging {
    #[serde(rename = "type")]
    kind: Option<String>,
    level: Option<String>,
    #[serde(default)]
    stderr: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawDb {
    path: Option<String>,
    meta_path: Option<String>,
    #[serde(default)]
    replicas: Vec<RawReplica>,
    /// Litestream 0.5's spelling of a single replica.
    replica: Option<RawReplica>,
    dir: Option<String>,
    pattern: Option<String>,
    recursive: Option<bool>,
    watch: Option<bool>,
    health_lag: Option<String>,
}

/// A `dbs` entry with `dir`: its databases are found when the file is loaded (`discover`), or,
/// with `watch`, as they come and go (`fleet`).
#[derive(Clone, Debug)]
pub(crate) struct DirConfig {
    /// Absolute, with `~` expanded.
    pub(crate) dir: PathBuf,
    pub(crate) pattern: String,
    pub(crate) recursive: bool,
    /// Each database's replicas are these with its relative path appended to the URL.
    pub(crate) replicas: Vec<ReplicaConfig>,
    /// `health-lag` for each database found here; `None`: the process's.
    pub(crate) health_lag: Option<Duration>,
}

impl DirConfig {
    /// One database found under the directory: the replicas get its relative path.
    pub(crate) fn database(&self, path: PathBuf, relative: &str) -> DbConfig {
        let replicas = self
            .replicas
            .iter()
            .map(|r| ReplicaConfig { url: crate::discover::replica_url(&r.url, relative), ..r.clone() })
            .collect();
        DbConfig { path, meta_path: None, replicas, watched: false, health_lag: self.health_lag }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawReplica {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    url: Option<String>,
    path: Option<String>,
    bucket: Option<String>,
    sync_interval: Option<String>,
    snapshot_interval: Option<String>,
    retention: Option<String>,
    retention_check_interval: Option<String>,
    validation_interval: Option<String>,
    age: Option<RawAge>,
    region: Option<String>,
    endpoint: Option<String>,
    force_path_style: Option<bool>,
    skip_verify: Option<bool>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
}

#[derive(Deserialize)]
struct RawAge {
    #[serde(default)]
    identities: Vec<String>,
    #[serde(default)]
    recipients: Vec<String>,
}

/// Which file to read: `-config`, else `$WALSTREAM_CONFIG`, else `$LITESTREAM_CONFIG`, else
/// `/etc/walstream.yml`, or `/etc/litestream.yml` when only that one exists (a drop-in keeps its
/// mounted file).
pub(crate) fn default_path() -> PathBuf {
    for var in ["WALSTREAM_CONFIG", "LITESTREAM_CONFIG"] {
        if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return PathBuf::from(path);
        }
    }
    let (ours, theirs) = (PathBuf::from("/etc/walstream.yml"), PathBuf::from("/etc/litestream.yml"));
    if !ours.exists() && theirs.exists() {
        return theirs;
    }
    ours
}

/// Reads and checks a config file.
pub(crate) fn load(path: &Path, expand_env: bool) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            ConfigError(format!("config file not found: {}; give one with -config PATH", path.display()))
        }
        _ => ConfigError(format!("cannot read config file {}: {e}", path.display())),
    })?;
    let text = if expand_env { expand(&text, |name| std::env::var(name).ok()) } else { text };
    let mut config = parse(&text).map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
    for warning in &config.warnings {
        tracing::warn!("config file {}: {warning}", path.display());
    }
    find_directory_databases(&mut config).map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
    Ok(config)
}

/// Adds to `config.dbs` the databases each `dir` entry holds now, each replicated under its
/// replica URLs with its path relative to the directory appended (Litestream 0.5's layout).
fn find_directory_databases(config: &mut Config) -> Result<(), String> {
    let watched = config.watched.iter().map(|dir| (dir.clone(), true));
    let dirs: Vec<(DirConfig, bool)> =
        std::mem::take(&mut config.dirs).into_iter().map(|dir| (dir, false)).chain(watched).collect();
    for (dir, watched) in dirs {
        let found = crate::discover::databases(&dir.dir, &dir.pattern, dir.recursive)
            .map_err(|e| format!("dir {}: cannot read it: {e}", dir.dir.display()))?;
        if found.is_empty() && !watched {
            tracing::warn!(dir = %dir.dir.display(), pattern = %dir.pattern, recursive = dir.recursive, "no SQLite database matches in this directory");
        }
        for (path, relative) in found {
            config.dbs.push(DbConfig { watched, ..dir.database(path, &relative) });
        }
    }
    let mut paths: Vec<&Path> = config.dbs.iter().map(|db| db.path.as_path()).collect();
    paths.sort();
    if let Some(twice) = paths.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!(
            "database {} is named twice in dbs (by path or by dir); keep one entry for it",
            twice[0].display()
        ));
    }
    Ok(())
}

fn parse(text: &str) -> Result<Config, String> {
    if text.trim().is_empty() {
        return Ok(Config::default());
    }
    // Read twice: as a tree for the keys, then typed (which keeps line numbers in its errors
    // and reads `retention: 0` as the string it is in Litestream's files).
    let mut warnings = crate::config_keys::check(&serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?)?;
    let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let mut logging_config = LoggingConfig::default();
    if let Some(logging) = &raw.logging {
        match logging.kind.as_deref().unwrap_or("") {
            "" | "text" => {}
            "json" => logging_config.json = true,
            other => return Err(format!("logging.type: unknown value {other:?}; use text or json")),
        }
        logging_config.level = logging.level.clone();
        logging_config.stderr = logging.stderr;
        if let Some(level) = &logging.level {
            if !["debug", "info", "warn", "warning", "error"].contains(&level.to_ascii_lowercase().as_str()) {
                return Err(format!("logging.level: unknown value {level:?}; use debug, info, warn or error"));
            }
        }
    }
    let (mut dbs, mut dirs, mut watched) = (Vec::new(), Vec::new(), Vec::new());
    for (i, db) in raw.dbs.into_iter().enumerate() {
        let key = format!("dbs[{i}]");
        let raw_replicas: Vec<(String, RawReplica)> = match (db.replica, db.replicas.is_empty()) {
            (Some(_), false) => return Err(format!("{key}: give replica or replicas, not both")),
            (Some(one), true) => vec![(format!("{key}.replica"), one)],
            (None, _) => {
                db.replicas.into_iter().enumerate().map(|(j, r)| (format!("{key}.replicas[{j}]"), r)).collect()
            }
        };
        let mut replicas: Vec<ReplicaConfig> = Vec::new();
        for (replica_key, replica) in raw_replicas {
            let global = (raw.access_key_id.clone(), raw.secret_access_key.clone());
            let replica = replica_config(replica, &replica_key, global, &mut warnings)?;
            if replicas.iter().any(|r| r.name == replica.name) {
                return Err(format!(
                    "{replica_key}: duplicate replica name {:?}; give each replica of a database its own name",
                    replica.name
                ));
            }
            replicas.push(replica);
        }
        let nonempty = |v: Option<String>| v.filter(|v| !v.is_empty());
        let health_lag = duration_key(&format!("{key}.health-lag"), db.health_lag.as_deref())?;
        match (nonempty(db.path), nonempty(db.dir)) {
            (Some(_), Some(_)) => {
                return Err(format!("{key}: give path (one database) or dir (a directory of them), not both"))
            }
            (None, None) => {
                return Err(format!("{key}.path: required (or dir with pattern, for a directory of databases)"))
            }
            (Some(path), None) => {
                for (field, set) in [
                    ("pattern", db.pattern.is_some()),
                    ("recursive", db.recursive.is_some()),
                    ("watch", db.watch.is_some()),
                ] {
                    if set {
                        return Err(format!("{key}.{field}: only with dir, which {key} does not have"));
                    }
                }
                dbs.push(DbConfig {
                    path: absolute(&path),
                    meta_path: nonempty(db.meta_path).map(|p| absolute(&p)),
                    replicas,
                    watched: false,
                    health_lag,
                });
            }
            (None, Some(dir)) => {
                let pattern =
                    nonempty(db.pattern).ok_or_else(|| format!("{key}.pattern: required with dir, e.g. \"*.db\""))?;
                crate::discover::check_pattern(&pattern).map_err(|e| format!("{key}.pattern: {pattern:?} {e}"))?;
                let watch = db.watch.unwrap_or(false);
                if watch && replicas.iter().any(|r| !r.validation_interval.is_zero()) {
                    return Err(format!("{key}: validation-interval is not available on a watched directory's replicas (remove it, or watch: false)"));
                }
                if db.meta_path.is_some() {
                    return Err(format!("{key}.meta-path: names one database's local state; with dir each database keeps its own beside it (remove meta-path)"));
                }
                let dir = DirConfig {
                    dir: absolute(&dir),
                    pattern,
                    recursive: db.recursive.unwrap_or(false),
                    replicas,
                    health_lag,
                };
                if watch {
                    watched.push(dir);
                } else {
                    dirs.push(dir);
                }
            }
        }
    }
    let any_s3 = dbs
        .iter()
        .flat_map(|db| &db.replicas)
        .chain(dirs.iter().chain(&watched).flat_map(|d| &d.replicas))
        .any(|r| replica_url::kind(&r.url) == "s3");
    for (field, set) in [("access-key-id", &raw.access_key_id), ("secret-access-key", &raw.secret_access_key)] {
        if set.is_some() && !any_s3 {
            warnings.push(format!("{field}: ignored: only s3 replicas use it, and this file has none"));
        }
    }
    let addr = raw.addr.filter(|a| !a.is_empty());
    if let Some(addr) = &addr {
        check_addr(addr).map_err(|e| format!("addr: {e}"))?;
    }
    let health_lag = duration_key("health-lag", raw.health_lag.as_deref())?;
    let heartbeat_interval = duration_key("heartbeat-interval", raw.heartbeat_interval.as_deref())?;
    let heartbeat_url = raw.heartbeat_url.filter(|u| !u.is_empty());
    let idle_release = duration_key("idle-release", raw.idle_release.as_deref())?;
    Ok(Config {
        idle_release,
        dbs,
        dirs,
        watched,
        exec: raw.exec.filter(|e| !e.trim().is_empty()),
        addr,
        health_lag,
        metrics_db_limit: raw.metrics_db_limit,
        heartbeat_url,
        heartbeat_interval,
        logging: logging_config,
        warnings,
    })
}

/// A duration key's value, Go's spelling; an error names the key (`dbs[0].health-lag`).
fn duration_key(key: &str, value: Option<&str>) -> Result<Option<Duration>, String> {
    value.map(go_duration::parse).transpose().map_err(|e| format!("{key}: {e}"))
}

/// `host:port` or `:port`, as Litestream accepts it.
pub(crate) fn check_addr(addr: &str) -> Result<(), String> {
    match addr.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("must specify port for bind address: {addr:?}; use host:port or :port")),
    }
}

fn replica_config(
    raw: RawReplica,
    key: &str,
    (global_key_id, global_secret): (Option<String>, Option<String>),
    warnings: &mut Vec<String>,
) -> Result<ReplicaConfig, String> {
    let url = match (&raw.url, raw.kind.as_deref()) {
        (Some(url), _) => {
            if raw.path.is_some() || raw.bucket.is_some() {
                return Err(format!("{key}: url cannot be combined with path or bucket"));
            }
            url.clone()
        }
        (None, None | Some("file")) => {
            let path = raw
                .path
                .as_deref()
                .filter(|p| !p.is_empty())
                .ok_or_else(|| format!("{key}: a file replica needs path (or url)"))?;
            if path.contains("://") {
                return Err(format!("{key}.path: replica path cannot be a url, please use the 'url' field instead"));
            }
            format!("file://{}", absolute(path).display())
        }
        (None, Some("gcs")) => {
            let bucket = raw
                .bucket
                .as_deref()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| format!("{key}: a gcs replica needs bucket (or url)"))?;
            format!("gcs://{bucket}/{}", raw.path.as_deref().unwrap_or("").trim_start_matches('/'))
        }
        (None, Some("s3")) => {
            let bucket = raw
                .bucket
                .as_deref()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| format!("{key}: bucket required for s3 replica (or url)"))?;
            format!("s3://{bucket}/{}", raw.path.as_deref().unwrap_or("").trim_start_matches('/'))
        }
        (None, Some(other)) => {
            return Err(format!(
                "{key}.type: unknown replica type in config: {other:?}; walstream replicates to file, gcs and s3"
            ))
        }
    };
    let nonempty = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
    let s3 = S3Settings {
        region: nonempty(&raw.region),
        endpoint: nonempty(&raw.endpoint),
        force_path_style: raw.force_path_style,
        skip_verify: raw.skip_verify.unwrap_or(false),
        access_key_id: nonempty(&raw.access_key_id).or(global_key_id.filter(|v| !v.is_empty())),
        secret_access_key: nonempty(&raw.secret_access_key).or(global_secret.filter(|v| !v.is_empty())),
    };
    if replica_url::kind(&url) != "s3" {
        let set = [
            ("region", raw.region.is_some()),
            ("endpoint", raw.endpoint.is_some()),
            ("force-path-style", raw.force_path_style.is_some()),
            ("skip-verify", raw.skip_verify.is_some()),
            ("access-key-id", raw.access_key_id.is_some()),
            ("secret-access-key", raw.secret_access_key.is_some()),
        ];
        for (field, _) in set.iter().filter(|(_, set)| *set) {
            warnings.push(format!("{key}.{field}: ignored: only s3 replicas use it"));
        }
    }
    // Fail now, naming the key, rather than when the replica is first used.
    replica_url::open_with(&url, &s3).map_err(|e| format!("{key}: {e}"))?;
    let name = raw.name.filter(|n| !n.is_empty()).unwrap_or_else(|| replica_url::kind(&url).to_string());
    // Every timing key is checked so that a typo fails at load time, naming the key.
    let duration = |field: &str, value: &Option<String>| duration_key(&format!("{key}.{field}"), value.as_deref());
    let sync_interval =
        duration("sync-interval", &raw.sync_interval)?.unwrap_or(walstream_shipper::DEFAULT_SYNC_INTERVAL);
    let validation_interval = duration("validation-interval", &raw.validation_interval)?.unwrap_or_default();
    let mut policy = walstream_shipper::RetentionPolicy::default();
    if let Some(interval) = duration("snapshot-interval", &raw.snapshot_interval)? {
        policy.snapshot_interval = Some(interval).filter(|i| !i.is_zero());
    }
    if let Some(retention) = duration("retention", &raw.retention)? {
        policy.retention = Some(retention).filter(|r| !r.is_zero());
    }
    if let Some(interval) = duration("retention-check-interval", &raw.retention_check_interval)? {
        if interval.is_zero() {
            return Err(format!("{key}.retention-check-interval: must be more than 0"));
        }
        policy.check_interval = interval;
    }
    let age = match raw.age {
        None => None,
        Some(age) if age.identities.is_empty() && age.recipients.is_empty() => {
            return Err(format!(
                "{key}.age: needs recipients (to encrypt uploads) or identities (to decrypt), or remove the block"
            ))
        }
        Some(age) => {
            Some(Arc::new(AgeKeys::parse(&age.recipients, &age.identities).map_err(|e| format!("{key}.{e}"))?))
        }
    };
    Ok(ReplicaConfig { name, url, policy, sync_interval, validation_interval, age, s3 })
}

/// `~` to the home directory, then absolute against the working directory, as Litestream does.
pub(crate) fn absolute(path: &str) -> PathBuf {
    let expanded = match path.strip_prefix("~/").or((path == "~").then_some("")) {
        Some(rest) => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(rest),
        None => PathBuf::from(path),
    };
    std::path::absolute(&expanded).unwrap_or(expanded)
}

/// Go's `os.ExpandEnv`: `${NAME}` and `$NAME` become the variable's value, empty when unset.
fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(braced) = after.strip_prefix('{') {
            if let Some(end) = braced.find('}') {
                out.push_str(&lookup(&braced[..end]).unwrap_or_default());
                rest = &braced[end + 1..];
                continue;
            }
        }
        let name_len = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        if name_len == 0 {
            out.push('$');
            rest = after;
            continue;
        }
        out.push_str(&lookup(&after[..name_len]).unwrap_or_default());
        rest = &after[name_len..];
    }
    out.push_str(rest);
    out
}

impl Config {
    /// The database configured at `path` (compared as absolute paths).
    pub(crate) fn db(&self, path: &str) -> Result<&DbConfig, ConfigError> {
        let wanted = absolute(path);
        self.dbs
            .iter()
            .find(|db| db.path == wanted)
            .ok_or_else(|| ConfigError(format!("database not found in config: {}", wanted.display())))
    }
}

impl DbConfig {
    /// Its replicas, or only the one named `only`.
    pub(crate) fn replicas(&self, only: Option<&str>) -> Result<Vec<&ReplicaConfig>, ConfigError> {
        match only {
            None => Ok(self.replicas.iter().collect()),
            Some(name) => match self.replicas.iter().find(|r| r.name == name) {
                Some(replica) => Ok(vec![replica]),
                None => Err(ConfigError(format!(
                    "replica {name:?} not found for database {:?}",
                    self.path.display().to_string()
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "
dbs:
  - path: /data/app.db
    replicas:
      - url: gcs://my-bucket/app.db
        sync-interval: 1s
        retention: 72h
      - type: file
        name: local
        path: /backups/app
        snapshot-interval: 1h30m
        retention: 0
        retention-check-interval: 10m
  - path: /data/other.db
    meta-path: /var/lib/walstream/other
    health-lag: 5m
    replicas:
      - type: gcs
        bucket: b2
        path: other
exec: node server.js
addr: :9090
health-lag: 30s
";

    #[test]
    fn litestream_keys_are_read() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(config.dbs.len(), 2);
        let app = config.db("/data/app.db").unwrap();
        let names: Vec<&str> = app.replicas.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["gcs", "local"]);
        assert_eq!(app.replicas[0].url, "gcs://my-bucket/app.db");
        assert_eq!(app.replicas[1].url, "file:///backups/app");
        let hours = |h: u64| Duration::from_secs(h * 3600);
        let (gcs, local) = (app.replicas[0].policy, app.replicas[1].policy);
        assert_eq!(
            (gcs.snapshot_interval, gcs.retention, gcs.check_interval),
            (None, Some(hours(72)), hours(1)),
            "retention as given, Litestream's other defaults"
        );
        assert_eq!(
            (local.snapshot_interval, local.retention, local.check_interval),
            (Some(Duration::from_secs(5400)), None, Duration::from_secs(600)),
            "retention 0 keeps everything"
        );
        assert_eq!(
            config.db("/data/other.db").unwrap().replicas[0].policy,
            walstream_shipper::RetentionPolicy::default()
        );
        assert_eq!(config.db("/data/other.db").unwrap().replicas[0].url, "gcs://b2/other");
        assert_eq!(config.db("/data/other.db").unwrap().meta_path, Some(PathBuf::from("/var/lib/walstream/other")));
        assert_eq!(config.exec.as_deref(), Some("node server.js"));
        assert_eq!(config.addr.as_deref(), Some(":9090"));
        assert_eq!(config.health_lag, Some(Duration::from_secs(30)));
        assert_eq!(config.db("/data/other.db").unwrap().health_lag, Some(Duration::from_secs(300)));
        assert_eq!(app.health_lag, None, "the process's");
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        assert!(config
            .db("/data/missing.db")
            .unwrap_err()
            .to_string()
            .contains("database not found in config: /data/missing.db"));
        assert!(app
            .replicas(Some("s3"))
            .unwrap_err()
            .to_string()
            .contains("replica \"s3\" not found for database \"/data/app.db\""));
    }

    #[test]
    fn s3_replicas_take_litestreams_keys_and_the_global_key_pair() {
        let config = parse("access-key-id: AKID\nsecret-access-key: SECRET\ndbs:\n  - path: /a\n    replicas:\n      - type: s3\n        bucket: b\n        path: /db\n        endpoint: http://127.0.0.1:9000\n        region: eu-west-1\n        skip-verify: true\n      - url: gcs://g/db\n        region: us-east-1\n").unwrap();
        let s3 = &config.dbs[0].replicas[0];
        assert_eq!((s3.name.as_str(), s3.url.as_str()), ("s3", "s3://b/db"));
        assert_eq!(s3.s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.s3.region.as_deref(), Some("eu-west-1"));
        assert!(s3.s3.skip_verify);
        assert_eq!(
            (s3.s3.access_key_id.as_deref(), s3.s3.secret_access_key.as_deref()),
            (Some("AKID"), Some("SECRET"))
        );
        assert_eq!(config.warnings, ["dbs[0].replicas[1].region: ignored: only s3 replicas use it"]);
    }

    #[test]
    fn bad_files_name_the_key() {
        let cases = [
            ("dbs:\n  - replicas: []\n", "dbs[0].path: required"),
            (
                "dbs:\n  - path: /a\n    replicas:\n      - url: gcs://b/x\n      - url: gs://b/y\n",
                "dbs[0].replicas[1]: duplicate replica name \"gcs\"",
            ),
            ("dbs:\n  - path: /a\n    replicas:\n      - path: gcs://b/x\n", "replica path cannot be a url"),
            (
                "dbs:\n  - path: /a\n    replicas:\n      - type: abs\n        bucket: b\n",
                "dbs[0].replicas[0].type: unknown replica type",
            ),
            (
                "dbs:\n  - path: /a\n    replicas:\n      - type: s3\n",
                "dbs[0].replicas[0]: bucket required for s3 replica",
            ),
            (
                "dbs:\n  - path: /a\n    replicas:\n      - url: file:///r\n        sync-interval: abc\n",
                "dbs[0].replicas[0].sync-interval: invalid duration \"abc\"",
            ),
            ("logging:\n  type: xml\n", "logging.type: unknown value \"xml\""),
            ("addr: localhost\n", "addr: must specify port for bind address"),
            ("health-lag: soon\n", "health-lag: invalid duration \"soon\""),
            ("idle-release: soon\n", "idle-release: invalid duration \"soon\""),
            (
                "dbs:\n  - path: /a\n    health-lag: later\n    replicas:\n      - url: file:///r\n",
                "dbs[0].health-lag: invalid duration \"later\"",
            ),
            (
                "dbs:\n  - path: /a\n    replicas:\n      - url: file:///r\n        retension: 1h\n",
                "dbs[0].replicas[0].retension: unknown key; did you mean retention?",
            ),
            ("dbs:\n  - path: [1, 2]\n", "line 2"),
            ("dbs:\n  - path: /a\n    dir: /d\n    pattern: \"*.db\"\n", "dbs[0]: give path (one database) or dir"),
            ("dbs:\n  - dir: /d\n    replica:\n      url: file:///r\n", "dbs[0].pattern: required with dir"),
            ("dbs:\n  - dir: /d\n    pattern: \"[a-*.db\"\n", "dbs[0].pattern: \"[a-*.db\" has a [ with no closing ]"),
            (
                "dbs:\n  - dir: /d\n    pattern: \"*.db\"\n    watch: true\n    replica:\n      url: file:///r\n      validation-interval: 1m\n",
                "dbs[0]: validation-interval is not available on a watched directory's replicas",
            ),
            ("dbs:\n  - path: /a\n    recursive: true\n", "dbs[0].recursive: only with dir"),
            (
                "dbs:\n  - dir: /d\n    pattern: \"*\"\n    meta-path: /m\n",
                "dbs[0].meta-path: names one database's local state",
            ),
            (
                "dbs:\n  - path: /a\n    replica:\n      url: file:///r\n    replicas:\n      - url: file:///s\n",
                "dbs[0]: give replica or replicas, not both",
            ),
            (
                "dbs:\n  - path: /a\n    replica:\n      urll: file:///r\n",
                "dbs[0].replica.urll: unknown key; did you mean url?",
            ),
        ];
        for (text, want) in cases {
            let error = parse(text).unwrap_err();
            assert!(error.contains(want), "{text:?}: {error}");
        }
    }

    /// Litestream 0.5's directory entry: its databases are found at load, each under its own
    /// replica path; `replica:` (one) reads as a list of one.
    #[test]
    fn a_dir_entry_becomes_one_database_per_match_under_its_relative_path() {
        let dir = tempfile::tempdir().unwrap();
        for rel in ["t1.db", "team/t2.db", "notes.txt"] {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            rusqlite::Connection::open(&path).unwrap().execute_batch("CREATE TABLE t (x)").unwrap();
        }
        let file = dir.path().join("walstream.yml");
        let text = format!(
            "dbs:\n  - path: {}/main.sqlite\n    replica:\n      url: gcs://b/main\n  - dir: {}\n    pattern: \"*.db\"\n    recursive: true\n    replica:\n      url: gcs://b/tenants/\n      sync-interval: 5s\n",
            dir.path().display(),
            dir.path().display()
        );
        std::fs::write(&file, text).unwrap();
        let config = load(&file, false).unwrap();
        let dbs: Vec<(String, &str, Duration)> = config
            .dbs
            .iter()
            .map(|db| (db.path.display().to_string(), db.replicas[0].url.as_str(), db.replicas[0].sync_interval))
            .collect();
        let root = dir.path().display();
        assert_eq!(
            dbs,
            [
                (format!("{root}/main.sqlite"), "gcs://b/main", Duration::from_secs(1)),
                (format!("{root}/t1.db"), "gcs://b/tenants/t1.db", Duration::from_secs(5)),
                (format!("{root}/team/t2.db"), "gcs://b/tenants/team/t2.db", Duration::from_secs(5)),
            ]
        );
        // The same database by path and by dir would get two replicators.
        let twice = dir.path().join("twice.yml");
        std::fs::write(&twice, format!("dbs:\n  - path: {root}/t1.db\n    replica:\n      url: file:///r\n  - dir: {root}\n    pattern: \"t1.db\"\n    replica:\n      url: file:///s\n")).unwrap();
        assert!(
            load(&twice, false).unwrap_err().0.contains("t1.db is named twice"),
            "{:?}",
            load(&twice, false).unwrap_err()
        );
        let missing = dir.path().join("missing.yml");
        std::fs::write(&missing, format!("dbs:\n  - dir: {root}/nowhere\n    pattern: \"*.db\"\n")).unwrap();
        assert!(load(&missing, false).unwrap_err().0.contains("nowhere: cannot read it"));
    }

    #[test]
    fn environment_is_expanded_like_go() {
        let lookup = |name: &str| (name == "BUCKET").then(|| "prod".to_string());
        assert_eq!(expand("url: gcs://${BUCKET}/$BUCKET/db $UNSET.", lookup), "url: gcs://prod/prod/db .");
        assert_eq!(expand("price: 5$ and $", lookup), "price: 5$ and $");
    }
}
