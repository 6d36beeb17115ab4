//! Takeover against the StatefulSet the Kaspr operator v0.18 renders, and against its two
//! rewrite loops: the 10 s replacement of the main container's env and mounts and of the pod's
//! volumes, and the 30 s replacement of the whole template when its watch fields differ.

use pretty_assertions::assert_eq;
use rstest::rstest;
use serde_json::{Value, json};

use crate::admission::mutate_object;
use crate::config::RenderConfig;
use crate::mutation::ObjectKind;
use crate::spec::OperatorPackages;

const APP: &str = "orders";
const HASH: &str = "9f86d081884c7d65";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    EmptyDir,
    Pvc,
    Gcs,
}

fn python_packages(mode: Mode) -> Value {
    let mut packages =
        json!({"packages": ["requests==2.31.0"], "indexUrl": "https://pypi.example.com/simple"});
    match mode {
        Mode::EmptyDir => {}
        Mode::Pvc => packages["cache"] = json!({"type": "pvc", "enabled": true}),
        Mode::Gcs => {
            packages["cache"] = json!({"type": "gcs", "gcs": {"bucket": "kaspr-cache", "secretRef": {"name": "gcs-key"}}});
        }
    }
    packages
}

fn kasprapp(mode: Mode, annotation: Option<&str>) -> Value {
    let mut app = json!({
        "apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
        "metadata": {"name": APP, "namespace": "apps", "uid": "u-1"},
        "spec": {"bootstrapServers": "kafka:9092", "pythonPackages": python_packages(mode)}
    });
    if let Some(value) = annotation {
        app["metadata"]["annotations"] = json!({"packages.kaspr.io/operator-packages": value});
    }
    app
}

/// The main container's env as the operator renders it (and patches it every 10 s).
fn operator_main_env(mode: Mode) -> Value {
    let mut env = vec![
        json!({"name": "KASPR_APP_NAME", "value": APP}),
        json!({"name": "PYTHONPATH", "value": "/opt/kaspr/packages:${PYTHONPATH}"}),
    ];
    if mode != Mode::EmptyDir {
        env.push(json!({"name": "PACKAGES_HASH", "value": HASH}));
    }
    Value::Array(env)
}

fn operator_main_mounts() -> Value {
    json!([
        {"name": "orders-app-data", "mountPath": "/var/lib/kaspr"},
        {"name": "orders-app-packages", "mountPath": "/opt/kaspr/packages", "readOnly": true}
    ])
}

fn operator_volumes(mode: Mode) -> Value {
    let packages = match mode {
        Mode::Pvc => {
            json!({"name": "orders-app-packages", "persistentVolumeClaim": {"claimName": "orders-app-python-packages"}})
        }
        _ => json!({"name": "orders-app-packages", "emptyDir": {}}),
    };
    let mut volumes = vec![json!({"name": "orders-app-data", "emptyDir": {}}), packages];
    if mode == Mode::Gcs {
        volumes.push(
            json!({"name": "gcs-sa-key", "secret": {"secretName": "gcs-key", "defaultMode": 420}}),
        );
    }
    Value::Array(volumes)
}

/// The pod template the operator wants (its "desired" template).
fn operator_template(mode: Mode) -> Value {
    let mut init_env = Vec::new();
    if mode != Mode::EmptyDir {
        init_env.push(json!({"name": "PACKAGES_HASH", "value": HASH}));
    }
    init_env.push(json!({"name": "INDEX_URL", "value": "https://pypi.example.com/simple"}));
    let mut init_mounts =
        vec![json!({"name": "orders-app-packages", "mountPath": "/opt/kaspr/packages"})];
    if mode == Mode::Gcs {
        init_env.push(json!({"name": "GCS_BUCKET", "value": "kaspr-cache"}));
        init_mounts.push(
            json!({"name": "gcs-sa-key", "mountPath": "/var/run/secrets/gcs", "readOnly": true}),
        );
    }
    json!({
        "metadata": {"labels": {
            "kaspr.io/kind": "KasprApp", "kaspr.io/name": "orders-app", "kaspr.io/cluster": APP,
            "kaspr.io/component-type": "KasprApp", "kaspr.io/app": APP,
            "app.kubernetes.io/managed-by": "kaspr-operator"
        }},
        "spec": {
            "initContainers": [{
                "name": "install-packages",
                "image": "kasprio/kaspr:0.18.51",
                "command": ["/bin/bash", "-c"],
                "args": ["set -e\npip install --target /opt/kaspr/packages requests==2.31.0"],
                "env": init_env,
                "volumeMounts": init_mounts,
            }],
            "containers": [{
                "name": "kaspr",
                "image": "kasprio/kaspr:0.18.51",
                "env": operator_main_env(mode),
                "volumeMounts": operator_main_mounts(),
            }],
            "volumes": operator_volumes(mode),
            "securityContext": {"fsGroup": 1000},
        }
    })
}

