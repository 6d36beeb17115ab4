//! Moving apps to this webhook's rendering revision: which apps move now, which finished, which
//! failed (docs/revisions.md, "Moving apps to a new revision").
//!
//! An app on another revision keeps it (the keep rule) until it is *marked*: the controller
//! writes [`MARK_ANNOTATION`] (the target revision) and [`MARK_STARTED_ANNOTATION`] (when) on
//! the StatefulSet's own metadata, not on its template. The webhook does not keep an injection
//! when the object it is asked about carries the mark for its own revision, so that UPDATE
//! renders the new revision and the StatefulSet rolls. The mark is cleared once the app
//! finished: every replica Ready on the new template.
//!
//! [`plan`] is the whole decision, a pure function over the apps' states: all the state lives in
//! the StatefulSets (their templates' revisions, the marks, their status), so every replica
//! and every restart of the controller comes to the same plan.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::app::AppRef;
use crate::names;

pub use crate::mutation::revision::marked_for;
pub use crate::names::{MARK_ANNOTATION, MARK_STARTED_ANNOTATION, MOVE_REQUEST_KEY};

/// The default rollout deadline (`--rollout-deadline`).
pub const DEADLINE: Duration = Duration::from_secs(10 * 60);

/// A move in progress, read from a StatefulSet's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub revision: String,
    /// `None` when the annotation is missing or not a timestamp: the move is treated as past
    /// its deadline, so a damaged mark never holds a wave forever.
    pub started: Option<Timestamp>,
}

/// What the plan needs to know about one app with an injected StatefulSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppState {
    pub app: AppRef,
    /// The revision its pod template was rendered with.
    pub revision: String,
    pub mark: Option<Mark>,
    /// The StatefulSet finished rolling out its current template ([`finished`]).
    pub finished: bool,
    /// A user asked for this app to move to this webhook's revision ([`MOVE_REQUEST_KEY`]).
    pub requested: bool,
}

/// This controller's side of the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// This webhook's rendering revision.
    pub revision: String,
    /// At most this many apps move at a time on their own (0: none; requested moves are not
    /// counted against it, but do occupy it while they roll).
    pub budget: u32,
    /// A move not finished within this time fails, and stops the wave.
    pub deadline: Duration,
}

/// A move that did not finish in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub app: AppRef,
    pub started: Option<Timestamp>,
}

/// What to do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Mark these (in this order): requested ones first, then the budget's.
    pub start: Vec<AppRef>,
    /// Their move finished: clear the mark.
    pub finish: Vec<AppRef>,
    /// Marked for this revision and past the deadline. While any is, no app starts moving on
    /// its own.
    pub failed: Vec<Failure>,
    /// Moves in progress (of any revision, within their deadline), including those started now.
    pub rolling: usize,
    /// Apps on another revision that stay there for now.
    pub waiting: usize,
    /// Apps per revision their templates record, after this plan's moves are started (a
    /// moving app counts for the revision it moves to).
    pub apps_by_revision: BTreeMap<String, usize>,
}

impl Plan {
    /// A failed move stops the wave.
    pub fn stopped(&self) -> bool {
        !self.failed.is_empty()
    }
}

/// The decision for every app in scope, at time `now`.
pub fn plan(apps: &[AppState], policy: &Policy, now: Timestamp) -> Plan {
    let mut plan = Plan::default();
    let mut candidates: Vec<&AppState> = Vec::new();
    let past_deadline = |mark: &Mark| match mark.started {
        Some(started) => now
            .duration_since(started)
            .unsigned_abs()
            .gt(&policy.deadline),
        None => true,
    };
    for app in apps {
        let ours = app.revision == policy.revision;
        match &app.mark {
            Some(mark) if mark.revision == policy.revision => {
                if ours && app.finished {
                    plan.finish.push(app.app.clone());
                } else if past_deadline(mark) {
                    plan.failed.push(Failure {
                        app: app.app.clone(),
                        started: mark.started,
                    });
                } else {
                    plan.rolling += 1;
                }
            }
            // Another revision's move (its controller runs beside this one during an upgrade):
            // it occupies the budget while it may still be rolling. A stale one is ignored.
            Some(mark)
                if !(past_deadline(mark) || app.revision == mark.revision && app.finished) =>
            {
                plan.rolling += 1;
            }
            _ if !ours => candidates.push(app),
            _ => {}
        }
    }
    candidates.sort_by(|a, b| (!a.requested, &a.app).cmp(&(!b.requested, &b.app)));
    let budget = usize::try_from(policy.budget).unwrap_or(usize::MAX);
    let mut moving_now = Vec::new();
    for app in candidates {
        let automatic = !plan.stopped() && plan.rolling < budget;
        if app.requested || automatic {
            plan.rolling += 1;
            plan.start.push(app.app.clone());
            moving_now.push(&app.app);
        } else {
            plan.waiting += 1;
        }
    }
    for app in apps {
        let revision = if moving_now.contains(&&app.app) {
            &policy.revision
        } else {
            &app.revision
        };
        *plan.apps_by_revision.entry(revision.clone()).or_default() += 1;
    }
    plan
}

