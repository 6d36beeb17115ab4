//! The serving certificate: loaded from PEM files, re-read on a timer, swapped without restart.
//!
//! Kubernetes Secret volumes publish a new version by swapping a `..data` symlink, which
//! leaves file watches on the old inode; so the files are re-read every few seconds and
//! compared by digest. A new pair that fails to parse, or whose key does not match the
//! certificate, is logged and the previous pair kept. New handshakes pick the current pair
//! from an [`ArcSwapOption`]; open connections are never touched.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// Errors loading a certificate pair.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: invalid PEM certificate: {message}")]
    BadCertificate { path: PathBuf, message: String },
    #[error("{path}: no usable private key (PKCS#1, PKCS#8 or SEC1 PEM expected): {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("the private key in {key} does not match the certificate in {cert}: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid TLS settings: {0}")]
    Config(rustls::Error),
}

/// The ring provider, explicitly, so the server never depends on which provider a process
/// installed as its default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM chain (leaf first) and a PEM private key (PKCS#1, PKCS#8 or SEC1) into a
/// pair ready to serve, checking that the key belongs to the leaf.
pub fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::BadKey {
        path: key_path.to_owned(),
        message: e.to_string(),
    })?;
    let signing_key =
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::BadKey {
                path: key_path.to_owned(),
                message: e.to_string(),
            })?;
    let pair = CertifiedKey::new(chain, signing_key);
    match pair.keys_match() {
        // Some key types cannot report their public half; accept those as rustls does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(pair)
        }
        Err(e) => Err(TlsError::Mismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// Hands every new handshake the current pair.
#[derive(Debug, Default)]
pub struct CertResolver {
    current: ArcSwapOption<CertifiedKey>,
}

impl CertResolver {
    pub fn set(&self, pair: Arc<CertifiedKey>) {
        self.current.store(Some(pair));
    }

    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // `None` (nothing loaded yet) makes rustls abort the handshake with an alert.
        self.current.load_full()
    }
}

/// The rustls settings of the webhook port: TLS 1.3 and 1.2 only, HTTP/2 and HTTP/1.1.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips the certificate, so after a rotation it
    // would keep presenting the old one. Clients keep connections alive instead (the API
    // server's webhook client does not resume sessions anyway), and no session cache is held.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The outcome of one look at the files.
#[derive(Debug)]
pub enum Reload {
    /// Same content as the last look.
    Unchanged,
    /// A new pair is being served.
    Loaded { not_after: Option<i64> },
    /// The files changed but the new pair is unusable; the previous one (if any) stays.
    Rejected(TlsError),
}

/// Keeps the resolver's pair in step with two files.
#[derive(Debug)]
pub struct CertReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    resolver: Arc<CertResolver>,
    /// Digest of the content last looked at, good or bad, so a bad pair is reported once.
    last_seen: Mutex<Option<[u8; 32]>>,
    loaded: AtomicBool,
    /// `notAfter` of the served leaf as Unix seconds; `i64::MIN` when unknown.
    not_after: AtomicI64,
}

impl CertReloader {
    pub fn new(cert_path: PathBuf, key_path: PathBuf) -> Self {
        CertReloader {
            cert_path,
            key_path,
            resolver: Arc::new(CertResolver::default()),
            last_seen: Mutex::new(None),
            loaded: AtomicBool::new(false),
            not_after: AtomicI64::new(i64::MIN),
        }
    }

