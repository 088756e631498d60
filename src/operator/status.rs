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
use tokio::sync::{Mutex, watch};
use tracing::{debug, warn};

use super::Error;
use crate::relay::{Relay, RelayHealth, RelayId};
use crate::spec::{TransactionRelay, TransactionRelayStatus};

pub const READY: &str = "Ready";
pub const DATABASE_REACHABLE: &str = "DatabaseReachable";
pub const QUEUE_REACHABLE: &str = "QueueReachable";

/// How often the status is rewritten when only `lastSweepTime` moved.
const HEARTBEAT: Duration = Duration::from_secs(60);
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Where a relay stands, as far as the status is concerned.
pub enum Phase<'a> {
    Running { suspended: bool },
    Failed(&'a Error),
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
        Phase::Failed(error) => condition(READY, FALSE, error.reason(), error.to_string(), generation, prior),
        Phase::Running { .. } if health.database_error.is_some() => condition(
            READY,
            FALSE,
            "DatabaseUnreachable",
            "the relay runs but cannot reach its database; /new answers 503".into(),
            generation,
            prior,
        ),
        Phase::Running { suspended: true } => condition(
            READY,
            TRUE,
            "Suspended",
            "accepting and storing transactions, sending none".into(),
            generation,
            prior,
        ),
        Phase::Running { suspended: false } => condition(
            READY,
            TRUE,
            "RelayRunning",
            "accepting transactions and relaying them to the queue".into(),
            generation,
            prior,
        ),
    };
    let database = match (phase, &health.database_error) {
        (Phase::Failed(error @ Error::DatabaseUnreachable(_)), _) => {
            condition(DATABASE_REACHABLE, FALSE, "DatabaseUnreachable", error.to_string(), generation, prior)
        }
        (_, Some(error)) => {
            condition(DATABASE_REACHABLE, FALSE, "DatabaseUnreachable", error.clone(), generation, prior)
        }
        (Phase::Running { .. }, None) => {
            condition(DATABASE_REACHABLE, TRUE, "Connected", "the database answers".into(), generation, prior)
        }
        (Phase::Failed(_), None) => {
            condition(DATABASE_REACHABLE, UNKNOWN, "NotChecked", "the relay has not started".into(), generation, prior)
        }
    };
    let queue = match (phase, &health.queue_error) {
        (_, Some(error)) => {
            let reason = health.queue_error_code.as_deref().unwrap_or("QueueUnreachable");
            condition(QUEUE_REACHABLE, FALSE, reason, error.clone(), generation, prior)
        }
        (_, None) if health.queue_checked => {
            condition(QUEUE_REACHABLE, TRUE, "Reachable", "the queue accepts requests".into(), generation, prior)
        }
        _ => condition(
            QUEUE_REACHABLE,
            UNKNOWN,
            "NotChecked",
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
        last_sweep_time: health
            .last_sweep
            .and_then(|at| Timestamp::from_millisecond(at.timestamp_millis()).ok())
            .map(Time)
            .or_else(|| previous.last_sweep_time.clone()),
        last_error: match phase {
            Phase::Failed(error) => Some(error.to_string()),
            Phase::Running { .. } => health.database_error.or(health.queue_error),
        },
    }
}

struct Published {
    status: TransactionRelayStatus,
    at: Instant,
}

/// Writes statuses for this replica, when it leads.
pub struct StatusWriter {
    client: Client,
    leading: watch::Receiver<bool>,
    published: Mutex<HashMap<RelayId, Published>>,
}

impl StatusWriter {
    pub fn new(client: Client, leading: watch::Receiver<bool>) -> Self {
        Self { client, leading, published: Mutex::new(HashMap::new()) }
    }

    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// The last status written (or seen on the resource), for transition times.
    pub async fn previous(&self, id: &RelayId, resource: Option<&TransactionRelay>) -> TransactionRelayStatus {
        if let Some(published) = self.published.lock().await.get(id) {
            return published.status.clone();
        }
        resource.and_then(|r| r.status.clone()).unwrap_or_default()
    }

    /// Patches the status subresource when this replica leads and the status
    /// changed in more than its heartbeat, at most once a second.
    pub async fn write(&self, id: &RelayId, status: TransactionRelayStatus) -> Result<bool, kube::Error> {
        if !self.is_leading() {
            return Ok(false);
        }
        let mut published = self.published.lock().await;
        if let Some(last) = published.get(id) {
            let same = without_heartbeat(&last.status) == without_heartbeat(&status);
            if same && last.at.elapsed() < HEARTBEAT {
                return Ok(false);
            }
            if let Some(wait) = MIN_INTERVAL.checked_sub(last.at.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let api: Api<TransactionRelay> = Api::namespaced(self.client.clone(), &id.namespace);
        api.patch_status(&id.name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await?;
        debug!(relay = %id, "status written");
        published.insert(id.clone(), Published { status, at: Instant::now() });
        Ok(true)
    }

    pub async fn forget(&self, id: &RelayId) {
        self.published.lock().await.remove(id);
    }

    /// Follows one running relay: rewrites its status after sweeps and
    /// backlog changes, until `stop`.
    pub async fn follow(self: Arc<Self>, relay: Arc<Relay>, mut stop: watch::Receiver<bool>) {
        let mut health = relay.health();
        loop {
            tokio::select! {
                changed = health.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(HEARTBEAT / 4) => {}
                _ = stop.changed() => return,
            }
            let previous = self.previous(relay.id(), None).await;
            let snapshot = health.borrow_and_update().clone();
            let phase = Phase::Running { suspended: relay.config().suspend };
            let status = desired(&phase, Some(&snapshot), previous.observed_generation, &previous);
            if let Err(error) = self.write(relay.id(), status).await {
                warn!(relay = %relay.id(), %error, "could not write status");
            }
            tokio::select! {
                () = tokio::time::sleep(MIN_INTERVAL) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

fn without_heartbeat(status: &TransactionRelayStatus) -> TransactionRelayStatus {
    TransactionRelayStatus { last_sweep_time: None, ..status.clone() }
}
