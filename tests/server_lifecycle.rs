//! Start, readiness and graceful shutdown of the whole server on 127.0.0.1.

mod server_support;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use kaspr_packages_webhook::app::{AppLookup, AppRef};
use kaspr_packages_webhook::cache::{FileKasprApps, KasprApps, MemoryKasprApps};
use rustls::version::{TLS12, TLS13};
use server_support::*;
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_with_a_certificate_and_a_synced_cache() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let apps = Arc::new(MemoryKasprApps::new().with_app(fixture_yaml("kasprapp-demo.yaml")));
    apps.set_synced(false);
    // No certificate files yet: the server starts, but is not ready and refuses handshakes.
    let (running, certs) = start_server(
        loopback_settings(),
        apps.clone(),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        Duration::from_millis(50),
    )
    .await;
    assert!(!certs.is_loaded());
    let (status, text) = probe(running.probe_addr, "/livez").await;
    assert_eq!((status, text.as_str()), (200, "ok\n"));
    let (status, text) = probe(running.probe_addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        text.contains("certificate") && text.contains("cache"),
        "{text}"
    );
    let config = pki.client_config(&[&TLS13, &TLS12]);
    assert!(
        post_once(running.webhook_addr, config.clone(), "/mutate", Vec::new())
            .await
            .is_err()
    );

    // The Secret appears: certificate loaded, cache still syncing.
    let (chain, key, _) = pki.new_leaf();
    publish_secret_volume(dir.path(), "2026_02_01_00_00_00.000000001", &chain, &key);
    assert!(eventually(Duration::from_secs(5), || async { certs.is_loaded() }).await);
    let (status, text) = probe(running.probe_addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        !text.contains("certificate") && text.contains("cache"),
        "{text}"
    );

    apps.set_synced(true);
    let (status, _) = probe(running.probe_addr, "/readyz").await;
    assert_eq!(status, 200);
    let answer = post_once(
        running.webhook_addr,
        config,
        "/mutate",
        statefulset_review("uid-ready", "apps", "demo")
            .to_string()
            .into_bytes(),
    )
    .await
    .expect("request");
    assert_eq!(answer.status, 200);

    let (status, text) = probe(running.probe_addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "kaspr_packages_webhook_admission_requests_total{",
        "kaspr_packages_webhook_admission_duration_seconds_bucket{",
        "kaspr_packages_webhook_kasprapps_cached 1",
        "kaspr_packages_webhook_certificate_expiry_timestamp_seconds ",
        "kaspr_packages_webhook_build_info{version=\"",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    let (status, _) = probe(running.probe_addr, "/nope").await;
    assert_eq!(status, 404);

    running.shutdown.trigger();
    running.wait().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_ready_once_read() {
    let pki = TestPki::new();
    let certs_dir = tempfile::tempdir().expect("tempdir");
    let (chain, key, _) = pki.new_leaf();
    publish_secret_volume(
        certs_dir.path(),
        "2026_02_01_00_00_00.000000001",
        &chain,
        &key,
    );
    let apps_dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        fixture("kasprapp-demo.yaml"),
        apps_dir.path().join("demo.yaml"),
    )
    .expect("copy");
    let apps = Arc::new(FileKasprApps::load(apps_dir.path()).expect("load"));
    let mut settings = loopback_settings();
    settings.shutdown_delay = Duration::from_millis(500);
    let (running, _) = start_server(
        settings,
        apps,
        certs_dir.path().join("tls.crt"),
        certs_dir.path().join("tls.key"),
        Duration::from_secs(60),
    )
    .await;
    let (status, _) = probe(running.probe_addr, "/readyz").await;
    assert_eq!(status, 200);
    running.shutdown.trigger();
    // During the shutdown delay: not ready, but the webhook still answers.
    let (status, _) = probe(running.probe_addr, "/readyz").await;
    assert_eq!(status, 503, "not ready while shutting down");
    let answer = post_once(
        running.webhook_addr,
        pki.client_config(&[&TLS13]),
        "/mutate",
        statefulset_review("uid-late", "apps", "demo")
            .to_string()
            .into_bytes(),
    )
    .await
    .expect("still accepting during the delay");
    assert_eq!(answer.status, 200);
    running.wait().await.expect("clean stop");
}

