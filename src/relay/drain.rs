//! The drain: a sweep claims due rows, sends them in batches with several
//! calls in flight, records every result and releases whatever was not
//! attempted. It owns the send permits (`spec.concurrency`, shared by
//! overlapping sweeps and resends) and the rows this process holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::core::Outbox;
use super::in_flight::InFlight;
use crate::metrics::SendPath;
use crate::queue::{self, OutboundMessage, SendFailure, SendResult};
use crate::store::{ClaimMode, ClaimRef, FailedSend, StoreError};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub claimed: usize,
    pub sent: usize,
    /// Failed attempts recorded, dead-lettered ones included.
    pub failed: usize,
    pub dead_lettered: usize,
    /// Refused by the queue as a whole call: given back with the error, no
    /// attempt counted.
    pub held: usize,
    /// Claimed but not attempted (queue down, shutdown, lease running out).
    pub released: usize,
    pub failed_ids: Vec<i64>,
    pub released_ids: Vec<i64>,
    /// Set when the queue refused a whole call (missing, denied, throttled,
    /// unreachable): the rest of the sweep was not attempted.
    pub queue_error: Option<String>,
}

impl SweepReport {
    fn absorb(&mut self, other: SweepReport) {
        self.sent += other.sent;
        self.failed += other.failed;
        self.dead_lettered += other.dead_lettered;
        self.held += other.held;
        self.failed_ids.extend(other.failed_ids);
        self.released_ids.extend(other.released_ids);
    }
}

/// Sends due rows: the relay loop's flow, and the engine of resends by hand.
pub struct Drain {
    pub(super) core: Arc<Outbox>,
    /// `spec.concurrency`: batch calls in flight, across overlapping sweeps.
    permits: tokio::sync::Semaphore,
    /// Rows claimed by sweeps and resends of this process and not yet
    /// recorded (an inline send's row is not: its request awaits it, under
    /// the short inline lease).
    in_flight: InFlight,
}

/// What the sweep knows of each claimed row.
struct Claimed {
    row: ClaimRef,
    attempts: i32,
}

/// The results of one call, sorted by what they mean for the rows.
#[derive(Default)]
struct Outcome {
    sent: Vec<(ClaimRef, String)>,
    failures: Vec<FailedSend>,
    held: Vec<(ClaimRef, String)>,
}

impl Drain {
    pub fn new(core: Arc<Outbox>) -> Self {
        let permits = tokio::sync::Semaphore::new(core.config.concurrency);
        Self { core, permits, in_flight: InFlight::default() }
    }

    pub(super) fn core(&self) -> &Arc<Outbox> {
        &self.core
    }

    /// Marks rows as held by this process until their results are recorded.
    pub(super) fn track(&self, rows: impl IntoIterator<Item = ClaimRef>) {
        self.in_flight.track(rows);
    }

    pub(super) fn untrack(&self, rows: impl IntoIterator<Item = ClaimRef>) -> Vec<ClaimRef> {
        self.in_flight.untrack(rows)
    }

    /// Releases every row this process still holds. Called when shutdown
    /// cannot wait any longer for in-flight sends.
    pub async fn release_in_flight(&self) -> Result<u64, StoreError> {
        self.core.store.release(&self.in_flight.take_all()).await
    }

