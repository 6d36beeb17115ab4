//! `explain` from fetched objects to a report: one case per reason an object is or is not
//! injected, checked by its lines and exit status.

use serde_json::{Value, json};

use super::*;
use crate::app::AppRef;
use crate::config::RenderConfig;
use crate::mutation;

const NS: &str = "apps";

fn kasprapp(python_packages: Option<Value>) -> Value {
    let mut app = json!({"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp",
        "metadata": {"name": "demo", "namespace": NS, "uid": "app-uid"},
        "spec": {"bootstrapServers": "kafka:9092"}});
    if let Some(packages) = python_packages {
        app["spec"]["pythonPackages"] = packages;
    }
    app
}

fn packages(list: &[&str]) -> Option<Value> {
    Some(json!({"packages": list}))
}

/// The chart's configuration, excluding kube-system and the release namespace.
fn configuration() -> Value {
    let selector = json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name",
        "operator": "NotIn", "values": ["kube-system", "kaspr-system"]}]});
    json!({"metadata": {"name": "kaspr-packages-webhook"}, "webhooks": [
        {"name": "statefulsets.packages.kaspr.io",
         "rules": [{"apiGroups": ["apps"], "resources": ["statefulsets"], "operations": ["CREATE", "UPDATE"]}],
         "matchConditions": [{"name": "owned-by-kasprapp", "expression": "..."}],
         "namespaceSelector": selector},
        {"name": "pods.packages.kaspr.io",
         "rules": [{"apiGroups": [""], "resources": ["pods"], "operations": ["CREATE"]}],
         "objectSelector": {"matchLabels": {"kaspr.io/kind": "KasprApp"}},
         "matchConditions": [{"name": "not-from-an-injected-template", "expression": "..."}],
         "namespaceSelector": selector},
    ]})
}

fn validating() -> Value {
    json!({"metadata": {"name": "kaspr-packages-webhook"}, "webhooks": [
        {"name": "kasprapps.packages.kaspr.io",
         "rules": [{"apiGroups": ["kaspr.io"], "resources": ["kasprapps"], "operations": ["CREATE", "UPDATE"]}],
         "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name",
            "operator": "NotIn", "values": ["kube-system", "kaspr-system"]}]}}]})
}

fn operator_statefulset(namespace: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "demo-app", "namespace": namespace,
            "ownerReferences": [{"apiVersion": "kaspr.io/v1alpha1", "kind": "KasprApp", "name": "demo", "uid": "app-uid"}]},
        "spec": {"selector": {"matchLabels": {"kaspr.io/app": "demo"}},
            "template": {"metadata": {"labels": {"kaspr.io/kind": "KasprApp", "kaspr.io/app": "demo"}},
                "spec": {"containers": [{"name": "kaspr", "image": "kaspr:1"}]}}}})
}

/// The StatefulSet as the webhook stores it for the app's `pythonPackages`.
fn injected_statefulset(python_packages: Option<Value>) -> Value {
    let mut sts = operator_statefulset(NS);
    let report = crate::validation::validate_kasprapp(&kasprapp(python_packages));
    mutation::apply(
        &mut sts["spec"]["template"],
        report.spec.as_ref(),
        &AppRef::new(NS, "demo"),
        "spec.template.spec",
        &RenderConfig::default(),
    )
    .expect("inject");
    sts
}

