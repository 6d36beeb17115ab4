//! Where the webhook reads KasprApps from.
//!
//! The server sees one small read-only trait, [`KasprApps`], with three implementations:
//! - [`KubeKasprApps`]: a reflector (watch cache) over all namespaces or a configured list, with
//!   a single GET on a cache miss (an app created a moment before its StatefulSet may not have
//!   reached the watch yet);
//! - [`FileKasprApps`]: KasprApps read from YAML/JSON files, for running without a cluster;
//! - [`MemoryKasprApps`]: a fixed map, for tests.
//!
//! Apps are held as `Arc<serde_json::Value>` (the webhook does not own the CRD and reads it
//! unstructured), with `managedFields` and the last-applied annotation removed: they are large,
//! and nothing in the rendering reads them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::Value;

use crate::admission::{AppLookup, AppRef};

/// A read-only view of KasprApps.
pub trait KasprApps: Send + Sync {
    /// Answers from memory. `None` means this view does not hold the app and [`fetch`] should
    /// ask the source of truth.
    ///
    /// [`fetch`]: KasprApps::fetch
    fn cached(&self, app: &AppRef) -> Option<AppLookup>;

    /// Reads an app that [`cached`](KasprApps::cached) did not hold.
    fn fetch<'a>(&'a self, app: &'a AppRef) -> BoxFuture<'a, AppLookup> {
        let _ = app;
        async { AppLookup::NotFound }.boxed()
    }

    /// Number of apps held in memory.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True once the initial list is complete (readiness).
    fn is_synced(&self) -> bool;
}

/// Looks an app up: from memory when held, else from the source of truth. Only a miss
/// allocates.
pub async fn lookup(apps: &dyn KasprApps, app: &AppRef) -> AppLookup {
    match apps.cached(app) {
        Some(found) => found,
        None => apps.fetch(app).await,
    }
}

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

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops the parts of a stored object that only cost memory.
fn trim(app: &mut Value) {
    if let Some(metadata) = app.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.remove("managedFields");
        if let Some(annotations) = metadata
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.remove(LAST_APPLIED);
        }
    }
}

fn is_kasprapp(doc: &Value) -> bool {
    doc.get("kind").and_then(Value::as_str) == Some("KasprApp")
        && doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("kaspr.io/"))
}

// ---------------------------------------------------------------------------------------------
// In memory (tests)

/// A fixed set of lookups, for tests and embedding.
#[derive(Debug, Default)]
pub struct MemoryKasprApps {
    apps: HashMap<AppRef, AppLookup>,
    synced: AtomicBool,
}

impl MemoryKasprApps {
    /// An empty view that is already synced.
    pub fn new() -> Self {
        MemoryKasprApps {
            apps: HashMap::new(),
            synced: AtomicBool::new(true),
        }
    }

    /// Adds a KasprApp object (namespace `default` when it has none).
    pub fn with_app(mut self, app: Value) -> Self {
        let key = app_ref_of(&app);
        self.apps.insert(key, AppLookup::Found(Arc::new(app)));
        self
    }

    /// Makes `namespace/name` answer `lookup` (for example [`AppLookup::Unavailable`]).
    pub fn with_lookup(mut self, namespace: &str, name: &str, lookup: AppLookup) -> Self {
        self.apps.insert(
            AppRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            lookup,
        );
        self
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Release);
    }
}

impl KasprApps for MemoryKasprApps {
    fn cached(&self, app: &AppRef) -> Option<AppLookup> {
        Some(self.apps.get(app).cloned().unwrap_or(AppLookup::NotFound))
    }

