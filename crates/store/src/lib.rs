//! Object stores that hold walstream replicas.
//!
//! [`ObjectStore`] is the whole contract: put, get, list by prefix and delete of opaque keys
//! relative to the replica root. A store knows keys and bytes, never WAL: the layout lives in
//! `walstream-format`. Backends are modules; only the CLI chooses one.
//!
//! - [`FileStore`]: a directory, written with temp file, fsync and rename (`file://`).
//! - [`GcsStore`]: a Google Cloud Storage bucket through the JSON API (`gcs://`).
//! - [`S3Store`]: an S3 or S3-compatible bucket (`s3://`).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use walstream_store::{FileStore, ObjectStore};
//! let dir = tempfile::tempdir().unwrap();
//! let store = FileStore::new(dir.path());
//! store.put("generations/a/b", bytes::Bytes::from_static(b"hi")).await.unwrap();
//! assert_eq!(&store.get("generations/a/b").await.unwrap()[..], b"hi");
//! # });
//! ```
#![deny(missing_docs)]

/// The behaviour every backend must show, for backends' own tests and the e2e suite.
#[cfg(any(test, feature = "conformance"))]
#[doc(hidden)]
pub mod conformance;
mod error;
mod file;
mod gcs;
mod s3;

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

pub use error::Error;
pub use file::FileStore;
pub use gcs::{GcsStore, RetryPolicy};
pub use s3::{S3Settings, S3Store};

/// One object as a listing reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key, relative to the replica root, with `/` separators.
    pub key: String,
    /// Stored (compressed) size in bytes.
    pub size: u64,
    /// When the object was created, as the store reports it: file mtime, GCS `timeCreated`.
    /// Restore picks generations and snapshots by this, as Litestream does.
    pub created: SystemTime,
}

/// A kind of request to a remote store, as Litestream's `litestream_replica_operation_*`
/// metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// A download or a metadata read.
    Get,
    /// An upload (each chunk of a resumable one counts as one).
    Put,
    /// A deletion.
    Delete,
    /// One page of a listing.
    List,
}

impl Operation {
    /// Every operation, in label order.
    pub const ALL: [Operation; 4] = [Operation::Get, Operation::Put, Operation::Delete, Operation::List];

    /// The label value: `GET`, `PUT`, `DELETE`, `LIST`.
    pub fn label(self) -> &'static str {
        match self {
            Operation::Get => "GET",
            Operation::Put => "PUT",
            Operation::Delete => "DELETE",
            Operation::List => "LIST",
        }
    }
}

/// Requests a remote store has sent (retries included) and the bytes of those that succeeded.
#[derive(Debug, Default)]
pub struct OperationCounts {
    requests: [std::sync::atomic::AtomicU64; 4],
    bytes: [std::sync::atomic::AtomicU64; 4],
}

