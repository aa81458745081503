//! How a restore reports progress. The crate only counts; the CLI decides whether a person is
//! watching and draws the bar.

/// Receives a restore's progress. Called from several tasks at once.
pub trait Progress: Send + Sync {
    /// The restore will download `objects` objects of `bytes` stored (compressed) bytes.
    fn start(&self, objects: u64, bytes: u64);
    /// One more object of `bytes` stored bytes has been downloaded.
    fn downloaded(&self, bytes: u64);
    /// `bytes` more of an object read in parts (a large snapshot) arrived; its
    /// [`downloaded`](Progress::downloaded) comes with 0 once the last part has.
    fn downloading(&self, bytes: u64) {
        let _ = bytes;
    }
    /// Everything is downloaded and applied; only the final checks remain.
    fn finish(&self);
    /// So far, how long the side that decodes, checks and writes has waited for the store's
    /// next part, and how long it has been busy (decoding, checking, writing, or waiting for
    /// the writer): which of the two bounds the restore. Totals, reported as parts arrive.
    fn split(&self, waiting_for_store: std::time::Duration, applying: std::time::Duration) {
        let _ = (waiting_for_store, applying);
    }
}

/// Where the consuming side of a restore spends its time ([`Progress::split`]).
#[derive(Default)]
pub(crate) struct TimeSplit {
    waiting_ns: std::sync::atomic::AtomicU64,
    applying_ns: std::sync::atomic::AtomicU64,
}

impl TimeSplit {
    /// The next part from `parts`, the wait counted as waiting for the store and the time since
    /// `last` (the previous part's arrival) as applying.
    pub(crate) fn recv<T>(
        &self,
        parts: &mut tokio::sync::mpsc::Receiver<T>,
        last: &mut std::time::Instant,
    ) -> Option<T> {
        use std::sync::atomic::Ordering::Relaxed;
        let asked = std::time::Instant::now();
        let part = parts.blocking_recv();
        let arrived = std::time::Instant::now();
        self.applying_ns.fetch_add(nanos(asked - *last), Relaxed);
        self.waiting_ns.fetch_add(nanos(arrived - asked), Relaxed);
        *last = arrived;
        part
    }

    /// Tells `progress` the totals.
    pub(crate) fn report(&self, progress: &dyn Progress) {
        use std::sync::atomic::Ordering::Relaxed;
        let d = std::time::Duration::from_nanos;
        progress.split(d(self.waiting_ns.load(Relaxed)), d(self.applying_ns.load(Relaxed)));
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Progress nobody watches.
pub(crate) struct Silent;

impl Progress for Silent {
    fn start(&self, _: u64, _: u64) {}
    fn downloaded(&self, _: u64) {}
    fn finish(&self) {}
}
