//! The build reconciler (builds on): makes sure the set the app's current spec wants is
//! resolved, locked and built by a Job before anything rolls, and records the result in the
//! lock ConfigMap `<app>-python-packages-lock` that the webhook renders from
//! (see docs/builds.md). The decisions are [`crate::builds`]' pure functions.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams,
    PostParams,
};
use kube::runtime::events::EventType;
use serde_json::{Value, json};

use super::context::{Context, ControllerError, Part, api_error, is_status};
use super::{FIELD_MANAGER, Notice, RESYNC};
use crate::app::AppOwner;
use crate::builds::{self, JobStatus, LockState, SetEntry, SetPhase, Step, job, report, state};
use crate::cache::KasprAppObject;
use crate::names;
use crate::validation::Report;

/// How often a running build is looked at (the Job is not watched).
const BUILD_POLL: Duration = Duration::from_secs(5);

/// What the app wants: the set id and the inputs it hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Wanted {
    pub(super) id: String,
    pub(super) image: String,
    pub(super) refresh: String,
}

/// The set the app's current spec, main image and refresh annotation ask for.
pub(super) fn wanted_set(
    app: &Value,
    owner: &AppOwner,
    install_key: &str,
    template: &Value,
) -> Option<Wanted> {
    let containers = template.pointer("/spec/containers")?.as_array()?;
    let main = containers
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(names::MAIN_CONTAINER))
        .or_else(|| containers.first())?;
    let image = main.get("image")?.as_str()?.to_owned();
    let refresh = app
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(builds::REFRESH_ANNOTATION))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let id = builds::set_id(
        &owner.app.namespace,
        &owner.app.name,
        install_key,
        &image,
        &refresh,
    );
    Some(Wanted { id, image, refresh })
}

/// The Job's state from its status.
pub(super) fn job_status(job: Option<&Job>, termination: Option<String>) -> JobStatus {
    let Some(status) = job.and_then(|j| j.status.as_ref()) else {
        return if job.is_some() {
            JobStatus::Running
        } else {
            JobStatus::Missing
        };
    };
    let condition = |kind: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == kind && c.status == "True")
    };
    if status.succeeded.unwrap_or(0) > 0 || condition("Complete") {
        JobStatus::Succeeded
    } else if status.failed.unwrap_or(0) > 0 || condition("Failed") {
        JobStatus::Failed(termination)
    } else {
        JobStatus::Running
    }
}

fn config_map_body(owner: &AppOwner, data: &BTreeMap<String, String>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": builds::lock_config_map_name(&owner.app.name),
            "namespace": owner.app.namespace,
            "labels": {
                names::APP_LABEL: owner.app.name,
                "kaspr.io/component": "python-packages",
                "app.kubernetes.io/managed-by": FIELD_MANAGER,
            },
            "ownerReferences": [{
                "apiVersion": owner.api_version, "kind": "KasprApp", "name": owner.app.name,
                "uid": owner.uid, "controller": false, "blockOwnerDeletion": true,
            }],
        },
        "data": data,
    })
}

struct Io<'a> {
    context: &'a Context,
    owner: &'a AppOwner,
}

