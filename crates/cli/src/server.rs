//! The HTTP server on `addr` while replicating: `/metrics`, `/healthz`, `/readyz`, and
//! `POST /sync`, the durability barrier an application calls before it acknowledges a write
//! that must survive the loss of this machine. The last three take `db=PATH` to ask about one
//! database of many.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use walstream_shipper::{Handle, SyncError};

use crate::metrics::{self, Metrics};

/// How long `POST /sync` waits when the request does not say.
pub(crate) const DEFAULT_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

struct Routes {
    metrics: Metrics,
    databases: crate::fleet::Databases,
    health_lag: Duration,
}

/// Listens on `addr` as Litestream does: `:9090` means every interface.
pub(crate) async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let bind_to = if addr.starts_with(':') { format!("0.0.0.0{addr}") } else { addr.to_string() };
    let listener = TcpListener::bind(&bind_to)
        .await
        .with_context(|| format!("addr: cannot listen on {addr:?}; give a free host:port such as :9090"))?;
    let local = listener.local_addr().map_or(addr.to_string(), |a| a.to_string());
    info!(addr = %local, "serving /metrics, /healthz, /readyz and POST /sync");
    Ok(listener)
}

/// Serves until `shutdown` is cancelled. `/healthz` fails while a replica has held back a
/// captured commit for longer than `health_lag`.
pub(crate) async fn serve(
    listener: TcpListener,
    databases: crate::fleet::Databases,
    metrics: Metrics,
    health_lag: Duration,
    shutdown: CancellationToken,
) {
    let routes = Arc::new(Routes { metrics, databases, health_lag });
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let routes = routes.clone();
                async move { Ok::<_, Infallible>(routes.answer(request).await) }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}

impl Routes {
    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let query = request.uri().query().unwrap_or("");
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/metrics") => {
                let text = self.metrics.render();
                Response::builder()
                    .header("Content-Type", metrics::CONTENT_TYPE)
                    .body(Full::new(Bytes::from(text)))
                    .expect("valid response")
            }
            (&Method::GET, "/healthz") => self.healthz(query),
            (&Method::GET, "/readyz") => self.readyz(query),
            (&Method::POST, "/sync") => self.sync(query).await,
            (_, "/metrics" | "/healthz" | "/readyz" | "/sync") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: GET /metrics, /healthz, /readyz; POST /sync\n".into(),
            ),
            _ => text(StatusCode::NOT_FOUND, "not found: GET /metrics, /healthz, /readyz; POST /sync\n".into()),
        }
    }

    /// `GET /healthz[?db=/data/db]`: every database, or the one named, replicating with no
    /// replica held back past the health lag, no full disk and no failed validation.
    fn healthz(&self, query: &str) -> Response<Full<Bytes>> {
        let chosen = match self.parse(query, false) {
            Ok((chosen, _)) => chosen,
            Err((status, body)) => return text(status, body),
        };
        let problems: Vec<String> = chosen.iter().flat_map(|h| h.status().problems(self.health_lag)).collect();
        if problems.is_empty() {
            text(StatusCode::OK, "ok\n".into())
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy:\n{}\n", problems.join("\n")))
        }
    }

    /// `GET /readyz[?db=/data/db]`: every database, or the one named, through its first sync.
    fn readyz(&self, query: &str) -> Response<Full<Bytes>> {
        let chosen = match self.parse(query, false) {
            Ok((chosen, _)) => chosen,
            Err((status, body)) => return text(status, body),
        };
        let waiting: Vec<String> =
            chosen.iter().filter(|h| !h.ready()).map(|h| h.db_path().display().to_string()).collect();
        if waiting.is_empty() {
            text(StatusCode::OK, "ready\n".into())
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: first sync not finished for {}\n", waiting.join(", ")),
            )
        }
    }

    /// `POST /sync?timeout=10s&db=/data/db`: every database (or the one named) in every replica.
    async fn sync(&self, query: &str) -> Response<Full<Bytes>> {
        let (chosen, timeout) = match self.parse(query, true) {
            Ok(parsed) => parsed,
            Err((status, body)) => return text(status, body),
        };
        if chosen.is_empty() {
            return text(StatusCode::NOT_FOUND, "no database is replicated here\n".into());
        }
        let results = futures_util::future::join_all(chosen.iter().map(|h| h.sync(timeout))).await;
        let mut body = String::new();
        let mut status = StatusCode::OK;
        for (handle, result) in chosen.iter().zip(results) {
            match result {
                Ok(()) => body.push_str(&format!("synced {}\n", handle.db_path().display())),
                Err(e) => {
                    status = match e {
                        SyncError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                        SyncError::NotRunning { .. } => StatusCode::SERVICE_UNAVAILABLE,
                    }
                    .max(status);
                    body.push_str(&format!("error: {e}\n"));
                }
            }
        }
        text(status, body)
    }

    /// The databases a query's `db` names (all when it names none) and its `timeout`, which
    /// only `/sync` takes; a bad parameter or a database not replicated here is the response.
    fn parse(&self, query: &str, takes_timeout: bool) -> Result<(Vec<Handle>, Duration), (StatusCode, String)> {
        let mut timeout = DEFAULT_SYNC_TIMEOUT;
        let mut db = None;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "timeout" if takes_timeout => match crate::args::parse_duration(&value) {
                    Ok(t) => timeout = t,
                    Err(e) => return Err((StatusCode::BAD_REQUEST, format!("timeout: {e}\n"))),
                },
                "db" => db = Some(std::path::absolute(&*value).unwrap_or_else(|_| value.to_string().into())),
                _ => {
                    let known = if takes_timeout { "timeout and db" } else { "db" };
                    return Err((StatusCode::BAD_REQUEST, format!("unknown parameter {key:?}: use {known}\n")));
                }
            }
        }
        let mut chosen = self.databases.list();
        chosen.retain(|h| db.as_deref().is_none_or(|db| h.db_path() == db));
        if chosen.is_empty() && db.is_some() {
            return Err((
                StatusCode::NOT_FOUND,
                format!("no database {} is replicated here\n", db.unwrap_or_default().display()),
            ));
        }
        Ok((chosen, timeout))
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}
