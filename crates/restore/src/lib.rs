//! Restores a database from a replica written by walstream or Litestream v0.3.13.
//!
//! [`plan()`] lists the replica and chooses what to apply for a [`Target`] (latest state, a
//! generation, an index or a moment): a snapshot and the WAL indexes after it
//! ([`RestorePlan`]). [`restore`] then downloads objects in parallel, verifies the checksum
//! chain of every index as its frames arrive, writes each committed transaction's pages
//! straight into a temporary file (no SQLite checkpoint), runs `PRAGMA integrity_check` and
//! links the result into place. On any
//! failure nothing is left at the output path and no temporary file remains.
#![deny(missing_docs)]

mod apply;
mod error;
mod fetch;
mod index;
mod plan;
mod progress;
#[cfg(test)]
mod test_wal;

use std::path::{Path, PathBuf};

use tracing::{info, warn};
use walstream_store::ObjectStore;

pub use error::Error;
pub use plan::{
    list_replica, plan, plan_from, GenerationListing, IndexPlan, ReplicaListing, RestorePlan, SegmentRef, Target,
};
pub use progress::Progress;

/// Which check SQLite runs on the restored file before it is linked into place (Litestream
/// 0.5's `-integrity-check`). Every object's checksums are verified whichever is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IntegrityCheck {
    /// `PRAGMA integrity_check`: every page and index (the default).
    #[default]
    Full,
    /// `PRAGMA quick_check`: the same without checking that indexes match their tables.
    Quick,
    /// No SQLite check: the restore is as good as the replica's checksums.
    None,
}

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
    /// The check run on the result before it is linked into place.
    pub integrity_check: IntegrityCheck,
    /// The replica's `age` block: its identities decrypt every object. `None`: the objects are
    /// plain LZ4, and an encrypted one is an error naming the missing identity.
    pub age: Option<std::sync::Arc<walstream_format::age::AgeKeys>>,
}

impl RestoreOptions {
    /// The latest state, to `output`, eight downloads at once, quietly.
    pub fn new(output: impl Into<PathBuf>) -> RestoreOptions {
        RestoreOptions {
            output: output.into(),
            target: Target::default(),
            parallelism: 8,
            progress: None,
            integrity_check: IntegrityCheck::Full,
            age: None,
        }
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
    restore_replanning(store, plan, options).await
}

/// How many times a restore plans again after an object of its plan vanished.
const REPLAN_ATTEMPTS: u32 = 3;

/// [`restore_plan`], planned again from a fresh listing when an object of the plan disappears
/// while it runs: retention deletes a snapshot and the WAL below it once a newer snapshot
/// exists, and the newer one then serves the same target.
pub async fn restore_replanning(
    store: &dyn ObjectStore,
    mut plan: RestorePlan,
    options: &RestoreOptions,
) -> Result<RestoreOutcome, Error> {
    let mut attempt = 1;
    loop {
        match restore_plan(store, plan, options).await {
            Err(Error::Store(e)) if e.is_not_found() && attempt < REPLAN_ATTEMPTS => {
                warn!(error = %e, "an object of the restore plan was deleted meanwhile (retention?); planning again");
                plan = plan_from(list_replica(store).await?, &options.target)?;
                attempt += 1;
            }
            Err(Error::Store(e)) if e.is_not_found() => {
                return Err(Error::ReplicaKeptChanging { attempts: attempt, source: e })
            }
            other => return other,
        }
    }
}

/// Applies a plan made earlier (to choose between replicas, say) to `options.output`.
pub async fn restore_plan(
    store: &dyn ObjectStore,
    plan: RestorePlan,
    options: &RestoreOptions,
) -> Result<RestoreOutcome, Error> {
    if options.output.exists() {
        return Err(Error::OutputExists { path: options.output.clone() });
    }
    info!(generation = %plan.generation, snapshot_index = plan.snapshot_index, indexes = plan.indexes.len(), "restoring");
    let temp = TempDatabase::new(&options.output);
    let progress = options.progress.as_deref().unwrap_or(&progress::Silent);
    let age = options.age.as_deref();
    apply::apply(store, age, &plan, temp.path(), options.parallelism, progress, options.integrity_check).await?;
    temp.persist(&options.output)?;
    info!(path = %options.output.display(), "restored");
    Ok(RestoreOutcome { plan })
}

/// What [`verify`] checked.
#[derive(Clone, Debug)]
pub struct VerifyOutcome {
    /// The plan whose every object was read.
    pub plan: RestorePlan,
    /// Bytes of the database the snapshot holds.
    pub snapshot_bytes: u64,
    /// Bytes of WAL the indexes hold.
    pub wal_bytes: u64,
}

/// Downloads and checks every object of `plan` as a restore would, without writing a database:
/// the snapshot decodes (LZ4 frame and content checksum) to a SQLite database, and each index's
/// checksum chain holds to its end. The first bad object is the error, naming it.
pub async fn verify(
    store: &dyn ObjectStore,
    age: Option<&walstream_format::age::AgeKeys>,
    plan: RestorePlan,
    parallelism: usize,
    progress: Option<&dyn Progress>,
) -> Result<VerifyOutcome, Error> {
    let progress = progress.unwrap_or(&progress::Silent);
    let (objects, bytes) = plan.stored();
    progress.start(objects, bytes);
    let split = std::sync::Arc::new(progress::TimeSplit::default());
    let (header, snapshot_bytes) = fetch::snapshot_into(
        store,
        age,
        &plan.snapshot,
        apply::HeaderOnly::default(),
        Path::new("(checked, not written)"),
        parallelism,
        progress,
        &split,
    )
    .await?;
    if !header.is_database() {
        return Err(apply::not_a_database(&plan.snapshot.key));
    }
    let (sender, mut verified) = tokio::sync::mpsc::channel(1);
    let frames = std::sync::Arc::new(index::FramePool::default());
    let downloads = fetch::fetch_indexes(
        store,
        age,
        plan.indexes.iter().collect(),
        fetch::IndexCheck { page_size: header.page_size(), lz4_checksums: true },
        frames.clone(),
        parallelism,
        progress,
        &split,
        sender,
    );
    let check = async {
        let mut wal_bytes = 0;
        while let Some(event) = verified.recv().await {
            match event? {
                index::WalEvent::Frames(batch) => frames.give(batch),
                index::WalEvent::Ended(end) => wal_bytes += end.len,
            }
        }
        Ok::<u64, Error>(wal_bytes)
    };
    let ((), wal_bytes) = tokio::join!(downloads, check);
    split.report(progress);
    progress.finish();
    Ok(VerifyOutcome { plan, snapshot_bytes, wal_bytes: wal_bytes? })
}

/// `t` as RFC 3339 in UTC with whole seconds, as Litestream prints times
/// (`2026-11-22T13:07:28Z`).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t).replace_nanosecond(0).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| "?".to_string())
}

