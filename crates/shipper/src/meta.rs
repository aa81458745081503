//! The local metadata directory beside the database: `.<name>-walstream/`.
//!
//! ```text
//! .<name>-walstream/generation                               current generation id
//! .<name>-walstream/generations/<gen>/wal/<index>.wal        shadow WAL, one file per index
//! .<name>-walstream/generations/<gen>/snapshots/<index>.snapshot.lz4   the generation's snapshot
//! ```
//! The layout mirrors Litestream's `.<name>-litestream/`, under its own name so both tools can
//! watch one database during a migration without touching each other's state.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use walstream_format::lz4::FrameWriter;
use walstream_format::{name, GenerationId};

use crate::error::{io_err, Error};

/// The generation's latest snapshot, compressed on local disk, ready for any replica that lacks
/// it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSnapshot {
    /// The WAL index the snapshot was taken at.
    pub index: u32,
    /// The LZ4-framed file, ready to upload as is; with `from_database`, the database file.
    pub path: PathBuf,
    /// When it was taken: a later snapshot at the same index is a different one.
    pub created: std::time::SystemTime,
    /// Not stored: the disk had no room for it, so each upload frames the database file itself
    /// (in stored blocks, whose length is known up front), under the capturer's pin, which stays
    /// until every replica holds it.
    pub from_database: bool,
}

pub(crate) struct MetaDir {
    root: PathBuf,
}

impl MetaDir {
    pub(crate) fn for_db(db_path: &Path, override_dir: Option<&Path>) -> MetaDir {
        if let Some(dir) = override_dir {
            return MetaDir { root: dir.to_path_buf() };
        }
        let dir = db_path.parent().unwrap_or(Path::new("."));
        let file = db_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        MetaDir { root: dir.join(format!(".{file}-walstream")) }
    }

    /// Creates the directory if it is missing.
    pub(crate) fn create(&self) -> Result<(), Error> {
        fs::create_dir_all(&self.root).map_err(io_err("create", &self.root))
    }

    fn generation_file(&self) -> PathBuf {
        self.root.join("generation")
    }

    pub(crate) fn generation_dir(&self, generation: &GenerationId) -> PathBuf {
        self.root.join(name::GENERATIONS_DIR).join(generation.to_string())
    }

    pub(crate) fn wal_dir(&self, generation: &GenerationId) -> PathBuf {
        self.generation_dir(generation).join("wal")
    }

    fn snapshots_dir(&self, generation: &GenerationId) -> PathBuf {
        self.generation_dir(generation).join("snapshots")
    }

