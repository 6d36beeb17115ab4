//! The cost of the pure core: mutation of an operator-rendered StatefulSet in each cache mode,
//! idempotent re-mutation, and the full AdmissionReview path (parse → lookup → validate → render
//! → patch → serialize), without and with the answer cache.
//!
//! Run: `cargo bench --bench admission`. Results and the machine are recorded in BENCHMARKS.md.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kaspr_packages_webhook::admission::{self, Endpoint};
use kaspr_packages_webhook::app::{AppLookup, AppRef};
use kaspr_packages_webhook::config::RenderConfig;
use kaspr_packages_webhook::mutation::ObjectKind;
use serde_json::Value;

// The binary's allocator, so the numbers are those `serve` gets.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

fn yaml(path: &str) -> Value {
    serde_yaml::from_str(&read(path)).expect("yaml")
}

fn review_body(name: &str) -> Vec<u8> {
    read(&format!("tests/fixtures/admission/{name}.json")).into_bytes()
}

fn apps() -> HashMap<AppRef, Arc<Value>> {
    ["emptydir", "pvc", "gcs", "private-index", "ssh-deploy-key"]
        .iter()
        .map(|mode| {
            let app = yaml(&format!("examples/kasprapp-{mode}.yaml"));
            let key = AppRef {
                namespace: "default".into(),
                name: app["metadata"]["name"].as_str().expect("name").to_owned(),
            };
            (key, Arc::new(app))
        })
        .collect()
}

fn mutate_per_mode(c: &mut Criterion) {
    let config = RenderConfig::default();
    let mut group = c.benchmark_group("mutate_statefulset");
    group.throughput(Throughput::Elements(1));
    for mode in [
        "emptydir",
        "pvc",
        "gcs",
        "private-index",
        "operator-takeover",
    ] {
        let body: Value =
            serde_json::from_slice(&review_body(&format!("{mode}-statefulset-create")))
                .expect("json");
        let sts = body["request"]["object"].clone();
        let app = yaml(&format!("examples/kasprapp-{mode}.yaml"));
        group.bench_function(mode, |b| {
            b.iter(|| {
                admission::mutate_object(
                    ObjectKind::StatefulSet,
                    black_box(&sts),
                    black_box(&app),
                    &config,
                )
            })
        });
    }
    group.finish();
}

/// The chart's settings (default init-container resources and an emptyDir size limit) differ
/// from the revision-neutral ones, so the config hash needs a second rendering; the default
/// settings above need none. The difference is the cost of recording the config hash.
fn mutate_with_chart_settings(c: &mut Criterion) {
    let config = RenderConfig {
        default_resources: Some(
            serde_json::from_value(serde_json::json!({
                "requests": {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": "256Mi"},
                "limits": {"memory": "1Gi", "ephemeral-storage": "4Gi"}
            }))
            .expect("resources"),
        ),
        packages_volume_size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "4Gi".into(),
        )),
        ..RenderConfig::default()
    };
    let body: Value =
        serde_json::from_slice(&review_body("emptydir-statefulset-create")).expect("json");
    let sts = body["request"]["object"].clone();
    let app = yaml("examples/kasprapp-emptydir.yaml");
    c.bench_function("mutate_statefulset_chart_settings/emptydir", |b| {
        b.iter(|| {
            admission::mutate_object(
                ObjectKind::StatefulSet,
                black_box(&sts),
                black_box(&app),
                &config,
            )
        })
    });
}

fn remutate(c: &mut Criterion) {
    let config = RenderConfig::default();
    let body: Value =
        serde_json::from_slice(&review_body("emptydir-statefulset-create")).expect("json");
    let sts = body["request"]["object"].clone();
    let app = yaml("examples/kasprapp-emptydir.yaml");
    let outcome =
        admission::mutate_object(ObjectKind::StatefulSet, &sts, &app, &config).expect("allowed");
    let mut injected = sts;
    json_patch::patch(&mut injected, &outcome.patch).expect("applies");
    c.bench_function("remutate_injected_statefulset", |b| {
        b.iter(|| {
            let out = admission::mutate_object(
                ObjectKind::StatefulSet,
                black_box(&injected),
                &app,
                &config,
            )
            .expect("allowed");
            assert!(out.patch.0.is_empty());
            out
        })
    });
}

fn full_review(c: &mut Criterion) {
    let config = RenderConfig::default();
    let apps = apps();
    let mut group = c.benchmark_group("admission_review");
    group.throughput(Throughput::Elements(1));
    for name in [
        "emptydir-statefulset-create",
        "emptydir-pod-create",
        "kasprapp-update-valid",
        "unrelated-statefulset-create",
    ] {
        let body = review_body(name);
        let endpoint = if name.starts_with("kasprapp") {
            Endpoint::Validate
        } else {
            Endpoint::Mutate
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let request = admission::parse_review(black_box(&body)).expect("review");
                let lookup = admission::required_app(endpoint, &request).map(|app| {
                    apps.get(&app)
                        .map_or(AppLookup::NotFound, |a| AppLookup::Found(a.clone()))
                });
                let decision = admission::decide(endpoint, &request, lookup.as_ref(), &config);
                decision.to_review_bytes().expect("json")
            })
        });
    }
    group.finish();
}

/// The review path as `serve` runs it, with the answer cache: the same StatefulSet or Pod
/// again (the operator's repeated UPDATEs, a pod recreated under its own name) is answered
/// from the cache.
fn full_review_cached(c: &mut Criterion) {
    let config = RenderConfig::default();
    let apps = apps();
    let answers = admission::AnswerCache::new();
    let mut group = c.benchmark_group("admission_review_cached");
    group.throughput(Throughput::Elements(1));
    for name in [
        "emptydir-statefulset-create",
        "emptydir-pod-create",
        "unrelated-statefulset-create",
    ] {
        let body = review_body(name);
        group.bench_function(name, |b| {
            b.iter(|| {
                let request = admission::parse_review(black_box(&body)).expect("review");
                let lookup = admission::required_app(Endpoint::Mutate, &request).map(|app| {
                    apps.get(&app)
                        .map_or(AppLookup::NotFound, |a| AppLookup::Found(a.clone()))
                });
                let decision = admission::decide_cached(
                    Endpoint::Mutate,
                    &request,
                    lookup.as_ref(),
                    &config,
                    &answers,
                );
                decision.to_review_bytes().expect("json")
            })
        });
    }
    group.finish();
    // Only the first review of each object computes its answer.
    let stats = answers.stats();
    assert!(stats.misses <= 2, "{stats:?}");
}

/// How a whole body costs to parse into a `Value`: what every review paid before only the
/// envelope was read, and the part of the unrelated review's time that reading less saves.
fn parse_whole_body(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_whole_body");
    group.throughput(Throughput::Elements(1));
    for name in [
        "unrelated-statefulset-create",
        "emptydir-statefulset-create",
    ] {
        let body = review_body(name);
        group.bench_function(name, |b| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(&body)).expect("json"))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    mutate_per_mode,
    mutate_with_chart_settings,
    remutate,
    full_review,
    full_review_cached,
    parse_whole_body
);
criterion_main!(benches);