fn statefulset(template: &Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "orders-app", "namespace": "apps",
            "ownerReferences": [{"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": APP,
                                 "uid": "u-1", "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"replicas": 1, "template": template}
    })
}

/// The webhook's answer applied: the template the API server stores.
fn admit(template: &Value, app: &Value, config: &RenderConfig) -> (Value, Vec<String>) {
    let sts = statefulset(template);
    let outcome = mutate_object(ObjectKind::StatefulSet, &sts, app, config).expect("allowed");
    let mut out = sts;
    json_patch::patch(&mut out, &outcome.patch).expect("patch applies");
    (out["spec"]["template"].clone(), outcome.warnings)
}

fn takeover() -> RenderConfig {
    RenderConfig {
        operator_packages: OperatorPackages::Takeover,
        ..RenderConfig::default()
    }
}

fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|item| item["name"] == name)
}

/// What the operator's 30 s loop compares (replicas, service account and image aside).
fn watch_fields(template: &Value) -> (Option<Value>, Option<Value>) {
    let spec = &template["spec"];
    let main_hash = spec["containers"][0]["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "PACKAGES_HASH"))
        .map(|e| e["value"].clone());
    let init_hash = named(&spec["initContainers"], "install-packages")
        .and_then(|c| c["env"].as_array())
        .and_then(|env| env.iter().find(|e| e["name"] == "PACKAGES_HASH"))
        .map(|e| e["value"].clone());
    (main_hash, init_hash)
}

/// The operator's 10 s patch: its desired env and mounts of containers[0] and volumes.
fn ten_second_patch(stored: &Value, mode: Mode) -> Value {
    let mut patched = stored.clone();
    patched["spec"]["containers"][0]["env"] = operator_main_env(mode);
    patched["spec"]["containers"][0]["volumeMounts"] = operator_main_mounts();
    patched["spec"]["volumes"] = operator_volumes(mode);
    patched
}

#[rstest]
fn respect_is_the_default_and_leaves_the_operator_alone(
    #[values(Mode::EmptyDir, Mode::Pvc, Mode::Gcs)] mode: Mode,
) {
    let template = operator_template(mode);
    let (out, warnings) = admit(&template, &kasprapp(mode, None), &RenderConfig::default());
    assert_eq!(out, template);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("install-packages")
                && w.contains("packages.kaspr.io/operator-packages")),
        "{warnings:?}"
    );
    // The annotation overrides a chart default of takeover, too.
    let (out, _) = admit(&template, &kasprapp(mode, Some("respect")), &takeover());
    assert_eq!(out, template);
}

