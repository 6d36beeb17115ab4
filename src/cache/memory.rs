//! A fixed set of lookups, for tests and embedding.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use super::KasprApps;
use crate::app::{AppLookup, AppRef};

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
        let key = AppRef::of_object(&app, "default");
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
