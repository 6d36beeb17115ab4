//! The I/O shell of `explain`: reads a [`Snapshot`] from the API server with the user's
//! kubeconfig. Only GET and LIST; nothing is written.
//!
//! The object explained and its KasprApp must be readable, else there is nothing to explain
//! ([`FetchError`], exit status 1). Everything else (the Namespace, the webhook configurations,
//! the webhook's Deployment, pods, the PVC) may be forbidden to the user: it is then reported
//! as unreadable and the explanation says what it could not check.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::Value;

use super::webhooks::{MUTATING_WEBHOOKS, registers};
use super::{Kind, Known, Server, Snapshot};
use crate::app;
use crate::config::RenderConfig;
use crate::spec::{Cache, pvc_name};

/// What to read, and how.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// A kubeconfig file instead of `KUBECONFIG` / `~/.kube/config` (or the in-cluster account).
    pub kubeconfig: Option<std::path::PathBuf>,
    /// A kubeconfig context other than the current one.
    pub context: Option<String>,
    /// The namespace of the object; the context's namespace when unset.
    pub namespace: Option<String>,
    /// The release's MutatingWebhookConfiguration (its ValidatingWebhookConfiguration has the
    /// same name); found by its webhooks' names when unset.
    pub webhook_config: Option<String>,
    /// Rendering settings that override the ones read from the webhook's Deployment.
    pub init_container_resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    pub packages_volume_size_limit: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    /// Deadline of the whole read.
    pub timeout: Duration,
}

/// Why there is nothing to explain.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("kubeconfig: {0}")]
    Config(String),
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("reading {what}: {reason}")]
    Read { what: String, reason: String },
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
}

fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}

fn to_value(object: &DynamicObject) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

fn kasprapp_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kaspr.io", "v1alpha1", "KasprApp"),
        "kasprapps",
    )
}

/// One object, or `Missing` on 404.
async fn get(api: &Api<DynamicObject>, name: &str) -> Known<Value> {
    match api.get_opt(name).await {
        Ok(Some(object)) => Known::Found(to_value(&object)),
        Ok(None) => Known::Missing,
        Err(error) => Known::Unreadable(describe(&error)),
    }
}

async fn list(api: &Api<DynamicObject>, selector: Option<&str>) -> Known<Vec<Value>> {
    let mut params = ListParams::default();
    if let Some(selector) = selector {
        params = params.labels(selector);
    }
    match api.list(&params).await {
        Ok(list) => Known::Found(list.items.iter().map(to_value).collect()),
        Err(error) => Known::Unreadable(describe(&error)),
    }
}

/// A kube client from the kubeconfig (or the in-cluster account), and its default namespace.
async fn client(options: &FetchOptions) -> Result<(Client, String), FetchError> {
    let kube_options = KubeConfigOptions {
        context: options.context.clone(),
        ..KubeConfigOptions::default()
    };
    let mut config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| FetchError::Config(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kubeconfig, &kube_options)
                .await
                .map_err(|e| FetchError::Config(e.to_string()))?
        }
        None if options.context.is_some() => Config::from_kubeconfig(&kube_options)
            .await
            .map_err(|e| FetchError::Config(e.to_string()))?,
        None => Config::infer()
            .await
            .map_err(|e| FetchError::Config(e.to_string()))?,
    };
    config.connect_timeout = Some(options.timeout);
    config.read_timeout = Some(options.timeout);
    let namespace = config.default_namespace.clone();
    let client = Client::try_from(config).map_err(|e| FetchError::Config(e.to_string()))?;
    Ok((client, namespace))
}

/// Reads the snapshot of `kind` `name` on a runtime of its own (the CLI is synchronous).
pub fn run_blocking(
    kind: Kind,
    name: &str,
    options: &FetchOptions,
) -> Result<Snapshot, FetchError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| FetchError::Config(format!("starting the runtime: {e}")))?;
    runtime.block_on(async {
        match tokio::time::timeout(options.timeout, read(kind, name, options)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout(options.timeout)),
        }
    })
}

