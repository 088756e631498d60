//! A relay: one outbox table, one queue. It accepts transactions (commit,
//! then send inline) and runs the loop that delivers whatever is still unsent.

pub mod backoff;
mod engine;
mod in_flight;
mod ingest;
pub mod message;
mod recorder;
mod skip;
mod sweep;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

pub use engine::{listen_for_due_rows, run_loop};
pub use ingest::{GROUPS_IN_FLIGHT, MAX_GROUP};
pub use sweep::{ResendError, ResendRequest, RetryAllReport, RetryError, SweepReport, pace};

use crate::metrics::{FailureLabel, RelayMetrics};
use crate::queue::{FailureKind, Queue, SendFailure};
use crate::secret::Secret;
use crate::spec::{RelayId, TransactionRelaySpec};
use crate::store::{ClaimRef, Conflict, FailedSend, Gauges, Store, StoreError};
use crate::transaction::Transaction;
use backoff::Backoff;
use recorder::SentRecorder;

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
    pub idempotency_window: Duration,
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
            idempotency_window: spec.idempotency_window.get(),
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

    /// The ceiling on one call to the queue: a third of the claim lease
    /// (1-10 s), so a hung connection cannot outlive the claim.
    pub fn call_timeout(&self) -> Duration {
        (self.claim_lease / 3).clamp(Duration::from_secs(1), Duration::from_secs(10))
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
    /// Same key, same content, for a row retention deleted (200): its record.
    Retired(crate::store::RetiredTransaction),
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
    /// GetQueueAttributes was asked: it is not asked again.
    queue_check_asked: AtomicBool,
    /// Rows claimed by sweeps and resends of this process and not yet
    /// recorded (an inline send's row is not: its request awaits it, under
    /// the short inline lease).
    in_flight: in_flight::InFlight,
    health: watch::Sender<RelayHealth>,
    /// HTTP requests being answered by this relay (see [`Relay::enter`]).
    requests: watch::Sender<usize>,
    /// The group-commit task's queue, started by the first `/new`.
    ingest: std::sync::OnceLock<ingest::Requests>,
    /// Requests in that queue, not yet taken into a group.
    waiting: watch::Sender<usize>,
    /// Told of each resend by hand when it ends (see [`Relay::on_resend`]).
    resend_hook: std::sync::OnceLock<ResendHook>,
    /// Turns true when the relay is told to stop: work started by a request
    /// (an HTTP `retry-all`) ends early on it, as the loop does.
    stopping: watch::Sender<bool>,
}

type ResendHook = Box<dyn Fn(&ResendNotice) + Send + Sync>;

/// A resend by hand that ended, as its audit record has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResendNotice {
    pub audit_id: i64,
    pub actor: String,
    pub via: &'static str,
    pub command: &'static str,
    pub rows: usize,
    pub succeeded: u64,
    pub failed: u64,
    pub outcome: String,
}

impl ResendNotice {
    /// One line for a Kubernetes Event or a log.
    pub fn note(&self) -> String {
        format!(
            "{} by {} via {} (audit record {}): {} rows, {} sent, {} failed; {}",
            self.command, self.actor, self.via, self.audit_id, self.rows, self.succeeded, self.failed, self.outcome
        )
    }
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
            queue_check_asked: AtomicBool::new(false),
            in_flight: in_flight::InFlight::default(),
            health: watch::Sender::new(RelayHealth::default()),
            requests: watch::Sender::new(0),
            ingest: std::sync::OnceLock::new(),
            waiting: watch::Sender::new(0),
            resend_hook: std::sync::OnceLock::new(),
            stopping: watch::Sender::new(false),
        }
    }

    /// Tells work started by requests that the relay is stopping.
    pub fn begin_stopping(&self) {
        self.stopping.send_replace(true);
    }

    /// Turns true once the relay is stopping.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// Calls `hook` whenever a resend by hand (`retry`, `retry-all`) ends:
    /// how the operator makes each one a Kubernetes Event on its resource.
    /// Set once per relay.
    pub fn on_resend(&self, hook: impl Fn(&ResendNotice) + Send + Sync + 'static) {
        let _ = self.resend_hook.set(Box::new(hook));
    }

    fn resend_ended(&self, notice: &ResendNotice) {
        if let Some(hook) = self.resend_hook.get() {
            hook(notice);
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
    /// refused a whole call or left it unanswered. While the queue is down,
    /// inline sends stop and the loop probes it by sending the oldest due
    /// batch, once a second; rows whose send went unanswered back off, so
    /// the probe never sends the same rows over and over.
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
            FailureKind::Unknown => FailureLabel::Unknown,
        };
        self.metrics.send_failures(label, count);
        if kind == FailureKind::Unknown {
            self.metrics.send_outcome_unknown(count);
        }
    }

    /// Recording a result is retried briefly: a blip must not turn a
    /// delivered message into a duplicate. Never past `deadline` (the end of
    /// the claim): after it the row may be another process's, and the claim
    /// token would refuse the write anyway.
    async fn record_with_retry<T, F, Fut>(&self, deadline: tokio::time::Instant, mut record: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(100);
        for _ in 0..3 {
            match record().await {
                Err(error) if error.is_unavailable() && tokio::time::Instant::now() + delay < deadline => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                other => return other,
            }
        }
        record().await
    }

    /// Releases every row this process still holds. Called when shutdown
    /// cannot wait any longer for in-flight sends.
    pub async fn release_in_flight(&self) -> Result<u64, StoreError> {
        self.store.release(&self.in_flight.take_all()).await
    }

    /// Reads the backlog from the database and publishes it as metrics.
    pub async fn refresh_gauges(&self) -> Result<Gauges, StoreError> {
        let gauges = self.store.gauges().await?;
        self.metrics.set_backlog(gauges.unsent, gauges.failed, gauges.oldest_unsent_age_seconds);
        // Only a FIFO queue holds a wallet behind its dead letter.
        self.metrics.set_held_wallets(if self.is_fifo() { gauges.dead_wallets } else { 0 });
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
    /// Asked already: once per relay is enough.
    Skipped,
    Refused(SendFailure),
}

impl Relay {
    /// Looks at the queue without sending, where the IAM policy allows it:
    /// an early word on a missing queue or bad credentials when a relay
    /// starts or is reconfigured. Nothing depends on it: once denied, it is
    /// not asked again, and delivery always learns the truth by sending.
    pub async fn check_queue(&self) -> QueueCheck {
        // Asked once per relay: a later answer could only contradict what
        // its sends have shown since.
        if self.queue_check_asked.swap(true, Ordering::AcqRel) {
            return QueueCheck::Skipped;
        }
        let limit = self.config.call_timeout();
        let checked = match tokio::time::timeout(limit, self.queue.check()).await {
            Ok(result) => result,
            Err(_) => Err(SendFailure::unreachable(format!("GetQueueAttributes timed out after {limit:?}"))),
        };
        match checked {
            Ok(()) => {
                // Only a first word: it never overrides what a send showed.
                if !self.health.borrow().queue_checked {
                    self.mark_queue(true, None);
                }
                QueueCheck::Reachable
            }
            Err(failure) if failure.code.as_deref().is_some_and(crate::queue::sqs::is_not_allowed) => {
                info!(relay = %self.id, "GetQueueAttributes is not allowed (a send-only policy); the queue is judged by sends alone");
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
