//! `self-test`: synthetic dry-run AdmissionReviews sent to a running webhook, and the checks of
//! its answers.
//!
//! The requests and the checks are pure functions ([`probes`], [`check_answer`]); only [`run`]
//! does I/O (one TLS connection per request, HTTP/1.1, as the API server's client may).
//!
//! `/mutate` finds a StatefulSet's KasprApp by looking it up (cache or API server), so a
//! request cannot carry its app inline. The StatefulSet check therefore names an app:
//! by default one that does not exist, which a healthy webhook answers with "allowed,
//! unchanged" after a real lookup (so the webhook's access to KasprApps is exercised too: an
//! unreadable app is a denial and fails the check); with `--app`, a real app with
//! `spec.pythonPackages`, whose answer must carry a well-formed JSON patch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

/// The default app of the StatefulSet check: a name no KasprApp is expected to have.
pub const ABSENT_APP: &str = "kaspr-packages-webhook-self-test";

/// Largest answer read; a real answer is a few kilobytes (a patch at most a few hundred).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// What `self-test` is run with.
#[derive(Debug, Clone)]
pub struct SelfTestOptions {
    /// Base URL of the webhook, `https://host[:port][/prefix]`; `/mutate` and `/validate` are
    /// appended.
    pub url: url::Url,
    /// PEM file with the CA(s) that signed the webhook's certificate.
    pub ca_file: PathBuf,
    /// Namespace of the synthetic objects.
    pub namespace: String,
    /// A KasprApp with `spec.pythonPackages` in `namespace`: its StatefulSet must be patched.
    /// `None`: a StatefulSet of an app that does not exist, answered unchanged.
    pub app: Option<String>,
    /// Deadline of each request (connection, handshake and answer).
    pub timeout: Duration,
    /// Slowest acceptable answer.
    pub max_response_time: Duration,
}

/// Why `self-test` could not start.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("--url {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("--ca-file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("--app {app}: not a valid KasprApp name")]
    App { app: String },
    #[error("--namespace {namespace}: not a valid namespace name")]
    Namespace { namespace: String },
    #[error("cannot start the client runtime: {0}")]
    Runtime(String),
}

/// What a check expects of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Allowed, and no patch.
    AllowedUnchanged,
    /// Allowed with a JSON patch that is base64 of a non-empty RFC 6902 array.
    AllowedPatched,
    /// Denied with a message that mentions this text.
    Denied(&'static str),
}

/// One synthetic request.
#[derive(Debug, Clone)]
pub struct Probe {
    pub name: String,
    pub path: &'static str,
    pub uid: String,
    pub review: Value,
    pub expect: Expect,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl std::fmt::Display for CheckResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = if self.passed { "ok  " } else { "FAIL" };
        write!(f, "{status} {}: {}", self.name, self.detail)
    }
}

/// Every check's result, in order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<CheckResult>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// Plain lines: one per check, then a summary.
    pub fn lines(&self) -> Vec<String> {
        let failed = self.checks.iter().filter(|c| !c.passed).count();
        let mut lines: Vec<String> = self.checks.iter().map(ToString::to_string).collect();
        lines.push(format!(
            "self-test: {} checks, {failed} failed",
            self.checks.len()
        ));
        lines
    }
}

