//! The moves of apps to this webhook's rendering revision ([`moves::plan`]), carried out: every
//! few seconds the apps' StatefulSets are read, the plan made, marks written and cleared,
//! Events published and the metrics set. Everything the decision needs is in the StatefulSets,
//! so nothing is remembered between ticks but what was already reported.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::Value;

use super::context::{Context, Part, describe, is_status};
use super::moves::{self, AppState, Plan, Policy};
use super::{FIELD_MANAGER, Notice};
use crate::app::{self, AppRef};
use crate::cache::KasprAppObject;
use crate::names;

/// How often the apps are looked at while a move is under way or apps wait for the budget.
const BUSY_INTERVAL: Duration = Duration::from_secs(3);
/// How often otherwise (a request by annotation or label is noticed within this time).
const IDLE_INTERVAL: Duration = Duration::from_secs(15);

/// Runs until dropped: one tick, then the next after [`BUSY_INTERVAL`] or [`IDLE_INTERVAL`].
pub(super) async fn run(context: Arc<Context>, scopes: Vec<Option<String>>) {
    for store in &context.stores {
        if store.wait_until_ready().await.is_err() {
            return;
        }
    }
    loop {
        let busy = tick(&context, &scopes).await;
        tokio::time::sleep(if busy { BUSY_INTERVAL } else { IDLE_INTERVAL }).await;
    }
}

fn lookup(context: &Context, app: &AppRef) -> Option<Arc<KasprAppObject>> {
    let key = ObjectRef::new(&app.name).within(&app.namespace);
    context.stores.iter().find_map(|store| store.get(&key))
}

/// One look at every app in `scopes`; returns whether anything is moving or waiting.
pub(super) async fn tick(context: &Context, scopes: &[Option<String>]) -> bool {
    let policy = Policy {
        revision: context.render.revision().into_owned(),
        budget: context.options.rollout_budget,
        deadline: context.options.rollout_deadline,
    };
    let requesting = requesting_namespaces(context, &policy.revision).await;
    let mut found: Vec<(AppState, Arc<KasprAppObject>, DynamicObject)> = Vec::new();
    for scope in scopes {
        let api: Api<DynamicObject> = match scope {
            Some(namespace) => Api::namespaced_with(
                context.client.clone(),
                namespace,
                &ApiResource::erase::<StatefulSet>(&()),
            ),
            None => Api::all_with(
                context.client.clone(),
                &ApiResource::erase::<StatefulSet>(&()),
            ),
        };
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            Err(error) => {
                // Without every StatefulSet the budget cannot be counted: decide nothing.
                tracing::warn!(error = %describe(&error), "cannot list StatefulSets for revision moves; trying again");
                return true;
            }
        };
        for statefulset in list.items {
            let value = serde_json::json!({
                "metadata": statefulset.metadata,
                "spec": statefulset.data.get("spec"),
                "status": statefulset.data.get("status"),
            });
            let (Some(namespace), Some(name)) = (
                statefulset.metadata.namespace.clone(),
                app::statefulset_app(&value),
            ) else {
                continue;
            };
            if statefulset.metadata.name.as_deref() != Some(format!("{name}-app").as_str()) {
                continue;
            }
            let app = AppRef::new(namespace, name);
            let Some(object) = lookup(context, &app) else {
                continue;
            };
            let requested = requesting.contains(&app.namespace)
                || moves::requests(
                    object
                        .value()
                        .pointer("/metadata/annotations")
                        .and_then(|a| a.get(names::MOVE_REQUEST_KEY))
                        .and_then(Value::as_str),
                    &policy.revision,
                );
            if let Some(state) = moves::app_state(app, &value, requested) {
                found.push((state, object, statefulset));
            }
        }
    }
    let states: Vec<AppState> = found.iter().map(|(state, _, _)| state.clone()).collect();
    let plan = moves::plan(&states, &policy, Timestamp::now());
    carry_out(context, &policy, &plan, &found).await;
    plan.rolling > 0 || !plan.start.is_empty() || (plan.waiting > 0 && policy.budget > 0)
}

/// The namespaces labelled to move their apps to `revision`. Unreadable (no RBAC on
/// namespaces): none, logged once.
async fn requesting_namespaces(context: &Context, revision: &str) -> HashSet<String> {
    let api: Api<Namespace> = Api::all(context.client.clone());
    let params = ListParams::default().labels(&format!("{}={revision}", names::MOVE_REQUEST_KEY));
    match api.list_metadata(&params).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter_map(|ns| ns.metadata.name)
            .collect(),
        Err(error) => {
            let mut state = context.state();
            if !state.moves.namespaces_unreadable {
                state.moves.namespaces_unreadable = true;
                tracing::warn!(error = %describe(&error), "cannot list namespaces; the namespace label {} is not read", names::MOVE_REQUEST_KEY);
            }
            HashSet::new()
        }
    }
}

