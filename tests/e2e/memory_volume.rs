//! The deployment walstream exists for, as the original Cloud Run guide sets it up: each
//! instance gets a fresh 8 MiB in-memory volume (`emptyDir: {medium: Memory, sizeLimit: 8Mi}`,
//! reproduced as a tmpfs of that size), the restore container's command exactly as the guide
//! writes it, a replicate sidecar, and an app committing about 1,000 small transactions a
//! second. Three instances in a row, each restoring what the one before committed. Tests run as
//! root (CI too); a test that cannot mount a tmpfs fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rusqlite::Connection;

use crate::harness::*;

/// A tmpfs mounted for the test's lifetime: a memory volume of `size` bytes.
pub struct MemoryVolume {
    dir: Mount,
}

enum Mount {
    Owned(tempfile::TempDir),
    /// Another thread's view of a volume the test owns.
    Borrowed(PathBuf),
}

impl Mount {
    fn path(&self) -> &Path {
        match self {
            Mount::Owned(dir) => dir.path(),
            Mount::Borrowed(path) => path,
        }
    }
}

impl MemoryVolume {
    pub fn mount(size: &str) -> MemoryVolume {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "cannot mount a {size} tmpfs (the memory volume; tests run as root): {}",
            stderr(&output)
        );
        MemoryVolume { dir: Mount::Owned(dir) }
    }

    fn borrowed(path: PathBuf) -> MemoryVolume {
        MemoryVolume { dir: Mount::Borrowed(path) }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Bytes free on the volume.
    pub fn free(&self) -> u64 {
        let stat = self.statvfs();
        stat.f_bavail * stat.f_frsize
    }

    /// Bytes in use on the volume, as `df` counts them.
    pub fn used(&self) -> u64 {
        let stat = self.statvfs();
        (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    }

    fn statvfs(&self) -> libc::statvfs {
        let path = std::ffi::CString::new(self.dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs fills the struct it is given; the path is a valid C string.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut stat) }, 0);
        stat
    }
}

impl Drop for MemoryVolume {
    fn drop(&mut self) {
        if let Mount::Owned(dir) = &self.dir {
            let _ = Command::new("umount").arg("-l").arg(dir.path()).status();
        }
    }
}

/// What one instance's app did.
#[derive(Default)]
pub struct AppRun {
    pub commits: u64,
    /// Errors the app got from SQLite ("database or disk is full" among them).
    pub errors: Vec<String>,
    /// The volume's peak use while the app ran.
    pub peak: u64,
    /// At that peak: what the database, its WAL and walstream's directory took.
    pub at_peak: String,
    /// The largest the app's WAL file grew.
    pub wal_peak: u64,
}

/// The guide's app: about `rate` transactions a second for `duration`, inserting up to 3,000
/// rows of 200 random bytes, then updating them, with SQLite's defaults (autocheckpoint at
/// 1,000 pages). Samples the volume's use after every commit.
pub fn run_app(volume: &MemoryVolume, db: &Path, rate: u32, duration: Duration, rng: &mut impl Rng) -> AppRun {
    let conn = Connection::open(db).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, body BLOB NOT NULL)").unwrap();
    let mut rows: i64 = conn.query_row("SELECT count(*) FROM rows", [], |r| r.get(0)).unwrap();
    let mut run = AppRun { commits: 0, errors: Vec::new(), peak: volume.used(), at_peak: String::new(), wal_peak: 0 };
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let wal = PathBuf::from(wal);
    let start = Instant::now();
    let spacing = Duration::from_secs(1) / rate;
    let mut n = 0u32;
    while start.elapsed() < duration {
        let body: Vec<u8> = (0..200).map(|_| rng.gen()).collect();
        let inserting = rows < 3000;
        let result = match inserting {
            true => conn.execute("INSERT INTO rows (id, body) VALUES (?1, ?2)", rusqlite::params![rows + 1, body]),
            false => conn
                .execute("UPDATE rows SET body = ?2 WHERE id = ?1", rusqlite::params![rng.gen_range(1..=rows), body]),
        };
        match result {
            Ok(_) => {
                run.commits += 1;
                rows += i64::from(inserting);
            }
            Err(e) => run.errors.push(e.to_string()),
        }
        let used = volume.used();
        if used > run.peak {
            run.peak = used;
            run.at_peak = breakdown(volume.dir.path());
        }
        run.wal_peak = run.wal_peak.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        n += 1;
        if let Some(wait) = (spacing * n).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    run
}

