//! The webhook routes without sockets: status codes, the AdmissionReview answer, metrics, and
//! "any body gives a well-formed answer".

mod server_support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode, header};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use kaspr_packages_webhook::app::{AppLookup, AppRef};
use kaspr_packages_webhook::cache::{KasprApps, MemoryKasprApps};
use kaspr_packages_webhook::config::RenderConfig;
use kaspr_packages_webhook::metrics::{self, WebhookMetrics};
use kaspr_packages_webhook::server::webhook::{self, WebhookState};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use server_support::{fixture_json, fixture_yaml, statefulset_review};
use tower::ServiceExt as _;

const LIMIT: usize = 64 * 1024;

fn router_with(apps: Arc<dyn KasprApps>, timeout: Duration) -> (Router, Registry) {
    let mut registry = metrics::new_registry();
    let metrics = WebhookMetrics::register(&mut registry);
    let state = WebhookState::new(
        apps,
        RenderConfig::default(),
        metrics,
        LIMIT,
        kaspr_packages_webhook::admission::AnswerCache::BUDGET_BYTES,
        timeout,
    );
    (webhook::router(state), registry)
}

fn demo_apps() -> Arc<dyn KasprApps> {
    Arc::new(MemoryKasprApps::new().with_app(fixture_yaml("kasprapp-demo.yaml")))
}

fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .expect("request")
}

async fn call(router: &Router, request: Request<Body>) -> (StatusCode, Option<String>, Bytes) {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, content_type, body)
}

fn review_response(body: &[u8]) -> Value {
    let review: Value = serde_json::from_slice(body).expect("JSON answer");
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    review["response"].clone()
}

