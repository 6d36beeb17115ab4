//! RFC 6902 patches between two JSON documents.

use json_patch::jsonptr::{Pointer, PointerBuf};
use json_patch::{Patch, PatchOperation};
use serde_json::Value;

/// The patch that turns `before` into `after`, where both sit at `prefix` (a JSON pointer such
/// as `/spec/template`, or `""` for the document root) of a larger document.
///
/// Diffing only the part that can change keeps the cost independent of the rest of the object.
pub fn diff_at(prefix: &str, before: &Value, after: &Value) -> Patch {
    let mut patch = json_patch::diff(before, after);
    if prefix.is_empty() {
        return patch;
    }
    let Ok(prefix) = Pointer::parse(prefix) else {
        return patch;
    };
    let under = |path: &mut PointerBuf| *path = prefix.concat(path);
    for op in &mut patch.0 {
        match op {
            PatchOperation::Add(o) => under(&mut o.path),
            PatchOperation::Remove(o) => under(&mut o.path),
            PatchOperation::Replace(o) => under(&mut o.path),
            PatchOperation::Test(o) => under(&mut o.path),
            PatchOperation::Move(o) => {
                under(&mut o.path);
                under(&mut o.from);
            }
            PatchOperation::Copy(o) => {
                under(&mut o.path);
                under(&mut o.from);
            }
        }
    }
    patch
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn prefixed_patch_applies_to_the_whole_document() {
        let doc = json!({"spec": {"template": {"a": [1, 2], "b": {"c": 1}}}, "other": true});
        let before = &doc["spec"]["template"];
        let after = json!({"a": [1, 3, 4], "b": {"d": "x"}});
        let patch = diff_at("/spec/template", before, &after);
        let mut patched = doc.clone();
        json_patch::patch(&mut patched, &patch).expect("applies");
        assert_eq!(patched["spec"]["template"], after);
        assert_eq!(patched["other"], true);
        assert!(
            serde_json::to_string(&patch)
                .expect("json")
                .contains("/spec/template/")
        );
    }

    #[test]
    fn root_prefix_is_a_plain_diff() {
        let a = json!({"x": 1});
        let b = json!({"x": 2});
        assert_eq!(diff_at("", &a, &b), json_patch::diff(&a, &b));
        assert!(diff_at("/t", &a, &a).0.is_empty());
    }
}
