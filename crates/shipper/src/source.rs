//! The live database as walstream sees it: header checks, WAL mode, the read pin and the lock
//! probe. This is the only module that opens SQLite connections to the application's database.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};
use tracing::info;

use crate::error::{io_err, sqlite_err, Error};

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// A database file shorter than this is still being created by its application.
const MIN_DB_LEN: u64 = 100;

/// How long walstream's own connections wait on a SQLite lock. Short, because walstream never
/// needs a lock that an application holds for long: it only starts read transactions.
const BUSY_TIMEOUT: Duration = Duration::from_millis(100);

// Byte offsets of SQLite's WAL-index locks in the -shm file (wal.c: WALINDEX_LOCK_OFFSET = 120).
const SHM_WRITE_LOCK: i64 = 120;
const SHM_CKPT_LOCK: i64 = 121;
/// Read-mark 0 (wal.c: `WAL_READ_LOCK(0)`): its readers read the database file alone, and no
/// checkpoint may write to that file while one is held.
const SHM_READ_LOCK_0: i64 = 123;
/// Read-marks 1 to 4 (wal.c: `WAL_READ_LOCK(i)` is lock byte 3 + i); a reader on one of them reads
/// frames of the WAL, and SQLite cannot restart the WAL while one is held.
const SHM_READ_LOCKS_PAST_0: std::ops::RangeInclusive<i64> = 124..=127;

/// How many more times, and how far apart, [`SourceDb::blocking_checkpoint_waiting`] looks
/// before it believes a checkpoint waits.
const CHECKPOINT_PROBES: u32 = 3;
const CHECKPOINT_PROBE_SPACING: Duration = Duration::from_micros(300);

/// The wal-index header (wal.c `WalIndexHdr`) is 48 bytes, stored twice at the start of -shm;
/// the checkpoint info (`WalCkptInfo`) follows: `nBackfill`, then the five read-marks.
pub(crate) const WAL_INDEX_HDR_SIZE: usize = 48;
/// Where a wal-index header copy keeps its frame count (`mxFrame`).
pub(crate) const WAL_INDEX_MAX_FRAME_AT: usize = 16;
const READ_MARKS_AT: usize = 4;
const WAL_INDEX_READ_SIZE: usize = 2 * WAL_INDEX_HDR_SIZE + READ_MARKS_AT + 4 * READ_MARKS;
/// wal.c `WAL_NREADER`: read-mark 0 and the four of `SHM_READ_LOCKS_PAST_0`.
const READ_MARKS: usize = 5;
const WAL_INDEX_VERSION: u32 = 3_007_000;

/// What SQLite's wal-index header says about the WAL's current life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WalIndexHeader {
    /// Frames in the current life; 0 right after a restart or truncation.
    pub(crate) max_frame: u32,
    /// The running checksum through the last frame written. A restart leaves it alone, so after a
    /// TRUNCATE checkpoint it still identifies where the previous life ended.
    pub(crate) frame_checksum: (u32, u32),
    /// Salt-1 of the current life; every restart adds 1.
    pub(crate) salt1: u32,
    /// Frames already checkpointed into the database file.
    pub(crate) backfilled: u32,
    /// The frame each read-mark stands at (`u32::MAX` unused); a reader holding read-lock `i`
    /// reads the WAL up to `read_marks[i]`, and no checkpoint back-fills past it.
    pub(crate) read_marks: [u32; READ_MARKS],
    /// The database's size in pages as of the last commit.
    pub(crate) db_pages: u32,
}

