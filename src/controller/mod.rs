//! The controller that `serve` runs beside the webhook: the PVC cache lifecycle ([`pvc`]) and
//! the rollout trigger ([`rollout`]).
//!
//! One kube-runtime [`Controller`] per watched scope (all namespaces, or each of `--namespaces`)
//! reconciles KasprApps. It is woken by KasprApp changes, by changes of StatefulSets owned by a
//! KasprApp (so an operator rewrite that loses the injection is noticed) and by changes of the
//! claims this product manages. The decisions are pure functions in [`pvc`] and [`rollout`];
//! this module reads the objects they need, carries out their answer and reports. A watch of
//! the app pods in the same scopes reports installs that did without their cache (`installs`).
//!
//! Every write is idempotent (server-side apply with one field manager, a merge patch that
//! removes one annotation, a delete with a uid precondition), so two replicas may reconcile the
//! same app at once without leader election: the second write is a no-op.

pub mod moves;
pub mod pvc;
pub mod rollout;

mod build_reconciler;
mod claim_reconciler;
mod context;
mod installs;
mod move_reconciler;
mod rollout_reconciler;
#[cfg(test)]
mod test_api;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::controller::{self, Action, Config};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource};
use prometheus_client::registry::Registry;

use crate::app::AppOwner;
use crate::cache::KasprAppObject;
use crate::config::RenderConfig;
use crate::names;
use crate::validation;
use build_reconciler::{read_lock_state, reconcile_build};
use claim_reconciler::reconcile_claim;
pub use context::ControllerMetrics;
use context::{Context, ControllerError, State};
use rollout_reconciler::reconcile_rollout;

/// Field manager of every write, and `app.kubernetes.io/managed-by` of the claims.
pub const FIELD_MANAGER: &str = "kaspr-packages-webhook";

/// Which parts of the controller run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerOptions {
    /// Keep the PVC cache of apps in PVC mode.
    pub pvc: bool,
    /// Send StatefulSets whose injection is out of date through the webhook again.
    pub rollout: bool,
    /// Build each package set in a Job before anything rolls (docs/builds.md).
    pub builds: bool,
    /// How long the API server may fail to reach the webhook for an app before a Warning Event.
    pub unreachable_grace: Duration,
    /// At most this many apps move to this rendering revision at a time on their own; 0: none
    /// (docs/revisions.md).
    pub rollout_budget: u32,
    /// A move not finished (every replica Ready on the new template) within this time fails and
    /// stops the wave.
    pub rollout_deadline: Duration,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            pvc: true,
            rollout: true,
            builds: false,
            unreachable_grace: rollout::UNREACHABLE_GRACE,
            rollout_budget: 0,
            rollout_deadline: moves::DEADLINE,
        }
    }
}

/// Without a change, each app is looked at again this often (a safety net for missed events).
pub(crate) const RESYNC: Duration = Duration::from_secs(15 * 60);
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

/// Builds the controller: `None` when both parts are off. The future runs until dropped.
pub fn run(
    client: &Client,
    namespaces: &[String],
    options: ControllerOptions,
    render: RenderConfig,
    registry: &mut Registry,
) -> Option<BoxFuture<'static, ()>> {
    if !options.pvc && !options.rollout && !options.builds {
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
    let controllers: Vec<Controller<KasprAppObject>> = scopes
        .iter()
        .map(|scope| scoped_controller(client, *scope, options))
        .collect();
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
        builds = options.builds,
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
    // Degraded installs are read from the app pods' termination messages, in the same scopes.
    let started = k8s_openapi::jiff::Timestamp::now();
    let move_scopes: Vec<Option<String>> = scopes.iter().map(|s| s.map(str::to_owned)).collect();
    for scope in scopes {
        tasks
            .push(installs::watch(Arc::clone(&context), scope.map(str::to_owned), started).boxed());
    }
    if options.rollout {
        tasks.push(move_reconciler::run(Arc::clone(&context), move_scopes).boxed());
    }
    tasks.push(prune(context).boxed());
    Some(
        async move {
            futures::future::join_all(tasks).await;
            tracing::warn!("controller stopped");
        }
        .boxed(),
    )
}

