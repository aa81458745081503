//! `walstream replicate`: the databases to replicate (command line or config file), one
//! shipper each, and the `-exec` supervision loop.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;
use walstream_shipper::{LeasePolicy, Replica, Shipper, ShipperConfig};

use crate::args::ReplicateArgs;
use crate::signals::{spawn_signal_handler, FIRST_SIGNAL};
use crate::{config, exec, fleet, heartbeat, metrics, replica_url, server, validate};

/// How long a replica may hold back a captured commit before `/healthz` fails.
const DEFAULT_HEALTH_LAG: std::time::Duration = std::time::Duration::from_secs(60);

/// One database to replicate, and where.
struct Job {
    config: ShipperConfig,
    replicas: Vec<Replica>,
    /// The replicas with a `validation-interval`: their place in `replicas`, and the interval.
    validated: Vec<(usize, std::time::Duration)>,
}

/// What the config file adds to the jobs: its `exec` and `addr`, and its watched directories.
#[derive(Default)]
struct Extras {
    watched: Vec<fleet::Watched>,
    exec: Option<String>,
    addr: Option<String>,
    health_lag: Option<std::time::Duration>,
    metrics_db_limit: Option<usize>,
    heartbeat_url: Option<String>,
    heartbeat_interval: Option<std::time::Duration>,
}

/// The databases `replicate` was asked for: the one on the command line, or every one in the
/// config file.
fn replication_jobs(args: &ReplicateArgs) -> anyhow::Result<(Vec<Job>, Extras)> {
    let open = |name: &str, url: &str, s3: &walstream_store::S3Settings| -> anyhow::Result<Replica> {
        Ok(Replica::new(name, Arc::from(replica_url::open_with(url, s3)?)))
    };
    if let Some(db_path) = &args.db_path {
        if args.config.config.is_some() {
            return Err(config::ConfigError("cannot specify a replica URL and the -config flag".into()).into());
        }
        anyhow::ensure!(
            !args.replica_urls.is_empty(),
            "must specify at least one replica URL for {}",
            db_path.display()
        );
        let replicas = args
            .replica_urls
            .iter()
            .map(|url| {
                Ok(Replica {
                    sync_interval: args.sync_interval,
                    ..open(replica_url::kind(url), url, &Default::default())?
                })
            })
            .collect::<anyhow::Result<_>>()?;
        return Ok((
            vec![Job { config: shipper_config(args, db_path, args.idle_release), replicas, validated: Vec::new() }],
            Extras::default(),
        ));
    }
    let path = args.config.config.clone().unwrap_or_else(config::default_path);
    let file = config::load(&path, !args.config.no_expand_env)?;
    if file.dbs.is_empty() && file.watched.is_empty() {
        return Err(
            config::ConfigError(format!("config file {}: no databases specified in dbs", path.display())).into()
        );
    }
    let idle_release = args.idle_release.or(file.idle_release).or_else(|| {
        // Many databases: what an idle one holds counts; one: its pin costs nothing that matters.
        (file.dbs.len() + file.watched.len() > 1).then_some(DEFAULT_IDLE_RELEASE_OF_MANY)
    });
    let mut jobs = Vec::new();
    for db in file.dbs.iter().filter(|db| !db.watched) {
        let replicas = replicas_of(db, &path)?;
        let config = ShipperConfig {
            meta_dir: db.meta_path.clone(),
            health_lag: db.health_lag,
            ..shipper_config(args, &db.path, idle_release)
        };
        let validated = db
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.validation_interval.is_zero())
            .map(|(i, r)| (i, r.validation_interval))
            .collect();
        jobs.push(Job { config, replicas, validated });
    }
    Ok((
        jobs,
        Extras {
            watched: watched_dirs(args, &file, &path, idle_release),
            exec: file.exec,
            addr: file.addr,
            health_lag: file.health_lag,
            metrics_db_limit: file.metrics_db_limit,
            heartbeat_url: file.heartbeat_url,
            heartbeat_interval: file.heartbeat_interval,
        },
    ))
}

