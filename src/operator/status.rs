//! The `TransactionRelay` status: conditions built in one place, written
//! only by the leader, only when something changed, at most once a second.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use std::sync::Mutex;

use tokio::sync::watch;
use tracing::{debug, warn};

use super::Error;
use crate::relay::{Relay, RelayHealth};
use crate::spec::RelayId;
use crate::spec::{TransactionRelay, TransactionRelayStatus};

pub const READY: &str = "Ready";
pub const DATABASE_REACHABLE: &str = "DatabaseReachable";
pub const QUEUE_REACHABLE: &str = "QueueReachable";

/// Every reason the operator writes on a condition or an Event of its own
/// making; a refused queue call carries the queue's own code instead
/// (`NonExistentQueue`, `AccessDenied`, ...), as `SendFailure::reason` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    RelayRunning,
    Suspended,
    DatabaseUnreachable,
    Connected,
    NotChecked,
    Reachable,
    QueueUnreachable,
    SecretNotFound,
    SecretKeyMissing,
    SecretKeyInvalid,
    InvalidSpec,
    IngestTokensMissing,
    InvalidQueue,
    Forbidden,
    RelayNotFound,
    KubernetesApiError,
    OperatorStopping,
    RelayStarted,
    RelayReconfigured,
    PreviousConfigurationServing,
    Resend,
}

impl Reason {
    pub const ALL: [Reason; 21] = [
        Self::RelayRunning,
        Self::Suspended,
        Self::DatabaseUnreachable,
        Self::Connected,
        Self::NotChecked,
        Self::Reachable,
        Self::QueueUnreachable,
        Self::SecretNotFound,
        Self::SecretKeyMissing,
        Self::SecretKeyInvalid,
        Self::InvalidSpec,
        Self::IngestTokensMissing,
        Self::InvalidQueue,
        Self::Forbidden,
        Self::RelayNotFound,
        Self::KubernetesApiError,
        Self::OperatorStopping,
        Self::RelayStarted,
        Self::RelayReconfigured,
        Self::PreviousConfigurationServing,
        Self::Resend,
    ];

    /// PascalCase, as Kubernetes conditions and Events spell reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RelayRunning => "RelayRunning",
            Self::Suspended => "Suspended",
            Self::DatabaseUnreachable => "DatabaseUnreachable",
            Self::Connected => "Connected",
            Self::NotChecked => "NotChecked",
            Self::Reachable => "Reachable",
            Self::QueueUnreachable => "QueueUnreachable",
            Self::SecretNotFound => "SecretNotFound",
            Self::SecretKeyMissing => "SecretKeyMissing",
            Self::SecretKeyInvalid => "SecretKeyInvalid",
            Self::InvalidSpec => "InvalidSpec",
            Self::IngestTokensMissing => "IngestTokensMissing",
            Self::InvalidQueue => "InvalidQueue",
            Self::Forbidden => "Forbidden",
            Self::RelayNotFound => "RelayNotFound",
            Self::KubernetesApiError => "KubernetesApiError",
            Self::OperatorStopping => "OperatorStopping",
            Self::RelayStarted => "RelayStarted",
            Self::RelayReconfigured => "RelayReconfigured",
            Self::PreviousConfigurationServing => "PreviousConfigurationServing",
            Self::Resend => "Resend",
        }
    }
}

/// How often the status is rewritten when only `lastSweepTime` moved.
const HEARTBEAT: Duration = Duration::from_secs(60);
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Why the last reconcile of a relay failed, kept until one succeeds: the
/// status says so whatever the running (old) configuration reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub message: String,
}

impl From<&Error> for Failure {
    fn from(error: &Error) -> Self {
        Self { reason: error.reason(), message: error.to_string() }
    }
}

/// Where a relay stands, as far as the status is concerned.
pub enum Phase<'a> {
    Running { suspended: bool },
    Failed(&'a Failure),
}

