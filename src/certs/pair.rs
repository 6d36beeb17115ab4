//! A serving pair from PEM: the chain and its private key, checked to belong together, and
//! the leaf's expiry.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

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
    Generate(#[from] super::issue::IssueError),
    #[error("invalid TLS settings: {0}")]
    Config(rustls::Error),
    #[error("--client-ca {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
}

/// The ring provider, explicitly, so the server never depends on which provider a process
/// installed as its default.
pub fn provider() -> Arc<CryptoProvider> {
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

// Certificate expiry: a few lines of DER walking instead of a full X.509 parser dependency; the
// only field needed is tbsCertificate.validity.notAfter. Calendar arithmetic is the `time`
// crate's.

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
            let yy: i32 = text[0..2].parse().ok()?;
            let year = if yy >= 50 { 1900 + yy } else { 2000 + yy };
            unix_time(year, &text[2..])
        }
        // GeneralizedTime YYYYMMDDHHMMSSZ.
        0x18 if text.len() == 15 => unix_time(text[0..4].parse().ok()?, &text[4..]),
        _ => None,
    }
}

/// `MMDDHHMMSSZ` of `year` as Unix seconds.
fn unix_time(year: i32, rest: &str) -> Option<i64> {
    if !rest.ends_with('Z') || !rest.is_ascii() || rest.len() != 11 {
        return None;
    }
    let field = |i: usize| rest.get(i..i + 2)?.parse::<u8>().ok();
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    let time = time::Time::from_hms(hour, minute, second).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, time)
            .assume_utc()
            .unix_timestamp(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_dates_convert() {
        assert_eq!(unix_time(1970, "0101000000Z"), Some(0));
        assert_eq!(unix_time(2000, "0301000000Z"), Some(951_868_800));
        assert_eq!(unix_time(2038, "0119031408Z"), Some(2_147_483_648));
        assert_eq!(unix_time(2024, "1301000000Z"), None);
        assert_eq!(unix_time(2023, "0229000000Z"), None, "not a leap year");
    }

    #[test]
    fn calendar_dates_round_trip() {
        for t in [0, 951_868_800, 2_147_483_648, 1_790_000_000, -86_400] {
            let date = time::OffsetDateTime::from_unix_timestamp(t).expect("in range");
            let (m, d) = (u8::from(date.month()), date.day());
            let midnight = unix_time(date.year(), &format!("{m:02}{d:02}000000Z")).expect("valid");
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
    fn a_key_of_another_certificate_is_a_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = crate::certs::local::write_self_signed(&dir.path().join("a")).expect("a");
        let b = crate::certs::local::write_self_signed(&dir.path().join("b")).expect("b");
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
