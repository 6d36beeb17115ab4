//! Converts a KasprApp (unstructured JSON) into [`PythonPackages`], checking every rule and
//! collecting all errors and warnings at once, each with its field path.
//!
//! One validator serves the validating webhook, the mutating webhook and `preview`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, VolumeMount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use serde_json::{Map, Value};

use crate::quantity;
use crate::requirement;
use crate::spec::{
    Cache, Credentials, DEFAULT_GCS_KEY, DEFAULT_GCS_PREFIX, DEFAULT_MAX_ARCHIVE_SIZE,
    DEFAULT_PASSWORD_KEY, DEFAULT_RETRIES, DEFAULT_TIMEOUT_SECONDS, DEFAULT_USERNAME_KEY, GcsCache,
    GcsKeySecret, InitContainerExtras, InstallPolicy, OnFailure, PvcCache, PythonPackages,
};

/// Most packages one app may list.
pub const MAX_PACKAGES: usize = 200;
/// Env vars the injected init container sets itself.
pub const RESERVED_ENV: &[&str] = &[
    "KASPR_PACKAGES_CONFIG",
    "KASPR_PYPI_USERNAME",
    "KASPR_PYPI_PASSWORD",
];
/// Paths the injection mounts; user mounts must stay out of them.
pub const RESERVED_PATHS: &[&str] = &[
    "/opt/kaspr/packages",
    "/opt/kaspr/packages-cache",
    "/var/run/secrets/kaspr-packages",
];

/// One problem, with the field path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything the validator found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// The typed spec when `pythonPackages` is present and valid.
    pub spec: Option<PythonPackages>,
    pub errors: Vec<FieldError>,
    pub warnings: Vec<FieldError>,
}

impl Report {
    pub fn warning_lines(&self) -> Vec<String> {
        self.warnings.iter().map(ToString::to_string).collect()
    }

    /// All errors in one message, each on its own line.
    pub fn error_message(&self, subject: &str) -> String {
        let mut message = format!("{subject} has an invalid spec.pythonPackages:");
        for error in &self.errors {
            message.push_str("\n  ");
            message.push_str(&error.to_string());
        }
        message
    }
}

const ROOT: &str = "spec.pythonPackages";
const INIT_ROOT: &str = "spec.template.pythonPackagesInitContainer";

/// Collects errors and warnings while reading fields.
#[derive(Default)]
struct Checker {
    errors: Vec<FieldError>,
    warnings: Vec<FieldError>,
}

fn show(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 80 {
        let cut: String = text.chars().take(77).collect();
        format!("{cut}...")
    } else {
        text
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl Checker {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Reads an optional object; null counts as absent.
    fn object<'a>(
        &mut self,
        parent: &'a Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<&'a Map<String, Value>> {
        match parent.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => Some(map),
            Some(other) => {
                self.error(path, format!("must be an object, got {}", type_name(other)));
                None
            }
        }
    }

    fn string(&mut self, parent: &Map<String, Value>, key: &str, path: &str) -> Option<String> {
        match parent.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.error(path, format!("must be a string, got {}", show(other)));
                None
            }
        }
    }

    fn boolean(&mut self, parent: &Map<String, Value>, key: &str, path: &str) -> Option<bool> {
        match parent.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                self.error(path, format!("must be true or false, got {}", show(other)));
                None
            }
        }
    }

    fn integer(
        &mut self,
        parent: &Map<String, Value>,
        key: &str,
        path: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<u32> {
        let value = parent.get(key)?;
        if value.is_null() {
            return None;
        }
        match value.as_i64() {
            Some(n) if range.contains(&n) => u32::try_from(n).ok(),
            Some(n) => {
                self.error(
                    path,
                    format!("{n} is out of range ({}..={})", range.start(), range.end()),
                );
                None
            }
            None => {
                self.error(path, format!("must be an integer, got {}", show(value)));
                None
            }
        }
    }

    fn string_list(
        &mut self,
        parent: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Vec<(String, String)> {
        match parent.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let item_path = format!("{path}[{i}]");
                    match item {
                        Value::String(s) => Some((item_path, s.clone())),
                        other => {
                            self.error(item_path, format!("must be a string, got {}", show(other)));
                            None
                        }
                    }
                })
                .collect(),
            Some(other) => {
                self.error(
                    path,
                    format!("must be a list of strings, got {}", show(other)),
                );
                Vec::new()
            }
        }
    }

    fn unknown_fields(&mut self, map: &Map<String, Value>, known: &[&str], path: &str) {
        for key in map.keys().filter(|k| !known.contains(&k.as_str())) {
            self.warn(
                format!("{path}.{key}"),
                format!("unknown field (known: {}); it is ignored", known.join(", ")),
            );
        }
    }
}

