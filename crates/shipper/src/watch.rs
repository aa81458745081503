//! File events on the databases' directories, turned into capturer wake-ups.
//!
//! One inotify watcher serves the whole process. A watcher per database, each on the shared
//! directory, made every event reach every database's watcher thread: with 100 databases in one
//! directory, each commit woke 100 threads, and that was most of walstream's CPU.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use crate::error::Error;
use crate::pool::WakeSender;
use crate::protocol::Wake;

/// Who wants events of which files: directory → (database file name, wake-up channel, id).
type Routes = HashMap<PathBuf, Vec<(OsString, WakeSender, u64)>>;

struct Shared {
    watcher: RecommendedWatcher,
    routes: Arc<Mutex<Routes>>,
    next_id: u64,
    /// Per directory, the subscriptions whose capturers pass on a timer for now
    /// ([`Subscription::set_polling`]).
    polling: HashMap<PathBuf, Vec<u64>>,
    /// Directories left unwatched because every subscription in them polls.
    unwatched: Vec<PathBuf>,
}

static SHARED: Mutex<Option<Shared>> = Mutex::new(None);

/// Wake-ups for one database until dropped.
pub(crate) struct Subscription {
    dir: PathBuf,
    id: u64,
}

/// Wakes the capturer on any event for the database or its WAL (the WAL may not exist yet,
/// and SQLite deletes and re-creates it, so the directory is watched).
pub(crate) fn watch(db_path: &Path, wakes: WakeSender) -> Result<Subscription, Error> {
    let dir = db_path
        .parent()
        .map(Path::to_path_buf)
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let file_name = db_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if shared.is_none() {
        let routes: Arc<Mutex<Routes>> = Arc::default();
        let watcher = notify::recommended_watcher({
            let routes = routes.clone();
            let mut pacer = Pacer::default();
            move |event: notify::Result<notify::Event>| {
                let path = event.as_ref().ok().and_then(|e| e.paths.first().cloned());
                route(&routes, event);
                pacer.after_event(Instant::now(), path);
            }
        })
        .map_err(|source| Error::Watch { path: dir.clone(), source })?;
        *shared = Some(Shared { watcher, routes, next_id: 0, polling: HashMap::new(), unwatched: Vec::new() });
    }
    let shared = shared.as_mut().expect("set above");
    // The routes lock is never held across a call into the watcher: its event thread takes that
    // lock to deliver, and (un)watch waits for the event thread.
    let watched = shared.routes.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&dir);
    // A directory left unwatched for its polling subscribers is watched again for this one.
    let unwatched_at = shared.unwatched.iter().position(|d| *d == dir);
    if !watched || unwatched_at.is_some() {
        shared
            .watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| Error::Watch { path: dir.clone(), source })?;
        if let Some(at) = unwatched_at {
            shared.unwatched.swap_remove(at);
        }
    }
    shared.next_id += 1;
    let id = shared.next_id;
    shared
        .routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(dir.clone())
        .or_default()
        .push((file_name, wakes, id));
    Ok(Subscription { dir, id })
}

