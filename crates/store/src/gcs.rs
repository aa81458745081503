//! `gcs://BUCKET/PATH`: Google Cloud Storage through its JSON API (`gcloud-storage`).
//!
//! The client is made on first use, so a replicator can start while the network or the emulator
//! is still down. Every request has a timeout and is retried with jittered exponential backoff
//! on 408, 429, 5xx and transport errors: uploads and deletes too, since object names are
//! deterministic and re-sending one is harmless.

use std::path::Path;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use gcloud_storage::client::{Client, ClientConfig};
use gcloud_storage::http::objects::delete::DeleteObjectRequest;
use gcloud_storage::http::objects::download::Range;
use gcloud_storage::http::objects::get::GetObjectRequest;
use gcloud_storage::http::objects::list::ListObjectsRequest;
use gcloud_storage::http::objects::upload::{Media, UploadObjectRequest, UploadType};
use gcloud_storage::http::resumable_upload_client::{ChunkSize, UploadStatus};
use gcloud_storage::http::Error as HttpError;
use tokio::sync::OnceCell;
use tracing::debug;

use crate::{read_whole, Body, Error, ObjectMeta, ObjectStore, Operation, OperationCounts, Version};

/// Objects above this size are sent as a resumable upload in chunks of this size, so a large
/// snapshot never has to be in memory at once. A multiple of 256 KiB, as GCS requires.
const CHUNK_BYTES: usize = 8 << 20;
/// GCS's own page size limit; a long-lived replica lists thousands of segments.
const LIST_PAGE_SIZE: i32 = 1000;

/// How hard one request is tried before its error is returned to the caller (who may retry on
/// its own schedule, as the replicator does).
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The backoff before the first retry; it doubles each time, with full jitter.
    pub initial_backoff: Duration,
    /// The backoff never grows beyond this.
    pub max_backoff: Duration,
    /// Each HTTP request fails after this long.
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
        }
    }
}

const CREDENTIALS_FIX: &str = "check the service account and its roles/storage.objectAdmin on the bucket";

fn bucket_fix(bucket: &str) -> String {
    format!("create it (gcloud storage buckets create gs://{bucket}) or fix the replica URL")
}

/// A replica in a GCS bucket, under an optional path prefix.
pub struct GcsStore {
    bucket: String,
    /// Object names are `prefix/key`; empty for the bucket's root.
    prefix: String,
    /// `host:port` (or a URL) of an emulator from `STORAGE_EMULATOR_HOST`.
    emulator: Option<String>,
    retry: RetryPolicy,
    client: OnceCell<Client>,
    operations: OperationCounts,
}

impl std::fmt::Debug for GcsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsStore")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("emulator", &self.emulator)
            .finish()
    }
}

impl GcsStore {
    /// A store for `bucket` with objects under `prefix` (no leading or trailing `/`; empty for
    /// the root). Honours `STORAGE_EMULATOR_HOST` as Google's own clients do.
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> GcsStore {
        let emulator = std::env::var("STORAGE_EMULATOR_HOST").ok().filter(|h| !h.is_empty());
        GcsStore {
            bucket: bucket.into(),
            prefix: prefix.into(),
            emulator,
            retry: RetryPolicy::default(),
            client: OnceCell::new(),
            operations: OperationCounts::default(),
        }
    }

