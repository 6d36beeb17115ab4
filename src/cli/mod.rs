//! The command line: the only module that uses clap.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kaspr-packages-webhook",
    version,
    about = "Python packages for Kaspr apps: admission webhook, preview and validation"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Render what the webhook would do to a StatefulSet or Pod of a KasprApp, offline.
    #[command(long_about = PREVIEW_ABOUT)]
    Preview(PreviewArgs),
    /// Check KasprApp files; warnings go to stderr; exit 1 if any is invalid.
    Validate(ValidateArgs),
    /// Print the embedded installer program.
    Installer,
    /// Run the admission webhook: HTTPS `/mutate` and `/validate`, plain-HTTP probes and metrics.
    #[command(long_about = SERVE_ABOUT)]
    Serve(Box<ServeArgs>),
    /// Send synthetic dry-run AdmissionReviews to a running webhook and check the answers.
    // A later flag wins over an earlier one, so the chart's tests.extraArgs can override its own.
    #[command(name = "self-test", long_about = SELF_TEST_ABOUT, args_override_self = true)]
    SelfTest(SelfTestArgs),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    #[command(long_about = COMPLETIONS_ABOUT)]
    Completions(CompletionsArgs),
}

/// The name the program was started as, when it is a kubectl plugin (`kubectl-kaspr_packages`):
/// then help and completions say `kubectl kaspr-packages`.
fn plugin_bin_name(argv0: &std::ffi::OsStr) -> Option<String> {
    let file = std::path::Path::new(argv0).file_name()?.to_str()?;
    let plugin = file.strip_prefix("kubectl-")?;
    Some(format!("kubectl {}", plugin.replace('_', "-")))
}

pub fn run() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let cli = match plugin_bin_name(&argv0) {
        None => Cli::parse(),
        Some(bin_name) => {
            let matches = <Cli as clap::CommandFactory>::command()
                .bin_name(bin_name)
                .get_matches();
            <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
        }
    };
    match cli.command {
        Command::Preview(args) => preview(args),
        Command::Validate(args) => validate(&args),
        Command::Installer => {
            print!("{}", crate::installer::SOURCE);
            ExitCode::SUCCESS
        }
        Command::Serve(args) => serve(*args),
        Command::SelfTest(args) => self_test(args),
        Command::Completions(args) => completions(&args),
    }
}

const SELF_TEST_ABOUT: &str = "Send synthetic dry-run AdmissionReviews to a running webhook and \
check the answers.

Three requests, each on a new TLS connection verified against --ca-file: a valid KasprApp to \
/validate (must be allowed), an invalid one (must be denied, naming the field), and a StatefulSet \
owned by a KasprApp to /mutate. /mutate looks the app up (watch cache or API server), so without \
--app the StatefulSet names an app that does not exist and must be allowed unchanged; this \
also proves the webhook can read KasprApps (an unreadable app is a denial). With --app NAME, a \
KasprApp in --namespace that lists spec.pythonPackages, the answer must carry a well-formed \
JSON patch. Every answer must echo the request's uid and arrive within --max-response-time.

Prints one line per check and a summary. Exit status 0 when every check passed, 1 when one \
failed, 2 when the options are unusable (the message names the flag and its value). Every flag \
also reads KASPR_WEBHOOK_<FLAG> from the environment. The chart's `helm test` runs it.";

/// Options of `self-test`.
#[derive(Debug, clap::Args)]
pub struct SelfTestArgs {
    /// Base URL of the webhook; /mutate and /validate are appended,
    /// e.g. https://kaspr-packages-webhook.kaspr.svc:443.
    #[arg(long, env = "KASPR_WEBHOOK_URL", value_name = "URL")]
    pub url: url::Url,

    /// PEM file of the CA that signed the webhook's certificate (the caBundle).
    #[arg(long, env = "KASPR_WEBHOOK_CA_FILE", value_name = "FILE")]
    pub ca_file: std::path::PathBuf,