/// Validates a whole KasprApp object. Without `spec.pythonPackages` the report is empty.
pub fn validate_kasprapp(app: &Value) -> Report {
    let mut checker = Checker::default();
    let spec = app.get("spec").and_then(Value::as_object);
    let packages = spec.and_then(|s| s.get("pythonPackages"));
    let parsed = match packages {
        None | Some(Value::Null) => None,
        Some(Value::Object(map)) => {
            let init = spec
                .and_then(|s| s.get("template"))
                .and_then(Value::as_object)
                .map(|t| init_container_extras(&mut checker, t))
                .unwrap_or_default();
            Some(python_packages(&mut checker, map, init))
        }
        Some(other) => {
            checker.error(ROOT, format!("must be an object, got {}", show(other)));
            None
        }
    };
    let Checker { errors, warnings } = checker;
    Report {
        spec: if errors.is_empty() { parsed } else { None },
        errors,
        warnings,
    }
}

fn python_packages(
    c: &mut Checker,
    map: &Map<String, Value>,
    init_container: InitContainerExtras,
) -> PythonPackages {
    c.unknown_fields(
        map,
        &[
            "packages",
            "indexUrl",
            "extraIndexUrls",
            "trustedHosts",
            "credentials",
            "cache",
            "installPolicy",
            "resources",
        ],
        ROOT,
    );

    let packages = packages(c, map);

    let index_path = format!("{ROOT}.indexUrl");
    let index_url = c.string(map, "indexUrl", &index_path);
    if let Some(url) = &index_url {
        check_index_url(c, &index_path, url);
    }
    let extra_index_urls: Vec<String> = c
        .string_list(map, "extraIndexUrls", &format!("{ROOT}.extraIndexUrls"))
        .into_iter()
        .map(|(path, url)| {
            check_index_url(c, &path, &url);
            url
        })
        .collect();
    let trusted_hosts: Vec<String> = c
        .string_list(map, "trustedHosts", &format!("{ROOT}.trustedHosts"))
        .into_iter()
        .map(|(path, host)| {
            if let Err(e) = check_host_port(&host) {
                c.error(path, format!("{host:?} is not a host or host:port: {e}"));
            }
            host
        })
        .collect();
    warn_insecure_indexes(c, index_url.as_deref(), &extra_index_urls, &trusted_hosts);

    let credentials = credentials(c, map);
    if credentials.is_some() && index_url.is_none() {
        c.warn(
            format!("{ROOT}.credentials"),
            "credentials are set but indexUrl is not; they are only sent to the indexUrl host, so they are unused",
        );
    }

    let cache = cache(c, map);
    let install_policy = install_policy(c, map);
    let resources = resources(c, map);

    PythonPackages {
        packages,
        index_url: index_url.map(|u| u.trim().to_owned()),
        extra_index_urls,
        trusted_hosts,
        credentials,
        cache,
        install_policy,
        resources,
        init_container,
    }
}

fn packages(c: &mut Checker, map: &Map<String, Value>) -> Vec<String> {
    let path = format!("{ROOT}.packages");
    let Some(value) = map.get("packages").filter(|v| !v.is_null()) else {
        c.error(&path, "is required: list at least one package");
        return Vec::new();
    };
    let Some(items) = value.as_array() else {
        c.error(
            &path,
            format!("must be a list of strings, got {}", show(value)),
        );
        return Vec::new();
    };
    if items.is_empty() {
        c.error(&path, "must list at least one package");
    }
    if items.len() > MAX_PACKAGES {
        c.error(
            &path,
            format!(
                "lists {} packages; at most {MAX_PACKAGES} are allowed",
                items.len()
            ),
        );
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(raw) = item.as_str() else {
            c.error(item_path, format!("must be a string, got {}", show(item)));
            continue;
        };
        let trimmed = raw.trim_matches(' ');
        match requirement::parse(trimmed) {
            Ok(req) => {
                if req.is_unpinned() {
                    c.warn(
                        item_path,
                        format!(
                            "{raw:?} is not pinned to a version; installs may differ between pod starts (pin with ==)"
                        ),
                    );
                }
                out.push(trimmed.to_owned());
            }
            Err(reason) => {
                let shown: String = raw.chars().take(200).collect();
                c.error(
                    item_path,
                    format!("{shown:?} is not a valid requirement: {reason}"),
                );
            }
        }
    }
    out
}

fn check_index_url(c: &mut Checker, path: &str, raw: &str) {
    match url::Url::parse(raw.trim()) {
        Ok(url) => {
            if url.scheme() != "http" && url.scheme() != "https" {
                c.error(path, format!("{raw:?} must be an http:// or https:// URL"));
            } else if url.host_str().is_none_or(str::is_empty) {
                c.error(path, format!("{raw:?} has no host"));
            } else if !url.username().is_empty() || url.password().is_some() {
                c.error(
                    path,
                    "must not contain credentials (they would be visible in the pod spec); use credentials.secretRef",
                );
            } else if raw.trim() != raw || raw.contains(char::is_whitespace) {
                c.error(path, format!("{raw:?} contains whitespace"));
            }
        }
        Err(e) => c.error(path, format!("{raw:?} is not a valid URL: {e}")),
    }
}

fn check_host_port(host: &str) -> Result<(), String> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or("unbalanced '['")?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| "invalid IPv6 address")?;
        (None, after.strip_prefix(':'))
    } else {
        match host.split_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(name) = name {
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            return Err("invalid host name".into());
        }
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("invalid port {port:?}")),
        }
    }
    Ok(())
}

