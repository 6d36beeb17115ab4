//! With builds on (docs/builds.md): the webhook's KasprApps are *effective* apps, rendered
//! from each app's current package set, read from a watch cache of the apps' lock ConfigMaps.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use super::KasprApps;
use crate::app::{AppLookup, AppRef};
use crate::builds::{LockState, lock_config_map_name, render::effective_app};

/// The lock ConfigMaps carry these labels (set by the controller).
pub const LOCK_SELECTOR: &str =
    "kaspr.io/component=python-packages,app.kubernetes.io/managed-by=kaspr-packages-webhook";

/// Where the lock state of an app is read from.
pub trait LockStates: Send + Sync {
    fn state(&self, app: &AppRef) -> Option<LockState>;
    fn is_synced(&self) -> bool;
}

/// KasprApps as the webhook renders them with builds on.
pub struct SetAwareApps {
    inner: Arc<dyn KasprApps>,
    locks: Arc<dyn LockStates>,
}

impl SetAwareApps {
    pub fn new(inner: Arc<dyn KasprApps>, locks: Arc<dyn LockStates>) -> Self {
        SetAwareApps { inner, locks }
    }

    fn effective(&self, app: &AppRef, found: AppLookup) -> AppLookup {
        match found {
            AppLookup::Found(value) => {
                let state = self.locks.state(app);
                AppLookup::Found(Arc::new(effective_app(&value, state.as_ref())))
            }
            other => other,
        }
    }
}

impl KasprApps for SetAwareApps {
    fn cached(&self, app: &AppRef) -> Option<AppLookup> {
        self.inner
            .cached(app)
            .map(|found| self.effective(app, found))
    }

    fn fetch<'a>(&'a self, app: &'a AppRef) -> BoxFuture<'a, AppLookup> {
        async move {
            let found = self.inner.fetch(app).await;
            self.effective(app, found)
        }
        .boxed()
    }

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn is_synced(&self) -> bool {
        self.inner.is_synced() && self.locks.is_synced()
    }
}

/// The lock ConfigMaps of the watched scopes, from watch caches.
pub struct KubeLockStates {
    stores: Vec<Store<ConfigMap>>,
    synced: Arc<AtomicBool>,
}

impl KubeLockStates {
    /// The caches and the future that fills them (it runs until dropped).
    pub fn new(client: &Client, namespaces: &[String]) -> (Self, BoxFuture<'static, ()>) {
        let apis: Vec<Api<ConfigMap>> = if namespaces.is_empty() {
            vec![Api::all(client.clone())]
        } else {
            namespaces
                .iter()
                .map(|n| Api::namespaced(client.clone(), n))
                .collect()
        };
        let synced = Arc::new(AtomicBool::new(false));
        let mut stores = Vec::new();
        let mut runners: Vec<BoxFuture<'static, ()>> = Vec::new();
        for api in apis {
            let (reader, writer) = reflector::store();
            stores.push(reader);
            runners.push(
                async move {
                    let mut events = watcher(api, watcher::Config::default().labels(LOCK_SELECTOR))
                        .default_backoff()
                        .reflect(writer)
                        .boxed();
                    while let Some(event) = events.next().await {
                        if let Err(error) = event {
                            tracing::warn!(%error, "lock ConfigMap watch failed; retrying");
                        }
                    }
                }
                .boxed(),
            );
        }
        let readers = stores.clone();
        let flag = Arc::clone(&synced);
        runners.push(
            async move {
                for reader in readers {
                    if reader.wait_until_ready().await.is_err() {
                        return;
                    }
                }
                flag.store(true, Ordering::Release);
                tracing::info!("lock ConfigMap cache synced");
            }
            .boxed(),
        );
        let run = futures::future::join_all(runners).map(|_| ()).boxed();
        (KubeLockStates { stores, synced }, run)
    }
}

impl LockStates for KubeLockStates {
    fn state(&self, app: &AppRef) -> Option<LockState> {
        let name = lock_config_map_name(&app.name);
        let key = ObjectRef::new(&name).within(&app.namespace);
        let found = self.stores.iter().find_map(|s| s.get(&key))?;
        match LockState::from_data(&name, found.data.as_ref()) {
            Ok(state) => Some(state),
            Err(error) => {
                tracing::warn!(%error, "ignoring an unreadable lock ConfigMap");
                None
            }
        }
    }

    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builds::state::{SetEntry, SetPhase};
    use crate::cache::MemoryKasprApps;
    use serde_json::{Value, json};

    struct Fixed(Option<LockState>);

    impl LockStates for Fixed {
        fn state(&self, _: &AppRef) -> Option<LockState> {
            self.0.clone()
        }
        fn is_synced(&self) -> bool {
            true
        }
    }

    fn apps() -> Arc<dyn KasprApps> {
        Arc::new(MemoryKasprApps::new().with_app(
            json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
            "metadata": {"name": "demo", "namespace": "apps"},
            "spec": {"pythonPackages": {"packages": ["new==2"]}}}),
        ))
    }

    fn packages(lookup: Option<AppLookup>) -> Value {
        match lookup {
            Some(AppLookup::Found(app)) => app["spec"]["pythonPackages"]["packages"].clone(),
            _ => Value::Null,
        }
    }

    #[test]
    fn apps_are_seen_with_their_current_set() {
        let entry = SetEntry {
            id: "00000000000000aa".into(),
            state: SetPhase::Building,
            install_key: "k".into(),
            image: "i".into(),
            refresh: String::new(),
            job: "j".into(),
            python_packages: json!({"packages": ["old==1"]}),
            sequence: 0,
            lock_sha256: None,
            category: None,
            message: None,
        };
        let built = LockState::default()
            .with_building(entry)
            .with_built("00000000000000aa", "s");
        let view = SetAwareApps::new(apps(), Arc::new(Fixed(Some(built))));
        let app = AppRef::new("apps", "demo");
        assert_eq!(packages(view.cached(&app)), json!(["old==1"]));
        let awaiting = SetAwareApps::new(apps(), Arc::new(Fixed(None)));
        assert_eq!(packages(awaiting.cached(&app)), json!(["new==2"]));
        assert!(
            view.cached(&AppRef::new("apps", "other"))
                .is_none_or(|l| !matches!(l, AppLookup::Found(_)))
        );
    }
}