async fn carry_out(
    context: &Context,
    policy: &Policy,
    plan: &Plan,
    found: &[(AppState, Arc<KasprAppObject>, DynamicObject)],
) {
    let of = |app: &AppRef| found.iter().find(|(state, _, _)| &state.app == app);
    for app in &plan.finish {
        let Some((state, object, statefulset)) = of(app) else {
            continue;
        };
        let version = statefulset
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or("");
        if write(context, statefulset, moves::clear_patch(version)).await {
            context.metrics.count_move("finished");
            context.state().moves.failed.remove(app);
            context.report(object, Part::Moves, Vec::new()).await;
            let note = format!(
                "StatefulSet {}/{}-app runs rendering revision {} on every replica",
                app.namespace, app.name, state.revision
            );
            tracing::info!(%app, revision = %state.revision, "moved to this rendering revision");
            context
                .publish(
                    object,
                    EventType::Normal,
                    Part::Moves,
                    "RevisionMoveFinished",
                    note,
                )
                .await;
        }
    }
    for app in &plan.start {
        let Some((state, object, statefulset)) = of(app) else {
            continue;
        };
        let version = statefulset
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or("");
        let patch = moves::mark_patch(&policy.revision, Timestamp::now(), version);
        if write(context, statefulset, patch).await {
            context.metrics.count_move("started");
            let why = if state.requested {
                format!("requested by {}", names::MOVE_REQUEST_KEY)
            } else {
                format!("rollout budget {}", policy.budget)
            };
            let note = format!(
                "moving StatefulSet {}/{}-app from rendering revision {} to {} ({why})",
                app.namespace, app.name, state.revision, policy.revision
            );
            tracing::info!(%app, from = %state.revision, to = %policy.revision, "moving to this rendering revision");
            context
                .publish(
                    object,
                    EventType::Normal,
                    Part::Moves,
                    "RevisionMoveStarted",
                    note,
                )
                .await;
        }
    }
    for failure in &plan.failed {
        let Some((_, object, _)) = of(&failure.app) else {
            continue;
        };
        if context.state().moves.failed.insert(failure.app.clone()) {
            context.metrics.count_move("failed");
        }
        let since = failure
            .started
            .map_or_else(|| "an unreadable time".to_owned(), |t| t.to_string());
        let notice = Notice::warning(
            "RevisionMoveFailed",
            format!(
                "StatefulSet {}/{}-app did not finish moving to rendering revision {} within {} \
                 (started {since}): not every replica is Ready on the new template. Other apps \
                 stay on their revision until it finishes, or until its {} annotation is removed",
                failure.app.namespace,
                failure.app.name,
                policy.revision,
                humantime::format_duration(policy.deadline),
                names::MARK_ANNOTATION,
            ),
        );
        context.report(object, Part::Moves, vec![notice]).await;
    }
    let mut state = context.state();
    state
        .moves
        .failed
        .retain(|app| plan.failed.iter().any(|f| &f.app == app));
    let previous = std::mem::replace(&mut state.moves.revisions, plan.apps_by_revision.clone());
    drop(state);
    context.metrics.set_moves(plan, &previous);
}

/// A guarded merge patch of a StatefulSet's metadata; `false` when it was not written (a
/// conflict: someone wrote meanwhile, the next tick decides again).
async fn write(context: &Context, statefulset: &DynamicObject, patch: Value) -> bool {
    let (Some(namespace), Some(name)) = (
        statefulset.metadata.namespace.as_deref(),
        statefulset.metadata.name.as_deref(),
    ) else {
        return false;
    };
    let api = super::rollout_reconciler::statefulsets(&context.client, namespace);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    match api.patch(name, &params, &Patch::Merge(patch)).await {
        Ok(_) => true,
        Err(error) if is_status(&error, &[404, 409]) => false,
        Err(error) => {
            tracing::warn!(%namespace, statefulset = %name, error = %describe(&error), "cannot write the revision move mark");
            false
        }
    }
}

/// What the move bookkeeping remembers between ticks.
#[derive(Debug, Default)]
pub(super) struct MoveMemory {
    /// Failed moves already counted.
    pub(super) failed: HashSet<AppRef>,
    /// The revisions the `revision_apps` gauge has series for.
    pub(super) revisions: BTreeMap<String, usize>,
    pub(super) namespaces_unreadable: bool,
}

#[cfg(test)]
#[path = "move_reconciler_tests.rs"]
mod tests;
