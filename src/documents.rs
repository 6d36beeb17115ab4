//! Reading Kubernetes objects from text: one reader for `preview`, `validate` and
//! `serve --kasprapps`, so a file means the same thing to all three.
//!
//! The text is a YAML stream (JSON is YAML, so a JSON file reads the same way); empty
//! documents (comments only, a trailing `---`) are skipped, and the items of a `kind: List`
//! stand for themselves, as with `kubectl apply -f`.

use serde::Deserialize as _;
use serde_json::Value;

/// The objects in `text`, in order.
pub fn read_objects(text: &str) -> Result<Vec<Value>, String> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value =
            Value::deserialize(document).map_err(|e| format!("not valid YAML or JSON: {e}"))?;
        match value {
            Value::Null => {}
            list if is_list(&list) => match list.get("items") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => objects.extend(items.iter().cloned()),
                Some(other) => {
                    return Err(format!(
                        "the items of a kind: List must be a list, got {other}"
                    ));
                }
            },
            object => objects.push(object),
        }
    }
    Ok(objects)
}

fn is_list(value: &Value) -> bool {
    value.get("kind").and_then(Value::as_str) == Some("List")
}

/// A KasprApp: kind `KasprApp` in group `kaspr.io`.
pub fn is_kasprapp(object: &Value) -> bool {
    object.get("kind").and_then(Value::as_str) == Some("KasprApp")
        && object
            .get("apiVersion")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("kaspr.io/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn streams_lists_json_and_empty_documents() {
        let text = "kind: A\n---\n# only a comment\n---\nkind: List\nitems:\n- {kind: B}\n- {kind: C}\n---\n";
        let kinds: Vec<Value> = read_objects(text)
            .expect("reads")
            .iter()
            .map(|o| o["kind"].clone())
            .collect();
        assert_eq!(kinds, [json!("A"), json!("B"), json!("C")]);
        assert_eq!(
            read_objects(r#"{"kind": "KasprApp", "apiVersion": "kaspr.io/v1alpha1"}"#)
                .expect("json"),
            [json!({"kind": "KasprApp", "apiVersion": "kaspr.io/v1alpha1"})]
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let error = read_objects(": : :\n\t").expect_err("not yaml");
        assert!(error.starts_with("not valid YAML or JSON"), "{error}");
        let error = read_objects("kind: List\nitems: 3\n").expect_err("items not a list");
        assert!(error.contains("items of a kind: List"), "{error}");
    }

    #[test]
    fn a_kasprapp_is_known_by_kind_and_group() {
        assert!(is_kasprapp(
            &json!({"kind": "KasprApp", "apiVersion": "kaspr.io/v1alpha1"})
        ));
        assert!(!is_kasprapp(
            &json!({"kind": "KasprApp", "apiVersion": "other.io/v1"})
        ));
        assert!(!is_kasprapp(&json!({"kind": "Pod", "apiVersion": "v1"})));
    }
}
