//! Continuous replication of one SQLite database to one or more object stores.
//!
//! [`Shipper::run`] waits for the database to exist, then runs two kinds of workers:
//!
//! - the capturer, which owns walstream's SQLite connections and runs a turn at a time on the
//!   process's capture pool. Woken by file events (and polling while the writer is busy), it
//!   reads every committed, checksum-valid WAL frame under a rolling read pin, which keeps
//!   them in the live WAL until the replicas have them; what the pin must let go of first is
//!   stored in a local shadow WAL. It follows WAL restarts as new indexes, and starts a new
//!   generation with a snapshot when continuity is lost. It publishes the committed end as a
//!   [`ShadowState`].
//! - one uploader task per [`Replica`], which ships that WAL (from the live WAL or the shadow)
//!   in (index, offset) order as LZ4 segments named exactly as Litestream v0.3.13 names them,
//!   and the latest snapshot.
//! - one upkeep task per replica, which asks the capturer for snapshots on the replica's
//!   snapshot interval and deletes what its retention no longer needs.
//!
//! On shutdown the capturer copies once more and the uploaders drain everything committed
//! before the signal, within a deadline.
#![deny(missing_docs)]

mod awake;
mod capture;
mod error;
mod fail_point;
mod lease;
mod mapped;
mod meta;
mod pool;
mod protocol;
mod replica;
mod retention;
mod segment;
mod shadow;
mod snapshot_body;
mod source;
mod spool;
mod status;
mod throttle;
mod trim;
mod upload;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use awake::limit_awake_databases;
pub use error::Error;
pub use lease::LeasePolicy;
pub use meta::LocalSnapshot;
pub use protocol::ShadowState;
pub use replica::{Replica, RetentionPolicy, DEFAULT_SYNC_INTERVAL};
pub use status::{DbStatus, Handle, ReplicaStatus, SyncError};

use capture::Capturer;
use protocol::Wake;
use source::{probe_file, Presence, SourceDb};
use upload::Uploader;

/// How long the final flush may take by default: below Cloud Run's 10 s grace period.
pub const DEFAULT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(8);

/// How often a database that does not exist yet is looked for.
const WAIT_FOR_DB_INTERVAL: Duration = Duration::from_millis(250);

/// The CLI's default `max_local_wal`.
pub const DEFAULT_MAX_LOCAL_WAL: u64 = 256 << 20;

/// The CLI's default `snapshot_wal_ratio`: a restore replays at most about as much WAL as the
/// database holds (or 256 MiB), for one snapshot upload per that much WAL.
pub const DEFAULT_SNAPSHOT_WAL_RATIO: f64 = 1.0;

/// What to replicate and how.
#[derive(Clone, Debug)]
pub struct ShipperConfig {
    /// The live database.
    pub db_path: PathBuf,
    /// Where the shadow WAL lives; default `.<name>-walstream` beside the database.
    pub meta_dir: Option<PathBuf>,
    /// How long the final flush may take after shutdown is requested.
    pub shutdown_deadline: Duration,
    /// The replica lease (one writer per replica across machines); `None` turns it off.
    pub lease: Option<LeasePolicy>,
    /// The most disk the shadow WAL may take while a replica lags (an outage); past it a new
    /// generation starts (see `capture::Capturer::bound_local_wal`). `None`: no bound.
    pub max_local_wal: Option<u64>,
    /// A new snapshot once the WAL captured since the last one passes this many times the
    /// database's size (and at least 256 MiB), so restore time stays flat however long the
    /// history; zero: only on `snapshot-interval` and new generations.
    pub snapshot_wal_ratio: f64,
    /// Once the database has been idle this long and every replica holds all of it, walstream
    /// lets its pin and connections go until the next change (see `Capturer::rest_when_idle`).
    /// `None`: always held.
    pub idle_release: Option<Duration>,
    /// How long a replica may hold back a captured commit before this database counts as
    /// unhealthy; `None`: what the caller passes to [`DbStatus::problems`].
    pub health_lag: Option<Duration>,
}

