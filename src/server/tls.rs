//! The rustls settings of the webhook port. The certificate itself comes from
//! [`crate::certs::reload`].

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;

use crate::certs::pair::{TlsError, provider};
use crate::certs::reload::CertResolver;

/// The rustls settings of the webhook port: TLS 1.3 and 1.2 only, HTTP/2 and HTTP/1.1. With
/// `client_ca`, every client must present a certificate that CA bundle verifies (the API
/// server does, when its admission configuration gives it one for this webhook).
pub fn server_config(
    resolver: Arc<CertResolver>,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path)?),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips the certificate, so after a rotation it
    // would keep presenting the old one. Clients keep connections alive instead (the API
    // server's webhook client does not resume sessions anyway), and no session cache is held.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A verifier that requires a client certificate chaining to a CA of the PEM file at `path`.
fn client_verifier(
    path: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let bad = |message: String| TlsError::ClientCa {
        path: path.to_owned(),
        message,
    };
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("client-ca.crt");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let resolver = Arc::new(CertResolver::default());
        let error = server_config(Arc::clone(&resolver), Some(&path)).expect_err("refused");
        assert_eq!(
            error.to_string(),
            format!("--client-ca {}: holds no PEM certificate", path.display())
        );
        let missing = dir.path().join("missing.crt");
        let error = server_config(resolver, Some(&missing)).expect_err("refused");
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot read {}", missing.display())),
            "{error}"
        );
    }
}