impl WalIndexHeader {
    /// Parses the two copies SQLite keeps; `None` unless both are initialized and equal (a
    /// writer updates one, then the other).
    fn parse(shm: &[u8; WAL_INDEX_READ_SIZE]) -> Option<WalIndexHeader> {
        let (first, rest) = shm.split_at(WAL_INDEX_HDR_SIZE);
        let (second, ckpt_info) = rest.split_at(WAL_INDEX_HDR_SIZE);
        let native = |at: usize| u32::from_ne_bytes(first[at..at + 4].try_into().expect("4 bytes"));
        if first != second || native(0) != WAL_INDEX_VERSION || first[12] != 1 {
            return None;
        }
        Some(WalIndexHeader {
            max_frame: native(WAL_INDEX_MAX_FRAME_AT),
            frame_checksum: (native(24), native(28)),
            // The salts are the WAL header's own big-endian bytes.
            salt1: u32::from_be_bytes(first[32..36].try_into().expect("4 bytes")),
            backfilled: u32::from_ne_bytes(ckpt_info[..4].try_into().expect("4 bytes")),
            read_marks: std::array::from_fn(|i| {
                let at = READ_MARKS_AT + 4 * i;
                u32::from_ne_bytes(ckpt_info[at..at + 4].try_into().expect("4 bytes"))
            }),
            db_pages: native(20),
        })
    }
}

/// What says whether a resting database changed: any commit, checkpoint, restart or truncation
/// moves the WAL file or SQLite's wal-index header, and a replaced database file another inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RestFingerprint {
    at_path: AtPath,
    /// The `-wal` file's (inode, length, modification time).
    wal: Option<(u64, u64, std::time::SystemTime)>,
    /// The wal-index header's (salt-1, frames, running checksum).
    index: Option<(u32, u32, (u32, u32))>,
}

/// The database file as one `fstat` of its descriptor saw it: inode, size, and modification and
/// change times (seconds, nanoseconds). Any write to the file moves the change time, which no
/// one can set back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    /// Whether the file last changed long enough ago, by the wall clock, that any later write
    /// must carry other times: longer than `tick`, the step of the kernel's coarse clock, or
    /// where the filesystem keeps whole seconds (no nanoseconds in either time) longer than its
    /// granularity, up to 2 s. A stamp taken sooner could be repeated by the next write.
    pub(crate) fn settled(&self, tick: Duration) -> bool {
        let settle = if self.mtime.1 == 0 && self.ctime.1 == 0 { Duration::from_secs(3) } else { tick };
        let ctime = std::time::UNIX_EPOCH
            + Duration::new(self.ctime.0.max(0) as u64, self.ctime.1.clamp(0, 999_999_999) as u32);
        std::time::SystemTime::now().duration_since(ctime).is_ok_and(|ago| ago >= settle)
    }
}

/// What a look at the database path found.
pub(crate) enum Presence {
    /// Not there yet, or still being created.
    NotYet,
    /// A SQLite database.
    Ready,
}

/// Checks the file at `path` without modifying it.
pub(crate) fn probe_file(path: &Path) -> Result<Presence, Error> {
    use std::io::Read;
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Presence::NotYet),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    let mut head = Vec::with_capacity(16);
    (&mut file).take(16).read_to_end(&mut head).map_err(io_err("read", path))?;
    if head[..] != SQLITE_MAGIC[..head.len()] {
        return Err(Error::NotADatabase { path: path.to_path_buf() });
    }
    Ok(if len < MIN_DB_LEN { Presence::NotYet } else { Presence::Ready })
}

/// What a database's path names, against the file [`SourceDb`] opened.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum AtPath {
    Opened,
    Replaced,
    Gone,
}

/// walstream's handle on the application's database.
///
/// The read pin: walstream always tries to hold a read transaction that began before its latest
/// copy of the WAL. While a reader holds a WAL read-mark SQLite cannot restart or truncate the
/// WAL, and while it holds read-mark 0 it cannot back-fill; either way the frames walstream has
/// not copied yet cannot be overwritten. The pin is rolled forward by a copy (a new read
/// transaction on the spare connection, then the old one ends) once it is a quarter second
/// old (the capturer's `Timing::pin_roll`), so it never holds back the application's
/// checkpoints for longer.
pub(crate) struct SourceDb {
    path: PathBuf,
    /// `None` while the database rests (see [`SourceDb::rest`]).
    conns: Option<[Connection; 2]>,
    /// Which connection holds the current pin.
    pinned: Option<usize>,
    /// A pin taken by [`SourceDb::roll_pin`] whose predecessor has not been released yet.
    previous: Option<usize>,
    /// When the current pin was taken.
    pinned_at: Option<std::time::Instant>,
    /// The wal-index header just after the current pin was taken: what it can vouch for (see
    /// `Capturer::pin_covers`).
    index_at_pin: Option<WalIndexHeader>,
    page_size: u32,
    /// Kept open for the life of the process: closing any descriptor of a file drops every POSIX
    /// lock this process holds on it, including SQLite's own (Litestream does the same).
    db_file: File,
    shm_file: Option<File>,
    /// Whether `db_file` holds the shared-range lock as an open-file-description lock (see
    /// [`hold_shared_range`]), which outlives every close of SQLite's own descriptors.
    shared_range_held: bool,
}

