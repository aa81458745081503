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

/// Uncompressed bytes per block: BD `0x70`.
const BLOCK_MAX: usize = 4 << 20;
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
/// end mark and content checksum. Memory is bounded by one 4 MiB block and its compressed form.
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
        let room = BLOCK_MAX - self.block.len();
        let n = buf.len().min(room);
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == BLOCK_MAX {
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
    FRAME_PREFIX.len() + full * FrameBuilder::block_bound(BLOCK_MAX) + FrameBuilder::block_bound(rest) + FrameBuilder::END_LEN
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
    let bad = |what: &str| Error::Lz4(what.to_string());
    let mut input = Input { data, at: 0 };
    if input.take(4).ok_or_else(|| bad("not an lz4 frame (too short)"))? != &FRAME_PREFIX[..4] {
        return Err(bad("not an lz4 frame (bad magic)"));
    }
    let descriptor_start = input.at;
    let flg = input.byte().ok_or_else(|| bad("truncated frame header"))?;
    let bd = input.byte().ok_or_else(|| bad("truncated frame header"))?;
    if flg & FLG_VERSION_MASK != FLG_VERSION_1 {
        return Err(bad("unsupported lz4 frame version"));
    }
    let block_max = match (bd >> 4) & 0x7 {
        4 => 64 << 10,
        5 => 256 << 10,
        6 => 1 << 20,
        7 => 4 << 20,
        _ => return Err(bad("invalid block size in frame header")),
    };
    if flg & FLG_CONTENT_SIZE != 0 {
        input.take(8).ok_or_else(|| bad("truncated frame header"))?;
    }
    if flg & FLG_DICT_ID != 0 {
        input.take(4).ok_or_else(|| bad("truncated frame header"))?;
    }
    let header_checksum = input.byte().ok_or_else(|| bad("truncated frame header"))?;
    if (xxh32(&data[descriptor_start..input.at - 1], 0) >> 8) as u8 != header_checksum {
        return Err(bad("frame header checksum mismatch"));
    }
    let mut out: Vec<u8> = Vec::new();
    loop {
        let size = u32::from_le_bytes(input.take(4).ok_or_else(|| bad("truncated: no end mark"))?.try_into().unwrap());
        if size == 0 {
            break;
        }
        let len = (size & !UNCOMPRESSED_BIT) as usize;
        if len > block_max {
            return Err(bad("block larger than the frame's block size"));
        }
        let payload = input.take(len).ok_or_else(|| bad("truncated block"))?;
        if flg & FLG_BLOCK_CHECKSUM != 0 {
            // Go's reader checks these over the wrong bytes; walstream neither writes nor trusts them.
            input.take(4).ok_or_else(|| bad("truncated block checksum"))?;
        }
        if size & UNCOMPRESSED_BIT != 0 {
            out.extend_from_slice(payload);
            continue;
        }
        let start = out.len();
        out.resize(start + block_max, 0);
        let n = if flg & FLG_INDEPENDENT != 0 {
            block::decompress_into(payload, &mut out[start..])
        } else {
            let (before, after) = out.split_at_mut(start);
            let dict = &before[before.len().saturating_sub(64 << 10)..];
            block::decompress_into_with_dict(payload, after, dict)
        }
        .map_err(|e| Error::Lz4(format!("corrupt block: {e}")))?;
        out.truncate(start + n);
    }
    if flg & FLG_CONTENT_CHECKSUM != 0 {
        let expected = u32::from_le_bytes(input.take(4).ok_or_else(|| bad("truncated: no content checksum"))?.try_into().unwrap());
        if xxh32(&out, 0) != expected {
            return Err(bad("content checksum mismatch"));
        }
    }
    Ok(out)
}

struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.data.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(slice)
    }
    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
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

    #[test]
    fn streaming_writer_matches_one_shot_output() {
        let data: Vec<u8> = (0..(9 << 20) as u32).map(|i| (i % 251) as u8 ^ (i >> 13) as u8).collect();
        let mut writer = FrameWriter::new(Vec::new());
        for chunk in data.chunks(100_003) {
            writer.write_all(chunk).unwrap();
        }
        let streamed = writer.finish().unwrap();
        assert_eq!(streamed, compress(&data));
        assert_eq!(decompress(&streamed).unwrap(), data);
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
