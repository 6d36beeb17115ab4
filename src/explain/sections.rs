//! The parts every explanation is made of: the namespace and webhook rules, the controller's
//! reach, the KasprApp, one StatefulSet's sync state, its pods and the PVC cache.

use serde_json::Value;

use super::report::{Lines, Report};
use super::webhooks;
use super::{Known, Snapshot, diff, status};
use crate::app::AppRef;
use crate::controller::rollout::{self, SyncState};
use crate::mutation;
use crate::names;
use crate::spec::{Cache, PythonPackages};
use crate::validation::{self, Report as Validation};

pub(super) fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

pub(super) fn annotation(object: &Value, key: &str) -> Option<String> {
    object
        .pointer("/metadata/annotations")?
        .get(key)?
        .as_str()
        .map(str::to_owned)
}

/// Lines about the namespace and the webhook `name` of the release; returns whether the API
/// server leaves the object out (namespace or object not selected).
pub(super) fn admission(
    lines: &mut Lines,
    snapshot: &Snapshot,
    configuration: &Known<Value>,
    name: &str,
    request: (&str, &str, &str),
    object: &Value,
) -> bool {
    let namespace = str_at(&snapshot.object, "/metadata/namespace");
    if let Known::Unreadable(reason) = &snapshot.namespace {
        lines.info(format!(
            "Namespace {namespace} could not be read ({reason}); judged by its name alone"
        ));
    }
    let labels = webhooks::namespace_labels(snapshot.namespace.found(), namespace);
    let configuration = match configuration {
        Known::Found(configuration) => configuration,
        Known::Missing => {
            lines.not_injected(format!(
                "no webhook configuration registers {name}: kaspr-packages-webhook is not installed \
                 in this cluster (or its configuration was renamed; see --webhook-config)"
            ));
            return true;
        }
        Known::Unreadable(reason) => {
            lines.info(format!(
                "the webhook configurations could not be read ({reason}); namespace and rule checks skipped"
            ));
            return false;
        }
    };
    let config_name = str_at(configuration, "/metadata/name");
    let Some(found) = webhooks::evaluate(configuration, name, request, object, &labels) else {
        lines.not_injected(format!(
            "webhook configuration {config_name} has no webhook {name}"
        ));
        return true;
    };
    let mut left_out = false;
    match &found.namespace_excluded {
        Some(reason) => {
            left_out = true;
            lines.not_injected(format!(
                "namespace {namespace} is excluded by the configuration: webhook {name} of \
                 {config_name}: {reason} (the chart excludes kube-system, its own namespace and \
                 webhook.excludeNamespaces)"
            ));
        }
        None => lines.ok(format!(
            "namespace {namespace} is served by webhook {name} of {config_name}"
        )),
    }
    match &found.object_excluded {
        Some(reason) => {
            left_out = true;
            lines.not_injected(format!(
                "webhook {name} is not called for this object: {reason}"
            ));
        }
        None if found.namespace_excluded.is_none() => {
            let mut text = format!(
                "webhook {name} matches: rules cover {} of {}",
                request.2, request.1
            );
            if !found.conditions_met.is_empty() {
                text.push_str(&format!(
                    ", matchConditions hold: {}",
                    found.conditions_met.join(", ")
                ));
            }
            lines.ok(text);
        }
        None => {}
    }
    if !found.conditions_unknown.is_empty() {
        lines.info(format!(
            "matchConditions not evaluated here (not the chart's own): {}",
            found.conditions_unknown.join(", ")
        ));
    }
    left_out
}

/// Lines about the controller's reach into this namespace.
pub(super) fn controller_reach(lines: &mut Lines, snapshot: &Snapshot) {
    let namespace = str_at(&snapshot.object, "/metadata/namespace");
    let watched = &snapshot.server.watch_namespaces;
    if !watched.is_empty() && !watched.iter().any(|w| w == namespace) {
        lines.info(format!(
            "the controller watches only {} (server.watchNamespaces): in {namespace} injection still \
             works, but no automatic rollout and no PVC upkeep",
            watched.join(", ")
        ));
    }
}

