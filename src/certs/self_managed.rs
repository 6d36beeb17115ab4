//! Self-managed certificates (`serve --self-managed-certs`): the webhook issues its own CA and
//! serving certificate, keeps them in one Secret of its own namespace, writes the CA bundle
//! into its own webhook configurations, and rotates before expiry without a restart.
//!
//! Every replica runs the same loop: read the Secret, ask [`authority::plan`] what it should
//! hold now, write that back with the resourceVersion it read (a 409 means another replica
//! got there first: read again and adopt its result), publish the serving pair as files the
//! server's certificate reloader reads, and make each webhook configuration's `caBundle` the
//! Secret's bundle. Nothing is rendered by Helm, so `helm template` output never changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use super::authority::{self, Policy, Stored};
use super::files;
use super::reload::CertReloader;

/// The field manager of every write, so `kubectl get --show-managed-fields` names the owner.
const FIELD_MANAGER: &str = "kaspr-packages-webhook";
/// Where the service account's namespace is, in a pod.
const IN_CLUSTER_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// Re-reads after a conflict before giving up until the next check.
const MAX_CONFLICTS: usize = 5;

/// Settings of `--self-managed-certs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfManagedCerts {
    /// The Secret holding the certificates.
    pub secret: String,
    /// Namespace of the Secret; `None` means the pod's own namespace.
    pub namespace: Option<String>,
    /// Webhook configurations whose `caBundle` is kept in step (each name is looked up as a
    /// MutatingWebhookConfiguration and as a ValidatingWebhookConfiguration).
    pub webhook_configs: Vec<String>,
    /// The Service in front of the webhook; its DNS names go into the certificate.
    pub service: Option<String>,
    /// More DNS names or IP addresses for the certificate.
    pub extra_names: Vec<String>,
    /// Where the serving pair is published for the server to read.
    pub dir: PathBuf,
    pub validity: Duration,
    pub renew_before: Duration,
    pub overlap: Duration,
    /// How often each replica reads the Secret and checks the webhook configurations.
    pub check_interval: Duration,
}

/// Errors of the self-managed certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("invalid self-managed certificate settings: {0}")]
    Settings(String),
    #[error(
        "cannot tell the certificate Secret's namespace: set --cert-namespace (outside a pod, {IN_CLUSTER_NAMESPACE} does not exist)"
    )]
    Namespace,
    #[error("{what}: {source}")]
    Kube { what: String, source: kube::Error },
    #[error(transparent)]
    Authority(#[from] authority::AuthorityError),
    #[error("cannot publish the serving certificate in {dir}: {source}")]
    Files {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("Secret {0} kept changing under concurrent updates; retrying at the next check")]
    Contended(String),
}

