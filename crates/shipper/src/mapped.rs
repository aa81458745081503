//! A read-only memory map of part of a shadow file, so an uploader compresses the page cache in
//! place instead of copying it into a buffer first.
//!
//! A mapped page that the file no longer covers raises SIGBUS when touched. That cannot happen
//! here because of how the shadow is kept: bytes below the published end never change, every
//! truncation of an index (`ShadowIndex::finish`, a crash's tail cut at start-up) stays at or
//! above that end, and the capturer cuts or reuses a shadow file only after every replica's
//! position has passed it, which an uploader publishes only after its map is gone. What a map
//! gives up against `pread` is the error return on a disk read failure: such a page raises
//! SIGBUS too. Shadow pages are nearly always still cached, written moments before.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

pub(crate) struct MappedRange {
    base: *mut libc::c_void,
    map_len: usize,
    /// From the page boundary the map starts at to the first byte asked for.
    skip: usize,
    len: usize,
}

impl MappedRange {
    /// Maps `len` bytes of `file` from `start`; `start + len` must not pass the file's end.
    pub(crate) fn new(file: &File, start: u64, len: usize) -> io::Result<MappedRange> {
        if len == 0 {
            return Ok(MappedRange { base: std::ptr::null_mut(), map_len: 0, skip: 0, len: 0 });
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let aligned = start - start % page;
        let skip = (start - aligned) as usize;
        let map_len = skip + len;
        let offset = libc::off_t::try_from(aligned).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh read-only shared mapping of an open file; no Rust object aliases it.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), offset)
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MappedRange { base, map_len, skip, len })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the map covers `skip + len` readable bytes for as long as `self` lives, and
        // (see the module's note) the file keeps covering them and nothing writes them.
        unsafe { std::slice::from_raw_parts((self.base as *const u8).add(self.skip), self.len) }
    }
}

impl Drop for MappedRange {
    fn drop(&mut self) {
        if self.map_len > 0 {
            // SAFETY: `base` and `map_len` are exactly what mmap returned and took.
            unsafe { libc::munmap(self.base, self.map_len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_map_holds_exactly_the_range_asked_for_from_any_offset() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        for (start, len) in [(0, 20_000), (1, 100), (4095, 2), (4096, 4096), (12_345, 7_655), (500, 0)] {
            let map = MappedRange::new(&file, start as u64, len).unwrap();
            assert_eq!(map.bytes(), &data[start..start + len], "{start}+{len}");
        }
    }
}