    /// Who this replicator is to a replica lease: the host name and a random id made once per
    /// metadata directory, so walstream restarted on the same disk is recognised as the same
    /// holder while another machine or a fresh container is not.
    pub(crate) fn lease_holder(&self) -> Result<String, Error> {
        let path = self.root.join("lease-holder");
        if let Some(id) = fs::read_to_string(&path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
            return Ok(id);
        }
        let mut host = [0u8; 256];
        // SAFETY: gethostname writes at most `host.len()` bytes into the buffer it is given.
        let host = if unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) } == 0 {
            String::from_utf8_lossy(&host[..host.iter().position(|&b| b == 0).unwrap_or(host.len())]).into_owned()
        } else {
            "unknown-host".to_string()
        };
        let id = format!("{} {}", host.replace(char::is_whitespace, "-"), GenerationId::random());
        fs::create_dir_all(&self.root).map_err(io_err("create directory", &self.root))?;
        write_atomic(&path, format!("{id}\n").as_bytes())?;
        Ok(id)
    }

    /// The current generation, if the file holds a valid one.
    pub(crate) fn read_generation(&self) -> Option<GenerationId> {
        fs::read_to_string(self.generation_file()).ok()?.trim().parse().ok()
    }

    /// Creates the directories of a new generation.
    pub(crate) fn create_generation(&self, generation: &GenerationId) -> Result<(), Error> {
        for dir in [self.wal_dir(generation), self.snapshots_dir(generation)] {
            fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        }
        Ok(())
    }

    /// Makes `generation` current, atomically.
    pub(crate) fn write_generation(&self, generation: &GenerationId) -> Result<(), Error> {
        let path = self.generation_file();
        write_atomic(&path, format!("{generation}\n").as_bytes())
    }

    /// Deletes every generation directory.
    pub(crate) fn clean_all(&self) {
        self.remove_generations_but(None);
    }

    /// Deletes every generation directory but `keep`, and every leftover temp file.
    pub(crate) fn clean(&self, keep: &GenerationId) {
        // Versions before 0.1 kept a shipped shadow file here for reuse, up to 64 MiB.
        let _ = fs::remove_file(self.root.join("spare.wal"));
        self.remove_generations_but(Some(keep));
    }

    fn remove_generations_but(&self, keep: Option<&GenerationId>) {
        let Ok(entries) = fs::read_dir(self.root.join(name::GENERATIONS_DIR)) else {
            return;
        };
        let keep = keep.map(GenerationId::to_string);
        for entry in entries.flatten() {
            if keep.as_deref() != Some(&*entry.file_name().to_string_lossy()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Shadow indexes present for `generation` as raw files, ascending.
    pub(crate) fn shadow_indexes(&self, generation: &GenerationId) -> Vec<u32> {
        crate::shadow::indexes_in(&self.wal_dir(generation))
    }

    /// The shadow files below `index`, raw and spooled, ascending by index.
    pub(crate) fn shadow_files_below(&self, generation: &GenerationId, index: u32) -> Vec<(u32, PathBuf)> {
        let mut files: Vec<(u32, PathBuf)> = fs::read_dir(self.wal_dir(generation))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let file_name = e.file_name().to_string_lossy().into_owned();
                let index =
                    name::parse_shadow_wal_file_name(&file_name).or_else(|| name::parse_spool_file_name(&file_name))?;
                Some((index, e.path()))
            })
            .filter(|(i, _)| *i < index)
            .collect();
        files.sort();
        files
    }

    /// The generation's latest completed snapshot.
    pub(crate) fn local_snapshot(&self, generation: &GenerationId) -> Option<LocalSnapshot> {
        self.local_snapshots(generation).into_iter().max_by_key(|s| (s.index, s.created))
    }

    fn local_snapshots(&self, generation: &GenerationId) -> Vec<LocalSnapshot> {
        let Ok(entries) = fs::read_dir(self.snapshots_dir(generation)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let file_name = e.file_name().to_string_lossy().into_owned();
                let index = u32::from_str_radix(file_name.strip_suffix(".snapshot.lz4")?, 16).ok()?;
                let created = e.metadata().ok()?.modified().ok()?;
                Some(LocalSnapshot { index, path: e.path(), created, from_database: false })
            })
            .collect()
    }

    /// Deletes local snapshots below `index`. The caller keeps the one before the latest, which
    /// an uploader may still be reading.
    pub(crate) fn remove_snapshots_below(&self, generation: &GenerationId, index: u32) {
        for old in self.local_snapshots(generation).into_iter().filter(|s| s.index < index) {
            let _ = fs::remove_file(old.path);
        }
    }

    /// Compresses the database file, as it is now, into a snapshot at WAL index `index`, the
    /// index the capturer is in, and puts it in place ([`UnsealedSnapshot::seal`]).
    pub(crate) fn write_snapshot(
        &self,
        generation: &GenerationId,
        index: u32,
        db_file: &fs::File,
        buf: &mut [u8],
    ) -> Result<LocalSnapshot, Error> {
        self.write_unsealed_snapshot(generation, index, db_file, buf)?.seal()
    }

    /// Compresses the database file, as it is now, into a snapshot at WAL index `index`, the
    /// index the capturer is in, under a temporary name: only this needs the capturer's pin.
    ///
    /// Every earlier index is wholly in the file: SQLite restarts or truncates the WAL only after
    /// back-filling all of it. Pages of index `index` may be back-filled while the file is read;
    /// restore replays that index from offset 0 over the snapshot, so the result is consistent
    /// (the argument Litestream's snapshots rest on too).
    pub(crate) fn write_unsealed_snapshot(
        &self,
        generation: &GenerationId,
        index: u32,
        db_file: &fs::File,
        buf: &mut [u8],
    ) -> Result<UnsealedSnapshot, Error> {
        use std::io::Write;
        let path = self.snapshots_dir(generation).join(format!("{index:08x}.snapshot.lz4"));
        let temp = path.with_extension("lz4.tmp");
        let written = (|| {
            let file = fs::File::create(&temp).map_err(io_err("create", &temp))?;
            let mut writer = FrameWriter::new(std::io::BufWriter::new(file));
            let mut offset = 0u64;
            loop {
                let n = db_file.read_at(buf, offset).map_err(io_err("read", "database file"))?;
                if n == 0 {
                    break;
                }
                writer.write_all(&buf[..n]).map_err(io_err("write", &temp))?;
                offset += n as u64;
            }
            writer
                .finish()
                .map_err(io_err("write", &temp))?
                .into_inner()
                .map_err(|e| io_err("write", &temp)(e.into_error()))
        })();
        match written {
            Ok(file) => Ok(UnsealedSnapshot { index, file, temp, path }),
            Err(e) => {
                // A full disk must get its space back.
                let _ = fs::remove_file(&temp);
                Err(e)
            }
        }
    }
}

