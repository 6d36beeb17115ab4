//! The `packages.kaspr.io/injected` annotation: the names of everything the webhook added, so
//! it can strip exactly those and inject again (idempotency, removal).
//!
//! The record arrives with the object, so anyone who can write the object can write it too. It
//! is therefore only a hint: an entry is stripped only when it carries one of this product's
//! own names *and* has the shape this product renders under that name (the installer's init
//! container, our emptyDir/claim/Secret volume, a mount at our path, our PYTHONPATH value). A
//! forged record can thus only make us remove something indistinguishable from our own
//! injection, which is rendered again at once; a sidecar, volume or mount of anyone else is
//! never touched, and the names in the record that we never add are reported.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::names;

/// What one injection added to a pod template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    #[serde(default)]
    pub init_containers: Vec<String>,
    #[serde(default)]
    pub volumes: Vec<String>,
    /// The container that received the mounts and PYTHONPATH.
    #[serde(default)]
    pub container: String,
    #[serde(default)]
    pub volume_mounts: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    /// Whether we set the container's securityContext (under takeover, from
    /// `spec.template.kasprContainer.securityContext`). Left out when false, so records written
    /// before this field existed read and serialize the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub security_context: bool,
    /// Image mode: the pull secret we added to `imagePullSecrets` (left out when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
}

impl Record {
    /// Reads the record from pod-template metadata; a missing or unreadable one is empty.
    pub fn read(metadata: Option<&Value>) -> Record {
        metadata
            .and_then(|m| m.pointer("/annotations"))
            .and_then(|a| a.get(names::INJECTED_ANNOTATION))
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default()
    }

    /// Drops every entry this product never writes (a forged or foreign record); returns the
    /// record that is left and a description of each dropped entry.
    pub fn sanitized(self) -> (Record, Vec<String>) {
        let mut foreign = Vec::new();
        let mut keep = |kind: &str, names: Vec<String>, ours: &[&str]| -> Vec<String> {
            let (kept, dropped): (Vec<String>, Vec<String>) =
                names.into_iter().partition(|n| ours.contains(&n.as_str()));
            foreign.extend(dropped.into_iter().map(|n| format!("{kind} {n:?}")));
            kept
        };
        let record = Record {
            init_containers: keep(
                "init container",
                self.init_containers,
                &[names::INIT_CONTAINER, names::OPERATOR_INIT_CONTAINER],
            ),
            volumes: keep("volume", self.volumes, names::VOLUMES),
            container: self.container,
            volume_mounts: keep("volume mount", self.volume_mounts, names::VOLUMES),
            env: keep("env var", self.env, &[names::PYTHONPATH]),
            security_context: self.security_context,
            image_pull_secrets: self.image_pull_secrets,
        };
        (record, foreign)
    }

