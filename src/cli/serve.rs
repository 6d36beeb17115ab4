//! `serve`: the flags of the admission server and controller, and how they become its options.
use std::process::ExitCode;

use super::parsers::{RenderArgs, parse_duration};

pub(super) const SERVE_ABOUT: &str = "Run the admission webhook.

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

    /// The most bytes of answers kept in memory and handed out again to identical reviews (the
    /// operator's repeated UPDATEs, a pod recreated under its own name); 0 keeps none.
    #[arg(
        long,
        env = "KASPR_WEBHOOK_ANSWER_CACHE_BYTES",
        value_name = "BYTES",
        default_value = "4194304"
    )]
    pub answer_cache_bytes: usize,

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

    #[command(flatten)]
    pub render: RenderArgs,

    /// Require a client certificate signed by a CA in this PEM file on the webhook port (the
    /// API server presents one when its admission configuration names it; docs/security.md).
    #[arg(long, env = "KASPR_WEBHOOK_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<std::path::PathBuf>,

    /// Also serve `POST /bench-floor` on the webhook port: the load benchmark's floor, an
    /// answer of `?bytes=N` bytes after reading the body, with no other work. Off by default,
    /// hidden, and never enabled by the chart.
    #[arg(long, env = "KASPR_WEBHOOK_BENCH_FLOOR", hide = true)]
    pub bench_floor: bool,

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

    /// How long the API server may fail to call this webhook for an app (no ready endpoint,
    /// connection refused) before the controller records a Warning Event on it; until then it
    /// retries every 3 s and logs at info. Covers an install or upgrade whose Service has no
    /// ready endpoint yet, and a StatefulSet marked to move to this rendering revision that comes
    /// back rendered by the previous revision's replicas during that upgrade. 0s warns at once.
    #[arg(long, env = "KASPR_WEBHOOK_UNREACHABLE_GRACE", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub unreachable_grace: std::time::Duration,

    /// At most this many apps move to this webhook's rendering revision at a time on their own,
    /// each finished (every replica Ready on the new template) before the next starts. 0: apps
    /// move only when their configuration changes or a user asks (see docs/revisions.md).
    #[arg(
        long,
        env = "KASPR_WEBHOOK_ROLLOUT_BUDGET",
        value_name = "APPS",
        default_value_t = 0
    )]
    pub rollout_budget: u32,

    /// A move to this revision not finished within this time fails: a Warning Event on the
    /// KasprApp, and no further app starts moving on its own until it finishes.
    #[arg(long, env = "KASPR_WEBHOOK_ROLLOUT_DEADLINE", value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub rollout_deadline: std::time::Duration,
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
            answer_cache_bytes,
            shutdown_delay,
            shutdown_timeout,
            request_timeout,
            header_timeout,
            render,
            client_ca,
            bench_floor,
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
            unreachable_grace,
            rollout_budget,
            rollout_deadline,
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
                answer_cache_bytes,
                request_timeout,
                header_timeout,
                shutdown_delay,
                shutdown_timeout,
                render: render.into_config(),
                client_ca,
                bench_floor,
            },
            certs,
            apps,
            reload_interval,
            controller: crate::controller::ControllerOptions {
                pvc: controller_pvc,
                rollout: controller_rollout,
                builds,
                unreachable_grace,
                rollout_budget,
                rollout_deadline,
            },
        }
    }
}

pub(super) fn serve(args: ServeArgs) -> ExitCode {
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
