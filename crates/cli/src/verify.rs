//! `walstream verify`: proves a replica restorable without restoring it. Every object of the
//! chain a restore would read is downloaded and checked as a restore checks it (LZ4 frames and
//! content checksums, a snapshot that is a SQLite database, every index's checksum chain to its
//! end), in the same bounded memory; nothing is written but spill files that are never linked.

use anyhow::Context;
use tracing::info;
use walstream_restore::Target;

use crate::args::VerifyArgs;
use crate::{progress, replica_url, source};

pub(crate) async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let source = source::resolve(&args.source, &args.config, args.replica.as_deref())?;
    let target = Target { generation: args.generation, ..Target::default() };
    for replica in &source.replicas {
        let store = replica_url::open_with(&replica.url, &replica.s3)?;
        let context = || format!("verify replica {} ({})", replica.name, replica.url);
        let plan = walstream_restore::plan(store.as_ref(), &target).await.with_context(context)?;
        let progress = progress::for_command("verify");
        let outcome = walstream_restore::verify(
            store.as_ref(),
            replica.age.as_deref(),
            plan,
            args.parallelism as usize,
            Some(progress.as_ref()),
        )
        .await
        .with_context(context)?;
        let segments: usize = outcome.plan.indexes.iter().map(|i| i.segments.len()).sum();
        info!(replica = %replica.name, generation = %outcome.plan.generation, "verified");
        println!(
            "{}: ok, generation {}: snapshot {:08x} ({} bytes) and {} WAL indexes ({} segments, {} bytes), every checksum holds",
            replica.name,
            outcome.plan.generation,
            outcome.plan.snapshot_index,
            outcome.snapshot_bytes,
            outcome.plan.indexes.len(),
            segments,
            outcome.wal_bytes
        );
    }
    Ok(())
}