impl Io<'_> {
    fn namespace(&self) -> &str {
        &self.owner.app.namespace
    }

    /// The pod template of the app's StatefulSet (None: not created yet).
    async fn statefulset_template(&self) -> Result<Option<Value>, ControllerError> {
        let namespace = self.namespace();
        let name = format!("{}-app", self.owner.app.name);
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.context.client.clone(),
            namespace,
            &ApiResource::erase::<StatefulSet>(&()),
        );
        let found = api
            .get_opt(&name)
            .await
            .map_err(api_error("read", format!("StatefulSet {namespace}/{name}")))?;
        Ok(found.map(|s| {
            s.data
                .pointer("/spec/template")
                .cloned()
                .unwrap_or(Value::Null)
        }))
    }

    /// The lock ConfigMap's state and locks; a state broken by a hand edit starts over rather
    /// than stay stuck (locks are rebuilt).
    async fn lock_state(&self) -> Result<(LockState, BTreeMap<String, String>), ControllerError> {
        let namespace = self.namespace();
        let name = builds::lock_config_map_name(&self.owner.app.name);
        let api: Api<ConfigMap> = Api::namespaced(self.context.client.clone(), namespace);
        let config_map = api
            .get_opt(&name)
            .await
            .map_err(api_error("read", format!("ConfigMap {namespace}/{name}")))?;
        let data = config_map.as_ref().and_then(|c| c.data.as_ref());
        let state = LockState::from_data(&name, data).unwrap_or_else(|error| {
            tracing::warn!(%error, "the lock ConfigMap is unreadable; its state is reset");
            LockState::default()
        });
        Ok((state, state::locks_of(data)))
    }

    /// The set's Job, and its pod once the Job has finished.
    async fn job_and_pod(
        &self,
        job_name: &str,
    ) -> Result<(Option<Job>, Option<Pod>), ControllerError> {
        let namespace = self.namespace();
        let jobs: Api<Job> = Api::namespaced(self.context.client.clone(), namespace);
        let job = jobs
            .get_opt(job_name)
            .await
            .map_err(api_error("read", format!("Job {namespace}/{job_name}")))?;
        let finished = job
            .as_ref()
            .and_then(|j| j.status.as_ref())
            .is_some_and(|s| s.failed.unwrap_or(0) > 0 || s.succeeded.unwrap_or(0) > 0);
        let pod = if finished {
            self.build_pod(job_name).await?
        } else {
            None
        };
        Ok((job, pod))
    }

    /// The build container's log, which carries the lock.
    async fn build_log(&self, pod_name: &str) -> Result<String, ControllerError> {
        let namespace = self.namespace();
        let pods: Api<Pod> = Api::namespaced(self.context.client.clone(), namespace);
        let params = LogParams {
            container: Some(job::BUILD_CONTAINER.to_owned()),
            ..LogParams::default()
        };
        pods.logs(pod_name, &params).await.map_err(api_error(
            "read the log of",
            format!("Pod {namespace}/{pod_name}"),
        ))
    }

    async fn apply_state(
        &self,
        state: &LockState,
        locks: &BTreeMap<String, String>,
    ) -> Result<(), ControllerError> {
        let name = builds::lock_config_map_name(&self.owner.app.name);
        let api: Api<ConfigMap> = Api::namespaced(self.context.client.clone(), self.namespace());
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(config_map_body(self.owner, &state.to_data(locks))),
        )
        .await
        .map_err(api_error(
            "apply",
            format!("ConfigMap {}/{name}", self.namespace()),
        ))?;
        Ok(())
    }

    async fn build_pod(&self, job: &str) -> Result<Option<Pod>, ControllerError> {
        let api: Api<Pod> = Api::namespaced(self.context.client.clone(), self.namespace());
        let pods = api
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await
            .map_err(api_error(
                "list",
                format!("the pods of Job {}/{job}", self.namespace()),
            ))?;
        Ok(pods.items.into_iter().next())
    }

    async fn delete_job(&self, job: &Job) -> Result<(), ControllerError> {
        let name = job.metadata.name.clone().unwrap_or_default();
        let api: Api<Job> = Api::namespaced(self.context.client.clone(), self.namespace());
        let mut params = DeleteParams::background();
        if let Some(uid) = job.metadata.uid.clone() {
            params = params.preconditions(kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            });
        }
        match api.delete(&name, &params).await {
            Ok(_) => Ok(()),
            Err(error) if is_status(&error, &[404, 409]) => Ok(()),
            Err(error) => Err(api_error(
                "delete",
                format!("Job {}/{name}", self.namespace()),
            )(error)),
        }
    }
}

/// The app's lock state as stored (None: no ConfigMap, or one that cannot be read).
pub(super) async fn read_lock_state(
    context: &Context,
    owner: &AppOwner,
) -> Result<Option<LockState>, ControllerError> {
    let name = builds::lock_config_map_name(&owner.app.name);
    let namespace = owner.app.namespace.as_str();
    let api: Api<ConfigMap> = Api::namespaced(context.client.clone(), namespace);
    let found = api
        .get_opt(&name)
        .await
        .map_err(api_error("read", format!("ConfigMap {namespace}/{name}")))?;
    Ok(found.and_then(|c| LockState::from_data(&name, c.data.as_ref()).ok()))
}

