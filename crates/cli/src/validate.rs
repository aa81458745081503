//! `validation-interval`: every so often a replica is restored in the background and its content
//! compared with the database's, at the same position.
//!
//! Litestream v0.3.13 compared a CRC of the database file after forcing a checkpoint, and raced
//! the application's writes into false mismatches (#253). Here nothing is forced: a validation
//! starts only once the replica holds everything captured, restores the replica, reads the
//! database in one read transaction, and then asks the capturer for a pass. If that pass finds
//! any commit since the validation began, the two did not see the same position and the
//! validation is skipped, not failed; a busy database is validated at its next quiet moment.
//! Content is compared table by table (schema, then every row), so the application's own
//! checkpoints and VACUUMs, which move pages but not rows, never count as a difference.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{types::ValueRef, Connection, OpenFlags};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};
use walstream_format::Pos;
use walstream_restore::{IntegrityCheck, RestoreOptions, Target};
use walstream_shipper::Handle;
use walstream_store::ObjectStore;

/// How long a validation waits for the replica to catch up before it is skipped.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);
/// How soon a skipped validation is tried again.
const RETRY_AFTER_SKIP: Duration = Duration::from_secs(5);

/// One replica to validate.
pub(crate) struct Validation {
    handle: Handle,
    /// The replica's place in its database's configuration, and its name.
    replica: usize,
    name: String,
    store: Arc<dyn ObjectStore>,
    /// The replica's `age` block, to decrypt what it restores.
    age: Option<Arc<walstream_format::age::AgeKeys>>,
    interval: Duration,
}

impl Validation {
    /// Replica `replica` of `handle`'s database, every `interval`; `None` if it has none such.
    pub(crate) fn new(
        handle: Handle,
        replica: usize,
        interval: Duration,
        age: Option<Arc<walstream_format::age::AgeKeys>>,
    ) -> Option<Validation> {
        let (name, store) = handle.replica_store(replica)?;
        Some(Validation { handle, replica, name, store, age, interval })
    }
}

/// Why a validation did not compare anything.
enum Skipped {
    NotCaughtUp,
    Changed,
}

/// Validates every `interval` until `stop`.
pub(crate) async fn run(v: Validation, stop: CancellationToken) {
    let mut wait = v.interval;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let db = v.handle.db_path().display().to_string();
        wait = v.interval;
        match validate_once(&v).await {
            Ok(Ok(pos)) => {
                info!(db = %db, replica = %v.name, position = %pos, "replica validated: its restore equals the database");
                v.handle.record_validation(v.replica, Ok(()));
            }
            Ok(Err(skipped)) => {
                let why = match skipped {
                    Skipped::NotCaughtUp => "the replica had not caught up",
                    Skipped::Changed => "the database changed while it was compared",
                };
                debug!(db = %db, replica = %v.name, why, "replica validation skipped; trying again shortly");
                wait = RETRY_AFTER_SKIP.min(v.interval);
            }
            Err(why) => {
                error!(db = %db, replica = %v.name, error = %why, "replica validation failed");
                v.handle.record_validation(v.replica, Err(why));
            }
        }
    }
}

/// One validation: the position compared, a reason it was skipped, or what differed.
async fn validate_once(v: &Validation) -> Result<Result<Pos, Skipped>, String> {
    let Some(end) = caught_up(v).await else { return Ok(Err(Skipped::NotCaughtUp)) };
    let temp = tempfile::Builder::new()
        .prefix("walstream-validate-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory to restore into: {e}"))?;
    let restored = temp.path().join("replica.db");
    let options = RestoreOptions {
        target: Target { generation: Some(end.generation), ..Target::default() },
        integrity_check: IntegrityCheck::Quick,
        parallelism: 4,
        age: v.age.clone(),
        ..RestoreOptions::new(&restored)
    };
    // On a blocking thread of its own: the restore future is not `Send` for every lifetime
    // `tokio::spawn` asks of this task's, and it is a long, mostly waiting job anyway.
    let store = v.store.clone();
    let runtime = tokio::runtime::Handle::current();
    let restoring = tokio::task::spawn_blocking(move || {
        runtime.block_on(async { walstream_restore::restore(store.as_ref(), &options).await.map(|_| ()) })
    });
    restoring.await.map_err(|e| e.to_string())?.map_err(|e| format!("restoring it failed: {e}"))?;
    let replica = digest_blocking(restored.clone(), false).await.map_err(|e| format!("reading its restore: {e}"))?;
    let source = digest_blocking(v.handle.db_path().to_path_buf(), true)
        .await
        .map_err(|e| format!("reading the database: {e}"))?;
    // A pass now copies any commit made since `end`; if there was one, the two reads may have
    // seen different positions.
    if v.handle.sync(CATCH_UP_WAIT).await.is_err() || v.handle.shadow_end() != Some(end) {
        return Ok(Err(Skipped::Changed));
    }
    match first_difference(&source, &replica) {
        None => Ok(Ok(end)),
        Some(what) => Err(format!("its restore at {end} differs from the database: {what}")),
    }
}

