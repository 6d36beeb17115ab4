//! The self-managed certificate state kept in one Secret, and its transitions. Pure: the
//! caller reads the Secret, asks [`plan`] what it should hold now, and writes the answer back
//! with optimistic concurrency.
//!
//! A *generation* is a CA and a serving certificate issued together; the CA's private key is
//! dropped right after signing, so the Secret never holds a key that can sign anything. A
//! rotation never swaps what is served and what is trusted in one step:
//!
//! ```text
//!   steady     served A   trusted {A}
//!   staged     served A   trusted {A, B}      when A is within renew-before of expiry
//!   promoted   served B   trusted {A, B}      overlap after staging, once B is in every caBundle
//!   retired    served B   trusted {B}         overlap after promotion
//! ```
//!
//! Replicas that read the Secret at any point serve a leaf that every caBundle written so far
//! trusts, provided each replica re-reads the Secret more often than the overlap.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::issue::{IssueError, Issued};
use super::pair::{not_after, parse_pair};

/// The CA of the served generation.
pub const CA_CERT: &str = "ca.crt";
/// The served chain: leaf, then its CA.
pub const TLS_CERT: &str = "tls.crt";
/// The served leaf's private key.
pub const TLS_KEY: &str = "tls.key";
/// The staged generation (present between staging and promotion).
pub const NEXT_CA_CERT: &str = "next-ca.crt";
pub const NEXT_TLS_CERT: &str = "next-tls.crt";
pub const NEXT_TLS_KEY: &str = "next-tls.key";
/// The CA of the generation served before the last promotion (until it is retired).
pub const PREVIOUS_CA_CERT: &str = "previous-ca.crt";
/// Every CA currently trusted, PEM, in the order previous, current, next: what goes into the
/// webhook configurations' `caBundle`.
pub const CA_BUNDLE: &str = "ca-bundle.crt";

/// Unix time at which the next generation was staged.
pub const STAGED_AT: &str = "packages.kaspr.io/next-staged-at";
/// Unix time of the last promotion (present while the previous CA is still trusted).
pub const PROMOTED_AT: &str = "packages.kaspr.io/promoted-at";
/// The DNS names and IPs of the served leaf, comma-separated.
pub const NAMES: &str = "packages.kaspr.io/names";
/// The DNS names and IPs of the staged leaf.
pub const NEXT_NAMES: &str = "packages.kaspr.io/next-names";

/// Data keys and annotations this module owns; anything else in the Secret is left alone.
const OWNED_KEYS: [&str; 8] = [
    CA_CERT,
    TLS_CERT,
    TLS_KEY,
    NEXT_CA_CERT,
    NEXT_TLS_CERT,
    NEXT_TLS_KEY,
    PREVIOUS_CA_CERT,
    CA_BUNDLE,
];
const OWNED_ANNOTATIONS: [&str; 4] = [STAGED_AT, PROMOTED_AT, NAMES, NEXT_NAMES];

/// Errors issuing certificates.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error(transparent)]
    Issue(#[from] IssueError),
}

/// What the Secret holds, as far as this module is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub data: BTreeMap<String, Vec<u8>>,
    pub annotations: BTreeMap<String, String>,
}

impl Stored {
    fn text(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    fn time(&self, annotation: &str) -> Option<i64> {
        self.annotations.get(annotation)?.parse().ok()
    }

    /// The PEM bundle of trusted CAs.
    pub fn ca_bundle(&self) -> Option<&[u8]> {
        self.data.get(CA_BUNDLE).map(Vec::as_slice)
    }

    /// The served chain and key.
    pub fn serving_pair(&self) -> Option<(&[u8], &[u8])> {
        Some((self.data.get(TLS_CERT)?, self.data.get(TLS_KEY)?))
    }
}

/// How certificates are issued and rotated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Subject alternative names of the serving certificate (DNS names or IP addresses).
    pub names: Vec<String>,
    /// Lifetime of each generation (CA and leaf alike).
    pub validity: Duration,
    /// Stage the next generation this long before the served one expires.
    pub renew_before: Duration,
    /// How long a staged CA is trusted before it is served, and an old CA after it stopped being.
    pub overlap: Duration,
}