/// `t` as RFC 3339 in UTC with nanoseconds, for log lines.
pub fn rfc3339_precise(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "?".to_string())
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

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicU32, Ordering};
    use walstream_format::{lz4, name, GenerationId};
    use walstream_store::{FileStore, ObjectMeta, OperationCounts, Version};

    /// A database file holding `rows` rows, LZ4-framed as a snapshot object.
    fn snapshot_body(dir: &Path, rows: i64) -> Bytes {
        let path = dir.join(format!("src-{rows}.db"));
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        for x in 0..rows {
            conn.execute("INSERT INTO t VALUES (?1)", [x]).unwrap();
        }
        drop(conn);
        Bytes::from(lz4::compress(&std::fs::read(&path).unwrap()))
    }

    /// Retention racing the restore: the first `races` reads of a snapshot find that a newer
    /// snapshot was uploaded at the next index and this one deleted just before.
    #[derive(Debug)]
    struct RetentionRacer {
        inner: FileStore,
        generation: GenerationId,
        newer: Bytes,
        races: AtomicU32,
    }

    impl RetentionRacer {
        /// A replica in `dir` holding one snapshot (3 rows) at index 0; each of the first `races`
        /// snapshot reads is outrun by a newer snapshot of 5 rows.
        async fn over_snapshot_of_3_rows(dir: &Path, races: u32) -> RetentionRacer {
            let generation = GenerationId::random();
            let inner = FileStore::new(dir.join("replica"));
            inner.put(&name::snapshot_key(&generation, 0), snapshot_body(dir, 3)).await.unwrap();
            RetentionRacer { inner, generation, newer: snapshot_body(dir, 5), races: AtomicU32::new(races) }
        }
    }

    #[async_trait]
    impl ObjectStore for RetentionRacer {
        async fn put(&self, key: &str, body: Bytes) -> Result<(), walstream_store::Error> {
            self.inner.put(key, body).await
        }
        async fn get(&self, key: &str) -> Result<Bytes, walstream_store::Error> {
            let racing = name::parse_key(key).and_then(|k| match k.kind {
                name::ObjectKind::Snapshot { index } => Some(index),
                name::ObjectKind::Segment { .. } => None,
            });
            if let Some(index) = racing {
                if self.races.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                    self.inner.put(&name::snapshot_key(&self.generation, index + 1), self.newer.clone()).await?;
                    self.inner.delete(key).await?;
                }
            }
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, walstream_store::Error> {
            self.inner.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), walstream_store::Error> {
            self.inner.delete(key).await
        }
        async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, Version)>, walstream_store::Error> {
            self.inner.get_versioned(key).await
        }
        async fn put_if(
            &self,
            key: &str,
            body: Bytes,
            expected: Option<Version>,
        ) -> Result<Version, walstream_store::Error> {
            self.inner.put_if(key, body, expected).await
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn kind(&self) -> &'static str {
            "file"
        }
        fn operations(&self) -> Option<&OperationCounts> {
            None
        }
    }

    #[tokio::test]
    async fn a_snapshot_deleted_by_retention_mid_restore_is_planned_around() {
        let dir = tempfile::tempdir().unwrap();
        let store = RetentionRacer::over_snapshot_of_3_rows(dir.path(), 1).await;

        let output = dir.path().join("restored.db");
        let outcome =
            restore(&store, &RestoreOptions::new(&output)).await.expect("planned again around the deleted snapshot");
        assert_eq!(outcome.plan.snapshot_index, 1);
        let rows: i64 =
            rusqlite::Connection::open(&output).unwrap().query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 5);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("walstream-restore"))
            .collect();
        assert!(leftovers.is_empty(), "the abandoned attempt left {leftovers:?}");
    }

    #[tokio::test]
    async fn a_restore_outrun_by_retention_on_every_attempt_says_so_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = RetentionRacer::over_snapshot_of_3_rows(dir.path(), REPLAN_ATTEMPTS).await;

        let output = dir.path().join("restored.db");
        let error = restore(&store, &RestoreOptions::new(&output)).await.expect_err("every plan was outrun");
        assert!(matches!(error, Error::ReplicaKeptChanging { attempts: REPLAN_ATTEMPTS, .. }), "{error:?}");
        assert!(error.to_string().contains("lengthen the replica's `retention`"), "{error}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "replica" && !n.to_string_lossy().starts_with("src-"))
            .collect();
        assert!(left.is_empty(), "a failed restore left {left:?}");
    }
}
