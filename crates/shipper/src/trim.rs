//! Gives the memory of databases that went to rest back to the system. A database's two SQLite
//! connections (page caches, schemas) are freed when it rests, but glibc keeps freed memory in
//! its arenas for reuse: after thousands of databases started awake at once, a fleet at rest
//! kept the high-water mark of that start. `malloc_trim` returns free pages, and runs at most
//! once a second, only after a database has gone to rest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The least time between two trims.
const SPACING_MS: u64 = 1000;

static LAST_TRIM_MS: AtomicU64 = AtomicU64::new(0);

/// Called after a database went to rest.
pub(crate) fn after_rest() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let last = LAST_TRIM_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) < SPACING_MS
        || LAST_TRIM_MS.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
    {
        return;
    }
    trim();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas; 0 keeps no extra pad at the top.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
