//! Package sets: build before rollout (see docs/builds.md).
//!
//! A *package set* is one resolved, locked and built result of an app's package configuration.
//! This module holds the pure parts: the set's identity ([`identity`]), the state kept in the
//! app's lock ConfigMap ([`state`]), the build Job's shape ([`job`]) and what a finished build
//! reports ([`report`]). The controller carries them out.

pub mod identity;
pub mod image;
pub mod job;
pub mod render;
pub mod report;
pub mod state;

pub use identity::{REFRESH_ANNOTATION, SET_ANNOTATION, job_name, lock_config_map_name, set_id};
pub use state::{JobStatus, LockState, SetEntry, SetPhase, Step};
