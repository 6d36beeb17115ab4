//! The AdmissionReview envelope (`admission.k8s.io/v1`): the only module that knows its shape.
//!
//! The server parses a body with [`parse_review`], asks [`required_app`] which KasprApp it needs,
//! looks that app up (cache, API server or files), and hands the result to [`decide`]. The
//! answer is serialized with [`Decision::to_review_bytes`]. Everything here is synchronous.
//!
//! kube's `AdmissionReview<DynamicObject>` / `AdmissionResponse` types are not used: they
//! parse the request strictly into typed metadata plus a copy of the object, and serialize the
//! patch through serde's string escaping. Reading the envelope leniently, moving the object out
//! of the parsed body and writing the patch's base64 straight into the answer took a full
//! StatefulSet review from 138.6 to 101.1 µs (BENCHMARKS.md); a malformed envelope still
//! gets a 400 that names what is missing.

mod answers;
mod read;

use std::sync::{Arc, OnceLock};

use serde_json::value::RawValue;
use serde_json::{Value, json};

pub use answers::{AnswerCache, CacheStats};
use read::Keep;

use crate::app::{self, AppLookup, AppRef};
use crate::config::RenderConfig;
use crate::mutation::{self, Denial, ObjectKind};
use crate::validation::{self, Ratchet, Report};

/// Which webhook path a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Mutate,
    Validate,
}

/// The parts of an AdmissionRequest this product uses.
///
/// The object and the oldObject are kept as text and parsed when a decision first asks for
/// them ([`AdmissionRequest::object`]): an object that is not ours, or whose answer is cached,
/// is never parsed. What tells whether it is ours is read at once, into a small view.
#[derive(Debug, Clone)]
pub struct AdmissionRequest {
    pub uid: String,
    pub group: String,
    pub version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub operation: String,
    pub dry_run: bool,
    /// The object's JSON text, when it is a JSON object.
    object_json: Option<Box<RawValue>>,
    /// The oldObject's JSON text (the object before an UPDATE), when it is a JSON object.
    old_object_json: Option<Box<RawValue>>,
    /// Of the object: `metadata` (only `name`, `generateName`, `namespace`, `labels`,
    /// `annotations` and `ownerReferences`) and, for a StatefulSet without a KasprApp owner,
    /// `spec.template.metadata.labels`; `null` without an object.
    view: Value,
    /// The object's `spec`, unparsed.
    spec_json: Option<Box<RawValue>>,
    object: OnceLock<Result<Option<Value>, String>>,
    old_object: OnceLock<Result<Option<Value>, String>>,
}

impl AdmissionRequest {
    /// The object, parsed on first use; `Ok(None)` when the request has none (or it is not a
    /// JSON object), an error when it is too deeply nested or holds a number out of range.
    pub fn object(&self) -> Result<Option<&Value>, &str> {
        parsed(&self.object, self.object_json.as_deref())
    }

    /// The oldObject, like [`AdmissionRequest::object`].
    pub fn old_object(&self) -> Result<Option<&Value>, &str> {
        parsed(&self.old_object, self.old_object_json.as_deref())
    }

    /// The object's JSON text as it came, when it is a JSON object.
    pub fn object_text(&self) -> Option<&str> {
        self.object_json.as_deref().map(RawValue::get)
    }
}

fn parsed<'a>(
    cell: &'a OnceLock<Result<Option<Value>, String>>,
    text: Option<&RawValue>,
) -> Result<Option<&'a Value>, &'a str> {
    let parsed = cell.get_or_init(|| match text {
        None => Ok(None),
        Some(text) => serde_json::from_str(text.get())
            .map(Some)
            .map_err(|e| e.to_string()),
    });
    match parsed {
        Ok(value) => Ok(value.as_ref()),
        Err(e) => Err(e.as_str()),
    }
}

/// A serialized RFC 6902 patch and its base64, the form the answer carries. Shared: a cached
/// answer hands the same bytes to every request it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPatch(Arc<PatchForms>);

#[derive(Debug, PartialEq, Eq)]
struct PatchForms {
    json: Vec<u8>,
    base64: String,
}

impl EncodedPatch {
    pub fn new(json: Vec<u8>) -> Self {
        use base64::Engine as _;
        let base64 = base64::engine::general_purpose::STANDARD.encode(&json);
        EncodedPatch(Arc::new(PatchForms { json, base64 }))
    }

    /// The patch's JSON.
    pub fn json(&self) -> &[u8] {
        &self.0.json
    }

