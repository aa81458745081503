//! File events on the database directory, turned into capturer wake-ups.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};

use crate::capture::Wake;
use crate::error::Error;

/// Watches the directory holding `db_path` (the WAL may not exist yet, and is deleted and
/// re-created by SQLite) and wakes the capturer on any event for the database or its WAL.
/// Dropping the returned watcher stops it.
pub(crate) fn watch(db_path: &Path, wakes: Sender<Wake>) -> Result<RecommendedWatcher, Error> {
    let dir = db_path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let file_name = db_path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            // An overflowed or broken watch: wake anyway, the pass finds what changed.
            let _ = wakes.send(Wake::Changed);
            return;
        };
        let ours = event.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(file_name.as_encoded_bytes()))
        });
        if ours {
            let _ = wakes.send(Wake::Changed);
        }
    })
    .map_err(|source| Error::Watch { path: dir.clone(), source })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).map_err(|source| Error::Watch { path: dir, source })?;
    Ok(watcher)
}
