//! Uploaders: one task per replica, shipping the shadow WAL in (index, offset) order.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use walstream_format::name::{self, ObjectKind};
use walstream_format::{lz4, Pos};
use walstream_store::ObjectStore;

use crate::capture::ShadowState;
use crate::error::{io_err, Error};
use crate::meta::LocalSnapshot;
use crate::retention::RetentionPolicy;
use crate::lease::{Lease, LeasePolicy};
use crate::status::ReplicaCounters;
use std::sync::atomic::{AtomicBool, Ordering};

/// Uncompressed bytes per segment at most. Segments may end inside a transaction (restore only
/// applies whole transactions), and this bounds the memory one upload needs: at 4 MiB a
/// saturated writer's catch-up uploads took walstream's peak RSS from 16 to 29 MB; a 1 MiB PUT
/// already amortises a request's cost.
pub(crate) const MAX_SEGMENT_BYTES: u64 = 1 << 20;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A named destination.
#[derive(Clone, Debug)]
pub struct Replica {
    /// The name in logs and errors (`file`, `gcs`, or the config's `name`).
    pub name: String,
    /// Where the objects go.
    pub store: Arc<dyn ObjectStore>,
    /// Snapshot interval and retention.
    pub policy: RetentionPolicy,
    /// The least time between two WAL uploads (the config's `sync-interval`): commits arriving
    /// sooner are held and shipped together, trading lag for fewer PUTs. A commit after a quiet
    /// spell is shipped at once; a sync barrier or shutdown ends the wait. Zero ships every
    /// pass at once.
    pub sync_interval: Duration,
}

impl Replica {
    /// A replica with Litestream's default policy that ships every commit at once.
    pub fn new(name: impl Into<String>, store: Arc<dyn ObjectStore>) -> Replica {
        Replica { name: name.into(), store, policy: RetentionPolicy::default(), sync_interval: Duration::ZERO }
    }
}

pub(crate) struct Uploader {
    replica: Replica,
    state: watch::Receiver<ShadowState>,
    /// The replica's position; `None` until listed (and after an error, so it is listed again,
    /// as Litestream does).
    position: watch::Sender<Option<Pos>>,
    new_generation: std::sync::mpsc::Sender<crate::capture::Wake>,
    /// The newest snapshot this replica is known to hold.
    uploaded_snapshot: Option<LocalSnapshot>,
    counters: Arc<ReplicaCounters>,
    /// Who this replicator is and its lease policy, when leases are on.
    lease_terms: Option<(String, LeasePolicy)>,
    lease: Option<Lease>,
    /// Whether this replicator may write to the replica now; retention reads it too.
    may_write: Arc<AtomicBool>,
    /// When the last WAL segment upload began, for `sync_interval`.
    last_segment_put: Option<tokio::time::Instant>,
    /// A segment's bytes and its frame, reused from one segment to the next: allocated fresh,
    /// their page faults and zeroing cost more CPU than the compression.
    raw: Vec<u8>,
    framed: BytesMut,
}

impl Uploader {
    pub(crate) fn new(replica: Replica, state: watch::Receiver<ShadowState>, position: watch::Sender<Option<Pos>>, new_generation: std::sync::mpsc::Sender<crate::capture::Wake>, counters: Arc<ReplicaCounters>, lease_terms: Option<(String, LeasePolicy)>, may_write: Arc<AtomicBool>) -> Uploader {
        Uploader { replica, state, position, new_generation, uploaded_snapshot: None, counters, lease_terms, lease: None, may_write, last_segment_put: None, raw: Vec::new(), framed: BytesMut::new() }
    }

    /// Ships until the capturer publishes its final state and all of it is shipped, or the
    /// capturer goes away. Fails only when the replica belongs to another replicator.
    pub(crate) async fn run(mut self) -> Result<(), Error> {
        if let Some((holder, policy)) = self.lease_terms.clone() {
            self.lease = Some(self.acquire_lease(&holder, policy).await?);
        }
        self.may_write.store(true, Ordering::SeqCst);
        let result = self.ship_until_final().await;
        self.may_write.store(false, Ordering::SeqCst);
        if let Some(lease) = self.lease.take() {
            if result.is_ok() {
                lease.release(&self.replica).await;
            }
        }
        result
    }

