//! `preview` and `validate`: what the webhook would do, without a cluster.
//!
//! Both go through the same validation and mutation code as the webhook.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::admission;
use crate::config::RenderConfig;
use crate::documents;
use crate::mutation::ObjectKind;
use crate::validation::{self, Report};

/// What `preview` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Yaml,
    Json,
    Patch,
}

/// Why a preview could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreviewError {
    #[error("{source_name}: {message}")]
    Unreadable {
        source_name: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Denied(String),
    #[error("{source_name}: kind {kind:?} is not previewable (use a StatefulSet or a Pod)")]
    UnsupportedKind { source_name: String, kind: String },
}

/// A rendered preview.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Parses YAML or JSON into objects (see [`documents::read_objects`]).
pub fn parse_documents(text: &str, source_name: &str) -> Result<Vec<Value>, PreviewError> {
    documents::read_objects(text).map_err(|message| PreviewError::Unreadable {
        source_name: source_name.to_owned(),
        message,
    })
}

/// Parses exactly one document.
pub fn parse_one(text: &str, source_name: &str) -> Result<Value, PreviewError> {
    let mut docs = parse_documents(text, source_name)?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        n => Err(PreviewError::Unreadable {
            source_name: source_name.to_owned(),
            message: format!("expected one object, found {n}"),
        }),
    }
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// The StatefulSet the Kaspr operator renders for an app: `<app>-app`, labelled and owned by the
/// KasprApp, main container `kaspr`.
pub fn operator_statefulset(kasprapp: &Value) -> Value {
    let name = str_at(kasprapp, "/metadata/name");
    let namespace = match str_at(kasprapp, "/metadata/namespace") {
        "" => "default",
        ns => ns,
    };
    let uid = match str_at(kasprapp, "/metadata/uid") {
        "" => "00000000-0000-0000-0000-000000000000",
        uid => uid,
    };
    let api_version = match str_at(kasprapp, "/apiVersion") {
        "" => "kaspr.io/v1alpha1",
        v => v,
    };
    let spec = kasprapp.get("spec").cloned().unwrap_or_else(|| json!({}));
    let image = spec
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or("kasprio/kaspr:latest");
    let replicas = spec.get("replicas").and_then(Value::as_i64).unwrap_or(1);
    let labels = json!({
        "kaspr.io/kind": "KasprApp",
        "kaspr.io/app": name,
        "app.kubernetes.io/name": "kaspr",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "kaspr-operator",
    });
    let mut env = vec![json!({"name": "KASPR_APP_NAME", "value": name})];
    if let Some(servers) = spec.get("bootstrapServers").and_then(Value::as_str) {
        env.push(json!({"name": "KASPR_KAFKA_BOOTSTRAP_SERVERS", "value": servers}));
    }
    let mut sts = json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": format!("{name}-app"),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": api_version,
                "kind": "KasprApp",
                "name": name,
                "uid": uid,
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"kaspr.io/app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{
                        "name": "kaspr",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python3", "-m", "kaspr", "worker"],
                        "env": env,
                        "ports": [{"name": "http", "containerPort": 6065, "protocol": "TCP"}],
                        "volumeMounts": [{"name": "kaspr-data", "mountPath": "/var/lib/kaspr"}],
                    }],
                },
            },
        },
    });
    let storage = spec.get("storage");
    if storage.and_then(|s| s.get("type")).and_then(Value::as_str) == Some("persistent-claim") {
        let size = storage
            .and_then(|s| s.get("size"))
            .and_then(Value::as_str)
            .unwrap_or("1Gi");
        let mut claim = json!({
            "metadata": {"name": "kaspr-data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
        });
        if let Some(class) = storage.and_then(|s| s.get("class")).and_then(Value::as_str) {
            claim["spec"]["storageClassName"] = json!(class);
        }
        sts["spec"]["volumeClaimTemplates"] = json!([claim]);
    } else {
        sts["spec"]["template"]["spec"]["volumes"] =
            json!([{"name": "kaspr-data", "emptyDir": {}}]);
    }
    sts
}