    pub fn resolver(&self) -> Arc<CertResolver> {
        Arc::clone(&self.resolver)
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// True once a pair has been loaded (readiness).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Expiry of the served certificate, as Unix seconds.
    pub fn not_after(&self) -> Option<i64> {
        match self.not_after.load(Ordering::Relaxed) {
            i64::MIN => None,
            t => Some(t),
        }
    }

    /// Reads both files; when their content differs from the last look, parses and serves them.
    pub async fn reload(&self) -> Reload {
        let mut files = self.read_consistent().await;
        if files.is_err() {
            // A Secret volume update removes the old version right after the swap; a read that
            // raced it succeeds a moment later.
            tokio::time::sleep(Duration::from_millis(100)).await;
            files = self.read_consistent().await;
        }
        let (cert, key) = match files {
            Ok(files) => files,
            Err(error) => {
                // Report a missing file once, not every tick.
                let digest = Sha256::digest(error.to_string().as_bytes()).into();
                return if self.remember(digest) {
                    Reload::Rejected(error)
                } else {
                    Reload::Unchanged
                };
            }
        };
        let mut hasher = Sha256::new();
        hasher.update((cert.len() as u64).to_le_bytes());
        hasher.update(&cert);
        hasher.update(&key);
        if !self.remember(hasher.finalize().into()) {
            return Reload::Unchanged;
        }
        match parse_pair(&cert, &key, &self.cert_path, &self.key_path) {
            Ok(pair) => {
                let not_after = pair
                    .end_entity_cert()
                    .ok()
                    .and_then(|leaf| not_after(leaf.as_ref()));
                self.not_after
                    .store(not_after.unwrap_or(i64::MIN), Ordering::Relaxed);
                self.resolver.set(Arc::new(pair));
                self.loaded.store(true, Ordering::Release);
                Reload::Loaded { not_after }
            }
            Err(error) => Reload::Rejected(error),
        }
    }

    /// Records `digest` as the last content seen; false when it was already the last.
    fn remember(&self, digest: [u8; 32]) -> bool {
        let mut last = self
            .last_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *last == Some(digest) {
            return false;
        }
        *last = Some(digest);
        true
    }

    /// Reads the certificate, the key, and the certificate again; if the certificate changed
    /// meanwhile (a symlink swap between the two reads), reads again, so a rotation is not
    /// mistaken for a mismatched pair.
    async fn read_consistent(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let read = |path: &Path| {
            let path = path.to_owned();
            async move {
                tokio::fs::read(&path)
                    .await
                    .map_err(|source| TlsError::Read { path, source })
            }
        };
        let mut cert = read(&self.cert_path).await?;
        for _ in 0..3 {
            let key = read(&self.key_path).await?;
            let again = read(&self.cert_path).await?;
            if again == cert {
                return Ok((cert, key));
            }
            cert = again;
        }
        let key = read(&self.key_path).await?;
        Ok((cert, key))
    }

    /// Re-reads the files every `interval` and logs what happened. Runs until dropped.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.reload_and_log().await;
        }
    }

    /// One reload, logged.
    pub async fn reload_and_log(&self) {
        match self.reload().await {
            Reload::Unchanged => {}
            Reload::Loaded { not_after } => {
                let expires = not_after
                    .map(format_unix)
                    .unwrap_or_else(|| "unknown".into());
                tracing::info!(cert = %self.cert_path.display(), %expires, "serving certificate loaded");
            }
            Reload::Rejected(error) if self.is_loaded() => {
                tracing::warn!(%error, "new certificate files are unusable; keeping the current certificate");
            }
            Reload::Rejected(error) => {
                tracing::warn!(%error, "no usable certificate yet; the webhook port refuses handshakes until there is one");
            }
        }
    }
}

fn format_unix(seconds: i64) -> String {
    u64::try_from(seconds)
        .map(|s| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
        })
        .unwrap_or_else(|_| seconds.to_string())
}

// ---------------------------------------------------------------------------------------------
// Certificate expiry: a few lines of DER walking instead of a full X.509 parser dependency; the
// only field needed is tbsCertificate.validity.notAfter.

