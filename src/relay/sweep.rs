//! One sweep: claim due rows, send them in batches with several calls in
//! flight, record every result, release whatever was not attempted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{Relay, message};
use crate::metrics::SendPath;
use crate::queue::{self, OutboundMessage, SendFailure, SendResult};
use crate::store::{ClaimMode, FailedSend, RetryOneError, StoreError};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    pub claimed: usize,
    pub sent: usize,
    /// Failed attempts recorded, dead-lettered ones included.
    pub failed: usize,
    pub dead_lettered: usize,
    /// Claimed but not attempted (queue down, shutdown, lease running out).
    pub released: usize,
    pub failed_ids: Vec<i64>,
    pub released_ids: Vec<i64>,
    /// Set when a call failed as a whole with a transient error: the queue
    /// is unreachable and the rest of the sweep was not attempted.
    pub queue_error: Option<String>,
}

impl SweepReport {
    fn absorb(&mut self, other: SweepReport) {
        self.sent += other.sent;
        self.failed += other.failed;
        self.dead_lettered += other.dead_lettered;
        self.failed_ids.extend(other.failed_ids);
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetryAllReport {
    pub revived: u64,
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error(transparent)]
    Claim(#[from] RetryOneError),
    #[error("send failed{}: {failure}", if *.dead_lettered { " (dead-lettered)" } else { "" })]
    Send { failure: SendFailure, dead_lettered: bool },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A call must end this long before the claim lease does, or its rows could
/// be claimed by another process while it is still in flight.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

impl Relay {
    /// Claims up to `limit` rows and delivers them. Errors only when the
    /// database fails; queue failures are recorded on the rows.
    pub async fn sweep(
        &self,
        mode: ClaimMode<'_>,
        limit: u32,
        stop: &watch::Receiver<bool>,
    ) -> Result<SweepReport, StoreError> {
        let started = Instant::now();
        let claim = self.store.claim(mode, limit, self.config.claim_lease, self.is_fifo()).await;
        self.mark_database(claim.as_ref().err());
        let claim = claim?;
        let mut report = SweepReport { claimed: claim.rows.len(), ..SweepReport::default() };
        if claim.rows.is_empty() {
            return Ok(report);
        }
        let claimed_ids: Vec<i64> = claim.rows.iter().map(|r| r.id).collect();
        self.track(claimed_ids.iter().copied());
        let send_until = started + claim.lease.saturating_sub(LEASE_MARGIN).max(claim.lease / 2);
        let attempts: HashMap<i64, i32> = claim.rows.iter().map(|r| (r.id, r.attempts)).collect();

        let mut messages = Vec::with_capacity(claim.rows.len());
        let mut unbuildable = Vec::new();
        for row in &claim.rows {
            match message::outbound(row, self.ledger_token.as_ref()) {
                Ok(message) => messages.push(message),
                Err(error) => unbuildable.push((row.id, SendFailure::permanent(error))),
            }
        }
        if !unbuildable.is_empty() {
            let failures = unbuildable.iter().map(|(id, f)| self.failed_send(*id, 0, f)).collect();
            report.absorb(self.record(Vec::new(), failures).await);
        }

        let queue_down: Mutex<Option<SendFailure>> = Mutex::new(None);
        let batches = queue::batches(messages);
        // Sending and recording overlap: a batch's slot is free again as soon
        // as the queue answered, while its results are written.
        let mut deliveries = futures::stream::iter(batches)
            .map(|batch| self.deliver(batch, &attempts, send_until, stop, &queue_down))
            .buffer_unordered(self.config.concurrency);
        let mut recordings = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                Some(outcome) = deliveries.next() => {
                    if let Some((sent, failures)) = outcome {
                        recordings.push(self.record(sent, failures));
                    }
                }
                Some(recorded) = recordings.next(), if !recordings.is_empty() => report.absorb(recorded),
                else => break,
            }
        }
        drop(deliveries);

        let leftover: Vec<i64> = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            claimed_ids.iter().copied().filter(|id| in_flight.remove(id)).collect()
        };
        if !leftover.is_empty() {
            self.store.release(&leftover).await?;
            report.released = leftover.len();
            report.released_ids = leftover;
        }
        report.queue_error = queue_down.into_inner().unwrap_or_else(|e| e.into_inner()).map(|f| f.message);
        self.metrics.sweep_duration().observe(started.elapsed().as_secs_f64());
        info!(
            relay = %self.id,
            claimed = report.claimed,
            sent = report.sent,
            failed = report.failed,
            dead_lettered = report.dead_lettered,
            released = report.released,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sweep"
        );
        Ok(report)
    }

