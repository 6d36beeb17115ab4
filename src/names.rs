//! Every name, path, label and annotation this product uses, in one place. They are this product's own so nothing collides with
//! what the Kaspr operator renders.

pub const INIT_CONTAINER: &str = "kaspr-packages";
/// The operator's own init container for this feature: in `respect` mode we step aside when it
/// is there; under takeover our installer runs under this name, so the operator's watch on it
/// is satisfied.
pub const OPERATOR_INIT_CONTAINER: &str = "install-packages";
pub const MAIN_CONTAINER: &str = "kaspr";

pub const PACKAGES_VOLUME: &str = "kaspr-packages";
pub const CACHE_VOLUME: &str = "kaspr-packages-cache";
pub const GCS_KEY_VOLUME: &str = "kaspr-packages-gcs-key";
/// The package set's lock (builds on), from the app's lock ConfigMap.
pub const LOCK_VOLUME: &str = "kaspr-packages-lock";
pub const LOCK_DIR: &str = "/var/run/kaspr-packages/lock";
/// Image mode: the package set's image, mounted read-only at [`SITE_PATH`].
pub const IMAGE_VOLUME: &str = "kaspr-packages-image";
/// Every volume name the injection may add.
pub const VOLUMES: &[&str] = &[
    PACKAGES_VOLUME,
    CACHE_VOLUME,
    GCS_KEY_VOLUME,
    LOCK_VOLUME,
    IMAGE_VOLUME,
];

pub const PACKAGES_PATH: &str = "/opt/kaspr/packages";
pub const CACHE_PATH: &str = "/opt/kaspr/packages-cache";
pub const GCS_KEY_DIR: &str = "/var/run/secrets/kaspr-packages/gcs";
/// The directory (or link) holding this pod's installed packages.
pub const SITE_PATH: &str = "/opt/kaspr/packages/site";

pub const CONFIG_ENV: &str = "KASPR_PACKAGES_CONFIG";
pub const USERNAME_ENV: &str = "KASPR_PYPI_USERNAME";
pub const PASSWORD_ENV: &str = "KASPR_PYPI_PASSWORD";
pub const PYTHONPATH: &str = "PYTHONPATH";
/// The pod's uid (downward API), so a PVC lease belongs to one pod, not to a hostname.
pub const POD_UID_ENV: &str = "KASPR_PACKAGES_POD_UID";
/// Env vars the injected init container sets itself; users may not set or expand them.
pub const RESERVED_ENV: &[&str] = &[CONFIG_ENV, USERNAME_ENV, PASSWORD_ENV, POD_UID_ENV];
/// Directories the injection mounts; user mounts must stay out of them.
pub const RESERVED_PATHS: &[&str] = &[PACKAGES_PATH, CACHE_PATH, GCS_KEY_ROOT];
/// The parent of [`GCS_KEY_DIR`], kept free for every secret this product mounts.
pub const GCS_KEY_ROOT: &str = "/var/run/secrets/kaspr-packages";

pub const TEMPLATE_HASH_ANNOTATION: &str = "packages.kaspr.io/template-hash";
pub const INSTALL_KEY_ANNOTATION: &str = "packages.kaspr.io/install-key";
pub const INJECTED_ANNOTATION: &str = "packages.kaspr.io/injected";
/// The package set a template's pods restore (builds on).
pub const SET_ANNOTATION: &str = "packages.kaspr.io/set";
/// The rendering revision the injection was rendered with (see docs/revisions.md).
pub const REVISION_ANNOTATION: &str = "packages.kaspr.io/revision";
/// A hash of the injection rendered from the app's own configuration only, with every
/// revision-owned setting left out (see docs/revisions.md).
pub const CONFIG_HASH_ANNOTATION: &str = "packages.kaspr.io/config-hash";
/// On a StatefulSet's own metadata (not its template): the rendering revision the controller
/// allowed it to move to. The webhook of that revision renders it instead of keeping the
/// previous injection (see docs/revisions.md).
pub const MARK_ANNOTATION: &str = "packages.kaspr.io/rollout-revision";
/// On a StatefulSet's own metadata: when its move started (RFC 3339), for the deadline.
pub const MARK_STARTED_ANNOTATION: &str = "packages.kaspr.io/rollout-started";
/// On a KasprApp (annotation) or its Namespace (label): move the app (every app of the
/// namespace) to the named rendering revision now, without waiting for the rollout budget.
pub const MOVE_REQUEST_KEY: &str = "packages.kaspr.io/move-to-revision";
pub const ANNOTATIONS: &[&str] = &[
    TEMPLATE_HASH_ANNOTATION,
    INSTALL_KEY_ANNOTATION,
    INJECTED_ANNOTATION,
    SET_ANNOTATION,
    REVISION_ANNOTATION,
    CONFIG_HASH_ANNOTATION,
];

