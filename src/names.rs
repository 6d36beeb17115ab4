//! Every name, path, label and annotation this product uses, in one place. They are this product's own so nothing collides with
//! what the Kaspr operator renders.

pub const INIT_CONTAINER: &str = "kaspr-packages";
/// The operator's own init container for this feature; when present we do not inject.
pub const OPERATOR_INIT_CONTAINER: &str = "install-packages";
pub const MAIN_CONTAINER: &str = "kaspr";

pub const PACKAGES_VOLUME: &str = "kaspr-packages";
pub const CACHE_VOLUME: &str = "kaspr-packages-cache";
pub const GCS_KEY_VOLUME: &str = "kaspr-packages-gcs-key";
/// The package set's lock (builds on), from the app's lock ConfigMap.
pub const LOCK_VOLUME: &str = "kaspr-packages-lock";
pub const LOCK_DIR: &str = "/var/run/kaspr-packages/lock";
/// Every volume name the injection may add.
pub const VOLUMES: &[&str] = &[PACKAGES_VOLUME, CACHE_VOLUME, GCS_KEY_VOLUME, LOCK_VOLUME];

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
pub const ANNOTATIONS: &[&str] = &[
    TEMPLATE_HASH_ANNOTATION,
    INSTALL_KEY_ANNOTATION,
    INJECTED_ANNOTATION,
    SET_ANNOTATION,
];

pub const KIND_LABEL: &str = "kaspr.io/kind";
pub const APP_LABEL: &str = "kaspr.io/app";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
