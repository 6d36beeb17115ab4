//! The claim reconciler: reads an app's claim and storage class, asks [`pvc::plan`] what to do,
//! and carries it out with server-side apply or a delete with a uid precondition.

use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::EventType;
use kube::{Api, Client};
use serde_json::Value;

use super::context::{Context, ControllerError, Part, api_error, is_status};
use super::pvc::{self, ClassInfo, Existing, PvcAction, Wanted};
use super::{FIELD_MANAGER, RESYNC};
use crate::app::AppOwner;
use crate::cache::KasprAppObject;
use crate::spec::{Cache, pvc_name};
use crate::validation::Report;

/// The claim's storage class, named by the spec or (when the spec names none) by the claim,
/// where the API server put the cluster default.
async fn storage_class(client: &Client, name: Option<String>) -> ClassInfo {
    let Some(name) = name else {
        return ClassInfo::Unnamed;
    };
    match Api::<StorageClass>::all(client.clone())
        .get_opt(&name)
        .await
    {
        Ok(Some(class)) => ClassInfo::from_class(&class),
        Ok(None) => ClassInfo::Missing(name),
        Err(error) => {
            tracing::debug!(%error, class = %name, "cannot read the storage class");
            ClassInfo::Unknown
        }
    }
}

pub(super) async fn reconcile_claim(
    app: &KasprAppObject,
    owner: &AppOwner,
    report: &Report,
    context: &Context,
) -> Result<Duration, ControllerError> {
    if !report.errors.is_empty() {
        // An invalid spec says nothing reliable about the cache: leave the claim as it is.
        return Ok(RESYNC);
    }
    let wanted = match report.spec.as_ref().map(|s| (s, &s.cache)) {
        Some((spec, Cache::Pvc(cache))) if operator_in_charge(owner, spec, context).await => {
            Wanted::NoClaim {
                delete_claim: Some(cache.delete_claim),
            }
        }
        Some((_, Cache::Pvc(cache))) => Wanted::Claim(cache),
        _ => Wanted::NoClaim {
            delete_claim: app
                .value()
                .pointer("/spec/pythonPackages/cache/deleteClaim")
                .and_then(Value::as_bool),
        },
    };
    let name = pvc_name(&owner.app.name);
    let object = format!("PersistentVolumeClaim {}/{name}", owner.app.namespace);
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(context.client.clone(), &owner.app.namespace);
    let claim = api
        .get_opt(&name)
        .await
        .map_err(api_error("read", object.clone()))?;
    let existing = claim.as_ref().map(|c| Existing::from_claim(c, owner));
    let class = match &wanted {
        Wanted::Claim(cache) => {
            let class_name = cache
                .storage_class
                .clone()
                .or_else(|| existing.as_ref().and_then(|e| e.storage_class.clone()));
            storage_class(&context.client, class_name).await
        }
        Wanted::NoClaim { .. } => ClassInfo::Unknown,
    };
    let plan = pvc::plan(owner, &wanted, existing.as_ref(), &class);
    context.report(app, Part::Pvc, plan.notices).await;
    let target = Target {
        app,
        api: &api,
        namespace: &owner.app.namespace,
        name: &name,
        object: &object,
        context,
    };
    let outcome = match plan.action {
        PvcAction::Nothing => "in_sync",
        PvcAction::Apply(desired) => {
            apply_claim(&target, &desired, existing.as_ref()).await?;
            "changed"
        }
        PvcAction::Delete { uid } => {
            delete_claim(&target, uid).await?;
            "changed"
        }
    };
    context.metrics.count(Part::Pvc, outcome);
    Ok(RESYNC)
}

/// Whether the Kaspr operator's own injection serves the app's pods (respect mode on an operator
/// that installs packages itself): they mount its claim, so ours would have no user. Unknown
/// (the StatefulSet cannot be read) counts as no.
async fn operator_in_charge(
    owner: &AppOwner,
    spec: &crate::spec::PythonPackages,
    context: &Context,
) -> bool {
    let api = super::rollout_reconciler::statefulsets(&context.client, &owner.app.namespace);
    match api.get_opt(&format!("{}-app", owner.app.name)).await {
        Ok(Some(statefulset)) => crate::mutation::takeover::operator_in_charge(
            statefulset
                .data
                .pointer("/spec/template")
                .unwrap_or(&Value::Null),
            spec,
            &context.render,
        ),
        Ok(None) => false,
        Err(error) => {
            tracing::debug!(%error, app = %owner.app, "cannot read the app's StatefulSet");
            false
        }
    }
}