impl ShipperConfig {
    /// Defaults for everything but the path.
    pub fn new(db_path: impl Into<PathBuf>) -> ShipperConfig {
        ShipperConfig {
            db_path: db_path.into(),
            meta_dir: None,
            shutdown_deadline: DEFAULT_SHUTDOWN_DEADLINE,
            lease: Some(LeasePolicy::default()),
            max_local_wal: Some(DEFAULT_MAX_LOCAL_WAL),
            snapshot_wal_ratio: DEFAULT_SNAPSHOT_WAL_RATIO,
            idle_release: None,
            health_lag: None,
        }
    }
}

/// Replicates one database to its replicas.
#[derive(Debug)]
pub struct Shipper {
    config: ShipperConfig,
    replicas: Vec<Replica>,
    // Made up front so a [`Handle`] works before the database exists.
    db_path: PathBuf,
    wake_tx: pool::WakeSender,
    wake_rx: std::sync::mpsc::Receiver<Wake>,
    state_tx: tokio::sync::watch::Sender<ShadowState>,
    positions: Vec<tokio::sync::watch::Sender<Option<walstream_format::Pos>>>,
    counters: std::sync::Arc<status::DbCounters>,
    replica_counters: Vec<std::sync::Arc<status::ReplicaCounters>>,
}

impl Shipper {
    /// A shipper for `config.db_path` to `replicas`.
    pub fn new(config: ShipperConfig, replicas: Vec<Replica>) -> Shipper {
        let db_path = std::path::absolute(&config.db_path).unwrap_or(config.db_path.clone());
        let (wake_tx, wake_rx) = pool::wake_channel();
        let positions = replicas.iter().map(|_| tokio::sync::watch::channel(None).0).collect();
        let replica_counters = replicas.iter().map(|_| Default::default()).collect();
        Shipper {
            config,
            replicas,
            db_path,
            wake_tx,
            wake_rx,
            state_tx: tokio::sync::watch::channel(ShadowState::default()).0,
            positions,
            counters: Default::default(),
            replica_counters,
        }
    }

    /// A view for metrics, readiness and the sync barrier, valid for as long as the shipper runs.
    pub fn handle(&self) -> Handle {
        Handle {
            db_path: self.db_path.clone(),
            counters: self.counters.clone(),
            state: self.state_tx.subscribe(),
            replicas: self
                .replicas
                .iter()
                .zip(&self.positions)
                .zip(&self.replica_counters)
                .map(|((replica, position), counters)| status::ReplicaView {
                    name: replica.name.clone(),
                    kind: replica.store.kind(),
                    position: position.subscribe(),
                    counters: counters.clone(),
                    store: replica.store.clone(),
                })
                .collect(),
            wake: self.wake_tx.clone(),
            health_lag: self.config.health_lag,
        }
    }

