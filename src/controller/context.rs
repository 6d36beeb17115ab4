//! What reconciles share: the kube client, the memory of published notices and out-of-sync
//! apps, the metrics, Events, and how API errors are reported.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::installs::{GCS_CAUSES, InstallMemory, PVC_CAUSES};
use super::{ControllerOptions, FIELD_MANAGER, Notice};
use crate::cache::KasprAppObject;
use crate::config::RenderConfig;

/// The parts of the controller, for metrics, Events and the memory of published notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Part {
    Pvc,
    Rollout,
    /// The app pods' package installs (degraded caches).
    Installs,
    /// Package-set builds.
    Builds,
    /// Moves of apps to this rendering revision.
    Moves,
}

impl Part {
    pub(super) fn label(self) -> &'static str {
        match self {
            Part::Pvc => "pvc",
            Part::Rollout => "rollout",
            Part::Installs => "installs",
            Part::Builds => "builds",
            Part::Moves => "revisions",
        }
    }

    pub(super) fn action(self) -> &'static str {
        match self {
            Part::Pvc => "ReconcilePythonPackagesCache",
            Part::Rollout => "SyncStatefulSet",
            Part::Installs => "ObservePackageInstall",
            Part::Builds => "BuildPythonPackages",
            Part::Moves => "MoveRevision",
        }
    }
}

pub(super) type AppKey = ObjectRef<KasprAppObject>;

/// What the controller remembers between reconciles. Only in memory: after a restart each
/// notice is published once more, and the gauge is rebuilt by the first reconcile of each app.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) out_of_sync: HashSet<AppKey>,
    pub(super) notices: HashMap<(Part, AppKey), BTreeSet<Notice>>,
    /// Failed reconciles in a row, for the retry backoff.
    pub(super) failures: HashMap<AppKey, u32>,
    /// Rollout patches in a row that did not bring the StatefulSet in sync.
    pub(super) unconverged: HashMap<AppKey, u32>,
    /// Since when the API server has failed to call the webhook for an app's StatefulSet.
    pub(super) unreachable_since: HashMap<AppKey, std::time::Instant>,
    /// Since when a StatefulSet marked to move to this revision has come back from the webhook
    /// rendered by another revision (an older replica behind the same Service).
    pub(super) other_revision_since: HashMap<AppKey, std::time::Instant>,
    /// Since when a taken-over app has been out of sync while the operator had its turn.
    pub(super) deferred: HashMap<AppKey, std::time::Instant>,
    /// Degraded installs already counted and reported.
    pub(super) installs: InstallMemory,
    /// Revision moves: failures already counted, revisions with a gauge series.
    pub(super) moves: super::move_reconciler::MoveMemory,
}

impl State {
    /// Remembers `notices` as the current ones and returns those not published before.
    pub(super) fn fresh_notices(
        &mut self,
        part: Part,
        app: &AppKey,
        notices: Vec<Notice>,
    ) -> Vec<Notice> {
        let current: BTreeSet<Notice> = notices.into_iter().collect();
        let key = (part, app.clone());
        let previous = self.notices.remove(&key).unwrap_or_default();
        let fresh = current.difference(&previous).cloned().collect();
        if !current.is_empty() {
            self.notices.insert(key, current);
        }
        fresh
    }

    /// Records whether an app is out of sync; returns how many are.
    pub(super) fn set_out_of_sync(&mut self, app: &AppKey, out_of_sync: bool) -> usize {
        if out_of_sync {
            self.out_of_sync.insert(app.clone());
        } else {
            self.out_of_sync.remove(app);
        }
        self.out_of_sync.len()
    }

    pub(super) fn failed(&mut self, app: &AppKey) -> u32 {
        let attempts = self.failures.entry(app.clone()).or_default();
        *attempts = attempts.saturating_add(1);
        *attempts
    }

    /// How much longer a rollout of a taken-over app waits for the operator, which replaces
    /// the whole template itself when its own rendering changes (through the webhook, so the
    /// app comes in sync with one new revision instead of two). `None`: the wait is over.
    pub(super) fn operator_turn(
        &mut self,
        app: &AppKey,
        now: std::time::Instant,
        grace: std::time::Duration,
    ) -> Option<std::time::Duration> {
        let since = *self.deferred.entry(app.clone()).or_insert(now);
        let waited = now.saturating_duration_since(since);
        if waited < grace {
            Some(grace - waited)
        } else {
            self.deferred.remove(app);
            None
        }
    }

