//! `/metrics`: Prometheus text with Litestream v0.3.13's series names (spec §8), so existing
//! dashboards keep working, plus walstream's lag and backlog per replica. Values are read from
//! the shippers at scrape time; nothing is kept between scrapes but the counters' totals.
//!
//! Per-database series are bounded: at most `metrics-db-limit` databases (default
//! [`DEFAULT_DB_LIMIT`]) get them, the most troubled first (unhealthy, then the longest replica
//! lag, then the most WAL waiting, then by path), so ten thousand databases do not make a
//! scrape of a million series while the ones that need a look still have theirs. The
//! `walstream_databases*` and `walstream_fleet_*` series cover every database.

use prometheus::{CounterVec, Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// How many databases get series of their own when `metrics-db-limit` is not set.
pub(crate) const DEFAULT_DB_LIMIT: usize = 100;

pub(crate) struct Metrics {
    registry: Registry,
    databases: crate::fleet::Databases,
    /// What makes a database unhealthy, as on `/healthz`.
    health_lag: std::time::Duration,
    db_limit: usize,
    fleet_databases: IntGaugeVec,
    fleet_max_lag: prometheus::Gauge,
    fleet_pending_bytes: prometheus::IntGauge,
    /// Renders one at a time: each starts by clearing the per-database series.
    rendering: std::sync::Mutex<()>,
    db_size: IntGaugeVec,
    wal_size: IntGaugeVec,
    total_wal_bytes: IntCounterVec,
    shadow_wal_index: IntGaugeVec,
    shadow_wal_size: IntGaugeVec,
    disk_full: IntGaugeVec,
    disk_full_spells: IntCounterVec,
    sync_count: IntCounterVec,
    sync_error_count: IntCounterVec,
    sync_seconds: CounterVec,
    replica_wal_bytes: IntCounterVec,
    replica_wal_index: IntGaugeVec,
    replica_wal_offset: IntGaugeVec,
    replica_lag_seconds: GaugeVec,
    replica_pending_bytes: IntGaugeVec,
    operation_total: IntCounterVec,
    operation_bytes: IntCounterVec,
    replica_validation_total: IntCounterVec,
}

const DB: &[&str] = &["db"];
const REPLICA: &[&str] = &["db", "name"];
const OPERATION: &[&str] = &["replica_type", "operation"];
const VALIDATION: &[&str] = &["db", "name", "status"];

impl Metrics {
    pub(crate) fn new(databases: crate::fleet::Databases, health_lag: std::time::Duration, db_limit: usize) -> Metrics {
        let registry = Registry::new();
        macro_rules! register {
            ($kind:ident, $name:literal, $help:literal, $labels:expr) => {{
                let metric = $kind::new(Opts::new($name, $help), $labels).expect("valid metric definition");
                registry.register(Box::new(metric.clone())).expect("metric names are unique");
                metric
            }};
        }
        let fleet_max_lag = prometheus::Gauge::new(
            "walstream_fleet_replica_lag_seconds_max",
            "The longest any replica of any database has been missing a captured commit",
        )
        .expect("valid metric definition");
        registry.register(Box::new(fleet_max_lag.clone())).expect("metric names are unique");
        let fleet_pending_bytes = prometheus::IntGauge::new(
            "walstream_fleet_replica_pending_bytes",
            "WAL bytes captured locally but not yet in a replica, summed over every replica of every database",
        )
        .expect("valid metric definition");
        registry.register(Box::new(fleet_pending_bytes.clone())).expect("metric names are unique");
        Metrics {
            health_lag,
            db_limit,
            fleet_databases: register!(
                IntGaugeVec,
                "walstream_databases",
                "Databases replicated, by state: all, unhealthy (as /healthz judges), and without series of their own here (past metrics-db-limit)",
                &["state"]
            ),
            fleet_max_lag,
            fleet_pending_bytes,
            db_size: register!(IntGaugeVec, "litestream_db_size", "The current size of the real DB", DB),
            wal_size: register!(IntGaugeVec, "litestream_wal_size", "The current size of the real WAL", DB),
            total_wal_bytes: register!(
                IntCounterVec,
                "litestream_total_wal_bytes",
                "Total number of bytes written to shadow WAL",
                DB
            ),
            shadow_wal_index: register!(
                IntGaugeVec,
                "litestream_shadow_wal_index",
                "The current index of the shadow WAL",
                DB
            ),
            shadow_wal_size: register!(
                IntGaugeVec,
                "litestream_shadow_wal_size",
                "Current size of shadow WAL, in bytes",
                DB
            ),
            disk_full: register!(
                IntGaugeVec,
                "walstream_disk_full",
                "1 while capture passes meet a full local disk, and for a minute after",
                DB
            ),
            disk_full_spells: register!(
                IntCounterVec,
                "walstream_disk_full_spells_total",
                "Spells of a full local disk: each may be shorter than a scrape interval",
                DB
            ),
            sync_count: register!(IntCounterVec, "litestream_sync_count", "Number of sync operations", DB),
            sync_error_count: register!(IntCounterVec, "litestream_sync_error_count", "Number of sync errors", DB),
            sync_seconds: register!(
                CounterVec,
                "litestream_sync_seconds",
                "Time spent syncing shadow WAL, in seconds",
                DB
            ),
            replica_wal_bytes: register!(
                IntCounterVec,
                "litestream_replica_wal_bytes",
                "The number wal bytes written",
                REPLICA
            ),
            replica_wal_index: register!(IntGaugeVec, "litestream_replica_wal_index", "The current WAL index", REPLICA),
            replica_wal_offset: register!(
                IntGaugeVec,
                "litestream_replica_wal_offset",
                "The current WAL offset",
                REPLICA
            ),
            replica_lag_seconds: register!(
                GaugeVec,
                "walstream_replica_lag_seconds",
                "How long the replica has been missing a commit walstream had captured (0 when caught up)",
                REPLICA
            ),
            replica_pending_bytes: register!(
                IntGaugeVec,
                "walstream_replica_pending_bytes",
                "WAL bytes captured locally but not yet in the replica",
                REPLICA
            ),
            operation_total: register!(
                IntCounterVec,
                "litestream_replica_operation_total",
                "The number of replica operations performed",
                OPERATION
            ),
            operation_bytes: register!(
                IntCounterVec,
                "litestream_replica_operation_bytes",
                "The number of bytes used by replica operations",
                OPERATION
            ),
            replica_validation_total: register!(
                IntCounterVec,
                "litestream_replica_validation_total",
                "The number of validations performed",
                VALIDATION
            ),
            registry,
            databases,
            rendering: Default::default(),
        }
    }

    /// The exposition text, in the content type [`CONTENT_TYPE`].
    pub(crate) fn render(&self) -> String {
        let _one_at_a_time = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        // A database a watched directory lost has no series any more; the others are set again
        // below, counters to their totals.
        for gauges in [&self.db_size, &self.wal_size, &self.shadow_wal_index, &self.shadow_wal_size, &self.disk_full] {
            gauges.reset();
        }
        for gauges in [&self.replica_wal_index, &self.replica_wal_offset, &self.replica_pending_bytes] {
            gauges.reset();
        }
        for counters in [
            &self.total_wal_bytes,
            &self.disk_full_spells,
            &self.sync_count,
            &self.sync_error_count,
            &self.replica_wal_bytes,
            &self.replica_validation_total,
        ] {
            counters.reset();
        }
        self.sync_seconds.reset();
        self.replica_lag_seconds.reset();
        // Litestream labels operations by store type only: sum every replica of a type.
        let mut operations: std::collections::BTreeMap<(&str, &str), (u64, u64)> = Default::default();
        let mut statuses: Vec<_> = self.databases.list().iter().map(|h| h.status()).collect();
        let unhealthy = |status: &walstream_shipper::DbStatus| !status.problems(self.health_lag).is_empty();
        let max_lag = |status: &walstream_shipper::DbStatus| status.replicas.iter().map(|r| r.lag).max();
        let pending =
            |status: &walstream_shipper::DbStatus| status.replicas.iter().map(|r| r.pending_bytes).sum::<u64>();
        let unhealthy_count = statuses.iter().filter(|s| unhealthy(s)).count();
        self.fleet_databases.with_label_values(&["all"]).set(statuses.len() as i64);
        self.fleet_databases.with_label_values(&["unhealthy"]).set(unhealthy_count as i64);
        self.fleet_databases.with_label_values(&["omitted"]).set(statuses.len().saturating_sub(self.db_limit) as i64);
        self.fleet_max_lag.set(statuses.iter().filter_map(max_lag).max().unwrap_or_default().as_secs_f64());
        self.fleet_pending_bytes.set(statuses.iter().map(pending).sum::<u64>() as i64);
        // Operations count every replica; per-database series only the most troubled.
        for replica in statuses.iter().flat_map(|s| &s.replicas) {
            for (op, requests, bytes) in replica.operations.into_iter().flatten() {
                let total = operations.entry((replica.kind, op.label())).or_default();
                total.0 += requests;
                total.1 += bytes;
            }
        }
        if statuses.len() > self.db_limit {
            statuses.sort_by_cached_key(|s| {
                (!unhealthy(s), std::cmp::Reverse(max_lag(s)), std::cmp::Reverse(pending(s)), s.db_path.clone())
            });
            statuses.truncate(self.db_limit);
        }
        for status in &statuses {
            let db = status.db_path.display().to_string();
            let db = [db.as_str()];
            self.db_size.with_label_values(&db).set(status.db_size as i64);
            self.wal_size.with_label_values(&db).set(status.wal_size as i64);
            raise(&self.total_wal_bytes.with_label_values(&db), status.shadow_bytes_total);
            self.shadow_wal_index.with_label_values(&db).set(status.shadow_index.map_or(0, i64::from));
            self.shadow_wal_size.with_label_values(&db).set(status.shadow_size as i64);
            self.disk_full.with_label_values(&db).set(i64::from(status.disk_full));
            raise(&self.disk_full_spells.with_label_values(&db), status.disk_full_spells);
            raise(&self.sync_count.with_label_values(&db), status.passes);
            raise(&self.sync_error_count.with_label_values(&db), status.failed_passes);
            let seconds = self.sync_seconds.with_label_values(&db);
            seconds.inc_by((status.pass_seconds - seconds.get()).max(0.0));
            for replica in &status.replicas {
                let labels = [db[0], replica.name.as_str()];
                raise(&self.replica_wal_bytes.with_label_values(&labels), replica.wal_bytes_total);
                if let Some(position) = replica.position {
                    self.replica_wal_index.with_label_values(&labels).set(i64::from(position.index));
                    self.replica_wal_offset.with_label_values(&labels).set(position.offset as i64);
                }
                self.replica_lag_seconds.with_label_values(&labels).set(replica.lag.as_secs_f64());
                self.replica_pending_bytes.with_label_values(&labels).set(replica.pending_bytes as i64);
                // Both statuses from the start, as Litestream does, validated or not.
                raise(
                    &self.replica_validation_total.with_label_values(&[db[0], replica.name.as_str(), "ok"]),
                    replica.validations_ok,
                );
                raise(
                    &self.replica_validation_total.with_label_values(&[db[0], replica.name.as_str(), "error"]),
                    replica.validations_failed,
                );
            }
        }
        for ((kind, op), (requests, bytes)) in operations {
            raise(&self.operation_total.with_label_values(&[kind, op]), requests);
            if matches!(op, "GET" | "PUT") {
                raise(&self.operation_bytes.with_label_values(&[kind, op]), bytes);
            }
        }
        let mut text = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut text).expect("text encoding into memory");
        let mut text = String::from_utf8(text).expect("the text format is UTF-8");
        crate::process_metrics::render(&mut text);
        text
    }
}

pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Counters only go up: raise one to a total the shipper keeps.
fn raise(counter: &prometheus::IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}
