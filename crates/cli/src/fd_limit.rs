//! The open-file limit, raised for many databases. Each replicated database holds a handful of
//! descriptors (its file and WAL through two read connections, the `-shm`, the lock and the
//! shadow file), and the usual soft limit of 1,024 runs out near a hundred databases, long
//! before the hard limit does. Go raises the soft limit to the hard one at start-up, so
//! litestream gets this silently; walstream does it too, and says so when even the hard limit
//! is too low, rather than fail on the first `open` that hits it.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::debug;

/// Descriptors one replicated database may hold at once while awake: 294 in all were seen for
/// 40 databases (`tests/e2e/fd_limit.rs` asserts this budget), 9.0 a database at 2,000 in the
/// bench (7 since the lock file went).
const PER_DATABASE: u64 = 10;

/// Descriptors a resting database holds: its database file (see `idle-release`).
const PER_RESTING_DATABASE: u64 = 1;

/// Databases that can be awake at once however tight the limit, so a burst does not crawl.
const MIN_AWAKE: u64 = 16;

/// Descriptors for everything else: the runtime, the HTTP clients and server, logs.
const BASE: u64 = 64;

/// The soft limit walstream started with, which an `-exec` child gets back (as Go's os/exec
/// does): an application may rely on the usual limit, e.g. for `select(2)`.
static STARTED_WITH: AtomicU64 = AtomicU64::new(0);

/// Too few descriptors for the databases asked for, even at the hard limit.
#[derive(Debug)]
pub(crate) struct TooFewDescriptors {
    pub(crate) databases: usize,
    pub(crate) needed: u64,
    pub(crate) hard: u64,
}

impl std::fmt::Display for TooFewDescriptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replicating {} databases needs about {} open files, but the hard limit is {}: raise it (`ulimit -Hn`, systemd LimitNOFILE=, docker run --ulimit nofile=N:N, or a Kubernetes node setting)",
            self.databases, self.needed, self.hard
        )
    }
}

impl std::error::Error for TooFewDescriptors {}

/// Raises the soft limit to the hard one, and fails if that is still too low for `databases`.
/// Databases that rest when idle (`rest`) need their awake descriptors only while awake:
/// returns how many of them may be awake at once within the limit (`None`: all of them, or
/// databases that never rest, which need them all the time).
pub(crate) fn ensure_for(databases: usize, rest: bool) -> Result<Option<usize>, TooFewDescriptors> {
    let count = databases as u64;
    let needed = match rest {
        true => BASE + PER_RESTING_DATABASE * count + PER_DATABASE * count.min(MIN_AWAKE),
        false => BASE + PER_DATABASE * count,
    };
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Ok(None);
    }
    let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
    STARTED_WITH.store(soft, Ordering::Relaxed);
    let mut usable = soft;
    if soft < hard {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct it is given; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            debug!(from = soft, to = hard, "raised the open-file limit to its hard limit");
            usable = hard;
        }
    }
    if needed > hard {
        return Err(TooFewDescriptors { databases, needed, hard });
    }
    let awake = usable.saturating_sub(BASE + PER_RESTING_DATABASE * count) / PER_DATABASE;
    Ok((rest && awake < count).then(|| awake.max(1) as usize))
}

/// Makes `command`'s process start with the soft limit walstream started with.
pub(crate) fn restore_in_child(command: &mut tokio::process::Command) {
    let soft = STARTED_WITH.load(Ordering::Relaxed);
    if soft == 0 {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec and only calls getrlimit and
    // setrlimit, which are async-signal-safe, on a stack value.
    unsafe {
        command.pre_exec(move || {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && soft < limit.rlim_cur {
                limit.rlim_cur = soft;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
            Ok(())
        });
    }
}
