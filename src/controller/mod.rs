//! The controller that `serve` runs beside the webhook: the PVC cache lifecycle ([`pvc`]) and
//! the rollout trigger ([`rollout`]).
//!
//! One kube-runtime [`Controller`] per watched scope (all namespaces, or each of `--namespaces`)
//! reconciles KasprApps. It is woken by KasprApp changes, by changes of StatefulSets owned by a
//! KasprApp (so an operator rewrite that loses the injection is noticed) and by changes of the
//! claims this product manages. The decisions are pure functions in [`pvc`] and [`rollout`];
//! this module reads the objects they need, carries out their answer and reports.
//!
//! Every write is idempotent (server-side apply with one field manager, a merge patch that
//! removes one annotation, a delete with a uid precondition), so two replicas may reconcile the
//! same app at once without leader election: the second write is a no-op.

pub mod pvc;
pub mod rollout;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{self, Action, Config};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::cache::KasprAppObject;
use crate::config::RenderConfig;
use crate::mutation::{self, AppContext};
use crate::spec::{Cache, pvc_name};
use crate::validation::{self, Report};
use pvc::{ClassInfo, Existing, PvcAction, Wanted};
use rollout::SyncState;

/// Field manager of every write, and `app.kubernetes.io/managed-by` of the claims.
pub const FIELD_MANAGER: &str = "kaspr-packages-webhook";

/// Which parts of the controller run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerOptions {
    /// Keep the PVC cache of apps in PVC mode.
    pub pvc: bool,
    /// Send StatefulSets whose injection is out of date through the webhook again.
    pub rollout: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            pvc: true,
            rollout: true,
        }
    }
}

/// Without a change, each app is looked at again this often (a safety net for missed events).
const RESYNC: Duration = Duration::from_secs(15 * 60);
/// First retry delay after a failure; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(5 * 60);
/// How often state about deleted apps is dropped (and the gauge follows).
const PRUNE_INTERVAL: Duration = Duration::from_secs(30);

/// The delay before retry number `attempt` (1-based): 1 s, 2 s, 4 s, … capped at 5 minutes.
pub fn retry_delay(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// The KasprApp an action is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppIdentity {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub api_version: String,
}

impl AppIdentity {
    fn of(app: &Value) -> Option<Self> {
        let text = |pointer: &str| {
            app.pointer(pointer)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        Some(AppIdentity {
            name: text("/metadata/name")?,
            namespace: text("/metadata/namespace")?,
            uid: text("/metadata/uid")?,
            api_version: text("/apiVersion").unwrap_or_else(|| "kaspr.io/v1alpha1".to_owned()),
        })
    }
}

/// A situation worth a Warning Event on the KasprApp. Each is published once, when it first
/// appears (or its message changes), not on every reconcile.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Notice {
    /// PascalCase, the Event's `reason`.
    pub reason: &'static str,
    pub message: String,
}

impl Notice {
    pub fn warning(reason: &'static str, message: String) -> Self {
        Notice { reason, message }
    }
}

/// The two parts, for metrics, Events and the memory of published notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Part {
    Pvc,
    Rollout,
}

impl Part {
    fn label(self) -> &'static str {
        match self {
            Part::Pvc => "pvc",
            Part::Rollout => "rollout",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Part::Pvc => "ReconcilePythonPackagesCache",
            Part::Rollout => "SyncStatefulSet",
        }
    }
}

type AppKey = ObjectRef<KasprAppObject>;

/// What the controller remembers between reconciles. Only in memory: after a restart each
/// notice is published once more, and the gauge is rebuilt by the first reconcile of each app.
#[derive(Debug, Default)]
struct State {
    out_of_sync: HashSet<AppKey>,
    notices: HashMap<(Part, AppKey), BTreeSet<Notice>>,
    /// Failed reconciles in a row, for the retry backoff.
    failures: HashMap<AppKey, u32>,
    /// Rollout patches in a row that did not bring the StatefulSet in sync.
    unconverged: HashMap<AppKey, u32>,
}

