//! The `packages.kaspr.io/injected` annotation: the names of everything the webhook added, so
//! it can strip exactly those and inject again (idempotency, removal).

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
        init.retain(|c| !record.init_containers.iter().any(|n| name_is(c, n)));
        if init.is_empty() {
            spec.remove("initContainers");
        }
    }
    if let Some(Value::Array(volumes)) = spec.get_mut("volumes") {
        volumes.retain(|v| !record.volumes.iter().any(|n| name_is(v, n)));
        if volumes.is_empty() {
            spec.remove("volumes");
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
    if let Some(Value::Array(mounts)) = container.get_mut("volumeMounts") {
        mounts.retain(|m| !record.volume_mounts.iter().any(|n| name_is(m, n)));
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

pub fn name_is(item: &Value, name: &str) -> bool {
    item.get("name").and_then(Value::as_str) == Some(name)
}