    /// Namespace of the synthetic objects.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_NAMESPACE",
        value_name = "NS",
        default_value = "default"
    )]
    pub namespace: String,

    /// A KasprApp in --namespace listing spec.pythonPackages: its StatefulSet must be patched
    /// [default: an app that does not exist, answered unchanged].
    #[arg(long, env = "KASPR_WEBHOOK_APP", value_name = "NAME")]
    pub app: Option<String>,

    /// Deadline of each request: connection, TLS handshake and answer.
    #[arg(long, env = "KASPR_WEBHOOK_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,

    /// Slowest acceptable answer (the API server gives a webhook 10 s by default).
    #[arg(long, env = "KASPR_WEBHOOK_MAX_RESPONSE_TIME", value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub max_response_time: std::time::Duration,
}

fn self_test(args: SelfTestArgs) -> ExitCode {
    let SelfTestArgs {
        url,
        ca_file,
        namespace,
        app,
        timeout,
        max_response_time,
    } = args;
    let options = crate::selftest::SelfTestOptions {
        url,
        ca_file,
        namespace,
        app,
        timeout,
        max_response_time,
    };
    match crate::selftest::run_blocking(&options) {
        Ok(report) => {
            for line in report.lines() {
                println!("{line}");
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
    }
}

const COMPLETIONS_ABOUT: &str = "Print a shell completion script to stdout.

  bash: kaspr-packages-webhook completions bash > ~/.local/share/bash-completion/completions/kaspr-packages-webhook
  zsh:  kaspr-packages-webhook completions zsh > \"${fpath[1]}/_kaspr-packages-webhook\"
  fish: kaspr-packages-webhook completions fish > ~/.config/fish/completions/kaspr-packages-webhook.fish";

/// Options of `completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: ShellArg,
}

/// Shells with completion scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

/// The completion script of `shell`.
pub fn completion_script(shell: ShellArg) -> Vec<u8> {
    let shell = match shell {
        ShellArg::Bash => clap_complete::Shell::Bash,
        ShellArg::Zsh => clap_complete::Shell::Zsh,
        ShellArg::Fish => clap_complete::Shell::Fish,
    };
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "kaspr-packages-webhook", &mut out);
    out
}

fn completions(args: &CompletionsArgs) -> ExitCode {
    use std::io::Write as _;
    let script = completion_script(args.shell);
    match std::io::stdout().lock().write_all(&script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: writing the completion script: {error}");
            ExitCode::FAILURE
        }
    }
}

const SERVE_ABOUT: &str = "Run the admission webhook.

The HTTPS port (--listen) answers AdmissionReview v1 requests on POST /mutate (StatefulSets and \
Pods of KasprApps) and POST /validate (KasprApps). The plain-HTTP port (--probe-listen) answers \
GET /livez, GET /readyz (ready once the certificate is loaded and the KasprApp cache has synced) \
and GET /metrics (Prometheus).

KasprApps are read from the API server (KUBECONFIG or the in-cluster service account) through a \
watch cache, or with --kasprapps DIR from YAML/JSON files, which needs no cluster.

With the API server, the same process runs the controller: it keeps the PVC cache of apps in PVC \
mode (--controller-pvc) and rolls StatefulSets whose injection is out of date after a KasprApp \
change (--controller-rollout). It is not part of readiness and needs no leader election.

The certificate and key are re-read every --reload-interval and swapped without a restart, which \
also follows a Kubernetes Secret volume's symlink swap. Without --tls-cert/--tls-key, a \
self-signed pair for localhost is generated and the path of its CA is logged.

Every flag can also be set through the environment variable named after it, \
KASPR_WEBHOOK_<FLAG> (for example KASPR_WEBHOOK_LISTEN).";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormatArg {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Plain,
}

impl From<LogFormatArg> for crate::telemetry::LogFormat {
    fn from(format: LogFormatArg) -> Self {
        match format {
            LogFormatArg::Json => crate::telemetry::LogFormat::Json,
            LogFormatArg::Plain => crate::telemetry::LogFormat::Plain,
        }
    }
}

