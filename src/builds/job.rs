//! The build Job of a package set: a pod that behaves like the app's pods (see docs/builds.md),
//! made from the StatefulSet's stored pod template with the injection rendered for the wanted
//! spec by the webhook's own [`crate::mutation::apply`], so there is no second renderer.

use serde_json::{Map, Value, json};

use crate::app::AppOwner;
use crate::config::RenderConfig;
use crate::mutation::{self, Denial};
use crate::names;
use crate::spec::PythonPackages;

use super::identity::{SET_LABEL, job_name};

/// Finished Jobs disappear after this long even if the controller never collects them.
pub const TTL_AFTER_FINISHED_SECONDS: u64 = 3600;
/// Added to the installer's own worst case for pod start-up and publication.
const DEADLINE_SLACK_SECONDS: u64 = 300;
/// Names a build Job's app.
pub const JOB_APP_LABEL: &str = "packages.kaspr.io/app";
/// The build container's name.
pub const BUILD_CONTAINER: &str = "build";

/// Pod-level fields copied from the app's pod template as they are.
const COPIED_POD_FIELDS: &[&str] = &[
    "securityContext",
    "serviceAccountName",
    "automountServiceAccountToken",
    "imagePullSecrets",
    "nodeSelector",
    "affinity",
    "tolerations",
    "priorityClassName",
    "runtimeClassName",
    "hostAliases",
    "dnsConfig",
    "dnsPolicy",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    #[error("the StatefulSet's pod template cannot carry the injection: {0}")]
    NotInjectable(String),
    #[error("the rendered pod template has no {0} init container")]
    NoInitContainer(&'static str),
}

impl From<Denial> for JobError {
    fn from(denial: Denial) -> Self {
        JobError::NotInjectable(denial.message)
    }
}

/// `activeDeadlineSeconds`: every attempt at its limit, plus slack.
pub fn deadline_seconds(spec: &PythonPackages) -> u64 {
    let policy = &spec.install_policy;
    (1 + u64::from(policy.retries)) * u64::from(policy.timeout_seconds) + DEADLINE_SLACK_SECONDS
}

/// The Job that builds `set` for `spec`, from the app's stored pod template (`{metadata, spec}`).
/// `keep` lists the sets the lock ConfigMap keeps: in PVC mode the build removes the other
/// sets published on the volume that no pod uses (see docs/builds.md).
pub fn build_job(
    template: &Value,
    spec: &PythonPackages,
    owner: &AppOwner,
    set: &str,
    keep: &[String],
    render: &RenderConfig,
) -> Result<Value, JobError> {
    let mut rendered = template.clone();
    mutation::apply(
        &mut rendered,
        Some(spec),
        &owner.app,
        "spec.template.spec",
        render,
    )?;
    let pod = rendered
        .get("spec")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let init = pod
        .get("initContainers")
        .and_then(Value::as_array)
        .and_then(|list| {
            list.iter()
                .find(|c| c.get("name").and_then(Value::as_str) == Some(names::INIT_CONTAINER))
        })
        .cloned()
        .ok_or(JobError::NoInitContainer(names::INIT_CONTAINER))?;
    let container = build_container(init, set, keep);
    let pod_spec = build_pod_spec(&pod, container);

    // Not `kaspr.io/app`: the build pod is not one of the app's pods (selectors, the
    // operator's status reader and the webhook's Pod path must not take it for one).
    let labels = json!({
        JOB_APP_LABEL: owner.app.name,
        "kaspr.io/component": "python-packages",
        "app.kubernetes.io/managed-by": crate::controller::FIELD_MANAGER,
        SET_LABEL: set,
    });
    Ok(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(&owner.app.name, set),
            "namespace": owner.app.namespace,
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": owner.api_version,
                "kind": "KasprApp",
                "name": owner.app.name,
                "uid": owner.uid,
                "controller": false,
                "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": deadline_seconds(spec),
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_SECONDS,
            "template": {
                "metadata": {"labels": labels},
                "spec": Value::Object(pod_spec),
            },
        },
    }))
}

