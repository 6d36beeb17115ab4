use kube::runtime::reflector::store::Writer;
use rstest::rstest;
use serde_json::json;

use super::*;
use crate::controller::context::ControllerMetrics;
use crate::controller::test_api::{context, fake_api, status, writes};

const DEGRADED: &str = "kaspr-packages: OK 1 packages, key 0123456789abcdef, cpython-311-linux-x86_64-glibc2.36-d3eeee62, 3.1s (cache off: key unreadable: service-account key file /var/run/secrets/kaspr-packages/gcs/sa.json cannot be read: Permission denied: this pod runs as uid 1000 gid 1000 (groups 1000) and ... is owned by uid 0 gid 0 with mode 0400)\n";

#[rstest]
#[case::key_unreadable(DEGRADED, Some("key_unreadable"))]
#[case::upload(
    "kaspr-packages: OK 2 packages, key k, t, 1.0s (cache off: upload failed: HTTP 403 denied)",
    Some("upload_failed")
)]
#[case::lock(
    "kaspr-packages: OK 2 packages, key k, t, 1.0s (cache off: lock timeout: another pod held the build lock)",
    Some("lock_timeout")
)]
#[case::unknown_cause(
    "kaspr-packages: OK 2 packages, key k, t, 1.0s (cache off: something new: x)",
    Some("other")
)]
#[case::clean("kaspr-packages: OK 2 packages, key k, t, 1.0s", None)]
#[case::failure(
    "kaspr-packages: FAILED cache_error: cannot use cache directory /x (cache off: lock timeout: y)",
    None
)]
fn cache_off_reads_the_cause_of_a_degraded_success(
    #[case] message: &str,
    #[case] cause: Option<&str>,
) {
    assert_eq!(cache_off(message).map(|(label, _)| label), cause);
}

#[test]
fn cache_off_keeps_the_detail_without_the_closing_parenthesis() {
    let (_, detail) = cache_off(DEGRADED).expect("degraded");
    assert!(
        detail.starts_with("key unreadable: service-account key file"),
        "{detail}"
    );
    assert!(detail.ends_with("with mode 0400"), "{detail}");
}

fn terminated(message: &str, container: &str, finished: &str) -> Value {
    json!({"terminated": {"exitCode": 0, "reason": "Completed", "message": message,
        "containerID": container, "finishedAt": finished}})
}

