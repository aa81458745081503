//! Uploaders: one task per replica, shipping the shadow WAL in (index, offset) order.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use walstream_format::name::{self, ObjectKind};
use walstream_format::{age, lz4, Pos};

use crate::error::{io_err, Error};
use crate::lease::{Lease, LeasePolicy, WriteRight};
use crate::mapped::MappedRange;
use crate::meta::LocalSnapshot;
use crate::protocol::{PinGate, ShadowState};
use crate::replica::Replica;
use crate::snapshot_body::Sealed;
use crate::status::ReplicaCounters;

/// A segment ends once its frame reaches this many bytes. Counting compressed bytes, not raw
/// ones, keeps a PUT's memory bounded whatever the data while compressible WAL (a saturated
/// writer's compresses ten to one) takes fewer requests, each a Class A operation on GCS: a
/// 10 s saturated writer made 1,082 to 1,496 PUTs at a 1 MiB raw bound, 530 and 554 with this.
/// Segments may end inside a transaction; restore only applies whole transactions.
pub(crate) const SEGMENT_TARGET_BYTES: usize = 1 << 20;

/// Uncompressed bytes per segment at most: a restore holds one whole segment in memory.
pub(crate) const MAX_SEGMENT_RAW_BYTES: usize = 16 << 20;

/// Shadow bytes read and compressed at a time: one LZ4 block.
const PIECE_BYTES: usize = 256 << 10;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(crate) struct Uploader {
    replica: Replica,
    state: watch::Receiver<ShadowState>,
    /// The replica's position; `None` until listed (and after an error, so it is listed again,
    /// as Litestream does).
    position: watch::Sender<Option<Pos>>,
    new_generation: std::sync::mpsc::Sender<crate::protocol::Wake>,
    /// The newest snapshot this replica is known to hold.
    uploaded_snapshot: Option<LocalSnapshot>,
    /// What a snapshot framed straight from the database is read through.
    pin_gate: Arc<PinGate>,
    counters: Arc<ReplicaCounters>,
    /// Who this replicator is and its lease policy, when leases are on.
    lease_terms: Option<(String, LeasePolicy)>,
    /// Whether this replicator may write to the replica now (its lease, when leases are on);
    /// shared with the replica's upkeep, whose deletions need it too.
    right: Arc<WriteRight>,
    /// When the last WAL segment upload began, for `sync_interval`.
    last_segment_put: Option<tokio::time::Instant>,
    /// `ShadowState::syncs_requested` as of the last ship that reached the published end.
    barriers_shipped: u64,
    /// A segment's frame, reused from one segment to the next: allocated fresh, its page faults
    /// and zeroing cost more CPU than the compression.
    framed: BytesMut,
    /// Failed uploads, logged once a minute with a count.
    failures: crate::throttle::Throttle,
    /// The end of the last index this uploader shipped whole. Once every replica is past an
    /// index its shadow file is deleted, so a replica listed again (after a failed upload) whose
    /// last segment ends exactly there resumes at the next index's start, rather than reading
    /// for the deleted file and taking it for a reset replica.
    index_shipped_whole: Option<Pos>,
}

impl Uploader {
    pub(crate) fn new(
        replica: Replica,
        state: watch::Receiver<ShadowState>,
        position: watch::Sender<Option<Pos>>,
        new_generation: std::sync::mpsc::Sender<crate::protocol::Wake>,
        counters: Arc<ReplicaCounters>,
        lease_terms: Option<(String, LeasePolicy)>,
        right: Arc<WriteRight>,
    ) -> Uploader {
        Uploader {
            replica,
            state,
            position,
            new_generation,
            uploaded_snapshot: None,
            pin_gate: Default::default(),
            counters,
            lease_terms,
            right,
            last_segment_put: None,
            index_shipped_whole: None,
            barriers_shipped: 0,
            framed: BytesMut::new(),
            failures: Default::default(),
        }
    }

    /// Shares the capturer's gate for snapshots framed from the database (`PinGate`).
    pub(crate) fn with_pin_gate(mut self, gate: Arc<PinGate>) -> Uploader {
        self.pin_gate = gate;
        self
    }

