//! One writer per replica across machines: a small lease object at the replica's root, beside
//! `generations/` (where Litestream v0.3.13 never looks), taken and renewed by compare-and-swap
//! ([`ObjectStore::put_if`](walstream_store::ObjectStore::put_if): GCS generation preconditions).
//!
//! The lease is renewed only when it is about to be used, before an upload, once two thirds of
//! its term have passed: the 40 s left of the default 120 s term cover an upload under way, and
//! a steady stream of commits pays one renewal every 80 s, which the uploader's throttle gives
//! the slot of a segment (litestream, with no lease, made one upload more than it had commits
//! each 110 s at 0.1 commits/s in the cost bench). An idle replicator makes no requests at all,
//! and may lose the lease to a newcomer while idle; it learns so at its next upload, whose
//! renewal fails, and stops without writing. A holder is identified by a random id kept in the
//! local metadata directory, so walstream restarted on the same disk (after a crash, say) takes
//! its own lease back at once, while a new machine or container waits for it to be released or
//! to expire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{info, warn};
use walstream_store::{Error as StoreError, Version};

use crate::error::Error;
use crate::replica::Replica;
use walstream_format::name::LEASE_KEY;

/// How long a lease lasts and how long a newcomer waits for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeasePolicy {
    /// A lease not renewed within this long may be taken by another replicator.
    pub ttl: Duration,
    /// How long to wait for a lease another replicator holds before giving up.
    pub wait: Duration,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        // The wait covers a rollout's overlap and the expiry of a crashed holder's lease.
        LeasePolicy { ttl: Duration::from_secs(120), wait: Duration::from_secs(180) }
    }
}

/// What the lease object says.
#[derive(Debug, PartialEq, Eq)]
struct Terms {
    holder: String,
    /// Milliseconds since the epoch; 0 once released.
    expires_ms: u64,
}

impl Terms {
    fn encode(&self) -> Bytes {
        Bytes::from(format!("walstream lease v1\nholder {}\nexpires_unix_ms {}\n", self.holder, self.expires_ms))
    }

    fn decode(body: &[u8]) -> Option<Terms> {
        let text = std::str::from_utf8(body).ok()?;
        let mut lines = text.lines();
        if lines.next()? != "walstream lease v1" {
            return None;
        }
        let holder = lines.next()?.strip_prefix("holder ")?.to_string();
        let expires_ms = lines.next()?.strip_prefix("expires_unix_ms ")?.parse().ok()?;
        Some(Terms { holder, expires_ms })
    }

    /// How long the lease still runs, for messages.
    fn until(&self) -> String {
        format!(
            "it expires in {:.1}s unless renewed",
            Duration::from_millis(self.expires_ms.saturating_sub(now_ms())).as_secs_f64()
        )
    }
}

