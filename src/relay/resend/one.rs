//! One row by hand: `txrelay retry ID` sends it now (reviving a dead
//! letter), `txrelay skip ID` gives a dead letter up for good so that its
//! FIFO wallet goes on. Both are audited like `retry-all`.

use tracing::{info, warn};

use super::{Resend, ResendNotice};
use crate::metrics::SendPath;
use crate::queue::SendFailure;
use crate::store::{ClaimRef, ClaimedRow, ResendAudit, RetryOneError, SkipError, StoreError};

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

impl Resend {
    /// Sends one row now (`txrelay retry ID`), reviving it if dead-lettered.
    /// The audit record is written first, before the row is revived or
    /// claimed, and gets its outcome whatever happens after.
    pub async fn retry_one(&self, id: i64, audit: &ResendAudit) -> Result<String, RetryError> {
        if self.core.config.suspend {
            return Err(RetryError::Suspended(self.core.id.to_string()));
        }
        let audit_id = self.core.store.begin_resend(audit, &serde_json::json!({ "id": id }), &[id]).await?;
        info!(target: "txrelay::audit", relay = %self.core.id, audit_id, actor = %audit.actor, via = audit.via,
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
            self.core.wallet_may_move().await;
        }
        result
    }

    async fn send_one_now(&self, id: i64) -> Result<String, RetryError> {
        let (row, claim) = self.core.store.claim_one(id, self.core.config.claim_lease).await?;
        self.drain.track([claim]);
        let result = self.send_claimed(&row, claim).await;
        self.drain.untrack([claim]);
        result
    }

    async fn send_claimed(&self, row: &ClaimedRow, claim: ClaimRef) -> Result<String, RetryError> {
        let timeout = self.core.config.call_timeout();
        let sent = match self.core.message(row) {
            Ok(message) => match tokio::time::timeout(timeout, self.core.queue.send(&message)).await {
                Ok(result) => result,
                Err(_) => Err(SendFailure::unknown(format!("SendMessage got no answer within {timeout:?}"))),
            },
            Err(failure) => Err(failure),
        };
        match sent {
            Ok(message_id) => {
                self.core.mark_queue(true, None);
                let recorded = self.core.store.record_sent(&[(claim, message_id.clone())]).await?;
                self.core.metrics.sent(SendPath::Sweep, 1);
                if recorded.is_empty() {
                    return Err(RetryError::NotRecorded { message_id });
                }
                Ok(message_id)
            }
            Err(failure) if failure.holds() => {
                self.core.count_failures(failure.kind, 1);
                self.core.mark_queue(false, Some(&failure));
                self.core.store.hold(&[(claim, failure.message.clone())]).await?;
                Err(RetryError::Send { failure, dead_lettered: false })
            }
            Err(failure) => {
                self.core.count_failures(failure.kind, 1);
                if failure.is_unknown() {
                    self.core.mark_queue(false, Some(&failure));
                }
                let failed = self.core.failed_send(claim, row.attempts, &failure);
                let rows = self.core.store.record_failures(&[failed], self.core.config.max_attempts).await?;
                let dead_lettered = rows.iter().any(|r| r.failed_at.is_some());
                Err(RetryError::Send { failure, dead_lettered })
            }
        }
    }
    /// Skips one dead-lettered row: the audit record first, then the row,
    /// then the outcome on the record. Replicas are told the wallet may move.
    pub async fn skip_one(&self, id: i64, audit: &ResendAudit) -> Result<String, SkipError> {
        let audit_id = self.core.store.begin_resend(audit, &serde_json::json!({ "id": id }), &[id]).await?;
        info!(target: "txrelay::audit", relay = %self.core.id, audit_id, actor = %audit.actor, via = audit.via,
              command = audit.command, id, "skip started");
        let result = self.core.store.skip_dead_letter(id).await;
        let outcome = match &result {
            Ok(wallet) => format!("skipped: the wallet {wallet} goes on without it"),
            Err(error) => format!("refused: {error}"),
        };
        if let Err(error) = self.core.store.finish_resend(audit_id, 0, 0, &outcome).await {
            warn!(relay = %self.core.id, audit_id, %error, "could not record the outcome of the skip");
        }
        info!(target: "txrelay::audit", relay = %self.core.id, audit_id, %outcome, "skip finished");
        self.ended(&ResendNotice {
            audit_id,
            actor: audit.actor.clone(),
            via: audit.via,
            command: audit.command,
            rows: 1,
            succeeded: 0,
            failed: 0,
            outcome,
        });
        if result.is_ok() {
            self.core.wallet_may_move().await;
        }
        result
    }
}
