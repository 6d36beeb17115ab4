//! Renders the injection into a pod template (StatefulSet) or a Pod.
use serde_json::Value;

use crate::config::RenderConfig;

/// A successful mutation.
#[derive(Debug, Clone, PartialEq)]
pub struct MutationOutcome {
    pub patch: json_patch::Patch,
    pub warnings: Vec<String>,
}

/// A denial with its user-facing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub message: String,
    pub warnings: Vec<String>,
}

/// The KasprApp owning a StatefulSet, from its ownerReferences.
pub fn owning_app(_statefulset: &Value) -> Option<String> {
    None
}

/// The KasprApp a Pod belongs to, from its labels.
pub fn pod_app(_pod: &Value) -> Option<String> {
    None
}

pub fn mutate_statefulset(_sts: &Value, _app: &Value, _config: &RenderConfig) -> Result<MutationOutcome, Denial> {
    Ok(MutationOutcome { patch: json_patch::Patch(vec![]), warnings: vec![] })
}

pub fn mutate_pod(_pod: &Value, _app: &Value, _config: &RenderConfig) -> Result<MutationOutcome, Denial> {
    Ok(MutationOutcome { patch: json_patch::Patch(vec![]), warnings: vec![] })
}
