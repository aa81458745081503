//! How a restore reports progress. The crate only counts; the CLI decides whether a person is
//! watching and draws the bar.

/// Receives a restore's progress. Called from several tasks at once.
pub trait Progress: Send + Sync {
    /// The restore will download `objects` objects of `bytes` stored (compressed) bytes.
    fn start(&self, objects: u64, bytes: u64);
    /// One more object of `bytes` stored bytes has been downloaded.
    fn downloaded(&self, bytes: u64);
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
