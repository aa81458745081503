//! The capture pool: a few threads take turns running every database's capturer, so a process
//! replicating thousands of databases runs a bounded number of threads (one each, before, was
//! 10,000 threads at 10,000 databases). A capturer gets a turn when something wakes it (a
//! [`WakeSender`] send) or when the time its last turn asked for has come; between turns it
//! holds no thread.

use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::mpsc::{self, Receiver, SendError, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::protocol::Wake;

/// Threads per core. A turn mostly waits on the disk (reads of the WAL, writes and fsyncs of
/// the shadow), so more threads than cores keep the cores busy.
const THREADS_PER_CORE: usize = 4;
const MAX_THREADS: usize = 32;

/// Something the pool runs a turn at a time.
pub(crate) trait Job: Send {
    /// Runs one turn; `Some(wait)`: the next turn is due after `wait` unless a wake comes
    /// first; `None`: the job has ended.
    fn turn(&mut self) -> Option<Duration>;
}

/// Where a job stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flag {
    /// Waiting for a wake or its timer.
    Idle,
    /// In the ready queue.
    Ready,
    /// A thread is running its turn.
    Running,
    /// Woken while running: it goes back to the ready queue after its turn.
    RunningWoken,
}

struct Entry {
    flag: Flag,
    /// Which timer is the job's current one; older ones in the heap are stale.
    timer: u64,
    job: Arc<Mutex<Box<dyn Job>>>,
}

#[derive(Default)]
struct State {
    jobs: HashMap<u64, Entry>,
    ready: VecDeque<u64>,
    /// (due, timer, job), earliest first.
    timers: BinaryHeap<std::cmp::Reverse<(Instant, u64, u64)>>,
    next_id: u64,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
}

/// The process's capture pool; its threads start with the first job.
fn pool() -> &'static Arc<Shared> {
    static POOL: OnceLock<Arc<Shared>> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), work: Condvar::new() });
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        for n in 0..(cores * THREADS_PER_CORE).min(MAX_THREADS) {
            let shared = shared.clone();
            // A pool that cannot start a single thread cannot capture: that is a panic at
            // start-up, not a state to run in.
            std::thread::Builder::new()
                .name(format!("walstream-capture-{n}"))
                .spawn(move || work(&shared))
                .expect("spawn a capture thread");
        }
        shared
    })
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds `job` to the pool, its first turn due at once; returns what wakes it.
pub(crate) fn spawn(job: Box<dyn Job>) -> Waker {
    let shared = pool();
    let mut state = lock(shared);
    state.next_id += 1;
    let id = state.next_id;
    state.jobs.insert(id, Entry { flag: Flag::Ready, timer: 0, job: Arc::new(Mutex::new(job)) });
    state.ready.push_back(id);
    drop(state);
    shared.work.notify_one();
    Waker { id }
}

/// Wakes one job of the pool: its next turn comes as soon as a thread is free.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Waker {
    id: u64,
}

impl Waker {
    pub(crate) fn wake(&self) {
        let shared = pool();
        let mut state = lock(shared);
        let Some(entry) = state.jobs.get_mut(&self.id) else { return };
        match entry.flag {
            Flag::Idle => {
                entry.flag = Flag::Ready;
                state.ready.push_back(self.id);
                drop(state);
                shared.work.notify_one();
            }
            Flag::Running => entry.flag = Flag::RunningWoken,
            Flag::Ready | Flag::RunningWoken => {}
        }
    }
}

/// A pool thread: runs ready jobs' turns, and makes jobs ready when their timers are due.
fn work(shared: &Shared) {
    loop {
        let (id, job) = {
            let mut state = lock(shared);
            loop {
                let now = Instant::now();
                while let Some(&std::cmp::Reverse((due, timer, id))) = state.timers.peek() {
                    if due > now {
                        break;
                    }
                    state.timers.pop();
                    let current = state.jobs.get_mut(&id).filter(|e| e.timer == timer && e.flag == Flag::Idle);
                    if let Some(entry) = current {
                        entry.flag = Flag::Ready;
                        state.ready.push_back(id);
                    }
                }
                if let Some(id) = state.ready.pop_front() {
                    if let Some(entry) = state.jobs.get_mut(&id) {
                        entry.flag = Flag::Running;
                        break (id, entry.job.clone());
                    }
                    continue;
                }
                state = match state.timers.peek() {
                    Some(&std::cmp::Reverse((due, _, _))) => {
                        shared.work.wait_timeout(state, due - now).unwrap_or_else(|e| e.into_inner()).0
                    }
                    None => shared.work.wait(state).unwrap_or_else(|e| e.into_inner()),
                };
            }
        };
        let next = job.lock().unwrap_or_else(|e| e.into_inner()).turn();
        let mut state = lock(shared);
        let Some(entry) = state.jobs.get_mut(&id) else { continue };
        match next {
            None => {
                state.jobs.remove(&id);
            }
            Some(_) if entry.flag == Flag::RunningWoken => {
                entry.flag = Flag::Ready;
                state.ready.push_back(id);
                drop(state);
                shared.work.notify_one();
            }
            Some(wait) => {
                entry.flag = Flag::Idle;
                entry.timer += 1;
                let timer = entry.timer;
                let due = Instant::now() + wait;
                let earliest = state.timers.peek().is_none_or(|t| due < t.0 .0);
                state.timers.push(std::cmp::Reverse((due, timer, id)));
                drop(state);
                // A thread asleep until a later timer must look again.
                if earliest {
                    shared.work.notify_one();
                }
            }
        }
    }
}

