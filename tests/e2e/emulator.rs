//! fake-gcs-server, the GCS emulator the gcs:// tests run against: one per test run when
//! `scripts/test.sh` starts it (it exports `WALSTREAM_TEST_GCS_HOST`), else one per test process.
//! Each test gets a fresh bucket. Requests here are plain HTTP/1.0, so no HTTP client library is
//! needed and responses are never chunked.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::harness::wait_until;

/// The emulator binary that `scripts/install-tools.sh` links from the project's venv.
pub fn fake_gcs_bin() -> PathBuf {
    crate::harness::installed_tool("fake-gcs-server")
}

/// `host:port` of the running emulator, starting one if the run has none.
pub fn host() -> &'static str {
    HOST.get_or_init(|| match std::env::var("WALSTREAM_TEST_GCS_HOST") {
        Ok(host) if !host.is_empty() => host,
        _ => start(free_port()),
    })
}

/// The emulator's host if some test of this process started using it: commands get
/// `STORAGE_EMULATOR_HOST` only then, so file:// tests never depend on it.
pub fn host_if_started() -> Option<&'static str> {
    HOST.get().map(String::as_str)
}

static HOST: OnceLock<String> = OnceLock::new();

/// Starts an emulator on `port` owned by this process: a thread that never ends holds the child,
/// and the child gets SIGKILL when that thread's process dies.
pub fn start(port: u16) -> String {
    let host = format!("127.0.0.1:{port}");
    let mut command = Command::new(fake_gcs_bin());
    command.args(emulator_args(port));
    crate::harness::spawn_for_life(command, "fake-gcs-server");
    wait_until(Duration::from_secs(20), "fake-gcs-server to answer", || {
        request_on(&host, "GET", "/storage/v1/b", None).is_ok()
    });
    host
}

/// The command line `scripts/test.sh` uses too.
pub fn emulator_args(port: u16) -> Vec<String> {
    let host = format!("127.0.0.1:{port}");
    [
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        &port.to_string(),
        "-public-host",
        &host,
        "-external-url",
        &format!("http://{host}"),
        "-backend",
        "memory",
        "-log-level",
        "error",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A bucket no other test uses.
pub fn fresh_bucket() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "t{}-{}-{:06x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>() & 0xff_ffff
    );
    create_bucket_on(host(), &name);
    name
}

pub fn create_bucket_on(host: &str, name: &str) {
    let (status, body) = request_on(host, "POST", "/storage/v1/b", Some(&format!("{{\"name\":\"{name}\"}}")))
        .expect("creating a bucket");
    assert_eq!(status, 200, "creating bucket {name}: {body}");
}

/// True if a listing of `prefix` in pages of 1,000 has a second page.
pub fn first_page_has_next(bucket: &str, prefix: &str) -> bool {
    let (status, body) =
        request("GET", &format!("/storage/v1/b/{bucket}/o?prefix={}&maxResults=1000", escape(prefix)), None)
            .expect("listing objects");
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    page["nextPageToken"].as_str().is_some_and(|t| !t.is_empty())
}

/// Every object name under `prefix` in `bucket`, following pages.
pub fn list(bucket: &str, prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let path =
            format!("/storage/v1/b/{bucket}/o?prefix={}&maxResults=1000&pageToken={}", escape(prefix), escape(&token));
        let (status, body) = request("GET", &path, None).expect("listing objects");
        assert_eq!(status, 200, "listing {bucket}/{prefix}: {body}");
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        names.extend(page["items"].as_array().into_iter().flatten().map(|o| o["name"].as_str().unwrap().to_string()));
        match page["nextPageToken"].as_str() {
            Some(next) if !next.is_empty() => token = next.to_string(),
            _ => return names,
        }
    }
}

/// Overwrites one object (to corrupt a replica on purpose).
pub fn put(bucket: &str, name: &str, body: &[u8]) {
    let path = format!("/upload/storage/v1/b/{bucket}/o?uploadType=media&name={}", escape(name));
    let (status, text) = request_bytes(host(), "POST", &path, Some(body)).expect("uploading an object");
    assert_eq!(status, 200, "uploading {name}: {text}");
}

/// Downloads one object.
pub fn get(bucket: &str, name: &str) -> Vec<u8> {
    let path = format!("/storage/v1/b/{bucket}/o/{}?alt=media", escape(name));
    let (status, body) = raw_request(host(), "GET", &path, None).expect("downloading an object");
    assert_eq!(status, 200, "downloading {name}");
    body
}

fn request(method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    request_on(host(), method, path, body)
}

pub(crate) fn request_on(host: &str, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    request_bytes(host, method, path, body.map(str::as_bytes))
}

fn request_bytes(host: &str, method: &str, path: &str, body: Option<&[u8]>) -> std::io::Result<(u16, String)> {
    let (status, body) = raw_request(host, method, path, body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn raw_request(host: &str, method: &str, path: &str, body: Option<&[u8]>) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
    Ok((status, response[split + 4..].to_vec()))
}

fn escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
