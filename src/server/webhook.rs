//! The HTTPS side: `POST /mutate` and `POST /validate`.
//!
//! A request goes: bounded body read → [`admission::parse_review`] → KasprApp lookup (memory,
//! else one API read, within the request deadline) → [`admission::decide`] → JSON answer. Only
//! a malformed request is an HTTP error; every decision, including "the KasprApp could not be
//! read", is a 200 AdmissionReview.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt;

use crate::admission::{self, Decision, Endpoint, Outcome};
use crate::app::{AppLookup, AppRef};
use crate::cache::{self, KasprApps};
use crate::config::RenderConfig;
use crate::metrics::{self, AdmissionLabels, WebhookMetrics};

/// What the admission handlers share.
#[derive(Clone)]
pub struct WebhookState {
    inner: Arc<Inner>,
}

struct Inner {
    apps: Arc<dyn KasprApps>,
    render: RenderConfig,
    /// Answers to StatefulSets and Pods, by the inputs of their mutation.
    answers: admission::AnswerCache,
    metrics: WebhookMetrics,
    max_body_bytes: usize,
    request_timeout: Duration,
}

impl WebhookState {
    pub fn new(
        apps: Arc<dyn KasprApps>,
        render: RenderConfig,
        metrics: WebhookMetrics,
        max_body_bytes: usize,
        answer_cache_bytes: usize,
        request_timeout: Duration,
    ) -> Self {
        // The revision's name is hashed from the settings; named once here, not per request.
        let render = RenderConfig {
            revision: Some(render.revision().into_owned()),
            ..render
        };
        WebhookState {
            inner: Arc::new(Inner {
                apps,
                render,
                answers: admission::AnswerCache::with_budget(answer_cache_bytes),
                metrics,
                max_body_bytes,
                request_timeout,
            }),
        }
    }
}

/// The webhook routes. Other paths answer 404; other methods on these paths 405.
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .fallback(not_found)
        .with_state(state)
}

/// [`router`] plus `POST /bench-floor`, the load benchmark's floor: the same TLS, HTTP versions,
/// body limit and deadline as `/mutate`, and an answer of a chosen size, but no parsing, lookup,
/// decision, metrics or log line. Comparing `/mutate` with it shows what the review itself costs
/// over the server stack. Only `serve --bench-floor` serves it.
pub fn bench_floor_router(state: WebhookState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/bench-floor", post(bench_floor))
        .fallback(not_found)
        .with_state(state)
}

/// The floor answer's size when the query names none.
const FLOOR_DEFAULT_BYTES: usize = 1024;

/// The answer size the floor was asked for: `?bytes=N`, at most the body limit.
fn floor_bytes(query: Option<&str>, limit: usize) -> Result<usize, String> {
    let Some(value) = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("bytes="))
    else {
        return Ok(FLOOR_DEFAULT_BYTES);
    };
    match value.parse::<usize>() {
        Ok(bytes) if bytes <= limit => Ok(bytes),
        _ => Err(format!(
            "query bytes: {value:?} is not a whole number of bytes up to {limit}"
        )),
    }
}

/// An allowed AdmissionReview, padded with JSON whitespace to `bytes` (never shorter than the
/// review itself).
fn floor_answer(bytes: usize) -> Vec<u8> {
    let mut answer = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"bench-floor","allowed":true}}"#.to_vec();
    if answer.len() < bytes {
        answer.resize(bytes, b' ');
    }
    answer
}