    pub(super) fn unconverged(&mut self, app: &AppKey) -> u32 {
        let attempts = self.unconverged.entry(app.clone()).or_default();
        *attempts = attempts.saturating_add(1);
        *attempts
    }

    /// Forgets apps that no longer exist; returns how many apps are out of sync.
    pub(super) fn retain(&mut self, exists: impl Fn(&AppKey) -> bool) -> usize {
        self.out_of_sync.retain(&exists);
        self.notices.retain(|(_, app), _| exists(app));
        self.failures.retain(|app, _| exists(app));
        self.unconverged.retain(|app, _| exists(app));
        self.unreachable_since.retain(|app, _| exists(app));
        self.other_revision_since.retain(|app, _| exists(app));
        self.deferred.retain(|app, _| exists(app));
        self.installs.retain_apps(&exists);
        self.out_of_sync.len()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DegradedLabels {
    mode: &'static str,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    part: &'static str,
    outcome: &'static str,
}

/// The `outcome` label values of `controller_reconciles_total`.
const RECONCILE_OUTCOMES: [&str; 4] = ["in_sync", "changed", "pending", "failed"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MoveLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevisionLabels {
    revision: String,
}

/// The `outcome` label values of `revision_moves_total`.
const MOVE_OUTCOMES: [&str; 3] = ["started", "finished", "failed"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    outcome: &'static str,
    category: String,
}

/// The controller's metrics, in the server's registry.
#[derive(Debug, Clone)]
pub struct ControllerMetrics {
    out_of_sync: Gauge,
    reconciles: Family<ReconcileLabels, Counter>,
    degraded: Family<DegradedLabels, Counter>,
    builds: Family<BuildLabels, Counter>,
    moves: Family<MoveLabels, Counter>,
    moves_rolling: Gauge,
    moves_waiting: Gauge,
    moves_failing: Gauge,
    revision_apps: Family<RevisionLabels, Gauge>,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ControllerMetrics {
            out_of_sync: Gauge::default(),
            reconciles: Family::default(),
            degraded: Family::default(),
            builds: Family::default(),
            moves: Family::default(),
            moves_rolling: Gauge::default(),
            moves_waiting: Gauge::default(),
            moves_failing: Gauge::default(),
            revision_apps: Family::default(),
        };
        registry.register(
            "revision_moves",
            "Moves of apps to this rendering revision by outcome (started, finished, failed: not finished within the rollout deadline)",
            metrics.moves.clone(),
        );
        for outcome in MOVE_OUTCOMES {
            drop(metrics.moves.get_or_create(&MoveLabels { outcome }));
        }
        registry.register(
            "revision_moves_rolling",
            "Apps moving between rendering revisions now (at most the rollout budget, plus requested moves)",
            metrics.moves_rolling.clone(),
        );
        registry.register(
            "revision_moves_waiting",
            "Apps on another rendering revision that stay there for now",
            metrics.moves_waiting.clone(),
        );
        registry.register(
            "revision_moves_failing",
            "Moves to this rendering revision past the rollout deadline; while above 0 no app starts moving on its own",
            metrics.moves_failing.clone(),
        );
        registry.register(
            "revision_apps",
            "Apps whose StatefulSet template records each rendering revision; a revision no app uses has no series",
            metrics.revision_apps.clone(),
        );
        registry.register(
            "package_builds",
            "Finished package-set builds by outcome (built, failed) and the installer's failure category",
            metrics.builds.clone(),
        );
        drop(metrics.builds.get_or_create(&BuildLabels {
            outcome: "built",
            category: String::new(),
        }));
        registry.register(
            "kasprapps_out_of_sync",
            "KasprApps whose StatefulSet lacks the injection the webhook renders for their current spec",
            metrics.out_of_sync.clone(),
        );
        registry.register(
            "controller_reconciles",
            "Controller reconciles by part (pvc, rollout) and outcome (in_sync, changed, pending, failed)",
            metrics.reconciles.clone(),
        );
        registry.register(
            "degraded_installs",
            "Package installs that did without their cache, by cache mode and cause, seen finishing since this process started",
            metrics.degraded.clone(),
        );
        let causes = PVC_CAUSES
            .iter()
            .map(|cause| ("pvc", *cause))
            .chain(GCS_CAUSES.iter().map(|cause| ("gcs", *cause)));
        for (mode, cause) in causes {
            drop(
                metrics
                    .degraded
                    .get_or_create(&DegradedLabels { mode, cause }),
            );
        }
        // Every series exists from the start at 0, so `rate()` sees a process's first failure
        // (a series born at 1 has no earlier sample to rise from) and alerts match at once.
        for part in [Part::Pvc, Part::Rollout, Part::Builds] {
            for outcome in RECONCILE_OUTCOMES {
                drop(metrics.reconciles.get_or_create(&ReconcileLabels {
                    part: part.label(),
                    outcome,
                }));
            }
        }
        metrics
    }

    pub(super) fn set_out_of_sync(&self, count: usize) {
        self.out_of_sync
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub(super) fn count_move(&self, outcome: &'static str) {
        self.moves.get_or_create(&MoveLabels { outcome }).inc();
    }

    /// The move gauges after `plan`; the series of revisions in `previous` that no app uses any
    /// more are removed.
    pub(super) fn set_moves(
        &self,
        plan: &super::moves::Plan,
        previous: &std::collections::BTreeMap<String, usize>,
    ) {
        let gauge = |count: usize| i64::try_from(count).unwrap_or(i64::MAX);
        self.moves_rolling.set(gauge(plan.rolling));
        self.moves_waiting.set(gauge(plan.waiting));
        self.moves_failing.set(gauge(plan.failed.len()));
        for revision in previous.keys() {
            if !plan.apps_by_revision.contains_key(revision) {
                self.revision_apps.remove(&RevisionLabels {
                    revision: revision.clone(),
                });
            }
        }
        for (revision, count) in &plan.apps_by_revision {
            self.revision_apps
                .get_or_create(&RevisionLabels {
                    revision: revision.clone(),
                })
                .set(gauge(*count));
        }
    }

    pub(super) fn count_degraded(&self, mode: &'static str, cause: &'static str) {
        self.degraded
            .get_or_create(&DegradedLabels { mode, cause })
            .inc();
    }

    pub(super) fn count_build(&self, outcome: &'static str, category: &str) {
        self.builds
            .get_or_create(&BuildLabels {
                outcome,
                category: category.to_owned(),
            })
            .inc();
    }

    pub(super) fn count(&self, part: Part, outcome: &'static str) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                part: part.label(),
                outcome,
            })
            .inc();
    }
}

/// A failed API call.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {object}: {detail}")]
pub struct ControllerError {
    action: &'static str,
    object: String,
    detail: String,
    #[source]
    source: Option<kube::Error>,
}

impl ControllerError {
    /// A failure that is not an API call's (a build that cannot be collected, say).
    pub(super) fn invalid(action: &'static str, object: String, detail: String) -> Self {
        ControllerError {
            action,
            object,
            detail,
            source: None,
        }
    }
}

pub(super) fn api_error(
    action: &'static str,
    object: String,
) -> impl FnOnce(kube::Error) -> ControllerError {
    move |source| ControllerError {
        action,
        object,
        detail: describe(&source),
        source: Some(source),
    }
}

/// The API server's own message rather than the whole Status, for logs and Events.
pub(super) fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}