#[rstest]
fn takeover_replaces_the_operator_injection_with_ours(
    #[values(Mode::EmptyDir, Mode::Pvc, Mode::Gcs)] mode: Mode,
    #[values(true, false)] by_annotation: bool,
) {
    let (app, config) = if by_annotation {
        (kasprapp(mode, Some("takeover")), RenderConfig::default())
    } else {
        (kasprapp(mode, None), takeover())
    };
    let (out, _) = admit(&operator_template(mode), &app, &config);
    let spec = &out["spec"];
    let init = spec["initContainers"].as_array().expect("init containers");
    assert_eq!(init.len(), 1, "{init:#?}");
    let ours = &init[0];
    assert_eq!(ours["name"], "install-packages");
    assert_eq!(ours["command"][0], "python3");
    assert!(ours.get("args").is_none(), "the operator's script is gone");
    let env_names: Vec<&str> = ours["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        env_names.contains(&"KASPR_PACKAGES_CONFIG"),
        "{env_names:?}"
    );
    for theirs in ["INDEX_URL", "GCS_BUCKET"] {
        assert!(!env_names.contains(&theirs), "{env_names:?}");
    }
    // The operator's watch fields read as it renders them.
    assert_eq!(watch_fields(&out), watch_fields(&operator_template(mode)));
    if mode != Mode::EmptyDir {
        assert_eq!(env_names[0], "PACKAGES_HASH");
    }
    let volumes: Vec<&str> = spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    let expected: &[&str] = match mode {
        Mode::EmptyDir => &["orders-app-data", "kaspr-packages"],
        Mode::Pvc => &["orders-app-data", "kaspr-packages", "kaspr-packages-cache"],
        Mode::Gcs => &[
            "orders-app-data",
            "kaspr-packages",
            "kaspr-packages-gcs-key",
        ],
    };
    assert_eq!(volumes, expected);
    if mode == Mode::Pvc {
        // Our claim, kept by our controller; never the operator's.
        assert_eq!(
            named(&spec["volumes"], "kaspr-packages-cache").expect("cache")["persistentVolumeClaim"]
                ["claimName"],
            "orders-python-packages"
        );
    }
    let main = &spec["containers"][0];
    let pythonpath: Vec<&Value> = main["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter(|e| e["name"] == "PYTHONPATH")
        .collect();
    assert_eq!(
        pythonpath,
        [&json!({"name": "PYTHONPATH", "value": "/opt/kaspr/packages/site"})]
    );
    assert!(
        !serde_json::to_string(&out)
            .expect("json")
            .contains("${PYTHONPATH}")
    );
    assert!(named(&main["volumeMounts"], "orders-app-packages").is_none());
    assert_eq!(
        out["metadata"]["labels"],
        operator_template(mode)["metadata"]["labels"]
    );
    let record: Value = serde_json::from_str(
        out["metadata"]["annotations"]["packages.kaspr.io/injected"]
            .as_str()
            .expect("record"),
    )
    .expect("json");
    assert_eq!(record["initContainers"], json!(["install-packages"]));
}

#[rstest]
fn both_operator_loops_get_back_the_stored_template_byte_for_byte(
    #[values(Mode::EmptyDir, Mode::Pvc, Mode::Gcs)] mode: Mode,
) {
    let app = kasprapp(mode, Some("takeover"));
    let config = RenderConfig::default();
    let (stored, _) = admit(&operator_template(mode), &app, &config);
    let bytes = serde_json::to_string(&stored).expect("json");
    // Reinvocation and no-op updates: an empty patch.
    let outcome = mutate_object(
        ObjectKind::StatefulSet,
        &statefulset(&stored),
        &app,
        &config,
    )
    .expect("allowed");
    assert!(outcome.patch.0.is_empty(), "{:?}", outcome.patch);
    // The 10 s patch of env, mounts and volumes.
    for _ in 0..3 {
        let (again, _) = admit(&ten_second_patch(&stored, mode), &app, &config);
        assert_eq!(serde_json::to_string(&again).expect("json"), bytes);
    }
    // The 30 s replacement of the whole template (it would only fire on a difference, but
    // whatever it sends comes back as stored).
    let (again, _) = admit(&operator_template(mode), &app, &config);
    assert_eq!(serde_json::to_string(&again).expect("json"), bytes);
}

#[test]
fn a_new_operator_hash_comes_through_its_whole_template_replacement() {
    let app = kasprapp(Mode::Pvc, Some("takeover"));
    let (stored, _) = admit(
        &operator_template(Mode::Pvc),
        &app,
        &RenderConfig::default(),
    );
    let changed = serde_json::to_string(&operator_template(Mode::Pvc))
        .expect("json")
        .replace(HASH, "0000000000000001");
    let changed: Value = serde_json::from_str(&changed).expect("json");
    let (out, _) = admit(&changed, &app, &RenderConfig::default());
    assert_eq!(watch_fields(&out), watch_fields(&changed));
    assert_ne!(out, stored);
}

/// What an operator release before v0.14 renders: no package injection at all.
fn pre_v014_template() -> Value {
    let mut template = operator_template(Mode::EmptyDir);
    template["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("initContainers");
    template["spec"]["containers"][0]["env"] = json!([{"name": "KASPR_APP_NAME", "value": APP}]);
    template["spec"]["containers"][0]["volumeMounts"] =
        json!([{"name": "orders-app-data", "mountPath": "/var/lib/kaspr"}]);
    template["spec"]["volumes"] = json!([{"name": "orders-app-data", "emptyDir": {}}]);
    template
}

#[test]
fn an_operator_without_install_packages_is_injected_as_before() {
    let template = pre_v014_template();
    let (respected, _) = admit(
        &template,
        &kasprapp(Mode::EmptyDir, None),
        &RenderConfig::default(),
    );
    let (taken, _) = admit(
        &template,
        &kasprapp(Mode::EmptyDir, Some("takeover")),
        &RenderConfig::default(),
    );
    assert_eq!(respected, taken);
    assert!(named(&taken["spec"]["initContainers"], "kaspr-packages").is_some());
}

#[test]
fn switching_back_to_respect_hands_the_template_to_the_operator() {
    let mode = Mode::EmptyDir;
    let (stored, _) = admit(
        &operator_template(mode),
        &kasprapp(mode, Some("takeover")),
        &RenderConfig::default(),
    );
    let respect = kasprapp(mode, Some("respect"));
    // Our installer stays until the operator puts its own back, but its PACKAGES_HASH now
    // differs from the operator's, so the operator's watch replaces the template.
    let (released, _) = admit(&stored, &respect, &RenderConfig::default());
    assert_ne!(
        watch_fields(&released),
        watch_fields(&operator_template(mode))
    );
    let init = named(&released["spec"]["initContainers"], "install-packages").expect("init");
    assert_eq!(init["command"][0], "python3");
    // Its 10 s patch does not undo that; its whole template is then left alone.
    let (again, _) = admit(
        &ten_second_patch(&released, mode),
        &respect,
        &RenderConfig::default(),
    );
    assert_eq!(again, released);
    let (after, _) = admit(&operator_template(mode), &respect, &RenderConfig::default());
    assert_eq!(after, operator_template(mode));
}

#[test]
fn removing_python_packages_strips_the_takeover() {
    let mode = Mode::Pvc;
    let (stored, _) = admit(
        &operator_template(mode),
        &kasprapp(mode, Some("takeover")),
        &RenderConfig::default(),
    );
    let mut app = kasprapp(mode, Some("takeover"));
    app["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("pythonPackages");
    let (out, _) = admit(&stored, &app, &RenderConfig::default());
    assert!(out["spec"].get("initContainers").is_none(), "{out:#?}");
    assert!(out["metadata"].get("annotations").is_none());
    let volumes: Vec<&str> = out["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(volumes, ["orders-app-data"]);
}

#[test]
fn takeover_applies_the_declared_security_contexts() {
    let restricted = json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                            "runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}});
    let mut app = kasprapp(Mode::EmptyDir, Some("takeover"));
    app["spec"]["template"] = json!({
        "kasprContainer": {"securityContext": restricted},
        "pythonPackagesInitContainer": {"securityContext": {"runAsUser": 2000, "readOnlyRootFilesystem": true}}
    });
    let (out, warnings) = admit(
        &operator_template(Mode::EmptyDir),
        &app,
        &RenderConfig::default(),
    );
    assert!(
        !warnings.iter().any(|w| w.contains("securityContext")),
        "{warnings:?}"
    );
    assert_eq!(out["spec"]["containers"][0]["securityContext"], restricted);
    assert_eq!(
        named(&out["spec"]["initContainers"], "install-packages").expect("init")["securityContext"],
        json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": true,
               "runAsUser": 2000, "readOnlyRootFilesystem": true, "seccompProfile": {"type": "RuntimeDefault"}})
    );
    // Stable under the 10 s patch, and gone with the takeover.
    let (again, _) = admit(
        &ten_second_patch(&out, Mode::EmptyDir),
        &app,
        &RenderConfig::default(),
    );
    assert_eq!(again, out);
    app["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("pythonPackages");
    let (removed, _) = admit(&out, &app, &RenderConfig::default());
    assert!(
        removed["spec"]["containers"][0]
            .get("securityContext")
            .is_none()
    );
}

#[test]
fn the_main_container_keeps_its_own_security_context_outside_takeover() {
    let mut app = kasprapp(Mode::EmptyDir, None);
    app["spec"]["template"] = json!({"kasprContainer": {"securityContext": {"runAsUser": 1000}}});
    let (out, _) = admit(&pre_v014_template(), &app, &takeover());
    assert!(
        out["spec"]["containers"][0]
            .get("securityContext")
            .is_none()
    );
}

#[test]
fn a_pod_of_an_operator_template_is_taken_over_too() {
    let mut pod = operator_template(Mode::Gcs);
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["namespace"] = json!("apps");
    let app = kasprapp(Mode::Gcs, Some("takeover"));
    let outcome =
        mutate_object(ObjectKind::Pod, &pod, &app, &RenderConfig::default()).expect("allowed");
    let mut out = pod.clone();
    json_patch::patch(&mut out, &outcome.patch).expect("applies");
    assert_eq!(
        named(&out["spec"]["initContainers"], "install-packages").expect("init")["command"][0],
        "python3"
    );
    assert!(named(&out["spec"]["volumes"], "gcs-sa-key").is_none());
}

#[test]
fn the_operator_is_in_charge_only_of_templates_it_serves_under_respect() {
    use crate::mutation::takeover::operator_in_charge;
    let spec = |annotation: Option<&str>| {
        crate::validation::validate_kasprapp(&kasprapp(Mode::Pvc, annotation))
            .spec
            .expect("spec")
    };
    let config = RenderConfig::default();
    let theirs = operator_template(Mode::Pvc);
    assert!(operator_in_charge(&theirs, &spec(None), &config));
    assert!(!operator_in_charge(
        &theirs,
        &spec(Some("takeover")),
        &config
    ));
    assert!(!operator_in_charge(&theirs, &spec(None), &takeover()));
    // Ours (a takeover, or one being handed back) and an older operator's: not in charge.
    let (taken, _) = admit(&theirs, &kasprapp(Mode::Pvc, Some("takeover")), &config);
    assert!(!operator_in_charge(&taken, &spec(None), &config));
    assert!(!operator_in_charge(
        &pre_v014_template(),
        &spec(None),
        &config
    ));
}

#[test]
fn a_new_hash_from_the_ten_second_patch_reaches_both_watch_fields_at_once() {
    // After a package edit the operator's 10 s patch brings its new PACKAGES_HASH on the main
    // container before its 30 s loop compares: the install container follows in the same
    // revision, so the comparison finds nothing to replace.
    let mode = Mode::Pvc;
    let app = kasprapp(mode, Some("takeover"));
    let (stored, _) = admit(&operator_template(mode), &app, &RenderConfig::default());
    let mut patched = ten_second_patch(&stored, mode);
    for entry in patched["spec"]["containers"][0]["env"]
        .as_array_mut()
        .expect("env")
    {
        if entry["name"] == "PACKAGES_HASH" {
            entry["value"] = json!("0000000000000002");
        }
    }
    assert_eq!(
        watch_fields(&patched).1,
        Some(json!(HASH)),
        "ours still has the old one"
    );
    let (out, _) = admit(&patched, &app, &RenderConfig::default());
    let new_hash = Some(json!("0000000000000002"));
    assert_eq!(watch_fields(&out), (new_hash.clone(), new_hash));
}
