//! The rollout trigger: whether an app's StatefulSet carries the injection the webhook would
//! render for it now, and the patch that makes the API server send it through the webhook.
//!
//! The desired state is not rendered here: [`sync_state`] runs the webhook's own
//! [`mutation::apply`] on a copy of the StatefulSet's pod template and compares our annotations
//! (template hash, install key, record) before and after. Because the webhook strips and
//! re-injects, a template that already carries the current injection comes out with the same
//! annotations; anything else (a changed spec, removed `pythonPackages`, a template admitted
//! while the webhook was bypassed) does not.
//!
//! The stored template is also handed in as the previous one, exactly as the API server hands
//! the webhook an UPDATE's oldObject: an injection of another rendering revision with the same
//! config hash is what every webhook keeps, so it is in sync (docs/revisions.md). Two
//! controllers of different revisions therefore never rewrite each other's annotations.

use serde_json::{Value, json};

use crate::app::AppRef;
use crate::config::RenderConfig;
use crate::mutation;
use crate::mutation::record::Record;
use crate::names::{ANNOTATIONS, TEMPLATE_HASH_ANNOTATION};
use crate::spec::PythonPackages;

/// Where a StatefulSet stands against the KasprApp's spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncState {
    InSync,
    /// The webhook would render something else; `current` and `desired` are the template
    /// hashes (absent when there is no injection).
    OutOfSync {
        current: Option<String>,
        desired: Option<String>,
    },
    /// The webhook would refuse this StatefulSet (for example a name collision); an UPDATE
    /// cannot help, so nothing is patched.
    Blocked(String),
}

impl SyncState {
    pub fn in_sync(&self) -> bool {
        matches!(self, SyncState::InSync)
    }
}

fn annotation<'a>(template: &'a Value, key: &str) -> Option<&'a str> {
    template
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
}

/// Compares a StatefulSet's pod template with what the webhook would make of it.
pub fn sync_state(
    template: &Value,
    spec: Option<&PythonPackages>,
    app: &AppRef,
    config: &RenderConfig,
) -> SyncState {
    sync_state_set(template, spec, app, config, None)
}

/// [`sync_state`] for a webhook that renders package `set` (builds on).
pub fn sync_state_set(
    template: &Value,
    spec: Option<&PythonPackages>,
    app: &AppRef,
    config: &RenderConfig,
    set: Option<&crate::builds::render::PackageSet>,
) -> SyncState {
    sync_state_marked(template, spec, app, config, set, false)
}

/// [`sync_state_set`] for a StatefulSet that may carry the mark to move to this revision
/// (`marked`): then only this revision's own injection is in sync.
pub fn sync_state_marked(
    template: &Value,
    spec: Option<&PythonPackages>,
    app: &AppRef,
    config: &RenderConfig,
    set: Option<&crate::builds::render::PackageSet>,
    marked: bool,
) -> SyncState {
    let mut rendered = template.clone();
    // The stored injection of another revision, for the same app configuration, is kept: it is
    // what any webhook would render for this template's next UPDATE, unless it is marked.
    if let Err(denial) = mutation::apply_keeping(
        &mut rendered,
        (!marked).then_some(template),
        spec,
        app,
        "spec.template.spec",
        config,
        set,
    ) {
        return SyncState::Blocked(denial.message);
    }
    fn ours(template: &Value) -> Vec<Option<&str>> {
        ANNOTATIONS
            .iter()
            .map(|key| annotation(template, key))
            .collect()
    }
    let current = annotation(template, TEMPLATE_HASH_ANNOTATION).map(str::to_owned);
    let desired = annotation(&rendered, TEMPLATE_HASH_ANNOTATION).map(str::to_owned);
    let present = spec.is_none()
        || desired.is_none()
        || Record::read(rendered.get("metadata")).present_in(template);
    if ours(template) == ours(&rendered) && present {
        return SyncState::InSync;
    }
    SyncState::OutOfSync { current, desired }
}

