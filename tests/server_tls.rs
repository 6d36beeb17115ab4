//! The webhook port over real sockets on 127.0.0.1: protocol versions, chains, key formats and
//! certificate rotation through a Kubernetes Secret volume layout.

mod server_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use kaspr_packages_webhook::cache::MemoryKasprApps;
use kaspr_packages_webhook::server::{Running, Settings};
use rustls::ProtocolVersion;
use rustls::version::{TLS12, TLS13};
use server_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn apps() -> Arc<MemoryKasprApps> {
    Arc::new(MemoryKasprApps::new().with_app(fixture_yaml("kasprapp-demo.yaml")))
}

fn body(uid: &str) -> Vec<u8> {
    statefulset_review(uid, "apps", "demo")
        .to_string()
        .into_bytes()
}

/// A server over a fresh chain in a Secret volume layout.
async fn serve_fresh(pki: &TestPki, reload: Duration) -> (Running, tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (chain, key, leaf) = pki.new_leaf();
    publish_secret_volume(dir.path(), "2026_01_01_00_00_00.000000001", &chain, &key);
    let (running, certs) = start_server(
        loopback_settings(),
        apps(),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        reload,
    )
    .await;
    assert!(certs.is_loaded());
    (running, dir, leaf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_and_tls12_handshakes_serve_the_chain() {
    let pki = TestPki::new();
    let (running, _dir, leaf) = serve_fresh(&pki, Duration::from_secs(60)).await;
    for (versions, expected) in [
        (&[&TLS13][..], ProtocolVersion::TLSv1_3),
        (&[&TLS12][..], ProtocolVersion::TLSv1_2),
    ] {
        let answer = post_once(
            running.webhook_addr,
            pki.client_config(versions),
            "/mutate",
            body("uid-v"),
        )
        .await
        .expect("request");
        assert_eq!(answer.protocol, Some(expected));
        assert_eq!(answer.status, 200);
        assert_eq!(answer.json()["response"]["uid"], "uid-v");
        // Leaf plus intermediate: the client trusts only the root.
        assert_eq!(answer.chain_len, 2);
        assert_eq!(answer.leaf, leaf);
    }
    running.shutdown.trigger();
    running.wait().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_offered_through_alpn() {
    let pki = TestPki::new();
    let (running, _dir, _) = serve_fresh(&pki, Duration::from_secs(60)).await;
    let config = pki.client_config_alpn(&[&TLS13], vec![b"h2".to_vec()]);
    let tcp = tokio::net::TcpStream::connect(running.webhook_addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, driver) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(driver);
    let request = hyper::Request::post("https://localhost/mutate")
        .body(http_body_util::Full::new(axum::body::Bytes::from(body(
            "uid-h2",
        ))))
        .expect("request");
    let response = sender.send_request(request).await.expect("send");
    assert_eq!(response.status(), 200);
    running.shutdown.trigger();
    running.wait().await.expect("clean stop");
}

/// A CA for clients and a client certificate it signed: (CA PEM, client chain, client key).
fn client_pki() -> (
    String,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let client_key = KeyPair::generate().expect("key");
    let mut client_params =
        CertificateParams::new(vec!["kube-apiserver".to_owned()]).expect("params");
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params
        .signed_by(&client_key, &issuer)
        .expect("client");
    let key = rustls::pki_types::PrivateKeyDer::try_from(client_key.serialize_der()).expect("key");
    (ca.pem(), vec![client.der().clone()], key)
}

/// With a client CA configured, a caller without a certificate from it is refused at the
/// handshake, and the API server's certified calls are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_refuses_callers_without_its_certificate() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (chain, key, _) = pki.new_leaf();
    publish_secret_volume(dir.path(), "2026_01_01_00_00_00.000000001", &chain, &key);
    let (client_ca, client_chain, client_key) = client_pki();
    let ca_path = dir.path().join("client-ca.crt");
    std::fs::write(&ca_path, client_ca).expect("write");
    let settings = Settings {
        client_ca: Some(ca_path),
        ..loopback_settings()
    };
    let (running, _) = start_server(
        settings,
        apps(),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        Duration::from_secs(60),
    )
    .await;

    let anonymous = post_once(
        running.webhook_addr,
        pki.client_config(&[&TLS13]),
        "/mutate",
        body("uid-anon"),
    )
    .await;
    assert!(anonymous.is_err(), "answered without a client certificate");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.root_der.clone()).expect("root");
    let certified = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)
        .expect("client cert"),
    );
    let answer = post_once(running.webhook_addr, certified, "/mutate", body("uid-cert"))
        .await
        .expect("answered");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["response"]["uid"], "uid-cert");
    running.shutdown.trigger();
    running.wait().await.expect("clean stop");
}

