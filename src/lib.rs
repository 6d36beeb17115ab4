//! kaspr-packages-webhook: a mutating admission webhook that installs the Python packages a
//! `KasprApp` lists in `spec.pythonPackages` into the app's pods.
//!
//! The pure core (`spec`, `validation`, `mutation`, `patch`, `admission`) is synchronous and
//! free of I/O so that `preview`, the webhook and the tests share one code path.

pub mod admission;
pub mod app;
pub mod builds;
pub mod cache;
pub mod certs;
pub mod cli;
pub mod config;
pub mod controller;
pub mod documents;
pub mod explain;
pub mod installer;
pub mod metrics;
pub mod mutation;
pub mod names;
pub mod patch;
pub mod preview;
pub mod quantity;
pub mod releases;
pub mod requirement;
pub mod selftest;
pub mod server;
pub mod spec;
pub mod telemetry;
pub mod validation;
