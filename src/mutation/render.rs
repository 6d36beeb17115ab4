//! Renders what gets injected: the init container, the volumes, and the main container's mounts.
//! Pure functions of the spec and the pod they are rendered for.

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath,
    ObjectFieldSelector, PersistentVolumeClaimVolumeSource, SecretKeySelector, SecretVolumeSource,
    Volume, VolumeMount,
};
use serde_json::{Map, Value, json};

use crate::app::AppRef;
use crate::builds::render::PackageSet;
use crate::config::RenderConfig;
use crate::names;
use crate::spec::{Cache, InstallTool, OnFailure, PythonPackages, pvc_name, short_sha256};

/// Everything one injection adds, rendered to JSON in a fixed order.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    pub init_container: Value,
    pub volumes: Vec<Value>,
    /// Mounts for the main container.
    pub main_mounts: Vec<Value>,
    pub install_key: String,
    pub template_hash: String,
    /// The hash of the injection rendered from the app's own configuration alone (see
    /// [`RenderConfig::without_revision`]).
    pub config_hash: String,
    /// The rendering revision it was rendered with.
    pub revision: String,
    /// The package set the pods restore (builds on).
    pub set: Option<String>,
}

/// The installer's configuration (`KASPR_PACKAGES_CONFIG`): everything it needs that is not a
/// secret.
/// `tool` is written only when it is not pip, the installer's default, so templates rendered
/// before the setting existed stay as they were.
pub fn installer_config(
    spec: &PythonPackages,
    app: &AppRef,
    install_key: &str,
    tool: InstallTool,
) -> Value {
    let mut config = json!({
        "version": 1,
        "mode": spec.cache.mode(),
        "app": app.name,
        "namespace": app.namespace,
        "installKey": install_key,
        "packages": spec.packages,
    });
    if let Some(index) = &spec.index_url {
        config["indexUrl"] = json!(index);
    }
    if !spec.extra_index_urls.is_empty() {
        config["extraIndexUrls"] = json!(spec.extra_index_urls);
    }
    if !spec.trusted_hosts.is_empty() {
        config["trustedHosts"] = json!(spec.trusted_hosts);
    }
    if spec.credentials.is_some() {
        config["credentials"] = json!(true);
    }
    // The installer expands only these (validation allowed only declared ones).
    let mut expand: Vec<&str> = spec
        .packages
        .iter()
        .flat_map(|p| crate::requirement::variables(p))
        .collect();
    expand.sort_unstable();
    expand.dedup();
    if !expand.is_empty() {
        config["expandEnv"] = json!(expand);
    }
    config["retries"] = json!(spec.install_policy.retries);
    config["timeoutSeconds"] = json!(spec.install_policy.timeout_seconds);
    config["onFailure"] = json!(match spec.install_policy.on_failure {
        OnFailure::Block => "block",
        OnFailure::Allow => "allow",
    });
    if tool != InstallTool::Pip {
        config["installTool"] = json!(tool.as_str());
    }
    config["target"] = json!(names::PACKAGES_PATH);
    match &spec.cache {
        Cache::EmptyDir => {}
        Cache::Pvc(_) => config["cacheDir"] = json!(names::CACHE_PATH),
        Cache::Gcs(gcs) => {
            let mut g = json!({
                "bucket": gcs.bucket,
                "prefix": gcs.prefix,
                "maxArchiveSize": gcs.max_archive_size,
            });
            if let Some(secret) = &gcs.key_secret {
                g["keyFile"] = json!(format!("{}/{}", names::GCS_KEY_DIR, secret.key));
            }
            config["gcs"] = g;
        }
    }
    config
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The init container's securityContext: the main container's own (so it is never less
/// restricted) with `pythonPackagesInitContainer.securityContext` over it where that does not
/// loosen it, plus no privilege escalation, no capabilities, and a RuntimeDefault seccomp
/// profile unless a container or the pod chose one.
fn security_context(
    main: &Map<String, Value>,
    pod_spec: &Map<String, Value>,
    declared: Option<&Map<String, Value>>,
) -> Value {
    let mut context = main
        .get("securityContext")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for (key, value) in declared.into_iter().flatten() {
        // Where the main container already holds the stricter setting, it stays.
        let strict_in_main = matches!(key.as_str(), "runAsNonRoot" | "readOnlyRootFilesystem")
            && context.get(key) == Some(&Value::Bool(true));
        if !strict_in_main {
            context.insert(key.clone(), value.clone());
        }
    }
    context.insert("allowPrivilegeEscalation".into(), json!(false));
    // Privileged would defeat everything else; the installer never needs it.
    context.remove("privileged");
    context.insert("capabilities".into(), json!({"drop": ["ALL"]}));
    let pod_has_seccomp = pod_spec
        .get("securityContext")
        .and_then(|s| s.get("seccompProfile"))
        .is_some_and(|p| !p.is_null());
    if !context.contains_key("seccompProfile") && !pod_has_seccomp {
        context.insert("seccompProfile".into(), json!({"type": "RuntimeDefault"}));
    }
    Value::Object(context)
}

/// The volumes an injection adds, and the mounts of the init and the main container.
struct Mounts {
    volumes: Vec<Volume>,
    init_mounts: Vec<VolumeMount>,
    main_mounts: Vec<VolumeMount>,
}

fn volumes_and_mounts(spec: &PythonPackages, app: &AppRef, config: &RenderConfig) -> Mounts {
    let mut volumes = vec![Volume {
        name: names::PACKAGES_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: config.packages_volume_size_limit.clone(),
            ..EmptyDirVolumeSource::default()
        }),
        ..Default::default()
    }];
    let mut init_mounts = vec![mount(names::PACKAGES_VOLUME, names::PACKAGES_PATH, false)];
    let mut main_mounts = vec![mount(names::PACKAGES_VOLUME, names::PACKAGES_PATH, true)];
    match &spec.cache {
        Cache::EmptyDir => {}
        Cache::Pvc(_) => {
            volumes.push(Volume {
                name: names::CACHE_VOLUME.to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: pvc_name(&app.name),
                    read_only: None,
                }),
                ..Default::default()
            });
            init_mounts.push(mount(names::CACHE_VOLUME, names::CACHE_PATH, false));
            main_mounts.push(mount(names::CACHE_VOLUME, names::CACHE_PATH, true));
        }
        Cache::Gcs(gcs) => {
            if let Some(secret) = &gcs.key_secret {
                volumes.push(Volume {
                    name: names::GCS_KEY_VOLUME.to_owned(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(secret.name.clone()),
                        items: Some(vec![KeyToPath {
                            key: secret.key.clone(),
                            path: secret.key.clone(),
                            mode: None,
                        }]),
                        // Readable whatever the init container's uid and fsGroup: the kubelet
                        // makes Secret files root-owned, so 0400 is unreadable to a non-root
                        // installer without fsGroup. Only the init container mounts it.
                        default_mode: Some(0o444),
                        optional: Some(false),
                    }),
                    ..Default::default()
                });
                init_mounts.push(mount(names::GCS_KEY_VOLUME, names::GCS_KEY_DIR, true));
            }
        }
    }
    init_mounts.extend(spec.init_container.volume_mounts.iter().cloned());
    Mounts {
        volumes,
        init_mounts,
        main_mounts,
    }
}