fn warn_insecure_indexes(
    c: &mut Checker,
    index_url: Option<&str>,
    extra: &[String],
    trusted: &[String],
) {
    let urls = index_url
        .map(|u| (format!("{ROOT}.indexUrl"), u.to_owned()))
        .into_iter()
        .chain(
            extra
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("{ROOT}.extraIndexUrls[{i}]"), u.clone())),
        );
    for (path, raw) in urls {
        let Ok(url) = url::Url::parse(raw.trim()) else {
            continue;
        };
        if url.scheme() != "http" {
            continue;
        }
        let host = url.host_str().unwrap_or_default().to_owned();
        let host_port = url.port().map(|p| format!("{host}:{p}"));
        let listed = trusted
            .iter()
            .any(|t| *t == host || Some(t) == host_port.as_ref());
        if !listed {
            c.warn(
                path,
                format!(
                    "{raw:?} uses plain http and {host:?} is not in trustedHosts; pip will refuse it"
                ),
            );
        }
    }
}

/// A Kubernetes object name (DNS-1123 subdomain).
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A key in a Secret or ConfigMap.
fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' || ch == '.')
}

fn secret_name(c: &mut Checker, map: &Map<String, Value>, path: &str) -> Option<String> {
    let name_path = format!("{path}.name");
    match c.string(map, "name", &name_path) {
        None => {
            c.error(name_path, "is required");
            None
        }
        Some(name) if !is_dns_subdomain(&name) => {
            c.error(name_path, format!("{name:?} is not a valid Secret name"));
            None
        }
        Some(name) => Some(name),
    }
}

fn secret_key(
    c: &mut Checker,
    map: &Map<String, Value>,
    field: &str,
    path: &str,
    default: &str,
) -> String {
    let key_path = format!("{path}.{field}");
    match c.string(map, field, &key_path) {
        None => default.to_owned(),
        Some(key) if is_config_key(&key) => key,
        Some(key) => {
            c.error(key_path, format!("{key:?} is not a valid Secret key"));
            default.to_owned()
        }
    }
}

fn credentials(c: &mut Checker, map: &Map<String, Value>) -> Option<Credentials> {
    let path = format!("{ROOT}.credentials");
    let creds = c.object(map, "credentials", &path)?;
    c.unknown_fields(creds, &["secretRef"], &path);
    let ref_path = format!("{path}.secretRef");
    let Some(secret_ref) = c.object(creds, "secretRef", &ref_path) else {
        if !creds.contains_key("secretRef") || creds["secretRef"].is_null() {
            c.error(ref_path, "is required when credentials is set");
        }
        return None;
    };
    c.unknown_fields(
        secret_ref,
        &["name", "usernameKey", "passwordKey"],
        &ref_path,
    );
    let name = secret_name(c, secret_ref, &ref_path);
    let username_key = secret_key(
        c,
        secret_ref,
        "usernameKey",
        &ref_path,
        DEFAULT_USERNAME_KEY,
    );
    let password_key = secret_key(
        c,
        secret_ref,
        "passwordKey",
        &ref_path,
        DEFAULT_PASSWORD_KEY,
    );
    Some(Credentials {
        secret_name: name?,
        username_key,
        password_key,
    })
}

fn size_quantity(
    c: &mut Checker,
    map: &Map<String, Value>,
    field: &str,
    path: &str,
    default: &str,
) -> (String, u64) {
    let field_path = format!("{path}.{field}");
    let raw = match map.get(field) {
        None | Some(Value::Null) => default.to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            c.error(
                &field_path,
                format!("must be a quantity such as \"1Gi\", got {}", show(other)),
            );
            return (default.to_owned(), 0);
        }
    };
    match quantity::parse(&raw).map(quantity::Quantity::to_bytes) {
        Ok(Some(bytes)) if bytes > 0 => (raw, bytes),
        Ok(_) => {
            c.error(field_path, format!("{raw:?} must be a positive size"));
            (raw, 0)
        }
        Err(e) => {
            c.error(field_path, e);
            (raw, 0)
        }
    }
}