/// Disk taken under `dir`, per top-level entry, in KiB.
fn breakdown(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut parts: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let path = e.path();
            if !path.is_dir() {
                return format!(
                    "{} {}",
                    e.file_name().to_string_lossy(),
                    e.metadata().map_or(0, |m| m.blocks() * 512) >> 10
                );
            }
            let files: Vec<(String, u64)> = files_under(&path)
                .iter()
                .filter_map(|f| {
                    Some((f.file_name()?.to_string_lossy().into_owned(), std::fs::metadata(f).ok()?.blocks() * 512))
                })
                .filter(|(_, b)| *b > 0)
                .collect();
            let inner: Vec<String> = files.iter().map(|(name, bytes)| format!("{name} {}", bytes >> 10)).collect();
            format!(
                "{} {} [{}]",
                e.file_name().to_string_lossy(),
                files.iter().map(|(_, b)| b).sum::<u64>() >> 10,
                inner.join(", ")
            )
        })
        .collect();
    parts.sort();
    parts.join(", ")
}

/// The restore container's command, verbatim from the guide (`-v` included).
fn restore_like_the_guide(url: &str, db: &Path) {
    let output =
        walstream(&["restore", "-if-db-not-exists", "-if-replica-exists", "-v", "-o", db.to_str().unwrap(), url]);
    assert!(output.status.success(), "the guide's restore command failed ({}): {}", output.status, stderr(&output));
}

/// Three instances in a row on the guide's 8 MiB memory volume: the app never sees "disk full",
/// the volume peaks at most 2 MiB above the app alone on the same start and the app's WAL at
/// twice its size without walstream, every replicate sidecar
/// exits 0 on SIGTERM, and each instance starts from exactly what the one before committed. On
/// a volume this small the disk is tight, and commits go up once 512 KiB waits rather than at
/// the next one-second slot, but not every pass: the uploads stay a handful a second.
#[test]
fn the_guides_cloud_run_instances_on_an_8_mib_memory_volume_lose_nothing() {
    let scratch = Scratch::on(Backend::Gcs);
    let url = scratch.replica_url();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let mut previous: Option<(MemoryVolume, PathBuf)> = None;
    let segments = || scratch.replica_keys().iter().filter(|key| key.contains("/wal/")).count();
    for instance in 1..=3 {
        let volume = MemoryVolume::mount("8m");
        let db = volume.path("db");
        restore_like_the_guide(&url, &db);
        match &previous {
            Some((_, source)) => assert_same_database(source, &db),
            None => assert!(!db.exists(), "nothing to restore on the first instance"),
        }
        drop(previous.take());
        // The same app on the same start, with the same random choices, and no replicator.
        let alone = {
            let volume_alone = MemoryVolume::mount("8m");
            let db_alone = volume_alone.path("db");
            if db.exists() {
                std::fs::copy(&db, &db_alone).unwrap();
            }
            run_app(&volume_alone, &db_alone, 1000, Duration::from_secs(8), &mut rng.clone())
        };
        let segments_before = segments();
        let replicator =
            Replicator::start(&db, std::slice::from_ref(&url), scratch.path(&format!("replicate-{instance}.log")));
        let run = run_app(&volume, &db, 1000, Duration::from_secs(8), &mut rng);
        // The app stops at SIGTERM; the sidecar's final flush ships what it committed.
        let log = replicator.log_text();
        replicator.stop_ok();
        let uploaded = segments() - segments_before;
        eprintln!(
            "instance {instance}: {} commits, {uploaded} segments uploaded, volume peak {} KiB of 8192 ({}), wal {} KiB; the app alone: {} KiB ({}), wal {} KiB",
            run.commits,
            run.peak >> 10,
            run.at_peak,
            run.wal_peak >> 10,
            alone.peak >> 10,
            alone.at_peak,
            alone.wal_peak >> 10
        );
        assert!(
            run.errors.is_empty(),
            "instance {instance}: the app got {} errors, first: {}; replicator log:\n{}",
            run.errors.len(),
            run.errors[0],
            log.lines().filter(|l| l.contains("WARN")).take(10).collect::<Vec<_>>().join("\n")
        );
        assert!(run.commits > 4000, "instance {instance}: only {} commits; the test proves little", run.commits);
        // walstream's local state (shadow, snapshot, metadata) and any growth of the app's WAL
        // it causes, together. The goal is 1 MiB, which steady state meets (+0.5 MiB); while a
        // new generation's snapshot (a compressed copy of the database) waits for its upload
        // the shadow grows beside it, and a loaded machine has seen +1.3 MiB (docs/benchmarks.md).
        assert!(
            run.peak <= alone.peak + (2 << 20),
            "instance {instance}: the volume peaked at {} KiB with walstream, {} KiB without",
            run.peak >> 10,
            alone.peak >> 10
        );
        // The pin never holds the app's WAL back for long: at most twice its size without walstream.
        assert!(
            run.wal_peak <= 2 * alone.wal_peak,
            "instance {instance}: the app's WAL grew to {} KiB with walstream, {} KiB without",
            run.wal_peak >> 10,
            alone.wal_peak >> 10
        );
        // About 4.5 MB of WAL a second in 512 KiB batches, and each WAL life's end: some 80 in
        // 8 s. Shipped at every pass, as before, this was about a thousand.
        assert!(uploaded <= 15 * 8, "instance {instance}: {uploaded} segment uploads in 8 s");
        previous = Some((volume, db));
    }
    let (_volume, source) = previous.unwrap();
    let last = scratch.path("after-three-instances.db");
    restore(&url, &last);
    assert_same_database(&source, &last);
}

