//! Rendering revisions: the keep path of an UPDATE, table by table.

use pretty_assertions::assert_eq;
use rstest::rstest;
use serde_json::{Value, json};

use super::*;
use crate::admission::{self, Endpoint, mutate_object, mutate_update};
use crate::app::AppLookup;
use crate::config::RenderConfig;
use crate::mutation::ObjectKind;

fn kasprapp(packages: &[&str]) -> Value {
    json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
           "metadata": {"name": "demo", "namespace": "apps", "uid": "u"},
           "spec": {"pythonPackages": {"packages": packages, "cache": {"type": "pvc", "pvc": {"size": "1Gi"}}}}})
}

/// The operator's StatefulSet, as it writes it (no injection).
fn statefulset(image: &str, replicas: i64) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "demo-app", "namespace": "apps",
            "ownerReferences": [{"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": "demo", "uid": "u"}]},
        "spec": {"replicas": replicas, "template": {
            "metadata": {"labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "demo"}},
            "spec": {"containers": [{"name": "kaspr", "image": image,
                                     "env": [{"name": "PYTHONPATH", "value": "/app"}]}],
                     "volumes": [{"name": "data", "emptyDir": {}}]}}}})
}

fn resources(memory: &str) -> k8s_openapi::api::core::v1::ResourceRequirements {
    serde_json::from_value(json!({"requests": {"cpu": "50m"}, "limits": {"memory": memory}}))
        .expect("resources")
}

/// Two renderings that differ only in revision-owned settings.
fn revision_a() -> RenderConfig {
    RenderConfig {
        default_resources: Some(resources("512Mi")),
        revision: Some("a".into()),
        ..RenderConfig::default()
    }
}

fn revision_b() -> RenderConfig {
    RenderConfig {
        default_resources: Some(resources("1Gi")),
        packages_volume_size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "2Gi".into(),
        )),
        revision: Some("b".into()),
        ..RenderConfig::default()
    }
}

fn patched(object: &Value, patch: &json_patch::Patch) -> Value {
    let mut out = object.clone();
    json_patch::patch(&mut out, patch).expect("the patch applies");
    out
}

/// A CREATE of `object` rendered by `config`.
fn created(object: &Value, app: &Value, config: &RenderConfig) -> Value {
    let outcome = mutate_object(ObjectKind::StatefulSet, object, app, config).expect("allowed");
    patched(object, &outcome.patch)
}

/// An UPDATE from `old` to `new` answered by `config`: the stored object.
fn updated(old: &Value, new: &Value, app: &Value, config: &RenderConfig) -> Value {
    let outcome =
        mutate_update(ObjectKind::StatefulSet, new, Some(old), app, config).expect("allowed");
    patched(new, &outcome.patch)
}

fn template_annotation<'a>(sts: &'a Value, key: &str) -> Option<&'a str> {
    sts.pointer("/spec/template/metadata/annotations")?
        .get(key)?
        .as_str()
}

#[test]
fn revisions_share_the_config_hash_and_differ_in_everything_they_own() {
    let app = kasprapp(&["a==1"]);
    let by_a = created(&statefulset("kaspr:1", 1), &app, &revision_a());
    let by_b = created(&statefulset("kaspr:1", 1), &app, &revision_b());
    let hash = |sts: &Value, key| template_annotation(sts, key).map(str::to_owned);
    assert_eq!(
        hash(&by_a, names::CONFIG_HASH_ANNOTATION),
        hash(&by_b, names::CONFIG_HASH_ANNOTATION)
    );
    assert!(hash(&by_a, names::CONFIG_HASH_ANNOTATION).is_some());
    assert_ne!(
        hash(&by_a, names::TEMPLATE_HASH_ANNOTATION),
        hash(&by_b, names::TEMPLATE_HASH_ANNOTATION)
    );
    assert_eq!(
        hash(&by_a, names::REVISION_ANNOTATION).as_deref(),
        Some("a")
    );
    assert_eq!(
        hash(&by_b, names::REVISION_ANNOTATION).as_deref(),
        Some("b")
    );
    // The default rendering (no settings) has the same config hash too.
    let by_default = created(&statefulset("kaspr:1", 1), &app, &RenderConfig::default());
    assert_eq!(
        hash(&by_default, names::CONFIG_HASH_ANNOTATION),
        hash(&by_a, names::CONFIG_HASH_ANNOTATION)
    );
    // The app's own configuration changes it.
    let other = created(
        &statefulset("kaspr:1", 1),
        &kasprapp(&["a==2"]),
        &revision_a(),
    );
    assert_ne!(
        hash(&other, names::CONFIG_HASH_ANNOTATION),
        hash(&by_a, names::CONFIG_HASH_ANNOTATION)
    );
}

