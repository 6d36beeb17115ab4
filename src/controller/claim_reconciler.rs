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
    let wanted = match report.spec.as_ref().map(|s| &s.cache) {
        Some(Cache::Pvc(cache)) => Wanted::Claim(cache),
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
    let outcome = match plan.action {
        PvcAction::Nothing => "in_sync",
        PvcAction::Apply(desired) => {
            // Force: the KasprApp is the source of truth for the fields we declare, and another
            // manager's value (say a hand edit of the size) must not block reconciling forever.
            // Every replica applies as the same manager, so replicas never conflict.
            let applied = api
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&*desired),
                )
                .await
                .map_err(|e| {
                    context.metrics.count(Part::Pvc, "failed");
                    api_error("apply", object.clone())(e)
                })?;
            let size = |c: &PersistentVolumeClaim| {
                c.spec
                    .as_ref()
                    .and_then(|s| s.resources.as_ref())
                    .and_then(|r| r.requests.as_ref())
                    .and_then(|r| r.get("storage"))
                    .map(|q| q.0.clone())
            };
            let (reason, note) = match &existing {
                None => (
                    Some("PvcCreated"),
                    format!(
                        "created PVC {name} ({}) for the python-packages cache",
                        size(&applied).unwrap_or_default()
                    ),
                ),
                Some(before) if before.request != size(&applied) => (
                    Some("PvcResized"),
                    format!(
                        "requested {} for PVC {name} (was {})",
                        size(&applied).unwrap_or_default(),
                        before.request.as_deref().unwrap_or_default()
                    ),
                ),
                Some(_) => (None, String::new()),
            };
            tracing::info!(namespace = %owner.app.namespace, claim = %name, "applied the python-packages PVC");
            if let Some(reason) = reason {
                context
                    .publish(app, EventType::Normal, Part::Pvc, reason, note)
                    .await;
            }
            "changed"
        }
        PvcAction::Delete { uid } => {
            // The uid precondition: never delete a claim that was recreated meanwhile.
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid,
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {
                    tracing::info!(namespace = %owner.app.namespace, claim = %name, "deleted the python-packages PVC");
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
                }
                // Gone already (another replica), or replaced by a claim we look at next time.
                Err(error) if is_status(&error, &[404, 409]) => {}
                Err(error) => {
                    context.metrics.count(Part::Pvc, "failed");
                    return Err(api_error("delete", object)(error));
                }
            }
            "changed"
        }
    };
    context.metrics.count(Part::Pvc, outcome);
    Ok(RESYNC)
}
