//! Restores a database from a replica written by walstream or Litestream v0.3.13.
//!
//! [`plan`] lists the replica and chooses what to apply: the generation updated last, its
//! latest snapshot and every WAL index after it ([`RestorePlan`]). [`restore`] then downloads,
//! verifies the checksum chain of every index, applies it to a temporary file, runs
//! `PRAGMA integrity_check` and renames the result into place. On any failure nothing is left
//! at the output path and no temporary file remains.
#![deny(missing_docs)]

mod apply;
mod error;
mod plan;

use std::path::{Path, PathBuf};

use tracing::info;
use walstream_store::ObjectStore;

pub use error::Error;
pub use plan::{plan, IndexPlan, RestorePlan, SegmentRef};

/// What to restore, and where.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// The database file to create. It must not exist.
    pub output: PathBuf,
}

/// What a successful restore did.
#[derive(Clone, Debug)]
pub struct RestoreOutcome {
    /// The plan that was applied.
    pub plan: RestorePlan,
}

/// Restores the latest state of `store` to `options.output`.
pub async fn restore(store: &dyn ObjectStore, options: &RestoreOptions) -> Result<RestoreOutcome, Error> {
    if options.output.exists() {
        return Err(Error::OutputExists { path: options.output.clone() });
    }
    let plan = plan(store).await?;
    info!(generation = %plan.generation, snapshot_index = plan.snapshot_index, indexes = plan.indexes.len(), "restoring");
    let temp = TempDatabase::new(&options.output);
    apply::apply(store, &plan, temp.path()).await?;
    temp.persist(&options.output)?;
    info!(path = %options.output.display(), "restored");
    Ok(RestoreOutcome { plan })
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
