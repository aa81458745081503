//! What the capturer and the other workers say to each other: the [`Wake`]s that start a
//! capture pass and the [`ShadowState`] each pass publishes. A leaf module, so the capturer,
//! the uploaders, upkeep, the file watcher and `status` share these types without depending on
//! each other.

use std::path::PathBuf;
use std::time::Duration;

use walstream_format::{GenerationId, Pos};

use crate::meta::LocalSnapshot;

/// `Timing::pass_spacing` in production; the file-event thread pauses this long too.
pub(crate) const PASS_SPACING: Duration = Duration::from_millis(10);

/// What wakes the capturer.
#[derive(Debug)]
pub(crate) enum Wake {
    /// A file event on the database or its WAL.
    Changed,
    /// An uploader found the replica inconsistent with the local shadow.
    NewGeneration(String),
    /// A replica's snapshot interval elapsed, or its retention found no snapshot to keep.
    Snapshot,
    /// Copy what is committed, publish it, and reply with the shadow's end: the sync barrier.
    Sync(tokio::sync::oneshot::Sender<Option<Pos>>),
    /// Copy what is committed, publish it as final, and stop.
    Shutdown,
}

/// The shadow WAL's state, published to the uploaders after every pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShadowState {
    /// The current generation; `None` until the database exists.
    pub generation: Option<GenerationId>,
    /// Where the generation's shadow index files are.
    pub wal_dir: PathBuf,
    /// The snapshot the generation starts from.
    pub snapshot: Option<LocalSnapshot>,
    /// The committed end of the shadow: everything before it may be shipped.
    pub end: Option<Pos>,
    /// Set on the last state, published after the final copy at shutdown.
    pub is_final: bool,
    /// How many sync barriers (`walstream sync`, POST /sync) have been asked for: uploaders
    /// holding back for `sync-interval` ship at once when it changes.
    pub syncs_requested: u64,
    /// While the disk is full: (index, offset) from which the current index is read from the
    /// live WAL (`wal_path`) rather than its shadow file. Uploaders then ship at once, since the
    /// capturer holds its pin, and the application's WAL cannot restart, until they have.
    pub live_from: Option<(u32, u64)>,
    /// The application's `-wal` file.
    pub wal_path: PathBuf,
    /// The shadow's disk is nearly full (see `capture::disk_is_tight`): uploaders hold commits
    /// back for `sync-interval` only while less than `upload::TIGHT_DISK_BATCH_BYTES` waits, so
    /// the shadow and the application's WAL (which the capturer's pin may keep from restarting)
    /// leave room for the app's writes.
    pub disk_tight: bool,
    /// (index, length) of the ended indexes some replica may still lack, oldest first (those
    /// ended since walstream started): with `end`, how much an uploader has waiting.
    pub ended: Vec<(u32, u64)>,
}

/// Whether the capturer's pin vouches for the database file, for a snapshot framed straight
/// from it (the disk had no room for a local copy; see `LocalSnapshot::from_database`). Every
/// read of that file happens under the read lock while this is open, and the capturer closes it
/// under the write lock before it lets the pin go: so no byte of such a snapshot is read
/// unpinned, and an upload cut off that way fails rather than ship a database the pin no longer
/// matches.
#[derive(Debug, Default)]
pub(crate) struct PinGate(std::sync::RwLock<bool>);

impl PinGate {
    pub(crate) fn set(&self, open: bool) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = open;
    }

    /// Held while reading: `*guard` says whether the read may go ahead.
    pub(crate) fn hold(&self) -> std::sync::RwLockReadGuard<'_, bool> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
}
