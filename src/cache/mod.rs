//! Where the webhook reads KasprApps from.
//!
//! The server sees one small read-only trait, [`KasprApps`], with three implementations:
//! - [`KubeKasprApps`] (`cluster.rs`): a reflector (watch cache) over all namespaces or a configured list, with
//!   a single GET on a cache miss (an app created a moment before its StatefulSet may not have
//!   reached the watch yet);
//! - [`FileKasprApps`] (`files.rs`): KasprApps read from YAML/JSON files, for running without a cluster;
//! - [`MemoryKasprApps`] (`memory.rs`): a fixed map, for tests.
//!
//! Apps are held as `Arc<serde_json::Value>` (the webhook does not own the CRD and reads it
//! unstructured), with `managedFields` and the last-applied annotation removed: they are large,
//! and nothing in the rendering reads them.

mod cluster;
mod files;
mod memory;
mod sets;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;

use crate::app::{AppLookup, AppRef};
pub use cluster::{KasprAppObject, KubeKasprApps};
pub use files::{CacheError, FileKasprApps};
pub use memory::MemoryKasprApps;
pub use sets::{KubeLockStates, LockStates, SetAwareApps};

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

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The parts of a KasprApp's `spec` that the webhook and the controller read; everything else
/// (bootstrap servers, authentication, resources, the rest of the template, status) is dropped
/// from the caches, so a cluster of many apps costs memory in proportion to their package
/// settings only. Each entry is a path of keys below `spec`.
pub(crate) const KEPT_SPEC: &[&[&str]] = &[
    &["pythonPackages"],
    &["template", "pythonPackagesInitContainer"],
    &["template", "kasprContainer", "securityContext"],
];

/// Keeps only what the render, the validation and the controller read: `apiVersion`, `kind`,
/// the metadata without `managedFields` and the last-applied annotation, and [`KEPT_SPEC`].
pub(crate) fn trim(app: &mut Value) {
    let Some(object) = app.as_object_mut() else {
        return;
    };
    object.retain(|key, _| matches!(key.as_str(), "apiVersion" | "kind" | "metadata" | "spec"));
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.remove("managedFields");
        if let Some(annotations) = metadata
            .get_mut("annotations")
            .and_then(Value::as_object_mut)
        {
            annotations.remove(LAST_APPLIED);
        }
    }
    if let Some(spec) = object.get_mut("spec") {
        let kept = keep_paths(spec, KEPT_SPEC);
        *spec = kept;
    }
}

/// A copy of `value` holding only the given key paths (that exist), moved out of `value`.
fn keep_paths(value: &mut Value, paths: &[&[&str]]) -> Value {
    let mut kept = serde_json::Map::new();
    let Some(object) = value.as_object_mut() else {
        return Value::Object(kept);
    };
    for path in paths {
        let Some((first, rest)) = path.split_first() else {
            continue;
        };
        if rest.is_empty() {
            if let Some(found) = object.remove(*first) {
                kept.insert((*first).to_owned(), found);
            }
            continue;
        }
        if let Some(child) = object.get_mut(*first) {
            let below = keep_paths(child, &[rest]);
            if below.as_object().is_some_and(|m| !m.is_empty()) {
                match kept.get_mut(*first) {
                    Some(Value::Object(existing)) => {
                        if let Value::Object(more) = below {
                            existing.extend(more);
                        }
                    }
                    _ => {
                        kept.insert((*first).to_owned(), below);
                    }
                }
            }
        }
    }
    Value::Object(kept)
}

#[cfg(test)]
mod tests;
