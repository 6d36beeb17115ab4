//! Cache modes, credentials, init-container extras and resources, and how each moves the hashes.

use pretty_assertions::assert_eq;
use serde_json::{Value, json};

use super::*;

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
