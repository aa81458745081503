//! Continuous replication of one SQLite database to one or more object stores.
//!
//! [`Shipper::run`] waits for the database to exist, then runs two kinds of workers:
//!
//! - the capturer, a thread that owns walstream's SQLite connections. Woken by file events (and
//!   a slow poll), it copies every committed, checksum-valid WAL frame into a local shadow WAL
//!   under a rolling read pin, follows WAL restarts as new indexes, and starts a new generation
//!   with a snapshot when continuity is lost. It publishes the shadow's committed end as a
//!   [`ShadowState`].
//! - one uploader task per [`Replica`], which ships the shadow in (index, offset) order as
//!   LZ4 segments named exactly as Litestream v0.3.13 names them, and the latest snapshot.
//! - one upkeep task per replica, which asks the capturer for snapshots on the replica's
//!   snapshot interval and deletes what its retention no longer needs.
//!
//! On shutdown the capturer copies once more and the uploaders drain everything committed
//! before the signal, within a deadline.
#![deny(missing_docs)]

mod capture;
mod error;
mod meta;
mod retention;
mod shadow;
mod source;
mod upload;
mod watch;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use capture::ShadowState;
pub use error::Error;
pub use meta::LocalSnapshot;
pub use retention::RetentionPolicy;
pub use upload::Replica;

use capture::{Capturer, Wake};
use source::{probe_file, Presence, SourceDb};
use upload::Uploader;

/// How long the final flush may take by default: below Cloud Run's 10 s grace period.
pub const DEFAULT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(8);

/// How often a database that does not exist yet is looked for.
const WAIT_FOR_DB_INTERVAL: Duration = Duration::from_millis(250);

/// What to replicate and how.
#[derive(Clone, Debug)]
pub struct ShipperConfig {
    /// The live database.
    pub db_path: PathBuf,
    /// Where the shadow WAL lives; default `.<name>-walstream` beside the database.
    pub meta_dir: Option<PathBuf>,
    /// How long the final flush may take after shutdown is requested.
    pub shutdown_deadline: Duration,
}

impl ShipperConfig {
    /// Defaults for everything but the path.
    pub fn new(db_path: impl Into<PathBuf>) -> ShipperConfig {
        ShipperConfig { db_path: db_path.into(), meta_dir: None, shutdown_deadline: DEFAULT_SHUTDOWN_DEADLINE }
    }
}

/// Replicates one database to its replicas.
#[derive(Debug)]
pub struct Shipper {
    config: ShipperConfig,
    replicas: Vec<Replica>,
}

impl Shipper {
    /// A shipper for `config.db_path` to `replicas`.
    pub fn new(config: ShipperConfig, replicas: Vec<Replica>) -> Shipper {
        Shipper { config, replicas }
    }

    /// Replicates until `shutdown` is cancelled, then ships everything committed so far and
    /// returns. A file at the path that is not a SQLite database is an error at once.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let db_path = std::path::absolute(&self.config.db_path).unwrap_or(self.config.db_path.clone());
        if !wait_for_database(&db_path, &shutdown).await? {
            return Ok(());
        }
        // Held until this function returns. Taken once the path holds a SQLite database, so a
        // path that is not one is refused without leaving a metadata directory behind.
        let _lock = meta::MetaDir::for_db(&db_path, self.config.meta_dir.as_deref()).lock()?;
        let source = {
            let db_path = db_path.clone();
            tokio::task::spawn_blocking(move || SourceDb::open(&db_path)).await.expect("open task panicked")?
        };
        info!(db = %db_path.display(), replicas = self.replicas.len(), "replicating");

        let (wake_tx, wake_rx) = mpsc::channel();
        let watcher = match watch::watch(&db_path, wake_tx.clone()) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                warn!(error = %e, "file events unavailable; polling the WAL every second");
                None
            }
        };
        let (state_tx, state_rx) = tokio::sync::watch::channel(ShadowState::default());
        let mut uploaders = JoinSet::new();
        let mut positions = Vec::new();
        for replica in self.replicas {
            let (position_tx, position_rx) = tokio::sync::watch::channel(None);
            positions.push(position_rx);
            // Upkeep ends with the capturer's final state; it never holds up shutdown.
            tokio::spawn(retention::run(replica.clone(), state_rx.clone(), wake_tx.clone()));
            uploaders.spawn(Uploader::new(replica, state_rx.clone(), position_tx, wake_tx.clone()).run());
        }
        let meta = meta::MetaDir::for_db(&db_path, self.config.meta_dir.as_deref());
        let capturer = Capturer::new(db_path.clone(), meta, source, state_tx, positions.clone());
        let capturer = std::thread::Builder::new()
            .name("walstream-capture".into())
            .spawn(move || capturer.run(wake_rx))
            .map_err(error::io_err("spawn capture thread", &db_path))?;

        shutdown.cancelled().await;
        info!(db = %db_path.display(), "shutting down: shipping what is committed");
        drop(watcher);
        let _ = wake_tx.send(Wake::Shutdown);
        let capture_result = tokio::task::spawn_blocking(move || capturer.join()).await.expect("join task panicked");
        let capture_result = capture_result.unwrap_or_else(|_| {
            warn!("capture thread panicked");
            Ok(())
        });

        let drained = tokio::time::timeout(self.config.shutdown_deadline, async {
            while uploaders.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            let end = state_rx.borrow().end;
            let behind: Vec<String> = positions
                .iter()
                .enumerate()
                .filter(|(_, p)| *p.borrow() != end)
                .map(|(i, p)| format!("replica #{} at {}", i + 1, p.borrow().map_or("nothing".to_string(), |p| p.to_string())))
                .collect();
            uploaders.abort_all();
            return Err(Error::FlushIncomplete { unshipped: behind.len(), detail: format!("{} (local end {})", behind.join(", "), end.map_or("none".into(), |p| p.to_string())) });
        }
        capture_result?;
        info!(db = %db_path.display(), "replication stopped; everything committed was shipped");
        Ok(())
    }
}

/// Waits for a SQLite database at `path`. Returns false if shutdown came first and there is
/// still no database; one that appeared meanwhile (an app that wrote and exited between two
/// looks) is replicated and flushed like any other.
async fn wait_for_database(path: &std::path::Path, shutdown: &CancellationToken) -> Result<bool, Error> {
    let mut logged = false;
    loop {
        if let Presence::Ready = probe_file(path)? {
            return Ok(true);
        }
        if !logged {
            info!(db = %path.display(), "waiting for the database to be created");
            logged = true;
        }
        tokio::select! {
            () = tokio::time::sleep(WAIT_FOR_DB_INTERVAL) => {}
            () = shutdown.cancelled() => return Ok(matches!(probe_file(path)?, Presence::Ready)),
        }
    }
}