/// An HTTP/2 connection to the webhook port.
async fn h2_sender(
    pki: &TestPki,
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<
    http_body_util::combinators::BoxBody<axum::body::Bytes, std::convert::Infallible>,
> {
    let config = pki.client_config_alpn(&[&TLS13], vec![b"h2".to_vec()]);
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let (sender, driver) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(driver);
    sender
}

/// The API server speaks HTTP/2: an oversized review must come back as a readable 413 there too,
/// whether the size is declared up front or only found while reading, and the stream must not
/// be reset while the client is still uploading (clients report that as a stream error instead
/// of the status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bodies_are_a_readable_413_over_http2() {
    use http_body_util::BodyExt as _;
    let pki = TestPki::new();
    let (running, _dir, _) = serve_fresh(&pki, Duration::from_secs(60)).await;
    let limit = loopback_settings().max_body_bytes;
    const CHUNK: usize = 256 * 1024;
    let chunks = (limit + 4 * CHUNK) / CHUNK;
    for declared in [true, false] {
        let (tx, rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(1);
        let frames = futures::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk)),
                rx,
            ))
        });
        let body = http_body_util::StreamBody::new(frames).boxed();
        let mut request = hyper::Request::post("https://localhost/mutate")
            .header("content-type", "application/json");
        if declared {
            request = request.header("content-length", (chunks * CHUNK).to_string());
        }
        let request = request.body(body).expect("request");
        // The client keeps uploading whatever the answer; a reset stream drops the receiver.
        let upload = tokio::spawn(async move {
            for sent in 0..chunks {
                if tx
                    .send(axum::body::Bytes::from(vec![b' '; CHUNK]))
                    .await
                    .is_err()
                {
                    return sent;
                }
            }
            chunks
        });
        let mut sender = h2_sender(&pki, running.webhook_addr).await;
        let response = sender
            .send_request(request)
            .await
            .unwrap_or_else(|e| panic!("declared={declared}: no answer over HTTP/2: {e}"));
        assert_eq!(response.status(), 413, "declared={declared}");
        let text = response
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("declared={declared}: 413 body unreadable: {e}"))
            .to_bytes();
        assert_eq!(
            std::str::from_utf8(&text).expect("utf-8"),
            format!("request body exceeds {limit} bytes\n"),
            "declared={declared}"
        );
        let sent = tokio::time::timeout(Duration::from_secs(20), upload)
            .await
            .expect("upload ends")
            .expect("upload task");
        assert_eq!(
            sent, chunks,
            "declared={declared}: the stream was reset while the client was still uploading"
        );
    }
    running.shutdown.trigger();
    running.wait().await.expect("clean stop");
}