/// Lines about the KasprApp: exists, valid (every error with its path), what it asks for.
/// Returns the validation when the app exists.
pub(super) fn kasprapp_lines(
    lines: &mut Lines,
    snapshot: &Snapshot,
    app: &AppRef,
) -> Option<Validation> {
    let Some(kasprapp) = &snapshot.kasprapp else {
        lines.not_injected(format!(
            "KasprApp {app} does not exist: the webhook allows its objects unchanged"
        ));
        return None;
    };
    let report = validation::validate_kasprapp(kasprapp);
    if report.errors.is_empty() {
        match &report.spec {
            Some(spec) => lines.ok(format!(
                "KasprApp {app} is valid: {} package(s), {} mode, install key {}",
                spec.packages.len(),
                spec.cache.mode(),
                spec.install_key()
            )),
            None => lines.not_injected(format!(
                "KasprApp {app} has no spec.pythonPackages: nothing to inject"
            )),
        }
    } else {
        lines.problem(format!(
            "KasprApp {app} is invalid, so the webhook denies its StatefulSets and pods:\n{}",
            report
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    for warning in &report.warnings {
        lines.info(format!("KasprApp warning: {warning}"));
    }
    Some(report)
}

pub(super) fn validation_errors(report: Option<&Validation>) -> Vec<String> {
    report
        .map(|r| r.errors.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

/// What the webhook renders now onto `template` (a copy), or its denial.
pub(super) fn render(
    template: &Value,
    spec: Option<&PythonPackages>,
    app: &AppRef,
    prefix: &str,
    snapshot: &Snapshot,
) -> Result<Value, String> {
    let mut rendered = template.clone();
    // A StatefulSet's next UPDATE keeps the injection of another rendering revision with the
    // same config hash (docs/revisions.md); a Pod is only ever created.
    let previous = (prefix == "spec.template.spec").then_some(template);
    mutation::apply_keeping(
        &mut rendered,
        previous,
        spec,
        app,
        prefix,
        &snapshot.server.render,
        None,
    )
    .map(|_| rendered)
    .map_err(|denial| denial.message)
}

pub(super) fn has_operator_installer(template: &Value) -> bool {
    let injected_by_us = template
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(names::INJECTED_ANNOTATION))
        .is_some();
    !injected_by_us
        && template
            .pointer("/spec/initContainers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| str_at(c, "/name") == names::OPERATOR_INIT_CONTAINER)
}

pub(super) fn claim_lines(
    lines: &mut Lines,
    snapshot: &Snapshot,
    app: &AppRef,
    spec: Option<&PythonPackages>,
) {
    let Some(Cache::Pvc(cache)) = spec.map(|s| &s.cache) else {
        return;
    };
    let uid = snapshot
        .kasprapp
        .as_ref()
        .and_then(|a| a.pointer("/metadata/uid"))
        .and_then(Value::as_str);
    match &snapshot.claim {
        Some(Known::Found(claim)) => status::claim(lines, &app.name, uid, cache, Some(claim)),
        Some(Known::Missing) => status::claim(lines, &app.name, uid, cache, None),
        Some(Known::Unreadable(reason)) => lines.info(format!(
            "PVC {} could not be read ({reason})",
            crate::spec::pvc_name(&app.name)
        )),
        None => {}
    }
}

/// What one StatefulSet's template says, against what its app renders now.
pub(super) struct TemplateState {
    pub(super) current: Option<String>,
    pub(super) desired: Option<String>,
    pub(super) differences: Vec<String>,
}

/// Lines about one StatefulSet's injection; `label` starts each line.
pub(super) fn statefulset_sync(
    lines: &mut Lines,
    snapshot: &Snapshot,
    statefulset: &Value,
    app: &AppRef,
    spec: Option<&PythonPackages>,
    left_out: bool,
    label: &str,
) -> TemplateState {
    let empty = Value::Null;
    let template = statefulset.pointer("/spec/template").unwrap_or(&empty);
    let current = annotation(template, names::TEMPLATE_HASH_ANNOTATION);
    let mut state = TemplateState {
        current: current.clone(),
        desired: None,
        differences: Vec::new(),
    };
    let rendered = match render(template, spec, app, "spec.template.spec", snapshot) {
        Ok(rendered) => rendered,
        Err(message) => {
            lines.problem(format!("{label}the webhook denies it: {message}"));
            return state;
        }
    };
    state.desired = annotation(&rendered, names::TEMPLATE_HASH_ANNOTATION);
    match rollout::sync_state(template, spec, app, &snapshot.server.render) {
        SyncState::InSync => match &current {
            Some(hash) => lines.ok(match mutation::revision::revision_of(template) {
                Some(revision) => format!(
                    "{label}injected and current: template hash {hash}, rendering revision {revision}"
                ),
                None => format!("{label}injected and current: template hash {hash}"),
            }),
            None if spec.is_some() && has_operator_installer(template) => {
                lines.not_injected(format!(
                    "{label}its template has the Kaspr operator's own {:?} init container: \
                 left alone, with a warning",
                    names::OPERATOR_INIT_CONTAINER
                ))
            }
            None => {
                if spec.is_some() {
                    lines.not_injected(format!("{label}not injected"));
                }
            }
        },
        SyncState::OutOfSync { .. } if left_out && current.is_none() => lines.not_injected(
            format!("{label}not injected: the API server does not call the webhook for it"),
        ),
        SyncState::OutOfSync { current, desired } => {
            state.differences = diff::differences(template, &rendered);
            let text = match (&current, &desired) {
                (None, Some(desired)) => format!(
                    "{label}not injected although its KasprApp lists packages: it was written while \
                     the webhook was not called (down with failurePolicy Ignore, or installed later); \
                     the app renders template hash {desired}"
                ),
                (Some(current), None) => format!(
                    "{label}out of date: it carries template hash {current}, but the app no longer \
                     lists packages (the next update strips the injection)"
                ),
                (Some(c), Some(d)) if c == d => format!(
                    "{label}out of date: it carries the current template hash {c}, but parts of the \
                     injection are missing (rewritten while the webhook was not called)"
                ),
                (current, desired) => format!(
                    "{label}out of date: template hash {} on the object, {} rendered by the app now",
                    current.as_deref().unwrap_or("none"),
                    desired.as_deref().unwrap_or("none")
                ),
            };
            lines.problem(text);
            if !state.differences.is_empty() {
                lines.problem(format!(
                    "{label}what differs:\n{}",
                    state.differences.join("\n")
                ));
            }
        }
        SyncState::Blocked(message) => {
            lines.problem(format!("{label}the webhook denies it: {message}"));
        }
    }
    state
}

/// Lines about the pods of a StatefulSet (or app): do they run the desired template, and did
/// their install fail.
pub(super) fn pods_lines(lines: &mut Lines, snapshot: &Snapshot, desired: Option<&str>) {
    let pods = match &snapshot.pods {
        Known::Found(pods) => pods,
        Known::Missing => return,
        Known::Unreadable(reason) => {
            lines.info(format!("its pods could not be read ({reason})"));
            return;
        }
    };
    if pods.is_empty() {
        lines.info("no pods yet");
        return;
    }
    let Some(desired) = desired else {
        return;
    };
    let (current, stale): (Vec<&Value>, Vec<&Value>) = pods
        .iter()
        .partition(|p| annotation(p, names::TEMPLATE_HASH_ANNOTATION).as_deref() == Some(desired));
    if stale.is_empty() {
        lines.ok(format!(
            "pods: all {} carry template hash {desired}",
            current.len()
        ));
    } else {
        lines.problem(format!(
            "pods not on template hash {desired} (the rolling update replaces them): {}",
            stale
                .iter()
                .map(|p| str_at(p, "/metadata/name"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for pod in current {
        let mut pod_lines = Lines::default();
        status::init_container(&mut pod_lines, pod);
        for line in pod_lines.0 {
            if line.severity == super::Severity::Problem {
                lines.problem(format!(
                    "pod {}: {}",
                    str_at(pod, "/metadata/name"),
                    line.text
                ));
            }
        }
    }
}

pub(super) fn finish(
    snapshot: &Snapshot,
    lines: Lines,
    state: Option<TemplateState>,
    validation: Option<&Validation>,
) -> Report {
    let namespace = str_at(&snapshot.object, "/metadata/namespace");
    let name = str_at(&snapshot.object, "/metadata/name");
    let mut report = Report::new(snapshot.kind.as_str(), namespace, name, lines);
    if let Some(state) = state {
        report.template_hash = state.current;
        report.desired_template_hash = state.desired;
        report.differences = state.differences;
    }
    report.validation_errors = validation_errors(validation);
    report
}
