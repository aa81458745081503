//! LZ4 framing exactly as Litestream v0.3.13 writes it (spec §2.3).
//!
//! Every object is one standard LZ4 frame with FLG `0x64` (version 1, independent blocks,
//! content checksum) and BD `0x70` (4 MiB blocks). Block checksums are never written: the Go
//! reader v0.3.13 uses checks them over the wrong bytes and rejects standard ones. Exactly one
//! frame per object: the Go reader silently stops after the first.

use std::io::{self, Read, Write};

use lz4_flex::frame::{BlockMode, BlockSize, FrameDecoder, FrameEncoder, FrameInfo};

use crate::Error;

/// The first 7 bytes of every object walstream or Litestream writes: magic, FLG, BD, HC.
pub const FRAME_PREFIX: [u8; 7] = [0x04, 0x22, 0x4D, 0x18, 0x64, 0x70, 0xB9];

fn frame_info() -> FrameInfo {
    FrameInfo::new()
        .block_size(BlockSize::Max4MB)
        .block_mode(BlockMode::Independent)
        .content_checksum(true)
        .block_checksums(false)
}

/// A writer that LZ4-frames everything written to it; call [`FrameWriter::finish`] to write the
/// end mark and content checksum. Memory is bounded by one 4 MiB block.
pub struct FrameWriter<W: Write> {
    encoder: FrameEncoder<W>,
}

impl<W: Write> FrameWriter<W> {
    /// Starts a frame on `inner`.
    pub fn new(inner: W) -> FrameWriter<W> {
        FrameWriter { encoder: FrameEncoder::with_frame_info(frame_info(), inner) }
    }

    /// Ends the frame and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        self.encoder.finish().map_err(io::Error::other)
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.encoder.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.encoder.flush()
    }
}

/// Compresses `data` into one frame.
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut writer = FrameWriter::new(Vec::with_capacity(data.len() / 2 + 64));
    writer.write_all(data).expect("writing to a Vec cannot fail");
    writer.finish().expect("writing to a Vec cannot fail")
}

/// A reader that decodes one LZ4 frame from `inner`, verifying the content checksum at its end.
pub fn decoder<R: Read>(inner: R) -> impl Read {
    FrameDecoder::new(inner)
}

/// Decodes one whole object. Accepts everything the v0.3.13 reader accepts, including the empty
/// uncompressed block `00 00 00 80` that Go writes when a snapshot is a multiple of 4 MiB.
pub fn decompress(data: &[u8]) -> Result<Vec<u8>, Error> {
    if data.len() < 4 || data[..4] != FRAME_PREFIX[..4] {
        return Err(Error::Lz4("not an lz4 frame (bad magic)".to_string()));
    }
    let mut out = Vec::with_capacity(data.len() * 2);
    FrameDecoder::new(data).read_to_end(&mut out).map_err(|e| Error::Lz4(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
