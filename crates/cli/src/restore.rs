//! `walstream restore`: resolve the source, check the output before any network access, choose
//! the replica, then restore (or print the plan), and serve readiness if asked.

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::info;
use walstream_restore::RestorePlan;

use crate::args::RestoreArgs;
use crate::signals::spawn_signal_handler;
use crate::{dry_run, exit, progress, ready, replica_url, source};

pub(crate) async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
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
    let options = walstream_restore::RestoreOptions {
        output,
        target: target(args),
        parallelism: args.parallelism as usize,
        progress: Some(progress::for_command("restore")),
        integrity_check: args.integrity_check,
        age: None,
    };
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
            let options = walstream_restore::RestoreOptions { age: chosen.age.clone(), ..options.clone() };
            walstream_restore::restore_replanning(chosen.store.as_ref(), chosen.plan, &options)
                .await
                .map_err(anyhow::Error::new)?;
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
    age: Option<std::sync::Arc<walstream_format::age::AgeKeys>>,
    plan: RestorePlan,
    /// When the plan's generation was last written to.
    updated: Option<std::time::SystemTime>,
}

/// Plans the restore on every replica and keeps the one whose chosen generation was updated
/// last, as Litestream does. `None` when no replica has a backup.
async fn choose_replica(
    source: &source::Source,
    target: &walstream_restore::Target,
) -> anyhow::Result<Option<ChosenReplica>> {
    let mut best: Option<ChosenReplica> = None;
    for replica in &source.replicas {
        let store = replica_url::open_with(&replica.url, &replica.s3)?;
        let listing = walstream_restore::list_replica(store.as_ref())
            .await
            .with_context(|| format!("replica {}", replica.name))?;
        let updated: std::collections::BTreeMap<_, _> =
            listing.generations.iter().map(|(id, g)| (*id, g.updated())).collect();
        match walstream_restore::plan_from(listing, target) {
            Ok(plan) => {
                let updated = updated.get(&plan.generation).copied().flatten();
                if best.as_ref().is_none_or(|best| updated > best.updated) {
                    best = Some(ChosenReplica {
                        name: replica.name.clone(),
                        store,
                        age: replica.age.clone(),
                        plan,
                        updated,
                    });
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
