//! Image mode (see docs/image-mode.md): a built set published as an OCI image and mounted by the
//! kubelet as a read-only `image` volume.
//!
//! The pure parts: the KasprApp's choice ([`MODE_ANNOTATION`]), what a build reports it
//! published ([`image_from_log`]), what the lock ConfigMap records per set ([`PublishedImage`],
//! kept in `LockState::images`), and the in-memory annotation that carries the current set's
//! image from the cache to the renderer ([`RENDER_IMAGE_ANNOTATION`]).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// On a KasprApp: `image` (mount the built set as an image volume) or `cache` (the configured
/// cache mode, the default).
pub const MODE_ANNOTATION: &str = "packages.kaspr.io/mode";
/// In-memory only, on an effective app: the current set's published image (JSON).
pub const RENDER_IMAGE_ANNOTATION: &str = "packages.kaspr.io/render-image";
/// The line a build prints after publishing (the installer's `IMAGE_MARKER`).
const IMAGE_LINE: &str = "kaspr-packages: IMAGE ";

/// The KasprApp's packages mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackagesMode {
    Image,
    Cache,
}

/// Reads [`MODE_ANNOTATION`]: absent is `None`; a value other than `image` or `cache` is an
/// error naming the annotation and the value.
pub fn requested_mode(kasprapp: &Value) -> Result<Option<PackagesMode>, String> {
    let Some(value) = kasprapp
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(MODE_ANNOTATION))
    else {
        return Ok(None);
    };
    match value.as_str() {
        Some("image") => Ok(Some(PackagesMode::Image)),
        Some("cache") => Ok(Some(PackagesMode::Cache)),
        _ => Err(format!(
            "metadata.annotations[{MODE_ANNOTATION}]: {value} is not \"image\" or \"cache\""
        )),
    }
}

/// A set's image as its build published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedImage {
    /// `<repository>@sha256:<digest>`: what pods mount, pinned by digest.
    pub reference: String,
    /// The tag it was pushed under (`<set id>-<python tag>`), for people and retention.
    pub tag: String,
    /// The Python ABI and platform the set was built for (the installer's build tag).
    pub python_tag: String,
    /// The app image the set was resolved and built against.
    pub built_for: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageLineError {
    #[error("the build's IMAGE line is not valid JSON: {0}")]
    Unreadable(String),
    #[error("the build's IMAGE line has no valid {field}: {value:?}")]
    Field { field: &'static str, value: String },
}

/// The image a build's log says it published (its last `IMAGE` line), if any. `built_for` is
/// the main image the build ran with.
pub fn image_from_log(
    log: &str,
    built_for: &str,
) -> Result<Option<PublishedImage>, ImageLineError> {
    let Some(line) = log
        .lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix(IMAGE_LINE))
    else {
        return Ok(None);
    };
    let value: Value =
        serde_json::from_str(line).map_err(|e| ImageLineError::Unreadable(e.to_string()))?;
    let text = |field: &'static str| -> Result<String, ImageLineError> {
        value
            .get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
            .map(str::to_owned)
            .ok_or_else(|| ImageLineError::Field {
                field,
                value: value.get(field).map(Value::to_string).unwrap_or_default(),
            })
    };
    let repository = text("repository")?;
    let digest = text("digest")?;
    let hex = digest.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ImageLineError::Field {
            field: "digest",
            value: digest,
        });
    }
    Ok(Some(PublishedImage {
        reference: format!("{repository}@{digest}"),
        tag: text("tag")?,
        python_tag: text("pythonTag")?,
        built_for: built_for.to_owned(),
    }))
}

/// What a pod template's set says about image mode (see `PackageSet::image`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRequest {
    /// The set's published image; `None` while it has none (not yet built or published, or
    /// built before image mode was chosen).
    pub published: Option<PublishedImage>,
}

/// Puts the current set's published image on an effective app (in memory).
pub fn annotate(effective: &mut Value, image: Option<&PublishedImage>) {
    let Some(image) = image else {
        return;
    };
    if let Some(annotations) = effective
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        annotations.insert(
            RENDER_IMAGE_ANNOTATION.into(),
            json!(serde_json::to_string(image).unwrap_or_default()),
        );
    }
}

