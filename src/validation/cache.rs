//! `cache`: the mode (emptyDir, PVC, GCS) and its settings.

use serde_json::{Map, Value};

use super::annotations::GcsAuth;
use super::credentials::{secret_key, secret_name};
use super::{Checker, ROOT, is_dns_subdomain, show};
use crate::names::GCS_AUTH_ANNOTATION;
use crate::quantity;
use crate::spec::{
    Cache, DEFAULT_GCS_KEY, DEFAULT_GCS_PREFIX, DEFAULT_MAX_ARCHIVE_SIZE, GcsCache, GcsKeySecret,
    PvcCache,
};

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

pub(super) fn cache(c: &mut Checker, map: &Map<String, Value>, auth: Option<GcsAuth>) -> Cache {
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
            Cache::Gcs(gcs_cache(c, gcs, &gcs_path, auth))
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

fn gcs_cache(
    c: &mut Checker,
    gcs: &Map<String, Value>,
    path: &str,
    auth: Option<GcsAuth>,
) -> GcsCache {
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
    let key_secret = match auth {
        None => key_secret,
        Some(GcsAuth::Secret) => {
            if key_secret.is_none() && !gcs.contains_key("secretRef") {
                c.error(
                    &ref_path,
                    format!("is required when annotation {GCS_AUTH_ANNOTATION} is \"secret\""),
                );
            }
            key_secret
        }
        Some(GcsAuth::WorkloadIdentity) => {
            if let Some(secret) = key_secret {
                c.warn(
                    &ref_path,
                    format!(
                        "annotation {GCS_AUTH_ANNOTATION} is \"workload-identity\", so Secret {:?} is \
                         not mounted and the pod's service account authenticates to GCS",
                        secret.name
                    ),
                );
            }
            None
        }
    };
    GcsCache {
        bucket,
        prefix,
        max_archive_size,
        key_secret,
    }
}
