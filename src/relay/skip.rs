//! `txrelay skip ID`: a dead letter given up on for good, so that its FIFO
//! wallet goes on without it. Audited like a resend, since it decides what
//! the ledger will (never) see.

use tracing::{info, warn};

use super::{Relay, ResendNotice};
use crate::store::{ResendAudit, SkipError};

impl Relay {
    /// Skips one dead-lettered row: the audit record first, then the row,
    /// then the outcome on the record. Replicas are told the wallet may move.
    pub async fn skip_one(&self, id: i64, audit: &ResendAudit) -> Result<String, SkipError> {
        let audit_id = self.store.begin_resend(audit, &serde_json::json!({ "id": id }), &[id]).await?;
        info!(target: "txrelay::audit", relay = %self.id, audit_id, actor = %audit.actor, via = audit.via,
              command = audit.command, id, "skip started");
        let result = self.store.skip_dead_letter(id).await;
        let outcome = match &result {
            Ok(wallet) => format!("skipped: the wallet {wallet} goes on without it"),
            Err(error) => format!("refused: {error}"),
        };
        if let Err(error) = self.store.finish_resend(audit_id, 0, 0, &outcome).await {
            warn!(relay = %self.id, audit_id, %error, "could not record the outcome of the skip");
        }
        info!(target: "txrelay::audit", relay = %self.id, audit_id, %outcome, "skip finished");
        self.resend_ended(&ResendNotice {
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
            self.wallet_may_move().await;
        }
        result
    }
}