/// A pod of `sts`, as the StatefulSet controller creates it, with the API server's defaults.
fn pod_of(sts: &Value, namespace: &str) -> Value {
    let mut pod = sts["spec"]["template"].clone();
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!("demo-app-0");
    pod["metadata"]["namespace"] = json!(namespace);
    pod["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "demo-app"}]);
    if let Some(init) = pod.pointer_mut("/spec/initContainers/0") {
        init["terminationMessagePath"] = json!("/dev/termination-log");
    }
    pod
}

fn snapshot(kind: Kind, object: Value, app: Option<Value>) -> Snapshot {
    let mut snapshot = Snapshot::of(kind, object);
    snapshot.namespace = Known::Found(json!({"metadata": {"name": NS,
        "labels": {"kubernetes.io/metadata.name": NS}}}));
    snapshot.mutating = Known::Found(configuration());
    snapshot.validating = Known::Found(validating());
    snapshot.kasprapp = app;
    snapshot
}

fn has_line(report: &Report, severity: Severity, fragment: &str) -> bool {
    report
        .lines
        .iter()
        .any(|l| l.severity == severity && l.text.contains(fragment))
}

fn assert_line(report: &Report, severity: Severity, fragment: &str) {
    assert!(
        has_line(report, severity, fragment),
        "no {severity:?} line with {fragment:?} in:\n{}",
        report.to_text()
    );
}

#[test]
fn an_injected_current_pod_exits_0_and_shows_its_install() {
    let sts = injected_statefulset(packages(&["a==1"]));
    let mut pod = pod_of(&sts, NS);
    pod["status"] = json!({"initContainerStatuses": [{"name": "kaspr-packages", "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": "installed 1 package"}}}]});
    let mut snapshot = snapshot(Kind::Pod, pod, Some(kasprapp(packages(&["a==1"]))));
    snapshot.owner = Some(Known::Found(sts));
    let report = explain(&snapshot);
    assert_eq!(report.exit_code, 0, "{}", report.to_text());
    assert_line(
        &report,
        Severity::Ok,
        "namespace apps is served by webhook pods.packages.kaspr.io of kaspr-packages-webhook",
    );
    assert_line(
        &report,
        Severity::Ok,
        "KasprApp apps/demo is valid: 1 package(s), emptyDir mode",
    );
    assert_line(&report, Severity::Ok, "injected and current: template hash");
    assert_line(
        &report,
        Severity::Ok,
        "init container kaspr-packages: completed, exit code 0 (Completed): installed 1 package",
    );
    assert_eq!(report.template_hash, report.desired_template_hash);
    assert!(report.template_hash.is_some());
}

#[test]
fn a_pod_in_an_excluded_namespace_exits_3() {
    let sts = operator_statefulset("kaspr-system");
    let pod = pod_of(&sts, "kaspr-system");
    let mut snapshot = snapshot(Kind::Pod, pod, Some(kasprapp(packages(&["a==1"]))));
    snapshot.namespace = Known::Unreadable("forbidden".into());
    snapshot.owner = Some(Known::Found(sts));
    let report = explain(&snapshot);
    assert_eq!(report.exit_code, 3, "{}", report.to_text());
    assert_line(
        &report,
        Severity::NotInjected,
        "namespace kaspr-system is excluded by the configuration: webhook pods.packages.kaspr.io of kaspr-packages-webhook: its namespaceSelector requires kubernetes.io/metadata.name NotIn [kube-system, kaspr-system]",
    );
    assert_line(
        &report,
        Severity::Info,
        "Namespace kaspr-system could not be read (forbidden)",
    );
    assert_line(
        &report,
        Severity::NotInjected,
        "the API server does not call the webhook for it",
    );
    assert!(
        !has_line(&report, Severity::Problem, ""),
        "{}",
        report.to_text()
    );
}

#[test]
fn a_pod_that_belongs_to_no_app_or_to_a_missing_one_exits_3() {
    let pod = json!({"metadata": {"name": "web-0", "namespace": NS, "labels": {"app": "web"}}, "spec": {}});
    let report = explain(&snapshot(Kind::Pod, pod, None));
    assert_eq!(report.exit_code, 3);
    assert_line(
        &report,
        Severity::NotInjected,
        "objectSelector requires kaspr.io/kind=KasprApp",
    );
    assert_line(&report, Severity::NotInjected, "not a KasprApp's pod");

    let pod = pod_of(&operator_statefulset(NS), NS);
    let report = explain(&snapshot(Kind::Pod, pod, None));
    assert_eq!(report.exit_code, 3);
    assert_line(
        &report,
        Severity::NotInjected,
        "KasprApp apps/demo does not exist",
    );
}

#[test]
fn an_app_without_packages_and_no_webhook_installed_exit_3() {
    let pod = pod_of(&operator_statefulset(NS), NS);
    let report = explain(&snapshot(Kind::Pod, pod.clone(), Some(kasprapp(None))));
    assert_eq!(report.exit_code, 3, "{}", report.to_text());
    assert_line(
        &report,
        Severity::NotInjected,
        "has no spec.pythonPackages: nothing to inject",
    );

    let mut bare = snapshot(Kind::Pod, pod, Some(kasprapp(packages(&["a==1"]))));
    bare.mutating = Known::Missing;
    let report = explain(&bare);
    assert_eq!(report.exit_code, 3, "{}", report.to_text());
    assert_line(
        &report,
        Severity::NotInjected,
        "kaspr-packages-webhook is not installed",
    );
}

