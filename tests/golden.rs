//! Golden tests over AdmissionReview bodies kept under `tests/fixtures/admission/`, with the
//! KasprApps of `examples/`. Each answer is snapshotted (patch decoded to readable JSON, the
//! installer payload and hashes redacted so the snapshots read as the pod shape), and the
//! invariants are checked in code: uid echoed, the patch applies to the original, a second review
//! of the result gives no patch, unknown fields survive, operator rewrites give the same template.

mod example_apps;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use kaspr_packages_webhook::admission::{self, Endpoint};
use kaspr_packages_webhook::app::{AppLookup, AppRef};
use kaspr_packages_webhook::config::RenderConfig;
use serde_json::{Value, json};

use example_apps::{kasprapps, root};

struct Answer {
    review: Value,
    patch: Option<json_patch::Patch>,
    object: Option<Value>,
}

fn answer(endpoint: Endpoint, body: &[u8], apps: &BTreeMap<AppRef, Arc<Value>>) -> Answer {
    let request = admission::parse_review(body).expect("a readable review");
    let lookup = admission::required_app(endpoint, &request).map(|app| match apps.get(&app) {
        Some(found) => AppLookup::Found(found.clone()),
        None => AppLookup::NotFound,
    });
    let decision = admission::decide(
        endpoint,
        &request,
        lookup.as_ref(),
        &RenderConfig::default(),
    );
    let review = decision.to_review();
    // What the server sends: the same JSON, byte for byte.
    assert_eq!(
        decision.to_review_bytes().expect("serializes"),
        serde_json::to_vec(&review).expect("json")
    );
    let patch = review["response"]["patch"].as_str().map(|b64| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        serde_json::from_slice::<json_patch::Patch>(&bytes).expect("an RFC 6902 patch")
    });
    Answer {
        review,
        patch,
        object: request.object().expect("a readable object").cloned(),
    }
}

fn apply(object: &Value, patch: &json_patch::Patch) -> Value {
    let mut out = object.clone();
    json_patch::patch(&mut out, patch).expect("the patch applies to the original object");
    out
}

/// Replaces what changes with every installer release, so snapshots show the pod shape.
fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match key.as_str() {
                    "packages.kaspr.io/template-hash" => *v = json!("[template-hash]"),
                    // Names this release and its settings, so it changes with every release.
                    "packages.kaspr.io/revision" => *v = json!("[revision]"),
                    "command" if v.get(1) == Some(&json!("-c")) => v[2] = json!("[installer]"),
                    _ => redact(v),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                if item
                    .get("path")
                    .and_then(Value::as_str)
                    .is_some_and(|p| p.ends_with("/command/2"))
                {
                    item["value"] = json!("[installer]");
                }
                redact(item);
            }
        }
        _ => {}
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        root()
            .join("tests/fixtures/admission")
            .join(format!("{name}.json")),
    )
    .expect("fixture")
}

fn endpoint_for(name: &str) -> Endpoint {
    if name.starts_with("kasprapp-") {
        Endpoint::Validate
    } else {
        Endpoint::Mutate
    }
}

fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("tests/fixtures/admission"))
        .expect("fixtures")
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "json").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();
    names
}

#[test]
fn every_fixture_answers_as_snapshotted_and_keeps_the_invariants() {
    let apps = kasprapps();
    let names = fixture_names();
    assert!(names.len() >= 13, "fixtures missing: {names:?}");
    // Every fixture is checked and every failing one is reported, not only the first.
    let failures: Vec<String> = names
        .iter()
        .filter_map(|name| {
            std::panic::catch_unwind(|| check_fixture(name, &apps))
                .err()
                .map(|panic| format!("{name}: {}", panic_text(panic.as_ref())))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panicked".to_owned())
}

fn check_fixture(name: &str, apps: &BTreeMap<AppRef, Arc<Value>>) {
    let body = fixture(name);
    let request: Value = serde_json::from_slice(&body).expect("json");
    let Answer {
        review,
        patch,
        object,
    } = answer(endpoint_for(name), &body, apps);

    assert_eq!(review["apiVersion"], "admission.k8s.io/v1", "{name}");
    assert_eq!(review["kind"], "AdmissionReview", "{name}");
    assert_eq!(
        review["response"]["uid"], request["request"]["uid"],
        "{name}: uid echoed"
    );

    if let Some(patch) = &patch {
        let object = object.as_ref().expect("object");
        let mutated = apply(object, patch);
        // Unknown fields survive.
        let spec = object
            .pointer("/spec/template/spec")
            .or_else(|| object.get("spec"))
            .expect("spec");
        let mutated_spec = mutated
            .pointer("/spec/template/spec")
            .or_else(|| mutated.get("spec"))
            .expect("spec");
        assert_eq!(
            spec["hostnameOverride"], "keep-me",
            "{name}: fixture lacks the unknown field"
        );
        assert_eq!(mutated_spec["hostnameOverride"], "keep-me", "{name}");
        assert_eq!(
            mutated_spec["containers"][0]["futureField"], spec["containers"][0]["futureField"],
            "{name}"
        );
        // Reviewing the result again gives no patch.
        let mut again = request;
        again["request"]["object"] = mutated;
        let second = answer(
            endpoint_for(name),
            &serde_json::to_vec(&again).expect("json"),
            apps,
        );
        assert!(
            second.patch.is_none(),
            "{name}: second review patched: {:?}",
            second.patch
        );
        assert_eq!(second.review["response"]["allowed"], true, "{name}");
    }

    let mut snapshot = json!({
        "allowed": review["response"]["allowed"],
        "message": review["response"]["status"]["message"],
        "warnings": review["response"]["warnings"],
        "patch": patch.as_ref().map(|p| serde_json::to_value(p).expect("json")),
    });
    redact(&mut snapshot);
    insta::assert_json_snapshot!(name, snapshot);
}

/// Where two renderings first differ (the installer payload makes full dumps unreadable).
fn first_difference(a: &str, b: &str) -> Option<String> {
    let at = a
        .bytes()
        .zip(b.bytes())
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))?;
    let window = |s: &str| {
        s.get(at.saturating_sub(60)..(at + 60).min(s.len()))
            .unwrap_or("")
            .to_owned()
    };
    Some(format!(
        "differ at byte {at}: {:?} vs {:?}",
        window(a),
        window(b)
    ))
}