impl State {
    /// Remembers `notices` as the current ones and returns those not published before.
    fn fresh_notices(&mut self, part: Part, app: &AppKey, notices: Vec<Notice>) -> Vec<Notice> {
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
    fn set_out_of_sync(&mut self, app: &AppKey, out_of_sync: bool) -> usize {
        if out_of_sync {
            self.out_of_sync.insert(app.clone());
        } else {
            self.out_of_sync.remove(app);
        }
        self.out_of_sync.len()
    }

    fn failed(&mut self, app: &AppKey) -> u32 {
        let attempts = self.failures.entry(app.clone()).or_default();
        *attempts = attempts.saturating_add(1);
        *attempts
    }

    fn unconverged(&mut self, app: &AppKey) -> u32 {
        let attempts = self.unconverged.entry(app.clone()).or_default();
        *attempts = attempts.saturating_add(1);
        *attempts
    }

    /// Forgets apps that no longer exist; returns how many apps are out of sync.
    fn retain(&mut self, exists: impl Fn(&AppKey) -> bool) -> usize {
        self.out_of_sync.retain(&exists);
        self.notices.retain(|(_, app), _| exists(app));
        self.failures.retain(|app, _| exists(app));
        self.unconverged.retain(|app, _| exists(app));
        self.out_of_sync.len()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    part: &'static str,
    outcome: &'static str,
}

/// The controller's metrics, in the server's registry.
#[derive(Debug, Clone)]
pub struct ControllerMetrics {
    out_of_sync: Gauge,
    reconciles: Family<ReconcileLabels, Counter>,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ControllerMetrics {
            out_of_sync: Gauge::default(),
            reconciles: Family::default(),
        };
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
        metrics
    }

    fn set_out_of_sync(&self, count: usize) {
        self.out_of_sync
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    fn count(&self, part: Part, outcome: &'static str) {
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
    source: kube::Error,
}

fn api_error(action: &'static str, object: String) -> impl FnOnce(kube::Error) -> ControllerError {
    move |source| ControllerError {
        action,
        object,
        detail: describe(&source),
        source,
    }
}

/// The API server's own message rather than the whole Status, for logs and Events.
fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}

fn is_status(error: &kube::Error, codes: &[u16]) -> bool {
    matches!(error, kube::Error::Api(status) if codes.contains(&status.code))
}

/// Everything reconciles share.
struct Context {
    client: Client,
    options: ControllerOptions,
    render: RenderConfig,
    metrics: ControllerMetrics,
    stores: Vec<Store<KasprAppObject>>,
    state: Mutex<State>,
}

impl Context {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep using it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_out_of_sync(&self, app: &AppKey, out_of_sync: bool) {
        let count = self.state().set_out_of_sync(app, out_of_sync);
        self.metrics.set_out_of_sync(count);
    }

    /// Publishes the notices of `part` that are new for this app.
    async fn report(&self, app: &KasprAppObject, part: Part, notices: Vec<Notice>) {
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

    async fn publish(
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

/// Builds the controller: `None` when both parts are off. The future runs until dropped.
pub fn run(
    client: &Client,
    namespaces: &[String],
    options: ControllerOptions,
    render: RenderConfig,
    registry: &mut Registry,
) -> Option<BoxFuture<'static, ()>> {
    if !options.pvc && !options.rollout {
        tracing::info!(
            "the controller is off (--controller-pvc=false, --controller-rollout=false)"
        );
        return None;
    }
    let metrics = ControllerMetrics::register(registry);
    let mut scopes: Vec<Option<&str>> = namespaces.iter().map(|n| Some(n.as_str())).collect();
    scopes.sort_unstable();
    scopes.dedup();
    if scopes.is_empty() {
        scopes.push(None);
    }
    let api = |scope: Option<&str>| -> (
        Api<KasprAppObject>,
        Api<StatefulSet>,
        Api<PersistentVolumeClaim>,
    ) {
        match scope {
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
        }
    };
    let mut controllers = Vec::new();
    for scope in scopes {
        let (apps, statefulsets, claims) = api(scope);
        let mut controller = Controller::new(apps, watcher::Config::default()).with_config(
            Config::default()
                .debounce(Duration::from_millis(500))
                .concurrency(4),
        );
        if options.rollout {
            controller = controller.owns(statefulsets, watcher::Config::default());
        }
        if options.pvc {
            controller = controller.watches(
                claims,
                watcher::Config::default().labels(pvc::MANAGED_SELECTOR),
                |claim: PersistentVolumeClaim| {
                    let namespace = claim.metadata.namespace.as_deref()?;
                    let app = claim
                        .metadata
                        .labels
                        .as_ref()?
                        .get(mutation::names::APP_LABEL)?;
                    Some(ObjectRef::new(app).within(namespace))
                },
            );
        }
        controllers.push(controller);
    }
    let context = Arc::new(Context {
        client: client.clone(),
        options,
        render,
        metrics,
        stores: controllers.iter().map(Controller::store).collect(),
        state: Mutex::new(State::default()),
    });
    tracing::info!(
        pvc = options.pvc,
        rollout = options.rollout,
        "controller starting"
    );
    let mut tasks: Vec<BoxFuture<'static, ()>> = controllers
        .into_iter()
        .map(|controller| {
            controller
                .run(reconcile, error_policy, Arc::clone(&context))
                .for_each(|result| async move {
                    match result {
                        Ok((app, _)) => tracing::debug!(%app, "reconciled"),
                        // Logged with its context by `error_policy`.
                        Err(controller::Error::ReconcilerFailed(..)) => {}
                        // The CRD is not installed (yet): nothing to reconcile, as for the cache.
                        Err(controller::Error::QueueError(watcher::Error::InitialListFailed(
                            kube::Error::Api(status),
                        ))) if status.code == 404 => {
                            tracing::debug!(
                                "kasprapps.kaspr.io is not served; the controller waits"
                            );
                        }
                        Err(controller::Error::QueueError(error)) => {
                            tracing::warn!(%error, "controller watch failed; retrying");
                        }
                        Err(error) => tracing::debug!(%error, "controller"),
                    }
                })
                .boxed()
        })
        .collect();
    tasks.push(prune(context).boxed());
    Some(
        async move {
            futures::future::join_all(tasks).await;
            tracing::warn!("controller stopped");
        }
        .boxed(),
    )
}

/// Drops what is remembered about deleted apps, so the gauge counts only existing ones.
async fn prune(context: Arc<Context>) {
    for store in &context.stores {
        if store.wait_until_ready().await.is_err() {
            return;
        }
    }
    let mut ticker = tokio::time::interval(PRUNE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let count = context
            .state()
            .retain(|app| context.stores.iter().any(|s| s.get(app).is_some()));
        context.metrics.set_out_of_sync(count);
    }
}

// The signature is kube-runtime's.
#[allow(clippy::needless_pass_by_value)]
fn error_policy(
    app: Arc<KasprAppObject>,
    error: &ControllerError,
    context: Arc<Context>,
) -> Action {
    let attempt = context.state().failed(&ObjectRef::from_obj(&*app));
    let delay = retry_delay(attempt);
    tracing::warn!(
        namespace = app.meta().namespace.as_deref().unwrap_or_default(),
        app = app.meta().name.as_deref().unwrap_or_default(),
        error = %error,
        attempt,
        retry_in = %humantime::format_duration(delay),
        "reconcile failed"
    );
    Action::requeue(delay)
}

async fn reconcile(
    app: Arc<KasprAppObject>,
    context: Arc<Context>,
) -> Result<Action, ControllerError> {
    let value = app.value();
    let Some(identity) = AppIdentity::of(value) else {
        return Ok(Action::await_change());
    };
    if value.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(Action::await_change());
    }
    let report = validation::validate_kasprapp(value);
    let mut next = RESYNC;
    let mut failure = None;
    if context.options.pvc {
        match reconcile_claim(&app, &identity, &report, &context).await {
            Ok(delay) => next = next.min(delay),
            Err(error) => failure = Some(error),
        }
    }
    if context.options.rollout {
        match reconcile_rollout(&app, &identity, &report, &context).await {
            Ok(delay) => next = next.min(delay),
            Err(error) => failure = failure.or(Some(error)),
        }
    }
    match failure {
        Some(error) => Err(error),
        None => {
            context.state().failures.remove(&ObjectRef::from_obj(&*app));
            Ok(Action::requeue(next))
        }
    }
}

/// The claim's storage class, named by the spec or (when the spec names none) by the claim,
/// where the API server put the cluster default.
async fn storage_class(client: &Client, name: Option<String>) -> ClassInfo {
    let Some(name) = name else {
        return ClassInfo::Unnamed;
    };
    match Api::<StorageClass>::all(client.clone())
        .get_opt(&name)
        .await
    {
        Ok(Some(class)) => ClassInfo::from_class(&class),
        Ok(None) => ClassInfo::Missing(name),
        Err(error) => {
            tracing::debug!(%error, class = %name, "cannot read the storage class");
            ClassInfo::Unknown
        }
    }
}

async fn reconcile_claim(
    app: &KasprAppObject,
    identity: &AppIdentity,
    report: &Report,
    context: &Context,
) -> Result<Duration, ControllerError> {
    if !report.errors.is_empty() {
        // An invalid spec says nothing reliable about the cache: leave the claim as it is.
        return Ok(RESYNC);
    }
    let wanted = match report.spec.as_ref().map(|s| &s.cache) {
        Some(Cache::Pvc(cache)) => Wanted::Claim(cache),
        _ => Wanted::NoClaim {
            delete_claim: app
                .value()
                .pointer("/spec/pythonPackages/cache/deleteClaim")
                .and_then(Value::as_bool),
        },
    };
    let name = pvc_name(&identity.name);
    let object = format!("PersistentVolumeClaim {}/{name}", identity.namespace);
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(context.client.clone(), &identity.namespace);
    let claim = api
        .get_opt(&name)
        .await
        .map_err(api_error("read", object.clone()))?;
    let existing = claim.as_ref().map(|c| Existing::from_claim(c, identity));
    let class = match &wanted {
        Wanted::Claim(cache) => {
            let class_name = cache
                .storage_class
                .clone()
                .or_else(|| existing.as_ref().and_then(|e| e.storage_class.clone()));
            storage_class(&context.client, class_name).await
        }
        Wanted::NoClaim { .. } => ClassInfo::Unknown,
    };
    let plan = pvc::plan(identity, &wanted, existing.as_ref(), &class);
    context.report(app, Part::Pvc, plan.notices).await;
    let outcome = match plan.action {
        PvcAction::Nothing => "in_sync",
        PvcAction::Apply(desired) => {
            // Force: the KasprApp is the source of truth for the fields we declare, and another
            // manager's value (say a hand edit of the size) must not block reconciling forever.
            // Every replica applies as the same manager, so replicas never conflict.
            let applied = api
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&*desired),
                )
                .await
                .map_err(|e| {
                    context.metrics.count(Part::Pvc, "failed");
                    api_error("apply", object.clone())(e)
                })?;
            let size = |c: &PersistentVolumeClaim| {
                c.spec
                    .as_ref()
                    .and_then(|s| s.resources.as_ref())
                    .and_then(|r| r.requests.as_ref())
                    .and_then(|r| r.get("storage"))
                    .map(|q| q.0.clone())
            };
            let (reason, note) = match &existing {
                None => (
                    Some("PvcCreated"),
                    format!(
                        "created PVC {name} ({}) for the python-packages cache",
                        size(&applied).unwrap_or_default()
                    ),
                ),
                Some(before) if before.request != size(&applied) => (
                    Some("PvcResized"),
                    format!(
                        "requested {} for PVC {name} (was {})",
                        size(&applied).unwrap_or_default(),
                        before.request.as_deref().unwrap_or_default()
                    ),
                ),
                Some(_) => (None, String::new()),
            };
            tracing::info!(namespace = %identity.namespace, claim = %name, "applied the python-packages PVC");
            if let Some(reason) = reason {
                context
                    .publish(app, EventType::Normal, Part::Pvc, reason, note)
                    .await;
            }
            "changed"
        }
        PvcAction::Delete { uid } => {
            // The uid precondition: never delete a claim that was recreated meanwhile.
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid,
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {
                    tracing::info!(namespace = %identity.namespace, claim = %name, "deleted the python-packages PVC");
                    context
                        .publish(
                            app,
                            EventType::Normal,
                            Part::Pvc,
                            "PvcDeleted",
                            format!(
                                "deleted PVC {name}: the app left PVC mode and cache.deleteClaim is true"
                            ),
                        )
                        .await;
                }
                // Gone already (another replica), or replaced by a claim we look at next time.
                Err(error) if is_status(&error, &[404, 409]) => {}
                Err(error) => {
                    context.metrics.count(Part::Pvc, "failed");
                    return Err(api_error("delete", object)(error));
                }
            }
            "changed"
        }
    };
    context.metrics.count(Part::Pvc, outcome);
    Ok(RESYNC)
}

