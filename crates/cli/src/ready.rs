//! `restore -serve-ready ADDR`: after a successful restore, answer on ADDR until SIGTERM, so a
//! container that depends on this one (Cloud Run's `container-dependencies` with a startup
//! probe) starts only once the database is in place, and no `nc -lkp` is needed to keep the
//! restore container alive.

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::info;

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nConnection: close\r\n\r\nready\n";

/// Listens on `addr` until `shutdown` is cancelled. Every connection is accepted (a TCP probe)
/// and answered with HTTP 200 (an HTTP probe, on any path).
pub(crate) async fn serve(addr: &str, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("-serve-ready: cannot listen on {addr:?}; give a free host:port such as 0.0.0.0:8081")
    })?;
    info!(addr = %listener.local_addr().map_or(addr.to_string(), |a| a.to_string()), "database ready; answering readiness probes until SIGTERM");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(answer(stream));
                }
            }
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

async fn answer(mut stream: TcpStream) {
    // A TCP probe sends nothing and an HTTP probe sends a request head: wait briefly for one,
    // then answer either way.
    let mut request = [0u8; 2048];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut request)).await;
    let _ = stream.write_all(RESPONSE).await;
    let _ = stream.shutdown().await;
}