fn update_review(create: &Value, object: &Value, old: &Value) -> Vec<u8> {
    let mut review = create.clone();
    review["request"]["operation"] = json!("UPDATE");
    review["request"]["object"] = object.clone();
    review["request"]["oldObject"] = old.clone();
    review["request"]["options"] = json!({"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"});
    serde_json::to_vec(&review).expect("json")
}

/// For every StatefulSet fixture: the UPDATE of the injected object gives no patch, and the
/// operator's rewrite (none of our additions) comes out byte for byte like the injected template,
/// so no new ControllerRevision appears.
#[test]
fn updates_are_idempotent_and_operator_rewrites_render_byte_for_byte() {
    let apps = kasprapps();
    let mut checked = 0;
    for name in fixture_names()
        .iter()
        .filter(|n| n.ends_with("-statefulset-create") && !n.starts_with("unrelated"))
    {
        let body = fixture(name);
        let create: Value = serde_json::from_slice(&body).expect("json");
        let original = create["request"]["object"].clone();
        let Answer { patch, .. } = answer(Endpoint::Mutate, &body, &apps);
        let injected = apply(
            &original,
            &patch.unwrap_or_else(|| panic!("{name}: no patch")),
        );

        let unchanged = answer(
            Endpoint::Mutate,
            &update_review(&create, &injected, &injected),
            &apps,
        );
        assert!(
            unchanged.patch.is_none(),
            "{name}: UPDATE of the injected object patched"
        );

        let mut rewrites = vec![original.clone()];
        // The operator keeps our annotations but rewrites env, mounts and volumes.
        let mut kept_annotations = original.clone();
        kept_annotations["spec"]["template"]["metadata"]["annotations"] =
            injected["spec"]["template"]["metadata"]["annotations"].clone();
        rewrites.push(kept_annotations);
        for rewrite in rewrites {
            let rewritten = answer(
                Endpoint::Mutate,
                &update_review(&create, &rewrite, &injected),
                &apps,
            );
            let result = apply(&rewrite, &rewritten.patch.expect("a patch"));
            let got = serde_json::to_string(&result["spec"]["template"]).expect("json");
            let want = serde_json::to_string(&injected["spec"]["template"]).expect("json");
            if let Some(diff) = first_difference(&got, &want) {
                panic!("{name}: operator rewrite rendered differently: {diff}");
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 6);
}

#[test]
fn removing_python_packages_restores_the_operators_template() {
    let mut apps = kasprapps();
    let body = fixture("emptydir-statefulset-create");
    let create: Value = serde_json::from_slice(&body).expect("json");
    let original = create["request"]["object"].clone();
    let injected = apply(
        &original,
        &answer(Endpoint::Mutate, &body, &apps).patch.expect("patch"),
    );

    let key = AppRef {
        namespace: "default".into(),
        name: "my-app".into(),
    };
    let mut app = (*apps[&key]).clone();
    app["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("pythonPackages");
    apps.insert(key, Arc::new(app));
    let Answer { patch, .. } = answer(
        Endpoint::Mutate,
        &update_review(&create, &injected, &injected),
        &apps,
    );
    let stripped = apply(&injected, &patch.expect("a patch"));
    assert_eq!(stripped["spec"], original["spec"]);
}

#[test]
fn a_missing_kasprapp_allows_unchanged_and_an_unreadable_one_denies() {
    let body = fixture("emptydir-statefulset-create");
    let request = admission::parse_review(&body).expect("review");
    let decision = admission::decide(
        Endpoint::Mutate,
        &request,
        Some(&AppLookup::NotFound),
        &RenderConfig::default(),
    );
    assert!(decision.allowed && decision.patch.is_none());
    let decision = admission::decide(
        Endpoint::Mutate,
        &request,
        Some(&AppLookup::Unavailable("connection refused".into())),
        &RenderConfig::default(),
    );
    assert!(!decision.allowed);
    let message = decision.message.expect("message");
    assert!(
        message.contains("could not read KasprApp default/my-app (connection refused)"),
        "{message}"
    );
}

#[test]
fn fixture_directory_exists() {
    assert!(Path::new(&root().join("tests/fixtures/admission")).is_dir());
}
