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

/// Drops the parts of a stored object that only cost memory.
pub(crate) fn trim(app: &mut Value) {
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

#[cfg(test)]
mod tests;
