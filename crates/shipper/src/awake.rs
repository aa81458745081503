//! How many databases may be awake at once: pinned, with their connections, `-shm` and shadow
//! file open (about seven descriptors), against one descriptor while resting. With thousands of
//! databases the open-file limit, not their number, bounds how many can be awake; a database
//! that must wake while none may waits its turn in a queue, and while one waits the others rest
//! as soon as everything is in their shadow (`Capturer::may_rest`) instead of after
//! `idle-release`. Unlimited unless [`limit_awake_databases`] was called (the CLI does, from the
//! open-file limit).

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

use crate::pool::WakeSender;
use crate::protocol::Wake;

static BUDGET: OnceLock<Budget> = OnceLock::new();

struct Budget {
    state: Mutex<State>,
}

struct State {
    free: usize,
    /// Who waits for leave, first come first served.
    waiters: VecDeque<Waiter>,
}

enum Waiter {
    /// A database starting: the leave is handed to it.
    Start(tokio::sync::oneshot::Sender<Awake>),
    /// A resting database's capturer: woken to ask again.
    Capturer(WakeSender),
}

/// Lets at most `databases` (at least one) be awake at once in this process, from now on. Only
/// the first call counts.
pub fn limit_awake_databases(databases: usize) {
    let _ = BUDGET.set(Budget { state: Mutex::new(State { free: databases.max(1), waiters: VecDeque::new() }) });
}

/// A database's leave to be awake; given back when dropped.
#[derive(Debug)]
pub(crate) struct Awake {
    budget: Option<&'static Budget>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Budget")
    }
}

impl Drop for Awake {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.give_back();
        }
    }
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the leave to the first waiter, or keeps it free.
    fn give_back(&'static self) {
        let waiter = {
            let mut state = self.lock();
            match state.waiters.pop_front() {
                Some(waiter) => waiter,
                None => {
                    state.free += 1;
                    return;
                }
            }
        };
        match waiter {
            // A start that gave up (shutdown) hands it back again, to the next waiter.
            Waiter::Start(tx) => drop(tx.send(Awake { budget: Some(self) })),
            Waiter::Capturer(wakes) => {
                self.lock().free += 1;
                if wakes.send(Wake::LeaveFree).is_err() {
                    // Gone: whoever asks next takes it.
                }
            }
        }
    }
}

/// Waits for leave to be awake (a database starting).
pub(crate) async fn acquire() -> Awake {
    let Some(budget) = BUDGET.get() else { return Awake { budget: None } };
    let rx = {
        let mut state = budget.lock();
        if state.free > 0 {
            state.free -= 1;
            return Awake { budget: Some(budget) };
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        state.waiters.push_back(Waiter::Start(tx));
        rx
    };
    // The sender is dropped unsent only if the budget went away, which it never does.
    rx.await.unwrap_or(Awake { budget: None })
}

/// Leave to be awake if some is free now; otherwise, with `queue`, that capturer is sent
/// [`Wake::LeaveFree`] once some is given back.
pub(crate) fn try_acquire(queue: Option<&WakeSender>) -> Option<Awake> {
    let Some(budget) = BUDGET.get() else { return Some(Awake { budget: None }) };
    let mut state = budget.lock();
    if state.free > 0 {
        state.free -= 1;
        return Some(Awake { budget: Some(budget) });
    }
    if let Some(wakes) = queue {
        state.waiters.push_back(Waiter::Capturer(wakes.clone()));
    }
    None
}

/// Whether some database waits for leave to be awake.
pub(crate) fn contended() -> bool {
    BUDGET.get().is_some_and(|budget| !budget.lock().waiters.is_empty())
}