/// Sends wakes to a capturer, and gives it a turn when it runs in the pool. Made before the
/// capturer is spawned (the status handle needs one first): wakes sent before then wait in the
/// channel for the first turn.
#[derive(Clone, Debug)]
pub(crate) struct WakeSender {
    tx: Sender<Wake>,
    waker: Arc<OnceLock<Waker>>,
}

/// A capturer's wake channel.
pub(crate) fn wake_channel() -> (WakeSender, Receiver<Wake>) {
    let (tx, rx) = mpsc::channel();
    (WakeSender { tx, waker: Default::default() }, rx)
}

impl WakeSender {
    pub(crate) fn send(&self, wake: Wake) -> Result<(), SendError<Wake>> {
        self.tx.send(wake)?;
        if let Some(waker) = self.waker.get() {
            waker.wake();
        }
        Ok(())
    }

    /// From now on a send also gives `waker`'s job a turn.
    pub(crate) fn wakes(&self, waker: Waker) {
        let _ = self.waker.set(waker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its turns, asks for the next one after `every`, ends after `turns`.
    struct Counter {
        /// Every turn of every counter sharing it.
        turns: Arc<Mutex<Vec<Instant>>>,
        every: Duration,
        ends_after: usize,
        taken: usize,
    }

    fn counter(turns: &Arc<Mutex<Vec<Instant>>>, every: Duration, ends_after: usize) -> Box<Counter> {
        Box::new(Counter { turns: turns.clone(), every, ends_after, taken: 0 })
    }

    impl Job for Counter {
        fn turn(&mut self) -> Option<Duration> {
            self.turns.lock().unwrap().push(Instant::now());
            self.taken += 1;
            (self.taken < self.ends_after).then_some(self.every)
        }
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "10 s waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_job_gets_a_turn_when_its_timer_is_due_and_when_woken() {
        let turns = Arc::new(Mutex::new(Vec::new()));
        let waker = spawn(counter(&turns, Duration::from_millis(200), 100));
        wait_for("the timed second turn", || turns.lock().unwrap().len() == 2);
        let timed = turns.lock().unwrap().clone();
        assert!(timed[1] - timed[0] >= Duration::from_millis(200), "a turn came before its timer: {timed:?}");
        let woken_at = Instant::now();
        waker.wake();
        wait_for("the woken turn", || turns.lock().unwrap().len() == 3);
        assert!(
            turns.lock().unwrap()[2] - woken_at < Duration::from_millis(150),
            "the wake did not bring the turn forward"
        );
    }

    #[test]
    fn thousands_of_jobs_share_a_few_threads_and_all_end() {
        let threads_before = std::fs::read_dir("/proc/self/task").unwrap().count();
        let turns = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..2000 {
            spawn(counter(&turns, Duration::from_millis(5), 10));
        }
        let ended = Arc::new(Mutex::new(Vec::new()));
        let wakers: Vec<Waker> = (0..2000).map(|_| spawn(counter(&ended, Duration::from_secs(3600), 2))).collect();
        // A wake asks for a turn that starts after it: one before the first turn is that turn.
        wait_for("every job's first turn", || ended.lock().unwrap().len() == 2000);
        for waker in &wakers {
            waker.wake();
        }
        wait_for("every woken job's two turns", || ended.lock().unwrap().len() == 4000);
        let threads = std::fs::read_dir("/proc/self/task").unwrap().count();
        assert!(threads <= threads_before + MAX_THREADS, "{threads} threads for 4,000 jobs");
        wait_for("every timed job's ten turns", || turns.lock().unwrap().len() == 20_000);
    }
}
