//! Degraded installs: pods whose installer did without its cache.
//!
//! The installer still installs the packages when its cache fails it (a GCS key it cannot
//! read, a failed upload, a PVC build lock held too long) and says so in its one-line
//! summary, which the kubelet keeps as the init container's termination message:
//! `kaspr-packages: OK ... (cache off: <cause>: <detail>)`. This module watches the app pods
//! (label `kaspr.io/kind=KasprApp`), reads those messages, counts each degraded install once in
//! `degraded_installs_total{mode,cause}` and publishes a Warning Event on the KasprApp once per
//! app and cause.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;

use super::context::{AppKey, Context, Part};
use crate::cache::KasprAppObject;
use crate::names;

/// The Event's reason.
pub const CACHE_OFF_REASON: &str = "PythonPackagesCacheOff";

/// Where the installer puts the cause in its summary.
const MARKER: &str = "(cache off: ";

/// The `cause` label values, per mode, as the installer names them (spaces become `_`).
/// Anything else counts as `other`, so a message cannot grow the label space.
pub const PVC_CAUSES: [&str; 1] = ["lock_timeout"];
pub const GCS_CAUSES: [&str; 7] = [
    "key_unreadable",
    "key_unusable",
    "token_failed",
    "lookup_failed",
    "download_failed",
    "archive_too_large",
    "upload_failed",
];

/// One run of a pod's install container that finished without its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DegradedInstall {
    pub namespace: String,
    pub app: String,
    pub pod: String,
    pub pod_uid: String,
    /// Tells the runs of one pod apart (the container id, else the finish time).
    pub run: String,
    pub mode: &'static str,
    pub cause: &'static str,
    /// The termination message from the cause on.
    pub detail: String,
    pub finished: Option<Timestamp>,
}

/// The cause label and the text from the cause on, when `message` is a success that did
/// without its cache.
pub fn cache_off(message: &str) -> Option<(&'static str, String)> {
    if !message.contains("kaspr-packages: OK ") {
        return None;
    }
    let start = message.find(MARKER)? + MARKER.len();
    let text = message[start..].trim_end().trim_end_matches(')').to_owned();
    let cause = text
        .split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .replace(' ', "_");
    let label = PVC_CAUSES
        .iter()
        .chain(GCS_CAUSES.iter())
        .find(|known| **known == cause)
        .copied()
        .unwrap_or("other");
    Some((label, text))
}

/// The cache mode of a pod's install container, from its configuration.
fn mode_of(pod: &Pod) -> &'static str {
    let config = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.init_containers.as_ref())
        .and_then(|containers| containers.iter().find(|c| c.name == names::INIT_CONTAINER))
        .and_then(|container| container.env.as_ref())
        .and_then(|env| env.iter().find(|e| e.name == names::CONFIG_ENV))
        .and_then(|e| e.value.as_deref())
        .and_then(|text| serde_json::from_str::<Value>(text).ok());
    match config
        .as_ref()
        .and_then(|c| c.get("mode"))
        .and_then(Value::as_str)
    {
        Some("pvc") => "pvc",
        Some("gcs") => "gcs",
        Some("emptyDir") => "emptyDir",
        _ => "unknown",
    }
}

/// The degraded runs a pod's status shows (its install container's current and last state).
pub fn degraded_installs(pod: &Pod) -> Vec<DegradedInstall> {
    let Ok(value) = serde_json::to_value(pod) else {
        return Vec::new();
    };
    let Some(app) = crate::app::pod_app(&value) else {
        return Vec::new();
    };
    let meta = &pod.metadata;
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.as_ref());
    let Some(status) =
        statuses.and_then(|all| all.iter().find(|s| s.name == names::INIT_CONTAINER))
    else {
        return Vec::new();
    };
    let runs: Vec<&ContainerStateTerminated> = [status.state.as_ref(), status.last_state.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|state| state.terminated.as_ref())
        .collect();
    runs.into_iter()
        .filter_map(|terminated| {
            let (cause, detail) = cache_off(terminated.message.as_deref()?)?;
            let finished = terminated.finished_at.as_ref().map(|t| t.0);
            let run = terminated
                .container_id
                .clone()
                .or_else(|| finished.map(|t| t.to_string()))
                .unwrap_or_default();
            Some(DegradedInstall {
                namespace: meta.namespace.clone().unwrap_or_default(),
                app: app.clone(),
                pod: meta.name.clone().unwrap_or_default(),
                pod_uid: meta.uid.clone().unwrap_or_default(),
                run,
                mode: mode_of(pod),
                cause,
                detail,
                finished,
            })
        })
        .collect()
}

