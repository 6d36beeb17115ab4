//! The PVC cache lifecycle: what the claim `<app>-python-packages` should look like for a
//! KasprApp, and what to do given the claim that exists now.
//!
//! Everything here is pure: the controller's shell reads the claim and its storage class,
//! calls [`plan`], and carries out the returned [`PvcAction`] with server-side apply or a delete.
//!
//! Immutable fields are never changed: a claim cannot shrink and cannot move to another storage
//! class, so those requests become a [`Notice`] and the claim keeps its current values. A claim
//! without our `managed-by` label was not created by this product and is never written to.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::{FIELD_MANAGER, Notice};
use crate::app::AppOwner;
use crate::names::APP_LABEL;
use crate::quantity;
use crate::spec::{PvcCache, pvc_name};

pub const COMPONENT_LABEL: &str = "kaspr.io/component";
pub const COMPONENT: &str = "python-packages";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The label selector of every claim this product manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=kaspr-packages-webhook";
pub const ACCESS_MODE: &str = "ReadWriteMany";

/// Provisioners known to give `ReadWriteMany` volumes. A class with another provisioner may
/// well support it too (the list cannot be complete); it only gets a Warning Event.
pub const KNOWN_RWX_PROVISIONERS: &[&str] = &[
    "efs.csi.aws.com",
    "fsx.csi.aws.com",
    "filestore.csi.storage.gke.io",
    "file.csi.azure.com",
    "kubernetes.io/azure-file",
    "nfs.csi.k8s.io",
    "smb.csi.k8s.io",
    "cephfs.csi.ceph.com",
    "kubernetes.io/cephfs",
    "kubernetes.io/glusterfs",
    "cluster.local/nfs-subdir-external-provisioner",
    "k8s-sigs.io/nfs-subdir-external-provisioner",
    "driver.longhorn.io",
    "csi.trident.netapp.io",
    "pxd.portworx.com",
    "csi.juicefs.com",
    "spectrumscale.csi.ibm.com",
];

/// Suffixes of provisioner names that deployments choose themselves: Rook names its CephFS
/// driver `<namespace>.cephfs.csi.ceph.com`, and the NFS subdir provisioner's name is a chart
/// value ending in `/nfs-subdir-external-provisioner`.
const KNOWN_RWX_SUFFIXES: &[&str] = &[".cephfs.csi.ceph.com", "/nfs-subdir-external-provisioner"];

/// Whether a provisioner is known to support `ReadWriteMany`.
pub fn known_rwx(provisioner: &str) -> bool {
    KNOWN_RWX_PROVISIONERS.contains(&provisioner)
        || KNOWN_RWX_SUFFIXES.iter().any(|s| provisioner.ends_with(s))
}

/// What the KasprApp asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted<'a> {
    /// PVC mode.
    Claim(&'a PvcCache),
    /// Any other mode, or no `pythonPackages`. `delete_claim` is `cache.deleteClaim` when the
    /// KasprApp still spells it out; when it does not, the claim's owner reference (present
    /// exactly when the last PVC-mode spec had `deleteClaim: true`) decides.
    NoClaim { delete_claim: Option<bool> },
}

/// The facts about an existing claim that decisions need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Existing {
    pub uid: Option<String>,
    /// Carries `app.kubernetes.io/managed-by: kaspr-packages-webhook`.
    pub managed: bool,
    /// Has an owner reference to this KasprApp (same uid).
    pub owned: bool,
    pub deleting: bool,
    pub bound: bool,
    pub storage_class: Option<String>,
    pub request: Option<String>,
    pub access_modes: Vec<String>,
    /// Our labels are all present with our values.
    pub labelled: bool,
}

impl Existing {
    pub fn from_claim(claim: &PersistentVolumeClaim, owner: &AppOwner) -> Self {
        let meta = &claim.metadata;
        let labels = meta.labels.clone().unwrap_or_default();
        let managed = labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(FIELD_MANAGER);
        let labelled = desired_labels(&owner.app.name)
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v));
        let owned = meta
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.uid == owner.uid);
        let spec = claim.spec.clone().unwrap_or_default();
        Existing {
            uid: meta.uid.clone(),
            managed,
            owned,
            deleting: meta.deletion_timestamp.is_some(),
            bound: claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"),
            storage_class: spec.storage_class_name.filter(|c| !c.is_empty()),
            request: spec
                .resources
                .and_then(|r| r.requests)
                .and_then(|r| r.get("storage").map(|q| q.0.clone())),
            access_modes: spec.access_modes.unwrap_or_default(),
            labelled,
        }
    }
}

