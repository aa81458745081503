use std::path::PathBuf;

use walstream_format::Pos;

/// Why replication of a database failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file exists but does not start with the SQLite header. It is left untouched.
    #[error("{path} is not a SQLite database (its first 16 bytes are not \"SQLite format 3\\0\"); point walstream at the database file itself")]
    NotADatabase {
        /// The file.
        path: PathBuf,
    },
    /// The database could not be put into WAL mode (another connection holds a lock, or it is
    /// read-only).
    #[error("{path}: cannot switch to WAL journal mode (still {mode:?}); close other connections or enable WAL in the application")]
    NotWal {
        /// The database.
        path: PathBuf,
        /// The journal mode SQLite reported.
        mode: String,
    },
    /// SQLite refused an operation on the source database.
    #[error("sqlite {path}: {source}")]
    Sqlite {
        /// The database.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// Local file I/O failed (database, WAL or shadow files).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A store operation failed.
    #[error("replica {replica}: {source}")]
    Store {
        /// The replica's name.
        replica: String,
        /// The cause.
        source: walstream_store::Error,
    },
    /// An object in the replica is not what its name says.
    #[error("replica {replica}: object {key}: {source}")]
    CorruptObject {
        /// The replica's name.
        replica: String,
        /// The object.
        key: String,
        /// What is wrong with it.
        source: walstream_format::Error,
    },
    /// An object could not be decrypted (or was not encrypted where it should be).
    #[error("replica {replica}: object {key}: {problem}")]
    Encryption {
        /// The replica's name.
        replica: String,
        /// The object.
        key: String,
        /// What is wrong.
        problem: walstream_format::age::OpenError,
    },
    /// The replica holds WAL beyond what this machine ever copied: its history and the local one
    /// disagree, so the shipper starts a new generation rather than mix them.
    #[error("replica {replica} is at {remote} but the local shadow wal ends at {local}")]
    ReplicaAhead {
        /// The replica's name.
        replica: String,
        /// The replica's position.
        remote: Pos,
        /// The local end.
        local: Pos,
    },
    /// The replica lacks WAL that every replica was known to hold, so walstream discarded it
    /// locally (the replica was reset or its objects deleted): a new generation ships it again.
    #[error("replica {replica} is at {remote}, but the local shadow wal no longer holds what follows (every replica had shipped it); starting a new generation")]
    ShippedWalDiscarded {
        /// The replica's name.
        replica: String,
        /// The replica's position.
        remote: Pos,
    },
    /// The replica lacks the generation's snapshot, whose local copy was freed once every
    /// replica held it (the replica was reset): a new generation ships a new one.
    #[error("replica {replica} lacks snapshot {index:08x} of generation {generation}, which every replica had, so walstream freed its local copy; starting a new generation")]
    SnapshotDiscarded {
        /// The replica's name.
        replica: String,
        /// The generation.
        generation: walstream_format::GenerationId,
        /// The snapshot's index.
        index: u32,
    },
    /// The file watcher could not be set up.
    #[error("watch {path}: {source}")]
    Watch {
        /// The directory watched.
        path: PathBuf,
        /// The cause.
        source: notify::Error,
    },
    /// Another walstream process is replicating this database.
    #[error("another walstream is already replicating this database (it holds a lock on {}); stop it first, or replicate a different database", lock.display())]
    AlreadyReplicating {
        /// The database file the other process has claimed.
        lock: PathBuf,
    },
    /// Another replicator (another machine or container) holds the replica's lease.
    #[error("replica {replica} ({target}) is leased by {holder} ({until}): another walstream is replicating to it; stop that one (it hands the lease back on SIGTERM), wait longer with --lease-timeout, or give this database its own replica path")]
    Leased {
        /// The replica's name.
        replica: String,
        /// Where it points.
        target: String,
        /// The holder the lease names.
        holder: String,
        /// When it runs out.
        until: String,
    },
    /// Another replicator took the replica's lease while this one held it (after it expired).
    #[error("lost the lease of replica {replica} ({target}), now held by {holder}: another walstream took this replica over, so this one stops writing to it")]
    LeaseLost {
        /// The replica's name.
        replica: String,
        /// Where it points.
        target: String,
        /// Who holds it now.
        holder: String,
    },
    /// A worker panicked or ended while replication should have gone on: a bug in walstream.
    /// Replication of the database has stopped, and it is never reported as shipped.
    #[error("{db}: the {worker} failed ({detail}); replication of this database stopped. This is a bug in walstream: please report it with this log; restarting walstream resumes replication")]
    WorkerFailed {
        /// The database.
        db: PathBuf,
        /// Which worker: `capture worker`, `uploader of replica NAME`, `upkeep worker of replica NAME`.
        worker: String,
        /// The panic message, or how it ended.
        detail: String,
    },
    /// The final flush did not finish before its deadline.
    #[error("shutdown deadline passed with {unshipped} replica(s) not fully shipped: {detail}")]
    FlushIncomplete {
        /// How many replicas were behind.
        unshipped: usize,
        /// Which, and where each stopped.
        detail: String,
    },
}

impl Error {
    /// True when a local disk is full (ENOSPC, or a quota): the cause of a failed pass that
    /// `/healthz` and the `walstream_disk_full` metric report.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::Io { source, .. } if is_disk_full(source))
    }
}

pub(crate) fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}

pub(crate) fn sqlite_err(path: impl Into<PathBuf>) -> impl FnOnce(rusqlite::Error) -> Error {
    let path = path.into();
    move |source| Error::Sqlite { path, source }
}

/// ENOSPC, or a quota.
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}
