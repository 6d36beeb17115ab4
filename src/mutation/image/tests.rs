//! Image mode through the admission path: KasprApp + lock state → effective app → render.

use pretty_assertions::assert_eq;
use serde_json::{Value, json};

use crate::admission::mutate_object;
use crate::builds::image::{MODE_ANNOTATION, PublishedImage};
use crate::builds::render::effective_app;
use crate::builds::state::{LockState, SetEntry, SetPhase};
use crate::config::{ImageModeConfig, RenderConfig};
use crate::mutation::ObjectKind;
use crate::names;

const SET: &str = "00000000000000aa";
const APP_IMAGE: &str = "kasprio/kaspr:0.5.0";
const REFERENCE: &str = "registry.example/kaspr/packages@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn kasprapp(mode: Option<&str>) -> Value {
    let mut app = json!({
        "apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
        "metadata": {"name": "my-app", "namespace": "apps", "uid": "0b6c", "annotations": {}},
        "spec": {"pythonPackages": {"packages": ["kasprdemo==2.0"],
                 "indexUrl": "https://pypi.example/simple/",
                 "credentials": {"secretRef": {"name": "pypi", "usernameKey": "u", "passwordKey": "p"}},
                 "cache": {"enabled": true, "type": "pvc"}}}
    });
    if let Some(mode) = mode {
        app["metadata"]["annotations"][MODE_ANNOTATION] = json!(mode);
    }
    app
}

fn statefulset(image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "my-app-app", "namespace": "apps",
                     "labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "my-app"}},
        "spec": {"template": {
            "metadata": {"labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "my-app"}},
            "spec": {
                "imagePullSecrets": [{"name": "app-own"}],
                "containers": [{"name": "kaspr", "image": image,
                                "env": [{"name": "KASPR_APP_NAME", "value": "my-app"}]}]}}}
    })
}

fn state(published: Option<&str>) -> LockState {
    let entry = SetEntry {
        id: SET.into(),
        state: SetPhase::Building,
        install_key: "k".into(),
        image: APP_IMAGE.into(),
        refresh: String::new(),
        job: "j".into(),
        python_packages: kasprapp(None)["spec"]["pythonPackages"].clone(),
        sequence: 0,
        lock_sha256: None,
        category: None,
        message: None,
    };
    let built = LockState::default()
        .with_building(entry)
        .with_built(SET, "sha");
    match published {
        Some(built_for) => built.with_image(
            SET,
            PublishedImage {
                reference: REFERENCE.into(),
                tag: format!("{SET}-cpython-311"),
                python_tag: "cpython-311-linux-x86_64-glibc2.36-d3eeee62".into(),
                built_for: built_for.into(),
            },
        ),
        None => built,
    }
}

fn config() -> RenderConfig {
    RenderConfig {
        image_mode: ImageModeConfig {
            repository: Some("registry.example/kaspr/packages".into()),
            push_secret: Some("registry-push".into()),
            pull_secret: Some("registry-pull".into()),
            unsupported: None,
            plain_http: false,
        },
        ..RenderConfig::default()
    }
}

/// The mutated StatefulSet and the warnings.
fn render(sts: &Value, app: &Value, config: &RenderConfig) -> (Value, Vec<String>) {
    let outcome = mutate_object(ObjectKind::StatefulSet, sts, app, config).expect("allowed");
    let mut patched = sts.clone();
    json_patch::patch(&mut patched, &outcome.patch).expect("patch applies");
    (patched, outcome.warnings)
}

fn pod_spec(sts: &Value) -> &Value {
    &sts["spec"]["template"]["spec"]
}

