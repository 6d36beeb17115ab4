//! Value parsers shared by the subcommands' flags: each error names what was wrong with the value.

pub(super) fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    // A bare number is seconds.
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 500ms, 8s, 2m)"))
}

pub(super) fn parse_size_limit(
    text: &str,
) -> Result<k8s_openapi::apimachinery::pkg::api::resource::Quantity, String> {
    match crate::quantity::parse(text).map(crate::quantity::Quantity::to_bytes) {
        Ok(Some(bytes)) if bytes > 0 => Ok(
            k8s_openapi::apimachinery::pkg::api::resource::Quantity(text.to_owned()),
        ),
        Ok(_) => Err(format!("{text:?} must be a positive size such as 4Gi")),
        Err(e) => Err(e),
    }
}

pub(super) fn parse_resources(
    text: &str,
) -> Result<k8s_openapi::api::core::v1::ResourceRequirements, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Resources {
        requests: Option<
            std::collections::BTreeMap<
                String,
                k8s_openapi::apimachinery::pkg::api::resource::Quantity,
            >,
        >,
        limits: Option<
            std::collections::BTreeMap<
                String,
                k8s_openapi::apimachinery::pkg::api::resource::Quantity,
            >,
        >,
    }
    let Resources { requests, limits } = serde_json::from_str(text)
        .map_err(|e| format!("expected JSON like {{\"requests\":{{\"cpu\":\"100m\"}},\"limits\":{{\"memory\":\"1Gi\"}}}}: {e}"))?;
    Ok(k8s_openapi::api::core::v1::ResourceRequirements {
        requests,
        limits,
        claims: None,
    })
}

/// `--operator-packages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OperatorPackagesArg {
    /// Leave the operator's injection alone; inject nothing into such a pod template.
    Respect,
    /// Replace the operator's injection with ours.
    Takeover,
}

impl From<OperatorPackagesArg> for crate::spec::OperatorPackages {
    fn from(arg: OperatorPackagesArg) -> Self {
        match arg {
            OperatorPackagesArg::Respect => crate::spec::OperatorPackages::Respect,
            OperatorPackagesArg::Takeover => crate::spec::OperatorPackages::Takeover,
        }
    }
}

/// `--install-tool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InstallToolArg {
    /// uv when the image has it or the configured index serves a uv wheel, else pip.
    Auto,
    /// pip, as the image has it.
    Pip,
    /// uv; a pod or build fails with the reason when it cannot be had.
    Uv,
}

impl From<InstallToolArg> for crate::spec::InstallTool {
    fn from(arg: InstallToolArg) -> Self {
        match arg {
            InstallToolArg::Auto => crate::spec::InstallTool::Auto,
            InstallToolArg::Pip => crate::spec::InstallTool::Pip,
            InstallToolArg::Uv => crate::spec::InstallTool::Uv,
        }
    }
}

/// The rendering settings `serve` and `preview` share, so both render the same way.
#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// Init container resources when a KasprApp sets none, as JSON:
    /// '{"requests":{"cpu":"100m","memory":"256Mi"},"limits":{"memory":"1Gi"}}'.
    #[arg(long, env = "KASPR_WEBHOOK_INIT_CONTAINER_RESOURCES", value_name = "JSON", value_parser = parse_resources)]
    pub init_container_resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,

    /// sizeLimit of the per-pod kaspr-packages emptyDir, a Kubernetes quantity such as 4Gi
    /// (none when unset). A pod that writes more is evicted by the kubelet.
    #[arg(long, env = "KASPR_WEBHOOK_PACKAGES_VOLUME_SIZE_LIMIT", value_name = "QUANTITY", value_parser = parse_size_limit)]
    pub packages_volume_size_limit: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,

    /// What to do with the Kaspr operator's own package injection (operator v0.14+, its
    /// `install-packages` init container) when a KasprApp's annotation
    /// packages.kaspr.io/operator-packages does not say: respect leaves it alone, takeover
    /// replaces it with ours.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_OPERATOR_PACKAGES",
        value_enum,
        default_value = "respect"
    )]
    pub operator_packages: OperatorPackagesArg,

    /// The tool the installer installs with when a KasprApp's annotation
    /// packages.kaspr.io/install-tool does not say: pip, uv, or auto (uv when the image has it
    /// or the index serves a uv wheel, else pip). See docs/installer.md.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_INSTALL_TOOL",
        value_enum,
        default_value = "pip"
    )]
    pub install_tool: InstallToolArg,
}

impl RenderArgs {
    pub fn into_config(self) -> crate::config::RenderConfig {
        crate::config::RenderConfig {
            default_resources: self.init_container_resources,
            packages_volume_size_limit: self.packages_volume_size_limit,
            operator_packages: self.operator_packages.into(),
            install_tool: self.install_tool.into(),
        }
    }
}