/// Options of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address of the HTTPS webhook port (/mutate, /validate).
    #[arg(
        long,
        env = "KASPR_WEBHOOK_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8443"
    )]
    pub listen: std::net::SocketAddr,

    /// Address of the plain-HTTP port for /livez, /readyz and /metrics.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_PROBE_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub probe_listen: std::net::SocketAddr,

    /// PEM certificate chain of the webhook port, leaf first (re-read while running).
    #[arg(
        long,
        env = "KASPR_WEBHOOK_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert: PKCS#1, PKCS#8 or SEC1 (re-read while running).
    #[arg(
        long,
        env = "KASPR_WEBHOOK_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,

    /// Where to write the self-signed pair used without --tls-cert/--tls-key
    /// [default: $XDG_RUNTIME_DIR/kaspr-packages-webhook, else in the system temp dir].
    #[arg(
        long,
        env = "KASPR_WEBHOOK_SELF_SIGNED_DIR",
        value_name = "DIR",
        conflicts_with = "tls_cert"
    )]
    pub self_signed_dir: Option<std::path::PathBuf>,

    /// How often the certificate files (and --kasprapps files) are re-read, e.g. 2s.
    #[arg(long, env = "KASPR_WEBHOOK_RELOAD_INTERVAL", value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub reload_interval: std::time::Duration,

    /// Read KasprApps from the *.yaml, *.yml and *.json files of DIR instead of the API server
    /// (no cluster needed; the controller is off). Apps without a namespace are in "default".
    #[arg(long, env = "KASPR_WEBHOOK_KASPRAPPS", value_name = "DIR")]
    pub kasprapps: Option<std::path::PathBuf>,

    /// Watch KasprApps only in these namespaces (comma-separated) [default: all namespaces].
    /// Apps of other namespaces are still read from the API server when a request needs them.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_NAMESPACES",
        value_name = "NS,...",
        value_delimiter = ',',
        conflicts_with = "kasprapps"
    )]
    pub namespaces: Vec<String>,

    /// Log line format.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub log_format: LogFormatArg,

    /// Log filter in RUST_LOG syntax, e.g. "info" or "debug,kube=info" (debug logs whole objects).
    #[arg(
        long,
        env = "KASPR_WEBHOOK_LOG_FILTER",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub log_filter: String,

    /// Largest accepted request body in bytes; larger ones are answered 413.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_MAX_BODY_BYTES",
        value_name = "BYTES",
        default_value = "3145728"
    )]
    pub max_body_bytes: usize,

    /// After SIGTERM/SIGINT, how long the webhook port keeps accepting while /readyz already
    /// fails, so endpoints drop the pod before its listener closes (e.g. 5s in a cluster).
    #[arg(
        long,
        env = "KASPR_WEBHOOK_SHUTDOWN_DELAY",
        value_name = "DURATION",
        default_value = "0s",
        value_parser = parse_duration
    )]
    pub shutdown_delay: std::time::Duration,

    /// After the listener closes, how long in-flight requests may take to finish.
    #[arg(long, env = "KASPR_WEBHOOK_SHUTDOWN_TIMEOUT", value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_timeout: std::time::Duration,

    /// Deadline to read and answer one request, KasprApp lookup included; keep it below the
    /// webhook configuration's timeoutSeconds (10s by default).
    #[arg(long, env = "KASPR_WEBHOOK_REQUEST_TIMEOUT", value_name = "DURATION", default_value = "8s", value_parser = parse_duration)]
    pub request_timeout: std::time::Duration,

    /// Deadline for a new connection's TLS handshake and first request headers.
    #[arg(long, env = "KASPR_WEBHOOK_HEADER_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub header_timeout: std::time::Duration,

    /// Init container resources when a KasprApp sets none, as JSON:
    /// '{"requests":{"cpu":"100m","memory":"256Mi"},"limits":{"memory":"1Gi"}}'.
    #[arg(long, env = "KASPR_WEBHOOK_INIT_CONTAINER_RESOURCES", value_name = "JSON", value_parser = parse_resources)]
    pub init_container_resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,

    /// sizeLimit of the per-pod kaspr-packages emptyDir, a Kubernetes quantity such as 4Gi
    /// (none when unset). A pod that writes more is evicted by the kubelet.
    #[arg(long, env = "KASPR_WEBHOOK_PACKAGES_VOLUME_SIZE_LIMIT", value_name = "QUANTITY", value_parser = parse_size_limit)]
    pub packages_volume_size_limit: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,

    /// Require a client certificate signed by a CA in this PEM file on the webhook port (the
    /// API server presents one when its admission configuration names it; docs/security.md).
    #[arg(long, env = "KASPR_WEBHOOK_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<std::path::PathBuf>,

    /// Issue and rotate the serving certificate in-process: a CA and certificate kept in the
    /// Secret --cert-secret, the CA bundle written into the --webhook-configs (see docs/certificates.md).
    #[arg(
        long,
        env = "KASPR_WEBHOOK_SELF_MANAGED_CERTS",
        conflicts_with_all = ["tls_cert", "self_signed_dir", "kasprapps"],
        requires = "cert_secret"
    )]
    pub self_managed_certs: bool,

    /// Secret that holds the self-managed certificates.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_CERT_SECRET",
        value_name = "NAME",
        requires = "self_managed_certs"
    )]
    pub cert_secret: Option<String>,

    /// Namespace of --cert-secret [default: the pod's own namespace].
    #[arg(
        long,
        env = "KASPR_WEBHOOK_CERT_NAMESPACE",
        value_name = "NS",
        requires = "self_managed_certs"
    )]
    pub cert_namespace: Option<String>,

    /// Mutating and validating webhook configurations whose caBundle is kept in step (comma-separated).
    #[arg(
        long,
        env = "KASPR_WEBHOOK_WEBHOOK_CONFIGS",
        value_name = "NAME,...",
        value_delimiter = ',',
        requires = "self_managed_certs"
    )]
    pub webhook_configs: Vec<String>,

    /// Service in front of the webhook; NAME, NAME.NS, NAME.NS.svc and NAME.NS.svc.cluster.local
    /// go into the certificate.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_SERVICE_NAME",
        value_name = "NAME",
        requires = "self_managed_certs"
    )]
    pub service_name: Option<String>,

    /// More DNS names or IP addresses for the self-managed certificate (comma-separated).
    #[arg(
        long,
        env = "KASPR_WEBHOOK_CERT_EXTRA_NAMES",
        value_name = "NAME,...",
        value_delimiter = ',',
        requires = "self_managed_certs"
    )]
    pub cert_extra_names: Vec<String>,

    /// Directory where the self-managed serving pair is written for the server to read
    /// [default: kaspr-packages-webhook-certs in the system temp dir].
    #[arg(
        long,
        env = "KASPR_WEBHOOK_CERT_DIR",
        value_name = "DIR",
        requires = "self_managed_certs"
    )]
    pub cert_dir: Option<std::path::PathBuf>,

    /// Lifetime of each self-managed CA and certificate.
    #[arg(long, env = "KASPR_WEBHOOK_CERT_VALIDITY", value_name = "DURATION", default_value = "365d", value_parser = parse_duration)]
    pub cert_validity: std::time::Duration,

    /// Start a rotation this long before the served certificate expires.
    #[arg(long, env = "KASPR_WEBHOOK_CERT_RENEW_BEFORE", value_name = "DURATION", default_value = "30d", value_parser = parse_duration)]
    pub cert_renew_before: std::time::Duration,

    /// During a rotation, how long a new CA is trusted before it is served, and the old one
    /// after it stopped being served.
    #[arg(long, env = "KASPR_WEBHOOK_CERT_OVERLAP", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub cert_overlap: std::time::Duration,

    /// How often each replica reads the certificate Secret and the webhook configurations.
    #[arg(long, env = "KASPR_WEBHOOK_CERT_CHECK_INTERVAL", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub cert_check_interval: std::time::Duration,

    /// Keep the PVC cache of apps in PVC mode: create, grow, own and delete
    /// <app>-python-packages (see docs/controller.md). Off with --kasprapps.
    #[arg(long, env = "KASPR_WEBHOOK_CONTROLLER_PVC", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub controller_pvc: bool,

    /// Roll StatefulSets whose python-packages injection is out of date by sending them through
    /// the webhook again (see docs/controller.md). Off with --kasprapps.
    #[arg(long, env = "KASPR_WEBHOOK_CONTROLLER_ROLLOUT", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub controller_rollout: bool,

    /// Build each app's package set (resolve, lock, install, publish) in a Job before any pod
    /// rolls, and let pods restore only built sets (see docs/builds.md). Off: install at pod
    /// start, as without this flag. Off with --kasprapps.
    #[arg(long, env = "KASPR_WEBHOOK_BUILDS", value_name = "BOOL", default_value_t = false, action = clap::ArgAction::Set)]
    pub builds: bool,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    // A bare number is seconds.
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 500ms, 8s, 2m)"))
}