fn termination_message(pod: Option<&Pod>) -> Option<String> {
    pod?.status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == job::BUILD_CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .message
        .clone()
}

pub(super) async fn reconcile_build(
    app: &KasprAppObject,
    owner: &AppOwner,
    report: &Report,
    context: &Context,
) -> Result<Duration, ControllerError> {
    let (Some(spec), true) = (report.spec.as_ref(), report.errors.is_empty()) else {
        context.report(app, Part::Builds, Vec::new()).await;
        return Ok(RESYNC);
    };
    let io = Io { context, owner };
    let Some(template) = io.statefulset_template().await? else {
        return Ok(RESYNC); // the operator has not created it yet; its watch wakes the app
    };
    let Some(wanted) = wanted_set(app.value(), owner, &spec.install_key(), &template) else {
        return Ok(RESYNC);
    };
    let (lock_state, locks) = io.lock_state().await?;
    let job_name = builds::job_name(&owner.app.name, &wanted.id);
    let (found_job, pod) = io.job_and_pod(&job_name).await?;
    let status = job_status(found_job.as_ref(), termination_message(pod.as_ref()));
    let entry = SetEntry {
        id: wanted.id.clone(),
        state: SetPhase::Building,
        install_key: spec.install_key(),
        image: wanted.image.clone(),
        refresh: wanted.refresh.clone(),
        job: job_name.clone(),
        python_packages: app
            .value()
            .pointer("/spec/pythonPackages")
            .cloned()
            .unwrap_or(Value::Null),
        sequence: 0,
        lock_sha256: None,
        category: None,
        message: None,
    };
    let step = builds::state::next_step(&lock_state, &wanted.id, &status);
    let build = Build {
        io,
        app,
        wanted,
        job_name,
        found_job,
        pod,
        lock_state,
        locks,
        entry,
    };
    match step {
        Step::StartBuild => {
            let keep = build
                .lock_state
                .with_building(build.entry.clone())
                .kept_sets();
            let mut body = job::build_job(
                &template,
                spec,
                owner,
                &build.wanted.id,
                &keep,
                &context.render,
            )
            .map_err(|e| build.invalid("build", &e))?;
            if builds::image::publishes(app.value(), &context.render.image_mode) {
                builds::image::add_publish(&mut body, &context.render.image_mode);
            }
            build.start(body).await
        }
        Step::Wait => {
            context.metrics.count(Part::Builds, "pending");
            Ok(BUILD_POLL)
        }
        Step::Collect => build.collect().await,
        Step::RecordFailure { category, message } => {
            build.record_failure(&category, &message).await
        }
        Step::Failed => {
            let entry = build.lock_state.entry(&build.wanted.id);
            let category = entry.and_then(|e| e.category.clone()).unwrap_or_default();
            let message = entry.and_then(|e| e.message.clone()).unwrap_or_default();
            let notice = failure_notice(&build.wanted.id, &category, &message);
            context.report(app, Part::Builds, vec![notice]).await;
            context.metrics.count(Part::Builds, "pending");
            Ok(RESYNC)
        }
        Step::Current => {
            context.report(app, Part::Builds, Vec::new()).await;
            context.metrics.count(Part::Builds, "in_sync");
            Ok(RESYNC)
        }
    }
}

/// One app's build of the set its spec wants, with what was read about it.
struct Build<'a> {
    io: Io<'a>,
    app: &'a KasprAppObject,
    wanted: Wanted,
    job_name: String,
    found_job: Option<Job>,
    /// The finished Job's pod (its termination message and its log carry the result).
    pod: Option<Pod>,
    lock_state: LockState,
    locks: BTreeMap<String, String>,
    /// The set's entry as the current spec describes it, building.
    entry: SetEntry,
}

