//! `heartbeat-url` (Litestream 0.5's key): a GET to the URL every `heartbeat-interval`, sent only
//! while every database is healthy (the same test as `/healthz`) and every replica has caught up
//! once. A dead-man's switch service (healthchecks.io, Cronitor, Better Stack) then alerts when
//! the pings stop, which needs no Prometheus.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The least interval accepted. Litestream 0.5 wants a minute, since these services count in
/// minutes; a shorter one only costs more pings, and lets a test see several.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Litestream 0.5's default.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// One ping may take this long; a hung service must not pile requests up.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Pings `url` every `interval` while healthy, until `stop` is cancelled.
pub(crate) async fn run(
    url: String,
    interval: Duration,
    databases: crate::fleet::Databases,
    health_lag: Duration,
    stop: CancellationToken,
) {
    let client = match reqwest::Client::builder().timeout(PING_TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => {
            warn!(error = %e, "heartbeat: cannot build an HTTP client; no heartbeats will be sent");
            return;
        }
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let problems: Vec<String> = databases.list().iter().flat_map(|h| h.status().problems(health_lag)).collect();
        let waiting: Vec<String> =
            databases.list().iter().filter(|h| !h.ready()).map(|h| h.db_path().display().to_string()).collect();
        if !problems.is_empty() || !waiting.is_empty() {
            warn!(problems = ?problems, not_yet_replicated = ?waiting, "heartbeat withheld: not every replica is healthy");
            continue;
        }
        match client.get(&url).send().await.and_then(reqwest::Response::error_for_status) {
            Ok(_) => debug!(url = %url, "heartbeat sent"),
            Err(e) => warn!(url = %url, error = %e, "heartbeat failed; trying again at the next interval"),
        }
    }
}