    /// The patch's JSON in standard base64 with padding (`response.patch`).
    pub fn base64(&self) -> &str {
        &self.0.base64
    }
}

/// An unreadable AdmissionReview: answered with HTTP 400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("request body is not JSON: {0}")]
    NotJson(String),
    #[error("request body is not an AdmissionReview: {0}")]
    NotAReview(String),
}

/// What kind of answer a request got, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A non-empty patch was returned.
    Patched,
    /// Allowed without a patch.
    Unchanged,
    /// Not one of ours (no owning KasprApp, wrong kind, app not found).
    Ignored,
    /// Denied by a rule (invalid spec, name collision).
    Denied,
    /// Denied because the KasprApp could not be read.
    Unavailable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Patched => "patched",
            Outcome::Unchanged => "unchanged",
            Outcome::Ignored => "ignored",
            Outcome::Denied => "denied",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// The answer to one AdmissionRequest.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub uid: String,
    pub allowed: bool,
    pub message: Option<String>,
    pub warnings: Vec<String>,
    /// The RFC 6902 patch, serialized, when it is not empty.
    pub patch: Option<EncodedPatch>,
    pub outcome: Outcome,
}

impl Decision {
    fn allow(uid: &str, outcome: Outcome) -> Self {
        Decision {
            uid: uid.to_owned(),
            allowed: true,
            message: None,
            warnings: Vec::new(),
            patch: None,
            outcome,
        }
    }

    fn deny(uid: &str, outcome: Outcome, message: String, warnings: Vec<String>) -> Self {
        Decision {
            uid: uid.to_owned(),
            allowed: false,
            message: Some(message),
            warnings,
            patch: None,
            outcome,
        }
    }

    /// The AdmissionReview answer, as JSON.
    pub fn to_review(&self) -> Value {
        let mut review = self.envelope();
        if let Some(patch) = &self.patch {
            review["response"]["patch"] = json!(patch.base64());
        }
        review
    }

    /// The AdmissionReview answer, serialized: the JSON of [`Decision::to_review`], byte for
    /// byte. The patch's base64 (tens of kilobytes, most of it the installer) is copied straight
    /// into the output: base64 never needs JSON escaping, and serde_json's escaping pass, which
    /// looks at every byte, was a fifth of the cost of a mutating review.
    pub fn to_review_bytes(&self) -> serde_json::Result<Vec<u8>> {
        let mut out = serde_json::to_vec(&self.envelope())?;
        let Some(patch) = &self.patch else {
            return Ok(out);
        };
        // The envelope ends with the response object and then itself: `…}}`. The response
        // always has `uid` and `allowed`, so the patch follows a comma.
        debug_assert!(out.ends_with(b"}}"));
        out.truncate(out.len() - 2);
        out.reserve(patch.base64().len() + 16);
        out.extend_from_slice(b",\"patch\":\"");
        out.extend_from_slice(patch.base64().as_bytes());
        out.extend_from_slice(b"\"}}");
        Ok(out)
    }

    /// The answer without the patch's bytes (but with its `patchType`).
    fn envelope(&self) -> Value {
        let mut response = json!({ "uid": self.uid, "allowed": self.allowed });
        if let Some(message) = &self.message {
            // 403 tells kubectl this is a rule failure, not a webhook fault.
            response["status"] = json!({ "code": 403, "reason": "Forbidden", "message": message });
        }
        if !self.warnings.is_empty() {
            response["warnings"] = json!(self.warnings);
        }
        if self.patch.is_some() {
            response["patchType"] = json!("JSONPatch");
        }
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        })
    }

    /// Size of the patch in bytes (0 when there is none).
    pub fn patch_len(&self) -> usize {
        self.patch.as_ref().map_or(0, |p| p.json().len())
    }
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// What [`parse_review`] reads of a body; the object and oldObject are kept as text.
const ENVELOPE: Keep = Keep::Keys(&[
    ("kind", Keep::Value),
    (
        "request",
        Keep::Keys(&[
            ("uid", Keep::Value),
            ("kind", Keep::Value),
            ("namespace", Keep::Value),
            ("name", Keep::Value),
            ("operation", Keep::Value),
            ("dryRun", Keep::Value),
            ("object", Keep::Raw(0)),
            ("oldObject", Keep::Raw(1)),
        ]),
    ),
]);

