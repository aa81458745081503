//! fake-gcs-server for the benchmark, started as the tests start it but with its request log on:
//! the requests each tool makes are counted from that log, not from the tools' own metrics.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::common::{http, wait_for};

/// A GCS JSON API operation, as billed: uploads and listings are Class A, reads Class B.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// An upload request (a simple, multipart or resumable upload, or one chunk of it).
    Upload,
    /// An upload on a generation precondition (`ifGenerationMatch`): walstream's replica lease,
    /// which litestream has no counterpart of.
    ConditionalUpload,
    Get,
    List,
    Delete,
}

/// One request the emulator answered, and when its log line was written (after the response).
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub at: SystemTime,
    pub op: Op,
}

pub struct Emulator {
    child: Child,
    /// `127.0.0.1:PORT`, for `STORAGE_EMULATOR_HOST`.
    pub host: String,
    log: PathBuf,
}

impl Emulator {
    pub fn start(binary: &Path, dir: &Path) -> anyhow::Result<Emulator> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let host = format!("127.0.0.1:{port}");
        let log = dir.join("fake-gcs-server.log");
        let file = File::create(&log)?;
        let child = Command::new(binary)
            .args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port.to_string(), "-public-host", &host])
            .args(["-external-url", &format!("http://{host}"), "-backend", "memory", "-log-level", "info"])
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let emulator = Emulator { child, host, log };
        wait_for(Duration::from_secs(20), || http(&emulator.host, "GET", "/storage/v1/b", "").is_ok())
            .context("fake-gcs-server did not start")?;
        Ok(emulator)
    }

    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        let status = http(&self.host, "POST", "/storage/v1/b", &format!("{{\"name\":\"{name}\"}}"))?;
        ensure!(status == 200, "creating bucket {name}: HTTP {status}");
        Ok(())
    }

    /// Every request for objects of `bucket` so far, in log order.
    pub fn requests(&self, bucket: &str) -> anyhow::Result<Vec<Request>> {
        let log = std::fs::read_to_string(&self.log)?;
        Ok(log.lines().filter_map(|line| parse_line(line, bucket)).collect())
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `time=2026-11-23T06:27:34.616Z level=INFO msg="127.0.0.1 - - [...] \"POST /upload/storage/v1/b/B/o?... HTTP/1.1\" 200 739\n"`
fn parse_line(line: &str, bucket: &str) -> Option<Request> {
    let time = line.strip_prefix("time=")?.split_whitespace().next()?;
    let at = SystemTime::from(OffsetDateTime::parse(time, &Rfc3339).ok()?);
    let request = &line[line.find("\\\"")? + 2..];
    let mut words = request.split_whitespace();
    let (method, target) = (words.next()?, words.next()?);
    let path = target.split('?').next()?;
    let objects = format!("/b/{bucket}/o");
    let at_objects = path.find(&objects)?;
    let rest = &path[at_objects + objects.len()..];
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let op = match method {
        "POST" | "PUT" if path.starts_with("/upload/") && target.contains("ifGenerationMatch=") => {
            Op::ConditionalUpload
        }
        "POST" | "PUT" if path.starts_with("/upload/") => Op::Upload,
        "DELETE" => Op::Delete,
        "GET" if rest.is_empty() => Op::List,
        "GET" => Op::Get,
        _ => return None,
    };
    Some(Request { at, op })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_counted_per_bucket_and_operation() {
        let line = |request: &str| {
            format!("time=2026-11-23T06:27:34.616Z level=INFO msg=\"127.0.0.1 - - [23/Nov/2026:06:27:34 +0000] \\\"{request} HTTP/1.1\\\" 200 739\\n\"")
        };
        let op = |request: &str| parse_line(&line(request), "ws-a").map(|r| r.op);
        assert_eq!(op("POST /upload/storage/v1/b/ws-a/o?uploadType=media&name=x%2Fy"), Some(Op::Upload));
        assert_eq!(op("PUT /upload/storage/v1/b/ws-a/o?uploadType=resumable&upload_id=1"), Some(Op::Upload));
        assert_eq!(
            op("POST /upload/storage/v1/b/ws-a/o?uploadType=multipart&ifGenerationMatch=0"),
            Some(Op::ConditionalUpload)
        );
        assert_eq!(op("GET /storage/v1/b/ws-a/o?prefix=db%2F"), Some(Op::List));
        assert_eq!(op("GET /storage/v1/b/ws-a/o/db%2Fx?alt=media"), Some(Op::Get));
        assert_eq!(op("GET /download/storage/v1/b/ws-a/o/db%2Fx?alt=media"), Some(Op::Get));
        assert_eq!(op("DELETE /storage/v1/b/ws-a/o/db%2Fx"), Some(Op::Delete));
        assert_eq!(op("GET /storage/v1/b/ws-ab/o"), None, "another bucket");
        assert_eq!(op("POST /storage/v1/b"), None);
        let at = parse_line(&line("GET /storage/v1/b/ws-a/o"), "ws-a").unwrap().at;
        assert_eq!(at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() % 1000, 616);
    }
}