async fn read(kind: Kind, name: &str, options: &FetchOptions) -> Result<Snapshot, FetchError> {
    let (client, default_namespace) = client(options).await?;
    let reader = Reader {
        namespace: options.namespace.clone().unwrap_or(default_namespace),
        client,
    };
    let mut snapshot = Snapshot::of(kind, reader.object(kind, name).await?);
    snapshot.namespace = get(
        &reader.cluster(&ApiResource::erase::<Namespace>(&())),
        &reader.namespace,
    )
    .await;
    reader.webhook_configurations(&mut snapshot, options).await;
    snapshot.server = server(&reader.client, snapshot.mutating.found(), options).await;
    let Some(app_name) = reader.related(&mut snapshot, kind, name).await else {
        return Ok(snapshot);
    };
    if kind != Kind::KasprApp {
        snapshot.kasprapp = match get(&reader.namespaced(&kasprapp_resource()), &app_name).await {
            Known::Found(app) => Some(app),
            Known::Missing => None,
            Known::Unreadable(reason) => {
                return Err(FetchError::Read {
                    what: format!("KasprApp {}/{app_name}", reader.namespace),
                    reason,
                });
            }
        };
    }
    let pvc_mode = snapshot
        .kasprapp
        .as_ref()
        .and_then(|a| crate::validation::validate_kasprapp(a).spec)
        .is_some_and(|spec| matches!(spec.cache, Cache::Pvc(_)));
    if pvc_mode {
        let claims = reader.namespaced(&ApiResource::erase::<PersistentVolumeClaim>(&()));
        snapshot.claim = Some(get(&claims, &pvc_name(&app_name)).await);
    }
    Ok(snapshot)
}

/// GETs and LISTs in the explained object's namespace, or cluster-wide.
struct Reader {
    client: Client,
    namespace: String,
}

impl Reader {
    fn namespaced(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, resource)
    }

    fn cluster(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), resource)
    }

    /// The object explained: without it there is nothing to explain.
    async fn object(&self, kind: Kind, name: &str) -> Result<Value, FetchError> {
        let resource = match kind {
            Kind::Pod => ApiResource::erase::<Pod>(&()),
            Kind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
            Kind::KasprApp => kasprapp_resource(),
        };
        match get(&self.namespaced(&resource), name).await {
            Known::Found(object) => Ok(object),
            Known::Missing => Err(FetchError::NotFound {
                kind: kind.as_str(),
                namespace: self.namespace.clone(),
                name: name.to_owned(),
            }),
            Known::Unreadable(reason) => Err(FetchError::Read {
                what: format!("{} {}/{name}", kind.as_str(), self.namespace),
                reason,
            }),
        }
    }

    /// The release's webhook configurations: the named one, or the one registering ours.
    async fn webhook_configurations(&self, snapshot: &mut Snapshot, options: &FetchOptions) {
        let mutating_api = self.cluster(&ApiResource::erase::<MutatingWebhookConfiguration>(&()));
        snapshot.mutating = match &options.webhook_config {
            Some(config) => get(&mutating_api, config).await,
            None => match list(&mutating_api, None).await {
                Known::Found(all) => release_configuration(all),
                Known::Missing => Known::Missing,
                Known::Unreadable(reason) => Known::Unreadable(reason),
            },
        };
        if let Some(config) = snapshot.mutating.found() {
            let config_name = config
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let validating =
                self.cluster(&ApiResource::erase::<ValidatingWebhookConfiguration>(&()));
            snapshot.validating = get(&validating, &config_name).await;
        } else {
            snapshot.validating = snapshot.mutating.clone();
        }
    }

    /// The objects around the explained one (its StatefulSet, pods, or an app's StatefulSets
    /// and pods), and the name of its KasprApp when it belongs to one.
    async fn related(&self, snapshot: &mut Snapshot, kind: Kind, name: &str) -> Option<String> {
        let pods = self.namespaced(&ApiResource::erase::<Pod>(&()));
        let statefulsets = self.namespaced(&ApiResource::erase::<StatefulSet>(&()));
        match kind {
            Kind::Pod => {
                if let Some(owner) = owner_statefulset(&snapshot.object) {
                    snapshot.owner = Some(get(&statefulsets, &owner).await);
                }
                app::pod_app(&snapshot.object).or_else(|| {
                    snapshot
                        .owner
                        .as_ref()?
                        .found()
                        .and_then(app::statefulset_app)
                })
            }
            Kind::StatefulSet => {
                if let Some(selector) = match_labels(&snapshot.object) {
                    snapshot.pods = list(&pods, Some(&selector)).await;
                }
                app::statefulset_app(&snapshot.object)
            }
            Kind::KasprApp => {
                if let Known::Found(all) = list(&statefulsets, None).await {
                    snapshot.statefulsets = all
                        .into_iter()
                        .filter(|s| app::statefulset_app(s).as_deref() == Some(name))
                        .collect();
                }
                let selector = format!("{}={name}", crate::names::APP_LABEL);
                snapshot.pods = list(&pods, Some(&selector)).await;
                snapshot.kasprapp = Some(snapshot.object.clone());
                Some(name.to_owned())
            }
        }
    }
}

