//! Side-by-side benchmarks of walstream and litestream v0.3.13, in one run on one machine:
//!
//! - `walstream-bench restore` (`scripts/bench-restore.sh`): restore time of the same replica;
//! - `walstream-bench replicate` (`scripts/bench-replicate.sh`): replication lag, the app's
//!   transaction rate, the replicator's CPU and memory, drain time and object-store requests,
//!   against fake-gcs-server, whose request log does the counting;
//! - `walstream-bench volume` (`scripts/bench-volume.sh`): the app's memory volume and WAL with
//!   no replicator, under litestream and under walstream, at several write rates;
//! - `walstream-bench cost` (`scripts/bench-cost.sh`): object-store requests a minute and each
//!   commit's lag at steady write rates from 0.1 to 1,000 commits a second, and what they cost;
//! - `walstream-bench history` (`scripts/bench-history.sh`): restore time after 1, 10 and 100
//!   rounds of rewriting the whole database, with and without automatic snapshots;
//! - `walstream-bench many` (`scripts/bench-many.sh`): descriptors, threads, memory, CPU and
//!   lag of one process replicating 1, 1,000 and 10,000 databases.
//!
//! Timing lives here and nowhere in the test suite.

mod chart;
mod common;
mod cost;
mod emulator;
mod history;
mod many;
mod proc_stats;
mod replicate;
mod replicator;
mod restore;
mod s3_server;
mod volume;

use anyhow::bail;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("restore") => restore::run(args),
        Some("replicate") => replicate::run(args),
        Some("volume") => volume::run(args),
        Some("cost") => cost::run(args),
        Some("history") => history::run(args),
        Some("many") => many::run(args),
        _ => {
            bail!("usage: walstream-bench restore|replicate|volume|cost|history|many [FLAGS] (see scripts/bench-*.sh)")
        }
    }
}