/// The claim being reconciled and where to write it.
struct Target<'a> {
    app: &'a KasprAppObject,
    api: &'a Api<PersistentVolumeClaim>,
    namespace: &'a str,
    name: &'a str,
    /// `PersistentVolumeClaim <namespace>/<name>`, for messages.
    object: &'a str,
    context: &'a Context,
}

fn requested_size(claim: &PersistentVolumeClaim) -> Option<String> {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone())
}

/// Server-side apply of the desired claim, and an Event when it was created or resized.
async fn apply_claim(
    target: &Target<'_>,
    desired: &PersistentVolumeClaim,
    existing: Option<&Existing>,
) -> Result<(), ControllerError> {
    let Target {
        app,
        api,
        namespace,
        name,
        object,
        context,
    } = target;
    // Force: the KasprApp is the source of truth for the fields we declare, and another
    // manager's value (say a hand edit of the size) must not block reconciling forever.
    // Every replica applies as the same manager, so replicas never conflict.
    let applied = api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(desired),
        )
        .await
        .map_err(|e| {
            context.metrics.count(Part::Pvc, "failed");
            api_error("apply", (*object).to_owned())(e)
        })?;
    let size = requested_size(&applied);
    let event = match existing {
        None => Some((
            "PvcCreated",
            format!(
                "created PVC {name} ({}) for the python-packages cache",
                size.as_deref().unwrap_or_default()
            ),
        )),
        Some(before) if before.request != size => Some((
            "PvcResized",
            format!(
                "requested {} for PVC {name} (was {})",
                size.as_deref().unwrap_or_default(),
                before.request.as_deref().unwrap_or_default()
            ),
        )),
        Some(_) => None,
    };
    tracing::info!(namespace = %namespace, claim = %name, "applied the python-packages PVC");
    if let Some((reason, note)) = event {
        context
            .publish(app, EventType::Normal, Part::Pvc, reason, note)
            .await;
    }
    Ok(())
}

/// Deletes the claim, only if it is still the one with `uid`.
async fn delete_claim(target: &Target<'_>, uid: Option<String>) -> Result<(), ControllerError> {
    let Target {
        app,
        api,
        namespace,
        name,
        object,
        context,
    } = target;
    // The uid precondition: never delete a claim that was recreated meanwhile.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => {
            tracing::info!(namespace = %namespace, claim = %name, "deleted the python-packages PVC");
            context
                .publish(
                    app,
                    EventType::Normal,
                    Part::Pvc,
                    "PvcDeleted",
                    format!(
                        "deleted PVC {name}: the app left PVC mode and cache.deleteClaim is true"
                    ),
                )
                .await;
            Ok(())
        }
        // Gone already (another replica), or replaced by a claim we look at next time.
        Err(error) if is_status(&error, &[404, 409]) => Ok(()),
        Err(error) => {
            context.metrics.count(Part::Pvc, "failed");
            Err(api_error("delete", (*object).to_owned())(error))
        }
    }
}

