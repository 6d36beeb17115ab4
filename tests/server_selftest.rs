//! `self-test` against a real server on 127.0.0.1 with a real TLS handshake: a healthy
//! webhook passes; a wrong CA, a wrong URL and a webhook that denies fail with a reason.
mod server_support;

use std::sync::Arc;
use std::time::Duration;

use kaspr_packages_webhook::app::AppLookup;
use kaspr_packages_webhook::cache::{KasprApps, MemoryKasprApps};
use kaspr_packages_webhook::selftest::{self, ABSENT_APP, Report, SelfTestOptions};
use kaspr_packages_webhook::server::Running;
use server_support::*;

struct Served {
    running: Running,
    ca_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn serve(apps: Arc<dyn KasprApps>) -> Served {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (chain, key, _) = pki.new_leaf();
    publish_secret_volume(dir.path(), "2026_01_01_00_00_00.000000001", &chain, &key);
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, pki.root_pem()).expect("write CA");
    let (running, certs) = start_server(
        loopback_settings(),
        apps,
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        Duration::from_secs(60),
    )
    .await;
    assert!(certs.is_loaded());
    Served {
        running,
        ca_file,
        _dir: dir,
    }
}

fn demo_apps() -> Arc<dyn KasprApps> {
    Arc::new(MemoryKasprApps::new().with_app(fixture_yaml("kasprapp-demo.yaml")))
}

fn options(served: &Served, namespace: &str, app: Option<&str>) -> SelfTestOptions {
    SelfTestOptions {
        url: url::Url::parse(&format!(
            "https://127.0.0.1:{}",
            served.running.webhook_addr.port()
        ))
        .expect("url"),
        ca_file: served.ca_file.clone(),
        namespace: namespace.to_owned(),
        app: app.map(str::to_owned),
        timeout: Duration::from_secs(5),
        max_response_time: Duration::from_secs(2),
    }
}

fn failures(report: &Report) -> Vec<String> {
    report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(ToString::to_string)
        .collect()
}

async fn stop(served: Served) {
    served.running.shutdown.trigger();
    served.running.wait().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_webhook_passes_with_and_without_an_app() {
    let served = serve(demo_apps()).await;
    let report = selftest::run(&options(&served, "apps", Some("demo")))
        .await
        .expect("runs");
    assert!(report.passed(), "{:#?}", report.lines());
    assert_eq!(report.checks.len(), 3);
    assert!(
        report.checks[2]
            .detail
            .contains("allowed with a JSON patch of"),
        "{}",
        report.checks[2]
    );
    let report = selftest::run(&options(&served, "default", None))
        .await
        .expect("runs");
    assert!(report.passed(), "{:#?}", report.lines());
    assert!(report.checks[2].detail.starts_with("allowed, no patch in "));
    let last = report.lines().pop().expect("summary");
    assert_eq!(last, "self-test: 3 checks, 0 failed");
    stop(served).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_fails_every_check() {
    let served = serve(demo_apps()).await;
    let mut opts = options(&served, "apps", None);
    let other = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(other.path(), TestPki::new().root_pem()).expect("write");
    opts.ca_file = other.path().to_path_buf();
    let report = selftest::run(&opts).await.expect("runs");
    assert!(!report.passed());
    let failed = failures(&report);
    assert_eq!(failed.len(), 3, "{failed:#?}");
    for line in &failed {
        assert!(line.starts_with("FAIL "), "{line}");
        assert!(line.contains("TLS handshake with 127.0.0.1:"), "{line}");
        assert!(line.contains("certificate"), "{line}");
    }
    stop(served).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_url_fails_quickly_with_the_address() {
    let served = serve(demo_apps()).await;
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let mut opts = options(&served, "apps", None);
    opts.url = url::Url::parse(&format!("https://127.0.0.1:{port}")).expect("url");
    let started = std::time::Instant::now();
    let report = selftest::run(&opts).await.expect("runs");
    assert!(started.elapsed() < Duration::from_secs(10));
    let failed = failures(&report);
    assert_eq!(failed.len(), 3, "{failed:#?}");
    assert!(
        failed[0].contains(&format!("cannot connect to 127.0.0.1:{port}")),
        "{}",
        failed[0]
    );

    // The right port with a path the webhook does not serve: 404, named.
    let mut opts = options(&served, "apps", None);
    opts.url.set_path("/nowhere");
    let failed = failures(&selftest::run(&opts).await.expect("runs"));
    assert_eq!(failed.len(), 3, "{failed:#?}");
    assert!(failed[0].contains("HTTP status 404"), "{}", failed[0]);

    // Not https: refused before any connection, naming the flag and the value.
    opts.url = url::Url::parse("http://127.0.0.1:1").expect("url");
    let error = selftest::run(&opts).await.expect_err("refused").to_string();
    assert_eq!(error, "--url http://127.0.0.1:1/: must start with https://");
    stop(served).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_denies_fails_the_check_with_its_message() {
    let apps = MemoryKasprApps::new().with_lookup(
        "default",
        ABSENT_APP,
        AppLookup::Unavailable("connection refused".into()),
    );
    let served = serve(Arc::new(apps)).await;
    let report = selftest::run(&options(&served, "default", None))
        .await
        .expect("runs");
    let failed = failures(&report);
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(
        failed[0].starts_with("FAIL mutate a StatefulSet"),
        "{}",
        failed[0]
    );
    assert!(failed[0].contains("denied: "), "{}", failed[0]);
    assert!(failed[0].contains("connection refused"), "{}", failed[0]);
    stop(served).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_plain_lines_and_exits_by_the_result() {
    let served = serve(demo_apps()).await;
    let url = format!("https://127.0.0.1:{}", served.running.webhook_addr.port());
    let run = |ca: &std::path::Path, app: &str| {
        let url = url.clone();
        let ca = ca.to_path_buf();
        let app = app.to_owned();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_kaspr-packages-webhook"))
                .args([
                    "self-test",
                    "--url",
                    &url,
                    "--namespace",
                    "apps",
                    "--app",
                    &app,
                ])
                .arg("--ca-file")
                .arg(ca)
                .env_clear()
                .output()
                .expect("runs")
        })
    };
    let ok = run(&served.ca_file, "demo").await.expect("joined");
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok   ")).count(),
        3,
        "{stdout}"
    );
    assert!(
        stdout.ends_with("self-test: 3 checks, 0 failed\n"),
        "{stdout}"
    );

    // An app that has no pythonPackages cannot be patched: a failed check, exit 1.
    let missing = run(&served.ca_file, "nope").await.expect("joined");
    let stdout = String::from_utf8_lossy(&missing.stdout);
    assert_eq!(missing.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL mutate a StatefulSet of KasprApp apps/nope"),
        "{stdout}"
    );

    let unusable = run(std::path::Path::new("/nonexistent/ca.crt"), "demo")
        .await
        .expect("joined");
    assert_eq!(unusable.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&unusable.stderr)
            .starts_with("error: --ca-file /nonexistent/ca.crt: "),
        "{}",
        String::from_utf8_lossy(&unusable.stderr)
    );
    stop(served).await;
}