    /// Replicates until `shutdown` is cancelled, then ships everything committed so far and
    /// returns. A file at the path that is not a SQLite database is an error at once.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Some(mut workers) = self.start(&shutdown).await? else {
            return Ok(());
        };
        let failed = workers.watch(&shutdown).await;
        workers.stop(failed).await
    }

    /// Waits for the database, takes its lock and starts every worker; `None` if shutdown came
    /// first.
    async fn start(self, shutdown: &CancellationToken) -> Result<Option<Workers>, Error> {
        let Shipper {
            config,
            replicas,
            db_path,
            wake_tx,
            wake_rx,
            state_tx,
            positions: position_txs,
            counters,
            replica_counters,
        } = self;
        if !wait_for_database(&db_path, shutdown).await? {
            return Ok(None);
        }
        // Claimed for as long as the source is open, before anything is written to the metadata
        // directory; created only once the path holds a SQLite database, so a path that is not
        // one is refused without leaving a metadata directory behind.
        // Opened awake; with thousands of databases starting at once, as many at a time as the
        // open-file limit allows (see `awake`).
        // Biased: with leave free at once, a shutdown already asked for must not win the race,
        // or commits made since the database appeared would never be shipped (1 in 2 runs of
        // the Cloud Run test, before). Asked for while waiting, leave is still waited for, within
        // the deadline of the final flush that follows.
        let awake = tokio::select! {
            biased;
            awake = awake::acquire() => awake,
            () = shutdown.cancelled() => match tokio::time::timeout(config.shutdown_deadline, awake::acquire()).await {
                Ok(awake) => awake,
                Err(_) => {
                    return Err(Error::FlushIncomplete {
                        unshipped: 1,
                        detail: "the database was never opened: more databases than the open-file limit lets be awake at once, and the shutdown deadline passed first".into(),
                    })
                }
            },
        };
        let source = {
            let db_path = db_path.clone();
            tokio::task::spawn_blocking(move || {
                SourceDb::open(&db_path).and_then(|source| source.claim().map(|()| source))
            })
            .await
            .expect("open task panicked")?
        };
        let meta = meta::MetaDir::for_db(&db_path, config.meta_dir.as_deref());
        meta.create()?;
        let lease_terms = match config.lease {
            Some(policy) => Some((meta.lease_holder()?, policy)),
            None => None,
        };
        info!(db = %db_path.display(), replicas = replicas.len(), "replicating");

        let watcher = match watch::watch(&db_path, wake_tx.clone()) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                warn!(error = %e, "file events unavailable; polling the WAL every second");
                None
            }
        };
        let state_rx = state_tx.subscribe();
        // Every worker's outcome comes back as a `Result<_, Error>`: a panic is caught and
        // turned into `Error::WorkerFailed`, so no worker can die unnoticed.
        let mut uploaders = JoinSet::new();
        let mut upkeep = JoinSet::new();
        let positions: Vec<_> = position_txs.iter().map(|p| p.subscribe()).collect();
        let pin_gate = std::sync::Arc::new(protocol::PinGate::default());
        for ((replica, position_tx), replica_counters) in
            replicas.into_iter().zip(position_txs).zip(replica_counters.iter().cloned())
        {
            let right = std::sync::Arc::new(lease::WriteRight::default());
            let name = replica.name.clone();
            // Upkeep ends with the capturer's final state; it never holds up shutdown.
            let retention = retention::run(replica.clone(), state_rx.clone(), wake_tx.clone(), right.clone());
            upkeep.spawn(caught(db_path.clone(), format!("upkeep worker of replica {name}"), async move {
                retention.await;
                Ok(())
            }));
            let uploader = Uploader::new(
                replica,
                state_rx.clone(),
                position_tx,
                wake_tx.clone(),
                replica_counters,
                lease_terms.clone(),
                right,
            )
            .with_pin_gate(pin_gate.clone())
            .run();
            uploaders.spawn(caught(db_path.clone(), format!("uploader of replica {name}"), uploader));
        }
        let mut capturer = Capturer::new(db_path.clone(), meta, source, state_tx, positions.clone(), counters.clone());
        capturer.free_snapshots_held_by(replica_counters.clone());
        capturer.share_pin_gate(pin_gate);
        capturer.bound_local_wal(config.max_local_wal);
        capturer.snapshot_after_wal_ratio(config.snapshot_wal_ratio);
        capturer.rest_when_idle(config.idle_release);
        capturer.hold_awake(awake, wake_tx.clone());
        let claim = capture::ClaimKeeper::default();
        capturer.hand_claim_to(claim.clone());
        if let Some(events) = watcher {
            capturer.take_events(events);
        }
        let (capture_tx, capture_rx) = tokio::sync::oneshot::channel();
        let waker = pool::spawn(Box::new(CaptureJob {
            capturer: Some(capturer),
            wakes: wake_rx,
            outcome: Some(capture_tx),
            db_path: db_path.clone(),
        }));
        wake_tx.wakes(waker);
        Ok(Some(Workers {
            db_path,
            shutdown_deadline: config.shutdown_deadline,
            wake_tx,
            state_rx,
            positions,
            counters,
            uploaders,
            upkeep,
            capture_rx,
            capture_ended: false,
            _claim: claim,
        }))
    }
}

