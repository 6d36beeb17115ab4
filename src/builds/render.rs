//! Which package set the webhook renders (see docs/builds.md, "Rendering").
//!
//! With builds on, the webhook's view of a KasprApp is its *effective* app: the app with
//! `spec.pythonPackages` replaced by the configuration of its current (newest built) set, and
//! the in-memory annotation [`RENDER_SET_ANNOTATION`] naming that set, or `await` when no set
//! is built yet. The annotation is never written to the cluster: it only carries the choice
//! from the cache to the renderer, so both admission paths (StatefulSet and Pod) and the
//! controller's rollout check render the same set.

use serde_json::{Value, json};

use super::identity::{REFRESH_ANNOTATION, set_id};
use super::job::deadline_seconds;
use super::state::LockState;
use crate::app::AppRef;
use crate::names;
use crate::spec::PythonPackages;

/// The lock's file name in the init container's lock directory.
pub const LOCK_FILE: &str = "pylock.toml";
/// In-memory only: the set an effective app renders, or [`AWAIT`].
pub const RENDER_SET_ANNOTATION: &str = "packages.kaspr.io/render-set";
/// No set is built yet: pods wait for the one the current spec builds.
pub const AWAIT: &str = "await";

/// The set a pod template's pods restore, and how long they wait for it to be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSet {
    pub id: String,
    pub await_seconds: u64,
    /// Image mode: the app asks for it (docs/image-mode.md); whether it is mounted is decided
    /// where the pod is rendered.
    pub image: Option<super::image::ImageRequest>,
}

/// The app as the webhook renders it with builds on: the current set's configuration, or the
/// app as it is (awaiting its first set). An app without `pythonPackages` is left alone.
pub fn effective_app(app: &Value, state: Option<&LockState>) -> Value {
    let mut effective = app.clone();
    if app
        .pointer("/spec/pythonPackages")
        .is_none_or(Value::is_null)
    {
        return effective;
    }
    let chosen = match state.and_then(LockState::current_entry) {
        Some(entry) => {
            if let Some(spec) = effective.get_mut("spec").and_then(Value::as_object_mut) {
                spec.insert("pythonPackages".into(), entry.python_packages.clone());
            }
            entry.id.clone()
        }
        None => AWAIT.to_owned(),
    };
    if let Some(metadata) = effective.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = metadata.entry("annotations").or_insert_with(|| json!({}));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(RENDER_SET_ANNOTATION.into(), json!(chosen));
        }
    }
    super::image::annotate(&mut effective, state.and_then(LockState::current_image));
    effective
}

