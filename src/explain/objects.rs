//! The explanation of each kind of object, from a [`Snapshot`].

use serde_json::Value;

use super::moves::move_lines;
use super::report::{Lines, Report};
use super::sections::{
    TemplateState, admission, annotation, claim_lines, controller_reach, finish,
    has_operator_installer, kasprapp_lines, pods_lines, render, statefulset_sync, str_at,
};
use super::webhooks::{KASPRAPP_WEBHOOK, POD_WEBHOOK, STATEFULSET_WEBHOOK};
use super::{Known, Snapshot, diff, status};
use crate::app::{self, AppRef};
use crate::names;

pub fn statefulset(snapshot: &Snapshot) -> Report {
    let mut lines = Lines::default();
    let sts = &snapshot.object;
    let namespace = str_at(sts, "/metadata/namespace");
    let left_out = admission(
        &mut lines,
        snapshot,
        &snapshot.mutating,
        STATEFULSET_WEBHOOK,
        ("apps", "statefulsets", "UPDATE"),
        sts,
    );
    controller_reach(&mut lines, snapshot);
    let Some(app_name) = app::statefulset_app(sts) else {
        lines.not_injected(
            "not a KasprApp's StatefulSet: no ownerReference of kind KasprApp (group kaspr.io) and \
             no pod-template labels kaspr.io/kind=KasprApp with kaspr.io/app",
        );
        return finish(snapshot, lines, None, None);
    };
    let how = if app::owning_app(sts).is_some() {
        "its ownerReference"
    } else {
        "its pod-template labels"
    };
    lines.info(format!("belongs to KasprApp {app_name} ({how})"));
    let app = AppRef::new(namespace, app_name);
    let validation = kasprapp_lines(&mut lines, snapshot, &app);
    let Some(validation) = validation else {
        return finish(snapshot, lines, None, None);
    };
    if !validation.errors.is_empty() {
        return finish(snapshot, lines, None, Some(&validation));
    }
    let spec = validation.spec.as_ref();
    let state = statefulset_sync(&mut lines, snapshot, sts, &app, spec, left_out, "");
    move_lines(&mut lines, snapshot, sts, "");
    pods_lines(&mut lines, snapshot, state.desired.as_deref());
    claim_lines(&mut lines, snapshot, &app, spec);
    finish(snapshot, lines, Some(state), Some(&validation))
}

pub fn kasprapp(snapshot: &Snapshot) -> Report {
    let mut lines = Lines::default();
    let object = &snapshot.object;
    let app = AppRef::of_object(object, "default");
    admission(
        &mut lines,
        snapshot,
        &snapshot.validating,
        KASPRAPP_WEBHOOK,
        ("kaspr.io", "kasprapps", "UPDATE"),
        object,
    );
    controller_reach(&mut lines, snapshot);
    let mut with_app = snapshot.clone();
    with_app.kasprapp = Some(object.clone());
    let validation = kasprapp_lines(&mut lines, &with_app, &app);
    let Some(validation) = validation else {
        return finish(snapshot, lines, None, None);
    };
    if !validation.errors.is_empty() {
        return finish(snapshot, lines, None, Some(&validation));
    }
    let spec = validation.spec.as_ref();
    let mut first = None;
    if snapshot.statefulsets.is_empty() {
        lines.info(format!(
            "no StatefulSet belongs to it yet (the Kaspr operator creates {}-app)",
            app.name
        ));
    }
    for sts in &snapshot.statefulsets {
        let label = format!("StatefulSet {}: ", str_at(sts, "/metadata/name"));
        let mut sts_snapshot = with_app.clone();
        sts_snapshot.object = sts.clone();
        let mut sts_lines = Lines::default();
        let left_out = admission(
            &mut sts_lines,
            &sts_snapshot,
            &snapshot.mutating,
            STATEFULSET_WEBHOOK,
            ("apps", "statefulsets", "UPDATE"),
            sts,
        );
        // Only what goes wrong with the namespace or rules is repeated per StatefulSet.
        lines.0.extend(
            sts_lines
                .0
                .into_iter()
                .filter(|l| l.severity != super::Severity::Ok)
                .map(|mut l| {
                    l.text = format!("{label}{}", l.text);
                    l
                }),
        );
        let state = statefulset_sync(&mut lines, &with_app, sts, &app, spec, left_out, &label);
        move_lines(&mut lines, &with_app, sts, &label);
        first.get_or_insert(state);
    }
    let desired = first.as_ref().and_then(|s| s.desired.clone());
    pods_lines(&mut lines, snapshot, desired.as_deref());
    claim_lines(&mut lines, &with_app, &app, spec);
    finish(snapshot, lines, first, Some(&validation))
}

