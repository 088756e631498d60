//! The reconciler: from a `TransactionRelay` and its Secrets to a running
//! relay loop and a status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::secrets::SecretReader;
use super::status::{Failure, Phase, Reason, StatusWriter, desired};
use crate::auth::TokenSet;
use crate::metrics::Metrics;
use crate::relay::QueueCheck;
use crate::runtime::lifecycle::{Change, Supervisor};
use crate::runtime::settings::{RelayHandle, StartError};
use crate::spec::RelayId;
use crate::spec::{SpecError, TransactionRelay};

/// Why a relay could not be brought to its desired state. Messages never
/// contain secret values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Secret {0} not found")]
    SecretNotFound(String),
    #[error("Secret {0} has no key {1} (or it is empty)")]
    SecretKeyMissing(String, String),
    #[error("Secret {0} key {1} is not UTF-8 text")]
    SecretKeyInvalid(String, String),
    #[error("invalid spec: {0}")]
    InvalidSpec(SpecError),
    #[error("no ingest token: set spec.ingest.tokenSecretRef, or run the operator with --insecure-no-auth")]
    IngestTokensMissing,
    #[error("database unreachable: {0}")]
    DatabaseUnreachable(String),
    #[error("invalid queue settings: {0}")]
    InvalidQueue(String),
    #[error("cannot get {resource} in namespace {namespace}: forbidden (reading {name})")]
    Forbidden { resource: &'static str, namespace: String, name: String },
    #[error("TransactionRelay {0} not found")]
    RelayNotFound(String),
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error("the operator is stopping")]
    Stopping,
}

impl Error {
    /// The condition reason and Event reason: PascalCase, one per variant.
    pub fn reason(&self) -> Reason {
        match self {
            Self::SecretNotFound(..) => Reason::SecretNotFound,
            Self::SecretKeyMissing(..) => Reason::SecretKeyMissing,
            Self::SecretKeyInvalid(..) => Reason::SecretKeyInvalid,
            Self::InvalidSpec(_) => Reason::InvalidSpec,
            Self::IngestTokensMissing => Reason::IngestTokensMissing,
            Self::DatabaseUnreachable(_) => Reason::DatabaseUnreachable,
            Self::InvalidQueue(_) => Reason::InvalidQueue,
            Self::Forbidden { .. } => Reason::Forbidden,
            Self::RelayNotFound(_) => Reason::RelayNotFound,
            Self::Kube(_) => Reason::KubernetesApiError,
            Self::Stopping => Reason::OperatorStopping,
        }
    }

    /// A bounded metric label: the variant, never the message.
    pub fn metric_label(&self) -> &'static str {
        self.reason().as_str()
    }
}

impl Error {
    /// A failed read of `resource` `name` in `namespace`, with RBAC's
    /// refusal named.
    pub fn reading(resource: &'static str, namespace: &str, name: &str, error: kube::Error) -> Self {
        match &error {
            kube::Error::Api(status) if status.code == 403 => {
                Self::Forbidden { resource, namespace: namespace.to_owned(), name: name.to_owned() }
            }
            _ => Self::Kube(error),
        }
    }
}

impl From<StartError> for Error {
    fn from(error: StartError) -> Self {
        match error {
            StartError::Store(store) => Self::DatabaseUnreachable(store.to_string()),
            StartError::Queue(queue) => Self::InvalidQueue(queue.to_string()),
            StartError::Stopping => Self::Stopping,
        }
    }
}

pub struct Context {
    pub client: Client,
    pub supervisor: Supervisor,
    pub status: Arc<StatusWriter>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub insecure_no_auth: bool,
    failures: std::sync::Mutex<HashMap<RelayId, u32>>,
    /// The controller's cache of the resources, once it exists.
    pub relays: std::sync::OnceLock<kube::runtime::reflector::Store<TransactionRelay>>,
}

impl Context {
    pub fn new(
        client: Client,
        supervisor: Supervisor,
        status: Arc<StatusWriter>,
        recorder: Recorder,
        metrics: Metrics,
        insecure_no_auth: bool,
    ) -> Self {
        Self {
            client,
            supervisor,
            status,
            recorder,
            metrics,
            insecure_no_auth,
            failures: std::sync::Mutex::new(HashMap::new()),
            relays: std::sync::OnceLock::new(),
        }
    }

