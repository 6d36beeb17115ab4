//! The rollout reconciler: reads an app's StatefulSet, asks [`rollout::sync_state`] whether it
//! carries the current injection, and when not, sends it through the webhook again.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::Value;

use super::context::{Context, ControllerError, Part, api_error, describe};
use super::rollout::{self, SyncState};
use super::{FIELD_MANAGER, Notice, RESYNC, retry_delay};
use crate::app::{self, AppOwner};
use crate::cache::KasprAppObject;
use crate::names;
use crate::validation::Report;

pub(super) fn statefulsets(client: &Client, namespace: &str) -> Api<DynamicObject> {
    // Read as JSON: the comparison runs the webhook's renderer over the template exactly as
    // stored, unknown fields included.
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::erase::<StatefulSet>(&()),
    )
}

fn template_of(statefulset: &DynamicObject) -> Value {
    statefulset
        .data
        .pointer("/spec/template")
        .cloned()
        .unwrap_or(Value::Null)
}

pub(super) async fn reconcile_rollout(
    app: &KasprAppObject,
    owner: &AppOwner,
    report: &Report,
    render_app: &Value,
    context: &Context,
) -> Result<Duration, ControllerError> {
    let key = ObjectRef::from_obj(app);
    let name = format!("{}-app", owner.app.name);
    let object = format!("StatefulSet {}/{name}", owner.app.namespace);
    let api = statefulsets(&context.client, &owner.app.namespace);
    let found = api
        .get_opt(&name)
        .await
        .map_err(api_error("read", object.clone()))?;
    let Some(statefulset) = found.filter(|sts| owned_by(sts, owner)) else {
        // Nothing the webhook would act on.
        context.set_out_of_sync(&key, false);
        context.report(app, Part::Rollout, Vec::new()).await;
        return Ok(RESYNC);
    };
    // Marked to move to this revision (docs/revisions.md): only its own injection is in sync.
    let marked = statefulset
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::MARK_ANNOTATION))
        .is_some_and(|target| *target == context.render.revision());
    let state_of =
        |template: &Value| sync_state_of(template, report, render_app, owner, context, marked);
    let (current, desired) = match state_of(&template_of(&statefulset)) {
        SyncState::InSync => {
            context.state().unconverged.remove(&key);
            context.state().other_revision_since.remove(&key);
            context.state().deferred.remove(&key);
            context.set_out_of_sync(&key, false);
            context.report(app, Part::Rollout, Vec::new()).await;
            context.metrics.count(Part::Rollout, "in_sync");
            return Ok(RESYNC);
        }
        SyncState::Blocked(message) => {
            context.set_out_of_sync(&key, true);
            let notice = Notice::warning(
                "StatefulSetNotInjectable",
                format!("{object} cannot receive the python-packages injection: {message}"),
            );
            context.report(app, Part::Rollout, vec![notice]).await;
            context.metrics.count(Part::Rollout, "pending");
            return Ok(RESYNC);
        }
        SyncState::OutOfSync { current, desired } => (current, desired),
    };
    if rollout::operator_drives(
        &template_of(&statefulset),
        report.spec.as_ref(),
        &context.render,
    ) && let Some(wait) =
        context
            .state()
            .operator_turn(&key, std::time::Instant::now(), rollout::OPERATOR_GRACE)
    {
        context.metrics.count(Part::Rollout, "deferred");
        return Ok(wait + Duration::from_secs(1));
    }

    let Some(updated) = send_through_webhook(app, &api, &name, &object, context).await? else {
        // The webhook is not reachable through the API server yet: look again shortly.
        return Ok(UNREACHABLE_RETRY);
    };
    if updated.metadata.generation != statefulset.metadata.generation {
        announce_rollout(app, owner, &updated, current.as_deref(), context).await;
    }
    if state_of(&template_of(&updated)).in_sync() {
        context.state().unconverged.remove(&key);
        context.state().other_revision_since.remove(&key);
        context.set_out_of_sync(&key, false);
        context.report(app, Part::Rollout, Vec::new()).await;
        context.metrics.count(Part::Rollout, "changed");
        return Ok(RESYNC);
    }
    let answered_by = marked
        .then(|| other_revision(&template_of(&updated), context))
        .flatten();
    if let Some(other) = &answered_by
        && within_other_revision_grace(&key, context)
    {
        // A rolling upgrade: the Service still routes some admissions to the previous
        // revision's replicas, which keep the injection of a StatefulSet marked for another
        // revision. The next UPDATE that reaches this revision moves it; no alarm meanwhile.
        context.set_out_of_sync(&key, true);
        context.metrics.count(Part::Rollout, "waiting");
        tracing::info!(
            %object, answered_by = %other,
            "marked to move to this revision, but a webhook of another rendering revision answered; trying again shortly"
        );
        return Ok(UNREACHABLE_RETRY);
    }
    Ok(still_out_of_sync(
        app,
        &key,
        &object,
        &updated,
        desired.as_deref(),
        answered_by.as_deref(),
        context,
    )
    .await)
}