async fn bench_floor(State(state): State<WebhookState>, request: Request) -> Response {
    let deadline = tokio::time::Instant::now() + state.inner.request_timeout;
    let bytes = match floor_bytes(request.uri().query(), state.inner.max_body_bytes) {
        Ok(bytes) => bytes,
        Err(message) => return text(StatusCode::BAD_REQUEST, format!("{message}\n")),
    };
    if let Err((status, _, message)) = read_request_body(&state.inner, request, deadline).await {
        return text(status, format!("{message}\n"));
    }
    let mut response = (StatusCode::OK, floor_answer(bytes)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found\n".to_owned())
}

async fn mutate(State(state): State<WebhookState>, request: Request) -> Response {
    admit(&state.inner, Endpoint::Mutate, request).await
}

async fn validate(State(state): State<WebhookState>, request: Request) -> Response {
    admit(&state.inner, Endpoint::Validate, request).await
}

fn text(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Why a body could not be read.
enum BodyError {
    /// Over the limit; the rest of the request body, still unread.
    TooLarge(Body),
    TimedOut,
    Broken(String),
}

/// Reads at most `limit` bytes before `deadline`.
async fn read_body(
    mut body: Body,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Result<Bytes, BodyError> {
    let mut buffer = Vec::new();
    let read = async {
        // Ends: every frame adds data towards the limit, or ends the body.
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Broken(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if buffer.len() + data.len() > limit {
                    return Ok(false);
                }
                buffer.extend_from_slice(&data);
            }
        }
        Ok(true)
    };
    match tokio::time::timeout_at(deadline, read).await {
        Err(_) => Err(BodyError::TimedOut),
        Ok(Err(error)) => Err(error),
        Ok(Ok(true)) => Ok(Bytes::from(buffer)),
        Ok(Ok(false)) => Err(BodyError::TooLarge(body)),
    }
}

/// Reads and discards what is left of an oversize request body, at most `cap` bytes and until
/// `deadline`, then lets it go.
///
/// A server may answer before reading the whole request (a 413), but over HTTP/2 dropping the
/// request stream resets it, and clients that are still uploading (curl, Go's transport in the
/// API server) report a stream error instead of the status. Reading the rest in the background
/// lets the upload finish and the stream close normally; a client that sends far more than the
/// cap gets RST_STREAM(NO_ERROR) after the answer, which RFC 9113 §8.1 defines for this case.
fn discard_in_background(mut body: Body, cap: usize, deadline: tokio::time::Instant) {
    tokio::spawn(async move {
        let mut discarded = 0usize;
        let drain = async {
            // Ends: each frame adds to `discarded`, bounded by `cap`, or ends the body.
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    discarded = discarded.saturating_add(data.len());
                    if discarded > cap {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, drain).await;
    });
}

fn declared_length(request: &Request) -> Option<u64> {
    request
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

async fn admit(state: &Inner, endpoint: Endpoint, request: Request) -> Response {
    let reject = Rejecter {
        state,
        started: Instant::now(),
        endpoint_label: metrics::endpoint_label(endpoint),
    };
    let deadline = tokio::time::Instant::from_std(reject.started) + state.request_timeout;
    let body = match read_request_body(state, request, deadline).await {
        Ok(body) => body,
        Err((status, outcome, message)) => return reject.with(status, outcome, &message),
    };
    let (review, app) = match parse_guarded(endpoint, &body) {
        Ok(parsed) => parsed,
        Err((status, outcome, message)) => return reject.with(status, outcome, &message),
    };
    drop(body);
    let lookup = match app {
        None => None,
        Some(app) => Some(lookup_until(state, &app, deadline).await),
    };
    let (decision, outcome) = decide_guarded(state, endpoint, &review, lookup.as_ref());
    let answer = match decision.to_review_bytes() {
        Ok(answer) => answer,
        Err(error) => {
            return reject.with(
                StatusCode::INTERNAL_SERVER_ERROR,
                "error",
                &format!("cannot serialize the answer: {error}"),
            );
        }
    };
    record_admission(&reject, &review, &decision, outcome, lookup.is_some());

    let mut response = (StatusCode::OK, answer).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Why a request got no AdmissionReview answer: HTTP status, metrics outcome, message.
type Rejection = (StatusCode, &'static str, String);

/// Answers a malformed request with an HTTP error, counted and logged.
struct Rejecter<'a> {
    state: &'a Inner,
    started: Instant,
    endpoint_label: &'static str,
}

impl Rejecter<'_> {
    fn with(&self, status: StatusCode, outcome: &'static str, message: &str) -> Response {
        self.state.metrics.observe_request(
            &AdmissionLabels {
                endpoint: self.endpoint_label,
                kind: "unknown",
                operation: "unknown",
                outcome,
            },
            self.started.elapsed().as_secs_f64(),
        );
        tracing::info!(endpoint = self.endpoint_label, status = status.as_u16(), reason = %message, "admission request rejected");
        text(status, format!("{message}\n"))
    }
}

/// The request body, within the size limit and the deadline.
async fn read_request_body(
    state: &Inner,
    request: Request,
    deadline: tokio::time::Instant,
) -> Result<Bytes, Rejection> {
    let limit = state.max_body_bytes;
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body exceeds {limit} bytes"),
        )
    };
    // An oversize body is answered from its declared length before reading any of it, or as
    // soon as a chunked body passes the limit; the rest of the upload is read and thrown away
    // after the answer (see `discard_in_background`), up to a few times the limit.
    let discard_cap = limit.saturating_mul(8);
    if declared_length(&request).is_some_and(|len| len > limit as u64) {
        discard_in_background(request.into_body(), discard_cap, deadline);
        return Err(too_large());
    }
    match read_body(request.into_body(), limit, deadline).await {
        Ok(body) => Ok(body),
        Err(BodyError::TooLarge(rest)) => {
            discard_in_background(rest, discard_cap, deadline);
            Err(too_large())
        }
        Err(BodyError::TimedOut) => Err((
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "request body not received in time".to_owned(),
        )),
        Err(BodyError::Broken(error)) => Err((
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("cannot read request body: {error}"),
        )),
    }
}

/// Parses the review and names the app it needs. The pure core runs under `catch_unwind`: a
/// defect there becomes an answer the API server can show, instead of a dropped connection.
fn parse_guarded(
    endpoint: Endpoint,
    body: &[u8],
) -> Result<(admission::AdmissionRequest, Option<AppRef>), Rejection> {
    let parsed = std::panic::catch_unwind(|| {
        let review = admission::parse_review(body)?;
        let app = admission::required_app(endpoint, &review);
        Ok::<_, admission::ReviewError>((review, app))
    });
    match parsed {
        Ok(Ok(parsed)) => Ok(parsed),
        Ok(Err(error)) => Err((StatusCode::BAD_REQUEST, "bad_request", error.to_string())),
        Err(_) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "error",
            "internal error while reading the AdmissionReview".to_owned(),
        )),
    }
}