fn parse_size_limit(
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

fn parse_resources(text: &str) -> Result<k8s_openapi::api::core::v1::ResourceRequirements, String> {
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

impl ServeArgs {
    /// The server's options, once the flags are known to be consistent.
    pub fn into_options(self) -> crate::server::ServeOptions {
        let ServeArgs {
            listen,
            probe_listen,
            tls_cert,
            tls_key,
            self_signed_dir,
            reload_interval,
            kasprapps,
            namespaces,
            log_format: _,
            log_filter: _,
            max_body_bytes,
            shutdown_delay,
            shutdown_timeout,
            request_timeout,
            header_timeout,
            init_container_resources,
            packages_volume_size_limit,
            client_ca,
            self_managed_certs,
            cert_secret,
            cert_namespace,
            webhook_configs,
            service_name,
            cert_extra_names,
            cert_dir,
            cert_validity,
            cert_renew_before,
            cert_overlap,
            cert_check_interval,
            controller_pvc,
            controller_rollout,
            builds,
        } = self;
        let certs = match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => crate::server::CertSource::Files { cert, key },
            _ if self_managed_certs => {
                crate::server::CertSource::SelfManaged(crate::certs::SelfManagedCerts {
                    secret: cert_secret.unwrap_or_default(),
                    namespace: cert_namespace,
                    webhook_configs: webhook_configs
                        .into_iter()
                        .map(|n| n.trim().to_owned())
                        .filter(|n| !n.is_empty())
                        .collect(),
                    service: service_name,
                    extra_names: cert_extra_names,
                    dir: cert_dir.unwrap_or_else(|| {
                        std::env::temp_dir().join("kaspr-packages-webhook-certs")
                    }),
                    validity: cert_validity,
                    renew_before: cert_renew_before,
                    overlap: cert_overlap,
                    check_interval: cert_check_interval,
                })
            }
            _ => crate::server::CertSource::SelfSigned {
                dir: self_signed_dir.unwrap_or_else(crate::certs::local::default_self_signed_dir),
            },
        };
        let apps = match kasprapps {
            Some(dir) => crate::server::AppSource::Files { dir },
            None => crate::server::AppSource::Cluster {
                namespaces: namespaces
                    .into_iter()
                    .map(|n| n.trim().to_owned())
                    .filter(|n| !n.is_empty())
                    .collect(),
            },
        };
        crate::server::ServeOptions {
            settings: crate::server::Settings {
                listen,
                probe_listen,
                max_body_bytes,
                request_timeout,
                header_timeout,
                shutdown_delay,
                shutdown_timeout,
                render: crate::config::RenderConfig {
                    default_resources: init_container_resources,
                    packages_volume_size_limit,
                },
                client_ca,
            },
            certs,
            apps,
            reload_interval,
            controller: crate::controller::ControllerOptions {
                pvc: controller_pvc,
                rollout: controller_rollout,
                builds,
            },
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    if let Err(error) = crate::telemetry::init(args.log_format.into(), &args.log_filter) {
        eprintln!("kaspr-packages-webhook: {error}");
        return ExitCode::from(2);
    }
    match crate::server::run(args.into_options()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "serve failed");
            ExitCode::FAILURE
        }
    }
}

const PREVIEW_ABOUT: &str = "Render what the webhook would do, without a cluster.

Reads a KasprApp (YAML or JSON) and a StatefulSet or Pod (--object FILE, or - for stdin). \
Without --object, the StatefulSet is the one the Kaspr operator renders for the app \
(<app>-app, owned by the KasprApp, main container `kaspr`). Prints the mutated object \
(default YAML) or the JSON patch the webhook would answer with. Warnings go to stderr. \
Exits 1, listing every error with its field path, when the KasprApp is invalid.";

/// Output format of `preview`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PreviewOutputArg {
    /// The mutated object as YAML.
    Yaml,
    /// The mutated object as JSON.
    Json,
    /// The RFC 6902 JSON patch.
    Patch,
}

