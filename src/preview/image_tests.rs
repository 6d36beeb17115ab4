//! `preview --lock`: the webhook's rendering with builds on, including image mode.

use serde_json::{Value, json};

use super::{Output, preview_with_lock};
use crate::config::{ImageModeConfig, RenderConfig};
use crate::names;

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn kasprapp() -> Value {
    json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
           "metadata": {"name": "demo", "namespace": "apps",
                        "annotations": {names::MODE_ANNOTATION: "image"}},
           "spec": {"image": "kasprio/kaspr:0.5.0",
                    "pythonPackages": {"packages": ["kasprdemo==2.0"]}}})
}

fn lock(built_for: &str) -> Value {
    let state = json!({"current": "00000000000000aa", "sets": [{
        "id": "00000000000000aa", "state": "Built", "installKey": "k", "image": built_for,
        "job": "j", "pythonPackages": {"packages": ["kasprdemo==2.0"]}, "sequence": 1,
        "lockSha256": "s"}],
        "images": {"00000000000000aa": {
            "reference": format!("registry.example/kaspr/packages@{DIGEST}"),
            "tag": "00000000000000aa-cpython-311", "pythonTag": "cpython-311", "builtFor": built_for}}});
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "demo-python-packages-lock", "namespace": "apps"},
           "data": {"state.json": state.to_string(), "00000000000000aa.pylock.toml": "lock-version = \"1.0\"\n"}})
}

fn config() -> RenderConfig {
    RenderConfig {
        image_mode: ImageModeConfig {
            repository: Some("registry.example/kaspr/packages".into()),
            ..ImageModeConfig::default()
        },
        ..RenderConfig::default()
    }
}

fn main_image_of_operator_statefulset() -> String {
    super::operator_statefulset(&kasprapp())["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .expect("image")
        .to_owned()
}

#[test]
fn preview_with_the_lock_renders_the_image_volume_of_the_current_set() {
    let image = main_image_of_operator_statefulset();
    let preview = preview_with_lock(
        &kasprapp(),
        None,
        Output::Json,
        &config(),
        Some(&lock(&image)),
    )
    .expect("preview");
    let sts: Value = serde_json::from_str(&preview.text).expect("json");
    let spec = &sts["spec"]["template"]["spec"];
    assert!(preview.warnings.is_empty(), "{:?}", preview.warnings);
    assert_eq!(spec["volumes"].as_array().map(Vec::len), Some(2), "{spec}");
    assert!(
        spec["volumes"]
            .as_array()
            .expect("volumes")
            .contains(&json!({"name": names::IMAGE_VOLUME,
                "image": {"reference": format!("registry.example/kaspr/packages@{DIGEST}"), "pullPolicy": "IfNotPresent"}})),
        "{spec}"
    );
    assert!(spec.get("initContainers").is_none(), "{spec}");
    // Without the lock, preview renders install-at-start as before.
    let plain =
        preview_with_lock(&kasprapp(), None, Output::Json, &config(), None).expect("preview");
    assert!(!plain.text.contains(names::IMAGE_VOLUME));
    assert!(plain.text.contains(names::INIT_CONTAINER));
    assert!(
        plain
            .warnings
            .iter()
            .any(|w| w.contains("package builds are off")),
        "{:?}",
        plain.warnings
    );
}

#[test]
fn preview_says_why_a_set_of_another_image_is_not_mounted() {
    let preview = preview_with_lock(
        &kasprapp(),
        None,
        Output::Json,
        &config(),
        Some(&lock("kasprio/kaspr:0.1.0")),
    )
    .expect("preview");
    assert!(!preview.text.contains(names::IMAGE_VOLUME));
    assert!(
        preview
            .warnings
            .iter()
            .any(|w| w.contains("never mounted into another image")),
        "{:?}",
        preview.warnings
    );
}

#[test]
fn an_unreadable_lock_names_the_config_map() {
    let mut bad = lock("x");
    bad["data"]["state.json"] = json!("{nope");
    let error = preview_with_lock(&kasprapp(), None, Output::Json, &config(), Some(&bad))
        .expect_err("unreadable");
    assert!(
        error.to_string().contains("demo-python-packages-lock"),
        "{error}"
    );
}
