//! Watching a `dir` entry with `watch: true` for files created or deleted after start, by
//! inotify with the directory events only (create, delete, rename). A watch with `IN_MODIFY`,
//! which the notify crate always sets, makes the kernel queue an event on every write any app
//! makes in the directory: for a saturated writer that was a tenth of its CPU.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc::UnboundedSender;

/// A file appeared in or left a watched directory (or one below it, when recursive).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DirEvent {
    Created(PathBuf),
    Removed(PathBuf),
}

const MASK: u32 = libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO | libc::IN_ONLYDIR;

/// Starts watching `dir` (and the directories below it when `recursive`, walstream's own state
/// excepted) on a thread of its own, which sends each event tagged with `id` and ends once the
/// receiver is gone. The watch is in place when this returns, so a scan made after it misses
/// nothing.
pub(crate) fn watch(
    dir: &Path,
    recursive: bool,
    id: usize,
    events: UnboundedSender<(usize, DirEvent)>,
) -> std::io::Result<()> {
    // SAFETY: inotify_init1(2) with valid flags; the descriptor is owned by `Inotify` below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut inotify = Inotify { fd, dirs: HashMap::new(), recursive };
    inotify.add_tree(dir, None)?;
    std::thread::Builder::new().name("dir-watch".into()).spawn(move || inotify.run(id, &events))?;
    Ok(())
}

struct Inotify {
    fd: i32,
    /// The directory each watch descriptor stands for.
    dirs: HashMap<i32, PathBuf>,
    recursive: bool,
}

impl Drop for Inotify {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.fd) };
    }
}

impl Inotify {
    /// Watches `dir` and, when recursive, every directory below it; with `found`, reports the
    /// files already there (a directory created after start may hold some before its watch).
    fn add_tree(&mut self, dir: &Path, found: Option<&mut Vec<DirEvent>>) -> std::io::Result<()> {
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
        // SAFETY: a valid descriptor and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd, path.as_ptr(), MASK) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.dirs.insert(wd, dir.to_path_buf());
        let mut found = found;
        for entry in std::fs::read_dir(dir)?.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() && self.recursive && !is_walstream_state(&entry.path()) {
                self.add_tree(&entry.path(), found.as_deref_mut())?;
            } else if kind.is_file() {
                if let Some(found) = found.as_deref_mut() {
                    found.push(DirEvent::Created(entry.path()));
                }
            }
        }
        Ok(())
    }

    fn run(mut self, id: usize, events: &UnboundedSender<(usize, DirEvent)>) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: reads into a buffer of the length given.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!(error = %std::io::Error::last_os_error(), "the directory watch failed; databases created from now on need a restart");
                return;
            }
            let mut found = Vec::new();
            let mut at = 0usize;
            let head = std::mem::size_of::<libc::inotify_event>();
            while at + head <= n as usize {
                // SAFETY: the kernel wrote a whole event header here; read unaligned.
                let event: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name_bytes = &buf[at + head..at + head + event.len as usize];
                let name = std::ffi::OsStr::from_bytes(name_bytes.split(|&b| b == 0).next().unwrap_or_default());
                at += head + event.len as usize;
                let Some(dir) = self.dirs.get(&event.wd).cloned() else { continue };
                if event.mask & libc::IN_IGNORED != 0 {
                    self.dirs.remove(&event.wd);
                    continue;
                }
                let path = dir.join(name);
                let created = event.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
                if event.mask & libc::IN_ISDIR != 0 {
                    if created && self.recursive && !is_walstream_state(&path) {
                        let _ = self.add_tree(&path, Some(&mut found));
                    }
                } else if created {
                    found.push(DirEvent::Created(path));
                } else {
                    found.push(DirEvent::Removed(path));
                }
            }
            for event in found {
                if events.send((id, event)).is_err() {
                    return;
                }
            }
        }
    }
}

/// walstream's local state beside a database (`.<db>-walstream`): never watched or scanned.
pub(crate) fn is_walstream_state(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        let n = n.to_string_lossy();
        n.starts_with('.') && n.ends_with("-walstream")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, DirEvent)>) -> DirEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("an event in time").expect("open").1
    }

    /// Creations, renames in and out and deletions are seen, in a directory made after start
    /// too; writes to a file are not events at all.
    #[tokio::test]
    async fn creations_and_deletions_are_seen_and_writes_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        watch(dir.path(), true, 7, tx).unwrap();
        let a = dir.path().join("a.db");
        std::fs::write(&a, b"x").unwrap();
        assert_eq!(next(&mut rx).await, DirEvent::Created(a.clone()));
        for _ in 0..100 {
            std::fs::write(&a, b"more").unwrap();
        }
        std::fs::create_dir(dir.path().join("team")).unwrap();
        let b = dir.path().join("team/b.db");
        std::fs::write(&b, b"x").unwrap();
        let moved = dir.path().join("team/c.db");
        std::fs::rename(&b, &moved).unwrap();
        std::fs::remove_file(&a).unwrap();
        // c may be seen by the new directory's scan, by its watch, or both; b only if it was
        // still there when the new directory was scanned or watched.
        let mut seen = Vec::new();
        while !seen.contains(&DirEvent::Removed(a.clone())) {
            seen.push(next(&mut rx).await);
        }
        assert!(seen.contains(&DirEvent::Created(moved)), "{seen:?}");
        assert!(seen.contains(&DirEvent::Removed(a)), "{seen:?}");
        assert!(
            !seen.iter().any(|e| matches!(e, DirEvent::Created(p) if p.ends_with("a.db"))),
            "a write was an event: {seen:?}"
        );
    }
}
