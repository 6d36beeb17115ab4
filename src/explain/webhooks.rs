//! Reading the release's webhook configurations the way the API server does: rules, the
//! namespace and object selectors, and the match conditions the chart renders.
//!
//! Match conditions are CEL; this product does not embed a CEL interpreter. The chart's own
//! conditions are known by name and evaluated with the same Rust functions the webhook uses
//! (`app::statefulset_app`, `mutation::pod_already_injected`), whose equivalence the end-to-end
//! tests prove on a real API server. A condition of another name is reported as not evaluated.

use serde_json::{Map, Value};

use crate::app;
use crate::mutation;

pub const STATEFULSET_WEBHOOK: &str = "statefulsets.packages.kaspr.io";
pub const POD_WEBHOOK: &str = "pods.packages.kaspr.io";
pub const KASPRAPP_WEBHOOK: &str = "kasprapps.packages.kaspr.io";
/// The mutating webhooks of a release, by which its configuration is found.
pub const MUTATING_WEBHOOKS: &[&str] = &[STATEFULSET_WEBHOOK, POD_WEBHOOK];

/// Whether a webhook configuration registers any of `names`.
pub fn registers(configuration: &Value, names: &[&str]) -> bool {
    webhooks(configuration).any(|w| names.contains(&str_at(w, "/name")))
}

fn webhooks(configuration: &Value) -> impl Iterator<Item = &Value> {
    configuration
        .get("webhooks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The webhook entry `name` of a configuration.
pub fn webhook<'a>(configuration: &'a Value, name: &str) -> Option<&'a Value> {
    webhooks(configuration).find(|w| str_at(w, "/name") == name)
}

/// The requirements of a label selector that `labels` fail, described for a reader; empty when
/// the selector selects them. A missing selector selects everything.
pub fn unmet(selector: Option<&Value>, labels: &Map<String, Value>) -> Vec<String> {
    let Some(selector) = selector.filter(|s| !s.is_null()) else {
        return Vec::new();
    };
    let label = |key: &str| labels.get(key).and_then(Value::as_str);
    let mut failed = Vec::new();
    if let Some(match_labels) = selector.get("matchLabels").and_then(Value::as_object) {
        for (key, want) in match_labels {
            let want = want.as_str().unwrap_or("");
            if label(key) != Some(want) {
                failed.push(format!("{key}={want}"));
            }
        }
    }
    let expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for expression in expressions {
        let key = str_at(expression, "/key");
        let operator = str_at(expression, "/operator");
        let values: Vec<&str> = expression
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let value = label(key);
        let holds = match operator {
            "In" => value.is_some_and(|v| values.contains(&v)),
            "NotIn" => value.is_none_or(|v| !values.contains(&v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        };
        if !holds {
            let shown = if values.is_empty() {
                String::new()
            } else {
                format!(" [{}]", values.join(", "))
            };
            failed.push(format!("{key} {operator}{shown}"));
        }
    }
    failed
}

/// Whether a webhook's rules cover `operation` on `resource` in `group`.
pub fn rules_cover(webhook: &Value, group: &str, resource: &str, operation: &str) -> bool {
    let has = |rule: &Value, key: &str, want: &str| {
        rule.get(key)
            .and_then(Value::as_array)
            .is_some_and(|items| items.iter().any(|i| i == "*" || i == want))
    };
    webhook
        .get("rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|rule| {
            has(rule, "apiGroups", group)
                && has(rule, "resources", resource)
                && has(rule, "operations", operation)
        })
}

/// The value of one match condition for `object`: `Some(true)` when it lets the object through,
/// `None` when it is not one of the chart's own conditions.
pub fn condition_holds(name: &str, object: &Value) -> Option<bool> {
    match name {
        "owned-by-kasprapp" => Some(app::statefulset_app(object).is_some()),
        "not-from-an-injected-template" => Some(!mutation::pod_already_injected(object)),
        _ => None,
    }
}

/// How one webhook of the configuration treats an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// The webhook's name.
    pub webhook: String,
    /// `Some(reason)` when the namespace selector leaves the namespace out.
    pub namespace_excluded: Option<String>,
    /// `Some(reason)` when the rules, the object selector or a match condition leave the
    /// object out.
    pub object_excluded: Option<String>,
    /// Match conditions that hold, and those that could not be evaluated here.
    pub conditions_met: Vec<String>,
    pub conditions_unknown: Vec<String>,
}

/// Evaluates webhook `name` of `configuration` for `object` in a namespace with
/// `namespace_labels`, for `operation` on `group`/`resource`. `None` when the configuration has
/// no such webhook.
pub fn evaluate(
    configuration: &Value,
    name: &str,
    (group, resource, operation): (&str, &str, &str),
    object: &Value,
    namespace_labels: &Map<String, Value>,
) -> Option<Match> {
    let webhook = webhook(configuration, name)?;
    let namespace_failed = unmet(webhook.get("namespaceSelector"), namespace_labels);
    let namespace_excluded = (!namespace_failed.is_empty()).then(|| {
        format!(
            "its namespaceSelector requires {}",
            namespace_failed.join(", ")
        )
    });
    let object_labels = object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut object_excluded = None;
    let mut conditions_met = Vec::new();
    let mut conditions_unknown = Vec::new();
    if !rules_cover(webhook, group, resource, operation) {
        object_excluded = Some(format!("its rules do not cover {operation} of {resource}"));
    } else {
        let failed = unmet(webhook.get("objectSelector"), &object_labels);
        if !failed.is_empty() {
            object_excluded = Some(format!("its objectSelector requires {}", failed.join(", ")));
        }
    }
    let conditions = webhook
        .get("matchConditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for condition in conditions {
        let condition_name = str_at(condition, "/name");
        match condition_holds(condition_name, object) {
            Some(true) => conditions_met.push(condition_name.to_owned()),
            Some(false) => {
                object_excluded.get_or_insert_with(|| {
                    format!("its matchCondition {condition_name:?} is false for this object")
                });
            }
            None => conditions_unknown.push(condition_name.to_owned()),
        }
    }
    Some(Match {
        webhook: name.to_owned(),
        namespace_excluded,
        object_excluded,
        conditions_met,
        conditions_unknown,
    })
}