/// The replicas of one database of the config file.
fn replicas_of(db: &config::DbConfig, path: &std::path::Path) -> anyhow::Result<Vec<Replica>> {
    db.replicas
        .iter()
        .map(|r| {
            if r.age.as_ref().is_some_and(|keys| !keys.seals()) {
                return Err(config::ConfigError(format!(
                    "config file {}: replica {} of {}: age has identities but no recipients, so walstream would upload in the clear; add age.recipients",
                    path.display(),
                    r.name,
                    db.path.display()
                ))
                .into());
            }
            let store = replica_url::open_with(&r.url, &r.s3)?;
            Ok(Replica {
                policy: r.policy,
                sync_interval: r.sync_interval,
                age: r.age.clone(),
                ..Replica::new(&r.name, Arc::from(store))
            })
        })
        .collect()
}

/// The watched directories of the config file, each making the shipper of a database found in
/// it as `replicate` would for a database the file names.
fn watched_dirs(
    args: &ReplicateArgs,
    file: &config::Config,
    path: &std::path::Path,
    idle_release: Option<std::time::Duration>,
) -> Vec<fleet::Watched> {
    file.watched
        .iter()
        .map(|dir| {
            let (template, path, entry) =
                (shipper_config(args, std::path::Path::new(""), idle_release), path.to_path_buf(), dir.clone());
            fleet::Watched {
                dir: dir.dir.clone(),
                pattern: dir.pattern.clone(),
                recursive: dir.recursive,
                shipper_for: Box::new(move |db_path, relative| {
                    let db = entry.database(db_path, relative);
                    let replicas = replicas_of(&db, &path)?;
                    Ok(Shipper::new(
                        ShipperConfig { db_path: db.path, health_lag: db.health_lag, ..template.clone() },
                        replicas,
                    ))
                }),
            }
        })
        .collect()
}

/// `idle-release` when the process replicates more than one database and nothing sets it.
const DEFAULT_IDLE_RELEASE_OF_MANY: std::time::Duration = std::time::Duration::from_secs(10);

/// What the command line sets for every database it replicates; `idle_release` as resolved for
/// the whole process (zero: never).
fn shipper_config(
    args: &ReplicateArgs,
    db_path: &std::path::Path,
    idle_release: Option<std::time::Duration>,
) -> ShipperConfig {
    ShipperConfig {
        idle_release: idle_release.filter(|d| !d.is_zero()),
        shutdown_deadline: args.shutdown_timeout,
        lease: lease_policy(args),
        max_local_wal: (args.max_local_wal > 0).then_some(args.max_local_wal),
        snapshot_wal_ratio: args.snapshot_wal_ratio,
        ..ShipperConfig::new(db_path)
    }
}

fn lease_policy(args: &ReplicateArgs) -> Option<LeasePolicy> {
    (!args.no_lease).then_some(LeasePolicy { ttl: args.lease_ttl, wait: args.lease_timeout })
}

