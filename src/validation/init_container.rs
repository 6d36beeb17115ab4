//! `spec.template.pythonPackagesInitContainer`: extra env and mounts for the install
//! container only.

use k8s_openapi::api::core::v1::{EnvVar, SecurityContext, VolumeMount};
use serde_json::{Map, Value};

use super::{Checker, INIT_ROOT, show};
use crate::names::{RESERVED_ENV, RESERVED_PATHS};
use crate::spec::InitContainerExtras;

/// Env var names: anything printable without '=' (Kubernetes' relaxed rule).
fn is_env_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|ch| ch.is_ascii_graphic() && ch != '=')
}

pub(super) fn init_container_extras(
    c: &mut Checker,
    template: &Map<String, Value>,
) -> InitContainerExtras {
    let Some(init) = c.object(template, "pythonPackagesInitContainer", INIT_ROOT) else {
        return InitContainerExtras::default();
    };
    c.unknown_fields(init, &["env", "volumeMounts", "securityContext"], INIT_ROOT);
    let context_path = format!("{INIT_ROOT}.securityContext");
    let mut extras = InitContainerExtras {
        security_context: security_context(c, init, &context_path),
        ..InitContainerExtras::default()
    };
    if let Some(context) = &extras.security_context {
        for key in ["privileged", "allowPrivilegeEscalation", "capabilities"] {
            if context.contains_key(key) {
                c.warn(
                    format!("{context_path}.{key}"),
                    "the installer always runs unprivileged, without privilege escalation and \
                     with every capability dropped; this field is ignored",
                );
            }
        }
    }

    let env_path = format!("{INIT_ROOT}.env");
    match init.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(var) = env_var(c, item, &format!("{env_path}[{i}]")) {
                    extras.env.push(var);
                }
            }
        }
        Some(other) => c.error(env_path, format!("must be a list, got {}", show(other))),
    }

    let mounts_path = format!("{INIT_ROOT}.volumeMounts");
    match init.get("volumeMounts") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(mount) = volume_mount(c, item, &format!("{mounts_path}[{i}]")) {
                    extras.volume_mounts.push(mount);
                }
            }
        }
        Some(other) => c.error(mounts_path, format!("must be a list, got {}", show(other))),
    }
    extras
}

fn env_var(c: &mut Checker, item: &Value, path: &str) -> Option<EnvVar> {
    let Some(map) = item.as_object() else {
        c.error(path, format!("must be an object, got {}", show(item)));
        return None;
    };
    let name_path = format!("{path}.name");
    let name = c.string(map, "name", &name_path);
    let Some(name) = name else {
        c.error(name_path, "is required");
        return None;
    };
    if !is_env_name(&name) {
        c.error(
            &name_path,
            format!("{name:?} is not a valid environment variable name"),
        );
    }
    if RESERVED_ENV.contains(&name.as_str()) {
        c.error(
            &name_path,
            format!("{name:?} is set by kaspr-packages-webhook itself"),
        );
    }
    let has_value = map.get("value").is_some_and(|v| !v.is_null());
    let has_value_from = map.get("valueFrom").is_some_and(|v| !v.is_null());
    if has_value && has_value_from {
        c.error(path, "set either value or valueFrom, not both");
        return None;
    }
    if has_value_from {
        let from_path = format!("{path}.valueFrom");
        let from = c.object(map, "valueFrom", &from_path)?;
        let sources: Vec<&String> = from.keys().collect();
        let allowed = ["secretKeyRef", "configMapKeyRef", "fieldRef"];
        if sources.len() != 1 || !allowed.contains(&sources[0].as_str()) {
            c.error(
                from_path,
                "must have exactly one of secretKeyRef, configMapKeyRef, fieldRef",
            );
            return None;
        }
    }
    for key in map
        .keys()
        .filter(|k| !["name", "value", "valueFrom"].contains(&k.as_str()))
    {
        c.warn(format!("{path}.{key}"), "unknown field; it is ignored");
    }
    let mut clean = Map::new();
    for key in ["name", "value", "valueFrom"] {
        if let Some(v) = map.get(key).filter(|v| !v.is_null()) {
            clean.insert(key.to_owned(), v.clone());
        }
    }
    match serde_json::from_value::<EnvVar>(Value::Object(clean)) {
        Ok(var) => Some(var),
        Err(e) => {
            c.error(path, format!("is not a valid env entry: {e}"));
            None
        }
    }
}

fn volume_mount(c: &mut Checker, item: &Value, path: &str) -> Option<VolumeMount> {
    let Some(map) = item.as_object() else {
        c.error(path, format!("must be an object, got {}", show(item)));
        return None;
    };
    let mount: VolumeMount = match serde_json::from_value(item.clone()) {
        Ok(m) => m,
        Err(e) => {
            c.error(path, format!("is not a valid volume mount: {e}"));
            return None;
        }
    };
    if !map.contains_key("name") || mount.name.is_empty() {
        c.error(format!("{path}.name"), "is required");
    }
    if !mount.mount_path.starts_with('/') {
        c.error(
            format!("{path}.mountPath"),
            format!("{:?} must be an absolute path", mount.mount_path),
        );
    }
    let overlaps = RESERVED_PATHS.iter().find(|reserved| {
        let p = mount.mount_path.trim_end_matches('/');
        p == **reserved
            || p.starts_with(&format!("{reserved}/"))
            || reserved.starts_with(&format!("{p}/"))
    });
    if let Some(reserved) = overlaps {
        c.error(
            format!("{path}.mountPath"),
            format!(
                "{:?} overlaps {reserved}, which kaspr-packages-webhook mounts",
                mount.mount_path
            ),
        );
    }
    Some(mount)
}

/// `spec.template.kasprContainer.securityContext`, for the main container under takeover.
pub(super) fn main_security_context(
    c: &mut Checker,
    template: &Map<String, Value>,
) -> Option<Map<String, Value>> {
    let path = "spec.template.kasprContainer";
    let container = c.object(template, "kasprContainer", path)?;
    security_context(c, container, &format!("{path}.securityContext"))
}

/// A container securityContext: checked against the Kubernetes type, kept as written (fields
/// newer than our types included).
fn security_context(
    c: &mut Checker,
    parent: &Map<String, Value>,
    path: &str,
) -> Option<Map<String, Value>> {
    let context = c.object(parent, "securityContext", path)?;
    if let Err(e) = serde_json::from_value::<SecurityContext>(Value::Object(context.clone())) {
        c.error(
            path,
            format!("is not a valid container securityContext: {e}"),
        );
        return None;
    }
    Some(context.clone())
}
