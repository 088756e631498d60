//! A relay: one outbox table, one queue. It accepts transactions (commit,
//! then send inline) and runs the loop that delivers whatever is still unsent.

pub mod backoff;
pub mod directory;
mod engine;
pub mod message;
mod recorder;
mod sweep;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

pub use engine::{listen_for_due_rows, run_loop};
pub use sweep::{RetryAllReport, SweepReport};

use crate::metrics::{Accepted, FailureLabel, RelayMetrics, SendPath};
use crate::queue::{FailureKind, Queue, SendFailure};
use crate::secret::Secret;
use crate::spec::TransactionRelaySpec;
use crate::store::{ClaimRef, Conflict, FailedSend, Gauges, InsertOutcome, Store, StoreError};
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

    /// The ceiling on one call to the queue: a quarter of the claim lease
    /// (1-10 s), so a hung connection cannot outlive the claim.
    pub fn call_timeout(&self) -> Duration {
        (self.claim_lease / 4).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// What a claim must still have left for a call to start: the call's
    /// timeout, and as long again to record its result.
    pub fn lease_needed_per_call(&self) -> Duration {
        self.call_timeout() * 2
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
    /// Why the queue refused the last call, as a status-condition reason
    /// (`NonExistentQueue`, `AccessDenied`, `QueueUnreachable`...).
    pub queue_error_code: Option<String>,
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
    /// GetQueueAttributes was denied once: it is not asked again.
    queue_check_denied: AtomicBool,
    /// Rows claimed by this process and not yet recorded: released if the
    /// process has to stop before their results are in.
    in_flight: Mutex<HashMap<i64, ClaimRef>>,
    health: watch::Sender<RelayHealth>,
    /// HTTP requests being answered by this relay (see [`Relay::enter`]).
    requests: watch::Sender<usize>,
}

/// Held while an HTTP request is being answered by a relay: its store is
/// not closed under it (a reconfigured relay is replaced while requests that
/// already reached it may still be recording a message id).
#[derive(Debug)]
pub struct RequestGuard(Arc<Relay>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.requests.send_modify(|n| *n = n.saturating_sub(1));
    }
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
            queue_check_denied: AtomicBool::new(false),
            in_flight: Mutex::new(HashMap::new()),
            health: watch::Sender::new(RelayHealth::default()),
            requests: watch::Sender::new(0),
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

    /// Marks a request in progress until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> RequestGuard {
        self.requests.send_modify(|n| *n += 1);
        RequestGuard(self.clone())
    }

    /// Waits until no request is in progress, or `deadline`; whether they all finished.
    pub async fn requests_finished_by(&self, deadline: tokio::time::Instant) -> bool {
        let mut requests = self.requests.subscribe();
        tokio::time::timeout_at(deadline, async {
            let _ = requests.wait_for(|n| *n == 0).await;
        })
        .await
        .is_ok()
    }

    /// Wakes the loop: a row became due sooner than it planned for.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn queue_is_up(&self) -> bool {
        self.queue_up.load(Ordering::Acquire)
    }

    /// What the last call to the queue showed: it took messages, or it
    /// refused a whole call. While the queue is down, inline sends stop and
    /// the loop probes it by sending the oldest due batch, once a second.
    fn mark_queue(&self, up: bool, failure: Option<&SendFailure>) {
        let was_up = self.queue_up.swap(up, Ordering::AcqRel);
        if was_up && !up {
            warn!(relay = %self.id, error = failure.map(|e| e.message.as_str()),
                  "queue refused the request; rows stay unsent, without an attempt, until a send goes through");
        } else if !was_up && up {
            info!(relay = %self.id, "queue takes messages again");
        }
        self.metrics.set_queue_reachable(up);
        let error = failure.map(|f| (f.message.clone(), f.reason()));
        self.health.send_if_modified(|h| {
            let (message, code) = error.clone().unzip();
            let changed = !h.queue_checked || h.queue_error != message || h.queue_error_code != code;
            h.queue_checked = true;
            h.queue_error = message;
            h.queue_error_code = code;
            changed
        });
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

    fn jittered_backoff(&self, attempts: u32) -> Duration {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        self.backoff.delay(attempts, &mut rng)
    }

    fn failed_send(&self, row: ClaimRef, attempts_before: i32, failure: &SendFailure) -> FailedSend {
        let attempts = u32::try_from(attempts_before).unwrap_or(0).saturating_add(1);
        FailedSend {
            row,
            error: failure.message.clone(),
            retry_in: self.jittered_backoff(attempts),
            permanent: failure.dead_letters(),
        }
    }

    fn count_failures(&self, kind: FailureKind, count: usize) {
        let label = match kind {
            FailureKind::Queue => FailureLabel::Queue,
            FailureKind::Message => FailureLabel::Permanent,
            FailureKind::Transient => FailureLabel::Transient,
        };
        self.metrics.send_failures(label, count);
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
        let (transaction, held_back, claim) = match outcome? {
            InsertOutcome::Created { transaction, held_back, claim } => (transaction, held_back, claim),
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
            // goes after it, through the loop. The row is committed whatever
            // happens to the release: if it fails, the row waits out its
            // short inline lease instead, and the answer is still 202.
            info!(id = transaction.id, "held back behind an older unsent transaction of the same wallet");
            if let Err(error) = self.store.release(&[claim]).await {
                warn!(id = transaction.id, %error, "could not release the held-back row; it is swept after its inline lease");
            }
            return Ok(Submission::Queued(transaction));
        }
        Ok(self.send_inline(transaction, claim, &tx.payload).await)
    }

    async fn send_inline(&self, transaction: Transaction, claim: ClaimRef, payload: &str) -> Submission {
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
                return self.inline_failed(transaction, claim, SendFailure::message(error)).await;
            }
        };
        let sent = tokio::time::timeout(self.config.inline_send_timeout, self.queue.send(&message)).await;
        let message_id = match sent {
            Ok(Ok(message_id)) => message_id,
            Ok(Err(failure)) => return self.inline_failed(transaction, claim, failure).await,
            Err(_) => {
                let failure = SendFailure::unreachable(format!(
                    "inline send timed out after {:?}",
                    self.config.inline_send_timeout
                ));
                return self.inline_failed(transaction, claim, failure).await;
            }
        };
        self.mark_queue(true, None);
        self.metrics.sent(SendPath::Inline, 1);
        info!(id = transaction.id, message_id = %message_id, "sent inline");
        match self.record_with_retry(|| self.sent_recorder.record(vec![(claim, message_id.clone())])).await {
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

    async fn inline_failed(&self, transaction: Transaction, claim: ClaimRef, failure: SendFailure) -> Submission {
        self.count_failures(failure.kind, 1);
        let recorded = if failure.holds() {
            self.mark_queue(false, Some(&failure));
            warn!(id = transaction.id, error = %failure, "inline send refused by the queue; the relay will send it, no attempt counted");
            let held = [(claim, failure.message.clone())];
            self.record_with_retry(|| self.store.hold(&held)).await
        } else {
            if failure.dead_letters() {
                warn!(id = transaction.id, error = %failure, "inline send refused for good; dead-lettered");
            } else {
                warn!(id = transaction.id, error = %failure, "inline send failed; the relay will retry");
            }
            let failed = self.failed_send(claim, transaction.attempts, &failure);
            self.record_with_retry(|| {
                self.store.record_failures(std::slice::from_ref(&failed), self.config.max_attempts)
            })
            .await
        };
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

    fn track(&self, rows: impl IntoIterator<Item = ClaimRef>) {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).extend(rows.into_iter().map(|row| (row.id, row)));
    }

    fn untrack(&self, ids: impl IntoIterator<Item = i64>) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            in_flight.remove(&id);
        }
    }

    /// Releases every row this process still holds. Called when shutdown
    /// cannot wait any longer for in-flight sends.
    pub async fn release_in_flight(&self) -> Result<u64, StoreError> {
        let rows: Vec<ClaimRef> =
            self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, row)| row).collect();
        self.store.release(&rows).await
    }

    /// Reads the backlog from the database and publishes it as metrics.
    pub async fn refresh_gauges(&self) -> Result<Gauges, StoreError> {
        let gauges = self.store.gauges().await?;
        self.metrics.set_backlog(gauges.unsent, gauges.failed, gauges.oldest_unsent_age_seconds);
        self.health.send_modify(|h| h.gauges = Some(gauges));
        Ok(gauges)
    }
}