fn pod(uid: &str, state: &Value, last_state: &Value, mode: &str) -> Pod {
    let statuses = json!([
        {"name": "other-init", "ready": true, "restartCount": 0, "image": "x", "imageID": "",
         "state": terminated(DEGRADED, "containerd://other", "2026-12-02T10:00:00Z")},
        {"name": "kaspr-packages", "ready": true, "restartCount": 1, "image": "app:1", "imageID": "",
         "state": state, "lastState": last_state}
    ]);
    serde_json::from_value(json!({
        "metadata": {"name": "shop-app-0", "namespace": "apps", "uid": uid,
            "labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "shop"}},
        "spec": {
            "initContainers": [{"name": "kaspr-packages", "image": "app:1", "env": [
                {"name": "KASPR_PACKAGES_CONFIG", "value": json!({"version": 1, "mode": mode}).to_string()}
            ]}],
            "containers": [{"name": "kaspr", "image": "app:1"}]
        },
        "status": {"initContainerStatuses": statuses}
    }))
    .expect("pod")
}

#[test]
fn degraded_installs_come_from_the_install_containers_current_and_last_run() {
    let pod = pod(
        "u1",
        &terminated(DEGRADED, "containerd://b", "2026-12-02T10:05:00Z"),
        &terminated(
            "kaspr-packages: OK 1 packages, key k, t, 1.0s (cache off: upload failed: HTTP 500)",
            "containerd://a",
            "2026-12-02T10:00:00Z",
        ),
        "gcs",
    );
    let found = degraded_installs(&pod);
    let summary: Vec<_> = found
        .iter()
        .map(|i| {
            (
                i.app.as_str(),
                i.pod.as_str(),
                i.run.as_str(),
                i.mode,
                i.cause,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "shop",
                "shop-app-0",
                "containerd://b",
                "gcs",
                "key_unreadable"
            ),
            (
                "shop",
                "shop-app-0",
                "containerd://a",
                "gcs",
                "upload_failed"
            ),
        ]
    );
    let clean = self::pod(
        "u2",
        &terminated(
            "kaspr-packages: OK 1 packages, key k, t, 1.0s",
            "containerd://c",
            "2026-12-02T10:00:00Z",
        ),
        &json!({}),
        "pvc",
    );
    assert!(degraded_installs(&clean).is_empty());
}

#[test]
fn memory_counts_each_run_once_and_publishes_each_cause_once_per_app() {
    let mut memory = InstallMemory::default();
    let pod = pod(
        "u1",
        &terminated(DEGRADED, "containerd://b", "2026-12-02T10:05:00Z"),
        &json!({}),
        "gcs",
    );
    let install = degraded_installs(&pod).remove(0);
    assert!(memory.first_sight(&install));
    assert!(!memory.first_sight(&install));
    memory.forget_pod("u1");
    assert!(
        memory.first_sight(&install),
        "a deleted pod's runs are forgotten"
    );

    let shop: AppKey = ObjectRef::new("shop").within("apps");
    let other: AppKey = ObjectRef::new("other").within("apps");
    assert!(memory.first_publication(&shop, "key_unreadable"));
    assert!(!memory.first_publication(&shop, "key_unreadable"));
    assert!(memory.first_publication(&shop, "upload_failed"));
    assert!(memory.first_publication(&other, "key_unreadable"));
    memory.retain_apps(|app| app.name != "shop");
    assert!(
        memory.first_publication(&shop, "key_unreadable"),
        "a deleted app's causes are forgotten"
    );
}

fn store_with_shop() -> kube::runtime::reflector::Store<KasprAppObject> {
    let mut writer: Writer<KasprAppObject> = Writer::default();
    let app: KasprAppObject = serde_json::from_value(json!({
        "apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
        "metadata": {"name": "shop", "namespace": "apps", "uid": "app-uid"},
        "spec": {"pythonPackages": {"packages": ["x==1"]}}
    }))
    .expect("app");
    writer.apply_watcher_event(&watcher::Event::Apply(app));
    writer.as_reader()
}

#[tokio::test]
async fn observe_counts_each_degraded_run_and_publishes_one_event_per_cause() {
    let (client, sent) = fake_api(|_, _, _| (404, status(404, "NotFound")));
    let mut context = context(client);
    let mut registry = crate::metrics::new_registry();
    context.metrics = ControllerMetrics::register(&mut registry);
    context.stores = vec![store_with_shop()];
    let since: Timestamp = "2026-12-02T10:01:00Z".parse().expect("time");

    // Its last run finished before the process started: reported, but not counted.
    let first = pod(
        "u1",
        &terminated(DEGRADED, "containerd://b", "2026-12-02T10:05:00Z"),
        &terminated(DEGRADED, "containerd://a", "2026-12-02T10:00:00Z"),
        "gcs",
    );
    observe(&context, &first, since).await;
    observe(&context, &first, since).await; // the same status again (a resync)
    // Another pod of the app with the same cause: counted, no second Event.
    let second = pod(
        "u2",
        &terminated(DEGRADED, "containerd://c", "2026-12-02T10:06:00Z"),
        &json!({}),
        "gcs",
    );
    observe(&context, &second, since).await;

    let events: Vec<_> = writes(&sent)
        .into_iter()
        .filter(|s| s.path.ends_with("/events"))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0].body;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], CACHE_OFF_REASON);
    assert_eq!(event["regarding"]["kind"], "KasprApp");
    assert_eq!(event["regarding"]["name"], "shop");
    assert_eq!(event["regarding"]["uid"], "app-uid");
    let note = event["note"].as_str().unwrap_or_default();
    assert!(
        note.starts_with("pod shop-app-0 installed its packages without the gcs cache (cache off: key unreadable: "),
        "{note}"
    );
    let text = crate::metrics::encode(&registry).expect("encode");
    assert!(
        text.contains("kaspr_packages_webhook_degraded_installs_total{mode=\"gcs\",cause=\"key_unreadable\"} 2"),
        "{text}"
    );
    assert!(
        text.contains(
            "kaspr_packages_webhook_degraded_installs_total{mode=\"pvc\",cause=\"lock_timeout\"} 0"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn pods_of_an_unknown_app_are_counted_but_not_reported() {
    let (client, sent) = fake_api(|_, _, _| (404, status(404, "NotFound")));
    let mut context = context(client);
    context.stores = vec![store_with_shop()];
    let since: Timestamp = "2026-12-02T10:01:00Z".parse().expect("time");
    let mut stray = pod(
        "u9",
        &terminated(DEGRADED, "containerd://z", "2026-12-02T10:05:00Z"),
        &json!({}),
        "gcs",
    );
    stray
        .metadata
        .labels
        .as_mut()
        .expect("labels")
        .insert("kaspr.io/app".into(), "gone".into());
    observe(&context, &stray, since).await;
    assert!(writes(&sent).is_empty());
    // Once the app is known, the cause is still news.
    let key: AppKey = ObjectRef::new("gone").within("apps");
    assert!(
        context
            .state()
            .installs
            .first_publication(&key, "key_unreadable")
    );
}

fn pulling_pod(name: &str, set: &str, reason: &str) -> Pod {
    let reference = format!("registry.example/kaspr/packages@sha256:{set}");
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "apps", "uid": format!("uid-{name}"),
                     "labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "shop"},
                     "annotations": {"packages.kaspr.io/set": set}},
        "spec": {
            "volumes": [{"name": names::IMAGE_VOLUME, "image": {"reference": reference}}],
            "containers": [{"name": "kaspr", "image": "app:1",
                            "volumeMounts": [{"name": names::IMAGE_VOLUME, "mountPath": names::SITE_PATH}]}]},
        "status": {"containerStatuses": [
            {"name": "kaspr", "ready": false, "restartCount": 0, "image": "app:1", "imageID": "",
             "state": {"waiting": {"reason": reason,
                                   "message": format!("failed to pull {reference}: not found")}}}]}
    }))
    .expect("pod")
}

