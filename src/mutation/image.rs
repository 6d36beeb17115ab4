//! Image mode (docs/image-mode.md): the package set mounted from its OCI image by the kubelet.
//! No init container, no emptyDir, no cache claim, no index credentials: an `image` volume
//! pinned by digest, mounted read-only at the site path, which PYTHONPATH already names.

use serde_json::{Map, Value, json};

use crate::builds::image::PublishedImage;
use crate::builds::render::PackageSet;
use crate::config::ImageModeConfig;
use crate::names;

/// Whether a pod template mounts its set's image, or keeps the configured cache mode and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The app did not ask for image mode.
    NotAsked,
    /// Mount this image.
    Mount(PublishedImage),
    /// Asked for, but not possible here: the cache mode is rendered, with this warning.
    Fallback(String),
}

/// Decides for the set a template renders. `main_image` is the template's main container image:
/// a set is mounted only into the image it was built for (its Python ABI and platform).
pub fn decide(
    set: Option<&PackageSet>,
    main_image: &str,
    config: &ImageModeConfig,
    taken_over: bool,
    field_prefix: &str,
) -> Decision {
    let Some(request) = set.and_then(|s| s.image.as_ref()) else {
        return Decision::NotAsked;
    };
    let set_id = set.map(|s| s.id.as_str()).unwrap_or_default();
    let keep = |why: String| {
        Decision::Fallback(format!(
            "{field_prefix}: the app asks for image mode ({}: image) but its packages are \
             installed by the init container in the configured cache mode: {why}",
            names::MODE_ANNOTATION
        ))
    };
    if config.repository.is_none() {
        return keep(
            "the webhook has no image repository (--image-repository, chart value \
             imageMode.repository)"
                .to_owned(),
        );
    }
    if let Some(reason) = &config.unsupported {
        return keep(reason.clone());
    }
    if taken_over {
        return keep(
            "the Kaspr operator's injection is taken over, which needs its init container"
                .to_owned(),
        );
    }
    let Some(image) = &request.published else {
        return keep(format!(
            "package set {set_id} has no published image yet (it is built or published first; \
             pods roll onto the image once it is)"
        ));
    };
    if image.built_for != main_image {
        return keep(format!(
            "package set {set_id} was built for image {:?} ({}), the pod runs {main_image:?}; \
             a set is never mounted into another image",
            image.built_for, image.python_tag
        ));
    }
    Decision::Mount(image.clone())
}

/// The image volume, pinned by digest.
pub fn volume(image: &PublishedImage) -> Value {
    json!({
        "name": names::IMAGE_VOLUME,
        "image": {"reference": image.reference, "pullPolicy": "IfNotPresent"},
    })
}

/// The main container's read-only mount of the image at the site path.
pub fn mount() -> Value {
    json!({"name": names::IMAGE_VOLUME, "mountPath": names::SITE_PATH, "readOnly": true})
}

/// Adds the chart's pull secret to the pod's `imagePullSecrets` unless it is there; returns
/// whether it was added (and must be recorded, so removal takes only ours).
pub fn add_pull_secret(pod_spec: &mut Map<String, Value>, secret: Option<&str>) -> Option<String> {
    let secret = secret?;
    let list = pod_spec
        .entry("imagePullSecrets")
        .or_insert_with(|| Value::Array(Vec::new()));
    let list = list.as_array_mut()?;
    if list
        .iter()
        .any(|s| s.get("name").and_then(Value::as_str) == Some(secret))
    {
        return None;
    }
    list.push(json!({"name": secret}));
    Some(secret.to_owned())
}

/// The template hash of an image-mode injection: what the pods get.
pub fn template_hash(image: &PublishedImage, pull_secret: Option<&str>) -> String {
    let rendered = json!([volume(image), mount(), names::SITE_PATH, pull_secret]);
    crate::spec::short_sha256(rendered.to_string().as_bytes())
}

/// The main container an image-mode injection goes into.
pub struct MainContainer {
    pub index: usize,
    pub name: String,
    /// Whether the injection set its securityContext (under takeover).
    pub security_context_set: bool,
    /// Its field path, for messages.
    pub path: String,
}

/// Injects the image volume, its mount, PYTHONPATH and the pull secret into a template whose
/// earlier injection was stripped, and writes the annotations. Returns warnings.
pub fn apply_mount(
    template: &mut Map<String, Value>,
    image: &PublishedImage,
    spec: &crate::spec::PythonPackages,
    set: Option<&PackageSet>,
    config: &crate::config::RenderConfig,
    main: MainContainer,
) -> Vec<String> {
    let Some(pod_spec) = template.get_mut("spec").and_then(Value::as_object_mut) else {
        return Vec::new();
    };
    let pull_secret = config.image_mode.pull_secret.as_deref();
    let injection = super::Injection {
        init_container: Value::Null,
        volumes: vec![volume(image)],
        main_mounts: vec![mount()],
        install_key: spec.install_key(),
        template_hash: template_hash(image, pull_secret),
        set: set.map(|s| s.id.clone()),
        // Nothing of a revision's own reaches an image-mode pod: the image is the set.
        config_hash: template_hash(image, pull_secret),
        revision: config.revision().into_owned(),
    };
    for volume in &injection.volumes {
        super::push(pod_spec, "volumes", volume.clone());
    }
    let added_secret = add_pull_secret(pod_spec, pull_secret);
    let (mount_names, pythonpath_warning) =
        super::inject_main_container(pod_spec, main.index, &injection, &main.path);
    let record = super::Record {
        init_containers: Vec::new(),
        volumes: vec![names::IMAGE_VOLUME.to_owned()],
        container: main.name,
        volume_mounts: mount_names,
        env: vec![names::PYTHONPATH.to_owned()],
        security_context: main.security_context_set,
        image_pull_secrets: added_secret.into_iter().collect(),
    };
    super::write_annotations(template, &injection, &record);
    pythonpath_warning.into_iter().collect()
}

#[cfg(test)]
mod tests;
