//! Prometheus metrics of the admission server.
//!
//! Every metric lives in one [`Registry`] prefixed `kaspr_packages_webhook_`. The server
//! registers its own metrics with [`WebhookMetrics::register`]; other parts of the process (the
//! controller) register theirs into the same registry before it is frozen and served on
//! `/metrics`. Label values are `&'static str` so that recording a request allocates nothing.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::admission::Endpoint;

/// Prefix of every metric name.
pub const PREFIX: &str = "kaspr_packages_webhook";

/// `Content-Type` of the text [`encode`] produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets in seconds. Most admissions finish well under a millisecond, so the
/// resolution is fine below 10 ms; the tail reaches the API server's 10 s webhook timeout.
const DURATION_BUCKETS: [f64; 20] = [
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A new registry with the product's metric prefix.
pub fn new_registry() -> Registry {
    Registry::with_prefix(PREFIX)
}

/// Labels of `admission_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub endpoint: &'static str,
    pub kind: &'static str,
    pub operation: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type HistogramFamily = Family<EndpointLabels, Histogram, fn() -> Histogram>;

/// The admission server's metrics.
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    requests: Family<AdmissionLabels, Counter>,
    duration: HistogramFamily,
    kasprapps_cached: Gauge,
    certificate_expiry: Gauge<f64, AtomicU64>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl WebhookMetrics {
    /// Creates the metrics and registers them (plus `build_info`) into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = WebhookMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            kasprapps_cached: Gauge::default(),
            certificate_expiry: Gauge::default(),
        };
        registry.register(
            "admission_requests",
            "AdmissionReview requests by endpoint, object kind, operation and outcome",
            metrics.requests.clone(),
        );
        registry.register_with_unit(
            "admission_duration",
            "Time from the request's arrival to its answer",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "kasprapps_cached",
            "KasprApps currently held in memory",
            metrics.kasprapps_cached.clone(),
        );
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "Expiry (notAfter) of the serving certificate, as a Unix timestamp",
            Unit::Seconds,
            metrics.certificate_expiry.clone(),
        );
        metrics.initialise_series();
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version label is the running release",
            build_info,
        );
        metrics
    }

    /// Creates, at 0, the series of the requests the API server sends, so `rate()` sees a
    /// process's first denial or error (a series born at 1 has no earlier sample to rise from)
    /// and dashboards show every outcome from the start.
    fn initialise_series(&self) {
        const MUTATE: [&str; 6] = [
            "patched",
            "unchanged",
            "ignored",
            "denied",
            "unavailable",
            "error",
        ];
        const VALIDATE: [&str; 3] = ["unchanged", "denied", "error"];
        let requests: [(Endpoint, &str, &str, &[&'static str]); 5] = [
            (Endpoint::Mutate, "StatefulSet", "CREATE", &MUTATE),
            (Endpoint::Mutate, "StatefulSet", "UPDATE", &MUTATE),
            (Endpoint::Mutate, "Pod", "CREATE", &MUTATE),
            (Endpoint::Validate, "KasprApp", "CREATE", &VALIDATE),
            (Endpoint::Validate, "KasprApp", "UPDATE", &VALIDATE),
        ];
        for (endpoint, kind, operation, outcomes) in requests {
            for outcome in outcomes {
                drop(self.requests.get_or_create(&AdmissionLabels {
                    endpoint: endpoint_label(endpoint),
                    kind: kind_label(kind),
                    operation: operation_label(operation),
                    outcome,
                }));
            }
        }
        for endpoint in [Endpoint::Mutate, Endpoint::Validate] {
            drop(self.duration.get_or_create(&EndpointLabels {
                endpoint: endpoint_label(endpoint),
            }));
        }
    }

    /// Records one answered request.
    pub fn observe_request(&self, labels: &AdmissionLabels, seconds: f64) {
        self.requests.get_or_create(labels).inc();
        self.duration
            .get_or_create(&EndpointLabels {
                endpoint: labels.endpoint,
            })
            .observe(seconds);
    }

    pub fn set_kasprapps_cached(&self, count: usize) {
        self.kasprapps_cached
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn set_certificate_expiry(&self, unix_seconds: i64) {
        // Timestamps fit an f64 exactly for the next few million years.
        #[allow(clippy::cast_precision_loss)]
        self.certificate_expiry.set(unix_seconds as f64);
    }
}

/// The label value of an endpoint.
pub fn endpoint_label(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Mutate => "mutate",
        Endpoint::Validate => "validate",
    }
}

/// Maps a request's kind onto a fixed set, so a misdirected request cannot grow the label space.
pub fn kind_label(kind: &str) -> &'static str {
    match kind {
        "StatefulSet" => "StatefulSet",
        "Pod" => "Pod",
        "KasprApp" => "KasprApp",
        "" => "unknown",
        _ => "other",
    }
}

/// Maps a request's operation onto the fixed set the API server uses.
pub fn operation_label(operation: &str) -> &'static str {
    match operation {
        "CREATE" => "CREATE",
        "UPDATE" => "UPDATE",
        "DELETE" => "DELETE",
        "CONNECT" => "CONNECT",
        "" => "unknown",
        _ => "other",
    }
}

/// Encodes the registry in the OpenMetrics text format (which Prometheus scrapes natively).
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_fixed_metric_names() {
        let mut registry = new_registry();
        let metrics = WebhookMetrics::register(&mut registry);
        metrics.observe_request(
            &AdmissionLabels {
                endpoint: "mutate",
                kind: "StatefulSet",
                operation: "CREATE",
                outcome: "patched",
            },
            0.0004,
        );
        metrics.set_kasprapps_cached(3);
        metrics.set_certificate_expiry(1_900_000_000);
        let text = encode(&registry).expect("encode");
        for needle in [
            "kaspr_packages_webhook_admission_requests_total{endpoint=\"mutate\",kind=\"StatefulSet\",operation=\"CREATE\",outcome=\"patched\"} 1",
            "kaspr_packages_webhook_admission_duration_seconds_bucket{le=\"0.0005\",endpoint=\"mutate\"} 1",
            "kaspr_packages_webhook_kasprapps_cached 3",
            "kaspr_packages_webhook_certificate_expiry_timestamp_seconds 1900000000",
            "kaspr_packages_webhook_build_info{version=\"",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn a_fresh_registry_has_every_admission_outcome_at_zero() {
        let mut registry = new_registry();
        let _metrics = WebhookMetrics::register(&mut registry);
        let text = encode(&registry).expect("encode");
        for needle in [
            "kaspr_packages_webhook_admission_requests_total{endpoint=\"mutate\",kind=\"Pod\",operation=\"CREATE\",outcome=\"error\"} 0",
            "kaspr_packages_webhook_admission_requests_total{endpoint=\"validate\",kind=\"KasprApp\",operation=\"UPDATE\",outcome=\"denied\"} 0",
            "kaspr_packages_webhook_admission_duration_seconds_count{endpoint=\"validate\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn unknown_kinds_and_operations_collapse() {
        assert_eq!(kind_label("Secret"), "other");
        assert_eq!(kind_label(""), "unknown");
        assert_eq!(operation_label("PATCH"), "other");
    }
}
