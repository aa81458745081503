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
}

impl Error {
    /// True if the object was missing.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}