fn cache(c: &mut Checker, map: &Map<String, Value>) -> Cache {
    let path = format!("{ROOT}.cache");
    let Some(cache) = c.object(map, "cache", &path) else {
        return Cache::EmptyDir;
    };
    c.unknown_fields(
        cache,
        &[
            "type",
            "enabled",
            "storageClass",
            "size",
            "accessMode",
            "deleteClaim",
            "gcs",
        ],
        &path,
    );
    let type_path = format!("{path}.type");
    let cache_type = c
        .string(cache, "type", &type_path)
        .unwrap_or_else(|| "pvc".into());
    let enabled = c.boolean(cache, "enabled", &format!("{path}.enabled"));
    let storage_class = c.string(cache, "storageClass", &format!("{path}.storageClass"));
    if let Some(class) = &storage_class
        && !is_dns_subdomain(class)
    {
        c.error(
            format!("{path}.storageClass"),
            format!("{class:?} is not a valid StorageClass name"),
        );
    }
    let (size, _) = size_quantity(c, cache, "size", &path, crate::spec::DEFAULT_CACHE_SIZE);
    let access_path = format!("{path}.accessMode");
    if let Some(mode) = c.string(cache, "accessMode", &access_path)
        && mode != "ReadWriteMany"
    {
        c.error(
            access_path,
            format!("{mode:?} is not supported: the cache is shared by every pod of the app, so only \"ReadWriteMany\" is accepted"),
        );
    }
    let delete_claim = c
        .boolean(cache, "deleteClaim", &format!("{path}.deleteClaim"))
        .unwrap_or(true);
    let gcs_path = format!("{path}.gcs");
    let gcs = c.object(cache, "gcs", &gcs_path);

    match cache_type.as_str() {
        "gcs" => {
            if enabled.is_some() {
                c.warn(
                    format!("{path}.enabled"),
                    "is ignored when cache.type is gcs",
                );
            }
            let Some(gcs) = gcs else {
                c.error(
                    format!("{gcs_path}.bucket"),
                    "is required when cache.type is gcs",
                );
                return Cache::EmptyDir;
            };
            Cache::Gcs(gcs_cache(c, gcs, &gcs_path))
        }
        "pvc" => {
            if gcs.is_some() {
                c.warn(gcs_path, "is ignored unless cache.type is gcs");
            }
            if enabled == Some(true) {
                Cache::Pvc(PvcCache {
                    storage_class,
                    size,
                    delete_claim,
                })
            } else {
                Cache::EmptyDir
            }
        }
        other => {
            c.error(
                type_path,
                format!("{other:?} is not a cache type (use \"pvc\" or \"gcs\")"),
            );
            Cache::EmptyDir
        }
    }
}

fn is_gcs_bucket(name: &str) -> bool {
    let chars_ok = name
        .chars()
        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "-_.".contains(ch));
    let ends_ok = name.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
        && name.ends_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit());
    let len_ok = if name.contains('.') {
        name.len() <= 222
            && name
                .split('.')
                .all(|part| !part.is_empty() && part.len() <= 63)
    } else {
        (3..=63).contains(&name.len())
    };
    chars_ok
        && ends_ok
        && len_ok
        && name.len() >= 3
        && !name.starts_with("goog")
        && !name.contains("google")
        && name.parse::<std::net::Ipv4Addr>().is_err()
}

fn gcs_cache(c: &mut Checker, gcs: &Map<String, Value>, path: &str) -> GcsCache {
    c.unknown_fields(
        gcs,
        &["bucket", "prefix", "maxArchiveSize", "secretRef"],
        path,
    );
    let bucket_path = format!("{path}.bucket");
    let bucket = match c.string(gcs, "bucket", &bucket_path) {
        None => {
            c.error(bucket_path, "is required when cache.type is gcs");
            String::new()
        }
        Some(b) => {
            if !is_gcs_bucket(&b) {
                c.error(bucket_path, format!("{b:?} is not a valid GCS bucket name"));
            }
            b
        }
    };
    let prefix_path = format!("{path}.prefix");
    let mut prefix = c
        .string(gcs, "prefix", &prefix_path)
        .unwrap_or_else(|| DEFAULT_GCS_PREFIX.to_owned());
    if prefix.starts_with('/')
        || prefix.contains("..")
        || prefix.contains(|ch: char| ch.is_control() || ch == '#' || ch == '?')
    {
        c.error(prefix_path, format!("{prefix:?} is not a valid object prefix (no leading '/', '..', '#', '?' or control characters)"));
    }
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    let (_, max_archive_size) =
        size_quantity(c, gcs, "maxArchiveSize", path, DEFAULT_MAX_ARCHIVE_SIZE);
    let ref_path = format!("{path}.secretRef");
    let key_secret = c
        .object(gcs, "secretRef", &ref_path)
        .and_then(|secret_ref| {
            c.unknown_fields(secret_ref, &["name", "key"], &ref_path);
            let name = secret_name(c, secret_ref, &ref_path);
            let key = secret_key(c, secret_ref, "key", &ref_path, DEFAULT_GCS_KEY);
            name.map(|name| GcsKeySecret { name, key })
        });
    GcsCache {
        bucket,
        prefix,
        max_archive_size,
        key_secret,
    }
}

fn install_policy(c: &mut Checker, map: &Map<String, Value>) -> InstallPolicy {
    let path = format!("{ROOT}.installPolicy");
    let Some(policy) = c.object(map, "installPolicy", &path) else {
        return InstallPolicy::default();
    };
    c.unknown_fields(policy, &["retries", "timeout", "onFailure"], &path);
    let retries = c
        .integer(policy, "retries", &format!("{path}.retries"), 0..=20)
        .unwrap_or(DEFAULT_RETRIES);
    let timeout_seconds = c
        .integer(policy, "timeout", &format!("{path}.timeout"), 60..=86_400)
        .unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    let on_failure_path = format!("{path}.onFailure");
    let on_failure = match c.string(policy, "onFailure", &on_failure_path).as_deref() {
        None | Some("block") => OnFailure::Block,
        Some("allow") => {
            c.warn(
                &on_failure_path,
                "\"allow\" starts the app without its packages when the install fails",
            );
            OnFailure::Allow
        }
        Some(other) => {
            c.error(
                on_failure_path,
                format!("{other:?} is not a failure policy (use \"block\" or \"allow\")"),
            );
            OnFailure::Block
        }
    };
    InstallPolicy {
        retries,
        timeout_seconds,
        on_failure,
    }
}

