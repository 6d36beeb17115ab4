//! `packages`: 1 to 200 requirements, each accepted by the requirement parser, expanding only
//! `${VAR}`s the app declared for the install container.

use serde_json::{Map, Value};

use super::{Checker, INIT_ROOT, ROOT, show};
use crate::names::RESERVED_ENV;
use crate::requirement::{self, variables};

/// Only variables declared in `pythonPackagesInitContainer.env` may be expanded: the install
/// container's environment also holds this product's own credentials, which must never be
/// spliced into a URL that may point at another host.
fn check_variables(c: &mut Checker, path: &str, package: &str, declared: &[&str]) {
    for name in variables(package) {
        if RESERVED_ENV.contains(&name) {
            c.error(
                path,
                format!(
                    "${{{name}}} is kaspr-packages-webhook's own variable and is never expanded"
                ),
            );
        } else if !declared.contains(&name) {
            c.error(
                path,
                format!(
                    "${{{name}}} is not declared in {INIT_ROOT}.env; only variables declared there are expanded"
                ),
            );
        }
    }
}

/// Most packages one app may list.
pub const MAX_PACKAGES: usize = 200;

pub(super) fn packages(
    c: &mut Checker,
    map: &Map<String, Value>,
    declared_env: &[&str],
) -> Vec<String> {
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
        check_variables(c, &item_path, trimmed, declared_env);
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