impl SourceDb {
    /// Opens the database, switching it to WAL mode if it uses a rollback journal.
    pub(crate) fn open(path: &Path) -> Result<SourceDb, Error> {
        let conns = open_connections(path)?;
        let mode: String = conns[0].query_row("PRAGMA journal_mode", [], |r| r.get(0)).map_err(sqlite_err(path))?;
        if !mode.eq_ignore_ascii_case("wal") {
            info!(db = %path.display(), from = %mode, "database is not in WAL mode, switching journal_mode to wal");
            let mode: String =
                conns[0].query_row("PRAGMA journal_mode = wal", [], |r| r.get(0)).map_err(sqlite_err(path))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(Error::NotWal { path: path.to_path_buf(), mode });
            }
        }
        let page_size: u32 = conns[0].query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(sqlite_err(path))?;
        let db_file = File::open(path).map_err(io_err("open", path))?;
        let mut db = SourceDb {
            path: path.to_path_buf(),
            conns: Some(conns),
            pinned: None,
            previous: None,
            pinned_at: None,
            index_at_pin: None,
            page_size,
            db_file,
            shm_file: None,
            shared_range_held: false,
        };
        db.open_shm();
        Ok(db)
    }

    /// Takes this database for this process: a second replicator of it refuses at once instead
    /// of interleaving its shadow writes with ours. An `flock`, which Linux keeps apart from the
    /// POSIX locks SQLite takes on the same file, on the descriptor held for the process's life;
    /// the kernel drops it when the process dies, so a crash never leaves a stale one.
    pub(crate) fn claim(&self) -> Result<(), Error> {
        // SAFETY: flock(2) on a descriptor this value owns; no memory is involved.
        if unsafe { libc::flock(self.db_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::AlreadyReplicating { lock: self.path.clone() });
            }
            return Err(io_err("lock", &self.path)(e));
        }
        Ok(())
    }

    /// Lets an idle database go: both connections and the `-shm` are closed, and only the
    /// database file stays open (one descriptor), with a read lock on SQLite's shared-lock
    /// range in place of the connections' own. With no connection of walstream open, the
    /// application's last connection to close would otherwise take the exclusive lock, checkpoint
    /// and delete the WAL and wal-index, and the next life would start with new random salts:
    /// continuity lost, a new generation. Closing the connections drops every POSIX lock this
    /// process holds on the file, which is why the lock is an open-file-description lock, or,
    /// where the kernel has none, a POSIX lock taken after they close.
    pub(crate) fn rest(&mut self) -> Result<(), Error> {
        self.release_all();
        // Taken before the connections close where the kernel has open-file-description locks,
        // which no close of another descriptor drops: the application's last close could
        // otherwise slip in between (1 database in 10,000 of the many-databases bench, whose WAL
        // was checkpointed and deleted: a new generation).
        let held = self.shared_range_held || hold_shared_range(&self.db_file).is_ok();
        self.shared_range_held = held;
        self.conns = None;
        self.shm_file = None;
        if held {
            return Ok(());
        }
        lock_shared_range(&self.db_file, libc::F_SETLK).map_err(io_err("lock", &self.path))
    }

    /// Opens the connections again after [`SourceDb::rest`]; no pin is held yet.
    pub(crate) fn wake(&mut self) -> Result<(), Error> {
        if self.conns.is_none() {
            self.conns = Some(open_connections(&self.path)?);
            self.open_shm();
        }
        Ok(())
    }

    /// Looks at the database without a connection. Awake, the `-shm` header is read through the
    /// descriptor held for the purpose; resting, through one of its own, closed at once: closing
    /// a descriptor of `-shm` drops every POSIX lock this process holds there, the pin's
    /// read-mark included, and a resting database holds none.
    pub(crate) fn rest_fingerprint(&mut self) -> RestFingerprint {
        use std::os::unix::fs::MetadataExt;
        let wal = std::fs::metadata(wal_path(&self.path))
            .ok()
            .map(|m| (m.ino(), m.len(), m.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH)));
        let header = match self.conns {
            Some(_) => self.wal_index_header(),
            None => File::open(shm_path(&self.path)).ok().and_then(|shm| read_wal_index_header(&shm)),
        };
        let index = header.map(|h| (h.salt1, h.max_frame, h.frame_checksum));
        RestFingerprint { at_path: self.at_path(), wal, index }
    }

    /// The database file's [`FileStamp`], from the descriptor held awake and resting.
    pub(crate) fn file_stamp(&self) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = self.db_file.metadata().ok()?;
        Some(FileStamp {
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }

    pub(crate) fn is_resting(&self) -> bool {
        self.conns.is_none()
    }

    fn open_shm(&mut self) {
        if self.shm_file.is_none() && self.conns.is_some() {
            self.shm_file = File::open(shm_path(&self.path)).ok();
        }
    }

    pub(crate) fn page_size(&self) -> u32 {
        self.page_size
    }

    pub(crate) fn db_file(&self) -> &File {
        &self.db_file
    }

    /// What the path names now, in one stat: the file opened, another one (a restored copy
    /// moved over it: every descriptor and connection here belongs to the old one), or nothing
    /// (the database was deleted).
    pub(crate) fn at_path(&self) -> AtPath {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&self.path), self.db_file.metadata()) {
            (Ok(now), Ok(held)) if (now.dev(), now.ino()) != (held.dev(), held.ino()) => AtPath::Replaced,
            (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => AtPath::Gone,
            // The same file, or unreadable: nothing else to follow yet.
            _ => AtPath::Opened,
        }
    }

    /// Starts a new read transaction and keeps the current one until [`SourceDb::release_previous`].
    /// Returns false if SQLite refused (busy); the caller then copies without a pin.
    pub(crate) fn roll_pin(&mut self) -> bool {
        let Some(conns) = &self.conns else { return false };
        let next = self.pinned.map_or(0, |held| 1 - held);
        let conn = &conns[next];
        let began = conn
            .execute_batch("BEGIN")
            .and_then(|()| conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)));
        match began {
            Ok(_) => {
                self.previous = self.pinned;
                self.pinned = Some(next);
                self.pinned_at = Some(std::time::Instant::now());
                // Read twice if caught mid-update.
                self.index_at_pin = self.wal_index_header().or_else(|| self.wal_index_header());
                true
            }
            Err(e) => {
                tracing::debug!(db = %self.path.display(), error = %e, "could not pin the wal");
                let _ = conn.execute_batch("ROLLBACK");
                false
            }
        }
    }

    /// The wal-index header read just after the current pin was taken.
    pub(crate) fn index_at_pin(&self) -> Option<WalIndexHeader> {
        self.index_at_pin
    }

    /// Reads the wal-index header from -shm; `None` if there is none or it is mid-update.
    pub(crate) fn wal_index_header(&mut self) -> Option<WalIndexHeader> {
        self.open_shm();
        read_wal_index_header(self.shm_file.as_ref()?)
    }

    /// [`SourceDb::wal_index_header`], read up to three times: a busy writer updates the header
    /// often, and a read mid-update gives none.
    pub(crate) fn settled_wal_index_header(&mut self) -> Option<WalIndexHeader> {
        (0..3).find_map(|_| self.wal_index_header())
    }

    /// Ends the read transaction that [`SourceDb::roll_pin`] replaced.
    pub(crate) fn release_previous(&mut self) {
        if let (Some(previous), Some(conns)) = (self.previous.take(), &self.conns) {
            let _ = conns[previous].execute_batch("COMMIT");
        }
    }

    /// Ends every read transaction walstream holds.
    pub(crate) fn release_all(&mut self) {
        self.release_previous();
        if let (Some(held), Some(conns)) = (self.pinned.take(), &self.conns) {
            let _ = conns[held].execute_batch("COMMIT");
        }
    }

    pub(crate) fn is_pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// How long the current pin has been held; `None` without one.
    pub(crate) fn pin_age(&self) -> Option<Duration> {
        self.pinned.and(self.pinned_at).map(|at| at.elapsed())
    }

    /// True when another process holds a read-mark other than 0: a reader of WAL frames, which
    /// keeps SQLite from restarting the WAL even once every frame is back-filled.
    pub(crate) fn wal_readers_past_mark0(&self) -> bool {
        let Some(shm) = &self.shm_file else { return true };
        SHM_READ_LOCKS_PAST_0.into_iter().any(|offset| locked_by_other(shm, offset))
    }

    /// True when walstream's pin is certainly on a read-mark past 0, and so holds off a restart
    /// of the WAL whatever was back-filled. SQLite gives a reader read-mark 0 on a WAL back-filled
    /// whole only if it can take that lock at once; the application's checkpoint holds it
    /// exclusively until just after it has written `nBackfill`, so a pin taken in that moment sees
    /// the WAL back-filled and still reads past 0. A POSIX query (`F_GETLK`) sees only other
    /// processes' locks, an open file description's (`F_OFD_GETLK`) sees walstream's own too: a
    /// lock only the second sees is the pin's, and read-mark 0 free or held exclusively by
    /// another process is not. Where another process shares read-mark 0 and the pin's lock
    /// cannot be told from theirs, the answer is false: unsure, as before this was asked.
    pub(crate) fn pin_reads_past_mark0(&self) -> bool {
        let Some(shm) = &self.shm_file else { return false };
        if self.pinned.is_none() || self.previous.is_some() {
            return false;
        }
        let any_owner = |offset| lock_type(shm, offset, libc::F_OFD_GETLK);
        let other = |offset| lock_type(shm, offset, libc::F_GETLK).ok().flatten();
        // Without open file description locks (Linux before 3.15, some sandboxes) it cannot tell.
        let Ok(at_0) = any_owner(SHM_READ_LOCK_0) else { return false };
        let ours_alone = |offset| any_owner(offset).is_ok_and(|kind| kind.is_some()) && other(offset).is_none();
        let not_ours_at_0 = at_0.is_none() || other(SHM_READ_LOCK_0) == Some(libc::F_WRLCK);
        not_ours_at_0 || SHM_READ_LOCKS_PAST_0.into_iter().any(ours_alone)
    }

    /// True when another process reads this WAL life at a read-mark below `frame`: a reader
    /// from before `frame` was written, which holds every checkpoint back to its mark and so
    /// keeps the WAL from restarting whatever walstream does.
    pub(crate) fn reader_older_than(&mut self, frame: u32) -> bool {
        let Some(index) = self.settled_wal_index_header() else { return false };
        let Some(shm) = &self.shm_file else { return false };
        // Read-mark 0 too (the e2e long reader began on a back-filled WAL, and took it).
        (SHM_READ_LOCK_0..).zip(index.read_marks).any(|(offset, mark)| mark < frame && locked_by_other(shm, offset))
    }

    /// Back-fills the WAL into the database file with a PASSIVE checkpoint, the kind SQLite's
    /// autocheckpoint runs: it waits for no reader and no writer, and copies only frames no
    /// reader still needs. Only for a database about to rest (see `Capturer::rest`), with no pin
    /// of walstream's own in the way. Whether it got every frame is read from the wal-index after.
    pub(crate) fn backfill(&self) {
        if let Some(conns) = &self.conns {
            let _ = conns[0].query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        }
    }

    /// True when another process holds SQLite's checkpoint lock: its checkpoint runs (or a FULL,
    /// RESTART or TRUNCATE one waits, see [`SourceDb::blocking_checkpoint_waiting`]).
    pub(crate) fn checkpoint_running(&self) -> bool {
        self.shm_file.as_ref().is_some_and(|shm| locked_by_other(shm, SHM_CKPT_LOCK))
    }

    /// True when another process holds both SQLite's WAL write lock and its checkpoint lock: a
    /// FULL, RESTART or TRUNCATE checkpoint, which waits for readers such as walstream's pin.
    /// While the write lock is held nobody can append, so walstream can copy to the end and step
    /// aside without risk.
    pub(crate) fn blocking_checkpoint_waiting(&self) -> bool {
        let Some(shm) = &self.shm_file else { return false };
        let both = || locked_by_other(shm, SHM_WRITE_LOCK) && self.checkpoint_running();
        // The two probes are a moment apart, and a writer's transaction and the autocheckpoint
        // after its commit hold the two locks one after the other: beside a flat-out writer
        // whose checkpoints a long reader kept short, walstream saw a checkpoint waiting where
        // there was none several times a second, and each time stored what its pin kept and let
        // the pin go. A checkpoint that waits for the pin holds both for as long as the pin stays.
        // Unpinned, one look still does: such a checkpoint then waits for nobody, and a pin
        // taken at once is what holds it off.
        both()
            && (!self.is_pinned()
                || (0..CHECKPOINT_PROBES).all(|_| {
                    std::thread::sleep(CHECKPOINT_PROBE_SPACING);
                    both()
                }))
    }
}

