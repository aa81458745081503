//! `restore -dry-run`: what a restore would download, and roughly how long it would take, so an
//! operator can tell before a deploy whether it fits Cloud Run's startup-probe window.

use std::time::Duration;

use walstream_restore::RestorePlan;

/// The longest a Cloud Run startup probe can wait (failureThreshold × periodSeconds ≤ 240 s).
pub(crate) const CLOUD_RUN_STARTUP_WINDOW: Duration = Duration::from_secs(240);

/// A cautious model of a container reading GCS in the same region: the stored bytes at this
/// rate, or one request latency per object spread over the parallel downloads, whichever is
/// slower. Local work (decompressing, applying) is much faster than either.
const DOWNLOAD_BYTES_PER_SEC: f64 = 40.0 * 1024.0 * 1024.0;
const REQUEST_LATENCY: Duration = Duration::from_millis(30);

pub(crate) fn estimate(plan: &RestorePlan, parallelism: usize) -> Duration {
    let (objects, bytes) = plan.stored();
    let transfer = Duration::from_secs_f64(bytes as f64 / DOWNLOAD_BYTES_PER_SEC);
    let requests = REQUEST_LATENCY * (objects.div_ceil(parallelism.max(1) as u64)) as u32;
    transfer.max(requests)
}

/// The plan as a few aligned lines.
pub(crate) fn describe(plan: &RestorePlan, parallelism: usize) -> String {
    let (objects, bytes) = plan.stored();
    let segments: usize = plan.indexes.iter().map(|i| i.segments.len()).sum();
    let wal_bytes = bytes - plan.snapshot.size;
    let mut out = format!("generation  {}\n", plan.generation);
    out += &format!(
        "snapshot    index {:08x}, {} stored ({})\n",
        plan.snapshot_index,
        mib(plan.snapshot.size),
        plan.snapshot.key
    );
    match (plan.indexes.first(), plan.indexes.last()) {
        (Some(first), Some(last)) => {
            out += &format!(
                "wal         indexes {:08x}..{:08x}: {} indexes, {segments} segments, {} stored\n",
                first.index,
                last.index,
                plan.indexes.len(),
                mib(wal_bytes)
            )
        }
        _ => out += "wal         none (the snapshot alone)\n",
    }
    out += &format!("download    {objects} objects, {}\n", mib(bytes));
    out += &format!(
        "estimate    {:.1}s (at {:.0} MiB/s and {} ms per request, {parallelism} at a time)\n",
        estimate(plan, parallelism).as_secs_f64(),
        DOWNLOAD_BYTES_PER_SEC / 1024.0 / 1024.0,
        REQUEST_LATENCY.as_millis()
    );
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}

#[cfg(test)]
mod tests {
    use walstream_restore::{IndexPlan, SegmentRef};

    use super::*;

    fn plan(snapshot: u64, segments: &[u64]) -> RestorePlan {
        let segment = |size: &u64| SegmentRef { key: "k".into(), offset: 0, size: *size };
        RestorePlan {
            generation: "00000000000000aa".parse().unwrap(),
            snapshot_index: 0,
            snapshot: segment(&snapshot),
            indexes: vec![IndexPlan { index: 0, segments: segments.iter().map(segment).collect() }],
        }
    }

    #[test]
    fn estimate_is_bound_by_bytes_or_by_requests() {
        let big = plan(20 * 1024 * 1024 * 1024, &[]);
        assert!(estimate(&big, 8) > CLOUD_RUN_STARTUP_WINDOW, "20 GiB cannot come down in 240 s at 40 MiB/s");
        let many = plan(1, &vec![1; 80_000]);
        assert_eq!(estimate(&many, 8), REQUEST_LATENCY * 10_001);
        let text = describe(&many, 8);
        assert!(text.contains("80000 segments") && text.contains("80001 objects"), "{text}");
    }
}
