//! A stand-in API server for the reconcilers' tests: a tower service behind a real kube
//! client that answers from a routing function and records every request.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, StreamBody};
use serde_json::{Value, json};

use super::ControllerOptions;
use super::context::{Context, ControllerMetrics, State};

type Body =
    StreamBody<futures::stream::BoxStream<'static, Result<hyper::body::Frame<Bytes>, Infallible>>>;

/// One request a reconciler sent: method, path, query, JSON body.
#[derive(Debug, Clone)]
pub struct Sent {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: Value,
}

pub type Log = Arc<Mutex<Vec<Sent>>>;

/// A JSON string answer is sent as plain text (a pod's log); anything else as JSON.
fn reply(status: u16, body: &Value) -> hyper::Response<Body> {
    let bytes = match body {
        Value::String(text) => Bytes::from(text.clone()),
        other => Bytes::from(other.to_string()),
    };
    let stream = futures::stream::once(async move { Ok(hyper::body::Frame::data(bytes)) }).boxed();
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream))
        .expect("response")
}

/// A Kubernetes Status body.
pub fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": format!("{reason} (test)"), "reason": reason, "code": code})
}

/// A client whose requests `route(method, path, body)` answers with (status, body); Events
/// are accepted without asking it.
pub fn fake_api<F>(route: F) -> (kube::Client, Log)
where
    F: Fn(&str, &str, &Value) -> (u16, Value) + Clone + Send + Sync + 'static,
{
    let sent: Log = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&sent);
    let service = tower::service_fn(move |request: hyper::Request<kube::client::Body>| {
        let log = Arc::clone(&log);
        let route = route.clone();
        async move {
            let method = request.method().to_string();
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or("").to_owned();
            let bytes = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log.lock().expect("log").push(Sent {
                method: method.clone(),
                path: path.clone(),
                query,
                body: body.clone(),
            });
            let (code, answer) = if method == "POST" && path.ends_with("/events") {
                (201, body)
            } else {
                route(&method, &path, &body)
            };
            Ok::<_, Infallible>(reply(code, &answer))
        }
    });
    (kube::Client::new(service, "default"), sent)
}

/// The requests other than reads.
pub fn writes(sent: &Log) -> Vec<Sent> {
    sent.lock()
        .expect("log")
        .iter()
        .filter(|s| s.method != "GET")
        .cloned()
        .collect()
}

pub fn context(client: kube::Client) -> Context {
    Context {
        client,
        options: ControllerOptions::default(),
        render: crate::config::RenderConfig::default(),
        metrics: ControllerMetrics::register(&mut crate::metrics::new_registry()),
        stores: Vec::new(),
        state: std::sync::Mutex::new(State::default()),
    }
}

/// The KasprApp `apps/demo` with one package, as the reconcilers receive it.
pub fn app() -> (
    crate::cache::KasprAppObject,
    crate::app::AppOwner,
    crate::validation::Report,
) {
    let value = json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
        "metadata": {"name": "demo", "namespace": "apps", "uid": "app-uid", "resourceVersion": "3"},
        "spec": {"pythonPackages": {"packages": ["a==1"]}}});
    let report = crate::validation::validate_kasprapp(&value);
    let owner = crate::app::AppOwner::of(&value).expect("owner");
    (
        serde_json::from_value(value).expect("object"),
        owner,
        report,
    )
}