impl OperationCounts {
    /// Counts one request.
    pub fn request(&self, op: Operation) {
        self.requests[op as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts the payload of a GET or PUT that succeeded.
    pub fn bytes(&self, op: Operation, bytes: u64) {
        self.bytes[op as usize].fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// (operation, requests, bytes) for every operation.
    pub fn totals(&self) -> [(Operation, u64, u64); 4] {
        Operation::ALL.map(|op| {
            (
                op,
                self.requests[op as usize].load(std::sync::atomic::Ordering::Relaxed),
                self.bytes[op as usize].load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }
}

/// The bytes of an upload too large to hold, as a source that can be read again from the start
/// (a failed resumable upload starts over). Reads block: backends read on blocking threads.
pub trait Body: Send + Sync {
    /// A reader from the first byte, and exactly how many bytes it gives. The length is the
    /// open source's, so a file replaced while it is uploaded is never sent as a mix of two.
    fn open(&self) -> std::io::Result<(u64, Box<dyn std::io::Read + Send>)>;

    /// Where the bytes come from, for errors (a path).
    fn source(&self) -> String;
}

/// A reader of a [`Body`], as [`Body::open`] gives it.
pub(crate) type BodyReader = Box<dyn std::io::Read + Send>;

/// The rest of `reader`, `len` bytes as opened, read on a blocking thread: what a backend sends
/// in one request when a body is small.
pub(crate) async fn read_whole(body: &dyn Body, len: u64, mut reader: BodyReader) -> Result<Bytes, Error> {
    tokio::task::spawn_blocking(move || {
        let mut whole = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        std::io::Read::read_to_end(&mut reader, &mut whole).map(|_| Bytes::from(whole))
    })
    .await
    .expect("a body read panicked")
    .map_err(|source| Error::Io { op: "read", path: body.source(), source })
}

/// The next `want` bytes of `reader`, read on a blocking thread, and the reader back: one chunk
/// or part of a large upload.
pub(crate) async fn read_chunk(mut reader: BodyReader, want: usize) -> (BodyReader, std::io::Result<Vec<u8>>) {
    tokio::task::spawn_blocking(move || {
        let mut chunk = vec![0u8; want];
        let result = std::io::Read::read_exact(&mut reader, &mut chunk);
        (reader, result.map(|()| chunk))
    })
    .await
    .expect("a chunk read panicked")
}

/// A local file as an upload body.
#[derive(Clone, Copy, Debug)]
pub struct FileBody<'a>(pub &'a std::path::Path);

impl Body for FileBody<'_> {
    fn open(&self) -> std::io::Result<(u64, Box<dyn std::io::Read + Send>)> {
        let file = std::fs::File::open(self.0)?;
        Ok((file.metadata()?.len(), Box::new(file)))
    }

    fn source(&self) -> String {
        self.0.display().to_string()
    }
}

/// One state of an object, for compare-and-swap: the GCS generation, or for files a
/// fingerprint of inode and modification time.
pub type Version = u64;

/// A place to keep replica objects.
///
/// Keys are relative to the replica root and use `/`. Implementations must be safe to call
/// concurrently.
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Stores `body` at `key`, replacing any object already there. Atomic: a reader sees the old
    /// object, no object, or the whole new one, never a part. Returns only once the object is
    /// durable in the store.
    async fn put(&self, key: &str, body: Bytes) -> Result<(), Error>;

    /// Stores the file at `path` as `key`, with [`put`](ObjectStore::put)'s guarantees,
    /// streamed as [`put_body`](ObjectStore::put_body) streams.
    async fn put_file(&self, key: &str, path: &std::path::Path) -> Result<(), Error> {
        self.put_body(key, &FileBody(path)).await
    }

    /// Stores what `body` reads as `key`, with [`put`](ObjectStore::put)'s guarantees. Backends
    /// stream it, so a large snapshot (or its encryption) never has to fit in memory; the
    /// default reads it whole.
    async fn put_body(&self, key: &str, body: &dyn Body) -> Result<(), Error> {
        let read = || {
            let (len, mut reader) = body.open()?;
            let mut whole = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            std::io::Read::read_to_end(&mut reader, &mut whole)?;
            Ok(whole)
        };
        let whole = read().map_err(|source| Error::Io { op: "read", path: body.source(), source })?;
        self.put(key, Bytes::from(whole)).await
    }

    /// Returns the whole object. A missing key is an error for which
    /// [`Error::is_not_found`] is true.
    async fn get(&self, key: &str) -> Result<Bytes, Error>;

    /// `len` bytes of the object from `offset` (fewer where it ends first; `offset` must be
    /// inside the object), so a large object
    /// can be read in pieces: several at once, each retried on its own, none held whole. A
    /// missing key is an error for which [`Error::is_not_found`] is true. The default reads the
    /// whole object.
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, Error> {
        let body = self.get(key).await?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(body.len());
        let end = usize::try_from(offset.saturating_add(len)).unwrap_or(usize::MAX).min(body.len());
        Ok(body.slice(start..end))
    }

    /// [`get_range`](ObjectStore::get_range), read into `buf` where the backend can (its
    /// contents are replaced), so a caller that hands the same buffers back part after part
    /// pays no fresh allocation, page faults or zeroing per part. The default ignores `buf`.
    async fn get_range_into(&self, key: &str, offset: u64, len: u64, buf: BytesMut) -> Result<Bytes, Error> {
        drop(buf);
        self.get_range(key, offset, len).await
    }

    /// Whether [`get_range_into`](ObjectStore::get_range_into) reads into the buffer it is
    /// given: a caller keeping buffers for it would otherwise only hold memory.
    fn reads_into_buffers(&self) -> bool {
        false
    }

    /// Every object whose key starts with `prefix`, at any depth, sorted by key. Temporary
    /// objects of an unfinished put are never listed. A prefix with no objects is an empty list.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, Error>;

    /// Removes the object. A missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), Error>;

    /// Removes every object whose key starts with `prefix` (a whole generation, say), and
    /// returns how many there were. Not atomic: an interrupted call leaves a subset, and calling
    /// it again finishes the job.
    async fn delete_prefix(&self, prefix: &str) -> Result<usize, Error> {
        let objects = self.list(prefix).await?;
        for object in &objects {
            self.delete(&object.key).await?;
        }
        Ok(objects.len())
    }

    /// Reads a small object together with its version, for [`put_if`](ObjectStore::put_if);
    /// `None` if there is no such object.
    async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, Version)>, Error>;

    /// Stores `body` at `key` only if the object is still at version `expected` (`None`: only
    /// if there is no such object), and returns the new version. If it is not,
    /// [`Error::PreconditionFailed`] and nothing is written. A retried request whose first try
    /// succeeded also fails this way, so callers re-read and recognise their own body.
    async fn put_if(&self, key: &str, body: Bytes, expected: Option<Version>) -> Result<Version, Error>;

    /// A short description of where this store points, for logs and errors (`file:///x`).
    fn describe(&self) -> String;

    /// The backend, as Litestream's `type` key and metric labels name it: `file`, `gcs`.
    fn kind(&self) -> &'static str;

    /// The requests a remote backend has sent; `None` for local ones (Litestream does not
    /// count the file client's either).
    fn operations(&self) -> Option<&OperationCounts> {
        None
    }
}
