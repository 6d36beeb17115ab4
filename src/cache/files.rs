//! KasprApps read from files, for running without a cluster.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde_json::Value;

use super::{KasprApps, trim};
use crate::app::{AppLookup, AppRef};
use crate::documents;

/// Errors reading KasprApps from files.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("KasprApp {namespace}/{name} is defined twice: in {first} and {second}")]
    Duplicate {
        namespace: String,
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
}

type AppMap = HashMap<AppRef, Arc<Value>>;

/// KasprApps read from every `*.yaml`, `*.yml` and `*.json` file of a directory (not
/// recursive). Files may hold several YAML documents and `kind: List` objects; documents that
/// are not KasprApps are skipped. An app without a namespace is in `default`, as with kubectl.
#[derive(Debug)]
pub struct FileKasprApps {
    dir: PathBuf,
    apps: ArcSwap<AppMap>,
    /// What the files looked like when last parsed; an unchanged directory is not parsed again.
    stamp: std::sync::Mutex<Vec<FileStamp>>,
}

/// Path, size, modification time and inode of one file (following symlinks, so a ConfigMap
/// volume's `..data` swap counts as a change).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

impl FileKasprApps {
    /// Reads the directory once. Fails on an unreadable or unparsable file, so a typo is seen
    /// at start rather than as a silently missing app.
    pub fn load(dir: &Path) -> Result<Self, CacheError> {
        let files = list_files(dir)?;
        let apps = read_apps(&files)?;
        Ok(FileKasprApps {
            dir: dir.to_owned(),
            apps: ArcSwap::from_pointee(apps),
            stamp: std::sync::Mutex::new(files),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory again. On error the previous set is kept. Returns whether anything
    /// changed.
    pub fn reload(&self) -> Result<bool, CacheError> {
        let files = list_files(&self.dir)?;
        let mut stamp = self
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *stamp == files {
            return Ok(false);
        }
        let fresh = read_apps(&files)?;
        *stamp = files;
        if *self.apps.load_full() == fresh {
            return Ok(false);
        }
        self.apps.store(Arc::new(fresh));
        Ok(true)
    }

    /// Re-reads the directory every `interval`, so edits show without a restart. Runs until
    /// dropped.
    pub async fn watch(self: Arc<Self>, interval: std::time::Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let this = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || this.reload()).await {
                Ok(Ok(true)) => {
                    tracing::info!(dir = %self.dir.display(), apps = self.len(), "reloaded KasprApp files");
                }
                Ok(Ok(false)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "keeping the previous KasprApps");
                }
                Err(error) => tracing::warn!(%error, "KasprApp reload task failed"),
            }
        }
    }
}

impl KasprApps for FileKasprApps {
    fn cached(&self, app: &AppRef) -> Option<AppLookup> {
        Some(match self.apps.load().get(app) {
            Some(found) => AppLookup::Found(Arc::clone(found)),
            None => AppLookup::NotFound,
        })
    }

    fn len(&self) -> usize {
        self.apps.load().len()
    }

    fn is_synced(&self) -> bool {
        // Loading is part of construction.
        true
    }
}

fn read_err(path: &Path, source: std::io::Error) -> CacheError {
    CacheError::Read {
        path: path.to_owned(),
        source,
    }
}

/// The `*.yaml`, `*.yml` and `*.json` files of `dir`, sorted so the duplicate error names files
/// in a stable order.
fn list_files(dir: &Path) -> Result<Vec<FileStamp>, CacheError> {
    use std::os::unix::fs::MetadataExt as _;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
        let path = entry.map_err(|e| read_err(dir, e))?.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if !wanted {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_file() {
            files.push(FileStamp {
                path,
                len: meta.len(),
                modified: meta.modified().ok(),
                inode: meta.ino(),
            });
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

fn read_apps(files: &[FileStamp]) -> Result<AppMap, CacheError> {
    let mut apps = AppMap::new();
    let mut origin: HashMap<AppRef, PathBuf> = HashMap::new();
    for FileStamp { path, .. } in files {
        let path = path.clone();
        let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
        for mut app in parse_documents(&path, &text)? {
            trim(&mut app);
            let key = AppRef::of_object(&app, "default");
            if key.name.is_empty() {
                return Err(CacheError::Parse {
                    path,
                    message: "a KasprApp has no metadata.name".into(),
                });
            }
            if let Some(first) = origin.get(&key) {
                return Err(CacheError::Duplicate {
                    namespace: key.namespace,
                    name: key.name,
                    first: first.clone(),
                    second: path,
                });
            }
            origin.insert(key.clone(), path.clone());
            apps.insert(key, Arc::new(app));
        }
    }
    Ok(apps)
}

/// The KasprApps of one file; other objects are skipped.
fn parse_documents(path: &Path, text: &str) -> Result<Vec<Value>, CacheError> {
    let objects = documents::read_objects(text).map_err(|message| CacheError::Parse {
        path: path.to_owned(),
        message,
    })?;
    Ok(objects.into_iter().filter(documents::is_kasprapp).collect())
}
