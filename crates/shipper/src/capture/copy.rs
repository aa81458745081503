//! What a pass's copy finds the live WAL to be to the shadow (the same life, restarted, ended,
//! or continuity lost), what it does about it, and how a generation starts.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{debug, info, warn};
use walstream_format::wal::WalHeader;
use walstream_format::{name, GenerationId, Pos, WAL_HEADER_SIZE};

use super::pin::checkpoint_size;
use super::snapshot::SnapshotUpload;
use super::{all_hold, Capturer, Generation};
use crate::error::{io_err, Error};
use crate::meta::LocalSnapshot;
use crate::shadow::ShadowIndex;
use crate::source::{AtPath, FileStamp, WalIndexHeader};

/// A generation with no WAL life yet proves its first life first by the database file
/// (`Generation::file_before_first_life`): a life leaves the WAL only through a restart or a
/// truncation, and SQLite does either only once the life is back-filled whole into the file, a
/// write that moves its change time. So while the file's stamp is the one taken before a WAL
/// read that found no life, every commit since that read is still in the WAL. A database that
/// began with no WAL and rested till its first write otherwise had nothing to prove that life
/// by (its writer's new connection picks random salts) and took a second generation, with a
/// snapshot, at that write. The kernel stamps a write with a clock that moves in ticks (a few
/// ms): a file changed less than this long before its stamp was taken proves nothing, as a
/// write right after could carry the same times (on a filesystem that keeps whole seconds, 3 s:
/// `FileStamp::settled`).
pub(super) const FILE_STAMP_SETTLED: Duration = Duration::from_millis(100);

/// Start a new generation before an index's offsets stop fitting the 8 hex digits of a name.
const MAX_INDEX_BYTES: u64 = name::MAX_SEGMENT_OFFSET - (256 << 20);

/// What a copy may assume about the WAL since the previous copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Continuity {
    /// A pin was held throughout: no frame the previous copy did not see can have been lost.
    Pinned,
    /// No pin was held: the copy checks the live WAL still holds the shadow's last frame.
    Unproven,
}

