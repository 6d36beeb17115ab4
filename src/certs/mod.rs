//! Certificates: the serving pair read from files and reloaded without restart
//! ([`reload`]), its parsing and expiry ([`pair`]), the one issuer ([`issue`]) behind both the
//! local self-signed pair ([`local`]) and self-managed certificates ([`self_managed`], whose
//! pure state machine is [`authority`] and whose files are published by [`files`]).
//!
//! The server imports this module; this module never imports the server.

pub mod authority;
pub mod files;
pub mod issue;
pub mod local;
pub mod pair;
pub mod reload;
pub mod self_managed;

pub use self_managed::{CertsError, SelfManagedCerts, run};