/// Renders what the webhook would do to `object` (default: the operator's StatefulSet).
pub fn preview(
    kasprapp: &Value,
    object: Option<Value>,
    output: Output,
    config: &RenderConfig,
) -> Result<Preview, PreviewError> {
    preview_with_lock(kasprapp, object, output, config, None)
}

/// [`preview`] with builds on: `lock` is the app's lock ConfigMap (`<app>-python-packages-lock`,
/// as `kubectl get configmap -o yaml` prints it), so the preview renders the app's current set,
/// or awaits its first one, as the webhook does; in image mode, the set's image.
pub fn preview_with_lock(
    kasprapp: &Value,
    object: Option<Value>,
    output: Output,
    config: &RenderConfig,
    lock: Option<&Value>,
) -> Result<Preview, PreviewError> {
    let effective;
    let kasprapp = match lock {
        Some(config_map) => {
            let data: std::collections::BTreeMap<String, String> = config_map
                .get("data")
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| PreviewError::Unreadable {
                    source_name: "lock".into(),
                    message: format!("data: {e}"),
                })?
                .unwrap_or_default();
            let state = crate::builds::LockState::from_data(
                str_at(config_map, "/metadata/name"),
                Some(&data),
            )
            .map_err(|e| PreviewError::Unreadable {
                source_name: "lock".into(),
                message: e.to_string(),
            })?;
            effective = crate::builds::render::effective_app(kasprapp, Some(&state));
            &effective
        }
        None => kasprapp,
    };
    let report = validation::validate_kasprapp(kasprapp);
    if !report.errors.is_empty() {
        return Err(PreviewError::Invalid(report.error_message(&format!(
            "KasprApp {}",
            str_at(kasprapp, "/metadata/name")
        ))));
    }
    let object = object.unwrap_or_else(|| operator_statefulset(kasprapp));
    let kind = match str_at(&object, "/kind") {
        "StatefulSet" => ObjectKind::StatefulSet,
        "Pod" => ObjectKind::Pod,
        other => {
            return Err(PreviewError::UnsupportedKind {
                source_name: "object".into(),
                kind: other.to_owned(),
            });
        }
    };
    let app = admission::kasprapp_ref(kasprapp, &object);
    let mut outcome = if lock.is_some() {
        admission::mutate_object(kind, &object, kasprapp, config)
    } else {
        admission::mutate_validated(kind, &object, &report, &app, config)
    }
    .map_err(|d| PreviewError::Denied(d.message))?;
    if lock.is_none()
        && let Some(warning) =
            crate::builds::image::without_builds_warning(kasprapp, None, report.spec.is_some())
    {
        outcome.warnings.push(warning);
    }
    let unprintable = |e: &dyn std::fmt::Display| {
        PreviewError::Denied(format!("the result cannot be printed: {e}"))
    };
    let text = match output {
        Output::Patch => to_pretty_json(&outcome.patch).map_err(|e| unprintable(&e))?,
        Output::Json | Output::Yaml => {
            let mut mutated = object;
            json_patch::patch(&mut mutated, &outcome.patch).map_err(|e| {
                PreviewError::Denied(format!("the rendered patch does not apply: {e}"))
            })?;
            if output == Output::Json {
                to_pretty_json(&mutated).map_err(|e| unprintable(&e))?
            } else {
                serde_yaml::to_string(&mutated).map_err(|e| unprintable(&e))?
            }
        }
    };
    Ok(Preview {
        text,
        warnings: outcome.warnings,
    })
}

fn to_pretty_json<T: serde::Serialize>(value: &T) -> serde_json::Result<String> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(text)
}

