//! `file://` replicas: the replica root is a local directory.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::{Body, Error, ObjectMeta, ObjectStore, Version};

/// Suffix of files being written; listings skip them, as Litestream's do.
const TEMP_SUFFIX: &str = ".tmp";

/// A replica kept in a local directory. Each put writes `<key>.<random>.tmp`, fsyncs it, renames
/// it into place and fsyncs the directory, so a crash leaves the old object or the new one.
/// Creation time is the file's mtime (what Litestream reads).
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
}

impl FileStore {
    /// A store rooted at `root`, which need not exist yet.
    pub fn new(root: impl Into<PathBuf>) -> FileStore {
        FileStore { root: root.into() }
    }

    /// The replica root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, Error> {
        let bad = key.is_empty() || key.starts_with('/') || key.split('/').any(|part| part == ".." || part.is_empty());
        if bad {
            return Err(Error::InvalidKey { key: key.to_string() });
        }
        Ok(self.root.join(key))
    }
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.display().to_string();
    move |source| Error::Io { op, path, source }
}

#[async_trait]
impl ObjectStore for FileStore {
    async fn put(&self, key: &str, body: Bytes) -> Result<(), Error> {
        let path = self.path_of(key)?;
        tokio::task::spawn_blocking(move || write_atomically(&path, |file| std::io::Write::write_all(file, &body)))
            .await
            .expect("put task panicked")
    }

    async fn put_body(&self, key: &str, body: &dyn Body) -> Result<(), Error> {
        let path = self.path_of(key)?;
        let source = body.source();
        let (len, mut input) = body.open().map_err(|e| Error::Io { op: "open", path: source.clone(), source: e })?;
        tokio::task::spawn_blocking(move || {
            // A read error is the source's, not the replica's: say which file.
            let mut read_error = None;
            let result = write_atomically(&path, |file| {
                let copied = std::io::copy(&mut ReadErrors(&mut input, &mut read_error), file)?;
                if copied != len {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the source ended early"));
                }
                Ok(())
            });
            match read_error {
                Some(e) => Err(Error::Io { op: "read", path: source, source: e }),
                None => result,
            }
        })
        .await
        .expect("put task panicked")
    }

    async fn get(&self, key: &str) -> Result<Bytes, Error> {
        let path = self.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(Bytes::from(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound { key: key.to_string() }),
            Err(e) => Err(io_error("read", &path)(e)),
        }
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, Error> {
        self.get_range_into(key, offset, len, BytesMut::new()).await
    }

    fn reads_into_buffers(&self) -> bool {
        true
    }

    async fn get_range_into(&self, key: &str, offset: u64, len: u64, mut buf: BytesMut) -> Result<Bytes, Error> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let file = match std::fs::File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotFound { key }),
                Err(e) => return Err(io_error("open", &path)(e)),
            };
            let size = file.metadata().map_err(io_error("stat", &path))?.len();
            let want = usize::try_from(len.min(size.saturating_sub(offset))).unwrap_or(0);
            read_exact_into(&file, &mut buf, want, offset).map_err(io_error("read", &path))?;
            Ok(buf.freeze())
        })
        .await
        .expect("read task panicked")
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, Error> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || list_blocking(&root, &prefix)).await.expect("list task panicked")
    }

    async fn delete(&self, key: &str) -> Result<(), Error> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", &path)(e)),
        }
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, Version)>, Error> {
        let path = self.path_of(key)?;
        tokio::task::spawn_blocking(move || {
            let _lock = CasLock::take(&path)?;
            read_versioned(&path)
        })
        .await
        .expect("get task panicked")
    }

    async fn put_if(&self, key: &str, body: Bytes, expected: Option<Version>) -> Result<Version, Error> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let _lock = CasLock::take(&path)?;
            if read_versioned(&path)?.map(|(_, version)| version) != expected {
                return Err(Error::PreconditionFailed { key });
            }
            write_atomically(&path, |file| std::io::Write::write_all(file, &body))?;
            Ok(read_versioned(&path)?.expect("just written").1)
        })
        .await
        .expect("put task panicked")
    }

    fn kind(&self) -> &'static str {
        "file"
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

/// An exclusive `flock` on `<path>.lock.tmp` (the suffix keeps it out of listings), which
/// serialises compare-and-swap between processes on one machine.
struct CasLock {
    _held: std::fs::File,
}

