use std::path::PathBuf;

use walstream_format::GenerationId;

/// Why a restore failed. Whatever the reason, nothing was left at the output path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The output path exists; restore never overwrites.
    #[error("cannot restore, output path already exists: {}", path.display())]
    OutputExists {
        /// The output path.
        path: PathBuf,
    },
    /// The replica holds no generation with a snapshot.
    #[error("no matching backups found")]
    NoBackups,
    /// `-generation` names a generation the replica does not have (or one without a snapshot).
    #[error("generation {generation} not found in the replica (list them with `walstream generations`)")]
    GenerationNotFound {
        /// The generation asked for.
        generation: GenerationId,
    },
    /// `-index` names an index the generation does not have.
    #[error("index {index:08x} not found in generation {generation} (list them with `walstream wal`)")]
    IndexNotFound {
        /// The generation.
        generation: GenerationId,
        /// The index asked for.
        index: u32,
    },
    /// `-index` and `-timestamp` together.
    #[error("cannot specify index & timestamp to restore")]
    IndexAndTimestamp,
    /// The timestamp is before anything the replica can restore.
    #[error("nothing to restore at {}: the earliest restorable time is {}", crate::rfc3339(*timestamp), crate::rfc3339(*earliest))]
    BeforeFirstSnapshot {
        /// The moment asked for.
        timestamp: std::time::SystemTime,
        /// The first snapshot's creation time.
        earliest: std::time::SystemTime,
    },
    /// A WAL index between the snapshot and the last index has no segments.
    #[error("missing wal index {index:08x} of generation {generation}: no object {}", walstream_format::name::segment_key(generation, *index, 0))]
    MissingIndex {
        /// The generation.
        generation: GenerationId,
        /// The missing index.
        index: u32,
    },
    /// An index's segments do not start at offset 0.
    #[error("missing initial wal segment {} (the index's first segment starts at offset {offset})", walstream_format::name::segment_key(generation, *index, 0))]
    MissingInitialSegment {
        /// The generation.
        generation: GenerationId,
        /// The index.
        index: u32,
        /// The offset its first segment starts at.
        offset: u64,
    },
    /// A segment does not start where the previous one ended.
    #[error("wal segment {key} starts at offset {found} but the previous segment ended at {expected}")]
    SegmentGap {
        /// The segment's key.
        key: String,
        /// Where the previous segment ended.
        expected: u64,
        /// Where this one starts.
        found: u64,
    },
    /// An object could not be decoded (LZ4 framing, content checksum, truncation).
    #[error("corrupt object {key}: {source}")]
    CorruptObject {
        /// The object's key.
        key: String,
        /// What is wrong.
        source: walstream_format::Error,
    },
    /// An object could not be decrypted: no identity, none that matches, a damaged age file,
    /// or a plain object where the replica is configured for encryption.
    #[error("object {key}: {problem}")]
    Encryption {
        /// The object's key.
        key: String,
        /// What is wrong.
        problem: walstream_format::age::OpenError,
    },
    /// A segment's frames do not continue the WAL checksum chain: a corrupt or foreign segment.
    #[error("wal checksum chain breaks in segment {key} at offset {offset}")]
    ChecksumBreak {
        /// The segment holding the first frame that does not chain.
        key: String,
        /// Its offset within the index.
        offset: u64,
    },
    /// Objects of the plan vanished on every attempt: retention deletes faster than this
    /// restore reads.
    #[error("the replica changed under the restore {attempts} times in a row ({source}); retention deletes objects faster than this restore reads them: retry, or lengthen the replica's `retention`")]
    ReplicaKeptChanging {
        /// How many plans were tried.
        attempts: u32,
        /// The last object found missing.
        source: walstream_store::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] walstream_store::Error),
    /// SQLite refused to apply the WAL or to open the result.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// `PRAGMA integrity_check` did not say ok.
    #[error("restored database failed integrity_check: {detail}")]
    IntegrityCheck {
        /// SQLite's first complaint.
        detail: String,
    },
    /// Local I/O failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl Error {
    /// True when there was simply nothing to restore, as opposed to a failure.
    pub fn is_no_backups(&self) -> bool {
        matches!(self, Error::NoBackups)
    }
}
