//! Restores a database from a replica written by walstream or Litestream v0.3.13.
//!
//! [`plan`] lists the replica and chooses what to apply for a [`Target`] (latest state, a
//! generation, an index or a moment): a snapshot and the WAL indexes after it
//! ([`RestorePlan`]). [`restore`] then downloads objects in parallel, verifies the checksum
//! chain of every index, writes each index's committed pages straight into a temporary file (no
//! SQLite checkpoint), runs `PRAGMA integrity_check` and links the result into place. On any
//! failure nothing is left at the output path and no temporary file remains.
#![deny(missing_docs)]

mod apply;
mod error;
mod fetch;
mod plan;
mod progress;

use std::path::{Path, PathBuf};

use tracing::info;
use walstream_store::ObjectStore;

pub use error::Error;
pub use progress::Progress;
pub use plan::{list_replica, plan, plan_from, GenerationListing, IndexPlan, ReplicaListing, RestorePlan, SegmentRef, Target};

/// What to restore, and where.
#[derive(Clone)]
pub struct RestoreOptions {
    /// The database file to create. It must not exist.
    pub output: PathBuf,
    /// Which state to restore.
    pub target: Target,
    /// How many objects to download at once (at least 1).
    pub parallelism: usize,
    /// Who hears about progress, if anyone.
    pub progress: Option<std::sync::Arc<dyn Progress>>,
}

impl RestoreOptions {
    /// The latest state, to `output`, eight downloads at once, quietly.
    pub fn new(output: impl Into<PathBuf>) -> RestoreOptions {
        RestoreOptions { output: output.into(), target: Target::default(), parallelism: 8, progress: None }
    }
}

/// What a successful restore did.
#[derive(Clone, Debug)]
pub struct RestoreOutcome {
    /// The plan that was applied.
    pub plan: RestorePlan,
}

/// Restores `options.target` from `store` to `options.output`. Dropping the future before it
/// finishes leaves nothing behind either.
pub async fn restore(store: &dyn ObjectStore, options: &RestoreOptions) -> Result<RestoreOutcome, Error> {
    if options.output.exists() {
        return Err(Error::OutputExists { path: options.output.clone() });
    }
    let plan = plan(store, &options.target).await?;
    restore_plan(store, plan, options).await
}

/// Applies a plan made earlier (to choose between replicas, say) to `options.output`.
pub async fn restore_plan(store: &dyn ObjectStore, plan: RestorePlan, options: &RestoreOptions) -> Result<RestoreOutcome, Error> {
    if options.output.exists() {
        return Err(Error::OutputExists { path: options.output.clone() });
    }
    info!(generation = %plan.generation, snapshot_index = plan.snapshot_index, indexes = plan.indexes.len(), "restoring");
    let temp = TempDatabase::new(&options.output);
    let progress = options.progress.as_deref().unwrap_or(&progress::Silent);
    apply::apply(store, &plan, temp.path(), options.parallelism, progress).await?;
    temp.persist(&options.output)?;
    info!(path = %options.output.display(), "restored");
    Ok(RestoreOutcome { plan })
}

/// `t` as RFC 3339 in UTC with whole seconds, as Litestream prints times
/// (`2026-11-22T13:07:28Z`).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t).replace_nanosecond(0).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| "?".to_string())
}

/// `t` as RFC 3339 in UTC with nanoseconds, for log lines.
pub fn rfc3339_precise(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| "?".to_string())
}

/// The file a restore builds, beside the output so the final rename is atomic. Dropping it
/// removes it and its SQLite side files unless it was persisted.
struct TempDatabase {
    path: PathBuf,
    persisted: bool,
}

impl TempDatabase {
    fn new(output: &Path) -> TempDatabase {
        let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let file = output.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let path = dir.join(format!(".{file}.{:08x}.walstream-restore", rand::random::<u32>()));
        TempDatabase { path, persisted: false }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn persist(mut self, output: &Path) -> Result<(), Error> {
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { op, path, source }
        };
        std::fs::File::open(&self.path).and_then(|f| f.sync_all()).map_err(io("fsync", &self.path))?;
        // Refuse to replace a file that appeared while restoring (another restore, or the app).
        std::fs::hard_link(&self.path, output).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::OutputExists { path: output.to_path_buf() },
            _ => Error::Io { op: "link", path: output.to_path_buf(), source: e },
        })?;
        std::fs::remove_file(&self.path).map_err(io("remove", &self.path))?;
        if let Some(dir) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))?;
        }
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            if self.persisted && suffix.is_empty() {
                continue;
            }
            let mut path = self.path.as_os_str().to_owned();
            path.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(path));
        }
    }
}
