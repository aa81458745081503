//! `s3://BUCKET/PATH`: Amazon S3 and S3-compatible stores (MinIO, R2, B2, moto), through the
//! `object_store` crate's S3 client: SigV4, the AWS credential chain, multipart uploads and
//! conditional writes (`If-None-Match: *`, `If-Match: <etag>`) for the lease.
//!
//! The client is made on first use, so a replicator can start while the network is down, and
//! with no region and no endpoint the bucket's region is looked up then, as Litestream's
//! `GetBucketLocation` does. The client retries transient failures itself, within the bounds set here; each call counts
//! as one request in [`OperationCounts`] (the client does not report its retries).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore as _, ObjectStoreExt as _, PutMode, PutOptions, PutPayload, RetryConfig, UpdateVersion,
};

use crate::{read_chunk, read_whole, Body, Error, ObjectMeta, ObjectStore, Operation, OperationCounts, Version};

/// Bodies above this go up as a multipart upload in parts of this size (S3's minimum part is
/// 5 MiB), so a large snapshot never has to be in memory at once.
const PART_BYTES: usize = 8 << 20;

const CREDENTIALS_FIX: &str = "set access-key-id and secret-access-key (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), and check that they may read and write the bucket";

/// How to reach an S3 bucket: Litestream v0.3.13's replica keys.
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    /// `region`; `us-east-1` when not given (with an endpoint, as Litestream does).
    pub region: Option<String>,
    /// `endpoint`: an S3-compatible server (`http://127.0.0.1:9000`).
    pub endpoint: Option<String>,
    /// `force-path-style`: `https://host/bucket/key` instead of `https://bucket.host/key`.
    /// Litestream turns it on whenever an endpoint is given, unless set.
    pub force_path_style: Option<bool>,
    /// `skip-verify`: accept any TLS certificate.
    pub skip_verify: bool,
    /// `access-key-id` and `secret-access-key`; else the AWS environment and credential chain
    /// (`AWS_ACCESS_KEY_ID`, web identity, ECS, instance metadata).
    pub access_key_id: Option<String>,
    /// See `access_key_id`.
    pub secret_access_key: Option<String>,
}

/// A replica in an S3 bucket, under an optional path prefix.
pub struct S3Store {
    bucket: String,
    prefix: String,
    builder: AmazonS3Builder,
    options: ClientOptions,
    /// No region and no endpoint were given: ask S3 where the bucket is.
    find_region: bool,
    client: tokio::sync::OnceCell<AmazonS3>,
    credential_source: String,
    operations: OperationCounts,
    /// The ETag behind each [`Version`] handed out: the trait's versions are numbers (a GCS
    /// generation), S3's are ETags.
    etags: Mutex<HashMap<Version, String>>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store").field("bucket", &self.bucket).field("prefix", &self.prefix).finish()
    }
}

