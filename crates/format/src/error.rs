/// Everything that can be wrong with bytes or names handed to this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The first 4 bytes are not a SQLite WAL magic number.
    #[error("bad wal magic {magic:#010x}")]
    BadWalMagic {
        /// The value found.
        magic: u32,
    },
    /// The WAL header's own checksum does not match its first 24 bytes.
    #[error("wal header checksum mismatch")]
    BadWalHeaderChecksum,
    /// The page size in a WAL header is not a power of two between 512 and 65536.
    #[error("invalid page size {page_size}")]
    BadPageSize {
        /// The value found.
        page_size: u32,
    },
    /// A buffer was shorter than the structure it should hold.
    #[error("short buffer: need {need} bytes, have {have}")]
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// A generation id that is not 16 lowercase hex characters.
    #[error("invalid generation id {0:?}: want 16 lowercase hex characters")]
    BadGeneration(String),
    /// An LZ4 stream that could not be decoded (bad header, corrupt block, checksum, truncation).
    #[error("lz4: {0}")]
    Lz4(String),
}
