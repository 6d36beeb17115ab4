//! The KasprApp annotations this product reads: settings the operator's CRD has no field for
//! (its typed `spec.pythonPackages` prunes keys it does not declare), so they live in
//! `metadata.annotations`, which the API server always keeps.

use serde_json::Value;

use super::{Checker, show};
use crate::names::{
    GCS_AUTH_ANNOTATION, INSTALL_TOOL_ANNOTATION, MOVE_REQUEST_KEY, OPERATOR_PACKAGES_ANNOTATION,
};
use crate::spec::{InstallTool, OperatorPackages};

/// How the installer authenticates to GCS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GcsAuth {
    /// The key Secret of `cache.gcs.secretRef`.
    Secret,
    /// The pod's Workload Identity; `cache.gcs.secretRef` is ignored.
    WorkloadIdentity,
}

/// The settings read from annotations; `None` where the annotation is absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct AppSettings {
    pub operator_packages: Option<OperatorPackages>,
    pub gcs_auth: Option<GcsAuth>,
    pub install_tool: Option<InstallTool>,
}

/// The field path of annotation `key`, as the validator writes paths (the ratchet reads keys
/// with dots in them).
pub(super) fn annotation_path(key: &str) -> String {
    format!("metadata.annotations.{key}")
}

pub(super) fn app_settings(c: &mut Checker, app: &Value) -> AppSettings {
    let annotations = app
        .pointer("/metadata/annotations")
        .and_then(Value::as_object);
    let mut text = |key: &str| -> Option<String> {
        match annotations?.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => {
                c.error(
                    annotation_path(key),
                    format!("must be a string, got {}", show(other)),
                );
                None
            }
        }
    };
    let operator_packages = text(OPERATOR_PACKAGES_ANNOTATION);
    let gcs_auth = text(GCS_AUTH_ANNOTATION);
    let mode = text(crate::names::MODE_ANNOTATION);
    let install_tool = text(INSTALL_TOOL_ANNOTATION);
    // Read by the controller of the named revision only; a name no revision can have would
    // move nothing, so say so, without refusing the app for it.
    if let Some(Value::String(target)) = annotations.and_then(|a| a.get(MOVE_REQUEST_KEY))
        && let Err(message) = crate::config::parse_revision(target.trim())
    {
        c.warn(
            annotation_path(MOVE_REQUEST_KEY),
            format!("{message}; no app moves for it"),
        );
    }
    if let Some(value) = mode
        && !matches!(value.as_str(), "image" | "cache")
    {
        c.error(
            annotation_path(crate::names::MODE_ANNOTATION),
            format!("{value:?} is not one of \"image\", \"cache\""),
        );
    }
    let operator_packages = operator_packages.and_then(|value| {
        let parsed = OperatorPackages::parse(&value);
        if parsed.is_none() {
            c.error(
                annotation_path(OPERATOR_PACKAGES_ANNOTATION),
                format!("{value:?} is not one of \"respect\", \"takeover\""),
            );
        }
        parsed
    });
    let gcs_auth = gcs_auth.and_then(|value| match value.as_str() {
        "secret" => Some(GcsAuth::Secret),
        "workload-identity" => Some(GcsAuth::WorkloadIdentity),
        _ => {
            c.error(
                annotation_path(GCS_AUTH_ANNOTATION),
                format!("{value:?} is not one of \"secret\", \"workload-identity\""),
            );
            None
        }
    });
    let install_tool = install_tool.and_then(|value| {
        let parsed = InstallTool::parse(&value);
        if parsed.is_none() {
            c.error(
                annotation_path(INSTALL_TOOL_ANNOTATION),
                format!("{value:?} is not one of \"auto\", \"pip\", \"uv\""),
            );
        }
        parsed
    });
    AppSettings {
        operator_packages,
        gcs_auth,
        install_tool,
    }
}