/// What the decision reads of an object before it needs the whole of it.
const OBJECT_VIEW: Keep = Keep::Keys(&[
    (
        "metadata",
        Keep::Keys(&[
            ("name", Keep::Value),
            ("generateName", Keep::Value),
            ("namespace", Keep::Value),
            ("labels", Keep::Value),
            ("annotations", Keep::Value),
            ("ownerReferences", Keep::Value),
        ]),
    ),
    ("spec", Keep::Raw(0)),
]);

/// A StatefulSet's template labels, read from its `spec`.
const TEMPLATE_LABELS: Keep = Keep::Keys(&[(
    "template",
    Keep::Keys(&[("metadata", Keep::Keys(&[("labels", Keep::Value)]))]),
)]);

/// Parses an AdmissionReview body. Any JSON object with a `request.uid` is accepted; the
/// remaining fields are read leniently and checked by [`decide`]. Only the envelope and what
/// tells whether the object is ours are built; the object itself is parsed when a decision
/// needs it.
pub fn parse_review(body: &[u8]) -> Result<AdmissionRequest, ReviewError> {
    let not_json = |e: serde_json::Error| ReviewError::NotJson(e.to_string());
    let mut raws = [None, None];
    let review = read::read(body, ENVELOPE, &mut raws).map_err(not_json)?;
    if review.get("kind").and_then(Value::as_str) != Some("AdmissionReview") {
        return Err(ReviewError::NotAReview(
            "kind is not AdmissionReview".into(),
        ));
    }
    let [object_json, old_object_json] = raws.map(|raw| raw.filter(|r| r.get().starts_with('{')));
    let request = review
        .get("request")
        .filter(|r| r.is_object())
        .ok_or_else(|| ReviewError::NotAReview("missing request".into()))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ReviewError::NotAReview("missing request.uid".into()))?;
    let (view, spec_json) = match &object_json {
        Some(object) => object_view(object).map_err(not_json)?,
        None => (Value::Null, None),
    };
    let name = match str_at(request, "/name") {
        "" => match str_at(&view, "/metadata/name") {
            "" => str_at(&view, "/metadata/generateName"),
            name => name,
        }
        .to_owned(),
        name => name.to_owned(),
    };
    Ok(AdmissionRequest {
        uid: uid.to_owned(),
        group: str_at(request, "/kind/group").to_owned(),
        version: str_at(request, "/kind/version").to_owned(),
        kind: str_at(request, "/kind/kind").to_owned(),
        namespace: str_at(request, "/namespace").to_owned(),
        name,
        operation: str_at(request, "/operation").to_owned(),
        dry_run: request
            .get("dryRun")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        object_json,
        old_object_json,
        view,
        spec_json,
        object: OnceLock::new(),
        old_object: OnceLock::new(),
    })
}

/// The object's view (see [`AdmissionRequest`]) and its `spec`, unparsed.
fn object_view(object: &RawValue) -> serde_json::Result<(Value, Option<Box<RawValue>>)> {
    let mut raws = [None];
    let mut view = read::read(object.get().as_bytes(), OBJECT_VIEW, &mut raws)?;
    let [spec] = raws;
    if let (None, Some(spec)) = (app::owning_app(&view), &spec) {
        let labels = read::read(spec.get().as_bytes(), TEMPLATE_LABELS, &mut [])?;
        if let Some(view) = view.as_object_mut() {
            view.insert("spec".to_owned(), labels);
        }
    }
    Ok((view, spec))
}

/// What a request is, as far as this product is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    StatefulSet,
    Pod,
    KasprApp,
    Other,
}

fn target(endpoint: Endpoint, request: &AdmissionRequest) -> Target {
    let op = request.operation.as_str();
    match (endpoint, request.group.as_str(), request.kind.as_str()) {
        (Endpoint::Mutate, "apps", "StatefulSet") if op == "CREATE" || op == "UPDATE" => {
            Target::StatefulSet
        }
        (Endpoint::Mutate, "", "Pod") if op == "CREATE" => Target::Pod,
        (Endpoint::Validate, "kaspr.io", "KasprApp") if op == "CREATE" || op == "UPDATE" => {
            Target::KasprApp
        }
        _ => Target::Other,
    }
}

/// The KasprApp a request needs, if any.
pub fn required_app(endpoint: Endpoint, request: &AdmissionRequest) -> Option<AppRef> {
    request.object_json.as_ref()?;
    let view = &request.view;
    let name = match target(endpoint, request) {
        Target::StatefulSet => app::statefulset_app(view)?,
        Target::Pod => app::pod_app(view)?,
        Target::KasprApp | Target::Other => return None,
    };
    let namespace = match str_at(view, "/metadata/namespace") {
        "" => request.namespace.clone(),
        ns => ns.to_owned(),
    };
    Some(AppRef { namespace, name })
}