/// A TLS 1.1 ClientHello (legacy_version 0x0302, no supported_versions extension), written by
/// hand because the test clients cannot speak TLS 1.1 at all.
fn tls11_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[0x5a; 32]); // random
    hello.push(0); // session id
    // Suites rustls supports for TLS 1.2, so the version is the only thing refused.
    let suites: [u16; 6] = [0xc02b, 0xc02c, 0xc02f, 0xc030, 0xcca8, 0xcca9];
    hello.extend_from_slice(&u16::try_from(suites.len() * 2).expect("len").to_be_bytes());
    for suite in suites {
        hello.extend_from_slice(&suite.to_be_bytes());
    }
    hello.extend_from_slice(&[1, 0]); // compression: null
    // extensions: server_name "localhost"
    let name = b"localhost";
    let mut sni = Vec::new();
    sni.extend_from_slice(&u16::try_from(name.len() + 3).expect("len").to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&u16::try_from(name.len()).expect("len").to_be_bytes());
    sni.extend_from_slice(name);
    let mut extensions = Vec::new();
    let mut push_extension = |kind: u16, body: &[u8]| {
        extensions.extend_from_slice(&kind.to_be_bytes());
        extensions.extend_from_slice(&u16::try_from(body.len()).expect("len").to_be_bytes());
        extensions.extend_from_slice(body);
    };
    push_extension(0x0000, &sni);
    // supported_groups: x25519, secp256r1
    push_extension(0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    // ec_point_formats: uncompressed
    push_extension(0x000b, &[0x01, 0x00]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
    push_extension(0x000d, &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01]);
    hello.extend_from_slice(&u16::try_from(extensions.len()).expect("len").to_be_bytes());
    hello.extend_from_slice(&extensions);

    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&u16::try_from(hello.len()).expect("len").to_be_bytes());
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&u16::try_from(handshake.len()).expect("len").to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls11_is_refused() {
    let pki = TestPki::new();
    let (running, _dir, _) = serve_fresh(&pki, Duration::from_secs(60)).await;
    let mut tcp = tokio::net::TcpStream::connect(running.webhook_addr)
        .await
        .expect("connect");
    tcp.write_all(&tls11_client_hello())
        .await
        .expect("send hello");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply)).await;
    // Either an alert record (content type 21) or a closed connection; never a ServerHello.
    assert!(read.is_ok(), "server kept the connection open");
    assert_ne!(
        reply.first(),
        Some(&0x16),
        "server answered a TLS 1.1 hello with a handshake"
    );
    if let Some(&content_type) = reply.first() {
        assert_eq!(content_type, 0x15, "expected an alert, got {reply:?}");
        // Alert description protocol_version (70).
        assert_eq!(reply.get(6), Some(&70), "{reply:?}");
    }
    running.shutdown.trigger();
    running.wait().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs1_pkcs8_and_sec1_keys_are_served() {
    let pki = TestPki::new();
    // The signing side (rcgen on ring) reads PKCS#8; the server gets each fixture's own format.
    for (served, pkcs8) in [
        ("rsa-pkcs1.pem", "rsa-pkcs8.pem"),
        ("rsa-pkcs8.pem", "rsa-pkcs8.pem"),
        ("ec-sec1.pem", "ec-pkcs8.pem"),
        ("ec-pkcs8.pem", "ec-pkcs8.pem"),
    ] {
        let signing = std::fs::read_to_string(fixture(&format!("keys/{pkcs8}"))).expect("key");
        let key = rcgen::KeyPair::from_pem(&signing).expect("rcgen key");
        let (chain, leaf) = pki.leaf_for(&key);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("tls.crt"), chain).expect("cert");
        std::fs::copy(
            fixture(&format!("keys/{served}")),
            dir.path().join("tls.key"),
        )
        .expect("key");
        let (running, certs) = start_server(
            loopback_settings(),
            apps(),
            dir.path().join("tls.crt"),
            dir.path().join("tls.key"),
            Duration::from_secs(60),
        )
        .await;
        assert!(certs.is_loaded(), "{served} not loaded");
        for versions in [&[&TLS13][..], &[&TLS12][..]] {
            let answer = post_once(
                running.webhook_addr,
                pki.client_config(versions),
                "/mutate",
                body("uid-k"),
            )
            .await
            .unwrap_or_else(|e| panic!("{served}: {e}"));
            assert_eq!(answer.status, 200, "{served}");
            assert_eq!(answer.leaf, leaf, "{served}");
        }
        running.shutdown.trigger();
        running.wait().await.expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_through_a_secret_volume_drops_nothing_and_a_bad_pair_is_ignored() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (chain_a, key_a, leaf_a) = pki.new_leaf();
    publish_secret_volume(
        dir.path(),
        "2026_01_01_00_00_00.000000001",
        &chain_a,
        &key_a,
    );
    let (running, certs) = start_server(
        loopback_settings(),
        apps(),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        Duration::from_millis(100),
    )
    .await;
    let addr = running.webhook_addr;
    let config = pki.client_config(&[&TLS13, &TLS12]);

    // Two clients run through the rotation: one on a single keep-alive connection, one opening
    // a connection per request. Both are bounded in count and stop when told.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let keep_alive = tokio::spawn({
        let (stop, sent, failures, config) =
            (stop.clone(), sent.clone(), failures.clone(), config.clone());
        async move {
            let mut connection = connect(addr, config).await.expect("first connection");
            let first_leaf = connection.leaf.clone();
            for i in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match connection.post("/mutate", body(&format!("ka-{i}"))).await {
                    Ok(answer) if answer.status == 200 => {}
                    Ok(answer) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("keep-alive status {}", answer.status)),
                    Err(e) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("keep-alive: {e}")),
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            first_leaf
        }
    });
    let fresh = tokio::spawn({
        let (stop, sent, failures, config) =
            (stop.clone(), sent.clone(), failures.clone(), config.clone());
        async move {
            for i in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match post_once(addr, config.clone(), "/mutate", body(&format!("fresh-{i}"))).await
                {
                    Ok(answer) if answer.status == 200 => {}
                    Ok(answer) => failures
                        .lock()
                        .expect("lock")
                        .push(format!("fresh status {}", answer.status)),
                    Err(e) => failures.lock().expect("lock").push(format!("fresh: {e}")),
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    let leaf_of_new_connection = || {
        let config = config.clone();
        async move {
            connect(addr, config)
                .await
                .map(|c| c.leaf)
                .unwrap_or_default()
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(leaf_of_new_connection().await, leaf_a);

    // Rotate: a new key and certificate, published by swapping ..data.
    let (chain_b, key_b, leaf_b) = pki.new_leaf();
    publish_secret_volume(
        dir.path(),
        "2026_01_02_00_00_00.000000002",
        &chain_b,
        &key_b,
    );
    let rotated = eventually(Duration::from_secs(10), || {
        let check = leaf_of_new_connection();
        let leaf_b = leaf_b.clone();
        async move { check.await == leaf_b }
    })
    .await;
    assert!(rotated, "new connections never saw the new certificate");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A bad pair (key of another certificate) is published: the served pair stays.
    let (_, other_key, _) = pki.new_leaf();
    let (chain_c, _, _) = pki.new_leaf();
    publish_secret_volume(
        dir.path(),
        "2026_01_03_00_00_00.000000003",
        &chain_c,
        &other_key,
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        leaf_of_new_connection().await,
        leaf_b,
        "a bad pair replaced the good one"
    );
    assert!(certs.is_loaded());

    // Garbage is ignored the same way.
    publish_secret_volume(
        dir.path(),
        "2026_01_04_00_00_00.000000004",
        "not a cert",
        "not a key",
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(leaf_of_new_connection().await, leaf_b);

    stop.store(true, Ordering::Relaxed);
    let first_leaf = tokio::time::timeout(Duration::from_secs(10), keep_alive)
        .await
        .expect("bounded")
        .expect("joined");
    tokio::time::timeout(Duration::from_secs(10), fresh)
        .await
        .expect("bounded")
        .expect("joined");
    // The keep-alive connection stayed on its original certificate, without interruption.
    assert_eq!(first_leaf, leaf_a);
    let failures = failures.lock().expect("lock").clone();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        sent.load(Ordering::Relaxed) > 20,
        "too few requests to mean anything"
    );

    running.shutdown.trigger();
    running.wait().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry_is_exported() {
    let pki = TestPki::new();
    let (running, _dir, _) = serve_fresh(&pki, Duration::from_secs(60)).await;
    let (status, text) = probe(running.probe_addr, "/metrics").await;
    assert_eq!(status, 200);
    let line = text
        .lines()
        .find(|l| l.starts_with("kaspr_packages_webhook_certificate_expiry_timestamp_seconds "))
        .expect("expiry line");
    let value: f64 = line
        .rsplit(' ')
        .next()
        .expect("value")
        .parse()
        .expect("number");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(value > now, "{line}");
    running.shutdown.trigger();
    running.wait().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_not_resumed_so_rotation_reaches_every_new_connection() {
    let pki = TestPki::new();
    let (running, _dir, _) = serve_fresh(&pki, Duration::from_secs(60)).await;
    for version in [&TLS13, &TLS12] {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.root_der.clone()).expect("root");
        // A client that would resume if the server let it (rustls clients resume by default).
        let config = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        for _ in 0..2 {
            let tcp = tokio::net::TcpStream::connect(running.webhook_addr)
                .await
                .expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(&config))
                .connect(name, tcp)
                .await
                .expect("handshake");
            assert_eq!(
                tls.get_ref().1.handshake_kind(),
                Some(rustls::HandshakeKind::Full)
            );
            // Read what the server sends after the handshake (a TLS 1.3 ticket, if any).
            let mut buf = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_millis(100), tls.read(&mut buf)).await;
        }
    }
    running.shutdown.trigger();
    running.wait().await.expect("clean stop");
}