fn quantity_map(
    c: &mut Checker,
    map: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Option<BTreeMap<String, (K8sQuantity, f64)>> {
    let field_path = format!("{path}.{field}");
    let entries = c.object(map, field, &field_path)?;
    let mut out = BTreeMap::new();
    for (name, value) in entries {
        let entry_path = format!("{field_path}.{name}");
        let raw = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => {
                c.error(
                    entry_path,
                    format!("must be a quantity, got {}", show(other)),
                );
                continue;
            }
        };
        match quantity::parse(&raw) {
            Ok(q) if q.0 >= 0.0 => {
                out.insert(name.clone(), (K8sQuantity(raw), q.0));
            }
            Ok(_) => c.error(entry_path, format!("{raw:?} must not be negative")),
            Err(e) => c.error(entry_path, e),
        }
    }
    Some(out)
}

fn resources(c: &mut Checker, map: &Map<String, Value>) -> Option<ResourceRequirements> {
    let path = format!("{ROOT}.resources");
    let resources = c.object(map, "resources", &path)?;
    for key in resources
        .keys()
        .filter(|k| *k != "requests" && *k != "limits")
    {
        c.error(
            format!("{path}.{key}"),
            "unknown field (only requests and limits are allowed)",
        );
    }
    let requests = quantity_map(c, resources, "requests", &path);
    let limits = quantity_map(c, resources, "limits", &path);
    if let (Some(requests), Some(limits)) = (&requests, &limits) {
        for (name, (raw, value)) in requests {
            if let Some((limit_raw, limit)) = limits.get(name)
                && value > limit
            {
                c.error(
                    format!("{path}.requests.{name}"),
                    format!("{:?} is more than the limit {:?}", raw.0, limit_raw.0),
                );
            }
        }
    }
    let strip = |m: Option<BTreeMap<String, (K8sQuantity, f64)>>| {
        m.filter(|m| !m.is_empty())
            .map(|m| m.into_iter().map(|(k, (q, _))| (k, q)).collect())
    };
    let out = ResourceRequirements {
        requests: strip(requests),
        limits: strip(limits),
        ..Default::default()
    };
    (out.requests.is_some() || out.limits.is_some()).then_some(out)
}

/// Env var names: anything printable without '=' (Kubernetes' relaxed rule).
fn is_env_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|ch| ch.is_ascii_graphic() && ch != '=')
}

fn init_container_extras(c: &mut Checker, template: &Map<String, Value>) -> InitContainerExtras {
    let Some(init) = c.object(template, "pythonPackagesInitContainer", INIT_ROOT) else {
        return InitContainerExtras::default();
    };
    c.unknown_fields(init, &["env", "volumeMounts"], INIT_ROOT);
    let mut extras = InitContainerExtras::default();

    let env_path = format!("{INIT_ROOT}.env");
    match init.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(var) = env_var(c, item, &format!("{env_path}[{i}]")) {
                    extras.env.push(var);
                }
            }
        }
        Some(other) => c.error(env_path, format!("must be a list, got {}", show(other))),
    }

    let mounts_path = format!("{INIT_ROOT}.volumeMounts");
    match init.get("volumeMounts") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(mount) = volume_mount(c, item, &format!("{mounts_path}[{i}]")) {
                    extras.volume_mounts.push(mount);
                }
            }
        }
        Some(other) => c.error(mounts_path, format!("must be a list, got {}", show(other))),
    }
    extras
}

fn env_var(c: &mut Checker, item: &Value, path: &str) -> Option<EnvVar> {
    let Some(map) = item.as_object() else {
        c.error(path, format!("must be an object, got {}", show(item)));
        return None;
    };
    let name_path = format!("{path}.name");
    let name = c.string(map, "name", &name_path);
    let Some(name) = name else {
        c.error(name_path, "is required");
        return None;
    };
    if !is_env_name(&name) {
        c.error(
            &name_path,
            format!("{name:?} is not a valid environment variable name"),
        );
    }
    if RESERVED_ENV.contains(&name.as_str()) {
        c.error(
            &name_path,
            format!("{name:?} is set by kaspr-packages-webhook itself"),
        );
    }
    let has_value = map.get("value").is_some_and(|v| !v.is_null());
    let has_value_from = map.get("valueFrom").is_some_and(|v| !v.is_null());
    if has_value && has_value_from {
        c.error(path, "set either value or valueFrom, not both");
        return None;
    }
    if has_value_from {
        let from_path = format!("{path}.valueFrom");
        let from = c.object(map, "valueFrom", &from_path)?;
        let sources: Vec<&String> = from.keys().collect();
        let allowed = ["secretKeyRef", "configMapKeyRef", "fieldRef"];
        if sources.len() != 1 || !allowed.contains(&sources[0].as_str()) {
            c.error(
                from_path,
                "must have exactly one of secretKeyRef, configMapKeyRef, fieldRef",
            );
            return None;
        }
    }
    for key in map
        .keys()
        .filter(|k| !["name", "value", "valueFrom"].contains(&k.as_str()))
    {
        c.warn(format!("{path}.{key}"), "unknown field; it is ignored");
    }
    let mut clean = Map::new();
    for key in ["name", "value", "valueFrom"] {
        if let Some(v) = map.get(key).filter(|v| !v.is_null()) {
            clean.insert(key.to_owned(), v.clone());
        }
    }
    match serde_json::from_value::<EnvVar>(Value::Object(clean)) {
        Ok(var) => Some(var),
        Err(e) => {
            c.error(path, format!("is not a valid env entry: {e}"));
            None
        }
    }
}