/// When a lease taken or renewed now is next renewed.
fn renew_at(policy: LeasePolicy) -> Instant {
    Instant::now() + policy.ttl - policy.ttl / 3
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The right to write to a replica, shared by its uploader and its upkeep: granted once the
/// uploader runs (with the lease taken, when leases are on), revoked when it ends or the lease
/// is lost. Deletions confirm it just as uploads do, so a replicator whose lease another took
/// over while it idled deletes nothing of the new holder's.
#[derive(Default)]
pub(crate) struct WriteRight {
    state: tokio::sync::Mutex<Right>,
}

#[derive(Default)]
enum Right {
    #[default]
    Not,
    Unleased,
    Leased(Lease),
}

impl WriteRight {
    pub(crate) async fn grant(&self, lease: Option<Lease>) {
        *self.state.lock().await = lease.map_or(Right::Unleased, Right::Leased);
    }

    /// Ends the right; returns the lease, for the caller to release.
    pub(crate) async fn revoke(&self) -> Option<Lease> {
        match std::mem::take(&mut *self.state.lock().await) {
            Right::Leased(lease) => Some(lease),
            _ => None,
        }
    }

    /// Whether the next write renews the lease (so a throttled stream can give it a slot).
    pub(crate) async fn renewal_due(&self) -> bool {
        matches!(&*self.state.lock().await, Right::Leased(lease) if Instant::now() >= lease.renew_at)
    }

    /// Before a write: false if there is no right to write now; the lease, if any, is renewed
    /// when due, and a lease found lost is an error and revokes the right.
    pub(crate) async fn confirm(&self, replica: &Replica) -> Result<bool, Error> {
        let mut state = self.state.lock().await;
        let confirmed = match &mut *state {
            Right::Not => return Ok(false),
            Right::Unleased => return Ok(true),
            Right::Leased(lease) => lease.confirm(replica).await,
        };
        if let Err(Error::LeaseLost { .. }) = confirmed {
            *state = Right::Not;
        }
        confirmed.map(|()| true)
    }
}

/// A held lease.
pub(crate) struct Lease {
    holder: String,
    version: Version,
    /// When two thirds of the term have passed and the next use renews it.
    renew_at: Instant,
    policy: LeasePolicy,
}

impl Lease {
    /// Takes the replica's lease for `holder`, waiting up to `policy.wait` for another holder
    /// to release it or let it expire. `stop` ends the wait early (shutdown).
    pub(crate) async fn acquire(
        replica: &Replica,
        holder: &str,
        policy: LeasePolicy,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Lease, Error> {
        tokio::pin!(stop);
        let deadline = Instant::now() + policy.wait;
        let mut logged = false;
        loop {
            let current = get(replica).await?;
            let ours = Terms { holder: holder.to_string(), expires_ms: now_ms() + policy.ttl.as_millis() as u64 };
            let other = match &current {
                Some((terms, _)) if terms.holder != holder && terms.expires_ms > now_ms() => Some(terms),
                _ => None,
            };
            let Some(other) = other else {
                match replica.store.put_if(LEASE_KEY, ours.encode(), current.as_ref().map(|(_, v)| *v)).await {
                    Ok(version) => {
                        info!(replica = %replica.name, holder, "replica lease taken");
                        return Ok(Lease { holder: holder.to_string(), version, renew_at: renew_at(policy), policy });
                    }
                    // Someone else wrote between our read and write (or our own retried write
                    // landed): read again.
                    Err(StoreError::PreconditionFailed { .. }) => {
                        if let Some(lease) = Lease::recognise(replica, holder, policy).await? {
                            return Ok(lease);
                        }
                        continue;
                    }
                    Err(source) => return Err(store_err(replica, source)),
                }
            };
            if Instant::now() >= deadline {
                return Err(Error::Leased {
                    replica: replica.name.clone(),
                    target: replica.store.describe(),
                    holder: other.holder.clone(),
                    until: other.until(),
                });
            }
            if !logged {
                warn!(replica = %replica.name, holder = %other.holder, until = %other.until(), "replica is leased by another walstream; capturing locally and waiting for it to be released or to expire");
                logged = true;
            }
            let retry_in = Duration::from_millis(other.expires_ms.saturating_sub(now_ms()))
                .clamp(Duration::from_millis(200), Duration::from_secs(2));
            tokio::select! {
                () = tokio::time::sleep(retry_in.min(deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(10))) => {}
                () = &mut stop => return Err(Error::Leased { replica: replica.name.clone(), target: replica.store.describe(), holder: other.holder.clone(), until: other.until() }),
            }
        }
    }

    /// After a failed conditional write: is the lease ours after all (a retry of a write that
    /// had landed)?
    async fn recognise(replica: &Replica, holder: &str, policy: LeasePolicy) -> Result<Option<Lease>, Error> {
        Ok(match get(replica).await? {
            Some((terms, version)) if terms.holder == holder && terms.expires_ms > now_ms() => {
                Some(Lease { holder: holder.to_string(), version, renew_at: renew_at(policy), policy })
            }
            _ => None,
        })
    }

    /// Called before every upload: renews the lease once two thirds of its term have passed. An error
    /// means the lease is lost (or cannot be confirmed), and nothing may be uploaded.
    pub(crate) async fn confirm(&mut self, replica: &Replica) -> Result<(), Error> {
        if Instant::now() < self.renew_at {
            return Ok(());
        }
        let terms = Terms { holder: self.holder.clone(), expires_ms: now_ms() + self.policy.ttl.as_millis() as u64 };
        match replica.store.put_if(LEASE_KEY, terms.encode(), Some(self.version)).await {
            Ok(version) => {
                self.version = version;
                self.renew_at = renew_at(self.policy);
                Ok(())
            }
            Err(StoreError::PreconditionFailed { .. }) => match Lease::recognise(replica, &self.holder, self.policy)
                .await?
            {
                Some(renewed) => {
                    *self = renewed;
                    Ok(())
                }
                None => {
                    let holder = get(replica).await.ok().flatten().map_or("nobody".into(), |(t, _)| t.holder);
                    Err(Error::LeaseLost { replica: replica.name.clone(), target: replica.store.describe(), holder })
                }
            },
            Err(source) => Err(store_err(replica, source)),
        }
    }

    /// Hands the lease back so a successor can start at once.
    pub(crate) async fn release(self, replica: &Replica) {
        let terms = Terms { holder: self.holder.clone(), expires_ms: 0 };
        match replica.store.put_if(LEASE_KEY, terms.encode(), Some(self.version)).await {
            Ok(_) => info!(replica = %replica.name, "replica lease released"),
            Err(e) => {
                warn!(replica = %replica.name, error = %e, "could not release the replica lease; it expires on its own")
            }
        }
    }
}

async fn get(replica: &Replica) -> Result<Option<(Terms, Version)>, Error> {
    let current = replica.store.get_versioned(LEASE_KEY).await.map_err(|source| store_err(replica, source))?;
    // An unreadable lease object is treated as expired: it cannot name a live holder.
    Ok(current.map(|(body, version)| {
        (Terms::decode(&body).unwrap_or(Terms { holder: "unreadable lease".into(), expires_ms: 0 }), version)
    }))
}

fn store_err(replica: &Replica, source: StoreError) -> Error {
    Error::Store { replica: replica.name.clone(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_round_trip_and_reject_other_text() {
        let terms = Terms { holder: "host-a 0123abcd".into(), expires_ms: 1_795_000_000_123 };
        assert_eq!(Terms::decode(&terms.encode()), Some(terms));
        assert_eq!(Terms::decode(b"something else"), None);
    }

    #[tokio::test]
    async fn a_second_holder_waits_then_takes_a_released_lease_and_the_first_cannot_renew() {
        let dir = tempfile::tempdir().unwrap();
        let replica = Replica::new("file", std::sync::Arc::new(walstream_store::FileStore::new(dir.path())));
        let quick = LeasePolicy { ttl: Duration::from_secs(60), wait: Duration::from_millis(300) };
        let never = std::future::pending::<()>();
        let mut first = Lease::acquire(&replica, "a", quick, never).await.unwrap();
        let refused =
            Lease::acquire(&replica, "b", quick, std::future::pending()).await.err().expect("b must wait and give up");
        assert!(refused.to_string().contains("is leased by a"), "{refused}");
        // The same holder (walstream restarted on the same disk) takes it back at once.
        let again = Lease::acquire(&replica, "a", quick, std::future::pending()).await.unwrap();
        again.release(&replica).await;
        let mut b = Lease::acquire(&replica, "b", quick, std::future::pending()).await.unwrap();
        // The first lease's version is stale: renewing it fails and names the new holder.
        first.renew_at = Instant::now();
        let lost = first.confirm(&replica).await.unwrap_err();
        assert!(lost.to_string().contains("now held by b"), "{lost}");
        b.renew_at = Instant::now();
        b.confirm(&replica).await.expect("the holder renews");
    }
}