/// A database's capturer as a job of the capture pool: its turns, until it ends or panics, and
/// then its outcome for [`Workers`].
struct CaptureJob {
    capturer: Option<Capturer>,
    wakes: std::sync::mpsc::Receiver<Wake>,
    outcome: Option<tokio::sync::oneshot::Sender<Result<(), Error>>>,
    db_path: PathBuf,
}

impl pool::Job for CaptureJob {
    fn turn(&mut self) -> Option<Duration> {
        let capturer = self.capturer.as_mut()?;
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| capturer.turn(&self.wakes)));
        let outcome = match turn {
            Ok(capture::Turn::Again(wait)) => return Some(wait),
            Ok(capture::Turn::Done(result)) => result,
            Err(payload) => {
                Err(worker_failed(&self.db_path, "capture worker".into(), fail_point::panic_message(payload.as_ref())))
            }
        };
        // Dropped first: its claim passes to the workers (`Capturer::hand_claim_to`).
        self.capturer = None;
        if let Some(tx) = self.outcome.take() {
            let _ = tx.send(outcome);
        }
        None
    }
}

/// A database's running workers, between [`Shipper::start`] and [`Workers::stop`].
struct Workers {
    db_path: PathBuf,
    shutdown_deadline: Duration,
    wake_tx: pool::WakeSender,
    state_rx: tokio::sync::watch::Receiver<ShadowState>,
    positions: Vec<tokio::sync::watch::Receiver<Option<walstream_format::Pos>>>,
    counters: std::sync::Arc<status::DbCounters>,
    uploaders: JoinSet<Result<(), Error>>,
    upkeep: JoinSet<Result<(), Error>>,
    capture_rx: tokio::sync::oneshot::Receiver<Result<(), Error>>,
    /// The capturer's outcome was taken while watching.
    capture_ended: bool,
    /// The database's claim once the capturer has ended, held until every worker has stopped.
    _claim: capture::ClaimKeeper,
}