pub(crate) async fn replicate(args: ReplicateArgs) -> anyhow::Result<()> {
    let (jobs, mut extras) = replication_jobs(&args)?;
    let watched = std::mem::take(&mut extras.watched);
    let rest = jobs.iter().all(|job| job.config.idle_release.is_some());
    if let Some(awake) = crate::fd_limit::ensure_for(jobs.len(), rest)? {
        tracing::info!(databases = jobs.len(), awake, "more databases than the open-file limit lets be awake at once: idle ones rest early while others wait to wake");
        walstream_shipper::limit_awake_databases(awake);
    }
    let command = args.exec.clone().or(extras.exec);
    let mut validations = Vec::new();
    let mut shippers = Vec::new();
    for job in jobs {
        let ages: Vec<_> = job.replicas.iter().map(|r| r.age.clone()).collect();
        let shipper = Shipper::new(job.config, job.replicas);
        validations.extend(job.validated.iter().filter_map(|&(replica, interval)| {
            validate::Validation::new(shipper.handle(), replica, interval, ages[replica].clone())
        }));
        shippers.push(shipper);
    }
    let databases = fleet::Databases::default();
    // Bound before anything starts, so a taken port fails the command at once.
    let listener = match args.addr.clone().or(extras.addr) {
        Some(addr) => Some(server::bind(&addr).await?),
        None => None,
    };
    let heartbeat = match args.heartbeat_url.clone().or(extras.heartbeat_url) {
        Some(url) => {
            let interval = args.heartbeat_interval.or(extras.heartbeat_interval).unwrap_or(heartbeat::DEFAULT_INTERVAL);
            if interval < heartbeat::MIN_INTERVAL {
                return Err(config::ConfigError(format!("heartbeat-interval {interval:?}: give at least 1s (dead-man's switch services count in minutes; 5m is the default)")).into());
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(
                    config::ConfigError(format!("heartbeat-url {url:?}: want an http:// or https:// URL")).into()
                );
            }
            Some((url, interval))
        }
        None => None,
    };
    let signalled = CancellationToken::new();
    spawn_signal_handler(signalled.clone())?;
    let mut dbs: Vec<String> = shippers.iter().map(|s| s.handle().db_path().display().to_string()).collect();
    dbs.extend(watched.iter().map(|w| format!("{}/{} (watched)", w.dir.display(), w.pattern)));
    // Logged once signals are handled: from here on SIGTERM always means a final flush.
    info!(dbs = ?dbs, "walstream v{} started", env!("CARGO_PKG_VERSION"));
    // Served until replication has ended, so /sync keeps answering during the final flush.
    let stop_serving = CancellationToken::new();
    let _stop_serving_on_return = stop_serving.clone().drop_guard();
    let health_lag = args.health_lag.or(extras.health_lag).unwrap_or(DEFAULT_HEALTH_LAG);
    // Like the server, ends with replication.
    if let Some((url, interval)) = heartbeat {
        tokio::spawn(heartbeat::run(url, interval, databases.clone(), health_lag, stop_serving.clone()));
    }
    for validation in validations {
        tokio::spawn(validate::run(validation, stop_serving.clone()));
    }
    if listener.is_none() && extras.metrics_db_limit.is_some() {
        tracing::warn!("metrics-db-limit: ignored: nothing serves /metrics; set addr, or give -addr");
    }
    if let Some(listener) = listener {
        let metrics = metrics::Metrics::new(
            databases.clone(),
            health_lag,
            extras.metrics_db_limit.unwrap_or(metrics::DEFAULT_DB_LIMIT),
        );
        tokio::spawn(server::serve(listener, databases.clone(), metrics, health_lag, stop_serving));
    }
    let Some(command) = command else {
        return fleet::run(shippers, watched, databases, signalled).await;
    };

    let stop_shipping = CancellationToken::new();
    let shipper = fleet::run(shippers, watched, databases, stop_shipping.clone());
    tokio::pin!(shipper);
    let mut child = exec::spawn(&command)?;
    let mut forwarded = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.context("waiting for the -exec command")?,
            () = signalled.cancelled(), if forwarded.is_none() => {
                let signal = FIRST_SIGNAL.load(std::sync::atomic::Ordering::SeqCst);
                exec::forward(&child, signal);
                forwarded = Some(signal);
            }
            result = &mut shipper => {
                // Replication failed (or ended) under a running app: stop the app rather than
                // let it write what nobody ships.
                exec::forward(&child, libc::SIGTERM);
                let _ = child.wait().await;
                return result;
            }
        }
    };
    info!(status = %status, "-exec command exited, walstream shutting down");
    stop_shipping.cancel();
    shipper.await?;
    match exec::exit_code(status, forwarded) {
        0 => Ok(()),
        code => Err(crate::exit::AppExit(code).into()),
    }
}
