//! Directory replication, as Litestream 0.5 configures it (`dir`, `pattern`, `recursive`): the
//! SQLite databases in a directory, found when the config is loaded, each replicated under its
//! own replica path (the configured one plus the database's path relative to the directory).

use std::path::{Path, PathBuf};

/// The first 16 bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// The databases under `dir` whose file name matches `pattern`, in subdirectories too when
/// `recursive`, sorted: (absolute path, path relative to `dir` with `/` separators). Files that
/// match but hold no SQLite header (a WAL, a half-written file, anything else) are skipped, and
/// so is walstream's own local state (`.<db>-walstream`).
pub(crate) fn databases(dir: &Path, pattern: &str, recursive: bool) -> std::io::Result<Vec<(PathBuf, String)>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in std::fs::read_dir(&at)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Not followed through symbolic links: a link back up would loop.
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if recursive && !(name.starts_with('.') && name.ends_with("-walstream")) {
                    pending.push(entry.path());
                }
            } else if kind.is_file() && glob_match(pattern, &name) && is_sqlite(&entry.path()) {
                let path = entry.path();
                let relative = path.strip_prefix(dir).expect("found under dir");
                let relative = relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>();
                found.push((path.clone(), relative.join("/")));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The replica URL of one discovered database: `base` with its relative path appended.
pub(crate) fn replica_url(base: &str, relative: &str) -> String {
    format!("{}/{relative}", base.trim_end_matches('/'))
}

fn is_sqlite(path: &Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 16];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header)).is_ok() && &header == SQLITE_HEADER
}

/// Whether `pattern` is well formed for [`glob_match`]: an unclosed `[` or a trailing `\` is not.
pub(crate) fn check_pattern(pattern: &str) -> Result<(), String> {
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.next().is_none() => return Err("ends with an unescaped \\".into()),
            '[' if !chars.by_ref().skip(1).any(|c| c == ']') => return Err("has a [ with no closing ]".into()),
            _ => {}
        }
    }
    Ok(())
}

/// Go's `filepath.Match` on one file name, as Litestream matches `pattern`: `*` any run of
/// characters, `?` one character, `[a-z]` / `[^a-z]` a class, `\` escapes.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    matches_from(&p, &n)
}

fn matches_from(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|skip| matches_from(&p[1..], &n[skip..])),
        Some('?') => !n.is_empty() && matches_from(&p[1..], &n[1..]),
        Some('[') => {
            let Some(close) = p.iter().skip(2).position(|&c| c == ']').map(|i| i + 2) else { return false };
            let Some(&c) = n.first() else { return false };
            let (negated, class) = match p[1] {
                '^' | '!' => (true, &p[2..close]),
                _ => (false, &p[1..close]),
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == '-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negated && matches_from(&p[close + 1..], &n[1..])
        }
        Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && matches_from(&p[2..], &n[1..]),
        Some(&c) => n.first() == Some(&c) && matches_from(&p[1..], &n[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_go_filepath_match_does() {
        for (pattern, name, want) in [
            ("*.db", "tenant1.db", true),
            ("*.db", "tenant1.db-wal", false),
            ("*.db", ".db", true),
            ("tenant-*.db", "tenant-abc.db", true),
            ("tenant-*.db", "other.db", false),
            ("*.sqlite", "a.sqlite3", false),
            ("?.db", "a.db", true),
            ("?.db", "ab.db", false),
            ("[a-c]*.db", "b1.db", true),
            ("[a-c]*.db", "d1.db", false),
            ("[^a-c]*.db", "d1.db", true),
            ("\\*.db", "*.db", true),
            ("\\*.db", "a.db", false),
            ("*", "anything", true),
        ] {
            assert_eq!(glob_match(pattern, name), want, "{pattern} on {name}");
        }
        assert!(check_pattern("*.db").is_ok());
        assert!(check_pattern("[a-*.db").is_err());
        assert!(check_pattern("a\\").is_err());
    }

    /// Databases in the directory and below it are found, with their relative paths; a file of
    /// the pattern that is not SQLite, a non-matching database and walstream's own state are not.
    #[test]
    fn finds_the_databases_of_the_pattern_recursively() {
        let dir = tempfile::tempdir().unwrap();
        let db = |rel: &str| {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            rusqlite::Connection::open(&path).unwrap().execute_batch("CREATE TABLE t (x)").unwrap();
        };
        db("a.db");
        db("team/b.db");
        db("team/deeper/c.db");
        db("other.sqlite");
        std::fs::write(dir.path().join("fake.db"), b"not a database at all").unwrap();
        std::fs::create_dir_all(dir.path().join(".a.db-walstream")).unwrap();
        std::fs::copy(dir.path().join("a.db"), dir.path().join(".a.db-walstream/copy.db")).unwrap();
        let relative = |found: Vec<(PathBuf, String)>| found.into_iter().map(|(_, rel)| rel).collect::<Vec<_>>();
        assert_eq!(relative(databases(dir.path(), "*.db", true).unwrap()), ["a.db", "team/b.db", "team/deeper/c.db"]);
        assert_eq!(relative(databases(dir.path(), "*.db", false).unwrap()), ["a.db"]);
        assert_eq!(replica_url("gcs://bucket/tenants/", "team/b.db"), "gcs://bucket/tenants/team/b.db");
    }
}
