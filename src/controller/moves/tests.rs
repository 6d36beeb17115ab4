use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use rstest::rstest;
use serde_json::{Value, json};

use super::*;

const NOW: &str = "2026-12-03T12:00:00Z";

fn now() -> Timestamp {
    NOW.parse().expect("timestamp")
}

fn ago(seconds: i64) -> Option<Timestamp> {
    Some(now() - SignedDuration::from_secs(seconds))
}

fn policy(budget: u32) -> Policy {
    Policy {
        revision: "b".into(),
        budget,
        deadline: Duration::from_secs(600),
    }
}

/// An app on `revision`, settled, not marked.
fn on(name: &str, revision: &str) -> AppState {
    AppState {
        app: AppRef::new("apps", name),
        revision: revision.into(),
        mark: None,
        finished: true,
        requested: false,
    }
}

/// An app marked to move to `target` `seconds` ago; `finished` on `revision`.
fn marked(name: &str, revision: &str, target: &str, seconds: i64, finished: bool) -> AppState {
    AppState {
        mark: Some(Mark {
            revision: target.into(),
            started: ago(seconds),
        }),
        finished,
        ..on(name, revision)
    }
}

fn requested(mut app: AppState) -> AppState {
    app.requested = true;
    app
}

fn names(apps: &[AppRef]) -> Vec<&str> {
    apps.iter().map(|a| a.name.as_str()).collect()
}

#[rstest]
#[case::budget_zero_moves_nothing(0, &[], 3)]
#[case::budget_one_moves_the_first_by_name(1, &["a"], 2)]
#[case::budget_two_moves_two(2, &["a", "b"], 1)]
#[case::a_budget_above_the_apps_moves_them_all(5, &["a", "b", "c"], 0)]
fn the_budget_bounds_how_many_apps_start_moving(
    #[case] budget: u32,
    #[case] start: &[&str],
    #[case] waiting: usize,
) {
    let apps = [on("c", "a"), on("a", "a"), on("b", "a"), on("d", "b")];
    let plan = plan(&apps, &policy(budget), now());
    assert_eq!(names(&plan.start), start);
    assert_eq!(plan.waiting, waiting);
    assert_eq!(plan.rolling, start.len());
    assert!(plan.finish.is_empty() && !plan.stopped());
}

#[test]
fn an_app_still_rolling_holds_the_next_one_back() {
    let apps = [marked("a", "b", "b", 30, false), on("b", "a"), on("c", "a")];
    let plan = plan(&apps, &policy(1), now());
    assert!(plan.start.is_empty(), "{plan:?}");
    assert_eq!((plan.rolling, plan.waiting), (1, 2));
    // A budget of two lets one more start beside it.
    let plan = super::plan(&apps, &policy(2), now());
    assert_eq!(names(&plan.start), ["b"]);
}

#[rstest]
#[case::rendered_but_not_ready(marked("a", "b", "b", 30, false))]
#[case::ready_but_still_on_the_old_revision(marked("a", "a", "b", 30, true))]
fn a_move_is_finished_only_when_ready_on_the_new_revision(#[case] app: AppState) {
    let plan = plan(&[app, on("b", "a")], &policy(1), now());
    assert!(plan.finish.is_empty() && plan.start.is_empty(), "{plan:?}");
    assert_eq!(plan.rolling, 1);
}

#[test]
fn a_finished_move_is_cleared_and_the_next_app_starts() {
    let apps = [marked("a", "b", "b", 30, true), on("b", "a"), on("c", "a")];
    let plan = plan(&apps, &policy(1), now());
    assert_eq!(names(&plan.finish), ["a"]);
    assert_eq!(names(&plan.start), ["b"]);
    assert_eq!((plan.rolling, plan.waiting), (1, 1));
    assert_eq!(
        plan.apps_by_revision,
        BTreeMap::from([("a".to_owned(), 1), ("b".to_owned(), 2)])
    );
}

#[test]
fn a_move_past_its_deadline_fails_and_stops_the_wave() {
    let apps = [
        marked("a", "b", "b", 601, false),
        on("b", "a"),
        on("c", "a"),
    ];
    let plan = plan(&apps, &policy(3), now());
    assert_eq!(
        plan.failed,
        [Failure {
            app: AppRef::new("apps", "a"),
            started: ago(601)
        }]
    );
    assert!(plan.stopped());
    // The rest stay on their revision, whatever the budget.
    assert!(plan.start.is_empty(), "{plan:?}");
    assert_eq!((plan.rolling, plan.waiting), (0, 2));
    // Once the failed app finishes (fixed by hand), its mark is cleared and the wave goes on.
    let fixed = [marked("a", "b", "b", 900, true), on("b", "a"), on("c", "a")];
    let plan = super::plan(&fixed, &policy(3), now());
    assert_eq!(names(&plan.finish), ["a"]);
    assert_eq!(names(&plan.start), ["b", "c"]);
}

#[test]
fn a_mark_without_a_readable_start_counts_as_past_its_deadline() {
    let mut app = marked("a", "b", "b", 0, false);
    app.mark = Some(Mark {
        revision: "b".into(),
        started: None,
    });
    assert!(plan(&[app], &policy(1), now()).stopped());
}