/// The kube-runtime controller of one scope (a namespace, or all with `None`): woken by its
/// KasprApps, by their StatefulSets (rollout) and by the claims this product manages (PVC).
fn scoped_controller(
    client: &Client,
    scope: Option<&str>,
    options: ControllerOptions,
) -> Controller<KasprAppObject> {
    fn api<K>(client: &Client, scope: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match scope {
            None => Api::all(client.clone()),
            Some(namespace) => Api::namespaced(client.clone(), namespace),
        }
    }
    let mut controller = Controller::new(api(client, scope), watcher::Config::default())
        .with_config(
            Config::default()
                .debounce(Duration::from_millis(500))
                .concurrency(4),
        );
    if options.rollout {
        // Owned StatefulSets, and those an operator recreated without an ownerReference
        // (known by their pod-template labels), wake their app.
        controller = controller.watches(
            api::<StatefulSet>(client, scope),
            watcher::Config::default(),
            |statefulset: StatefulSet| {
                let namespace = statefulset.metadata.namespace.clone()?;
                let object = serde_json::to_value(&statefulset).ok()?;
                let app = crate::app::statefulset_app(&object)?;
                Some(ObjectRef::new(&app).within(&namespace))
            },
        );
    }
    if options.pvc {
        controller = controller.watches(
            api::<PersistentVolumeClaim>(client, scope),
            watcher::Config::default().labels(pvc::MANAGED_SELECTOR),
            |claim: PersistentVolumeClaim| {
                let namespace = claim.metadata.namespace.as_deref()?;
                let app = claim.metadata.labels.as_ref()?.get(names::APP_LABEL)?;
                Some(ObjectRef::new(app).within(namespace))
            },
        );
    }
    controller
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
    let Some(owner) = AppOwner::of(value) else {
        return Ok(Action::await_change());
    };
    if value.pointer("/metadata/deletionTimestamp").is_some() {
        return Ok(Action::await_change());
    }
    let report = validation::validate_kasprapp(value);
    let mut next = RESYNC;
    let mut failure = None;
    if context.options.pvc {
        match reconcile_claim(&app, &owner, &report, &context).await {
            Ok(delay) => next = next.min(delay),
            Err(error) => failure = Some(error),
        }
    }
    // Builds before the rollout: a set built in this pass is rolled out in the same pass.
    if context.options.builds {
        match reconcile_build(&app, &owner, &report, &context).await {
            Ok(delay) => next = next.min(delay),
            Err(error) => failure = failure.or(Some(error)),
        }
    }
    if context.options.rollout {
        // Builds on: compare with what the webhook renders, the app's current set.
        let rendered = if context.options.builds {
            match read_lock_state(&context, &owner).await {
                Ok(state) => Some(crate::builds::render::effective_app(value, state.as_ref())),
                Err(error) => {
                    failure = failure.or(Some(error));
                    None
                }
            }
        } else {
            Some(value.as_ref().clone())
        };
        if let Some(rendered) = rendered {
            let rendered_report = validation::validate_kasprapp(&rendered);
            match reconcile_rollout(&app, &owner, &rendered_report, &rendered, &context).await {
                Ok(delay) => next = next.min(delay),
                Err(error) => failure = failure.or(Some(error)),
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::first(1, 1)]
    #[case::second(2, 2)]
    #[case::fifth(5, 16)]
    #[case::capped(10, 300)]
    #[case::far_out(u32::MAX, 300)]
    fn retries_back_off_exponentially_to_five_minutes(#[case] attempt: u32, #[case] seconds: u64) {
        assert_eq!(retry_delay(attempt), Duration::from_secs(seconds));
    }
}