/// Fills the volume to the last byte with a file, so nothing more can be written until
/// something is freed.
fn fill(volume: &MemoryVolume) -> PathBuf {
    fill_leaving(volume, 0)
}

/// A ballast file that fills the volume until at most `free` bytes are left (or a write fails).
fn fill_leaving(volume: &MemoryVolume, free: u64) -> PathBuf {
    fill_file(volume, "ballast", free)
}

/// Writes the file `name` until at most `free` bytes are left on the volume (or a write fails).
fn fill_file(volume: &MemoryVolume, name: &str, free: u64) -> PathBuf {
    use std::io::Write;
    let path = volume.path(name);
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0xA5u8; 4096];
    while (free == 0 || volume.free() > free) && file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    path
}

/// A volume the app has filled: walstream's own writes get ENOSPC, and nothing it shipped can
/// be punched out to make room. Nothing the app committed is lost (walstream ships straight from
/// the live WAL), `/healthz` and the metric say the disk is full while it lasts, the failure is
/// logged once and not once per pass, and SIGTERM still ships everything. (The app itself may
/// get SQLITE_FULL when its WAL must grow; those writes were never committed.)
#[test]
fn a_full_memory_volume_loses_nothing_committed() {
    let scratch = Scratch::on(Backend::Gcs);
    let url = scratch.replica_url();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let volume = MemoryVolume::mount("8m");
    let db = volume.path("db");
    let addr = format!("127.0.0.1:{}", free_port());
    App::open(&db);
    let replicator = Replicator::start_with_args(
        &db,
        std::slice::from_ref(&url),
        scratch.path("replicate.log"),
        &[],
        &["-addr", &addr],
    );
    wait_for_snapshot(&scratch);
    // 3,000 rows, and a WAL that has reached its size: from here the app writes in place.
    // (walstream's connections keep the app's last close from deleting the WAL.)
    let warm_up = run_app(&volume, &db, 1000, Duration::from_secs(4), &mut rng);
    assert!(warm_up.errors.is_empty());
    fill(&volume);
    assert!(volume.used() > (8 << 20) - (64 << 10), "the volume is not full; the test proves nothing");
    // Six seconds at 500 tx/s, again (at most twice more) if walstream has not met the full disk
    // yet: its writes there are a few index headers, and deletions of shipped files may free a
    // page for each, so each round first takes back what they freed (twice in whole-suite runs,
    // before that, it never met the full disk in 18 s).
    let disk_full_warnings = || {
        let log = std::fs::read_to_string(scratch.path("replicate.log")).unwrap_or_default();
        log.lines().filter(|l| l.contains("WARN") && l.contains("disk_full=true")).count()
    };
    let (mut saw_full, mut spells, mut run) = ((false, false), 0u64, AppRun::default());
    for round in 0..3 {
        if round > 0 {
            fill_file(&volume, &format!("ballast-{round}"), 0);
        }
        let app = std::thread::spawn({
            let (volume_path, db) = (volume.dir.path().to_path_buf(), db.clone());
            let mut rng = rng.clone();
            move || run_app(&MemoryVolume::borrowed(volume_path), &db, 500, Duration::from_secs(6), &mut rng)
        });
        while !app.is_finished() {
            let (status, body) = crate::emulator::request_on(&addr, "GET", "/healthz", None).unwrap();
            saw_full.0 |= status == 503 && body.contains("disk full");
            let (_, metrics) = crate::emulator::request_on(&addr, "GET", "/metrics", None).unwrap();
            saw_full.1 |= metrics.lines().any(|l| l.starts_with("walstream_disk_full{") && l.ends_with(" 1"));
            spells = metrics
                .lines()
                .filter(|l| l.starts_with("walstream_disk_full_spells_total{"))
                .find_map(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(spells);
            std::thread::sleep(Duration::from_millis(20));
        }
        let phase = app.join().unwrap();
        run.commits += phase.commits;
        run.errors.extend(phase.errors);
        rng = rand::rngs::StdRng::seed_from_u64(rng.gen());
        if disk_full_warnings() > 0 {
            break;
        }
    }
    let status = replicator.stop();
    let log = std::fs::read_to_string(scratch.path("replicate.log")).unwrap();
    let not_debug: Vec<&str> = log.lines().filter(|l| !l.contains(" DEBUG ")).collect();
    assert!(status.success(), "replicate exited {status}:\n{}", not_debug.join("\n"));
    eprintln!(
        "{} commits, {} app errors ({:?}), healthz/metric saw the full disk: {saw_full:?}, {spells} spells",
        run.commits,
        run.errors.len(),
        run.errors.first()
    );
    let failures = disk_full_warnings();
    assert!(failures >= 1, "walstream never hit the full disk in 18 s; the test proves nothing");
    assert!(
        failures <= 2,
        "a full disk is logged once a minute, not once per pass: {failures} lines in 6 s:\n{}",
        not_debug.join("\n")
    );
    assert!(
        saw_full.0 && saw_full.1,
        "/healthz and walstream_disk_full must say the disk is full (healthz, metric): {saw_full:?}"
    );
    assert!(spells >= 1, "walstream_disk_full_spells_total must count the full disk");
    assert!(run.commits > 500, "only {} commits; the test proves little", run.commits);
    let restored = scratch.path("restored.db");
    restore(&url, &restored);
    assert_same_database(&db, &restored);
}

/// A restore onto a volume too small for the database: one line naming the full disk, exit 16,
/// and nothing left behind on the volume.
#[test]
fn a_restore_onto_a_full_volume_says_so_and_leaves_nothing() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    app.insert_large(2 << 20);
    let replicator = scratch.start_replicator();
    wait_for_snapshot(&scratch);
    replicator.stop_ok();
    let volume = MemoryVolume::mount("1m");
    let out = volume.path("db");
    let output = walstream(&["restore", "-o", out.to_str().unwrap(), &scratch.replica_url()]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(16), "a full disk must exit 16: {text}");
    assert!(text.contains("No space left on device"), "the message must name the full disk: {text}");
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(list_dir(volume.dir.path()), Vec::<String>::new(), "a failed restore must leave nothing behind");
}