impl S3Store {
    /// A store for `bucket` under `prefix` (`""` or `"."` for the bucket's root). Nothing is
    /// sent, and nothing checked, until the first request.
    pub fn new(bucket: &str, prefix: &str, settings: &S3Settings) -> S3Store {
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let region = settings
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .filter(|r| !r.is_empty());
        let find_region = region.is_none() && settings.endpoint.is_none();
        builder = builder.with_region(region.unwrap_or_else(|| "us-east-1".to_string()));
        let plain_http = settings.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let path_style = settings.force_path_style.unwrap_or(settings.endpoint.is_some());
        builder = builder.with_virtual_hosted_style_request(!path_style);
        let key_pair = settings.access_key_id.clone().zip(settings.secret_access_key.clone()).or_else(|| {
            let id = std::env::var("LITESTREAM_ACCESS_KEY_ID").ok()?;
            Some((id, std::env::var("LITESTREAM_SECRET_ACCESS_KEY").ok()?))
        });
        let credential_source = match &key_pair {
            Some(_) if settings.access_key_id.is_some() => "the replica's access-key-id".to_string(),
            Some(_) => "LITESTREAM_ACCESS_KEY_ID".to_string(),
            None if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() => "AWS_ACCESS_KEY_ID".to_string(),
            None => "the AWS credential chain (web identity, ECS, instance metadata)".to_string(),
        };
        if let Some((id, secret)) = key_pair {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret);
        }
        let options = ClientOptions::new()
            .with_timeout(Duration::from_secs(60))
            .with_allow_invalid_certificates(settings.skip_verify)
            .with_allow_http(plain_http);
        let retry = RetryConfig { max_retries: 5, retry_timeout: Duration::from_secs(60), ..RetryConfig::default() };
        let builder = builder.with_client_options(options.clone()).with_retry(retry);
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix == "." { "" } else { prefix };
        S3Store {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            builder,
            options,
            find_region,
            client: tokio::sync::OnceCell::new(),
            credential_source,
            operations: OperationCounts::default(),
            etags: Mutex::new(HashMap::new()),
        }
    }

    async fn client(&self, op: &'static str, key: &str) -> Result<&AmazonS3, Error> {
        self.client
            .get_or_try_init(|| async {
                let mut builder = self.builder.clone();
                if self.find_region {
                    let region = object_store::aws::resolve_bucket_region(&self.bucket, &self.options)
                        .await
                        .map_err(|e| self.error(op, key, e))?;
                    builder = builder.with_region(region);
                }
                builder.build().map_err(|e| Error::Remote {
                    op: "configure",
                    target: self.describe(),
                    detail: one_line(&e.to_string()),
                })
            })
            .await
    }

    fn path(&self, key: &str) -> Result<ObjectPath, Error> {
        let bad = key.is_empty() || key.starts_with('/') || key.split('/').any(|p| p.is_empty() || p == "..");
        if bad {
            return Err(Error::InvalidKey { key: key.to_string() });
        }
        let full = if self.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.prefix) };
        ObjectPath::parse(&full).map_err(|_| Error::InvalidKey { key: key.to_string() })
    }

    fn key_of(&self, location: &ObjectPath) -> String {
        let full = location.as_ref();
        match self.prefix.is_empty() {
            true => full.to_string(),
            false => full.strip_prefix(&self.prefix).and_then(|k| k.strip_prefix('/')).unwrap_or(full).to_string(),
        }
    }

    fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> Error {
        let text = one_line(&e.to_string());
        match e {
            _ if text.contains("NoSuchBucket") => {
                Error::BucketNotFound { bucket: self.bucket.clone(), fix: bucket_fix(&self.bucket) }
            }
            object_store::Error::NotFound { .. } => Error::NotFound { key: key.to_string() },
            object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. } => {
                Error::PreconditionFailed { key: key.to_string() }
            }
            object_store::Error::Unauthenticated { .. } | object_store::Error::PermissionDenied { .. } => {
                Error::Credentials { source_name: self.credential_source.clone(), detail: text, fix: CREDENTIALS_FIX }
            }
            _ if text.contains("InvalidAccessKeyId") || text.contains("SignatureDoesNotMatch") => {
                Error::Credentials { source_name: self.credential_source.clone(), detail: text, fix: CREDENTIALS_FIX }
            }
            // The client's own words bury it: say it was the connection.
            _ if text.contains("error sending request") => Error::Remote {
                op,
                target: format!("{}/{key}", self.describe()),
                detail: format!("could not connect to the endpoint: {text}"),
            },
            _ => Error::Remote { op, target: format!("{}/{key}", self.describe()), detail: text },
        }
    }

    fn version_of(&self, etag: Option<String>) -> Version {
        let etag = etag.unwrap_or_default();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&etag, &mut hasher);
        let version = std::hash::Hasher::finish(&hasher);
        self.etags.lock().unwrap_or_else(|e| e.into_inner()).insert(version, etag);
        version
    }

    /// A multipart upload of `body`, `PART_BYTES` at a time, each part read on a blocking thread.
    async fn put_in_parts(&self, key: &str, location: &ObjectPath, body: &dyn Body) -> Result<(), Error> {
        let read_error = |op| move |source| Error::Io { op, path: body.source(), source };
        let (len, mut reader) = body.open().map_err(read_error("open"))?;
        self.operations.request(Operation::Put);
        let mut upload =
            self.client("put", key).await?.put_multipart(location).await.map_err(|e| self.error("put", key, e))?;
        let mut sent = 0u64;
        let result = async {
            while sent < len {
                let want = (len - sent).min(PART_BYTES as u64) as usize;
                let chunk;
                (reader, chunk) = read_chunk(reader, want).await;
                let chunk = chunk.map_err(read_error("read"))?;
                self.operations.request(Operation::Put);
                upload.put_part(PutPayload::from(chunk)).await.map_err(|e| self.error("put", key, e))?;
                sent += want as u64;
            }
            self.operations.request(Operation::Put);
            upload.complete().await.map_err(|e| self.error("put", key, e))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            // Parts of an abandoned upload are billed until aborted.
            let _ = upload.abort().await;
        } else {
            self.operations.bytes(Operation::Put, len);
        }
        result
    }
}