pub fn pod(snapshot: &Snapshot) -> Report {
    let mut lines = Lines::default();
    let pod = &snapshot.object;
    let namespace = str_at(pod, "/metadata/namespace");
    let current = annotation(pod, names::TEMPLATE_HASH_ANNOTATION);
    let owner_sts = snapshot.owner.as_ref().and_then(Known::found);
    let left_out = pod_admission(&mut lines, snapshot, current.is_some());
    controller_reach(&mut lines, snapshot);

    let app_name = app::pod_app(pod).or_else(|| owner_sts.and_then(app::statefulset_app));
    let Some(app_name) = app_name else {
        lines.not_injected(
            "not a KasprApp's pod: no label kaspr.io/kind=KasprApp with kaspr.io/app, and no \
             StatefulSet of a KasprApp owns it",
        );
        return finish(snapshot, lines, None, None);
    };
    let app = AppRef::new(namespace, app_name);
    let Some(validation) = kasprapp_lines(&mut lines, snapshot, &app) else {
        return finish(snapshot, lines, None, None);
    };
    if !validation.errors.is_empty() {
        return finish(snapshot, lines, None, Some(&validation));
    }
    let spec = validation.spec.as_ref();

    // What the app renders now: onto the StatefulSet's template when there is one (as the
    // controller compares), else onto the pod itself (as the pod webhook would).
    let (template, prefix) = match owner_sts.and_then(|s| s.pointer("/spec/template")) {
        Some(template) => (template.clone(), "spec.template.spec"),
        None => (without_hash(pod), "spec"),
    };
    let mut state = TemplateState {
        current: current.clone(),
        desired: None,
        differences: Vec::new(),
    };
    let rendered = match render(&template, spec, &app, prefix, snapshot) {
        Ok(rendered) => rendered,
        Err(message) => {
            lines.problem(format!("the webhook denies this app's objects: {message}"));
            return finish(snapshot, lines, Some(state), Some(&validation));
        }
    };
    state.desired = annotation(&rendered, names::TEMPLATE_HASH_ANNOTATION);
    if spec.is_some()
        && current.is_none()
        && state.desired.is_none()
        && has_operator_installer(&template)
    {
        lines.not_injected(format!(
            "its template has the Kaspr operator's own {:?} init container: left alone, with a warning",
            names::OPERATOR_INIT_CONTAINER
        ));
    } else {
        let sts_hash = owner_sts
            .and_then(|s| s.pointer("/spec/template"))
            .and_then(|t| annotation(t, names::TEMPLATE_HASH_ANNOTATION));
        pod_currency(
            &mut lines,
            &mut state,
            snapshot,
            &rendered,
            left_out,
            sts_hash.as_deref(),
        );
    }
    claim_lines(&mut lines, snapshot, &app, spec);
    if current.is_some() {
        status::init_container(&mut lines, pod);
    }
    finish(snapshot, lines, Some(state), Some(&validation))
}

