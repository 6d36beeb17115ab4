//! The one certificate issuer: a CA and a serving certificate signed by it. Self-managed
//! certificates and the local self-signed pair both come from here.

/// A freshly issued generation, PEM.
pub struct Issued {
    pub ca: String,
    /// Leaf, then CA.
    pub chain: String,
    pub key: String,
}

/// Errors issuing a certificate.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("cannot issue a certificate for {names:?}: {source}")]
    Rcgen {
        names: Vec<String>,
        source: rcgen::Error,
    },
    #[error("the certificate validity ({not_before}..{not_after}, Unix seconds) is out of range")]
    Validity { not_before: i64, not_after: i64 },
}

/// Issues a CA named `ca_name` and a serving certificate for `names` (DNS names or IP
/// addresses; the first is also the common name), both valid from `not_before` to
/// `not_after` (Unix seconds). The CA can sign only end-entity certificates, and its key is
/// dropped when this returns.
pub fn issue(
    names: &[String],
    ca_name: &str,
    not_before: i64,
    not_after: i64,
) -> Result<Issued, IssueError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let err = |source| IssueError::Rcgen {
        names: names.to_vec(),
        source,
    };
    let validity = || IssueError::Validity {
        not_before,
        not_after,
    };
    let time = |t: i64| time::OffsetDateTime::from_unix_timestamp(t).map_err(|_| validity());
    let (start, end) = (time(not_before)?, time(not_after)?);
    if start >= end {
        return Err(validity());
    }

    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.not_before = start;
    ca_params.not_after = end;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate().map_err(err)?;
    let mut leaf_params = CertificateParams::new(names.to_vec()).map_err(err)?;
    let common_name = names
        .first()
        .map_or("kaspr-packages-webhook", String::as_str);
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    leaf_params.not_before = start;
    leaf_params.not_after = end;
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer).map_err(err)?;
    Ok(Issued {
        ca: ca_cert.pem(),
        chain: format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
        key: leaf_key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_reversed_validity_is_refused() {
        let names = ["localhost".to_owned()];
        assert!(matches!(
            issue(&names, "ca", 100, 100),
            Err(IssueError::Validity { .. })
        ));
        assert!(matches!(
            issue(&names, "ca", i64::MAX, i64::MAX),
            Err(IssueError::Validity { .. })
        ));
    }
}