/// What [`Capturer::observe`] found the live WAL to be, relative to the shadow.
enum Observed<'w> {
    /// Continuity is lost, or the generation must end: a new one starts, for this reason.
    NewGeneration(&'static str),
    /// The generation has seen no WAL life yet, and there is none.
    NoLife,
    /// The generation's first WAL life: its index is the snapshot's.
    FirstLife { live: &'w LiveWal, header_bytes: [u8; WAL_HEADER_SIZE], header: WalHeader },
    /// Gone (a TRUNCATE checkpoint, or the last connection closed) exactly where the shadow
    /// ends: the index is sealed, and the next life must carry `next_salt1` where the wal-index
    /// said which.
    Ended { next_salt1: Option<u32> },
    /// The shadow's own life, maybe with new frames.
    SameLife { live: &'w LiveWal },
    /// SQLite restarted the WAL once: the index ends (after the old life's tail, where the new
    /// life has not overwritten it) and the next begins.
    Restarted { live: &'w LiveWal, header_bytes: [u8; WAL_HEADER_SIZE], header: WalHeader, tail_intact: bool },
}

/// Whether the wal-index `now` shows that nothing was committed since it read `then`, when the
/// WAL had no life on disk, other than in the life now in the live WAL (salt-1 `live_salt1`),
/// whose committed frames are all still there. That life is the first since `then` if it has
/// `then`'s salt-1: SQLite writes the header of the life after a restart with the salt-1 the
/// restart set. Otherwise no commit may have happened at all: a restart adds to salt-1 but keeps
/// the running checksum, and any commit changes it. A zero checksum is a wal-index SQLite
/// rebuilt with no WAL (the last connection closed), and proves nothing: closing checkpoints and
/// deletes the WAL, so commits before it leave no trace there either.
pub(super) fn nothing_committed_since(
    then: WalIndexHeader,
    now: Option<WalIndexHeader>,
    live_salt1: Option<u32>,
) -> bool {
    if live_salt1 == Some(then.salt1) {
        return true;
    }
    now.is_some_and(|now| {
        now.max_frame == 0 && now.frame_checksum == then.frame_checksum && then.frame_checksum != (0, 0)
    })
}

/// Whether `shadow` ends with bytes only the live WAL held (the disk was full) that some replica
/// still lacks.
fn live_tail_unshipped(
    shadow: &ShadowIndex,
    generation: GenerationId,
    positions: &[watch::Receiver<Option<Pos>>],
) -> bool {
    shadow.live_from.is_some_and(|from| shadow.committed_len > from)
        && !all_hold(positions, Pos { generation, index: shadow.index, offset: shadow.committed_len })
}

/// Whether `shadow` holds, to its end, the WAL life the wal-index header `index` describes.
pub(super) fn shadow_holds_life(index: &WalIndexHeader, shadow: &ShadowIndex) -> bool {
    index.max_frame > 0
        && index.salt1 == shadow.header.salt1
        && shadow.committed_len == WAL_HEADER_SIZE as u64 + u64::from(index.max_frame) * shadow.header.frame_size()
}

/// How far SQLite's wal-index says the WAL life with `header` is committed, or 0 if the index
/// is unreadable or describes another life: a plan for the reads, never trusted for what to copy.
pub(super) fn committed_hint(wal_index: Option<WalIndexHeader>, header: &WalHeader) -> u64 {
    match wal_index {
        Some(index) if index.salt1 == header.salt1 => {
            WAL_HEADER_SIZE as u64 + u64::from(index.max_frame) * header.frame_size()
        }
        _ => 0,
    }
}

/// The live `-wal` file as one pass sees it.
pub(super) struct LiveWal {
    pub(super) file: File,
    pub(super) len: u64,
    /// The header, if the file has a valid one.
    pub(super) header: Option<([u8; WAL_HEADER_SIZE], WalHeader)>,
}

impl LiveWal {
    pub(super) fn open(path: &std::path::Path) -> Result<Option<LiveWal>, Error> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", path)(e)),
        };
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut bytes = [0u8; WAL_HEADER_SIZE];
        let header = if len >= WAL_HEADER_SIZE as u64 && file.read_exact_at(&mut bytes, 0).is_ok() {
            WalHeader::parse(&bytes).ok().map(|h| (bytes, h))
        } else {
            None
        };
        Ok(Some(LiveWal { file, len, header }))
    }

    /// True if the shadow's last frame is still byte-for-byte in the live WAL at its offset.
    /// A header-only shadow has no frame to vouch for it, so it is false.
    fn still_holds_last_frame(&self, shadow: &ShadowIndex) -> Result<bool, Error> {
        let Some(last) = shadow.last_frame()? else {
            return Ok(false);
        };
        if self.len < shadow.committed_len {
            return Ok(false);
        }
        let mut live = vec![0u8; last.len()];
        if self.file.read_exact_at(&mut live, shadow.committed_len - last.len() as u64).is_err() {
            return Ok(false);
        }
        Ok(live == last)
    }
}

impl Capturer {
    /// The database file's stamp, unless it changed within [`FILE_STAMP_SETTLED`].
    pub(super) fn settled_file_stamp(&self) -> Option<FileStamp> {
        self.db.file_stamp().filter(|stamp| stamp.settled(FILE_STAMP_SETTLED))
    }

    /// Copies new committed frames into the shadow, following restarts and starting a new
    /// generation where continuity is lost: [`observe`](Capturer::observe) decides what the live
    /// WAL is to the shadow, and this acts on it.
    pub(super) fn copy(&mut self, since_last_copy: Continuity, defer: bool) -> Result<(), Error> {
        if let Some(reason) = self.pending_new_generation.take() {
            return self.start_new_generation(reason);
        }
        // Taken before the WAL is read: a first life proven absent in that read stands for
        // everything committed before the stamp, too.
        let file_stamp = match &self.generation {
            Some(generation) if generation.shadow.is_none() => self.settled_file_stamp(),
            _ => None,
        };
        let wal = LiveWal::open(&self.wal_path)?;
        // Read after the WAL was opened, so it describes that file or a later state of it.
        let wal_index = self.db.wal_index_header();
        let observed = self.observe(since_last_copy, wal.as_ref(), wal_index)?;
        #[cfg(test)]
        if let Some(race) = self.after_observe.take() {
            race();
        }
        let Some(generation) = self.generation.as_mut() else {
            return self.start_new_generation("no generation exists".into());
        };
        let hint = |header: &WalHeader| committed_hint(wal_index, header);
        let shadow_bytes = &self.counters.shadow_bytes;
        let added = |bytes: u64| shadow_bytes.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        match observed {
            Observed::NewGeneration(reason) => self.start_new_generation(reason.into()),
            Observed::NoLife => {
                // Nothing was committed up to this read (observe proved it): the next life is
                // checked against it, so restarts with no commit between passes cost nothing.
                if wal_index.is_some() {
                    generation.index_before_first_life = wal_index;
                }
                if file_stamp.is_some() {
                    generation.file_before_first_life = file_stamp;
                }
                Ok(())
            }
            Observed::FirstLife { live, header_bytes, header } => {
                let wal_dir = self.meta.wal_dir(&generation.id);
                let mut shadow = ShadowIndex::create(&wal_dir, generation.snapshot.index, header_bytes, header)?;
                added(WAL_HEADER_SIZE as u64);
                added(shadow.append_from(&live.file, live.len, hint(&shadow.header), &mut self.buf, defer)?);
                generation.shadow = Some(shadow);
                Ok(())
            }
            Observed::Ended { next_salt1 } => {
                let shadow = generation.shadow.as_mut().expect("observed against a shadow");
                shadow.sealed = true;
                if next_salt1.is_some() {
                    shadow.next_salt1 = next_salt1;
                }
                Ok(())
            }
            Observed::SameLife { live } => {
                let shadow = generation.shadow.as_mut().expect("observed against a shadow");
                shadow.sealed = false;
                shadow.next_salt1 = None;
                added(shadow.append_from(&live.file, live.len, hint(&shadow.header), &mut self.buf, defer)?);
                Ok(())
            }
            Observed::Restarted { live, header_bytes, header, tail_intact } => {
                let shadow = generation.shadow.as_mut().expect("observed against a shadow");
                // The new life overwrites from the front; frames of the old life beyond its
                // reach may still be there, and carry the old salts, so the chain check
                // accepts only them.
                // No pin vouches for those: they are stored.
                if tail_intact {
                    added(shadow.append_from(&live.file, live.len, hint(&shadow.header), &mut self.buf, false)?);
                }
                // A life that ends with bytes only the live WAL held (the disk was full) and
                // that some replica lacks: the restart writes over them, so nothing vouches for
                // them any more.
                if live_tail_unshipped(shadow, generation.id, &self.replica_positions) {
                    return self.start_new_generation(
                        "the wal restarted while the disk was full, before every replica had its last frames".into(),
                    );
                }
                shadow.finish()?;
                generation.ended.push((shadow.index, shadow.committed_len));
                let mut next =
                    ShadowIndex::create(&self.meta.wal_dir(&generation.id), shadow.index + 1, header_bytes, header)?;
                // A steady writer's next transaction is as large as its last (see
                // `let_busy_wal_restart`); one past the checkpoint size on its own says nothing.
                if shadow.last_transaction < checkpoint_size(shadow.header.frame_size()) {
                    next.last_transaction = shadow.last_transaction;
                }
                generation.index_started_at = added(WAL_HEADER_SIZE as u64);
                debug!(db = %self.db_path.display(), index = next.index, "wal restarted; new index");
                let shadow = generation.shadow.insert(next);
                added(shadow.append_from(&live.file, live.len, hint(&shadow.header), &mut self.buf, defer)?);
                Ok(())
            }
        }
    }

    /// Starts a new generation. Until one has started nothing may be appended to the old one,
    /// so a start that fails (a full disk cannot take the snapshot) is the first thing the next
    /// pass tries again, whatever the live WAL looks like by then.
    pub(super) fn start_new_generation(&mut self, reason: String) -> Result<(), Error> {
        // Deleted since the pass began (see `pass`): a WAL that went with it is no truncation.
        if self.db.at_path() == AtPath::Gone {
            return Ok(());
        }
        // A generation starts under a pin (see `new_generation`) and keeps it: after a drop a
        // pass may hold none (`may_pin_after_drop`), and one it holds would go at its end. And a
        // drop names an index of the old generation, whose numbers the new one uses again: kept,
        // a drop of index 0 held off the new generation's first drop for `DROP_PIN_RETRY`, and
        // beside 10,000-row updates in a store outage the WAL grew to 233 MB meanwhile.
        self.last_drop = None;
        if !self.db.is_pinned() && self.db.roll_pin() {
            self.judge_new_pin();
        }
        let mut result = self.new_generation(&reason);
        if result.as_ref().err().is_some_and(Error::is_disk_full) {
            // The old generations' files are the room a new one needs, and hold nothing it will
            // not (its snapshot and first index hold every commit). Closed first: a deleted file
            // still takes its space while open.
            self.generation = None;
            self.meta.clean_all();
            result = self.new_generation(&reason);
        }
        if result.is_err() {
            self.pending_new_generation = Some(reason);
        }
        result
    }

    /// What the live WAL is to the current generation's shadow. Reads the WAL, changes nothing.
    fn observe<'w>(
        &self,
        since_last_copy: Continuity,
        wal: Option<&'w LiveWal>,
        wal_index: Option<WalIndexHeader>,
    ) -> Result<Observed<'w>, Error> {
        let Some(generation) = self.generation.as_ref() else {
            return Ok(Observed::NewGeneration("no generation exists"));
        };
        let page_size = self.db.page_size();
        let pinned = since_last_copy == Continuity::Pinned;
        let Some(shadow) = generation.shadow.as_ref() else {
            // No WAL life seen yet in this generation: the first one is the snapshot's index.
            // Unless a pin vouches, a life may have come, been checkpointed into the file and
            // truncated since the snapshot (a database resting, woken by a commit, its pass late
            // for the app's TRUNCATE right after): taken for no life, it was lost, and each one
            // after it, until a pass saw a life before it went.
            let live = wal.and_then(|live| live.header.map(|h| (live, h)));
            let first_since_snapshot = pinned
                || generation.index_before_first_life.is_some_and(|then| {
                    nothing_committed_since(then, wal_index, live.map(|(_, (_, header))| header.salt1))
                })
                // Stamped after the WAL was read (`copy` opens it before this): a back-fill between
                // that read and a stamp taken earlier could have removed a life unseen.
                || generation.file_before_first_life.is_some_and(|then| self.db.file_stamp() == Some(then));
            return Ok(match live {
                _ if !first_since_snapshot => Observed::NewGeneration(
                    "the wal restarted with commits walstream had not copied before its first life",
                ),
                Some((_, (_, header))) if header.page_size != page_size => Observed::NewGeneration("page size changed"),
                Some((live, (header_bytes, header))) => Observed::FirstLife { live, header_bytes, header },
                None => Observed::NoLife,
            });
        };
        if shadow.committed_len >= MAX_INDEX_BYTES {
            return Ok(Observed::NewGeneration("max index size exceeded"));
        }
        let Some((live, (header_bytes, header))) = wal.and_then(|live| live.header.map(|h| (live, h))) else {
            // Truncated (TRUNCATE checkpoint) or deleted (last connection closed).
            let (ended_at_shadow, next_salt1) = match wal_index {
                // A restart keeps the running checksum, and any frame written since the shadow's
                // end would have changed it: this holds however the pin fared meanwhile.
                Some(index) => {
                    let ended = index.max_frame == 0
                        && index.salt1 != shadow.header.salt1
                        && index.frame_checksum == shadow.end_checksum();
                    (ended, Some(index.salt1))
                }
                // No wal-index left to ask (the last connection closed): only the pin can vouch.
                None => (pinned || shadow.sealed, None),
            };
            // Bytes only the live WAL held went with it unless every replica had them (rule 7).
            if ended_at_shadow && !live_tail_unshipped(shadow, generation.id, &self.replica_positions) {
                return Ok(Observed::Ended { next_salt1 });
            }
            return Ok(Observed::NewGeneration("wal truncated with commits walstream had not copied"));
        };
        if header_bytes == *shadow.header_bytes() {
            // Within one WAL life committed frames are never rewritten, so a matching header
            // means continuity unless the file was replaced; the last frame vouches for that.
            let has_frames = shadow.committed_len > WAL_HEADER_SIZE as u64;
            if !pinned && !shadow.sealed && has_frames && !live.still_holds_last_frame(shadow)? {
                return Ok(Observed::NewGeneration("wal overwritten by another process"));
            }
            return Ok(Observed::SameLife { live });
        }
        // The header changed: SQLite restarted the WAL. One restart adds exactly 1 to salt-1;
        // restarts of a WAL already seen empty add more without losing anything.
        if header.salt1 != shadow.next_salt1.unwrap_or(shadow.header.salt1.wrapping_add(1)) {
            return Ok(Observed::NewGeneration("wal restarted more than once while unobserved"));
        }
        if header.page_size != page_size {
            return Ok(Observed::NewGeneration("page size changed"));
        }
        let tail_intact = live.still_holds_last_frame(shadow)?;
        // The new life's first transaction, until it commits, leaves the wal-index as the restart
        // left it: empty, with the old life's running checksum, which any frame committed after
        // the shadow's end would have changed (as for a truncated WAL above). Seen so, the old
        // life ended at the shadow's end. Without this, an app's TRUNCATE right after a pin drop
        // and its next transaction's first frames, both between two passes, cost a new generation
        // (`a_writer_outrunning…`, about 1 run in 40).
        let ended_at_shadow = [wal_index, self.db.index_at_pin()].into_iter().flatten().any(|index| {
            index.max_frame == 0 && index.salt1 == header.salt1 && index.frame_checksum == shadow.end_checksum()
        });
        if !(tail_intact || pinned || shadow.sealed || ended_at_shadow) {
            return Ok(Observed::NewGeneration("wal overwritten by another process"));
        }
        Ok(Observed::Restarted { live, header_bytes, header, tail_intact })
    }

    /// Starts a generation: the current WAL life becomes index 0, then the database file is
    /// snapshotted. Runs under the caller's pin, so no frame can be back-filled into the file
    /// that index 0 does not also hold.
    fn new_generation(&mut self, reason: &str) -> Result<(), Error> {
        // The gate is open only while the current generation's snapshot comes from the database
        // and holds the pin (`live_pending`); that ends here, and an upload still reading for the
        // old generation must fail rather than read what the pin may no longer cover.
        self.pin_gate.set(false);
        let id = GenerationId::time_ordered();
        info!(db = %self.db_path.display(), generation = %id, reason, "new generation");
        self.spooling.reset();
        // Index 0 begins here: a restore from this generation's snapshot replays it from the start.
        let index_started_at = self.counters.shadow_bytes.load(std::sync::atomic::Ordering::Relaxed);
        self.meta.create_generation(&id)?;
        let mut shadow = None;
        let file_before_first_life = self.settled_file_stamp();
        let live = LiveWal::open(&self.wal_path)?;
        // Read after the WAL was opened, as in `copy`. None would cost the next unpinned pass a
        // generation.
        let index_before_first_life = self.db.settled_wal_index_header();
        if let Some(live) = live {
            if let Some((bytes, header)) = live.header {
                let mut index = ShadowIndex::create(&self.meta.wal_dir(&id), 0, bytes, header)?;
                self.counters.shadow_bytes.fetch_add(WAL_HEADER_SIZE as u64, std::sync::atomic::Ordering::Relaxed);
                let defer = self.may_defer();
                self.counters.shadow_bytes.fetch_add(
                    index.append_from(&live.file, live.len, 0, &mut self.buf, defer)?,
                    std::sync::atomic::Ordering::Relaxed,
                );
                shadow = Some(index);
            }
        }
        let snapshot = match self.meta.write_snapshot(&id, 0, self.db.db_file(), &mut self.buf) {
            Err(e) if e.is_disk_full() => {
                // No room for a compressed copy: the uploaders frame the database itself, under
                // this pin, which stays until every replica has it (`live_pending`).
                warn!(db = %self.db_path.display(), generation = %id, "no room on the local disk for the snapshot: shipping it straight from the database file, holding the application's wal until every replica has it");
                LocalSnapshot { index: 0, path: self.db_path.clone(), created: SystemTime::now(), from_database: true }
            }
            other => other?,
        };
        self.pending_snapshot = false;
        self.meta.write_generation(&id)?;
        self.stale_generations = true;
        // Opened only once the generation is in place, whose pending snapshot holds the pin.
        self.pin_gate.set(snapshot.from_database);
        self.snapshot_upload = Some(SnapshotUpload::started(&snapshot));
        self.generation = Some(Generation {
            id,
            snapshot,
            shadow,
            index_before_first_life,
            file_before_first_life,
            wal_at_snapshot: index_started_at,
            index_started_at,
            ended: Vec::new(),
        });
        // Whatever the pin vouched for before, index 0 was read after it was taken.
        self.pin_vouches = self.db.is_pinned() && self.pin_covers(self.db.index_at_pin());
        Ok(())
    }
}
