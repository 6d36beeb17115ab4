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

use serde_json::{Value, json};

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
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionRequest {
    pub uid: String,
    pub group: String,
    pub version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub operation: String,
    pub dry_run: bool,
    pub object: Option<Value>,
    /// The object before an UPDATE.
    pub old_object: Option<Value>,
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
    pub patch: Option<Vec<u8>>,
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
            use base64::Engine as _;
            review["response"]["patch"] =
                json!(base64::engine::general_purpose::STANDARD.encode(patch));
        }
        review
    }

    /// The AdmissionReview answer, serialized: the JSON of [`Decision::to_review`], byte for
    /// byte. The patch's base64 (tens of kilobytes, most of it the installer) is written straight
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
        out.extend_from_slice(b",\"patch\":\"");
        let start = out.len();
        let encoded_len = base64::encoded_len(patch.len(), true)
            .ok_or_else(|| serde_json::Error::io(std::io::Error::other("patch too large")))?;
        out.resize(start + encoded_len, 0);
        {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .encode_slice(patch, &mut out[start..])
                .map_err(|e| serde_json::Error::io(std::io::Error::other(e)))?;
        }
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
        self.patch.as_ref().map_or(0, Vec::len)
    }
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// Parses an AdmissionReview body. Any JSON object with a `request.uid` is accepted; the
/// remaining fields are read leniently and checked by [`decide`].
pub fn parse_review(body: &[u8]) -> Result<AdmissionRequest, ReviewError> {
    let mut review: Value =
        serde_json::from_slice(body).map_err(|e| ReviewError::NotJson(e.to_string()))?;
    if review.get("kind").and_then(Value::as_str) != Some("AdmissionReview") {
        return Err(ReviewError::NotAReview(
            "kind is not AdmissionReview".into(),
        ));
    }
    // Moved out, not cloned: the object is most of the body.
    let object = review
        .get_mut("request")
        .and_then(|r| r.get_mut("object"))
        .filter(|o| o.is_object())
        .map(Value::take);
    let old_object = review
        .get_mut("request")
        .and_then(|r| r.get_mut("oldObject"))
        .filter(|o| o.is_object())
        .map(Value::take);
    let request = review
        .get("request")
        .filter(|r| r.is_object())
        .ok_or_else(|| ReviewError::NotAReview("missing request".into()))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ReviewError::NotAReview("missing request.uid".into()))?;
    let name = match str_at(request, "/name") {
        "" => object
            .as_ref()
            .map(|o| {
                let name = str_at(o, "/metadata/name");
                if name.is_empty() {
                    str_at(o, "/metadata/generateName")
                } else {
                    name
                }
            })
            .unwrap_or("")
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
        object,
        old_object,
    })
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
    let object = request.object.as_ref()?;
    let name = match target(endpoint, request) {
        Target::StatefulSet => app::statefulset_app(object)?,
        Target::Pod => app::pod_app(object)?,
        Target::KasprApp | Target::Other => return None,
    };
    let namespace = match str_at(object, "/metadata/namespace") {
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
    let uid = request.uid.as_str();
    let Some(object) = request.object.as_ref() else {
        return Decision::allow(uid, Outcome::Ignored);
    };
    match target(endpoint, request) {
        Target::Other => Decision::allow(uid, Outcome::Ignored),
        Target::KasprApp => {
            let mut report = validation::validate_kasprapp(object);
            let ratcheted = match (request.operation.as_str(), &request.old_object) {
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
                    // An UPDATE keeps the revision the StatefulSet was rendered with.
                    let previous = match (is_pod, request.operation.as_str()) {
                        (false, "UPDATE") => request.old_object.as_ref(),
                        _ => None,
                    };
                    mutate(uid, object, previous, kasprapp, is_pod, config)
                }
            }
        }
    }
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
            patch: patch.map(<[u8]>::to_vec),
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
}
