//! LZ4 framing exactly as Litestream v0.3.13 writes it (spec §2.3).
//!
//! Every object is one standard LZ4 frame with FLG `0x64` (version 1, independent blocks,
//! content checksum) and BD `0x70` (4 MiB blocks). Block checksums are never written: the Go
//! reader v0.3.13 uses checks them over the wrong bytes and rejects standard ones. Exactly one
//! frame per object: the Go reader silently stops after the first.

use std::io::{self, Write};

use lz4_flex::block;
use xxhash_rust::xxh32::{xxh32, Xxh32};

use crate::Error;

/// The first 7 bytes of every object walstream or Litestream writes: magic, FLG, BD, HC.
pub const FRAME_PREFIX: [u8; 7] = [0x04, 0x22, 0x4D, 0x18, 0x64, 0x70, 0xB9];

/// Uncompressed bytes per block at most: BD `0x70`.
const BLOCK_MAX: usize = 4 << 20;

/// Uncompressed bytes per block [`FrameWriter`] writes: blocks may be smaller than BD's
/// maximum, and LZ4 matches reach back only 64 KiB, so 256 KiB blocks compress about as well
/// as 4 MiB ones (a few hundred bytes more a block); a 4 MiB block and its compressed form were 8.8 MiB of the replicator's peak
/// heap (12 MiB) while it wrote a snapshot under a flat-out writer.
const WRITTEN_BLOCK: usize = 256 << 10;
const UNCOMPRESSED_BIT: u32 = 0x8000_0000;

const FLG_VERSION_MASK: u8 = 0xC0;
const FLG_VERSION_1: u8 = 0x40;
const FLG_INDEPENDENT: u8 = 0x20;
const FLG_BLOCK_CHECKSUM: u8 = 0x10;
const FLG_CONTENT_SIZE: u8 = 0x08;
const FLG_CONTENT_CHECKSUM: u8 = 0x04;
const FLG_DICT_ID: u8 = 0x01;

// The frame layer is written here on top of lz4_flex's block functions rather than with its
// FrameEncoder/FrameDecoder: those allocate two 4 MiB buffers per object, which for a stream of
// small WAL segments costs more than the compression itself.

/// A writer that LZ4-frames everything written to it; call [`FrameWriter::finish`] to write the
/// end mark and content checksum. Memory is bounded by one block (`WRITTEN_BLOCK`) and its
/// compressed form.
pub struct FrameWriter<W: Write> {
    inner: W,
    block: Vec<u8>,
    compressed: Vec<u8>,
    checksum: Xxh32,
    header_written: bool,
}

impl<W: Write> FrameWriter<W> {
    /// Starts a frame on `inner`.
    pub fn new(inner: W) -> FrameWriter<W> {
        FrameWriter { inner, block: Vec::new(), compressed: Vec::new(), checksum: Xxh32::new(0), header_written: false }
    }