    async fn apply(&self, resource: &TransactionRelay) -> Result<(Change, RelayHandle), Error> {
        let namespace = resource.namespace().unwrap_or_default();
        let id = relay_id(resource);
        let reader = SecretReader::new(self.client.clone(), &namespace);
        // The tokens first, each on its own, and applied to the running
        // relay whatever else this edit gets wrong: a token removed from
        // its Secret (leaked, revoked) stops working at once, and a rotated
        // one works at once. Only an API error leaves them as they were.
        let (ingest, admin) = self.refresh_tokens(&reader, &id, resource).await;
        let (ingest_tokens, admin_tokens) = (ingest?, admin?);
        if ingest_tokens.is_empty() && !self.insecure_no_auth {
            return Err(Error::IngestTokensMissing);
        }
        let settings = reader.settings(resource, ingest_tokens, admin_tokens).await?;
        let (change, handle) = self.supervisor.ensure(&settings).await?;
        // Every resend by hand through this relay (HTTP or a CLI inside the
        // pod) also becomes an Event on its resource, on whichever replica
        // served it.
        let (recorder, reference) = (self.recorder.clone(), resource.object_ref(&()));
        handle.relay.resend().on_end(move |notice| {
            let event = Event {
                type_: EventType::Normal,
                reason: Reason::Resend.as_str().into(),
                note: Some(notice.note()),
                action: "Resend".into(),
                secondary: None,
            };
            let (recorder, reference) = (recorder.clone(), reference.clone());
            tokio::spawn(async move {
                if let Err(error) = recorder.publish(&event, &reference).await {
                    warn!(%error, "could not publish the resend Event");
                }
            });
        });
        handle.relay.outbox().refresh_gauges().await.map_err(|e| Error::DatabaseUnreachable(e.to_string()))?;
        if !settings.spec.suspend {
            // An early word on the queue where the IAM policy allows one. It
            // never fails the reconcile: a relay needs no permission beyond
            // sqs:SendMessage, and its sends keep QueueReachable true.
            if let QueueCheck::Refused(failure) = handle.relay.outbox().check_queue().await {
                let note = format!(
                    "the queue refused GetQueueAttributes ({}); transactions are stored and wait for it",
                    failure.message
                );
                self.event(resource, EventType::Warning, Reason::QueueUnreachable.as_str(), note).await;
            }
        }
        Ok((change, handle))
    }

    /// Reads the relay's token Secrets and applies what they hold to the
    /// running relay at once (and to one still starting, when it starts).
    /// Called by every reconcile, and by the operator's Secret watch
    /// directly, so a revocation never waits behind a reconcile that is
    /// rebuilding the relay.
    pub async fn refresh_tokens(
        &self,
        reader: &SecretReader,
        id: &RelayId,
        resource: &TransactionRelay,
    ) -> (Result<TokenSet, Error>, Result<TokenSet, Error>) {
        // Numbered first, then the newest spec this process knows: a read
        // numbered later then never uses an older spec (say, a token Secret
        // the user has just stopped naming) than an earlier read did.
        let read_at = self.supervisor.token_read();
        let latest =
            self.relays.get().and_then(|store| store.get(&kube::runtime::reflector::ObjectRef::from_obj(resource)));
        let spec = latest.as_ref().map_or(&resource.spec, |relay| &relay.spec);
        let ingest = reader.tokens(spec.ingest.as_ref().map(|i| &i.token_secret_ref)).await;
        let admin = reader.tokens(spec.admin.as_ref().map(|a| &a.token_secret_ref)).await;
        let read = |tokens: &Result<TokenSet, Error>| match tokens {
            Err(Error::Kube(_) | Error::Forbidden { .. }) => None,
            other => Some(other.as_ref().ok().cloned().unwrap_or_default()),
        };
        self.supervisor.set_tokens(id, read_at, read(&ingest), read(&admin)).await;
        (ingest, admin)
    }

    async fn event(&self, resource: &TransactionRelay, type_: EventType, reason: &str, note: String) {
        if !self.status.is_leading() {
            return;
        }
        let event =
            Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
        if let Err(error) = self.recorder.publish(&event, &resource.object_ref(&())).await {
            warn!(%error, "could not publish an Event");
        }
    }

