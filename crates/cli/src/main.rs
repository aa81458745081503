//! The `walstream` command. It parses arguments (accepting Litestream's single-dash flags),
//! sets up logging and signals, picks the store for each replica URL, and maps every error to
//! one exit code, here and nowhere else.

mod args;
mod dry_run;
mod exit;
mod list;
mod progress;
mod ready;
mod replica_url;

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::info;
use walstream_shipper::{Replica, Shipper, ShipperConfig};

use args::{Cli, Command, ListArgs, ReplicateArgs, RestoreArgs};

fn main() {
    let cli = Cli::parse_from(args::litestream_style_argv(std::env::args_os()));
    init_logging();
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

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WALSTREAM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal; log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).with_target(false).init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Replicate(args) => replicate(args).await,
        Command::Restore(args) => restore(args).await,
        Command::Generations(args) => print_listing(args, |name, listing| list::generations(name, listing, std::time::SystemTime::now())).await,
        Command::Snapshots(args) => print_listing(args, list::snapshots).await,
        Command::Wal(args) => print_listing(args, list::wal).await,
        Command::Version => {
            println!("walstream v{} (litestream v0.3.13 compatible)", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

async fn replicate(args: ReplicateArgs) -> anyhow::Result<()> {
    let mut replicas = Vec::new();
    for url in &args.replica_urls {
        let store = replica_url::open(url)?;
        replicas.push(Replica { name: replica_url::kind(url).to_string(), store: Arc::from(store) });
    }
    let mut config = ShipperConfig::new(&args.db_path);
    config.shutdown_deadline = args.shutdown_timeout;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    // Logged once signals are handled: from here on SIGTERM always means a final flush.
    info!(db = %args.db_path.display(), replicas = ?args.replica_urls, "walstream v{} started", env!("CARGO_PKG_VERSION"));
    Shipper::new(config, replicas).run(shutdown).await.with_context(|| format!("replicate {}", args.db_path.display()))
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
    // Checked before any network access, so a warm restart of a pod costs nothing.
    if args.if_db_not_exists && args.output.exists() {
        info!(path = %args.output.display(), "database already exists, skipping");
        return Ok(());
    }
    let store = open_replica(&args.replica_url, args.replica.as_deref())?;
    let options = walstream_restore::RestoreOptions { output: args.output.clone(), target: target(args), parallelism: args.parallelism as usize, progress: progress::bar_if_terminal() };
    let context = || format!("restore {} to {}", args.replica_url, args.output.display());
    let result = if args.dry_run {
        match walstream_restore::plan(store.as_ref(), &options.target).await {
            Ok(plan) => {
                print!("{}", dry_run::describe(&plan, options.parallelism));
                if dry_run::estimate(&plan, options.parallelism) > dry_run::CLOUD_RUN_STARTUP_WINDOW {
                    tracing::warn!("this restore would not fit Cloud Run's 240 s startup-probe window; restore to a persistent volume or snapshot more often");
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    } else {
        tokio::select! {
            // Dropping the restore removes its temporary file.
            result = walstream_restore::restore(store.as_ref(), &options) => result.map(|_| ()),
            () = shutdown.cancelled() => return Err(anyhow::Error::new(exit::Interrupted).context(context())),
        }
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.is_no_backups() && args.if_replica_exists => {
            info!("no matching backups found");
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context(context())),
    }
}

fn target(args: &RestoreArgs) -> walstream_restore::Target {
    walstream_restore::Target { generation: args.generation, index: args.index, timestamp: args.timestamp }
}

/// Opens a replica URL, honouring `-replica NAME` as Litestream does in URL mode, where the
/// only replica is named after its type.
fn open_replica(url: &str, only: Option<&str>) -> anyhow::Result<Box<dyn walstream_store::ObjectStore>> {
    let store = replica_url::open(url)?;
    if let Some(name) = only.filter(|name| *name != replica_url::kind(url)) {
        anyhow::bail!("replica {name:?} not found for {url:?} (in URL mode the only replica is named {:?})", replica_url::kind(url));
    }
    Ok(store)
}

async fn print_listing(args: ListArgs, table: impl Fn(&str, &walstream_restore::ReplicaListing) -> String) -> anyhow::Result<()> {
    let store = open_replica(&args.replica_url, args.replica.as_deref())?;
    let mut listing = walstream_restore::list_replica(store.as_ref()).await.with_context(|| format!("list {}", args.replica_url))?;
    if let Some(generation) = args.generation {
        listing.generations.retain(|id, _| *id == generation);
    }
    print!("{}", table(replica_url::kind(&args.replica_url), &listing));
    Ok(())
}

/// The first SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once. The
/// handlers are in place when this returns.
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        info!("signal received, walstream shutting down");
        shutdown.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting without finishing the flush");
        std::process::exit(exit::INTERRUPTED);
    });
    Ok(())
}