impl Workers {
    /// Until shutdown, or until a worker fails or its replica belongs to another replicator:
    /// that failure. An uploader ends early only in those cases, and the capturer and upkeep not
    /// at all; then this database stops as if signalled, and the error is reported once what can
    /// be is flushed.
    async fn watch(&mut self, shutdown: &CancellationToken) -> Option<Error> {
        let db_path = self.db_path.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return None,
                Some(joined) = self.uploaders.join_next(), if !self.uploaders.is_empty() => {
                    if let Err(e) = joined_outcome(&db_path, "uploader", joined) {
                        if !matches!(e, Error::WorkerFailed { .. }) {
                            warn!(db = %db_path.display(), error = %e, "replica refused; stopping");
                        }
                        return Some(e);
                    }
                }
                Some(joined) = self.upkeep.join_next(), if !self.upkeep.is_empty() => {
                    if let Err(e) = joined_outcome(&db_path, "upkeep worker", joined) {
                        return Some(e);
                    }
                }
                outcome = &mut self.capture_rx => {
                    self.capture_ended = true;
                    return Some(match outcome {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => worker_failed(&db_path, "capture worker".into(), "it returned before shutdown".into()),
                        Err(_) => self.capture_lost(),
                    });
                }
            }
        }
    }

    fn capture_lost(&self) -> Error {
        worker_failed(&self.db_path, "capture worker".into(), "its thread ended without a result".into())
    }

    /// The final flush: the capturer's last pass, then the uploaders' drain, both within one
    /// `shutdown_deadline`; then the first failure, if any.
    async fn stop(mut self, mut failed: Option<Error>) -> Result<(), Error> {
        let db_path = self.db_path.clone();
        if let Some(e) = &failed {
            // Until the process exits, /healthz says why.
            self.counters.record_failure(e);
        }
        info!(db = %db_path.display(), "shutting down: shipping what is committed");
        let _ = self.wake_tx.send(Wake::Shutdown);
        // One deadline for the whole flush: the capturer's last copy (which may write a snapshot)
        // and the uploads after it.
        let flush_deadline = tokio::time::Instant::now() + self.shutdown_deadline;
        // A capturer that ended early has had its outcome taken as `failed` already.
        let capture_result = if self.capture_ended {
            Ok(())
        } else {
            match tokio::time::timeout_at(flush_deadline, &mut self.capture_rx).await {
                Ok(outcome) => outcome.unwrap_or_else(|_| Err(self.capture_lost())),
                Err(_) => {
                    // The thread is left to the process's exit; nothing after this waits for it.
                    self.uploaders.abort_all();
                    return Err(Error::FlushIncomplete { unshipped: self.positions.len(), detail: format!("the capturer's last copy of {} did not finish within the shutdown deadline; commits since the last pass may not be shipped", db_path.display()) });
                }
            }
        };
        if let Err(e) = &capture_result {
            self.counters.record_failure(e);
        }

        let drained = tokio::time::timeout_at(flush_deadline, async {
            while let Some(joined) = self.uploaders.join_next().await {
                if let Err(e) = joined_outcome(&db_path, "uploader", joined) {
                    failed.get_or_insert(e);
                }
            }
        })
        .await;
        self.upkeep.abort_all();
        if let Some(e) = failed.as_ref().filter(|e| matches!(e, Error::WorkerFailed { .. })) {
            error!(db = %db_path.display(), error = %e, "replication stopped: a worker failed");
        }
        if drained.is_err() {
            let end = self.state_rx.borrow().end;
            let behind: Vec<String> = self
                .positions
                .iter()
                .enumerate()
                .filter(|(_, p)| *p.borrow() != end)
                .map(|(i, p)| {
                    format!("replica #{} at {}", i + 1, p.borrow().map_or("nothing".to_string(), |p| p.to_string()))
                })
                .collect();
            self.uploaders.abort_all();
            let incomplete = Error::FlushIncomplete {
                unshipped: behind.len(),
                detail: format!("{} (local end {})", behind.join(", "), end.map_or("none".into(), |p| p.to_string())),
            };
            return Err(match failed {
                Some(e @ Error::WorkerFailed { .. }) => e,
                _ => incomplete,
            });
        }
        if let Some(e) = failed {
            return Err(e);
        }
        capture_result?;
        info!(db = %db_path.display(), "replication stopped; everything committed was shipped");
        Ok(())
    }
}

/// `worker` with a panic caught and reported as [`Error::WorkerFailed`].
async fn caught(
    db: PathBuf,
    worker: String,
    work: impl std::future::Future<Output = Result<(), Error>>,
) -> Result<(), Error> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .unwrap_or_else(|payload| Err(worker_failed(&db, worker, fail_point::panic_message(payload.as_ref()))))
}

/// A worker's outcome from its `JoinSet`. A JoinError means the task was cancelled (its panics
/// are caught inside it): a failure of that worker too.
fn joined_outcome(
    db: &std::path::Path,
    worker: &str,
    joined: Result<Result<(), Error>, tokio::task::JoinError>,
) -> Result<(), Error> {
    joined.unwrap_or_else(|e| Err(worker_failed(db, worker.into(), e.to_string())))
}

fn worker_failed(db: &std::path::Path, worker: String, detail: String) -> Error {
    Error::WorkerFailed { db: db.to_path_buf(), worker, detail }
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
