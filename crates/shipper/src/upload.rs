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
use crate::meta::LocalSnapshot;
use crate::protocol::{PinGate, ShadowState};
use crate::replica::Replica;
use crate::segment::{frame_segment, Piece, MAX_SEGMENT_RAW_BYTES};
use crate::snapshot_body::Sealed;
use crate::spool::SpoolReader;
use crate::status::ReplicaCounters;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub(crate) struct Uploader {
    replica: Replica,
    state: watch::Receiver<ShadowState>,
    /// The replica's position; `None` until listed (and after an error, so it is listed again,
    /// as Litestream does).
    position: watch::Sender<Option<Pos>>,
    new_generation: crate::pool::WakeSender,
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
    /// The pieces read from the live WAL pass through this (see `Piece::Read`).
    read_buf: Vec<u8>,
    /// Failed uploads, logged once a minute with a count.
    failures: crate::throttle::Throttle,
    /// The end of the last index this uploader shipped whole. Once every replica is past an
    /// index its shadow file is deleted, so a replica listed again (after a failed upload) whose
    /// last segment ends exactly there resumes at the next index's start, rather than reading
    /// for the deleted file and taking it for a reset replica.
    index_shipped_whole: Option<Pos>,
    /// Set when bytes read from the live WAL were let go of while they were read: the ship is
    /// tried again at once with the state now published.
    live_moved: bool,
}

