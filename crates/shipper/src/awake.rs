//! How many databases may be awake at once: pinned, with their connections, `-shm` and shadow
//! file open (about seven descriptors), against one descriptor while resting. With thousands of
//! databases the open-file limit, not their number, bounds how many can be awake; a database
//! that must wake while none may waits its turn, and while one waits the others rest as soon as
//! their replicas hold everything (`Capturer::may_rest`) instead of after `idle-release`.
//! Unlimited unless [`limit_awake_databases`] was called (the CLI does, from the open-file limit).

use std::sync::{Arc, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

static BUDGET: OnceLock<Arc<Semaphore>> = OnceLock::new();

/// Lets at most `databases` (at least one) be awake at once in this process, from now on. Only
/// the first call counts.
pub fn limit_awake_databases(databases: usize) {
    let _ = BUDGET.set(Arc::new(Semaphore::new(databases.max(1))));
}

/// A database's leave to be awake; released when dropped.
#[derive(Debug)]
pub(crate) struct Awake {
    _permit: Option<OwnedSemaphorePermit>,
}

/// Waits for leave to be awake.
pub(crate) async fn acquire() -> Awake {
    match BUDGET.get() {
        // The semaphore is never closed.
        Some(budget) => Awake { _permit: budget.clone().acquire_owned().await.ok() },
        None => Awake { _permit: None },
    }
}

/// Leave to be awake if some is free now.
pub(crate) fn try_acquire() -> Option<Awake> {
    match BUDGET.get() {
        Some(budget) => budget.clone().try_acquire_owned().ok().map(|permit| Awake { _permit: Some(permit) }),
        None => Some(Awake { _permit: None }),
    }
}

/// Whether every leave is taken: a database waking now would have to wait.
pub(crate) fn contended() -> bool {
    BUDGET.get().is_some_and(|budget| budget.available_permits() == 0)
}
