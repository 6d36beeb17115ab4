//! Rendering settings that come from the deployment (the Helm chart), not from a KasprApp.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::spec::OperatorPackages;

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
    /// Image mode (docs/image-mode.md): where sets are published and whether pods can mount them.
    pub image_mode: ImageModeConfig,
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
    use rstest::rstest;

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
