//! Shared helpers of the `server_*` integration tests: certificates made with rcgen, a
//! Kubernetes Secret volume layout, an HTTPS client, and a server started on 127.0.0.1.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use kaspr_packages_webhook::cache::KasprApps;
use kaspr_packages_webhook::certs::reload::CertReloader;
use kaspr_packages_webhook::metrics;
use kaspr_packages_webhook::server::{self, BackgroundTask, Running, Services, Settings, Shutdown};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/server")
        .join(name)
}

pub fn fixture_json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name)).expect("read fixture");
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn fixture_yaml(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name)).expect("read fixture");
    serde_yaml::from_str(&text).expect("fixture is YAML")
}

/// A root CA and an intermediate CA; leaves are signed by the intermediate, so a client that
/// trusts only the root needs the server to send the chain.
pub struct TestPki {
    pub root_der: CertificateDer<'static>,
    intermediate_pem: String,
    intermediate: Issuer<'static, KeyPair>,
}

impl TestPki {
    pub fn new() -> Self {
        let root_key = KeyPair::generate().expect("root key");
        let mut root_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params
            .distinguished_name
            .push(DnType::CommonName, "test root");
        root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(root_params, root_key);

        let inter_key = KeyPair::generate().expect("intermediate key");
        let mut inter_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        inter_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        inter_params
            .distinguished_name
            .push(DnType::CommonName, "test intermediate");
        inter_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let inter = inter_params
            .signed_by(&inter_key, &root_issuer)
            .expect("intermediate");
        TestPki {
            root_der: root.der().clone(),
            intermediate_pem: inter.pem(),
            intermediate: Issuer::new(inter_params, inter_key),
        }
    }

    /// The root CA as PEM, as a caBundle or a `--ca-file` holds it.
    pub fn root_pem(&self) -> String {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode(&self.root_der);
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }

    /// A chain PEM (leaf, intermediate) for `localhost`/127.0.0.1 with the given key, and the
    /// leaf's DER.
    pub fn leaf_for(&self, key: &KeyPair) -> (String, Vec<u8>) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf = params.signed_by(key, &self.intermediate).expect("leaf");
        (
            format!("{}{}", leaf.pem(), self.intermediate_pem),
            leaf.der().to_vec(),
        )
    }

    /// A fresh EC key and its chain: (chain PEM, key PEM, leaf DER).
    pub fn new_leaf(&self) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().expect("leaf key");
        let (chain, der) = self.leaf_for(&key);
        (chain, key.serialize_pem(), der)
    }

    pub fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        self.client_config_alpn(versions, Vec::new())
    }

    pub fn client_config_alpn(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: Vec<Vec<u8>>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root_der.clone()).expect("root");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn;
        // Every connection makes a full handshake, as the API server's client does; a resumed
        // session would show the certificate of the session it resumes.
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }
}

/// Writes a pair the way the kubelet publishes a Secret volume: the files live in a
/// `..<version>` directory, `..data` points at it, and `tls.crt`/`tls.key` point through
/// `..data`. Publishing again swaps `..data` atomically and removes the previous directory.
pub fn publish_secret_volume(dir: &Path, version: &str, cert_pem: &str, key_pem: &str) {
    use std::os::unix::fs::symlink;
    let versioned = format!("..{version}");
    let target = dir.join(&versioned);
    std::fs::create_dir_all(&target).expect("version dir");
    std::fs::write(target.join("tls.crt"), cert_pem).expect("write cert");
    std::fs::write(target.join("tls.key"), key_pem).expect("write key");
    let data = dir.join("..data");
    let previous = std::fs::read_link(&data).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&versioned, &tmp).expect("tmp link");
    std::fs::rename(&tmp, &data).expect("swap ..data");
    for name in ["tls.crt", "tls.key"] {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{name}"), &link).expect("file link");
        }
    }
    if let Some(previous) = previous
        && previous != Path::new(&versioned)
    {
        std::fs::remove_dir_all(dir.join(previous)).expect("remove old version");
    }
}

/// What one HTTPS request saw.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    pub leaf: Vec<u8>,
    pub chain_len: usize,
    pub protocol: Option<rustls::ProtocolVersion>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON answer")
    }
}

/// An HTTP/1.1 connection over TLS that can send several requests (keep-alive).
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    pub leaf: Vec<u8>,
    pub chain_len: usize,
    pub protocol: Option<rustls::ProtocolVersion>,
}

pub async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Connection, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (_, session) = tls.get_ref();
    let chain = session.peer_certificates().unwrap_or_default();
    let leaf = chain.first().map(|c| c.to_vec()).unwrap_or_default();
    let chain_len = chain.len();
    let protocol = session.protocol_version();
    let (sender, driver) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(driver);
    Ok(Connection {
        sender,
        leaf,
        chain_len,
        protocol,
    })
}

impl Connection {
    pub async fn post(&mut self, path: &str, body: Vec<u8>) -> Result<Answer, String> {
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        self.sender
            .ready()
            .await
            .map_err(|e| format!("not ready: {e}"))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Answer {
            status,
            body,
            leaf: self.leaf.clone(),
            chain_len: self.chain_len,
            protocol: self.protocol,
        })
    }
}

/// One request on a new connection.
pub async fn post_once(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    body: Vec<u8>,
) -> Result<Answer, String> {
    connect(addr, config).await?.post(path, body).await
}

/// A plain-HTTP GET on the probe port: (status, body).
pub async fn probe(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("probe connect");
    let (mut sender, driver) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("probe handshake");
    tokio::spawn(driver);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("probe request");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("probe body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An AdmissionReview for a StatefulSet owned by KasprApp `app` in `namespace`.
pub fn statefulset_review(uid: &str, namespace: &str, app: &str) -> Value {
    let mut review = fixture_json("review-statefulset.json");
    review["request"]["uid"] = json!(uid);
    review["request"]["namespace"] = json!(namespace);
    review["request"]["object"]["metadata"]["namespace"] = json!(namespace);
    review["request"]["object"]["metadata"]["ownerReferences"][0]["name"] = json!(app);
    review
}

/// Settings on random loopback ports.
pub fn loopback_settings() -> Settings {
    Settings {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        probe_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Settings::default()
    }
}

/// Starts a server over the given cert files and KasprApps, re-reading the files every
/// `reload`.
pub async fn start_server(
    settings: Settings,
    apps: Arc<dyn KasprApps>,
    cert: PathBuf,
    key: PathBuf,
    reload: Duration,
) -> (Running, Arc<CertReloader>) {
    let certs = Arc::new(CertReloader::new(cert, key));
    certs.reload_and_log().await;
    let tasks = vec![BackgroundTask::new(
        "certificate-reload",
        Arc::clone(&certs).watch(reload),
    )];
    let services = Services {
        apps,
        certs: Arc::clone(&certs),
        registry: metrics::new_registry(),
        tasks,
    };
    let running = server::start(settings, services, Shutdown::new())
        .await
        .expect("server starts");
    (running, certs)
}

/// Polls `check` every 20 ms until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