impl Build<'_> {
    fn invalid(&self, verb: &'static str, error: &dyn std::fmt::Display) -> ControllerError {
        ControllerError::invalid(
            verb,
            format!("Job {}/{}", self.io.namespace(), self.job_name),
            error.to_string(),
        )
    }

    /// The state with this set recorded: a finished Job whose entry is missing (lost, or
    /// recorded by a replica whose write failed) is still recorded, with what the spec says.
    fn recorded(&self) -> LockState {
        if self.lock_state.entry(&self.wanted.id).is_some() {
            self.lock_state.clone()
        } else {
            self.lock_state.with_building(self.entry.clone())
        }
    }

    async fn start(&self, body: Value) -> Result<Duration, ControllerError> {
        let context = self.io.context;
        self.io
            .apply_state(
                &self.lock_state.with_building(self.entry.clone()),
                &self.locks,
            )
            .await?;
        let job: Job = serde_json::from_value(body).map_err(|e| self.invalid("build", &e))?;
        let jobs: Api<Job> = Api::namespaced(context.client.clone(), self.io.namespace());
        match jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {
                context.metrics.count(Part::Builds, "changed");
                let message = format!(
                    "building package set {} in Job {}",
                    self.wanted.id, self.job_name
                );
                context
                    .publish(
                        self.app,
                        EventType::Normal,
                        Part::Builds,
                        "PackageBuildStarted",
                        message,
                    )
                    .await;
            }
            // Another replica created it first: it builds this set; nothing to do.
            Err(error) if is_status(&error, &[409]) => {
                context.metrics.count(Part::Builds, "pending");
            }
            Err(error) => {
                let what = format!("Job {}/{}", self.io.namespace(), self.job_name);
                return Err(api_error("create", what)(error));
            }
        }
        Ok(BUILD_POLL)
    }

    async fn collect(mut self) -> Result<Duration, ControllerError> {
        let context = self.io.context;
        let known = self
            .lock_state
            .entry(&self.wanted.id)
            .and_then(|e| e.lock_sha256.clone());
        let mut published = None;
        let lock_sha = match known {
            Some(existing) => existing,
            None => {
                let Some(pod_name) = self.pod.as_ref().and_then(|p| p.metadata.name.clone()) else {
                    // The build's pod (and its log with the lock) is gone: build again.
                    if let Some(job) = &self.found_job {
                        self.io.delete_job(job).await?;
                    }
                    return Ok(BUILD_POLL);
                };
                let log = self.io.build_log(&pod_name).await?;
                let lock = report::lock_from_log(&log).map_err(|e| self.invalid("collect", &e))?;
                published = builds::image::image_from_log(&log, &self.wanted.image)
                    .map_err(|e| self.invalid("collect", &e))?;
                let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(lock.as_bytes()));
                self.locks.insert(self.wanted.id.clone(), lock);
                sha
            }
        };
        let mut next = self.recorded().with_built(&self.wanted.id, &lock_sha);
        if let Some(image) = published {
            next = next.with_image(&self.wanted.id, image);
        }
        self.io.apply_state(&next, &self.locks).await?;
        if let Some(job) = &self.found_job {
            self.io.delete_job(job).await?;
        }
        context.metrics.count_build("built", "");
        context.report(self.app, Part::Builds, Vec::new()).await;
        let message = format!(
            "package set {} is built (lock sha256 {lock_sha}); pods roll onto it",
            self.wanted.id
        );
        context
            .publish(
                self.app,
                EventType::Normal,
                Part::Builds,
                "PackageSetBuilt",
                message,
            )
            .await;
        Ok(RESYNC)
    }

    async fn record_failure(
        &self,
        category: &str,
        message: &str,
    ) -> Result<Duration, ControllerError> {
        let context = self.io.context;
        let failed = self
            .recorded()
            .with_failed(&self.wanted.id, category, message);
        self.io.apply_state(&failed, &self.locks).await?;
        if let Some(job) = &self.found_job {
            self.io.delete_job(job).await?;
        }
        context.metrics.count_build("failed", category);
        let notice = failure_notice(&self.wanted.id, category, message);
        context.report(self.app, Part::Builds, vec![notice]).await;
        Ok(RESYNC)
    }
}

fn failure_notice(set: &str, category: &str, message: &str) -> Notice {
    Notice::warning(
        "PackageBuildFailed",
        format!(
            "package set {set} could not be built: {category}: {message}; running pods keep their packages"
        ),
    )
}

#[cfg(test)]
#[path = "build_reconciler_tests.rs"]
mod tests;