/// A snapshot written whole under its temporary name, not yet fsynced or in place. Dropped
/// unsealed, it is removed.
pub(crate) struct UnsealedSnapshot {
    index: u32,
    file: fs::File,
    temp: PathBuf,
    path: PathBuf,
}

impl UnsealedSnapshot {
    /// Fsyncs the snapshot and renames it into place: an fsync of a compressed 12 MB database
    /// took 8 to 12 ms, which need not be spent under the pin.
    pub(crate) fn seal(mut self) -> Result<LocalSnapshot, Error> {
        // On an error `drop` removes the temporary file.
        self.file.sync_all().map_err(io_err("fsync", &self.temp))?;
        fs::rename(&self.temp, &self.path).map_err(io_err("rename", &self.temp))?;
        // In place: nothing is left for `drop` to remove.
        self.temp = PathBuf::new();
        let path = std::mem::take(&mut self.path);
        let created = fs::metadata(&path).and_then(|m| m.modified()).map_err(io_err("stat", &path))?;
        Ok(LocalSnapshot { index: self.index, path, created, from_database: false })
    }
}

impl Drop for UnsealedSnapshot {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let temp = path.with_extension("tmp");
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    }
    fs::write(&temp, data).map_err(io_err("write", &temp))?;
    fs::File::open(&temp).and_then(|f| f.sync_all()).map_err(io_err("fsync", &temp))?;
    fs::rename(&temp, path).map_err(io_err("rename", &temp))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_snapshot_is_in_place_only_once_sealed_and_an_unsealed_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaDir::for_db(&dir.path().join("db"), None);
        let id = GenerationId::random();
        fs::create_dir_all(meta.snapshots_dir(&id)).unwrap();
        let db = dir.path().join("db");
        let contents: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&db, &contents).unwrap();
        let db_file = fs::File::open(&db).unwrap();
        let mut buf = vec![0u8; 64 << 10];

        let unsealed = meta.write_unsealed_snapshot(&id, 3, &db_file, &mut buf).unwrap();
        assert!(meta.local_snapshots(&id).is_empty(), "not a snapshot before it is sealed");
        drop(unsealed);
        assert_eq!(names(&meta.snapshots_dir(&id)), Vec::<String>::new(), "dropped unsealed, nothing is left");

        let sealed = meta.write_unsealed_snapshot(&id, 3, &db_file, &mut buf).unwrap().seal().unwrap();
        assert_eq!(names(&meta.snapshots_dir(&id)), vec!["00000003.snapshot.lz4".to_string()]);
        assert_eq!((sealed.index, sealed.from_database), (3, false));
        let framed = fs::read(&sealed.path).unwrap();
        assert_eq!(walstream_format::lz4::decompress(&framed).unwrap(), contents);
    }
}