#[test]
fn a_built_set_with_its_image_is_mounted_read_only_by_digest_without_an_init_container() {
    let effective = effective_app(&kasprapp(Some("image")), Some(&state(Some(APP_IMAGE))));
    let (sts, warnings) = render(&statefulset(APP_IMAGE), &effective, &config());
    assert!(warnings.is_empty(), "{warnings:?}");
    let spec = pod_spec(&sts);
    assert_eq!(spec.get("initContainers"), None, "no init container");
    assert_eq!(
        spec["volumes"],
        json!([{"name": names::IMAGE_VOLUME, "image": {"reference": REFERENCE, "pullPolicy": "IfNotPresent"}}])
    );
    // The shape Kubernetes' own types read (field names and nesting of `volumes[].image`).
    let typed: k8s_openapi::api::core::v1::Volume =
        serde_json::from_value(spec["volumes"][0].clone()).expect("a Volume");
    let source = typed.image.expect("an image volume source");
    assert_eq!(source.reference.as_deref(), Some(REFERENCE));
    assert_eq!(source.pull_policy.as_deref(), Some("IfNotPresent"));
    let main = &spec["containers"][0];
    assert_eq!(
        main["volumeMounts"],
        json!([{"name": names::IMAGE_VOLUME, "mountPath": names::SITE_PATH, "readOnly": true}])
    );
    assert_eq!(
        main["env"],
        json!([{"name": "KASPR_APP_NAME", "value": "my-app"}, {"name": "PYTHONPATH", "value": names::SITE_PATH}])
    );
    assert_eq!(
        spec["imagePullSecrets"],
        json!([{"name": "app-own"}, {"name": "registry-pull"}])
    );
    // Nothing of the cache modes or the index reaches the pod.
    let text = sts.to_string();
    for absent in [
        "emptyDir",
        "persistentVolumeClaim",
        "pypi.example",
        "secretKeyRef",
        names::CONFIG_ENV,
        "registry-push",
    ] {
        assert!(!text.contains(absent), "{absent} in {text}");
    }
    let annotations = &sts["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations[names::SET_ANNOTATION], SET);
    // Idempotent: an operator rewrite or a reinvocation renders the same bytes.
    assert_eq!(render(&sts, &effective, &config()).0, sts);
}

#[test]
fn leaving_image_mode_restores_the_cache_mode_and_removes_only_our_pull_secret() {
    let image = effective_app(&kasprapp(Some("image")), Some(&state(Some(APP_IMAGE))));
    let (mounted, _) = render(&statefulset(APP_IMAGE), &image, &config());
    let cache = effective_app(&kasprapp(Some("cache")), Some(&state(Some(APP_IMAGE))));
    let (back, warnings) = render(&mounted, &cache, &config());
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(back, render(&statefulset(APP_IMAGE), &cache, &config()).0);
    assert_eq!(
        pod_spec(&back)["imagePullSecrets"],
        json!([{"name": "app-own"}])
    );
    assert!(!back.to_string().contains(names::IMAGE_VOLUME));
    assert!(pod_spec(&back)["initContainers"][0]["name"] == names::INIT_CONTAINER);
}

#[test]
fn a_pods_own_pull_secret_of_the_same_name_is_kept_when_image_mode_ends() {
    let mut sts = statefulset(APP_IMAGE);
    sts["spec"]["template"]["spec"]["imagePullSecrets"] = json!([{"name": "registry-pull"}]);
    let image = effective_app(&kasprapp(Some("image")), Some(&state(Some(APP_IMAGE))));
    let (mounted, _) = render(&sts, &image, &config());
    assert_eq!(
        pod_spec(&mounted)["imagePullSecrets"],
        json!([{"name": "registry-pull"}])
    );
    let (back, _) = render(&mounted, &kasprapp(None), &config());
    assert_eq!(
        pod_spec(&back)["imagePullSecrets"],
        json!([{"name": "registry-pull"}])
    );
}

fn assert_kept_cache_mode(sts: &Value, warnings: &[String], because: &str) {
    let spec = pod_spec(sts);
    assert_eq!(spec["initContainers"][0]["name"], names::INIT_CONTAINER);
    assert!(!sts.to_string().contains(names::IMAGE_VOLUME), "{sts}");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("asks for image mode") && warnings[0].contains(because),
        "{warnings:?}"
    );
}

#[test]
fn a_set_built_for_another_image_is_never_mounted() {
    let effective = effective_app(
        &kasprapp(Some("image")),
        Some(&state(Some("kasprio/kaspr:0.4.0"))),
    );
    let (sts, warnings) = render(&statefulset(APP_IMAGE), &effective, &config());
    assert_kept_cache_mode(&sts, &warnings, "never mounted into another image");
    assert!(warnings[0].contains("cpython-311"), "{warnings:?}");
}

#[test]
fn an_api_server_older_than_1_36_keeps_the_cache_mode_with_a_warning() {
    let mut old = config();
    old.image_mode.unsupported = crate::config::image_volumes_unsupported_by("1", "35");
    let effective = effective_app(&kasprapp(Some("image")), Some(&state(Some(APP_IMAGE))));
    let (sts, warnings) = render(&statefulset(APP_IMAGE), &effective, &old);
    assert_kept_cache_mode(&sts, &warnings, "the API server is 1.35");
}

#[test]
fn without_a_repository_or_a_published_image_the_cache_mode_stays() {
    let effective = effective_app(&kasprapp(Some("image")), Some(&state(Some(APP_IMAGE))));
    let (sts, warnings) = render(
        &statefulset(APP_IMAGE),
        &effective,
        &RenderConfig::default(),
    );
    assert_kept_cache_mode(&sts, &warnings, "--image-repository");
    let unpublished = effective_app(&kasprapp(Some("image")), Some(&state(None)));
    let (sts, warnings) = render(&statefulset(APP_IMAGE), &unpublished, &config());
    assert_kept_cache_mode(&sts, &warnings, "has no published image yet");
    let awaiting = effective_app(&kasprapp(Some("image")), None);
    let (sts, warnings) = render(&statefulset(APP_IMAGE), &awaiting, &config());
    assert_kept_cache_mode(&sts, &warnings, "has no published image yet");
}

#[test]
fn apps_that_do_not_ask_render_as_before() {
    let effective = effective_app(&kasprapp(None), Some(&state(Some(APP_IMAGE))));
    let (with_image_config, warnings) = render(&statefulset(APP_IMAGE), &effective, &config());
    assert!(warnings.is_empty(), "{warnings:?}");
    let (without, _) = render(
        &statefulset(APP_IMAGE),
        &effective,
        &RenderConfig::default(),
    );
    assert_eq!(with_image_config, without);
}

#[test]
fn image_mode_with_builds_off_warns_and_installs_at_start() {
    // Builds off: the KasprApp as it is, without a lock state.
    let (sts, warnings) = render(&statefulset(APP_IMAGE), &kasprapp(Some("image")), &config());
    assert_eq!(
        pod_spec(&sts)["initContainers"][0]["name"],
        names::INIT_CONTAINER
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("package builds are off"),
        "{warnings:?}"
    );
    let (_, quiet) = render(&statefulset(APP_IMAGE), &kasprapp(None), &config());
    assert!(quiet.is_empty(), "{quiet:?}");
}