pub(super) fn is_status(error: &kube::Error, codes: &[u16]) -> bool {
    matches!(error, kube::Error::Api(status) if codes.contains(&status.code))
}

/// Everything reconciles share.
pub(super) struct Context {
    pub(super) client: Client,
    pub(super) options: ControllerOptions,
    pub(super) render: RenderConfig,
    pub(super) metrics: ControllerMetrics,
    pub(super) stores: Vec<Store<KasprAppObject>>,
    pub(super) state: Mutex<State>,
}

impl Context {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep using it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn set_out_of_sync(&self, app: &AppKey, out_of_sync: bool) {
        let count = self.state().set_out_of_sync(app, out_of_sync);
        self.metrics.set_out_of_sync(count);
    }

    /// Publishes the notices of `part` that are new for this app.
    pub(super) async fn report(&self, app: &KasprAppObject, part: Part, notices: Vec<Notice>) {
        let fresh = self
            .state()
            .fresh_notices(part, &ObjectRef::from_obj(app), notices);
        for notice in fresh {
            tracing::warn!(
                namespace = app.meta().namespace.as_deref().unwrap_or_default(),
                app = app.meta().name.as_deref().unwrap_or_default(),
                reason = notice.reason,
                message = %notice.message,
                "KasprApp needs attention"
            );
            self.publish(app, EventType::Warning, part, notice.reason, notice.message)
                .await;
        }
    }