/// Looks the app up, giving up (as unavailable) at the request deadline.
async fn lookup_until(state: &Inner, app: &AppRef, deadline: tokio::time::Instant) -> AppLookup {
    match tokio::time::timeout_at(deadline, cache::lookup(state.apps.as_ref(), app)).await {
        Ok(found) => found,
        Err(_) => AppLookup::Unavailable(format!(
            "no answer from the API server within {}",
            humantime::format_duration(state.request_timeout)
        )),
    }
}

/// Decides under `catch_unwind`; a defect denies the object with a message. Returns the
/// decision and its metrics outcome.
fn decide_guarded(
    state: &Inner,
    endpoint: Endpoint,
    review: &admission::AdmissionRequest,
    lookup: Option<&AppLookup>,
) -> (Decision, &'static str) {
    let decided = std::panic::catch_unwind(AssertUnwindSafe(|| {
        admission::decide_cached(endpoint, review, lookup, &state.render, &state.answers)
    }));
    match decided {
        Ok(decision) => {
            let outcome = decision.outcome.as_str();
            (decision, outcome)
        }
        Err(_) => {
            tracing::error!(uid = %review.uid, "internal error while deciding an admission request");
            let decision = Decision {
                uid: review.uid.clone(),
                allowed: false,
                message: Some(
                    "kaspr-packages-webhook hit an internal error on this object; see its logs"
                        .to_owned(),
                ),
                warnings: Vec::new(),
                patch: None,
                outcome: Outcome::Denied,
            };
            (decision, "error")
        }
    }
}