fn volume_mount(c: &mut Checker, item: &Value, path: &str) -> Option<VolumeMount> {
    let Some(map) = item.as_object() else {
        c.error(path, format!("must be an object, got {}", show(item)));
        return None;
    };
    let mount: VolumeMount = match serde_json::from_value(item.clone()) {
        Ok(m) => m,
        Err(e) => {
            c.error(path, format!("is not a valid volume mount: {e}"));
            return None;
        }
    };
    if !map.contains_key("name") || mount.name.is_empty() {
        c.error(format!("{path}.name"), "is required");
    }
    if !mount.mount_path.starts_with('/') {
        c.error(
            format!("{path}.mountPath"),
            format!("{:?} must be an absolute path", mount.mount_path),
        );
    }
    let overlaps = RESERVED_PATHS.iter().find(|reserved| {
        let p = mount.mount_path.trim_end_matches('/');
        p == **reserved
            || p.starts_with(&format!("{reserved}/"))
            || reserved.starts_with(&format!("{p}/"))
    });
    if let Some(reserved) = overlaps {
        c.error(
            format!("{path}.mountPath"),
            format!(
                "{:?} overlaps {reserved}, which kaspr-packages-webhook mounts",
                mount.mount_path
            ),
        );
    }
    Some(mount)
}

#[cfg(test)]
mod tests {
    use rstest::rstest;
    use serde_json::json;

    use super::*;
    use crate::spec::DEFAULT_CACHE_SIZE;

    fn app(python_packages: Value) -> Value {
        let mut app = json!({
            "apiVersion": "kaspr.io/v1alpha1",
            "kind": "KasprApp",
            "metadata": {"name": "my-app", "namespace": "default"},
            "spec": {}
        });
        app["spec"]["pythonPackages"] = python_packages;
        app
    }

