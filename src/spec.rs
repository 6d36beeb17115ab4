//! The typed model of a KasprApp's `spec.pythonPackages` (and
//! `spec.template.pythonPackagesInitContainer`), with every default applied.
//!
//! KasprApps are read as unstructured JSON because this product does not own the CRD; the
//! conversion (with all checks) lives in `validation`, which produces these types.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, VolumeMount};
use serde::Serialize;
use serde_json::{Map, Value};

/// Default size of the shared PVC cache.
pub const DEFAULT_CACHE_SIZE: &str = "256Mi";
/// Default GCS object prefix.
pub const DEFAULT_GCS_PREFIX: &str = "kaspr-packages/";
/// Default largest archive uploaded to GCS.
pub const DEFAULT_MAX_ARCHIVE_SIZE: &str = "1Gi";
/// Default key of the GCS service-account JSON in its Secret.
pub const DEFAULT_GCS_KEY: &str = "sa.json";
pub const DEFAULT_USERNAME_KEY: &str = "username";
pub const DEFAULT_PASSWORD_KEY: &str = "password";
pub const DEFAULT_RETRIES: u32 = 3;
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 600;

/// A KasprApp's package configuration with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct PythonPackages {
    /// Requirements as written (trimmed).
    pub packages: Vec<String>,
    pub index_url: Option<String>,
    pub extra_index_urls: Vec<String>,
    pub trusted_hosts: Vec<String>,
    pub credentials: Option<Credentials>,
    pub cache: Cache,
    pub install_policy: InstallPolicy,
    pub resources: Option<ResourceRequirements>,
    /// Extra env and mounts for the init container only.
    pub init_container: InitContainerExtras,
    /// The KasprApp's choice, by annotation, of what to do with the Kaspr operator's own
    /// package injection; `None` follows the chart's default.
    pub operator_packages: Option<OperatorPackages>,
    /// The KasprApp's choice, by annotation, of the installer's tool; `None` follows the
    /// chart's default.
    pub install_tool: Option<InstallTool>,
    /// `spec.template.kasprContainer.securityContext`, applied to the main container under
    /// takeover (the operator drops it when it renders).
    pub main_security_context: Option<Map<String, Value>>,
}

/// What the webhook does with a pod template that already carries the Kaspr operator's own
/// package injection (its `install-packages` init container, operator v0.14 and newer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OperatorPackages {
    /// Leave the operator's injection alone and inject nothing.
    #[default]
    Respect,
    /// Replace the operator's injection with ours, in a shape its rewrite loops accept.
    Takeover,
}

/// Which tool the installer installs with (`pip` is the installer's own default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum InstallTool {
    /// uv when the image has it or the configured index serves a uv wheel, else pip.
    Auto,
    /// pip, as the image has it.
    #[default]
    Pip,
    /// uv, or a failure saying why it could not be had.
    Uv,
}

impl InstallTool {
    pub fn as_str(self) -> &'static str {
        match self {
            InstallTool::Auto => "auto",
            InstallTool::Pip => "pip",
            InstallTool::Uv => "uv",
        }
    }

    /// Parses `auto`, `pip` or `uv` (exact, as in annotations and flags).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "auto" => Some(InstallTool::Auto),
            "pip" => Some(InstallTool::Pip),
            "uv" => Some(InstallTool::Uv),
            _ => None,
        }
    }
}

impl OperatorPackages {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorPackages::Respect => "respect",
            OperatorPackages::Takeover => "takeover",
        }
    }

    /// Parses `respect` or `takeover` (exact, as in annotations and flags).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "respect" => Some(OperatorPackages::Respect),
            "takeover" => Some(OperatorPackages::Takeover),
            _ => None,
        }
    }
}

/// Where index credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub secret_name: String,
    pub username_key: String,
    pub password_key: String,
}

/// The cache mode and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cache {
    /// Per-pod install on every start.
    EmptyDir,
    /// A shared ReadWriteMany PVC `<app>-python-packages`.
    Pvc(PvcCache),
    /// Archives in a GCS bucket.
    Gcs(GcsCache),
}