fn is_dns_label_list(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks the options that need no I/O.
pub fn check_options(options: &SelfTestOptions) -> Result<(), SelfTestError> {
    let url = &options.url;
    let bad_url = |reason: &str| SelfTestError::Url {
        url: url.to_string(),
        reason: reason.to_owned(),
    };
    if url.scheme() != "https" {
        return Err(bad_url("must start with https://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad_url("has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad_url("must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad_url("must not have a query or fragment"));
    }
    if !is_dns_label_list(&options.namespace, 63) || options.namespace.contains('.') {
        return Err(SelfTestError::Namespace {
            namespace: options.namespace.clone(),
        });
    }
    if let Some(app) = &options.app
        && !is_dns_label_list(app, 253)
    {
        return Err(SelfTestError::App { app: app.clone() });
    }
    Ok(())
}

/// The synthetic requests, all `dryRun: true`. `nonce` makes the uids unique per run.
pub fn probes(namespace: &str, app: Option<&str>, nonce: &str) -> Vec<Probe> {
    let valid_app = json!({
        "apiVersion": "kaspr.io/v1alpha1",
        "kind": "KasprApp",
        "metadata": {"name": ABSENT_APP, "namespace": namespace},
        "spec": {"pythonPackages": {"packages": ["requests==2.32.3"]}}
    });
    let mut invalid_app = valid_app.clone();
    invalid_app["spec"]["pythonPackages"]["packages"] = json!(["--index-url=http://example.com"]);
    let kasprapp = Resource {
        kind: json!({"group": "kaspr.io", "version": "v1alpha1", "kind": "KasprApp"}),
        resource: json!({"group": "kaspr.io", "version": "v1alpha1", "resource": "kasprapps"}),
        name: ABSENT_APP.to_owned(),
        namespace,
    };
    let (app_name, expect, what) = match app {
        Some(app) => (app, Expect::AllowedPatched, "patched"),
        None => (ABSENT_APP, Expect::AllowedUnchanged, "allowed unchanged"),
    };
    let statefulset = Resource {
        kind: json!({"group": "apps", "version": "v1", "kind": "StatefulSet"}),
        resource: json!({"group": "apps", "version": "v1", "resource": "statefulsets"}),
        name: format!("{app_name}-app"),
        namespace,
    };
    let statefulset_object = kaspr_statefulset(namespace, app_name);
    let statefulset_uid = format!("self-test-{nonce}-statefulset");
    let valid_uid = format!("self-test-{nonce}-valid");
    let invalid_uid = format!("self-test-{nonce}-invalid");
    vec![
        Probe {
            name: "validate a valid KasprApp".to_owned(),
            path: "/validate",
            review: kasprapp.create_review(&valid_uid, &valid_app),
            uid: valid_uid,
            expect: Expect::AllowedUnchanged,
        },
        Probe {
            name: "validate an invalid KasprApp".to_owned(),
            path: "/validate",
            review: kasprapp.create_review(&invalid_uid, &invalid_app),
            uid: invalid_uid,
            expect: Expect::Denied("spec.pythonPackages.packages[0]"),
        },
        Probe {
            name: format!("mutate a StatefulSet of KasprApp {namespace}/{app_name} ({what})"),
            path: "/mutate",
            review: statefulset.create_review(&statefulset_uid, &statefulset_object),
            uid: statefulset_uid,
            expect,
        },
    ]
}

/// What a synthetic review is about.
struct Resource<'a> {
    kind: Value,
    resource: Value,
    name: String,
    namespace: &'a str,
}

impl Resource<'_> {
    /// A dry-run CREATE review of `object`, sent as the self-test's own user.
    fn create_review(&self, uid: &str, object: &Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": self.kind,
                "resource": self.resource,
                "name": self.name,
                "namespace": self.namespace,
                "operation": "CREATE",
                "userInfo": {"username": "kaspr-packages-webhook:self-test"},
                "object": object,
                "oldObject": null,
                "dryRun": true,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
            }
        })
    }
}

/// A StatefulSet as the Kaspr operator creates it for `app_name`.
fn kaspr_statefulset(namespace: &str, app_name: &str) -> Value {
    let name = format!("{app_name}-app");
    let labels = json!({"kaspr.io/app": app_name, "kaspr.io/kind": "KasprApp"});
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": app_name,
                "uid": "00000000-0000-0000-0000-000000000000",
                "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "replicas": 1,
            "serviceName": name,
            "selector": {"matchLabels": {"kaspr.io/app": app_name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "kaspr", "image": "kasprio/kaspr:0.5.0"}]}
            }
        }
    })
}

/// Checks one answer: HTTP 200, an AdmissionReview v1 whose `response.uid` is the request's,
/// the expected decision and patch, within `max_response_time`. `Ok` carries a short summary.
pub fn check_answer(
    probe: &Probe,
    status: u16,
    body: &[u8],
    elapsed: Duration,
    max_response_time: Duration,
) -> Result<String, String> {
    if status != 200 {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(format!(
            "HTTP status {status}, expected 200: {}",
            text.trim()
        ));
    }
    let review: Value =
        serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let text = |pointer: &str| review.pointer(pointer).and_then(Value::as_str);
    if text("/apiVersion") != Some("admission.k8s.io/v1")
        || text("/kind") != Some("AdmissionReview")
    {
        return Err(format!(
            "answer is not an admission.k8s.io/v1 AdmissionReview (apiVersion {:?}, kind {:?})",
            text("/apiVersion").unwrap_or(""),
            text("/kind").unwrap_or("")
        ));
    }
    let uid = text("/response/uid").unwrap_or("");
    if uid != probe.uid {
        return Err(format!(
            "response.uid {uid:?} is not the request's {:?}",
            probe.uid
        ));
    }
    let allowed = review.pointer("/response/allowed").and_then(Value::as_bool);
    let message = text("/response/status/message").unwrap_or("");
    let patch = review.pointer("/response/patch");
    let summary = match (probe.expect, allowed) {
        (_, None) => return Err("response.allowed is missing or not a boolean".to_owned()),
        (Expect::AllowedUnchanged | Expect::AllowedPatched, Some(false)) => {
            return Err(format!("denied: {message}"));
        }
        (Expect::Denied(_), Some(true)) => {
            return Err("allowed, expected a denial".to_owned());
        }
        (Expect::Denied(needle), Some(false)) => {
            if !message.contains(needle) {
                return Err(format!(
                    "denied, but response.status.message does not mention {needle:?}: {message:?}"
                ));
            }
            if patch.is_some() {
                return Err("denied with a patch".to_owned());
            }
            format!("denied as expected ({needle})")
        }
        (Expect::AllowedUnchanged, Some(true)) => match patch {
            None => "allowed, no patch".to_owned(),
            Some(patch) => {
                let ops = decode_patch(patch, text("/response/patchType"))?;
                return Err(format!(
                    "allowed with an unexpected patch of {ops} operations"
                ));
            }
        },
        (Expect::AllowedPatched, Some(true)) => match patch {
            None => return Err(
                "allowed without a patch; expected one (does the app list spec.pythonPackages?)"
                    .to_owned(),
            ),
            Some(patch) => {
                let ops = decode_patch(patch, text("/response/patchType"))?;
                format!("allowed with a JSON patch of {ops} operations")
            }
        },
    };
    if elapsed > max_response_time {
        return Err(format!(
            "{summary}, but in {} ms, over the limit of {} ms",
            elapsed.as_millis(),
            max_response_time.as_millis()
        ));
    }
    Ok(format!("{summary} in {} ms", elapsed.as_millis()))
}

