//! WAL indexes as a restore passes them on: the check of an index's checksum chain as SQLite's
//! recovery makes it, frame by frame as the bytes arrive ([`ChainCheck`]), what `fetch` hands
//! `apply` ([`WalEvent`]: frames that continue the chain, then the index's verified end), and
//! bytes kept in memory or spilled to an unlinked file ([`IndexBytes`], for a transaction
//! whose commit has not arrived yet). A leaf module: `fetch` checks indexes, `apply` writes
//! them, neither needs the other's internals.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use walstream_format::wal::{FrameChain, WalHeader};
use walstream_format::WAL_HEADER_SIZE;

use crate::Error;

/// How much of one index is kept in memory before the rest goes to a temporary file.
pub(crate) const SPILL_AT: usize = 1 << 20;

/// What `fetch` hands `apply`, in plan order.
pub(crate) enum WalEvent {
    /// Whole frames of the current index that continue its checksum chain, in order; the
    /// buffer goes back to the [`FramePool`] once written.
    Frames(Vec<u8>),
    /// The current index's last byte is in and its chain holds to the end.
    Ended(IndexEnd),
}

/// Buffers of [`WalEvent::Frames`] handed back once written, for the next frames: a fresh
/// buffer above glibc's mmap threshold (which `restore` keeps low) costs a page fault and a
/// zeroed page per 4 KiB.
#[derive(Default)]
pub(crate) struct FramePool(std::sync::Mutex<Vec<Vec<u8>>>);

impl FramePool {
    /// Bytes of frames per event.
    pub(crate) const BATCH: usize = 1 << 20;
    /// Buffers kept: one being filled, one queued, one being written.
    const KEEP: usize = 3;

    pub(crate) fn take(&self) -> Vec<u8> {
        self.0.lock().expect("frame pool lock").pop().unwrap_or_else(|| Vec::with_capacity(Self::BATCH))
    }

    pub(crate) fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut kept = self.0.lock().expect("frame pool lock");
        if kept.len() < Self::KEEP {
            kept.push(buf);
        }
    }
}

/// Where an index's segments start in its bytes, to name the culprit of a bad frame.
#[derive(Default)]
pub(crate) struct Segments(Vec<(String, u64)>);

impl Segments {
    pub(crate) fn push(&mut self, key: String, start: u64) {
        self.0.push((key, start));
    }

    /// The segment holding byte `offset`.
    pub(crate) fn at(&self, offset: u64) -> &str {
        self.0.iter().rev().find(|(_, start)| *start <= offset).map_or("", |(key, _)| key.as_str())
    }
}

/// Bytes appended in order and read back at any offset: in memory until [`SPILL_AT`], then in
/// an unlinked temporary file (nothing is left behind, whatever happens to the process).
#[derive(Default)]
pub(crate) struct IndexBytes {
    memory: Vec<u8>,
    spill: Option<File>,
    len: u64,
}

impl IndexBytes {
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn append(&mut self, bytes: &[u8], spill_dir: &Path) -> std::io::Result<()> {
        if self.spill.is_none() && self.memory.len() + bytes.len() > SPILL_AT {
            let file = tempfile::tempfile_in(spill_dir)?;
            file.write_all_at(&self.memory, 0)?;
            self.memory = Vec::new();
            self.spill = Some(file);
        }
        match &self.spill {
            Some(file) => file.write_all_at(bytes, self.len)?,
            None => self.memory.extend_from_slice(bytes),
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Forgets every byte (a spill file goes with them), keeping the memory for the next ones.
    pub(crate) fn clear(&mut self) {
        self.memory.clear();
        self.spill = None;
        self.len = 0;
    }

    /// Fills `buf` from `offset`, which with `buf` must lie within the bytes appended.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match &self.spill {
            Some(file) => file.read_exact_at(buf, offset),
            None => {
                let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
                buf.copy_from_slice(
                    self.memory.get(start..start + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?,
                );
                Ok(())
            }
        }
    }
}

/// An index checked to its end as SQLite's recovery would check it, so that a corrupt segment
/// is an error naming it rather than WAL that is silently cut short.
pub(crate) struct IndexEnd {
    pub(crate) committed: Committed,
    /// Its bytes of WAL.
    pub(crate) len: u64,
}

/// The checksum chain of one index, followed as SQLite's recovery follows it while the index's
/// bytes arrive, so no byte is read twice to check it.
#[derive(Default)]
pub(crate) struct ChainCheck {
    /// The database's page size: an index of another is corrupt.
    page_size: Option<u32>,
    /// The header's bytes until all 32 are in.
    head: Vec<u8>,
    chain: Option<FrameChain>,
    /// The bytes of a frame split between two pieces.
    partial: Vec<u8>,
    committed: Option<Committed>,
    frames: usize,
    /// A frame broke the chain: SQLite's recovery stops there, and the index must end there.
    broken: bool,
    /// The header did not parse, or its page size is not the database's.
    bad_header: Option<walstream_format::Error>,
}

impl ChainCheck {
    /// The check of an index of a database whose pages are `page_size` bytes (`None`: any).
    pub(crate) fn new(page_size: Option<u32>) -> ChainCheck {
        ChainCheck { page_size, ..ChainCheck::default() }
    }

