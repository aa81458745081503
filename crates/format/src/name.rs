//! Positions and object keys, exactly as Litestream v0.3.13 names them (spec §1.2).
//!
//! Keys are relative to the replica root; the store prepends its own prefix. Numbers are
//! fixed-width lowercase hex so that a lexicographic listing (what GCS returns) is also
//! (index, offset) order, which restore depends on.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// The directory holding every generation, relative to the replica root.
pub const GENERATIONS_DIR: &str = "generations";

/// The highest offset a segment name can carry: v0.3.13 readers only accept 8 hex digits.
pub const MAX_SEGMENT_OFFSET: u64 = u32::MAX as u64;

/// The highest index before a new generation must start (Litestream's `MaxIndex`).
pub const MAX_INDEX: u32 = 0x7FFF_FFFF;

/// A generation: one snapshot followed by an unbroken chain of WAL.
///
/// Always 16 lowercase hex characters on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenerationId(u64);

impl GenerationId {
    /// A new random id. Unlike Litestream's time-seeded `math/rand`, this uses the OS RNG, so two
    /// replicators started in the same nanosecond cannot collide.
    pub fn random() -> GenerationId {
        GenerationId(rand::random())
    }

    /// A new id for a generation starting now: milliseconds since the epoch in the high 44 bits,
    /// 20 random bits below. Still 16 hex characters, as Litestream reads them, but ids sort by
    /// when they were made, so a restore can tell which of two generations is newer where the
    /// store's timestamps cannot (S3 lists them in whole seconds).
    pub fn time_ordered() -> GenerationId {
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
            & ((1 << 44) - 1);
        let candidate = ms << 20 | (rand::random::<u64>() & ((1 << 20) - 1));
        // Strictly ascending within a process, however fast generations start.
        static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let previous = LAST
            .fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |last| {
                Some(candidate.max(last + 1))
            })
            .expect("the closure always returns Some");
        GenerationId(candidate.max(previous + 1))
    }

    /// True if `s` is a valid generation name (Litestream's `IsGenerationName`).
    pub fn is_valid(s: &str) -> bool {
        s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

impl FromStr for GenerationId {
    type Err = Error;
    fn from_str(s: &str) -> Result<GenerationId, Error> {
        if !GenerationId::is_valid(s) {
            return Err(Error::BadGeneration(s.to_string()));
        }
        u64::from_str_radix(s, 16).map(GenerationId).map_err(|_| Error::BadGeneration(s.to_string()))
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A position in a replicated WAL stream: a byte offset into one index of one generation.
///
/// The offset counts the 32-byte WAL header, so a valid offset is 0 or
/// `32 + k * (24 + page_size)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Pos {
    /// The generation.
    pub generation: GenerationId,
    /// Litestream's index: the number of WAL restarts seen within the generation.
    pub index: u32,
    /// The byte offset into that index's WAL stream.
    pub offset: u64,
}

impl PartialOrd for Pos {
    fn partial_cmp(&self, other: &Pos) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pos {
    fn cmp(&self, other: &Pos) -> std::cmp::Ordering {
        (self.generation, self.index, self.offset).cmp(&(other.generation, other.index, other.offset))
    }
}

impl fmt::Display for Pos {
    /// Litestream's log form: `<gen>/<index %08x>:<offset decimal>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:08x}:{}", self.generation, self.index, self.offset)
    }
}

/// walstream's replica lease (`walstream-lease`), beside `generations/` at the replica root,
/// where Litestream v0.3.13 never lists, so the layout stays its own.
pub const LEASE_KEY: &str = "walstream-lease";

/// `generations/`: the prefix under which every generation lives.
pub fn generations_prefix() -> String {
    format!("{GENERATIONS_DIR}/")
}

/// `generations/<gen>/`: every object of one generation.
pub fn generation_prefix(generation: &GenerationId) -> String {
    format!("{GENERATIONS_DIR}/{generation}/")
}

/// `generations/<gen>/snapshots/`.
pub fn snapshots_prefix(generation: &GenerationId) -> String {
    format!("{GENERATIONS_DIR}/{generation}/snapshots/")
}

/// `generations/<gen>/wal/`.
pub fn wal_prefix(generation: &GenerationId) -> String {
    format!("{GENERATIONS_DIR}/{generation}/wal/")
}

/// `generations/<gen>/snapshots/<index %08x>.snapshot.lz4`.
pub fn snapshot_key(generation: &GenerationId, index: u32) -> String {
    format!("{GENERATIONS_DIR}/{generation}/snapshots/{index:08x}.snapshot.lz4")
}

/// `generations/<gen>/wal/<index %08x>_<offset %08x>.wal.lz4`.
///
/// NB: an offset above [`MAX_SEGMENT_OFFSET`] would need 9 digits, which v0.3.13 readers
/// silently ignore; the shipper starts a new generation before an index grows that large.
pub fn segment_key(generation: &GenerationId, index: u32, offset: u64) -> String {
    debug_assert!(offset <= MAX_SEGMENT_OFFSET, "segment offset {offset} does not fit 8 hex digits");
    format!("{GENERATIONS_DIR}/{generation}/wal/{index:08x}_{offset:08x}.wal.lz4")
}

/// The local shadow WAL file name for an index: `<index %08x>.wal`.
pub fn shadow_wal_file_name(index: u32) -> String {
    format!("{index:08x}.wal")
}

/// Parses a local shadow WAL file name back into its index.
pub fn parse_shadow_wal_file_name(name: &str) -> Option<u32> {
    parse_hex8(name.strip_suffix(".wal")?)
}

/// The local file an ended shadow index is spooled into once the store has not taken it for a
/// while: the same WAL, LZ4-framed as the segments it will go up as.
pub fn spool_file_name(index: u32) -> String {
    format!("{index:08x}.wal.spool")
}

/// Parses a spool file name back into its index.
pub fn parse_spool_file_name(name: &str) -> Option<u32> {
    parse_hex8(name.strip_suffix(".wal.spool")?)
}

/// What an object key names.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ObjectKind {
    /// A snapshot taken at this index.
    Snapshot {
        /// The WAL index the snapshot was taken at.
        index: u32,
    },
    /// A WAL segment holding bytes `[offset, offset + len)` of this index.
    Segment {
        /// The WAL index.
        index: u32,
        /// The starting byte offset within the index.
        offset: u64,
    },
}

/// A key of the replica layout, parsed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ParsedKey {
    /// The generation the object belongs to.
    pub generation: GenerationId,
    /// Snapshot or segment.
    pub kind: ObjectKind,
}