/// The rendering revision `template` records, when it is not this webhook's.
fn other_revision(template: &Value, context: &Context) -> Option<String> {
    crate::mutation::revision::revision_of(template)
        .filter(|revision| *revision != context.render.revision())
        .map(str::to_owned)
}

/// Whether a marked StatefulSet has come back rendered by another revision for less than
/// `--unreachable-grace` (starting the clock at the first time).
fn within_other_revision_grace(key: &ObjectRef<KasprAppObject>, context: &Context) -> bool {
    let mut state = context.state();
    let since = *state
        .other_revision_since
        .entry(key.clone())
        .or_insert_with(std::time::Instant::now);
    since.elapsed() < context.options.unreachable_grace
}

/// The app's own StatefulSet: by ownerReference, else (StatefulSets an operator recreated
/// without one) by its pod-template labels, exactly as the webhook recognises it.
fn owned_by(statefulset: &DynamicObject, owner: &AppOwner) -> bool {
    statefulset.metadata.deletion_timestamp.is_none()
        && app::statefulset_app(&serde_json::json!({
            "metadata": statefulset.metadata,
            "spec": statefulset.data.get("spec"),
        }))
        .as_deref()
            == Some(owner.app.name.as_str())
}

/// Whether `template` carries what the app renders now. Builds on: with the set the webhook
/// renders for this template (`render_app` is the effective app); builds off: none.
fn sync_state_of(
    template: &Value,
    report: &Report,
    render_app: &Value,
    owner: &AppOwner,
    context: &Context,
    marked: bool,
) -> SyncState {
    if !report.errors.is_empty() {
        return SyncState::Blocked(report.error_message(&format!(
            "KasprApp {}/{}",
            owner.app.namespace, owner.app.name
        )));
    }
    let set = report
        .spec
        .as_ref()
        .and_then(|spec| crate::builds::render::set_for(render_app, template, spec, &owner.app));
    rollout::sync_state_marked(
        template,
        report.spec.as_ref(),
        &owner.app,
        &context.render,
        set.as_ref(),
        marked,
    )
}