/// The labels a namespace is selected by; when the Namespace could not be read, the one label
/// the API server sets on every namespace (`kubernetes.io/metadata.name`).
pub fn namespace_labels(namespace: Option<&Value>, name: &str) -> Map<String, Value> {
    let mut labels = namespace
        .and_then(|n| n.pointer("/metadata/labels"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    labels
        .entry("kubernetes.io/metadata.name")
        .or_insert_with(|| Value::String(name.to_owned()));
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::json;

    fn labels(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[rstest]
    #[case::no_selector(Value::Null, json!({}), &[])]
    #[case::match_labels_met(json!({"matchLabels": {"a": "1"}}), json!({"a": "1"}), &[])]
    #[case::match_labels_unmet(json!({"matchLabels": {"a": "1"}}), json!({"a": "2"}), &["a=1"])]
    #[case::not_in_met(json!({"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["x"]}]}), json!({"k": "y"}), &[])]
    #[case::not_in_missing_label_met(json!({"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["x"]}]}), json!({}), &[])]
    #[case::not_in_unmet(json!({"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["x", "z"]}]}), json!({"k": "x"}), &["k NotIn [x, z]"])]
    #[case::in_unmet(json!({"matchExpressions": [{"key": "k", "operator": "In", "values": ["x"]}]}), json!({}), &["k In [x]"])]
    #[case::exists_unmet(json!({"matchExpressions": [{"key": "k", "operator": "Exists"}]}), json!({}), &["k Exists"])]
    #[case::does_not_exist_unmet(json!({"matchExpressions": [{"key": "k", "operator": "DoesNotExist"}]}), json!({"k": ""}), &["k DoesNotExist"])]
    fn label_selectors_are_read_as_the_api_server_reads_them(
        #[case] selector: Value,
        #[case] object_labels: Value,
        #[case] failed: &[&str],
    ) {
        assert_eq!(unmet(Some(&selector), &labels(object_labels)), failed);
    }

    fn chart_configuration() -> Value {
        json!({"webhooks": [{
            "name": POD_WEBHOOK,
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"]}],
            "objectSelector": {"matchLabels": {"kaspr.io/kind": "KasprApp"}},
            "matchConditions": [{"name": "not-from-an-injected-template", "expression": "..."},
                                {"name": "someone-elses", "expression": "true"}],
            "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name",
                "operator": "NotIn", "values": ["kube-system", "kaspr-system"]}]},
        }]})
    }

    #[test]
    fn a_pod_of_an_app_in_a_served_namespace_matches() {
        let pod =
            json!({"metadata": {"labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "a"}}});
        let found = evaluate(
            &chart_configuration(),
            POD_WEBHOOK,
            ("", "pods", "CREATE"),
            &pod,
            &namespace_labels(None, "apps"),
        )
        .expect("webhook");
        assert_eq!(found.namespace_excluded, None);
        assert_eq!(found.object_excluded, None);
        assert_eq!(found.conditions_met, ["not-from-an-injected-template"]);
        assert_eq!(found.conditions_unknown, ["someone-elses"]);
    }

    #[test]
    fn an_excluded_namespace_and_an_unlabelled_pod_are_named() {
        let pod = json!({"metadata": {"labels": {"app": "x"}}});
        let found = evaluate(
            &chart_configuration(),
            POD_WEBHOOK,
            ("", "pods", "CREATE"),
            &pod,
            &namespace_labels(None, "kaspr-system"),
        )
        .expect("webhook");
        assert_eq!(
            found.namespace_excluded.as_deref(),
            Some(
                "its namespaceSelector requires kubernetes.io/metadata.name NotIn [kube-system, kaspr-system]"
            )
        );
        assert_eq!(
            found.object_excluded.as_deref(),
            Some("its objectSelector requires kaspr.io/kind=KasprApp")
        );
    }

    #[test]
    fn an_injected_pod_fails_the_pod_webhooks_condition() {
        let pod = json!({"metadata": {"labels": {"kaspr.io/kind": "KasprApp"},
            "annotations": {"packages.kaspr.io/template-hash": "h"}}});
        let found = evaluate(
            &chart_configuration(),
            POD_WEBHOOK,
            ("", "pods", "CREATE"),
            &pod,
            &Map::new(),
        )
        .expect("webhook");
        assert!(
            found
                .object_excluded
                .is_some_and(|r| r.contains("not-from-an-injected-template"))
        );
        assert!(
            evaluate(
                &chart_configuration(),
                STATEFULSET_WEBHOOK,
                ("apps", "statefulsets", "UPDATE"),
                &pod,
                &Map::new()
            )
            .is_none()
        );
    }

    #[test]
    fn rules_must_cover_the_operation() {
        let webhook = &chart_configuration()["webhooks"][0];
        assert!(rules_cover(webhook, "", "pods", "CREATE"));
        assert!(!rules_cover(webhook, "", "pods", "UPDATE"));
        assert!(!rules_cover(webhook, "apps", "pods", "CREATE"));
    }
}