impl SelfManagedCerts {
    /// Checks the settings and resolves the namespace; returns the issuing policy.
    pub fn prepare(&mut self) -> Result<Policy, CertsError> {
        let settings = |message: &str| Err(CertsError::Settings(message.to_owned()));
        if self.secret.trim().is_empty() {
            return settings("--cert-secret is required");
        }
        if self.renew_before >= self.validity {
            return settings("--cert-renew-before must be shorter than --cert-validity");
        }
        if self.overlap.saturating_mul(2) > self.renew_before {
            return settings(
                "--cert-renew-before must be at least twice --cert-overlap (stage, promote and retire before expiry)",
            );
        }
        if self.overlap <= self.check_interval {
            return settings(
                "--cert-overlap must be longer than --cert-check-interval, so every replica sees a staged CA before it is served",
            );
        }
        let namespace = match self.namespace.take().filter(|n| !n.trim().is_empty()) {
            Some(namespace) => namespace,
            None => std::fs::read_to_string(IN_CLUSTER_NAMESPACE)
                .map(|n| n.trim().to_owned())
                .ok()
                .filter(|n| !n.is_empty())
                .ok_or(CertsError::Namespace)?,
        };
        let mut names = Vec::new();
        if let Some(service) = self.service.as_deref().filter(|s| !s.is_empty()) {
            names.extend([
                service.to_owned(),
                format!("{service}.{namespace}"),
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.cluster.local"),
            ]);
        }
        for name in &self.extra_names {
            let name = name.trim();
            if !name.is_empty() && !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        if names.is_empty() {
            return settings(
                "give --service-name or --cert-extra-names: the certificate needs a name",
            );
        }
        self.namespace = Some(namespace);
        Ok(Policy {
            names,
            validity: self.validity,
            renew_before: self.renew_before,
            overlap: self.overlap,
        })
    }
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> CertsError {
    let what = what.into();
    move |source| CertsError::Kube { what, source }
}

fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Runs the certificate loop until the process stops. `config` must have been
/// [`SelfManagedCerts::prepare`]d.
pub async fn run(
    client: kube::Client,
    config: SelfManagedCerts,
    policy: Policy,
    reloader: Arc<CertReloader>,
) {
    let namespace = config.namespace.clone().unwrap_or_default();
    let mut manager = Manager {
        secrets: Api::namespaced(client.clone(), &namespace),
        mutating: Api::all(client.clone()),
        validating: Api::all(client),
        namespace,
        config,
        policy,
        reloader,
        trusted_bundle: None,
        last_error: None,
    };
    tracing::info!(
        secret = %format!("{}/{}", manager.namespace, manager.config.secret),
        names = %manager.policy.names.join(","),
        webhook_configs = %manager.config.webhook_configs.join(","),
        "self-managed certificates"
    );
    let mut ticker = tokio::time::interval(manager.config.check_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = manager.reconcile().await;
        manager.report(result);
    }
}

struct Manager {
    secrets: Api<Secret>,
    mutating: Api<MutatingWebhookConfiguration>,
    validating: Api<ValidatingWebhookConfiguration>,
    namespace: String,
    config: SelfManagedCerts,
    policy: Policy,
    reloader: Arc<CertReloader>,
    /// The bundle last confirmed in every webhook configuration.
    trusted_bundle: Option<Vec<u8>>,
    last_error: Option<String>,
}

impl Manager {
    fn report(&mut self, result: Result<(), CertsError>) {
        match result {
            Ok(()) => {
                if self.last_error.take().is_some() {
                    tracing::info!("self-managed certificates are in step again");
                }
            }
            Err(error) => {
                let text = error.to_string();
                // The same failure every few seconds is logged once, then again when it changes.
                if self.last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "self-managed certificates: check failed; retrying");
                    self.last_error = Some(text);
                }
            }
        }
    }

    async fn reconcile(&mut self) -> Result<(), CertsError> {
        let stored = self.settle_secret().await?;
        if let Some((chain, key)) = stored.serving_pair() {
            let bundle = stored.ca_bundle().unwrap_or_default();
            let changed = files::publish(
                &self.config.dir,
                &[
                    (authority::TLS_CERT, chain, 0o644),
                    (authority::TLS_KEY, key, 0o600),
                    (authority::CA_BUNDLE, bundle, 0o644),
                ],
            )
            .map_err(|source| CertsError::Files {
                dir: self.config.dir.clone(),
                source,
            })?;
            if changed {
                self.reloader.reload_and_log().await;
            }
        }
        if let Some(bundle) = stored.ca_bundle() {
            self.sync_webhook_configs(bundle).await?;
            self.trusted_bundle = Some(bundle.to_vec());
        }
        Ok(())
    }