impl Policy {
    fn names_key(&self) -> String {
        names_key(&self.names)
    }
}

fn names_key(names: &[String]) -> String {
    let mut sorted: Vec<&str> = names.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.join(",")
}

fn seconds(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

/// Why the Secret changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing usable was stored (first start, expired, corrupt): a new generation is served
    /// and trusted at once.
    Issued,
    /// A new generation is trusted but not yet served.
    Staged,
    /// The staged generation is now served; the previous CA stays trusted.
    Promoted,
    /// The previous CA is no longer trusted.
    Retired,
    /// The CA bundle did not match the stored CAs and was rewritten.
    Repaired,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Issued => "issued",
            Transition::Staged => "staged",
            Transition::Promoted => "promoted",
            Transition::Retired => "retired",
            Transition::Repaired => "repaired",
        }
    }
}

/// A usable generation read from the Secret.
struct Generation {
    ca: String,
    not_after: i64,
}

/// Reads a generation (CA, chain, key) and checks the key matches and the leaf is valid.
fn generation(stored: &Stored, ca: &str, cert: &str, key: &str) -> Option<Generation> {
    let ca_pem = stored.text(ca)?;
    let cert_pem = stored.data.get(cert)?;
    let key_pem = stored.data.get(key)?;
    CertificateDer::from_pem_slice(ca_pem.as_bytes()).ok()?;
    let pair = parse_pair(cert_pem, key_pem, Path::new(cert), Path::new(key)).ok()?;
    let not_after = not_after(pair.end_entity_cert().ok()?.as_ref())?;
    Some(Generation {
        ca: ca_pem.to_owned(),
        not_after,
    })
}

/// The bundle for the given CAs, in order.
fn bundle<'a>(cas: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = String::new();
    for ca in cas {
        out.push_str(ca.trim_end());
        out.push('\n');
    }
    out.into_bytes()
}

/// What the Secret should hold at `now`, or `None` when it already holds it.
///
/// `trusted_bundle` is the bundle this replica last confirmed in every webhook configuration;
/// a staged generation is promoted only once its CA is in there, so no replica serves a leaf
/// the API server cannot verify yet.
pub fn plan(
    stored: &Stored,
    now: i64,
    policy: &Policy,
    trusted_bundle: Option<&[u8]>,
) -> Result<Option<(Stored, Transition)>, AuthorityError> {
    let active = generation(stored, CA_CERT, TLS_CERT, TLS_KEY).filter(|g| g.not_after > now);
    let Some(active) = active else {
        let issued = issue(&policy.names, now, policy.validity)?;
        let mut next = without_owned(stored);
        next.data
            .insert(CA_CERT.into(), issued.ca.clone().into_bytes());
        next.data.insert(TLS_CERT.into(), issued.chain.into_bytes());
        next.data.insert(TLS_KEY.into(), issued.key.into_bytes());
        next.data
            .insert(CA_BUNDLE.into(), bundle([issued.ca.as_str()]));
        next.annotations.insert(NAMES.into(), policy.names_key());
        return Ok(Some((next, Transition::Issued)));
    };
    let staged = generation(stored, NEXT_CA_CERT, NEXT_TLS_CERT, NEXT_TLS_KEY)
        .filter(|g| g.not_after > now)
        .zip(stored.time(STAGED_AT));
    let previous = stored.text(PREVIOUS_CA_CERT).zip(stored.time(PROMOTED_AT));
    let overlap = seconds(policy.overlap);

    let mut next = stored.clone();
    let transition = if let Some((_, promoted_at)) = previous
        && now >= promoted_at.saturating_add(overlap)
    {
        next.data.remove(PREVIOUS_CA_CERT);
        next.annotations.remove(PROMOTED_AT);
        Transition::Retired
    } else if let Some((ref staged_gen, staged_at)) = staged
        && previous.is_none()
        && now >= staged_at.saturating_add(overlap)
        && trusted_bundle.is_some_and(|b| contains(b, &staged_gen.ca))
    {
        for (from, to) in [
            (NEXT_CA_CERT, CA_CERT),
            (NEXT_TLS_CERT, TLS_CERT),
            (NEXT_TLS_KEY, TLS_KEY),
        ] {
            if let Some(value) = next.data.remove(from) {
                next.data.insert(to.into(), value);
            }
        }
        next.data
            .insert(PREVIOUS_CA_CERT.into(), active.ca.into_bytes());
        next.annotations.remove(STAGED_AT);
        let names = next.annotations.remove(NEXT_NAMES).unwrap_or_default();
        next.annotations.insert(NAMES.into(), names);
        next.annotations.insert(PROMOTED_AT.into(), now.to_string());
        Transition::Promoted
    } else if staged.is_none()
        && (active.not_after.saturating_sub(now) <= seconds(policy.renew_before)
            || stored.annotations.get(NAMES) != Some(&policy.names_key()))
    {
        let issued = issue(&policy.names, now, policy.validity)?;
        next.data
            .insert(NEXT_CA_CERT.into(), issued.ca.into_bytes());
        next.data
            .insert(NEXT_TLS_CERT.into(), issued.chain.into_bytes());
        next.data
            .insert(NEXT_TLS_KEY.into(), issued.key.into_bytes());
        next.annotations.insert(STAGED_AT.into(), now.to_string());
        next.annotations
            .insert(NEXT_NAMES.into(), policy.names_key());
        Transition::Staged
    } else {
        Transition::Repaired
    };
    if staged.is_none() && transition != Transition::Staged {
        // A half-written or expired staged generation is dropped (and staged again if due).
        for key in [NEXT_CA_CERT, NEXT_TLS_CERT, NEXT_TLS_KEY] {
            next.data.remove(key);
        }
        next.annotations.remove(STAGED_AT);
        next.annotations.remove(NEXT_NAMES);
    }
    if previous.is_none() && transition != Transition::Promoted {
        // A previous CA without its promotion time cannot be retired on schedule: drop it.
        next.data.remove(PREVIOUS_CA_CERT);
        next.annotations.remove(PROMOTED_AT);
    }
    let cas: Vec<String> = [PREVIOUS_CA_CERT, CA_CERT, NEXT_CA_CERT]
        .iter()
        .filter_map(|key| next.text(key).map(str::to_owned))
        .collect();
    next.data
        .insert(CA_BUNDLE.into(), bundle(cas.iter().map(String::as_str)));
    Ok((next != *stored).then_some((next, transition)))
}