/// Options of `preview`.
#[derive(Debug, clap::Args)]
pub struct PreviewArgs {
    /// The KasprApp file (YAML or JSON).
    #[arg(long, env = "KASPR_WEBHOOK_KASPRAPP", value_name = "FILE")]
    pub kasprapp: std::path::PathBuf,

    /// The StatefulSet or Pod to mutate (YAML or JSON; - reads stdin)
    /// [default: the StatefulSet the Kaspr operator renders for the app].
    #[arg(long, env = "KASPR_WEBHOOK_OBJECT", value_name = "FILE|-")]
    pub object: Option<String>,

    /// What to print.
    #[arg(
        long,
        short,
        env = "KASPR_WEBHOOK_OUTPUT",
        value_enum,
        default_value = "yaml"
    )]
    pub output: PreviewOutputArg,

    /// Chart-level default resources for the init container, as JSON
    /// ({"requests":{...},"limits":{...}}), used when the KasprApp sets none.
    #[arg(long, env = "KASPR_WEBHOOK_INIT_CONTAINER_RESOURCES", value_name = "JSON", value_parser = parse_resources)]
    pub init_container_resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,

    /// sizeLimit of the per-pod kaspr-packages emptyDir, a Kubernetes quantity such as 4Gi
    /// (none when unset). A pod that writes more is evicted by the kubelet.
    #[arg(long, env = "KASPR_WEBHOOK_PACKAGES_VOLUME_SIZE_LIMIT", value_name = "QUANTITY", value_parser = parse_size_limit)]
    pub packages_volume_size_limit: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
}

