//! KasprApps from the API server: a reflector per watched scope and a GET on a miss.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::Value;

use super::{KasprApps, trim};
use crate::app::{AppLookup, AppRef};

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
