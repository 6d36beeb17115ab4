//! The rustls settings of the webhook port. The certificate itself comes from
//! [`crate::certs::reload`].

use std::sync::Arc;

use crate::certs::pair::{TlsError, provider};
use crate::certs::reload::CertResolver;

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
