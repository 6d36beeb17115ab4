//! Image mode: a pod whose package set's image cannot be pulled (docs/image-mode.md). The
//! kubelet pulls image volumes before it starts the containers that mount them and reports a
//! failure on those containers (`ErrImagePull`, then `ImagePullBackOff`, with the registry's
//! message). One Warning Event per app and set names the set and its image.

use k8s_openapi::api::core::v1::Pod;

use crate::names;

/// The Event's reason.
pub const IMAGE_PULL_REASON: &str = "PackageSetImagePullFailed";

/// A pod whose set image the kubelet cannot pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePullFailure {
    pub namespace: String,
    pub app: String,
    pub pod: String,
    /// The set id from the pod's `packages.kaspr.io/set` annotation.
    pub set: String,
    pub reference: String,
    /// `<container>: <reason>: <message>`.
    pub detail: String,
}

/// The failure a pod's status shows, if it mounts a set image and a container that mounts it
/// waits on an image pull.
pub fn image_pull_failure(pod: &Pod) -> Option<ImagePullFailure> {
    let spec = pod.spec.as_ref()?;
    let reference = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == names::IMAGE_VOLUME)?
        .image
        .as_ref()?
        .reference
        .clone()?;
    let mounting: Vec<&str> = spec
        .containers
        .iter()
        .filter(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == names::IMAGE_VOLUME)
        })
        .map(|c| c.name.as_str())
        .collect();
    let detail = pod
        .status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .filter(|s| mounting.contains(&s.name.as_str()))
        .find_map(|s| {
            let waiting = s.state.as_ref()?.waiting.as_ref()?;
            let reason = waiting.reason.as_deref()?;
            matches!(reason, "ErrImagePull" | "ImagePullBackOff").then(|| {
                format!(
                    "{}: {reason}: {}",
                    s.name,
                    waiting.message.as_deref().unwrap_or("").trim()
                )
            })
        })?;
    let meta = &pod.metadata;
    let labels = meta.labels.as_ref();
    Some(ImagePullFailure {
        namespace: meta.namespace.clone().unwrap_or_default(),
        app: labels?.get(names::APP_LABEL)?.clone(),
        pod: meta.name.clone().unwrap_or_default(),
        set: meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(names::SET_ANNOTATION))
            .cloned()
            .unwrap_or_default(),
        reference,
        detail,
    })
}

/// The Event's note.
pub fn note(failure: &ImagePullFailure) -> String {
    format!(
        "pod {} cannot pull the image of package set {} ({}): {}",
        failure.pod, failure.set, failure.reference, failure.detail
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(waiting_on: &str, reason: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "demo-app-0", "namespace": "apps",
                         "labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "demo"},
                         "annotations": {"packages.kaspr.io/set": "00000000000000aa"}},
            "spec": {
                "volumes": [{"name": names::IMAGE_VOLUME, "image": {"reference": "r.example/p@sha256:00"}}],
                "containers": [
                    {"name": "kaspr", "volumeMounts": [{"name": names::IMAGE_VOLUME, "mountPath": names::SITE_PATH}]},
                    {"name": "sidecar"}]},
            "status": {"containerStatuses": [
                {"name": waiting_on, "ready": false, "restartCount": 0, "image": "", "imageID": "",
                 "state": {"waiting": {"reason": reason, "message": "failed to pull: not found "}}}]}
        }))
        .expect("pod")
    }

    #[test]
    fn a_container_that_mounts_the_set_image_and_waits_on_a_pull_is_reported() {
        let failure = image_pull_failure(&pod("kaspr", "ImagePullBackOff")).expect("failure");
        assert_eq!(failure.app, "demo");
        assert_eq!(failure.set, "00000000000000aa");
        assert_eq!(
            note(&failure),
            "pod demo-app-0 cannot pull the image of package set 00000000000000aa \
             (r.example/p@sha256:00): kaspr: ImagePullBackOff: failed to pull: not found"
        );
        assert!(image_pull_failure(&pod("kaspr", "ErrImagePull")).is_some());
    }

    #[test]
    fn other_waits_and_other_containers_are_not_the_set_images() {
        assert_eq!(image_pull_failure(&pod("kaspr", "ContainerCreating")), None);
        assert_eq!(
            image_pull_failure(&pod("sidecar", "ImagePullBackOff")),
            None
        );
    }
}
