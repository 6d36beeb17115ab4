//! The admission server (`serve`): the HTTPS webhook port, the plain-HTTP probe port, and the
//! background tasks that feed them (certificate reload, KasprApp cache).
//!
//! Wiring, in order: [`run`] builds the tokio runtime; [`serve`] turns [`ServeOptions`] into
//! [`Services`] (kube client, KasprApp source, certificates, metrics registry, background
//! tasks); [`start`] binds both ports and runs everything until the [`Shutdown`] fires, then
//! drains. Tests call [`start`] directly with their own [`Services`].
//!
//! The controller (PVC lifecycle, rollout trigger) runs in this process beside the server: it
//! is one more [`BackgroundTask`] in [`Services::tasks`], built from the same kube client and
//! KasprApp source, registering its metrics into [`Services::registry`].

pub mod probes;
pub mod shutdown;
pub mod tls;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;

use crate::cache::{FileKasprApps, KasprApps, KubeKasprApps};
use crate::certs::reload::CertReloader;
use crate::config::RenderConfig;
use crate::metrics::{self, WebhookMetrics};
pub use shutdown::Shutdown;

/// Settings of the two ports.
#[derive(Debug, Clone)]
pub struct Settings {
    /// HTTPS address of `/mutate` and `/validate`.
    pub listen: SocketAddr,
    /// Plain-HTTP address of `/livez`, `/readyz` and `/metrics`.
    pub probe_listen: SocketAddr,
    /// Larger request bodies are answered 413.
    pub max_body_bytes: usize,
    /// The most bytes of answers kept for repeated reviews; 0 keeps none.
    pub answer_cache_bytes: usize,
    /// Deadline for reading a request and answering it (KasprApp lookup included).
    pub request_timeout: Duration,
    /// Deadline for a TLS handshake and for a new connection's first request headers.
    pub header_timeout: Duration,
    /// After a shutdown signal, how long the webhook port keeps accepting (while `/readyz`
    /// already fails) so that endpoints drop the pod before its listener closes.
    pub shutdown_delay: Duration,
    /// How long in-flight requests may take to finish once the listener is closed.
    pub shutdown_timeout: Duration,
    /// Chart-level rendering settings.
    pub render: RenderConfig,
    /// When set, the webhook port requires a client certificate signed by a CA in this PEM file.
    pub client_ca: Option<PathBuf>,
    /// Serve the load benchmark's no-op `POST /bench-floor` (see [`webhook::bench_floor_router`]).
    pub bench_floor: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            probe_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 3 * 1024 * 1024,
            answer_cache_bytes: crate::admission::AnswerCache::BUDGET_BYTES,
            request_timeout: Duration::from_secs(8),
            header_timeout: Duration::from_secs(5),
            shutdown_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(20),
            render: RenderConfig::default(),
            client_ca: None,
            bench_floor: false,
        }
    }
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files, re-read on a timer.
    Files { cert: PathBuf, key: PathBuf },
    /// A pair generated at start into this directory, for local use.
    SelfSigned { dir: PathBuf },
    /// Issued and rotated by the webhook itself through a Secret (`crate::certs`).
    SelfManaged(crate::certs::SelfManagedCerts),
}

/// Where KasprApps come from.
#[derive(Debug, Clone)]
pub enum AppSource {
    /// The API server (watch cache); empty `namespaces` means all.
    Cluster { namespaces: Vec<String> },
    /// YAML/JSON files of a directory; no cluster needed.
    Files { dir: PathBuf },
}

/// Everything `serve` needs, as parsed from the command line.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub settings: Settings,
    pub certs: CertSource,
    pub apps: AppSource,
    /// How often certificate files (and `--kasprapps` files) are re-read.
    pub reload_interval: Duration,
    /// Which parts of the controller run (never with KasprApps from files).
    pub controller: crate::controller::ControllerOptions,
}

/// A future that runs beside the server for the life of the process. If one ends on its own,
/// the process shuts down (and exits non-zero), so the orchestrator restarts it.
pub struct BackgroundTask {
    name: &'static str,
    future: BoxFuture<'static, ()>,
}

impl BackgroundTask {
    pub fn new(name: &'static str, future: impl Future<Output = ()> + Send + 'static) -> Self {
        BackgroundTask {
            name,
            future: future.boxed(),
        }
    }
}