/// Decides a request. `app` is the lookup result for [`required_app`] (ignored when no app is
/// needed).
pub fn decide(
    endpoint: Endpoint,
    request: &AdmissionRequest,
    app: Option<&AppLookup>,
    config: &RenderConfig,
) -> Decision {
    decide_with(endpoint, request, app, config, None)
}

/// [`decide`], answering a StatefulSet or Pod from `answers` when the same mutation was
/// answered before (see [`AnswerCache`]), and keeping what it computes there.
pub fn decide_cached(
    endpoint: Endpoint,
    request: &AdmissionRequest,
    app: Option<&AppLookup>,
    config: &RenderConfig,
    answers: &AnswerCache,
) -> Decision {
    decide_with(endpoint, request, app, config, Some(answers))
}

/// The denial of an object that is ours but cannot be read whole.
fn unreadable(uid: &str, field: &str, error: &str) -> Decision {
    Decision::deny(
        uid,
        Outcome::Denied,
        format!("kaspr-packages-webhook cannot read {field}: {error}"),
        Vec::new(),
    )
}

fn decide_with(
    endpoint: Endpoint,
    request: &AdmissionRequest,
    app: Option<&AppLookup>,
    config: &RenderConfig,
    answers: Option<&AnswerCache>,
) -> Decision {
    let uid = request.uid.as_str();
    if request.object_json.is_none() {
        return Decision::allow(uid, Outcome::Ignored);
    }
    match target(endpoint, request) {
        Target::Other => Decision::allow(uid, Outcome::Ignored),
        Target::KasprApp => {
            let object = match request.object() {
                Ok(Some(object)) => object,
                Ok(None) => return Decision::allow(uid, Outcome::Ignored),
                Err(e) => return unreadable(uid, "request.object", e),
            };
            let old_object = match request.old_object() {
                Ok(old) => old,
                Err(e) => return unreadable(uid, "request.oldObject", e),
            };
            let mut report = validation::validate_kasprapp(object);
            let ratcheted = match (request.operation.as_str(), old_object) {
                ("UPDATE", Some(old)) => validation::ratchet(&mut report, old, object),
                _ => Ratchet::Nothing,
            };
            if report.errors.is_empty() {
                let mut decision = Decision::allow(uid, Outcome::Unchanged);
                decision.warnings = report.warning_lines();
                match ratcheted {
                    Ratchet::Nothing | Ratchet::Deleting => {}
                    Ratchet::Unchanged(errors) => decision.warnings.extend(errors.into_iter().map(
                        |e| format!("{e} (unchanged by this update, so allowed; fix it before changing this field)"),
                    )),
                }
                decision
            } else {
                Decision::deny(
                    uid,
                    Outcome::Denied,
                    report.error_message(&format!("KasprApp {}", request.name)),
                    report.warning_lines(),
                )
            }
        }
        Target::StatefulSet | Target::Pod => {
            let app_name = required_app(endpoint, request)
                .map(|a| a.name)
                .unwrap_or_default();
            match app {
                None | Some(AppLookup::NotFound) => Decision::allow(uid, Outcome::Ignored),
                Some(AppLookup::Unavailable(reason)) => Decision::deny(
                    uid,
                    Outcome::Unavailable,
                    format!(
                        "kaspr-packages-webhook could not read KasprApp {}/{app_name} ({reason}); \
                         refusing to start its pods without their Python packages",
                        request.namespace
                    ),
                    Vec::new(),
                ),
                Some(AppLookup::Found(kasprapp)) => {
                    let is_pod = target(endpoint, request) == Target::Pod;
                    let Some(answers) = answers else {
                        return mutate_request(request, kasprapp, is_pod, config);
                    };
                    let key = answers::Key::of(request, kasprapp, is_pod);
                    if let Some(answer) = key.as_ref().and_then(|k| answers.get(k, config)) {
                        return answer.for_uid(uid);
                    }
                    let decision = mutate_request(request, kasprapp, is_pod, config);
                    if let Some(key) = key {
                        answers.insert(key, config, &decision);
                    }
                    decision
                }
            }
        }
    }
}