impl Uploader {
    pub(crate) fn new(
        replica: Replica,
        state: watch::Receiver<ShadowState>,
        position: watch::Sender<Option<Pos>>,
        new_generation: crate::pool::WakeSender,
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
            live_moved: false,
            barriers_shipped: 0,
            framed: BytesMut::new(),
            read_buf: Vec::new(),
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
            Some((holder, policy)) => Some(self.acquire_lease_observed(&holder, policy).await?),
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

    /// [`acquire_lease`](Uploader::acquire_lease), while the replica's lag counts: a replica
    /// whose store refuses even the lease (or whose lease another replicator holds) ships
    /// nothing, and `/healthz` must say so once a commit has waited past the health lag.
    async fn acquire_lease_observed(&self, holder: &str, policy: LeasePolicy) -> Result<Lease, Error> {
        tokio::select! {
            lease = self.acquire_lease(holder, policy) => lease,
            never = self.observe_lag() => match never {},
        }
    }

    /// Tells the replica's counters each new published end, until dropped.
    async fn observe_lag(&self) -> std::convert::Infallible {
        let mut state = self.state.clone();
        loop {
            self.counters.observe(*self.position.borrow(), state.borrow_and_update().end);
            if state.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
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
        // Whether the last wait ended early for a backlog: then only full segments go up, or on
        // a tight disk everything that waited.
        let mut woke_for_backlog = false;
        loop {
            let state = self.state.borrow_and_update().clone();
            self.counters.observe(*self.position.borrow(), state.end);
            // A throttled stream's new WAL life may wait for the next slot (see `ship`), unless
            // something since the last full ship asks for everything now.
            let defer_new_life = !self.replica.sync_interval.is_zero() && !must_ship_now(&state, self.barriers_shipped);
            let reach = match (woke_for_backlog, defer_new_life) {
                (_, false) => Reach::End,
                (true, true) if state.disk_tight => Reach::End,
                (true, true) => Reach::FullSegments,
                (false, true) if writer_paused(&state) => Reach::End,
                (false, true) => Reach::DeferNewLife,
            };
            woke_for_backlog = false;
            let shipped = self.ship(&state, reach).await;
            self.counters.observe(*self.position.borrow(), state.end);
            match shipped {
                Ok(()) if std::mem::take(&mut self.live_moved) => continue,
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
            match self.hold_for_sync_interval(state.syncs_requested).await {
                Err(e @ Error::LeaseLost { .. }) => return Err(e),
                Ok(Held::Backlog) => woke_for_backlog = true,
                _ => {}
            }
        }
    }

    /// With a `sync_interval`, waits until it has passed since the last segment upload, unless
    /// [`must_ship_now`] says otherwise, before or meanwhile, or a full segment is waiting
    /// ([`Held::Backlog`]). A lease renewal due at the end of the wait takes that slot, and the
    /// segment the next one: a steady stream then makes one request per interval in all,
    /// renewals included.
    async fn hold_for_sync_interval(&mut self, syncs_seen: u64) -> Result<Held, Error> {
        let (interval, Some(last)) = (self.replica.sync_interval, self.last_segment_put) else {
            return Ok(Held::No);
        };
        if interval.is_zero() || must_ship_now(&self.state.borrow(), syncs_seen) {
            return Ok(Held::No);
        }
        let held = tokio::time::Instant::now() < last + interval;
        // Only a stream that was held is steady; a commit after a quiet spell ships at once.
        let waited = self.wait_for_slot(last + interval, syncs_seen).await;
        if waited != Held::Slot || !held || !self.right.renewal_due().await {
            return Ok(waited);
        }
        self.confirm_lease().await?;
        let renewed = tokio::time::Instant::now();
        self.last_segment_put = Some(renewed);
        Ok(self.wait_for_slot(renewed + interval, syncs_seen).await)
    }

    /// Sleeps until `slot`, or until [`must_ship_now`] or a full segment's backlog cuts the wait
    /// short.
    async fn wait_for_slot(&self, slot: tokio::time::Instant, syncs_seen: u64) -> Held {
        let mut state = self.state.clone();
        let from = *self.position.borrow();
        let mut cut_short = false;
        tokio::select! {
            () = tokio::time::sleep_until(slot) => Held::Slot,
            _ = state.wait_for(|s| {
                cut_short = must_ship_now(s, syncs_seen);
                cut_short || backlog_waits(s, from)
            }) => if cut_short { Held::No } else { Held::Backlog },
        }
    }

    /// Ships what `state` holds, as far as `reach` says: its WAL, then its snapshot if the
    /// replica lacks it.
    async fn ship(&mut self, state: &ShadowState, reach: Reach) -> Result<(), Error> {
        let (Some(generation), Some(snapshot)) = (state.generation, &state.snapshot) else {
            return Ok(());
        };
        self.ship_wal(state, reach).await?;
        if self.live_moved || self.uploaded_snapshot.as_ref() == Some(snapshot) {
            return Ok(());
        }
        // WAL published while the segments above went up goes first: the snapshot takes as long
        // as the database to upload (about 1 s for 70 MB on the emulator), and in the replicate
        // bench the last commits waited behind it (a 2.0 s drain against 1.0).
        let fresh = self.state.borrow().clone();
        if fresh.generation == state.generation && fresh.snapshot.is_some() && fresh.end > state.end {
            self.ship_wal(&fresh, reach).await?;
            if self.live_moved {
                return Ok(());
            }
        }
        self.put_snapshot(&generation, snapshot).await
    }

    /// Ships `state`'s WAL from the replica's position, as far as `reach` says.
    async fn ship_wal(&mut self, state: &ShadowState, reach: Reach) -> Result<(), Error> {
        let defer_new_life = reach != Reach::End;
        let (Some(generation), Some(end)) = (state.generation, state.end) else {
            return Ok(());
        };
        let known = *self.position.borrow();
        let mut pos = match known {
            Some(pos) if pos.generation == generation => pos,
            _ => {
                // Read from the store: the replica holds this much, whatever the next request
                // does (a metric counting what it lacks no longer waits for a segment to land).
                let resumed = self.resume_position(state).await?;
                self.publish_position(resumed, state.end);
                resumed
            }
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
            let source = match std::fs::File::open(&path) {
                Ok(file) => Source::File(file),
                // An ended index the store had not taken for a while is spooled (`spool`); one
                // that is in neither form was deleted once every replica had shipped it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !from_live_wal => {
                    let spool_path = state.wal_dir.join(name::spool_file_name(pos.index));
                    match SpoolReader::open(&state.wal_dir, pos.index).map_err(io_err("read", &spool_path))? {
                        Some(spool) => Source::Spool(spool, spool_path),
                        None => {
                            return Err(Error::ShippedWalDiscarded { replica: self.replica.name.clone(), remote: pos })
                        }
                    }
                }
                Err(e) => return Err(io_err("open", &path)(e)),
            };
            // Bytes below the published end never change; a finished index is its whole file.
            let limit = match &source {
                _ if pos.index == end.index => end.offset,
                Source::File(file) => file.metadata().map_err(io_err("stat", &path))?.len(),
                Source::Spool(spool, _) => spool.raw_len(),
            };
            let limit = match live_from {
                Some(from) if !from_live_wal => limit.min(from),
                _ => limit,
            };
            if reach == Reach::FullSegments
                && pos.index == end.index
                && limit.saturating_sub(pos.offset) < MAX_SEGMENT_RAW_BYTES as u64
            {
                // What is left may not fill a segment: it waits for the slot with later commits.
                break;
            }
            if pos.offset >= limit {
                // A finished index (the current one ends at `end`, which the loop stops at).
                self.index_shipped_whole = Some(pos);
                pos = Pos { generation, index: pos.index + 1, offset: 0 };
                if defer_new_life && uploaded && pos.index == end.index {
                    break;
                }
                continue;
            }
            let (body, len) = match &source {
                Source::Spool(spool, spool_path) => {
                    match spool.segment_at(pos.offset, &mut self.framed).map_err(io_err("read", spool_path))? {
                        Some(segment) => segment,
                        None => {
                            return Err(Error::ShippedWalDiscarded { replica: self.replica.name.clone(), remote: pos })
                        }
                    }
                }
                Source::File(file) if from_live_wal => {
                    // Read, not mapped: the application may truncate its WAL (a mapped page past the
                    // end would raise SIGBUS), though not before the capturer's pin lets it.
                    let framed =
                        frame_segment(Piece::Read(file, &mut self.read_buf), pos.offset, limit, &mut self.framed)
                            .map_err(io_err("read", &path))?;
                    // Read under the capturer's pin only if it still serves them now. It stores them
                    // before letting the pin go (or, out of room at shutdown, withdraws them): what was
                    // read may postdate that, so it is read again wherever the new state says.
                    if self.state.borrow().live_from != state.live_from {
                        self.position.send_replace(Some(pos));
                        self.live_moved = true;
                        return Ok(());
                    }
                    framed
                }
                Source::File(file) => {
                    // Bytes every replica had were punched out; a replica reset since then lacks them.
                    if crate::shadow::first_data(file, pos.offset) != Some(pos.offset) {
                        return Err(Error::ShippedWalDiscarded { replica: self.replica.name.clone(), remote: pos });
                    }
                    frame_segment(Piece::Mapped(file), pos.offset, limit, &mut self.framed)
                        .map_err(io_err("read", &path))?
                }
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
            self.publish_position(pos, state.end);
        }
        self.publish_position(pos, state.end);
        Ok(())
    }

    /// Publishes the replica's position, counted against `end` first: a sync answered on the new
    /// position then finds no lag.
    fn publish_position(&self, pos: Pos, end: Option<Pos>) {
        self.counters.observe(Some(pos), end);
        self.position.send_replace(Some(pos));
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
        *self.counters.snapshot_held.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((snapshot.clone(), std::time::Instant::now()));
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

/// Where [`Uploader::ship`] reads an index's bytes.
enum Source {
    /// The shadow file, or the live WAL for bytes only it holds.
    File(File),
    /// The index's spool, and its path.
    Spool(SpoolReader, std::path::PathBuf),
}

/// How far a [`Uploader::ship`] goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reach {
    /// Everything published.
    End,
    /// Stops once a segment of an older index has gone up and only the newest index remains,
    /// which then waits for the next slot. The application's WAL restarts at any moment, so a
    /// throttled upload would otherwise often carry two segments, the old life's tail and the
    /// new one's head: two requests a slot where litestream, whose WAL lives end at its own
    /// syncs, makes one.
    DeferNewLife,
    /// As `DeferNewLife`, and the newest index only while a whole segment of it is left
    /// ([`backlog_waits`] off a tight disk).
    FullSegments,
}

/// How a wait for the next slot ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Held {
    /// No wait: nothing throttles this upload.
    No,
    /// The slot came.
    Slot,
    /// Enough was waiting before the slot ([`backlog_waits`]).
    Backlog,
}

/// On a tight disk (see `ShadowState::disk_tight`) the wait for the slot ends once this much
/// raw WAL waits: the shadow then holds about this much beside the app's files. Shipping every
/// pass at once instead, the guide's 8 MiB memory volume at 1,000 commits a second made 126
/// uploads a second where litestream makes one; with this bound, about nine.
const TIGHT_DISK_BATCH_BYTES: u64 = 512 << 10;

/// Whether enough raw WAL waits past `from`, in the ended indexes and the newest one, to end the
/// wait for the slot: [`TIGHT_DISK_BATCH_BYTES`] on a tight disk, else a segment's worth
/// ([`MAX_SEGMENT_RAW_BYTES`], so a segment is certain to be cut by size, not by the end of what
/// is published). The slot paces requests: every ended index and every full segment goes up in
/// a request of its own whenever it goes, so holding them back saves none and only keeps them
/// on the local disk (a flat-out writer made 250 MB of WAL a second, and a second of it passed
/// `max-local-wal`).
fn backlog_waits(state: &ShadowState, from: Option<Pos>) -> bool {
    let bound = if state.disk_tight { TIGHT_DISK_BATCH_BYTES } else { MAX_SEGMENT_RAW_BYTES as u64 };
    from.and_then(|from| state.wal_past(from)).is_some_and(|waiting| waiting >= bound)
}

/// A writer that has committed nothing for this long is not the steady stream `DeferNewLife`
/// keeps to one request a slot: its new WAL life goes up with the old one's tail (in the
/// replicate bench, the last commits waited a second slot for it: a 2 s drain against 1).
/// The capturer's own mark of a paused writer (`Timing::active_window`): far longer than the
/// gaps of a writer whose WAL lives end about once a slot (hundreds of commits a second).
const WRITER_PAUSED_AFTER: Duration = Duration::from_millis(250);

fn writer_paused(state: &ShadowState) -> bool {
    state.end_moved_at.is_some_and(|at| at.elapsed() >= WRITER_PAUSED_AFTER)
}

/// Whether `state` must go up without waiting for a slot: shutdown, a sync barrier since
/// `syncs_seen`, or bytes served from the live WAL that the capturer wants to let go of
/// (`ShadowState::ship_now`). A tight disk waits for the slot too, but only while little waits
/// ([`backlog_waits`]).
fn must_ship_now(state: &ShadowState, syncs_seen: u64) -> bool {
    state.is_final || state.syncs_requested != syncs_seen || state.ship_now
}