#[test]
fn a_pod_admitted_without_the_webhook_is_a_problem() {
    let pod = pod_of(&operator_statefulset(NS), NS);
    let report = explain(&snapshot(
        Kind::Pod,
        pod,
        Some(kasprapp(packages(&["a==1"]))),
    ));
    assert_eq!(report.exit_code, 4, "{}", report.to_text());
    assert_line(
        &report,
        Severity::Problem,
        "not injected although its KasprApp lists packages",
    );
    assert!(
        report
            .differences
            .contains(&"init container kaspr-packages: missing".to_owned())
    );
}

#[test]
fn an_invalid_app_lists_every_error_with_its_path_and_exits_4() {
    let app = kasprapp(Some(
        json!({"packages": ["requests; rm -rf /", "-e ."], "installPolicy": {"retries": 99}}),
    ));
    let report = explain(&snapshot(Kind::KasprApp, app, None));
    assert_eq!(report.exit_code, 4, "{}", report.to_text());
    assert_eq!(
        report.validation_errors.len(),
        3,
        "{:?}",
        report.validation_errors
    );
    for path in [
        "spec.pythonPackages.packages[0]: ",
        "spec.pythonPackages.packages[1]: ",
        "spec.pythonPackages.installPolicy.retries: ",
    ] {
        assert_line(&report, Severity::Problem, path);
    }
    assert_line(
        &report,
        Severity::Ok,
        "namespace apps is served by webhook kasprapps.packages.kaspr.io",
    );
}

#[test]
fn an_out_of_date_statefulset_names_both_hashes_and_what_differs() {
    let sts = injected_statefulset(packages(&["a==1"]));
    let old_hash =
        sts["spec"]["template"]["metadata"]["annotations"]["packages.kaspr.io/template-hash"]
            .clone();
    let mut snapshot = snapshot(
        Kind::StatefulSet,
        sts.clone(),
        Some(kasprapp(packages(&["a==2"]))),
    );
    snapshot.pods = Known::Found(vec![pod_of(&sts, NS)]);
    let report = explain(&snapshot);
    assert_eq!(report.exit_code, 4, "{}", report.to_text());
    assert_eq!(report.template_hash.as_deref(), old_hash.as_str());
    assert_ne!(report.desired_template_hash, report.template_hash);
    assert_line(&report, Severity::Problem, "out of date: template hash");
    assert_line(&report, Severity::Problem, "what differs:\ninstall key: ");
    assert_eq!(
        report.differences[1],
        "installer settings (KASPR_PACKAGES_CONFIG): installKey, packages"
    );
    assert_line(&report, Severity::Problem, "pods not on template hash");
    assert_line(
        &report,
        Severity::Ok,
        "webhook statefulsets.packages.kaspr.io matches: rules cover UPDATE of statefulsets, matchConditions hold: owned-by-kasprapp",
    );
}

#[test]
fn a_current_statefulset_with_current_pods_exits_0() {
    let sts = injected_statefulset(packages(&["a==1"]));
    let mut snapshot = snapshot(
        Kind::StatefulSet,
        sts.clone(),
        Some(kasprapp(packages(&["a==1"]))),
    );
    snapshot.pods = Known::Found(vec![pod_of(&sts, NS)]);
    let report = explain(&snapshot);
    assert_eq!(report.exit_code, 0, "{}", report.to_text());
    assert_line(&report, Severity::Ok, "pods: all 1 carry template hash");
    assert_line(
        &report,
        Severity::Info,
        "belongs to KasprApp demo (its ownerReference)",
    );
}

#[test]
fn a_pod_waiting_for_the_rollout_says_so() {
    let old = injected_statefulset(packages(&["a==1"]));
    let new = injected_statefulset(packages(&["a==2"]));
    let mut snapshot = snapshot(
        Kind::Pod,
        pod_of(&old, NS),
        Some(kasprapp(packages(&["a==2"]))),
    );
    snapshot.owner = Some(Known::Found(new));
    let report = explain(&snapshot);
    assert_eq!(report.exit_code, 4, "{}", report.to_text());
    assert_line(&report, Severity::Problem, "out of date: template hash");
    assert_line(
        &report,
        Severity::Info,
        "already carries the current template",
    );
}