    fn write_header_once(&mut self) -> io::Result<()> {
        if !self.header_written {
            self.inner.write_all(&FRAME_PREFIX)?;
            self.header_written = true;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        self.write_header_once()?;
        if self.block.is_empty() {
            return Ok(());
        }
        self.checksum.update(&self.block);
        self.compressed.resize(FrameBuilder::block_bound(self.block.len()), 0);
        let n = encode_block(&self.block, &mut self.compressed);
        self.inner.write_all(&self.compressed[..n])?;
        self.block.clear();
        Ok(())
    }

    /// Ends the frame and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_block()?;
        self.inner.write_all(&[0, 0, 0, 0])?;
        self.inner.write_all(&self.checksum.digest().to_le_bytes())?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = WRITTEN_BLOCK - self.block.len();
        let n = buf.len().min(room);
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == WRITTEN_BLOCK {
            self.flush_block()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses `data` into one frame.
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; max_compressed_len(data.len())];
    let n = compress_into(data, &mut out);
    out.truncate(n);
    out
}

/// The most bytes [`compress_into`] may write for `len` bytes of input.
pub fn max_compressed_len(len: usize) -> usize {
    let (full, rest) = (len / BLOCK_MAX, len % BLOCK_MAX);
    FRAME_PREFIX.len()
        + full * FrameBuilder::block_bound(BLOCK_MAX)
        + FrameBuilder::block_bound(rest)
        + FrameBuilder::END_LEN
}

/// Writes one frame of `data` to the front of `out` and returns its length. Blocks are
/// compressed in place after their size field, with no scratch buffer: the uploader calls this
/// for every segment, and fresh megabyte buffers cost it more in page faults than compressing.
///
/// # Panics
/// If `out` is shorter than [`max_compressed_len`].
pub fn compress_into(data: &[u8], out: &mut [u8]) -> usize {
    assert!(out.len() >= max_compressed_len(data.len()), "lz4 output buffer too small");
    let mut frame = FrameBuilder::start(out);
    for chunk in data.chunks(BLOCK_MAX) {
        frame.push(chunk, out);
    }
    frame.finish(out)
}

/// Raw bytes per block of a [`StoredFrame`]: small, so reading one holds little memory.
const STORED_BLOCK: usize = 64 << 10;

/// The length of a [`StoredFrame`] of `len` bytes.
pub fn stored_frame_len(len: u64) -> u64 {
    let blocks = len.div_ceil(STORED_BLOCK as u64);
    FRAME_PREFIX.len() as u64 + blocks * 4 + len + FrameBuilder::END_LEN as u64
}

/// One frame of `len` bytes of a source, in stored (uncompressed) blocks, which every LZ4
/// reader accepts: its length is [`stored_frame_len`], known before a byte is read, which an
/// upload that must declare its length first needs when there is no room to compress into. A
/// source shorter than `len` is padded with zeros, and one longer is cut at `len`, so the frame
/// is always as long as promised.
pub struct StoredFrame<R> {
    source: R,
    remaining: u64,
    /// The next bytes to hand out, from `at`.
    out: Vec<u8>,
    at: usize,
    checksum: Xxh32,
    stage: Stage,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Header,
    Blocks,
    End,
    Done,
}

impl<R: io::Read> StoredFrame<R> {
    /// The frame of the first `len` bytes `source` gives.
    pub fn new(source: R, len: u64) -> StoredFrame<R> {
        StoredFrame { source, remaining: len, out: Vec::new(), at: 0, checksum: Xxh32::new(0), stage: Stage::Header }
    }

