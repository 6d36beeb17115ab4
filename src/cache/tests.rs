use super::*;
use serde_json::json;
use std::path::Path;

fn app_ref(namespace: &str, name: &str) -> AppRef {
    AppRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

#[test]
fn reads_multi_document_yaml_lists_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("apps.yaml"),
        "apiVersion: kaspr.io/v1alpha1\nkind: KasprApp\nmetadata:\n  name: a\n  namespace: ns1\n\
         ---\n# a comment-only document\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n\
         ---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: kaspr.io/v1alpha1\n  kind: KasprApp\n  metadata:\n    name: b\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("c.json"),
        r#"{"apiVersion":"kaspr.io/v1alpha1","kind":"KasprApp","metadata":{"name":"c","namespace":"ns2","managedFields":[{}]}}"#,
    )
    .expect("write");
    std::fs::write(dir.path().join("notes.txt"), "not: [read").expect("write");

    let apps = FileKasprApps::load(dir.path()).expect("load");
    assert_eq!(apps.len(), 3);
    assert!(apps.is_synced());
    assert!(matches!(
        apps.cached(&app_ref("ns1", "a")),
        Some(AppLookup::Found(_))
    ));
    assert!(matches!(
        apps.cached(&app_ref("default", "b")),
        Some(AppLookup::Found(_))
    ));
    match apps.cached(&app_ref("ns2", "c")) {
        Some(AppLookup::Found(app)) => {
            assert!(app.pointer("/metadata/managedFields").is_none())
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        apps.cached(&app_ref("ns1", "zzz")),
        Some(AppLookup::NotFound)
    ));
}

#[test]
fn a_broken_file_fails_the_load_and_keeps_the_old_set_on_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a.yaml");
    std::fs::write(
        &file,
        "apiVersion: kaspr.io/v1alpha1\nkind: KasprApp\nmetadata: {name: a}\n",
    )
    .expect("write");
    let apps = FileKasprApps::load(dir.path()).expect("load");
    assert!(!apps.reload().expect("reload unchanged"));

    std::fs::write(&file, "kind: [unclosed").expect("write");
    assert!(matches!(apps.reload(), Err(CacheError::Parse { .. })));
    assert_eq!(apps.len(), 1);
    assert!(matches!(
        FileKasprApps::load(dir.path()),
        Err(CacheError::Parse { .. })
    ));

    std::fs::write(
        &file,
        "apiVersion: kaspr.io/v1alpha1\nkind: KasprApp\nmetadata: {name: b}\n",
    )
    .expect("write");
    assert!(apps.reload().expect("reload changed"));
    assert!(matches!(
        apps.cached(&app_ref("default", "b")),
        Some(AppLookup::Found(_))
    ));
}

#[test]
fn duplicates_are_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let doc = "apiVersion: kaspr.io/v1alpha1\nkind: KasprApp\nmetadata: {name: a}\n";
    std::fs::write(dir.path().join("1.yaml"), doc).expect("write");
    std::fs::write(dir.path().join("2.yml"), doc).expect("write");
    assert!(matches!(
        FileKasprApps::load(dir.path()),
        Err(CacheError::Duplicate { .. })
    ));
}

#[test]
fn a_missing_directory_is_an_error() {
    assert!(matches!(
        FileKasprApps::load(Path::new("/nonexistent/kasprapps")),
        Err(CacheError::Read { .. })
    ));
}

#[tokio::test]
async fn memory_view_answers_what_it_was_given() {
    let apps = MemoryKasprApps::new()
        .with_app(json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "metadata": {"name": "a", "namespace": "n"}}))
        .with_lookup("n", "down", AppLookup::Unavailable("boom".into()));
    assert!(matches!(
        lookup(&apps, &app_ref("n", "a")).await,
        AppLookup::Found(_)
    ));
    assert!(matches!(
        lookup(&apps, &app_ref("n", "down")).await,
        AppLookup::Unavailable(_)
    ));
    assert!(matches!(
        lookup(&apps, &app_ref("n", "b")).await,
        AppLookup::NotFound
    ));
    assert_eq!(apps.len(), 1);
    apps.set_synced(false);
    assert!(!apps.is_synced());
}

#[test]
fn the_stored_object_keeps_identity_and_drops_bulk() {
    let object: KasprAppObject = serde_json::from_value(json!({
        "apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
        "metadata": {"name": "a", "namespace": "n", "resourceVersion": "7",
                     "annotations": {LAST_APPLIED: "{}", "keep": "me"}},
        "spec": {"pythonPackages": {"packages": ["x"]}}
    }))
    .expect("deserialize");
    assert_eq!(
        kube::Resource::meta(&object).resource_version.as_deref(),
        Some("7")
    );
    assert!(
        object
            .value()
            .pointer("/metadata/annotations/keep")
            .is_some()
    );
    assert!(
        object.value()["metadata"]["annotations"]
            .get(LAST_APPLIED)
            .is_none()
    );
    assert!(
        object
            .value()
            .pointer("/spec/pythonPackages/packages/0")
            .is_some()
    );
}

#[test]
fn the_stored_object_keeps_only_what_is_read() {
    let object: KasprAppObject = serde_json::from_value(json!({
        "apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
        "metadata": {"name": "a", "namespace": "n", "uid": "u", "managedFields": [{"manager": "kubectl"}],
                     "labels": {"team": "x"}},
        "spec": {
            "bootstrapServers": "kafka:9092",
            "authentication": {"sasl": {"passwordSecret": {"secretName": "s"}}},
            "resources": {"limits": {"memory": "1Gi"}},
            "pythonPackages": {"packages": ["x"], "cache": {"enabled": true}},
            "template": {
                "pythonPackagesInitContainer": {"env": [{"name": "A", "value": "1"}]},
                "kasprContainer": {"securityContext": {"runAsNonRoot": true},
                                   "env": [{"name": "BIG", "value": "y"}]},
                "serviceAccount": {"metadata": {"labels": {"a": "b"}}}
            }
        },
        "status": {"availableMembers": 3}
    }))
    .expect("deserialize");
    assert_eq!(
        **object.value(),
        json!({
            "apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
            "metadata": {"name": "a", "namespace": "n", "uid": "u", "labels": {"team": "x"}},
            "spec": {
                "pythonPackages": {"packages": ["x"], "cache": {"enabled": true}},
                "template": {
                    "pythonPackagesInitContainer": {"env": [{"name": "A", "value": "1"}]},
                    "kasprContainer": {"securityContext": {"runAsNonRoot": true}}
                }
            }
        })
    );
}

#[test]
fn an_app_without_spec_or_with_odd_shapes_is_kept_as_far_as_it_goes() {
    for (input, expected) in [
        (
            json!({"metadata": {"name": "a"}}),
            json!({"metadata": {"name": "a"}}),
        ),
        (json!({"spec": "text"}), json!({"spec": {}})),
        (json!({"spec": {"template": "text"}}), json!({"spec": {}})),
        (json!({"spec": {"template": {}}}), json!({"spec": {}})),
        (
            json!(["not", "an", "object"]),
            json!(["not", "an", "object"]),
        ),
    ] {
        let mut value = input.clone();
        trim(&mut value);
        assert_eq!(value, expected, "{input}");
    }
}