/// The set to render for `template` (`{metadata, spec}`), from an effective app; `None` when
/// builds are off (no annotation).
pub fn set_for(
    effective: &Value,
    template: &Value,
    spec: &PythonPackages,
    app: &AppRef,
) -> Option<PackageSet> {
    let annotations = effective.pointer("/metadata/annotations")?;
    let chosen = annotations.get(RENDER_SET_ANNOTATION)?.as_str()?;
    // As long as the build may take. The same for an awaited and a built set, so the template
    // rendered while a first set builds is the one rendered once it is built: no second rollout.
    let await_seconds = deadline_seconds(spec).min(86_400);
    if chosen != AWAIT {
        return Some(PackageSet {
            id: chosen.to_owned(),
            await_seconds,
            image: super::image::request_of(effective),
        });
    }
    let containers = template.pointer("/spec/containers")?.as_array()?;
    let main = containers
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(names::MAIN_CONTAINER))
        .or_else(|| containers.first())?;
    let image = main
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let refresh = annotations
        .get(REFRESH_ANNOTATION)
        .and_then(Value::as_str)
        .unwrap_or_default();
    Some(PackageSet {
        id: set_id(
            &app.namespace,
            &app.name,
            &spec.install_key(),
            image,
            refresh,
        ),
        await_seconds,
        image: super::image::request_of(effective),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builds::state::{SetEntry, SetPhase};

    fn app() -> Value {
        json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
               "metadata": {"name": "demo", "namespace": "apps"},
               "spec": {"pythonPackages": {"packages": ["new==2"]}}})
    }

    fn built(spec: Value) -> LockState {
        let entry = SetEntry {
            id: "00000000000000aa".into(),
            state: SetPhase::Building,
            install_key: "k".into(),
            image: "kaspr:1".into(),
            refresh: String::new(),
            job: "j".into(),
            python_packages: spec,
            sequence: 0,
            lock_sha256: None,
            category: None,
            message: None,
        };
        LockState::default()
            .with_building(entry)
            .with_built("00000000000000aa", "sha")
    }

    fn template(image: &str) -> Value {
        json!({"spec": {"containers": [{"name": "kaspr", "image": image}]}})
    }

    fn spec_of(app: &Value) -> PythonPackages {
        crate::validation::validate_kasprapp(app)
            .spec
            .expect("valid")
    }

    #[test]
    fn the_current_set_is_rendered_not_the_unbuilt_spec() {
        let state = built(json!({"packages": ["old==1"]}));
        let effective = effective_app(&app(), Some(&state));
        assert_eq!(
            effective["spec"]["pythonPackages"]["packages"],
            json!(["old==1"])
        );
        let set = set_for(
            &effective,
            &template("kaspr:2"),
            &spec_of(&effective),
            &AppRef::new("apps", "demo"),
        );
        assert_eq!(
            set,
            Some(PackageSet {
                id: "00000000000000aa".into(),
                await_seconds: deadline_seconds(&spec_of(&effective)),
                image: None,
            })
        );
    }

    #[test]
    fn without_a_built_set_pods_await_the_set_the_spec_builds() {
        let effective = effective_app(&app(), None);
        assert_eq!(
            effective["spec"]["pythonPackages"],
            app()["spec"]["pythonPackages"]
        );
        let spec = spec_of(&effective);
        let set = set_for(
            &effective,
            &template("kaspr:1"),
            &spec,
            &AppRef::new("apps", "demo"),
        )
        .expect("a set");
        assert_eq!(
            set.id,
            set_id("apps", "demo", &spec.install_key(), "kaspr:1", "")
        );
        assert_eq!(set.await_seconds, deadline_seconds(&spec));
        // The same id the controller's build uses for this image: no second rollout.
        let other = set_for(
            &effective,
            &template("kaspr:2"),
            &spec,
            &AppRef::new("apps", "demo"),
        )
        .expect("a set");
        assert_ne!(other.id, set.id);
    }

    #[test]
    fn builds_off_or_no_packages_render_as_before() {
        assert_eq!(
            set_for(
                &app(),
                &template("kaspr:1"),
                &spec_of(&app()),
                &AppRef::new("apps", "demo")
            ),
            None
        );
        let plain = json!({"metadata": {"name": "demo"}, "spec": {}});
        assert_eq!(
            effective_app(&plain, Some(&built(json!({"packages": ["a"]})))),
            plain
        );
    }

    fn statefulset() -> Value {
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "demo-app", "namespace": "apps"},
            "spec": {"template": {
                "metadata": {"labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "demo"}},
                "spec": {"containers": [{"name": "kaspr", "image": "kaspr:1"}]}}}})
    }

    fn mutated(object: &Value, app: &Value) -> Value {
        let outcome = crate::admission::mutate_object(
            crate::mutation::ObjectKind::StatefulSet,
            object,
            app,
            &crate::config::RenderConfig::default(),
        )
        .expect("allowed");
        let mut patched = object.clone();
        json_patch::patch(&mut patched, &outcome.patch).expect("patch applies");
        patched
    }

    #[test]
    fn the_webhook_renders_the_set_idempotently_and_builds_off_removes_it() {
        let state = built(json!({"packages": ["old==1"]}));
        let effective = effective_app(&app(), Some(&state));
        let sts = mutated(&statefulset(), &effective);
        let template = &sts["spec"]["template"];
        assert_eq!(
            template["metadata"]["annotations"][names::SET_ANNOTATION],
            "00000000000000aa"
        );
        let init = &template["spec"]["initContainers"][0];
        let config_text = init["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == names::CONFIG_ENV)
            .and_then(|e| e["value"].as_str())
            .expect("config");
        let config: Value = serde_json::from_str(config_text).expect("json");
        assert_eq!(config["packages"], json!(["old==1"]));
        assert_eq!(
            config["restore"],
            json!({"set": "00000000000000aa",
            "lockFile": "/var/run/kaspr-packages/lock/pylock.toml", "awaitSeconds": (1 + 3) * 600 + 300})
        );
        let lock_volume = template["spec"]["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == names::LOCK_VOLUME)
            .expect("lock volume")
            .clone();
        assert_eq!(
            lock_volume["configMap"],
            json!({"name": "demo-python-packages-lock", "optional": true,
            "items": [{"key": "00000000000000aa.pylock.toml", "path": "pylock.toml"}]})
        );
        // Rendering again (an operator rewrite, a reinvocation) changes nothing.
        assert_eq!(mutated(&sts, &effective), sts);
        // Builds off: the plain app renders install-at-start again, without the set's traces.
        let off = mutated(&sts, &app());
        let text = off.to_string();
        assert!(
            !text.contains(names::SET_ANNOTATION) && !text.contains(names::LOCK_VOLUME),
            "{text}"
        );
        assert_eq!(off, mutated(&statefulset(), &app()));
    }

    #[test]
    fn the_rollout_check_waits_for_a_new_built_set_then_rolls() {
        let app_ref = AppRef::new("apps", "demo");
        let config = crate::config::RenderConfig::default();
        let old = effective_app(&app(), Some(&built(json!({"packages": ["old==1"]}))));
        let sts = mutated(&statefulset(), &old);
        let template = &sts["spec"]["template"];
        let check = |effective: &Value| {
            let spec = spec_of(effective);
            let set = set_for(effective, template, &spec, &app_ref);
            crate::controller::rollout::sync_state_set(
                template,
                Some(&spec),
                &app_ref,
                &config,
                set.as_ref(),
            )
        };
        // The KasprApp now asks for new==2, but its set is not built: nothing to roll.
        assert!(check(&old).in_sync());
        // Once the new set is current, the StatefulSet is out of date.
        let mut newer = built(json!({"packages": ["new==2"]}));
        newer.current = None;
        newer.sets[0].id = "00000000000000bb".into();
        let newer = newer.with_built("00000000000000bb", "sha");
        assert!(!check(&effective_app(&app(), Some(&newer))).in_sync());
    }

    #[test]
    fn the_first_set_once_built_renders_the_template_the_pods_awaited_it_with() {
        let awaiting = effective_app(&app(), None);
        let sts = mutated(&statefulset(), &awaiting);
        let id = sts["spec"]["template"]["metadata"]["annotations"][names::SET_ANNOTATION]
            .as_str()
            .expect("set")
            .to_owned();
        let mut state = built(app()["spec"]["pythonPackages"].clone());
        state.current = None;
        state.sets[0].id.clone_from(&id);
        let state = state.with_built(&id, "sha");
        let built_app = effective_app(&app(), Some(&state));
        assert_eq!(
            mutated(&sts, &built_app),
            sts,
            "no second rollout once the first set is built"
        );
    }
}
