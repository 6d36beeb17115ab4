//! `installPolicy` and `resources`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use serde_json::{Map, Value};

use super::{Checker, ROOT, show};
use crate::quantity;
use crate::spec::{DEFAULT_RETRIES, DEFAULT_TIMEOUT_SECONDS, InstallPolicy, OnFailure};

pub(super) fn install_policy(c: &mut Checker, map: &Map<String, Value>) -> InstallPolicy {
    let path = format!("{ROOT}.installPolicy");
    let Some(policy) = c.object(map, "installPolicy", &path) else {
        return InstallPolicy::default();
    };
    c.unknown_fields(policy, &["retries", "timeout", "onFailure"], &path);
    let retries = c
        .integer(policy, "retries", &format!("{path}.retries"), 0..=20)
        .unwrap_or(DEFAULT_RETRIES);
    let timeout_seconds = c
        .integer(policy, "timeout", &format!("{path}.timeout"), 60..=86_400)
        .unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    let on_failure_path = format!("{path}.onFailure");
    let on_failure = match c.string(policy, "onFailure", &on_failure_path).as_deref() {
        None | Some("block") => OnFailure::Block,
        Some("allow") => {
            c.warn(
                &on_failure_path,
                "\"allow\" starts the app without its packages when the install fails",
            );
            OnFailure::Allow
        }
        Some(other) => {
            c.error(
                on_failure_path,
                format!("{other:?} is not a failure policy (use \"block\" or \"allow\")"),
            );
            OnFailure::Block
        }
    };
    InstallPolicy {
        retries,
        timeout_seconds,
        on_failure,
    }
}

fn quantity_map(
    c: &mut Checker,
    map: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Option<BTreeMap<String, (K8sQuantity, f64)>> {
    let field_path = format!("{path}.{field}");
    let entries = c.object(map, field, &field_path)?;
    let mut out = BTreeMap::new();
    for (name, value) in entries {
        let entry_path = format!("{field_path}.{name}");
        let raw = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => {
                c.error(
                    entry_path,
                    format!("must be a quantity, got {}", show(other)),
                );
                continue;
            }
        };
        match quantity::parse(&raw) {
            Ok(q) if q.0 >= 0.0 => {
                out.insert(name.clone(), (K8sQuantity(raw), q.0));
            }
            Ok(_) => c.error(entry_path, format!("{raw:?} must not be negative")),
            Err(e) => c.error(entry_path, e),
        }
    }
    Some(out)
}

pub(super) fn resources(c: &mut Checker, map: &Map<String, Value>) -> Option<ResourceRequirements> {
    let path = format!("{ROOT}.resources");
    let resources = c.object(map, "resources", &path)?;
    for key in resources
        .keys()
        .filter(|k| *k != "requests" && *k != "limits")
    {
        c.error(
            format!("{path}.{key}"),
            "unknown field (only requests and limits are allowed)",
        );
    }
    let requests = quantity_map(c, resources, "requests", &path);
    let limits = quantity_map(c, resources, "limits", &path);
    if let (Some(requests), Some(limits)) = (&requests, &limits) {
        for (name, (raw, value)) in requests {
            if let Some((limit_raw, limit)) = limits.get(name)
                && value > limit
            {
                c.error(
                    format!("{path}.requests.{name}"),
                    format!("{:?} is more than the limit {:?}", raw.0, limit_raw.0),
                );
            }
        }
    }
    let strip = |m: Option<BTreeMap<String, (K8sQuantity, f64)>>| {
        m.filter(|m| !m.is_empty())
            .map(|m| m.into_iter().map(|(k, (q, _))| (k, q)).collect())
    };
    let out = ResourceRequirements {
        requests: strip(requests),
        limits: strip(limits),
        ..Default::default()
    };
    (out.requests.is_some() || out.limits.is_some()).then_some(out)
}