/// Validates every KasprApp in a file's text. Returns one report per KasprApp with its name.
pub fn validate_text(text: &str, source_name: &str) -> Result<Vec<(String, Report)>, PreviewError> {
    let docs = parse_documents(text, source_name)?;
    if docs.is_empty() {
        return Err(PreviewError::Unreadable {
            source_name: source_name.to_owned(),
            message: "no object found".into(),
        });
    }
    let mut reports = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let kind = str_at(doc, "/kind");
        if kind != "KasprApp" {
            return Err(PreviewError::Unreadable {
                source_name: source_name.to_owned(),
                message: format!("document {} is a {kind:?}, not a KasprApp", i + 1),
            });
        }
        let mut label = format!("{source_name}: KasprApp {}", str_at(doc, "/metadata/name"));
        if docs.len() > 1 {
            let _ = write!(label, " (document {})", i + 1);
        }
        reports.push((label, validation::validate_kasprapp(doc)));
    }
    Ok(reports)
}

#[cfg(test)]
mod image_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> Value {
        parse_one(
            "apiVersion: kaspr.io/v1alpha1\nkind: KasprApp\nmetadata:\n  name: demo\n  namespace: team\nspec:\n  pythonPackages:\n    packages: [\"requests==2.31.0\"]\n",
            "app.yaml",
        )
        .expect("parses")
    }

    #[test]
    fn operator_statefulset_is_owned_and_labelled() {
        let sts = operator_statefulset(&app());
        assert_eq!(sts["metadata"]["name"], "demo-app");
        assert_eq!(sts["metadata"]["namespace"], "team");
        assert_eq!(crate::app::owning_app(&sts).as_deref(), Some("demo"));
        assert_eq!(
            sts["spec"]["template"]["metadata"]["labels"]["kaspr.io/kind"],
            "KasprApp"
        );
        assert_eq!(
            sts["spec"]["template"]["spec"]["containers"][0]["name"],
            "kaspr"
        );
    }

    #[test]
    fn preview_renders_yaml_json_and_patch() {
        let yaml = preview(&app(), None, Output::Yaml, &RenderConfig::default()).expect("ok");
        assert!(yaml.text.contains("name: kaspr-packages"));
        let json: Value = serde_json::from_str(
            &preview(&app(), None, Output::Json, &RenderConfig::default())
                .expect("ok")
                .text,
        )
        .expect("json");
        assert_eq!(parse_one(&yaml.text, "out").expect("yaml"), json);
        let patch: Value = serde_json::from_str(
            &preview(&app(), None, Output::Patch, &RenderConfig::default())
                .expect("ok")
                .text,
        )
        .expect("json");
        assert!(patch.as_array().is_some_and(|ops| !ops.is_empty()));
    }

    #[test]
    fn preview_of_an_invalid_app_lists_every_error() {
        let mut bad = app();
        bad["spec"]["pythonPackages"] =
            json!({"packages": ["-e .", "x; y"], "installPolicy": {"retries": 99}});
        let err = preview(&bad, None, Output::Yaml, &RenderConfig::default()).expect_err("invalid");
        let PreviewError::Invalid(message) = err else {
            panic!("{err:?}")
        };
        assert_eq!(message.lines().count(), 4, "{message}");
    }

    #[test]
    fn validate_text_reads_multi_document_files() {
        let text = "kind: KasprApp\nmetadata: {name: a}\nspec: {pythonPackages: {packages: [x==1]}}\n---\nkind: KasprApp\nmetadata: {name: b}\nspec: {pythonPackages: {packages: []}}\n";
        let reports = validate_text(text, "apps.yaml").expect("reads");
        assert_eq!(reports.len(), 2);
        assert!(reports[0].1.errors.is_empty());
        assert_eq!(reports[1].1.errors.len(), 1);
        assert!(reports[1].0.contains("KasprApp b (document 2)"));
        assert!(validate_text("kind: Pod\n", "pod.yaml").is_err());
        assert!(validate_text(": : :\n\t", "bad.yaml").is_err());
    }
}