/// The build pod: what the app's pods run with (security context, service account, pull
/// secrets, placement), the build container, and only the volumes it mounts.
fn build_pod_spec(pod: &Map<String, Value>, container: Value) -> Map<String, Value> {
    let mounted: Vec<&str> = container
        .get("volumeMounts")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(|v| v.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let volumes: Vec<Value> = pod
        .get("volumes")
        .and_then(Value::as_array)
        .map(|all| {
            all.iter()
                .filter(|v| {
                    v.get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| mounted.contains(&n))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();

    let mut pod_spec = Map::new();
    for field in COPIED_POD_FIELDS {
        if let Some(value) = pod.get(*field) {
            pod_spec.insert((*field).to_owned(), value.clone());
        }
    }
    pod_spec.insert("restartPolicy".into(), json!("Never"));
    pod_spec.insert("containers".into(), Value::Array(vec![container]));
    if !volumes.is_empty() {
        pod_spec.insert("volumes".into(), Value::Array(volumes));
    }
    pod_spec
}

/// The injected init container, renamed, its installer configuration switched to build mode.
/// Pods carry the installer without its build-only lines (pruning caches, publishing images);
/// a build Job's container runs all of it.
pub(crate) fn run_whole_program(container: &mut Value) {
    if let Some(program) = container
        .get_mut("command")
        .and_then(|c| c.get_mut(2))
        .filter(|p| p.is_string())
    {
        *program = json!(crate::installer::build_bootstrap());
    }
}

fn build_container(mut init: Value, set: &str, keep: &[String]) -> Value {
    run_whole_program(&mut init);
    if let Some(obj) = init.as_object_mut() {
        obj.insert("name".into(), json!(BUILD_CONTAINER));
        obj.insert(
            "terminationMessagePolicy".into(),
            json!("FallbackToLogsOnError"),
        );
    }
    if let Some(env) = init.get_mut("env").and_then(Value::as_array_mut) {
        for var in env.iter_mut() {
            if var.get("name").and_then(Value::as_str) != Some(names::CONFIG_ENV) {
                continue;
            }
            let Some(text) = var.get("value").and_then(Value::as_str) else {
                continue;
            };
            if let Ok(mut config) = serde_json::from_str::<Value>(text) {
                if let Some(obj) = config.as_object_mut() {
                    obj.remove("restore");
                    obj.insert("build".into(), json!({"set": set, "keep": keep}));
                    // A build never lets the app start without packages: it must fail visibly.
                    obj.insert("onFailure".into(), json!("block"));
                }
                var["value"] = Value::String(config.to_string());
            }
        }
    }
    init
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::AppRef;

    fn owner() -> AppOwner {
        AppOwner {
            app: AppRef::new("shop", "orders"),
            uid: "uid-1".into(),
            api_version: "kaspr.io/v1alpha1".into(),
        }
    }

    fn spec(value: &Value) -> PythonPackages {
        spec_with_template(value, &json!({}))
    }

    fn spec_with_template(value: &Value, template: &Value) -> PythonPackages {
        let app = json!({"spec": {"pythonPackages": value, "template": template}});
        let report = crate::validation::validate_kasprapp(&app);
        report
            .spec
            .unwrap_or_else(|| panic!("valid spec: {:?}", report.errors))
    }

    fn template() -> Value {
        json!({
            "metadata": {"labels": {"kaspr.io/app": "orders"}},
            "spec": {
                "serviceAccountName": "orders-sa",
                "securityContext": {"runAsUser": 1000, "fsGroup": 1000, "runAsNonRoot": true},
                "imagePullSecrets": [{"name": "regcred"}],
                "nodeSelector": {"pool": "apps"},
                "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                "affinity": {"nodeAffinity": {}},
                "containers": [{"name": "kaspr", "image": "registry/orders:1.4",
                                "securityContext": {"allowPrivilegeEscalation": false},
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "terminationGracePeriodSeconds": 30,
            }
        })
    }

    fn config_of(job: &Value) -> Value {
        let env = job
            .pointer("/spec/template/spec/containers/0/env")
            .and_then(Value::as_array)
            .expect("env");
        let text = env
            .iter()
            .find(|v| v["name"] == names::CONFIG_ENV)
            .and_then(|v| v["value"].as_str())
            .expect("config env");
        serde_json::from_str(text).expect("json")
    }

    #[test]
    fn the_job_behaves_like_the_apps_pods() {
        let spec = spec_with_template(
            &json!({
                "packages": ["requests==2.31.0"],
                "indexUrl": "https://pypi.example/simple",
                "credentials": {"secretRef": {"name": "pypi"}},
                "cache": {"enabled": true, "type": "pvc"},
                "installPolicy": {"retries": 2, "timeout": 100, "onFailure": "allow"},
            }),
            &json!({"pythonPackagesInitContainer": {"env": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]}}),
        );
        let job = build_job(
            &template(),
            &spec,
            &owner(),
            "0123456789abcdef",
            &["77aa000000000001".to_owned()],
            &RenderConfig::default(),
        )
        .expect("job");
        assert_eq!(job["metadata"]["name"], "orders-packages-0123456789abcdef");
        assert_eq!(job["metadata"]["namespace"], "shop");
        assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(job["metadata"]["ownerReferences"][0]["controller"], false);
        assert_eq!(job["spec"]["backoffLimit"], 0);
        assert_eq!(job["spec"]["activeDeadlineSeconds"], 3 * 100 + 300);
        assert_eq!(job["spec"]["ttlSecondsAfterFinished"], 3600);
        let pod = &job["spec"]["template"]["spec"];
        for field in [
            "serviceAccountName",
            "securityContext",
            "imagePullSecrets",
            "nodeSelector",
            "tolerations",
            "affinity",
        ] {
            assert_eq!(pod[field], template()["spec"][field], "{field}");
        }
        assert_eq!(pod["restartPolicy"], "Never");
        assert!(pod.get("terminationGracePeriodSeconds").is_none());
        let container = &pod["containers"][0];
        assert_eq!(container["name"], BUILD_CONTAINER);
        assert_eq!(container["image"], "registry/orders:1.4");
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        let env = container["env"].as_array().expect("env");
        let names: Vec<&str> = env.iter().filter_map(|v| v["name"].as_str()).collect();
        assert!(
            names.contains(&"KASPR_PYPI_USERNAME") && names.contains(&"HTTPS_PROXY"),
            "{names:?}"
        );
        let password = env
            .iter()
            .find(|v| v["name"] == "KASPR_PYPI_PASSWORD")
            .expect("password");
        assert_eq!(password["valueFrom"]["secretKeyRef"]["name"], "pypi");
        let config = config_of(&job);
        assert_eq!(
            config["build"],
            json!({"set": "0123456789abcdef", "keep": ["77aa000000000001"]})
        );
        assert_eq!(config["onFailure"], "block");
        assert_eq!(config["mode"], "pvc");
        // Exactly the volumes the build mounts: the cache claim and the packages volume, not
        // the app's own data volume.
        let volumes: Vec<&str> = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert!(
            volumes.contains(&names::CACHE_VOLUME) && volumes.contains(&names::PACKAGES_VOLUME),
            "{volumes:?}"
        );
        assert!(!volumes.contains(&"data"));
        assert_eq!(
            job["spec"]["template"]["metadata"]["labels"]["packages.kaspr.io/set"],
            "0123456789abcdef"
        );
    }

    /// The Job for set `0123456789abcdef` of the demo template, with no sets kept.
    fn plain_job(spec: &PythonPackages) -> Result<Value, JobError> {
        build_job(
            &template(),
            spec,
            &owner(),
            "0123456789abcdef",
            &[],
            &RenderConfig::default(),
        )
    }

    #[test]
    fn every_build_runs_the_whole_installer_and_pods_carry_less() {
        for cache in [
            json!({"enabled": false}),
            json!({"enabled": true, "type": "pvc"}),
            json!({"enabled": true, "type": "gcs", "gcs": {"bucket": "kaspr-sets", "secretRef": {"name": "k"}}}),
        ] {
            let job = plain_job(&spec(&json!({"packages": ["a"], "cache": cache}))).expect("job");
            let command = &job["spec"]["template"]["spec"]["containers"][0]["command"];
            assert_eq!(command[2], crate::installer::build_bootstrap(), "{cache}");
        }
        assert_ne!(
            crate::installer::build_bootstrap(),
            crate::installer::bootstrap()
        );
    }

    #[test]
    fn same_input_same_job() {
        let spec = spec(&json!({"packages": ["a"]}));
        assert_eq!(plain_job(&spec), plain_job(&spec));
    }

    #[test]
    fn a_template_without_containers_is_an_error_not_a_panic() {
        let spec = spec(&json!({"packages": ["a"]}));
        let error = build_job(
            &json!({"spec": {}}),
            &spec,
            &owner(),
            "0123456789abcdef",
            &[],
            &RenderConfig::default(),
        )
        .expect_err("no containers");
        assert!(matches!(error, JobError::NotInjectable(_)), "{error:?}");
    }
}
