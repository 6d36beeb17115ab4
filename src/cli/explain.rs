//! The `explain` subcommand: its flags and the thin wiring to `crate::explain`.

use std::process::ExitCode;

use crate::explain::{self, EXIT_ERROR, Kind};

pub const EXPLAIN_ABOUT: &str = "Explain, from the live cluster, why a Pod, StatefulSet or \
KasprApp was or was not injected, and whether its injection is current.

Reads through your kubeconfig (KUBECONFIG, ~/.kube/config or --kubeconfig; the in-cluster \
service account when there is none), with GET and LIST only, and prints one line per finding:
  - whether the namespace is served or excluded by the release's webhook configurations \
(namespaceSelector) and whether the controller watches it (server.watchNamespaces);
  - which webhook matches the object: its rules, objectSelector and the chart's matchConditions \
(an ownerReference to a KasprApp, the app's labels, a pod not from an injected template);
  - the owning KasprApp and whether it is valid, with every error and its field path;
  - the template hash on the object against the one the app renders now, and what differs \
(install key, installer settings, image, resources, volumes, mounts, PYTHONPATH);
  - the PVC cache in PVC mode, the pods of a StatefulSet or app, and a pod's init container \
state with its last termination message (the installer's one-line summary).

The release's MutatingWebhookConfiguration is the one that registers \
statefulsets.packages.kaspr.io or pods.packages.kaspr.io (the chart names it after the release), \
or --webhook-config; its ValidatingWebhookConfiguration has the same name. Rendering settings \
(--init-container-resources, --packages-volume-size-limit) are read from the webhook's \
Deployment behind that configuration's Service unless given here.

Exit status:
  0  injected and current (for a KasprApp: valid, every StatefulSet and pod current)
  1  error: no explanation (kubeconfig, API server unreachable, object or KasprApp unreadable or not found)
  2  usage error (unknown flag or kind)
  3  not injected, by design (excluded namespace, not a KasprApp's object, no spec.pythonPackages, \
KasprApp missing, the operator's own installer, webhook not installed)
  4  problem found (out of date, invalid KasprApp, not injected although it should be, failed \
install, missing or unbound PVC, the webhook denies the object)

Every flag also reads KASPR_WEBHOOK_<FLAG> from the environment.";

/// The kinds `explain` knows, with kubectl's short names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    #[value(alias = "po", alias = "pods")]
    Pod,
    #[value(alias = "sts", alias = "statefulsets")]
    Statefulset,
    #[value(alias = "kapp", alias = "kasprapps")]
    Kasprapp,
}

/// Output format of `explain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExplainOutputArg {
    /// One line per finding.
    Text,
    /// The report as one JSON object (verdict, exitCode, hashes, differences, errors, lines).
    Json,
}

/// Options of `explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The kind of object: pod (po), statefulset (sts) or kasprapp (kapp).
    #[arg(value_enum)]
    pub kind: KindArg,

    /// Its name.
    pub name: String,

    /// Its namespace [default: the kubeconfig context's].
    #[arg(long, short, env = "KASPR_WEBHOOK_NAMESPACE", value_name = "NS")]
    pub namespace: Option<String>,

    /// The kubeconfig context [default: the current one].
    #[arg(long, env = "KASPR_WEBHOOK_CONTEXT", value_name = "NAME")]
    pub context: Option<String>,

    /// A kubeconfig file [default: KUBECONFIG, else ~/.kube/config, else in-cluster].
    #[arg(long, env = "KASPR_WEBHOOK_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,

    /// The release's MutatingWebhookConfiguration [default: the one that registers
    /// statefulsets.packages.kaspr.io or pods.packages.kaspr.io].
    #[arg(long, env = "KASPR_WEBHOOK_WEBHOOK_CONFIG", value_name = "NAME")]
    pub webhook_config: Option<String>,

    /// What to print.
    #[arg(
        long,
        short,
        env = "KASPR_WEBHOOK_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    pub output: ExplainOutputArg,

    /// Init container resources the webhook renders when a KasprApp sets none, as JSON
    /// [default: read from the webhook's Deployment].
    #[arg(long, env = "KASPR_WEBHOOK_INIT_CONTAINER_RESOURCES", value_name = "JSON", value_parser = super::parsers::parse_resources)]
    pub init_container_resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,

    /// sizeLimit of the per-pod kaspr-packages emptyDir the webhook renders
    /// [default: read from the webhook's Deployment].
    #[arg(long, env = "KASPR_WEBHOOK_PACKAGES_VOLUME_SIZE_LIMIT", value_name = "QUANTITY", value_parser = super::parsers::parse_size_limit)]
    pub packages_volume_size_limit: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,

    /// Deadline for reading the cluster.
    #[arg(long, env = "KASPR_WEBHOOK_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = super::parsers::parse_duration)]
    pub timeout: std::time::Duration,
}

