//! `walstream sync`: the durability barrier from a shell or a deploy hook. It asks the running
//! `walstream replicate` on its `addr` (`POST /sync`), which owns the replicas' positions.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::args::SyncArgs;
use crate::config;

/// The replicator answered, but not every replica confirmed in time.
#[derive(Debug)]
pub(crate) struct NotConfirmed(pub(crate) String);

impl std::fmt::Display for NotConfirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotConfirmed {}

pub(crate) async fn sync(args: SyncArgs) -> anyhow::Result<()> {
    let addr = match args.addr.clone() {
        Some(addr) => addr,
        None => {
            let path = args.config.config.clone().unwrap_or_else(config::default_path);
            let file = config::load(&path, !args.config.no_expand_env)?;
            file.addr.ok_or_else(|| {
                config::ConfigError(format!(
                    "config file {}: no addr; set addr there or give -addr HOST:PORT",
                    path.display()
                ))
            })?
        }
    };
    // `:9090` and `0.0.0.0:9090` listen everywhere; ask this machine.
    let connect_to = match addr.rsplit_once(':') {
        Some(("" | "0.0.0.0" | "[::]", port)) => format!("127.0.0.1:{port}"),
        _ => addr.clone(),
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("timeout", &format!("{}ms", args.timeout.as_millis()));
    if let Some(db) = &args.db_path {
        query.append_pair("db", &std::path::absolute(db).unwrap_or(db.clone()).to_string_lossy());
    }
    let stream = TcpStream::connect(&connect_to).await.with_context(|| {
        format!("cannot reach walstream at {connect_to}: is `walstream replicate` running with addr {addr}?")
    })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("http handshake with walstream")?;
    tokio::spawn(connection);
    let request = Request::post(format!("/sync?{}", query.finish()))
        .header("Host", &connect_to)
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let response = sender.send_request(request).await.with_context(|| format!("POST /sync to {connect_to}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.context("reading walstream's answer")?.to_bytes();
    let body = String::from_utf8_lossy(&body);
    match status {
        StatusCode::OK => {
            print!("{body}");
            Ok(())
        }
        StatusCode::GATEWAY_TIMEOUT | StatusCode::SERVICE_UNAVAILABLE => {
            Err(NotConfirmed(body.trim_end().replace('\n', "; ")).into())
        }
        other => anyhow::bail!("walstream at {connect_to} answered {other}: {}", body.trim_end()),
    }
}