#[tokio::test]
async fn mutate_answers_200_and_echoes_the_uid() {
    let (router, registry) = router_with(demo_apps(), Duration::from_secs(8));
    let review = statefulset_review("uid-happy-1", "apps", "demo");
    let (status, content_type, body) = call(&router, post("/mutate", review.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some("application/json"));
    let response = review_response(&body);
    assert_eq!(response["uid"], "uid-happy-1");
    assert_eq!(response["allowed"], true, "{response}");
    // An owned StatefulSet of an app with packages gets the injection as a base64 JSON patch.
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    use base64::Engine as _;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch"))
        .expect("base64");
    let patch: Value = serde_json::from_slice(&patch).expect("patch JSON");
    assert!(
        patch.as_array().is_some_and(|ops| !ops.is_empty()),
        "{patch}"
    );

    let text = metrics::encode(&registry).expect("encode");
    assert!(
        text.lines().any(|l| l.starts_with(
            "kaspr_packages_webhook_admission_requests_total{endpoint=\"mutate\",kind=\"StatefulSet\",operation=\"CREATE\",outcome=\"patched\"}"
        ) && l.ends_with(" 1")),
        "{text}"
    );
    assert!(text.contains(
        "kaspr_packages_webhook_admission_duration_seconds_count{endpoint=\"mutate\"} 1"
    ));
}

#[tokio::test]
async fn dry_run_is_answered_like_a_real_request() {
    let (router, _) = router_with(demo_apps(), Duration::from_secs(8));
    let real = statefulset_review("uid-dry", "apps", "demo");
    let mut dry = real.clone();
    dry["request"]["dryRun"] = json!(true);
    let (_, _, real_body) = call(&router, post("/mutate", real.to_string())).await;
    let (status, _, dry_body) = call(&router, post("/mutate", dry.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(real_body, dry_body);
}

#[tokio::test]
async fn an_unknown_app_is_allowed_unchanged() {
    let (router, _) = router_with(demo_apps(), Duration::from_secs(8));
    let review = statefulset_review("uid-unknown", "apps", "not-there");
    let (status, _, body) = call(&router, post("/mutate", review.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let response = review_response(&body);
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none());
}

#[tokio::test]
async fn an_unreadable_app_is_denied_with_a_reason() {
    let apps = MemoryKasprApps::new().with_lookup(
        "apps",
        "demo",
        AppLookup::Unavailable("connection refused".into()),
    );
    let (router, registry) = router_with(Arc::new(apps), Duration::from_secs(8));
    let review = statefulset_review("uid-down", "apps", "demo");
    let (status, _, body) = call(&router, post("/mutate", review.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let response = review_response(&body);
    assert_eq!(response["uid"], "uid-down");
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().expect("message");
    assert!(
        message.contains("could not read KasprApp apps/demo"),
        "{message}"
    );
    assert!(message.contains("connection refused"), "{message}");
    let text = metrics::encode(&registry).expect("encode");
    assert!(text.contains("outcome=\"unavailable\"} 1"), "{text}");
}

/// Holds every lookup longer than the request deadline.
struct Stalled;

impl KasprApps for Stalled {
    fn cached(&self, _: &AppRef) -> Option<AppLookup> {
        None
    }
    fn fetch<'a>(&'a self, _: &'a AppRef) -> BoxFuture<'a, AppLookup> {
        async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            AppLookup::NotFound
        }
        .boxed()
    }
    fn len(&self) -> usize {
        0
    }
    fn is_synced(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn a_lookup_past_the_deadline_is_denied_in_time() {
    let (router, _) = router_with(Arc::new(Stalled), Duration::from_millis(200));
    let review = statefulset_review("uid-slow", "apps", "demo");
    let started = std::time::Instant::now();
    let (status, _, body) = call(&router, post("/mutate", review.to_string())).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(status, StatusCode::OK);
    let response = review_response(&body);
    assert_eq!(response["allowed"], false);
    assert!(
        response["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("could not read KasprApp")),
        "{response}"
    );
}

#[tokio::test]
async fn validate_accepts_a_valid_kasprapp_and_denies_an_invalid_one() {
    let (router, _) = router_with(demo_apps(), Duration::from_secs(8));
    let valid = fixture_json("review-kasprapp.json");
    let (status, _, body) = call(&router, post("/validate", valid.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let response = review_response(&body);
    assert_eq!(response["uid"], valid["request"]["uid"]);
    assert_eq!(response["allowed"], true, "{response}");

    let mut invalid = valid.clone();
    invalid["request"]["uid"] = json!("uid-invalid");
    invalid["request"]["object"]["spec"]["pythonPackages"]["packages"] = json!(["-e ."]);
    let (status, _, body) = call(&router, post("/validate", invalid.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let response = review_response(&body);
    assert_eq!(response["uid"], "uid-invalid");
    assert_eq!(response["allowed"], false, "{response}");
    assert!(
        response["status"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("packages[0]")),
        "{response}"
    );
}

#[tokio::test]
async fn unreadable_bodies_are_400() {
    let (router, registry) = router_with(demo_apps(), Duration::from_secs(8));
    for body in [
        "",
        "not json",
        "[]",
        r#"{"kind":"AdmissionReview"}"#,
        r#"{"kind":"AdmissionReview","request":{"uid":""}}"#,
    ] {
        let (status, content_type, text) = call(&router, post("/mutate", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "body {body:?}");
        assert!(content_type.is_some_and(|c| c.starts_with("text/plain")));
        assert!(!text.is_empty() && text.len() < 400, "{text:?}");
    }
    let text = metrics::encode(&registry).expect("encode");
    assert!(text.contains("outcome=\"bad_request\"} 5"), "{text}");
}

#[tokio::test]
async fn unknown_paths_are_404_and_other_methods_405() {
    let (router, _) = router_with(demo_apps(), Duration::from_secs(8));
    let (status, _, _) = call(&router, post("/nope", "{}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = call(&router, post("/mutate/extra", "{}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for (method, path) in [
        (Method::GET, "/mutate"),
        (Method::PUT, "/validate"),
        (Method::DELETE, "/mutate"),
    ] {
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .body(Body::empty())
            .expect("request");
        let (status, _, _) = call(&router, request).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
    }
}

#[tokio::test]
async fn oversize_bodies_are_413_declared_or_streamed() {
    let (router, _) = router_with(demo_apps(), Duration::from_secs(8));
    let big = vec![b' '; LIMIT + 1];
    let (status, _, _) = call(&router, post("/mutate", big.clone())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // No Content-Length: the limit applies while reading.
    let chunks: Vec<Result<Bytes, std::io::Error>> = big
        .chunks(4096)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let streamed = Body::from_stream(futures::stream::iter(chunks));
    let (status, _, _) = call(&router, post("/mutate", streamed)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // Exactly at the limit is read (and is then not a review).
    let (status, _, _) = call(&router, post("/mutate", vec![b' '; LIMIT])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

mod any_body {
    use super::*;
    use proptest::prelude::*;

    fn check(
        router: &Router,
        runtime: &tokio::runtime::Runtime,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(), TestCaseError> {
        let uid = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
            v.pointer("/request/uid")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        let (status, _, answer) = runtime.block_on(call(router, post(path, body)));
        match status {
            StatusCode::OK => {
                let review: Value = serde_json::from_slice(&answer)
                    .map_err(|e| TestCaseError::fail(format!("200 without JSON: {e}")))?;
                prop_assert_eq!(&review["kind"], "AdmissionReview");
                prop_assert!(review["response"]["allowed"].is_boolean());
                prop_assert_eq!(review["response"]["uid"].as_str(), uid.as_deref());
            }
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => {}
            other => prop_assert!(false, "unexpected status {other}"),
        }
        Ok(())
    }

    /// A JSON value of bounded depth and size.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-zA-Z]{1,10}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// JSON pointers into the fixtures that matter to the decision.
    const POINTERS: &[&str] = &[
        "/request",
        "/request/uid",
        "/request/kind",
        "/request/kind/kind",
        "/request/kind/group",
        "/request/operation",
        "/request/object",
        "/request/object/metadata",
        "/request/object/metadata/ownerReferences",
        "/request/object/metadata/ownerReferences/0",
        "/request/object/metadata/ownerReferences/0/name",
        "/request/object/metadata/labels",
        "/request/object/spec",
        "/request/object/spec/template",
        "/request/object/spec/template/spec/containers",
        "/request/object/spec/template/spec/containers/0",
        "/request/object/spec/template/spec/containers/0/env",
        "/request/object/spec/template/spec/volumes",
        "/request/object/spec/pythonPackages",
        "/request/object/spec/pythonPackages/packages",
        "/request/dryRun",
        "/request/namespace",
    ];

    fn mutated(mut review: Value, pointer: &str, replacement: Value) -> Value {
        if let Some(slot) = review.pointer_mut(pointer) {
            *slot = replacement;
        }
        review
    }

    fn setup() -> (Router, tokio::runtime::Runtime) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (router, _) = router_with(demo_apps(), Duration::from_secs(8));
        (router, runtime)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes(body in prop::collection::vec(any::<u8>(), 0..2048), validate in any::<bool>()) {
            let (router, runtime) = setup();
            check(&router, &runtime, if validate { "/validate" } else { "/mutate" }, body)?;
        }

        #[test]
        fn random_json(value in json_value()) {
            let (router, runtime) = setup();
            check(&router, &runtime, "/mutate", value.to_string().into_bytes())?;
        }

        #[test]
        fn mutated_reviews(
            which in 0..2usize,
            pointer in prop::sample::select(POINTERS),
            replacement in json_value(),
            validate in any::<bool>(),
        ) {
            let base = if which == 0 {
                statefulset_review("uid-prop", "apps", "demo")
            } else {
                fixture_json("review-kasprapp.json")
            };
            let (router, runtime) = setup();
            let body = mutated(base, pointer, replacement).to_string().into_bytes();
            check(&router, &runtime, if validate { "/validate" } else { "/mutate" }, body)?;
        }
    }
}

/// Collects log output in memory.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn one_structured_log_line_per_admission_without_objects() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter("info")
        .with_writer(move || writer.clone())
        .finish();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tracing::subscriber::with_default(subscriber, || {
        // Other tests' threads, which have no subscriber, may have registered the log's
        // callsites while this one was being set up; ask every callsite again.
        tracing::callsite::rebuild_interest_cache();
        runtime.block_on(async {
            let apps = MemoryKasprApps::new()
                .with_app(fixture_yaml("kasprapp-demo.yaml"))
                .with_lookup(
                    "apps",
                    "down",
                    AppLookup::Unavailable("connection refused".into()),
                );
            let (router, _) = router_with(Arc::new(apps), Duration::from_secs(8));
            let mut dry = statefulset_review("uid-log-1", "apps", "demo");
            dry["request"]["dryRun"] = json!(true);
            call(&router, post("/mutate", dry.to_string())).await;
            call(
                &router,
                post(
                    "/mutate",
                    statefulset_review("uid-log-2", "apps", "down").to_string(),
                ),
            )
            .await;
            // One naming a KasprApp that does not exist is logged: a user looks for it.
            call(
                &router,
                post(
                    "/mutate",
                    statefulset_review("uid-log-4", "apps", "missing").to_string(),
                ),
            )
            .await;
            // A StatefulSet that names no app is counted, and logged only at debug.
            let mut unrelated = fixture_json("../admission/unrelated-statefulset-create.json");
            unrelated["request"]["uid"] = json!("uid-log-3");
            let (status, _, body) = call(&router, post("/mutate", unrelated.to_string())).await;
            assert_eq!(status, StatusCode::OK);
            let answer: Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(answer["response"]["allowed"], true);
            assert!(
                answer["response"].get("patch").is_none(),
                "allowed unpatched"
            );
        });
    });
    let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON log line"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let first = &lines[0];
    assert_eq!(first["message"], "admission");
    assert_eq!(first["level"], "INFO");
    for (field, value) in [
        ("uid", json!("uid-log-1")),
        ("kind", json!("StatefulSet")),
        ("namespace", json!("apps")),
        ("name", json!("demo-app")),
        ("operation", json!("CREATE")),
        ("dry_run", json!(true)),
        ("allowed", json!(true)),
        ("outcome", json!("patched")),
    ] {
        assert_eq!(first[field], value, "{field} in {first}");
    }
    assert!(first["patch_bytes"].as_u64().is_some_and(|n| n > 0));
    assert!(first["warnings"].is_u64() && first["duration_us"].is_u64());
    assert!(first.get("reason").is_none());
    let second = &lines[1];
    assert_eq!(second["outcome"], "unavailable");
    assert!(
        second["reason"]
            .as_str()
            .is_some_and(|r| r.contains("could not read KasprApp"))
    );
    assert_eq!(lines[2]["uid"], "uid-log-4");
    assert_eq!(lines[2]["outcome"], "ignored");
    // No object content at info.
    assert!(!text.contains("kasprio/kaspr"), "{text}");
    assert!(!text.contains("uid-log-3"), "{text}");
}

#[tokio::test]
async fn the_bench_floor_is_served_only_when_asked_for() {
    let review = statefulset_review("uid-floor", "apps", "demo").to_string();
    let (default_router, _) = router_with(demo_apps(), Duration::from_secs(8));
    let (status, _, _) = call(
        &default_router,
        post("/bench-floor?bytes=5000", review.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let mut registry = metrics::new_registry();
    let state = WebhookState::new(
        demo_apps(),
        RenderConfig::default(),
        WebhookMetrics::register(&mut registry),
        LIMIT,
        0,
        Duration::from_secs(8),
    );
    let floor = webhook::bench_floor_router(state);
    let (status, content_type, body) =
        call(&floor, post("/bench-floor?bytes=5000", review.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some("application/json"));
    assert_eq!(body.len(), 5000);
    assert_eq!(review_response(&body)["allowed"], true);
    // Same body limit as /mutate, and a bad size is named.
    let (status, _, _) = call(&floor, post("/bench-floor", vec![b' '; LIMIT + 1])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _, body) = call(&floor, post("/bench-floor?bytes=lots", review.clone())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("bytes: \"lots\""));
    // The review routes are unchanged beside it.
    let (status, _, body) = call(&floor, post("/mutate", review)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(review_response(&body)["patchType"], "JSONPatch");
}
