//! Failure injection for tests: a build with the `fail-points` feature (the workspace's test
//! build turns it on through `walstream-tests`) panics (or stalls) at the named point when
//! `WALSTREAM_FAIL_POINT` names it. Other builds compile every point to nothing, so a release
//! binary cannot be made to panic from its environment.

/// Panics here when the `fail-points` feature is on and `WALSTREAM_FAIL_POINT` is `point`.
#[cfg(feature = "fail-points")]
pub(crate) fn hit(point: &str) {
    if std::env::var("WALSTREAM_FAIL_POINT").is_ok_and(|wanted| wanted == point) {
        panic!("fail point {point:?} hit (WALSTREAM_FAIL_POINT)");
    }
}

/// Nothing: this build has no fail points.
#[cfg(not(feature = "fail-points"))]
#[inline(always)]
pub(crate) fn hit(_point: &str) {}

/// Blocks the calling thread for a minute here when the `fail-points` feature is on and
/// `WALSTREAM_FAIL_POINT` is `point`: a stand-in for work that overruns its deadline.
#[cfg(feature = "fail-points")]
pub(crate) fn stall(point: &str) {
    if std::env::var("WALSTREAM_FAIL_POINT").is_ok_and(|wanted| wanted == point) {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// Nothing: this build has no fail points.
#[cfg(not(feature = "fail-points"))]
#[inline(always)]
pub(crate) fn stall(_point: &str) {}

/// Sleeps 100 ms here when the `fail-points` feature is on and `WALSTREAM_FAIL_POINT` is
/// `point`: a stand-in for a replicator slowed by a loaded machine, to open a race's window.
#[cfg(feature = "fail-points")]
pub(crate) fn pause(point: &str) {
    if std::env::var("WALSTREAM_FAIL_POINT").is_ok_and(|wanted| wanted == point) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Nothing: this build has no fail points.
#[cfg(not(feature = "fail-points"))]
#[inline(always)]
pub(crate) fn pause(_point: &str) {}

/// The message of a caught panic, for the error that reports it.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into())
}
