//! Segments: the LZ4 frame of one range of a shadow index, as it goes up as one object.

use std::fs::File;

use bytes::{Bytes, BytesMut};
use walstream_format::lz4;

use crate::mapped::MappedRange;

/// A segment ends once its frame reaches this many bytes. Counting compressed bytes, not raw
/// ones, keeps a PUT's memory bounded whatever the data while compressible WAL (a saturated
/// writer's compresses ten to one) takes fewer requests, each a Class A operation on GCS: a
/// 10 s saturated writer made 1,082 to 1,496 PUTs at a 1 MiB raw bound, 530 and 554 with this.
/// Segments may end inside a transaction; restore only applies whole transactions.
pub(crate) const SEGMENT_TARGET_BYTES: usize = 1 << 20;

/// Uncompressed bytes per segment at most: a restore holds one whole segment in memory.
pub(crate) const MAX_SEGMENT_RAW_BYTES: usize = 16 << 20;

/// Shadow bytes read and compressed at a time: one LZ4 block.
pub(crate) const PIECE_BYTES: usize = 256 << 10;

/// Where a segment's bytes come from.
pub(crate) enum Piece<'a> {
    /// A shadow file, mapped a piece at a time.
    Mapped(&'a File),
    /// The live WAL, read a piece at a time into the buffer given, which the caller keeps: a
    /// fresh piece-sized buffer for every piece was an `mmap` and 64 page faults each.
    Read(&'a File, &'a mut Vec<u8>),
    /// Bytes already in memory (a spooled record, decoded), offsets counted from its start.
    Slice(&'a [u8]),
}

/// LZ4-frames the bytes from `start` toward `limit` into `framed`'s buffer, a piece at a time
/// straight from the page cache, until the frame reaches [`SEGMENT_TARGET_BYTES`]; returns the
/// frame and the raw bytes it holds. The buffer is reused: once the store drops the returned
/// bytes, the next call's `resize` takes the same allocation back.
pub(crate) fn frame_segment(
    mut source: Piece<'_>,
    start: u64,
    limit: u64,
    framed: &mut BytesMut,
) -> std::io::Result<(Bytes, u64)> {
    use std::os::unix::fs::FileExt;
    framed.clear();
    // Reserved whole up front: grown block by block, the buffer doubled past what any frame needs.
    framed.reserve(SEGMENT_TARGET_BYTES + lz4::FrameBuilder::block_bound(PIECE_BYTES) + lz4::FrameBuilder::END_LEN);
    framed.resize(lz4::FRAME_PREFIX.len(), 0);
    let mut frame = lz4::FrameBuilder::start(framed);
    let end = limit.min(start + MAX_SEGMENT_RAW_BYTES as u64);
    let mut at = start;
    while at < end && frame.written() < SEGMENT_TARGET_BYTES {
        let len = ((end - at) as usize).min(PIECE_BYTES);
        // Mapped, not read: copying the shadow into a buffer before compressing it was a tenth
        // of walstream's CPU under a saturated writer. One piece at a time, because mapped pages
        // count in walstream's RSS while mapped: a whole segment's took its peak from 15.5 MiB
        // to 25.7 MiB.
        let mapped;
        let piece = match &mut source {
            Piece::Mapped(file) => {
                mapped = MappedRange::new(file, at, len)?;
                mapped.bytes()
            }
            Piece::Read(file, read_buf) => {
                read_buf.resize(len, 0);
                file.read_exact_at(read_buf, at)?;
                &read_buf[..]
            }
            Piece::Slice(bytes) => bytes
                .get(at as usize..at as usize + len)
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?,
        };
        framed.resize(frame.written() + lz4::FrameBuilder::block_bound(len), 0);
        frame.push(piece, framed);
        at += len as u64;
    }
    framed.resize(frame.written() + lz4::FrameBuilder::END_LEN, 0);
    let n = frame.finish(framed);
    framed.truncate(n);
    Ok((framed.split().freeze(), at - start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// 3 MiB that does not compress, then 20 MiB that does: segments end at the compressed
    /// target in the first part and at the raw bound in the second, every one decodes to its
    /// range, and all after the first reuse the first one's allocation.
    #[test]
    fn segments_end_at_the_compressed_target_or_the_raw_bound_in_one_reused_buffer() {
        let mut data: Vec<u8> = (0..3u64 << 20)
            .map(|i| {
                let z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                (z ^ (z >> 31)) as u8
            })
            .collect();
        data.extend((0..20u32 << 20).map(|i| (i % 4000) as u8));
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let mut framed = BytesMut::new();
        let (mut at, mut lens, mut first) = (0u64, Vec::new(), None);
        while at < data.len() as u64 {
            let (body, len) = frame_segment(Piece::Mapped(&file), at, data.len() as u64, &mut framed).unwrap();
            assert_eq!(lz4::decompress(&body).unwrap(), data[at as usize..(at + len) as usize]);
            assert!(
                body.len()
                    <= SEGMENT_TARGET_BYTES + lz4::FrameBuilder::block_bound(PIECE_BYTES) + lz4::FrameBuilder::END_LEN
            );
            let ptr = body.as_ptr() as usize;
            let first = *first.get_or_insert(ptr);
            assert!((first..first + (2 << 20)).contains(&ptr), "segment at {at} got a new buffer");
            lens.push(len >> 20);
            at += len;
        }
        assert_eq!(lens, [1, 1, 1, 16, 4], "MiB of raw WAL per segment");
    }

    #[test]
    fn a_segment_stops_at_its_limit_and_holds_an_upload_in_flight() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[5u8; 1000]).unwrap();
        let mut framed = BytesMut::new();
        let (held, len) = frame_segment(Piece::Mapped(&file), 100, 700, &mut framed).unwrap();
        assert_eq!(len, 600);
        // While a frame is still held (an upload in flight), the next one must not overwrite it.
        let (next, _) = frame_segment(Piece::Mapped(&file), 0, 10, &mut framed).unwrap();
        assert_eq!(lz4::decompress(&held).unwrap(), [5u8; 600]);
        assert_eq!(lz4::decompress(&next).unwrap(), [5u8; 10]);
    }
}
