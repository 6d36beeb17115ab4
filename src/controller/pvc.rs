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
mod tests {
    use super::*;
    use rstest::rstest;

    fn app() -> AppOwner {
        AppOwner {
            app: crate::app::AppRef::new("apps", "demo"),
            uid: "uid-1".into(),
            api_version: "kaspr.io/v1alpha1".into(),
        }
    }

    fn cache(size: &str, class: Option<&str>, delete_claim: bool) -> PvcCache {
        PvcCache {
            storage_class: class.map(str::to_owned),
            size: size.into(),
            delete_claim,
        }
    }

    /// A claim as this product created it.
    fn ours(size: &str, class: Option<&str>, owned: bool) -> Existing {
        Existing {
            uid: Some("pvc-uid".into()),
            managed: true,
            owned,
            deleting: false,
            bound: true,
            storage_class: class.map(str::to_owned),
            request: Some(size.into()),
            access_modes: vec![ACCESS_MODE.into()],
            labelled: true,
        }
    }

    fn rwx_class(expand: bool) -> ClassInfo {
        ClassInfo::Found {
            name: "shared".into(),
            provisioner: "efs.csi.aws.com".into(),
            allow_expansion: expand,
        }
    }

    fn applied(plan: &PvcPlan) -> &PersistentVolumeClaim {
        match &plan.action {
            PvcAction::Apply(claim) => claim,
            other => panic!("expected an apply, got {other:?}"),
        }
    }

    fn request(claim: &PersistentVolumeClaim) -> &str {
        &claim
            .spec
            .as_ref()
            .expect("spec")
            .resources
            .as_ref()
            .expect("resources")
            .requests
            .as_ref()
            .expect("requests")["storage"]
            .0
    }

    fn reasons(plan: &PvcPlan) -> Vec<&str> {
        plan.notices.iter().map(|n| n.reason).collect()
    }

    #[rstest]
    #[case::efs("efs.csi.aws.com", true)]
    #[case::rook_cephfs("rook-ceph.cephfs.csi.ceph.com", true)]
    #[case::custom_nfs_subdir("example.com/nfs-subdir-external-provisioner", true)]
    #[case::gce_pd("pd.csi.storage.gke.io", false)]
    #[case::ebs("ebs.csi.aws.com", false)]
    #[case::local("kubernetes.io/no-provisioner", false)]
    #[case::suffix_only_is_not_a_match("cephfs.csi.ceph.com.evil", false)]
    fn knows_rwx_provisioners(#[case] provisioner: &str, #[case] rwx: bool) {
        assert_eq!(known_rwx(provisioner), rwx);
    }

