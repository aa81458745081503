//! Which keys a config file may have, level by level. Litestream's YAML parser ignores unknown
//! keys, so a misspelt `retension: 1h` there runs with the default retention unnoticed
//! (Litestream #1403); here an unknown key is an error naming the nearest valid one, and a key
//! Litestream v0.3.13 knows but walstream has no use for is accepted with a warning saying why.

use serde_yaml_ng::Value;

/// A key walstream accepts for compatibility and does nothing with, and why.
type Ignored = (&'static str, &'static str);

const NO_CHECKPOINTS: &str = "walstream never checkpoints; the application's SQLite (its autocheckpoint) does";

const TOP: &[&str] = &[
    "dbs",
    "exec",
    "addr",
    "logging",
    "health-lag",
    "metrics-db-limit",
    "heartbeat-url",
    "heartbeat-interval",
    "idle-release",
    "access-key-id",
    "secret-access-key",
];
const LOGGING: &[&str] = &["type", "level", "stderr"];
const DB: &[&str] = &["path", "meta-path", "replicas", "replica", "dir", "pattern", "recursive", "watch", "health-lag"];
const DB_IGNORED: &[Ignored] = &[
    ("monitor-interval", "walstream follows the WAL by file events, not on an interval"),
    ("checkpoint-interval", NO_CHECKPOINTS),
    ("min-checkpoint-page-count", NO_CHECKPOINTS),
    ("max-checkpoint-page-count", NO_CHECKPOINTS),
];
const REPLICA: &[&str] = &[
    "type",
    "name",
    "url",
    "path",
    "bucket",
    "sync-interval",
    "snapshot-interval",
    "retention",
    "retention-check-interval",
    "validation-interval",
    "age",
    // S3's; on another type of replica they are warned about when the replica is read.
    "access-key-id",
    "secret-access-key",
    "region",
    "endpoint",
    "force-path-style",
    "skip-verify",
];
const AGE: &[&str] = &["identities", "recipients"];
const REPLICA_IGNORED: &[Ignored] = &[
    ("account-name", "only Azure Blob Storage replicas use it, and walstream replicates to file, gcs and s3"),
    ("account-key", "only Azure Blob Storage replicas use it, and walstream replicates to file, gcs and s3"),
    ("host", "only SFTP replicas use it, and walstream replicates to file, gcs and s3"),
    ("user", "only SFTP replicas use it, and walstream replicates to file, gcs and s3"),
    ("password", "only SFTP replicas use it, and walstream replicates to file, gcs and s3"),
    ("key-path", "only SFTP replicas use it, and walstream replicates to file, gcs and s3"),
];

/// Checks every key of the file; returns the warnings for keys accepted and ignored.
pub(crate) fn check(root: &Value) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    let Some(top) = root.as_mapping() else {
        return Ok(warnings);
    };
    level(top, "", TOP, &[], &mut warnings)?;
    if let Some(logging) = top.get("logging").and_then(Value::as_mapping) {
        level(logging, "logging.", LOGGING, &[], &mut warnings)?;
    }
    let dbs = top.get("dbs").and_then(Value::as_sequence).map_or(&[][..], Vec::as_slice);
    for (i, db) in dbs.iter().enumerate() {
        let Some(db) = db.as_mapping() else { continue };
        level(db, &format!("dbs[{i}]."), DB, DB_IGNORED, &mut warnings)?;
        let replicas = db.get("replicas").and_then(Value::as_sequence).map_or(&[][..], Vec::as_slice);
        // Litestream 0.5 also takes one replica as `replica:`.
        let single = db.get("replica").map(|r| (format!("dbs[{i}].replica."), r));
        let listed = replicas.iter().enumerate().map(|(j, r)| (format!("dbs[{i}].replicas[{j}]."), r));
        for (prefix, replica) in single.into_iter().chain(listed) {
            let Some(replica) = replica.as_mapping() else { continue };
            level(replica, &prefix, REPLICA, REPLICA_IGNORED, &mut warnings)?;
            if let Some(age) = replica.get("age").and_then(Value::as_mapping) {
                level(age, &format!("{prefix}age."), AGE, &[], &mut warnings)?;
            }
        }
    }
    Ok(warnings)
}

fn level(
    map: &serde_yaml_ng::Mapping,
    prefix: &str,
    known: &[&str],
    ignored: &[Ignored],
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    for key in map.keys() {
        let Some(key) = key.as_str() else {
            return Err(format!(
                "{prefix}{}: keys must be strings",
                serde_yaml_ng::to_string(key).unwrap_or_default().trim()
            ));
        };
        if known.contains(&key) {
            continue;
        }
        if let Some((_, why)) = ignored.iter().find(|(k, _)| *k == key) {
            warnings.push(format!("{prefix}{key}: ignored: {why}"));
            continue;
        }
        let valid = known.iter().copied().chain(ignored.iter().map(|(k, _)| *k));
        return Err(match nearest(key, valid) {
            Some(near) => format!("{prefix}{key}: unknown key; did you mean {near}?"),
            None => format!("{prefix}{key}: unknown key; valid keys here are {}", known.join(", ")),
        });
    }
    Ok(())
}

/// The valid key closest to `key` in edit distance, if it is close enough to be a typo.
fn nearest<'a>(key: &str, valid: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let (distance, near) = valid.map(|v| (edit_distance(key, v), v)).min()?;
    (distance <= 2.max(key.len() / 3)).then_some(near)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substituted = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_text(text: &str) -> Result<Vec<String>, String> {
        check(&serde_yaml_ng::from_str(text).unwrap())
    }

    #[test]
    fn a_misspelt_key_names_the_nearest_valid_one() {
        let error = check_text("dbs:\n  - path: /a\n    replicas:\n      - url: file:///r\n        retension: 1h\n")
            .unwrap_err();
        assert_eq!(error, "dbs[0].replicas[0].retension: unknown key; did you mean retention?");
        assert_eq!(check_text("adr: :9090\n").unwrap_err(), "adr: unknown key; did you mean addr?");
        assert_eq!(
            check_text("logging:\n  levle: debug\n").unwrap_err(),
            "logging.levle: unknown key; did you mean level?"
        );
        assert_eq!(
            check_text("dbs:\n  - path: /a\n    meta_path: /m\n").unwrap_err(),
            "dbs[0].meta_path: unknown key; did you mean meta-path?"
        );
        let far = check_text("frobnicate: 1\n").unwrap_err();
        assert!(far.starts_with("frobnicate: unknown key; valid keys here are dbs, exec"), "{far}");
    }

    #[test]
    fn a_misspelt_age_key_names_the_right_one() {
        let error = check_text(
            "dbs:\n  - path: /a\n    replicas:\n      - url: file:///r\n        age:\n          recipient: [age1xyz]\n",
        )
        .unwrap_err();
        assert_eq!(error, "dbs[0].replicas[0].age.recipient: unknown key; did you mean recipients?");
    }

    #[test]
    fn litestream_keys_walstream_has_no_use_for_are_accepted_with_a_reason() {
        let warnings = check_text("access-key-id: x\ndbs:\n  - path: /a\n    checkpoint-interval: 1m\n    replicas:\n      - url: file:///r\n        validation-interval: 6h\n").unwrap();
        // The S3 keys are known; whether a replica uses them is said when it is read (config.rs).
        assert_eq!(warnings.len(), 1, "validation-interval is honoured, so not warned about: {warnings:?}");
        assert!(
            warnings[0].starts_with("dbs[0].checkpoint-interval: ignored: walstream never checkpoints"),
            "{warnings:?}"
        );
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("retension", "retention"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("sync-intervl", "sync-interval"), 1);
    }
}