/// The mutation of a StatefulSet or Pod request whose app was found.
fn mutate_request(
    request: &AdmissionRequest,
    kasprapp: &Value,
    is_pod: bool,
    config: &RenderConfig,
) -> Decision {
    let uid = request.uid.as_str();
    let object = match request.object() {
        Ok(Some(object)) => object,
        Ok(None) => return Decision::allow(uid, Outcome::Ignored),
        Err(e) => return unreadable(uid, "request.object", e),
    };
    // An UPDATE keeps the revision the StatefulSet was rendered with.
    let previous = match (is_pod, request.operation.as_str()) {
        (false, "UPDATE") => match request.old_object() {
            Ok(old) => old,
            Err(e) => return unreadable(uid, "request.oldObject", e),
        },
        _ => None,
    };
    mutate(uid, object, previous, kasprapp, is_pod, config)
}

fn mutate(
    uid: &str,
    object: &Value,
    previous: Option<&Value>,
    kasprapp: &Value,
    is_pod: bool,
    config: &RenderConfig,
) -> Decision {
    let kind = if is_pod {
        ObjectKind::Pod
    } else {
        ObjectKind::StatefulSet
    };
    let outcome = mutate_update(kind, object, previous, kasprapp, config).and_then(|outcome| {
        let patch = if outcome.patch.0.is_empty() {
            None
        } else {
            // Never allow without the injection: a patch we cannot serialize is a denial.
            Some(
                crate::patch::to_vec_splicing(
                    &outcome.patch,
                    &[crate::installer::bootstrap_preserialized()],
                )
                .map(EncodedPatch::new)
                .map_err(|e| Denial {
                    message: format!("kaspr-packages-webhook could not serialize its patch: {e}"),
                    warnings: outcome.warnings.clone(),
                })?,
            )
        };
        Ok((patch, outcome.warnings))
    });
    match outcome {
        Ok((patch, warnings)) => {
            let mut decision = Decision::allow(uid, Outcome::Unchanged);
            decision.warnings = warnings;
            if patch.is_some() {
                decision.patch = patch;
                decision.outcome = Outcome::Patched;
            }
            decision
        }
        Err(denial) => Decision::deny(uid, Outcome::Denied, denial.message, denial.warnings),
    }
}

/// A successful mutation.
#[derive(Debug, Clone, PartialEq)]
pub struct MutationOutcome {
    pub patch: json_patch::Patch,
    pub warnings: Vec<String>,
}

/// The mutation of one object for `kasprapp`: validate, then render, then diff.
pub fn mutate_object(
    kind: ObjectKind,
    object: &Value,
    kasprapp: &Value,
    config: &RenderConfig,
) -> Result<MutationOutcome, Denial> {
    mutate_update(kind, object, None, kasprapp, config)
}

/// [`mutate_object`] for an UPDATE of `previous` (the oldObject): an injection of the same app
/// configuration by another rendering revision is kept, unless the StatefulSet is marked to
/// move to this revision (see docs/revisions.md).
pub fn mutate_update(
    kind: ObjectKind,
    object: &Value,
    previous: Option<&Value>,
    kasprapp: &Value,
    config: &RenderConfig,
) -> Result<MutationOutcome, Denial> {
    if kind == ObjectKind::Pod && mutation::pod_already_injected(object) {
        return Ok(MutationOutcome {
            patch: json_patch::Patch(Vec::new()),
            warnings: Vec::new(),
        });
    }
    let report = validation::validate_kasprapp(kasprapp);
    let app = kasprapp_ref(kasprapp, object);
    if !report.errors.is_empty() {
        return Err(Denial {
            message: report.error_message(&format!("KasprApp {app}")),
            warnings: report.warning_lines(),
        });
    }
    let set = match (
        report.spec.as_ref(),
        object.pointer(kind.template_pointer()),
    ) {
        (Some(spec), Some(template)) => {
            crate::builds::render::set_for(kasprapp, template, spec, &app)
        }
        _ => None,
    };
    // Marked by the controller to move to this revision: render it, keep nothing.
    let marked = kind == ObjectKind::StatefulSet
        && mutation::revision::marked_for(object, &config.revision());
    let previous = previous
        .filter(|_| !marked)
        .and_then(|p| p.pointer(kind.template_pointer()));
    let outcome =
        mutate_validated_keeping(kind, object, previous, &report, &app, config, set.as_ref());
    match crate::builds::image::without_builds_warning(
        kasprapp,
        set.as_ref(),
        report.spec.is_some(),
    ) {
        Some(warning) => outcome.map(|mut o| {
            o.warnings.push(warning);
            o
        }),
        None => outcome,
    }
}

/// The namespace and name of `kasprapp`; the object's namespace when the app names none.
pub fn kasprapp_ref(kasprapp: &Value, object: &Value) -> AppRef {
    let object_namespace = str_at(object, "/metadata/namespace");
    AppRef::of_object(kasprapp, object_namespace)
}