fn annotations(object: &Value) -> Option<&serde_json::Map<String, Value>> {
    object.pointer("/metadata/annotations")?.as_object()
}

/// The move mark on a StatefulSet, if any.
pub fn mark_of(statefulset: &Value) -> Option<Mark> {
    let annotations = annotations(statefulset)?;
    let revision = annotations.get(MARK_ANNOTATION)?.as_str()?.to_owned();
    let started = annotations
        .get(MARK_STARTED_ANNOTATION)
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Timestamp>().ok());
    Some(Mark { revision, started })
}

/// Whether a StatefulSet finished rolling out its current template: the controller-manager saw
/// this generation, every replica runs it and is Ready, and no older revision is left
/// (`updatedReplicas == replicas == readyReplicas`, `currentRevision == updateRevision`).
pub fn finished(statefulset: &Value) -> bool {
    let number = |pointer: &str| statefulset.pointer(pointer).and_then(Value::as_i64);
    let text = |pointer: &str| statefulset.pointer(pointer).and_then(Value::as_str);
    let wanted = number("/spec/replicas").unwrap_or(1);
    let generation = number("/metadata/generation").unwrap_or(0);
    let count = |field: &str| number(&format!("/status/{field}")).unwrap_or(0);
    number("/status/observedGeneration").is_some_and(|seen| seen >= generation)
        && count("replicas") == wanted
        && count("updatedReplicas") == wanted
        && count("readyReplicas") == wanted
        && text("/status/currentRevision").is_some()
        && text("/status/currentRevision") == text("/status/updateRevision")
}

/// The state of an app's StatefulSet, when its template carries an injection that records a
/// revision (a template from before revisions, or without packages, has nothing to move).
pub fn app_state(app: AppRef, statefulset: &Value, requested: bool) -> Option<AppState> {
    let template = statefulset.pointer("/spec/template")?;
    let revision = crate::mutation::revision::revision_of(template)?;
    template
        .pointer("/metadata/annotations")?
        .get(names::TEMPLATE_HASH_ANNOTATION)?;
    Some(AppState {
        app,
        revision: revision.to_owned(),
        mark: mark_of(statefulset),
        finished: finished(statefulset),
        requested,
    })
}

/// Whether a KasprApp annotation or a Namespace label value asks for `revision`.
pub fn requests(value: Option<&str>, revision: &str) -> bool {
    value.map(str::trim) == Some(revision)
}

/// The merge patch that marks a StatefulSet to move to `revision`, guarded by the
/// `resourceVersion` the decision was made on: two replicas deciding at once write one mark.
pub fn mark_patch(revision: &str, now: Timestamp, resource_version: &str) -> Value {
    serde_json::json!({"metadata": {
        "resourceVersion": resource_version,
        "annotations": {MARK_ANNOTATION: revision, MARK_STARTED_ANNOTATION: now.to_string()},
    }})
}

/// The merge patch that clears the mark of a finished move.
pub fn clear_patch(resource_version: &str) -> Value {
    serde_json::json!({"metadata": {
        "resourceVersion": resource_version,
        "annotations": {MARK_ANNOTATION: null, MARK_STARTED_ANNOTATION: null},
    }})
}

#[cfg(test)]
mod tests;