/// The published end once the replica holds it, waiting up to [`CATCH_UP_WAIT`].
async fn caught_up(v: &Validation) -> Option<Pos> {
    let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
    loop {
        let end = v.handle.shadow_end()?;
        if v.handle.replica_position(v.replica) == Some(end) {
            return Some(end);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One table's (or the schema's) row count and hash.
#[derive(Debug, PartialEq, Eq)]
struct Digest {
    name: String,
    rows: u64,
    hash: u64,
}

async fn digest_blocking(path: PathBuf, live: bool) -> Result<Vec<Digest>, String> {
    tokio::task::spawn_blocking(move || digest(&path, live).map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())?
}

/// The schema and every table's rows, read in one transaction. The live database is opened
/// read-only, so closing this connection never checkpoints it.
fn digest(path: &Path, live: bool) -> rusqlite::Result<Vec<Digest>> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)?;
    if live {
        conn.busy_timeout(Duration::from_secs(5))?;
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
    let mut schema: Vec<(String, String, String)> = tx
        .prepare("SELECT type, name, coalesce(sql, '') FROM sqlite_schema ORDER BY type, name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    schema.sort();
    let mut digests = vec![Digest {
        name: "the schema".into(),
        rows: schema.len() as u64,
        hash: hash_rows(schema.iter().map(|(t, n, s)| format!("{t}\0{n}\0{s}"))),
    }];
    for (kind, name, sql) in &schema {
        // A virtual table's rows live in its shadow tables, which are hashed as tables.
        if kind != "table" || sql.to_ascii_uppercase().starts_with("CREATE VIRTUAL") {
            continue;
        }
        let mut stmt = tx.prepare(&format!("SELECT * FROM \"{}\"", name.replace('"', "\"\"")))?;
        let columns = stmt.column_count();
        let mut rows = stmt.query([])?;
        let (mut count, mut hasher) = (0u64, std::hash::DefaultHasher::new());
        while let Some(row) = rows.next()? {
            count += 1;
            for i in 0..columns {
                hash_value(&mut hasher, row.get_ref(i)?);
            }
        }
        digests.push(Digest { name: format!("table {name}"), rows: count, hash: hasher.finish() });
    }
    drop(tx);
    Ok(digests)
}

fn hash_rows(rows: impl Iterator<Item = String>) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    for row in rows {
        hasher.write(row.as_bytes());
        hasher.write_u8(0xff);
    }
    hasher.finish()
}

/// Hashes a value with its type, so 1 and '1' differ.
fn hash_value(hasher: &mut impl Hasher, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => hasher.write_u8(0),
        ValueRef::Integer(i) => {
            hasher.write_u8(1);
            hasher.write_i64(i);
        }
        ValueRef::Real(f) => {
            hasher.write_u8(2);
            hasher.write_u64(f.to_bits());
        }
        ValueRef::Text(t) => {
            hasher.write_u8(3);
            hasher.write_usize(t.len());
            hasher.write(t);
        }
        ValueRef::Blob(b) => {
            hasher.write_u8(4);
            hasher.write_usize(b.len());
            hasher.write(b);
        }
    }
}

/// What differs first between the database's digests and the replica's, in words.
fn first_difference(source: &[Digest], replica: &[Digest]) -> Option<String> {
    for s in source {
        match replica.iter().find(|r| r.name == s.name) {
            None => return Some(format!("{} is missing from the replica", s.name)),
            Some(r) if r.rows != s.rows => {
                return Some(format!(
                    "{} has {} rows in the replica against {} in the database",
                    s.name, r.rows, s.rows
                ))
            }
            Some(r) if r.hash != s.hash => {
                return Some(format!("{} has the same {} rows but different contents", s.name, s.rows))
            }
            Some(_) => {}
        }
    }
    replica
        .iter()
        .find(|r| !source.iter().any(|s| s.name == r.name))
        .map(|r| format!("{} is in the replica but not in the database", r.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(dir: &Path, name: &str, sql: &str) -> PathBuf {
        let path = dir.join(name);
        Connection::open(&path).unwrap().execute_batch(sql).unwrap();
        path
    }

    #[test]
    fn equal_content_is_equal_whatever_the_pages_and_a_difference_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = db(
            dir.path(),
            "a.db",
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v); INSERT INTO t (v) VALUES (1), ('x'), (NULL);",
        );
        // The same rows, written with a deletion in between and vacuumed: other pages.
        let b = db(dir.path(), "b.db", "PRAGMA page_size = 8192; CREATE TABLE t (id INTEGER PRIMARY KEY, v); INSERT INTO t (v) VALUES (1), ('x'), (NULL), (4); DELETE FROM t WHERE id = 4; VACUUM;");
        assert_eq!(first_difference(&digest(&a, true).unwrap(), &digest(&b, false).unwrap()), None);

        let c = db(
            dir.path(),
            "c.db",
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v); INSERT INTO t (v) VALUES ('1'), ('x'), (NULL);",
        );
        assert_eq!(
            first_difference(&digest(&a, true).unwrap(), &digest(&c, false).unwrap()).as_deref(),
            Some("table t has the same 3 rows but different contents")
        );
        let d =
            db(dir.path(), "d.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v); INSERT INTO t (v) VALUES (1), ('x');");
        assert_eq!(
            first_difference(&digest(&a, true).unwrap(), &digest(&d, false).unwrap()).as_deref(),
            Some("table t has 2 rows in the replica against 3 in the database")
        );
        let e = db(dir.path(), "e.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, v); INSERT INTO t (v) VALUES (1), ('x'), (NULL); CREATE TABLE u (x);");
        assert!(first_difference(&digest(&a, true).unwrap(), &digest(&e, false).unwrap())
            .unwrap()
            .starts_with("the schema"));
    }
}