    /// The same store with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> GcsStore {
        self.retry = retry;
        self
    }

    async fn client(&self) -> Result<&Client, Error> {
        self.client.get_or_try_init(|| self.connect()).await
    }

    async fn connect(&self) -> Result<Client, Error> {
        let http = reqwest::Client::builder()
            .timeout(self.retry.request_timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Remote { op: "create HTTP client", target: self.describe(), detail: e.to_string() })?;
        let http = Some(reqwest_middleware::ClientBuilder::new(http).build());
        let config = match &self.emulator {
            Some(host) => {
                let endpoint = if host.contains("://") {
                    host.trim_end_matches('/').to_string()
                } else {
                    format!("http://{host}")
                };
                ClientConfig { http, storage_endpoint: endpoint, ..ClientConfig::default() }.anonymous()
            }
            None => ClientConfig { http, ..ClientConfig::default() }.with_auth().await.map_err(|e| match e {
                // The metadata server or token endpoint did not answer: try again later.
                gcloud_storage::client::google_cloud_auth::error::Error::HttpError(e) => Error::Remote {
                    op: "fetch credentials",
                    target: credential_source(),
                    detail: one_line(&error_chain(&e)),
                },
                e => Error::Credentials {
                    source_name: credential_source(),
                    detail: one_line(&e.to_string()),
                    fix: CREDENTIALS_FIX,
                },
            })?,
        };
        Ok(Client::new(config))
    }

    fn object_name(&self, key: &str) -> Result<String, Error> {
        if key.is_empty() || key.starts_with('/') || key.split('/').any(|part| part == "..") {
            return Err(Error::InvalidKey { key: key.to_string() });
        }
        Ok(if self.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.prefix) })
    }

    /// Runs `attempt` until it succeeds, fails for good, or the policy's attempts are spent.
    async fn retrying<T, F, Fut>(&self, op: &'static str, key: &str, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, HttpError>>,
    {
        let mut backoff = self.retry.initial_backoff;
        let mut tries = 0;
        loop {
            tries += 1;
            // Credentials are (re)tried with the request: an unreachable metadata server is as
            // transient as an unreachable bucket.
            let outcome = match self.client().await {
                Ok(client) => {
                    self.operations.request(operation_of(op));
                    attempt(client.clone()).await.map_err(|e| self.classify(op, key, e))
                }
                Err(e) => {
                    let transient = !matches!(e, Error::Credentials { .. });
                    Err(Failure { error: e, transient })
                }
            };
            match outcome {
                Ok(value) => return Ok(value),
                Err(Failure { error, transient }) if transient && tries < self.retry.attempts => {
                    let sleep = backoff.mul_f64(rand::random::<f64>());
                    debug!(op, key, error = %error, attempt = tries, "GCS request failed; retrying in {sleep:?}");
                    tokio::time::sleep(sleep).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
                Err(Failure { error, .. }) => return Err(error),
            }
        }
    }

    fn classify(&self, op: &'static str, key: &str, e: HttpError) -> Failure {
        let remote = |detail: String| Error::Remote { op, target: format!("{}/{key}", self.describe()), detail };
        match e {
            HttpError::Response(r) => self.classify_status(op, key, r.code, &r.message),
            // A status without a JSON error body (an emulator, a proxy) is still a status.
            HttpError::HttpClient(e) if e.status().is_some() => {
                self.classify_status(op, key, e.status().unwrap().as_u16(), &error_chain(&e))
            }
            HttpError::HttpClient(e) => {
                let kind = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "transport error"
                };
                Failure { error: remote(format!("{kind}: {}", one_line(&error_chain(&e)))), transient: true }
            }
            HttpError::TokenSource(e) => Failure {
                error: Error::Credentials {
                    source_name: self.credential_source_in_use(),
                    detail: one_line(&e.to_string()),
                    fix: CREDENTIALS_FIX,
                },
                transient: true,
            },
            other => Failure { error: remote(one_line(&other.to_string())), transient: true },
        }
    }

    fn classify_status(&self, op: &'static str, key: &str, code: u16, message: &str) -> Failure {
        let transient = matches!(code, 408 | 429 | 500..=599);
        let error = match code {
            404 if op == "get" => Error::NotFound { key: key.to_string() },
            // GCS says which is missing in the message; an emulator may not, and then a delete
            // takes it for the object (see `delete`).
            404 if op == "delete" && !message.to_ascii_lowercase().contains("bucket") => {
                Error::NotFound { key: key.to_string() }
            }
            412 => Error::PreconditionFailed { key: key.to_string() },
            404 => Error::BucketNotFound { bucket: self.bucket.clone(), fix: bucket_fix(&self.bucket) },
            401 | 403 => Error::Credentials {
                source_name: self.credential_source_in_use(),
                detail: format!("HTTP {code}: {}", one_line(message)),
                fix: CREDENTIALS_FIX,
            },
            _ => Error::Remote {
                op,
                target: format!("{}/{key}", self.describe()),
                detail: format!("HTTP {code}: {}", one_line(message)),
            },
        };
        Failure { error, transient }
    }

    fn credential_source_in_use(&self) -> String {
        match &self.emulator {
            Some(host) => format!("none (STORAGE_EMULATOR_HOST={host})"),
            None => credential_source(),
        }
    }

    fn upload_request(&self, name: &str) -> (UploadObjectRequest, UploadType) {
        let request = UploadObjectRequest { bucket: self.bucket.clone(), ..Default::default() };
        (request, UploadType::Simple(Media::new(name.to_string())))
    }

    /// One resumable upload of the whole body, `CHUNK_BYTES` a request, each chunk streamed as
    /// it is read (`chunk_pieces`). The length comes from the opened body (for a file, the open file, not
    /// the path: a snapshot replaced by a newer one under the same name while this runs must not
    /// be uploaded as a mix of the two).
    ///
    /// The outer error is the request's, which `retrying` classifies and retries; the inner one
    /// is local (reading the source), which no retry of the request can fix and which keeps its
    /// category: a full or failing local disk is not the store's fault.
    async fn upload_in_chunks(
        &self,
        client: Client,
        name: &str,
        body: &dyn Body,
    ) -> Result<Result<(), Error>, HttpError> {
        let io = |op: &'static str| move |source: std::io::Error| Error::Io { op, path: body.source(), source };
        let (len, reader) = match body.open() {
            Ok(opened) => opened,
            Err(e) => return Ok(Err(io("open")(e))),
        };
        if len == 0 {
            return Ok(Err(io("read")(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the source is empty"))));
        }
        let (request, upload_type) = self.upload_request(name);
        let session = client.prepare_resumable_upload(&request, &upload_type).await?;
        let reader = std::sync::Arc::new(std::sync::Mutex::new(reader));
        let mut sent = 0u64;
        loop {
            let want = (len - sent).min(CHUNK_BYTES as u64);
            let failed_read = std::sync::Arc::new(std::sync::Mutex::new(None));
            let chunk = reqwest::Body::wrap_stream(chunk_pieces(reader.clone(), want, failed_read.clone()));
            let range = ChunkSize::new(sent, sent + want - 1, Some(len));
            let status = session.upload_multiple_chunk(chunk, &range).await;
            if let Some(e) = failed_read.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Ok(Err(io("read")(e)));
            }
            match status? {
                UploadStatus::Ok(_) => return Ok(Ok(())),
                UploadStatus::ResumeIncomplete(_) | UploadStatus::NotStarted => sent += want,
            }
            if sent >= len {
                return Err(HttpError::HttpMiddleware(anyhow::anyhow!(
                    "the resumable upload sent every byte but was not finalized"
                )));
            }
        }
    }
}

/// Bytes of a resumable upload's chunk read at a time: below glibc's `mmap` threshold as
/// `walstream` sets it, so the pieces reuse the heap.
const CHUNK_PIECE_BYTES: u64 = 128 << 10;

/// The next `want` bytes of `reader` as a request body, read on blocking threads a piece at a
/// time as the request sends them: a whole chunk read first was 8 MiB of the replicator's
/// memory for every large snapshot upload. A read error is put in `failed_read` for the caller,
/// which reports it as a local error rather than the request's.
fn chunk_pieces(
    reader: std::sync::Arc<std::sync::Mutex<crate::BodyReader>>,
    want: u64,
    failed_read: std::sync::Arc<std::sync::Mutex<Option<std::io::Error>>>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures_util::stream::unfold(want, move |left| {
        let (reader, failed_read) = (reader.clone(), failed_read.clone());
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(CHUNK_PIECE_BYTES) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let mut piece = vec![0u8; n];
                let mut reader = reader.lock().unwrap_or_else(|e| e.into_inner());
                std::io::Read::read_exact(&mut *reader, &mut piece).map(|()| Bytes::from(piece))
            })
            .await
            .expect("a chunk read panicked");
            match read {
                Ok(piece) => Some((Ok(piece), left - n as u64)),
                Err(e) => {
                    *failed_read.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    Some((Err(std::io::Error::other("the upload's source could not be read")), 0))
                }
            }
        }
    })
}

