//! The move bookkeeping against a stand-in API server: which StatefulSets get the mark, and
//! what a failed move reports.

use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use serde_json::{Value, json};

use super::*;
use crate::controller::context::ControllerMetrics;
use crate::controller::test_api::{context, fake_api, status, writes};

const REVISION: &str = "b";

fn kasprapp(name: &str, annotations: &Value) -> KasprAppObject {
    serde_json::from_value(json!({
        "apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
        "metadata": {"name": name, "namespace": "apps", "uid": format!("{name}-uid"), "annotations": annotations},
        "spec": {"pythonPackages": {"packages": ["x==1"]}}
    }))
    .expect("app")
}

/// App `name`'s StatefulSet, injected by `revision`, settled; marked when `mark` says when.
fn statefulset(name: &str, revision: &str, mark: Option<&str>) -> Value {
    let mut annotations = json!({});
    if let Some(started) = mark {
        annotations =
            json!({names::MARK_ANNOTATION: REVISION, names::MARK_STARTED_ANNOTATION: started});
    }
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": format!("{name}-app"), "namespace": "apps", "resourceVersion": "10",
            "generation": 2, "annotations": annotations,
            "ownerReferences": [{"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": name, "uid": format!("{name}-uid")}]},
        "spec": {"replicas": 1, "template": {"metadata": {"annotations": {
            names::TEMPLATE_HASH_ANNOTATION: "h", names::REVISION_ANNOTATION: revision}}}},
        // Pending on the new template: not finished.
        "status": {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 0,
                   "currentRevision": "r1", "updateRevision": "r2"}})
}

struct Cluster {
    context: Context,
    sent: crate::controller::test_api::Log,
    registry: prometheus_client::registry::Registry,
}

fn cluster(
    statefulsets: &[Value],
    apps: Vec<KasprAppObject>,
    labelled: &[&str],
    budget: u32,
) -> Cluster {
    let namespaces: Vec<Value> = labelled
        .iter()
        .map(|n| json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": n}}))
        .collect();
    let list = json!({"apiVersion": "apps/v1", "kind": "StatefulSetList", "metadata": {}, "items": statefulsets.to_vec()});
    let (client, sent) = fake_api(move |method, path, _| match (method, path) {
        ("GET", "/apis/apps/v1/statefulsets") => (200, list.clone()),
        ("GET", "/api/v1/namespaces") => (
            200,
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": namespaces}),
        ),
        ("PATCH", _) => (
            200,
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "x"}}),
        ),
        _ => (404, status(404, "NotFound")),
    });
    let mut context = context(client);
    let mut registry = crate::metrics::new_registry();
    context.metrics = ControllerMetrics::register(&mut registry);
    context.render.revision = Some(REVISION.into());
    context.options.rollout_budget = budget;
    let mut writer: Writer<KasprAppObject> = Writer::default();
    for app in apps {
        writer.apply_watcher_event(&watcher::Event::Apply(app));
    }
    context.stores = vec![writer.as_reader()];
    Cluster {
        context,
        sent,
        registry,
    }
}

fn patched(cluster: &Cluster) -> Vec<(String, Value)> {
    writes(&cluster.sent)
        .into_iter()
        .filter(|s| s.method == "PATCH")
        .map(|s| {
            (
                s.path.rsplit('/').next().unwrap_or_default().to_owned(),
                s.body,
            )
        })
        .collect()
}