/// The wal-index header at the start of `shm`; `None` if it cannot be read or is mid-update.
fn read_wal_index_header(shm: &File) -> Option<WalIndexHeader> {
    use std::os::unix::fs::FileExt;
    let mut bytes = [0u8; WAL_INDEX_READ_SIZE];
    shm.read_exact_at(&mut bytes, 0).ok()?;
    WalIndexHeader::parse(&bytes)
}

/// walstream's two read connections to the database.
fn open_connections(path: &Path) -> Result<[Connection; 2], Error> {
    let open = || -> Result<Connection, Error> {
        // READ_WRITE without CREATE: walstream must never create the application's file.
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(sqlite_err(path))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite_err(path))?;
        // Closing walstream's connections must never checkpoint and delete the WAL: that
        // would rewrite the database behind the application and break continuity.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true).map_err(sqlite_err(path))?;
        Ok(conn)
    };
    Ok([open()?, open()?])
}

pub(crate) fn wal_path(db: &Path) -> PathBuf {
    suffixed(db, "-wal")
}

fn shm_path(db: &Path) -> PathBuf {
    suffixed(db, "-shm")
}

fn suffixed(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The first byte of SQLite's shared-lock range (os_unix.c: `SHARED_FIRST`, two bytes past
/// `PENDING_BYTE`).
const SHARED_FIRST: i64 = 0x4000_0000 + 2;

/// The lock of [`lock_shared_range`] as an open-file-description lock (Linux 3.15): held by the
/// descriptor, so neither SQLite's closing its own descriptors of the file nor its unlocking
/// the range drops it, as they drop a POSIX lock of the same process. It conflicts with the
/// application's POSIX locks as a POSIX lock would.
fn hold_shared_range(file: &File) -> std::io::Result<()> {
    lock_shared_range(file, libc::F_OFD_SETLK)
}

/// Takes a read lock on [`SHARED_FIRST`] with `command` (`F_SETLK` or `F_OFD_SETLK`), as a
/// connection holding SQLite's SHARED lock does: another process cannot then take the
/// EXCLUSIVE lock, which wants a write lock on the whole range.
fn lock_shared_range(file: &File, command: libc::c_int) -> std::io::Result<()> {
    let lock = byte_lock(libc::F_RDLCK, SHARED_FIRST);
    // SAFETY: a valid descriptor and a valid pointer to `lock`.
    if unsafe { libc::fcntl(file.as_raw_fd(), command, &lock) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A lock of `kind` on the one byte at `offset`, with `l_pid` 0 as the open file description
/// commands require.
fn byte_lock(kind: libc::c_int, offset: i64) -> libc::flock {
    // SAFETY: `flock` is plain data, for which all zeroes is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = offset;
    lock.l_len = 1;
    lock
}

/// Asks the kernel whether another process holds a POSIX lock on one byte of `file`.
fn locked_by_other(file: &File, offset: i64) -> bool {
    lock_type(file, offset, libc::F_GETLK).is_ok_and(|kind| kind.is_some())
}

/// The kind of lock on the byte at `offset` that a write lock would meet, if any, asked with
/// `cmd`: `F_GETLK` sees other processes' locks, `F_OFD_GETLK` every owner's, this process's
/// POSIX locks included.
fn lock_type(file: &File, offset: i64, cmd: libc::c_int) -> std::io::Result<Option<libc::c_int>> {
    let mut lock = byte_lock(libc::F_WRLCK, offset);
    // SAFETY: a valid descriptor and a valid pointer to `lock`, which F_GETLK and F_OFD_GETLK
    // only fill in.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut lock) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let kind = libc::c_int::from(lock.l_type);
    Ok((kind != libc::F_UNLCK).then_some(kind))
}

/// Holds read-mark 0 exclusively, as the application's checkpoint does while it back-fills, until
/// the returned file is closed.
#[cfg(test)]
pub(crate) fn hold_read_mark_0(db: &Path) -> File {
    hold_shm_lock(db, SHM_READ_LOCK_0)
}

/// Shares read-mark 1, as another process's reader of WAL frames does, until the returned file is
/// closed.
#[cfg(test)]
pub(crate) fn hold_read_mark_1(db: &Path) -> File {
    hold_shm_lock_as(db, SHM_READ_LOCK_0 + 1, libc::F_RDLCK)
}

/// Holds SQLite's checkpoint lock, as the application's checkpoint does while it runs, until the
/// returned file is closed.
#[cfg(test)]
pub(crate) fn hold_checkpoint_lock(db: &Path) -> File {
    hold_shm_lock(db, SHM_CKPT_LOCK)
}

/// Holds SQLite's write lock and checkpoint lock, as the application's FULL, RESTART or TRUNCATE
/// checkpoint does while it waits for readers, until the returned files are closed.
#[cfg(test)]
pub(crate) fn hold_blocking_checkpoint_locks(db: &Path) -> [File; 2] {
    [hold_shm_lock(db, SHM_WRITE_LOCK), hold_shm_lock(db, SHM_CKPT_LOCK)]
}

/// Holds the wal-index lock at `offset` exclusively: an open file description's lock, so another
/// owner than this process's SQLite connections, as the application is.
#[cfg(test)]
fn hold_shm_lock(db: &Path, offset: i64) -> File {
    hold_shm_lock_as(db, offset, libc::F_WRLCK)
}

/// The same, holding it as `kind` (`F_RDLCK` or `F_WRLCK`).
#[cfg(test)]
fn hold_shm_lock_as(db: &Path, offset: i64, kind: libc::c_int) -> File {
    let shm = std::fs::OpenOptions::new().read(true).write(true).open(format!("{}-shm", db.display())).unwrap();
    let lock = byte_lock(kind, offset);
    // SAFETY: a valid descriptor and a valid pointer to `lock`.
    assert_eq!(
        unsafe { libc::fcntl(shm.as_raw_fd(), libc::F_OFD_SETLK, &lock) },
        0,
        "cannot take wal-index lock {offset}"
    );
    shm
}

/// The application's connection to a new database at `path`: WAL mode, no autocheckpoint (the
/// tests checkpoint when they mean to), and one committed row in `t`.
#[cfg(test)]
pub(crate) fn app_with_one_row(path: &Path) -> Connection {
    let app = Connection::open(path).unwrap();
    app.execute_batch(
        "PRAGMA journal_mode=wal; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x); INSERT INTO t VALUES (1);",
    )
    .unwrap();
    app
}

/// The application's PASSIVE checkpoint, asserted (with `why`) to have back-filled every frame;
/// returns the WAL's frames.
#[cfg(test)]
pub(crate) fn backfill_whole(app: &Connection, why: &str) -> i64 {
    let (busy, frames, backfilled): (i64, i64, i64) =
        app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
    assert_eq!((busy, backfilled), (0, frames), "{why}");
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a POSIX write lock on SQLite's first shared-lock byte would be refused: what the
    /// application's last close asks for before it checkpoints and deletes the WAL.
    fn shared_range_locked(path: &Path) -> bool {
        locked_by_other(&File::open(path).unwrap(), SHARED_FIRST)
    }

    /// The lock that keeps the application's last close from deleting the WAL outlives
    /// walstream's own connections closing, at every rest and after every wake: a POSIX lock of
    /// this process would go with the first of SQLite's descriptors closed, and leave a moment
    /// between the connections closing and a new lock in which the application's close could
    /// take the exclusive lock.
    #[test]
    fn the_resting_lock_outlives_every_connection_closing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("PRAGMA journal_mode=wal; CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
        let mut db = SourceDb::open(&path).unwrap();
        db.rest().unwrap();
        assert!(shared_range_locked(&path), "no lock while resting");
        for _ in 0..2 {
            db.wake().unwrap();
            db.roll_pin();
            db.release_all();
            // The connections close without `rest`: nothing takes a lock again after them.
            db.conns = None;
            db.shm_file = None;
            assert!(shared_range_locked(&path), "closing walstream's connections dropped the lock");
        }
    }

    #[test]
    fn text_file_is_not_a_database_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(
            &path,
            "this is not sqlite, it is a long enough text file to pass the size check........................",
        )
        .unwrap();
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(probe_file(&path), Err(Error::NotADatabase { .. })));
        assert!(matches!(SourceDb::open(&path), Err(Error::Sqlite { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn missing_and_empty_files_are_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        assert!(matches!(probe_file(&path), Ok(Presence::NotYet)));
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(probe_file(&path), Ok(Presence::NotYet)));
    }

    #[test]
    fn rollback_journal_database_is_switched_to_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let app = Connection::open(&path).unwrap();
        app.execute_batch("PRAGMA journal_mode=delete; CREATE TABLE t(x); INSERT INTO t VALUES (1);").unwrap();
        drop(app);
        assert!(matches!(probe_file(&path), Ok(Presence::Ready)));
        let db = SourceDb::open(&path).unwrap();
        assert_eq!(db.page_size(), 4096);
        let mode: String = Connection::open(&path).unwrap().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
    }

    /// A pin on a WAL back-filled whole reads at read-mark 0, unless read-mark 0 is held
    /// exclusively, as the application's checkpoint holds it until just after it has written the
    /// back-fill: the pin then reads past 0 and holds off the restart. Frames not back-filled
    /// put any pin past 0.
    #[test]
    fn a_pin_taken_while_read_mark_0_is_held_is_known_to_read_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        let app = app_with_one_row(&path);
        let backfill = || backfill_whole(&app, "the app's checkpoint did not back-fill everything");
        backfill();
        let mut db = SourceDb::open(&path).unwrap();
        assert!(db.roll_pin());
        assert!(!db.pin_reads_past_mark0(), "a pin on a WAL back-filled whole reads at read-mark 0");
        db.release_all();

        let held = hold_read_mark_0(&path);
        assert!(db.roll_pin());
        let index = db.index_at_pin().unwrap();
        assert_eq!(index.backfilled, index.max_frame, "the WAL was not back-filled whole; the test proves nothing");
        assert!(db.pin_reads_past_mark0(), "the pin took read-mark 0 although it was held, or was not seen past it");
        db.release_all();
        drop(held);

        app.execute("INSERT INTO t VALUES (2)", []).unwrap();
        assert!(db.roll_pin());
        assert!(db.pin_reads_past_mark0(), "a pin on frames not back-filled reads past read-mark 0");
        db.release_all();
        backfill();
        assert!(db.roll_pin());
        assert!(!db.pin_reads_past_mark0(), "once back-filled and free, read-mark 0 again");
    }
}
