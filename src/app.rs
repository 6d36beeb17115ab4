//! Which KasprApp an object belongs to, and what looking one up can answer.
//!
//! Neutral ground: the admission envelope, the KasprApp sources, the mutation and the
//! controller all name apps with [`AppRef`], so none of them has to import another for it.

use std::sync::Arc;

use serde_json::Value;

use crate::names;

/// A KasprApp, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppRef {
    pub namespace: String,
    pub name: String,
}

impl AppRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        AppRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The reference of a KasprApp object; `default_namespace` when it names none (as kubectl
    /// does for a file without a namespace).
    pub fn of_object(app: &Value, default_namespace: &str) -> Self {
        let text = |pointer: &str| app.pointer(pointer).and_then(Value::as_str).unwrap_or("");
        let namespace = match text("/metadata/namespace") {
            "" => default_namespace,
            ns => ns,
        };
        AppRef::new(namespace, text("/metadata/name"))
    }
}

impl std::fmt::Display for AppRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A KasprApp as the owner of other objects: its reference plus what an ownerReference needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppOwner {
    pub app: AppRef,
    pub uid: String,
    pub api_version: String,
}

impl AppOwner {
    /// `None` unless the object has a name, a namespace and a uid.
    pub fn of(app: &Value) -> Option<Self> {
        let text = |pointer: &str| {
            app.pointer(pointer)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        Some(AppOwner {
            app: AppRef::new(text("/metadata/namespace")?, text("/metadata/name")?),
            uid: text("/metadata/uid")?,
            api_version: text("/apiVersion").unwrap_or_else(|| "kaspr.io/v1alpha1".to_owned()),
        })
    }
}

/// The result of looking a KasprApp up.
#[derive(Debug, Clone)]
pub enum AppLookup {
    Found(Arc<Value>),
    NotFound,
    /// The app could not be read (for example the API server is unreachable).
    Unavailable(String),
}

/// The KasprApp owning a StatefulSet: an ownerReference of kind `KasprApp` in group `kaspr.io`.
pub fn owning_app(statefulset: &Value) -> Option<String> {
    statefulset
        .pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|r| {
            r.get("kind").and_then(Value::as_str) == Some("KasprApp")
                && r.get("apiVersion")
                    .and_then(Value::as_str)
                    .is_some_and(|v| v.starts_with("kaspr.io/"))
        })
        .and_then(|r| r.get("name")?.as_str())
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

/// The KasprApp a StatefulSet belongs to: its KasprApp ownerReference, else the pod template's
/// labels `kaspr.io/kind: KasprApp` and `kaspr.io/app: <name>`. Kaspr operator releases
/// recreate the StatefulSet without ownerReferences on some paths, and the template keeps those
/// labels; the ownerReference wins when both exist.
pub fn statefulset_app(statefulset: &Value) -> Option<String> {
    owning_app(statefulset).or_else(|| template_app(statefulset))
}

/// The app named by a StatefulSet's pod-template labels.
fn template_app(statefulset: &Value) -> Option<String> {
    let labels = statefulset.pointer("/spec/template/metadata/labels")?;
    if labels.get(names::KIND_LABEL).and_then(Value::as_str) != Some("KasprApp") {
        return None;
    }
    labels
        .get(names::APP_LABEL)
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

/// The KasprApp a Pod belongs to: label `kaspr.io/app` (else `app.kubernetes.io/instance`) on a
/// pod labelled `kaspr.io/kind: KasprApp`.
pub fn pod_app(pod: &Value) -> Option<String> {
    let labels = pod.pointer("/metadata/labels")?;
    if labels.get(names::KIND_LABEL).and_then(Value::as_str) != Some("KasprApp") {
        return None;
    }
    [names::APP_LABEL, names::INSTANCE_LABEL]
        .iter()
        .find_map(|l| labels.get(*l).and_then(Value::as_str))
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_statefulset_is_known_by_its_owner_else_by_its_template_labels() {
        let labels = json!({"kaspr.io/kind": "KasprApp", "kaspr.io/app": "from-labels"});
        let owner =
            json!([{"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": "owner"}]);
        let sts = |owners: Option<&Value>, labels: &Value| {
            let mut sts = json!({"metadata": {"name": "x"}, "spec": {"template": {"metadata": {"labels": labels}}}});
            if let Some(owners) = owners {
                sts["metadata"]["ownerReferences"] = owners.clone();
            }
            sts
        };
        assert_eq!(
            statefulset_app(&sts(Some(&owner), &labels)).as_deref(),
            Some("owner")
        );
        assert_eq!(
            statefulset_app(&sts(None, &labels)).as_deref(),
            Some("from-labels")
        );
        // Both labels are needed; the instance label alone does not name the app here.
        let partial = json!({"kaspr.io/app": "x", "app.kubernetes.io/instance": "x"});
        assert_eq!(statefulset_app(&sts(None, &partial)), None);
        let instance_only = json!({"kaspr.io/kind": "KasprApp", "app.kubernetes.io/instance": "x"});
        assert_eq!(statefulset_app(&sts(None, &instance_only)), None);
    }

    #[test]
    fn the_owner_needs_name_namespace_and_uid() {
        let full = json!({"apiVersion": "kaspr.io/v1alpha1",
            "metadata": {"name": "a", "namespace": "n", "uid": "u"}});
        assert_eq!(
            AppOwner::of(&full),
            Some(AppOwner {
                app: AppRef::new("n", "a"),
                uid: "u".into(),
                api_version: "kaspr.io/v1alpha1".into(),
            })
        );
        assert_eq!(
            AppOwner::of(&json!({"metadata": {"name": "a", "namespace": "n"}})),
            None
        );
    }
}