#[test]
fn an_operator_rewrite_answered_by_another_revision_keeps_the_injection_byte_for_byte() {
    let app = kasprapp(&["a==1"]);
    let stored = created(&statefulset("kaspr:1", 1), &app, &revision_a());
    // The operator writes its own template again; revision B answers.
    let rewritten = updated(&stored, &statefulset("kaspr:1", 1), &app, &revision_b());
    assert_eq!(rewritten["spec"]["template"], stored["spec"]["template"]);
    // And a scale (only replicas change) gives no patch at all.
    let mut scaled = stored.clone();
    scaled["spec"]["replicas"] = json!(3);
    let outcome = mutate_update(
        ObjectKind::StatefulSet,
        &scaled,
        Some(&stored),
        &app,
        &revision_b(),
    )
    .expect("allowed");
    assert!(outcome.patch.0.is_empty(), "{:?}", outcome.patch);
}

#[test]
fn the_update_keeps_the_revision_through_the_admission_envelope() {
    let app = kasprapp(&["a==1"]);
    let stored = created(&statefulset("kaspr:1", 1), &app, &revision_a());
    let review = |operation: &str, old: Option<&Value>| {
        let mut body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"group": "apps", "version": "v1", "kind": "StatefulSet"},
                        "namespace": "apps", "name": "demo-app", "operation": operation,
                        "object": statefulset("kaspr:1", 1)}});
        if let Some(old) = old {
            body["request"]["oldObject"] = old.clone();
        }
        admission::parse_review(&serde_json::to_vec(&body).expect("json")).expect("review")
    };
    let found = AppLookup::Found(std::sync::Arc::new(app));
    let answer = |request| {
        let decision = admission::decide(Endpoint::Mutate, &request, Some(&found), &revision_b());
        let patch: json_patch::Patch =
            serde_json::from_slice(decision.patch.as_ref().expect("a patch").json())
                .expect("patch");
        patched(&statefulset("kaspr:1", 1), &patch)
    };
    let update = answer(review("UPDATE", Some(&stored)));
    assert_eq!(
        template_annotation(&update, names::REVISION_ANNOTATION),
        Some("a")
    );
    assert_eq!(update["spec"]["template"], stored["spec"]["template"]);
    // A CREATE has no previous injection: this revision renders.
    let create = answer(review("CREATE", None));
    assert_eq!(
        template_annotation(&create, names::REVISION_ANNOTATION),
        Some("b")
    );
}

/// Everything that makes a different injection moves the app to the answering revision.
#[rstest]
#[case::packages_changed(kasprapp(&["a==2"]), "kaspr:1")]
#[case::image_changed(kasprapp(&["a==1"]), "kaspr:2")]
fn a_change_of_the_apps_own_configuration_moves_it_to_the_answering_revision(
    #[case] app_now: Value,
    #[case] image_now: &str,
) {
    let stored = created(
        &statefulset("kaspr:1", 1),
        &kasprapp(&["a==1"]),
        &revision_a(),
    );
    let rewritten = updated(&stored, &statefulset(image_now, 1), &app_now, &revision_b());
    assert_eq!(
        rewritten,
        created(&statefulset(image_now, 1), &app_now, &revision_b())
    );
    assert_eq!(
        rewritten["spec"]["template"]["spec"]["initContainers"][0]["image"],
        json!(image_now)
    );
}

/// A previous injection that is incomplete, reshaped or of unknown origin is not copied.
#[rstest]
#[case::init_container_gone(|t: &mut Value| { t["spec"].as_object_mut().expect("spec").remove("initContainers"); })]
#[case::init_container_runs_something_else(|t: &mut Value| { t["spec"]["initContainers"][0]["command"] = json!(["sh", "-c", "true"]); })]
#[case::volume_source_changed(|t: &mut Value| { t["spec"]["volumes"][1] = json!({"name": "kaspr-packages", "hostPath": {"path": "/"}}); })]
#[case::mount_moved(|t: &mut Value| { t["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] = json!("/elsewhere"); })]
#[case::no_revision_recorded(|t: &mut Value| { t["metadata"]["annotations"].as_object_mut().expect("annotations").remove(names::REVISION_ANNOTATION); })]
#[case::other_config_hash(|t: &mut Value| { t["metadata"]["annotations"][names::CONFIG_HASH_ANNOTATION] = json!("0000000000000000"); })]
fn only_a_complete_injection_of_our_shape_is_kept(#[case] damage: fn(&mut Value)) {
    let app = kasprapp(&["a==1"]);
    let mut stored = created(&statefulset("kaspr:1", 1), &app, &revision_a());
    damage(&mut stored["spec"]["template"]);
    let rewritten = updated(&stored, &statefulset("kaspr:1", 1), &app, &revision_b());
    assert_eq!(
        rewritten,
        created(&statefulset("kaspr:1", 1), &app, &revision_b())
    );
}

