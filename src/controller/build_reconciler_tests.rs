//! The build reconciler against a stand-in API server.

use serde_json::{Value, json};

use super::*;
use crate::controller::test_api::{Log, app, context, fake_api, status, writes};

const STS_PATH: &str = "/apis/apps/v1/namespaces/apps/statefulsets/demo-app";
const CM_PATH: &str = "/api/v1/namespaces/apps/configmaps/demo-python-packages-lock";
const JOBS_PATH: &str = "/apis/batch/v1/namespaces/apps/jobs";
const PODS_PATH: &str = "/api/v1/namespaces/apps/pods";
const LOCK: &str = "lock-version = \"1.0\"\n";

fn statefulset() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "demo-app", "namespace": "apps", "generation": 1},
        "spec": {"template": {
            "metadata": {"labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "demo"}},
            "spec": {"serviceAccountName": "demo-sa",
                     "containers": [{"name": "kaspr", "image": "kaspr:1"}]}}}})
}

fn wanted() -> String {
    let (object, owner, report) = app();
    let spec = report.spec.expect("spec");
    wanted_set(
        object.value(),
        &owner,
        &spec.install_key(),
        &statefulset()["spec"]["template"],
    )
    .expect("wanted")
    .id
}

fn job_path() -> String {
    format!("{JOBS_PATH}/demo-packages-{}", wanted())
}

fn job(status: &Value) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": format!("demo-packages-{}", wanted()), "namespace": "apps", "uid": "job-uid"},
           "status": status})
}

fn build_pod(terminated: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [{
        "metadata": {"name": "demo-packages-x-abcde", "namespace": "apps"},
        "status": {"containerStatuses": [{"name": "build", "image": "kaspr:1", "imageID": "",
            "ready": false, "restartCount": 0, "state": {"terminated": terminated}}]}}]})
}

/// Answers for an app whose ConfigMap holds `config_map` (None: missing) and whose Job is
/// `job` (None: missing); Job creation answers `create`.
fn api(
    config_map: Option<Value>,
    job: Option<Value>,
    create: u16,
    pod: Value,
) -> (kube::Client, Log) {
    let job_path = job_path();
    fake_api(move |method, path, body| match (method, path) {
        ("GET", STS_PATH) => (200, statefulset()),
        ("GET", CM_PATH) => config_map
            .clone()
            .map_or((404, status(404, "NotFound")), |c| (200, c)),
        ("PATCH", CM_PATH) => (200, body.clone()),
        ("GET", p) if p == job_path => job
            .clone()
            .map_or((404, status(404, "NotFound")), |j| (200, j)),
        ("DELETE", p) if p == job_path => (200, job.clone().unwrap_or_default()),
        ("POST", JOBS_PATH) if create == 201 => (201, body.clone()),
        ("POST", JOBS_PATH) => (create, status(create, "AlreadyExists")),
        ("GET", PODS_PATH) => (200, pod.clone()),
        ("GET", p) if p.ends_with("/log") => (
            200,
            Value::String(crate::builds::report::tests::printed(LOCK)),
        ),
        _ => (404, status(404, "NotFound")),
    })
}

fn applied_state(sent: &Log) -> (LockState, Value) {
    let patch = writes(sent)
        .into_iter()
        .rfind(|s| s.method == "PATCH" && s.path == CM_PATH)
        .expect("applied");
    let text = patch.body["data"]["state.json"]
        .as_str()
        .expect("state")
        .to_owned();
    (serde_json::from_str(&text).expect("state json"), patch.body)
}