#[test]
fn the_operators_own_installer_is_not_injected_by_design() {
    let mut sts = operator_statefulset(NS);
    sts["spec"]["template"]["spec"]["initContainers"] =
        json!([{"name": "install-packages", "image": "kaspr:1"}]);
    let report = explain(&snapshot(
        Kind::StatefulSet,
        sts,
        Some(kasprapp(packages(&["a==1"]))),
    ));
    assert_eq!(report.exit_code, 3, "{}", report.to_text());
    assert_line(
        &report,
        Severity::NotInjected,
        "own \"install-packages\" init container",
    );
}

#[test]
fn pvc_mode_reports_the_claim_and_a_missing_one_is_a_problem() {
    let pvc = packages(&["a==1"]).map(|mut p| {
        p["cache"] = json!({"enabled": true});
        p
    });
    let sts = injected_statefulset(pvc.clone());
    let mut snapshot = snapshot(Kind::KasprApp, kasprapp(pvc), None);
    snapshot.statefulsets = vec![sts];
    snapshot.claim = Some(Known::Missing);
    let report = explain(&snapshot);
    assert_eq!(report.exit_code, 4, "{}", report.to_text());
    assert_line(
        &report,
        Severity::Ok,
        "StatefulSet demo-app: injected and current",
    );
    assert_line(
        &report,
        Severity::Problem,
        "PVC demo-python-packages does not exist",
    );

    snapshot.claim = Some(Known::Found(
        json!({"metadata": {"name": "demo-python-packages",
        "labels": {"app.kubernetes.io/managed-by": "kaspr-packages-webhook", "kaspr.io/component": "python-packages"},
        "ownerReferences": [{"uid": "app-uid"}]},
        "spec": {"resources": {"requests": {"storage": "256Mi"}}}, "status": {"phase": "Bound"}}),
    ));
    let report = explain(&snapshot);
    assert_eq!(report.exit_code, 0, "{}", report.to_text());
    assert!(
        report
            .to_text()
            .starts_with("KasprApp apps/demo: valid, and what it owns is current\n")
    );
}

#[test]
fn the_controllers_namespaces_are_named_when_they_leave_this_one_out() {
    let sts = injected_statefulset(packages(&["a==1"]));
    let mut snapshot = snapshot(Kind::StatefulSet, sts, Some(kasprapp(packages(&["a==1"]))));
    snapshot.server.watch_namespaces = vec!["team-b".into()];
    let report = explain(&snapshot);
    assert_eq!(report.exit_code, 0);
    assert_line(
        &report,
        Severity::Info,
        "the controller watches only team-b",
    );
}

#[test]
fn the_json_form_carries_the_verdict_and_the_lines() {
    let sts = injected_statefulset(packages(&["a==1"]));
    let report = explain(&snapshot(
        Kind::StatefulSet,
        sts,
        Some(kasprapp(packages(&["a==2"]))),
    ));
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["verdict"], "problem");
    assert_eq!(json["exitCode"], 4);
    assert_eq!(json["kind"], "StatefulSet");
    assert!(
        json["differences"]
            .as_array()
            .is_some_and(|d| !d.is_empty())
    );
    assert!(
        json["lines"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l["severity"] == "problem"))
    );
}

#[test]
fn a_statefulset_of_another_rendering_revision_is_current_and_named() {
    let sts = injected_statefulset(packages(&["a==1"]));
    let stored_hash =
        sts["spec"]["template"]["metadata"]["annotations"]["packages.kaspr.io/template-hash"]
            .clone();
    let stored_revision = RenderConfig::default().revision().into_owned();
    let mut snapshot = snapshot(
        Kind::StatefulSet,
        sts.clone(),
        Some(kasprapp(packages(&["a==1"]))),
    );
    snapshot.pods = Known::Found(vec![pod_of(&sts, NS)]);
    // The deployed webhook renders another revision: other default resources, another name.
    snapshot.server.render = RenderConfig {
        default_resources: Some(
            serde_json::from_value(json!({"limits": {"memory": "1Gi"}})).expect("resources"),
        ),
        revision: Some("canary".into()),
        ..RenderConfig::default()
    };
    let report = explain(&snapshot);
    assert_eq!(report.exit_code, 0, "{}", report.to_text());
    assert_eq!(
        report.desired_template_hash.as_deref(),
        stored_hash.as_str()
    );
    assert_line(
        &report,
        Severity::Ok,
        &format!("rendering revision {stored_revision}"),
    );
}

// ---------------------------------------------------------------------------------------------
// Moves between rendering revisions