    /// Puts the next piece of the frame in `out`.
    fn refill(&mut self) -> io::Result<()> {
        self.out.clear();
        self.at = 0;
        match self.stage {
            Stage::Header => {
                self.out.extend_from_slice(&FRAME_PREFIX);
                self.stage = Stage::Blocks;
            }
            Stage::Blocks if self.remaining == 0 => self.stage = Stage::End,
            Stage::Blocks => {
                let n = self.remaining.min(STORED_BLOCK as u64) as usize;
                self.out.extend_from_slice(&(n as u32 | UNCOMPRESSED_BIT).to_le_bytes());
                self.out.resize(4 + n, 0);
                let mut filled = 4;
                while filled < self.out.len() {
                    match self.source.read(&mut self.out[filled..]) {
                        Ok(0) => break,
                        Ok(read) => filled += read,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                // What is not read stays zero: the padding.
                self.checksum.update(&self.out[4..]);
                self.remaining -= n as u64;
            }
            Stage::End => {
                self.out.extend_from_slice(&[0, 0, 0, 0]);
                self.out.extend_from_slice(&self.checksum.digest().to_le_bytes());
                self.stage = Stage::Done;
            }
            Stage::Done => {}
        }
        Ok(())
    }
}

impl<R: io::Read> io::Read for StoredFrame<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.out.len() {
            if self.stage == Stage::Done {
                return Ok(0);
            }
            self.refill()?;
        }
        let n = buf.len().min(self.out.len() - self.at);
        buf[..n].copy_from_slice(&self.out[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// One frame built a block at a time in a buffer the caller owns and grows, so that a segment's
/// size can follow its compressed length: the caller reads a piece, pushes it, and stops when
/// the frame is big enough. Every method writes at [`FrameBuilder::written`] and panics if `out` has
/// less room than it asks for.
pub struct FrameBuilder {
    len: usize,
    raw_len: usize,
    checksum: Xxh32,
}

impl FrameBuilder {
    /// Bytes [`FrameBuilder::finish`] writes: the end mark and the content checksum.
    pub const END_LEN: usize = 8;

    /// The most bytes [`FrameBuilder::push`] writes for `raw_len` bytes.
    pub fn block_bound(raw_len: usize) -> usize {
        4 + block::get_maximum_output_size(raw_len)
    }

    /// Writes the frame header to the front of `out`.
    pub fn start(out: &mut [u8]) -> FrameBuilder {
        out[..FRAME_PREFIX.len()].copy_from_slice(&FRAME_PREFIX);
        FrameBuilder { len: FRAME_PREFIX.len(), raw_len: 0, checksum: Xxh32::new(0) }
    }

    /// Bytes of frame written so far.
    pub fn written(&self) -> usize {
        self.len
    }

    /// Uncompressed bytes pushed so far.
    pub fn raw_len(&self) -> usize {
        self.raw_len
    }

    /// Appends `raw` (at most one 4 MiB block) as one block; `out` needs
    /// [`FrameBuilder::block_bound`] bytes of room after [`FrameBuilder::written`].
    pub fn push(&mut self, raw: &[u8], out: &mut [u8]) {
        assert!(raw.len() <= BLOCK_MAX, "an lz4 block holds at most 4 MiB");
        if raw.is_empty() {
            return;
        }
        self.len += encode_block(raw, &mut out[self.len..self.len + Self::block_bound(raw.len())]);
        self.raw_len += raw.len();
        self.checksum.update(raw);
    }

    /// Writes the end mark and content checksum; returns the frame's length.
    pub fn finish(self, out: &mut [u8]) -> usize {
        let at = self.len;
        out[at..at + 4].copy_from_slice(&[0, 0, 0, 0]);
        out[at + 4..at + 8].copy_from_slice(&self.checksum.digest().to_le_bytes());
        at + Self::END_LEN
    }
}

/// Writes `raw` as one block (its size field, then its bytes) to the front of `out`, which
/// holds [`FrameBuilder::block_bound`] bytes; returns the bytes written. Compressed in place
/// after the size field, or stored raw when compression does not help, as the Go writer does.
fn encode_block(raw: &[u8], out: &mut [u8]) -> usize {
    let (size_field, payload) = out.split_at_mut(4);
    let n = block::compress_into(raw, payload).expect("output sized by block_bound");
    let size = if n < raw.len() {
        n as u32
    } else {
        payload[..raw.len()].copy_from_slice(raw);
        raw.len() as u32 | UNCOMPRESSED_BIT
    };
    size_field.copy_from_slice(&size.to_le_bytes());
    4 + (size & !UNCOMPRESSED_BIT) as usize
}

/// Decodes one whole object. Accepts everything the v0.3.13 reader accepts: any block size
/// from 64 KB to 4 MB, linked blocks, frames with or without a content checksum or a content
/// size, and the empty uncompressed block `00 00 00 80` that Go writes when a snapshot is a
/// multiple of 4 MiB. Bytes after the end of the first frame are ignored, as Go ignores them.
pub fn decompress(data: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let mut decoder = FrameDecoder::new();
    decoder
        .feed(data, &mut |block| {
            out.extend_from_slice(block);
            Ok(())
        })
        .map_err(|e| match e {
            FeedError::Corrupt(e) => e,
            FeedError::Sink(e) => Error::Lz4(e.to_string()),
        })?;
    decoder.finish()?;
    Ok(out)
}

/// Why [`FrameDecoder::feed`] stopped.
#[derive(Debug)]
pub enum FeedError {
    /// The bytes are not a valid frame.
    Corrupt(Error),
    /// The sink failed.
    Sink(io::Error),
}

/// Decodes one LZ4 frame fed in pieces of any size, handing each block to a sink as soon as it
/// is complete, so an object of any size is decoded in the memory of one block (its compressed
/// form, its decoded form, and for linked blocks 64 KiB of history). [`decompress`] is this
/// with a sink that collects everything.
#[derive(Default)]
pub struct FrameDecoder {
    /// Input not consumed yet: at most one block and the piece that completed it.
    pending: Vec<u8>,
    state: DecoderState,
    flg: u8,
    block_max: usize,
    block: Vec<u8>,
    /// The last 64 KiB decoded, for frames whose blocks are linked.
    history: Vec<u8>,
    checksum: Option<Xxh32>,
    /// The caller checks every decoded byte itself: the content checksum is not computed.
    content_checked_elsewhere: bool,
}

#[derive(Default, PartialEq)]
enum DecoderState {
    #[default]
    Header,
    Blocks,
    /// Inside an uncompressed block with this many bytes to go: passed on as they arrive, so
    /// incompressible data (random blobs, compressed columns) is never held.
    Raw(usize),
    /// Skipping this many bytes of a block checksum.
    Skip(usize),
    ContentChecksum,
    Done,
}

const HISTORY: usize = 64 << 10;

impl FrameDecoder {
    /// A decoder expecting the start of a frame.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Whether the next frame's content checksum is skipped, by a caller that checks every
    /// decoded byte and their number another way (a restore's WAL segments). Set before the
    /// frame's first byte; [`reset`](FrameDecoder::reset) keeps it.
    pub fn set_content_checked_elsewhere(&mut self, yes: bool) {
        self.content_checked_elsewhere = yes;
    }

    /// Expects the start of another frame, keeping the buffers: a restore decodes a frame per
    /// WAL segment, and a fresh decoder's 4 MiB block was a fresh mapping to fault in and zero
    /// every time (a sixth of a WAL-heavy restore's CPU).
    pub fn reset(&mut self) {
        let (mut pending, mut history, block) =
            (std::mem::take(&mut self.pending), std::mem::take(&mut self.history), std::mem::take(&mut self.block));
        pending.clear();
        history.clear();
        // The block's bytes are only ever read where a decode has just written them.
        *self = FrameDecoder {
            pending,
            history,
            block,
            content_checked_elsewhere: self.content_checked_elsewhere,
            ..FrameDecoder::default()
        };
    }

    /// Decodes what `input` completes, calling `sink` with each block in order. Bytes after
    /// the frame's end are ignored.
    pub fn feed(&mut self, input: &[u8], sink: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> Result<(), FeedError> {
        // The common case, a piece that starts where the last one ended cleanly, is read in
        // place; only an incomplete tail is copied.
        let mut pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            let used = self.consume(input, sink)?;
            pending.extend_from_slice(&input[used..]);
        } else {
            pending.extend_from_slice(input);
            let used = self.consume(&pending, sink)?;
            pending.drain(..used);
        }
        if self.state == DecoderState::Done {
            pending.clear();
        }
        self.pending = pending;
        Ok(())
    }

    /// Checks that the frame ended: every block, the end mark and the content checksum seen.
    pub fn finish(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Lz4(what.to_string()));
        match self.state {
            DecoderState::Done => Ok(()),
            DecoderState::Header if self.pending.len() < 4 => bad("not an lz4 frame (too short)"),
            DecoderState::Header => bad("truncated frame header"),
            DecoderState::Blocks if self.pending.len() >= 4 => bad("truncated block"),
            DecoderState::Raw(_) | DecoderState::Skip(_) => bad("truncated block"),
            DecoderState::Blocks => bad("truncated: no end mark"),
            DecoderState::ContentChecksum => bad("truncated: no content checksum"),
        }
    }

    /// Go's reader checks block checksums over the wrong bytes; walstream neither writes nor
    /// trusts them, and skips them.
    fn block_checksum_len(&self) -> usize {
        if self.flg & FLG_BLOCK_CHECKSUM != 0 {
            4
        } else {
            0
        }
    }

    /// Decoded bytes, in order: into the content checksum, the history and the sink.
    fn emit(&mut self, decoded: &[u8], sink: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> Result<(), FeedError> {
        if let Some(checksum) = &mut self.checksum {
            checksum.update(decoded);
        }
        if self.flg & FLG_INDEPENDENT == 0 {
            self.history.extend_from_slice(&decoded[decoded.len().saturating_sub(HISTORY)..]);
            let excess = self.history.len().saturating_sub(HISTORY);
            self.history.drain(..excess);
        }
        sink(decoded).map_err(FeedError::Sink)
    }

    /// Consumes whole parts of the frame from `data`; returns how many bytes.
    fn consume(&mut self, data: &[u8], sink: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> Result<usize, FeedError> {
        let bad = |what: &str| FeedError::Corrupt(Error::Lz4(what.to_string()));
        let mut at = 0;
        loop {
            let rest = &data[at..];
            match self.state {
                DecoderState::Done => return Ok(at),
                DecoderState::Header => {
                    if rest.len() >= 4 && rest[..4] != FRAME_PREFIX[..4] {
                        return Err(bad("not an lz4 frame (bad magic)"));
                    }
                    let (Some(&flg), Some(&bd)) = (rest.get(4), rest.get(5)) else { return Ok(at) };
                    if flg & FLG_VERSION_MASK != FLG_VERSION_1 {
                        return Err(bad("unsupported lz4 frame version"));
                    }
                    self.block_max = match (bd >> 4) & 0x7 {
                        4 => 64 << 10,
                        5 => 256 << 10,
                        6 => 1 << 20,
                        7 => 4 << 20,
                        _ => return Err(bad("invalid block size in frame header")),
                    };
                    let descriptor_end = 6
                        + if flg & FLG_CONTENT_SIZE != 0 { 8 } else { 0 }
                        + if flg & FLG_DICT_ID != 0 { 4 } else { 0 };
                    let Some(&header_checksum) = rest.get(descriptor_end) else { return Ok(at) };
                    if (xxh32(&rest[4..descriptor_end], 0) >> 8) as u8 != header_checksum {
                        return Err(bad("frame header checksum mismatch"));
                    }
                    self.flg = flg;
                    self.checksum =
                        (flg & FLG_CONTENT_CHECKSUM != 0 && !self.content_checked_elsewhere).then(|| Xxh32::new(0));
                    self.state = DecoderState::Blocks;
                    at += descriptor_end + 1;
                }
                DecoderState::Blocks => {
                    let Some(size) = rest.get(..4) else { return Ok(at) };
                    let size = u32::from_le_bytes(size.try_into().expect("4 bytes"));
                    if size == 0 {
                        self.state = if self.flg & FLG_CONTENT_CHECKSUM != 0 {
                            DecoderState::ContentChecksum
                        } else {
                            DecoderState::Done
                        };
                        at += 4;
                        continue;
                    }
                    let len = (size & !UNCOMPRESSED_BIT) as usize;
                    if len > self.block_max {
                        return Err(bad("block larger than the frame's block size"));
                    }
                    if size & UNCOMPRESSED_BIT != 0 {
                        self.state = DecoderState::Raw(len);
                        at += 4;
                        continue;
                    }
                    let whole = 4 + len + self.block_checksum_len();
                    if rest.len() < whole {
                        return Ok(at);
                    }
                    self.block.resize(self.block_max, 0);
                    let payload = &rest[4..4 + len];
                    let n = if self.flg & FLG_INDEPENDENT != 0 {
                        block::decompress_into(payload, &mut self.block)
                    } else {
                        block::decompress_into_with_dict(payload, &mut self.block, &self.history)
                    }
                    .map_err(|e| FeedError::Corrupt(Error::Lz4(format!("corrupt block: {e}"))))?;
                    let block = std::mem::take(&mut self.block);
                    let emitted = self.emit(&block[..n], sink);
                    self.block = block;
                    emitted?;
                    at += whole;
                }
                DecoderState::Raw(0) => {
                    self.state = if self.block_checksum_len() > 0 {
                        DecoderState::Skip(self.block_checksum_len())
                    } else {
                        DecoderState::Blocks
                    }
                }
                DecoderState::Raw(left) => {
                    let n = left.min(rest.len());
                    if n == 0 {
                        return Ok(at);
                    }
                    self.emit(&rest[..n], sink)?;
                    self.state = DecoderState::Raw(left - n);
                    at += n;
                }
                DecoderState::Skip(0) => self.state = DecoderState::Blocks,
                DecoderState::Skip(left) => {
                    let n = left.min(rest.len());
                    if n == 0 {
                        return Ok(at);
                    }
                    self.state = DecoderState::Skip(left - n);
                    at += n;
                }
                DecoderState::ContentChecksum => {
                    let Some(expected) = rest.get(..4) else { return Ok(at) };
                    let expected = u32::from_le_bytes(expected.try_into().expect("4 bytes"));
                    if self.checksum.as_ref().is_some_and(|checksum| checksum.digest() != expected) {
                        return Err(bad("content checksum mismatch"));
                    }
                    self.state = DecoderState::Done;
                    at += 4;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn frames_begin_with_litestream_prefix_and_end_with_endmark() {
        for data in [&b""[..], b"hello", &vec![7u8; 5 << 20]] {
            let framed = compress(data);
            assert_eq!(framed[..7], FRAME_PREFIX, "len {}", data.len());
            let tail = &framed[framed.len() - 8..framed.len() - 4];
            assert_eq!(tail, [0, 0, 0, 0], "end mark before the content checksum");
            assert_eq!(decompress(&framed).unwrap(), data);
        }
    }

    /// Builds a frame by hand the way Go's writer does for a 4 MiB-multiple snapshot: a raw
    /// block, then an empty uncompressed block `00 00 00 80`, then the end mark and checksum.
    #[test]
    fn empty_uncompressed_block_is_accepted() {
        let payload = b"sqlite page";
        let mut frame = FRAME_PREFIX.to_vec();
        frame.extend_from_slice(&(payload.len() as u32 | 0x8000_0000).to_le_bytes());
        frame.extend_from_slice(payload);
        frame.extend_from_slice(&[0x00, 0x00, 0x00, 0x80]);
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(&xxh32(payload).to_le_bytes());
        assert_eq!(decompress(&frame).unwrap(), payload);
    }

    /// A WAL decoder skips the content checksum, and only it: the frame must still be whole.
    #[test]
    fn a_decoder_told_the_content_is_checked_elsewhere_skips_only_the_checksum() {
        let data: Vec<u8> = (0..(5 << 20) as u32).map(|i| (i % 251) as u8 ^ (i >> 13) as u8).collect();
        let mut framed = compress(&data);
        let last = framed.len() - 1;
        framed[last] ^= 0x55;
        let decode = |mut decoder: FrameDecoder, framed: &[u8]| {
            let mut out = Vec::new();
            let fed = decoder.feed(framed, &mut |block| {
                out.extend_from_slice(block);
                Ok(())
            });
            fed.map_err(|_| ()).and_then(|()| decoder.finish().map_err(|_| ())).map(|()| out)
        };
        assert!(decode(FrameDecoder::new(), &framed).is_err(), "a bad content checksum is corrupt by default");
        let trusting = || {
            let mut decoder = FrameDecoder::new();
            decoder.set_content_checked_elsewhere(true);
            decoder
        };
        let mut reset = trusting();
        reset.reset();
        assert!(decode(reset, &framed) == Ok(data), "skipped after a reset too");
        let cut = &framed[..framed.len() - 4];
        assert!(decode(trusting(), cut).is_err(), "a frame cut before its checksum is still truncated");
    }

    /// The streaming writer's frame decodes to what was written, in blocks of at most
    /// `WRITTEN_BLOCK`, and compresses about as well as the one-shot frame's 4 MiB blocks do.
    #[test]
    fn streaming_writer_frames_small_blocks_that_compress_as_well() {
        let data: Vec<u8> = (0..(9 << 20) as u32).map(|i| (i % 251) as u8 ^ (i >> 13) as u8).collect();
        let mut writer = FrameWriter::new(Vec::new());
        for chunk in data.chunks(100_003) {
            writer.write_all(chunk).unwrap();
        }
        let streamed = writer.finish().unwrap();
        assert_eq!(decompress(&streamed).unwrap(), data);
        let (mut decoder, mut largest) = (FrameDecoder::new(), 0);
        decoder
            .feed(&streamed, &mut |block| {
                largest = largest.max(block.len());
                Ok(())
            })
            .unwrap();
        decoder.finish().unwrap();
        assert_eq!(largest, WRITTEN_BLOCK);
        // Each block starts without the last one's 64 KiB of history: a few hundred bytes more
        // a block (588 on this data, which compresses 47:1), 0.2% of a block.
        let (one_shot, blocks) = (compress(&data).len(), data.len().div_ceil(WRITTEN_BLOCK));
        assert!(streamed.len() <= one_shot + blocks * 1024, "{} bytes against {one_shot}", streamed.len());
    }

    /// Incompressible bytes (xorshift64).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let data = noise(5000, 0x9E37_79B9_7F4A_7C15);
        let framed = compress(&data);
        assert_eq!(u32::from_le_bytes(framed[7..11].try_into().unwrap()), data.len() as u32 | 0x8000_0000);
        assert_eq!(decompress(&framed).unwrap(), data);
    }

    #[test]
    fn max_compressed_len_holds_incompressible_data_of_several_blocks() {
        let data = noise(BLOCK_MAX + 1000, 0x2545_F491_4F6C_DD1D);
        let mut out = vec![0u8; max_compressed_len(data.len())];
        let n = compress_into(&data, &mut out);
        assert_eq!(n, FRAME_PREFIX.len() + 4 + BLOCK_MAX + 4 + 1000 + 8, "two raw blocks");
        assert_eq!(decompress(&out[..n]).unwrap(), data);
    }

    /// A stored frame is as long as promised before it is read, decodes to its source, and
    /// pads a source that ends early (a file truncated while read) with zeros.
    #[test]
    fn a_stored_frame_has_its_promised_length_and_decodes_to_its_source() {
        use std::io::Read;
        for len in [0usize, 1, STORED_BLOCK - 1, STORED_BLOCK, STORED_BLOCK * 3 + 17] {
            let data = noise(len, len as u64);
            let mut framed = Vec::new();
            StoredFrame::new(&data[..], len as u64).read_to_end(&mut framed).unwrap();
            assert_eq!(framed.len() as u64, stored_frame_len(len as u64), "{len} bytes");
            assert!(framed.starts_with(&FRAME_PREFIX));
            assert_eq!(decompress(&framed).unwrap(), data, "{len} bytes");
        }
        let data = noise(100_000, 7);
        let mut framed = Vec::new();
        StoredFrame::new(&data[..60_000], 100_000).read_to_end(&mut framed).unwrap();
        assert_eq!(framed.len() as u64, stored_frame_len(100_000));
        let decoded = decompress(&framed).unwrap();
        assert_eq!(&decoded[..60_000], &data[..60_000]);
        assert!(decoded[60_000..].iter().all(|b| *b == 0) && decoded.len() == 100_000);
        let mut cut = Vec::new();
        StoredFrame::new(&data[..], 50).read_to_end(&mut cut).unwrap();
        assert_eq!(decompress(&cut).unwrap(), &data[..50]);
    }

    #[test]
    fn a_frame_built_piece_by_piece_decodes_to_the_pieces_joined() {
        let mut data = noise(300_000, 7);
        data.extend((0..700_000u32).map(|i| (i % 13) as u8));
        let mut out = vec![0u8; FRAME_PREFIX.len()];
        let mut frame = FrameBuilder::start(&mut out);
        for piece in data.chunks(262_144).chain([&b""[..]]) {
            out.resize(frame.written() + FrameBuilder::block_bound(piece.len()), 0);
            frame.push(piece, &mut out);
        }
        assert_eq!(frame.raw_len(), data.len());
        out.resize(frame.written() + FrameBuilder::END_LEN, 0);
        let n = frame.finish(&mut out);
        assert_eq!(n, out.len());
        assert!(n < data.len(), "the repetitive part compressed");
        assert_eq!(decompress(&out).unwrap(), data);
    }

    /// Fed in pieces of every size, including one byte at a time, the decoder gives the same
    /// bytes as the one-shot decoder, block by block, and never more than a block at once.
    #[test]
    fn a_frame_fed_in_pieces_decodes_to_the_same_bytes_one_block_at_a_time() {
        let mut data = noise(BLOCK_MAX + 12_345, 11);
        data.extend((0..(5 << 20) as u32).map(|i| (i % 7) as u8));
        let framed = compress(&data);
        for piece in [1, 3, 4, 7, 1000, 65_536, 1 << 20, framed.len()] {
            let (mut decoder, mut out, mut largest) = (FrameDecoder::new(), Vec::new(), 0);
            // One byte at a time over a prefix only: the whole frame would take minutes.
            let (head, tail) = framed.split_at(if piece == 1 { 20_000 } else { 0 });
            for chunk in head.chunks(1).chain(tail.chunks(piece)) {
                decoder
                    .feed(chunk, &mut |block| {
                        largest = largest.max(block.len());
                        out.extend_from_slice(block);
                        Ok(())
                    })
                    .unwrap();
            }
            decoder.finish().unwrap();
            assert_eq!(out, data, "pieces of {piece}");
            assert!(largest <= BLOCK_MAX, "one block at a time");
        }
        let mut truncated = FrameDecoder::new();
        truncated.feed(&framed[..framed.len() - 5], &mut |_| Ok(())).unwrap();
        assert!(truncated.finish().is_err(), "a frame without its end is an error at finish");
    }

    /// A reset decoder, after a whole frame or one cut off anywhere, decodes the next frame as a
    /// fresh one does: nothing of the last frame's blocks, pending input or checksum leaks in.
    #[test]
    fn a_reset_decoder_decodes_the_next_frame_as_a_fresh_one() {
        let mut first = noise(BLOCK_MAX + 999, 3);
        first.extend((0..(1 << 20) as u32).map(|i| (i % 5) as u8));
        let second: Vec<u8> = (0..(BLOCK_MAX + 77) as u32).map(|i| (i % 13) as u8).chain(noise(5000, 9)).collect();
        let (first_framed, second_framed) = (compress(&first), compress(&second));
        let mut decoder = FrameDecoder::new();
        for cut in [first_framed.len(), first_framed.len() - 3, first_framed.len() / 2, 5, 0] {
            decoder.reset();
            decoder.feed(&first_framed[..cut], &mut |_| Ok(())).unwrap();
            decoder.reset();
            let mut out = Vec::new();
            for chunk in second_framed.chunks(100_003) {
                decoder
                    .feed(chunk, &mut |block| {
                        out.extend_from_slice(block);
                        Ok(())
                    })
                    .unwrap();
            }
            decoder.finish().unwrap();
            assert!(out == second, "after the first frame cut at {cut}");
        }
    }

    #[test]
    fn corruption_and_truncation_are_errors() {
        let framed = compress(&vec![42u8; 100_000]);
        assert!(decompress(&framed[..framed.len() - 3]).is_err(), "truncated");
        let mut bad = framed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(decompress(&bad).is_err(), "content checksum");
        assert!(decompress(b"not lz4 at all").is_err());
    }

    /// xxHash32 with seed 0, written out so the test does not trust the codec it checks.
    fn xxh32(data: &[u8]) -> u32 {
        const P1: u32 = 2654435761;
        const P2: u32 = 2246822519;
        const P3: u32 = 3266489917;
        const P4: u32 = 668265263;
        const P5: u32 = 374761393;
        assert!(data.len() < 16, "the short-input path is enough here");
        let mut h = P5.wrapping_add(data.len() as u32);
        let mut rest = data;
        while rest.len() >= 4 {
            let w = u32::from_le_bytes(rest[..4].try_into().unwrap());
            h = h.wrapping_add(w.wrapping_mul(P3)).rotate_left(17).wrapping_mul(P4);
            rest = &rest[4..];
        }
        for &b in rest {
            h = h.wrapping_add(u32::from(b).wrapping_mul(P5)).rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 15;
        h = h.wrapping_mul(P2);
        h ^= h >> 13;
        h = h.wrapping_mul(P3);
        h ^= h >> 16;
        h
    }
}
