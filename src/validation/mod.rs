//! Converts a KasprApp (unstructured JSON) into [`PythonPackages`], checking every rule and
//! collecting all errors and warnings at once, each with its field path.
//!
//! One validator serves the validating webhook, the mutating webhook and `preview`. The
//! [`Checker`] here reads typed values and records problems; each part of the spec has its own
//! file: `packages`, `indexes` (index URLs and trusted hosts), `credentials`, `cache`,
//! `policy` (install policy and resources) and `init_container` (extra env and mounts).

mod annotations;
mod cache;
mod credentials;
mod indexes;
mod init_container;
mod packages;
mod policy;
mod ratchet;

use serde_json::{Map, Value};

use crate::spec::{InitContainerExtras, PythonPackages};
use annotations::{AppSettings, app_settings};
use cache::cache;
use credentials::credentials;
use indexes::{check_host_port, check_index_url, warn_insecure_indexes};
use init_container::{init_container_extras, main_security_context};
pub use packages::MAX_PACKAGES;
use packages::packages;
use policy::{install_policy, resources};
pub use ratchet::{Ratchet, ratchet};

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
pub(super) struct Checker {
    errors: Vec<FieldError>,
    warnings: Vec<FieldError>,
}

pub(super) fn show(value: &Value) -> String {
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
    pub(super) fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    pub(super) fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Reads an optional object; null counts as absent.
    pub(super) fn object<'a>(
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

    pub(super) fn string(
        &mut self,
        parent: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<String> {
        match parent.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.error(path, format!("must be a string, got {}", show(other)));
                None
            }
        }
    }

    pub(super) fn boolean(
        &mut self,
        parent: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<bool> {
        match parent.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                self.error(path, format!("must be true or false, got {}", show(other)));
                None
            }
        }
    }

    pub(super) fn integer(
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

    pub(super) fn string_list(
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

    pub(super) fn unknown_fields(&mut self, map: &Map<String, Value>, known: &[&str], path: &str) {
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
            // Our annotations matter only to an app with packages: one without is never
            // refused (nor its StatefulSet) for them.
            let settings = app_settings(&mut checker, app);
            let template = spec
                .and_then(|s| s.get("template"))
                .and_then(Value::as_object);
            let init = template
                .map(|t| init_container_extras(&mut checker, t))
                .unwrap_or_default();
            let main_context = template.and_then(|t| main_security_context(&mut checker, t));
            let mut parsed = python_packages(&mut checker, map, init, settings);
            parsed.main_security_context = main_context;
            Some(parsed)
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
    settings: AppSettings,
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

    let declared_env: Vec<&str> = init_container.env.iter().map(|e| e.name.as_str()).collect();
    let packages = packages(c, map, &declared_env);

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
    let plain_http = index_url
        .as_deref()
        .is_some_and(|u| u.trim().to_ascii_lowercase().starts_with("http://"));
    if credentials.is_some() && plain_http {
        c.warn(
            format!("{ROOT}.credentials"),
            "indexUrl uses plain http://, so the username and password travel to the index in clear text; use https://",
        );
    }
    if credentials.is_some() && index_url.is_none() {
        c.warn(
            format!("{ROOT}.credentials"),
            "credentials are set but indexUrl is not; they are only sent to the indexUrl host, so they are unused",
        );
    }

    let cache = cache(c, map, settings.gcs_auth);
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
        main_security_context: None,
        operator_packages: settings.operator_packages,
        install_tool: settings.install_tool,
    }
}
/// A Kubernetes object name (DNS-1123 subdomain).
pub(super) fn is_dns_subdomain(name: &str) -> bool {
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
pub(super) fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' || ch == '.')
}

#[cfg(test)]
mod tests;

#[cfg(test)]
#[path = "annotation_tests.rs"]
mod annotation_tests;