impl Subscription {
    /// Says whether this database's capturer passes on a timer for now. A directory whose
    /// subscriptions all poll is unwatched, and watched again once one stops: a watch makes
    /// the kernel queue an inotify event on every write the application makes, which took a
    /// tenth of a saturated writer's own CPU, and its capturer passing every 10 ms gets nothing
    /// from them. Fails only when the directory cannot be watched again; it is then left as it
    /// was, and the caller keeps polling.
    pub(crate) fn set_polling(&self, polling: bool) -> Result<(), Error> {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        let Some(shared) = shared.as_mut() else { return Ok(()) };
        let subscribers = shared.routes.lock().unwrap_or_else(|e| e.into_inner()).get(&self.dir).map_or(0, Vec::len);
        let ids = shared.polling.entry(self.dir.clone()).or_default();
        ids.retain(|id| *id != self.id);
        if polling {
            ids.push(self.id);
        }
        let all_polling = ids.len() == subscribers;
        let unwatched_at = shared.unwatched.iter().position(|d| *d == self.dir);
        match (all_polling, unwatched_at) {
            (true, None) => {
                // Unwatching a directory that is not watched fails harmlessly.
                let _ = shared.watcher.unwatch(&self.dir);
                shared.unwatched.push(self.dir.clone());
            }
            (false, Some(at)) => {
                if let Err(source) = shared.watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
                    if !polling {
                        shared.polling.entry(self.dir.clone()).or_default().push(self.id);
                    }
                    return Err(Error::Watch { path: self.dir.clone(), source });
                }
                shared.unwatched.swap_remove(at);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Sends each event to the databases whose files it names: the database, `-wal`, `-shm`.
fn route(routes: &Mutex<Routes>, event: notify::Result<notify::Event>) {
    let routes = routes.lock().unwrap_or_else(|e| e.into_inner());
    // An overflowed queue (notify reports it as a rescan) or a broken watch: wake everyone, and
    // each looks for what changed. Before, an overflow woke nobody, and a commit whose event it
    // dropped waited for a resting database's rest poll.
    let event = match event {
        Ok(event) if !event.need_rescan() => event,
        _ => {
            tracing::debug!("file events overflowed or failed; every database looks for changes");
            for (_, wakes, _) in routes.values().flatten() {
                let _ = wakes.send(Wake::WalChanged);
            }
            return;
        }
    };
    // Opening and closing a file changes nothing in it (a write always makes a modify event
    // too), and closing its own connections must not wake a database that has just gone to
    // rest, nor an application's every open and close wake one.
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return;
    }
    for path in &event.paths {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { continue };
        let Some(subscribers) = routes.get(dir) else { continue };
        for (db_name, wakes, _) in subscribers {
            if let Some(suffix) = name.as_encoded_bytes().strip_prefix(db_name.as_encoded_bytes()) {
                let _ = wakes.send(if suffix == b"-wal" { Wake::WalChanged } else { Wake::Changed });
            }
        }
    }
}

/// Paces the event thread through a stream of events. A saturated writer makes one event per
/// commit, and reading them one by one (a wake-up, an `epoll_wait` and a `read` each) took 40%
/// of walstream's CPU. Once events on one file have come without a pause for [`Pacer::STREAK`],
/// the thread sleeps for [`Pacer::PAUSE`]: meanwhile the kernel merges repeated events on one
/// file into one (only a run on one file: events on many files do not merge, and pausing after
/// each of them let 100 events a second through, so thousands of databases overflowed the
/// queue),
/// and the next read takes what queued as a batch. An event after a quiet spell is delivered at
/// once, and in a stream none waits longer than the pause. The pause is the capturer's pass
/// spacing: a busy database's capturer passes every 10 ms whether woken or not, so waking it
/// sooner bought nothing, and at a 2 ms pause the event thread still took 5% of walstream's
/// CPU under a saturated writer (12.5 clock ticks of 236 in two 250,000-commit runs, 4 at 10 ms).
#[derive(Default)]
struct Pacer {
    /// When the current unbroken run of events on one file began, when its last event came, and
    /// the file.
    streak: Option<(Instant, Instant, Option<PathBuf>)>,
}

impl Pacer {
    const STREAK: Duration = Duration::from_micros(250);
    const PAUSE: Duration = crate::protocol::PASS_SPACING;

    /// Returns how long the thread slept.
    fn after_event(&mut self, now: Instant, path: Option<PathBuf>) -> Duration {
        let began = match &self.streak {
            Some((began, last, on)) if now.duration_since(*last) < Pacer::STREAK && *on == path => *began,
            _ => now,
        };
        if now.duration_since(began) < Pacer::STREAK {
            self.streak = Some((began, now, path));
            return Duration::ZERO;
        }
        std::thread::sleep(Pacer::PAUSE);
        let woke = now + Pacer::PAUSE;
        self.streak = Some((woke, woke, path));
        Pacer::PAUSE
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        let Some(shared) = shared.as_mut() else { return };
        if let Some(ids) = shared.polling.get_mut(&self.dir) {
            ids.retain(|id| *id != self.id);
        }
        let last = {
            let mut routes = shared.routes.lock().unwrap_or_else(|e| e.into_inner());
            let Some(subscribers) = routes.get_mut(&self.dir) else { return };
            subscribers.retain(|(_, _, id)| *id != self.id);
            let last = subscribers.is_empty();
            if last {
                routes.remove(&self.dir);
            }
            last
        };
        if last {
            shared.polling.remove(&self.dir);
            match shared.unwatched.iter().position(|d| *d == self.dir) {
                Some(at) => drop(shared.unwatched.swap_remove(at)),
                None => drop(shared.watcher.unwatch(&self.dir)),
            }
        }
    }
}

/// Whether `dir` is watched now: a test's view of [`Subscription::set_polling`].
#[cfg(test)]
pub(crate) fn is_watched(dir: &Path) -> bool {
    let shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    shared.as_ref().is_some_and(|s| s.routes.lock().unwrap().contains_key(dir) && !s.unwatched.iter().any(|d| d == dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events stop only once every database in the directory polls, and come back for the
    /// first that stops polling and for a database subscribing meanwhile.
    #[test]
    fn a_directory_is_unwatched_only_while_all_its_databases_poll() {
        let dir = tempfile::tempdir().unwrap();
        let (a_tx, a_rx) = crate::pool::wake_channel();
        let (b_tx, b_rx) = crate::pool::wake_channel();
        let a = watch(&dir.path().join("a.db"), a_tx).unwrap();
        let b = watch(&dir.path().join("b.db"), b_tx).unwrap();
        // Waits long for an event that should come, briefly for one that should not.
        let woken_within = |rx: &std::sync::mpsc::Receiver<Wake>, file: &str, wait: Duration| {
            while rx.try_recv().is_ok() {}
            std::fs::write(dir.path().join(file), b"x").unwrap();
            rx.recv_timeout(wait).is_ok()
        };
        let woken = |rx: &std::sync::mpsc::Receiver<Wake>, file: &str| woken_within(rx, file, Duration::from_secs(5));
        a.set_polling(true).unwrap();
        assert!(is_watched(dir.path()));
        assert!(woken(&b_rx, "b.db-wal"), "b lost its events when only a polls");
        b.set_polling(true).unwrap();
        assert!(!is_watched(dir.path()));
        assert!(
            !woken_within(&b_rx, "b.db-wal", Duration::from_millis(300)),
            "events still came with every database polling"
        );
        let (c_tx, c_rx) = crate::pool::wake_channel();
        let c = watch(&dir.path().join("c.db"), c_tx).unwrap();
        assert!(is_watched(dir.path()));
        assert!(woken(&c_rx, "c.db-wal"), "a new subscription in an unwatched directory got no events");
        c.set_polling(true).unwrap();
        assert!(!is_watched(dir.path()));
        a.set_polling(false).unwrap();
        assert!(is_watched(dir.path()));
        assert!(woken(&a_rx, "a.db-wal"), "a got no events after it stopped polling");
        drop((a, b, c));
        assert!(!is_watched(dir.path()));
    }

    #[test]
    fn the_pacer_pauses_only_a_stream_of_events_on_one_file() {
        let mut pacer = Pacer::default();
        let start = Instant::now();
        let gap = Duration::from_micros(50);
        let wal = Some(PathBuf::from("/d/app.db-wal"));
        // Events 50 µs apart: a pause after each 250 µs streak, none for the events that queued
        // during a pause (the kernel hands those over as one batch).
        let step = ((Pacer::PAUSE + Pacer::STREAK).as_micros() / gap.as_micros()) as u32;
        let paused: Vec<bool> =
            (0..5 + 2 * step + step / 2).map(|i| !pacer.after_event(start + gap * i, wal.clone()).is_zero()).collect();
        let at: Vec<u32> = paused.iter().enumerate().filter(|(_, p)| **p).map(|(i, _)| i as u32).collect();
        assert_eq!(at, [5, 5 + step, 5 + 2 * step], "pauses after events number {at:?}");
        let mut pacer = Pacer::default();
        let quiet = Pacer::STREAK * 2;
        assert!(
            (0..10).all(|i| pacer.after_event(start + quiet * i, wal.clone()).is_zero()),
            "events spaced apart were paused"
        );
        // Many databases: events as close, but each on another file, do not merge; none pauses.
        let mut pacer = Pacer::default();
        assert!(
            (0..1000).all(|i| pacer
                .after_event(start + gap * i, Some(PathBuf::from(format!("/d/db-{}.db-wal", i % 300))))
                .is_zero()),
            "events on many files were paused"
        );
    }

    #[test]
    fn events_reach_only_the_database_they_name_and_stop_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (a_tx, a_rx) = crate::pool::wake_channel();
        let (b_tx, b_rx) = crate::pool::wake_channel();
        let a = watch(&dir.path().join("a.db"), a_tx).unwrap();
        let _b = watch(&dir.path().join("b.db"), b_tx).unwrap();
        std::fs::write(dir.path().join("a.db-wal"), b"x").unwrap();
        assert!(matches!(a_rx.recv_timeout(Duration::from_secs(5)), Ok(Wake::WalChanged)));
        assert!(b_rx.recv_timeout(Duration::from_millis(300)).is_err(), "b was woken by a's WAL");
        std::fs::write(dir.path().join("b.db"), b"y").unwrap();
        assert!(matches!(b_rx.recv_timeout(Duration::from_secs(5)), Ok(Wake::Changed)));
        drop(a);
        while a_rx.try_recv().is_ok() {}
        std::fs::write(dir.path().join("a.db-wal"), b"z").unwrap();
        std::fs::write(dir.path().join("b.db-wal"), b"z").unwrap();
        // The write to b.db above may have sent more than one event (create, modify).
        let wal_event = std::iter::from_fn(|| b_rx.recv_timeout(Duration::from_secs(5)).ok())
            .find(|wake| !matches!(wake, Wake::Changed));
        assert!(matches!(wal_event, Some(Wake::WalChanged)));
        assert!(a_rx.recv_timeout(Duration::from_millis(300)).is_err(), "a was woken after its subscription ended");
    }
}