const NOW: i64 = 1_800_000_000;

fn at(second: i64) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(second).expect("timestamp")
}

/// The deployed webhook: revision "canary", other default resources than the stored template's.
fn canary(budget: u32) -> Server {
    Server {
        render: RenderConfig {
            default_resources: Some(
                serde_json::from_value(json!({"limits": {"memory": "1Gi"}})).expect("resources"),
            ),
            revision: Some("canary".into()),
            ..RenderConfig::default()
        },
        rollout: Rollout {
            budget,
            deadline: std::time::Duration::from_secs(600),
        },
        ..Server::default()
    }
}

/// The app's StatefulSet rendered by the canary revision (as a marked UPDATE renders it).
fn moved_statefulset() -> Value {
    let mut sts = operator_statefulset(NS);
    let report = crate::validation::validate_kasprapp(&kasprapp(packages(&["a==1"])));
    mutation::apply(
        &mut sts["spec"]["template"],
        report.spec.as_ref(),
        &AppRef::new(NS, "demo"),
        "spec.template.spec",
        &canary(0).render,
    )
    .expect("inject");
    sts["metadata"]["generation"] = json!(2);
    sts["spec"]["replicas"] = json!(1);
    sts["status"] = json!({"observedGeneration": 2, "replicas": 1, "updatedReplicas": 0,
        "readyReplicas": 1, "currentRevision": "demo-app-1", "updateRevision": "demo-app-2"});
    sts
}

fn marked(mut sts: Value, revision: &str, started: &str) -> Value {
    sts["metadata"]["annotations"] = json!({
        "packages.kaspr.io/rollout-revision": revision,
        "packages.kaspr.io/rollout-started": started,
    });
    sts
}

fn explain_moves(sts: Value, app: Value, budget: u32) -> Report {
    let mut snapshot = snapshot(Kind::StatefulSet, sts, Some(app));
    snapshot.server = canary(budget);
    snapshot.now = at(NOW);
    explain(&snapshot)
}

#[test]
fn an_app_on_another_revision_stays_or_waits_under_the_budget() {
    let stored = RenderConfig::default().revision().into_owned();
    let sts = injected_statefulset(packages(&["a==1"]));
    let app = kasprapp(packages(&["a==1"]));

    let kept = explain_moves(sts.clone(), app.clone(), 0);
    assert_eq!(kept.exit_code, 0, "{}", kept.to_text());
    assert_line(
        &kept,
        Severity::Info,
        &format!(
            "stays on rendering revision {stored} (this release renders canary, rollout budget 0)"
        ),
    );
    assert_line(
        &kept,
        Severity::Info,
        "kubectl annotate kasprapp demo packages.kaspr.io/move-to-revision=canary",
    );

    let waiting = explain_moves(sts, app, 2);
    assert_eq!(waiting.exit_code, 0, "{}", waiting.to_text());
    assert_line(
        &waiting,
        Severity::Info,
        &format!(
            "waiting to move from rendering revision {stored} to canary under the rollout budget: at most 2 app(s) at a time"
        ),
    );
    assert!(!has_line(&waiting, Severity::Info, "stays on"));
}

#[test]
fn a_requested_move_is_named_with_who_asked() {
    let sts = injected_statefulset(packages(&["a==1"]));
    let mut app = kasprapp(packages(&["a==1"]));
    app["metadata"]["annotations"] = json!({"packages.kaspr.io/move-to-revision": "canary"});
    let report = explain_moves(sts.clone(), app, 0);
    assert_line(
        &report,
        Severity::Info,
        "a move to canary is requested by the KasprApp's annotation packages.kaspr.io/move-to-revision",
    );

    let mut snapshot = snapshot(
        Kind::StatefulSet,
        sts.clone(),
        Some(kasprapp(packages(&["a==1"]))),
    );
    snapshot.server = canary(0);
    snapshot.namespace = Known::Found(json!({"metadata": {"name": NS, "labels": {
        "kubernetes.io/metadata.name": NS, "packages.kaspr.io/move-to-revision": "canary"}}}));
    let report = explain(&snapshot);
    assert_line(
        &report,
        Severity::Info,
        "a move to canary is requested by its namespace's label",
    );

    // A request for a revision this release does not render: only that one acts on it.
    let mut app = kasprapp(packages(&["a==1"]));
    app["metadata"]["annotations"] = json!({"packages.kaspr.io/move-to-revision": "blue"});
    let report = explain_moves(sts, app, 0);
    assert_line(
        &report,
        Severity::Info,
        "asks for revision \"blue\", which this release does not render (canary)",
    );
    assert!(!has_line(&report, Severity::Info, "stays on"));
}