/// Render and diff for an app whose validation `report` has no errors.
pub fn mutate_validated(
    kind: ObjectKind,
    object: &Value,
    report: &Report,
    app: &AppRef,
    config: &RenderConfig,
) -> Result<MutationOutcome, Denial> {
    mutate_validated_set(kind, object, report, app, config, None)
}

/// [`mutate_validated`], with the pods restoring package `set` (builds on).
pub fn mutate_validated_set(
    kind: ObjectKind,
    object: &Value,
    report: &Report,
    app: &AppRef,
    config: &RenderConfig,
    set: Option<&crate::builds::render::PackageSet>,
) -> Result<MutationOutcome, Denial> {
    mutate_validated_keeping(kind, object, None, report, app, config, set)
}

/// [`mutate_validated_set`], keeping the injection of `previous_template` when it is of the
/// same app configuration (see [`mutation::apply_keeping`]).
fn mutate_validated_keeping(
    kind: ObjectKind,
    object: &Value,
    previous_template: Option<&Value>,
    report: &Report,
    app: &AppRef,
    config: &RenderConfig,
    set: Option<&crate::builds::render::PackageSet>,
) -> Result<MutationOutcome, Denial> {
    let pointer = kind.template_pointer();
    let injected_pod = kind == ObjectKind::Pod && mutation::pod_already_injected(object);
    let (Some(original), false) = (object.pointer(pointer), injected_pod) else {
        return Ok(MutationOutcome {
            patch: json_patch::Patch(Vec::new()),
            warnings: Vec::new(),
        });
    };
    let mut template = original.clone();
    let mut warnings = report.warning_lines();
    match mutation::apply_keeping(
        &mut template,
        previous_template,
        report.spec.as_ref(),
        app,
        kind.field_prefix(),
        config,
        set,
    ) {
        Ok(applied) => warnings.extend(applied),
        Err(mut denial) => {
            denial.warnings = warnings;
            return Err(denial);
        }
    }
    Ok(MutationOutcome {
        patch: crate::patch::diff_at(pointer, original, &template),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn decision(message: Option<&str>, warnings: &[&str], patch: Option<&[u8]>) -> Decision {
        Decision {
            uid: "705ab4f5-6393-11e8-b7cc-42010a800002".to_owned(),
            allowed: message.is_none(),
            message: message.map(str::to_owned),
            warnings: warnings.iter().map(|w| (*w).to_owned()).collect(),
            patch: patch.map(|p| EncodedPatch::new(p.to_vec())),
            outcome: Outcome::Patched,
        }
    }

    #[rstest]
    #[case::allowed_without_patch(decision(None, &[], None))]
    #[case::denied_with_quotes_to_escape(decision(Some("bad \"spec\"\n"), &["w"], None))]
    #[case::patched(decision(None, &[], Some(br#"[{"op":"add","path":"/a","value":"\u00e9"}]"#)))]
    #[case::patched_with_warnings(decision(None, &["a", "b"], Some(b"[]")))]
    #[case::base64_without_padding(decision(None, &[], Some(b"[1]")))]
    #[case::base64_with_two_pads(decision(None, &[], Some(b"[12]")))]
    #[case::base64_with_one_pad(decision(None, &[], Some(b"[123]")))]
    fn serialized_answer_is_the_json_of_the_review(#[case] decision: Decision) {
        let bytes = decision.to_review_bytes().expect("serializes");
        assert_eq!(
            bytes,
            serde_json::to_vec(&decision.to_review()).expect("json")
        );
        let parsed: Value = serde_json::from_slice(&bytes).expect("valid JSON");
        assert_eq!(parsed, decision.to_review());
    }

    fn kasprapp_review(operation: &str, old: Option<Value>, new: &Value) -> AdmissionRequest {
        let mut review = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"group": "kaspr.io", "version": "v1alpha1", "kind": "KasprApp"},
                        "namespace": "apps", "name": "demo", "operation": operation, "object": new}
        });
        if let Some(old) = old {
            review["request"]["oldObject"] = old;
        }
        parse_review(&serde_json::to_vec(&review).expect("json")).expect("review")
    }

    fn invalid_app() -> Value {
        json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
               "metadata": {"name": "demo", "namespace": "apps", "finalizers": ["kaspr.io/cleanup"]},
               "spec": {"pythonPackages": {"packages": ["requests; rm -rf /"]}}})
    }

    fn validate(request: &AdmissionRequest) -> Decision {
        decide(Endpoint::Validate, request, None, &RenderConfig::default())
    }

    #[test]
    fn an_invalid_app_can_still_lose_its_finalizer() {
        let old = invalid_app();
        let mut new = old.clone();
        new["metadata"]["finalizers"] = json!([]);
        let decision = validate(&kasprapp_review("UPDATE", Some(old.clone()), &new));
        assert!(decision.allowed, "{:?}", decision.message);
        assert!(
            decision.warnings.iter().any(|w| w.starts_with(
                "spec.pythonPackages.packages[0]: \"requests; rm -rf /\" is not a valid requirement"
            ) && w.contains("unchanged by this update")),
            "{:?}",
            decision.warnings
        );
        // Being deleted: even a changed invalid spec goes through.
        new["metadata"]["deletionTimestamp"] = json!("2026-12-02T08:00:00Z");
        new["spec"]["pythonPackages"]["packages"] = json!(["--also-invalid"]);
        assert!(validate(&kasprapp_review("UPDATE", Some(old), &new)).allowed);
    }

    #[test]
    fn new_or_changed_invalid_values_are_still_denied() {
        let old = invalid_app();
        let mut new = old.clone();
        new["spec"]["pythonPackages"]["packages"] = json!(["requests; rm -rf /", "-e ."]);
        let decision = validate(&kasprapp_review("UPDATE", Some(old), &new));
        assert!(!decision.allowed);
        let message = decision.message.expect("message");
        assert!(message.contains("packages[1]"), "{message}");
        assert!(!message.contains("packages[0]"), "{message}");
        // A CREATE, and an UPDATE from a valid object, get every error.
        assert!(!validate(&kasprapp_review("CREATE", None, &invalid_app())).allowed);
        let mut valid = invalid_app();
        valid["spec"]["pythonPackages"]["packages"] = json!(["requests==2.31.0"]);
        assert!(!validate(&kasprapp_review("UPDATE", Some(valid), &invalid_app())).allowed);
    }

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/admission/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json")
    }

    /// What a request needed before the envelope was read alone: the whole body parsed, the
    /// app named from the whole object.
    fn app_from_the_whole_body(endpoint: Endpoint, body: &Value) -> Option<AppRef> {
        let request = &body["request"];
        let object = request.get("object").filter(|o| o.is_object())?;
        let op = str_at(request, "/operation");
        let name = match (
            endpoint,
            str_at(request, "/kind/group"),
            str_at(request, "/kind/kind"),
        ) {
            (Endpoint::Mutate, "apps", "StatefulSet") if op == "CREATE" || op == "UPDATE" => {
                app::statefulset_app(object)?
            }
            (Endpoint::Mutate, "", "Pod") if op == "CREATE" => app::pod_app(object)?,
            _ => return None,
        };
        let namespace = match str_at(object, "/metadata/namespace") {
            "" => str_at(request, "/namespace").to_owned(),
            ns => ns.to_owned(),
        };
        Some(AppRef { namespace, name })
    }

    fn with(mut body: Value, pointer: &str, value: Option<Value>) -> Value {
        let (parent, key) = pointer.rsplit_once('/').expect("pointer");
        let slot = body.pointer_mut(parent).expect("parent");
        match (value, slot.as_object_mut()) {
            (Some(value), Some(map)) => {
                map.insert(key.to_owned(), value);
            }
            (None, Some(map)) => {
                map.shift_remove(key);
            }
            _ => panic!("{parent} is not an object"),
        }
        body
    }

    #[rstest]
    #[case::statefulset_by_labels("emptydir-statefulset-create", "", None)]
    #[case::pod_by_labels("emptydir-pod-create", "", None)]
    #[case::takeover("operator-takeover-statefulset-create", "", None)]
    #[case::unrelated("unrelated-statefulset-create", "", None)]
    #[case::kasprapp("kasprapp-update-valid", "", None)]
    #[case::owner_reference(
        "unrelated-statefulset-create",
        "/request/object/metadata/ownerReferences",
        Some(json!([{"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": "owner"}]))
    )]
    #[case::owner_of_another_group(
        "emptydir-statefulset-create",
        "/request/object/metadata/ownerReferences",
        Some(json!([{"apiVersion": "example.com/v1", "kind": "KasprApp", "name": "owner"}]))
    )]
    #[case::owner_references_not_a_list(
        "emptydir-statefulset-create",
        "/request/object/metadata/ownerReferences",
        Some(json!({"kind": "KasprApp"}))
    )]
    #[case::template_labels_removed(
        "emptydir-statefulset-create",
        "/request/object/spec/template/metadata/labels",
        None
    )]
    #[case::template_labels_not_an_object(
        "emptydir-statefulset-create",
        "/request/object/spec/template/metadata/labels",
        Some(json!(["kaspr.io/kind"]))
    )]
    #[case::spec_not_an_object("emptydir-statefulset-create", "/request/object/spec", Some(json!("x")))]
    #[case::pod_labels_removed("emptydir-pod-create", "/request/object/metadata/labels", None)]
    #[case::pod_by_instance_label(
        "emptydir-pod-create",
        "/request/object/metadata/labels",
        Some(json!({"kaspr.io/kind": "KasprApp", "app.kubernetes.io/instance": "inst"}))
    )]
    #[case::metadata_not_an_object("emptydir-pod-create", "/request/object/metadata", Some(json!(7)))]
    #[case::namespace_in_the_object(
        "emptydir-pod-create",
        "/request/object/metadata/namespace",
        Some(json!("other"))
    )]
    #[case::namespace_not_a_string(
        "emptydir-pod-create",
        "/request/object/metadata/namespace",
        Some(json!(["other"]))
    )]
    #[case::object_not_an_object("emptydir-pod-create", "/request/object", Some(json!([1])))]
    #[case::no_object("emptydir-pod-create", "/request/object", None)]
    #[case::a_pod_update("emptydir-pod-create", "/request/operation", Some(json!("UPDATE")))]
    fn the_app_is_named_as_from_the_whole_object(
        #[case] name: &str,
        #[case] pointer: &str,
        #[case] value: Option<Value>,
    ) {
        let body = if pointer.is_empty() {
            fixture(name)
        } else {
            with(fixture(name), pointer, value)
        };
        let request = parse_review(&serde_json::to_vec(&body).expect("json")).expect("review");
        for endpoint in [Endpoint::Mutate, Endpoint::Validate] {
            assert_eq!(
                required_app(endpoint, &request),
                app_from_the_whole_body(endpoint, &body),
                "{endpoint:?}"
            );
        }
        let name_in_object = body
            .pointer("/request/object/metadata/name")
            .and_then(Value::as_str);
        if str_at(&body, "/request/name").is_empty() {
            assert_eq!(Some(request.name.as_str()), name_in_object);
        }
    }

    #[test]
    fn the_name_falls_back_to_the_objects_name_then_generate_name() {
        let body = with(fixture("emptydir-pod-create"), "/request/name", None);
        let parse = |body: &Value| {
            parse_review(&serde_json::to_vec(body).expect("json"))
                .expect("review")
                .name
        };
        assert_eq!(parse(&body), "my-app-app-0");
        let body = with(body, "/request/object/metadata/name", None);
        assert_eq!(parse(&body), "my-app-app-");
    }

    #[test]
    fn an_object_that_is_not_ours_is_never_parsed() {
        let body = serde_json::to_vec(&fixture("unrelated-statefulset-create")).expect("json");
        let request = parse_review(&body).expect("review");
        let lookup = required_app(Endpoint::Mutate, &request).map(|_| AppLookup::NotFound);
        let decision = decide(
            Endpoint::Mutate,
            &request,
            lookup.as_ref(),
            &RenderConfig::default(),
        );
        assert_eq!(decision.outcome, Outcome::Ignored);
        assert!(request.object.get().is_none() && request.old_object.get().is_none());
        // Asked for, it is there, whole.
        let full: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(request.object(), Ok(Some(&full["request"]["object"])));
    }

    #[test]
    fn an_object_of_ours_too_deep_to_read_is_denied_naming_it() {
        let mut body = fixture("emptydir-pod-create");
        let mut deep = json!(1);
        for _ in 0..200 {
            deep = json!([deep]);
        }
        body["request"]["object"]["spec"]["deep"] = deep;
        let request = parse_review(&serde_json::to_vec(&body).expect("json")).expect("review");
        let app = required_app(Endpoint::Mutate, &request).expect("ours");
        let found = AppLookup::Found(std::sync::Arc::new(
            json!({"metadata": {"name": app.name, "namespace": app.namespace}}),
        ));
        let decision = decide(
            Endpoint::Mutate,
            &request,
            Some(&found),
            &RenderConfig::default(),
        );
        assert!(!decision.allowed);
        let message = decision.message.expect("message");
        assert!(
            message.starts_with(
                "kaspr-packages-webhook cannot read request.object: recursion limit exceeded"
            ),
            "{message}"
        );
    }
}