fn operation_of(op: &str) -> Operation {
    match op {
        "get" => Operation::Get,
        "list" => Operation::List,
        "delete" => Operation::Delete,
        _ => Operation::Put,
    }
}

struct Failure {
    error: Error,
    transient: bool,
}

#[async_trait]
impl ObjectStore for GcsStore {
    async fn put(&self, key: &str, body: Bytes) -> Result<(), Error> {
        let name = self.object_name(key)?;
        self.retrying("put", key, |client| {
            let (request, upload_type) = self.upload_request(&name);
            let body = body.clone();
            async move { client.upload_object(&request, body, &upload_type).await.map(drop) }
        })
        .await?;
        self.operations.bytes(Operation::Put, body.len() as u64);
        Ok(())
    }

    async fn put_body(&self, key: &str, body: &dyn Body) -> Result<(), Error> {
        let (len, reader) = body.open().map_err(|source| Error::Io { op: "open", path: body.source(), source })?;
        if len <= CHUNK_BYTES as u64 {
            return self.put(key, read_whole(body, len, reader).await?).await;
        }
        drop(reader);
        let name = self.object_name(key)?;
        // A failed chunk restarts the whole upload in a new session: simple, and a snapshot is
        // uploaded once per generation.
        self.retrying("put", key, |client| self.upload_in_chunks(client, &name, body)).await??;
        self.operations.bytes(Operation::Put, len);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, Error> {
        let name = self.object_name(key)?;
        let body = self
            .retrying("get", key, |client| {
                let request =
                    GetObjectRequest { bucket: self.bucket.clone(), object: name.clone(), ..Default::default() };
                async move { client.download_object(&request, &Range::default()).await.map(Bytes::from) }
            })
            .await?;
        self.operations.bytes(Operation::Get, body.len() as u64);
        Ok(body)
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, Error> {
        self.get_range_into(key, offset, len, bytes::BytesMut::new()).await
    }

    fn reads_into_buffers(&self) -> bool {
        true
    }

    async fn get_range_into(&self, key: &str, offset: u64, len: u64, buf: bytes::BytesMut) -> Result<Bytes, Error> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let name = self.object_name(key)?;
        // Each attempt fills the buffer afresh; a retry after a failed attempt allocates anew.
        let mut buf = Some(buf);
        let body = self
            .retrying("get", key, |client| {
                let request =
                    GetObjectRequest { bucket: self.bucket.clone(), object: name.clone(), ..Default::default() };
                // The end is inclusive in an HTTP range.
                let range = Range(Some(offset), Some(offset + len - 1));
                let reused = buf.take();
                async move {
                    // Streamed into one buffer of the range's size: the client's whole-object call
                    // copies the body twice more, which a restore's parts in flight would pay for.
                    use futures_util::StreamExt;
                    let mut chunks = std::pin::pin!(client.download_streamed_object(&request, &range).await?);
                    let mut body = reused.unwrap_or_default();
                    body.clear();
                    body.reserve(usize::try_from(len).unwrap_or(0).min(64 << 20));
                    while let Some(chunk) = chunks.next().await {
                        body.extend_from_slice(&chunk?);
                    }
                    Ok(body.freeze())
                }
            })
            .await?;
        self.operations.bytes(Operation::Get, body.len() as u64);
        Ok(body)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, Error> {
        let full_prefix = if self.prefix.is_empty() { prefix.to_string() } else { format!("{}/{prefix}", self.prefix) };
        let strip = if self.prefix.is_empty() { 0 } else { self.prefix.len() + 1 };
        let mut objects = Vec::new();
        let mut page_token = None;
        loop {
            let page = self
                .retrying("list", prefix, |client| {
                    let request = ListObjectsRequest {
                        bucket: self.bucket.clone(),
                        prefix: Some(full_prefix.clone()),
                        page_token: page_token.clone(),
                        max_results: Some(LIST_PAGE_SIZE),
                        ..Default::default()
                    };
                    async move { client.list_objects(&request).await }
                })
                .await?;
            for object in page.items.unwrap_or_default() {
                let Some(key) = object.name.get(strip..) else { continue };
                let created = object.time_created.map_or(SystemTime::UNIX_EPOCH, |t| {
                    let nanos = t.unix_timestamp_nanos();
                    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
                });
                objects.push(ObjectMeta {
                    key: key.to_string(),
                    size: u64::try_from(object.size).unwrap_or(0),
                    created,
                });
            }
            page_token = page.next_page_token.filter(|t| !t.is_empty());
            if page_token.is_none() {
                break;
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn delete(&self, key: &str) -> Result<(), Error> {
        let name = self.object_name(key)?;
        let result = self
            .retrying("delete", key, |client| {
                let request =
                    DeleteObjectRequest { bucket: self.bucket.clone(), object: name.clone(), ..Default::default() };
                async move { client.delete_object(&request).await }
            })
            .await;
        match result {
            // The object is gone, as a delete wants: removed before, or by this delete's own
            // earlier try whose answer was lost. A missing bucket stays an error.
            Err(Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, Version)>, Error> {
        let name = self.object_name(key)?;
        // Metadata, then exactly that generation: a replacement in between is a 404 on the
        // download, and the pair is read again.
        loop {
            let meta = self.retrying("get", key, |client| {
                let request =
                    GetObjectRequest { bucket: self.bucket.clone(), object: name.clone(), ..Default::default() };
                async move { client.get_object(&request).await }
            });
            let generation = match meta.await {
                Ok(object) => object.generation,
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e),
            };
            let body = self.retrying("get", key, |client| {
                let request = GetObjectRequest {
                    bucket: self.bucket.clone(),
                    object: name.clone(),
                    generation: Some(generation),
                    ..Default::default()
                };
                async move { client.download_object(&request, &Range::default()).await.map(Bytes::from) }
            });
            match body.await {
                Ok(body) => return Ok(Some((body, generation as Version))),
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            }
        }
    }

    async fn put_if(&self, key: &str, body: Bytes, expected: Option<Version>) -> Result<Version, Error> {
        let name = self.object_name(key)?;
        // A multipart upload: preconditions on a simple media upload are not honoured by every
        // server that speaks this API (fake-gcs-server before 1.53 ignores them).
        let object = self
            .retrying("put", key, |client| {
                let request = UploadObjectRequest {
                    bucket: self.bucket.clone(),
                    if_generation_match: Some(expected.unwrap_or(0) as i64),
                    ..Default::default()
                };
                let upload_type = UploadType::Multipart(Box::new(gcloud_storage::http::objects::Object {
                    name: name.clone(),
                    ..Default::default()
                }));
                let body = body.clone();
                async move { client.upload_object(&request, body, &upload_type).await }
            })
            .await?;
        Ok(object.generation as Version)
    }

    fn kind(&self) -> &'static str {
        "gcs"
    }

    fn operations(&self) -> Option<&OperationCounts> {
        Some(&self.operations)
    }

    fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("gcs://{}", self.bucket)
        } else {
            format!("gcs://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Which Application Default Credentials source the Google client will use, in its own order,
/// so an error can say which one was rejected.
fn credential_source() -> String {
    if std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS_JSON").is_some() {
        return "GOOGLE_APPLICATION_CREDENTIALS_JSON".to_string();
    }
    if let Some(path) = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS") {
        return format!("GOOGLE_APPLICATION_CREDENTIALS={}", Path::new(&path).display());
    }
    if let Some(home) = std::env::var_os("HOME") {
        let adc = Path::new(&home).join(".config/gcloud/application_default_credentials.json");
        if adc.exists() {
            return format!("gcloud application-default credentials at {}", adc.display());
        }
    }
    "the metadata server (Cloud Run / GCE / GKE workload identity)".to_string()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Library messages can span lines (JSON bodies); an error walstream prints is one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 404 keeps what it means: on a read or a delete the object is missing (which a delete
    /// then takes as done), unless GCS says the bucket is; on an upload or listing, the bucket.
    #[test]
    fn a_404_is_told_apart_by_operation_and_message() {
        let store = GcsStore::new("b", "p");
        let classify = |op, message| store.classify_status(op, "generations/x", 404, message).error;
        assert!(matches!(classify("get", "No such object: b/p/generations/x"), Error::NotFound { .. }));
        assert!(matches!(classify("delete", "No such object: b/p/generations/x"), Error::NotFound { .. }));
        assert!(matches!(classify("delete", "Not Found"), Error::NotFound { .. }), "an emulator's bare 404");
        assert!(matches!(classify("delete", "The specified bucket does not exist."), Error::BucketNotFound { .. }));
        assert!(matches!(classify("put", "Not Found"), Error::BucketNotFound { .. }));
        assert!(matches!(classify("list", "Not Found"), Error::BucketNotFound { .. }));
    }
}
