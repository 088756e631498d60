//! `/new` at the database's pace: group commit, then batched inline sends.
//!
//! Concurrent requests to one relay are gathered and committed together by
//! one task: whatever arrived while the previous group was being committed
//! (at most [`MAX_GROUP`] rows) goes into one multi-row INSERT, one commit.
//! Nothing lingers: a lone request on an idle relay is committed at once,
//! and a group waits for the one before it at most [`GROUP_PATIENCE`]. Each
//! request is still answered only after its own row is durably
//! committed, and replays and conflicts are decided per row as before.
//!
//! The committed rows of a group then go out together in SendMessageBatch
//! calls (at most 10 entries and 256 KiB each), from a task of their own so
//! the next group commits meanwhile; each request gets its own result: 201
//! with its message id, or 202.
//!
//! The work runs in a task, not in the request: a client that disconnects
//! mid-commit must not cancel the commit of its neighbours' rows.

mod group;
mod inline;

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::core::{Outbox, RequestGuard};
use crate::metrics::Accepted;
use crate::store::{ClaimRef, ClaimedRow, InsertOutcome, Intake, RetiredTransaction, StoreError};
use crate::transaction::{NewTransaction, Transaction};

pub use group::{GROUP_PATIENCE, GROUPS_IN_FLIGHT};

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
    Retired(RetiredTransaction),
    Conflict(crate::store::Conflict),
}

/// `/new`'s flow: group commit, then the inline send.
pub struct Ingest {
    core: Arc<Outbox>,
    /// The group-commit task's queue, started by the first `/new`.
    requests: OnceLock<Requests>,
    /// Requests in that queue, not yet taken into a group.
    waiting: watch::Sender<usize>,
}

/// Rows beyond which a group is closed and the rest wait for the next one.
pub const MAX_GROUP: usize = 100;

type Reply = oneshot::Sender<Result<Submission, StoreError>>;

struct Pending {
    tx: NewTransaction,
    reply: Reply,
    /// Counts the request in progress until its row is committed and its
    /// inline send recorded, whatever becomes of the request itself (a
    /// client gone, a request timeout): the relay's shutdown waits for it
    /// before it gives claimed rows back and closes the store.
    guard: RequestGuard,
    /// The request's span: the commit and the inline send are its children.
    span: tracing::Span,
}

/// A committed row waiting for its inline send.
pub(super) struct Outgoing {
    reply: Reply,
    transaction: Transaction,
    claim: ClaimRef,
    /// The stored row the message is built from.
    row: ClaimedRow,
    guard: RequestGuard,
    span: tracing::Span,
}

type Requests = mpsc::UnboundedSender<Pending>;

impl Ingest {
    pub fn new(core: Arc<Outbox>) -> Self {
        Self { core, requests: OnceLock::new(), waiting: watch::Sender::new(0) }
    }

    /// Requests waiting for the next group commit (tests watch it to know a
    /// group has formed).
    pub fn waiting_to_commit(&self) -> watch::Receiver<usize> {
        self.waiting.subscribe()
    }

    /// Commits a transaction (with whatever else arrived at the same time),
    /// then tries to send it inline. A failed or slow send never fails the
    /// request: the row is committed and the loop will deliver it.
    #[tracing::instrument(skip_all, fields(relay = %self.core.id, reference = %tx.reference, idempotency_key = %tx.idempotency_key))]
    pub async fn submit(self: &Arc<Self>, tx: &NewTransaction) -> Result<Submission, StoreError> {
        let requests = self.requests.get_or_init(|| {
            let (requests, received) = mpsc::unbounded_channel();
            tokio::spawn(group::commit_groups(Arc::downgrade(self), received));
            requests
        });
        let (reply, answer) = oneshot::channel();
        self.waiting.send_modify(|n| *n += 1);
        let pending = Pending { tx: tx.clone(), reply, guard: self.core.enter(), span: tracing::Span::current() };
        if requests.send(pending).is_err() {
            self.waiting.send_modify(|n| *n = n.saturating_sub(1));
            return Err(StoreError::Unavailable("the relay is stopping".into()));
        }
        // The group's task ended without an answer: its INSERT may have gone out.
        let answered =
            answer.await.map_err(|_| StoreError::OutcomeUnknown("the relay stopped while committing".into()))?;
        let submission = answered.inspect_err(|error| {
            if error.is_outcome_unknown() {
                self.core.metrics.commit_outcome_unknown();
                warn!(%error, "commit outcome unknown; the client is told to retry with the same idempotency key");
            }
        })?;
        match &submission {
            Submission::Sent(row) => {
                self.core.metrics.accepted(Accepted::Created);
                info!(id = row.id, "committed");
                info!(id = row.id, message_id = row.message_id.as_deref().unwrap_or_default(), "sent inline");
            }
            Submission::Queued(row) => {
                self.core.metrics.accepted(Accepted::Created);
                info!(id = row.id, "committed");
            }
            Submission::Replayed(row) => {
                self.core.metrics.accepted(Accepted::Replayed);
                info!(id = row.id, "replayed: same idempotency key and content");
            }
            Submission::Retired(record) => {
                self.core.metrics.accepted(Accepted::Replayed);
                info!(id = record.id, "replayed after retention: answered from the retired record");
            }
            Submission::Conflict(conflict) => {
                self.core.metrics.accepted(Accepted::Rejected);
                info!(field = conflict.field(), "conflict with a stored transaction");
            }
        }
        Ok(submission)
    }