/// The shared pieces the server runs with.
pub struct Services {
    pub apps: Arc<dyn KasprApps>,
    pub certs: Arc<CertReloader>,
    /// Metrics registry; the server adds its own metrics before serving it.
    pub registry: Registry,
    pub tasks: Vec<BackgroundTask>,
}

/// Builds the runtime and serves until SIGTERM/SIGINT.
pub fn run(options: ServeOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kaspr-webhook")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = Shutdown::new();
        tokio::spawn(shutdown.clone().on_os_signal());
        serve(options, shutdown).await
    })
}

/// Assembles the services from the options and runs the server until `shutdown`.
pub async fn serve(options: ServeOptions, shutdown: Shutdown) -> anyhow::Result<()> {
    let ServeOptions {
        mut settings,
        certs,
        apps,
        reload_interval,
        controller,
    } = options;
    let mut registry = metrics::new_registry();
    let mut tasks = Vec::new();

    let (cert_path, key_path, self_managed) = serving_pair(certs).await?;
    let certs = Arc::new(CertReloader::new(cert_path, key_path));
    // The first load is synchronous with start so the server is ready at once when the files
    // exist; when they do not yet (a Secret still being written), the reload task keeps looking.
    certs.reload_and_log().await;
    tasks.push(BackgroundTask::new(
        "certificate-reload",
        Arc::clone(&certs).watch(reload_interval),
    ));

    let source = app_source(apps, reload_interval, controller.builds, &mut tasks).await?;
    if let Some((config, policy)) = self_managed {
        let client = source
            .client
            .clone()
            .context("self-managed certificates need the API server (not --kasprapps)")?;
        tasks.push(BackgroundTask::new(
            "self-managed-certificates",
            crate::certs::run(client, config, policy, Arc::clone(&certs)),
        ));
    }
    if let Some(client) = &source.client {
        image_volumes_check(client, &mut settings.render.image_mode).await;
    }
    if let Some(client) = source.client {
        tokio::spawn(warn_if_untested_release(client.clone()));
        let cluster = ClusterTasks {
            namespaces: &source.namespaces,
            controller,
            render: &settings.render,
        };
        tasks.extend(cluster_tasks(&client, &cluster, &mut registry));
    }

    let services = Services {
        apps: source.apps,
        certs,
        registry,
        tasks,
    };
    let running = start(settings, services, shutdown).await?;
    tracing::info!(
        webhook = %running.webhook_addr,
        probes = %running.probe_addr,
        version = env!("CARGO_PKG_VERSION"),
        "serving"
    );
    running.wait().await
}

type SelfManaged = (
    crate::certs::SelfManagedCerts,
    crate::certs::authority::Policy,
);

/// The certificate and key files to serve, and for self-managed certificates the settings the
/// rotation task needs. Writes the local self-signed pair when no files were given.
async fn serving_pair(
    certs: CertSource,
) -> anyhow::Result<(PathBuf, PathBuf, Option<SelfManaged>)> {
    match certs {
        CertSource::Files { cert, key } => Ok((cert, key, None)),
        CertSource::SelfManaged(mut config) => {
            let policy = config.prepare()?;
            let cert = config.dir.join(crate::certs::authority::TLS_CERT);
            let key = config.dir.join(crate::certs::authority::TLS_KEY);
            Ok((cert, key, Some((config, policy))))
        }
        CertSource::SelfSigned { dir } => {
            let generated = tokio::task::spawn_blocking(move || crate::certs::local::write_self_signed(&dir))
                .await
                .context("self-signed certificate task failed")?
                .context("no --tls-cert/--tls-key given, and the self-signed pair for local use could not be written (choose a directory with --self-signed-dir)")?;
            tracing::warn!(
                ca = %generated.ca_path.display(),
                "no --tls-cert/--tls-key given: serving a self-signed certificate for localhost; \
                 trust its CA with `curl --cacert {}`",
                generated.ca_path.display()
            );
            Ok((generated.cert_path, generated.key_path, None))
        }
    }
}

/// Where KasprApps come from, the API client when that is the cluster, and the namespaces
/// watched there (empty: all).
struct AppSourceParts {
    apps: Arc<dyn KasprApps>,
    client: Option<kube::Client>,
    namespaces: Vec<String>,
}

