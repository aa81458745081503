//! Replica URLs, parsed as Litestream v0.3.13 parses them (spec §7.2). The CLI is the only place
//! that chooses a store backend.

use std::path::{Component, Path, PathBuf};

use walstream_store::{FileStore, GcsStore, ObjectStore, RetryPolicy, S3Settings, S3Store};

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
    open_with(url, &S3Settings::default())
}

/// Opens the store a URL names, an `s3://` one with the config's S3 keys, which win over what
/// the URL's host implies (as in Litestream).
pub(crate) fn open_with(url: &str, s3: &S3Settings) -> Result<Box<dyn ObjectStore>, UrlError> {
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
        "s3" => {
            let (host, path) = s3_location(rest).ok_or_else(|| err("s3:// needs a bucket, e.g. s3://my-bucket/db"))?;
            let implied = parse_s3_host(host);
            let settings = S3Settings {
                region: s3.region.clone().or(implied.region),
                endpoint: s3.endpoint.clone().or(implied.endpoint),
                // Litestream: an explicit endpoint implies path style, and so does a host that
                // names a provider's endpoint.
                force_path_style: Some(
                    s3.force_path_style.unwrap_or(s3.endpoint.is_some()) || implied.force_path_style,
                ),
                ..s3.clone()
            };
            Ok(Box::new(S3Store::new(&implied.bucket, &path, &settings)))
        }
        "abs" | "sftp" => Err(err(&format!(
            "{scheme}:// replicas are not supported by walstream; it replicates to gcs://, s3:// and file://"
        ))),
        _ => Err(err(&format!("unknown scheme {scheme:?}; use file://, gcs:// or s3://"))),
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

/// `s3://HOST/PATH`: the host (bucket, perhaps a provider's endpoint and a port) and the path,
/// cleaned as for gcs://.
fn s3_location(rest: &str) -> Option<(&str, String)> {
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return None;
    }
    let cleaned = clean(&Path::new("/").join(path));
    Some((host, cleaned.to_string_lossy().trim_start_matches('/').to_string()))
}

/// What an s3:// URL's host says, as Litestream v0.3.13's `s3.ParseHost` reads it.
#[derive(Debug, PartialEq)]
struct S3Host {
    bucket: String,
    region: Option<String>,
    endpoint: Option<String>,
    force_path_style: bool,
}

fn parse_s3_host(host: &str) -> S3Host {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => (name, Some(port)),
        _ => (host, None),
    };
    // `BUCKET.` before a provider's domain (or nothing before it).
    let bucket_before = |suffix: &str| -> Option<String> {
        if name == suffix {
            return Some(String::new());
        }
        name.strip_suffix(suffix)?.strip_suffix('.').map(str::to_string)
    };
    // `BUCKET.<pre>REGION<post>`, REGION one label.
    let with_region = |pre: &str, post: &str| -> Option<(String, String)> {
        let head = name.strip_suffix(post)?;
        let (before, region) =
            head.rsplit_once(pre).or_else(|| head.strip_prefix(pre.trim_start_matches('.')).map(|r| ("", r)))?;
        if region.is_empty() || region.contains('.') {
            return None;
        }
        Some((before.to_string(), region.to_string()))
    };
    let (bucket, region, endpoint, scheme) = if let Some(bucket) = bucket_before("localhost") {
        (bucket, Some("us-east-1".to_string()), Some("localhost".to_string()), "http")
    } else if let Some((bucket, region)) = with_region(".s3.", ".backblazeb2.com") {
        let endpoint = format!("s3.{region}.backblazeb2.com");
        (bucket, Some(region), Some(endpoint), "https")
    } else if let Some(bucket) = bucket_before("s3.filebase.com") {
        (bucket, None, Some("s3.filebase.com".to_string()), "https")
    } else if let Some((bucket, region)) = with_region(".", ".digitaloceanspaces.com") {
        let endpoint = format!("{region}.digitaloceanspaces.com");
        (bucket, Some(region), Some(endpoint), "https")
    } else if let Some((bucket, region)) = with_region(".s3.", ".scw.cloud") {
        let endpoint = format!("s3.{region}.scw.cloud");
        (bucket, Some(region), Some(endpoint), "https")
    } else if let Some((bucket, region)) = with_region(".", ".linodeobjects.com") {
        let endpoint = format!("{region}.linodeobjects.com");
        (bucket, Some(region), Some(endpoint), "https")
    } else {
        return S3Host { bucket: host.to_string(), region: None, endpoint: None, force_path_style: false };
    };
    let endpoint = endpoint.map(|e| match port {
        Some(port) => format!("{scheme}://{e}:{port}"),
        None => format!("{scheme}://{e}"),
    });
    S3Host { bucket, region, endpoint, force_path_style: true }
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
    fn s3_hosts_map_like_litestreams_parse_host() {
        let host = |bucket: &str, region: Option<&str>, endpoint: Option<&str>, force_path_style| S3Host {
            bucket: bucket.into(),
            region: region.map(Into::into),
            endpoint: endpoint.map(Into::into),
            force_path_style,
        };
        assert_eq!(parse_s3_host("my-bucket"), host("my-bucket", None, None, false));
        assert_eq!(
            parse_s3_host("my-bucket.localhost:9000"),
            host("my-bucket", Some("us-east-1"), Some("http://localhost:9000"), true)
        );
        assert_eq!(
            parse_s3_host("b.s3.us-west-002.backblazeb2.com"),
            host("b", Some("us-west-002"), Some("https://s3.us-west-002.backblazeb2.com"), true)
        );
        assert_eq!(parse_s3_host("b.s3.filebase.com"), host("b", None, Some("https://s3.filebase.com"), true));
        assert_eq!(
            parse_s3_host("b.nyc3.digitaloceanspaces.com"),
            host("b", Some("nyc3"), Some("https://nyc3.digitaloceanspaces.com"), true)
        );
        assert_eq!(
            parse_s3_host("b.s3.fr-par.scw.cloud"),
            host("b", Some("fr-par"), Some("https://s3.fr-par.scw.cloud"), true)
        );
        assert_eq!(
            parse_s3_host("b.us-east-1.linodeobjects.com"),
            host("b", Some("us-east-1"), Some("https://us-east-1.linodeobjects.com"), true)
        );
        assert_eq!(s3_location("b/a/../db/"), Some(("b", "db".to_string())));
        assert_eq!(s3_location(""), None);
    }

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
