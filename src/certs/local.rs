//! A self-signed pair for local use (`serve` without certificate flags): a CA and a serving
//! certificate for `localhost`, issued by the same code as self-managed certificates.

use std::path::{Path, PathBuf};

use super::issue::issue;
use super::pair::TlsError;

/// Where [`write_self_signed`] put its files.
#[derive(Debug, Clone)]
pub struct SelfSigned {
    pub ca_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// Generates a CA and a serving certificate for `localhost`, `127.0.0.1` and `::1`, signed by
/// that CA, and writes `ca.crt`, `tls.crt` (leaf then CA) and `tls.key` into `dir` (created
/// with mode 0700; the key file 0600). A fresh pair on every start, valid from a day ago for a year.
pub fn write_self_signed(dir: &Path) -> Result<SelfSigned, TlsError> {
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
    let names = ["localhost", "127.0.0.1", "::1"].map(str::to_owned);
    let issued = issue(
        &names,
        "kaspr-packages-webhook local CA",
        now - 86_400,
        now + 365 * 86_400,
    )?;

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
    write(&paths.key_path, issued.key, 0o600)?;
    write(&paths.cert_path, issued.chain, 0o644)?;
    write(&paths.ca_path, issued.ca, 0o644)?;
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
    use crate::certs::pair::{not_after, parse_pair};

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
}
