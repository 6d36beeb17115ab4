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

    /// Image mode (docs/image-mode.md): the OCI repository, `<registry host[:port]>/<path>`,
    /// build Jobs publish package sets to. Unset: apps asking for image mode (annotation
    /// packages.kaspr.io/mode: image) keep their cache mode, with a warning.
    #[arg(long, env = "KASPR_WEBHOOK_IMAGE_REPOSITORY", value_name = "REPOSITORY", value_parser = parse_image_repository)]
    pub image_repository: Option<String>,

    /// Secret (kubernetes.io/dockerconfigjson) in each app's namespace with the registry's push
    /// credentials; mounted into build Jobs only.
    #[arg(long, env = "KASPR_WEBHOOK_IMAGE_PUSH_SECRET", value_name = "SECRET", value_parser = parse_secret_name)]
    pub image_push_secret: Option<String>,

    /// Secret added to image-mode pods' imagePullSecrets, so the kubelet can pull set images.
    #[arg(long, env = "KASPR_WEBHOOK_IMAGE_PULL_SECRET", value_name = "SECRET", value_parser = parse_secret_name)]
    pub image_pull_secret: Option<String>,

    /// Whether the nodes' container runtimes can mount image volumes (containerd 2.1+, CRI-O
    /// 1.31+); the webhook cannot see them. false keeps every app on its cache mode.
    #[arg(long, env = "KASPR_WEBHOOK_IMAGE_VOLUMES_ON_NODES", value_name = "BOOL", default_value = "true", action = clap::ArgAction::Set)]
    pub image_volumes_on_nodes: bool,

    /// The image registry speaks plain HTTP, not HTTPS (only for a registry reachable inside
    /// the cluster's network); build Jobs push over HTTP.
    #[arg(long, env = "KASPR_WEBHOOK_IMAGE_REGISTRY_PLAIN_HTTP", value_name = "BOOL", default_value = "false", action = clap::ArgAction::Set)]
    pub image_registry_plain_http: bool,

    /// The name of this rendering revision, recorded in every injected template
    /// (packages.kaspr.io/revision). Default: this release's version and a hash of the
    /// settings above and the installer program. While an app's own configuration is
    /// unchanged, its StatefulSet keeps the revision it was rendered with.
    #[arg(long, env = "KASPR_WEBHOOK_REVISION", value_name = "NAME", value_parser = crate::config::parse_revision)]
    pub revision: Option<String>,

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
        let RenderArgs {
            init_container_resources,
            packages_volume_size_limit,
            operator_packages,
            image_repository,
            image_push_secret,
            image_pull_secret,
            image_volumes_on_nodes,
            image_registry_plain_http,
            revision,
            install_tool,
        } = self;
        crate::config::RenderConfig {
            default_resources: init_container_resources,
            packages_volume_size_limit,
            operator_packages: operator_packages.into(),
            image_mode: crate::config::ImageModeConfig {
                repository: image_repository,
                push_secret: image_push_secret,
                pull_secret: image_pull_secret,
                unsupported: (!image_volumes_on_nodes).then(|| {
                    "the chart says the nodes' container runtimes cannot mount image volumes \
                     (imageMode.nodesSupportImageVolumes: false)"
                        .to_owned()
                }),
                plain_http: image_registry_plain_http,
            },
            revision,
            install_tool: install_tool.into(),
        }
    }
}

/// `<registry host[:port]>/<path>`, the path in lowercase OCI form.
fn parse_image_repository(value: &str) -> Result<String, String> {
    let (host, path) = value.split_once('/').unwrap_or((value, ""));
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    let path_ok = !path.is_empty()
        && path.split('/').all(|part| {
            !part.is_empty()
                && part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
        });
    if host_ok && path_ok && value.len() <= 255 {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not <registry host[:port]>/<path> (path in lowercase letters, digits, '.', '_', '-')"
        ))
    }
}

/// A Secret's name (a DNS subdomain).
fn parse_secret_name(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-'))
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not a valid Secret name"))
    }
}

#[cfg(test)]
mod image_flag_tests {
    use rstest::rstest;

    #[rstest]
    #[case::registry_with_port("registry.example:5000/kaspr/packages", true)]
    #[case::plain("ghcr.io/acme/sets", true)]
    #[case::no_path("ghcr.io", false)]
    #[case::uppercase_path("ghcr.io/Acme", false)]
    #[case::empty_component("ghcr.io//a", false)]
    #[case::scheme("https://ghcr.io/a", false)]
    fn image_repositories(#[case] value: &str, #[case] ok: bool) {
        let parsed = super::parse_image_repository(value);
        assert_eq!(parsed.is_ok(), ok, "{parsed:?}");
        if let Err(message) = parsed {
            assert!(message.contains(value), "{message}");
        }
    }

    #[rstest]
    #[case("registry-push", true)]
    #[case("Push", false)]
    #[case("-x", false)]
    #[case("", false)]
    fn secret_names(#[case] value: &str, #[case] ok: bool) {
        assert_eq!(super::parse_secret_name(value).is_ok(), ok);
    }
}
