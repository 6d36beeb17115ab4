//! The plain-HTTP side: `GET /livez`, `GET /readyz`, `GET /metrics`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

use super::shutdown::Shutdown;
use crate::cache::KasprApps;
use crate::certs::reload::CertReloader;
use crate::metrics::{self, WebhookMetrics};

/// What the probes look at.
#[derive(Clone)]
pub struct ProbeState {
    inner: Arc<Inner>,
}

struct Inner {
    certs: Arc<CertReloader>,
    apps: Arc<dyn KasprApps>,
    shutdown: Shutdown,
    registry: Arc<Registry>,
    metrics: WebhookMetrics,
}

impl ProbeState {
    pub fn new(
        certs: Arc<CertReloader>,
        apps: Arc<dyn KasprApps>,
        shutdown: Shutdown,
        registry: Arc<Registry>,
        metrics: WebhookMetrics,
    ) -> Self {
        ProbeState {
            inner: Arc::new(Inner {
                certs,
                apps,
                shutdown,
                registry,
                metrics,
            }),
        }
    }

    /// The reasons the server is not ready; empty when it is.
    pub fn not_ready_reasons(&self) -> Vec<&'static str> {
        let mut reasons = Vec::new();
        if !self.inner.certs.is_loaded() {
            reasons.push("serving certificate not loaded");
        }
        if !self.inner.apps.is_synced() {
            reasons.push("KasprApp cache not synced");
        }
        if self.inner.shutdown.is_triggered() {
            reasons.push("shutting down");
        }
        reasons
    }
}

pub fn router(state: ProbeState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(super::webhook::not_found)
        .with_state(state)
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<ProbeState>) -> Response {
    let reasons = state.not_ready_reasons();
    if reasons.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join(", ")),
        )
            .into_response()
    }
}

async fn metrics_text(State(state): State<ProbeState>) -> Response {
    let inner = &state.inner;
    // Gauges that mirror other components' state are refreshed at scrape time, which keeps the
    // hot paths free of metric updates.
    inner.metrics.set_kasprapps_cached(inner.apps.len());
    if let Some(expiry) = inner.certs.not_after() {
        inner.metrics.set_certificate_expiry(expiry);
    }
    match metrics::encode(&inner.registry) {
        Ok(body) => {
            let mut response = (StatusCode::OK, body).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}