/// The storage class a claim uses (or will use), as far as it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassInfo {
    /// Neither the spec nor the claim names a class (no cluster default).
    Unnamed,
    /// The class could not be read (for example no permission); nothing is said about it.
    Unknown,
    Missing(String),
    Found {
        name: String,
        provisioner: String,
        allow_expansion: bool,
    },
}

impl ClassInfo {
    pub fn from_class(class: &StorageClass) -> Self {
        ClassInfo::Found {
            name: class.metadata.name.clone().unwrap_or_default(),
            provisioner: class.provisioner.clone(),
            allow_expansion: class.allow_volume_expansion == Some(true),
        }
    }
}

/// What to do to the claim.
#[derive(Debug, Clone, PartialEq)]
pub enum PvcAction {
    Nothing,
    /// Server-side apply of this object (create or update).
    Apply(Box<PersistentVolumeClaim>),
    /// Delete the claim with this uid.
    Delete {
        uid: Option<String>,
    },
}

/// The outcome of [`plan`].
#[derive(Debug, Clone, PartialEq)]
pub struct PvcPlan {
    pub action: PvcAction,
    /// Situations to report as Warning Events on the KasprApp.
    pub notices: Vec<Notice>,
}

fn desired_labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (APP_LABEL.to_owned(), app.to_owned()),
        (COMPONENT_LABEL.to_owned(), COMPONENT.to_owned()),
        (MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned()),
    ])
}

fn owner_reference(owner: &AppOwner) -> OwnerReference {
    OwnerReference {
        api_version: owner.api_version.clone(),
        kind: "KasprApp".to_owned(),
        name: owner.app.name.clone(),
        uid: owner.uid.clone(),
        // The KasprApp's own controller is the Kaspr operator; this reference only ties the
        // claim's life to the app.
        controller: Some(false),
        block_owner_deletion: Some(true),
    }
}

/// The claim as this product declares it. Every field listed here is owned by our field
/// manager; a field left out of a later apply would be removed, so immutable fields are always
/// passed with the values the claim already has.
pub fn desired_claim(
    owner: &AppOwner,
    size: &str,
    storage_class: Option<&str>,
    access_modes: &[String],
    owned: bool,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(pvc_name(&owner.app.name)),
            namespace: Some(owner.app.namespace.clone()),
            labels: Some(desired_labels(&owner.app.name)),
            owner_references: owned.then(|| vec![owner_reference(owner)]),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(access_modes.to_vec()),
            storage_class_name: storage_class.map(str::to_owned),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(size.to_owned()),
                )])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

fn bytes(size: &str) -> Option<f64> {
    quantity::parse(size).ok().map(|q| q.0)
}

fn rwx_notices(name: &str, class: &ClassInfo, notices: &mut Vec<Notice>) {
    match class {
        ClassInfo::Found {
            name: class_name,
            provisioner,
            ..
        } if !known_rwx(provisioner) => notices.push(Notice::warning(
            "StorageClassNotKnownRWX",
            format!(
                "storage class {class_name:?} of PVC {name} uses provisioner {provisioner:?}, which is \
                 not known to support ReadWriteMany; the claim may never bind, or pods on different \
                 nodes may fail to mount it (see docs/controller.md for the known provisioners)"
            ),
        )),
        ClassInfo::Missing(class_name) => notices.push(Notice::warning(
            "StorageClassNotFound",
            format!(
                "storage class {class_name:?} of PVC {name} does not exist; the claim stays Pending \
                 (and the app's pods with it) until it does"
            ),
        )),
        _ => {}
    }
}

