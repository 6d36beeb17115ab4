//! `explain`: why a Pod, StatefulSet or KasprApp was or was not injected, and whether the
//! injection is current.
//!
//! The shell in [`fetch`] reads what it needs from the live cluster into a [`Snapshot`]; the
//! pure [`explain`] turns a snapshot into a [`Report`] of plain lines with an exit status. The
//! desired injection is rendered by the webhook's own code (`mutation::apply`, and the
//! controller's `rollout::sync_state` for StatefulSets), and the KasprApp is checked by the
//! webhook's own validator, so `explain` cannot disagree with what the webhook does.

pub mod diff;
pub mod fetch;
mod moves;
mod objects;
pub mod report;
mod sections;
pub mod status;
pub mod webhooks;

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::config::RenderConfig;
pub use report::{EXIT_ERROR, EXIT_NOT_INJECTED, EXIT_PROBLEM, Report, Severity, Verdict};

/// The kind of object explained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pod,
    StatefulSet,
    KasprApp,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::StatefulSet => "StatefulSet",
            Kind::KasprApp => "KasprApp",
        }
    }
}

/// An object that was read, found absent, or could not be read (with the reason).
#[derive(Debug, Clone, PartialEq)]
pub enum Known<T> {
    Found(T),
    Missing,
    Unreadable(String),
}

impl<T> Known<T> {
    pub fn found(&self) -> Option<&T> {
        match self {
            Known::Found(value) => Some(value),
            Known::Missing | Known::Unreadable(_) => None,
        }
    }
}

/// The settings the running webhook renders with, and where they were read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Server {
    pub render: RenderConfig,
    /// `--namespaces` of `serve` (the chart's `server.watchNamespaces`); empty means all.
    pub watch_namespaces: Vec<String>,
    /// How its controller moves apps between rendering revisions.
    pub rollout: Rollout,
    /// Where the settings come from, for the reader (e.g. `Deployment kaspr/kaspr-packages-webhook`).
    pub source: String,
}

/// `--rollout-budget` and `--rollout-deadline` of `serve` (the chart's `rollout.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub budget: u32,
    pub deadline: Duration,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            budget: 0,
            deadline: crate::controller::moves::DEADLINE,
        }
    }
}

/// Everything `explain` reads from the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub kind: Kind,
    /// The object explained.
    pub object: Value,
    /// Its Namespace object.
    pub namespace: Known<Value>,
    /// The release's MutatingWebhookConfiguration.
    pub mutating: Known<Value>,
    /// The release's ValidatingWebhookConfiguration.
    pub validating: Known<Value>,
    pub server: Server,
    /// For a Pod: the StatefulSet owning it, when an ownerReference names one.
    pub owner: Option<Known<Value>>,
    /// The KasprApp the object belongs to; `None` when it does not exist or none is named.
    pub kasprapp: Option<Value>,
    /// For a KasprApp: the StatefulSets that belong to it.
    pub statefulsets: Vec<Value>,
    /// For a StatefulSet or KasprApp: their pods.
    pub pods: Known<Vec<Value>>,
    /// In PVC mode: the claim `<app>-python-packages` (`Missing` when it does not exist).
    pub claim: Option<Known<Value>>,
    /// When it was read: a move's age and deadline are judged against it.
    pub now: Timestamp,
}

impl Snapshot {
    /// A snapshot of `object` alone, for tests and callers that fill in the rest.
    pub fn of(kind: Kind, object: Value) -> Self {
        Snapshot {
            kind,
            object,
            namespace: Known::Missing,
            mutating: Known::Missing,
            validating: Known::Missing,
            server: Server::default(),
            owner: None,
            kasprapp: None,
            statefulsets: Vec::new(),
            pods: Known::Missing,
            claim: None,
            now: Timestamp::now(),
        }
    }
}

/// The explanation of a snapshot.
pub fn explain(snapshot: &Snapshot) -> Report {
    match snapshot.kind {
        Kind::Pod => objects::pod(snapshot),
        Kind::StatefulSet => objects::statefulset(snapshot),
        Kind::KasprApp => objects::kasprapp(snapshot),
    }
}

#[cfg(test)]
mod tests;