async fn app_source(
    apps: AppSource,
    reload_interval: Duration,
    builds: bool,
    tasks: &mut Vec<BackgroundTask>,
) -> anyhow::Result<AppSourceParts> {
    match apps {
        AppSource::Files { dir } => {
            let loaded = tokio::task::spawn_blocking(move || FileKasprApps::load(&dir))
                .await
                .context("KasprApp file task failed")?
                .context("cannot read the --kasprapps directory")?;
            let loaded = Arc::new(loaded);
            tracing::info!(dir = %loaded.dir().display(), apps = loaded.len(), "KasprApps read from files; the controller is off");
            tasks.push(BackgroundTask::new(
                "kasprapp-files",
                Arc::clone(&loaded).watch(reload_interval),
            ));
            Ok(AppSourceParts {
                apps: loaded,
                client: None,
                namespaces: Vec::new(),
            })
        }
        AppSource::Cluster { namespaces } => {
            let client = kube::Client::try_default()
                .await
                .context("cannot configure a Kubernetes client (KUBECONFIG or in-cluster service account); use --kasprapps DIR to run without a cluster")?;
            let (cache, runner) = KubeKasprApps::new(client.clone(), &namespaces);
            tasks.push(BackgroundTask::new("kasprapp-cache", runner));
            let apps: Arc<dyn KasprApps> = if builds {
                // Builds on: render each app's current package set (docs/builds.md).
                let (locks, runner) = crate::cache::KubeLockStates::new(&client, &namespaces);
                tasks.push(BackgroundTask::new("lock-configmap-cache", runner));
                Arc::new(crate::cache::SetAwareApps::new(
                    Arc::new(cache),
                    Arc::new(locks),
                ))
            } else {
                Arc::new(cache)
            };
            Ok(AppSourceParts {
                apps,
                client: Some(client),
                namespaces,
            })
        }
    }
}

/// Image mode: asks the API server's release once (discovery) when a repository is configured;
/// before 1.36, or when the release cannot be read in time, apps keep their cache mode.
async fn image_volumes_check(
    client: &kube::Client,
    image_mode: &mut crate::config::ImageModeConfig,
) {
    if image_mode.repository.is_none() || image_mode.unsupported.is_some() {
        return;
    }
    let asked = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.apiserver_version(),
    )
    .await;
    image_mode.unsupported = match asked {
        Ok(Ok(info)) => crate::config::image_volumes_unsupported_by(&info.major, &info.minor),
        Ok(Err(error)) => Some(format!(
            "the API server's release could not be read ({error})"
        )),
        Err(_) => Some("the API server's release could not be read within 10s".to_owned()),
    };
    match &image_mode.unsupported {
        None => tracing::info!("image mode: the API server serves image volumes"),
        Some(reason) => tracing::warn!(%reason, "image mode: apps keep their cache mode"),
    }
}

/// Logs one warning when the API server runs a Kubernetes release outside the tested range;
/// serving goes on either way. A server that cannot be asked now is retried a few times.
async fn warn_if_untested_release(client: kube::Client) {
    use crate::releases::{Support, TestedRange, classify};
    for attempt in 0..5u64 {
        match client.apiserver_version().await {
            Ok(info) => {
                let range = TestedRange;
                match classify(&info.major, &info.minor) {
                    Support::Tested => {
                        tracing::info!(kubernetes = %info.git_version, tested = %range, "Kubernetes release is tested")
                    }
                    Support::Older => tracing::warn!(
                        kubernetes = %info.git_version, tested = %range,
                        "this Kubernetes release is older than the releases this webhook is tested on; it keeps serving, but upgrade the cluster"
                    ),
                    Support::Newer => tracing::warn!(
                        kubernetes = %info.git_version, tested = %range,
                        "this Kubernetes release is newer than the releases this webhook is tested on; it keeps serving"
                    ),
                    Support::Unreadable(what) => tracing::warn!(
                        kubernetes = %info.git_version, reported = %what, tested = %range,
                        "cannot tell the Kubernetes release from the API server's version"
                    ),
                }
                return;
            }
            Err(error) => {
                tracing::debug!(%error, attempt, "cannot read the API server's version yet");
                tokio::time::sleep(std::time::Duration::from_secs(2 + 4 * attempt)).await;
            }
        }
    }
    tracing::warn!("could not read the API server's version; the tested-release check was skipped");
}