    /// Ships until the capturer publishes its final state and all of it is shipped, or the
    /// capturer goes away. Fails only when the replica belongs to another replicator.
    pub(crate) async fn run(mut self) -> Result<(), Error> {
        let lease = match self.lease_terms.clone() {
            Some((holder, policy)) => Some(self.acquire_lease(&holder, policy).await?),
            None => None,
        };
        self.right.grant(lease).await;
        let result = self.ship_until_final().await;
        if let Some(lease) = self.right.revoke().await {
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
                    warn!(replica = %self.replica.name, error = %source, "replica upload failed: cannot read the replica lease; retrying");
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
            // A throttled stream's new WAL life may wait for the next slot (see `ship`), unless
            // something since the last full ship asks for everything now.
            let defer_new_life = !self.replica.sync_interval.is_zero() && !must_ship_now(&state, self.barriers_shipped);
            let shipped = self.ship(&state, defer_new_life).await;
            self.counters.observe(*self.position.borrow(), state.end);
            match shipped {
                Ok(()) => {
                    backoff = BACKOFF_MIN;
                    if let Some(unlogged) = self.failures.recovered() {
                        info!(replica = %self.replica.name, unlogged_failures = unlogged, "replica upload recovered");
                    }
                }
                Err(e @ Error::LeaseLost { .. }) => return Err(e),
                Err(e) => {
                    if let Some(unlogged) = self.failures.failed() {
                        warn!(replica = %self.replica.name, error = %e, failures_since_last_logged = unlogged, "replica upload failed; retrying (logged once a minute while it lasts)");
                    }
                    let new_generation = match &e {
                        Error::ReplicaAhead { .. } => true,
                        // Unless the generation has moved on meanwhile (its files go with it).
                        Error::ShippedWalDiscarded { remote: Pos { generation, .. }, .. }
                        | Error::SnapshotDiscarded { generation, .. } => {
                            self.state.borrow().generation == Some(*generation)
                        }
                        _ => false,
                    };
                    if new_generation {
                        let _ = self.new_generation.send(crate::protocol::Wake::NewGeneration(e.to_string()));
                    }
                    self.position.send_replace(None);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
            // A deferred new life goes up at the next slot whether or not more commits come.
            if *self.position.borrow() == state.end {
                self.barriers_shipped = state.syncs_requested;
                if state.is_final || self.state.changed().await.is_err() {
                    return Ok(());
                }
            }
            // Another failed renewal is tried again before the next upload, and fails that one.
            if let Err(e @ Error::LeaseLost { .. }) = self.hold_for_sync_interval(state.syncs_requested).await {
                return Err(e);
            }
        }
    }

    /// With a `sync_interval`, waits until it has passed since the last segment upload, unless
    /// [`must_ship_now`] says otherwise, before or meanwhile. A lease
    /// renewal due at the end of the wait takes that slot, and the segment the next one: a steady
    /// stream then makes one request per interval in all, renewals included.
    async fn hold_for_sync_interval(&mut self, syncs_seen: u64) -> Result<(), Error> {
        let (interval, Some(last)) = (self.replica.sync_interval, self.last_segment_put) else {
            return Ok(());
        };
        if interval.is_zero() || must_ship_now(&self.state.borrow(), syncs_seen) {
            return Ok(());
        }
        let held = tokio::time::Instant::now() < last + interval;
        // Only a stream that was held is steady; a commit after a quiet spell ships at once.
        if !self.wait_for_slot(last + interval, syncs_seen).await || !held || !self.right.renewal_due().await {
            return Ok(());
        }
        self.confirm_lease().await?;
        let renewed = tokio::time::Instant::now();
        self.last_segment_put = Some(renewed);
        self.wait_for_slot(renewed + interval, syncs_seen).await;
        Ok(())
    }

    /// Sleeps until `slot`; false if [`must_ship_now`] cut the wait short.
    async fn wait_for_slot(&self, slot: tokio::time::Instant, syncs_seen: u64) -> bool {
        let mut state = self.state.clone();
        tokio::select! {
            () = tokio::time::sleep_until(slot) => true,
            _ = state.wait_for(|s| must_ship_now(s, syncs_seen)) => false,
        }
    }

    /// Ships what `state` holds; with `defer_new_life`, stops once a segment of an older index
    /// has gone up and only the newest index remains, which then waits for the next slot. The
    /// application's WAL restarts at any moment, so a throttled upload would otherwise often
    /// carry two segments, the old life's tail and the new one's head: two requests a slot where
    /// litestream, whose WAL lives end at its own syncs, makes one.
    async fn ship(&mut self, state: &ShadowState, defer_new_life: bool) -> Result<(), Error> {
        let (Some(generation), Some(end), Some(snapshot)) = (state.generation, state.end, &state.snapshot) else {
            return Ok(());
        };
        let known = *self.position.borrow();
        let mut pos = match known {
            Some(pos) if pos.generation == generation => pos,
            _ => self.resume_position(state).await?,
        };
        if Some(pos) == self.index_shipped_whole {
            pos = Pos { index: pos.index + 1, offset: 0, ..pos };
        }
        if pos > end {
            return Err(Error::ReplicaAhead { replica: self.replica.name.clone(), remote: pos, local: end });
        }
        let mut uploaded = false;
        while pos < end {
            // While the disk is full, the current index's newest bytes are only in the live WAL.
            let live_from = state.live_from.filter(|&(index, _)| index == pos.index).map(|(_, from)| from);
            let from_live_wal = live_from.is_some_and(|from| pos.offset >= from);
            let path = if from_live_wal {
                state.wal_path.clone()
            } else {
                state.wal_dir.join(name::shadow_wal_file_name(pos.index))
            };
            let file = match std::fs::File::open(&path) {
                Ok(file) => file,
                // Deleted once every replica had shipped it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !from_live_wal => {
                    return Err(Error::ShippedWalDiscarded { replica: self.replica.name.clone(), remote: pos })
                }
                Err(e) => return Err(io_err("open", &path)(e)),
            };
            // Bytes below the published end never change; a finished index is its whole file.
            let limit =
                if pos.index == end.index { end.offset } else { file.metadata().map_err(io_err("stat", &path))?.len() };
            let limit = match live_from {
                Some(from) if !from_live_wal => limit.min(from),
                _ => limit,
            };
            if pos.offset >= limit {
                // A finished index (the current one ends at `end`, which the loop stops at).
                self.index_shipped_whole = Some(pos);
                pos = Pos { generation, index: pos.index + 1, offset: 0 };
                if defer_new_life && uploaded && pos.index == end.index {
                    break;
                }
                continue;
            }
            let (body, len) = if from_live_wal {
                // Read, not mapped: the application may truncate its WAL (a mapped page past the
                // end would raise SIGBUS), though not before the capturer's pin lets it.
                let framed = frame_segment(Piece::Read(&file), pos.offset, limit, &mut self.framed)
                    .map_err(io_err("read", &path))?;
                // Read under the capturer's pin only if it still serves them now (at shutdown it
                // withdraws them before letting the pin go).
                if self.state.borrow().live_from != state.live_from {
                    return Err(Error::ShippedWalDiscarded { replica: self.replica.name.clone(), remote: pos });
                }
                framed
            } else {
                // Bytes every replica had were punched out; a replica reset since then lacks them.
                if crate::shadow::first_data(&file, pos.offset) != Some(pos.offset) {
                    return Err(Error::ShippedWalDiscarded { replica: self.replica.name.clone(), remote: pos });
                }
                frame_segment(Piece::Mapped(&file), pos.offset, limit, &mut self.framed)
                    .map_err(io_err("read", &path))?
            };
            crate::fail_point::hit("upload");
            let key = name::segment_key(&generation, pos.index, pos.offset);
            self.last_segment_put = Some(tokio::time::Instant::now());
            let body = match self.replica.age.as_deref().filter(|keys| keys.seals()) {
                Some(keys) => Bytes::from(keys.seal(&body)),
                None => body,
            };
            self.put(&key, body).await?;
            uploaded = true;
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
    async fn put_snapshot(
        &mut self,
        generation: &walstream_format::GenerationId,
        snapshot: &LocalSnapshot,
    ) -> Result<(), Error> {
        self.confirm_lease().await?;
        let key = name::snapshot_key(generation, snapshot.index);
        // Every replica held it, so its local copy was freed; this one has lost it since.
        if !snapshot.from_database
            && std::fs::metadata(&snapshot.path).map_err(io_err("stat", &snapshot.path))?.len() == 0
        {
            return Err(Error::SnapshotDiscarded {
                replica: self.replica.name.clone(),
                generation: *generation,
                index: snapshot.index,
            });
        }
        let body = crate::snapshot_body::body_of(snapshot, &self.pin_gate);
        // Sealed as it is read, so an encrypted copy never exists on disk.
        let put = match self.replica.age.as_deref().filter(|keys| keys.seals()) {
            Some(keys) => self.replica.store.put_body(&key, &Sealed { keys, inner: body.as_ref() }).await,
            None => self.replica.store.put_body(&key, body.as_ref()).await,
        };
        put.map_err(|source| Error::Store { replica: self.replica.name.clone(), source })?;
        info!(replica = %self.replica.name, generation = %generation, index = snapshot.index, "snapshot uploaded");
        self.holds_snapshot(snapshot);
        Ok(())
    }

    /// The replica holds `snapshot`: no upload of it again, and the capturer may free its copy.
    fn holds_snapshot(&mut self, snapshot: &LocalSnapshot) {
        self.uploaded_snapshot = Some(snapshot.clone());
        *self.counters.snapshot_held.lock().unwrap_or_else(|e| e.into_inner()) = Some(snapshot.clone());
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
            Some(index) if index >= snapshot.index => self.holds_snapshot(snapshot),
            Some(_) => {}
        }
        let segments = self.list(&name::wal_prefix(&generation)).await?;
        let last =
            segments.iter().filter_map(|key| Some((name::parse_key(key)?.pos()?, key))).max_by_key(|(pos, _)| *pos);
        let Some((start, key)) = last else {
            return Ok(Pos { generation, index: snapshot.index, offset: 0 });
        };
        let body = self
            .replica
            .store
            .get(key)
            .await
            .map_err(|source| Error::Store { replica: self.replica.name.clone(), source })?;
        let framed = age::unseal(self.replica.age.as_deref(), &body).map_err(|problem| Error::Encryption {
            replica: self.replica.name.clone(),
            key: key.clone(),
            problem,
        })?;
        let raw = lz4::decompress(&framed).map_err(|source| Error::CorruptObject {
            replica: self.replica.name.clone(),
            key: key.clone(),
            source,
        })?;
        Ok(Pos { offset: start.offset + raw.len() as u64, ..start })
    }

    /// Every write is preceded by this: a lease lost while idle stops the write.
    async fn confirm_lease(&mut self) -> Result<(), Error> {
        self.right.confirm(&self.replica).await.map(|_| ())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let objects = self
            .replica
            .store
            .list(prefix)
            .await
            .map_err(|source| Error::Store { replica: self.replica.name.clone(), source })?;
        Ok(objects.into_iter().map(|o| o.key).collect())
    }

    async fn put(&mut self, key: &str, body: Bytes) -> Result<(), Error> {
        self.confirm_lease().await?;
        self.replica
            .store
            .put(key, body)
            .await
            .map_err(|source| Error::Store { replica: self.replica.name.clone(), source })
    }
}

/// Whether `state` must go up without waiting for a slot: shutdown, a sync barrier since
/// `syncs_seen`, bytes served from the live WAL (they hold the capturer's pin until shipped), or
/// a tight disk (no room for a second of WAL).
fn must_ship_now(state: &ShadowState, syncs_seen: u64) -> bool {
    state.is_final || state.syncs_requested != syncs_seen || state.live_from.is_some() || state.disk_tight
}

/// Where a segment's bytes come from.
#[derive(Clone, Copy)]
enum Piece<'a> {
    /// A shadow file, mapped a piece at a time.
    Mapped(&'a File),
    /// The live WAL, read a piece at a time.
    Read(&'a File),
}

/// LZ4-frames the bytes from `start` toward `limit` into `framed`'s buffer, a piece at a time
/// straight from the page cache, until the frame reaches [`SEGMENT_TARGET_BYTES`]; returns the
/// frame and the raw bytes it holds. The buffer is reused: once the store drops the returned
/// bytes, the next call's `resize` takes the same allocation back.
fn frame_segment(source: Piece<'_>, start: u64, limit: u64, framed: &mut BytesMut) -> std::io::Result<(Bytes, u64)> {
    use std::os::unix::fs::FileExt;
    let mut read_buf = Vec::new();
    framed.clear();
    // Reserved whole up front: grown block by block, the buffer doubled past what any frame needs.
    framed.reserve(SEGMENT_TARGET_BYTES + lz4::FrameBuilder::block_bound(PIECE_BYTES) + lz4::FrameBuilder::END_LEN);
    framed.resize(lz4::FRAME_PREFIX.len(), 0);
    let mut frame = lz4::FrameBuilder::start(framed);
    let end = limit.min(start + MAX_SEGMENT_RAW_BYTES as u64);
    let mut at = start;
    while at < end && frame.written() < SEGMENT_TARGET_BYTES {
        let len = ((end - at) as usize).min(PIECE_BYTES);
        // Mapped, not read: copying the shadow into a buffer before compressing it was a tenth
        // of walstream's CPU under a saturated writer. One piece at a time, because mapped pages
        // count in walstream's RSS while mapped: a whole segment's took its peak from 15.5 MiB
        // to 25.7 MiB.
        let mapped;
        let piece = match source {
            Piece::Mapped(file) => {
                mapped = MappedRange::new(file, at, len)?;
                mapped.bytes()
            }
            Piece::Read(file) => {
                read_buf.resize(len, 0);
                file.read_exact_at(&mut read_buf, at)?;
                &read_buf[..]
            }
        };
        framed.resize(frame.written() + lz4::FrameBuilder::block_bound(len), 0);
        frame.push(piece, framed);
        at += len as u64;
    }
    framed.resize(frame.written() + lz4::FrameBuilder::END_LEN, 0);
    let n = frame.finish(framed);
    framed.truncate(n);
    Ok((framed.split().freeze(), at - start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// 3 MiB that does not compress, then 20 MiB that does: segments end at the compressed
    /// target in the first part and at the raw bound in the second, every one decodes to its
    /// range, and all after the first reuse the first one's allocation.
    #[test]
    fn segments_end_at_the_compressed_target_or_the_raw_bound_in_one_reused_buffer() {
        let mut data: Vec<u8> = (0..3u64 << 20)
            .map(|i| {
                let z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                (z ^ (z >> 31)) as u8
            })
            .collect();
        data.extend((0..20u32 << 20).map(|i| (i % 4000) as u8));
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let mut framed = BytesMut::new();
        let (mut at, mut lens, mut first) = (0u64, Vec::new(), None);
        while at < data.len() as u64 {
            let (body, len) = frame_segment(Piece::Mapped(&file), at, data.len() as u64, &mut framed).unwrap();
            assert_eq!(lz4::decompress(&body).unwrap(), data[at as usize..(at + len) as usize]);
            assert!(
                body.len()
                    <= SEGMENT_TARGET_BYTES + lz4::FrameBuilder::block_bound(PIECE_BYTES) + lz4::FrameBuilder::END_LEN
            );
            let ptr = body.as_ptr() as usize;
            let first = *first.get_or_insert(ptr);
            assert!((first..first + (2 << 20)).contains(&ptr), "segment at {at} got a new buffer");
            lens.push(len >> 20);
            at += len;
        }
        assert_eq!(lens, [1, 1, 1, 16, 4], "MiB of raw WAL per segment");
    }

    #[test]
    fn a_segment_stops_at_its_limit_and_holds_an_upload_in_flight() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[5u8; 1000]).unwrap();
        let mut framed = BytesMut::new();
        let (held, len) = frame_segment(Piece::Mapped(&file), 100, 700, &mut framed).unwrap();
        assert_eq!(len, 600);
        // While a frame is still held (an upload in flight), the next one must not overwrite it.
        let (next, _) = frame_segment(Piece::Mapped(&file), 0, 10, &mut framed).unwrap();
        assert_eq!(lz4::decompress(&held).unwrap(), [5u8; 600]);
        assert_eq!(lz4::decompress(&next).unwrap(), [5u8; 10]);
    }
}
