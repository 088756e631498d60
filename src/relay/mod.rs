//! A relay: one outbox table, one queue. It accepts transactions (commit,
//! then send inline) and runs the loop that delivers whatever is still unsent.

pub mod backoff;
pub mod directory;
mod engine;
pub mod message;
mod recorder;
mod sweep;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

pub use engine::{listen_for_due_rows, run_loop};
pub use sweep::{RetryAllReport, SweepReport};

use crate::metrics::{Accepted, RelayMetrics, SendPath};
use crate::queue::{FailureScope, Queue, SendFailure};
use crate::secret::Secret;
use crate::spec::TransactionRelaySpec;
use crate::store::{Conflict, FailedSend, Gauges, InsertOutcome, Store, StoreError};
use crate::transaction::{NewTransaction, Transaction};
use backoff::Backoff;
use recorder::SentRecorder;

/// `namespace/name` of a `TransactionRelay`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId {
    pub namespace: String,
    pub name: String,
}

impl RelayId {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The parts of the spec the engine works with, as plain durations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayConfig {
    pub retry_interval: Duration,
    pub batch_size: u32,
    pub max_attempts: u32,
    pub suspend: bool,
    pub claim_lease: Duration,
    pub concurrency: usize,
    pub inline_send_timeout: Duration,
    pub retention: Option<Duration>,
    pub unsent_warning_threshold: u64,
}

impl From<&TransactionRelaySpec> for RelayConfig {
    fn from(spec: &TransactionRelaySpec) -> Self {
        Self {
            retry_interval: spec.retry_interval.get(),
            batch_size: spec.batch_size,
            max_attempts: spec.max_attempts,
            suspend: spec.suspend,
            claim_lease: spec.claim_lease.get(),
            concurrency: usize::try_from(spec.concurrency).unwrap_or(1).max(1),
            inline_send_timeout: spec.inline_send_timeout.get(),
            retention: spec.retention.map(|r| r.get()),
            unsent_warning_threshold: spec.unsent_warning_threshold,
        }
    }
}

impl RelayConfig {
    /// How long a new row is held for its inline send: the send's timeout,
    /// and as much again for committing its result.
    pub fn inline_lease(&self) -> Duration {
        self.inline_send_timeout * 2 + Duration::from_secs(1)
    }
}

/// What `/new` did with a transaction.
#[derive(Debug)]
pub enum Submission {
    /// Committed and sent (201).
    Sent(Transaction),
    /// Committed; the relay loop will send it (202).
    Queued(Transaction),
    /// Same key, same content: the stored transaction (200).
    Replayed(Transaction),
    Conflict(Conflict),
}

/// What the relay last saw of its database and queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RelayHealth {
    pub database_error: Option<String>,
    pub queue_error: Option<String>,
    pub database_checked: bool,
    pub queue_checked: bool,
    pub gauges: Option<Gauges>,
    pub last_sweep: Option<DateTime<Utc>>,
}

pub struct Relay {
    id: RelayId,
    config: RelayConfig,
    store: Store,
    queue: Arc<dyn Queue>,
    ledger_token: Option<Secret>,
    metrics: RelayMetrics,
    sent_recorder: SentRecorder,
    /// `spec.concurrency`: batch calls in flight, across overlapping sweeps.
    send_permits: tokio::sync::Semaphore,
    backoff: Backoff,
    rng: Mutex<fastrand::Rng>,
    wake: Notify,
    queue_up: AtomicBool,
    /// Rows claimed by this process and not yet recorded: released if the
    /// process has to stop before their results are in.
    in_flight: Mutex<HashSet<i64>>,
    health: watch::Sender<RelayHealth>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay").field("id", &self.id).field("config", &self.config).finish_non_exhaustive()
    }
}

impl Relay {
    pub fn new(
        id: RelayId,
        config: RelayConfig,
        store: Store,
        queue: Arc<dyn Queue>,
        ledger_token: Option<Secret>,
        metrics: RelayMetrics,
    ) -> Self {
        let backoff = Backoff::new(config.retry_interval);
        let send_permits = tokio::sync::Semaphore::new(config.concurrency);
        Self {
            id,
            config,
            sent_recorder: SentRecorder::start(store.clone()),
            send_permits,
            store,
            queue,
            ledger_token,
            metrics,
            backoff,
            rng: Mutex::new(fastrand::Rng::new()),
            wake: Notify::new(),
            queue_up: AtomicBool::new(true),
            in_flight: Mutex::new(HashSet::new()),
            health: watch::Sender::new(RelayHealth::default()),
        }
    }