/// Options of `validate`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// KasprApp files (YAML, several documents allowed, or JSON).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<std::path::PathBuf>,
}

fn read_input(path: &str) -> Result<String, String> {
    if path == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("stdin: {e}"))?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
    }
}

fn preview(args: PreviewArgs) -> ExitCode {
    let PreviewArgs {
        kasprapp,
        object,
        output,
        init_container_resources,
        packages_volume_size_limit,
    } = args;
    let result = (|| -> Result<crate::preview::Preview, String> {
        let app_name = kasprapp.display().to_string();
        let app = crate::preview::parse_one(&read_input(&app_name)?, &app_name)
            .map_err(|e| e.to_string())?;
        let object = match object {
            Some(path) => {
                let name = if path == "-" {
                    "stdin".to_owned()
                } else {
                    path.clone()
                };
                Some(
                    crate::preview::parse_one(&read_input(&path)?, &name)
                        .map_err(|e| e.to_string())?,
                )
            }
            None => None,
        };
        let config = crate::config::RenderConfig {
            default_resources: init_container_resources,
            packages_volume_size_limit,
        };
        let output = match output {
            PreviewOutputArg::Yaml => crate::preview::Output::Yaml,
            PreviewOutputArg::Json => crate::preview::Output::Json,
            PreviewOutputArg::Patch => crate::preview::Output::Patch,
        };
        crate::preview::preview(&app, object, output, &config).map_err(|e| e.to_string())
    })();
    match result {
        Ok(preview) => {
            for warning in &preview.warnings {
                eprintln!("Warning: {warning}");
            }
            print!("{}", preview.text);
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn validate(args: &ValidateArgs) -> ExitCode {
    let mut failed = false;
    for path in &args.files {
        let name = path.display().to_string();
        let reports = read_input(&name).and_then(|text| {
            crate::preview::validate_text(&text, &name).map_err(|e| e.to_string())
        });
        match reports {
            Err(message) => {
                eprintln!("error: {message}");
                failed = true;
            }
            Ok(reports) => {
                for (label, report) in reports {
                    for warning in &report.warnings {
                        eprintln!("Warning: {label}: {warning}");
                    }
                    if report.errors.is_empty() {
                        println!("{label}: valid");
                    } else {
                        failed = true;
                        println!("{label}: invalid");
                        for error in &report.errors {
                            println!("  {error}");
                        }
                    }
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod serve_args_tests;