/// Metrics and the one log line of an answered admission.
fn record_admission(
    reject: &Rejecter<'_>,
    review: &admission::AdmissionRequest,
    decision: &Decision,
    outcome: &'static str,
    names_an_app: bool,
) {
    let endpoint_label = reject.endpoint_label;
    let elapsed = reject.started.elapsed();
    reject.state.metrics.observe_request(
        &AdmissionLabels {
            endpoint: endpoint_label,
            kind: metrics::kind_label(&review.kind),
            operation: metrics::operation_label(&review.operation),
            outcome,
        },
        elapsed.as_secs_f64(),
    );
    // One line per admission; `reason` (the denial message) only on denials. Not `message`:
    // that key holds the event's own text in JSON logs. An object that names no app is logged
    // at debug: a webhook configuration without `matchConditions` sends every StatefulSet and
    // Pod of the cluster, and the metric counts them all the same. One that names an app that
    // does not exist stays at info: it is what a user looks for when a pod is not injected.
    macro_rules! admission_line {
        ($level:expr, $($reason:tt)*) => {
            tracing::event!(
                $level,
                uid = %review.uid,
                endpoint = endpoint_label,
                kind = %review.kind,
                namespace = %review.namespace,
                name = %review.name,
                operation = %review.operation,
                dry_run = review.dry_run,
                allowed = decision.allowed,
                outcome,
                patch_bytes = decision.patch_len(),
                warnings = decision.warnings.len(),
                duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                $($reason)*
                "admission"
            )
        };
    }
    match decision.message.as_deref() {
        Some(reason) if !decision.allowed => admission_line!(tracing::Level::INFO, reason,),
        _ if outcome == "ignored" && !names_an_app => admission_line!(tracing::Level::DEBUG,),
        _ => admission_line!(tracing::Level::INFO,),
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        debug_details(review, decision);
    }
}

/// Full objects, only at debug level, and never a Secret (which a misconfigured webhook
/// configuration could send).
fn debug_details(review: &admission::AdmissionRequest, decision: &Decision) {
    if review.kind == "Secret" {
        return;
    }
    let object = review.object_text().unwrap_or_default();
    let patch = decision
        .patch
        .as_ref()
        .map(|p| String::from_utf8_lossy(p.json()))
        .unwrap_or_default();
    tracing::debug!(uid = %review.uid, %object, %patch, "admission details");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::no_query(None, Ok(FLOOR_DEFAULT_BYTES))]
    #[case::other_keys_only(Some("x=1"), Ok(FLOOR_DEFAULT_BYTES))]
    #[case::bytes(Some("bytes=40"), Ok(40))]
    #[case::bytes_after_another_key(Some("x=1&bytes=7"), Ok(7))]
    #[case::at_the_limit(Some("bytes=100"), Ok(100))]
    #[case::over_the_limit(Some("bytes=101"), Err("query bytes: \"101\" is not a whole number of bytes up to 100".to_owned()))]
    #[case::not_a_number(Some("bytes=-1"), Err("query bytes: \"-1\" is not a whole number of bytes up to 100".to_owned()))]
    fn floor_size_comes_from_the_query(
        #[case] query: Option<&str>,
        #[case] expected: Result<usize, String>,
    ) {
        assert_eq!(floor_bytes(query, 100), expected);
    }

    #[test]
    fn floor_answer_is_an_allowed_review_of_the_asked_size() {
        let unpadded = floor_answer(0);
        let padded = floor_answer(40_000);
        assert_eq!(padded.len(), 40_000);
        assert!(padded.starts_with(&unpadded));
        // Too small a size still gives the whole review.
        assert_eq!(floor_answer(3), unpadded);
        for answer in [&unpadded, &padded] {
            let review: serde_json::Value = serde_json::from_slice(answer).expect("JSON");
            assert_eq!(review["response"]["allowed"], true);
        }
    }
}
