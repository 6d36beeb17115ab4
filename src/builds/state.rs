//! What the lock ConfigMap `<app>-python-packages-lock` records, and the controller's next step
//! for a wanted set. Pure: the controller reads the ConfigMap and the Job, asks [`next_step`],
//! and writes what [`LockState`]'s methods return.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The ConfigMap key of the state.
pub const STATE_KEY: &str = "state.json";
/// Built sets kept besides the current one, for rollback.
pub const KEEP_OLD_BUILT: usize = 3;

/// The ConfigMap key of a set's lock.
pub fn lock_key(set: &str) -> String {
    format!("{set}.pylock.toml")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetPhase {
    Building,
    Built,
    Failed,
}

/// One set the app asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SetEntry {
    pub id: String,
    pub state: SetPhase,
    pub install_key: String,
    pub image: String,
    #[serde(default)]
    pub refresh: String,
    pub job: String,
    /// `spec.pythonPackages` as the KasprApp had it (secret references only, never values):
    /// what the webhook renders while this set is current.
    pub python_packages: Value,
    /// Order of creation within this ConfigMap (newest highest).
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The content of `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LockState {
    /// The newest built set: the one the webhook renders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub sets: Vec<SetEntry>,
    /// Image mode: the image each built set was published as, by set id (kept and dropped
    /// with its set).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, crate::builds::image::PublishedImage>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("ConfigMap {config_map}: data.{key} is not valid JSON state: {reason}")]
    Unreadable {
        config_map: String,
        key: &'static str,
        reason: String,
    },
}

/// What a build Job is doing, as the controller saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStatus {
    Missing,
    Running,
    Succeeded,
    /// With the build container's termination message, when there is one.
    Failed(Option<String>),
}

/// The controller's next step for the wanted set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Record the set as `Building` and create its Job (a 409 means another replica did).
    StartBuild,
    /// The Job runs: nothing to do until it finishes.
    Wait,
    /// The Job succeeded: read the lock from its pod's log and record the set as built.
    Collect,
    /// The Job failed: record the failure (Event, metric); running pods keep their set.
    RecordFailure { category: String, message: String },
    /// The wanted set is built and current: roll the StatefulSet if it names another set.
    Current,
    /// The wanted set failed earlier: nothing more until the spec or refresh token changes.
    Failed,
}

impl LockState {
    /// Reads `state.json` of the ConfigMap's data; a missing key is an empty state.
    pub fn from_data(
        config_map: &str,
        data: Option<&BTreeMap<String, String>>,
    ) -> Result<Self, StateError> {
        let Some(text) = data.and_then(|d| d.get(STATE_KEY)) else {
            return Ok(LockState::default());
        };
        serde_json::from_str(text).map_err(|e| StateError::Unreadable {
            config_map: config_map.to_owned(),
            key: STATE_KEY,
            reason: e.to_string(),
        })
    }

    pub fn entry(&self, id: &str) -> Option<&SetEntry> {
        self.sets.iter().find(|s| s.id == id)
    }

    /// The current set's entry, if it is built.
    pub fn current_entry(&self) -> Option<&SetEntry> {
        let id = self.current.as_deref()?;
        self.entry(id).filter(|e| e.state == SetPhase::Built)
    }

    fn next_sequence(&self) -> u64 {
        self.sets.iter().map(|s| s.sequence).max().unwrap_or(0) + 1
    }

    /// The state with `entry` recorded as `Building` (replacing a failed entry of that id).
    pub fn with_building(&self, mut entry: SetEntry) -> Self {
        let mut next = self.clone();
        entry.state = SetPhase::Building;
        entry.sequence = self.next_sequence();
        entry.lock_sha256 = None;
        entry.category = None;
        entry.message = None;
        next.sets.retain(|s| s.id != entry.id);
        next.sets.push(entry);
        next.pruned()
    }

    /// The state with set `id` built and current.
    pub fn with_built(&self, id: &str, lock_sha256: &str) -> Self {
        let mut next = self.clone();
        if let Some(entry) = next.sets.iter_mut().find(|s| s.id == id) {
            entry.state = SetPhase::Built;
            entry.lock_sha256 = Some(lock_sha256.to_owned());
            entry.category = None;
            entry.message = None;
            next.current = Some(id.to_owned());
        }
        next.pruned()
    }

    /// The state with the image set `id` was published as.
    pub fn with_image(&self, id: &str, image: crate::builds::image::PublishedImage) -> Self {
        let mut next = self.clone();
        if next.entry(id).is_some() {
            next.images.insert(id.to_owned(), image);
        }
        next
    }

    /// The current set's published image, if it has one.
    pub fn current_image(&self) -> Option<&crate::builds::image::PublishedImage> {
        self.images.get(&self.current_entry()?.id)
    }

    /// The state with set `id` failed; the current set stays.
    pub fn with_failed(&self, id: &str, category: &str, message: &str) -> Self {
        let mut next = self.clone();
        if let Some(entry) = next.sets.iter_mut().find(|s| s.id == id) {
            entry.state = SetPhase::Failed;
            entry.category = Some(category.to_owned());
            entry.message = Some(message.to_owned());
        }
        next.pruned()
    }

    /// Keeps the current set, sets being built, the [`KEEP_OLD_BUILT`] newest other built sets,
    /// and failures newer than the current set.
    fn pruned(mut self) -> Self {
        let current_seq = self.current_entry().map_or(0, |e| e.sequence);
        let current = self.current.clone();
        let mut old_built: Vec<u64> = self
            .sets
            .iter()
            .filter(|s| s.state == SetPhase::Built && Some(&s.id) != current.as_ref())
            .map(|s| s.sequence)
            .collect();
        old_built.sort_unstable_by(|a, b| b.cmp(a));
        old_built.truncate(KEEP_OLD_BUILT);
        self.sets.retain(|s| match s.state {
            SetPhase::Building => true,
            SetPhase::Built => Some(&s.id) == current.as_ref() || old_built.contains(&s.sequence),
            SetPhase::Failed => s.sequence > current_seq,
        });
        self.sets.sort_by_key(|s| s.sequence);
        let kept: Vec<String> = self.sets.iter().map(|s| s.id.clone()).collect();
        self.images.retain(|id, _| kept.contains(id));
        self
    }

    /// The sets this state keeps (built or being built): what a build may not prune from the
    /// cache.
    pub fn kept_sets(&self) -> Vec<String> {
        self.sets
            .iter()
            .filter(|s| s.state != SetPhase::Failed)
            .map(|s| s.id.clone())
            .collect()
    }

    /// The ConfigMap's data: the state plus the lock of every kept built set (`locks` maps set
    /// ids to lock text; locks of dropped sets are left out, so applying the data drops them).
    pub fn to_data(&self, locks: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut data = BTreeMap::new();
        data.insert(
            STATE_KEY.to_owned(),
            serde_json::to_string(self).unwrap_or_default(),
        );
        for entry in &self.sets {
            if entry.state == SetPhase::Built
                && let Some(lock) = locks.get(&entry.id)
            {
                data.insert(lock_key(&entry.id), lock.clone());
            }
        }
        data
    }
}

/// The existing locks of a ConfigMap's data, by set id.
pub fn locks_of(data: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    data.into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            k.strip_suffix(".pylock.toml")
                .map(|id| (id.to_owned(), v.clone()))
        })
        .collect()
}

/// What to do for `wanted` given the recorded state and its Job.
pub fn next_step(state: &LockState, wanted: &str, job: &JobStatus) -> Step {
    match (state.entry(wanted).map(|e| e.state), job) {
        (Some(SetPhase::Built), _) if state.current.as_deref() == Some(wanted) => Step::Current,
        // An older built set asked for again (a rollback of the spec): it becomes current.
        (Some(SetPhase::Built), _) => Step::Collect,
        (Some(SetPhase::Failed), _) => Step::Failed,
        (_, JobStatus::Succeeded) => Step::Collect,
        (_, JobStatus::Failed(termination)) => {
            let (category, message) = crate::builds::report::failure(termination.as_deref());
            Step::RecordFailure { category, message }
        }
        (Some(SetPhase::Building), JobStatus::Running) | (None, JobStatus::Running) => Step::Wait,
        (_, JobStatus::Missing) => Step::StartBuild,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use serde_json::json;

    fn entry(id: &str) -> SetEntry {
        SetEntry {
            id: id.to_owned(),
            state: SetPhase::Building,
            install_key: "0123456789abcdef".into(),
            image: "img:1".into(),
            refresh: String::new(),
            job: format!("app-packages-{id}"),
            python_packages: json!({"packages": ["a"]}),
            sequence: 0,
            lock_sha256: None,
            category: None,
            message: None,
        }
    }

    fn built(ids: &[&str]) -> LockState {
        ids.iter().fold(LockState::default(), |s, id| {
            s.with_building(entry(id)).with_built(id, "sha")
        })
    }

    #[rstest]
    #[case::nothing_yet(LockState::default(), JobStatus::Missing, Step::StartBuild)]
    #[case::recorded_but_job_gone(LockState::default().with_building(entry("w")), JobStatus::Missing, Step::StartBuild)]
    #[case::running(LockState::default().with_building(entry("w")), JobStatus::Running, Step::Wait)]
    #[case::job_created_by_another_replica(LockState::default(), JobStatus::Running, Step::Wait)]
    #[case::succeeded(LockState::default().with_building(entry("w")), JobStatus::Succeeded, Step::Collect)]
    #[case::current(built(&["w"]), JobStatus::Missing, Step::Current)]
    #[case::older_built_set_again(built(&["w", "x"]), JobStatus::Missing, Step::Collect)]
    #[case::failed_stays_failed(LockState::default().with_building(entry("w")).with_failed("w", "network", "m"), JobStatus::Missing, Step::Failed)]
    fn next_step_follows_state_and_job(
        #[case] state: LockState,
        #[case] job: JobStatus,
        #[case] expected: Step,
    ) {
        assert_eq!(next_step(&state, "w", &job), expected);
    }

    #[test]
    fn a_failed_job_reports_the_installers_category_and_message() {
        let state = LockState::default().with_building(entry("w"));
        let step = next_step(
            &state,
            "w",
            &JobStatus::Failed(Some(
                "kaspr-packages: FAILED package_not_found: pip download exited with 1: No matching distribution found for a==9\n".into(),
            )),
        );
        assert_eq!(
            step,
            Step::RecordFailure {
                category: "package_not_found".into(),
                message: "pip download exited with 1: No matching distribution found for a==9"
                    .into()
            }
        );
    }

    #[test]
    fn a_failure_keeps_the_current_set() {
        let state = built(&["a"])
            .with_building(entry("b"))
            .with_failed("b", "network", "down");
        assert_eq!(state.current.as_deref(), Some("a"));
        assert_eq!(state.current_entry().map(|e| e.id.as_str()), Some("a"));
        assert_eq!(state.entry("b").map(|e| e.state), Some(SetPhase::Failed));
        // Fixing the spec (a new id) builds and replaces the failure once built.
        let fixed = state.with_building(entry("c")).with_built("c", "sha-c");
        assert_eq!(fixed.current.as_deref(), Some("c"));
        assert!(
            fixed.entry("b").is_none(),
            "failures older than the current set are dropped"
        );
    }

    #[test]
    fn a_build_keeps_the_listed_sets_and_itself_but_not_failures() {
        let state = built(&["s1", "s2", "s3", "s4", "s5"])
            .with_building(entry("f"))
            .with_failed("f", "network", "down")
            .with_building(entry("s6"));
        assert_eq!(state.kept_sets(), ["s2", "s3", "s4", "s5", "s6"]);
    }

    #[test]
    fn keeps_current_and_three_older_built_sets_with_their_locks() {
        let state = built(&["s1", "s2", "s3", "s4", "s5", "s6"]);
        let ids: Vec<&str> = state.sets.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["s3", "s4", "s5", "s6"]);
        assert_eq!(state.current.as_deref(), Some("s6"));
        let locks: BTreeMap<String, String> = ["s1", "s2", "s3", "s4", "s5", "s6"]
            .iter()
            .map(|id| ((*id).to_owned(), format!("lock {id}")))
            .collect();
        let data = state.to_data(&locks);
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "s3.pylock.toml",
                "s4.pylock.toml",
                "s5.pylock.toml",
                "s6.pylock.toml",
                "state.json"
            ]
        );
        let back = LockState::from_data("app-python-packages-lock", Some(&data)).expect("reads");
        assert_eq!(back, state);
        assert_eq!(locks_of(Some(&data)).len(), 4);
    }

    #[test]
    fn unreadable_state_names_the_config_map_and_key() {
        let data = BTreeMap::from([(STATE_KEY.to_owned(), "{not json".to_owned())]);
        let error =
            LockState::from_data("my-app-python-packages-lock", Some(&data)).expect_err("bad JSON");
        assert!(error.to_string().starts_with(
            "ConfigMap my-app-python-packages-lock: data.state.json is not valid JSON state"
        ));
        assert_eq!(
            LockState::from_data("x", None).expect("empty"),
            LockState::default()
        );
    }
}