/// The init container's env: its configuration, the pod uid for PVC leases, the credentials'
/// Secret references, then the app's own extra env.
fn init_env(
    spec: &PythonPackages,
    app: &AppRef,
    install_key: &str,
    config: &RenderConfig,
) -> Vec<EnvVar> {
    let tool = spec.install_tool.unwrap_or(config.install_tool);
    let mut env = vec![EnvVar {
        name: names::CONFIG_ENV.to_owned(),
        value: Some(installer_config(spec, app, install_key, tool).to_string()),
        ..Default::default()
    }];
    if matches!(spec.cache, Cache::Pvc(_)) {
        env.push(EnvVar {
            name: names::POD_UID_ENV.to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.uid".to_owned(),
                    api_version: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(creds) = &spec.credentials {
        env.push(secret_env(
            names::USERNAME_ENV,
            &creds.secret_name,
            &creds.username_key,
        ));
        env.push(secret_env(
            names::PASSWORD_ENV,
            &creds.secret_name,
            &creds.password_key,
        ));
    }
    env.extend(spec.init_container.env.iter().cloned());
    env
}

/// How the init container presents itself under takeover: the operator's name, and the
/// operator's `PACKAGES_HASH` entry first in its env (one of the operator's watch fields).
#[derive(Debug, Clone, PartialEq)]
pub struct Disguise {
    pub packages_hash: Option<Value>,
}

/// Renders the injection for one pod template (`disguise` under takeover); with `set` (builds
/// on), the installer restores that package set instead of resolving (see docs/builds.md).
pub fn render(
    spec: &PythonPackages,
    app: &AppRef,
    main: &Map<String, Value>,
    pod_spec: &Map<String, Value>,
    config: &RenderConfig,
    disguise: Option<&Disguise>,
    set: Option<&PackageSet>,
) -> Injection {
    let install_key = spec.install_key();
    let parts = render_parts(
        spec,
        app,
        main,
        pod_spec,
        config,
        disguise,
        set,
        &install_key,
    );
    let template_hash = {
        let rendered = json!([
            parts.init_container,
            parts.volumes,
            parts.main_mounts,
            names::SITE_PATH
        ]);
        short_sha256(rendered.to_string().as_bytes())
    };
    let neutral_config = config.without_revision();
    let config_hash = if neutral_config == *config {
        config_hash(&parts)
    } else {
        config_hash(&render_parts(
            spec,
            app,
            main,
            pod_spec,
            &neutral_config,
            disguise,
            set,
            &install_key,
        ))
    };
    let Parts {
        mut init_container,
        volumes,
        main_mounts,
    } = parts;
    if let Some(program) = init_container.pointer_mut("/command/2") {
        *program = Value::String(crate::installer::bootstrap().to_owned());
    }
    Injection {
        init_container,
        volumes,
        main_mounts,
        install_key,
        template_hash,
        config_hash,
        revision: config.revision().into_owned(),
        set: set.map(|s| s.id.clone()),
    }
}

/// The rendered pieces, the installer program still standing in as its digest.
struct Parts {
    init_container: Value,
    volumes: Vec<Value>,
    main_mounts: Vec<Value>,
}

/// The hash of an injection rendered without revision-owned settings: the installer program
/// (any release's) stands in as a fixed word, so only the app's own configuration, the pod it is
/// rendered for and the layout of the injection reach it.
fn config_hash(neutral: &Parts) -> String {
    let mut init_container = neutral.init_container.clone();
    if let Some(program) = init_container.pointer_mut("/command/2") {
        *program = json!("installer");
    }
    let rendered = json!([
        init_container,
        neutral.volumes,
        neutral.main_mounts,
        names::SITE_PATH
    ]);
    short_sha256(rendered.to_string().as_bytes())
}

#[allow(clippy::too_many_arguments)]
fn render_parts(
    spec: &PythonPackages,
    app: &AppRef,
    main: &Map<String, Value>,
    pod_spec: &Map<String, Value>,
    config: &RenderConfig,
    disguise: Option<&Disguise>,
    set: Option<&PackageSet>,
    install_key: &str,
) -> Parts {
    let Mounts {
        mut volumes,
        mut init_mounts,
        main_mounts,
    } = volumes_and_mounts(spec, app, config);
    let mut env = init_env(spec, app, install_key, config);
    if let Some(set) = set {
        add_restore(&mut env, &mut volumes, &mut init_mounts, app, set);
    }

    let name = if disguise.is_some() {
        names::OPERATOR_INIT_CONTAINER
    } else {
        names::INIT_CONTAINER
    };
    let container = Container {
        name: name.to_owned(),
        image: main.get("image").and_then(Value::as_str).map(str::to_owned),
        image_pull_policy: main
            .get("imagePullPolicy")
            .and_then(Value::as_str)
            .map(str::to_owned),
        // The program is put in after hashing; its digest stands in for it until then.
        command: Some(vec![
            "python3".to_owned(),
            "-c".to_owned(),
            crate::installer::digest().to_owned(),
        ]),
        env: Some(env),
        volume_mounts: Some(init_mounts),
        resources: spec
            .resources
            .clone()
            .or_else(|| config.default_resources.clone()),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Default::default()
    };
    let mut init_container = to_json(&container);
    if let Some(obj) = init_container.as_object_mut() {
        obj.insert(
            "securityContext".into(),
            security_context(
                main,
                pod_spec,
                spec.init_container.security_context.as_ref(),
            ),
        );
        if let (Some(hash), Some(Value::Array(env))) = (
            disguise.and_then(|d| d.packages_hash.as_ref()),
            obj.get_mut("env"),
        ) {
            env.insert(0, hash.clone());
        }
    }
    Parts {
        init_container,
        volumes: volumes.iter().map(to_json).collect(),
        main_mounts: main_mounts.iter().map(to_json).collect(),
    }
}

/// Restore mode: the installer's config names the set, and the set's lock reaches the init
/// container from the app's lock ConfigMap (optional: on a first deployment it appears once
/// the set is built, and the installer waits for it).
fn add_restore(
    env: &mut [EnvVar],
    volumes: &mut Vec<Volume>,
    init_mounts: &mut Vec<VolumeMount>,
    app: &AppRef,
    set: &PackageSet,
) {
    if let Some(config) = env.iter_mut().find(|e| e.name == names::CONFIG_ENV)
        && let Some(Ok(mut value)) = config.value.as_deref().map(serde_json::from_str::<Value>)
    {
        value["restore"] = json!({
            "set": set.id,
            "lockFile": format!("{}/{}", names::LOCK_DIR, crate::builds::render::LOCK_FILE),
            "awaitSeconds": set.await_seconds,
        });
        config.value = Some(value.to_string());
    }
    volumes.push(Volume {
        name: names::LOCK_VOLUME.to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: crate::builds::lock_config_map_name(&app.name),
            optional: Some(true),
            items: Some(vec![KeyToPath {
                key: crate::builds::state::lock_key(&set.id),
                path: crate::builds::render::LOCK_FILE.to_owned(),
                mode: None,
            }]),
            default_mode: None,
        }),
        ..Default::default()
    });
    init_mounts.push(mount(names::LOCK_VOLUME, names::LOCK_DIR, true));
}