/// Splits one DER element off `input`: (tag, content, rest).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// `notAfter` of a DER certificate, as Unix seconds.
pub fn not_after(cert_der: &[u8]) -> Option<i64> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, certificate, _) = der_element(cert_der)? else {
        return None;
    };
    let (SEQUENCE, mut tbs, _) = der_element(certificate)? else {
        return None;
    };
    // [0] EXPLICIT version, present in every v3 certificate.
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs)?.2;
    }
    let (_serial, _, tbs) = der_element(tbs)?;
    let (_signature, _, tbs) = der_element(tbs)?;
    let (_issuer, _, tbs) = der_element(tbs)?;
    let (SEQUENCE, validity, _) = der_element(tbs)? else {
        return None;
    };
    let (_not_before, _, validity) = der_element(validity)?;
    let (tag, time, _) = der_element(validity)?;
    let text = std::str::from_utf8(time).ok()?;
    match tag {
        // UTCTime YYMMDDHHMMSSZ; RFC 5280: YY >= 50 is 19YY.
        0x17 if text.len() == 13 => {
            let yy: i64 = text[0..2].parse().ok()?;
            let year = if yy >= 50 { 1900 + yy } else { 2000 + yy };
            unix_time(year, &text[2..])
        }
        // GeneralizedTime YYYYMMDDHHMMSSZ.
        0x18 if text.len() == 15 => unix_time(text[0..4].parse().ok()?, &text[4..]),
        _ => None,
    }
}

/// The civil date (year, month, day) of a Unix time (Howard Hinnant's algorithm, inverted).
fn civil_date(unix_seconds: i64) -> (i64, u8, u8) {
    let z = unix_seconds.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both fit: day is 1..=31 and month 1..=12 by construction.
    (
        year,
        u8::try_from(month).unwrap_or(1),
        u8::try_from(day).unwrap_or(1),
    )
}

/// `MMDDHHMMSSZ` of `year` as Unix seconds.
fn unix_time(year: i64, rest: &str) -> Option<i64> {
    if !rest.ends_with('Z') || !rest.is_ascii() {
        return None;
    }
    let field = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

// ---------------------------------------------------------------------------------------------
// Self-signed pair for local use.

/// Where [`write_self_signed`] put its files.
#[derive(Debug, Clone)]
pub struct SelfSigned {
    pub ca_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// Generates a CA and a serving certificate for `localhost`, `127.0.0.1` and `::1`, signed by
/// that CA, and writes `ca.crt`, `tls.crt` (leaf then CA) and `tls.key` into `dir` (created
/// with mode 0700; the key file 0600). A fresh pair on every start, valid from yesterday for a year.
pub fn write_self_signed(dir: &Path) -> Result<SelfSigned, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use std::os::unix::fs::PermissionsExt;

    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(write_err(dir))?;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let (year, month, day) = civil_date(now - 86_400);
    let not_before = rcgen::date_time_ymd(i32::try_from(year).unwrap_or(2026), month, day);
    let (year, month, day) = civil_date(now + 365 * 86_400);
    let not_after = rcgen::date_time_ymd(i32::try_from(year).unwrap_or(2027), month, day);

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kaspr-packages-webhook local CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.not_before = not_before;
    leaf_params.not_after = not_after;
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer)?;

    let paths = SelfSigned {
        ca_path: dir.join("ca.crt"),
        cert_path: dir.join("tls.crt"),
        key_path: dir.join("tls.key"),
    };
    let write = |path: &Path, content: String, mode: u32| -> Result<(), TlsError> {
        // Written to a temporary name and renamed, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, content).map_err(write_err(&tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(write_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(write_err(path))
    };
    write(&paths.key_path, leaf_key.serialize_pem(), 0o600)?;
    write(
        &paths.cert_path,
        format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
        0o644,
    )?;
    write(&paths.ca_path, ca_cert.pem(), 0o644)?;
    Ok(paths)
}