    pub(super) async fn publish(
        &self,
        app: &KasprAppObject,
        type_: EventType,
        part: Part,
        reason: &str,
        mut note: String,
    ) {
        // The Events API caps the note at 1 kB.
        if note.len() > 1000 {
            let mut end = 997;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        // A recorder per Event: its series cache keys on the reason only, so a reused recorder
        // would publish a changed message as a repeat of the old one. Repeats are already
        // suppressed by `State::fresh_notices`.
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance: None,
            },
        );
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: part.action().to_owned(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &app.object_ref(&())).await {
            tracing::warn!(%error, reason, "cannot publish an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn app(name: &str) -> AppKey {
        ObjectRef::new(name).within("apps")
    }

    #[test]
    pub(super) fn a_notice_is_published_once_per_change() {
        let mut state = State::default();
        let shrink = Notice::warning("PvcShrinkNeedsRecreate", "a".into());
        let class = Notice::warning("StorageClassNotKnownRWX", "b".into());
        let a = app("a");
        assert_eq!(
            state.fresh_notices(Part::Pvc, &a, vec![shrink.clone()]),
            vec![shrink.clone()]
        );
        assert!(
            state
                .fresh_notices(Part::Pvc, &a, vec![shrink.clone()])
                .is_empty()
        );
        // Another part and another app are remembered apart.
        assert_eq!(
            state.fresh_notices(Part::Rollout, &a, vec![shrink.clone()]),
            vec![shrink.clone()]
        );
        assert_eq!(
            state.fresh_notices(Part::Pvc, &app("b"), vec![shrink.clone()]),
            vec![shrink.clone()]
        );
        // A new situation is published; the one that persists is not.
        assert_eq!(
            state.fresh_notices(Part::Pvc, &a, vec![shrink.clone(), class.clone()]),
            [class]
        );
        // Once resolved, a recurrence is news again.
        assert!(state.fresh_notices(Part::Pvc, &a, vec![]).is_empty());
        assert_eq!(
            state.fresh_notices(Part::Pvc, &a, vec![shrink.clone()]),
            [shrink]
        );
    }

    #[test]
    pub(super) fn the_out_of_sync_count_follows_apps_and_forgets_deleted_ones() {
        let mut state = State::default();
        assert_eq!(state.set_out_of_sync(&app("a"), true), 1);
        assert_eq!(state.set_out_of_sync(&app("a"), true), 1);
        assert_eq!(state.set_out_of_sync(&app("b"), true), 2);
        assert_eq!(state.set_out_of_sync(&app("a"), false), 1);
        state.failed(&app("b"));
        state.unconverged(&app("b"));
        assert_eq!(state.retain(|key| key.name != "b"), 0);
        assert!(state.failures.is_empty() && state.unconverged.is_empty());
    }

    #[test]
    pub(super) fn failures_count_up_per_app() {
        let mut state = State::default();
        assert_eq!(state.failed(&app("a")), 1);
        assert_eq!(state.failed(&app("a")), 2);
        assert_eq!(state.failed(&app("b")), 1);
    }

    #[test]
    pub(super) fn metrics_are_registered_with_the_product_prefix() {
        let mut registry = crate::metrics::new_registry();
        let metrics = ControllerMetrics::register(&mut registry);
        metrics.set_out_of_sync(2);
        metrics.count(Part::Rollout, "changed");
        let text = crate::metrics::encode(&registry).expect("encode");
        assert!(
            text.contains("kaspr_packages_webhook_kasprapps_out_of_sync 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "kaspr_packages_webhook_controller_reconciles_total{part=\"rollout\",outcome=\"changed\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_operator_gets_its_turn_once_per_wait() {
        let mut state = State::default();
        let a = app("a");
        let start = std::time::Instant::now();
        let grace = std::time::Duration::from_secs(45);
        assert_eq!(state.operator_turn(&a, start, grace), Some(grace));
        let later = start + std::time::Duration::from_secs(30);
        assert_eq!(
            state.operator_turn(&a, later, grace),
            Some(std::time::Duration::from_secs(15))
        );
        assert_eq!(state.operator_turn(&a, start + grace, grace), None);
        // The wait is over and forgotten: a later change waits anew.
        assert_eq!(state.operator_turn(&a, later + grace, grace), Some(grace));
        assert_eq!(state.retain(|key| key.name != "a"), 0);
        assert!(state.deferred.is_empty());
    }
}