#[test]
fn the_same_revision_renders_as_it_always_did() {
    let app = kasprapp(&["a==1"]);
    let stored = created(&statefulset("kaspr:1", 1), &app, &revision_a());
    let again = updated(&stored, &statefulset("kaspr:1", 1), &app, &revision_a());
    assert_eq!(again, stored);
    assert_eq!(revision_of(&again["spec"]["template"]), Some("a"));
    assert_eq!(
        config_hash_of(&again["spec"]["template"]),
        config_hash_of(&stored["spec"]["template"])
    );
}

#[test]
fn removing_the_packages_removes_the_kept_injection_too() {
    let stored = created(
        &statefulset("kaspr:1", 1),
        &kasprapp(&["a==1"]),
        &revision_a(),
    );
    let mut without = kasprapp(&[]);
    without["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("pythonPackages");
    let rewritten = updated(&stored, &stored, &without, &revision_b());
    assert_eq!(
        rewritten["spec"]["template"],
        statefulset("kaspr:1", 1)["spec"]["template"]
    );
}

#[test]
fn pods_of_a_kept_template_are_left_as_created() {
    let app = kasprapp(&["a==1"]);
    let stored = created(&statefulset("kaspr:1", 1), &app, &revision_a());
    let mut pod = stored["spec"]["template"].clone();
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!("demo-app-0");
    pod["metadata"]["namespace"] = json!("apps");
    pod["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "demo-app", "uid": "s"}]);
    let outcome = mutate_object(ObjectKind::Pod, &pod, &app, &revision_b()).expect("allowed");
    assert!(outcome.patch.0.is_empty(), "{:?}", outcome.patch);
}

/// `sts` with the controller's mark to move to `revision` on its own metadata.
fn marked(sts: &Value, revision: &str) -> Value {
    let mut sts = sts.clone();
    sts["metadata"]["annotations"] = json!({
        names::MARK_ANNOTATION: revision,
        names::MARK_STARTED_ANNOTATION: "2026-12-03T12:00:00Z",
    });
    sts
}

#[test]
fn the_mark_for_the_answering_revision_moves_the_app_to_it() {
    let app = kasprapp(&["a==1"]);
    let stored = created(&statefulset("kaspr:1", 1), &app, &revision_a());
    // The controller's mark is a metadata-only write; revision B renders its own injection.
    let moved = updated(&stored, &marked(&stored, "b"), &app, &revision_b());
    let by_b = created(&statefulset("kaspr:1", 1), &app, &revision_b());
    assert_eq!(moved["spec"]["template"], by_b["spec"]["template"]);
    assert_eq!(
        template_annotation(&moved, names::REVISION_ANNOTATION),
        Some("b")
    );
    // Moved, every later UPDATE (an operator rewrite, the mark cleared) keeps B's bytes, also
    // when revision A answers.
    let rewritten = updated(&moved, &statefulset("kaspr:1", 1), &app, &revision_a());
    assert_eq!(rewritten["spec"]["template"], by_b["spec"]["template"]);
    let cleared = updated(&moved, &statefulset("kaspr:1", 1), &app, &revision_b());
    assert_eq!(cleared["spec"]["template"], by_b["spec"]["template"]);
}

#[rstest]
#[case::a_mark_for_another_revision("c")]
#[case::a_mark_for_the_revision_it_has("a")]
fn a_mark_for_any_other_revision_keeps_the_injection(#[case] target: &str) {
    let app = kasprapp(&["a==1"]);
    let stored = created(&statefulset("kaspr:1", 1), &app, &revision_a());
    let kept = updated(&stored, &marked(&stored, target), &app, &revision_b());
    assert_eq!(kept["spec"]["template"], stored["spec"]["template"]);
}

#[test]
fn a_pod_is_never_moved_by_a_mark() {
    let app = kasprapp(&["a==1"]);
    let stored = created(&statefulset("kaspr:1", 1), &app, &revision_a());
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": stored["spec"]["template"]["metadata"].clone(),
        "spec": stored["spec"]["template"]["spec"].clone()});
    pod["metadata"]["annotations"][names::MARK_ANNOTATION] = json!("b");
    let outcome = mutate_object(ObjectKind::Pod, &pod, &app, &revision_b()).expect("allowed");
    assert!(outcome.patch.0.is_empty(), "{:?}", outcome.patch);
}
