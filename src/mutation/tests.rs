use pretty_assertions::assert_eq;
use serde_json::{Value, json};

use super::*;
use crate::admission::{MutationOutcome, mutate_object};
use crate::validation;

fn mutate_statefulset(
    sts: &Value,
    app: &Value,
    config: &RenderConfig,
) -> Result<MutationOutcome, Denial> {
    mutate_object(ObjectKind::StatefulSet, sts, app, config)
}

fn mutate_pod(pod: &Value, app: &Value, config: &RenderConfig) -> Result<MutationOutcome, Denial> {
    mutate_object(ObjectKind::Pod, pod, app, config)
}
use crate::app::{owning_app, pod_app};

fn kasprapp(python_packages: Value) -> Value {
    let mut app = json!({
        "apiVersion": "kaspr.io/v1alpha1",
        "kind": "KasprApp",
        "metadata": {"name": "my-app", "namespace": "apps", "uid": "0b6c"},
        "spec": {"bootstrapServers": "kafka:9092"}
    });
    app["spec"]["pythonPackages"] = python_packages;
    app
}

fn statefulset() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": "my-app-app",
            "namespace": "apps",
            "labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "my-app"},
            "ownerReferences": [{"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": "my-app", "uid": "0b6c", "controller": true}]
        },
        "spec": {
            "replicas": 2,
            "serviceName": "my-app",
            "selector": {"matchLabels": {"kaspr.io/app": "my-app"}},
            "template": {
                "metadata": {"labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "my-app"}},
                "spec": {
                    "futurePodField": {"keep": true},
                    "initContainers": [{"name": "wait-for-kafka", "image": "busybox:1.36"}],
                    "containers": [{
                        "name": "kaspr",
                        "image": "kasprio/kaspr:0.5.0",
                        "imagePullPolicy": "IfNotPresent",
                        "futureContainerField": "keep me",
                        "env": [{"name": "KASPR_APP_NAME", "value": "my-app"}],
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/kaspr"}],
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "readOnlyRootFilesystem": true}
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "my-app-config"}}]
                }
            }
        }
    })
}

fn apply_patch(object: &Value, patch: &json_patch::Patch) -> Value {
    let mut out = object.clone();
    json_patch::patch(&mut out, patch).expect("patch applies");
    out
}

fn mutate(object: &Value, app: &Value) -> (Value, MutationOutcome) {
    let outcome = mutate_statefulset(object, app, &RenderConfig::default()).expect("allowed");
    (apply_patch(object, &outcome.patch), outcome)
}

fn template(sts: &Value) -> &Value {
    &sts["spec"]["template"]
}

fn init_container(sts: &Value) -> &Value {
    template(sts)["spec"]["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "kaspr-packages"))
        .expect("init container")
}

fn main_container(sts: &Value) -> &Value {
    &template(sts)["spec"]["containers"][0]
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["name"] == name)
}

fn config_of(sts: &Value) -> Value {
    let raw = env(init_container(sts), "KASPR_PACKAGES_CONFIG").expect("config env")["value"]
        .as_str()
        .expect("string")
        .to_owned();
    serde_json::from_str(&raw).expect("json")
}

fn basic_app() -> Value {
    kasprapp(json!({"packages": ["requests==2.31.0", "pandas>=2.0.0"]}))
}