fn reasons(sent: &Log) -> Vec<String> {
    writes(sent)
        .iter()
        .filter(|s| s.method == "POST" && s.path.ends_with("/events"))
        .filter_map(|s| s.body["reason"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn a_new_set_is_recorded_as_building_and_its_job_created() {
    let (client, sent) = api(None, None, 201, json!({}));
    let (object, owner, report) = app();
    let context = context(client);
    let next = reconcile_build(&object, &owner, &report, &context)
        .await
        .expect("ok");
    assert_eq!(next, BUILD_POLL);
    let (state, body) = applied_state(&sent);
    assert_eq!(state.sets.len(), 1);
    assert_eq!(state.sets[0].id, wanted());
    assert_eq!(state.sets[0].state, SetPhase::Building);
    assert_eq!(state.sets[0].python_packages, json!({"packages": ["a==1"]}));
    assert_eq!(state.current, None);
    assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "app-uid");
    let created = writes(&sent)
        .into_iter()
        .find(|s| s.method == "POST" && s.path == JOBS_PATH)
        .expect("job");
    assert_eq!(
        created.body["metadata"]["name"],
        format!("demo-packages-{}", wanted())
    );
    assert_eq!(
        created.body["spec"]["template"]["spec"]["serviceAccountName"],
        "demo-sa"
    );
    assert_eq!(reasons(&sent), ["PackageBuildStarted"]);
}

#[tokio::test]
async fn a_job_another_replica_created_is_not_an_error() {
    let (client, sent) = api(None, None, 409, json!({}));
    let (object, owner, report) = app();
    let next = reconcile_build(&object, &owner, &report, &context(client))
        .await
        .expect("409 is fine");
    assert_eq!(next, BUILD_POLL);
    assert!(reasons(&sent).is_empty());
}

#[tokio::test]
async fn a_finished_build_records_its_lock_as_current_and_removes_the_job() {
    let (client, sent) = api(
        None,
        Some(job(&json!({"succeeded": 1}))),
        201,
        build_pod(&json!({"exitCode": 0, "message": "kaspr-packages: OK"})),
    );
    let (object, owner, report) = app();
    let context = context(client);
    let next = reconcile_build(&object, &owner, &report, &context)
        .await
        .expect("ok");
    assert_eq!(next, RESYNC);
    let (state, body) = applied_state(&sent);
    assert_eq!(state.current.as_deref(), Some(wanted().as_str()));
    assert_eq!(body["data"][format!("{}.pylock.toml", wanted())], LOCK);
    let deleted = writes(&sent)
        .into_iter()
        .find(|s| s.method == "DELETE")
        .expect("job deleted");
    assert_eq!(deleted.path, job_path());
    assert_eq!(deleted.body["preconditions"]["uid"], "job-uid");
    assert!(
        !writes(&sent)
            .iter()
            .any(|s| s.method == "POST" && s.path == JOBS_PATH)
    );
    assert_eq!(reasons(&sent), ["PackageSetBuilt"]);
}

#[tokio::test]
async fn a_failed_build_warns_with_its_category_counts_and_keeps_the_current_set() {
    let current = LockState::default();
    let message = "kaspr-packages: FAILED package_not_found: pip download exited with 1: No matching distribution found for a==1";
    let (client, sent) = api(
        Some(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-python-packages-lock"},
                    "data": current.to_data(&BTreeMap::new())}),
        ),
        Some(job(&json!({"failed": 1}))),
        201,
        build_pod(&json!({"exitCode": 10, "message": message})),
    );
    let (object, owner, report) = app();
    let mut registry = crate::metrics::new_registry();
    let mut context = context(client);
    context.metrics = crate::controller::ControllerMetrics::register(&mut registry);
    reconcile_build(&object, &owner, &report, &context)
        .await
        .expect("ok");
    let (state, _) = applied_state(&sent);
    let entry = state.entry(&wanted()).expect("entry");
    assert_eq!(entry.state, SetPhase::Failed);
    assert_eq!(entry.category.as_deref(), Some("package_not_found"));
    assert_eq!(reasons(&sent), ["PackageBuildFailed"]);
    let event = writes(&sent)
        .into_iter()
        .find(|s| s.path.ends_with("/events"))
        .expect("event");
    assert_eq!(event.body["type"], "Warning");
    let note = event.body["note"].as_str().expect("note");
    assert!(
        note.contains(
            "package_not_found: pip download exited with 1: No matching distribution found for a==1"
        ),
        "{note}"
    );
    let text = crate::metrics::encode(&registry).expect("encode");
    assert!(text.contains("kaspr_packages_webhook_package_builds_total{outcome=\"failed\",category=\"package_not_found\"} 1"), "{text}");
    assert!(writes(&sent).iter().any(|s| s.method == "DELETE"));

    // Looked at again (the Job is gone, the failure recorded): no new build, no new Event.
    let recorded = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo-python-packages-lock"},
                          "data": state.to_data(&BTreeMap::new())});
    let (client, sent) = api(Some(recorded), None, 201, json!({}));
    let mut again = crate::controller::test_api::context(client);
    again.state = std::sync::Mutex::new(std::mem::take(&mut *context.state()));
    reconcile_build(&object, &owner, &report, &again)
        .await
        .expect("ok");
    assert!(writes(&sent).is_empty(), "{:?}", writes(&sent));
}

