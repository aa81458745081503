//! Exit codes. Scripts and init containers branch on these, so they are part of the CLI
//! contract: never renumber one. (Litestream exits 1 for every error; walstream keeps 1 for
//! errors without a more specific code.)

use crate::replica_url::UrlError;

pub(crate) const OK: i32 = 0;
/// Any error without a more specific code.
pub(crate) const ERROR: i32 = 1;
// 2 is clap's code for bad arguments.
/// Restore found no backup in the replica (and `-if-replica-exists` was not given).
pub(crate) const NO_BACKUP: i32 = 3;
/// The database path holds something that is not a SQLite database.
pub(crate) const NOT_A_DATABASE: i32 = 4;
/// A replica URL that cannot be used.
pub(crate) const BAD_URL: i32 = 5;
/// The replica holds a corrupt, truncated or inconsistent object.
pub(crate) const CORRUPT_REPLICA: i32 = 6;
/// Restore's output path already exists.
pub(crate) const OUTPUT_EXISTS: i32 = 7;
/// The final flush after SIGTERM did not finish before its deadline.
pub(crate) const FLUSH_INCOMPLETE: i32 = 8;
/// The replica's bucket does not exist.
pub(crate) const BUCKET_NOT_FOUND: i32 = 9;
/// The object store refused the credentials, or none could be found.
pub(crate) const CREDENTIALS: i32 = 10;
/// The replica has backups, but not the generation, index or moment asked for (or `-index`
/// and `-timestamp` together).
pub(crate) const NO_SUCH_RESTORE_POINT: i32 = 11;
/// The config file is missing or invalid, or does not name the database or replica asked for.
pub(crate) const CONFIG: i32 = 12;
/// Another walstream process is already replicating the database.
pub(crate) const ALREADY_REPLICATING: i32 = 13;
/// `walstream sync`: the replicas did not confirm before the timeout (or replication stopped).
pub(crate) const SYNC_NOT_CONFIRMED: i32 = 14;
/// replicate: another walstream (another machine or container) holds the replica's lease, or
/// took it over.
pub(crate) const REPLICA_LEASED: i32 = 15;
/// A local disk is full (ENOSPC or a quota): a restore's output volume, or the replicator's
/// final flush could not finish because of it.
pub(crate) const DISK_FULL: i32 = 16;
/// A replication worker failed (a bug in walstream), so replication of a database stopped.
pub(crate) const WORKER_FAILED: i32 = 17;
/// The replica is age-encrypted and no configured identity decrypts it, or its objects are not
/// encrypted although its config has an `age` block.
pub(crate) const ENCRYPTION: i32 = 18;
/// replicate: the open-file limit is too low for the databases asked for, even raised to its
/// hard limit.
pub(crate) const TOO_FEW_DESCRIPTORS: i32 = 19;
/// A signal cut a restore short, or a second signal cut the graceful shutdown short.
pub(crate) const INTERRUPTED: i32 = 130;

/// A signal arrived before a restore finished; nothing was written.
#[derive(Debug)]
pub(crate) struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by a signal before the restore finished; nothing was written")
    }
}

impl std::error::Error for Interrupted {}

/// The application's end, as an exit code for walstream.
#[derive(Debug)]
pub(crate) struct AppExit(pub(crate) i32);

impl std::fmt::Display for AppExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the -exec command exited with status {}", self.0)
    }
}

impl std::error::Error for AppExit {}

/// The code of the first cause in the chain that has one of its own.
pub(crate) fn code_for(error: &anyhow::Error) -> i32 {
    error.chain().find_map(specific_code).unwrap_or(ERROR)
}

fn specific_code(cause: &(dyn std::error::Error + 'static)) -> Option<i32> {
    use walstream_restore::Error as R;
    use walstream_shipper::Error as S;
    if cause.is::<UrlError>() {
        return Some(BAD_URL);
    }
    if cause.is::<crate::config::ConfigError>() {
        return Some(CONFIG);
    }
    // `replicate -exec` exits with the application's own code, whatever it is.
    if let Some(AppExit(code)) = cause.downcast_ref() {
        return Some(*code);
    }
    if cause.is::<crate::fd_limit::TooFewDescriptors>() {
        return Some(TOO_FEW_DESCRIPTORS);
    }
    if cause.is::<Interrupted>() {
        return Some(INTERRUPTED);
    }
    if cause.is::<crate::sync_client::NotConfirmed>() {
        return Some(SYNC_NOT_CONFIRMED);
    }
    if let Some(e) = cause.downcast_ref::<S>() {
        return match e {
            S::NotADatabase { .. } => Some(NOT_A_DATABASE),
            S::FlushIncomplete { .. } => Some(FLUSH_INCOMPLETE),
            S::AlreadyReplicating { .. } => Some(ALREADY_REPLICATING),
            S::Leased { .. } | S::LeaseLost { .. } => Some(REPLICA_LEASED),
            S::WorkerFailed { .. } => Some(WORKER_FAILED),
            S::Encryption { problem, .. } => Some(encryption_code(problem)),
            _ => None,
        };
    }
    if let Some(e) = cause.downcast_ref::<R>() {
        return match e {
            R::NoBackups => Some(NO_BACKUP),
            R::OutputExists { .. } => Some(OUTPUT_EXISTS),
            R::GenerationNotFound { .. }
            | R::IndexNotFound { .. }
            | R::BeforeFirstSnapshot { .. }
            | R::IndexAndTimestamp => Some(NO_SUCH_RESTORE_POINT),
            // Transparent: the store error is not a separate link of the chain.
            R::Store(e) => store_code(e),
            R::MissingIndex { .. }
            | R::MissingInitialSegment { .. }
            | R::SegmentGap { .. }
            | R::CorruptObject { .. }
            | R::ChecksumBreak { .. }
            | R::IntegrityCheck { .. } => Some(CORRUPT_REPLICA),
            R::Encryption { problem, .. } => Some(encryption_code(problem)),
            _ => None,
        };
    }
    if let Some(e) = cause.downcast_ref::<std::io::Error>() {
        return matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)).then_some(DISK_FULL);
    }
    store_code(cause.downcast_ref::<walstream_store::Error>()?)
}

/// A damaged age file is a corrupt object; a missing or wrong identity is a key problem.
fn encryption_code(e: &walstream_format::age::OpenError) -> i32 {
    match e {
        walstream_format::age::OpenError::Corrupt(_) => CORRUPT_REPLICA,
        _ => ENCRYPTION,
    }
}

fn store_code(e: &walstream_store::Error) -> Option<i32> {
    use walstream_store::Error as Store;
    match e {
        Store::BucketNotFound { .. } => Some(BUCKET_NOT_FOUND),
        Store::Credentials { .. } => Some(CREDENTIALS),
        _ => None,
    }
}
