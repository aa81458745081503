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
}

/// Progress nobody watches.
pub(crate) struct Silent;

impl Progress for Silent {
    fn start(&self, _: u64, _: u64) {}
    fn downloaded(&self, _: u64) {}
    fn finish(&self) {}
}