    /// Whether everything the record lists is still in the pod spec. A rewrite that passed the
    /// webhook is repaired by it; one that bypassed it (`failurePolicy: Ignore`, webhook down) can
    /// drop parts of the injection while keeping our annotations.
    pub fn present_in(&self, template: &Value) -> bool {
        let record = self;
        let spec = template.get("spec");
        let has = |key: &str, name: &String| list(spec, key).iter().any(|item| name_is(item, name));
        if !record
            .init_containers
            .iter()
            .all(|n| has("initContainers", n))
            || !record.volumes.iter().all(|n| has("volumes", n))
        {
            return false;
        }
        let Some(container) = list(spec, "containers")
            .iter()
            .find(|c| name_is(c, &record.container))
        else {
            return record.volume_mounts.is_empty() && record.env.is_empty();
        };
        let mounts = list(Some(container), "volumeMounts");
        if !record
            .volume_mounts
            .iter()
            .all(|n| mounts.iter().any(|m| name_is(m, n)))
        {
            return false;
        }
        let pythonpath_first = list(Some(container), "env").iter().any(|e| {
            name_is(e, names::PYTHONPATH)
                && e.get("value")
                    .and_then(Value::as_str)
                    .is_some_and(|v| v.split(':').next() == Some(names::SITE_PATH))
        });
        !record.env.iter().any(|n| n == names::PYTHONPATH) || pythonpath_first
    }

    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Removes from `spec` (a PodSpec as JSON) everything `record` lists. PYTHONPATH gets back the
/// value it had before the injection.
pub fn strip(spec: &mut Map<String, Value>, record: &Record) {
    if let Some(Value::Array(init)) = spec.get_mut("initContainers") {
        init.retain(|c| {
            !(record.init_containers.iter().any(|n| name_is(c, n)) && is_our_init_container(c))
        });
        if init.is_empty() {
            spec.remove("initContainers");
        }
    }
    if let Some(Value::Array(volumes)) = spec.get_mut("volumes") {
        volumes.retain(|v| !(record.volumes.iter().any(|n| name_is(v, n)) && is_our_volume(v)));
        if volumes.is_empty() {
            spec.remove("volumes");
        }
    }
    if let Some(Value::Array(secrets)) = spec.get_mut("imagePullSecrets") {
        secrets.retain(|s| !record.image_pull_secrets.iter().any(|n| name_is(s, n)));
        if secrets.is_empty() {
            spec.remove("imagePullSecrets");
        }
    }
    let Some(Value::Array(containers)) = spec.get_mut("containers") else {
        return;
    };
    let Some(container) = containers
        .iter_mut()
        .find(|c| name_is(c, &record.container))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    if record.security_context {
        container.remove("securityContext");
    }
    if let Some(Value::Array(mounts)) = container.get_mut("volumeMounts") {
        mounts.retain(|m| !(record.volume_mounts.iter().any(|n| name_is(m, n)) && is_our_mount(m)));
        if mounts.is_empty() {
            container.remove("volumeMounts");
        }
    }
    if record.env.iter().any(|e| e == names::PYTHONPATH)
        && let Some(Value::Array(env)) = container.get_mut("env")
    {
        strip_pythonpath(env);
        if env.is_empty() {
            container.remove("env");
        }
    }
}

/// Our PYTHONPATH entry, in its three shapes: added alone, prefixed to a plain value, or chained
/// after an entry that reads its value from elsewhere.
fn strip_pythonpath(env: &mut Vec<Value>) {
    let prefix = format!("{}:", names::SITE_PATH);
    let chained = format!("{}:$({})", names::SITE_PATH, names::PYTHONPATH);
    env.retain(|e| {
        let ours = name_is(e, names::PYTHONPATH)
            && e.get("valueFrom").is_none()
            && matches!(e.get("value").and_then(Value::as_str), Some(v) if v == names::SITE_PATH || v == chained);
        !ours
    });
    for entry in env.iter_mut().filter(|e| name_is(e, names::PYTHONPATH)) {
        let restored = entry
            .get("value")
            .and_then(Value::as_str)
            .and_then(|v| v.strip_prefix(&prefix))
            .map(str::to_owned);
        if let Some(old) = restored {
            entry["value"] = Value::String(old);
        }
    }
}

fn list<'a>(value: Option<&'a Value>, key: &str) -> &'a [Value] {
    value
        .and_then(|v| v.get(key))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The installer's init container: `python3 -c <program>` configured by our env var, under our
/// name or, under takeover, the operator's.
pub fn is_our_init_container(container: &Value) -> bool {
    let command = list(Some(container), "command");
    let runs_installer = command.len() == 3
        && command[0].as_str() == Some("python3")
        && command[1].as_str() == Some("-c");
    let configured = list(Some(container), "env")
        .iter()
        .any(|e| name_is(e, names::CONFIG_ENV));
    (name_is(container, names::INIT_CONTAINER)
        || name_is(container, names::OPERATOR_INIT_CONTAINER))
        && runs_installer
        && configured
}

/// One of our volumes with the source we give it.
pub(crate) fn is_our_volume(volume: &Value) -> bool {
    let source = |key: &str| volume.get(key).is_some_and(Value::is_object);
    if name_is(volume, names::PACKAGES_VOLUME) {
        source("emptyDir")
    } else if name_is(volume, names::CACHE_VOLUME) {
        volume
            .pointer("/persistentVolumeClaim/claimName")
            .and_then(Value::as_str)
            .is_some_and(|claim| claim.ends_with(crate::spec::PVC_SUFFIX))
    } else if name_is(volume, names::GCS_KEY_VOLUME) {
        source("secret")
    } else if name_is(volume, names::IMAGE_VOLUME) {
        source("image")
    } else if name_is(volume, names::LOCK_VOLUME) {
        volume
            .pointer("/configMap/name")
            .and_then(Value::as_str)
            .is_some_and(|name| name.ends_with("-python-packages-lock"))
    } else {
        false
    }
}

/// A mount of one of our volumes at the path we mount it.
pub(crate) fn is_our_mount(mount: &Value) -> bool {
    let path = mount.get("mountPath").and_then(Value::as_str);
    [
        (names::PACKAGES_VOLUME, names::PACKAGES_PATH),
        (names::CACHE_VOLUME, names::CACHE_PATH),
        (names::GCS_KEY_VOLUME, names::GCS_KEY_DIR),
        (names::LOCK_VOLUME, names::LOCK_DIR),
        (names::IMAGE_VOLUME, names::SITE_PATH),
    ]
    .iter()
    .any(|(name, ours)| name_is(mount, name) && path == Some(ours))
}

pub fn name_is(item: &Value, name: &str) -> bool {
    item.get("name").and_then(Value::as_str) == Some(name)
}