impl CasLock {
    fn take(path: &Path) -> Result<CasLock, Error> {
        let dir = path.parent().expect("a key always has a parent under the root");
        std::fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
        let lock_path = PathBuf::from(format!("{}.lock{TEMP_SUFFIX}", path.display()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        // SAFETY: flock on a descriptor this function owns; released when it is closed.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
            return Err(io_error("lock", &lock_path)(std::io::Error::last_os_error()));
        }
        Ok(CasLock { _held: file })
    }
}

/// The file and its version: inode and modification time, which every replacing rename
/// changes (a new inode, written now).
fn read_versioned(path: &Path) -> Result<Option<(Bytes, Version)>, Error> {
    use std::os::unix::fs::MetadataExt;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("open", path)(e)),
    };
    let meta = file.metadata().map_err(io_error("stat", path))?;
    let body = std::fs::read(path).map_err(io_error("read", path))?;
    let version =
        meta.ino().rotate_left(32) ^ (meta.mtime() as u64).wrapping_mul(1_000_000_007) ^ meta.mtime_nsec() as u64;
    Ok(Some((Bytes::from(body), version)))
}

/// Creates `path` with what `fill` writes, all or nothing.
/// A reader that keeps its error aside, so a failed copy can tell a read from a write.
struct ReadErrors<'a, R>(&'a mut R, &'a mut Option<std::io::Error>);

impl<R: std::io::Read> std::io::Read for ReadErrors<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            let copy = std::io::Error::new(e.kind(), e.to_string());
            *self.1 = Some(e);
            copy
        })
    }
}

fn write_atomically(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<(), Error> {
    let dir = path.parent().expect("a key always has a parent under the root");
    std::fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
    // A random temp name lets two writers of the same key (a retry racing a slow first attempt)
    // never share a half-written file.
    let temp = PathBuf::from(format!("{}.{:08x}{TEMP_SUFFIX}", path.display(), rand::random::<u32>()));
    let result = (|| {
        let mut file = std::fs::File::create(&temp).map_err(io_error("create", &temp))?;
        fill(&mut file).map_err(io_error("write", &temp))?;
        file.sync_all().map_err(io_error("fsync", &temp))?;
        std::fs::rename(&temp, path).map_err(io_error("rename", &temp))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("fsync", dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

fn list_blocking(root: &Path, prefix: &str) -> Result<Vec<ObjectMeta>, Error> {
    // Walk only the deepest directory the prefix names, not the whole replica.
    let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
    let start = if dir_part.is_empty() { root.to_path_buf() } else { root.join(dir_part) };
    let mut out = Vec::new();
    let mut stack = vec![start];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("list", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error("list", &dir))?;
            let path = entry.path();
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Removed between read_dir and stat: a concurrent delete, not an error.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("stat", &path)(e)),
            };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(relative) = path.strip_prefix(root) else { continue };
            let key = relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            if key.ends_with(TEMP_SUFFIX) || !key.starts_with(prefix) {
                continue;
            }
            out.push(ObjectMeta { key, size: meta.len(), created: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH) });
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Reads `want` bytes at `offset` into `buf`, which it empties first, without zeroing them
/// beforehand: a restore reads every stored byte through buffers of varying lengths, and
/// zeroing each one's newly used part before the read overwrote it cost a memset of the replica.
fn read_exact_into(file: &std::fs::File, buf: &mut BytesMut, want: usize, offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    buf.clear();
    buf.reserve(want);
    while buf.len() < want {
        let have = buf.len();
        let spare = &mut buf.spare_capacity_mut()[..want - have];
        let at = libc::off_t::try_from(offset + have as u64).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by `buf`; pread writes at
        // most that many and returns how many it wrote.
        let read = unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at) };
        match read {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => {
                // SAFETY: pread initialised the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(have + n as usize) }
            }
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_passes_conformance() {
        let dir = tempfile::tempdir().unwrap();
        crate::conformance::run(&FileStore::new(dir.path().join("replica"))).await;
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        for key in ["", "/etc/passwd", "a/../../b", "a//b"] {
            assert!(matches!(store.put(key, Bytes::new()).await, Err(Error::InvalidKey { .. })), "{key}");
        }
    }
}