/// Decodes `response.patch`: base64 of a non-empty RFC 6902 array, with `patchType: JSONPatch`.
/// Returns the number of operations.
fn decode_patch(patch: &Value, patch_type: Option<&str>) -> Result<usize, String> {
    if patch_type != Some("JSONPatch") {
        return Err(format!(
            "response.patchType is {:?}, expected \"JSONPatch\"",
            patch_type.unwrap_or("")
        ));
    }
    let encoded = patch
        .as_str()
        .ok_or_else(|| "response.patch is not a string".to_owned())?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("response.patch is not base64: {e}"))?;
    let operations: json_patch::Patch = serde_json::from_slice(&bytes)
        .map_err(|e| format!("response.patch is not an RFC 6902 JSON patch: {e}"))?;
    if operations.0.is_empty() {
        return Err("response.patch is an empty JSON patch".to_owned());
    }
    Ok(operations.0.len())
}

/// Reads the CA file into a client configuration.
pub fn client_config(
    ca_file: &std::path::Path,
) -> Result<Arc<rustls::ClientConfig>, SelfTestError> {
    let bad = |reason: String| SelfTestError::CaFile {
        path: ca_file.display().to_string(),
        reason,
    };
    let pem = std::fs::read(ca_file).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no PEM certificate".to_owned()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(format!("no TLS version available: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Runs every check against the webhook, one after the other, on a runtime of its own.
pub fn run_blocking(options: &SelfTestOptions) -> Result<Report, SelfTestError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SelfTestError::Runtime(e.to_string()))?;
    runtime.block_on(run(options))
}

/// Runs every check against the webhook, one after the other.
pub async fn run(options: &SelfTestOptions) -> Result<Report, SelfTestError> {
    check_options(options)?;
    let config = client_config(&options.ca_file)?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut report = Report::default();
    for probe in probes(
        &options.namespace,
        options.app.as_deref(),
        &format!("{nonce:x}"),
    ) {
        let started = Instant::now();
        let answer = tokio::time::timeout(
            options.timeout,
            post(&options.url, probe.path, &probe.review, Arc::clone(&config)),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {} ms (--timeout)",
                options.timeout.as_millis()
            ))
        });
        let elapsed = started.elapsed();
        let result = answer.and_then(|(status, body)| {
            check_answer(&probe, status, &body, elapsed, options.max_response_time)
        });
        report.checks.push(match result {
            Ok(detail) => CheckResult {
                name: probe.name,
                passed: true,
                detail,
            },
            Err(detail) => CheckResult {
                name: probe.name,
                passed: false,
                detail,
            },
        });
    }
    Ok(report)
}

/// One POST on a new TLS connection: (status, body).
async fn post(
    base: &url::Url,
    path: &str,
    review: &Value,
    config: Arc<rustls::ClientConfig>,
) -> Result<(u16, Bytes), String> {
    let host = base.host_str().unwrap_or_default();
    // The host as a TLS name and a socket address: IPv6 literals lose their brackets.
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let port = base.port_or_known_default().unwrap_or(443);
    let server_name = ServerName::try_from(bare_host.to_owned())
        .map_err(|e| format!("host {bare_host:?} is not a valid TLS server name: {e}"))?;
    let tcp = tokio::net::TcpStream::connect((bare_host, port))
        .await
        .map_err(|e| format!("cannot connect to {bare_host}:{port}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {bare_host}:{port} failed: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let driver = tokio::spawn(connection);
    let full_path = format!("{}{path}", base.path().trim_end_matches('/'));
    let authority = match base.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let request = hyper::Request::post(full_path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::from(review.to_string())))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the answer failed: {e}"))?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}

#[cfg(test)]
mod tests;