    /// Reads the Secret and writes the planned state until it holds it; adopts what another
    /// replica wrote when it wins the race.
    async fn settle_secret(&self) -> Result<Stored, CertsError> {
        let name = &self.config.secret;
        let what = format!("Secret {}/{name}", self.namespace);
        for _ in 0..MAX_CONFLICTS {
            let current = self
                .secrets
                .get_opt(name)
                .await
                .map_err(kube_err(format!("cannot read {what}")))?;
            let stored = current.as_ref().map(stored_of).unwrap_or_default();
            let Some((next, transition)) =
                authority::plan(&stored, now(), &self.policy, self.trusted_bundle.as_deref())?
            else {
                return Ok(stored);
            };
            let result = match current {
                Some(mut secret) => {
                    apply_stored(&mut secret, &next);
                    self.secrets
                        .replace(
                            name,
                            &PostParams {
                                dry_run: false,
                                field_manager: Some(FIELD_MANAGER.into()),
                            },
                            &secret,
                        )
                        .await
                }
                None => {
                    let mut secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            namespace: Some(self.namespace.clone()),
                            labels: Some(BTreeMap::from([(
                                "app.kubernetes.io/managed-by".to_owned(),
                                FIELD_MANAGER.to_owned(),
                            )])),
                            ..ObjectMeta::default()
                        },
                        type_: Some("Opaque".into()),
                        ..Secret::default()
                    };
                    apply_stored(&mut secret, &next);
                    self.secrets
                        .create(
                            &PostParams {
                                dry_run: false,
                                field_manager: Some(FIELD_MANAGER.into()),
                            },
                            &secret,
                        )
                        .await
                }
            };
            match result {
                Ok(_) => {
                    tracing::info!(
                        secret = %what,
                        transition = transition.as_str(),
                        "certificate state updated"
                    );
                    return Ok(next);
                }
                Err(error) if status_code(&error) == Some(409) => {
                    tracing::debug!(secret = %what, "another replica updated the certificates; reading again");
                }
                Err(error) => return Err(kube_err(format!("cannot write {what}"))(error)),
            }
        }
        Err(CertsError::Contended(what))
    }

    /// Makes every webhook's `caBundle` in the named configurations equal to `bundle`.
    async fn sync_webhook_configs(&self, bundle: &[u8]) -> Result<(), CertsError> {
        let encoded = base64::engine::general_purpose::STANDARD.encode(bundle);
        for name in &self.config.webhook_configs {
            let mutating = self
                .sync_bundle(&self.mutating, name, bundle, &encoded)
                .await?;
            let validating = self
                .sync_bundle(&self.validating, name, bundle, &encoded)
                .await?;
            if !mutating && !validating {
                tracing::debug!(name, "no webhook configuration of that name yet");
            }
        }
        Ok(())
    }

    /// Writes `bundle` into the webhooks of configuration `name` that lack it; false when no
    /// configuration of that kind and name exists.
    async fn sync_bundle<K: WebhookConfiguration>(
        &self,
        api: &Api<K>,
        name: &str,
        bundle: &[u8],
        encoded: &str,
    ) -> Result<bool, CertsError> {
        let Some(config) = api
            .get_opt(name)
            .await
            .map_err(kube_err(format!("cannot read {} {name}", K::KIND)))?
        else {
            return Ok(false);
        };
        let stale = stale_webhooks(config.bundles().into_iter(), bundle);
        self.patch_bundle(api, K::KIND, name, &stale, encoded)
            .await?;
        Ok(true)
    }

    async fn patch_bundle<K>(
        &self,
        api: &Api<K>,
        kind: &str,
        name: &str,
        stale: &[String],
        encoded: &str,
    ) -> Result<(), CertsError>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        if stale.is_empty() {
            return Ok(());
        }
        // A strategic merge keyed by webhook name touches only caBundle; every other field
        // stays as Helm (or the user) wrote it.
        let webhooks: Vec<_> = stale
            .iter()
            .map(|webhook| serde_json::json!({"name": webhook, "clientConfig": {"caBundle": encoded}}))
            .collect();
        let patch = serde_json::json!({ "webhooks": webhooks });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        api.patch(name, &params, &Patch::Strategic(patch))
            .await
            .map_err(kube_err(format!(
                "cannot patch the caBundle of {kind} {name}"
            )))?;
        tracing::info!(
            kind,
            name,
            webhooks = stale.len(),
            "CA bundle written into the webhook configuration"
        );
        Ok(())
    }
}

