//! The replica format of Litestream v0.3.13, shared by every other walstream crate.
//!
//! Nothing here does I/O: the functions work on byte slices and strings (and `age` on readers
//! its callers hand it).
//!
//! - [`name`]: [`Pos`] and [`GenerationId`], and the object keys built from them
//!   (`generations/<gen>/wal/<index>_<offset>.wal.lz4`). Only this module builds or parses keys.
//! - [`wal`]: the SQLite WAL header and frames, with the running checksum that decides which
//!   frames are committed and valid.
//! - [`lz4`]: one LZ4 frame per object, with the exact flags Litestream writes.
//! - [`age`]: the optional encryption of that frame, as Litestream's `age` block configures it.
//!
//! ```
//! use walstream_format::{name, Pos, GenerationId};
//! let generation: GenerationId = "7eda877427b27b79".parse().unwrap();
//! let key = name::segment_key(&generation, 1, 4152);
//! assert_eq!(key, "generations/7eda877427b27b79/wal/00000001_00001038.wal.lz4");
//! let parsed = name::parse_key(&key).unwrap();
//! assert_eq!(parsed.pos(), Some(Pos { generation, index: 1, offset: 4152 }));
//! ```
#![deny(missing_docs)]

pub mod age;
mod error;
pub mod lz4;
pub mod name;
pub mod wal;

pub use error::Error;
pub use name::{GenerationId, ObjectKind, ParsedKey, Pos};
pub use wal::{ByteOrder, FrameHeader, WalHeader, FRAME_HEADER_SIZE, WAL_HEADER_SIZE};