fn reasons(cluster: &Cluster) -> Vec<(String, String)> {
    writes(&cluster.sent)
        .into_iter()
        .filter(|s| s.method == "POST")
        .map(|s| {
            (
                s.body["type"].as_str().unwrap_or_default().to_owned(),
                s.body["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn metrics(cluster: &Cluster) -> String {
    crate::metrics::encode(&cluster.registry).expect("encode")
}

#[tokio::test]
async fn the_budget_marks_the_first_app_guarded_by_its_resource_version() {
    let apps = ["one", "two"].map(|n| kasprapp(n, &json!({}))).to_vec();
    let cluster = cluster(
        &[statefulset("two", "a", None), statefulset("one", "a", None)],
        apps,
        &[],
        1,
    );
    assert!(
        tick(&cluster.context, &[None]).await,
        "busy while apps wait"
    );
    let patches = patched(&cluster);
    assert_eq!(patches.len(), 1, "{patches:?}");
    let (name, body) = &patches[0];
    assert_eq!(name, "one-app");
    assert_eq!(body["metadata"]["resourceVersion"], "10");
    assert_eq!(
        body["metadata"]["annotations"][names::MARK_ANNOTATION],
        REVISION
    );
    assert_eq!(
        reasons(&cluster),
        [("Normal".to_owned(), "RevisionMoveStarted".to_owned())]
    );
    let text = metrics(&cluster);
    assert!(
        text.contains("kaspr_packages_webhook_revision_moves_total{outcome=\"started\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kaspr_packages_webhook_revision_moves_rolling 1"),
        "{text}"
    );
    assert!(
        text.contains("kaspr_packages_webhook_revision_apps{revision=\"b\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_failed_move_stops_the_wave_with_one_warning_and_a_metric() {
    let apps = ["one", "two"].map(|n| kasprapp(n, &json!({}))).to_vec();
    let cluster = cluster(
        &[
            statefulset("one", REVISION, Some("2026-01-01T00:00:00Z")),
            statefulset("two", "a", None),
        ],
        apps,
        &[],
        1,
    );
    for _ in 0..2 {
        tick(&cluster.context, &[None]).await;
    }
    assert!(
        patched(&cluster).is_empty(),
        "nothing moves: {:?}",
        patched(&cluster)
    );
    assert_eq!(
        reasons(&cluster),
        [("Warning".to_owned(), "RevisionMoveFailed".to_owned())]
    );
    let note = writes(&cluster.sent)
        .into_iter()
        .find(|s| s.method == "POST")
        .map(|s| s.body["note"].clone())
        .expect("event");
    assert!(
        note.as_str()
            .is_some_and(|n| n.contains("apps/one-app") && n.contains("within 10m")),
        "{note}"
    );
    let text = metrics(&cluster);
    assert!(
        text.contains("kaspr_packages_webhook_revision_moves_total{outcome=\"failed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kaspr_packages_webhook_revision_moves_failing 1"),
        "{text}"
    );
    assert!(
        text.contains("kaspr_packages_webhook_revision_moves_waiting 1"),
        "{text}"
    );
}

#[tokio::test]
async fn requests_by_annotation_or_namespace_label_move_apps_with_budget_zero() {
    let apps = vec![
        kasprapp("asked", &json!({names::MOVE_REQUEST_KEY: REVISION})),
        kasprapp("other", &json!({names::MOVE_REQUEST_KEY: "c"})),
    ];
    let sts = vec![
        statefulset("asked", "a", None),
        statefulset("other", "a", None),
    ];
    let by_annotation = cluster(&sts, apps.clone(), &[], 0);
    tick(&by_annotation.context, &[None]).await;
    let names: Vec<String> = patched(&by_annotation)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["asked-app"]);

    let by_label = cluster(&sts, apps, &["apps"], 0);
    tick(&by_label.context, &[None]).await;
    let names: Vec<String> = patched(&by_label).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["asked-app", "other-app"]);
}

#[tokio::test]
async fn a_finished_move_is_cleared_and_an_unused_revision_loses_its_series() {
    let apps = vec![kasprapp("one", &json!({}))];
    let mut done = statefulset("one", REVISION, Some("2026-12-03T11:59:00Z"));
    done["status"]["readyReplicas"] = json!(1);
    done["status"]["currentRevision"] = json!("r2");
    let cluster = cluster(&[done], apps, &[], 1);
    cluster.context.state().moves.revisions =
        std::collections::BTreeMap::from([("a".to_owned(), 1)]);
    cluster.context.metrics.set_moves(
        &moves::Plan {
            apps_by_revision: std::collections::BTreeMap::from([("a".to_owned(), 1)]),
            ..moves::Plan::default()
        },
        &std::collections::BTreeMap::new(),
    );
    assert!(metrics(&cluster).contains("revision_apps{revision=\"a\"} 1"));
    assert!(
        !tick(&cluster.context, &[None]).await,
        "idle once every app is on this revision"
    );
    let patches = patched(&cluster);
    assert_eq!(patches.len(), 1);
    assert_eq!(
        patches[0].1["metadata"]["annotations"][names::MARK_ANNOTATION],
        Value::Null
    );
    assert_eq!(
        reasons(&cluster),
        [("Normal".to_owned(), "RevisionMoveFinished".to_owned())]
    );
    let text = metrics(&cluster);
    assert!(!text.contains("revision=\"a\""), "{text}");
    assert!(text.contains("revision_apps{revision=\"b\"} 1"), "{text}");
}
