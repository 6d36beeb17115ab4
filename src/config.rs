//! Rendering settings that come from the deployment (the Helm chart), not from a KasprApp.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::spec::{InstallTool, OperatorPackages};

/// Settings the mutation needs beyond the KasprApp itself. Tests build it directly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderConfig {
    /// Resources for the init container when the KasprApp sets none (chart-level default).
    pub default_resources: Option<ResourceRequirements>,
    /// `sizeLimit` of the per-pod `kaspr-packages` emptyDir (chart-level; none when unset).
    pub packages_volume_size_limit: Option<Quantity>,
    /// What to do with the Kaspr operator's own package injection when the KasprApp does not
    /// say (its `packages.kaspr.io/operator-packages` annotation).
    pub operator_packages: OperatorPackages,
    /// The installer's tool when the KasprApp does not say (its
    /// `packages.kaspr.io/install-tool` annotation).
    pub install_tool: InstallTool,
    /// Image mode (docs/image-mode.md): where sets are published and whether pods can mount them.
    pub image_mode: ImageModeConfig,
    /// The rendering revision's name (`--revision`); derived from this release and the
    /// settings above when unset (see [`RenderConfig::revision`]).
    pub revision: Option<String>,
}

impl RenderConfig {
    /// The name of the rendering revision: everything in an injection that does not come from
    /// the app's own configuration. Given (`--revision`), or `<version>-<hash>` over this
    /// release, its installer program and the chart-level settings that reach the injection.
    pub fn revision(&self) -> std::borrow::Cow<'_, str> {
        if let Some(name) = &self.revision {
            return std::borrow::Cow::Borrowed(name);
        }
        // Without chart-level settings (the default, and every config hash's rendering) the
        // name depends on the release alone: hashed once per process.
        if self.default_resources.is_none() && self.packages_volume_size_limit.is_none() {
            static NEUTRAL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
            return std::borrow::Cow::Borrowed(NEUTRAL.get_or_init(|| self.hashed_revision()));
        }
        std::borrow::Cow::Owned(self.hashed_revision())
    }

    fn hashed_revision(&self) -> String {
        let settings = serde_json::json!({
            "initContainerResources": self.default_resources,
            "installer": crate::installer::digest(),
            "packagesVolumeSizeLimit": self.packages_volume_size_limit,
        });
        let hash = crate::spec::short_sha256(settings.to_string().as_bytes());
        format!(
            "{}-{}",
            env!("CARGO_PKG_VERSION"),
            &hash[..hash.len().min(8)]
        )
    }

    /// The settings with every revision-owned one left out: what an injection rendered from
    /// the app's own configuration alone uses.
    pub fn without_revision(&self) -> RenderConfig {
        RenderConfig {
            default_resources: None,
            packages_volume_size_limit: None,
            operator_packages: self.operator_packages,
            install_tool: self.install_tool,
            image_mode: self.image_mode.clone(),
            revision: None,
        }
    }
}

/// Checks a `--revision` name: it is written into annotations and object names, so it is
/// 1 to 63 characters of lowercase letters, digits, `-` and `.`, starting and ending with a
/// letter or digit.
pub fn parse_revision(name: &str) -> Result<String, String> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ends_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !name.is_empty() && name.len() <= 63 && valid_chars && ends_ok {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "revision {name:?} must be 1-63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit"
        ))
    }
}

/// The deployment's image-mode settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageModeConfig {
    /// `<registry host>/<path>` the build Jobs push sets to; `None`: image mode is off.
    pub repository: Option<String>,
    /// Secret (type `kubernetes.io/dockerconfigjson`) in the app's namespace with push
    /// credentials, mounted into build Jobs only.
    pub push_secret: Option<String>,
    /// Secret added to the pods' `imagePullSecrets` so the kubelet can pull set images.
    pub pull_secret: Option<String>,
    /// When the cluster cannot mount image volumes: why (the API server's release, or the
    /// chart saying the nodes' runtimes cannot). `None`: it can.
    pub unsupported: Option<String>,
    /// The registry speaks plain HTTP (a registry inside the cluster's network only).
    pub plain_http: bool,
}

/// The first Kubernetes minor release that serves image volumes without a feature gate.
pub const IMAGE_VOLUMES_SINCE_MINOR: u32 = 36;

/// Why an API server of `major.minor` (discovery's `/version`, e.g. "1", "35+") cannot serve
/// image volumes, or `None` when it can.
pub fn image_volumes_unsupported_by(major: &str, minor: &str) -> Option<String> {
    let number = |s: &str| s.trim_end_matches('+').parse::<u32>().ok();
    match (number(major), number(minor)) {
        (Some(1), Some(m)) if m >= IMAGE_VOLUMES_SINCE_MINOR => None,
        (Some(major_n), Some(_)) if major_n > 1 => None,
        _ => Some(format!(
            "the API server is {major}.{minor}; image volumes need Kubernetes 1.{IMAGE_VOLUMES_SINCE_MINOR} or newer"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[test]
    fn the_derived_revision_follows_the_revision_owned_settings_only() {
        let base = RenderConfig::default();
        let name = base.revision().into_owned();
        // Named once per process when no chart-level setting is given: the same name.
        assert_eq!(name, base.hashed_revision());
        assert!(
            name.starts_with(concat!(env!("CARGO_PKG_VERSION"), "-")),
            "{name}"
        );
        assert_eq!(parse_revision(&name), Ok(name.clone()));
        let resources: k8s_openapi::api::core::v1::ResourceRequirements =
            serde_json::from_value(serde_json::json!({"limits": {"memory": "1Gi"}}))
                .expect("resources");
        let other = RenderConfig {
            default_resources: Some(resources),
            ..RenderConfig::default()
        };
        assert_ne!(other.revision(), name);
        let takeover = RenderConfig {
            operator_packages: OperatorPackages::Takeover,
            ..RenderConfig::default()
        };
        assert_eq!(takeover.revision(), name);
        let named = RenderConfig {
            revision: Some("canary".into()),
            ..other
        };
        assert_eq!(named.revision(), "canary");
        assert_eq!(named.without_revision(), RenderConfig::default());
    }

    #[rstest]
    #[case::empty("")]
    #[case::uppercase("Canary")]
    #[case::slash("a/b")]
    #[case::leading_dash("-a")]
    #[case::trailing_dot("a.")]
    #[case::too_long(&"a".repeat(64))]
    fn bad_revision_names_are_refused_with_the_value(#[case] name: &str) {
        let error = parse_revision(name).expect_err("refused");
        assert!(error.contains(&format!("{name:?}")), "{error}");
    }

    #[rstest]
    #[case::ga("1", "36", true)]
    #[case::newer_with_plus("1", "37+", true)]
    #[case::older("1", "35", false)]
    #[case::provider_suffix_older("1", "34+", false)]
    #[case::unreadable("1", "", false)]
    fn image_volumes_need_1_36(#[case] major: &str, #[case] minor: &str, #[case] supported: bool) {
        let verdict = super::image_volumes_unsupported_by(major, minor);
        assert_eq!(verdict.is_none(), supported, "{verdict:?}");
        if let Some(reason) = verdict {
            assert!(reason.contains(&format!("{major}.{minor}")), "{reason}");
        }
    }
}