    /// Fixes the jitter sequence, for tests of the backoff schedule.
    pub fn with_seed(self, seed: u64) -> Self {
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = fastrand::Rng::with_seed(seed);
        self
    }

    pub fn id(&self) -> &RelayId {
        &self.id
    }

    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn is_fifo(&self) -> bool {
        self.queue.is_fifo()
    }

    pub fn health(&self) -> watch::Receiver<RelayHealth> {
        self.health.subscribe()
    }

    pub fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    /// Wakes the loop: a row became due sooner than it planned for.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn queue_is_up(&self) -> bool {
        self.queue_up.load(Ordering::Acquire)
    }

    fn mark_queue(&self, up: bool, error: Option<&SendFailure>) {
        let was_up = self.queue_up.swap(up, Ordering::AcqRel);
        if was_up && !up {
            warn!(relay = %self.id, error = error.map(|e| e.message.as_str()), "queue unreachable; rows stay unsent until it answers");
        } else if !was_up && up {
            info!(relay = %self.id, "queue reachable again");
        }
        self.set_queue_health(error.map(|e| e.message.clone()));
    }

    /// Probes the queue now and records what it said. Only a transient
    /// failure stops inline sends; a permanent one (a missing queue) is
    /// reported, and each row meets it when sent.
    pub async fn check_queue(&self) -> Result<(), SendFailure> {
        let result = self.queue.probe().await;
        match &result {
            Ok(()) => self.mark_queue(true, None),
            Err(failure) if !failure.is_permanent() => self.mark_queue(false, Some(failure)),
            Err(failure) => self.set_queue_health(Some(failure.message.clone())),
        }
        result
    }

    fn mark_database(&self, error: Option<&StoreError>) {
        let error = error.map(ToString::to_string);
        // Called on every request: watchers (the status writer) are woken
        // only when something changed.
        self.health.send_if_modified(|h| {
            let changed = !h.database_checked || h.database_error != error;
            h.database_checked = true;
            h.database_error = error;
            changed
        });
    }

    fn set_queue_health(&self, error: Option<String>) {
        self.health.send_if_modified(|h| {
            let changed = !h.queue_checked || h.queue_error != error;
            h.queue_checked = true;
            h.queue_error = error;
            changed
        });
    }

    fn jittered_backoff(&self, attempts: u32) -> Duration {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        self.backoff.delay(attempts, &mut rng)
    }

    fn failed_send(&self, id: i64, attempts_before: i32, failure: &SendFailure) -> FailedSend {
        let attempts = u32::try_from(attempts_before).unwrap_or(0).saturating_add(1);
        FailedSend {
            id,
            error: failure.message.clone(),
            retry_in: self.jittered_backoff(attempts),
            permanent: failure.is_permanent(),
        }
    }

    /// Commits a transaction, then tries to send it inline. A failed or slow
    /// send never fails the request: the row is committed and the loop will
    /// deliver it.
    #[tracing::instrument(skip_all, fields(relay = %self.id, reference = %tx.reference, idempotency_key = %tx.idempotency_key))]
    pub async fn submit(&self, tx: &NewTransaction) -> Result<Submission, StoreError> {
        let inline = !self.config.suspend && self.queue_is_up();
        let lease_ms = if inline { millis(self.config.inline_lease()) } else { 0 };
        let outcome = self.store.insert(tx, lease_ms, self.is_fifo()).await;
        self.mark_database(outcome.as_ref().err().filter(|e| e.is_unavailable()));
        let (transaction, held_back) = match outcome? {
            InsertOutcome::Created { transaction, held_back } => (transaction, held_back),
            InsertOutcome::Replayed(existing) => {
                self.metrics.accepted(Accepted::Replayed);
                info!(id = existing.id, "replayed: same idempotency key and content");
                return Ok(Submission::Replayed(existing));
            }
            InsertOutcome::Conflict(conflict) => {
                self.metrics.accepted(Accepted::Rejected);
                info!(field = conflict.field(), "conflict with a stored transaction");
                return Ok(Submission::Conflict(conflict));
            }
        };
        self.metrics.accepted(Accepted::Created);
        info!(id = transaction.id, "committed");
        if !inline {
            self.wake();
            return Ok(Submission::Queued(transaction));
        }
        if held_back {
            // FIFO: an older row of this wallet is still unsent; this one
            // goes after it, through the loop.
            self.store.release(&[transaction.id]).await?;
            info!(id = transaction.id, "held back behind an older unsent transaction of the same wallet");
            return Ok(Submission::Queued(transaction));
        }
        Ok(self.send_inline(transaction, &tx.payload).await)
    }

    async fn send_inline(&self, transaction: Transaction, payload: &str) -> Submission {
        let message = match message::body(payload, self.ledger_token.as_ref()) {
            Ok(body) => crate::queue::OutboundMessage {
                id: transaction.id,
                body,
                idempotency_key: transaction.idempotency_key.clone(),
                reference: transaction.reference.clone(),
                source: transaction.source.clone(),
                group_id: transaction.wallet_address.clone(),
            },
            Err(error) => {
                return self.inline_failed(transaction, SendFailure::permanent(error)).await;
            }
        };
        let sent = tokio::time::timeout(self.config.inline_send_timeout, self.queue.send(&message)).await;
        let message_id = match sent {
            Ok(Ok(message_id)) => message_id,
            Ok(Err(failure)) => return self.inline_failed(transaction, failure).await,
            Err(_) => {
                let failure = SendFailure::transient(format!(
                    "inline send timed out after {:?}",
                    self.config.inline_send_timeout
                ));
                return self.inline_failed(transaction, failure).await;
            }
        };
        self.mark_queue(true, None);
        self.metrics.sent(SendPath::Inline, 1);
        info!(id = transaction.id, message_id = %message_id, "sent inline");
        match self.record_with_retry(|| self.sent_recorder.record(vec![(transaction.id, message_id.clone())])).await {
            Ok(mut rows) if !rows.is_empty() => Submission::Sent(rows.remove(0)),
            // Already recorded by someone else: nothing more to do.
            Ok(_) => Submission::Sent(transaction),
            Err(error) => {
                // Sent but not recorded: the row is swept again after its lease,
                // a duplicate the ledger drops by idempotency key.
                warn!(id = transaction.id, %error, "sent but could not record the message id");
                Submission::Queued(transaction)
            }
        }
    }

    async fn inline_failed(&self, transaction: Transaction, failure: SendFailure) -> Submission {
        self.metrics.send_failures(failure.is_permanent(), 1);
        if failure.scope == FailureScope::Request && !failure.is_permanent() {
            self.mark_queue(false, Some(&failure));
        }
        if failure.is_permanent() {
            warn!(id = transaction.id, error = %failure, "inline send refused for good; dead-lettered");
        } else {
            warn!(id = transaction.id, error = %failure, "inline send failed; the relay will retry");
        }
        let failed = self.failed_send(transaction.id, transaction.attempts, &failure);
        let recorded = self
            .record_with_retry(|| self.store.record_failures(std::slice::from_ref(&failed), self.config.max_attempts))
            .await;
        self.wake();
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(error) = store.notify_due().await {
                warn!(%error, "could not notify other replicas");
            }
        });
        match recorded {
            Ok(mut rows) if !rows.is_empty() => Submission::Queued(rows.remove(0)),
            Ok(_) => Submission::Queued(transaction),
            Err(error) => {
                // The row keeps its inline lease and is swept when it runs out.
                warn!(id = transaction.id, %error, "could not record the failed inline send");
                Submission::Queued(transaction)
            }
        }
    }

    /// Recording a result is retried briefly: a blip must not turn a
    /// delivered message into a duplicate.
    async fn record_with_retry<T, F, Fut>(&self, mut record: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(100);
        for _ in 0..3 {
            match record().await {
                Err(error) if error.is_unavailable() => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                other => return other,
            }
        }
        record().await
    }

    fn track(&self, ids: impl IntoIterator<Item = i64>) {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).extend(ids);
    }

    fn untrack(&self, ids: &[i64]) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            in_flight.remove(id);
        }
    }

    /// Releases every row this process still holds. Called when shutdown
    /// cannot wait any longer for in-flight sends.
    pub async fn release_in_flight(&self) -> Result<u64, StoreError> {
        let ids: Vec<i64> = self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
        self.store.release(&ids).await
    }

    /// Reads the backlog from the database and publishes it as metrics.
    pub async fn refresh_gauges(&self) -> Result<Gauges, StoreError> {
        let gauges = self.store.gauges().await?;
        self.metrics.set_backlog(gauges.unsent, gauges.failed, gauges.oldest_unsent_age_seconds);
        self.health.send_modify(|h| h.gauges = Some(gauges));
        Ok(gauges)
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
