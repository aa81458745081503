//! What a restore or listing reads: one replica URL, or a database of the config file and its
//! replicas (Litestream's "DB_PATH or REPLICA_URL" argument).

use std::path::PathBuf;

use crate::args::{is_url, ConfigArgs};
use crate::config::{self, ConfigError};
use crate::replica_url;

/// The replicas to read, by name, and the database they belong to when a config named it.
pub(crate) struct Source {
    pub(crate) db: Option<PathBuf>,
    pub(crate) replicas: Vec<NamedReplica>,
}

pub(crate) struct NamedReplica {
    pub(crate) name: String,
    pub(crate) url: String,
    /// The config's `age` block for it; a URL has none.
    pub(crate) age: Option<std::sync::Arc<walstream_format::age::AgeKeys>>,
    /// The config's S3 keys for it; a URL takes them from the environment.
    pub(crate) s3: walstream_store::S3Settings,
}

/// Resolves `source` without touching the network. `only` is `-replica NAME`.
pub(crate) fn resolve(source: &str, config_args: &ConfigArgs, only: Option<&str>) -> anyhow::Result<Source> {
    if is_url(source) {
        if config_args.config.is_some() {
            return Err(ConfigError("cannot specify a replica URL and the -config flag".into()).into());
        }
        // Validate the URL first, so a bad one gets its own exit code.
        replica_url::open(source)?;
        let name = replica_url::kind(source).to_string();
        if let Some(wanted) = only.filter(|wanted| **wanted != name) {
            return Err(ConfigError(format!(
                "replica {wanted:?} not found for {source:?} (with a URL, the only replica is named {name:?})"
            ))
            .into());
        }
        return Ok(Source {
            db: None,
            replicas: vec![NamedReplica { name, url: source.to_string(), age: None, s3: Default::default() }],
        });
    }
    let path = config_args.config.clone().unwrap_or_else(config::default_path);
    let config = config::load(&path, !config_args.no_expand_env)?;
    let db = config.db(source)?;
    let replicas = db
        .replicas(only)?
        .into_iter()
        .map(|r| NamedReplica { name: r.name.clone(), url: r.url.clone(), age: r.age.clone(), s3: r.s3.clone() })
        .collect();
    Ok(Source { db: Some(db.path.clone()), replicas })
}
