//! The `walstream` command. It parses arguments (accepting Litestream's single-dash flags),
//! sets up logging and signals, picks the store for each replica URL, and maps every error to
//! one exit code, here and nowhere else.

mod args;
mod config;
mod config_keys;
mod dir_watch;
mod discover;
mod dry_run;
mod exec;
mod exit;
mod fd_limit;
mod fleet;
mod go_duration;
mod heartbeat;
mod list;
mod logging;
mod metrics;
mod process_metrics;
mod progress;
mod ready;
mod replica_url;
mod replicate;
mod restore;
mod server;
mod signals;
mod source;
mod sync_client;
mod validate;
mod verify;

use anyhow::Context;
use clap::Parser;

use args::{Cli, Command, ConfigArgs, ListArgs};
use walstream_restore::ReplicaListing;

/// Large buffers (restore's parts, replicate's segments and copy chunks, a few MiB each) are
/// freed on several threads. glibc gives each thread its own arena and, once a large buffer has
/// been freed, serves the next ones from the arena instead of `mmap`, keeping every arena's
/// high-water mark resident: about 11 MiB more than the buffers alive at once on a 200 MB
/// restore, and a flat-out writer's replicator peaked at 59 MiB instead of 33 (since shipping
/// once a second, 7242bcd, each upload slot frees several segments at once). Two arenas and a
/// fixed `mmap` threshold return large buffers to the system as they are freed. Called before
/// the runtime starts any thread.
fn bound_allocator_caches() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

fn main() {
    let cli = Cli::parse_from(args::litestream_style_argv(std::env::args_os()));
    // For deploy manifests' tests: is this command line one walstream accepts? Parsing (above)
    // exits 2 with clap's message if not; nothing else runs.
    if std::env::var_os("WALSTREAM_CHECK_ARGS").is_some() {
        println!("ok: {:?}", cli.command);
        std::process::exit(exit::OK);
    }
    logging::init(log_settings(&cli));
    bound_allocator_caches();
    // Blocking work (opening databases, file:// replicas' writes) queues for 16 threads rather
    // than Tokio's default of up to 512: with thousands of databases starting or shipping at
    // once, the default made hundreds of threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
        .expect("tokio runtime");
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
    let mut settings = config_log_settings(cli);
    if let Command::Restore(args) = &cli.command {
        if args.verbose {
            settings.level = Some("debug".into());
        }
    }
    settings
}

fn config_log_settings(cli: &Cli) -> logging::Settings {
    let (config_args, daemon) = match &cli.command {
        Command::Replicate(args) if args.db_path.is_none() => (&args.config, true),
        Command::Restore(args) if !args::is_url(&args.source) => (&args.config, false),
        Command::Generations(args) | Command::Snapshots(args) | Command::Wal(args) if !args::is_url(&args.source) => {
            (&args.config, false)
        }
        Command::Verify(args) if !args::is_url(&args.source) => (&args.config, false),
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
        Command::Replicate(args) => replicate::replicate(args).await,
        Command::Restore(args) => restore::restore(args).await,
        Command::Generations(args) => print_listing(args, list::Kind::Generations).await,
        Command::Snapshots(args) => print_listing(args, list::Kind::Snapshots).await,
        Command::Wal(args) => print_listing(args, list::Kind::Wal).await,
        Command::Databases(args) => print_databases(&args),
        Command::Sync(args) => sync_client::sync(args).await,
        Command::Verify(args) => verify::verify(args).await,
        Command::Config(args::ConfigCommand::Check(args)) => check_config(&args),
        Command::Version => {
            println!("walstream v{} (litestream v0.3.13 compatible)", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

async fn print_listing(args: ListArgs, kind: list::Kind) -> anyhow::Result<()> {
    let source = source::resolve(&args.source, &args.config, args.replica.as_deref())?;
    let mut listings: Vec<(String, ReplicaListing)> = Vec::new();
    for replica in &source.replicas {
        let store = replica_url::open_with(&replica.url, &replica.s3)?;
        let mut listing = walstream_restore::list_replica(store.as_ref())
            .await
            .with_context(|| format!("list replica {} ({})", replica.name, replica.url))?;
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