/// The image request of an effective app: `None` unless the app asks for image mode.
pub fn request_of(effective: &Value) -> Option<ImageRequest> {
    if requested_mode(effective) != Ok(Some(PackagesMode::Image)) {
        return None;
    }
    let published = effective
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(RENDER_IMAGE_ANNOTATION))
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok());
    Some(ImageRequest { published })
}

/// The warning for an app that asks for image mode while builds are off (no set is rendered):
/// images are published by build Jobs only.
pub fn without_builds_warning(
    kasprapp: &Value,
    set: Option<&crate::builds::render::PackageSet>,
    has_packages: bool,
) -> Option<String> {
    (has_packages && set.is_none() && requested_mode(kasprapp) == Ok(Some(PackagesMode::Image)))
        .then(|| {
            format!(
                "the app asks for image mode ({MODE_ANNOTATION}: image) but package builds are off \
                 (--builds, chart value builds.enabled): its packages are installed by the init \
                 container in the configured cache mode"
            )
        })
}

/// The build Job's volume with the push credentials (never in an app's pod).
pub const PUSH_VOLUME: &str = "kaspr-packages-push";
/// Where the build container reads them: the Secret's `.dockerconfigjson` as `config.json`.
pub const PUSH_DIR: &str = "/var/run/secrets/kaspr-packages/push";

/// Makes a build Job (from `job::build_job`) publish its set: the installer's `build.image`
/// (repository, credentials file) and, with a push Secret, its volume and read-only mount.
pub fn add_publish(job: &mut Value, config: &crate::config::ImageModeConfig) {
    let Some(repository) = &config.repository else {
        return;
    };
    let Some(pod) = job
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let mut target = json!({"repository": repository});
    if config.plain_http {
        target["plainHttp"] = json!(true);
    }
    if let Some(secret) = &config.push_secret {
        target["dockerConfig"] = json!(format!("{PUSH_DIR}/config.json"));
        let volume = json!({"name": PUSH_VOLUME, "secret": {
            "secretName": secret,
            "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
        }});
        match pod.get_mut("volumes").and_then(Value::as_array_mut) {
            Some(volumes) => volumes.push(volume),
            None => {
                pod.insert("volumes".into(), json!([volume]));
            }
        }
    }
    let Some(container) = pod
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .and_then(|c| c.first_mut())
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    if config.push_secret.is_some() {
        let mount = json!({"name": PUSH_VOLUME, "mountPath": PUSH_DIR, "readOnly": true});
        match container
            .get_mut("volumeMounts")
            .and_then(Value::as_array_mut)
        {
            Some(mounts) => mounts.push(mount),
            None => {
                container.insert("volumeMounts".into(), json!([mount]));
            }
        }
    }
    for var in container
        .get_mut("env")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if var.get("name").and_then(Value::as_str) != Some(crate::names::CONFIG_ENV) {
            continue;
        }
        let Some(Ok(mut installer)) = var
            .get("value")
            .and_then(Value::as_str)
            .map(serde_json::from_str::<Value>)
        else {
            continue;
        };
        if let Some(build) = installer.get_mut("build").and_then(Value::as_object_mut) {
            build.insert("image".into(), target.clone());
        }
        var["value"] = Value::String(installer.to_string());
    }
}

