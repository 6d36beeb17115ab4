//! Ratcheting, as Kubernetes does for its own types: an UPDATE is denied only for values that
//! are new or changed and invalid. An object being deleted, and an update that leaves every
//! value an error points at as it was, go through, so a KasprApp written before a rule
//! tightened (or before the webhook existed) can still have its finalizer removed.

use serde_json::Value;

use super::Report;

/// Why an UPDATE was let through despite errors, for the answer's warnings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ratchet {
    /// Every error stands.
    Nothing,
    /// The object is being deleted: no error stands.
    Deleting,
    /// These errors concern values the update did not change.
    Unchanged(Vec<String>),
}

/// Drops from `report` the errors an UPDATE from `old` to `new` did not introduce.
pub fn ratchet(report: &mut Report, old: &Value, new: &Value) -> Ratchet {
    if report.errors.is_empty() {
        return Ratchet::Nothing;
    }
    if new
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|t| !t.is_null())
    {
        report.errors.clear();
        return Ratchet::Deleting;
    }
    let (kept, unchanged): (Vec<_>, Vec<_>) = std::mem::take(&mut report.errors)
        .into_iter()
        .partition(
            |error| match (at_path(old, &error.path), at_path(new, &error.path)) {
                (Some(before), Some(after)) => before != after,
                // A value that was absent before (or is gone now) is a change.
                _ => true,
            },
        );
    report.errors = kept;
    if unchanged.is_empty() {
        Ratchet::Nothing
    } else {
        Ratchet::Unchanged(unchanged.into_iter().map(|e| e.to_string()).collect())
    }
}

/// The value at a field path as the validator writes it (`a.b[2].c`). Keys may themselves
/// contain dots (`requests.nvidia.com/gpu`), so at each object the longest key that the path
/// continues with wins.
fn at_path<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(value);
    }
    if let Some(rest) = path.strip_prefix('[') {
        let (index, rest) = rest.split_once(']')?;
        let item = value.as_array()?.get(index.parse::<usize>().ok()?)?;
        return at_path(item, rest.strip_prefix('.').unwrap_or(rest));
    }
    let map = value.as_object()?;
    map.iter()
        .filter(|(key, _)| {
            path.strip_prefix(key.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
        .max_by_key(|(key, _)| key.len())
        .and_then(|(key, child)| {
            let rest = &path[key.len()..];
            at_path(child, rest.strip_prefix('.').unwrap_or(rest))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::validate_kasprapp;
    use serde_json::json;

    fn app(packages: &Value) -> Value {
        json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
               "metadata": {"name": "a", "namespace": "n", "finalizers": ["kaspr.io/finalizer"]},
               "spec": {"pythonPackages": {"packages": packages,
                        "resources": {"limits": {"nvidia.com/gpu": "x"}}}}})
    }

    #[test]
    fn paths_resolve_through_lists_and_dotted_keys() {
        let a = app(&json!(["a==1", "b==2"]));
        assert_eq!(
            at_path(&a, "spec.pythonPackages.packages[1]"),
            Some(&json!("b==2"))
        );
        assert_eq!(
            at_path(&a, "spec.pythonPackages.resources.limits.nvidia.com/gpu"),
            Some(&json!("x"))
        );
        assert_eq!(at_path(&a, "spec.pythonPackages.packages[7]"), None);
        assert_eq!(at_path(&a, "spec.nothing"), None);
    }

    #[test]
    fn only_new_or_changed_errors_stand() {
        let old = app(&json!(["-e .", "b==2"]));
        // Unchanged: the finalizer goes, the old error does not count.
        let mut new = old.clone();
        new["metadata"]["finalizers"] = json!([]);
        let mut report = validate_kasprapp(&new);
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
        let ratcheted = ratchet(&mut report, &old, &new);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(matches!(ratcheted, Ratchet::Unchanged(ref e) if e.len() == 2));

        // A new invalid value is denied; the old one is still tolerated.
        let new = app(&json!(["-e .", "b; rm -rf /"]));
        let mut report = validate_kasprapp(&new);
        ratchet(&mut report, &old, &new);
        let paths: Vec<&str> = report.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["spec.pythonPackages.packages[1]"]);
    }

    #[test]
    fn an_object_being_deleted_always_passes() {
        let old = app(&json!(["-e ."]));
        let mut new = app(&json!(["--also-bad"]));
        new["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        let mut report = validate_kasprapp(&new);
        assert_eq!(ratchet(&mut report, &old, &new), Ratchet::Deleting);
        assert!(report.errors.is_empty());
    }

    #[test]
    fn a_field_absent_before_is_a_change() {
        let old = json!({"spec": {"pythonPackages": {"packages": ["a==1"]}}});
        let new =
            json!({"spec": {"pythonPackages": {"packages": ["a==1"], "indexUrl": "ftp://x"}}});
        let mut report = validate_kasprapp(&new);
        assert_eq!(ratchet(&mut report, &old, &new), Ratchet::Nothing);
        assert_eq!(report.errors.len(), 1);
    }
}
