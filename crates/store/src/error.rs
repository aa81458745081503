/// A failed store operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The object does not exist.
    #[error("object not found: {key}")]
    NotFound {
        /// The key asked for.
        key: String,
    },
    /// A key that cannot name an object (empty, absolute, or with `..`).
    #[error("invalid object key {key:?}")]
    InvalidKey {
        /// The key given.
        key: String,
    },
    /// Local I/O failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file involved.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The bucket a replica URL names does not exist.
    #[error("bucket {bucket:?} does not exist: {fix}")]
    BucketNotFound {
        /// The bucket's name.
        bucket: String,
        /// How to create it, in the backend's own tool.
        fix: String,
    },
    /// The store refused the credentials, or none could be obtained.
    #[error("credentials from {source_name} were rejected or unavailable: {detail}; {fix}")]
    Credentials {
        /// Where the credentials came from (`GOOGLE_APPLICATION_CREDENTIALS=...`, the metadata server).
        source_name: String,
        /// What the store or the credential source said.
        detail: String,
        /// What to check, in the backend's terms.
        fix: &'static str,
    },
    /// A conditional write found the object changed since it was read.
    #[error("{key} was changed by someone else since it was read")]
    PreconditionFailed {
        /// The key written.
        key: String,
    },
    /// A remote request failed for another reason, after its retries.
    #[error("{op} {target}: {detail}")]
    Remote {
        /// What was being done.
        op: &'static str,
        /// The object or store involved.
        target: String,
        /// What went wrong, on one line.
        detail: String,
    },
}

impl Error {
    /// True if the object was missing.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}
