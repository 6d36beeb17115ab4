//! Rendering settings that come from the deployment (the Helm chart), not from a KasprApp.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Settings the mutation needs beyond the KasprApp itself. Tests build it directly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderConfig {
    /// Resources for the init container when the KasprApp sets none (chart-level default).
    pub default_resources: Option<ResourceRequirements>,
    /// `sizeLimit` of the per-pod `kaspr-packages` emptyDir (chart-level; none when unset).
    pub packages_volume_size_limit: Option<Quantity>,
}