/// The one MutatingWebhookConfiguration that registers this product's webhooks.
pub fn release_configuration(all: Vec<Value>) -> Known<Value> {
    let mut ours: Vec<Value> = all
        .into_iter()
        .filter(|c| registers(c, MUTATING_WEBHOOKS))
        .collect();
    match ours.len() {
        0 => Known::Missing,
        1 => Known::Found(ours.remove(0)),
        _ => Known::Unreadable(format!(
            "several MutatingWebhookConfigurations register {}: {}; choose one with --webhook-config",
            MUTATING_WEBHOOKS.join(", "),
            ours.iter()
                .filter_map(|c| c.pointer("/metadata/name").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The StatefulSet named by a pod's ownerReferences.
pub fn owner_statefulset(pod: &Value) -> Option<String> {
    pod.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|r| {
            r.get("kind").and_then(Value::as_str) == Some("StatefulSet")
                && r.get("apiVersion").and_then(Value::as_str) == Some("apps/v1")
        })?
        .get("name")?
        .as_str()
        .map(str::to_owned)
}

/// A StatefulSet's `spec.selector.matchLabels` as a label selector string.
pub fn match_labels(statefulset: &Value) -> Option<String> {
    let labels = statefulset
        .pointer("/spec/selector/matchLabels")?
        .as_object()?;
    let parts: Vec<String> = labels
        .iter()
        .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// The running webhook's rendering settings: read from the Deployment behind the configuration's
/// Service (the chart names both alike), then the command line's overrides.
async fn server(client: &Client, mutating: Option<&Value>, options: &FetchOptions) -> Server {
    let service = mutating.and_then(|c| {
        let webhook = c.pointer("/webhooks")?.as_array()?.first()?;
        let service = webhook.pointer("/clientConfig/service")?;
        Some((
            service.get("namespace")?.as_str()?.to_owned(),
            service.get("name")?.as_str()?.to_owned(),
        ))
    });
    let mut server = match service {
        None => Server {
            source: "defaults (the webhook is not behind an in-cluster Service, so its flags \
                     cannot be read; set --init-container-resources and \
                     --packages-volume-size-limit as it runs)"
                .to_owned(),
            ..Server::default()
        },
        Some((namespace, name)) => {
            let api = Api::<DynamicObject>::namespaced_with(
                client.clone(),
                &namespace,
                &ApiResource::erase::<Deployment>(&()),
            );
            match get(&api, &name).await {
                Known::Found(deployment) => server_settings(&deployment)
                    .map(|mut s| {
                        s.source = format!("Deployment {namespace}/{name}");
                        s
                    })
                    .unwrap_or_else(|reason| Server {
                        source: format!("defaults (Deployment {namespace}/{name}: {reason})"),
                        ..Server::default()
                    }),
                Known::Missing => Server {
                    source: format!("defaults (no Deployment {namespace}/{name})"),
                    ..Server::default()
                },
                Known::Unreadable(reason) => Server {
                    source: format!("defaults (Deployment {namespace}/{name}: {reason})"),
                    ..Server::default()
                },
            }
        }
    };
    if options.init_container_resources.is_some() || options.packages_volume_size_limit.is_some() {
        server.source = format!("{} and the command line", server.source);
    }
    if let Some(resources) = &options.init_container_resources {
        server.render.default_resources = Some(resources.clone());
    }
    if let Some(limit) = &options.packages_volume_size_limit {
        server.render.packages_volume_size_limit = Some(limit.clone());
    }
    server
}

/// The flags of `serve` that change what is rendered, from a Deployment's container args and
/// env (`--flag=value`, `--flag value`, `KASPR_WEBHOOK_<FLAG>`).
pub fn server_settings(deployment: &Value) -> Result<Server, String> {
    let containers = deployment
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .ok_or("it has no containers")?;
    let container = containers
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some("webhook"))
        .or_else(|| containers.first())
        .ok_or("it has no containers")?;
    let args: Vec<&str> = container
        .get("args")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let flag = |name: &str| -> Option<String> {
        let long = format!("--{name}");
        let from_args = args.iter().enumerate().rev().find_map(|(i, arg)| {
            if let Some(value) = arg.strip_prefix(&format!("{long}=")) {
                Some(value.to_owned())
            } else if *arg == long {
                args.get(i + 1).map(|v| (*v).to_owned())
            } else {
                None
            }
        });
        from_args.or_else(|| {
            let env = format!("KASPR_WEBHOOK_{}", name.to_uppercase().replace('-', "_"));
            container
                .get("env")
                .and_then(Value::as_array)?
                .iter()
                .find(|e| e.get("name").and_then(Value::as_str) == Some(env.as_str()))?
                .get("value")?
                .as_str()
                .map(str::to_owned)
        })
    };
    let default_resources = match flag("init-container-resources") {
        Some(json) => Some(
            serde_json::from_str(&json)
                .map_err(|e| format!("--init-container-resources {json:?}: {e}"))?,
        ),
        None => None,
    };
    let packages_volume_size_limit = flag("packages-volume-size-limit")
        .map(k8s_openapi::apimachinery::pkg::api::resource::Quantity);
    let operator_packages = match flag("operator-packages") {
        Some(text) => crate::spec::OperatorPackages::parse(&text)
            .ok_or_else(|| format!("--operator-packages {text:?}: not respect or takeover"))?,
        None => crate::spec::OperatorPackages::default(),
    };
    let revision = match flag("revision") {
        Some(name) => {
            Some(crate::config::parse_revision(&name).map_err(|e| format!("--revision: {e}"))?)
        }
        None => None,
    };
    let install_tool = match flag("install-tool") {
        Some(text) => crate::spec::InstallTool::parse(&text)
            .ok_or_else(|| format!("--install-tool {text:?}: not auto, pip or uv"))?,
        None => crate::spec::InstallTool::default(),
    };
    let mut rollout = super::Rollout::default();
    if let Some(text) = flag("rollout-budget") {
        rollout.budget = text
            .trim()
            .parse()
            .map_err(|e| format!("--rollout-budget {text:?}: {e} (a number of apps, 0 or more)"))?;
    }
    if let Some(text) = flag("rollout-deadline") {
        // As `serve` reads it: a bare number is seconds.
        rollout.deadline = match text.trim().parse::<u64>() {
            Ok(seconds) => std::time::Duration::from_secs(seconds),
            Err(_) => humantime::parse_duration(text.trim())
                .map_err(|e| format!("--rollout-deadline {text:?}: {e} (examples: 90s, 10m)"))?,
        };
    }
    let watch_namespaces = flag("namespaces")
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(Server {
        render: RenderConfig {
            default_resources,
            packages_volume_size_limit,
            operator_packages,
            image_mode: crate::config::ImageModeConfig {
                repository: flag("image-repository"),
                push_secret: flag("image-push-secret"),
                pull_secret: flag("image-pull-secret"),
                unsupported: (flag("image-volumes-on-nodes").as_deref() == Some("false")).then(
                    || {
                        "the chart says the nodes' container runtimes cannot mount image volumes"
                            .to_owned()
                    },
                ),
                plain_http: flag("image-registry-plain-http").as_deref() == Some("true"),
            },
            revision,
            install_tool,
        },
        watch_namespaces,
        rollout,
        source: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_chart_deployments_flags_give_the_rendering_settings() {
        let deployment = json!({"spec": {"template": {"spec": {"containers": [{
            "name": "webhook",
            "args": ["serve", "--listen=0.0.0.0:10250", "--namespaces=apps,team-b",
                     "--init-container-resources={\"requests\":{\"cpu\":\"100m\"}}",
                     "--packages-volume-size-limit", "4Gi", "--operator-packages=takeover",
                     "--revision=canary", "--install-tool=uv", "--rollout-budget=3",
                     "--rollout-deadline=90s"],
        }]}}}});
        let server = server_settings(&deployment).expect("settings");
        assert_eq!(server.watch_namespaces, ["apps", "team-b"]);
        assert_eq!(
            server
                .render
                .packages_volume_size_limit
                .map(|q| q.0)
                .as_deref(),
            Some("4Gi")
        );
        let requests = server
            .render
            .default_resources
            .and_then(|r| r.requests)
            .expect("requests");
        assert_eq!(requests["cpu"].0, "100m");
        assert_eq!(
            server.render.operator_packages,
            crate::spec::OperatorPackages::Takeover
        );
        assert_eq!(server.render.revision.as_deref(), Some("canary"));
        assert_eq!(server.render.install_tool, crate::spec::InstallTool::Uv);
        assert_eq!(
            server.rollout,
            super::super::Rollout {
                budget: 3,
                deadline: std::time::Duration::from_secs(90)
            }
        );
    }

    #[test]
    fn environment_variables_count_and_a_bad_flag_is_named() {
        let deployment = json!({"spec": {"template": {"spec": {"containers": [{
            "name": "webhook", "args": ["serve"],
            "env": [{"name": "KASPR_WEBHOOK_NAMESPACES", "value": "apps"}],
        }]}}}});
        assert_eq!(
            server_settings(&deployment)
                .expect("settings")
                .watch_namespaces,
            ["apps"]
        );
        let bad = json!({"spec": {"template": {"spec": {"containers": [{
            "name": "webhook", "args": ["--init-container-resources=nope"]}]}}}});
        assert!(
            server_settings(&bad)
                .expect_err("bad JSON")
                .starts_with("--init-container-resources \"nope\"")
        );
        let bad = json!({"spec": {"template": {"spec": {"containers": [{
            "name": "webhook", "args": ["--revision=Not/Valid"]}]}}}});
        let error = server_settings(&bad).expect_err("bad revision");
        assert!(
            error.starts_with("--revision: revision \"Not/Valid\""),
            "{error}"
        );
        for (flag, message) in [
            ("--rollout-budget=-1", "--rollout-budget \"-1\""),
            ("--rollout-deadline=soon", "--rollout-deadline \"soon\""),
        ] {
            let bad = json!({"spec": {"template": {"spec": {"containers": [{
                "name": "webhook", "args": [flag]}]}}}});
            let error = server_settings(&bad).expect_err(flag);
            assert!(error.starts_with(message), "{error}");
        }
        // Without the flags: what `serve` defaults to.
        let plain = json!({"spec": {"template": {"spec": {"containers": [{
            "name": "webhook", "args": ["serve"]}]}}}});
        assert_eq!(
            server_settings(&plain).expect("settings").rollout,
            super::super::Rollout::default()
        );
    }

    #[test]
    fn the_release_configuration_is_found_by_its_webhooks() {
        let ours =
            json!({"metadata": {"name": "kpw"}, "webhooks": [{"name": "pods.packages.kaspr.io"}]});
        let other =
            json!({"metadata": {"name": "istio"}, "webhooks": [{"name": "sidecar.istio.io"}]});
        assert_eq!(
            release_configuration(vec![other.clone(), ours.clone()]),
            Known::Found(ours.clone())
        );
        assert_eq!(release_configuration(vec![other]), Known::Missing);
        let mut second = ours.clone();
        second["metadata"]["name"] = json!("kpw-2");
        assert!(matches!(
            release_configuration(vec![ours, second]),
            Known::Unreadable(message) if message.contains("kpw, kpw-2") && message.contains("--webhook-config")
        ));
    }

    #[test]
    fn owners_and_selectors_are_read() {
        let pod = json!({"metadata": {"ownerReferences": [
            {"apiVersion": "v1", "kind": "Other", "name": "x"},
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "demo-app"}]}});
        assert_eq!(owner_statefulset(&pod).as_deref(), Some("demo-app"));
        let sts = json!({"spec": {"selector": {"matchLabels": {"a": "1", "b": "2"}}}});
        assert_eq!(match_labels(&sts).as_deref(), Some("a=1,b=2"));
        assert_eq!(match_labels(&json!({})), None);
    }
}