/// The webhook rendered something else: it may still read an older KasprApp (its cache
/// follows its own watch), or the UPDATE bypassed it. Look again soon, then less often, and
/// warn from the third attempt on.
async fn still_out_of_sync(
    app: &KasprAppObject,
    key: &ObjectRef<KasprAppObject>,
    object: &str,
    updated: &DynamicObject,
    desired: Option<&str>,
    answered_by: Option<&str>,
    context: &Context,
) -> Duration {
    let attempt = context.state().unconverged(key);
    context.set_out_of_sync(key, true);
    context.metrics.count(Part::Rollout, "pending");
    if attempt >= 2 {
        let cause = match answered_by {
            Some(other) => format!(
                "it is marked to move to rendering revision {}, but comes back rendered by \
                 revision {other}: a webhook of that revision (another release, or replicas \
                 left from an upgrade) answers for this namespace, or this one is bypassed",
                context.render.revision()
            ),
            None => "the webhook may be bypassed (failurePolicy Ignore) or not reading the \
                     current KasprApp"
                .to_owned(),
        };
        let notice = Notice::warning(
            "StatefulSetOutOfSync",
            format!(
                "{object} still lacks the current python-packages injection after being sent \
                 through the webhook (template hash {}, expected {}); {cause}; retrying with \
                 backoff",
                rollout_hash(updated).as_deref().unwrap_or("none"),
                desired.unwrap_or("none"),
            ),
        );
        context.report(app, Part::Rollout, vec![notice]).await;
    }
    retry_delay(attempt.saturating_add(1))
}

/// How soon to look again while the webhook is not reachable through the API server.
const UNREACHABLE_RETRY: Duration = Duration::from_secs(3);

/// The resync patch, which makes the API server send the StatefulSet through the webhook; a
/// refusal marks the app out of sync and warns. `None` while the API server cannot reach the
/// webhook and has not for longer than `--unreachable-grace` (a fresh install or an
/// upgrade whose Service has no ready endpoint yet): logged, counted, no Warning Event.
async fn send_through_webhook(
    app: &KasprAppObject,
    api: &Api<DynamicObject>,
    name: &str,
    object: &str,
    context: &Context,
) -> Result<Option<DynamicObject>, ControllerError> {
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let key = ObjectRef::from_obj(app);
    match api
        .patch(name, &params, &Patch::Merge(rollout::resync_patch()))
        .await
    {
        Ok(updated) => {
            context.state().unreachable_since.remove(&key);
            Ok(Some(updated))
        }
        Err(error)
            if rollout::webhook_unreachable(&describe(&error)) && within_grace(&key, context) =>
        {
            context.set_out_of_sync(&key, true);
            context.metrics.count(Part::Rollout, "waiting");
            tracing::info!(
                %object,
                error = %describe(&error),
                "the API server cannot reach the webhook yet; trying again shortly"
            );
            Ok(None)
        }
        Err(error) => {
            context.set_out_of_sync(&key, true);
            context.metrics.count(Part::Rollout, "failed");
            let notice = Notice::warning(
                "StatefulSetOutOfSync",
                format!(
                    "{object} lacks the current python-packages injection and could not be sent \
                     through the webhook again; retrying with backoff: {}",
                    describe(&error)
                ),
            );
            context.report(app, Part::Rollout, vec![notice]).await;
            Err(api_error("update", object.to_owned())(error))
        }
    }
}

/// Whether the webhook has been unreachable for this app for less than the grace period
/// (starting the clock at the first failure).
fn within_grace(key: &ObjectRef<KasprAppObject>, context: &Context) -> bool {
    let mut state = context.state();
    let since = *state
        .unreachable_since
        .entry(key.clone())
        .or_insert_with(std::time::Instant::now);
    since.elapsed() < context.options.unreachable_grace
}

/// Logs and publishes (as a Normal Event) that the StatefulSet now carries another injection.
async fn announce_rollout(
    app: &KasprAppObject,
    owner: &AppOwner,
    updated: &DynamicObject,
    from: Option<&str>,
    context: &Context,
) {
    let name = format!("{}-app", owner.app.name);
    let object = format!("StatefulSet {}/{name}", owner.app.namespace);
    let hash = rollout_hash(updated);
    tracing::info!(
        namespace = %owner.app.namespace, statefulset = %name,
        from = from.unwrap_or("none"), to = hash.as_deref().unwrap_or("none"),
        "StatefulSet updated to the current python-packages injection"
    );
    let note = match hash {
        Some(hash) => format!("updated {object} to python-packages template hash {hash}"),
        None => format!("removed the python-packages injection from {object}"),
    };
    context
        .publish(
            app,
            EventType::Normal,
            Part::Rollout,
            "PackagesRollout",
            note,
        )
        .await;
}

