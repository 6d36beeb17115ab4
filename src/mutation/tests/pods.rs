//! The Pod path, recognising the owning app, and records that were not written by us.

use pretty_assertions::assert_eq;
use serde_json::{Value, json};

use super::*;

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
