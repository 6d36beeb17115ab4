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

/// A string and its JSON form, written verbatim when a patch holds that string.
pub type Preserialized = (&'static str, &'static [u8]);

/// `serde_json::to_vec(patch)`, byte for byte, except that every string equal to one of
/// `spliced` is copied from its JSON form instead of being escaped again.
///
/// The installer program in every injection is tens of kilobytes that never need escaping,
/// but serde_json's escaping pass looks at each byte of each string on every request; keeping
/// its JSON form once and copying it removes that pass. Only `add` and `replace` operations
/// carry it; the others are serialized by serde_json.
pub fn to_vec_splicing(patch: &Patch, spliced: &[Preserialized]) -> serde_json::Result<Vec<u8>> {
    let mut out =
        Vec::with_capacity(spliced.iter().map(|(_, json)| json.len()).sum::<usize>() + 1024);
    out.push(b'[');
    for (i, op) in patch.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let (name, path, value) = match op {
            PatchOperation::Add(o) => ("add", &o.path, &o.value),
            PatchOperation::Replace(o) => ("replace", &o.path, &o.value),
            other => {
                serde_json::to_writer(&mut out, other)?;
                continue;
            }
        };
        out.extend_from_slice(b"{\"op\":\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\",\"path\":");
        serde_json::to_writer(&mut out, path)?;
        out.extend_from_slice(b",\"value\":");
        write_value(&mut out, value, spliced)?;
        out.push(b'}');
    }
    out.push(b']');
    Ok(out)
}

/// The compact JSON of `value`, as serde_json writes it, with [`to_vec_splicing`]'s strings
/// copied.
fn write_value(
    out: &mut Vec<u8>,
    value: &Value,
    spliced: &[Preserialized],
) -> serde_json::Result<()> {
    match value {
        Value::String(s) => match spliced.iter().find(|(known, _)| *known == s.as_str()) {
            Some((_, json)) => out.extend_from_slice(json),
            None => serde_json::to_writer(&mut *out, s)?,
        },
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, spliced)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_value(out, item, spliced)?;
            }
            out.push(b'}');
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => serde_json::to_writer(&mut *out, value)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SPLICED: &str = "import base64;print('splice')";

    fn spliced() -> [Preserialized; 1] {
        static JSON: std::sync::LazyLock<Vec<u8>> =
            std::sync::LazyLock::new(|| serde_json::to_vec(SPLICED).expect("json"));
        [(SPLICED, JSON.as_slice())]
    }

    #[test]
    fn splicing_writes_the_bytes_serde_json_writes() {
        let patch: Patch = serde_json::from_value(json!([
            {"op": "add", "path": "/spec/template/spec/initContainers/-", "value": {
                "name": "kaspr-packages", "command": ["python3", "-c", SPLICED],
                "env": [{"name": "X", "value": "quote \" back\\slash \u{1} é"}],
                "n": 1.5, "m": -3, "t": true, "z": null, "empty": {}, "none": []}},
            {"op": "replace", "path": "/a~1b/c~0d", "value": SPLICED},
            {"op": "remove", "path": "/x/0"},
            {"op": "test", "path": "/y", "value": [SPLICED]},
            {"op": "move", "from": "/p", "path": "/q"},
            {"op": "copy", "from": "/p", "path": "/r"},
            {"op": "add", "path": "/s", "value": "not the spliced string"}
        ]))
        .expect("patch");
        let fast = to_vec_splicing(&patch, &spliced()).expect("serializes");
        assert_eq!(
            String::from_utf8(fast).expect("utf-8"),
            serde_json::to_string(&patch).expect("json")
        );
    }

    #[test]
    fn a_spliced_string_is_copied_from_its_json_form() {
        // A JSON form that differs from serde_json's own shows that the copy is what got written.
        let patch: Patch =
            serde_json::from_value(json!([{"op": "add", "path": "/a", "value": ["x", SPLICED]}]))
                .expect("patch");
        let out = to_vec_splicing(&patch, &[(SPLICED, b"\"copied\"")]).expect("serializes");
        assert_eq!(out, br#"[{"op":"add","path":"/a","value":["x","copied"]}]"#);
    }

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