/// Whether the API server calls the webhook for the pod (or its StatefulSet), as lines; true
/// when it is left out. The pod is injected through its StatefulSet's template, or at its own
/// CREATE. Once injected it carries our hash, which keeps the pod webhook away: ask about the
/// pod as it was created, and about the rules only while it is not injected.
fn pod_admission(lines: &mut Lines, snapshot: &Snapshot, injected: bool) -> bool {
    let mut admission_lines = Lines::default();
    let mut left_out = admission(
        &mut admission_lines,
        snapshot,
        &snapshot.mutating,
        POD_WEBHOOK,
        ("", "pods", "CREATE"),
        &without_hash(&snapshot.object),
    );
    match snapshot.owner.as_ref() {
        Some(Known::Found(sts)) => {
            admission_lines.info(format!(
                "owned by StatefulSet {}",
                str_at(sts, "/metadata/name")
            ));
            let mut sts_lines = Lines::default();
            let sts_left_out = admission(
                &mut sts_lines,
                snapshot,
                &snapshot.mutating,
                STATEFULSET_WEBHOOK,
                ("apps", "statefulsets", "UPDATE"),
                sts,
            );
            // The namespace was judged once; keep what is about the StatefulSet's webhook.
            admission_lines.0.extend(
                sts_lines
                    .0
                    .into_iter()
                    .filter(|l| is_webhook_rule_line(&l.text)),
            );
            left_out = left_out && sts_left_out;
        }
        Some(Known::Missing) => admission_lines.info("its owning StatefulSet no longer exists"),
        Some(Known::Unreadable(reason)) => {
            admission_lines.info(format!("its StatefulSet could not be read ({reason})"));
        }
        None => {}
    }
    for mut line in admission_lines.0 {
        if injected {
            if is_webhook_rule_line(&line.text) {
                continue;
            }
            // Excluded now, but injected before: what counts is whether it is current.
            if line.severity == super::Severity::NotInjected {
                line.severity = super::Severity::Info;
            }
        }
        lines.0.push(line);
    }
    left_out
}

/// A line about the webhook's rules or match conditions (rather than the namespace).
fn is_webhook_rule_line(text: &str) -> bool {
    text.starts_with("webhook ") || text.starts_with("matchConditions")
}

/// Whether the pod carries what its app renders now, and what to do when it does not.
fn pod_currency(
    lines: &mut Lines,
    state: &mut TemplateState,
    snapshot: &Snapshot,
    rendered: &Value,
    left_out: bool,
    sts_hash: Option<&str>,
) {
    let pod = &snapshot.object;
    let has_owner = snapshot.owner.as_ref().and_then(Known::found).is_some();
    match (state.current.clone(), state.desired.clone()) {
        (None, None) => {}
        (None, Some(_)) if left_out => {
            lines.not_injected("not injected: the API server does not call the webhook for it");
        }
        (None, Some(desired)) => {
            state.differences = diff::differences(pod, rendered);
            lines.problem(format!(
                "not injected although its KasprApp lists packages: it was created while the webhook \
                 was not called (down with failurePolicy Ignore, or installed later); the app renders \
                 template hash {desired}; delete the pod to have it recreated"
            ));
        }
        (Some(current), desired) if desired.as_deref() == Some(current.as_str()) => {
            lines.ok(format!("injected and current: template hash {current}"));
        }
        (Some(current), desired) => {
            state.differences = diff::differences(pod, rendered);
            lines.problem(format!(
                "out of date: template hash {current} on the pod, {} rendered by the app now",
                desired.as_deref().unwrap_or("none (no packages)")
            ));
            if !state.differences.is_empty() {
                lines.problem(format!("what differs:\n{}", state.differences.join("\n")));
            }
            match (&sts_hash, desired) {
                (Some(sts), Some(desired)) if *sts == desired => lines.info(
                    "its StatefulSet already carries the current template: the rolling update \
                     replaces this pod (with updateStrategy OnDelete, delete it)",
                ),
                _ if has_owner => lines.info(
                    "its StatefulSet is out of date too: the controller sends it through the \
                     webhook again (see `explain statefulset`)",
                ),
                _ => {}
            }
        }
    }
}

/// The pod as it was before an injection: our hash would have kept the pod webhook away.
fn without_hash(pod: &Value) -> Value {
    let mut pod = pod.clone();
    if let Some(annotations) = pod
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        annotations.remove(names::TEMPLATE_HASH_ANNOTATION);
    }
    pod
}
