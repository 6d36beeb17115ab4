//! The chart's alert rules and Grafana dashboard query only metrics the binary exports: every
//! `kaspr_packages_webhook_*` name in them is checked against the names the registry serves,
//! built the way `serve` builds it (the controller's metrics and the webhook's in one registry).

use std::collections::BTreeSet;
use std::path::Path;

use kaspr_packages_webhook::controller::ControllerMetrics;
use kaspr_packages_webhook::metrics::{self, WebhookMetrics};
use regex::Regex;
use serde_json::Value;

fn chart_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("charts/kaspr-packages-webhook")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Sample names Prometheus stores for the registry: `_total` for counters, `_bucket`, `_sum`,
/// `_count` for histograms, the family name for gauges.
fn exported_names() -> BTreeSet<String> {
    let mut registry = metrics::new_registry();
    let _controller = ControllerMetrics::register(&mut registry);
    let _webhook = WebhookMetrics::register(&mut registry);
    let text = metrics::encode(&registry).expect("encode");
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("TYPE line has a type");
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            "gauge" | "info" | "unknown" => {
                names.insert(name.to_owned());
            }
            other => panic!("metric {name} has a type this test does not know: {other}"),
        }
    }
    names
}

fn metric_names(expr: &str) -> Vec<String> {
    let pattern = Regex::new(r"kaspr_packages_webhook_[a-z0-9_]+").expect("regex");
    pattern
        .find_iter(expr)
        .map(|m| m.as_str().to_owned())
        .collect()
}

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
fn dashboard_queries(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item) {
                    ("expr" | "definition", Value::String(expr)) => out.push(expr.clone()),
                    ("query", Value::Object(query)) => {
                        if let Some(Value::String(expr)) = query.get("query") {
                            out.push(expr.clone());
                        }
                    }
                    _ => dashboard_queries(item, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| dashboard_queries(i, out)),
        _ => {}
    }
}

#[test]
fn the_registry_exports_what_the_docs_list() {
    let names = exported_names();
    for name in [
        "kaspr_packages_webhook_admission_requests_total",
        "kaspr_packages_webhook_admission_duration_seconds_bucket",
        "kaspr_packages_webhook_certificate_expiry_timestamp_seconds",
        "kaspr_packages_webhook_kasprapps_out_of_sync",
        "kaspr_packages_webhook_controller_reconciles_total",
    ] {
        assert!(names.contains(name), "{name} not in {names:#?}");
    }
}

#[test]
fn every_alert_expression_uses_exported_metrics_only() {
    let exported = exported_names();
    let template = chart_file("templates/prometheusrule.yaml");
    let expressions: Vec<&str> = template
        .lines()
        .filter(|line| line.trim_start().starts_with("\"expr\""))
        .collect();
    assert_eq!(expressions.len(), 7, "one expression per alert");
    for expr in expressions {
        let used = metric_names(expr);
        assert!(!used.is_empty(), "no metric in {expr}");
        for name in used {
            assert!(
                exported.contains(&name),
                "alert uses {name}, which the binary does not export; it exports {exported:#?}"
            );
        }
    }
}

#[test]
fn every_dashboard_query_uses_exported_metrics_only() {
    let exported = exported_names();
    let dashboard: Value =
        serde_json::from_str(&chart_file("files/dashboard.json")).expect("dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 10, "{queries:#?}");
    let mut used_families = BTreeSet::new();
    for query in &queries {
        let used = metric_names(query);
        assert!(!used.is_empty(), "no metric in {query}");
        for name in used {
            assert!(
                exported.contains(&name),
                "dashboard uses {name}, which the binary does not export; it exports {exported:#?}"
            );
            used_families.insert(
                ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name)
                    .to_owned(),
            );
        }
    }
    // And the dashboard shows every metric the binary has.
    let families: BTreeSet<String> = exported
        .iter()
        .map(|name| {
            ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_owned()
        })
        .collect();
    assert_eq!(used_families, families);
}