/// What the cluster tasks need beyond the client and the registry.
struct ClusterTasks<'a> {
    /// The namespaces KasprApps are watched in (empty: all).
    namespaces: &'a [String],
    controller: crate::controller::ControllerOptions,
    render: &'a RenderConfig,
}

/// Background work that needs the cluster, started beside the server: the controller (PVC
/// lifecycle, rollout trigger), sharing the server's kube client and metrics registry. It has
/// its own KasprApp watch (its triggers need the watch events, not just a store) and is not
/// part of readiness. Not called with `--kasprapps`.
fn cluster_tasks(
    client: &kube::Client,
    cluster: &ClusterTasks<'_>,
    registry: &mut Registry,
) -> Vec<BackgroundTask> {
    let ClusterTasks {
        namespaces,
        controller,
        render,
    } = cluster;
    crate::controller::run(client, namespaces, *controller, (*render).clone(), registry)
        .map(|future| BackgroundTask::new("controller", future))
        .into_iter()
        .collect()
}

/// A started server.
pub struct Running {
    pub webhook_addr: SocketAddr,
    pub probe_addr: SocketAddr,
    pub shutdown: Shutdown,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the server has shut down and drained.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done.await.context("server task panicked")?
    }
}

/// Binds both ports, spawns the servers and background tasks, and returns at once. Everything
/// stops when `shutdown` fires: `/readyz` fails at once, the webhook port stops accepting after
/// `settings.shutdown_delay`, in-flight requests get `settings.shutdown_timeout` to finish, then
/// the probe port and the tasks stop.
pub async fn start(
    settings: Settings,
    services: Services,
    shutdown: Shutdown,
) -> anyhow::Result<Running> {
    let Settings {
        listen,
        probe_listen,
        max_body_bytes,
        answer_cache_bytes,
        request_timeout,
        header_timeout,
        shutdown_delay,
        shutdown_timeout,
        render,
        client_ca,
        bench_floor,
    } = settings;
    let Services {
        apps,
        certs,
        mut registry,
        tasks,
    } = services;

    let webhook_metrics = WebhookMetrics::register(&mut registry);
    let registry = Arc::new(registry);

    let (webhook_listener, webhook_addr) = bind_webhook(listen)?;
    let probe_listener = tokio::net::TcpListener::bind(probe_listen)
        .await
        .with_context(|| format!("cannot listen on {probe_listen} (--probe-listen)"))?;
    let probe_addr = probe_listener
        .local_addr()
        .context("probe socket has no address")?;

    let tls_config = Arc::new(tls::server_config(certs.resolver(), client_ca.as_deref())?);
    let webhook_state = webhook::WebhookState::new(
        Arc::clone(&apps),
        render,
        webhook_metrics.clone(),
        max_body_bytes,
        answer_cache_bytes,
        request_timeout,
    );
    let routes = if bench_floor {
        tracing::warn!("serving the load benchmark's POST /bench-floor on the webhook port");
        webhook::bench_floor_router(webhook_state)
    } else {
        webhook::router(webhook_state)
    };
    let (handle, webhook_server) =
        spawn_webhook_server(webhook_listener, tls_config, header_timeout, routes)?;

    let probe_state = probes::ProbeState::new(
        Arc::clone(&certs),
        Arc::clone(&apps),
        shutdown.clone(),
        registry,
        webhook_metrics,
    );
    let probes_stop = Shutdown::new();
    let probe_server = tokio::spawn({
        let stop = probes_stop.clone();
        async move {
            axum::serve(probe_listener, probes::router(probe_state))
                .with_graceful_shutdown(async move { stop.wait().await })
                .await
        }
    });

    let background = spawn_background(tasks);
    let done = tokio::spawn(supervise(Supervised {
        shutdown: shutdown.clone(),
        shutdown_delay,
        shutdown_timeout,
        handle,
        webhook_server,
        probes_stop,
        probe_server,
        background,
    }));

    Ok(Running {
        webhook_addr,
        probe_addr,
        shutdown,
        done,
    })
}

fn bind_webhook(listen: SocketAddr) -> anyhow::Result<(std::net::TcpListener, SocketAddr)> {
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen} (--listen)"))?;
    listener
        .set_nonblocking(true)
        .context("cannot configure the webhook socket")?;
    let addr = listener
        .local_addr()
        .context("webhook socket has no address")?;
    Ok((listener, addr))
}

