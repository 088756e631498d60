//! The outbox core every flow of a relay shares: its identity, store, queue,
//! metrics and health, and how a failed send is scheduled and recorded.
//! Each flow (ingest, drain, resend, upkeep) keeps its own state beside it.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::RelayConfig;
use super::backoff::Backoff;
use super::health::HealthBoard;
use super::message;
use super::recorder::SentRecorder;
use crate::metrics::{FailureLabel, RelayMetrics};
use crate::queue::{FailureKind, OutboundMessage, Queue, SendFailure};
use crate::secret::Secret;
use crate::spec::{QueueKind, RelayId};
use crate::store::{ClaimRef, ClaimedRow, FailedSend, Store, StoreError};

pub struct Outbox {
    pub(super) id: RelayId,
    pub(super) config: RelayConfig,
    /// Knows the queue's kind: FIFO claims keep each wallet's order.
    pub(super) store: Store,
    pub(super) queue: Arc<dyn Queue>,
    ledger_token: Option<Secret>,
    pub(super) metrics: RelayMetrics,
    pub(super) health: HealthBoard,
    retries: Retries,
    pub(super) recorder: SentRecorder,
    pub(super) signals: Signals,
}

/// What the flows tell each other, and what the lifecycle waits on.
pub(super) struct Signals {
    /// A row became due sooner than the loop planned for.
    pub(super) due: Notify,
    /// HTTP requests being answered by this relay (see [`Outbox::enter`]).
    pub(super) requests: watch::Sender<usize>,
    /// Turns true when the relay is told to stop: work started by a request
    /// (an HTTP `retry-all`) ends early on it, as the loop does.
    pub(super) stopping: watch::Sender<bool>,
}

/// When a failed row is tried again: full jitter under a doubling ceiling.
struct Retries {
    backoff: Backoff,
    rng: Mutex<fastrand::Rng>,
}

/// Held while an HTTP request is being answered by a relay: its store is
/// not closed under it (a reconfigured relay is replaced while requests that
/// already reached it may still be recording a message id).
#[derive(Debug)]
pub struct RequestGuard(Arc<Outbox>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.signals.requests.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox").field("id", &self.id).field("config", &self.config).finish_non_exhaustive()
    }
}

impl Outbox {
    /// The store is set to the queue's kind here, once: no call passes it.
    pub fn new(
        id: RelayId,
        config: RelayConfig,
        store: Store,
        queue: Arc<dyn Queue>,
        ledger_token: Option<Secret>,
        metrics: RelayMetrics,
    ) -> Self {
        let kind = if queue.is_fifo() { QueueKind::Fifo } else { QueueKind::Standard };
        let store = store.for_queue(kind);
        Self {
            retries: Retries { backoff: Backoff::new(config.retry_interval), rng: Mutex::new(fastrand::Rng::new()) },
            recorder: SentRecorder::start(store.clone()),
            id,
            config,
            store,
            queue,
            ledger_token,
            metrics,
            health: HealthBoard::default(),
            signals: Signals {
                due: Notify::new(),
                requests: watch::Sender::new(0),
                stopping: watch::Sender::new(false),
            },
        }
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

    pub fn metrics(&self) -> &RelayMetrics {
        &self.metrics
    }

    pub fn is_fifo(&self) -> bool {
        self.store.queue_kind() == QueueKind::Fifo
    }

    /// Fixes the jitter sequence, for tests of the backoff schedule.
    pub fn seed(&self, seed: u64) {
        *self.retries.rng.lock().unwrap_or_else(|e| e.into_inner()) = fastrand::Rng::with_seed(seed);
    }

    /// Marks a request in progress until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> RequestGuard {
        self.signals.requests.send_modify(|n| *n += 1);
        RequestGuard(self.clone())
    }

    /// Waits until no request is in progress, or `deadline`; whether they all finished.
    pub async fn requests_finished_by(&self, deadline: tokio::time::Instant) -> bool {
        let mut requests = self.signals.requests.subscribe();
        tokio::time::timeout_at(deadline, async {
            let _ = requests.wait_for(|n| *n == 0).await;
        })
        .await
        .is_ok()
    }

    /// Wakes the loop: a row became due sooner than it planned for.
    pub fn wake(&self) {
        self.signals.due.notify_one();
    }

    /// Tells work started by requests that the relay is stopping.
    pub fn begin_stopping(&self) {
        self.signals.stopping.send_replace(true);
    }

    /// Turns true once the relay is stopping.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.signals.stopping.subscribe()
    }

    /// The message for a stored row: the one mapping from a row to what the
    /// queue is sent, for every path (inline, sweep, resend by hand).
    pub(super) fn message(&self, row: &ClaimedRow) -> Result<OutboundMessage, SendFailure> {
        message::outbound(row, self.ledger_token.as_ref()).map_err(SendFailure::message)
    }

    fn jittered_backoff(&self, attempts: u32) -> Duration {
        let mut rng = self.retries.rng.lock().unwrap_or_else(|e| e.into_inner());
        self.retries.backoff.delay(attempts, &mut rng)
    }

    pub(super) fn failed_send(&self, row: ClaimRef, attempts_before: i32, failure: &SendFailure) -> FailedSend {
        let attempts = u32::try_from(attempts_before).unwrap_or(0).saturating_add(1);
        FailedSend {
            row,
            error: failure.message.clone(),
            retry_in: self.jittered_backoff(attempts),
            permanent: failure.dead_letters(),
        }
    }

    pub(super) fn count_failures(&self, kind: FailureKind, count: usize) {
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
    pub(super) async fn record_with_retry<T, F, Fut>(
        &self,
        deadline: tokio::time::Instant,
        mut record: F,
    ) -> Result<T, StoreError>
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

    /// A row sent or skipped by hand may free its FIFO wallet's later rows,
    /// which the loops (this one, and other processes') are not waiting for.
    pub(super) async fn wallet_may_move(&self) {
        self.wake();
        if let Err(error) = self.store.notify_due().await {
            tracing::warn!(relay = %self.id, %error, "could not notify other replicas");
        }
    }
}