pub fn explain(args: ExplainArgs) -> ExitCode {
    let ExplainArgs {
        kind,
        name,
        namespace,
        context,
        kubeconfig,
        webhook_config,
        output,
        init_container_resources,
        packages_volume_size_limit,
        timeout,
    } = args;
    let kind = match kind {
        KindArg::Pod => Kind::Pod,
        KindArg::Statefulset => Kind::StatefulSet,
        KindArg::Kasprapp => Kind::KasprApp,
    };
    let options = explain::fetch::FetchOptions {
        kubeconfig,
        context,
        namespace,
        webhook_config,
        init_container_resources,
        packages_volume_size_limit,
        timeout,
    };
    let snapshot = match explain::fetch::run_blocking(kind, &name, &options) {
        Ok(snapshot) => snapshot,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let report = explain::explain(&snapshot);
    match output {
        ExplainOutputArg::Text => {
            print!("{}", report.to_text());
            println!(
                "  (rendering settings: {})",
                if snapshot.server.source.is_empty() {
                    "defaults"
                } else {
                    &snapshot.server.source
                }
            );
        }
        ExplainOutputArg::Json => match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("error: writing the report: {error}");
                return ExitCode::from(EXIT_ERROR);
            }
        },
    }
    ExitCode::from(report.exit_code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::{CommandFactory, Parser};

    fn parse(args: &[&str]) -> Result<ExplainArgs, clap::Error> {
        let mut argv = vec!["kaspr-packages-webhook", "explain"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Explain(args) => Ok(args),
            _ => panic!("not explain"),
        }
    }

    #[test]
    fn kinds_take_kubectls_short_names_and_flags_their_defaults() {
        let args = parse(&["sts", "demo-app", "-n", "apps"]).expect("parse");
        assert_eq!(args.kind, KindArg::Statefulset);
        assert_eq!(args.namespace.as_deref(), Some("apps"));
        assert_eq!(args.output, ExplainOutputArg::Text);
        assert_eq!(args.timeout, std::time::Duration::from_secs(30));
        assert_eq!(parse(&["po", "x"]).expect("parse").kind, KindArg::Pod);
        assert_eq!(
            parse(&["kapp", "x", "-o", "json"]).expect("parse").output,
            ExplainOutputArg::Json
        );
        let error = parse(&["deployment", "x"]).expect_err("unknown kind");
        assert_eq!(error.exit_code(), 2);
    }

    #[test]
    fn every_explain_flag_reads_its_environment_variable_and_has_help() {
        crate::cli::serve_args_tests::assert_flags_read_their_environment_variables(
            "explain", true,
        );
        let command = Cli::command();
        let found = command.find_subcommand("explain").expect("explain");
        let help = found.get_long_about().expect("long help").to_string();
        for code in [
            "0  injected",
            "1  error",
            "2  usage",
            "3  not injected",
            "4  problem",
        ] {
            assert!(help.contains(code), "{code}");
        }
    }
}