/// What an optional look at the queue (GetQueueAttributes) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueCheck {
    Reachable,
    /// The IAM policy does not allow the look (a send-only policy): the
    /// relay's sends will tell.
    NotAllowed,
    Refused(SendFailure),
}

impl Relay {
    /// Looks at the queue without sending, where the IAM policy allows it:
    /// an early word on a missing queue or bad credentials when a relay
    /// starts or is reconfigured. Nothing depends on it: once denied, it is
    /// not asked again, and delivery always learns the truth by sending.
    pub async fn check_queue(&self) -> QueueCheck {
        if self.queue_check_denied.load(Ordering::Acquire) {
            return QueueCheck::NotAllowed;
        }
        let limit = self.config.call_timeout();
        let checked = match tokio::time::timeout(limit, self.queue.check()).await {
            Ok(result) => result,
            Err(_) => Err(SendFailure::unreachable(format!("GetQueueAttributes timed out after {limit:?}"))),
        };
        match checked {
            Ok(()) => {
                self.mark_queue(true, None);
                QueueCheck::Reachable
            }
            Err(failure) if failure.code.as_deref().is_some_and(crate::queue::sqs::is_not_allowed) => {
                info!(relay = %self.id, "GetQueueAttributes is not allowed (a send-only policy); the queue is judged by sends alone");
                self.queue_check_denied.store(true, Ordering::Release);
                QueueCheck::NotAllowed
            }
            Err(failure) => {
                self.mark_queue(false, Some(&failure));
                QueueCheck::Refused(failure)
            }
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