#[tokio::test]
async fn an_image_pull_failure_is_published_once_per_app_and_set() {
    let (client, sent) = fake_api(|_, _, _| (404, status(404, "NotFound")));
    let mut context = context(client);
    context.stores = vec![store_with_shop()];
    let since: Timestamp = "2026-12-02T10:01:00Z".parse().expect("time");

    // The kubelet's back-off moves a pod between the two reasons; a resync repeats a status; a
    // replaced pod fails on the same set: all one Event.
    for pod in [
        pulling_pod("shop-app-0", "00000000000000aa", "ErrImagePull"),
        pulling_pod("shop-app-0", "00000000000000aa", "ImagePullBackOff"),
        pulling_pod("shop-app-0", "00000000000000aa", "ErrImagePull"),
        pulling_pod("shop-app-1", "00000000000000aa", "ImagePullBackOff"),
    ] {
        observe(&context, &pod, since).await;
    }
    // Another set of the same app is news.
    observe(
        &context,
        &pulling_pod("shop-app-0", "00000000000000bb", "ErrImagePull"),
        since,
    )
    .await;

    let events: Vec<_> = writes(&sent)
        .into_iter()
        .filter(|s| s.path.ends_with("/events"))
        .map(|s| s.body)
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    for (event, set, reason) in [
        (&events[0], "00000000000000aa", "ErrImagePull"),
        (&events[1], "00000000000000bb", "ErrImagePull"),
    ] {
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], image_pull::IMAGE_PULL_REASON);
        assert_eq!(event["regarding"]["kind"], "KasprApp");
        assert_eq!(event["regarding"]["name"], "shop");
        assert_eq!(
            event["note"],
            format!(
                "pod shop-app-0 cannot pull the image of package set {set} \
                 (registry.example/kaspr/packages@sha256:{set}): kaspr: {reason}: failed to pull \
                 registry.example/kaspr/packages@sha256:{set}: not found"
            )
        );
    }
}

#[tokio::test]
async fn an_image_pull_failure_of_an_unknown_app_is_not_published_and_stays_news() {
    let (client, sent) = fake_api(|_, _, _| (404, status(404, "NotFound")));
    let mut context = context(client);
    let since: Timestamp = "2026-12-02T10:01:00Z".parse().expect("time");
    let pod = pulling_pod("shop-app-0", "00000000000000aa", "ErrImagePull");
    observe(&context, &pod, since).await;
    assert!(writes(&sent).is_empty());
    // Once the app is in the cache, the same failure is published.
    context.stores = vec![store_with_shop()];
    observe(&context, &pod, since).await;
    let events = writes(&sent)
        .into_iter()
        .filter(|s| s.path.ends_with("/events"))
        .count();
    assert_eq!(events, 1);
}