    /// Commits one group and answers every request in it that needs no
    /// inline send; the rest are handed to a send task.
    async fn commit_group(self: &Arc<Self>, group: Vec<Pending>) {
        // The inline lease runs from the INSERT: taken before it, so the
        // send and its recording are bounded by what the database holds.
        let lease_end = tokio::time::Instant::now() + self.core.config.inline_lease();
        let inline = !self.core.config.suspend && self.core.queue_is_up();
        let intake = if inline { Intake::Inline { lease: self.core.config.inline_lease() } } else { Intake::Queued };
        let fifo = self.core.is_fifo();
        let txs: Vec<&NewTransaction> = group.iter().map(|p| &p.tx).collect();
        // One commit span per request, each its own request's child.
        let commit_spans: Vec<tracing::Span> =
            group.iter().map(|p| tracing::debug_span!(parent: &p.span, "txrelay.commit", rows = group.len())).collect();
        let outcomes = self.core.store.insert_many(&txs, intake).await;
        drop(commit_spans);
        let unavailable = outcomes.iter().find_map(|o| o.as_ref().err().filter(|e| e.is_unavailable()));
        self.core.mark_database(unavailable);

        let mut wallets = HashSet::new();
        let mut release = Vec::new();
        let mut released = Vec::new();
        let mut release_guards = Vec::new();
        let mut outgoing = Vec::new();
        let mut queued = false;
        for (pending, outcome) in group.into_iter().zip(outcomes) {
            let (transaction, held_back, claim) = match outcome {
                Ok(InsertOutcome::Created { transaction, held_back, claim }) => (transaction, held_back, claim),
                Ok(InsertOutcome::Replayed(row)) => {
                    let _ = pending.reply.send(Ok(Submission::Replayed(row)));
                    continue;
                }
                Ok(InsertOutcome::Retired(record)) => {
                    let _ = pending.reply.send(Ok(Submission::Retired(record)));
                    continue;
                }
                Ok(InsertOutcome::Conflict(conflict)) => {
                    let _ = pending.reply.send(Ok(Submission::Conflict(conflict)));
                    continue;
                }
                Err(error) => {
                    let _ = pending.reply.send(Err(error));
                    continue;
                }
            };
            // FIFO: a wallet's second row in the group waits behind its
            // first, exactly as behind an older unsent row.
            let behind_its_wallet = fifo && !wallets.insert(transaction.wallet_address.clone());
            if !inline {
                queued = true;
                let _ = pending.reply.send(Ok(Submission::Queued(transaction)));
            } else if held_back || behind_its_wallet {
                queued = true;
                release.push(claim);
                released.push((pending.reply, transaction));
                release_guards.push(pending.guard);
            } else {
                outgoing.push(Outgoing {
                    reply: pending.reply,
                    row: ClaimedRow::created(&transaction, pending.tx.payload, pending.tx.trace),
                    transaction,
                    claim,
                    guard: pending.guard,
                    span: pending.span,
                });
            }
        }
        for (reply, transaction) in released {
            let _ = reply.send(Ok(Submission::Queued(transaction)));
        }
        if !release.is_empty() {
            // Off the commit path: the next group must not wait for it. The
            // rows are committed whatever happens here; a failed release
            // only means they wait out their short inline lease.
            let relay = self.clone();
            tokio::spawn(async move {
                let _in_progress = release_guards;
                if let Err(error) = relay.core.store.release(&release).await {
                    warn!(relay = %relay.core.id, %error, rows = release.len(), "could not release held-back rows; they are swept after their inline lease");
                }
                relay.core.wake();
            });
        }
        if queued {
            self.core.wake();
        }
        if !outgoing.is_empty() {
            tokio::spawn(self.clone().send_group(outgoing, lease_end));
        }
    }
}