/// KasprApp annotations: settings of ours that the operator's CRD has no field for (its typed
/// `spec.pythonPackages` prunes unknown keys), so they live where the API server keeps them.
///
/// `respect` or `takeover`: what to do with the operator's own package injection.
pub const OPERATOR_PACKAGES_ANNOTATION: &str = "packages.kaspr.io/operator-packages";
/// `secret` or `workload-identity`: how the installer authenticates to GCS. The operator's CRD
/// requires `cache.gcs.secretRef.name`; `workload-identity` ignores it and uses the pod's
/// service account.
pub const GCS_AUTH_ANNOTATION: &str = "packages.kaspr.io/gcs-auth";
/// `image` or `cache`: image mode (docs/image-mode.md) or the configured cache mode.
pub const MODE_ANNOTATION: &str = crate::builds::image::MODE_ANNOTATION;
/// `auto`, `pip` or `uv`: the tool the installer installs with.
pub const INSTALL_TOOL_ANNOTATION: &str = "packages.kaspr.io/install-tool";
/// Every KasprApp annotation this product reads.
pub const KASPRAPP_ANNOTATIONS: &[&str] = &[
    OPERATOR_PACKAGES_ANNOTATION,
    GCS_AUTH_ANNOTATION,
    MODE_ANNOTATION,
    INSTALL_TOOL_ANNOTATION,
    MOVE_REQUEST_KEY,
];

/// What the Kaspr operator (v0.14+) renders for its own package injection, for an app `N`:
/// volume `N-app-packages` (see [`operator_packages_volume`]), its Secret volume for the GCS
/// key, the main container's PYTHONPATH with a literal `${PYTHONPATH}`, and `PACKAGES_HASH`,
/// the env var its watch compares on the init and the main container.
pub const OPERATOR_HASH_ENV: &str = "PACKAGES_HASH";
pub const OPERATOR_GCS_KEY_VOLUME: &str = "gcs-sa-key";
pub const OPERATOR_PYTHONPATH: &str = "/opt/kaspr/packages:${PYTHONPATH}";

/// The operator's packages volume of app `app`.
pub fn operator_packages_volume(app: &str) -> String {
    format!("{app}-app-packages")
}

/// The operator's PVC of app `app` in its PVC mode.
pub fn operator_claim(app: &str) -> String {
    format!("{app}-app-python-packages")
}

pub const KIND_LABEL: &str = "kaspr.io/kind";
pub const APP_LABEL: &str = "kaspr.io/app";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";

#[cfg(test)]
mod tests {
    /// A KasprApp setting of ours is documented and proven to survive the operator's CRD (its
    /// round trip in the end-to-end suite), including any added later.
    #[test]
    fn every_kasprapp_annotation_is_documented_and_round_tripped() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let read = |path: &str| std::fs::read_to_string(root.join(path)).expect(path);
        let readme = read("README.md");
        let round_trip = read("tests/e2e/test_operator_takeover.py");
        for annotation in super::KASPRAPP_ANNOTATIONS {
            assert!(
                readme.contains(&format!("| `{annotation}` |")),
                "README's annotation table lacks {annotation}"
            );
            assert!(
                round_trip.contains(&format!("\"{annotation}\": ")),
                "the round trip through the operator's CRD does not set {annotation}"
            );
        }
    }
}