    /// Claims up to `limit` rows and delivers them. Errors only when the
    /// database fails; queue failures are recorded on the rows.
    pub async fn sweep(
        &self,
        mode: ClaimMode<'_>,
        limit: u32,
        stop: &watch::Receiver<bool>,
    ) -> Result<SweepReport, StoreError> {
        // Taken before the claim: the lease ends no earlier than this plus
        // its length, whatever the database's clock says.
        let started = Instant::now();
        let claim = self.core.store.claim(mode, limit, self.core.config.claim_lease).await;
        self.core.mark_database(claim.as_ref().err());
        let claim = claim?;
        let mut report = SweepReport { claimed: claim.rows.len(), ..SweepReport::default() };
        if claim.rows.is_empty() {
            return Ok(report);
        }
        let lease_end = started + claim.lease;
        let claimed: HashMap<i64, Claimed> =
            claim.rows.iter().map(|r| (r.id, Claimed { row: claim.row_ref(r.id), attempts: r.attempts })).collect();
        self.in_flight.track(claimed.values().map(|c| c.row));
        // A send span for each row that came with a trace context, joined to
        // the trace of the request that created it; held until the sweep
        // has recorded its results.
        let _send_spans: Vec<tracing::Span> = claim
            .rows
            .iter()
            .filter_map(|row| {
                let traceparent = row.traceparent.as_deref()?;
                // Disabled (no export, no debug logs): nothing to build.
                let span = tracing::debug_span!("txrelay.send", path = "sweep", id = row.id);
                if span.is_disabled() {
                    return None;
                }
                crate::telemetry::set_remote_parent(&span, traceparent, row.tracestate.as_deref());
                Some(span)
            })
            .collect();

        let mut messages = Vec::with_capacity(claim.rows.len());
        let mut unbuildable = Outcome::default();
        for row in &claim.rows {
            match self.core.message(row) {
                Ok(message) => messages.push(message),
                Err(failure) => {
                    unbuildable.failures.push(self.core.failed_send(claim.row_ref(row.id), row.attempts, &failure));
                }
            }
        }
        if !unbuildable.failures.is_empty() {
            report.absorb(self.record(unbuildable, lease_end).await);
        }

        let queue_down: Mutex<Option<SendFailure>> = Mutex::new(None);
        let delivered: Vec<SweepReport> = futures::stream::iter(queue::batches(messages))
            .map(|batch| self.deliver(batch, &claimed, lease_end, stop, &queue_down))
            .buffer_unordered(self.core.config.concurrency)
            .collect()
            .await;
        for batch in delivered {
            report.absorb(batch);
        }

        let leftover = self.in_flight.untrack(claimed.values().map(|c| c.row));
        if !leftover.is_empty() {
            self.core.store.release(&leftover).await?;
            report.released = leftover.len();
            report.released_ids.extend(leftover.iter().map(|row| row.id));
        }
        report.queue_error = queue_down.into_inner().unwrap_or_else(|e| e.into_inner()).map(|f| f.message);
        self.core.metrics.sweep_duration().observe(started.elapsed().as_secs_f64());
        info!(
            relay = %self.core.id,
            claimed = report.claimed,
            sent = report.sent,
            failed = report.failed,
            dead_lettered = report.dead_lettered,
            held = report.held,
            released = report.released,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sweep"
        );
        Ok(report)
    }

    /// How long the next call may take, if the claim still has room for it
    /// and for recording its result; `None` when it must not start.
    fn call_budget(&self, lease_end: Instant) -> Option<Duration> {
        let left = lease_end.saturating_duration_since(Instant::now());
        (left >= self.core.config.lease_needed_per_call()).then(|| self.core.config.call_timeout())
    }

    /// Sends one batch and records its results. Rows it does not attempt
    /// stay tracked, and the sweep releases them.
    async fn deliver(
        &self,
        batch: Vec<OutboundMessage>,
        claimed: &HashMap<i64, Claimed>,
        lease_end: Instant,
        stop: &watch::Receiver<bool>,
        queue_down: &Mutex<Option<SendFailure>>,
    ) -> SweepReport {
        let must_wait = || *stop.borrow() || queue_down.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        if must_wait() {
            return SweepReport::default();
        }
        // `concurrency` is the relay's limit on calls in flight, shared by
        // the sweeps that overlap during a drain. The permit is held until
        // the results are recorded, so no more than `concurrency` batches
        // are ever sent and not yet recorded: what a crash can resend.
        let Ok(_permit) = self.permits.acquire().await else { return SweepReport::default() };
        // Waiting for the permit took time: look at the lease again.
        let Some(timeout) = self.call_budget(lease_end).filter(|_| !must_wait()) else {
            return SweepReport::default();
        };
        self.core.metrics.send_batch_size(batch.len());
        let results: Vec<SendResult> = match tokio::time::timeout(timeout, self.core.queue.send_batch(&batch)).await {
            Ok(Ok(results)) => results,
            Ok(Err(failure)) if failure.may_be_one_entry() && batch.len() > 1 => {
                // One bad message can fail the whole call: send them one by
                // one, each within what is left of the lease, so only the
                // culprit is dead-lettered.
                debug!(relay = %self.core.id, error = %failure, "batch refused as a whole; sending its entries one by one");
                let mut results = Vec::with_capacity(batch.len());
                for message in &batch {
                    let Some(timeout) = self.call_budget(lease_end).filter(|_| !must_wait()) else { break };
                    let result = match tokio::time::timeout(timeout, self.core.queue.send(message)).await {
                        Ok(result) => result,
                        Err(_) => Err(SendFailure::unknown(format!("SendMessage got no answer within {timeout:?}"))),
                    };
                    let stop_here = matches!(&result, Err(f) if f.queue_suspect());
                    results.push(result);
                    if stop_here {
                        break;
                    }
                }
                results
            }
            Ok(Err(failure)) => vec![Err(failure); batch.len()],
            // The call went out: the queue may have taken every entry.
            Err(_) => vec![
                Err(SendFailure::unknown(format!("SendMessageBatch got no answer within {timeout:?}")));
                batch.len()
            ],
        };
        // A refused or unanswered call ends the sweep's sending: the rest is
        // released untouched, and the loop probes once a second.
        let refused = results.iter().find_map(|r| r.as_ref().err().filter(|f| f.queue_suspect())).cloned();
        match refused {
            Some(failure) => {
                self.core.mark_queue(false, Some(&failure));
                *queue_down.lock().unwrap_or_else(|e| e.into_inner()) = Some(failure);
            }
            None => self.core.mark_queue(true, None),
        }
        let mut outcome = Outcome::default();
        // `zip` stops where a split batch stopped: the rest stays tracked.
        for (message, result) in batch.iter().zip(results) {
            let Some(row) = claimed.get(&message.id) else { continue };
            match result {
                Ok(message_id) => {
                    debug!(relay = %self.core.id, reference = %message.reference, idempotency_key = %message.idempotency_key,
                           message_id = %message_id, "sent");
                    outcome.sent.push((row.row, message_id));
                }
                Err(failure) => {
                    self.core.count_failures(failure.kind, 1);
                    if failure.holds() {
                        debug!(relay = %self.core.id, reference = %message.reference, error = %failure, "held: the queue refused the call");
                        outcome.held.push((row.row, failure.message));
                    } else if failure.is_unknown() {
                        // Counted as an attempt, with backoff: a row whose
                        // sends keep going unanswered is sent at most
                        // maxAttempts times, then dead-lettered.
                        warn!(relay = %self.core.id, reference = %message.reference, idempotency_key = %message.idempotency_key,
                              attempt = row.attempts + 1, error = %failure,
                              "send outcome unknown: the queue may have taken it; resent after backoff, at most maxAttempts times");
                        outcome.failures.push(self.core.failed_send(row.row, row.attempts, &failure));
                    } else {
                        warn!(relay = %self.core.id, reference = %message.reference, idempotency_key = %message.idempotency_key,
                              error = %failure, dead_letters = failure.dead_letters(), "send failed");
                        outcome.failures.push(self.core.failed_send(row.row, row.attempts, &failure));
                    }
                }
            }
        }
        self.record(outcome, lease_end).await
    }

