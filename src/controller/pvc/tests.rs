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