impl ParsedKey {
    /// The position a segment starts at; `None` for snapshots.
    pub fn pos(&self) -> Option<Pos> {
        match self.kind {
            ObjectKind::Segment { index, offset } => Some(Pos { generation: self.generation, index, offset }),
            ObjectKind::Snapshot { .. } => None,
        }
    }
}

/// Parses a key relative to the replica root. Anything that is not exactly a v0.3.13 snapshot or
/// segment name (upper-case hex, `.tmp` files, other directories) is `None`, as Litestream's
/// regexes ignore it.
pub fn parse_key(key: &str) -> Option<ParsedKey> {
    let mut parts = key.split('/');
    let (root, generation, dir, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if root != GENERATIONS_DIR || parts.next().is_some() {
        return None;
    }
    let generation: GenerationId = generation.parse().ok()?;
    let kind = match dir {
        "snapshots" => ObjectKind::Snapshot { index: parse_hex8(file.strip_suffix(".snapshot.lz4")?)? },
        "wal" => {
            let (index, offset) = file.strip_suffix(".wal.lz4")?.split_once('_')?;
            ObjectKind::Segment { index: parse_hex8(index)?, offset: u64::from(parse_hex8(offset)?) }
        }
        _ => return None,
    };
    Some(ParsedKey { generation, kind })
}

/// Parses the generation directory name out of a key such as `generations/<gen>/...`.
pub fn parse_generation_of_key(key: &str) -> Option<GenerationId> {
    let rest = key.strip_prefix(GENERATIONS_DIR)?.strip_prefix('/')?;
    rest.split('/').next()?.parse().ok()
}

fn parse_hex8(s: &str) -> Option<u32> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation() -> GenerationId {
        "7eda877427b27b79".parse().unwrap()
    }

    #[test]
    fn snapshot_key_round_trips() {
        let key = snapshot_key(&generation(), 0x1f);
        assert_eq!(key, "generations/7eda877427b27b79/snapshots/0000001f.snapshot.lz4");
        let parsed = parse_key(&key).unwrap();
        assert_eq!(parsed.generation, generation());
        assert_eq!(parsed.kind, ObjectKind::Snapshot { index: 0x1f });
        assert_eq!(parsed.pos(), None);
    }

    #[test]
    fn segment_key_round_trips() {
        for (index, offset) in [(0, 0), (1, 4152), (0x7fff_ffff, u64::from(u32::MAX))] {
            let key = segment_key(&generation(), index, offset);
            let parsed = parse_key(&key).unwrap();
            assert_eq!(parsed.pos(), Some(Pos { generation: generation(), index, offset }));
        }
        assert_eq!(segment_key(&generation(), 0, 0x4080), "generations/7eda877427b27b79/wal/00000000_00004080.wal.lz4");
    }

    #[test]
    fn shadow_names_round_trip() {
        assert_eq!(shadow_wal_file_name(10), "0000000a.wal");
        assert_eq!(parse_shadow_wal_file_name("0000000a.wal"), Some(10));
        assert_eq!(parse_shadow_wal_file_name("0000000a.wal.tmp"), None);
        assert_eq!(spool_file_name(10), "0000000a.wal.spool");
        assert_eq!(parse_spool_file_name("0000000a.wal.spool"), Some(10));
        assert_eq!(parse_spool_file_name("0000000a.wal.spool.tmp"), None);
        assert_eq!(parse_shadow_wal_file_name("0000000a.wal.spool"), None);
    }

    #[test]
    fn generation_round_trips_and_rejects_bad_names() {
        let id = GenerationId::random();
        let (a, b) = (GenerationId::time_ordered(), {
            std::thread::sleep(std::time::Duration::from_millis(2));
            GenerationId::time_ordered()
        });
        assert!(a < b && GenerationId::is_valid(&a.to_string()), "{a} then {b}");
        assert_eq!(id.to_string().parse::<GenerationId>().unwrap(), id);
        assert!("7EDA877427B27B79".parse::<GenerationId>().is_err());
        assert!("7eda877427b27b7".parse::<GenerationId>().is_err());
        assert_eq!(parse_generation_of_key("generations/7eda877427b27b79/wal/x"), Some(generation()));
    }

    #[test]
    fn foreign_names_are_ignored() {
        let g = "generations/7eda877427b27b79";
        for key in [
            format!("{g}/wal/0000000A_00000000.wal.lz4"),
            format!("{g}/wal/00000000_00000000.wal.lz4.tmp"),
            format!("{g}/wal/00000000.wal.lz4"),
            format!("{g}/snapshots/000000000.snapshot.lz4"),
            format!("{g}/other/00000000.snapshot.lz4"),
            "lease.json".to_string(),
        ] {
            assert_eq!(parse_key(&key), None, "{key}");
        }
    }

    #[test]
    fn keys_sort_in_position_order() {
        let mut keys = [
            segment_key(&generation(), 2, 0),
            segment_key(&generation(), 1, 0x10000),
            segment_key(&generation(), 1, 0x20),
            segment_key(&generation(), 10, 0),
        ];
        keys.sort();
        let positions: Vec<Pos> = keys.iter().map(|k| parse_key(k).unwrap().pos().unwrap()).collect();
        let mut sorted = positions.clone();
        sorted.sort();
        assert_eq!(positions, sorted);
    }
}