/// How long a rollout of a taken-over app waits for the Kaspr operator: longer than its 30 s
/// watch loop, which replaces the template when its own rendering (its `PACKAGES_HASH`)
/// changes. A rollout of ours before that would carry the operator's old hash and be followed
/// by the operator's: two revisions for one change.
pub const OPERATOR_GRACE: std::time::Duration = std::time::Duration::from_secs(45);

/// Whether the operator takes part in this app's rollouts: its template is taken over (our
/// installer runs as `install-packages`) and stays so.
pub fn operator_drives(
    template: &Value,
    spec: Option<&PythonPackages>,
    config: &RenderConfig,
) -> bool {
    let Some(spec) = spec else {
        return false;
    };
    let takeover = spec.operator_packages.unwrap_or(config.operator_packages)
        == crate::spec::OperatorPackages::Takeover;
    takeover
        && Record::read(template.get("metadata"))
            .init_containers
            .iter()
            .any(|n| n == crate::names::OPERATOR_INIT_CONTAINER)
}

/// The merge patch that sends a StatefulSet through the webhook again: it removes the template
/// hash annotation, which only the webhook sets.
///
/// Removing rather than writing the new hash keeps the hash an honest witness: if the UPDATE
/// bypasses the webhook (`failurePolicy: Ignore` while it is down), the StatefulSet ends up
/// without a hash and stays visibly out of sync, instead of carrying the new hash over an old
/// injection. When the webhook renders exactly what is stored (its cache not yet updated),
/// the API server sees no change and writes nothing, so no new ControllerRevision appears.
pub fn resync_patch() -> Value {
    json!({"spec": {"template": {"metadata": {"annotations": {TEMPLATE_HASH_ANNOTATION: null}}}}})
}