    /// Follows the chain through `bytes`, the next ones of the index, handing each whole frame
    /// that continues it to `frame`, in order.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], frame: &mut impl FnMut(&[u8])) {
        if self.chain.is_none() {
            let take = (WAL_HEADER_SIZE - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.head.len() < WAL_HEADER_SIZE || self.bad_header.is_some() {
                return;
            }
            match WalHeader::parse(&self.head) {
                Ok(header) if self.page_size.is_some_and(|size| size != header.page_size) => {
                    self.bad_header = Some(walstream_format::Error::BadPageSize { page_size: header.page_size });
                    return;
                }
                Ok(header) => {
                    self.chain = Some(FrameChain::new(header));
                    self.committed = Some(Committed { valid_len: WAL_HEADER_SIZE as u64, frames: 0, db_pages: 0 });
                }
                Err(e) => {
                    self.bad_header = Some(e);
                    return;
                }
            }
        }
        let frame_size = self.chain.as_ref().expect("set above").header().frame_size() as usize;
        if !self.partial.is_empty() {
            let take = (frame_size - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.partial.len() < frame_size {
                return;
            }
            let whole = std::mem::take(&mut self.partial);
            if self.accept(&whole) {
                frame(&whole);
            }
            self.partial = whole;
            self.partial.clear();
        }
        let whole = bytes.len() / frame_size * frame_size;
        for one in bytes[..whole].chunks_exact(frame_size) {
            if self.accept(one) {
                frame(one);
            }
        }
        self.partial.extend_from_slice(&bytes[whole..]);
    }

    /// Whether `frame` continues the chain.
    fn accept(&mut self, frame: &[u8]) -> bool {
        if self.broken {
            return false;
        }
        let (Some(chain), Some(committed)) = (self.chain.as_mut(), self.committed.as_mut()) else { return false };
        let Some(frame_header) = chain.accept(frame) else {
            self.broken = true;
            return false;
        };
        committed.valid_len += frame.len() as u64;
        self.frames += 1;
        if frame_header.is_commit() {
            committed.frames = self.frames;
            committed.db_pages = frame_header.commit_size;
        }
        true
    }

    /// The index's end, once all `len` bytes of it went through [`feed`](ChainCheck::feed): an
    /// error naming the segment where the header is bad or the chain breaks before the end.
    pub(crate) fn verified(self, len: u64, segments: &Segments) -> Result<IndexEnd, Error> {
        let corrupt = |source| Error::CorruptObject { key: segments.at(0).to_string(), source };
        if let Some(source) = self.bad_header {
            return Err(corrupt(source));
        }
        let Some(committed) = self.committed else {
            return Err(corrupt(walstream_format::Error::Short { need: WAL_HEADER_SIZE, have: self.head.len() }));
        };
        if committed.valid_len < len {
            return Err(Error::ChecksumBreak {
                key: segments.at(committed.valid_len).to_string(),
                offset: committed.valid_len,
            });
        }
        Ok(IndexEnd { committed, len })
    }
}

/// What SQLite's recovery keeps of a WAL.
pub(crate) struct Committed {
    /// Bytes through the last frame that continues the checksum chain.
    pub(crate) valid_len: u64,
    /// Frames through the last commit frame.
    pub(crate) frames: usize,
    /// The database size in pages after that commit.
    pub(crate) db_pages: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_past_the_spill_size_moves_to_a_file_and_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 * SPILL_AT + 777) as u32).map(|i| (i % 251) as u8 ^ (i >> 11) as u8).collect();
        let mut bytes = IndexBytes::default();
        for piece in data.chunks(100_000) {
            bytes.append(piece, dir.path()).unwrap();
        }
        assert!(bytes.spill.is_some() && bytes.memory.is_empty(), "past SPILL_AT nothing stays in memory");
        assert_eq!(bytes.len(), data.len() as u64);
        let mut back = vec![0u8; data.len()];
        bytes.read_at(&mut back, 0).unwrap();
        assert!(back == data);
        let mut tail = [0u8; 10];
        bytes.read_at(&mut tail, data.len() as u64 - 10).unwrap();
        assert_eq!(tail, data[data.len() - 10..]);
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "the spill file is unlinked: nothing to leave behind"
        );
    }
}
