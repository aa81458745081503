//! Replica URLs, parsed as Litestream v0.3.13 parses them (spec §7.2). The CLI is the only place
//! that chooses a store backend.

use std::path::{Component, Path, PathBuf};

use walstream_store::{FileStore, GcsStore, ObjectStore, RetryPolicy};

/// A replica URL walstream cannot use.
#[derive(Debug)]
pub(crate) struct UrlError {
    pub(crate) url: String,
    pub(crate) reason: String,
}

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid replica URL {:?}: {}", self.url, self.reason)
    }
}

impl std::error::Error for UrlError {}

/// The replica type a URL names (`file`, `gcs`), used as the replica's name as Litestream does.
pub(crate) fn kind(url: &str) -> &str {
    match url.split_once("://").map_or("file", |(scheme, _)| scheme) {
        "gs" => "gcs",
        scheme => scheme,
    }
}

/// Opens the store a URL names.
pub(crate) fn open(url: &str) -> Result<Box<dyn ObjectStore>, UrlError> {
    let err = |reason: &str| UrlError { url: url.to_string(), reason: reason.to_string() };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(err("expected SCHEME://..., e.g. file:///var/lib/backups/db"));
    };
    match scheme {
        "file" => Ok(Box::new(FileStore::new(
            file_path(rest).ok_or_else(|| err("file:// needs a path, e.g. file:///var/lib/backups/db"))?,
        ))),
        // Litestream rejects gs:// with a confusing message (#336); it is the same thing.
        "gcs" | "gs" => {
            let (bucket, path) =
                gcs_location(rest).ok_or_else(|| err("gcs:// needs a bucket, e.g. gcs://my-bucket/db"))?;
            let mut store = GcsStore::new(bucket, path);
            // How long one request may hang before it is abandoned and retried.
            if let Some(value) = std::env::var("WALSTREAM_GCS_TIMEOUT").ok().filter(|v| !v.is_empty()) {
                let timeout =
                    crate::go_duration::parse(&value).map_err(|e| err(&format!("WALSTREAM_GCS_TIMEOUT: {e}")))?;
                store = store.with_retry(RetryPolicy { request_timeout: timeout, ..RetryPolicy::default() });
            }
            Ok(Box::new(store))
        }
        "s3" | "abs" | "sftp" => Err(err(&format!(
            "{scheme}:// replicas are not supported by walstream; it replicates to gcs:// and file://"
        ))),
        _ => Err(err(&format!("unknown scheme {scheme:?}; use file:// (or gcs://)"))),
    }
}

/// `gcs://BUCKET/PATH`: the bucket is the host; the path is `path.Clean`ed with its leading `/`
/// dropped, and `.` (no path) is the bucket's root, as in Litestream.
fn gcs_location(rest: &str) -> Option<(String, String)> {
    let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty()
        || !bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
    {
        return None;
    }
    let cleaned = clean(&Path::new("/").join(path));
    let path = cleaned.to_string_lossy().trim_start_matches('/').to_string();
    Some((bucket.to_string(), path))
}

/// `file:///var/r` is `/var/r`; `file://a/b` is `/a/b` (Go's `path.Clean` of host plus path);
/// `~` is the home directory.
fn file_path(rest: &str) -> Option<PathBuf> {
    if rest.is_empty() {
        return None;
    }
    let path = if let Some(home_relative) = rest.strip_prefix("~/").or(if rest == "~" { Some("") } else { None }) {
        PathBuf::from(std::env::var_os("HOME")?).join(home_relative)
    } else {
        Path::new("/").join(rest)
    };
    Some(clean(&path))
}

fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_map_like_litestream() {
        assert_eq!(file_path("/var/backups/r"), Some(PathBuf::from("/var/backups/r")));
        assert_eq!(file_path("a/b"), Some(PathBuf::from("/a/b")));
        assert_eq!(file_path("/x/./y/../z/"), Some(PathBuf::from("/x/z")));
        assert_eq!(file_path(""), None);
    }

    #[test]
    fn gcs_urls_map_like_litestream() {
        assert_eq!(gcs_location("b"), Some(("b".into(), "".into())));
        assert_eq!(gcs_location("b/"), Some(("b".into(), "".into())));
        assert_eq!(gcs_location("my-bucket/apps/db/"), Some(("my-bucket".into(), "apps/db".into())));
        assert_eq!(gcs_location("b/x/../y/./z"), Some(("b".into(), "y/z".into())));
        assert_eq!(gcs_location(""), None);
        assert_eq!(gcs_location("Upper/x"), None);
        assert_eq!(open("gs://b/db").unwrap().describe(), "gcs://b/db");
        assert_eq!(kind("gs://b/db"), "gcs");
    }

    #[test]
    fn malformed_urls_name_the_fix() {
        for url in ["/just/a/path", "ftp://host/x", "file://", "gcs://", "gs:///path-without-bucket"] {
            let e = open(url).unwrap_err();
            assert!(e.to_string().contains(url), "{e}");
        }
        assert_eq!(kind("file:///x"), "file");
    }
}
