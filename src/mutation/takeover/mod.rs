//! Takeover of the Kaspr operator's own package injection (operator v0.14 and newer).
//!
//! The operator renders an init container `install-packages` that runs its shell script, a
//! volume `<app>-app-packages` mounted in it and in the main container, in GCS mode a Secret
//! volume `gcs-sa-key`, and a main-container `PYTHONPATH` with a literal `${PYTHONPATH}`. It
//! rewrites the main container's env and mounts and the pod's volumes every ~10 s, and replaces
//! the whole template every 30 s when its watch fields differ, among them the `PACKAGES_HASH`
//! env of the init container named `install-packages` and of the main container.
//!
//! Under takeover the operator's injection is removed and ours is rendered with its init
//! container named `install-packages`, carrying the operator's `PACKAGES_HASH` entry as the
//! operator last rendered it (on the main container, which its 10 s rewrite keeps current);
//! the main container's `PACKAGES_HASH` is left as the operator renders it. The watch fields then read as the operator wants them, so its whole-template
//! loop never fires, and its 10 s rewrite is answered with the template already stored.

use serde_json::{Map, Value};

use super::record::{is_our_init_container, name_is};
use crate::names;

/// The `PACKAGES_HASH` value an install container gets while a takeover is being released
/// (the app switched back to `respect`): it differs from whatever the operator renders, so its
/// watch replaces the template with its own within one loop, while the pods keep our working
/// installer until then.
pub const RELEASED_HASH: &str = "released-by-kaspr-packages-webhook";

/// Whether the pod spec carries the operator's own install container (one named
/// `install-packages` that is not our installer).
pub fn operator_installs(pod_spec: &Map<String, Value>) -> bool {
    init_containers(pod_spec)
        .iter()
        .any(|c| name_is(c, names::OPERATOR_INIT_CONTAINER) && !is_our_init_container(c))
}

/// Whether the operator's own injection serves this pod template and stays: it carries the
/// operator's install container, is not taken over, and the app (or the chart) says `respect`.
/// Then our PVC cache has no user, and the operator's own claim serves the pods.
pub fn operator_in_charge(
    template: &Value,
    spec: &crate::spec::PythonPackages,
    config: &crate::config::RenderConfig,
) -> bool {
    let respect = spec.operator_packages.unwrap_or(config.operator_packages)
        == crate::spec::OperatorPackages::Respect;
    let Some(pod_spec) = template.get("spec").and_then(Value::as_object) else {
        return false;
    };
    let taken_over = super::record::Record::read(template.get("metadata"))
        .init_containers
        .iter()
        .any(|n| n == names::OPERATOR_INIT_CONTAINER);
    respect && operator_installs(pod_spec) && !taken_over
}

/// The `PACKAGES_HASH` entry our install container carries: the main container's (the
/// operator renders one value on both, and its 10 s rewrite keeps the main container's current,
/// so a package change reaches both watch fields in one revision), else the operator's install
/// container's, else the one our disguised container carries now.
pub fn packages_hash(pod_spec: &Map<String, Value>, main_index: Option<usize>) -> Option<Value> {
    let hash_of = |container: &Value| {
        container
            .get("env")?
            .as_array()?
            .iter()
            .find(|e| name_is(e, names::OPERATOR_HASH_ENV))
            .cloned()
    };
    let main = main_index
        .and_then(|i| list(pod_spec, "containers").get(i))
        .and_then(hash_of);
    let installers = init_containers(pod_spec)
        .iter()
        .filter(|c| name_is(c, names::OPERATOR_INIT_CONTAINER));
    let (theirs, ours): (Vec<&Value>, Vec<&Value>) =
        installers.partition(|c| !is_our_init_container(c));
    main.or_else(|| theirs.into_iter().chain(ours).find_map(hash_of))
}

/// Removes the operator's injection for app `app` from a pod spec: its install container, its
/// packages and GCS key volumes (kept when another container still mounts one), the main
/// container's mount of them, and its `PYTHONPATH`. The main container's `PACKAGES_HASH` stays:
/// it is one of the operator's watch fields, and it does nothing in the pod.
pub fn strip_operator(pod_spec: &mut Map<String, Value>, app: &str, main_index: usize) {
    let volume = names::operator_packages_volume(app);
    let ours = |v: &Value| {
        (name_is(v, &volume)
            && (v.get("emptyDir").is_some_and(Value::is_object)
                || v.pointer("/persistentVolumeClaim/claimName")
                    .and_then(Value::as_str)
                    == Some(names::operator_claim(app).as_str())))
            || (name_is(v, names::OPERATOR_GCS_KEY_VOLUME)
                && v.get("secret").is_some_and(Value::is_object))
    };
    if let Some(Value::Array(init)) = pod_spec.get_mut("initContainers") {
        init.retain(|c| !name_is(c, names::OPERATOR_INIT_CONTAINER) || is_our_init_container(c));
        if init.is_empty() {
            pod_spec.remove("initContainers");
        }
    }
    if let Some(main) = pod_spec
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .and_then(|c| c.get_mut(main_index))
        .and_then(Value::as_object_mut)
    {
        if let Some(Value::Array(mounts)) = main.get_mut("volumeMounts") {
            mounts.retain(|m| !(name_is(m, &volume) || name_is(m, names::OPERATOR_GCS_KEY_VOLUME)));
            if mounts.is_empty() {
                main.remove("volumeMounts");
            }
        }
        if let Some(Value::Array(env)) = main.get_mut("env") {
            env.retain(|e| {
                !(name_is(e, names::PYTHONPATH)
                    && e.get("value").and_then(Value::as_str) == Some(names::OPERATOR_PYTHONPATH))
            });
            if env.is_empty() {
                main.remove("env");
            }
        }
    }
    let still_mounted = |name: &str| {
        ["containers", "initContainers"].iter().any(|key| {
            list(pod_spec, key)
                .iter()
                .any(|c| list_of(c, "volumeMounts").iter().any(|m| name_is(m, name)))
        })
    };
    let removable: Vec<String> = list(pod_spec, "volumes")
        .iter()
        .filter(|v| ours(v))
        .filter_map(|v| v.get("name").and_then(Value::as_str))
        .filter(|n| !still_mounted(n))
        .map(str::to_owned)
        .collect();
    if let Some(Value::Array(volumes)) = pod_spec.get_mut("volumes") {
        volumes.retain(|v| !(ours(v) && removable.iter().any(|n| name_is(v, n))));
        if volumes.is_empty() {
            pod_spec.remove("volumes");
        }
    }
}

fn init_containers(pod_spec: &Map<String, Value>) -> &[Value] {
    list(pod_spec, "initContainers")
}

fn list<'a>(map: &'a Map<String, Value>, key: &str) -> &'a [Value] {
    map.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn list_of<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

#[cfg(test)]
mod tests;