    fn len(&self) -> usize {
        self.apps
            .values()
            .filter(|l| matches!(l, AppLookup::Found(_)))
            .count()
    }

    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

fn app_ref_of(app: &Value) -> AppRef {
    let text = |pointer: &str| app.pointer(pointer).and_then(Value::as_str).unwrap_or("");
    let namespace = match text("/metadata/namespace") {
        "" => "default",
        ns => ns,
    };
    AppRef {
        namespace: namespace.to_owned(),
        name: text("/metadata/name").to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Files

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
            let key = app_ref_of(&app);
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

/// The KasprApps of one file.
fn parse_documents(path: &Path, text: &str) -> Result<Vec<Value>, CacheError> {
    let parse_err = |message: String| CacheError::Parse {
        path: path.to_owned(),
        message,
    };
    let mut docs = Vec::new();
    if path.extension().is_some_and(|e| e == "json") {
        docs.push(serde_json::from_str::<Value>(text).map_err(|e| parse_err(e.to_string()))?);
    } else {
        for document in serde_yaml::Deserializer::from_str(text) {
            let doc = Value::deserialize(document).map_err(|e| parse_err(e.to_string()))?;
            if !doc.is_null() {
                docs.push(doc);
            }
        }
    }
    let mut apps = Vec::new();
    for doc in docs {
        if doc.get("kind").and_then(Value::as_str) == Some("List") {
            let items = doc
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            apps.extend(items.into_iter().filter(is_kasprapp));
        } else if is_kasprapp(&doc) {
            apps.push(doc);
        }
    }
    Ok(apps)
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// A KasprApp as the reflector stores it: the minimal typed metadata kube needs, beside the
/// full object as JSON (shared, so a lookup is a reference count increment).
#[derive(Clone)]
pub struct KasprAppObject {
    metadata: ObjectMeta,
    value: Arc<Value>,
}

impl fmt::Debug for KasprAppObject {
    // Only the identity: the spec may be large and is not needed in errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KasprAppObject")
            .field("namespace", &self.metadata.namespace)
            .field("name", &self.metadata.name)
            .field("resourceVersion", &self.metadata.resource_version)
            .finish()
    }
}

impl KasprAppObject {
    pub fn value(&self) -> &Arc<Value> {
        &self.value
    }
}

impl<'de> Deserialize<'de> for KasprAppObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut value = Value::deserialize(deserializer)?;
        trim(&mut value);
        let text = |pointer: &str| {
            value
                .pointer(pointer)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let metadata = ObjectMeta {
            name: text("/metadata/name"),
            namespace: text("/metadata/namespace"),
            resource_version: text("/metadata/resourceVersion"),
            uid: text("/metadata/uid"),
            ..ObjectMeta::default()
        };
        Ok(KasprAppObject {
            metadata,
            value: Arc::new(value),
        })
    }
}

impl kube::Resource for KasprAppObject {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "KasprApp".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "kaspr.io".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "kasprapps".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Which namespaces the reflector watches.
enum Stores {
    All(Store<KasprAppObject>),
    /// One store per namespace: a reflector store takes one watch stream, and the initial list
    /// of one namespace must not reset another's.
    Namespaces(HashMap<String, Store<KasprAppObject>>),
}

/// KasprApps from the API server: a watch cache plus a GET on a miss.
pub struct KubeKasprApps {
    client: Client,
    stores: Stores,
    synced: Arc<AtomicBool>,
    /// The API server does not serve KasprApps at all (404 on list).
    not_served: Arc<AtomicBool>,
}

impl KubeKasprApps {
    /// Builds the cache and the future that keeps it filled. The future runs until dropped; it
    /// must be spawned for the cache to sync. `namespaces` empty means every namespace.
    pub fn new(client: Client, namespaces: &[String]) -> (Self, BoxFuture<'static, ()>) {
        let synced = Arc::new(AtomicBool::new(false));
        let not_served = Arc::new(AtomicBool::new(false));
        let mut runners: Vec<BoxFuture<'static, ()>> = Vec::new();
        let mut readers = Vec::new();
        let stores = if namespaces.is_empty() {
            let (reader, runner) = reflect(
                Api::all(client.clone()),
                "*".to_owned(),
                Arc::clone(&not_served),
            );
            readers.push(reader.clone());
            runners.push(runner);
            Stores::All(reader)
        } else {
            let mut map = HashMap::new();
            for namespace in namespaces {
                if map.contains_key(namespace) {
                    continue;
                }
                let api = Api::namespaced(client.clone(), namespace);
                let (reader, runner) = reflect(api, namespace.clone(), Arc::clone(&not_served));
                readers.push(reader.clone());
                runners.push(runner);
                map.insert(namespace.clone(), reader);
            }
            Stores::Namespaces(map)
        };
        let flag = Arc::clone(&synced);
        let readiness = async move {
            for reader in readers {
                if reader.wait_until_ready().await.is_err() {
                    return;
                }
            }
            flag.store(true, Ordering::Release);
            tracing::info!("KasprApp cache synced");
        };
        runners.push(readiness.boxed());
        let run = futures::future::join_all(runners).map(|_| ()).boxed();
        (
            KubeKasprApps {
                client,
                stores,
                synced,
                not_served,
            },
            run,
        )
    }

    fn store_for(&self, namespace: &str) -> Option<&Store<KasprAppObject>> {
        match &self.stores {
            Stores::All(store) => Some(store),
            Stores::Namespaces(map) => map.get(namespace),
        }
    }
}

fn reflect(
    api: Api<KasprAppObject>,
    scope: String,
    not_served: Arc<AtomicBool>,
) -> (Store<KasprAppObject>, BoxFuture<'static, ()>) {
    let (reader, writer) = reflector::store();
    let runner = async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(_) => {
                    if not_served.swap(false, Ordering::AcqRel) {
                        tracing::info!("the KasprApp resource is served now");
                    }
                }
                // The CRD is not installed (yet): there are no KasprApps, which is a state the
                // webhook can serve in (misses are read, and answer "not found").
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if status.code == 404 =>
                {
                    if !not_served.swap(true, Ordering::AcqRel) {
                        tracing::info!(
                            "kasprapps.kaspr.io is not served by the API server (CRD not installed?); \
                             treating it as no KasprApps until it is"
                        );
                    }
                }
                Err(error) => {
                    // The backoff spaces these out; the store keeps serving its last state.
                    tracing::warn!(namespace = %scope, %error, "KasprApp watch failed; retrying");
                }
            }
        }
        tracing::warn!(namespace = %scope, "KasprApp watch ended");
    };
    (reader, runner.boxed())
}