/// The default directory for the self-signed pair: `$XDG_RUNTIME_DIR/kaspr-packages-webhook`
/// when set (private to the user), else `kaspr-packages-webhook` in the system temp dir.
pub fn default_self_signed_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("kaspr-packages-webhook"),
        _ => std::env::temp_dir().join("kaspr-packages-webhook"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_convert() {
        assert_eq!(unix_time(1970, "0101000000Z"), Some(0));
        assert_eq!(unix_time(2000, "0301000000Z"), Some(951_868_800));
        assert_eq!(unix_time(2038, "0119031408Z"), Some(2_147_483_648));
        assert_eq!(unix_time(2024, "1301000000Z"), None);
    }

    #[test]
    fn civil_dates_round_trip() {
        for t in [0, 951_868_800, 2_147_483_648, 1_790_000_000, -86_400] {
            let (y, m, d) = civil_date(t);
            let midnight = unix_time(y, &format!("{m:02}{d:02}000000Z")).expect("valid");
            assert_eq!(midnight, t - t.rem_euclid(86_400), "{t}");
        }
    }

    #[test]
    fn reads_not_after_of_generated_certificates() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2049, 12, 31); // UTCTime
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(not_after(cert.der()), unix_time(2049, "1231000000Z"));
        params.not_after = rcgen::date_time_ymd(2051, 1, 2); // GeneralizedTime
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(not_after(cert.der()), unix_time(2051, "0102000000Z"));
    }

    #[test]
    fn garbage_has_no_expiry() {
        assert_eq!(not_after(&[]), None);
        assert_eq!(not_after(&[0x30, 0x85, 0, 0, 0, 0, 0]), None);
        assert_eq!(not_after(&[0x30, 0x03, 0x30, 0x01]), None);
    }

    #[test]
    fn self_signed_pair_loads_and_chains() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = write_self_signed(&dir.path().join("certs")).expect("generate");
        let cert = std::fs::read(&out.cert_path).expect("cert");
        let key = std::fs::read(&out.key_path).expect("key");
        let pair = parse_pair(&cert, &key, &out.cert_path, &out.key_path).expect("pair");
        assert_eq!(pair.cert.len(), 2);
        let expiry = not_after(pair.cert[0].as_ref()).expect("expiry");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let days = (expiry - i64::try_from(now).expect("now")) / 86_400;
        assert!((363..=366).contains(&days), "{days}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out.key_path)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn reload_swaps_good_pairs_and_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = write_self_signed(&dir.path().join("a")).expect("a");
        let b = write_self_signed(&dir.path().join("b")).expect("b");
        let cert = dir.path().join("tls.crt");
        let key = dir.path().join("tls.key");
        let reloader = CertReloader::new(cert.clone(), key.clone());
        let served = |r: &CertReloader| r.resolver().current().map(|p| p.cert[0].clone());

        assert!(matches!(
            reloader.reload().await,
            Reload::Rejected(TlsError::Read { .. })
        ));
        assert!(
            matches!(reloader.reload().await, Reload::Unchanged),
            "same error reported once"
        );
        assert!(!reloader.is_loaded() && served(&reloader).is_none());

        std::fs::copy(&a.cert_path, &cert).expect("copy");
        std::fs::copy(&a.key_path, &key).expect("copy");
        assert!(matches!(
            reloader.reload().await,
            Reload::Loaded { not_after: Some(_) }
        ));
        assert!(matches!(reloader.reload().await, Reload::Unchanged));
        let first = served(&reloader).expect("served");

        // A key of another certificate: rejected once, the first pair stays.
        std::fs::copy(&b.key_path, &key).expect("copy");
        assert!(matches!(
            reloader.reload().await,
            Reload::Rejected(TlsError::Mismatch { .. })
        ));
        assert!(matches!(reloader.reload().await, Reload::Unchanged));
        assert_eq!(served(&reloader), Some(first.clone()));
        assert!(reloader.is_loaded());

        std::fs::copy(&b.cert_path, &cert).expect("copy");
        assert!(matches!(reloader.reload().await, Reload::Loaded { .. }));
        assert_ne!(served(&reloader), Some(first));
    }

    #[test]
    fn a_key_of_another_certificate_is_a_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = write_self_signed(&dir.path().join("a")).expect("a");
        let b = write_self_signed(&dir.path().join("b")).expect("b");
        let cert = std::fs::read(&a.cert_path).expect("cert");
        let key = std::fs::read(&b.key_path).expect("key");
        assert!(matches!(
            parse_pair(&cert, &key, &a.cert_path, &b.key_path),
            Err(TlsError::Mismatch { .. })
        ));
        assert!(matches!(
            parse_pair(b"", &key, &a.cert_path, &b.key_path),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(matches!(
            parse_pair(&cert, b"nope", &a.cert_path, &b.key_path),
            Err(TlsError::BadKey { .. })
        ));
    }
}