/// What the mutating and validating webhook configurations have in common here.
trait WebhookConfiguration:
    kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug
{
    const KIND: &'static str;
    /// Each webhook's name and current `caBundle`.
    fn bundles(&self) -> Vec<(&str, Option<&ByteString>)>;
}

/// Both configuration kinds list webhooks with a name and a client config, in different types.
macro_rules! webhook_configuration {
    ($kind:ty, $name:literal) => {
        impl WebhookConfiguration for $kind {
            const KIND: &'static str = $name;
            fn bundles(&self) -> Vec<(&str, Option<&ByteString>)> {
                self.webhooks
                    .iter()
                    .flatten()
                    .map(|w| (w.name.as_str(), w.client_config.ca_bundle.as_ref()))
                    .collect()
            }
        }
    };
}

webhook_configuration!(MutatingWebhookConfiguration, "MutatingWebhookConfiguration");
webhook_configuration!(
    ValidatingWebhookConfiguration,
    "ValidatingWebhookConfiguration"
);

fn stale_webhooks<'a>(
    webhooks: impl Iterator<Item = (&'a str, Option<&'a ByteString>)>,
    bundle: &[u8],
) -> Vec<String> {
    webhooks
        .filter(|(_, current)| current.map(|b| b.0.as_slice()) != Some(bundle))
        .map(|(name, _)| name.to_owned())
        .collect()
}

fn stored_of(secret: &Secret) -> Stored {
    Stored {
        data: secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect(),
        annotations: secret.metadata.annotations.clone().unwrap_or_default(),
    }
}

fn apply_stored(secret: &mut Secret, stored: &Stored) {
    secret.data = Some(
        stored
            .data
            .iter()
            .map(|(k, v)| (k.clone(), ByteString(v.clone())))
            .collect(),
    );
    secret.string_data = None;
    secret.metadata.annotations =
        (!stored.annotations.is_empty()).then(|| stored.annotations.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SelfManagedCerts {
        SelfManagedCerts {
            secret: "hook-certs".into(),
            namespace: Some("system".into()),
            webhook_configs: vec!["hook".into()],
            service: Some("hook".into()),
            extra_names: vec!["127.0.0.1".into(), "hook".into()],
            dir: PathBuf::from("/tmp/x"),
            validity: Duration::from_secs(365 * 86_400),
            renew_before: Duration::from_secs(30 * 86_400),
            overlap: Duration::from_secs(300),
            check_interval: Duration::from_secs(30),
        }
    }

    #[test]
    fn names_cover_the_service_and_the_extras() {
        let policy = settings().prepare().expect("valid");
        assert_eq!(
            policy.names,
            [
                "hook",
                "hook.system",
                "hook.system.svc",
                "hook.system.svc.cluster.local",
                "127.0.0.1"
            ]
        );
    }

    #[test]
    fn inconsistent_durations_are_refused() {
        let mut s = settings();
        s.renew_before = s.validity;
        assert!(matches!(s.prepare(), Err(CertsError::Settings(_))));
        let mut s = settings();
        s.overlap = Duration::from_secs(20 * 86_400);
        assert!(matches!(s.prepare(), Err(CertsError::Settings(_))));
        let mut s = settings();
        s.check_interval = s.overlap;
        assert!(matches!(s.prepare(), Err(CertsError::Settings(_))));
        let mut s = settings();
        s.service = None;
        s.extra_names.clear();
        assert!(matches!(s.prepare(), Err(CertsError::Settings(_))));
    }

    #[test]
    fn only_webhooks_with_another_bundle_are_patched() {
        let same = ByteString(b"B".to_vec());
        let other = ByteString(b"A".to_vec());
        let stale = stale_webhooks(
            [("a", Some(&same)), ("b", Some(&other)), ("c", None)].into_iter(),
            b"B",
        );
        assert_eq!(stale, ["b", "c"]);
    }
}
