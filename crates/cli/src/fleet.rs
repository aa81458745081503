//! The databases one `replicate` process ships: those its config or command line names, which
//! all stop together if one fails, and those a watched directory (`watch: true`) holds now or
//! gets later, each started when its file appears and stopped when it is deleted, on its own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use walstream_shipper::{Handle, Shipper};

use crate::dir_watch::{self, DirEvent};

/// The shippers running now, as the server, the metrics and the heartbeat see them.
#[derive(Clone, Default)]
pub(crate) struct Databases(Arc<RwLock<Vec<Handle>>>);

impl Databases {
    pub(crate) fn list(&self) -> Vec<Handle> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn add(&self, handle: Handle) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).push(handle);
    }

    fn remove(&self, db: &Path) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).retain(|h| h.db_path() != db);
    }

    fn contains(&self, db: &Path) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).iter().any(|h| h.db_path() == db)
    }
}

/// Makes the shipper of a database found in a watched directory, from its path and its path
/// relative to the directory.
pub(crate) type ShipperFor = Box<dyn Fn(PathBuf, &str) -> anyhow::Result<Shipper> + Send>;

/// A directory whose databases come and go while walstream runs.
pub(crate) struct Watched {
    pub(crate) dir: PathBuf,
    pub(crate) pattern: String,
    pub(crate) recursive: bool,
    pub(crate) shipper_for: ShipperFor,
}

impl Watched {
    /// The path relative to the directory, if `path` is a file the entry covers.
    fn relative(&self, path: &Path) -> Option<String> {
        let relative = path.strip_prefix(&self.dir).ok()?;
        let parts: Vec<String> = relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        let (name, dirs) = parts.split_last()?;
        let covered = (self.recursive || dirs.is_empty())
            && !relative.ancestors().any(dir_watch::is_walstream_state)
            && crate::discover::glob_match(&self.pattern, name);
        covered.then(|| parts.join("/"))
    }
}

/// Replicates until `shutdown`, then flushes each database. If a named database fails, the
/// others are stopped (and flushed) too and the first error is returned; a database found in a
/// watched directory that fails (a file of the pattern that is not SQLite, say) is logged and
/// left, and one whose file is deleted is stopped and its local state removed (what its WAL
/// held that no pass had copied went with the file).
pub(crate) async fn run(
    named: Vec<Shipper>,
    watched: Vec<Watched>,
    databases: Databases,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let stop = shutdown.child_token();
    let mut tasks: JoinSet<(PathBuf, bool, anyhow::Result<()>)> = JoinSet::new();
    let start = |tasks: &mut JoinSet<_>, shipper: Shipper, token: CancellationToken, found: bool| {
        databases.add(shipper.handle());
        let db = shipper.handle().db_path().to_path_buf();
        tasks.spawn(async move {
            let result = shipper.run(token).await.with_context(|| format!("replicate {}", db.display()));
            (db, found, result)
        });
    };
    for shipper in named {
        start(&mut tasks, shipper, stop.clone(), false);
    }
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    for (id, dir) in watched.iter().enumerate() {
        // Watched first, then scanned: a database created in between is seen twice, not never.
        dir_watch::watch(&dir.dir, dir.recursive, id, events_tx.clone())
            .with_context(|| format!("cannot watch {} for databases", dir.dir.display()))?;
        for (path, _) in crate::discover::databases(&dir.dir, &dir.pattern, dir.recursive)
            .with_context(|| format!("cannot read {}", dir.dir.display()))?
        {
            let _ = events_tx.send((id, DirEvent::Created(path)));
        }
    }
    drop(events_tx);
    let mut found: HashMap<PathBuf, CancellationToken> = HashMap::new();
    let mut first_error = None;
    loop {
        tokio::select! {
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let (db, was_found, result) = match joined {
                    Ok(done) => done,
                    Err(e) => {
                        // Shipper::run catches its workers' panics; this is the task itself.
                        stop.cancel();
                        first_error.get_or_insert(anyhow::anyhow!("a replication task failed: {e}"));
                        continue;
                    }
                };
                databases.remove(&db);
                if !was_found {
                    if let Err(e) = result {
                        stop.cancel();
                        first_error.get_or_insert(e);
                    }
                } else {
                    found.remove(&db);
                    match result {
                        Err(e) => warn!(db = %db.display(), error = format!("{e:#}"), "not replicating this file of a watched directory"),
                        Ok(()) if !db.exists() && !stop.is_cancelled() => {
                            let state = walstream_state(&db);
                            let _ = std::fs::remove_dir_all(&state);
                            info!(db = %db.display(), "the database was deleted: its replication has stopped, its replica keeps what was shipped, and its local state is removed");
                        }
                        Ok(()) => {}
                    }
                }
            }
            Some((id, event)) = events.recv(), if !stop.is_cancelled() => {
                let dir = &watched[id];
                match event {
                    DirEvent::Created(path) => {
                        let Some(relative) = dir.relative(&path) else { continue };
                        if found.contains_key(&path) || databases.contains(&path) {
                            continue;
                        }
                        match (dir.shipper_for)(path.clone(), &relative) {
                            Ok(shipper) => {
                                info!(db = %path.display(), dir = %dir.dir.display(), "found a database in a watched directory");
                                let token = stop.child_token();
                                found.insert(path, token.clone());
                                start(&mut tasks, shipper, token, true);
                            }
                            Err(e) => warn!(db = %path.display(), error = format!("{e:#}"), "cannot replicate this database"),
                        }
                    }
                    DirEvent::Removed(path) => {
                        if let Some(token) = found.get(&path) {
                            info!(db = %path.display(), "the database was deleted: stopping its replication");
                            token.cancel();
                        }
                    }
                }
            }
            () = stop.cancelled(), if tasks.is_empty() => break,
            // Nothing running and nothing watched: replication has ended (it failed, or was
            // never given anything).
            else => break,
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The local state walstream keeps beside a database (`MetaDir`'s default place).
fn walstream_state(db: &Path) -> PathBuf {
    let name = db.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    db.with_file_name(format!(".{name}-walstream"))
}
