//! The answer cache against the uncached path: every admission fixture, and variants of it
//! with one input changed, get the same answer, byte for byte, through both; a changed input is
//! a miss, and only the request's uid may change for a hit.

mod example_apps;

use std::collections::BTreeMap;
use std::sync::Arc;

use kaspr_packages_webhook::admission::{self, AnswerCache, Endpoint};
use kaspr_packages_webhook::app::{AppLookup, AppRef};
use kaspr_packages_webhook::config::RenderConfig;
use serde_json::{Value, json};

use example_apps::{kasprapps, root};

/// The StatefulSet and Pod reviews among the fixtures.
fn fixtures() -> Vec<(String, Value)> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("tests/fixtures/admission"))
        .expect("fixtures")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("-statefulset-") || n.contains("-pod-"))
        .collect();
    names.sort();
    assert!(names.len() >= 11, "fixtures missing: {names:?}");
    names
        .into_iter()
        .map(|name| {
            let text = std::fs::read(root().join("tests/fixtures/admission").join(&name))
                .expect("fixture");
            (name, serde_json::from_slice(&text).expect("json"))
        })
        .collect()
}

/// The pod spec of a review's object.
fn pod_spec(review: &mut Value) -> &mut Value {
    let object = &mut review["request"]["object"];
    if object["kind"] == "Pod" {
        &mut object["spec"]
    } else {
        &mut object["spec"]["template"]["spec"]
    }
}

struct Case {
    label: String,
    body: Value,
    apps: BTreeMap<AppRef, Arc<Value>>,
    config: RenderConfig,
}

/// The fixture and its variants, each with one input changed.
fn cases(name: &str, body: &Value, apps: &BTreeMap<AppRef, Arc<Value>>) -> Vec<Case> {
    let case = |label: &str, body: Value| Case {
        label: format!("{name}: {label}"),
        body,
        apps: apps.clone(),
        config: RenderConfig::default(),
    };
    let edit = |label: &str, change: &dyn Fn(&mut Value)| {
        let mut body = body.clone();
        change(&mut body);
        case(label, body)
    };
    let mut cases = vec![
        case("as it is", body.clone()),
        edit("an annotation", &|b| {
            b["request"]["object"]["metadata"]["annotations"] = json!({"example.com/a": "1"});
        }),
        edit("a label", &|b| {
            b["request"]["object"]["metadata"]["labels"]["example.com/l"] = json!("x");
        }),
        edit("a container's image", &|b| {
            pod_spec(b)["containers"][0]["image"] = json!("registry.example/other:2");
        }),
        edit("a container's env", &|b| {
            pod_spec(b)["containers"][0]["env"] =
                json!([{"name": "PYTHONPATH", "value": "/opt/lib::"}]);
        }),
        edit("a volume", &|b| {
            let volumes = &mut pod_spec(b)["volumes"];
            let mut list = volumes.as_array().cloned().unwrap_or_default();
            list.push(json!({"name": "extra", "emptyDir": {}}));
            *volumes = Value::Array(list);
        }),
        edit("a colliding init container", &|b| {
            pod_spec(b)["initContainers"] =
                json!([{"name": "install-python-packages", "image": "x"}]);
        }),
        edit("the namespace in the object", &|b| {
            b["request"]["object"]["metadata"]["namespace"] = json!("elsewhere");
        }),
    ];
    if body["request"]["object"]["kind"] == "StatefulSet" {
        cases.push(edit("an UPDATE", &|b| {
            b["request"]["operation"] = json!("UPDATE");
            b["request"]["oldObject"] = b["request"]["object"].clone();
        }));
        cases.push(edit("an UPDATE from another template", &|b| {
            b["request"]["operation"] = json!("UPDATE");
            let mut old = b["request"]["object"].clone();
            old["spec"]["template"]["metadata"]["annotations"] = json!({
                "packages.kaspr.io/revision": "0.0.1-aaaaaaaa",
                "packages.kaspr.io/config-hash": "different"
            });
            b["request"]["oldObject"] = old;
        }));
    }
    // The app this review needs, changed.
    let request =
        admission::parse_review(&serde_json::to_vec(body).expect("json")).expect("review");
    if let Some((key, app)) =
        admission::required_app(Endpoint::Mutate, &request).and_then(|app| apps.get_key_value(&app))
    {
        let mut moved = (**app).clone();
        moved["metadata"]["resourceVersion"] = json!("99999");
        let mut case_moved = case("the app's resourceVersion", body.clone());
        case_moved.apps.insert(key.clone(), Arc::new(moved.clone()));
        cases.push(case_moved);
        moved["spec"]["pythonPackages"]["packages"] = json!(["requests==2.31.0", "--bad"]);
        let mut invalid = case("an invalid package in the app", body.clone());
        invalid.apps.insert(key.clone(), Arc::new(moved));
        cases.push(invalid);
    }
    let mut chart = case("chart settings", body.clone());
    chart.config = RenderConfig {
        default_resources: Some(
            serde_json::from_value(json!({"requests": {"cpu": "100m"}})).expect("resources"),
        ),
        ..RenderConfig::default()
    };
    cases.push(chart);
    let mut named = case("another revision", body.clone());
    named.config = RenderConfig {
        revision: Some("canary".into()),
        ..RenderConfig::default()
    };
    cases.push(named);
    cases
}

