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
    /// A file event on the database file or its `-shm`.
    Changed,
    /// A file event on the `-wal`: a commit may be under way, its wal-index update still to
    /// come (a resting database keeps looking for a while, see capture's `REST_RECHECK`).
    WalChanged,
    /// An uploader found the replica inconsistent with the local shadow.
    NewGeneration(String),
    /// A replica's snapshot interval elapsed, or its retention found no snapshot to keep.
    Snapshot,
    /// Copy what is committed, publish it, and reply with the shadow's end: the sync barrier.
    Sync(tokio::sync::oneshot::Sender<Option<Pos>>),
    /// Copy what is committed, publish it as final, and stop.
    Shutdown,
    /// Leave to be awake was given back while this resting database waited for it (`awake`).
    LeaveFree,
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
    /// (index, offset) from which the current index is read from the live WAL (`wal_path`)
    /// rather than its shadow file: the capturer's pin keeps those bytes there until every
    /// replica has them or the capturer stores them, and the application's WAL cannot restart
    /// meanwhile.
    pub live_from: Option<(u32, u64)>,
    /// The capturer holds its pin for bytes only the live WAL has (`live_from`) because the
    /// disk had no room for them: uploaders ship at once, since the application's WAL cannot
    /// restart until they have.
    pub ship_now: bool,
    /// The application's `-wal` file.
    pub wal_path: PathBuf,
    /// The shadow's disk is nearly full (see `capture::disk_is_tight`): uploaders hold commits
    /// back for `sync-interval` only while less than `upload::TIGHT_DISK_BATCH_BYTES` waits, so
    /// the shadow and the application's WAL (which the capturer's pin may keep from restarting)
    /// leave room for the app's writes.
    pub disk_tight: bool,
    /// (index, length) of the ended indexes some replica may still lack, oldest first (those a
    /// restart found on disk, then those ended since): with `end`, how much an uploader has
    /// waiting (`ShadowState::wal_past`).
    pub ended: Vec<(u32, u64)>,
    /// When `end` last moved: a writer quiet since then is not a steady stream, so an uploader
    /// ships a new WAL life with the old one's tail rather than at the next slot.
    pub end_moved_at: Option<std::time::Instant>,
}

impl ShadowState {
    /// The raw WAL published past `from`: the rest of its index, the ended indexes after it and
    /// the current one up to `end`. `None` when `from` is in another generation or past `end`.
    pub(crate) fn wal_past(&self, from: Pos) -> Option<u64> {
        let end = self.end.filter(|end| from.generation == end.generation && from <= *end)?;
        let rest = |index: u32, len: u64| if index == from.index { len.saturating_sub(from.offset) } else { len };
        let ended: u64 =
            self.ended.iter().filter(|&&(index, _)| index >= from.index).map(|&(i, len)| rest(i, len)).sum();
        Some(ended + rest(end.index, end.offset))
    }

    /// What a replica at `position` lacks, in WAL bytes. One whose position is unknown (a
    /// request failed, or none has landed yet) or in another generation may lack everything
    /// kept locally: counted the same way, not as what the shadow takes on disk (spooled
    /// indexes are compressed).
    pub(crate) fn wal_lacked(&self, position: Option<Pos>) -> u64 {
        position
            .and_then(|pos| self.wal_past(pos))
            .or_else(|| self.end.and_then(|end| self.wal_past(Pos { index: 0, offset: 0, ..end })))
            .unwrap_or(0)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The rest of the replica's index, every ended index after it and the current one to its
    /// end; nothing for another generation or a position past the end.
    #[test]
    fn wal_past_counts_what_a_position_lacks() {
        let generation = GenerationId::time_ordered();
        let pos = |index, offset| Pos { generation, index, offset };
        let state =
            ShadowState { end: Some(pos(5, 700)), ended: vec![(2, 1000), (3, 2000), (4, 4000)], ..Default::default() };
        assert_eq!(state.wal_past(pos(3, 500)), Some(1500 + 4000 + 700));
        assert_eq!(state.wal_past(pos(2, 1000)), Some(2000 + 4000 + 700));
        assert_eq!(state.wal_past(pos(5, 200)), Some(500));
        assert_eq!(state.wal_past(pos(5, 700)), Some(0));
        assert_eq!(state.wal_past(pos(5, 701)), None);
        assert_eq!(state.wal_past(Pos { generation: GenerationId::time_ordered(), index: 5, offset: 0 }), None);
    }

    /// An unknown position, or one from an older generation, lacks every byte kept locally.
    #[test]
    fn wal_lacked_counts_everything_kept_for_an_unknown_position() {
        let generation = GenerationId::time_ordered();
        let pos = |index, offset| Pos { generation, index, offset };
        let state = ShadowState { end: Some(pos(5, 700)), ended: vec![(3, 2000), (4, 4000)], ..Default::default() };
        assert_eq!(state.wal_lacked(Some(pos(4, 1000))), 3000 + 700);
        assert_eq!(state.wal_lacked(None), 2000 + 4000 + 700);
        let older = Pos { generation: GenerationId::time_ordered(), index: 9, offset: 0 };
        assert_eq!(state.wal_lacked(Some(older)), 2000 + 4000 + 700);
        assert_eq!(ShadowState::default().wal_lacked(None), 0);
    }
}