    #[test]
    fn a_missing_claim_is_created_with_labels_rwx_class_size_and_owner() {
        let spec = cache("256Mi", Some("shared"), true);
        let plan = plan(&app(), &Wanted::Claim(&spec), None, &rwx_class(true));
        assert!(plan.notices.is_empty());
        let claim = applied(&plan);
        let value = serde_json::to_value(claim).expect("json");
        assert_eq!(
            value,
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {
                    "name": "demo-python-packages",
                    "namespace": "apps",
                    "labels": {
                        "app.kubernetes.io/managed-by": "kaspr-packages-webhook",
                        "kaspr.io/app": "demo",
                        "kaspr.io/component": "python-packages",
                    },
                    "ownerReferences": [{
                        "apiVersion": "kaspr.io/v1alpha1",
                        "kind": "KasprApp",
                        "name": "demo",
                        "uid": "uid-1",
                        "controller": false,
                        "blockOwnerDeletion": true,
                    }],
                },
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "shared",
                    "resources": {"requests": {"storage": "256Mi"}},
                },
            })
        );
    }

    #[test]
    fn without_a_class_the_field_is_omitted_and_without_delete_claim_there_is_no_owner() {
        let spec = cache("1Gi", None, false);
        let plan = plan(&app(), &Wanted::Claim(&spec), None, &ClassInfo::Unnamed);
        let claim = applied(&plan);
        assert_eq!(claim.spec.as_ref().expect("spec").storage_class_name, None);
        assert_eq!(claim.metadata.owner_references, None);
        assert!(plan.notices.is_empty());
    }

    #[rstest]
    #[case::unknown_provisioner(
        ClassInfo::Found { name: "gp3".into(), provisioner: "ebs.csi.aws.com".into(), allow_expansion: true },
        vec!["StorageClassNotKnownRWX"]
    )]
    #[case::class_not_found(ClassInfo::Missing("gone".into()), vec!["StorageClassNotFound"])]
    #[case::known_provisioner(rwx_class(true), vec![])]
    #[case::unreadable_class(ClassInfo::Unknown, vec![])]
    fn the_storage_class_is_checked_for_rwx(#[case] class: ClassInfo, #[case] expected: Vec<&str>) {
        let spec = cache("256Mi", Some("x"), true);
        for existing in [None, Some(ours("256Mi", Some("x"), true))] {
            let plan = plan(&app(), &Wanted::Claim(&spec), existing.as_ref(), &class);
            assert_eq!(reasons(&plan), expected, "existing: {existing:?}");
        }
    }

    #[rstest]
    #[case::same("256Mi", "256Mi", true, None, vec![])]
    #[case::same_value_other_spelling("1Gi", "1024Mi", true, None, vec![])]
    #[case::grow_bound("256Mi", "512Mi", true, Some("512Mi"), vec![])]
    #[case::grow_unbound_waits("256Mi", "512Mi", false, None, vec![])]
    #[case::shrink("512Mi", "256Mi", true, None, vec!["PvcShrinkNeedsRecreate"])]
    fn size_changes(
        #[case] have: &str,
        #[case] want: &str,
        #[case] bound: bool,
        #[case] applied_size: Option<&str>,
        #[case] expected: Vec<&str>,
    ) {
        let spec = cache(want, Some("shared"), true);
        let existing = Existing {
            bound,
            ..ours(have, Some("shared"), true)
        };
        let plan = plan(
            &app(),
            &Wanted::Claim(&spec),
            Some(&existing),
            &rwx_class(true),
        );
        assert_eq!(reasons(&plan), expected);
        match applied_size {
            Some(size) => assert_eq!(request(applied(&plan)), size),
            None => assert_eq!(plan.action, PvcAction::Nothing),
        }
    }

    #[test]
    fn growing_needs_a_class_that_allows_expansion() {
        let spec = cache("1Gi", Some("shared"), true);
        let existing = ours("256Mi", Some("shared"), true);
        let plan = plan(
            &app(),
            &Wanted::Claim(&spec),
            Some(&existing),
            &rwx_class(false),
        );
        assert_eq!(plan.action, PvcAction::Nothing);
        assert_eq!(reasons(&plan), ["PvcExpansionNotAllowed"]);
    }

    #[test]
    fn a_class_change_is_reported_and_the_claim_keeps_its_class() {
        let spec = cache("1Gi", Some("new"), true);
        let existing = ours("256Mi", Some("old"), true);
        let plan = plan(
            &app(),
            &Wanted::Claim(&spec),
            Some(&existing),
            &rwx_class(true),
        );
        assert_eq!(reasons(&plan), ["StorageClassChangeNeedsRecreate"]);
        let claim = applied(&plan);
        assert_eq!(request(claim), "1Gi");
        assert_eq!(
            claim
                .spec
                .as_ref()
                .expect("spec")
                .storage_class_name
                .as_deref(),
            Some("old")
        );
    }

    #[test]
    fn a_defaulted_class_is_not_a_change_and_is_kept_in_applies() {
        // The spec names no class; the API server filled in the cluster default.
        let spec = cache("1Gi", None, true);
        let existing = ours("256Mi", Some("standard-rwx"), true);
        let plan = plan(
            &app(),
            &Wanted::Claim(&spec),
            Some(&existing),
            &rwx_class(true),
        );
        assert!(plan.notices.is_empty());
        assert_eq!(
            applied(&plan)
                .spec
                .as_ref()
                .expect("spec")
                .storage_class_name
                .as_deref(),
            Some("standard-rwx")
        );
    }

    #[rstest]
    #[case::add_owner(false, true, true)]
    #[case::remove_owner(true, false, false)]
    fn flipping_delete_claim_adds_or_removes_the_owner(
        #[case] owned: bool,
        #[case] delete_claim: bool,
        #[case] expect_owner: bool,
    ) {
        let spec = cache("256Mi", Some("shared"), delete_claim);
        let existing = ours("256Mi", Some("shared"), owned);
        let plan = plan(
            &app(),
            &Wanted::Claim(&spec),
            Some(&existing),
            &rwx_class(true),
        );
        let claim = applied(&plan);
        assert_eq!(claim.metadata.owner_references.is_some(), expect_owner);
        assert_eq!(request(claim), "256Mi");
    }

    #[test]
    fn missing_labels_are_restored() {
        let spec = cache("256Mi", Some("shared"), true);
        let existing = Existing {
            labelled: false,
            ..ours("256Mi", Some("shared"), true)
        };
        let plan = plan(
            &app(),
            &Wanted::Claim(&spec),
            Some(&existing),
            &rwx_class(true),
        );
        assert!(matches!(plan.action, PvcAction::Apply(_)));
    }

    #[rstest]
    #[case::explicit_true_deletes(Some(true), true, true)]
    #[case::explicit_true_deletes_even_unowned(Some(true), false, true)]
    #[case::default_follows_the_owner_reference(None, true, true)]
    #[case::default_keeps_an_unowned_claim(None, false, false)]
    #[case::explicit_false_keeps(Some(false), false, false)]
    fn leaving_pvc_mode(
        #[case] delete_claim: Option<bool>,
        #[case] owned: bool,
        #[case] deletes: bool,
    ) {
        let existing = ours("256Mi", Some("shared"), owned);
        let plan = plan(
            &app(),
            &Wanted::NoClaim { delete_claim },
            Some(&existing),
            &ClassInfo::Unknown,
        );
        if deletes {
            assert_eq!(
                plan.action,
                PvcAction::Delete {
                    uid: Some("pvc-uid".into())
                }
            );
        } else {
            assert_eq!(plan.action, PvcAction::Nothing);
        }
    }

    #[test]
    fn leaving_pvc_mode_with_delete_claim_false_drops_the_owner_reference() {
        let existing = ours("256Mi", Some("shared"), true);
        let plan = plan(
            &app(),
            &Wanted::NoClaim {
                delete_claim: Some(false),
            },
            Some(&existing),
            &ClassInfo::Unknown,
        );
        let claim = applied(&plan);
        assert_eq!(claim.metadata.owner_references, None);
        assert_eq!(request(claim), "256Mi");
        assert_eq!(
            claim
                .spec
                .as_ref()
                .expect("spec")
                .storage_class_name
                .as_deref(),
            Some("shared")
        );
    }

    #[rstest]
    #[case::pvc_mode(Wanted::Claim(&ANY_PVC_CACHE))]
    #[case::left_pvc_mode(Wanted::NoClaim { delete_claim: Some(true) })]
    fn a_claim_we_did_not_create_is_never_written(#[case] wanted: Wanted<'static>) {
        let existing = Existing {
            managed: false,
            labelled: false,
            ..ours("256Mi", Some("shared"), false)
        };
        let plan = plan(&app(), &wanted, Some(&existing), &rwx_class(true));
        assert_eq!(plan.action, PvcAction::Nothing);
        assert!(plan.notices.is_empty());
    }

    static ANY_PVC_CACHE: PvcCache = PvcCache {
        storage_class: None,
        size: String::new(),
        delete_claim: true,
    };

    #[test]
    fn a_foreign_claim_that_is_not_rwx_is_reported() {
        let spec = cache("256Mi", None, true);
        let existing = Existing {
            managed: false,
            access_modes: vec!["ReadWriteOnce".into()],
            ..ours("256Mi", None, false)
        };
        let plan = plan(
            &app(),
            &Wanted::Claim(&spec),
            Some(&existing),
            &ClassInfo::Unknown,
        );
        assert_eq!(plan.action, PvcAction::Nothing);
        assert_eq!(reasons(&plan), ["PvcNotReadWriteMany"]);
    }

    #[test]
    fn a_claim_being_deleted_is_left_alone() {
        let spec = cache("512Mi", Some("shared"), true);
        let existing = Existing {
            deleting: true,
            ..ours("256Mi", Some("shared"), false)
        };
        for wanted in [
            Wanted::Claim(&spec),
            Wanted::NoClaim {
                delete_claim: Some(true),
            },
        ] {
            let plan = plan(&app(), &wanted, Some(&existing), &rwx_class(true));
            assert_eq!(plan.action, PvcAction::Nothing);
        }
    }

    #[test]
    fn facts_are_read_from_a_claim() {
        let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "demo-python-packages", "uid": "pvc-uid",
                "labels": {"kaspr.io/app": "demo", "kaspr.io/component": "python-packages",
                           "app.kubernetes.io/managed-by": "kaspr-packages-webhook"},
                "ownerReferences": [{"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": "demo", "uid": "uid-1"}],
            },
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "shared",
                     "resources": {"requests": {"storage": "256Mi"}}},
            "status": {"phase": "Bound"},
        }))
        .expect("claim");
        assert_eq!(
            Existing::from_claim(&claim, &app()),
            ours("256Mi", Some("shared"), true)
        );
    }
}
