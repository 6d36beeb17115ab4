//! `credentials.secretRef` and the Secret names and keys other parts refer to.

use serde_json::{Map, Value};

use super::{Checker, ROOT, is_config_key, is_dns_subdomain};
use crate::spec::{Credentials, DEFAULT_PASSWORD_KEY, DEFAULT_USERNAME_KEY};

pub(super) fn secret_name(c: &mut Checker, map: &Map<String, Value>, path: &str) -> Option<String> {
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

pub(super) fn secret_key(
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

pub(super) fn credentials(c: &mut Checker, map: &Map<String, Value>) -> Option<Credentials> {
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