/// The claim reconciler against a stand-in API server: what it sends for create, delete and
/// errors, in milliseconds and without a cluster.
#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::controller::test_api::{Log, context, fake_api, status, writes};

    const CLAIM_PATH: &str = "/api/v1/namespaces/apps/persistentvolumeclaims/demo-python-packages";

    /// Claim GETs answer `claim`, DELETEs `delete`; applies echo their body.
    fn claims_api(claim: (u16, Value), delete: u16) -> (kube::Client, Log) {
        fake_api(move |method, path, body| match (method, path) {
            ("GET", CLAIM_PATH) => claim.clone(),
            ("PATCH", CLAIM_PATH) => (200, body.clone()),
            ("DELETE", CLAIM_PATH) if delete == 200 => (200, claim.1.clone()),
            ("DELETE", CLAIM_PATH) => (delete, status(delete, "Conflict")),
            _ => (404, status(404, "NotFound")),
        })
    }

    fn app(python_packages: &Value) -> (KasprAppObject, AppOwner, Report) {
        let value = json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
            "metadata": {"name": "demo", "namespace": "apps", "uid": "app-uid", "resourceVersion": "3"},
            "spec": {"pythonPackages": python_packages}});
        let report = crate::validation::validate_kasprapp(&value);
        let owner = AppOwner::of(&value).expect("owner");
        (
            serde_json::from_value(value).expect("object"),
            owner,
            report,
        )
    }

    fn managed_claim() -> Value {
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "demo-python-packages", "namespace": "apps", "uid": "claim-uid",
                "labels": {"kaspr.io/app": "demo", "kaspr.io/component": "python-packages",
                           "app.kubernetes.io/managed-by": "kaspr-packages-webhook"},
                "ownerReferences": [{"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": "demo", "uid": "app-uid"}]},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "256Mi"}}}})
    }

    #[tokio::test]
    async fn a_missing_claim_is_created_by_server_side_apply() {
        let (client, sent) = claims_api((404, status(404, "NotFound")), 200);
        let (object, owner, report) =
            app(&json!({"packages": ["a==1"], "cache": {"enabled": true, "size": "1Gi"}}));
        let next = reconcile_claim(&object, &owner, &report, &context(client))
            .await
            .expect("ok");
        assert_eq!(next, RESYNC);
        let writes = writes(&sent);
        let apply = writes
            .iter()
            .find(|s| s.method == "PATCH")
            .expect("an apply");
        assert_eq!(apply.path, CLAIM_PATH);
        assert!(
            apply.query.contains("fieldManager=kaspr-packages-webhook")
                && apply.query.contains("force=true"),
            "{}",
            apply.query
        );
        assert_eq!(
            apply.body["spec"]["resources"]["requests"]["storage"],
            "1Gi"
        );
        assert_eq!(
            apply.body["metadata"]["ownerReferences"][0]["uid"],
            "app-uid"
        );
        let event = writes
            .iter()
            .find(|s| s.method == "POST")
            .expect("an Event");
        assert!(event.path.ends_with("/events"), "{}", event.path);
        assert_eq!(event.body["reason"], "PvcCreated");
    }

    #[rstest::rstest]
    #[case::deleted(200)]
    #[case::replaced_meanwhile(409)]
    #[case::already_gone(404)]
    #[tokio::test]
    async fn leaving_pvc_mode_deletes_the_claim_with_its_uid_as_precondition(#[case] answer: u16) {
        let (client, sent) = claims_api((200, managed_claim()), answer);
        let (object, owner, report) = app(&json!({"packages": ["a==1"]}));
        let next = reconcile_claim(&object, &owner, &report, &context(client))
            .await
            .expect("ok");
        assert_eq!(next, RESYNC);
        let writes = writes(&sent);
        let delete = writes
            .iter()
            .find(|s| s.method == "DELETE")
            .expect("a delete");
        assert_eq!(delete.path, CLAIM_PATH);
        assert_eq!(delete.body["preconditions"]["uid"], "claim-uid");
        let events: Vec<_> = writes
            .iter()
            .filter(|s| s.method == "POST")
            .map(|s| s.body["reason"].clone())
            .collect();
        assert_eq!(
            events,
            if answer == 200 {
                vec![json!("PvcDeleted")]
            } else {
                vec![]
            }
        );
    }

    #[tokio::test]
    async fn an_unreadable_claim_is_an_error_naming_it() {
        let (client, sent) = claims_api((500, status(500, "InternalError")), 200);
        let (object, owner, report) =
            app(&json!({"packages": ["a==1"], "cache": {"enabled": true}}));
        let error = reconcile_claim(&object, &owner, &report, &context(client))
            .await
            .expect_err("fails");
        assert!(
            error.to_string().starts_with("cannot read PersistentVolumeClaim apps/demo-python-packages: InternalError (test) (500 InternalError)"),
            "{error}"
        );
        assert!(writes(&sent).is_empty());
    }
}