fn rollout_hash(statefulset: &DynamicObject) -> Option<String> {
    statefulset
        .data
        .pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(names::TEMPLATE_HASH_ANNOTATION))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The rollout reconciler against a stand-in API server: the patch that sends a StatefulSet
/// through the webhook, and what follows from the answer.
#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::app::AppRef;
    use crate::controller::test_api::{Log, app, context, fake_api, status, writes};

    const STS_PATH: &str = "/apis/apps/v1/namespaces/apps/statefulsets/demo-app";

    /// The operator's StatefulSet, as stored without the injection.
    fn statefulset(generation: i64) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "demo-app", "namespace": "apps", "generation": generation,
                "ownerReferences": [{"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": "demo", "uid": "app-uid"}]},
            "spec": {"template": {
                "metadata": {"labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "demo"}},
                "spec": {"containers": [{"name": "kaspr", "image": "kaspr:1"}]}}}})
    }

    /// The same StatefulSet after the webhook rendered the injection into it.
    fn injected(generation: i64) -> Value {
        let (_, _, report) = app();
        let mut sts = statefulset(generation);
        crate::mutation::apply(
            &mut sts["spec"]["template"],
            report.spec.as_ref(),
            &AppRef::new("apps", "demo"),
            "spec.template.spec",
            &crate::config::RenderConfig::default(),
        )
        .expect("inject");
        sts
    }

    /// GETs answer the stored StatefulSet; the patch answers `patched` (status, body).
    fn statefulsets_api(patched: (u16, Value)) -> (kube::Client, Log) {
        fake_api(move |method, path, _| match (method, path) {
            ("GET", STS_PATH) => (200, statefulset(1)),
            ("PATCH", STS_PATH) => patched.clone(),
            _ => (404, status(404, "NotFound")),
        })
    }

    #[tokio::test]
    async fn an_out_of_date_statefulset_is_sent_through_the_webhook_once() {
        let (client, sent) = statefulsets_api((200, injected(2)));
        let (object, owner, report) = app();
        let context = context(client);
        let next = reconcile_rollout(&object, &owner, &report, object.value(), &context)
            .await
            .expect("ok");
        assert_eq!(next, RESYNC);
        let writes = writes(&sent);
        let patch = writes
            .iter()
            .find(|s| s.method == "PATCH")
            .expect("a patch");
        assert_eq!(patch.path, STS_PATH);
        assert_eq!(patch.body, rollout::resync_patch());
        let events: Vec<&Value> = writes
            .iter()
            .filter(|s| s.method == "POST")
            .map(|s| &s.body["reason"])
            .collect();
        assert_eq!(events, [&json!("PackagesRollout")]);
        assert!(context.state().out_of_sync.is_empty());
    }

    fn rendering(revision: &str, memory: &str) -> crate::config::RenderConfig {
        crate::config::RenderConfig {
            default_resources: Some(
                serde_json::from_value(json!({"limits": {"memory": memory}})).expect("resources"),
            ),
            revision: Some(revision.into()),
            ..crate::config::RenderConfig::default()
        }
    }

    /// The app's StatefulSet as rendering revision "a" injected it.
    fn injected_by_revision_a() -> Value {
        let (_, _, report) = app();
        let mut stored = statefulset(1);
        crate::mutation::apply(
            &mut stored["spec"]["template"],
            report.spec.as_ref(),
            &AppRef::new("apps", "demo"),
            "spec.template.spec",
            &rendering("a", "512Mi"),
        )
        .expect("inject");
        stored
    }

    /// Two controllers of different rendering revisions over one StatefulSet: neither writes.
    #[tokio::test]
    async fn a_statefulset_of_another_revision_is_left_alone() {
        let stored = injected_by_revision_a();
        for (revision, memory) in [("a", "512Mi"), ("b", "1Gi")] {
            let answer = stored.clone();
            let (client, sent) = fake_api(move |method, path, _| match (method, path) {
                ("GET", STS_PATH) => (200, answer.clone()),
                _ => (404, status(404, "NotFound")),
            });
            let (object, owner, report) = app();
            let mut context = context(client);
            context.render = rendering(revision, memory);
            let next = reconcile_rollout(&object, &owner, &report, object.value(), &context)
                .await
                .expect("ok");
            assert_eq!(next, RESYNC);
            assert!(writes(&sent).is_empty(), "{revision}: {:?}", writes(&sent));
            assert!(context.state().out_of_sync.is_empty());
        }
    }

    /// Marked to move to this revision, a StatefulSet of another revision is sent through the
    /// webhook; a mark for another revision changes nothing.
    #[tokio::test]
    async fn a_statefulset_marked_for_this_revision_is_sent_through_the_webhook() {
        let stored = injected_by_revision_a();
        for (target, patched) in [("b", true), ("c", false)] {
            let mut answer = stored.clone();
            answer["metadata"]["annotations"] = json!({names::MARK_ANNOTATION: target});
            let (client, sent) = fake_api(move |method, path, _| match (method, path) {
                ("GET", STS_PATH) => (200, answer.clone()),
                ("PATCH", STS_PATH) => (200, answer.clone()),
                _ => (404, status(404, "NotFound")),
            });
            let (object, owner, report) = app();
            let mut context = context(client);
            context.render = rendering("b", "1Gi");
            reconcile_rollout(&object, &owner, &report, object.value(), &context)
                .await
                .expect("ok");
            let patches: Vec<Value> = writes(&sent)
                .into_iter()
                .filter(|s| s.method == "PATCH")
                .map(|s| s.body)
                .collect();
            let expected = if patched {
                vec![rollout::resync_patch()]
            } else {
                vec![]
            };
            assert_eq!(patches, expected, "marked for {target}");
        }
    }

    /// A rolling upgrade: the mark for this revision ("b") comes back rendered by the previous
    /// revision's replicas ("a") behind the same Service. Retried without an alarm within the
    /// grace period; past it, a Warning naming the revision that answered.
    #[tokio::test]
    async fn a_marked_statefulset_answered_by_another_revision_waits_before_warning() {
        let mut stored = injected_by_revision_a();
        stored["metadata"]["annotations"] = json!({names::MARK_ANNOTATION: "b"});
        let answer = stored.clone();
        let (client, sent) = fake_api(move |method, path, _| match (method, path) {
            ("GET" | "PATCH", STS_PATH) => (200, answer.clone()),
            _ => (404, status(404, "NotFound")),
        });
        let (object, owner, report) = app();
        let mut context = context(client);
        context.render = rendering("b", "1Gi");
        let events = || -> Vec<Value> {
            writes(&sent)
                .iter()
                .filter(|s| s.method == "POST")
                .map(|s| s.body.clone())
                .collect()
        };
        for _ in 0..3 {
            let next = reconcile_rollout(&object, &owner, &report, object.value(), &context)
                .await
                .expect("ok");
            assert_eq!(next, UNREACHABLE_RETRY);
        }
        assert!(
            events().is_empty(),
            "no Event while the old replicas may still answer: {:?}",
            events()
        );
        assert_eq!(context.state().out_of_sync.len(), 1);

        let key = ObjectRef::from_obj(&object);
        let long_ago = std::time::Instant::now()
            .checked_sub(rollout::UNREACHABLE_GRACE + Duration::from_secs(1))
            .expect("clock");
        context.state().other_revision_since.insert(key, long_ago);
        for _ in 0..2 {
            reconcile_rollout(&object, &owner, &report, object.value(), &context)
                .await
                .expect("ok");
        }
        let events = events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["reason"], "StatefulSetOutOfSync");
        let note = events[0]["note"].as_str().expect("note");
        assert!(
            note.contains(
                "marked to move to rendering revision b, but comes back rendered by revision a"
            ),
            "{note}"
        );
    }

    #[tokio::test]
    async fn a_bypassed_webhook_is_retried_with_backoff_and_reported() {
        // The API server stored the UPDATE without the injection (failurePolicy Ignore).
        let (client, sent) = statefulsets_api((200, statefulset(1)));
        let (object, owner, report) = app();
        let context = context(client);
        let first = reconcile_rollout(&object, &owner, &report, object.value(), &context)
            .await
            .expect("ok");
        let second = reconcile_rollout(&object, &owner, &report, object.value(), &context)
            .await
            .expect("ok");
        assert_eq!((first, second), (retry_delay(2), retry_delay(3)));
        assert_eq!(context.state().out_of_sync.len(), 1);
        let reasons: Vec<Value> = writes(&sent)
            .iter()
            .filter(|s| s.method == "POST")
            .map(|s| s.body["reason"].clone())
            .collect();
        assert_eq!(reasons, [json!("StatefulSetOutOfSync")]);
    }

    fn unreachable() -> (u16, Value) {
        let mut body = status(500, "InternalError");
        body["message"] = json!(
            "Internal error occurred: failed calling webhook \"statefulsets.packages.kaspr.io\": \
             failed to call webhook: Post \"https://kpw.kaspr.svc:443/mutate?timeout=10s\": \
             no endpoints available for service \"kpw\""
        );
        (500, body)
    }

    #[tokio::test]
    async fn an_unreachable_webhook_is_waited_for_without_a_warning_at_first() {
        let (client, sent) = statefulsets_api(unreachable());
        let (object, owner, report) = app();
        let context = context(client);
        for _ in 0..2 {
            let next = reconcile_rollout(&object, &owner, &report, object.value(), &context)
                .await
                .expect("not an error while within the grace period");
            assert_eq!(next, UNREACHABLE_RETRY);
        }
        assert!(
            !writes(&sent).iter().any(|s| s.method == "POST"),
            "no Event while the webhook may still be starting"
        );
        assert_eq!(context.state().out_of_sync.len(), 1);

        // Unreachable for longer than the grace period: now it is worth a Warning.
        let key = ObjectRef::from_obj(&object);
        let long_ago = std::time::Instant::now()
            .checked_sub(rollout::UNREACHABLE_GRACE + Duration::from_secs(1))
            .expect("clock");
        context.state().unreachable_since.insert(key, long_ago);
        reconcile_rollout(&object, &owner, &report, object.value(), &context)
            .await
            .expect_err("fails after the grace period");
        let reasons: Vec<Value> = writes(&sent)
            .iter()
            .filter(|s| s.method == "POST")
            .map(|s| s.body["reason"].clone())
            .collect();
        assert_eq!(reasons, [json!("StatefulSetOutOfSync")]);
    }

    #[tokio::test]
    async fn a_refused_patch_is_an_error_and_a_warning() {
        let (client, sent) = statefulsets_api((403, status(403, "Forbidden")));
        let (object, owner, report) = app();
        let context = context(client);
        let error = reconcile_rollout(&object, &owner, &report, object.value(), &context)
            .await
            .expect_err("fails");
        assert!(
            error.to_string().starts_with(
                "cannot update StatefulSet apps/demo-app: Forbidden (test) (403 Forbidden)"
            ),
            "{error}"
        );
        let reasons: Vec<Value> = writes(&sent)
            .iter()
            .filter(|s| s.method == "POST")
            .map(|s| s.body["reason"].clone())
            .collect();
        assert_eq!(reasons, [json!("StatefulSetOutOfSync")]);
    }
}