    /// Sends one batch; returns what to record (nothing when the batch was
    /// not attempted).
    async fn deliver(
        &self,
        batch: Vec<OutboundMessage>,
        attempts: &HashMap<i64, i32>,
        send_until: Instant,
        stop: &watch::Receiver<bool>,
        queue_down: &Mutex<Option<SendFailure>>,
    ) -> Option<(Vec<(i64, String)>, Vec<FailedSend>)> {
        let already_down = queue_down.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        if *stop.borrow() || already_down || Instant::now() >= send_until {
            // Left tracked: the sweep releases these rows untouched.
            return None;
        }
        // `concurrency` is the relay's limit on calls in flight, shared by
        // the sweeps that overlap during a drain.
        let Ok(_permit) = self.send_permits.acquire().await else { return None };
        self.metrics.send_batch_size(batch.len());
        let results: Vec<SendResult> = match self.queue.send_batch(&batch).await {
            Ok(results) => results,
            Err(failure) if failure.may_be_one_entry() && batch.len() > 1 => {
                // One bad message can fail the whole call: send them one by
                // one so only the culprit is dead-lettered.
                debug!(relay = %self.id, error = %failure, "batch refused as a whole; sending its entries one by one");
                let mut results = Vec::with_capacity(batch.len());
                for message in &batch {
                    results.push(self.queue.send(message).await);
                }
                results
            }
            Err(failure) => {
                if !failure.is_permanent() {
                    self.mark_queue(false, Some(&failure));
                    *queue_down.lock().unwrap_or_else(|e| e.into_inner()) = Some(failure.clone());
                }
                vec![Err(failure); batch.len()]
            }
        };
        if results.iter().any(Result::is_ok) {
            self.mark_queue(true, None);
        }
        let mut sent = Vec::new();
        let mut failures = Vec::new();
        for (message, result) in batch.iter().zip(results) {
            match result {
                Ok(message_id) => {
                    debug!(relay = %self.id, reference = %message.reference, idempotency_key = %message.idempotency_key,
                           message_id = %message_id, "sent");
                    sent.push((message.id, message_id));
                }
                Err(failure) => {
                    warn!(relay = %self.id, reference = %message.reference, idempotency_key = %message.idempotency_key,
                          error = %failure, permanent = failure.is_permanent(), "send failed");
                    let before = attempts.get(&message.id).copied().unwrap_or(0);
                    failures.push(self.failed_send(message.id, before, &failure));
                }
            }
        }
        Some((sent, failures))
    }

    /// Records one batch's results: one UPDATE for the sent rows, one for
    /// the failed ones.
    async fn record(&self, sent: Vec<(i64, String)>, failures: Vec<FailedSend>) -> SweepReport {
        let mut report = SweepReport::default();
        if !sent.is_empty() {
            match self.record_with_retry(|| self.sent_recorder.record(sent.clone())).await {
                Ok(_) => {
                    report.sent = sent.len();
                    self.metrics.sent(SendPath::Sweep, sent.len());
                }
                Err(error) => {
                    error!(relay = %self.id, %error, rows = sent.len(), "sent, but could not record the message ids; they will be sent again after the claim lease");
                }
            }
        }
        if !failures.is_empty() {
            let permanent = failures.iter().filter(|f| f.permanent).count();
            self.metrics.send_failures(true, permanent);
            self.metrics.send_failures(false, failures.len() - permanent);
            match self.record_with_retry(|| self.store.record_failures(&failures, self.config.max_attempts)).await {
                Ok(rows) => {
                    for row in rows.iter().filter(|r| r.failed_at.is_some()) {
                        error!(relay = %self.id, reference = %row.reference, idempotency_key = %row.idempotency_key,
                               attempts = row.attempts, error = row.last_error.as_deref().unwrap_or(""),
                               "dead-lettered; run `txrelay retry {}` once the cause is fixed", row.id);
                        report.dead_lettered += 1;
                    }
                    report.failed = failures.len();
                    report.failed_ids = failures.iter().map(|f| f.id).collect();
                }
                Err(error) => {
                    error!(relay = %self.id, %error, rows = failures.len(), "could not record failed sends");
                }
            }
        }
        let ids: Vec<i64> = sent.iter().map(|(id, _)| *id).chain(failures.iter().map(|f| f.id)).collect();
        self.untrack(&ids);
        report
    }

    /// Sends every unsent row now, ignoring backoff but never a row a running
    /// relay holds (`txrelay retry-all`). On FIFO queues wallets keep their order.
    pub async fn retry_all(
        &self,
        limit: Option<u64>,
        include_dead: bool,
        mut progress: impl FnMut(&RetryAllReport),
    ) -> Result<RetryAllReport, StoreError> {
        let limit = limit.unwrap_or(u64::MAX);
        let mut report = RetryAllReport::default();
        if include_dead {
            report.revived = self.store.revive_dead_lettered(i64::try_from(limit).unwrap_or(i64::MAX)).await?;
        }
        let (_keep_open, never) = watch::channel(false);
        let mut skip: Vec<i64> = Vec::new();
        while (report.total as u64) < limit {
            let round = (limit - report.total as u64).min(u64::from(self.config.batch_size.max(10))) as u32;
            let sweep = self.sweep(ClaimMode::Force { skip: &skip }, round, &never).await?;
            if sweep.claimed == 0 {
                break;
            }
            report.total += sweep.sent + sweep.failed;
            report.succeeded += sweep.sent;
            report.failed += sweep.failed;
            skip.extend(&sweep.failed_ids);
            skip.extend(&sweep.released_ids);
            progress(&report);
            if let Some(error) = sweep.queue_error {
                report.stopped = Some(format!("queue unreachable: {error}"));
                break;
            }
        }
        Ok(report)
    }

    /// Sends one row now (`txrelay retry ID`), reviving it if dead-lettered.
    pub async fn retry_one(&self, id: i64) -> Result<String, RetryError> {
        let row = self.store.claim_one(id, self.config.claim_lease, self.is_fifo()).await?;
        self.track([row.id]);
        let sent = match message::outbound(&row, self.ledger_token.as_ref()) {
            Ok(message) => self.queue.send(&message).await,
            Err(error) => Err(SendFailure::permanent(error)),
        };
        let result = match sent {
            Ok(message_id) => {
                self.store.record_sent(&[(row.id, message_id.clone())]).await?;
                self.metrics.sent(SendPath::Sweep, 1);
                Ok(message_id)
            }
            Err(failure) => {
                self.metrics.send_failures(failure.is_permanent(), 1);
                let failed = self.failed_send(row.id, row.attempts, &failure);
                let rows = self.store.record_failures(&[failed], self.config.max_attempts).await?;
                let dead_lettered = rows.iter().any(|r| r.failed_at.is_some());
                Err(RetryError::Send { failure, dead_lettered })
            }
        };
        self.untrack(&[row.id]);
        result
    }
}