#[test]
fn requested_apps_move_at_once_even_with_budget_zero_or_a_stopped_wave() {
    let apps = [
        marked("a", "b", "b", 700, false),
        on("b", "a"),
        requested(on("z", "a")),
        requested(on("y", "a")),
    ];
    let plan = plan(&apps, &policy(0), now());
    assert_eq!(names(&plan.start), ["y", "z"]);
    assert!(plan.stopped());
    assert_eq!(plan.waiting, 1);
    // They go first, and occupy the budget while they roll.
    let plan = super::plan(&apps[1..], &policy(2), now());
    assert_eq!(names(&plan.start), ["y", "z"]);
    assert_eq!(plan.waiting, 1);
}

#[test]
fn another_revisions_move_in_progress_counts_against_the_budget() {
    // During an upgrade the other controller's wave is still rolling an app.
    let apps = [marked("a", "c", "c", 30, false), on("b", "a")];
    assert!(plan(&apps, &policy(1), now()).start.is_empty());
    // Finished or past its deadline, it no longer holds anything; a finished app on another
    // revision is a candidate like the others.
    for stale in [
        marked("a", "c", "c", 30, true),
        marked("a", "a", "c", 700, false),
    ] {
        let plan = plan(&[stale, on("b", "a")], &policy(1), now());
        assert_eq!(names(&plan.start), ["a"], "{plan:?}");
        assert!(!plan.stopped());
    }
}

#[test]
fn apps_on_this_revision_are_left_alone() {
    let plan = plan(&[on("a", "b"), on("b", "b")], &policy(2), now());
    assert_eq!(
        plan,
        Plan {
            apps_by_revision: BTreeMap::from([("b".to_owned(), 2)]),
            ..Plan::default()
        }
    );
}

fn statefulset(status: &Value) -> Value {
    json!({
        "metadata": {"generation": 3},
        "spec": {"replicas": 2},
        "status": status,
    })
}

#[rstest]
#[case::all_ready_on_the_update_revision(json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "currentRevision": "r2", "updateRevision": "r2"}), true)]
#[case::generation_not_observed_yet(json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "currentRevision": "r2", "updateRevision": "r2"}), false)]
#[case::one_replica_not_updated(json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 1, "readyReplicas": 2, "currentRevision": "r1", "updateRevision": "r2"}), false)]
#[case::one_replica_not_ready(json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 1, "currentRevision": "r2", "updateRevision": "r2"}), false)]
#[case::revisions_differ(json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "currentRevision": "r1", "updateRevision": "r2"}), false)]
#[case::a_surplus_replica_going_away(json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "readyReplicas": 2, "currentRevision": "r2", "updateRevision": "r2"}), false)]
#[case::no_status(json!({}), false)]
fn finished_means_every_replica_ready_on_the_update_revision(
    #[case] status: Value,
    #[case] expected: bool,
) {
    assert_eq!(finished(&statefulset(&status)), expected);
}

#[test]
fn scaled_to_zero_is_finished_once_the_revisions_agree() {
    let mut sts = statefulset(
        &json!({"observedGeneration": 3, "currentRevision": "r2", "updateRevision": "r2"}),
    );
    sts["spec"]["replicas"] = json!(0);
    assert!(finished(&sts));
}

#[test]
fn the_mark_is_read_back_from_its_patch() {
    let mut sts = json!({"metadata": {"name": "demo-app", "resourceVersion": "7"}});
    json_patch::merge(&mut sts, &mark_patch("b", now(), "7"));
    assert_eq!(
        mark_of(&sts),
        Some(Mark {
            revision: "b".into(),
            started: Some(now())
        })
    );
    assert!(marked_for(&sts, "b") && !marked_for(&sts, "a"));
    json_patch::merge(&mut sts, &clear_patch("8"));
    assert_eq!(mark_of(&sts), None);
    assert!(!marked_for(&sts, "b"));
    assert_eq!(sts["metadata"]["annotations"], json!({}));
}

#[test]
fn only_an_injected_template_that_records_a_revision_has_a_state() {
    let app = || AppRef::new("apps", "demo");
    let with = |annotations: Value| json!({"spec": {"template": {"metadata": {"annotations": annotations}}}});
    let injected =
        with(json!({names::TEMPLATE_HASH_ANNOTATION: "h", names::REVISION_ANNOTATION: "a"}));
    let state = app_state(app(), &injected, true).expect("a state");
    assert_eq!(
        (state.revision.as_str(), state.requested, state.mark),
        ("a", true, None)
    );
    assert_eq!(
        app_state(
            app(),
            &with(json!({names::TEMPLATE_HASH_ANNOTATION: "h"})),
            false
        ),
        None
    );
    assert_eq!(
        app_state(
            app(),
            &with(json!({names::REVISION_ANNOTATION: "a"})),
            false
        ),
        None
    );
    assert_eq!(app_state(app(), &json!({}), false), None);
}

#[rstest]
#[case::same(Some("b"), true)]
#[case::padded(Some(" b "), true)]
#[case::another(Some("a"), false)]
#[case::absent(None, false)]
fn a_request_names_the_revision(#[case] value: Option<&str>, #[case] expected: bool) {
    assert_eq!(requests(value, "b"), expected);
}