fn statefulsets(client: &Client, namespace: &str) -> Api<DynamicObject> {
    // Read as JSON: the comparison runs the webhook's renderer over the template exactly as
    // stored, unknown fields included.
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::erase::<StatefulSet>(&()),
    )
}

fn template_of(statefulset: &DynamicObject) -> Value {
    statefulset
        .data
        .pointer("/spec/template")
        .cloned()
        .unwrap_or(Value::Null)
}

async fn reconcile_rollout(
    app: &KasprAppObject,
    identity: &AppIdentity,
    report: &Report,
    context: &Context,
) -> Result<Duration, ControllerError> {
    let key = ObjectRef::from_obj(app);
    let name = format!("{}-app", identity.name);
    let object = format!("StatefulSet {}/{name}", identity.namespace);
    let api = statefulsets(&context.client, &identity.namespace);
    let found = api
        .get_opt(&name)
        .await
        .map_err(api_error("read", object.clone()))?;
    let owned = found.as_ref().is_some_and(|sts| {
        sts.metadata.deletion_timestamp.is_none()
            && mutation::owning_app(&serde_json::json!({"metadata": sts.metadata})).as_deref()
                == Some(identity.name.as_str())
    });
    let (Some(statefulset), true) = (found, owned) else {
        // Nothing the webhook would act on.
        context.set_out_of_sync(&key, false);
        context.report(app, Part::Rollout, Vec::new()).await;
        return Ok(RESYNC);
    };
    let render_for = AppContext {
        name: &identity.name,
        namespace: &identity.namespace,
    };
    let state_of = |template: &Value| {
        if report.errors.is_empty() {
            rollout::sync_state(template, report.spec.as_ref(), render_for, &context.render)
        } else {
            SyncState::Blocked(report.error_message(&format!(
                "KasprApp {}/{}",
                identity.namespace, identity.name
            )))
        }
    };
    let (current, desired) = match state_of(&template_of(&statefulset)) {
        SyncState::InSync => {
            context.state().unconverged.remove(&key);
            context.set_out_of_sync(&key, false);
            context.report(app, Part::Rollout, Vec::new()).await;
            context.metrics.count(Part::Rollout, "in_sync");
            return Ok(RESYNC);
        }
        SyncState::Blocked(message) => {
            context.set_out_of_sync(&key, true);
            let notice = Notice::warning(
                "StatefulSetNotInjectable",
                format!("{object} cannot receive the python-packages injection: {message}"),
            );
            context.report(app, Part::Rollout, vec![notice]).await;
            context.metrics.count(Part::Rollout, "pending");
            return Ok(RESYNC);
        }
        SyncState::OutOfSync { current, desired } => (current, desired),
    };

    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    let updated = match api
        .patch(&name, &params, &Patch::Merge(rollout::resync_patch()))
        .await
    {
        Ok(updated) => updated,
        Err(error) => {
            context.set_out_of_sync(&key, true);
            context.metrics.count(Part::Rollout, "failed");
            let notice = Notice::warning(
                "StatefulSetOutOfSync",
                format!(
                    "{object} lacks the current python-packages injection and could not be sent \
                     through the webhook again; retrying with backoff: {}",
                    describe(&error)
                ),
            );
            context.report(app, Part::Rollout, vec![notice]).await;
            return Err(api_error("update", object)(error));
        }
    };
    let after = state_of(&template_of(&updated));
    let changed = updated.metadata.generation != statefulset.metadata.generation;
    if changed {
        let hash = rollout_hash(&updated);
        tracing::info!(
            namespace = %identity.namespace, statefulset = %name,
            from = current.as_deref().unwrap_or("none"), to = hash.as_deref().unwrap_or("none"),
            "StatefulSet updated to the current python-packages injection"
        );
        let note = match hash {
            Some(hash) => format!("updated {object} to python-packages template hash {hash}"),
            None => format!("removed the python-packages injection from {object}"),
        };
        context
            .publish(
                app,
                EventType::Normal,
                Part::Rollout,
                "PackagesRollout",
                note,
            )
            .await;
    }
    if after.in_sync() {
        context.state().unconverged.remove(&key);
        context.set_out_of_sync(&key, false);
        context.report(app, Part::Rollout, Vec::new()).await;
        context.metrics.count(Part::Rollout, "changed");
        return Ok(RESYNC);
    }
    // The webhook rendered something else: it may still read an older KasprApp (its cache
    // follows its own watch), or the UPDATE bypassed it. Look again soon, then less often.
    let attempt = context.state().unconverged(&key);
    context.set_out_of_sync(&key, true);
    context.metrics.count(Part::Rollout, "pending");
    if attempt >= 2 {
        let notice = Notice::warning(
            "StatefulSetOutOfSync",
            format!(
                "{object} still lacks the current python-packages injection after being sent \
                 through the webhook (template hash {}, expected {}); the webhook may be bypassed \
                 (failurePolicy Ignore) or not reading the current KasprApp; retrying with backoff",
                rollout_hash(&updated).as_deref().unwrap_or("none"),
                desired.as_deref().unwrap_or("none"),
            ),
        );
        context.report(app, Part::Rollout, vec![notice]).await;
    }
    Ok(retry_delay(attempt.saturating_add(1)))
}