    fn errors(report: &Report) -> Vec<String> {
        report.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn no_python_packages_is_valid_and_empty() {
        let report = validate_kasprapp(&json!({"spec": {}}));
        assert_eq!(report, Report::default());
    }

    #[test]
    fn defaults_are_applied() {
        let report = validate_kasprapp(&app(json!({"packages": ["requests==2.31.0"]})));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let spec = report.spec.expect("spec");
        assert_eq!(spec.cache, Cache::EmptyDir);
        assert_eq!(spec.install_policy, InstallPolicy::default());
        assert_eq!(spec.index_url, None);
        assert!(spec.resources.is_none());
    }

    #[test]
    fn pvc_defaults() {
        let report = validate_kasprapp(&app(
            json!({"packages": ["a==1"], "cache": {"enabled": true}}),
        ));
        assert_eq!(
            report.spec.expect("spec").cache,
            Cache::Pvc(PvcCache {
                storage_class: None,
                size: DEFAULT_CACHE_SIZE.into(),
                delete_claim: true
            })
        );
    }

    #[test]
    fn gcs_defaults_and_prefix_slash() {
        let report = validate_kasprapp(&app(json!({
            "packages": ["a==1"],
            "cache": {"type": "gcs", "gcs": {"bucket": "my-bucket", "prefix": "pkgs", "secretRef": {"name": "gcs-key"}}}
        })));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(
            report.spec.expect("spec").cache,
            Cache::Gcs(GcsCache {
                bucket: "my-bucket".into(),
                prefix: "pkgs/".into(),
                max_archive_size: 1 << 30,
                key_secret: Some(GcsKeySecret {
                    name: "gcs-key".into(),
                    key: "sa.json".into()
                }),
            })
        );
    }

    #[test]
    fn gcs_without_secret_uses_workload_identity() {
        let report = validate_kasprapp(&app(json!({
            "packages": ["a==1"], "cache": {"type": "gcs", "enabled": true, "gcs": {"bucket": "my-bucket"}}
        })));
        let Cache::Gcs(gcs) = report.spec.expect("spec").cache else {
            panic!("not gcs")
        };
        assert_eq!(gcs.key_secret, None);
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.path == "spec.pythonPackages.cache.enabled")
        );
    }

    #[test]
    fn reports_all_errors_at_once_with_paths() {
        let report = validate_kasprapp(&app(json!({
            "packages": ["requests==2.31.0", "--index-url=https://evil", "requests; rm -rf /"],
            "indexUrl": "ftp://example.com",
            "cache": {"type": "gcs", "gcs": {"bucket": "Bad_Bucket", "maxArchiveSize": "1GB"}},
            "installPolicy": {"retries": 50, "timeout": 5, "onFailure": "ignore"},
            "credentials": {"secretRef": {"usernameKey": "user name"}},
            "resources": {"requests": {"cpu": "lots"}}
        })));
        let errs = errors(&report);
        let expect = [
            "spec.pythonPackages.packages[1]: \"--index-url=https://evil\" is not a valid requirement: pip options are not allowed",
            "spec.pythonPackages.packages[2]: \"requests; rm -rf /\" is not a valid requirement",
            "spec.pythonPackages.indexUrl: \"ftp://example.com\" must be an http:// or https:// URL",
            "spec.pythonPackages.credentials.secretRef.name: is required",
            "spec.pythonPackages.credentials.secretRef.usernameKey: \"user name\" is not a valid Secret key",
            "spec.pythonPackages.cache.gcs.bucket: \"Bad_Bucket\" is not a valid GCS bucket name",
            "spec.pythonPackages.cache.gcs.maxArchiveSize: \"1GB\" is not a valid quantity",
            "spec.pythonPackages.installPolicy.retries: 50 is out of range (0..=20)",
            "spec.pythonPackages.installPolicy.timeout: 5 is out of range (60..=86400)",
            "spec.pythonPackages.installPolicy.onFailure: \"ignore\" is not a failure policy",
            "spec.pythonPackages.resources.requests.cpu: \"lots\" is not a valid quantity",
        ];
        for e in expect {
            assert!(
                errs.iter().any(|got| got.starts_with(e)),
                "missing {e:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), expect.len(), "{errs:#?}");
        assert!(report.spec.is_none());
        let message = report.error_message("KasprApp my-app");
        assert_eq!(message.lines().count(), expect.len() + 1);
    }

    #[rstest]
    #[case::packages_missing(json!({}), "spec.pythonPackages.packages: is required")]
    #[case::packages_empty(json!({"packages": []}), "spec.pythonPackages.packages: must list at least one")]
    #[case::packages_not_list(json!({"packages": "requests"}), "spec.pythonPackages.packages: must be a list")]
    #[case::package_not_string(json!({"packages": [3]}), "spec.pythonPackages.packages[0]: must be a string")]
    #[case::index_no_host(json!({"packages": ["a==1"], "indexUrl": "https://"}), "spec.pythonPackages.indexUrl")]
    #[case::index_with_credentials(json!({"packages": ["a==1"], "indexUrl": "https://u:p@pypi.example.com/simple"}), "must not contain credentials")]
    #[case::extra_index_bad(json!({"packages": ["a==1"], "extraIndexUrls": ["notaurl"]}), "spec.pythonPackages.extraIndexUrls[0]: \"notaurl\" is not a valid URL")]
    #[case::trusted_host_bad(json!({"packages": ["a==1"], "trustedHosts": ["bad host"]}), "spec.pythonPackages.trustedHosts[0]")]
    #[case::trusted_host_port_bad(json!({"packages": ["a==1"], "trustedHosts": ["host:99999"]}), "invalid port")]
    #[case::credentials_without_ref(json!({"packages": ["a==1"], "credentials": {}}), "spec.pythonPackages.credentials.secretRef: is required")]
    #[case::cache_type_bad(json!({"packages": ["a==1"], "cache": {"type": "s3"}}), "spec.pythonPackages.cache.type: \"s3\" is not a cache type")]
    #[case::cache_enabled_not_bool(json!({"packages": ["a==1"], "cache": {"enabled": "yes"}}), "spec.pythonPackages.cache.enabled: must be true or false")]
    #[case::access_mode(json!({"packages": ["a==1"], "cache": {"enabled": true, "accessMode": "ReadWriteOnce"}}), "only \"ReadWriteMany\"")]
    #[case::size_bad(json!({"packages": ["a==1"], "cache": {"enabled": true, "size": "big"}}), "spec.pythonPackages.cache.size")]
    #[case::size_zero(json!({"packages": ["a==1"], "cache": {"enabled": true, "size": "0"}}), "must be a positive size")]
    #[case::storage_class_bad(json!({"packages": ["a==1"], "cache": {"enabled": true, "storageClass": "Fast SSD"}}), "not a valid StorageClass name")]
    #[case::gcs_without_bucket(json!({"packages": ["a==1"], "cache": {"type": "gcs"}}), "spec.pythonPackages.cache.gcs.bucket: is required")]
    #[case::gcs_secret_without_name(json!({"packages": ["a==1"], "cache": {"type": "gcs", "gcs": {"bucket": "abc", "secretRef": {}}}}), "spec.pythonPackages.cache.gcs.secretRef.name: is required")]
    #[case::gcs_bucket_google(json!({"packages": ["a==1"], "cache": {"type": "gcs", "gcs": {"bucket": "goog-bucket"}}}), "not a valid GCS bucket name")]
    #[case::retries_string(json!({"packages": ["a==1"], "installPolicy": {"retries": "3"}}), "spec.pythonPackages.installPolicy.retries: must be an integer")]
    #[case::retries_negative(json!({"packages": ["a==1"], "installPolicy": {"retries": -1}}), "out of range")]
    #[case::timeout_big(json!({"packages": ["a==1"], "installPolicy": {"timeout": 86401}}), "out of range")]
    #[case::resources_unknown(json!({"packages": ["a==1"], "resources": {"limit": {}}}), "spec.pythonPackages.resources.limit")]
    #[case::request_over_limit(json!({"packages": ["a==1"], "resources": {"requests": {"memory": "1Gi"}, "limits": {"memory": "512Mi"}}}), "is more than the limit")]
    #[case::not_an_object(json!(["requests"]), "spec.pythonPackages: must be an object")]
    fn rejects(#[case] packages: Value, #[case] expected: &str) {
        let report = validate_kasprapp(&app(packages));
        let errs = errors(&report);
        assert!(
            errs.iter().any(|e| e.contains(expected)),
            "{expected:?} not in {errs:#?}"
        );
        assert!(report.spec.is_none());
    }

    #[rstest]
    #[case::unpinned(json!({"packages": ["requests"]}), "spec.pythonPackages.packages[0]", "not pinned")]
    #[case::lower_bound(json!({"packages": ["pandas>=2.0.0"]}), "spec.pythonPackages.packages[0]", "not pinned")]
    #[case::http_index(json!({"packages": ["a==1"], "indexUrl": "http://pypi.internal/simple"}), "spec.pythonPackages.indexUrl", "trustedHosts")]
    #[case::credentials_without_index(json!({"packages": ["a==1"], "credentials": {"secretRef": {"name": "creds"}}}), "spec.pythonPackages.credentials", "indexUrl")]
    #[case::allow(json!({"packages": ["a==1"], "installPolicy": {"onFailure": "allow"}}), "spec.pythonPackages.installPolicy.onFailure", "without its packages")]
    #[case::unknown_field(json!({"packages": ["a==1"], "indexURL": "x"}), "spec.pythonPackages.indexURL", "unknown field")]
    fn warns(#[case] packages: Value, #[case] path: &str, #[case] text: &str) {
        let report = validate_kasprapp(&app(packages));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.path == path && w.message.contains(text)),
            "{path} / {text:?} not in {:#?}",
            report.warnings
        );
    }

    #[test]
    fn http_index_listed_in_trusted_hosts_does_not_warn() {
        let report = validate_kasprapp(&app(json!({
            "packages": ["a==1"], "indexUrl": "http://pypi.internal:8080/simple", "trustedHosts": ["pypi.internal:8080"]
        })));
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    }

    #[test]
    fn init_container_extras_are_read_and_checked() {
        let mut kasprapp = app(json!({"packages": ["a==1"]}));
        kasprapp["spec"]["template"] = json!({"pythonPackagesInitContainer": {
            "env": [
                {"name": "PIP_TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
                {"name": "GIT_SSH_COMMAND", "value": "ssh -i /etc/ssh-key/id -o StrictHostKeyChecking=yes"},
            ],
            "volumeMounts": [{"name": "ssh-key", "mountPath": "/etc/ssh-key", "readOnly": true}]
        }});
        let report = validate_kasprapp(&kasprapp);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let extras = report.spec.expect("spec").init_container;
        assert_eq!(extras.env.len(), 2);
        assert_eq!(extras.volume_mounts[0].mount_path, "/etc/ssh-key");

        kasprapp["spec"]["template"] = json!({"pythonPackagesInitContainer": {
            "env": [
                {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}, "fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "KASPR_PYPI_PASSWORD", "value": "x"},
                {"name": "B", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
            "volumeMounts": [{"name": "v", "mountPath": "/opt/kaspr/packages/site"}]
        }});
        let errs = errors(&validate_kasprapp(&kasprapp));
        for expected in [
            "spec.template.pythonPackagesInitContainer.env[0].valueFrom: must have exactly one of",
            "spec.template.pythonPackagesInitContainer.env[1].name: \"KASPR_PYPI_PASSWORD\" is set by",
            "spec.template.pythonPackagesInitContainer.env[2]: set either value or valueFrom",
            "spec.template.pythonPackagesInitContainer.volumeMounts[0].mountPath: \"/opt/kaspr/packages/site\" overlaps",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(expected)),
                "{expected:?} not in {errs:#?}"
            );
        }
    }

    #[test]
    fn too_many_packages() {
        let packages: Vec<String> = (0..201).map(|i| format!("pkg{i}==1.0")).collect();
        let errs = errors(&validate_kasprapp(&app(json!({"packages": packages}))));
        assert!(errs.iter().any(|e| e.contains("at most 200")), "{errs:?}");
    }

    #[test]
    fn secret_values_are_never_required() {
        // The validator never needs to read a Secret: a reference is enough.
        let report = validate_kasprapp(&app(json!({
            "packages": ["a==1"], "indexUrl": "https://pypi.example.com/simple",
            "credentials": {"secretRef": {"name": "pypi-creds", "usernameKey": "user", "passwordKey": "token"}}
        })));
        assert_eq!(
            report.spec.expect("spec").credentials,
            Some(Credentials {
                secret_name: "pypi-creds".into(),
                username_key: "user".into(),
                password_key: "token".into()
            })
        );
    }
}