    /// Backoff for the next attempt after a failure: 1 s, 2 s, 4 s... 5 min.
    fn backoff(&self, id: &RelayId) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = failures.entry(id.clone()).or_insert(0);
        *count = (*count + 1).min(16);
        Duration::from_secs(1u64 << (*count - 1).min(9)).min(Duration::from_secs(300))
    }

    fn succeeded(&self, id: &RelayId) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// Stops the relays whose resource is gone and forgets everything kept
    /// about them (cached status, remembered failure, backoff counter), so a
    /// relay re-created under the same name starts afresh.
    pub async fn forget_deleted(&self, present: &std::collections::HashSet<RelayId>) {
        let keep = |id: &RelayId| present.contains(id);
        self.supervisor.retain(keep).await;
        self.supervisor.relays().forget_not_ready(keep);
        for id in self.status.ids().into_iter().filter(|id| !keep(id)) {
            self.status.forget(&id);
            // A relay that never ran still had its Ready gauge set.
            self.metrics.relay(&id.to_string()).remove();
        }
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).retain(|id, _| keep(id));
    }

    /// Relays with a backoff counter (for tests of the janitor).
    pub fn backing_off(&self) -> Vec<RelayId> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }
}

pub(super) fn relay_id(resource: &TransactionRelay) -> RelayId {
    RelayId::new(resource.namespace().unwrap_or_default(), resource.name_any())
}

pub async fn reconcile(resource: Arc<TransactionRelay>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconcile_total.inc();
    let _timer = ctx.metrics.reconcile_duration.start_timer();
    let id = relay_id(&resource);
    let outcome = ctx.apply(&resource).await;
    let handle = match &outcome {
        Ok((_, handle)) => Some(handle.clone()),
        Err(_) => ctx.supervisor.get(&id),
    };
    let health = handle.as_ref().map(|h| h.relay.health().borrow().clone());
    let failure = outcome.as_ref().err().map(Failure::from);
    // Remembered for the status follower of a relay still running its old
    // configuration, so Ready stays false until the edit is fixed.
    ctx.status.set_failure(&id, failure.clone());
    let mut slot = ctx.status.slot(&id).await;
    slot.belongs_to(&resource);
    let previous = slot.previous(Some(&resource));
    let phase = match &failure {
        None => Phase::Running { suspended: resource.spec.suspend },
        Some(failure) => Phase::Failed(failure),
    };
    // The conditions judge this generation; the status observes only a
    // generation that was applied.
    let mut status = desired(&phase, health.as_ref(), resource.meta().generation, &previous);
    if failure.is_some() {
        status.observed_generation = previous.observed_generation;
    }
    ctx.metrics.relay(&id.to_string()).set_ready(super::status::is_ready(&status));
    if let Err(error) = ctx.status.write(&mut slot, &id, status).await {
        warn!(relay = %id, %error, "could not write status");
    }
    slot.belongs_to(&resource);
    drop(slot);
    match outcome {
        Ok((change, _)) => {
            ctx.succeeded(&id);
            match change {
                Change::Started => {
                    ctx.event(&resource, EventType::Normal, Reason::RelayStarted.as_str(), "relay loop started".into())
                        .await;
                }
                Change::Reconfigured => {
                    let note = "spec or secrets changed; relay restarted with the new settings".into();
                    ctx.event(&resource, EventType::Normal, Reason::RelayReconfigured.as_str(), note).await;
                }
                Change::Unchanged => {}
            }
            // No periodic requeue: the resource and Secret watches bring
            // every change, and a steady state must not poll the API server
            // (100 relays re-read 300 Secrets every 5 minutes, BENCHMARKS.md).
            Ok(Action::await_change())
        }
        Err(error) => {
            ctx.supervisor.relays().set_not_ready(&id, error.reason().as_str());
            ctx.metrics.reconcile_errors.with_label_values(&[error.metric_label()]).inc();
            info!(relay = %id, reason = error.reason().as_str(), %error, "reconcile failed");
            ctx.event(&resource, EventType::Warning, error.reason().as_str(), error.to_string()).await;
            if handle.is_some() {
                let note = format!(
                    "{}: the edit was not applied; the previous configuration is still serving, \
                     with the tokens its Secrets hold now",
                    error.reason().as_str()
                );
                ctx.event(&resource, EventType::Warning, Reason::PreviousConfigurationServing.as_str(), note).await;
            }
            Err(error)
        }
    }
}

pub fn error_policy(resource: Arc<TransactionRelay>, _error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.backoff(&relay_id(&resource)))
}
