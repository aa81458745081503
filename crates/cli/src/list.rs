//! `generations`, `snapshots`, `wal` and `databases`: replicas and config in Litestream's columns
//! (spec §7.1), so scripts written against `litestream` keep working.

use std::path::Path;
use std::time::{Duration, SystemTime};

use walstream_restore::{rfc3339, ReplicaListing};

use crate::config::Config;
use crate::go_duration;

/// Which listing.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    /// `name generation lag start end`.
    Generations,
    /// `replica generation index size created`.
    Snapshots,
    /// `replica generation index offset size created`.
    Wal,
}

/// The listing of every replica in one table. `lag` is measured back from `now`.
pub(crate) fn table(kind: Kind, replicas: &[(String, ReplicaListing)], now: SystemTime) -> String {
    let header: &[&str] = match kind {
        Kind::Generations => &["name", "generation", "lag", "start", "end"],
        Kind::Snapshots => &["replica", "generation", "index", "size", "created"],
        Kind::Wal => &["replica", "generation", "index", "offset", "size", "created"],
    };
    let mut rows = vec![row(header)];
    for (replica, listing) in replicas {
        for (id, generation) in &listing.generations {
            match kind {
                Kind::Generations => {
                    let (Some(start), Some(end)) = (generation.created(), generation.updated()) else { continue };
                    let lag = now.duration_since(end).unwrap_or(Duration::ZERO);
                    rows.push(vec![
                        replica.clone(),
                        id.to_string(),
                        go_duration::format(truncate(lag)),
                        rfc3339(start),
                        rfc3339(end),
                    ]);
                }
                Kind::Snapshots => {
                    for (index, object) in &generation.snapshots {
                        rows.push(vec![
                            replica.clone(),
                            id.to_string(),
                            index.to_string(),
                            object.size.to_string(),
                            rfc3339(object.created),
                        ]);
                    }
                }
                Kind::Wal => {
                    for (index, offset, object) in &generation.segments {
                        rows.push(vec![
                            replica.clone(),
                            id.to_string(),
                            index.to_string(),
                            offset.to_string(),
                            object.size.to_string(),
                            rfc3339(object.created),
                        ]);
                    }
                }
            }
        }
    }
    table_text(&rows)
}

/// `path replicas`: every database of the config, its replica names joined with `,`.
pub(crate) fn databases(config: &Config) -> String {
    let mut rows = vec![row(&["path", "replicas"])];
    for db in &config.dbs {
        rows.push(vec![
            db.path.display().to_string(),
            db.replicas.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(","),
        ]);
    }
    table_text(&rows)
}

/// When the database last changed: the later of its own and its WAL's modification times.
pub(crate) fn last_change(db: &Path) -> Option<SystemTime> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    modified(db).max(modified(Path::new(&wal)))
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Go's tabwriter with padding 2: every column but the last padded to its widest cell plus two.
fn table_text(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        for (c, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if c + 1 < row.len() {
                out.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
            }
        }
        out.push('\n');
    }
    out
}

/// Litestream's `truncateDuration`: coarser precision for longer lags.
fn truncate(d: Duration) -> Duration {
    let unit = if d > Duration::from_secs(10) {
        Duration::from_secs(1)
    } else if d > Duration::from_secs(1) {
        Duration::from_millis(100)
    } else if d > Duration::from_millis(1) {
        Duration::from_millis(1)
    } else {
        Duration::from_micros(1)
    };
    Duration::from_nanos((d.as_nanos() / unit.as_nanos() * unit.as_nanos()) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lags_are_truncated_like_litestream() {
        assert_eq!(go_duration::format(truncate(Duration::from_millis(3_723_456))), "1h2m3s");
        assert_eq!(go_duration::format(truncate(Duration::from_millis(2_345))), "2.3s");
        assert_eq!(go_duration::format(truncate(Duration::from_micros(250_400))), "250ms");
    }

    #[test]
    fn tables_pad_like_tabwriter() {
        let text = table_text(&[row(&["name", "generation"]), row(&["file", "00000000000000aa"])]);
        assert_eq!(text, "name  generation\nfile  00000000000000aa\n");
    }
}