/// A short, user-facing reason for a failed read.
fn read_failure(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!(
                "the API server answered {} {}: {}",
                status.code, status.reason, status.message
            )
        }
        other => other.to_string(),
    }
}

impl KasprApps for KubeKasprApps {
    fn cached(&self, app: &AppRef) -> Option<AppLookup> {
        let store = self.store_for(&app.namespace)?;
        let key = ObjectRef::new(&app.name).within(&app.namespace);
        store
            .get(&key)
            .map(|found| AppLookup::Found(Arc::clone(found.value())))
    }

    fn fetch<'a>(&'a self, app: &'a AppRef) -> BoxFuture<'a, AppLookup> {
        async move {
            let api: Api<KasprAppObject> = Api::namespaced(self.client.clone(), &app.namespace);
            match api.get_opt(&app.name).await {
                Ok(Some(found)) => AppLookup::Found(Arc::clone(found.value())),
                Ok(None) => AppLookup::NotFound,
                Err(error) => {
                    tracing::warn!(
                        namespace = %app.namespace, name = %app.name, %error,
                        "cannot read KasprApp"
                    );
                    AppLookup::Unavailable(read_failure(&error))
                }
            }
        }
        .boxed()
    }

    fn len(&self) -> usize {
        match &self.stores {
            Stores::All(store) => store.len(),
            Stores::Namespaces(map) => map.values().map(Store::len).sum(),
        }
    }

    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire) || self.not_served.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn app_ref(namespace: &str, name: &str) -> AppRef {
        AppRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn reads_multi_document_yaml_lists_and_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("apps.yaml"),
            "apiVersion: kaspr.io/v1alpha1\nkind: KasprApp\nmetadata:\n  name: a\n  namespace: ns1\n\
             ---\n# a comment-only document\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n\
             ---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: kaspr.io/v1alpha1\n  kind: KasprApp\n  metadata:\n    name: b\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("c.json"),
            r#"{"apiVersion":"kaspr.io/v1alpha1","kind":"KasprApp","metadata":{"name":"c","namespace":"ns2","managedFields":[{}]}}"#,
        )
        .expect("write");
        std::fs::write(dir.path().join("notes.txt"), "not: [read").expect("write");

        let apps = FileKasprApps::load(dir.path()).expect("load");
        assert_eq!(apps.len(), 3);
        assert!(apps.is_synced());
        assert!(matches!(
            apps.cached(&app_ref("ns1", "a")),
            Some(AppLookup::Found(_))
        ));
        assert!(matches!(
            apps.cached(&app_ref("default", "b")),
            Some(AppLookup::Found(_))
        ));
        match apps.cached(&app_ref("ns2", "c")) {
            Some(AppLookup::Found(app)) => {
                assert!(app.pointer("/metadata/managedFields").is_none())
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            apps.cached(&app_ref("ns1", "zzz")),
            Some(AppLookup::NotFound)
        ));
    }

    #[test]
    fn a_broken_file_fails_the_load_and_keeps_the_old_set_on_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.yaml");
        std::fs::write(
            &file,
            "apiVersion: kaspr.io/v1alpha1\nkind: KasprApp\nmetadata: {name: a}\n",
        )
        .expect("write");
        let apps = FileKasprApps::load(dir.path()).expect("load");
        assert!(!apps.reload().expect("reload unchanged"));

        std::fs::write(&file, "kind: [unclosed").expect("write");
        assert!(matches!(apps.reload(), Err(CacheError::Parse { .. })));
        assert_eq!(apps.len(), 1);
        assert!(matches!(
            FileKasprApps::load(dir.path()),
            Err(CacheError::Parse { .. })
        ));

        std::fs::write(
            &file,
            "apiVersion: kaspr.io/v1alpha1\nkind: KasprApp\nmetadata: {name: b}\n",
        )
        .expect("write");
        assert!(apps.reload().expect("reload changed"));
        assert!(matches!(
            apps.cached(&app_ref("default", "b")),
            Some(AppLookup::Found(_))
        ));
    }

    #[test]
    fn duplicates_are_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let doc = "apiVersion: kaspr.io/v1alpha1\nkind: KasprApp\nmetadata: {name: a}\n";
        std::fs::write(dir.path().join("1.yaml"), doc).expect("write");
        std::fs::write(dir.path().join("2.yml"), doc).expect("write");
        assert!(matches!(
            FileKasprApps::load(dir.path()),
            Err(CacheError::Duplicate { .. })
        ));
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        assert!(matches!(
            FileKasprApps::load(Path::new("/nonexistent/kasprapps")),
            Err(CacheError::Read { .. })
        ));
    }

    #[tokio::test]
    async fn memory_view_answers_what_it_was_given() {
        let apps = MemoryKasprApps::new()
            .with_app(json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "metadata": {"name": "a", "namespace": "n"}}))
            .with_lookup("n", "down", AppLookup::Unavailable("boom".into()));
        assert!(matches!(
            lookup(&apps, &app_ref("n", "a")).await,
            AppLookup::Found(_)
        ));
        assert!(matches!(
            lookup(&apps, &app_ref("n", "down")).await,
            AppLookup::Unavailable(_)
        ));
        assert!(matches!(
            lookup(&apps, &app_ref("n", "b")).await,
            AppLookup::NotFound
        ));
        assert_eq!(apps.len(), 1);
        apps.set_synced(false);
        assert!(!apps.is_synced());
    }

    #[test]
    fn the_stored_object_keeps_identity_and_drops_bulk() {
        let object: KasprAppObject = serde_json::from_value(json!({
            "apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
            "metadata": {"name": "a", "namespace": "n", "resourceVersion": "7",
                         "annotations": {LAST_APPLIED: "{}", "keep": "me"}},
            "spec": {"pythonPackages": {"packages": ["x"]}}
        }))
        .expect("deserialize");
        assert_eq!(
            kube::Resource::meta(&object).resource_version.as_deref(),
            Some("7")
        );
        assert!(
            object
                .value()
                .pointer("/metadata/annotations/keep")
                .is_some()
        );
        assert!(
            object.value()["metadata"]["annotations"]
                .get(LAST_APPLIED)
                .is_none()
        );
        assert!(
            object
                .value()
                .pointer("/spec/pythonPackages/packages/0")
                .is_some()
        );
    }
}