    /// Records one call's results: one UPDATE per kind of result.
    async fn record(&self, outcome: Outcome, lease_end: Instant) -> SweepReport {
        let deadline = tokio::time::Instant::from_std(lease_end);
        let Outcome { sent, failures, held } = outcome;
        let mut report = SweepReport::default();
        if !sent.is_empty() {
            match self.core.record_with_retry(deadline, || self.core.recorder.record(sent.clone())).await {
                Ok(recorded) => {
                    // A row missing from the answer lost its claim before
                    // the send was recorded: it is sent again, so it is not
                    // reported as delivered (retry-all's `succeeded`).
                    report.sent = recorded.len();
                    if recorded.len() < sent.len() {
                        warn!(relay = %self.core.id, rows = sent.len() - recorded.len(),
                              "sent, but the claim ended before the send was recorded; they will be sent again");
                    }
                    self.core.metrics.sent(SendPath::Sweep, sent.len());
                }
                Err(error) => {
                    error!(relay = %self.core.id, %error, rows = sent.len(), "sent, but could not record the message ids; they will be sent again after the claim lease");
                }
            }
        }
        if !failures.is_empty() {
            match self
                .core
                .record_with_retry(deadline, || {
                    self.core.store.record_failures(&failures, self.core.config.max_attempts)
                })
                .await
            {
                Ok(rows) => {
                    for row in rows.iter().filter(|r| r.failed_at.is_some()) {
                        error!(relay = %self.core.id, reference = %row.reference, idempotency_key = %row.idempotency_key,
                               attempts = row.attempts, error = row.last_error.as_deref().unwrap_or(""),
                               "dead-lettered; run `txrelay retry {}` once the cause is fixed", row.id);
                        report.dead_lettered += 1;
                    }
                    report.failed = failures.len();
                    report.failed_ids = failures.iter().map(|f| f.row.id).collect();
                }
                Err(error) => {
                    error!(relay = %self.core.id, %error, rows = failures.len(), "could not record failed sends");
                }
            }
        }
        if !held.is_empty() {
            match self.core.record_with_retry(deadline, || self.core.store.hold(&held)).await {
                Ok(_) => report.held = held.len(),
                Err(error) => {
                    warn!(relay = %self.core.id, %error, rows = held.len(), "could not give back held rows; they are retried after the claim lease");
                }
            }
        }
        let rows = sent.iter().map(|(row, _)| *row).chain(failures.iter().map(|f| f.row));
        self.in_flight.untrack(rows.chain(held.iter().map(|(row, _)| *row)));
        report
    }
}