/// A writer too slow for the capturer to poll (a commit every 20 ms) for longer than a WAL life
/// takes: its WAL stays within twice its size without walstream. Every commit runs SQLite's
/// autocheckpoint once the life is past 1,000 frames, and it back-fills only up to walstream's
/// pin, so without a drop the WAL grew to 32 MiB.
#[test]
fn a_slow_writers_wal_stays_its_own_size() {
    let scratch = Scratch::new();
    let mut app = App::open(&scratch.db());
    let replicator = scratch.start_replicator();
    wait_for_snapshot(&scratch);
    let wal = PathBuf::from(format!("{}-wal", scratch.db().display()));
    let (start, mut wal_peak) = (Instant::now(), 0);
    // 40 rows of 200 bytes a commit: two or three pages, so 30 s make about four WAL lives.
    while start.elapsed() < Duration::from_secs(30) {
        app.insert(40);
        wal_peak = wal_peak.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
        std::thread::sleep(Duration::from_millis(20));
    }
    replicator.stop_ok();
    scratch.assert_restores_source();
    eprintln!("{} rows, the WAL peaked at {} KiB", app.count(), wal_peak >> 10);
    assert!(app.count() > 40 * 1000, "fewer commits than a few WAL lives take; the test proves nothing");
    // Without walstream a life ends at 1,000 frames (about 4 MiB of 4 KiB pages).
    assert!(
        wal_peak <= 2 * (32 + 1000 * 4120),
        "the WAL grew to {} KiB, past twice its size without walstream",
        wal_peak >> 10
    );
}