#[tokio::test]
async fn a_finished_build_whose_pod_is_gone_is_built_again() {
    let (client, sent) = api(
        None,
        Some(job(&json!({"succeeded": 1}))),
        201,
        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
    );
    let (object, owner, report) = app();
    let next = reconcile_build(&object, &owner, &report, &context(client))
        .await
        .expect("ok");
    assert_eq!(next, BUILD_POLL);
    let methods: Vec<String> = writes(&sent).iter().map(|s| s.method.clone()).collect();
    assert_eq!(methods, ["DELETE"]);
}

/// Image mode: an app with `packages.kaspr.io/mode: image` and a webhook with a repository.
fn image_app() -> (KasprAppObject, AppOwner, Report) {
    let (object, owner, report) = app();
    let mut value = (**object.value()).clone();
    value["metadata"]["annotations"] = json!({"packages.kaspr.io/mode": "image"});
    (
        serde_json::from_value(value).expect("object"),
        owner,
        report,
    )
}

fn image_context(client: kube::Client) -> Context {
    let mut context = context(client);
    context.render.image_mode = crate::config::ImageModeConfig {
        repository: Some("registry.example/kaspr/packages".into()),
        push_secret: Some("registry-push".into()),
        pull_secret: None,
        unsupported: None,
        plain_http: false,
    };
    context
}

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn an_image_mode_build_job_pushes_with_the_push_secret() {
    let (client, sent) = api(None, None, 201, json!({}));
    let (object, owner, report) = image_app();
    reconcile_build(&object, &owner, &report, &image_context(client))
        .await
        .expect("ok");
    let created = writes(&sent)
        .into_iter()
        .find(|s| s.method == "POST" && s.path == JOBS_PATH)
        .expect("job");
    let pod = &created.body["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"].as_array().map(|v| v
            .iter()
            .filter(|v| v["secret"]["secretName"] == "registry-push")
            .count()),
        Some(1)
    );
    let config = pod["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == crate::names::CONFIG_ENV)
        .and_then(|e| e["value"].as_str())
        .expect("config");
    let config: Value = serde_json::from_str(config).expect("json");
    assert_eq!(
        config["build"]["image"]["repository"],
        "registry.example/kaspr/packages"
    );
    // The same app without the annotation builds without publishing.
    let (client, sent) = api(None, None, 201, json!({}));
    let (object, owner, report) = app();
    reconcile_build(&object, &owner, &report, &image_context(client))
        .await
        .expect("ok");
    let created = writes(&sent)
        .into_iter()
        .find(|s| s.method == "POST" && s.path == JOBS_PATH)
        .expect("job");
    assert!(!created.body.to_string().contains("registry-push"));
}

#[tokio::test]
async fn a_finished_image_build_records_its_image_by_digest() {
    let job_path = job_path();
    let log = format!(
        "{}kaspr-packages: IMAGE {{\"repository\": \"registry.example/kaspr/packages\", \"tag\": \"{}-cpython-311\", \"digest\": \"{DIGEST}\", \"pythonTag\": \"cpython-311\"}}\n",
        crate::builds::report::tests::printed(LOCK),
        wanted()
    );
    let (client, sent) = fake_api(move |method, path, body| match (method, path) {
        ("GET", STS_PATH) => (200, statefulset()),
        ("GET", CM_PATH) => (404, status(404, "NotFound")),
        ("PATCH", CM_PATH) => (200, body.clone()),
        ("GET", p) if p == job_path => (200, job(&json!({"succeeded": 1}))),
        ("DELETE", p) if p == job_path => (200, job(&json!({"succeeded": 1}))),
        ("GET", PODS_PATH) => (
            200,
            build_pod(&json!({"exitCode": 0, "message": "kaspr-packages: OK"})),
        ),
        ("GET", p) if p.ends_with("/log") => (200, Value::String(log.clone())),
        _ => (404, status(404, "NotFound")),
    });
    let (object, owner, report) = image_app();
    reconcile_build(&object, &owner, &report, &image_context(client))
        .await
        .expect("ok");
    let (state, _) = applied_state(&sent);
    assert_eq!(state.current.as_deref(), Some(wanted().as_str()));
    let image = state.current_image().expect("image recorded");
    assert_eq!(
        image.reference,
        format!("registry.example/kaspr/packages@{DIGEST}")
    );
    assert_eq!(image.built_for, "kaspr:1");
    assert_eq!(image.python_tag, "cpython-311");
}