/// Answers every lookup after a delay, and says when a lookup has started.
struct SlowApps {
    started: Arc<Notify>,
    delay: Duration,
}

impl KasprApps for SlowApps {
    fn cached(&self, _: &AppRef) -> Option<AppLookup> {
        None
    }
    fn fetch<'a>(&'a self, _: &'a AppRef) -> BoxFuture<'a, AppLookup> {
        async move {
            self.started.notify_one();
            tokio::time::sleep(self.delay).await;
            AppLookup::NotFound
        }
        .boxed()
    }
    fn len(&self) -> usize {
        0
    }
    fn is_synced(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests_and_refuses_new_connections() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (chain, key, _) = pki.new_leaf();
    publish_secret_volume(dir.path(), "2026_03_01_00_00_00.000000001", &chain, &key);
    let started = Arc::new(Notify::new());
    let apps = Arc::new(SlowApps {
        started: started.clone(),
        delay: Duration::from_millis(1500),
    });
    let mut settings = loopback_settings();
    settings.shutdown_timeout = Duration::from_secs(10);
    let (running, _) = start_server(
        settings,
        apps,
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        Duration::from_secs(60),
    )
    .await;
    let addr = running.webhook_addr;
    let config = pki.client_config(&[&TLS13]);

    let in_flight = tokio::spawn({
        let config = config.clone();
        async move {
            post_once(
                addr,
                config,
                "/mutate",
                statefulset_review("uid-slow", "apps", "demo")
                    .to_string()
                    .into_bytes(),
            )
            .await
        }
    });
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .expect("request reached the lookup");

    let shutdown_at = std::time::Instant::now();
    running.shutdown.trigger();
    // The listener closes: new connections are refused while the slow request is still running.
    let refused = eventually(Duration::from_secs(3), || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(
        refused,
        "new connections still accepted after the shutdown signal"
    );
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before the test could check"
    );

    let answer = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("bounded")
        .expect("joined")
        .expect("the in-flight request completed");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["response"]["uid"], "uid-slow");

    tokio::time::timeout(Duration::from_secs(10), running.wait())
        .await
        .expect("stops within the deadline")
        .expect("clean stop");
    assert!(shutdown_at.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shutdown_deadline_bounds_a_stuck_request() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (chain, key, _) = pki.new_leaf();
    publish_secret_volume(dir.path(), "2026_03_01_00_00_00.000000001", &chain, &key);
    let started = Arc::new(Notify::new());
    let apps = Arc::new(SlowApps {
        started: started.clone(),
        delay: Duration::from_secs(60),
    });
    let mut settings = loopback_settings();
    settings.shutdown_timeout = Duration::from_millis(300);
    settings.request_timeout = Duration::from_secs(60);
    let (running, _) = start_server(
        settings,
        apps,
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        Duration::from_secs(60),
    )
    .await;
    let addr = running.webhook_addr;
    let config = pki.client_config(&[&TLS13]);
    let stuck = tokio::spawn(async move {
        post_once(
            addr,
            config,
            "/mutate",
            statefulset_review("uid-stuck", "apps", "demo")
                .to_string()
                .into_bytes(),
        )
        .await
    });
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .expect("request reached the lookup");
    let shutdown_at = std::time::Instant::now();
    running.shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(5), running.wait())
        .await
        .expect("stops after the deadline, not after the request")
        .expect("clean stop");
    assert!(shutdown_at.elapsed() < Duration::from_secs(4));
    let result = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .expect("bounded")
        .expect("joined");
    assert!(result.is_err(), "the stuck request was cut at the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut settings = loopback_settings();
    settings.listen = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Arc::new(kaspr_packages_webhook::certs::reload::CertReloader::new(
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
    ));
    let services = kaspr_packages_webhook::server::Services {
        apps: Arc::new(MemoryKasprApps::new()),
        certs,
        registry: kaspr_packages_webhook::metrics::new_registry(),
        tasks: Vec::new(),
    };
    let error = kaspr_packages_webhook::server::start(
        settings,
        services,
        kaspr_packages_webhook::server::Shutdown::new(),
    )
    .await
    .err()
    .expect("bind fails");
    assert!(format!("{error:#}").contains("--listen"), "{error:#}");
}
