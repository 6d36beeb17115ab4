//! The KasprApp watch cache against a stand-in API server (a tower service behind a real kube
//! client): initial list and readiness, hits, the GET on a miss, and failures.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use http_body_util::StreamBody;
use hyper::body::Frame;
use kaspr_packages_webhook::app::{AppLookup, AppRef};
use kaspr_packages_webhook::cache::{self, KasprApps, KubeKasprApps};
use serde_json::{Value, json};

type Body = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

fn app(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "kaspr.io/v1alpha1",
        "kind": "KasprApp",
        "metadata": {
            "name": name, "namespace": namespace, "resourceVersion": "5", "uid": format!("uid-{name}"),
            "managedFields": [{"manager": "kubectl"}]
        },
        "spec": {"pythonPackages": {"packages": ["requests==2.32.3"]}}
    })
}

fn reply(status: u16, body: &Value) -> hyper::Response<Body> {
    let bytes = Bytes::from(body.to_string());
    let stream = futures::stream::once(async move { Ok(Frame::data(bytes)) }).boxed();
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream))
        .expect("response")
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": format!("{reason} (test)"), "reason": reason, "code": code})
}

/// Serves lists of the given apps, watches that stay open, and single GETs.
fn fake_api(apps: Vec<Value>, list_delay: Duration, gets: Arc<AtomicUsize>) -> kube::Client {
    let service = tower::service_fn(move |request: hyper::Request<kube::client::Body>| {
        let apps = apps.clone();
        let gets = Arc::clone(&gets);
        async move {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or("").to_owned();
            let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let response = match segments.as_slice() {
                // Watches stay open without events.
                _ if query.contains("watch=true") => hyper::Response::builder()
                    .status(200)
                    .body(StreamBody::new(futures::stream::pending().boxed()))
                    .expect("response"),
                ["apis", "kaspr.io", "v1alpha1", "kasprapps"] => {
                    tokio::time::sleep(list_delay).await;
                    reply(
                        200,
                        &json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprAppList", "metadata": {"resourceVersion": "10"}, "items": apps}),
                    )
                }
                [
                    "apis",
                    "kaspr.io",
                    "v1alpha1",
                    "namespaces",
                    namespace,
                    "kasprapps",
                ] => {
                    tokio::time::sleep(list_delay).await;
                    let items: Vec<Value> = apps
                        .into_iter()
                        .filter(|a| a["metadata"]["namespace"] == *namespace)
                        .collect();
                    reply(
                        200,
                        &json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprAppList", "metadata": {"resourceVersion": "10"}, "items": items}),
                    )
                }
                [
                    "apis",
                    "kaspr.io",
                    "v1alpha1",
                    "namespaces",
                    namespace,
                    "kasprapps",
                    name,
                ] => {
                    gets.fetch_add(1, Ordering::SeqCst);
                    match (*namespace, *name) {
                        ("broken", _) => reply(500, &status(500, "InternalError")),
                        ("locked", _) => reply(403, &status(403, "Forbidden")),
                        (ns, "late") => reply(200, &app(ns, "late")),
                        _ => reply(404, &status(404, "NotFound")),
                    }
                }
                _ => reply(404, &status(404, "NotFound")),
            };
            Ok::<_, Infallible>(response)
        }
    });
    kube::Client::new(service, "default")
}