fn rollout_hash(statefulset: &DynamicObject) -> Option<String> {
    statefulset
        .data
        .pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(mutation::names::TEMPLATE_HASH_ANNOTATION))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn app(name: &str) -> AppKey {
        ObjectRef::new(name).within("apps")
    }

    #[rstest]
    #[case::first(1, 1)]
    #[case::second(2, 2)]
    #[case::fifth(5, 16)]
    #[case::capped(10, 300)]
    #[case::far_out(u32::MAX, 300)]
    fn retries_back_off_exponentially_to_five_minutes(#[case] attempt: u32, #[case] seconds: u64) {
        assert_eq!(retry_delay(attempt), Duration::from_secs(seconds));
    }

    #[test]
    fn a_notice_is_published_once_per_change() {
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
    fn the_out_of_sync_count_follows_apps_and_forgets_deleted_ones() {
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
    fn failures_count_up_per_app() {
        let mut state = State::default();
        assert_eq!(state.failed(&app("a")), 1);
        assert_eq!(state.failed(&app("a")), 2);
        assert_eq!(state.failed(&app("b")), 1);
    }

    #[test]
    fn the_identity_needs_name_namespace_and_uid() {
        let full = serde_json::json!({"apiVersion": "kaspr.io/v1alpha1",
            "metadata": {"name": "a", "namespace": "n", "uid": "u"}});
        assert_eq!(
            AppIdentity::of(&full),
            Some(AppIdentity {
                name: "a".into(),
                namespace: "n".into(),
                uid: "u".into(),
                api_version: "kaspr.io/v1alpha1".into(),
            })
        );
        assert_eq!(
            AppIdentity::of(&serde_json::json!({"metadata": {"name": "a", "namespace": "n"}})),
            None
        );
    }

    #[test]
    fn metrics_are_registered_with_the_product_prefix() {
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
}
