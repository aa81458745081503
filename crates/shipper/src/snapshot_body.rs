//! What a snapshot upload reads: the local LZ4 file, or, when the disk had no room for one, the
//! database file framed as it is read; either sealed by age when the replica encrypts.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use walstream_format::{age, lz4};
use walstream_store::{Body, FileBody};

use crate::meta::LocalSnapshot;
use crate::protocol::PinGate;

/// The body an upload of `snapshot` sends.
pub(crate) fn body_of<'a>(snapshot: &'a LocalSnapshot, gate: &Arc<PinGate>) -> Box<dyn Body + 'a> {
    if snapshot.from_database {
        Box::new(DatabaseFramed { path: &snapshot.path, gate: gate.clone() })
    } else {
        Box::new(FileBody(&snapshot.path))
    }
}

/// The database file as one LZ4 frame of stored blocks, whose length is known before it is
/// read (the uploads must declare it, and there is no room to compress into first). Every read
/// goes through the capturer's [`PinGate`], so no byte is read once the pin no longer vouches
/// for the file; an upload cut off that way fails instead of completing.
struct DatabaseFramed<'a> {
    path: &'a Path,
    gate: Arc<PinGate>,
}

impl Body for DatabaseFramed<'_> {
    fn open(&self) -> std::io::Result<(u64, Box<dyn Read + Send>)> {
        let file = File::open(self.path)?;
        // Pages the app appends after this are in the WAL the restore replays; a file that
        // shrinks while read is padded (see `StoredFrame`), and those pages replayed too.
        let len = file.metadata()?.len();
        let framed = lz4::StoredFrame::new(Gated { file, gate: self.gate.clone() }, len);
        Ok((lz4::stored_frame_len(len), Box::new(framed)))
    }

    fn source(&self) -> String {
        self.path.display().to_string()
    }
}

struct Gated {
    file: File,
    gate: Arc<PinGate>,
}

impl Read for Gated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let open = self.gate.hold();
        if !*open {
            return Err(std::io::Error::other("walstream let go of its read pin before this snapshot was read whole"));
        }
        self.file.read(buf)
    }
}

/// Another body, sealed by age as it is read.
pub(crate) struct Sealed<'a> {
    pub(crate) keys: &'a age::AgeKeys,
    pub(crate) inner: &'a dyn Body,
}

impl Body for Sealed<'_> {
    fn open(&self) -> std::io::Result<(u64, Box<dyn Read + Send>)> {
        let (len, reader) = self.inner.open()?;
        let sealed = self.keys.sealing_reader(reader, len);
        Ok((sealed.len(), Box::new(sealed)))
    }

    fn source(&self) -> String {
        self.inner.source()
    }
}
