//! moto in server mode for the benchmark, behind a small counting proxy: moto's own log has
//! whole-second stamps, and a commit's lag needs milliseconds, so the proxy writes down each
//! request, classified as S3 bills it, at the moment its response has been relayed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context};

use crate::common::{http, wait_for};
use crate::emulator::{Op, Request};

pub struct S3Server {
    moto: Child,
    /// moto's `127.0.0.1:PORT`, for creating buckets without counting them.
    moto_host: String,
    /// The proxy's port: the tools reach the server through `BUCKET.localhost:PORT`.
    pub proxy_port: u16,
    log: Arc<Mutex<Vec<(String, Request)>>>,
}

impl S3Server {
    pub fn start(moto_server: &Path) -> anyhow::Result<S3Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let moto_host = format!("127.0.0.1:{port}");
        let moto = Command::new(moto_server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", moto_server.display()))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let proxy_port = listener.local_addr()?.port();
        let server = S3Server { moto, moto_host, proxy_port, log: Default::default() };
        wait_for(Duration::from_secs(30), || http(&server.moto_host, "GET", "/", "").is_ok())
            .context("moto_server did not start")?;
        let (log, upstream) = (server.log.clone(), server.moto_host.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (log, upstream) = (log.clone(), upstream.clone());
                std::thread::spawn(move || {
                    let _ = relay(client, &upstream, &log);
                });
            }
        });
        Ok(server)
    }

    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        let status = http(&self.moto_host, "PUT", &format!("/{name}"), "")?;
        ensure!(status == 200, "creating bucket {name}: HTTP {status}");
        Ok(())
    }

    /// Every request for objects of `bucket` so far, in the order their responses went back.
    pub fn requests(&self, bucket: &str) -> Vec<Request> {
        self.log.lock().unwrap().iter().filter(|(b, _)| b == bucket).map(|(_, r)| *r).collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.moto.kill();
        let _ = self.moto.wait();
    }
}

/// Relays one client connection's requests, each on a fresh upstream connection that closes
/// after its response, so a response ends at EOF whatever its framing.
fn relay(client: TcpStream, upstream: &str, log: &Mutex<Vec<(String, Request)>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let end = line == b"\r\n";
        head.extend_from_slice(&line);
        if end {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (key, value) = l.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_string())
        })
    };
    let mut body = vec![0u8; header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0)];
    if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        (&client).write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    reader.read_exact(&mut body)?;
    let mut request: String = head
        .split("\r\n")
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            !l.is_empty() && !["connection:", "keep-alive:", "expect:"].iter().any(|h| lower.starts_with(h))
        })
        .map(|l| format!("{l}\r\n"))
        .collect();
    request.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(request.as_bytes())?;
    up.write_all(&body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    (&client).write_all(&response)?;
    let conditional = header("if-none-match").is_some() || header("if-match").is_some();
    let mut words = head.split_whitespace();
    if let (Some(method), Some(target)) = (words.next(), words.next()) {
        if let Some((bucket, op)) = classify(method, target, conditional) {
            log.lock().unwrap().push((bucket, Request { at: SystemTime::now(), op }));
        }
    }
    // The response said nothing about keeping the connection, so end it.
    let _ = client.shutdown(Shutdown::Write);
    Ok(())
}

/// A path-style S3 request's bucket and billing class: PUT, POST and LIST requests are billed
/// alike (the lease's conditional PUTs are told apart), GET and HEAD at the lower rate, DELETE
/// free. A multi-object delete is a POST; it is counted with the deletes. Bucket-level requests
/// other than listings and `GetBucketLocation` are not a replicator's and are not counted.
fn classify(method: &str, target: &str, conditional: bool) -> Option<(String, Op)> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (bucket, key) = path.trim_start_matches('/').split_once('/').unwrap_or((path.trim_start_matches('/'), ""));
    let op = match (method, key.is_empty()) {
        ("PUT", false) if conditional => Op::ConditionalUpload,
        ("PUT", false) => Op::Upload,
        ("POST", true) if query.split('&').any(|p| p == "delete" || p.starts_with("delete=")) => Op::Delete,
        ("POST", false) => Op::Upload,
        ("DELETE", false) => Op::Delete,
        ("GET", true) if query.split('&').any(|p| p == "location" || p.starts_with("location=")) => Op::Get,
        ("GET", true) => Op::List,
        ("GET" | "HEAD", false) => Op::Get,
        _ => return None,
    };
    Some((bucket.to_string(), op))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classified_as_s3_bills_them() {
        let op = |method, target, conditional| classify(method, target, conditional);
        let of = |bucket: &str, op| Some((bucket.to_string(), op));
        assert_eq!(op("PUT", "/ws-a/db/generations/0/wal/x.wal.lz4", false), of("ws-a", Op::Upload));
        assert_eq!(op("PUT", "/ws-a/db/lease?x-id=PutObject", true), of("ws-a", Op::ConditionalUpload));
        assert_eq!(op("PUT", "/ws-a/db/s.lz4?partNumber=1&uploadId=u", false), of("ws-a", Op::Upload));
        assert_eq!(op("POST", "/ws-a/db/s.lz4?uploads", false), of("ws-a", Op::Upload));
        assert_eq!(op("GET", "/ws-a?list-type=2&prefix=db%2F", false), of("ws-a", Op::List));
        assert_eq!(op("GET", "/ws-a/?delimiter=%2F&prefix=db", false), of("ws-a", Op::List));
        assert_eq!(op("GET", "/ws-a?location", false), of("ws-a", Op::Get));
        assert_eq!(op("GET", "/ws-a/db/x", false), of("ws-a", Op::Get));
        assert_eq!(op("HEAD", "/ws-a/db/x", false), of("ws-a", Op::Get));
        assert_eq!(op("POST", "/ws-a?delete", false), of("ws-a", Op::Delete));
        assert_eq!(op("POST", "/ws-a/?delete=", false), of("ws-a", Op::Delete));
        assert_eq!(op("DELETE", "/ws-a/db/x", false), of("ws-a", Op::Delete));
        assert_eq!(op("PUT", "/ws-a", false), None, "creating the bucket");
    }
}
