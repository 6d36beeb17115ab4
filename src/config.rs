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
}
