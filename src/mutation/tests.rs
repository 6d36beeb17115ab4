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

#[test]
fn the_install_tool_follows_the_annotation_then_the_chart_default() {
    let with = |annotation: Option<&str>, default: crate::spec::InstallTool| {
        let mut app = basic_app();
        if let Some(tool) = annotation {
            app["metadata"]["annotations"] = json!({"packages.kaspr.io/install-tool": tool});
        }
        let config = RenderConfig {
            install_tool: default,
            ..RenderConfig::default()
        };
        let outcome = mutate_statefulset(&statefulset(), &app, &config).expect("ok");
        config_of(&apply_patch(&statefulset(), &outcome.patch))
            .get("installTool")
            .cloned()
    };
    use crate::spec::InstallTool::{Auto, Pip};
    // pip, the installer's default, is not written: templates stay as they were.
    assert_eq!(with(None, Pip), None);
    assert_eq!(with(None, Auto), Some(json!("auto")));
    assert_eq!(with(Some("uv"), Auto), Some(json!("uv")));
    assert_eq!(with(Some("pip"), Auto), None);
}

mod modes;
mod pods;