/// Decides what to do with the claim of `app`.
pub fn plan(
    owner: &AppOwner,
    wanted: &Wanted<'_>,
    existing: Option<&Existing>,
    class: &ClassInfo,
) -> PvcPlan {
    let name = pvc_name(&owner.app.name);
    let mut notices = Vec::new();
    let action = match (wanted, existing) {
        (_, Some(claim)) if claim.deleting => PvcAction::Nothing,
        (Wanted::NoClaim { .. }, None) => PvcAction::Nothing,
        (Wanted::NoClaim { .. }, Some(claim)) if !claim.managed => PvcAction::Nothing,
        (Wanted::NoClaim { delete_claim }, Some(claim)) => {
            if delete_claim.unwrap_or(claim.owned) {
                PvcAction::Delete {
                    uid: claim.uid.clone(),
                }
            } else if claim.owned {
                // Kept, so it must not be garbage-collected with the app either.
                PvcAction::Apply(Box::new(keep_claim(owner, claim, false)))
            } else {
                PvcAction::Nothing
            }
        }
        (Wanted::Claim(cache), None) => {
            rwx_notices(&name, class, &mut notices);
            PvcAction::Apply(Box::new(desired_claim(
                owner,
                &cache.size,
                cache.storage_class.as_deref(),
                &[ACCESS_MODE.to_owned()],
                cache.delete_claim,
            )))
        }
        (Wanted::Claim(_), Some(claim)) if !claim.managed => {
            if !claim.access_modes.iter().any(|m| m == ACCESS_MODE) {
                notices.push(Notice::warning(
                    "PvcNotReadWriteMany",
                    format!(
                        "PVC {name} exists, was not created by kaspr-packages-webhook and is not \
                         ReadWriteMany ({:?}); pods on different nodes may fail to mount it. Delete \
                         it to let kaspr-packages-webhook create a ReadWriteMany claim",
                        claim.access_modes
                    ),
                ));
            }
            PvcAction::Nothing
        }
        (Wanted::Claim(cache), Some(claim)) => {
            rwx_notices(&name, class, &mut notices);
            plan_managed(owner, cache, claim, class, &mut notices)
        }
    };
    PvcPlan { action, notices }
}

/// The claim as it is, with our labels and the owner reference as asked.
fn keep_claim(owner: &AppOwner, claim: &Existing, owned: bool) -> PersistentVolumeClaim {
    desired_claim(
        owner,
        claim.request.as_deref().unwrap_or_default(),
        claim.storage_class.as_deref(),
        &claim.access_modes,
        owned,
    )
}

fn plan_managed(
    owner: &AppOwner,
    cache: &PvcCache,
    claim: &Existing,
    class: &ClassInfo,
    notices: &mut Vec<Notice>,
) -> PvcAction {
    let name = pvc_name(&owner.app.name);
    if let Some(wanted_class) = &cache.storage_class
        && claim.storage_class.as_ref() != Some(wanted_class)
    {
        notices.push(Notice::warning(
            "StorageClassChangeNeedsRecreate",
            format!(
                "cache.storageClass is {wanted_class:?} but PVC {name} has storage class {:?}, which \
                 cannot change: delete the PVC by hand (its cached builds are rebuilt) to recreate it \
                 with the new class",
                claim.storage_class.as_deref().unwrap_or("")
            ),
        ));
    }
    let mut size = claim.request.clone();
    match (bytes(&cache.size), claim.request.as_deref().and_then(bytes)) {
        (Some(want), Some(have)) if want > have => {
            let expandable = !matches!(
                class,
                ClassInfo::Found {
                    allow_expansion: false,
                    ..
                }
            );
            if !expandable {
                notices.push(Notice::warning(
                    "PvcExpansionNotAllowed",
                    format!(
                        "cache.size {} is larger than PVC {name}'s request {}, but its storage class \
                         does not allow volume expansion: delete the PVC by hand to recreate it with \
                         the new size",
                        cache.size,
                        claim.request.as_deref().unwrap_or("")
                    ),
                ));
            } else if claim.bound {
                size = Some(cache.size.clone());
            }
            // An unbound claim cannot grow (the API server refuses); the claim's watch brings
            // the app back here once it binds.
        }
        (Some(want), Some(have)) if want < have => notices.push(Notice::warning(
            "PvcShrinkNeedsRecreate",
            format!(
                "cache.size {} is smaller than PVC {name}'s request {}; a PVC cannot shrink: delete \
                 the PVC by hand (its cached builds are rebuilt) to recreate it with the smaller size",
                cache.size,
                claim.request.as_deref().unwrap_or("")
            ),
        )),
        // No request at all on a claim we created cannot happen; keep what the spec says.
        (_, None) => size = Some(cache.size.clone()),
        _ => {}
    }
    let grows = size != claim.request;
    if grows || claim.owned != cache.delete_claim || !claim.labelled {
        PvcAction::Apply(Box::new(desired_claim(
            owner,
            size.as_deref().unwrap_or(&cache.size),
            claim.storage_class.as_deref(),
            &claim.access_modes,
            cache.delete_claim,
        )))
    } else {
        PvcAction::Nothing
    }
}

#[cfg(test)]
mod tests;