fn lookup(
    request: &admission::AdmissionRequest,
    apps: &BTreeMap<AppRef, Arc<Value>>,
) -> Option<AppLookup> {
    admission::required_app(Endpoint::Mutate, request).map(|app| match apps.get(&app) {
        Some(found) => AppLookup::Found(Arc::clone(found)),
        None => AppLookup::NotFound,
    })
}

fn answer(body: &Value, case: &Case, cache: Option<&AnswerCache>) -> Vec<u8> {
    let request =
        admission::parse_review(&serde_json::to_vec(body).expect("json")).expect("review");
    let found = lookup(&request, &case.apps);
    let decision = match cache {
        None => admission::decide(Endpoint::Mutate, &request, found.as_ref(), &case.config),
        Some(cache) => admission::decide_cached(
            Endpoint::Mutate,
            &request,
            found.as_ref(),
            &case.config,
            cache,
        ),
    };
    decision.to_review_bytes().expect("serializes")
}

/// Byte-for-byte equality, reported by where the answers part (they are tens of kilobytes).
fn same(cached: &[u8], uncached: &[u8], label: &str) {
    if cached == uncached {
        return;
    }
    let at = cached
        .iter()
        .zip(uncached)
        .position(|(a, b)| a != b)
        .unwrap_or(cached.len().min(uncached.len()));
    let window = |bytes: &[u8]| {
        String::from_utf8_lossy(&bytes[at.saturating_sub(60)..(at + 60).min(bytes.len())])
            .into_owned()
    };
    panic!(
        "{label}: cached answer ({} bytes) differs from the uncached one ({} bytes) at byte {at}: {:?} vs {:?}",
        cached.len(),
        uncached.len(),
        window(cached),
        window(uncached)
    );
}

#[test]
fn cached_answers_are_the_uncached_ones_and_a_changed_input_misses() {
    let apps = kasprapps();
    let cache = AnswerCache::new();
    let mut checked = 0;
    let mut patched = 0;
    let mut warned = 0;
    for (name, body) in fixtures() {
        for case in cases(&name, &body, &apps) {
            let label = &case.label;
            let expected = answer(&case.body, &case, None);
            let before = cache.stats();
            let first = answer(&case.body, &case, Some(&cache));
            same(&first, &expected, &format!("{label}: first answer"));
            let after_first = cache.stats();
            let ours = after_first.hits + after_first.misses > before.hits + before.misses;
            if ours {
                assert_eq!(
                    after_first.misses,
                    before.misses + 1,
                    "{label}: did not miss"
                );
            }
            // Again, under another uid: a hit, with that uid.
            let mut again = case.body.clone();
            again["request"]["uid"] = json!(format!("again-{checked}"));
            let second = answer(&again, &case, Some(&cache));
            same(
                &second,
                &answer(&again, &case, None),
                &format!("{label}: second answer"),
            );
            if ours {
                assert_eq!(
                    cache.stats().hits,
                    after_first.hits + 1,
                    "{label}: did not hit"
                );
            }
            let review: Value = serde_json::from_slice(&second).expect("json");
            assert_eq!(
                review["response"]["uid"], again["request"]["uid"],
                "{label}"
            );
            patched += usize::from(review["response"]["patch"].is_string());
            warned += usize::from(review["response"]["warnings"].is_array());
            checked += 1;
        }
    }
    // The variants reach every kind of answer: patched, denied or warned.
    assert!(
        checked > 100 && patched > 20 && warned > 5,
        "{checked} {patched} {warned}"
    );
}