fn app_ref(namespace: &str, name: &str) -> AppRef {
    AppRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

async fn wait_synced(apps: &KubeKasprApps) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !apps.is_synced() {
        assert!(tokio::time::Instant::now() < deadline, "cache never synced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn lists_all_namespaces_then_answers_from_memory() {
    let gets = Arc::new(AtomicUsize::new(0));
    let client = fake_api(
        vec![app("apps", "demo"), app("other", "two")],
        Duration::from_millis(200),
        gets.clone(),
    );
    let (apps, runner) = KubeKasprApps::new(client, &[]);
    let runner = tokio::spawn(runner);
    assert!(!apps.is_synced(), "synced before the list arrived");
    wait_synced(&apps).await;
    assert_eq!(apps.len(), 2);

    match cache::lookup(&apps, &app_ref("apps", "demo")).await {
        AppLookup::Found(found) => {
            assert_eq!(
                found["spec"]["pythonPackages"]["packages"][0],
                "requests==2.32.3"
            );
            assert!(found.pointer("/metadata/managedFields").is_none());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        gets.load(Ordering::SeqCst),
        0,
        "a hit must not call the API server"
    );

    // A miss reads once from the API server.
    assert!(matches!(
        cache::lookup(&apps, &app_ref("apps", "late")).await,
        AppLookup::Found(_)
    ));
    assert!(matches!(
        cache::lookup(&apps, &app_ref("apps", "nope")).await,
        AppLookup::NotFound
    ));
    assert_eq!(gets.load(Ordering::SeqCst), 2);

    match cache::lookup(&apps, &app_ref("broken", "x")).await {
        AppLookup::Unavailable(reason) => assert!(reason.contains("500"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    match cache::lookup(&apps, &app_ref("locked", "x")).await {
        AppLookup::Unavailable(reason) => assert!(reason.contains("403"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    runner.abort();
}

#[tokio::test]
async fn watches_only_the_listed_namespaces() {
    let gets = Arc::new(AtomicUsize::new(0));
    let client = fake_api(
        vec![app("apps", "demo"), app("other", "two")],
        Duration::ZERO,
        gets.clone(),
    );
    let (apps, runner) = KubeKasprApps::new(
        client,
        &["apps".to_owned(), "apps".to_owned(), "third".to_owned()],
    );
    let runner = tokio::spawn(runner);
    wait_synced(&apps).await;
    assert_eq!(apps.len(), 1);
    assert!(matches!(
        apps.cached(&app_ref("apps", "demo")),
        Some(AppLookup::Found(_))
    ));
    // Not watched: the cache has no say, the API server is asked.
    assert!(apps.cached(&app_ref("other", "two")).is_none());
    assert!(matches!(
        cache::lookup(&apps, &app_ref("other", "two")).await,
        AppLookup::NotFound
    ));
    assert_eq!(gets.load(Ordering::SeqCst), 1);
    runner.abort();
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_and_never_ready() {
    let service = tower::service_fn(|_: hyper::Request<kube::client::Body>| async {
        Err::<hyper::Response<Body>, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ))
    });
    let (apps, runner) = KubeKasprApps::new(kube::Client::new(service, "default"), &[]);
    let runner = tokio::spawn(runner);
    let lookup = cache::lookup(&apps, &app_ref("apps", "demo")).await;
    match &lookup {
        AppLookup::Unavailable(reason) => {
            assert!(reason.contains("connection refused"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
    // What the user sees: a denial naming the app and the reason, never an allowed pod.
    let body = serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "apps", "operation": "CREATE",
            "object": {"metadata": {"name": "demo-app-0", "namespace": "apps",
                "labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "demo"}},
                "spec": {"containers": [{"name": "kaspr", "image": "kaspr:1"}]}}}
    }))
    .expect("json");
    let request = kaspr_packages_webhook::admission::parse_review(&body).expect("review");
    let decision = kaspr_packages_webhook::admission::decide(
        kaspr_packages_webhook::admission::Endpoint::Mutate,
        &request,
        Some(&lookup),
        &kaspr_packages_webhook::config::RenderConfig::default(),
    );
    assert!(!decision.allowed);
    let message = decision.message.expect("message");
    assert!(
        message.starts_with("kaspr-packages-webhook could not read KasprApp apps/demo (")
            && message.contains("connection refused")
            && message.ends_with("refusing to start its pods without their Python packages"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!apps.is_synced());
    runner.abort();
}

#[tokio::test]
async fn without_the_crd_there_are_no_apps_and_the_cache_is_ready() {
    // Every path answers 404, as an API server without kasprapps.kaspr.io does.
    let service = tower::service_fn(|_: hyper::Request<kube::client::Body>| async {
        Ok::<_, Infallible>(reply(404, &status(404, "NotFound")))
    });
    let (apps, runner) = KubeKasprApps::new(kube::Client::new(service, "default"), &[]);
    let runner = tokio::spawn(runner);
    wait_synced(&apps).await;
    assert_eq!(apps.len(), 0);
    assert!(matches!(
        cache::lookup(&apps, &app_ref("apps", "demo")).await,
        AppLookup::NotFound
    ));
    runner.abort();
}