/// The HTTPS server for `/mutate` and `/validate`: handshake and first-request deadlines, HTTP/1.1
/// keep-alive with a header deadline, HTTP/2 as negotiated.
fn spawn_webhook_server(
    listener: std::net::TcpListener,
    tls_config: Arc<rustls::ServerConfig>,
    header_timeout: Duration,
    routes: axum::Router,
) -> anyhow::Result<(
    axum_server::Handle<SocketAddr>,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let handle = axum_server::Handle::new();
    let mut server = axum_server::tls_rustls::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(tls_config),
    )
    .context("cannot start the webhook server")?
    .map(|acceptor| acceptor.handshake_timeout(header_timeout))
    .handle(handle.clone())
    .first_request_timeout(header_timeout);
    server
        .http_builder()
        .http1()
        .keep_alive(true)
        .header_read_timeout(Some(header_timeout));
    let task = tokio::spawn(server.serve(routes.into_make_service()));
    Ok((handle, task))
}

/// Each background task on its own, reporting its name when it ends.
fn spawn_background(tasks: Vec<BackgroundTask>) -> tokio::task::JoinSet<&'static str> {
    let mut background = tokio::task::JoinSet::new();
    for BackgroundTask { name, future } in tasks {
        background.spawn(async move {
            future.await;
            name
        });
    }
    background
}

/// What runs after `start` returns, and what stopping it takes.
struct Supervised {
    shutdown: Shutdown,
    shutdown_delay: Duration,
    shutdown_timeout: Duration,
    handle: axum_server::Handle<SocketAddr>,
    webhook_server: tokio::task::JoinHandle<std::io::Result<()>>,
    probes_stop: Shutdown,
    probe_server: tokio::task::JoinHandle<std::io::Result<()>>,
    background: tokio::task::JoinSet<&'static str>,
}

/// Waits for the shutdown signal (or for a part to stop), then stops in order: readiness off,
/// the delay, draining the webhook port within the timeout, the probe port, the background
/// tasks. An unexpected stop is the error returned.
async fn supervise(parts: Supervised) -> anyhow::Result<()> {
    let Supervised {
        shutdown,
        shutdown_delay,
        shutdown_timeout,
        handle,
        mut webhook_server,
        probes_stop,
        probe_server,
        mut background,
    } = parts;
    let mut failure = None;
    let mut webhook_ended = false;
    tokio::select! {
        () = shutdown.wait() => {}
        Some(ended) = background.join_next() => {
            let name = ended.unwrap_or("a background task (panicked)");
            tracing::error!(task = name, "background task stopped; shutting down");
            failure = Some(anyhow::anyhow!("background task {name} stopped"));
        }
        result = &mut webhook_server => {
            webhook_ended = true;
            failure = Some(match result {
                Ok(Ok(())) => anyhow::anyhow!("webhook server stopped"),
                Ok(Err(error)) => anyhow::Error::new(error).context("webhook server failed"),
                Err(error) => anyhow::Error::new(error).context("webhook server panicked"),
            });
        }
    }
    // Readiness turns false first; the listener stays open for `shutdown_delay` so that
    // requests routed before the endpoint update still find it.
    shutdown.trigger();
    if failure.is_none() && !shutdown_delay.is_zero() {
        tracing::info!(delay = %humantime::format_duration(shutdown_delay), "not ready; still accepting before draining");
        tokio::time::sleep(shutdown_delay).await;
    }
    handle.graceful_shutdown(Some(shutdown_timeout));
    if !webhook_ended {
        // Bounded: axum-server closes what is left once the grace period is over.
        let drained = tokio::time::timeout(
            shutdown_timeout + Duration::from_secs(2),
            &mut webhook_server,
        );
        match drained.await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "webhook server ended with an error"),
            Ok(Err(error)) => tracing::warn!(%error, "webhook server task failed"),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish in time");
                webhook_server.abort();
            }
        }
    }
    probes_stop.trigger();
    let mut probe_server = probe_server;
    match tokio::time::timeout(Duration::from_secs(2), &mut probe_server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => tracing::warn!(%error, "probe server ended with an error"),
        Ok(Err(error)) => tracing::warn!(%error, "probe server task failed"),
        // A scraper's idle keep-alive connection must not hold the exit.
        Err(_) => probe_server.abort(),
    }
    background.shutdown().await;
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}
