//! One sweep: claim due rows, send them in batches with several calls in
//! flight, record every result, release whatever was not attempted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{Relay, ResendNotice, message};
use crate::metrics::SendPath;
use crate::queue::{self, OutboundMessage, SendFailure, SendResult};
use crate::store::{ClaimMode, ClaimRef, FailedSend, ResendAudit, ResendFilter, ResendRow, RetryOneError, StoreError};

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

/// What `retry-all` is asked to do (CLI or HTTP).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResendRequest {
    pub filter: ResendFilter,
    /// At most this many rows.
    pub limit: Option<u64>,
    /// At most this many messages per second.
    pub rate: Option<f64>,
    /// Only say which rows would be resent.
    pub dry_run: bool,
    /// No round starts after this long (an HTTP request's share of its
    /// timeout); the report says the run stopped there.
    pub budget: Option<Duration>,
}

/// Why a resend by hand was refused before it began.
#[derive(Debug, thiserror::Error)]
pub enum ResendError {
    /// `spec.suspend`: nothing is sent, by the loop or by hand.
    #[error("relay {0} is suspended (spec.suspend): nothing is sent, not even by hand; resume it first")]
    Suspended(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The state of one `retry-all` run across its pages.
struct ResendRun<'a> {
    request: &'a ResendRequest,
    stop: watch::Receiver<bool>,
    budget_ends: Option<Instant>,
    started: Instant,
    /// Rows claimed so far, for the rate.
    attempted: usize,
    audit_id: Option<i64>,
    /// Ids written to the audit record.
    ids: usize,
}

impl ResendRun<'_> {
    fn why_stop(&self) -> Option<String> {
        if *self.stop.borrow() {
            return Some(
                "interrupted (a signal, or the relay is stopping); the rows not yet taken were left as they were \
                 (a dead-lettered row revived in the last round stays revived, and the relay sends it)"
                    .to_owned(),
            );
        }
        let budget = self.request.budget.unwrap_or_default();
        self.budget_ends.filter(|end| Instant::now() >= *end).map(|_| {
            format!(
                "the time budget of {} s was used up at the rate asked; the rows not yet taken were left as they \
                 were (the relay sends unsent ones itself; call again or use the CLI for the rest)",
                budget.as_secs()
            )
        })
    }

