//! What differs between the injection an object carries and the one its KasprApp renders now,
//! named by part (install key, installer settings, image, resources, volumes, mounts, ...).
//!
//! The comparison reads the rendered injection as the reference and asks whether the stored
//! object *contains* it: fields the API server adds by defaulting (`terminationMessagePath`,
//! a Secret volume's `defaultMode`, ...) are not differences.

use serde_json::{Map, Value};

use crate::mutation;
use crate::names;

/// Whether `stored` contains `wanted`: equal scalars, objects whose every key of `wanted` is
/// contained, lists of the same length contained element by element.
pub fn contains(stored: &Value, wanted: &Value) -> bool {
    match (stored, wanted) {
        (Value::Object(s), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| s.get(k).is_some_and(|sv| contains(sv, v)) || v.is_null()),
        (Value::Array(s), Value::Array(w)) => {
            s.len() == w.len() && s.iter().zip(w).all(|(a, b)| contains(a, b))
        }
        _ => stored == wanted,
    }
}

fn named<'a>(items: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    items?
        .as_array()?
        .iter()
        .find(|i| i.get("name").and_then(Value::as_str) == Some(name))
}

fn annotation<'a>(template: &'a Value, key: &str) -> Option<&'a str> {
    template
        .pointer("/metadata/annotations")?
        .get(key)?
        .as_str()
}

fn main_container(template: &Value) -> Option<&Value> {
    let spec = template.get("spec")?;
    let index = mutation::main_container_index(spec.as_object()?)?;
    spec.get("containers")?.get(index)
}

fn short(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "none".to_owned(),
        Some(Value::String(s)) if s.chars().count() <= 60 => s.clone(),
        Some(other) => {
            let text = other.to_string();
            if text.chars().count() <= 60 {
                text
            } else {
                "(changed)".to_owned()
            }
        }
    }
}