impl Cache {
    /// The mode name used in logs, the installer config and docs.
    pub fn mode(&self) -> &'static str {
        match self {
            Cache::EmptyDir => "emptyDir",
            Cache::Pvc(_) => "pvc",
            Cache::Gcs(_) => "gcs",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvcCache {
    pub storage_class: Option<String>,
    /// A valid Kubernetes quantity.
    pub size: String,
    pub delete_claim: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcsCache {
    pub bucket: String,
    /// Always ends with `/`.
    pub prefix: String,
    /// In bytes.
    pub max_archive_size: u64,
    /// `None` means the pod's Workload Identity.
    pub key_secret: Option<GcsKeySecret>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcsKeySecret {
    pub name: String,
    pub key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OnFailure {
    Block,
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallPolicy {
    pub retries: u32,
    pub timeout_seconds: u32,
    pub on_failure: OnFailure,
}

impl Default for InstallPolicy {
    fn default() -> Self {
        InstallPolicy {
            retries: DEFAULT_RETRIES,
            timeout_seconds: DEFAULT_TIMEOUT_SECONDS,
            on_failure: OnFailure::Block,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct InitContainerExtras {
    pub env: Vec<EnvVar>,
    pub volume_mounts: Vec<VolumeMount>,
    /// Merged over the main container's securityContext, never loosening it.
    pub security_context: Option<Map<String, Value>>,
}

/// What ends the PVC name of every app in PVC mode.
pub const PVC_SUFFIX: &str = "-python-packages";

/// The PVC name of an app in PVC mode.
pub fn pvc_name(app: &str) -> String {
    format!("{app}{PVC_SUFFIX}")
}

/// Canonical content of the install key: only what decides the installed packages.
#[derive(Serialize)]
struct InstallKeyInput<'a> {
    #[serde(rename = "extraIndexUrls")]
    extra_index_urls: Vec<&'a str>,
    #[serde(rename = "indexUrl")]
    index_url: Option<&'a str>,
    packages: Vec<&'a str>,
    #[serde(rename = "trustedHosts")]
    trusted_hosts: Vec<&'a str>,
}

impl PythonPackages {
    /// 16 hex characters of SHA-256 over the canonical JSON of the package list (trimmed,
    /// sorted), `indexUrl`, `extraIndexUrls` (sorted) and `trustedHosts` (sorted).
    ///
    /// Stable across releases: changing it invalidates every cache.
    pub fn install_key(&self) -> String {
        fn sorted(items: &[String]) -> Vec<&str> {
            let mut v: Vec<&str> = items.iter().map(|s| s.trim()).collect();
            v.sort_unstable();
            v
        }
        let input = InstallKeyInput {
            extra_index_urls: sorted(&self.extra_index_urls),
            index_url: self.index_url.as_deref().map(str::trim),
            packages: sorted(&self.packages),
            trusted_hosts: sorted(&self.trusted_hosts),
        };
        // Field order is alphabetical by declaration, so the JSON is canonical.
        let canonical = serde_json::to_vec(&input).unwrap_or_default();
        short_sha256(&canonical)
    }
}

#[cfg(test)]
impl PythonPackages {
    /// A spec with these packages and every default, for tests.
    pub(crate) fn with_packages(packages: &[&str]) -> Self {
        PythonPackages {
            packages: packages.iter().map(|p| (*p).to_owned()).collect(),
            index_url: None,
            extra_index_urls: vec![],
            trusted_hosts: vec![],
            credentials: None,
            cache: Cache::EmptyDir,
            install_policy: InstallPolicy::default(),
            resources: None,
            init_container: InitContainerExtras::default(),
            operator_packages: None,
            install_tool: None,
            main_security_context: None,
        }
    }
}

/// First 16 hex characters of SHA-256.
pub fn short_sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    hex::encode(&digest[..8])
}

/// A map of resource quantities as read from the spec.
pub type QuantityMap = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(packages: &[&str]) -> PythonPackages {
        PythonPackages::with_packages(packages)
    }

    #[test]
    fn install_key_is_pinned_for_a_known_spec() {
        // The algorithm is part of the product's contract: this value must never change.
        // sha256(`{"extraIndexUrls":[],"indexUrl":null,"packages":["pandas>=2.0.0","requests"],"trustedHosts":[]}`)
        assert_eq!(
            spec(&["requests", "pandas>=2.0.0"]).install_key(),
            "28e3005a1d528463"
        );
        let mut indexed = spec(&["a==1"]);
        indexed.index_url = Some("https://pypi.example.com/simple".into());
        indexed.extra_index_urls = vec![
            "https://b.example.com/simple".into(),
            "https://a.example.com/simple".into(),
        ];
        indexed.trusted_hosts = vec!["b.example.com".into(), "a.example.com".into()];
        let canonical = r#"{"extraIndexUrls":["https://a.example.com/simple","https://b.example.com/simple"],"indexUrl":"https://pypi.example.com/simple","packages":["a==1"],"trustedHosts":["a.example.com","b.example.com"]}"#;
        assert_eq!(indexed.install_key(), short_sha256(canonical.as_bytes()));
    }

    #[test]
    fn install_key_ignores_order_and_surrounding_whitespace() {
        assert_eq!(
            spec(&["a==1", "b==2"]).install_key(),
            spec(&[" b==2", "a==1 "]).install_key()
        );
    }

    #[test]
    fn install_key_ignores_policy_and_cache() {
        let mut other = spec(&["a==1"]);
        other.install_policy.retries = 9;
        other.cache = Cache::Pvc(PvcCache {
            storage_class: None,
            size: "1Gi".into(),
            delete_claim: true,
        });
        assert_eq!(spec(&["a==1"]).install_key(), other.install_key());
    }

    #[test]
    fn install_key_changes_with_index() {
        let mut other = spec(&["a==1"]);
        other.index_url = Some("https://example.com/simple".into());
        assert_ne!(spec(&["a==1"]).install_key(), other.install_key());
    }
}