    /// Retries the lease's store errors (a replicator may start before the network is up),
    /// through the final flush too, whose deadline bounds it. Waiting for another holder ends
    /// at shutdown: that holder is not about to let go.
    async fn acquire_lease(&self, holder: &str, policy: LeasePolicy) -> Result<Lease, Error> {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut state = self.state.clone();
            let shutdown = async move {
                let _ = state.wait_for(|s| s.is_final).await;
            };
            match Lease::acquire(&self.replica, holder, policy, shutdown).await {
                Err(Error::Store { source, .. }) => {
                    warn!(replica = %self.replica.name, error = %source, "replica sync failed: cannot read the replica lease; retrying");
                    let pause = if self.state.borrow().is_final { BACKOFF_MIN } else { backoff };
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                other => return other,
            }
        }
    }

    async fn ship_until_final(&mut self) -> Result<(), Error> {
        let mut backoff = BACKOFF_MIN;
        loop {
            let state = self.state.borrow_and_update().clone();
            self.counters.observe(*self.position.borrow(), state.end);
            let shipped = self.ship(&state).await;
            self.counters.observe(*self.position.borrow(), state.end);
            match shipped {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(e @ Error::LeaseLost { .. }) => return Err(e),
                Err(e) => {
                    warn!(replica = %self.replica.name, error = %e, "replica sync failed; retrying");
                    if let Error::ReplicaAhead { .. } = e {
                        let _ = self.new_generation.send(crate::capture::Wake::NewGeneration(e.to_string()));
                    }
                    self.position.send_replace(None);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
            let shipped = *self.position.borrow();
            if state.is_final && shipped == state.end {
                return Ok(());
            }
            if self.state.changed().await.is_err() {
                return Ok(());
            }
            self.hold_for_sync_interval(state.syncs_requested).await;
        }
    }

    /// With a `sync_interval`, waits until it has passed since the last segment upload, unless
    /// a sync barrier is asked for or the capturer publishes its final state meanwhile.
    async fn hold_for_sync_interval(&mut self, syncs_seen: u64) {
        let (interval, Some(last)) = (self.replica.sync_interval, self.last_segment_put) else { return };
        if interval.is_zero() {
            return;
        }
        let mut state = self.state.clone();
        tokio::select! {
            () = tokio::time::sleep_until(last + interval) => {}
            _ = state.wait_for(|s| s.is_final || s.syncs_requested != syncs_seen) => {}
        }
    }

    async fn ship(&mut self, state: &ShadowState) -> Result<(), Error> {
        let (Some(generation), Some(end), Some(snapshot)) = (state.generation, state.end, &state.snapshot) else {
            return Ok(());
        };
        let known = *self.position.borrow();
        let mut pos = match known {
            Some(pos) if pos.generation == generation => pos,
            _ => self.resume_position(state).await?,
        };
        if pos > end {
            return Err(Error::ReplicaAhead { replica: self.replica.name.clone(), remote: pos, local: end });
        }
        while pos < end {
            let path = state.wal_dir.join(name::shadow_wal_file_name(pos.index));
            let file = std::fs::File::open(&path).map_err(io_err("open", &path))?;
            // Bytes below the published end never change; a finished index is its whole file.
            let limit = if pos.index == end.index { end.offset } else { file.metadata().map_err(io_err("stat", &path))?.len() };
            if pos.offset >= limit {
                pos = Pos { generation, index: pos.index + 1, offset: 0 };
                continue;
            }
            let len = (limit - pos.offset).min(MAX_SEGMENT_BYTES);
            self.raw.resize(len as usize, 0);
            file.read_exact_at(&mut self.raw, pos.offset).map_err(io_err("read", &path))?;
            let body = frame_reusing(&self.raw, &mut self.framed);
            let key = name::segment_key(&generation, pos.index, pos.offset);
            self.last_segment_put = Some(tokio::time::Instant::now());
            self.put(&key, body).await?;
            debug!(replica = %self.replica.name, position = %pos, bytes = len, "shipped segment");
            pos.offset += len;
            self.counters.wal_bytes.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            self.position.send_replace(Some(pos));
        }
        self.position.send_replace(Some(pos));
        if self.uploaded_snapshot.as_ref() != Some(snapshot) {
            self.put_snapshot(&generation, snapshot).await?;
        }
        Ok(())
    }

    /// Streamed from disk: a snapshot may be far larger than the memory walstream may use.
    async fn put_snapshot(&mut self, generation: &walstream_format::GenerationId, snapshot: &LocalSnapshot) -> Result<(), Error> {
        self.confirm_lease().await?;
        let key = name::snapshot_key(generation, snapshot.index);
        self.replica.store.put_file(&key, &snapshot.path).await.map_err(|source| Error::Store { replica: self.replica.name.clone(), source })?;
        info!(replica = %self.replica.name, generation = %generation, index = snapshot.index, "snapshot uploaded");
        self.uploaded_snapshot = Some(snapshot.clone());
        Ok(())
    }

    /// Finds where the replica stands in the current generation, uploading the generation's
    /// snapshot if the replica lacks it. Like Litestream's `calcPos`, the last segment is
    /// downloaded to learn its length, so a restarted walstream never re-sends or skips bytes.
    async fn resume_position(&mut self, state: &ShadowState) -> Result<Pos, Error> {
        let generation = state.generation.expect("checked by caller");
        let snapshot = state.snapshot.as_ref().expect("checked by caller");
        let snapshots = self.list(&name::snapshots_prefix(&generation)).await?;
        let newest = snapshots.iter().filter_map(|key| match name::parse_key(key)?.kind {
            ObjectKind::Snapshot { index } => Some(index),
            ObjectKind::Segment { .. } => None,
        });
        match newest.max() {
            None => {
                self.put_snapshot(&generation, snapshot).await?;
                return Ok(Pos { generation, index: snapshot.index, offset: 0 });
            }
            Some(index) if index >= snapshot.index => self.uploaded_snapshot = Some(snapshot.clone()),
            Some(_) => {}
        }
        let segments = self.list(&name::wal_prefix(&generation)).await?;
        let last = segments.iter().filter_map(|key| Some((name::parse_key(key)?.pos()?, key))).max_by_key(|(pos, _)| *pos);
        let Some((start, key)) = last else {
            return Ok(Pos { generation, index: snapshot.index, offset: 0 });
        };
        let body = self.replica.store.get(key).await.map_err(|source| Error::Store { replica: self.replica.name.clone(), source })?;
        let raw = lz4::decompress(&body).map_err(|source| Error::CorruptObject { replica: self.replica.name.clone(), key: key.clone(), source })?;
        Ok(Pos { offset: start.offset + raw.len() as u64, ..start })
    }

    /// Every write is preceded by this: a lease lost while idle stops the write.
    async fn confirm_lease(&mut self) -> Result<(), Error> {
        let Some(lease) = self.lease.as_mut() else { return Ok(()) };
        let confirmed = lease.confirm(&self.replica).await;
        if let Err(Error::LeaseLost { .. }) = confirmed {
            self.may_write.store(false, Ordering::SeqCst);
        }
        confirmed
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let objects = self.replica.store.list(prefix).await.map_err(|source| Error::Store { replica: self.replica.name.clone(), source })?;
        Ok(objects.into_iter().map(|o| o.key).collect())
    }

    async fn put(&mut self, key: &str, body: Bytes) -> Result<(), Error> {
        self.confirm_lease().await?;
        self.replica.store.put(key, body).await.map_err(|source| Error::Store { replica: self.replica.name.clone(), source })
    }
}

/// LZ4-frames `raw` into `framed`'s buffer and splits the frame off. Once the store drops the
/// returned bytes, the next call's `resize` takes the same allocation back.
fn frame_reusing(raw: &[u8], framed: &mut BytesMut) -> Bytes {
    framed.clear();
    framed.resize(lz4::max_compressed_len(raw.len()), 0);
    let n = lz4::compress_into(raw, framed);
    framed.truncate(n);
    framed.split().freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_frames_decode_and_reuse_one_allocation_once_the_last_is_dropped() {
        let mut framed = BytesMut::new();
        let first: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
        let body = frame_reusing(&first, &mut framed);
        assert_eq!(lz4::decompress(&body).unwrap(), first);
        let allocation = body.as_ptr() as usize..body.as_ptr() as usize + lz4::max_compressed_len(first.len());
        drop(body);
        for round in 0..50 {
            let second = vec![round as u8; 200_000 + round * 1000];
            let body = frame_reusing(&second, &mut framed);
            assert_eq!(lz4::decompress(&body).unwrap(), second);
            assert!(allocation.contains(&(body.as_ptr() as usize)), "round {round} got a new buffer");
        }
        let second = vec![9u8; 200_000];
        let body = frame_reusing(&second, &mut framed);
        // While a frame is still held (an upload in flight), the next one must not overwrite it.
        let third = frame_reusing(&first, &mut framed);
        assert_eq!(lz4::decompress(&body).unwrap(), second);
        assert_eq!(lz4::decompress(&third).unwrap(), first);
    }
}
