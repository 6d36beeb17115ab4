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
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

use super::pair::{TlsError, not_after, parse_pair};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::local::write_self_signed;

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
}
