//! The `walstream` command. It parses arguments (accepting Litestream's single-dash flags),
//! sets up logging and signals, picks the store for each replica URL, and maps every error to
//! one exit code, here and nowhere else.

mod args;
mod config;
mod dry_run;
mod exec;
mod exit;
mod list;
mod logging;
mod progress;
mod ready;
mod replica_url;
mod source;

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::info;
use walstream_shipper::{Replica, Shipper, ShipperConfig};

use args::{Cli, Command, ConfigArgs, ListArgs, ReplicateArgs, RestoreArgs};
use walstream_restore::{ReplicaListing, RestorePlan};

fn main() {
    let cli = Cli::parse_from(args::litestream_style_argv(std::env::args_os()));
    // For deploy manifests' tests: is this command line one walstream accepts? Parsing (above)
    // exits 2 with clap's message if not; nothing else runs.
    if std::env::var_os("WALSTREAM_CHECK_ARGS").is_some() {
        println!("ok: {:?}", cli.command);
        std::process::exit(exit::OK);
    }
    logging::init(log_settings(&cli));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(run(cli));
    let code = match result {
        Ok(()) => exit::OK,
        Err(e) => {
            tracing::error!("{:#}", e);
            exit::code_for(&e)
        }
    };
    // Uploads that outlived the shutdown deadline must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}

/// The config file's `logging` keys when this command reads a config file. A config that cannot
/// be read gives the defaults here; the command itself then reports why.
fn log_settings(cli: &Cli) -> logging::Settings {
    let (config_args, daemon) = match &cli.command {
        Command::Replicate(args) if args.db_path.is_none() => (&args.config, true),
        Command::Restore(args) if !args::is_url(&args.source) => (&args.config, false),
        Command::Generations(args) | Command::Snapshots(args) | Command::Wal(args) if !args::is_url(&args.source) => (&args.config, false),
        Command::Databases(args) | Command::Config(args::ConfigCommand::Check(args)) => (args, false),
        _ => return logging::Settings::default(),
    };
    let path = config_args.config.clone().unwrap_or_else(config::default_path);
    match config::load(&path, !config_args.no_expand_env) {
        Ok(config) => logging::Settings::from_config(&config.logging, daemon),
        Err(_) => logging::Settings::default(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Replicate(args) => replicate(args).await,
        Command::Restore(args) => restore(args).await,
        Command::Generations(args) => print_listing(args, list::Kind::Generations).await,
        Command::Snapshots(args) => print_listing(args, list::Kind::Snapshots).await,
        Command::Wal(args) => print_listing(args, list::Kind::Wal).await,
        Command::Databases(args) => print_databases(&args),
        Command::Config(args::ConfigCommand::Check(args)) => check_config(&args),
        Command::Version => {
            println!("walstream v{} (litestream v0.3.13 compatible)", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

/// One database to replicate, and where.
struct Job {
    config: ShipperConfig,
    replicas: Vec<Replica>,
}

/// The databases `replicate` was asked for: the one on the command line, or every one in the
/// config file. Also the config's `exec`, if it was read.
fn replication_jobs(args: &ReplicateArgs) -> anyhow::Result<(Vec<Job>, Option<String>)> {
    let open = |name: &str, url: &str| -> anyhow::Result<Replica> { Ok(Replica { name: name.to_string(), store: Arc::from(replica_url::open(url)?) }) };
    if let Some(db_path) = &args.db_path {
        if args.config.config.is_some() {
            return Err(config::ConfigError("cannot specify a replica URL and the -config flag".into()).into());
        }
        anyhow::ensure!(!args.replica_urls.is_empty(), "must specify at least one replica URL for {}", db_path.display());
        let replicas = args.replica_urls.iter().map(|url| open(replica_url::kind(url), url)).collect::<anyhow::Result<_>>()?;
        let mut config = ShipperConfig::new(db_path);
        config.shutdown_deadline = args.shutdown_timeout;
        return Ok((vec![Job { config, replicas }], None));
    }
    let path = args.config.config.clone().unwrap_or_else(config::default_path);
    let file = config::load(&path, !args.config.no_expand_env)?;
    if file.dbs.is_empty() {
        return Err(config::ConfigError(format!("config file {}: no databases specified in dbs", path.display())).into());
    }
    let mut jobs = Vec::new();
    for db in &file.dbs {
        let replicas = db.replicas.iter().map(|r| open(&r.name, &r.url)).collect::<anyhow::Result<_>>()?;
        let mut config = ShipperConfig::new(&db.path);
        config.meta_dir = db.meta_path.clone();
        config.shutdown_deadline = args.shutdown_timeout;
        jobs.push(Job { config, replicas });
    }
    Ok((jobs, file.exec))
}

/// Replicates every job until `shutdown`, then flushes each. If one fails, the others are
/// stopped (and flushed) too, and the first error is returned.
async fn ship_all(jobs: Vec<Job>, shutdown: CancellationToken) -> anyhow::Result<()> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let stop = shutdown.child_token();
    let mut running: FuturesUnordered<_> = jobs
        .into_iter()
        .map(|job| {
            let (stop, db) = (stop.clone(), job.config.db_path.clone());
            async move { Shipper::new(job.config, job.replicas).run(stop).await.with_context(|| format!("replicate {}", db.display())) }
        })
        .collect();
    let mut first_error = None;
    while let Some(result) = running.next().await {
        if let Err(e) = result {
            stop.cancel();
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn replicate(args: ReplicateArgs) -> anyhow::Result<()> {
    let (jobs, config_exec) = replication_jobs(&args)?;
    let command = args.exec.clone().or(config_exec);
    let signalled = CancellationToken::new();
    spawn_signal_handler(signalled.clone())?;
    let dbs: Vec<String> = jobs.iter().map(|j| j.config.db_path.display().to_string()).collect();
    // Logged once signals are handled: from here on SIGTERM always means a final flush.
    info!(dbs = ?dbs, "walstream v{} started", env!("CARGO_PKG_VERSION"));
    let Some(command) = command else {
        return ship_all(jobs, signalled).await;
    };

    let stop_shipping = CancellationToken::new();
    let shipper = ship_all(jobs, stop_shipping.clone());
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
        code => Err(exec::AppExit(code).into()),
    }
}

async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    // Installed first: a SIGTERM while downloading abandons the restore cleanly, and one while
    // serving readiness ends the process with 0.
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    restore_database(&args, &shutdown).await?;
    match &args.serve_ready {
        Some(addr) if !args.dry_run => ready::serve(addr, shutdown).await,
        _ => Ok(()),
    }
}

/// Restores, or decides that nothing needs restoring; either way the database is ready after an
/// `Ok`.
async fn restore_database(args: &RestoreArgs, shutdown: &CancellationToken) -> anyhow::Result<()> {
    // Everything local first: a bad config or URL fails before any network access, and a warm
    // restart of a pod (-if-db-not-exists) costs nothing.
    let source = source::resolve(&args.source, &args.config, args.replica.as_deref())?;
    let output = match (&args.output, &source.db) {
        (Some(output), _) => output.clone(),
        (None, Some(db)) => db.clone(),
        (None, None) => anyhow::bail!("output path required: give -o PATH when restoring from a replica URL"),
    };
    if args.if_db_not_exists && output.exists() {
        info!(path = %output.display(), "database already exists, skipping");
        return Ok(());
    }
    if output.exists() && !args.dry_run {
        return Err(walstream_restore::Error::OutputExists { path: output }.into());
    }
    let options = walstream_restore::RestoreOptions { output, target: target(args), parallelism: args.parallelism as usize, progress: progress::bar_if_terminal() };
    let context = || format!("restore {} to {}", args.source, options.output.display());
    let work = async {
        let Some(chosen) = choose_replica(&source, &options.target).await? else {
            return Ok(false);
        };
        if args.dry_run {
            print!("replica     {}\n{}", chosen.name, dry_run::describe(&chosen.plan, options.parallelism));
            if dry_run::estimate(&chosen.plan, options.parallelism) > dry_run::CLOUD_RUN_STARTUP_WINDOW {
                tracing::warn!("this restore would not fit Cloud Run's 240 s startup-probe window; restore to a persistent volume or snapshot more often");
            }
        } else {
            walstream_restore::restore_plan(chosen.store.as_ref(), chosen.plan, &options).await.map_err(anyhow::Error::new)?;
        }
        Ok::<bool, anyhow::Error>(true)
    };
    let found = tokio::select! {
        // Dropping the restore removes its temporary file.
        result = work => result.with_context(context)?,
        () = shutdown.cancelled() => return Err(anyhow::Error::new(exit::Interrupted).context(context())),
    };
    if !found {
        if args.if_replica_exists {
            info!("no matching backups found");
            return Ok(());
        }
        return Err(anyhow::Error::new(walstream_restore::Error::NoBackups).context(context()));
    }
    Ok(())
}

/// The replica a restore reads, and what it will apply.
struct ChosenReplica {
    name: String,
    store: Box<dyn walstream_store::ObjectStore>,
    plan: RestorePlan,
    /// When the plan's generation was last written to.
    updated: Option<std::time::SystemTime>,
}

/// Plans the restore on every replica and keeps the one whose chosen generation was updated
/// last, as Litestream does. `None` when no replica has a backup.
async fn choose_replica(source: &source::Source, target: &walstream_restore::Target) -> anyhow::Result<Option<ChosenReplica>> {
    let mut best: Option<ChosenReplica> = None;
    for replica in &source.replicas {
        let store = replica_url::open(&replica.url)?;
        let listing = walstream_restore::list_replica(store.as_ref()).await.with_context(|| format!("replica {}", replica.name))?;
        let updated: std::collections::BTreeMap<_, _> = listing.generations.iter().map(|(id, g)| (*id, g.updated())).collect();
        match walstream_restore::plan_from(listing, target) {
            Ok(plan) => {
                let updated = updated.get(&plan.generation).copied().flatten();
                if best.as_ref().is_none_or(|best| updated > best.updated) {
                    best = Some(ChosenReplica { name: replica.name.clone(), store, plan, updated });
                }
            }
            Err(e) if e.is_no_backups() => continue,
            Err(e) => return Err(anyhow::Error::new(e).context(format!("replica {}", replica.name))),
        }
    }
    Ok(best)
}

fn target(args: &RestoreArgs) -> walstream_restore::Target {
    walstream_restore::Target { generation: args.generation, index: args.index, timestamp: args.timestamp }
}

async fn print_listing(args: ListArgs, kind: list::Kind) -> anyhow::Result<()> {
    let source = source::resolve(&args.source, &args.config, args.replica.as_deref())?;
    let mut listings: Vec<(String, ReplicaListing)> = Vec::new();
    for replica in &source.replicas {
        let store = replica_url::open(&replica.url)?;
        let mut listing = walstream_restore::list_replica(store.as_ref()).await.with_context(|| format!("list replica {} ({})", replica.name, replica.url))?;
        if let Some(generation) = args.generation {
            listing.generations.retain(|id, _| *id == generation);
        }
        listings.push((replica.name.clone(), listing));
    }
    // Litestream's lag: from the database's last change when it is known, else from now.
    let now = source.db.as_deref().and_then(list::last_change).unwrap_or_else(std::time::SystemTime::now);
    print!("{}", list::table(kind, &listings, now));
    Ok(())
}

fn check_config(args: &ConfigArgs) -> anyhow::Result<()> {
    let path = args.config.clone().unwrap_or_else(config::default_path);
    let config = config::load(&path, !args.no_expand_env)?;
    let replicas: usize = config.dbs.iter().map(|db| db.replicas.len()).sum();
    println!("{}: ok, {} databases, {replicas} replicas", path.display(), config.dbs.len());
    Ok(())
}

fn print_databases(args: &ConfigArgs) -> anyhow::Result<()> {
    let path = args.config.clone().unwrap_or_else(config::default_path);
    let config = config::load(&path, !args.no_expand_env)?;
    print!("{}", list::databases(&config));
    Ok(())
}

/// The first SIGTERM or SIGINT received, for passing on to an `-exec` command.
static FIRST_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(libc::SIGTERM);

/// The first SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once. The
/// handlers are in place when this returns.
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        let signal = tokio::select! { _ = term.recv() => libc::SIGTERM, _ = int.recv() => libc::SIGINT };
        FIRST_SIGNAL.store(signal, std::sync::atomic::Ordering::SeqCst);
        info!(signal, "signal received, walstream shutting down");
        shutdown.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting without finishing the flush");
        std::process::exit(exit::INTERRUPTED);
    });
    Ok(())
}