    /// Waits for the rate, or less when a stop or the end of the budget
    /// comes first.
    async fn pace(&mut self, rate: f64) {
        let wait = pace(rate, self.attempted, self.started.elapsed());
        // An absurdly low rate waits "forever": only a stop or the budget ends it.
        let until = match (Instant::now().checked_add(wait), self.budget_ends) {
            (Some(paced), Some(budget)) => Some(paced.min(budget)),
            (paced, budget) => paced.or(budget),
        };
        let mut stop = self.stop.clone();
        let waited = async {
            match until {
                Some(until) => tokio::time::sleep_until(until.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = waited => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RetryAllReport {
    /// The audit record of this resend (none for a dry run or no rows).
    pub audit_id: Option<i64>,
    /// Rows the filter chose.
    pub selected: usize,
    pub revived: u64,
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Chosen rows this run could not take: held by a running relay (which
    /// sends them), or behind an older unsent row of their wallet.
    pub not_taken: usize,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    /// The rows chosen, for a dry run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rows: Vec<ResendRow>,
}

/// How long to wait before the next message so that `sent` messages in
/// `elapsed` stay within `rate` per second.
pub fn pace(rate: f64, sent: usize, elapsed: Duration) -> Duration {
    if !(rate.is_finite() && rate > 0.0) {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(sent as f64 / rate).unwrap_or(Duration::MAX).saturating_sub(elapsed)
}

#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// `spec.suspend`: nothing is sent, by the loop or by hand.
    #[error("relay {0} is suspended (spec.suspend): nothing is sent, not even by hand; resume it first")]
    Suspended(String),
    #[error(transparent)]
    Claim(#[from] RetryOneError),
    #[error("send failed{}: {failure}", if *.dead_lettered { " (dead-lettered)" } else { "" })]
    Send { failure: SendFailure, dead_lettered: bool },
    /// Sent, but the claim ended before the message id was recorded (the
    /// relay stopped and gave the row back, or the lease ran out).
    #[error(
        "sent as message {message_id}, but the claim on the row ended before the send was recorded \
         (the relay stopped, or the lease ran out); the relay will send the row again, and the ledger \
         drops the duplicate by its idempotency key"
    )]
    NotRecorded { message_id: String },
    #[error(transparent)]
    Store(#[from] StoreError),
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

impl Relay {
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
        let claim = self.store.claim(mode, limit, self.config.claim_lease, self.is_fifo()).await;
        self.mark_database(claim.as_ref().err());
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
            match message::outbound(row, self.ledger_token.as_ref()) {
                Ok(message) => messages.push(message),
                Err(error) => {
                    let failure = SendFailure::message(error);
                    unbuildable.failures.push(self.failed_send(claim.row_ref(row.id), row.attempts, &failure));
                }
            }
        }
        if !unbuildable.failures.is_empty() {
            report.absorb(self.record(unbuildable, lease_end).await);
        }

        let queue_down: Mutex<Option<SendFailure>> = Mutex::new(None);
        let delivered: Vec<SweepReport> = futures::stream::iter(queue::batches(messages))
            .map(|batch| self.deliver(batch, &claimed, lease_end, stop, &queue_down))
            .buffer_unordered(self.config.concurrency)
            .collect()
            .await;
        for batch in delivered {
            report.absorb(batch);
        }

        let leftover = self.in_flight.untrack(claimed.values().map(|c| c.row));
        if !leftover.is_empty() {
            self.store.release(&leftover).await?;
            report.released = leftover.len();
            report.released_ids.extend(leftover.iter().map(|row| row.id));
        }
        report.queue_error = queue_down.into_inner().unwrap_or_else(|e| e.into_inner()).map(|f| f.message);
        self.metrics.sweep_duration().observe(started.elapsed().as_secs_f64());
        info!(
            relay = %self.id,
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
        (left >= self.config.lease_needed_per_call()).then(|| self.config.call_timeout())
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
        let Ok(_permit) = self.send_permits.acquire().await else { return SweepReport::default() };
        // Waiting for the permit took time: look at the lease again.
        let Some(timeout) = self.call_budget(lease_end).filter(|_| !must_wait()) else {
            return SweepReport::default();
        };
        self.metrics.send_batch_size(batch.len());
        let results: Vec<SendResult> = match tokio::time::timeout(timeout, self.queue.send_batch(&batch)).await {
            Ok(Ok(results)) => results,
            Ok(Err(failure)) if failure.may_be_one_entry() && batch.len() > 1 => {
                // One bad message can fail the whole call: send them one by
                // one, each within what is left of the lease, so only the
                // culprit is dead-lettered.
                debug!(relay = %self.id, error = %failure, "batch refused as a whole; sending its entries one by one");
                let mut results = Vec::with_capacity(batch.len());
                for message in &batch {
                    let Some(timeout) = self.call_budget(lease_end).filter(|_| !must_wait()) else { break };
                    let result = match tokio::time::timeout(timeout, self.queue.send(message)).await {
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
                self.mark_queue(false, Some(&failure));
                *queue_down.lock().unwrap_or_else(|e| e.into_inner()) = Some(failure);
            }
            None => self.mark_queue(true, None),
        }
        let mut outcome = Outcome::default();
        // `zip` stops where a split batch stopped: the rest stays tracked.
        for (message, result) in batch.iter().zip(results) {
            let Some(row) = claimed.get(&message.id) else { continue };
            match result {
                Ok(message_id) => {
                    debug!(relay = %self.id, reference = %message.reference, idempotency_key = %message.idempotency_key,
                           message_id = %message_id, "sent");
                    outcome.sent.push((row.row, message_id));
                }
                Err(failure) => {
                    self.count_failures(failure.kind, 1);
                    if failure.holds() {
                        debug!(relay = %self.id, reference = %message.reference, error = %failure, "held: the queue refused the call");
                        outcome.held.push((row.row, failure.message));
                    } else if failure.is_unknown() {
                        // Counted as an attempt, with backoff: a row whose
                        // sends keep going unanswered is sent at most
                        // maxAttempts times, then dead-lettered.
                        warn!(relay = %self.id, reference = %message.reference, idempotency_key = %message.idempotency_key,
                              attempt = row.attempts + 1, error = %failure,
                              "send outcome unknown: the queue may have taken it; resent after backoff, at most maxAttempts times");
                        outcome.failures.push(self.failed_send(row.row, row.attempts, &failure));
                    } else {
                        warn!(relay = %self.id, reference = %message.reference, idempotency_key = %message.idempotency_key,
                              error = %failure, dead_letters = failure.dead_letters(), "send failed");
                        outcome.failures.push(self.failed_send(row.row, row.attempts, &failure));
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
            match self.record_with_retry(deadline, || self.sent_recorder.record(sent.clone())).await {
                Ok(recorded) => {
                    // A row missing from the answer lost its claim before
                    // the send was recorded: it is sent again, so it is not
                    // reported as delivered (retry-all's `succeeded`).
                    report.sent = recorded.len();
                    if recorded.len() < sent.len() {
                        warn!(relay = %self.id, rows = sent.len() - recorded.len(),
                              "sent, but the claim ended before the send was recorded; they will be sent again");
                    }
                    self.metrics.sent(SendPath::Sweep, sent.len());
                }
                Err(error) => {
                    error!(relay = %self.id, %error, rows = sent.len(), "sent, but could not record the message ids; they will be sent again after the claim lease");
                }
            }
        }
        if !failures.is_empty() {
            match self
                .record_with_retry(deadline, || self.store.record_failures(&failures, self.config.max_attempts))
                .await
            {
                Ok(rows) => {
                    for row in rows.iter().filter(|r| r.failed_at.is_some()) {
                        error!(relay = %self.id, reference = %row.reference, idempotency_key = %row.idempotency_key,
                               attempts = row.attempts, error = row.last_error.as_deref().unwrap_or(""),
                               "dead-lettered; run `txrelay retry {}` once the cause is fixed", row.id);
                        report.dead_lettered += 1;
                    }
                    report.failed = failures.len();
                    report.failed_ids = failures.iter().map(|f| f.row.id).collect();
                }
                Err(error) => {
                    error!(relay = %self.id, %error, rows = failures.len(), "could not record failed sends");
                }
            }
        }
        if !held.is_empty() {
            match self.record_with_retry(deadline, || self.store.hold(&held)).await {
                Ok(_) => report.held = held.len(),
                Err(error) => {
                    warn!(relay = %self.id, %error, rows = held.len(), "could not give back held rows; they are retried after the claim lease");
                }
            }
        }
        let rows = sent.iter().map(|(row, _)| *row).chain(failures.iter().map(|f| f.row));
        self.in_flight.untrack(rows.chain(held.iter().map(|(row, _)| *row)));
        report
    }

    /// Sends every unsent row now, ignoring backoff but never a row a running
    /// relay holds (`txrelay retry-all`). On FIFO queues wallets keep their
    /// order. Candidates are read a page at a time, and each page's ids join
    /// the audit record before any of them is revived or sent. When `stop`
    /// turns true (a signal, the relay stopping) or the request's time
    /// budget runs out, the round in flight finishes and records its
    /// results, no further row is claimed, and the audit record says why it
    /// stopped.
    pub async fn retry_all(
        &self,
        request: &ResendRequest,
        audit: &ResendAudit,
        stop: &watch::Receiver<bool>,
        mut progress: impl FnMut(&RetryAllReport),
    ) -> Result<RetryAllReport, ResendError> {
        if self.config.suspend && !request.dry_run {
            return Err(ResendError::Suspended(self.id.to_string()));
        }
        let mut report = RetryAllReport::default();
        let mut run = ResendRun {
            request,
            stop: stop.clone(),
            budget_ends: request.budget.map(|budget| Instant::now() + budget),
            started: Instant::now(),
            attempted: 0,
            audit_id: None,
            ids: 0,
        };
        let result = self.resend_pages(&mut run, audit, &mut report, &mut progress).await;
        report.audit_id = run.audit_id;
        let Some(audit_id) = run.audit_id else {
            return result.map(|()| report).map_err(ResendError::from);
        };
        report.not_taken = report.selected.saturating_sub(report.total);
        let outcome = match (&result, &report.stopped) {
            (Err(error), _) => format!("stopped: {error}"),
            (Ok(()), Some(reason)) => format!("stopped: {reason}"),
            (Ok(()), None) if report.not_taken > 0 => format!(
                "completed; {} chosen rows not taken: held by a running relay, or behind an older unsent row of \
                 their wallet",
                report.not_taken
            ),
            (Ok(()), None) => "completed".to_owned(),
        };
        let (succeeded, failed) = (report.succeeded as u64, report.failed as u64);
        self.resend_finished(audit_id, audit, run.ids, succeeded, failed, outcome).await;
        if succeeded > 0 {
            self.wallet_may_move().await;
        }
        result.map(|()| report).map_err(ResendError::from)
    }

    /// Reads the candidates a page at a time and resends each page.
    async fn resend_pages(
        &self,
        run: &mut ResendRun<'_>,
        audit: &ResendAudit,
        report: &mut RetryAllReport,
        progress: &mut impl FnMut(&RetryAllReport),
    ) -> Result<(), StoreError> {
        const PAGE: u64 = 1000;
        let limit = run.request.limit.unwrap_or(u64::MAX);
        let upto = self.store.last_transaction_id().await?;
        let mut after = 0_i64;
        loop {
            if let Some(reason) = run.why_stop() {
                report.stopped = Some(reason);
                return Ok(());
            }
            let want = PAGE.min(limit.saturating_sub(report.selected as u64));
            if want == 0 {
                return Ok(());
            }
            let page = self.store.resend_candidates(&run.request.filter, after, upto, want as i64).await?;
            let Some(last) = page.last() else { return Ok(()) };
            after = last.id;
            report.selected += page.len();
            if run.request.dry_run {
                report.rows.extend(page);
                continue;
            }
            let ids: Vec<i64> = page.iter().map(|row| row.id).collect();
            match run.audit_id {
                // The record exists before any row is revived or sent.
                None => {
                    let mut filter = serde_json::to_value(&run.request.filter).unwrap_or_default();
                    filter["limit"] = serde_json::json!(run.request.limit);
                    filter["rate"] = serde_json::json!(run.request.rate);
                    let audit_id = self.store.begin_resend(audit, &filter, &ids).await?;
                    run.audit_id = Some(audit_id);
                    info!(target: "txrelay::audit", relay = %self.id, audit_id, actor = %audit.actor, via = audit.via,
                          command = audit.command, %filter, first_ids = ?&ids[..ids.len().min(20)],
                          "resend started");
                }
                Some(audit_id) => self.store.extend_resend(audit_id, &ids).await?,
            }
            run.ids += ids.len();
            self.resend_rows(&page, run, report, progress).await?;
            if report.stopped.is_some() {
                return Ok(());
            }
        }
    }

    /// Sends one page of chosen rows, dead-lettered ones revived as they are
    /// claimed, at most `rate` per second.
    async fn resend_rows(
        &self,
        rows: &[ResendRow],
        run: &mut ResendRun<'_>,
        report: &mut RetryAllReport,
        progress: &mut impl FnMut(&RetryAllReport),
    ) -> Result<(), StoreError> {
        let dead: Vec<i64> = rows.iter().filter(|row| row.dead_lettered).map(|row| row.id).collect();
        let unsent: Vec<i64> = rows.iter().filter(|row| !row.dead_lettered).map(|row| row.id).collect();
        let mut skip: Vec<i64> = Vec::new();
        for (ids, revive) in [(&dead, true), (&unsent, false)] {
            if ids.is_empty() {
                continue;
            }
            loop {
                let mut round = self.config.batch_size.max(10) as usize;
                if let Some(rate) = run.request.rate {
                    // About ten rounds a second, each started on time.
                    round = round.min(((rate / 10.0).ceil() as usize).max(1));
                    run.pace(rate).await;
                }
                if let Some(reason) = run.why_stop() {
                    report.stopped = Some(reason);
                    return Ok(());
                }
                let mode = if revive {
                    ClaimMode::Revive { skip: &skip, only: ids }
                } else {
                    ClaimMode::Force { skip: &skip, only: ids }
                };
                // A stop during the round: its calls in flight finish and
                // are recorded, the rest of its rows are given back.
                let sweep = self.sweep(mode, round as u32, &run.stop).await?;
                if sweep.claimed == 0 {
                    break;
                }
                run.attempted += sweep.claimed;
                report.revived += if revive { sweep.claimed as u64 } else { 0 };
                report.total += sweep.sent + sweep.failed;
                report.succeeded += sweep.sent;
                report.failed += sweep.failed;
                skip.extend(&sweep.failed_ids);
                skip.extend(&sweep.released_ids);
                progress(report);
                if let Some(error) = sweep.queue_error {
                    report.stopped = Some(format!("queue unreachable: {error}"));
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Adds the outcome to a resend's audit record, logs it and tells the
    /// hook (the operator's Event).
    async fn resend_finished(
        &self,
        audit_id: i64,
        audit: &ResendAudit,
        rows: usize,
        succeeded: u64,
        failed: u64,
        outcome: String,
    ) {
        if let Err(error) = self.store.finish_resend(audit_id, succeeded, failed, &outcome).await {
            warn!(relay = %self.id, audit_id, %error, "could not record the outcome of the resend");
        }
        info!(target: "txrelay::audit", relay = %self.id, audit_id, succeeded, failed, %outcome, "resend finished");
        self.resend_ended(&ResendNotice {
            audit_id,
            actor: audit.actor.clone(),
            via: audit.via,
            command: audit.command,
            rows,
            succeeded,
            failed,
            outcome,
        });
    }

    /// A row sent or skipped by hand may free its FIFO wallet's later rows,
    /// which the loops (this one, and other processes') are not waiting for.
    pub(super) async fn wallet_may_move(&self) {
        self.wake();
        if let Err(error) = self.store.notify_due().await {
            warn!(relay = %self.id, %error, "could not notify other replicas");
        }
    }

    /// Sends one row now (`txrelay retry ID`), reviving it if dead-lettered.
    /// The audit record is written first, before the row is revived or
    /// claimed, and gets its outcome whatever happens after.
    pub async fn retry_one(&self, id: i64, audit: &ResendAudit) -> Result<String, RetryError> {
        if self.config.suspend {
            return Err(RetryError::Suspended(self.id.to_string()));
        }
        let audit_id = self.store.begin_resend(audit, &serde_json::json!({ "id": id }), &[id]).await?;
        info!(target: "txrelay::audit", relay = %self.id, audit_id, actor = %audit.actor, via = audit.via,
              command = audit.command, id, "resend started");
        let result = self.send_one_now(id).await;
        let (succeeded, outcome) = match &result {
            Ok(message_id) => (1, format!("sent: {message_id}")),
            Err(RetryError::Claim(refused)) => (0, format!("refused: {refused}")),
            Err(error) => (0, format!("failed: {error}")),
        };
        let failed = u64::from(matches!(&result, Err(e) if !matches!(e, RetryError::Claim(_))));
        self.resend_finished(audit_id, audit, 1, succeeded, failed, outcome).await;
        if result.is_ok() {
            self.wallet_may_move().await;
        }
        result
    }

    async fn send_one_now(&self, id: i64) -> Result<String, RetryError> {
        let (row, claim) = self.store.claim_one(id, self.config.claim_lease, self.is_fifo()).await?;
        self.in_flight.track([claim]);
        let result = self.send_claimed(&row, claim).await;
        self.in_flight.untrack([claim]);
        result
    }

    async fn send_claimed(&self, row: &crate::store::ClaimedRow, claim: ClaimRef) -> Result<String, RetryError> {
        let timeout = self.config.call_timeout();
        let sent = match message::outbound(row, self.ledger_token.as_ref()) {
            Ok(message) => match tokio::time::timeout(timeout, self.queue.send(&message)).await {
                Ok(result) => result,
                Err(_) => Err(SendFailure::unknown(format!("SendMessage got no answer within {timeout:?}"))),
            },
            Err(error) => Err(SendFailure::message(error)),
        };
        match sent {
            Ok(message_id) => {
                self.mark_queue(true, None);
                let recorded = self.store.record_sent(&[(claim, message_id.clone())]).await?;
                self.metrics.sent(SendPath::Sweep, 1);
                if recorded.is_empty() {
                    return Err(RetryError::NotRecorded { message_id });
                }
                Ok(message_id)
            }
            Err(failure) if failure.holds() => {
                self.count_failures(failure.kind, 1);
                self.mark_queue(false, Some(&failure));
                self.store.hold(&[(claim, failure.message.clone())]).await?;
                Err(RetryError::Send { failure, dead_lettered: false })
            }
            Err(failure) => {
                self.count_failures(failure.kind, 1);
                if failure.is_unknown() {
                    self.mark_queue(false, Some(&failure));
                }
                let failed = self.failed_send(claim, row.attempts, &failure);
                let rows = self.store.record_failures(&[failed], self.config.max_attempts).await?;
                let dead_lettered = rows.iter().any(|r| r.failed_at.is_some());
                Err(RetryError::Send { failure, dead_lettered })
            }
        }
    }
}

#[cfg(test)]
mod pace_tests {
    use super::pace;
    use std::time::Duration;

    #[test]
    fn a_rate_spaces_messages_evenly_from_the_start() {
        assert_eq!(pace(2.0, 0, Duration::ZERO), Duration::ZERO, "the first goes at once");
        assert_eq!(pace(2.0, 4, Duration::from_millis(500)), Duration::from_millis(1500));
        assert_eq!(pace(2.0, 4, Duration::from_secs(3)), Duration::ZERO, "behind schedule: no wait");
        assert_eq!(pace(0.5, 1, Duration::ZERO), Duration::from_secs(2));
        assert_eq!(pace(0.0, 10, Duration::ZERO), Duration::ZERO, "no rate: no pacing");
        assert_eq!(pace(f64::NAN, 10, Duration::ZERO), Duration::ZERO);
        assert_eq!(pace(1e-300, 10, Duration::ZERO), Duration::MAX, "no panic on an absurd rate");
    }
}