fn contains(bundle: &[u8], ca_pem: &str) -> bool {
    std::str::from_utf8(bundle).is_ok_and(|b| b.contains(ca_pem.trim_end()))
}

fn without_owned(stored: &Stored) -> Stored {
    let mut out = stored.clone();
    for key in OWNED_KEYS {
        out.data.remove(key);
    }
    for annotation in OWNED_ANNOTATIONS {
        out.annotations.remove(annotation);
    }
    out
}

/// Issues a CA and a serving certificate for `names`, valid from a few minutes before `now`
/// (clock skew between nodes) for `validity`.
pub fn issue(names: &[String], now: i64, validity: Duration) -> Result<Issued, AuthorityError> {
    Ok(super::issue::issue(
        names,
        &format!("kaspr-packages-webhook CA {now}"),
        now.saturating_sub(300),
        now.saturating_add(seconds(validity)),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn policy() -> Policy {
        Policy {
            names: vec!["hook.ns.svc".into(), "127.0.0.1".into()],
            validity: Duration::from_secs(10 * DAY as u64),
            renew_before: Duration::from_secs(3 * DAY as u64),
            overlap: Duration::from_secs(600),
        }
    }

    fn step(stored: &Stored, now: i64, trusted: Option<&[u8]>) -> (Stored, Transition) {
        plan(stored, now, &policy(), trusted)
            .expect("plan")
            .expect("a transition")
    }

    fn settled(stored: &Stored, now: i64, trusted: Option<&[u8]>) {
        assert_eq!(plan(stored, now, &policy(), trusted).expect("plan"), None);
    }

    fn cas(stored: &Stored) -> usize {
        String::from_utf8_lossy(stored.ca_bundle().expect("bundle"))
            .matches("BEGIN CERTIFICATE")
            .count()
    }

    fn served_ca(stored: &Stored) -> String {
        stored.text(CA_CERT).expect("ca").to_owned()
    }

    #[test]
    fn an_empty_secret_gets_a_generation_that_is_served_and_trusted() {
        let t0 = 1_800_000_000;
        let mut foreign = Stored::default();
        foreign
            .annotations
            .insert("meta.helm.sh/release-name".into(), "r".into());
        let (stored, transition) = step(&foreign, t0, None);
        assert_eq!(transition, Transition::Issued);
        assert_eq!(stored.annotations["meta.helm.sh/release-name"], "r");
        assert_eq!(cas(&stored), 1);
        let (chain, key) = stored.serving_pair().expect("pair");
        let pair = parse_pair(chain, key, Path::new("c"), Path::new("k")).expect("usable pair");
        assert_eq!(pair.cert.len(), 2, "leaf then CA");
        settled(&stored, t0 + DAY, None);
    }

    #[test]
    fn a_full_rotation_never_serves_an_untrusted_leaf() {
        let t0 = 1_800_000_000;
        let (a, _) = step(&Stored::default(), t0, None);
        let renew_at = t0 + 7 * DAY;
        settled(&a, renew_at - 1, a.ca_bundle());

        let (staged, transition) = step(&a, renew_at, a.ca_bundle());
        assert_eq!(transition, Transition::Staged);
        assert_eq!(served_ca(&staged), served_ca(&a), "still serving A");
        assert_eq!(cas(&staged), 2);

        // Not promoted before the overlap, nor before the new bundle is confirmed.
        settled(&staged, renew_at + 599, staged.ca_bundle());
        settled(&staged, renew_at + 600, a.ca_bundle());
        let (promoted, transition) = step(&staged, renew_at + 600, staged.ca_bundle());
        assert_eq!(transition, Transition::Promoted);
        assert_ne!(served_ca(&promoted), served_ca(&a));
        assert_eq!(promoted.ca_bundle(), staged.ca_bundle(), "A still trusted");
        assert!(!promoted.data.contains_key(NEXT_TLS_KEY));

        settled(&promoted, renew_at + 1199, promoted.ca_bundle());
        let (retired, transition) = step(&promoted, renew_at + 1200, promoted.ca_bundle());
        assert_eq!(transition, Transition::Retired);
        assert_eq!(cas(&retired), 1);
        assert_eq!(
            retired.ca_bundle(),
            Some(bundle([served_ca(&promoted).as_str()]).as_slice())
        );
        settled(&retired, renew_at + 2 * DAY, retired.ca_bundle());
    }

    #[test]
    fn new_names_are_staged_like_a_renewal() {
        let t0 = 1_800_000_000;
        let (a, _) = step(&Stored::default(), t0, None);
        let mut other = policy();
        other.names.push("extra.example".into());
        let (staged, transition) = plan(&a, t0 + 10, &other, None)
            .expect("plan")
            .expect("step");
        assert_eq!(transition, Transition::Staged);
        assert_eq!(
            staged.annotations[NEXT_NAMES],
            "127.0.0.1,extra.example,hook.ns.svc"
        );
    }

    #[test]
    fn expired_or_corrupt_state_starts_over() {
        let t0 = 1_800_000_000;
        let (a, _) = step(&Stored::default(), t0, None);
        let (fresh, transition) = step(&a, t0 + 11 * DAY, None);
        assert_eq!(transition, Transition::Issued);
        assert_ne!(served_ca(&fresh), served_ca(&a));

        let mut corrupt = a;
        corrupt.data.insert(TLS_KEY.into(), b"nope".to_vec());
        assert_eq!(step(&corrupt, t0 + 1, None).1, Transition::Issued);
    }

    #[test]
    fn a_wrong_bundle_is_repaired_and_a_broken_staged_generation_dropped() {
        let t0 = 1_800_000_000;
        let (a, _) = step(&Stored::default(), t0, None);
        let mut wrong = a.clone();
        wrong.data.insert(CA_BUNDLE.into(), b"".to_vec());
        wrong.data.insert(NEXT_TLS_KEY.into(), b"half".to_vec());
        let (repaired, transition) = step(&wrong, t0 + 1, None);
        assert_eq!(transition, Transition::Repaired);
        assert_eq!(repaired, a);
    }
}
