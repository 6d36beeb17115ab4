//! Where a StatefulSet stands in a move between rendering revisions (docs/revisions.md): moving
//! (the controller's mark on its metadata, since when, against the deadline), finished, failed,
//! or staying on another revision (asked to move, waiting under the rollout budget, or kept).
//!
//! Read with the same functions the controller decides with ([`moves::mark_of`],
//! [`moves::finished`], [`moves::requests`]), so `explain` says what the controller does.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use super::Snapshot;
use super::report::Lines;
use super::sections::str_at;
use crate::controller::moves;
use crate::mutation::revision::revision_of;
use crate::names;

/// Lines about the move state of `statefulset`; `label` starts each line. Nothing for a
/// template without a recorded revision and no mark (not injected, or from before revisions).
pub(super) fn move_lines(lines: &mut Lines, snapshot: &Snapshot, statefulset: &Value, label: &str) {
    let ours = snapshot.server.render.revision();
    let ours = ours.as_ref();
    let on = statefulset.pointer("/spec/template").and_then(revision_of);
    let name = str_at(statefulset, "/metadata/name");
    let rollout = &snapshot.server.rollout;
    if let Some(mark) = moves::mark_of(statefulset) {
        let target = mark.revision.as_str();
        let raw_started = statefulset
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(names::MARK_STARTED_ANNOTATION))
            .and_then(Value::as_str)
            .unwrap_or("");
        let since = match mark.started {
            Some(started) => format!("since {started} ({} ago)", age(snapshot.now, started)),
            None => format!(
                "with an unreadable start time {raw_started:?} in {} (counted as past the deadline)",
                names::MARK_STARTED_ANNOTATION
            ),
        };
        if on == Some(target) && moves::finished(statefulset) {
            let who = if target == ours {
                "the controller clears it on its next look"
            } else {
                "that revision's controller clears it (if none runs any more, it holds nothing)"
            };
            lines.info(format!(
                "{label}moved to rendering revision {target}: every replica is Ready on it; {who} \
                 (the mark {})",
                names::MARK_ANNOTATION
            ));
        } else if target != ours {
            lines.info(format!(
                "{label}moving to rendering revision {target} {since}, by that revision's \
                 controller (this release renders {ours})"
            ));
        } else if past(snapshot.now, mark.started, rollout.deadline) {
            lines.problem(format!(
                "{label}the move to rendering revision {target} failed: marked {since}, not \
                 finished within the rollout deadline {}; while it stays so no app moves to \
                 {target} on its own. Fix what keeps its pods from becoming Ready (it finishes by \
                 itself then), or let the wave go on: kubectl annotate statefulset {name} {}-",
                humantime::format_duration(rollout.deadline),
                names::MARK_ANNOTATION
            ));
        } else {
            lines.info(format!(
                "{label}moving to rendering revision {target} {since}: it fails if not every \
                 replica is Ready on it within the rollout deadline {}",
                humantime::format_duration(rollout.deadline)
            ));
        }
        return;
    }
    let Some(on) = on else {
        return;
    };
    if on == ours {
        return;
    }
    let app_request = snapshot
        .kasprapp
        .as_ref()
        .and_then(|a| a.pointer("/metadata/annotations"))
        .and_then(|a| a.get(names::MOVE_REQUEST_KEY))
        .and_then(Value::as_str)
        .map(|v| (v, "the KasprApp's annotation"));
    let namespace_request = snapshot
        .namespace
        .found()
        .and_then(|n| n.pointer("/metadata/labels"))
        .and_then(|l| l.get(names::MOVE_REQUEST_KEY))
        .and_then(Value::as_str)
        .map(|v| (v, "its namespace's label"));
    let requested = [app_request, namespace_request]
        .into_iter()
        .flatten()
        .find(|(value, _)| moves::requests(Some(value), ours));
    if let Some((_, by)) = requested {
        lines.info(format!(
            "{label}on rendering revision {on}; a move to {ours} is requested by {by} {}: the \
             controller starts it on its next look, whatever the rollout budget",
            names::MOVE_REQUEST_KEY
        ));
        return;
    }
    if let Some((value, by)) = app_request.or(namespace_request) {
        lines.info(format!(
            "{label}on rendering revision {on}; {by} {} asks for revision {value:?}, which this \
             release does not render ({ours}): only that revision's controller acts on it",
            names::MOVE_REQUEST_KEY
        ));
        return;
    }
    let app = str_at(statefulset, "/metadata/name");
    let app = app.strip_suffix("-app").unwrap_or(app);
    match rollout.budget {
        0 => lines.info(format!(
            "{label}stays on rendering revision {on} (this release renders {ours}, rollout \
             budget 0): it moves when its own configuration changes, or when asked: kubectl \
             annotate kasprapp {app} {}={ours}",
            names::MOVE_REQUEST_KEY
        )),
        budget => lines.info(format!(
            "{label}waiting to move from rendering revision {on} to {ours} under the rollout \
             budget: at most {budget} app(s) at a time, in order of namespace and name, none \
             while a move of {ours} has failed"
        )),
    }
}

fn past(now: Timestamp, started: Option<Timestamp>, deadline: Duration) -> bool {
    started.is_none_or(|started| now.duration_since(started).unsigned_abs() > deadline)
}

/// How long ago, to the second (a start time in the future reads as 0s).
fn age(now: Timestamp, started: Timestamp) -> String {
    let seconds = u64::try_from(now.duration_since(started).as_secs()).unwrap_or(0);
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}