#[test]
fn emptydir_injection_has_the_documented_shape() {
    let (out, outcome) = mutate(&statefulset(), &basic_app());
    assert_eq!(outcome.warnings.len(), 1, "{:?}", outcome.warnings); // pandas is unpinned
    let spec = &template(&out)["spec"];
    let init = spec["initContainers"].as_array().expect("init list");
    assert_eq!(init.len(), 2);
    assert_eq!(init[0]["name"], "wait-for-kafka", "appended after existing");
    let ic = &init[1];
    assert_eq!(ic["name"], "kaspr-packages");
    assert_eq!(ic["image"], "kasprio/kaspr:0.5.0");
    assert_eq!(ic["imagePullPolicy"], "IfNotPresent");
    assert_eq!(ic["command"][0], "python3");
    assert_eq!(ic["command"][1], "-c");
    assert_eq!(ic["terminationMessagePolicy"], "FallbackToLogsOnError");
    assert_eq!(
        ic["volumeMounts"],
        json!([{"mountPath": "/opt/kaspr/packages", "name": "kaspr-packages"}])
    );
    assert_eq!(
        ic["securityContext"],
        json!({
            "runAsNonRoot": true, "runAsUser": 1000, "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        })
    );
    assert_eq!(
        spec["volumes"],
        json!([{"name": "config", "configMap": {"name": "my-app-config"}}, {"emptyDir": {}, "name": "kaspr-packages"}])
    );
    let main = main_container(&out);
    assert_eq!(
        main["volumeMounts"],
        json!([{"name": "data", "mountPath": "/var/lib/kaspr"}, {"mountPath": "/opt/kaspr/packages", "name": "kaspr-packages", "readOnly": true}])
    );
    assert_eq!(
        env(main, "PYTHONPATH"),
        Some(&json!({"name": "PYTHONPATH", "value": "/opt/kaspr/packages/site"}))
    );
    assert!(
        env(main, "KASPR_PACKAGES_CONFIG").is_none(),
        "config only on the init container"
    );

    let config = config_of(&out);
    assert_eq!(config["mode"], "emptyDir");
    assert_eq!(config["app"], "my-app");
    assert_eq!(config["namespace"], "apps");
    assert_eq!(
        config["packages"],
        json!(["requests==2.31.0", "pandas>=2.0.0"])
    );
    assert_eq!(config["retries"], 3);
    assert_eq!(config["timeoutSeconds"], 600);
    assert_eq!(config["onFailure"], "block");
    assert_eq!(config["target"], "/opt/kaspr/packages");

    let annotations = &template(&out)["metadata"]["annotations"];
    let spec_key = validation::validate_kasprapp(&basic_app())
        .spec
        .expect("spec")
        .install_key();
    assert_eq!(
        annotations["packages.kaspr.io/install-key"],
        json!(spec_key)
    );
    assert_eq!(config["installKey"], json!(spec_key));
    assert_eq!(
        annotations["packages.kaspr.io/template-hash"]
            .as_str()
            .map(str::len),
        Some(16)
    );
    let record: Value = serde_json::from_str(
        annotations["packages.kaspr.io/injected"]
            .as_str()
            .expect("record"),
    )
    .expect("json");
    assert_eq!(
        record,
        json!({"initContainers": ["kaspr-packages"], "volumes": ["kaspr-packages"], "container": "kaspr",
               "volumeMounts": ["kaspr-packages"], "env": ["PYTHONPATH"]})
    );
}

#[test]
fn unknown_fields_survive() {
    let (out, _) = mutate(&statefulset(), &basic_app());
    assert_eq!(
        template(&out)["spec"]["futurePodField"],
        json!({"keep": true})
    );
    assert_eq!(main_container(&out)["futureContainerField"], "keep me");
}

#[test]
fn mutating_the_result_again_gives_an_empty_patch() {
    let (out, _) = mutate(&statefulset(), &basic_app());
    let again = mutate_statefulset(&out, &basic_app(), &RenderConfig::default()).expect("allowed");
    assert!(again.patch.0.is_empty(), "{:?}", again.patch);
}

#[test]
fn output_is_deterministic() {
    let a = mutate_statefulset(&statefulset(), &basic_app(), &RenderConfig::default()).expect("ok");
    let b = mutate_statefulset(&statefulset(), &basic_app(), &RenderConfig::default()).expect("ok");
    assert_eq!(
        serde_json::to_vec(&a.patch).expect("json"),
        serde_json::to_vec(&b.patch).expect("json")
    );
}

/// The operator rewrites the template without our additions (keeping or dropping our
/// annotations); the result must be the same template, byte for byte.
#[test]
fn operator_rewrites_give_the_same_template() {
    let app = kasprapp(json!({"packages": ["requests==2.31.0"], "cache": {"enabled": true}}));
    let (injected, _) = mutate(&statefulset(), &app);
    let expected = serde_json::to_vec(template(&injected)).expect("json");

    // 1. Fresh render: nothing of ours left, not even annotations.
    let (out, _) = mutate(&statefulset(), &app);
    assert_eq!(serde_json::to_vec(template(&out)).expect("json"), expected);

    // 2. Env, mounts and volumes rewritten, annotations kept.
    let mut rewritten = injected.clone();
    let t = &mut rewritten["spec"]["template"]["spec"];
    t["containers"][0]["env"] = json!([{"name": "KASPR_APP_NAME", "value": "my-app"}]);
    t["containers"][0]["volumeMounts"] = json!([{"name": "data", "mountPath": "/var/lib/kaspr"}]);
    t["volumes"] = json!([{"name": "config", "configMap": {"name": "my-app-config"}}]);
    let (out, _) = mutate(&rewritten, &app);
    assert_eq!(serde_json::to_vec(template(&out)).expect("json"), expected);

    // 3. Only the init containers rewritten.
    let mut rewritten = injected;
    rewritten["spec"]["template"]["spec"]["initContainers"] =
        json!([{"name": "wait-for-kafka", "image": "busybox:1.36"}]);
    let (out, _) = mutate(&rewritten, &app);
    assert_eq!(serde_json::to_vec(template(&out)).expect("json"), expected);
}

#[test]
fn removing_python_packages_strips_exactly_what_was_injected() {
    let mut original = statefulset();
    original["spec"]["template"]["metadata"]["annotations"] = json!({"team": "data"});
    let (injected, _) = mutate(&original, &basic_app());
    let mut without = basic_app();
    without["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("pythonPackages");
    let (stripped, outcome) = mutate(&injected, &without);
    assert!(outcome.warnings.is_empty());
    assert_eq!(stripped, original);
}

#[test]
fn no_python_packages_on_an_untouched_object_is_a_no_op() {
    let mut app = basic_app();
    app["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("pythonPackages");
    let outcome = mutate_statefulset(&statefulset(), &app, &RenderConfig::default()).expect("ok");
    assert!(outcome.patch.0.is_empty());
}

#[test]
fn existing_plain_pythonpath_is_kept_after_ours_and_restored_on_removal() {
    let mut sts = statefulset();
    sts["spec"]["template"]["spec"]["containers"][0]["env"] =
        json!([{"name": "PYTHONPATH", "value": "/app/lib"}, {"name": "X", "value": "1"}]);
    let (out, _) = mutate(&sts, &basic_app());
    assert_eq!(
        main_container(&out)["env"],
        json!([{"name": "PYTHONPATH", "value": "/opt/kaspr/packages/site:/app/lib"}, {"name": "X", "value": "1"}])
    );
    let again = mutate_statefulset(&out, &basic_app(), &RenderConfig::default()).expect("ok");
    assert!(again.patch.0.is_empty());
    let mut without = basic_app();
    without["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("pythonPackages");
    let (stripped, _) = mutate(&out, &without);
    assert_eq!(stripped, sts);
}

#[rstest::rstest]
#[case::empty("")]
#[case::only_separators("::")]
fn an_empty_pythonpath_never_leaves_an_empty_entry(#[case] value: &str) {
    let mut sts = statefulset();
    let theirs = json!({"name": "PYTHONPATH", "value": value});
    sts["spec"]["template"]["spec"]["containers"][0]["env"] = json!([theirs]);
    let (out, _) = mutate(&sts, &basic_app());
    let env = main_container(&out)["env"].as_array().expect("env").clone();
    // The effective value is the last entry of that name; it has no empty entry.
    let effective = env
        .iter()
        .rev()
        .find(|e| e["name"] == "PYTHONPATH")
        .and_then(|e| e["value"].as_str())
        .expect("PYTHONPATH");
    assert!(
        effective.split(':').all(|entry| !entry.is_empty()),
        "{effective:?}"
    );
    assert!(effective.starts_with("/opt/kaspr/packages/site"));
    let again = mutate_statefulset(&out, &basic_app(), &RenderConfig::default()).expect("ok");
    assert!(again.patch.0.is_empty());
    let mut without = basic_app();
    without["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("pythonPackages");
    let (stripped, _) = mutate(&out, &without);
    assert_eq!(stripped, sts);
}

#[test]
fn pythonpath_from_a_secret_is_chained_not_overwritten() {
    let mut sts = statefulset();
    let from = json!({"name": "PYTHONPATH", "valueFrom": {"configMapKeyRef": {"name": "paths", "key": "pythonpath"}}});
    sts["spec"]["template"]["spec"]["containers"][0]["env"] = json!([from]);
    let (out, _) = mutate(&sts, &basic_app());
    assert_eq!(
        main_container(&out)["env"],
        json!([from, {"name": "PYTHONPATH", "value": "/opt/kaspr/packages/site:$(PYTHONPATH)"}])
    );
    let (_, outcome) = mutate(&sts, &basic_app());
    assert!(
        outcome.warnings.iter().any(|w| w
            .starts_with("spec.template.spec.containers[0].env: PYTHONPATH comes from valueFrom")
            && w.contains("working directory")),
        "{:?}",
        outcome.warnings
    );
    let again = mutate_statefulset(&out, &basic_app(), &RenderConfig::default()).expect("ok");
    assert!(again.patch.0.is_empty());
}

#[test]
fn pvc_mode_adds_the_shared_cache() {
    let app = kasprapp(
        json!({"packages": ["requests==2.31.0"], "cache": {"enabled": true, "storageClass": "efs-sc"}}),
    );
    let (out, _) = mutate(&statefulset(), &app);
    let volumes = &template(&out)["spec"]["volumes"];
    assert_eq!(
        volumes[2],
        json!({"name": "kaspr-packages-cache", "persistentVolumeClaim": {"claimName": "my-app-python-packages"}})
    );
    assert_eq!(
        init_container(&out)["volumeMounts"][1],
        json!({"mountPath": "/opt/kaspr/packages-cache", "name": "kaspr-packages-cache"})
    );
    assert_eq!(
        main_container(&out)["volumeMounts"][2],
        json!({"mountPath": "/opt/kaspr/packages-cache", "name": "kaspr-packages-cache", "readOnly": true})
    );
    let config = config_of(&out);
    assert_eq!(config["mode"], "pvc");
    assert_eq!(config["cacheDir"], "/opt/kaspr/packages-cache");
}

#[test]
fn gcs_mode_with_a_key_secret_mounts_it_in_the_init_container_only() {
    let app = kasprapp(
        json!({"packages": ["requests==2.31.0"], "cache": {"type": "gcs",
        "gcs": {"bucket": "my-packages-bucket", "secretRef": {"name": "gcs-sa-key"}}}}),
    );
    let (out, _) = mutate(&statefulset(), &app);
    assert_eq!(
        template(&out)["spec"]["volumes"][2],
        json!({"name": "kaspr-packages-gcs-key", "secret": {"defaultMode": 0o444, "items": [{"key": "sa.json", "path": "sa.json"}], "optional": false, "secretName": "gcs-sa-key"}})
    );
    assert_eq!(
        init_container(&out)["volumeMounts"][1],
        json!({"mountPath": "/var/run/secrets/kaspr-packages/gcs", "name": "kaspr-packages-gcs-key", "readOnly": true})
    );
    assert_eq!(
        main_container(&out)["volumeMounts"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    let config = config_of(&out);
    assert_eq!(
        config["gcs"],
        json!({"bucket": "my-packages-bucket", "prefix": "kaspr-packages/", "maxArchiveSize": 1_073_741_824u64,
               "keyFile": "/var/run/secrets/kaspr-packages/gcs/sa.json"})
    );
}

#[test]
fn gcs_mode_without_a_secret_uses_workload_identity() {
    let app = kasprapp(
        json!({"packages": ["requests==2.31.0"], "cache": {"type": "gcs", "gcs": {"bucket": "my-packages-bucket"}}}),
    );
    let (out, _) = mutate(&statefulset(), &app);
    assert_eq!(
        template(&out)["spec"]["volumes"].as_array().map(Vec::len),
        Some(2)
    );
    assert!(config_of(&out)["gcs"].get("keyFile").is_none());
}

#[test]
fn credentials_are_secret_references_on_the_init_container_only() {
    let app = kasprapp(
        json!({"packages": ["private-lib==1.0"], "indexUrl": "https://pypi.example.com/simple",
        "credentials": {"secretRef": {"name": "pypi-creds", "passwordKey": "token"}}}),
    );
    let (out, _) = mutate(&statefulset(), &app);
    let ic = init_container(&out);
    assert_eq!(
        env(ic, "KASPR_PYPI_USERNAME"),
        Some(
            &json!({"name": "KASPR_PYPI_USERNAME", "valueFrom": {"secretKeyRef": {"key": "username", "name": "pypi-creds", "optional": false}}})
        )
    );
    assert_eq!(
        env(ic, "KASPR_PYPI_PASSWORD"),
        Some(
            &json!({"name": "KASPR_PYPI_PASSWORD", "valueFrom": {"secretKeyRef": {"key": "token", "name": "pypi-creds", "optional": false}}})
        )
    );
    assert!(env(main_container(&out), "KASPR_PYPI_PASSWORD").is_none());
    assert_eq!(config_of(&out)["credentials"], true);
}

#[test]
fn init_container_extras_are_added_to_the_init_container_only() {
    let mut app =
        kasprapp(json!({"packages": ["mylib @ git+ssh://git@github.com/org/mylib.git@v1"]}));
    app["spec"]["template"] = json!({"pythonPackagesInitContainer": {
        "env": [{"name": "GIT_SSH_COMMAND", "value": "ssh -i /etc/git-ssh/id_ed25519"}],
        "volumeMounts": [{"name": "git-ssh", "mountPath": "/etc/git-ssh", "readOnly": true}]
    }});
    let mut sts = statefulset();
    sts["spec"]["template"]["spec"]["volumes"]
        .as_array_mut()
        .expect("volumes")
        .push(
            json!({"name": "git-ssh", "secret": {"secretName": "deploy-key", "defaultMode": 256}}),
        );
    let (out, _) = mutate(&sts, &app);
    let ic = init_container(&out);
    assert!(env(ic, "GIT_SSH_COMMAND").is_some());
    assert_eq!(ic["volumeMounts"][1]["mountPath"], "/etc/git-ssh");
    assert!(env(main_container(&out), "GIT_SSH_COMMAND").is_none());

    // The volume must exist in the pod.
    let denial =
        mutate_statefulset(&statefulset(), &app, &RenderConfig::default()).expect_err("denied");
    assert!(
        denial
            .message
            .contains("volume \"git-ssh\" is not declared"),
        "{}",
        denial.message
    );
}

#[test]
fn resources_come_from_the_spec_else_the_chart_default() {
    let default = k8s_openapi::api::core::v1::ResourceRequirements {
        requests: Some(
            [(
                "cpu".to_owned(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("50m".into()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    let config = RenderConfig {
        default_resources: Some(default),
        ..RenderConfig::default()
    };
    let outcome = mutate_statefulset(&statefulset(), &basic_app(), &config).expect("ok");
    let out = apply_patch(&statefulset(), &outcome.patch);
    assert_eq!(
        init_container(&out)["resources"],
        json!({"requests": {"cpu": "50m"}})
    );

    let app = kasprapp(json!({"packages": ["a==1"], "resources": {"limits": {"memory": "512Mi"}}}));
    let outcome = mutate_statefulset(&statefulset(), &app, &config).expect("ok");
    let out = apply_patch(&statefulset(), &outcome.patch);
    assert_eq!(
        init_container(&out)["resources"],
        json!({"limits": {"memory": "512Mi"}})
    );
}

#[test]
fn template_hash_follows_every_rendered_change_and_install_key_only_content() {
    let hash = |app: &Value| {
        let (out, _) = mutate(&statefulset(), app);
        let a = &template(&out)["metadata"]["annotations"];
        (
            a["packages.kaspr.io/template-hash"].clone(),
            a["packages.kaspr.io/install-key"].clone(),
        )
    };
    let base = hash(&kasprapp(json!({"packages": ["a==1"]})));
    let policy = hash(&kasprapp(
        json!({"packages": ["a==1"], "installPolicy": {"retries": 5}}),
    ));
    let resources = hash(&kasprapp(
        json!({"packages": ["a==1"], "resources": {"limits": {"cpu": "1"}}}),
    ));
    let cache = hash(&kasprapp(
        json!({"packages": ["a==1"], "cache": {"enabled": true}}),
    ));
    let packages = hash(&kasprapp(json!({"packages": ["a==2"]})));
    for other in [&policy, &resources, &cache] {
        assert_ne!(other.0, base.0);
        assert_eq!(other.1, base.1);
    }
    assert_ne!(packages.0, base.0);
    assert_ne!(packages.1, base.1);

    let mut other_image = statefulset();
    other_image["spec"]["template"]["spec"]["containers"][0]["image"] =
        json!("kasprio/kaspr:0.6.0");
    let (out, _) = mutate(&other_image, &kasprapp(json!({"packages": ["a==1"]})));
    assert_ne!(
        template(&out)["metadata"]["annotations"]["packages.kaspr.io/template-hash"],
        base.0
    );
}

#[test]
fn the_operators_own_init_container_means_no_injection() {
    let mut sts = statefulset();
    sts["spec"]["template"]["spec"]["initContainers"]
        .as_array_mut()
        .expect("init")
        .push(json!({"name": "install-packages", "image": "kasprio/kaspr:0.5.0"}));
    let outcome =
        mutate_statefulset(&sts, &basic_app(), &RenderConfig::default()).expect("allowed");
    assert!(outcome.patch.0.is_empty());
    assert!(
        outcome
            .warnings
            .iter()
            .any(|w| w.contains("install-packages")),
        "{:?}",
        outcome.warnings
    );
}

#[test]
fn names_taken_by_the_user_are_denied() {
    let mut sts = statefulset();
    sts["spec"]["template"]["spec"]["volumes"]
        .as_array_mut()
        .expect("volumes")
        .push(json!({"name": "kaspr-packages", "emptyDir": {}}));
    sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"name": "config", "mountPath": "/opt/kaspr/packages"}));
    let denial =
        mutate_statefulset(&sts, &basic_app(), &RenderConfig::default()).expect_err("denied");
    assert!(
        denial
            .message
            .contains("spec.template.spec.volumes[1]: a volume named \"kaspr-packages\""),
        "{}",
        denial.message
    );
    assert!(
        denial
            .message
            .contains("spec.template.spec.containers[0].volumeMounts[1]"),
        "{}",
        denial.message
    );
}

#[test]
fn an_invalid_kasprapp_is_denied_naming_it() {
    let app = kasprapp(json!({"packages": ["requests; rm -rf /"]}));
    let denial =
        mutate_statefulset(&statefulset(), &app, &RenderConfig::default()).expect_err("denied");
    assert!(
        denial
            .message
            .starts_with("KasprApp apps/my-app has an invalid spec.pythonPackages:"),
        "{}",
        denial.message
    );
    assert!(denial.message.contains(
        "spec.pythonPackages.packages[0]: \"requests; rm -rf /\" is not a valid requirement"
    ));
}

#[test]
fn main_container_is_kaspr_else_the_first() {
    let mut sts = statefulset();
    let kaspr = sts["spec"]["template"]["spec"]["containers"][0].clone();
    sts["spec"]["template"]["spec"]["containers"] =
        json!([{"name": "sidecar", "image": "envoy:1"}, kaspr]);
    let (out, _) = mutate(&sts, &basic_app());
    let containers = &template(&out)["spec"]["containers"];
    assert!(env(&containers[1], "PYTHONPATH").is_some());
    assert!(containers[0].get("env").is_none());

    sts["spec"]["template"]["spec"]["containers"] =
        json!([{"name": "app", "image": "python:3.12"}]);
    let (out, _) = mutate(&sts, &basic_app());
    assert!(env(&template(&out)["spec"]["containers"][0], "PYTHONPATH").is_some());
    assert_eq!(init_container(&out)["image"], "python:3.12");
}

#[test]
fn seccomp_of_the_main_container_or_pod_is_respected() {
    let mut sts = statefulset();
    sts["spec"]["template"]["spec"]["containers"][0]["securityContext"] = json!({"seccompProfile": {"type": "Localhost", "localhostProfile": "k.json"}, "privileged": true, "capabilities": {"add": ["NET_ADMIN"]}});
    let (out, _) = mutate(&sts, &basic_app());
    assert_eq!(
        init_container(&out)["securityContext"],
        json!({"seccompProfile": {"type": "Localhost", "localhostProfile": "k.json"}, "capabilities": {"drop": ["ALL"]}, "allowPrivilegeEscalation": false})
    );

    let mut sts = statefulset();
    sts["spec"]["template"]["spec"]["securityContext"] =
        json!({"seccompProfile": {"type": "RuntimeDefault"}});
    let (out, _) = mutate(&sts, &basic_app());
    assert!(
        init_container(&out)["securityContext"]
            .get("seccompProfile")
            .is_none()
    );
}

fn pod() -> Value {
    let sts = statefulset();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "my-app-app-0", "namespace": "apps", "labels": sts["spec"]["template"]["metadata"]["labels"].clone()},
        "spec": sts["spec"]["template"]["spec"].clone()
    })
}

#[test]
fn pods_are_injected_unless_their_template_already_was() {
    assert_eq!(pod_app(&pod()).as_deref(), Some("my-app"));
    let outcome = mutate_pod(&pod(), &basic_app(), &RenderConfig::default()).expect("ok");
    let out = apply_patch(&pod(), &outcome.patch);
    assert!(
        out["spec"]["initContainers"]
            .as_array()
            .expect("init")
            .iter()
            .any(|c| c["name"] == "kaspr-packages")
    );
    assert!(out["metadata"]["annotations"]["packages.kaspr.io/template-hash"].is_string());
    let again = mutate_pod(&out, &basic_app(), &RenderConfig::default()).expect("ok");
    assert!(again.patch.0.is_empty());

    // A pod from an injected template carries the hash and is left alone.
    let (sts, _) = mutate(&statefulset(), &basic_app());
    let mut from_template = pod();
    from_template["metadata"]["annotations"] =
        sts["spec"]["template"]["metadata"]["annotations"].clone();
    from_template["spec"] = sts["spec"]["template"]["spec"].clone();
    let outcome = mutate_pod(&from_template, &basic_app(), &RenderConfig::default()).expect("ok");
    assert!(outcome.patch.0.is_empty());
}

#[test]
fn pod_app_falls_back_to_the_instance_label_and_needs_the_kind_label() {
    let mut p = pod();
    p["metadata"]["labels"] =
        json!({"kaspr.io/kind": "KasprApp", "app.kubernetes.io/instance": "other"});
    assert_eq!(pod_app(&p).as_deref(), Some("other"));
    p["metadata"]["labels"] = json!({"kaspr.io/app": "my-app"});
    assert_eq!(pod_app(&p), None);
}

#[test]
fn owning_app_needs_a_kasprapp_of_group_kaspr_io() {
    assert_eq!(owning_app(&statefulset()).as_deref(), Some("my-app"));
    let mut sts = statefulset();
    sts["metadata"]["ownerReferences"][0]["apiVersion"] = json!("other.io/v1");
    assert_eq!(owning_app(&sts), None);
}

/// A template carrying other products' sidecars and volumes and a record that claims them.
fn statefulset_with_forged_record() -> Value {
    let mut sts = statefulset();
    let template = &mut sts["spec"]["template"];
    template["metadata"]["annotations"] = json!({
        "packages.kaspr.io/injected": serde_json::to_string(&json!({
            "initContainers": ["istio-proxy", "vault-agent-init"],
            "volumes": ["istio-envoy", "vault-secrets"],
            "container": "kaspr",
            "volumeMounts": ["istio-envoy", "vault-secrets"],
            "env": ["VAULT_ADDR"]
        }))
        .expect("json")
    });
    let spec = &mut template["spec"];
    spec["initContainers"] = json!([
        {"name": "vault-agent-init", "image": "vault:1.15"},
        {"name": "istio-proxy", "image": "proxyv2:1.22", "restartPolicy": "Always"}
    ]);
    spec["volumes"] = json!([
        {"name": "istio-envoy", "emptyDir": {"medium": "Memory"}},
        {"name": "vault-secrets", "emptyDir": {}}
    ]);
    spec["containers"][0]["volumeMounts"] = json!([
        {"name": "istio-envoy", "mountPath": "/etc/istio/proxy"},
        {"name": "vault-secrets", "mountPath": "/vault/secrets"}
    ]);
    spec["containers"][0]["env"] = json!([{"name": "VAULT_ADDR", "value": "https://vault:8200"}]);
    sts
}

#[test]
fn a_forged_record_never_removes_what_others_injected() {
    let sts = statefulset_with_forged_record();
    let before = sts["spec"]["template"]["spec"].clone();
    let (out, outcome) = mutate(&sts, &basic_app());
    let spec = &out["spec"]["template"]["spec"];
    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .expect("list")
            .iter()
            .map(|i| i["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(
        names(&spec["initContainers"]),
        ["vault-agent-init", "istio-proxy", "kaspr-packages"]
    );
    assert_eq!(spec["initContainers"][1], before["initContainers"][1]);
    assert_eq!(
        names(&spec["volumes"]),
        ["istio-envoy", "vault-secrets", "kaspr-packages"]
    );
    assert_eq!(
        names(&spec["containers"][0]["volumeMounts"]),
        ["istio-envoy", "vault-secrets", "kaspr-packages"]
    );
    assert_eq!(
        spec["containers"][0]["env"][0],
        before["containers"][0]["env"][0]
    );
    for entry in [
        "init container \"istio-proxy\"",
        "init container \"vault-agent-init\"",
        "volume \"istio-envoy\"",
        "volume mount \"vault-secrets\"",
        "env var \"VAULT_ADDR\"",
    ] {
        assert!(
            outcome
                .warnings
                .iter()
                .any(|w| w.contains(entry) && w.contains("left alone")),
            "{entry} not in {:#?}",
            outcome.warnings
        );
    }
    // The record written back lists only what we added.
    let record: Value = serde_json::from_str(
        out["spec"]["template"]["metadata"]["annotations"]["packages.kaspr.io/injected"]
            .as_str()
            .expect("record"),
    )
    .expect("json");
    assert_eq!(record["initContainers"], json!(["kaspr-packages"]));
    assert_eq!(record["volumes"], json!(["kaspr-packages"]));
}

#[test]
fn a_forged_record_cannot_pass_off_a_foreign_object_under_our_name() {
    let mut sts = statefulset_with_forged_record();
    let template = &mut sts["spec"]["template"];
    template["metadata"]["annotations"]["packages.kaspr.io/injected"] = json!(
        r#"{"initContainers":["kaspr-packages"],"volumes":["kaspr-packages"],"container":"kaspr","volumeMounts":["kaspr-packages"],"env":[]}"#
    );
    template["spec"]["initContainers"]
        .as_array_mut()
        .expect("init")
        .push(
            json!({"name": "kaspr-packages", "image": "busybox", "command": ["sh", "-c", "steal"]}),
        );
    template["spec"]["volumes"]
        .as_array_mut()
        .expect("volumes")
        .push(json!({"name": "kaspr-packages", "hostPath": {"path": "/"}}));
    let denial =
        mutate_statefulset(&sts, &basic_app(), &RenderConfig::default()).expect_err("denied");
    for expected in [
        "spec.template.spec.initContainers[2]: an init container named \"kaspr-packages\" exists and was not added by kaspr-packages-webhook",
        "spec.template.spec.volumes[2]: a volume named \"kaspr-packages\" exists and was not added by kaspr-packages-webhook",
    ] {
        assert!(denial.message.contains(expected), "{}", denial.message);
    }
}

#[test]
fn the_installer_is_told_which_variables_it_may_expand() {
    let mut app = kasprapp(json!({"packages": [
        "z @ https://${PIP_TOKEN}@pkgs.example.com/z-1.0.whl", "a==1", "b @ https://h/${PIP_TOKEN}/${REV}.whl"
    ]}));
    app["spec"]["template"] = json!({"pythonPackagesInitContainer": {"env": [
        {"name": "PIP_TOKEN", "value": "t"}, {"name": "REV", "value": "1"}
    ]}});
    let (out, _) = mutate(&statefulset(), &app);
    assert_eq!(config_of(&out)["expandEnv"], json!(["PIP_TOKEN", "REV"]));
    let (plain, _) = mutate(&statefulset(), &basic_app());
    assert!(config_of(&plain).get("expandEnv").is_none());
}

#[test]
fn the_packages_volume_gets_the_configured_size_limit() {
    let (plain, _) = mutate(&statefulset(), &basic_app());
    assert_eq!(
        template(&plain)["spec"]["volumes"][1],
        json!({"name": "kaspr-packages", "emptyDir": {}})
    );
    let config = RenderConfig {
        packages_volume_size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "4Gi".into(),
        )),
        ..RenderConfig::default()
    };
    let outcome = mutate_statefulset(&statefulset(), &basic_app(), &config).expect("ok");
    let limited = apply_patch(&statefulset(), &outcome.patch);
    assert_eq!(
        template(&limited)["spec"]["volumes"][1],
        json!({"name": "kaspr-packages", "emptyDir": {"sizeLimit": "4Gi"}})
    );
    // A different rendering, so a different template hash: the change rolls the apps.
    let hash = |sts: &Value| {
        template(sts)["metadata"]["annotations"]["packages.kaspr.io/template-hash"].clone()
    };
    assert_ne!(hash(&plain), hash(&limited));
}

#[test]
fn an_operator_statefulset_without_owner_reference_is_recognised_by_its_template_labels() {
    let mut sts = statefulset();
    sts["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("ownerReferences");
    sts["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("labels");
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u-unowned", "kind": {"group": "apps", "version": "v1", "kind": "StatefulSet"},
                    "namespace": "apps", "operation": "CREATE", "object": sts}
    });
    let request = crate::admission::parse_review(&serde_json::to_vec(&review).expect("json"))
        .expect("review");
    let endpoint = crate::admission::Endpoint::Mutate;
    let app = crate::admission::required_app(endpoint, &request).expect("recognised");
    assert_eq!(app, AppRef::new("apps", "my-app"));
    let found = crate::app::AppLookup::Found(std::sync::Arc::new(basic_app()));
    let decision =
        crate::admission::decide(endpoint, &request, Some(&found), &RenderConfig::default());
    assert!(decision.allowed && decision.patch.is_some(), "{decision:?}");
}

#[test]
fn pvc_mode_gives_the_installer_the_pod_uid_for_its_lease() {
    let app = kasprapp(json!({"packages": ["a==1"], "cache": {"enabled": true}}));
    let (out, _) = mutate(&statefulset(), &app);
    assert_eq!(
        env(init_container(&out), "KASPR_PACKAGES_POD_UID"),
        Some(
            &json!({"name": "KASPR_PACKAGES_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}})
        )
    );
    let (plain, _) = mutate(&statefulset(), &basic_app());
    assert_eq!(env(init_container(&plain), "KASPR_PACKAGES_POD_UID"), None);
}

#[test]
fn a_non_root_pvc_pod_without_fs_group_is_warned_at_admission() {
    let app = kasprapp(json!({"packages": ["requests==2.31.0"], "cache": {"enabled": true}}));
    let mut sts = statefulset();
    sts["spec"]["template"]["spec"]["securityContext"] = json!({"runAsUser": 1000});
    let (_, outcome) = mutate(&sts, &app);
    let warnings = outcome.warnings;
    assert!(
        warnings.iter().any(|w| w.starts_with(
            "spec.template.spec.securityContext.fsGroup: PVC cache mode runs the package installer as uid 1000"
        )),
        "{warnings:?}"
    );
    sts["spec"]["template"]["spec"]["securityContext"]["fsGroup"] = json!(1000);
    let warnings = mutate(&sts, &app).1.warnings;
    assert!(
        !warnings.iter().any(|w| w.contains("fsGroup")),
        "{warnings:?}"
    );
}