fn bucket_fix(bucket: &str) -> String {
    format!("create it (aws s3 mb s3://{bucket}, or the store's own console) or fix the replica URL")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, body: Bytes) -> Result<(), Error> {
        let location = self.path(key)?;
        let len = body.len() as u64;
        self.operations.request(Operation::Put);
        self.client("put", key)
            .await?
            .put(&location, PutPayload::from(body))
            .await
            .map_err(|e| self.error("put", key, e))?;
        self.operations.bytes(Operation::Put, len);
        Ok(())
    }

    async fn put_body(&self, key: &str, body: &dyn Body) -> Result<(), Error> {
        let location = self.path(key)?;
        let (len, reader) = body.open().map_err(|source| Error::Io { op: "open", path: body.source(), source })?;
        if len > PART_BYTES as u64 {
            drop(reader);
            return self.put_in_parts(key, &location, body).await;
        }
        self.put(key, read_whole(body, len, reader).await?).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, Error> {
        let location = self.path(key)?;
        self.operations.request(Operation::Get);
        let result = self.client("get", key).await?.get(&location).await.map_err(|e| self.error("get", key, e))?;
        let body = result.bytes().await.map_err(|e| self.error("get", key, e))?;
        self.operations.bytes(Operation::Get, body.len() as u64);
        Ok(body)
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, Error> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let location = self.path(key)?;
        // The trait asks for an offset inside the object; the plan's sizes guarantee it.
        let end = offset.saturating_add(len);
        self.operations.request(Operation::Get);
        let body = self
            .client("get", key)
            .await?
            .get_range(&location, offset..end)
            .await
            .map_err(|e| self.error("get", key, e))?;
        self.operations.bytes(Operation::Get, body.len() as u64);
        Ok(body)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, Error> {
        // The client lists by whole path segments; list the deepest directory the prefix names
        // and keep what starts with it.
        let dir = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let full = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, _) => dir.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{dir}", self.prefix),
        };
        let location = (!full.is_empty()).then(|| ObjectPath::from(full.as_str()));
        self.operations.request(Operation::List);
        let mut listing = self.client("list", prefix).await?.list(location.as_ref());
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.error("list", prefix, e))?;
            let key = self.key_of(&meta.location);
            if key.starts_with(prefix) {
                out.push(ObjectMeta { key, size: meta.size, created: SystemTime::from(meta.last_modified) });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), Error> {
        let location = self.path(key)?;
        self.operations.request(Operation::Delete);
        match self.client("delete", key).await?.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, Version)>, Error> {
        let location = self.path(key)?;
        self.operations.request(Operation::Get);
        let result = match self.client("get", key).await?.get(&location).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error("get", key, e)),
        };
        let etag = result.meta.e_tag.clone();
        let body = result.bytes().await.map_err(|e| self.error("get", key, e))?;
        Ok(Some((body, self.version_of(etag))))
    }

    async fn put_if(&self, key: &str, body: Bytes, expected: Option<Version>) -> Result<Version, Error> {
        let location = self.path(key)?;
        let mode = match expected {
            None => PutMode::Create,
            Some(version) => {
                let etag = self.etags.lock().unwrap_or_else(|e| e.into_inner()).get(&version).cloned();
                // A version this process never read cannot be the object's current one.
                let Some(etag) = etag else { return Err(Error::PreconditionFailed { key: key.to_string() }) };
                PutMode::Update(UpdateVersion { e_tag: Some(etag), version: None })
            }
        };
        self.operations.request(Operation::Put);
        let put = self
            .client("put", key)
            .await?
            .put_opts(&location, PutPayload::from(body), PutOptions { mode, ..PutOptions::default() })
            .await
            .map_err(|e| self.error("put", key, e))?;
        Ok(self.version_of(put.e_tag))
    }

    fn describe(&self) -> String {
        match self.prefix.is_empty() {
            true => format!("s3://{}", self.bucket),
            false => format!("s3://{}/{}", self.bucket, self.prefix),
        }
    }

    fn kind(&self) -> &'static str {
        "s3"
    }

    fn operations(&self) -> Option<&OperationCounts> {
        Some(&self.operations)
    }
}