#[test]
fn a_marked_app_is_moving_since_its_start_until_the_deadline_fails_it() {
    let app = kasprapp(packages(&["a==1"]));
    let started = at(NOW - 30).to_string();
    let moving = explain_moves(
        marked(moved_statefulset(), "canary", &started),
        app.clone(),
        1,
    );
    assert_eq!(moving.exit_code, 0, "{}", moving.to_text());
    assert_line(
        &moving,
        Severity::Info,
        &format!(
            "moving to rendering revision canary since {started} (30s ago): it fails if not every replica is Ready on it within the rollout deadline 10m"
        ),
    );

    let long_ago = at(NOW - 11 * 60).to_string();
    let failed = explain_moves(
        marked(moved_statefulset(), "canary", &long_ago),
        app.clone(),
        1,
    );
    assert_eq!(failed.exit_code, 4, "{}", failed.to_text());
    assert_line(
        &failed,
        Severity::Problem,
        &format!(
            "the move to rendering revision canary failed: marked since {long_ago} (11m ago), not finished within the rollout deadline 10m"
        ),
    );
    assert_line(
        &failed,
        Severity::Problem,
        "kubectl annotate statefulset demo-app packages.kaspr.io/rollout-revision-",
    );

    // A damaged start time counts as past the deadline, as the controller counts it.
    let damaged = explain_moves(marked(moved_statefulset(), "canary", "yesterday"), app, 1);
    assert_eq!(damaged.exit_code, 4, "{}", damaged.to_text());
    assert_line(
        &damaged,
        Severity::Problem,
        "with an unreadable start time \"yesterday\" in packages.kaspr.io/rollout-started",
    );
}

#[test]
fn a_finished_move_and_another_revisions_move_are_told_apart() {
    let app = kasprapp(packages(&["a==1"]));
    let started = at(NOW - 30).to_string();
    let mut finished = moved_statefulset();
    finished["status"] = json!({"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1,
        "readyReplicas": 1, "currentRevision": "demo-app-2", "updateRevision": "demo-app-2"});
    let report = explain_moves(marked(finished, "canary", &started), app.clone(), 1);
    assert_eq!(report.exit_code, 0, "{}", report.to_text());
    assert_line(
        &report,
        Severity::Info,
        "moved to rendering revision canary: every replica is Ready on it; the controller clears it",
    );

    // Finished on another revision: its own controller clears the mark, not this release's.
    let stored_revision = RenderConfig::default().revision().into_owned();
    let mut other = injected_statefulset(packages(&["a==1"]));
    other["status"] = json!({"observedGeneration": 0, "replicas": 1, "updatedReplicas": 1,
        "readyReplicas": 1, "currentRevision": "demo-app-1", "updateRevision": "demo-app-1"});
    let report = explain_moves(marked(other, &stored_revision, &started), app.clone(), 1);
    assert_line(
        &report,
        Severity::Info,
        &format!(
            "moved to rendering revision {stored_revision}: every replica is Ready on it; that revision's controller clears it"
        ),
    );

    // Marked by the controller of another revision (old and new replicas side by side).
    let stored = injected_statefulset(packages(&["a==1"]));
    let report = explain_moves(marked(stored, "blue", &started), app, 1);
    assert_line(
        &report,
        Severity::Info,
        &format!(
            "moving to rendering revision blue since {started} (30s ago), by that revision's controller (this release renders canary)"
        ),
    );
    assert!(!has_line(&report, Severity::Info, "waiting to move"));
}

#[test]
fn a_kasprapp_reports_the_move_of_its_statefulset() {
    let app = kasprapp(packages(&["a==1"]));
    let mut snapshot = snapshot(Kind::KasprApp, app.clone(), Some(app));
    snapshot.statefulsets = vec![marked(
        moved_statefulset(),
        "canary",
        &at(NOW - 5).to_string(),
    )];
    snapshot.server = canary(1);
    snapshot.now = at(NOW);
    let report = explain(&snapshot);
    assert_line(
        &report,
        Severity::Info,
        "StatefulSet demo-app: moving to rendering revision canary since",
    );
}