/// A volume holding a 3 MiB database that does not compress, with 256 KiB left free: no room
/// for the snapshot of a generation that starts now.
fn no_room_for_a_snapshot() -> (MemoryVolume, PathBuf, App) {
    let volume = MemoryVolume::mount("8m");
    let db = volume.path("db");
    let mut app = App::open(&db);
    app.insert_large(3 << 20);
    app.checkpoint("TRUNCATE");
    fill_leaving(&volume, 256 << 10);
    let db_len = std::fs::metadata(&db).unwrap().len();
    assert!(volume.free() < db_len, "the volume has room for a snapshot; the test proves nothing");
    (volume, db, app)
}

/// While `replicator` runs: the snapshot reaches the replica, the app commits a few times, then
/// SIGTERM; asserts the snapshot went up straight from the database, with no local copy.
fn commit_and_stop(scratch: &Scratch, volume: &MemoryVolume, app: &mut App, replicator: Replicator, log: &Path) {
    wait_for_snapshot(scratch);
    for _ in 0..5 {
        app.insert(10);
        std::thread::sleep(Duration::from_millis(100));
    }
    replicator.stop_ok();
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("no room on the local disk for the snapshot"), "the snapshot was stored locally after all");
    let local_snapshots: Vec<PathBuf> = files_under(&volume.path(".db-walstream"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".snapshot.lz4"))
        .collect();
    assert!(local_snapshots.is_empty(), "a snapshot was written locally: {local_snapshots:?}");
}

on_both_backends! {
    /// A generation that must start when the volume has no room for its snapshot (a new
    /// instance's replicator on a volume the restore and the app have filled). The snapshot
    /// goes up straight from the database file, under the pin, with nothing written locally
    /// for it; the app commits meanwhile, and SIGTERM ships everything.
    fn a_generation_starts_with_no_room_for_its_snapshot(backend: Backend) {
        let scratch = Scratch::on(backend);
        let (volume, db, mut app) = no_room_for_a_snapshot();
        let log = scratch.path("replicate.log");
        let replicator = Replicator::start(&db, &[scratch.replica_url()], log.clone());
        commit_and_stop(&scratch, &volume, &mut app, replicator, &log);
        let restored = scratch.path("restored.db");
        restore(&scratch.replica_url(), &restored);
        assert_same_database(&db, &restored);
        // The snapshot is framed in stored blocks: litestream v0.3.13 reads it too.
        scratch.assert_litestream_restores(&db);
    }
}

/// The same with an age-encrypted replica: the database is sealed as it is framed.
#[test]
fn an_encrypted_generation_starts_with_no_room_for_its_snapshot() {
    let scratch = Scratch::new();
    let (volume, db, mut app) = no_room_for_a_snapshot();
    let identity = age::x25519::Identity::generate();
    let secret = age::secrecy::ExposeSecret::expose_secret(&identity.to_string()).to_string();
    let config = scratch.path("walstream.yml");
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - path: {}\n    replicas:\n      - url: {}\n        age:\n          recipients: [{}]\n          identities: [{secret}]\n",
            db.display(),
            scratch.replica_url(),
            identity.to_public()
        ),
    )
    .unwrap();
    let log = scratch.path("replicate.log");
    let replicator = Replicator::start_args(&["-config".into(), config.clone().into()], log.clone(), &[]);
    commit_and_stop(&scratch, &volume, &mut app, replicator, &log);
    let snapshot = scratch.replica_keys().into_iter().find(|k| k.ends_with(".snapshot.lz4")).unwrap();
    assert!(
        scratch.read_object(&snapshot).starts_with(b"age-encryption.org/v1\n"),
        "the snapshot went up in the clear"
    );
    let restored = scratch.path("restored.db");
    let output = Command::new(walstream_bin())
        .args(["restore", "-config"])
        .arg(&config)
        .arg("-o")
        .arg(&restored)
        .arg(&db)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_same_database(&db, &restored);
}