/// What the watch remembers: the runs already counted (per pod, dropped with the pod) and the
/// (app, cause) pairs already published.
#[derive(Debug, Default)]
pub(super) struct InstallMemory {
    counted: HashMap<String, HashSet<String>>,
    published: HashSet<(AppKey, &'static str)>,
    /// (app, set) pairs whose image pull failure was published.
    image_pulls: HashSet<(AppKey, String)>,
}

impl InstallMemory {
    /// True the first time this run is seen.
    pub(super) fn first_sight(&mut self, install: &DegradedInstall) -> bool {
        self.counted
            .entry(install.pod_uid.clone())
            .or_default()
            .insert(install.run.clone())
    }

    /// True when no Event was published for this app and cause yet (and marks it published).
    pub(super) fn first_publication(&mut self, app: &AppKey, cause: &'static str) -> bool {
        self.published.insert((app.clone(), cause))
    }

    pub(super) fn forget_pod(&mut self, uid: &str) {
        self.counted.remove(uid);
    }

    pub(super) fn retain_apps(&mut self, exists: impl Fn(&AppKey) -> bool) {
        self.published.retain(|(app, _)| exists(app));
        self.image_pulls.retain(|(app, _)| exists(app));
    }
}

/// Counts and reports the degraded runs of one pod. Runs that finished before `since` (the
/// process's start) are not counted, so a restart does not count old pods again.
pub(super) async fn observe(context: &Context, pod: &Pod, since: Timestamp) {
    if let Some(failure) = image_pull::image_pull_failure(pod) {
        let key: AppKey = ObjectRef::new(&failure.app).within(&failure.namespace);
        let publish = {
            let mut state = context.state();
            find_app(context, &key).filter(|_| {
                state
                    .installs
                    .image_pulls
                    .insert((key.clone(), failure.set.clone()))
            })
        };
        if let Some(app) = publish {
            context
                .publish(
                    &app,
                    EventType::Warning,
                    Part::Installs,
                    image_pull::IMAGE_PULL_REASON,
                    image_pull::note(&failure),
                )
                .await;
        }
    }
    for install in degraded_installs(pod) {
        let key: AppKey = ObjectRef::new(&install.app).within(&install.namespace);
        let (count, publish) = {
            let mut state = context.state();
            let count =
                state.installs.first_sight(&install) && install.finished.is_none_or(|t| t >= since);
            let app = find_app(context, &key);
            let publish = app.filter(|_| state.installs.first_publication(&key, install.cause));
            (count, publish)
        };
        if count {
            context.metrics.count_degraded(install.mode, install.cause);
        }
        if let Some(app) = publish {
            tracing::warn!(
                namespace = %install.namespace,
                app = %install.app,
                pod = %install.pod,
                mode = install.mode,
                cause = install.cause,
                "a package install ran without its cache"
            );
            let note = format!(
                "pod {} installed its packages without the {} cache (cache off: {}); further pods \
                 with this cause are counted in degraded_installs_total, not reported again",
                install.pod, install.mode, install.detail
            );
            context
                .publish(
                    &app,
                    EventType::Warning,
                    Part::Installs,
                    CACHE_OFF_REASON,
                    note,
                )
                .await;
        }
    }
}

fn find_app(context: &Context, key: &AppKey) -> Option<Arc<KasprAppObject>> {
    context.stores.iter().find_map(|store| store.get(key))
}

/// Watches the app pods of one scope (a namespace, or all) until dropped.
pub(super) async fn watch(context: Arc<Context>, scope: Option<String>, since: Timestamp) {
    let api: Api<Pod> = match &scope {
        Some(namespace) => Api::namespaced(context.client.clone(), namespace),
        None => Api::all(context.client.clone()),
    };
    let config = watcher::Config::default().labels(&format!("{}=KasprApp", names::KIND_LABEL));
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                observe(&context, &pod, since).await;
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    context.state().installs.forget_pod(uid);
                }
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(error) => {
                tracing::warn!(%error, scope = scope.as_deref().unwrap_or("all namespaces"),
                    "watching app pods failed (is `list`/`watch` on pods granted?); retrying");
            }
        }
    }
}

pub mod image_pull;

#[cfg(test)]
mod tests;
