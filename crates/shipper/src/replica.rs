//! A replica as the shipper's workers see it: a named store with its upload and retention
//! settings. A leaf module, so the uploader, the lease and upkeep share it without depending on
//! each other.

use std::sync::Arc;
use std::time::Duration;

use walstream_format::age::AgeKeys;
use walstream_store::ObjectStore;

/// The CLI's default `sync_interval`: Litestream v0.3.13's, so that a steady stream of commits
/// costs no more uploads (GCS Class A operations) than under litestream, which ships at most once
/// a second. A commit after a quiet spell (no upload for this long) still ships at once, and a
/// sync barrier or shutdown ends any wait; `-sync-interval 100ms` buys lower lag under load for
/// up to ten times the uploads.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// A named destination.
#[derive(Clone, Debug)]
pub struct Replica {
    /// The name in logs and errors (`file`, `gcs`, or the config's `name`).
    pub name: String,
    /// Where the objects go.
    pub store: Arc<dyn ObjectStore>,
    /// Snapshot interval and retention.
    pub policy: RetentionPolicy,
    /// The least time between two WAL uploads (the config's `sync-interval`): commits arriving
    /// sooner are held and shipped together, trading lag for fewer PUTs. A commit after a quiet
    /// spell is shipped at once; a sync barrier or shutdown ends the wait. Zero ships every
    /// pass at once.
    pub sync_interval: Duration,
    /// The `age` block: uploads are encrypted to its recipients, and what the uploader reads
    /// back is decrypted with its identities. `None`: plain LZ4, as without the block.
    pub age: Option<Arc<AgeKeys>>,
}

impl Replica {
    /// A replica with Litestream's default policy that ships every commit at once.
    pub fn new(name: impl Into<String>, store: Arc<dyn ObjectStore>) -> Replica {
        Replica {
            name: name.into(),
            store,
            policy: RetentionPolicy::default(),
            sync_interval: Duration::ZERO,
            age: None,
        }
    }
}

/// When a replica gets snapshots and loses old data. Defaults are Litestream's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Take a snapshot this often; `None` only at the start of a generation (and when
    /// retention finds none retained).
    pub snapshot_interval: Option<Duration>,
    /// Keep restorable history this far back; `None` keeps everything.
    pub retention: Option<Duration>,
    /// How often retention runs; the first check is one interval after start.
    pub check_interval: Duration,
}

impl Default for RetentionPolicy {
    fn default() -> RetentionPolicy {
        RetentionPolicy {
            snapshot_interval: None,
            retention: Some(Duration::from_secs(24 * 3600)),
            check_interval: Duration::from_secs(3600),
        }
    }
}