struct Tri(&'static str);
const TRUE: Tri = Tri("True");
const FALSE: Tri = Tri("False");
const UNKNOWN: Tri = Tri("Unknown");

fn condition(
    type_: &str,
    status: Tri,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: &[Condition],
) -> Condition {
    let unchanged = previous.iter().find(|c| c.type_ == type_).filter(|c| c.status == status.0);
    Condition {
        type_: type_.into(),
        status: status.0.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        // Kept unless the status flips, as Kubernetes conventions ask.
        last_transition_time: unchanged.map_or_else(|| Time(Timestamp::now()), |c| c.last_transition_time.clone()),
    }
}

/// The status a relay should show. `previous` keeps transition times.
pub fn desired(
    phase: &Phase<'_>,
    health: Option<&RelayHealth>,
    generation: Option<i64>,
    previous: &TransactionRelayStatus,
) -> TransactionRelayStatus {
    let prior = &previous.conditions;
    let health = health.cloned().unwrap_or_default();
    let ready = match phase {
        Phase::Failed(failure) => {
            condition(READY, FALSE, failure.reason.as_str(), failure.message.clone(), generation, prior)
        }
        Phase::Running { .. } if health.database_error.is_some() => condition(
            READY,
            FALSE,
            Reason::DatabaseUnreachable.as_str(),
            "the relay runs but cannot reach its database; /new answers 503".into(),
            generation,
            prior,
        ),
        Phase::Running { suspended: true } => condition(
            READY,
            TRUE,
            Reason::Suspended.as_str(),
            "accepting and storing transactions, sending none".into(),
            generation,
            prior,
        ),
        Phase::Running { suspended: false } => condition(
            READY,
            TRUE,
            Reason::RelayRunning.as_str(),
            "accepting transactions and relaying them to the queue".into(),
            generation,
            prior,
        ),
    };
    let database = match (phase, &health.database_error) {
        (Phase::Failed(failure), _) if failure.reason == Reason::DatabaseUnreachable => condition(
            DATABASE_REACHABLE,
            FALSE,
            Reason::DatabaseUnreachable.as_str(),
            failure.message.clone(),
            generation,
            prior,
        ),
        (_, Some(error)) => {
            condition(DATABASE_REACHABLE, FALSE, Reason::DatabaseUnreachable.as_str(), error.clone(), generation, prior)
        }
        (Phase::Running { .. }, None) => condition(
            DATABASE_REACHABLE,
            TRUE,
            Reason::Connected.as_str(),
            "the database answers".into(),
            generation,
            prior,
        ),
        (Phase::Failed(_), None) => condition(
            DATABASE_REACHABLE,
            UNKNOWN,
            Reason::NotChecked.as_str(),
            "the relay has not started".into(),
            generation,
            prior,
        ),
    };
    let queue = match (phase, &health.queue_error) {
        (_, Some(error)) => {
            let reason = health.queue_error_code.as_deref().unwrap_or(Reason::QueueUnreachable.as_str());
            condition(QUEUE_REACHABLE, FALSE, reason, error.clone(), generation, prior)
        }
        (_, None) if health.queue_checked => condition(
            QUEUE_REACHABLE,
            TRUE,
            Reason::Reachable.as_str(),
            "the queue accepts requests".into(),
            generation,
            prior,
        ),
        _ => condition(
            QUEUE_REACHABLE,
            UNKNOWN,
            Reason::NotChecked.as_str(),
            "the queue has not been called yet".into(),
            generation,
            prior,
        ),
    };
    let gauges = health.gauges;
    TransactionRelayStatus {
        observed_generation: generation,
        conditions: vec![ready, database, queue],
        unsent: gauges.map(|g| g.unsent).or(previous.unsent),
        failed: gauges.map(|g| g.failed).or(previous.failed),
        oldest_unsent_age_seconds: gauges
            .map(|g| g.oldest_unsent_age_seconds.round() as i64)
            .or(previous.oldest_unsent_age_seconds),
        oldest_unsent_time: match gauges {
            Some(gauges) => {
                gauges.oldest_unsent_at.and_then(|at| Timestamp::from_second(at.timestamp()).ok()).map(Time)
            }
            None => previous.oldest_unsent_time.clone(),
        },
        last_sweep_time: health
            .last_sweep
            .and_then(|at| Timestamp::from_millisecond(at.timestamp_millis()).ok())
            .map(Time)
            .or_else(|| previous.last_sweep_time.clone()),
        last_error: match phase {
            Phase::Failed(failure) => Some(failure.message.clone()),
            Phase::Running { .. } => health.database_error.or(health.queue_error),
        },
    }
}

/// The status last computed for a relay, and when this replica wrote it
/// (`None`: computed while following, or not written since leading again).
pub struct Published {
    status: TransactionRelayStatus,
    at: Option<Instant>,
    /// The resource it was computed for: a relay deleted and created again
    /// under the same name is another resource, and starts afresh.
    uid: Option<String>,
}

/// Writes statuses for this replica, when it leads.
///
/// One relay's writes are ordered by a lock of its own, held while its
/// status is computed and written, so a follower's write can never land
/// after, and undo, a newer one from the reconciler. No lock shared by
/// relays is held across a sleep or an API call: one slow patch never holds
/// up another relay's status.
pub struct StatusWriter {
    client: Client,
    leading: watch::Receiver<bool>,
    published: Mutex<HashMap<RelayId, Arc<tokio::sync::Mutex<Option<Published>>>>>,
    failures: Mutex<HashMap<RelayId, Failure>>,
}

/// One relay's status, locked for computing and writing it.
pub struct Slot(tokio::sync::OwnedMutexGuard<Option<Published>>);

impl Slot {
    /// The last status written (or seen on the resource), for transition
    /// times and the observed generation.
    pub fn previous(&self, resource: Option<&TransactionRelay>) -> TransactionRelayStatus {
        match &*self.0 {
            Some(published) => published.status.clone(),
            None => resource.and_then(|r| r.status.clone()).unwrap_or_default(),
        }
    }

    /// Forgets what was written for another resource of the same name.
    pub fn belongs_to(&mut self, resource: &TransactionRelay) {
        let uid = resource.metadata.uid.as_deref();
        if self.0.as_ref().is_some_and(|p| p.uid.is_some() && p.uid.as_deref() != uid) {
            *self.0 = None;
        }
        if let Some(published) = self.0.as_mut() {
            published.uid = uid.map(str::to_owned);
        }
    }

    fn is_published(&self) -> bool {
        self.0.is_some()
    }
}

impl StatusWriter {
    pub fn new(client: Client, leading: watch::Receiver<bool>) -> Self {
        Self { client, leading, published: Mutex::new(HashMap::new()), failures: Mutex::new(HashMap::new()) }
    }

    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Leadership as it changes.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Locks one relay's status for computing and writing it.
    pub async fn slot(&self, id: &RelayId) -> Slot {
        let cell = self.published.lock().unwrap_or_else(|e| e.into_inner()).entry(id.clone()).or_default().clone();
        Slot(cell.lock_owned().await)
    }

    /// Remembers why the last reconcile failed (`None`: it succeeded). While
    /// a failure is remembered, the follower of the relay that still runs
    /// the old configuration keeps `Ready` false with that reason, instead
    /// of reporting the old configuration as if the edit had been applied.
    pub fn set_failure(&self, id: &RelayId, failure: Option<Failure>) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match failure {
            Some(failure) => failures.insert(id.clone(), failure),
            None => failures.remove(id),
        };
    }

    pub fn failure(&self, id: &RelayId) -> Option<Failure> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Writes the status by server-side apply with the operator's field
    /// manager, when this replica leads and the status changed in more than
    /// its heartbeat, at most once a second. Server-side apply makes the
    /// written status the whole truth: a field the operator no longer sets
    /// (a cleared `lastError`) disappears, and conditions merge by `type`.
    pub async fn write(
        &self,
        slot: &mut Slot,
        id: &RelayId,
        status: TransactionRelayStatus,
    ) -> Result<bool, kube::Error> {
        if !self.is_leading() {
            // Kept, so that this replica can write it the moment it leads.
            let uid = slot.0.as_ref().and_then(|p| p.uid.clone());
            *slot.0 = Some(Published { status, at: None, uid });
            return Ok(false);
        }
        if let Some(last) = slot.0.as_ref()
            && let Some(at) = last.at
        {
            let same = without_heartbeat(&last.status) == without_heartbeat(&status);
            if same && at.elapsed() < HEARTBEAT {
                return Ok(false);
            }
            if let Some(wait) = MIN_INTERVAL.checked_sub(at.elapsed()) {
                tokio::time::sleep(wait).await;
                // Leadership may have moved while waiting.
                if !self.is_leading() {
                    let uid = slot.0.as_ref().and_then(|p| p.uid.clone());
                    *slot.0 = Some(Published { status, at: None, uid });
                    return Ok(false);
                }
            }
        }
        let api: Api<TransactionRelay> = Api::namespaced(self.client.clone(), &id.namespace);
        let body = json!({
            "apiVersion": "relay.mykobo.io/v1alpha1",
            "kind": "TransactionRelay",
            "status": status,
        });
        api.patch_status(&id.name, &PatchParams::apply(super::MANAGER).force(), &Patch::Apply(body)).await?;
        debug!(relay = %id, "status written");
        let uid = slot.0.as_ref().and_then(|p| p.uid.clone());
        *slot.0 = Some(Published { status, at: Some(Instant::now()), uid });
        Ok(true)
    }

    pub fn forget(&self, id: &RelayId) {
        self.published.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        self.set_failure(id, None);
    }

    /// The relays this writer remembers anything of.
    pub fn ids(&self) -> Vec<RelayId> {
        let mut ids: Vec<RelayId> = self.published.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        ids.extend(self.failures.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned());
        ids.sort();
        ids.dedup();
        ids
    }

    /// Follows one running relay: rewrites its status after sweeps and
    /// backlog changes, until `stop`. On gaining leadership it writes at
    /// once, whatever it wrote before: another replica led meanwhile.
    pub async fn follow(self: Arc<Self>, relay: Arc<Relay>, mut stop: watch::Receiver<bool>) {
        let mut health = relay.health();
        let mut leading = self.leading();
        loop {
            let mut regained = false;
            tokio::select! {
                changed = health.changed() => if changed.is_err() { return },
                changed = leading.changed() => {
                    if changed.is_err() { return }
                    regained = *leading.borrow_and_update();
                }
                () = tokio::time::sleep(HEARTBEAT / 4) => {}
                _ = stop.changed() => return,
            }
            let mut slot = self.slot(relay.id()).await;
            // The reconciler computes a relay's first status (it knows the
            // resource and its generation); the follower keeps it fresh.
            if slot.is_published() {
                let mut previous = slot.previous(None);
                if regained {
                    // Another replica wrote meanwhile: write whatever we have.
                    if let Some(published) = slot.0.as_mut() {
                        published.at = None;
                    }
                }
                let snapshot = health.borrow_and_update().clone();
                let failure = self.failure(relay.id());
                let phase = match &failure {
                    Some(failure) => Phase::Failed(failure),
                    None => Phase::Running { suspended: relay.config().suspend },
                };
                // The conditions keep the generation the reconciler judged
                // (a failed edit's, too); the status keeps the applied one.
                let observed = previous.observed_generation.take();
                let judged = previous
                    .conditions
                    .iter()
                    .find(|c| c.type_ == READY)
                    .and_then(|c| c.observed_generation)
                    .or(observed);
                let mut status = desired(&phase, Some(&snapshot), judged, &previous);
                status.observed_generation = observed;
                relay.metrics().set_ready(is_ready(&status));
                if let Err(error) = self.write(&mut slot, relay.id(), status).await {
                    warn!(relay = %relay.id(), %error, "could not write status");
                }
            }
            drop(slot);
            tokio::select! {
                () = tokio::time::sleep(MIN_INTERVAL) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// Whether a status says `Ready=True` (the `txrelay_relay_ready` gauge,
/// set by every replica, leading or not).
pub fn is_ready(status: &TransactionRelayStatus) -> bool {
    status.conditions.iter().any(|c| c.type_ == READY && c.status == "True")
}

fn without_heartbeat(status: &TransactionRelayStatus) -> TransactionRelayStatus {
    TransactionRelayStatus { last_sweep_time: None, ..status.clone() }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    /// Each reason is spelt as its variant, as Kubernetes expects: one
    /// word, PascalCase, and never two variants with one spelling.
    #[test]
    fn every_reason_is_its_variant_name_in_pascal_case() {
        let mut seen = std::collections::HashSet::new();
        for reason in Reason::ALL {
            assert_eq!(reason.as_str(), format!("{reason:?}"));
            assert!(reason.as_str().starts_with(|c: char| c.is_ascii_uppercase()));
            assert!(seen.insert(reason.as_str()), "{reason:?} twice");
        }
    }
}
