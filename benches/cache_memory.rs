//! Memory of the KasprApp watch cache: resident set size after holding 10 000 realistic
//! KasprApps (operator-shaped spec, `kubectl apply` metadata), stored the way the cache stores
//! them (`trimmed`: only what the render reads) against whole objects minus `managedFields` and
//! the last-applied annotation (`whole`). Each layout runs in its own process so neither sees the
//! other's freed memory.
//!
//!   cargo bench --bench cache_memory [-- APPS]
use std::process::Command;

use kaspr_packages_webhook::cache::KasprAppObject;
use serde_json::{Value, json};

fn app(i: usize) -> Value {
    let spec = json!({
        "version": "0.5.8",
        "replicas": 3,
        "bootstrapServers": "kafka-0.kafka:9092,kafka-1.kafka:9092,kafka-2.kafka:9092",
        "tls": {"trustedCertificates": [{"secretName": "kafka-ca", "certificate": "ca.crt"}]},
        "authentication": {"type": "scram-sha-512", "username": format!("app-{i}"),
                           "passwordSecret": {"secretName": format!("app-{i}-kafka"), "passwordKey": "password"}},
        "config": {"topic_partitions": 12, "web_port": 6066, "consumer_max_fetch_size": 1048576,
                   "producer_linger_ms": 5, "stream_buffer_maxsize": 4096, "table_standby_replicas": 1,
                   "consumer_auto_offset_reset": "earliest", "processing_guarantee": "exactly_once"},
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "storage": {"type": "persistent-claim", "size": "10Gi", "class": "standard-rwo", "deleteClaim": true},
        "template": {
            "serviceAccount": {"metadata": {"annotations": {"iam.gke.io/gcp-service-account": format!("app-{i}@proj.iam.gserviceaccount.com")}}},
            "pod": {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"kaspr.io/app": format!("app-{i}")}}}}]}},
                    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "streams", "effect": "NoSchedule"}]},
            "kasprContainer": {"securityContext": {"runAsNonRoot": true, "allowPrivilegeEscalation": false},
                               "env": (0..10).map(|e| json!({"name": format!("SETTING_{e}"), "value": format!("value-{e}-{i}")})).collect::<Vec<_>>()},
        },
        "pythonPackages": {
            "packages": ["requests==2.32.3", "pydantic>=2.7,<3", "orjson==3.10.7", "structlog", "tenacity==9.0.0"],
            "indexUrl": "https://pypi.internal.example/simple",
            "credentials": {"secretRef": {"name": "pypi-credentials"}},
            "cache": {"enabled": true, "type": "pvc", "size": "1Gi"},
        },
    });
    let last_applied = json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
        "metadata": {"name": format!("app-{i}"), "namespace": format!("team-{}", i % 50)}, "spec": spec});
    json!({
        "apiVersion": "kaspr.io/v1alpha1",
        "kind": "KasprApp",
        "metadata": {
            "name": format!("app-{i}"), "namespace": format!("team-{}", i % 50),
            "uid": format!("6c1f9a2e-0000-4000-8000-{i:012}"), "resourceVersion": format!("{}", 100000 + i),
            "generation": 4, "creationTimestamp": "2026-11-02T10:00:00Z",
            "labels": {"app.kubernetes.io/part-of": "streams", "team": format!("team-{}", i % 50)},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": last_applied.to_string()},
            "finalizers": ["kopf.zalando.org/KopfFinalizerMarker"],
            "managedFields": [
                {"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "kaspr.io/v1alpha1",
                 "time": "2026-11-02T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {".": {}, "f:replicas": {}, "f:config": {}, "f:template": {}, "f:pythonPackages": {}}}},
                {"manager": "kopf", "operation": "Update", "apiVersion": "kaspr.io/v1alpha1", "subresource": "status",
                 "time": "2026-11-02T10:01:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {".": {}, "f:conditions": {}}}},
            ],
        },
        "spec": spec,
        "status": {"availableMembers": 3, "desiredMembers": 3, "members": ["app-0", "app-1", "app-2"],
                   "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-02T10:02:00Z"}]},
    })
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Holds `apps` objects in the given layout and prints the RSS growth in KiB.
fn measure(layout: &str, apps: usize) {
    // The JSON texts are made one at a time, as a watch delivers them.
    let before = rss_kib();
    let mut held_whole: Vec<Value> = Vec::new();
    let mut held_trimmed: Vec<KasprAppObject> = Vec::new();
    for i in 0..apps {
        let text = app(i).to_string();
        match layout {
            "whole" => {
                let mut value: Value = serde_json::from_str(&text).expect("json");
                if let Some(metadata) = value["metadata"].as_object_mut() {
                    metadata.remove("managedFields");
                }
                if let Some(annotations) = value["metadata"]["annotations"].as_object_mut() {
                    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
                }
                held_whole.push(value);
            }
            _ => held_trimmed.push(serde_json::from_str(&text).expect("json")),
        }
    }
    let after = rss_kib();
    println!("{layout} {apps} {}", after.saturating_sub(before));
    std::hint::black_box((&held_whole, &held_trimmed));
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    match (args.next().as_deref(), args.next()) {
        (Some("--layout"), Some(layout)) => {
            let apps = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
            measure(&layout, apps);
        }
        (apps, _) => {
            let apps: usize = apps.and_then(|n| n.parse().ok()).unwrap_or(10_000);
            let exe = std::env::current_exe().expect("own path");
            println!("| layout | apps | RSS growth (MiB) | per app (KiB) |\n|---|---|---|---|");
            for layout in ["whole", "trimmed"] {
                let out = Command::new(&exe)
                    .args(["--layout", layout, &apps.to_string()])
                    .output()
                    .expect("run layout");
                let text = String::from_utf8_lossy(&out.stdout);
                let kib: u64 = text
                    .split_whitespace()
                    .nth(2)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                println!(
                    "| {layout} | {apps} | {:.1} | {:.2} |",
                    kib as f64 / 1024.0,
                    kib as f64 / apps as f64
                );
            }
        }
    }
}