/// How long, by default (`--unreachable-grace`), the API server may fail to reach this webhook
/// for an app before that app gets a Warning Event. At install and upgrade the controller starts before its own Service has
/// endpoints (or the API server has read the new registration); that is not worth an alarm.
pub const UNREACHABLE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether the API server refused an update because it could not call one of this product's
/// webhooks (no endpoints, connection refused, TLS, timeout), as opposed to any other refusal.
pub fn webhook_unreachable(message: &str) -> bool {
    message.contains("failed calling webhook")
        && message
            .split('"')
            .any(|quoted| quoted.ends_with(".packages.kaspr.io"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_failed_call_of_our_own_webhook_counts_as_unreachable() {
        let ours = "Internal error occurred: failed calling webhook \"statefulsets.packages.kaspr.io\": \
                    failed to call webhook: Post \"https://kpw.kaspr.svc:443/mutate?timeout=10s\": \
                    no endpoints available for service \"kpw\"";
        assert!(webhook_unreachable(ours));
        let other = "Internal error occurred: failed calling webhook \"validate.kyverno.svc\": EOF";
        assert!(!webhook_unreachable(other));
        assert!(!webhook_unreachable("statefulsets.apps \"x\" is forbidden"));
        // A denial by our webhook is an answer, not an unreachable webhook.
        assert!(!webhook_unreachable(
            "admission webhook \"statefulsets.packages.kaspr.io\" denied the request: bad"
        ));
    }

    use super::*;
    use rstest::rstest;

    fn spec(packages: &[&str]) -> PythonPackages {
        PythonPackages::with_packages(packages)
    }

    fn app() -> AppRef {
        AppRef::new("apps", "demo")
    }

    fn operator_template() -> Value {
        json!({
            "metadata": {"labels": {"kaspr.io/app": "demo", "kaspr.io/kind": "KasprApp"}},
            "spec": {
                "containers": [{
                    "name": "kaspr", "image": "kaspr:1", "imagePullPolicy": "IfNotPresent",
                    "env": [{"name": "PYTHONPATH", "value": "/app/lib"}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }],
                "volumes": [{"name": "data", "emptyDir": {}}],
            }
        })
    }

    /// The template as the webhook stores it for `spec`.
    fn injected(spec: &PythonPackages) -> Value {
        injected_by(spec, &RenderConfig::default())
    }

    fn state(template: &Value, spec: Option<&PythonPackages>) -> SyncState {
        sync_state(template, spec, &app(), &RenderConfig::default())
    }

    fn hash(template: &Value) -> Option<String> {
        annotation(template, TEMPLATE_HASH_ANNOTATION).map(str::to_owned)
    }

    #[test]
    fn the_current_injection_is_in_sync() {
        let one = spec(&["a==1"]);
        assert_eq!(state(&injected(&one), Some(&one)), SyncState::InSync);
    }

    #[test]
    fn no_packages_and_no_injection_is_in_sync() {
        assert_eq!(state(&operator_template(), None), SyncState::InSync);
    }

    #[test]
    fn a_package_change_is_out_of_sync_with_both_hashes() {
        let (one, two) = (spec(&["a==1"]), spec(&["a==2"]));
        let stored = injected(&one);
        assert_eq!(
            state(&stored, Some(&two)),
            SyncState::OutOfSync {
                current: hash(&stored),
                desired: hash(&injected(&two)),
            }
        );
    }

    #[test]
    fn removed_packages_with_our_annotations_still_present_are_out_of_sync() {
        let stored = injected(&spec(&["a==1"]));
        assert_eq!(
            state(&stored, None),
            SyncState::OutOfSync {
                current: hash(&stored),
                desired: None,
            }
        );
    }

    #[test]
    fn a_template_admitted_without_the_webhook_is_out_of_sync() {
        let one = spec(&["a==1"]);
        assert_eq!(
            state(&operator_template(), Some(&one)),
            SyncState::OutOfSync {
                current: None,
                desired: hash(&injected(&one)),
            }
        );
    }

    #[rstest]
    #[case::init_container_dropped("/spec/initContainers")]
    #[case::volumes_rewritten("/spec/volumes")]
    #[case::mounts_rewritten("/spec/containers/0/volumeMounts")]
    #[case::env_rewritten("/spec/containers/0/env")]
    fn a_partly_lost_injection_with_our_annotations_is_out_of_sync(#[case] pointer: &str) {
        let one = spec(&["a==1"]);
        let mut stored = injected(&one);
        let operator = operator_template();
        let replacement = operator.pointer(pointer).cloned().unwrap_or(json!([]));
        *stored.pointer_mut(pointer).expect("field") = replacement;
        assert!(matches!(
            state(&stored, Some(&one)),
            SyncState::OutOfSync { current, desired } if current == desired
        ));
    }

    #[test]
    fn a_name_collision_is_blocked_not_patched() {
        let mut template = operator_template();
        template["spec"]["initContainers"] = json!([{"name": "kaspr-packages", "image": "x"}]);
        assert!(matches!(
            state(&template, Some(&spec(&["a==1"]))),
            SyncState::Blocked(message) if message.contains("kaspr-packages")
        ));
    }

    #[test]
    fn the_operators_own_installer_is_left_alone() {
        let mut template = operator_template();
        template["spec"]["initContainers"] = json!([{"name": "install-packages", "image": "x"}]);
        assert_eq!(state(&template, Some(&spec(&["a==1"]))), SyncState::InSync);
    }

    #[test]
    fn the_resync_patch_removes_only_the_hash() {
        let one = spec(&["a==1"]);
        let mut statefulset = json!({"spec": {"template": injected(&one)}});
        json_patch::merge(&mut statefulset, &resync_patch());
        let stored = statefulset["spec"]["template"].clone();
        assert_eq!(hash(&stored), None);
        assert!(annotation(&stored, crate::names::INJECTED_ANNOTATION).is_some());
        // What the webhook then does with the patched object restores the injection exactly.
        let mut again = stored;
        mutation::apply(
            &mut again,
            Some(&one),
            &app(),
            "spec.template.spec",
            &RenderConfig::default(),
        )
        .expect("inject");
        assert_eq!(again, injected(&one));
    }

    fn revision(name: &str, memory: &str) -> RenderConfig {
        RenderConfig {
            default_resources: Some(
                serde_json::from_value(json!({"limits": {"memory": memory}})).expect("resources"),
            ),
            revision: Some(name.into()),
            ..RenderConfig::default()
        }
    }

    /// The template as a webhook with `config` stores it for `spec`.
    fn injected_by(spec: &PythonPackages, config: &RenderConfig) -> Value {
        let mut template = operator_template();
        mutation::apply(
            &mut template,
            Some(spec),
            &app(),
            "spec.template.spec",
            config,
        )
        .expect("inject");
        template
    }

    #[test]
    fn another_revision_of_the_same_configuration_is_in_sync_both_ways() {
        let one = spec(&["a==1"]);
        let (a, b) = (revision("a", "512Mi"), revision("b", "1Gi"));
        let by_a = injected_by(&one, &a);
        let by_b = injected_by(&one, &b);
        assert_ne!(by_a, by_b);
        for (stored, controller) in [(&by_a, &b), (&by_b, &a), (&by_a, &a), (&by_b, &b)] {
            assert_eq!(
                sync_state(stored, Some(&one), &app(), controller),
                SyncState::InSync
            );
        }
    }

    #[test]
    fn a_configuration_change_moves_the_app_to_the_controllers_revision() {
        let (one, two) = (spec(&["a==1"]), spec(&["a==2"]));
        let b = revision("b", "1Gi");
        let stored = injected_by(&one, &revision("a", "512Mi"));
        assert_eq!(
            sync_state(&stored, Some(&two), &app(), &b),
            SyncState::OutOfSync {
                current: hash(&stored),
                desired: hash(&injected_by(&two, &b)),
            }
        );
        // A revision's injection that lost a part is not kept, whoever looks.
        let mut damaged = stored;
        damaged["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("initContainers");
        assert!(!sync_state(&damaged, Some(&one), &app(), &b).in_sync());
    }

    /// A template from before revisions existed records none: it moves once, to the
    /// controller's revision, and is then in sync.
    #[test]
    fn a_template_without_a_revision_moves_once() {
        let one = spec(&["a==1"]);
        let b = revision("b", "1Gi");
        let mut legacy = injected_by(&one, &revision("a", "512Mi"));
        let annotations = legacy["metadata"]["annotations"]
            .as_object_mut()
            .expect("annotations");
        annotations.remove(crate::names::REVISION_ANNOTATION);
        annotations.remove(crate::names::CONFIG_HASH_ANNOTATION);
        assert!(!sync_state(&legacy, Some(&one), &app(), &b).in_sync());
        assert_eq!(
            sync_state(&injected_by(&one, &b), Some(&one), &app(), &b),
            SyncState::InSync
        );
    }

    fn operator_install(hash: &str) -> Value {
        json!({"name": "install-packages", "image": "kaspr:1", "command": ["/bin/bash", "-c", "pip install a==1"],
               "env": [{"name": "PACKAGES_HASH", "value": hash}]})
    }

    #[test]
    fn a_taken_over_app_is_in_sync_and_the_operator_drives_its_rollouts() {
        let mut takeover = spec(&["a==1"]);
        takeover.operator_packages = Some(crate::spec::OperatorPackages::Takeover);
        let mut template = operator_template();
        template["spec"]["initContainers"] = json!([operator_install("h1")]);
        // The operator's own installer under takeover: out of sync, and ours to replace now.
        assert!(!state(&template, Some(&takeover)).in_sync());
        let config = RenderConfig::default();
        assert!(!operator_drives(&template, Some(&takeover), &config));
        mutation::apply(
            &mut template,
            Some(&takeover),
            &app(),
            "spec.template.spec",
            &config,
        )
        .expect("takeover");
        assert_eq!(state(&template, Some(&takeover)), SyncState::InSync);
        // Taken over: a package change waits for the operator's own rewrite first.
        let changed = PythonPackages {
            packages: vec!["a==2".into()],
            ..takeover.clone()
        };
        assert!(!state(&template, Some(&changed)).in_sync());
        assert!(operator_drives(&template, Some(&changed), &config));
        // Back to respect, or packages removed: ours to do at once.
        let respect = PythonPackages {
            operator_packages: Some(crate::spec::OperatorPackages::Respect),
            ..takeover
        };
        assert!(!operator_drives(&template, Some(&respect), &config));
        assert!(!operator_drives(&template, None, &config));
    }
}
