//! The inline send of a committed group: as few SendMessageBatch calls as
//! the limits allow, within `inlineSendTimeout`, then every result recorded
//! in one write per kind and each request answered.

use std::sync::Arc;

use futures::future::join_all;
use tracing::warn;

use super::{Ingest, Outgoing, Reply, Submission};
use crate::metrics::SendPath;
use crate::queue::{self, OutboundMessage, SendFailure, SendResult};
use crate::transaction::Transaction;

impl Ingest {
    /// Sends a group's committed rows in as few SendMessageBatch calls as
    /// the limits allow, then records every result in one write per kind.
    pub(super) async fn send_group(self: Arc<Self>, rows: Vec<Outgoing>, lease_end: tokio::time::Instant) {
        // Until every result is recorded: one send span per request.
        let _send_spans: Vec<tracing::Span> =
            rows.iter().map(|row| tracing::debug_span!(parent: &row.span, "txrelay.send", path = "inline")).collect();
        let mut messages = Vec::with_capacity(rows.len());
        let mut results: Vec<Option<SendResult>> = Vec::with_capacity(rows.len());
        for row in &rows {
            match self.core.message(&row.row) {
                Ok(message) => {
                    messages.push(message);
                    results.push(None);
                }
                Err(failure) => results.push(Some(Err(failure))),
            }
        }
        let batches = queue::batches(messages);
        let sent: Vec<Vec<(i64, SendResult)>> =
            join_all(batches.iter().map(|batch| self.send_inline_batch(batch, lease_end))).await;
        for (id, result) in sent.into_iter().flatten() {
            if let Some(slot) = rows.iter().position(|row| row.transaction.id == id) {
                results[slot] = Some(result);
            }
        }
        self.settle_inline(rows, results, lease_end).await;
    }

    /// One inline SendMessageBatch call within `inlineSendTimeout`; a call
    /// refused for what one message can cause is split to find it.
    async fn send_inline_batch(
        &self,
        batch: &[OutboundMessage],
        lease_end: tokio::time::Instant,
    ) -> Vec<(i64, SendResult)> {
        let limit = self.core.config.inline_send_timeout;
        // A split batch's single sends share what is left of the send's part
        // of the lease; the rest of it is for recording.
        let sends_by = lease_end - limit - std::time::Duration::from_secs(1);
        // The call went out: the queue may have taken it.
        let timed_out = || SendFailure::unknown(format!("inline send got no answer within {limit:?}"));
        self.core.metrics.send_batch_size(batch.len());
        let results = match tokio::time::timeout(limit, self.core.queue.send_batch(batch)).await {
            Ok(Ok(results)) => results,
            Ok(Err(failure)) if failure.may_be_one_entry() && batch.len() > 1 => {
                let singles = batch.iter().map(|m| async move {
                    tokio::time::timeout_at(sends_by, self.core.queue.send(m))
                        .await
                        .unwrap_or_else(|_| Err(timed_out()))
                });
                join_all(singles).await
            }
            Ok(Err(failure)) => vec![Err(failure); batch.len()],
            Err(_) => vec![Err(timed_out()); batch.len()],
        };
        batch.iter().map(|m| m.id).zip(results).collect()
    }

    /// Records a group's inline results and answers each request.
    async fn settle_inline(
        &self,
        rows: Vec<Outgoing>,
        results: Vec<Option<SendResult>>,
        lease_end: tokio::time::Instant,
    ) {
        let refused = results.iter().flatten().find_map(|r| r.as_ref().err().filter(|f| f.queue_suspect())).cloned();
        match &refused {
            Some(failure) => self.core.mark_queue(false, Some(failure)),
            None if results.iter().flatten().any(Result::is_ok) => self.core.mark_queue(true, None),
            None => {}
        }
        let mut sent = Vec::new();
        let mut held = Vec::new();
        let mut failed = Vec::new();
        let mut answers: Vec<(Reply, Transaction, bool)> = Vec::with_capacity(rows.len());
        // Dropped once every result is recorded and answered.
        let mut _in_progress = Vec::with_capacity(rows.len());
        for (row, result) in rows.into_iter().zip(results) {
            _in_progress.push(row.guard);
            let result = result.unwrap_or_else(|| Err(SendFailure::unreachable("not sent")));
            match result {
                Ok(message_id) => {
                    sent.push((row.claim, message_id));
                    answers.push((row.reply, row.transaction, true));
                }
                Err(failure) => {
                    self.core.count_failures(failure.kind, 1);
                    if failure.holds() {
                        warn!(relay = %self.core.id, reference = %row.transaction.reference, error = %failure,
                              "inline send refused by the queue; the relay will send it, no attempt counted");
                        held.push((row.claim, failure.message));
                    } else {
                        warn!(relay = %self.core.id, reference = %row.transaction.reference, error = %failure,
                              dead_letters = failure.dead_letters(), "inline send failed; the relay will retry");
                        failed.push(self.core.failed_send(row.claim, row.transaction.attempts, &failure));
                    }
                    answers.push((row.reply, row.transaction, false));
                }
            }
        }
        // What each row is now, as the database answered; a row missing
        // from it was recorded by another process first.
        let mut stored = std::collections::HashMap::new();
        let mut recorded = true;
        if !sent.is_empty() {
            self.core.metrics.sent(SendPath::Inline, sent.len());
            match self.core.record_with_retry(lease_end, || self.core.recorder.record(sent.clone())).await {
                Ok(rows) => stored.extend(rows.into_iter().map(|row| (row.id, row))),
                Err(error) => {
                    // Sent but not recorded: swept again after the inline
                    // lease, a duplicate the ledger drops by idempotency key.
                    recorded = false;
                    warn!(relay = %self.core.id, %error, rows = sent.len(), "sent but could not record the message ids");
                }
            }
        }
        if !held.is_empty() {
            match self.core.record_with_retry(lease_end, || self.core.store.hold(&held)).await {
                Ok(rows) => stored.extend(rows.into_iter().map(|row| (row.id, row))),
                Err(error) => warn!(relay = %self.core.id, %error, "could not record the refused inline sends"),
            }
        }
        if !failed.is_empty() {
            match self
                .core
                .record_with_retry(lease_end, || {
                    self.core.store.record_failures(&failed, self.core.config.max_attempts)
                })
                .await
            {
                Ok(rows) => stored.extend(rows.into_iter().map(|row| (row.id, row))),
                Err(error) => warn!(relay = %self.core.id, %error, "could not record the failed inline sends"),
            }
        }
        if !held.is_empty() || !failed.is_empty() {
            self.core.wake();
            let store = self.core.store.clone();
            tokio::spawn(async move {
                if let Err(error) = store.notify_due().await {
                    warn!(%error, "could not notify other replicas");
                }
            });
        }
        for (reply, transaction, was_sent) in answers {
            // 201 only with the message id this request's send recorded; a
            // row someone else recorded first (or not at all) is a 202.
            let submission = match stored.remove(&transaction.id) {
                Some(row) if was_sent && recorded && row.message_id.is_some() => Submission::Sent(row),
                Some(row) => Submission::Queued(row),
                None => Submission::Queued(transaction),
            };
            let _ = reply.send(Ok(submission));
        }
    }
}
