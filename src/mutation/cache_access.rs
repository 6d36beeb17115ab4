//! Warnings for a pod that cannot use its cache as configured, as far as its spec tells.
//!
//! PVC mode: the injected init container runs as the main container's user with every
//! capability dropped, so it writes the claim only through the file modes. A non-root pod with
//! no `fsGroup` (and no supplemental group) gets no group ownership from the kubelet: the
//! claim's root must then already belong to that very uid, and pods of any other uid cannot
//! share the cache. Most ReadWriteMany volume types ignore `fsGroup` anyway, but with it the
//! storage side has one group to prepare (docs/caches.md).
//!
//! GCS mode needs nothing from the pod's users: the key is mounted 0444 and the build lives in
//! the pod's own volume.

use serde_json::{Map, Value};

use crate::app::AppRef;
use crate::spec::{Cache, PythonPackages, pvc_name};

/// Who the installer runs as, from the main container's and the pod's securityContext (the
/// init container copies the main container's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunsAs {
    Root,
    /// A known non-root uid.
    User(i64),
    /// `runAsNonRoot: true` without a uid: the image's non-root user.
    NonRoot,
    /// Not set anywhere: the image's user, root for most images.
    Image,
}

fn field<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    object
        .get("securityContext")
        .and_then(Value::as_object)
        .and_then(|context| context.get(key))
        .filter(|value| !value.is_null())
}

fn runs_as(main: &Map<String, Value>, pod_spec: &Map<String, Value>) -> RunsAs {
    let setting = |key| field(main, key).or_else(|| field(pod_spec, key));
    match setting("runAsUser").and_then(Value::as_i64) {
        Some(0) => RunsAs::Root,
        Some(uid) => RunsAs::User(uid),
        None if setting("runAsNonRoot").and_then(Value::as_bool) == Some(true) => RunsAs::NonRoot,
        None => RunsAs::Image,
    }
}

fn has_shared_group(pod_spec: &Map<String, Value>) -> bool {
    field(pod_spec, "fsGroup").is_some_and(Value::is_i64)
        || field(pod_spec, "supplementalGroups")
            .and_then(Value::as_array)
            .is_some_and(|groups| !groups.is_empty())
}

/// The warnings for the pod `pod_spec` (at `prefix`) whose main container is `main`.
pub fn warnings(
    spec: &PythonPackages,
    app: &AppRef,
    main: &Map<String, Value>,
    pod_spec: &Map<String, Value>,
    prefix: &str,
) -> Vec<String> {
    if !matches!(spec.cache, Cache::Pvc(_)) || has_shared_group(pod_spec) {
        return Vec::new();
    }
    let (user, example) = match runs_as(main, pod_spec) {
        RunsAs::Root | RunsAs::Image => return Vec::new(),
        RunsAs::User(uid) => (format!("uid {uid}"), uid.to_string()),
        RunsAs::NonRoot => ("a non-root user".to_owned(), "<its gid>".to_owned()),
    };
    vec![format!(
        "{prefix}.securityContext.fsGroup: PVC cache mode runs the package installer as {user} \
         with no fsGroup, so the kubelet gives the claim {claim} no group: its root must already \
         be writable by that uid, and pods of another uid cannot share the cache. Set \
         {prefix}.securityContext.fsGroup (e.g. {example}) and, where the volume type ignores \
         fsGroup (NFS, EFS, Azure Files, Filestore, hostPath), give the volume root that group \
         with mode 2775 (see the caches guide, docs/caches.md)",
        claim = pvc_name(&app.name),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::json;

    use crate::spec::PvcCache;

    fn spec(cache: Cache) -> PythonPackages {
        let mut spec = PythonPackages::with_packages(&["requests==2.31.0"]);
        spec.cache = cache;
        spec
    }

    fn pvc() -> Cache {
        Cache::Pvc(PvcCache {
            storage_class: None,
            size: "256Mi".to_owned(),
            delete_claim: true,
        })
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    fn warn(cache: Cache, main: Value, pod: Value) -> Vec<String> {
        warnings(
            &spec(cache),
            &AppRef::new("apps", "shop"),
            &object(main),
            &object(pod),
            "spec.template.spec",
        )
    }

    #[rstest]
    #[case::pod_level_uid(json!({}), json!({"securityContext": {"runAsUser": 1000}}), "uid 1000")]
    #[case::container_level_uid(json!({"securityContext": {"runAsUser": 1001}}), json!({"securityContext": {"runAsUser": 0}}), "uid 1001")]
    #[case::run_as_non_root_only(json!({"securityContext": {"runAsNonRoot": true}}), json!({}), "a non-root user")]
    #[case::null_fs_group(json!({}), json!({"securityContext": {"runAsUser": 1000, "fsGroup": null}}), "uid 1000")]
    fn non_root_pvc_pods_without_a_group_are_warned(
        #[case] main: Value,
        #[case] pod: Value,
        #[case] who: &str,
    ) {
        let found = warn(pvc(), main, pod);
        assert_eq!(found.len(), 1, "{found:?}");
        let message = &found[0];
        assert!(
            message.starts_with("spec.template.spec.securityContext.fsGroup: PVC cache mode"),
            "{message}"
        );
        assert!(
            message.contains(&format!("as {who} with no fsGroup")),
            "{message}"
        );
        assert!(message.contains("claim shop-python-packages"), "{message}");
        assert!(message.contains("mode 2775"), "{message}");
    }

    #[rstest]
    #[case::root_pod(json!({}), json!({"securityContext": {"runAsUser": 0}}))]
    #[case::image_user(json!({}), json!({}))]
    #[case::container_root_over_pod_user(json!({"securityContext": {"runAsUser": 0}}), json!({"securityContext": {"runAsUser": 1000}}))]
    #[case::with_fs_group(json!({}), json!({"securityContext": {"runAsUser": 1000, "fsGroup": 1000}}))]
    #[case::with_supplemental_group(json!({}), json!({"securityContext": {"runAsUser": 1000, "supplementalGroups": [3000]}}))]
    fn pods_that_can_share_the_claim_are_not_warned(#[case] main: Value, #[case] pod: Value) {
        assert_eq!(warn(pvc(), main, pod), Vec::<String>::new());
    }

    #[rstest]
    #[case::empty_dir(Cache::EmptyDir)]
    #[case::gcs(Cache::Gcs(crate::spec::GcsCache {
        bucket: "b".to_owned(),
        prefix: "kaspr-packages/".to_owned(),
        max_archive_size: 1 << 30,
        key_secret: Some(crate::spec::GcsKeySecret { name: "k".to_owned(), key: "sa.json".to_owned() }),
    }))]
    fn other_modes_need_nothing_from_the_pods_users(#[case] cache: Cache) {
        let pod = json!({"securityContext": {"runAsUser": 1000}});
        assert_eq!(warn(cache, json!({}), pod), Vec::<String>::new());
    }
}