/// Whether the build of `app` publishes an image: the app asks for image mode and the
/// deployment has a repository and can mount images.
pub fn publishes(app: &Value, config: &crate::config::ImageModeConfig) -> bool {
    config.repository.is_some()
        && config.unsupported.is_none()
        && requested_mode(app) == Ok(Some(PackagesMode::Image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[rstest]
    #[case::absent(json!({}), Ok(None))]
    #[case::image(json!({MODE_ANNOTATION: "image"}), Ok(Some(PackagesMode::Image)))]
    #[case::cache(json!({MODE_ANNOTATION: "cache"}), Ok(Some(PackagesMode::Cache)))]
    #[case::typo(json!({MODE_ANNOTATION: "imgae"}), Err("metadata.annotations[packages.kaspr.io/mode]: \"imgae\" is not \"image\" or \"cache\"".to_owned()))]
    fn the_mode_annotation_is_image_or_cache(
        #[case] annotations: Value,
        #[case] expected: Result<Option<PackagesMode>, String>,
    ) {
        let app = json!({"metadata": {"annotations": annotations}});
        assert_eq!(requested_mode(&app), expected);
    }

    #[test]
    fn the_last_image_line_of_a_build_log_is_read_and_checked() {
        let log = format!(
            "kaspr-packages: pip install took 1s\n{IMAGE_LINE}{{\"repository\": \"r.example:5000/kaspr/packages\", \"tag\": \"aa-cpython-311\", \"digest\": \"{DIGEST}\", \"pythonTag\": \"cpython-311-linux-x86_64-glibc2.36-d3eeee62\", \"layers\": []}}\nkaspr-packages: OK\n"
        );
        let image = image_from_log(&log, "app:1")
            .expect("valid")
            .expect("found");
        assert_eq!(
            image.reference,
            format!("r.example:5000/kaspr/packages@{DIGEST}")
        );
        assert_eq!(
            image.python_tag,
            "cpython-311-linux-x86_64-glibc2.36-d3eeee62"
        );
        assert_eq!(image.built_for, "app:1");
        assert_eq!(image_from_log("no image here\n", "app:1"), Ok(None));
        let short = format!(
            "{IMAGE_LINE}{{\"repository\": \"r/p\", \"tag\": \"t\", \"digest\": \"sha256:abc\", \"pythonTag\": \"p\"}}"
        );
        assert_eq!(
            image_from_log(&short, "app:1"),
            Err(ImageLineError::Field {
                field: "digest",
                value: "sha256:abc".into()
            })
        );
        assert!(matches!(
            image_from_log(&format!("{IMAGE_LINE}{{not json"), "app:1"),
            Err(ImageLineError::Unreadable(_))
        ));
    }

    #[test]
    fn a_publishing_build_gets_the_repository_and_the_push_secret_only() {
        let mut job = json!({"spec": {"template": {"spec": {"containers": [{"name": "build",
            "command": ["python3", "-c", crate::installer::bootstrap()],
            "env": [{"name": crate::names::CONFIG_ENV, "value": "{\"build\":{\"set\":\"aa\"}}"}]}]}}}});
        let config = crate::config::ImageModeConfig {
            repository: Some("r.example/kaspr/packages".into()),
            push_secret: Some("push".into()),
            pull_secret: Some("pull".into()),
            unsupported: None,
            plain_http: false,
        };
        add_publish(&mut job, &config);
        let pod = &job["spec"]["template"]["spec"];
        let installer: Value = serde_json::from_str(
            pod["containers"][0]["env"][0]["value"]
                .as_str()
                .expect("config"),
        )
        .expect("json");
        assert_eq!(
            installer["build"],
            json!({"set": "aa", "image": {"repository": "r.example/kaspr/packages",
                   "dockerConfig": "/var/run/secrets/kaspr-packages/push/config.json"}})
        );
        assert_eq!(pod["volumes"][0]["secret"]["secretName"], "push");
        assert_eq!(
            pod["containers"][0]["volumeMounts"][0],
            json!({"name": PUSH_VOLUME, "mountPath": PUSH_DIR, "readOnly": true})
        );
        assert!(
            !job.to_string().contains("\"pull\""),
            "the pull secret is the pods' business"
        );
        let app = |mode: &str| json!({"metadata": {"annotations": {MODE_ANNOTATION: mode}}});
        assert!(publishes(&app("image"), &config));
        assert!(!publishes(&app("cache"), &config));
        let unsupported = crate::config::ImageModeConfig {
            unsupported: Some("old".into()),
            ..config.clone()
        };
        assert!(!publishes(&app("image"), &unsupported));
    }

    #[test]
    fn an_effective_app_carries_the_image_only_when_the_app_asks_for_image_mode() {
        let image = PublishedImage {
            reference: format!("r/p@{DIGEST}"),
            tag: "t".into(),
            python_tag: "cpython-311".into(),
            built_for: "app:1".into(),
        };
        let mut asks = json!({"metadata": {"annotations": {MODE_ANNOTATION: "image"}}});
        assert_eq!(request_of(&asks), Some(ImageRequest { published: None }));
        annotate(&mut asks, Some(&image));
        assert_eq!(
            request_of(&asks),
            Some(ImageRequest {
                published: Some(image.clone())
            })
        );
        let mut plain = json!({"metadata": {"annotations": {}}});
        annotate(&mut plain, Some(&image));
        assert_eq!(request_of(&plain), None);
    }
}