/// The top-level keys of the installer configuration (`KASPR_PACKAGES_CONFIG`) that differ.
fn installer_config_keys(stored: Option<&Value>, wanted: Option<&Value>) -> Vec<String> {
    let parse = |env: Option<&Value>| -> Map<String, Value> {
        env.and_then(|e| e.get("value"))
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default()
    };
    let (stored, wanted) = (parse(stored), parse(wanted));
    let mut keys: Vec<String> = stored
        .keys()
        .chain(wanted.keys())
        .filter(|k| stored.get(*k) != wanted.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The differing parts of the init container.
fn init_container(stored: &Value, wanted: &Value, out: &mut Vec<String>) {
    let Some(wanted_fields) = wanted.as_object() else {
        return;
    };
    for (key, wanted_value) in wanted_fields {
        let stored_value = stored.get(key);
        if stored_value.is_some_and(|s| contains(s, wanted_value)) || wanted_value.is_null() {
            continue;
        }
        match key.as_str() {
            "env" => env(stored_value, wanted_value, out),
            "command" => out.push(
                "init container command: the installer program differs (another webhook release rendered it)"
                    .to_owned(),
            ),
            "image" | "imagePullPolicy" => out.push(format!(
                "init container {key}: {} -> {}",
                short(stored_value),
                short(Some(wanted_value))
            )),
            _ => out.push(format!("init container {key}")),
        }
    }
}

fn env(stored: Option<&Value>, wanted: &Value, out: &mut Vec<String>) {
    let names_of = |list: Option<&Value>| -> Vec<String> {
        list.and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect()
    };
    let mut all = names_of(Some(wanted));
    for name in names_of(stored) {
        if !all.contains(&name) {
            all.push(name);
        }
    }
    for name in all {
        let (s, w) = (named(stored, &name), named(Some(wanted), &name));
        match (s, w) {
            (Some(s), Some(w)) if contains(s, w) => {}
            (s, w) if name == names::CONFIG_ENV => {
                let keys = installer_config_keys(s, w);
                out.push(format!(
                    "installer settings ({}): {}",
                    names::CONFIG_ENV,
                    if keys.is_empty() {
                        "changed".to_owned()
                    } else {
                        keys.join(", ")
                    }
                ));
            }
            (None, Some(_)) => out.push(format!("init container env {name}: missing")),
            (Some(_), None) => out.push(format!("init container env {name}: no longer rendered")),
            _ => out.push(format!("init container env {name}")),
        }
    }
}

/// The parts of the injection on `stored` (a pod template `{metadata, spec}` or a Pod) that
/// differ from `wanted`, the same object as the webhook renders it now.
pub fn differences(stored: &Value, wanted: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let key = names::INSTALL_KEY_ANNOTATION;
    let (stored_key, wanted_key) = (annotation(stored, key), annotation(wanted, key));
    if stored_key != wanted_key {
        out.push(format!(
            "install key: {} -> {} (the packages, indexUrl, extraIndexUrls or trustedHosts changed)",
            stored_key.unwrap_or("none"),
            wanted_key.unwrap_or("none")
        ));
    }

    let init = |t: &Value| named(t.pointer("/spec/initContainers"), names::INIT_CONTAINER).cloned();
    match (init(stored), init(wanted)) {
        (Some(s), Some(w)) => init_container(&s, &w, &mut out),
        (None, Some(_)) => out.push(format!("init container {}: missing", names::INIT_CONTAINER)),
        (Some(_), None) => out.push(format!(
            "init container {}: present, but no longer rendered",
            names::INIT_CONTAINER
        )),
        (None, None) => {}
    }

    for volume in names::VOLUMES {
        let (s, w) = (
            named(stored.pointer("/spec/volumes"), volume),
            named(wanted.pointer("/spec/volumes"), volume),
        );
        match (s, w) {
            (Some(s), Some(w)) if contains(s, w) => {}
            (None, None) => {}
            (None, Some(_)) => out.push(format!("volume {volume}: missing")),
            (Some(_), None) => {
                out.push(format!("volume {volume}: present, but no longer rendered"))
            }
            (Some(_), Some(_)) => out.push(format!("volume {volume}: its source differs")),
        }
    }

    let (stored_main, wanted_main) = (main_container(stored), main_container(wanted));
    let mounts = |c: Option<&Value>| c.and_then(|c| c.get("volumeMounts")).cloned();
    let (stored_mounts, wanted_mounts) = (mounts(stored_main), mounts(wanted_main));
    for volume in names::VOLUMES {
        let (s, w) = (
            named(stored_mounts.as_ref(), volume),
            named(wanted_mounts.as_ref(), volume),
        );
        match (s, w) {
            (Some(s), Some(w)) if contains(s, w) => {}
            (None, None) => {}
            (None, Some(_)) => out.push(format!("main container mount {volume}: missing")),
            (Some(_), None) => out.push(format!(
                "main container mount {volume}: present, but no longer rendered"
            )),
            (Some(_), Some(_)) => out.push(format!("main container mount {volume}: differs")),
        }
    }
    let pythonpath = |c: Option<&Value>| {
        c.and_then(|c| c.get("env"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| e.get("name").and_then(Value::as_str) == Some(names::PYTHONPATH))
            .cloned()
            .collect::<Vec<Value>>()
    };
    if pythonpath(stored_main) != pythonpath(wanted_main) {
        out.push("main container PYTHONPATH".to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::AppRef;
    use crate::config::RenderConfig;
    use crate::spec::PythonPackages;
    use serde_json::json;

    fn template(image: &str) -> Value {
        json!({
            "metadata": {"labels": {"kaspr.io/app": "demo"}},
            "spec": {"containers": [{"name": "kaspr", "image": image}]}
        })
    }

    fn injected(mut template: Value, spec: &PythonPackages) -> Value {
        mutation::apply(
            &mut template,
            Some(spec),
            &AppRef::new("apps", "demo"),
            "spec.template.spec",
            &RenderConfig::default(),
        )
        .expect("inject");
        template
    }

    #[test]
    fn contains_ignores_fields_the_stored_object_adds() {
        assert!(contains(
            &json!({"a": 1, "defaulted": true, "l": [{"x": 1, "y": 2}]}),
            &json!({"a": 1, "l": [{"x": 1}]})
        ));
        assert!(!contains(&json!({"a": 1}), &json!({"a": 2})));
        assert!(!contains(&json!({"l": [1, 2]}), &json!({"l": [1]})));
    }

    #[test]
    fn the_same_injection_has_no_differences() {
        let spec = PythonPackages::with_packages(&["a==1"]);
        let stored = injected(template("kaspr:1"), &spec);
        assert_eq!(differences(&stored, &stored.clone()), Vec::<String>::new());
    }

    #[test]
    fn a_package_change_names_the_install_key_and_the_installer_settings() {
        let stored = injected(
            template("kaspr:1"),
            &PythonPackages::with_packages(&["a==1"]),
        );
        let wanted = injected(stored.clone(), &PythonPackages::with_packages(&["a==2"]));
        let found = differences(&stored, &wanted);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("install key: "), "{found:?}");
        assert_eq!(
            found[1],
            "installer settings (KASPR_PACKAGES_CONFIG): installKey, packages"
        );
    }

    #[test]
    fn an_image_change_and_a_mode_change_are_named() {
        let mut pvc = PythonPackages::with_packages(&["a==1"]);
        pvc.cache = crate::spec::Cache::Pvc(crate::spec::PvcCache {
            storage_class: None,
            size: "256Mi".into(),
            delete_claim: true,
        });
        let stored = injected(
            template("kaspr:1"),
            &PythonPackages::with_packages(&["a==1"]),
        );
        let wanted = injected(template("kaspr:2"), &pvc);
        let found = differences(&stored, &wanted);
        for expected in [
            "init container image: kaspr:1 -> kaspr:2",
            "installer settings (KASPR_PACKAGES_CONFIG): cacheDir, mode",
            "init container env KASPR_PACKAGES_POD_UID: missing",
            "init container volumeMounts",
            "volume kaspr-packages-cache: missing",
            "main container mount kaspr-packages-cache: missing",
        ] {
            assert!(found.iter().any(|f| f == expected), "{expected}: {found:?}");
        }
    }

    #[test]
    fn a_missing_injection_and_a_removed_one_are_named() {
        let spec = PythonPackages::with_packages(&["a==1"]);
        let wanted = injected(template("kaspr:1"), &spec);
        let found = differences(&template("kaspr:1"), &wanted);
        assert!(found.contains(&"init container kaspr-packages: missing".to_owned()));
        assert!(found.contains(&"main container PYTHONPATH".to_owned()));
        let found = differences(&wanted, &template("kaspr:1"));
        assert!(
            found.contains(
                &"init container kaspr-packages: present, but no longer rendered".to_owned()
            ),
            "{found:?}"
        );
    }
}
