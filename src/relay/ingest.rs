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

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use futures::future::join_all;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::{Relay, Submission, message};
use crate::metrics::{Accepted, SendPath};
use crate::queue::{self, OutboundMessage, SendFailure, SendResult};
use crate::store::{ClaimRef, InsertOutcome, StoreError};
use crate::transaction::{NewTransaction, Transaction};

/// Rows beyond which a group is closed and the rest wait for the next one.
pub const MAX_GROUP: usize = 100;

type Reply = oneshot::Sender<Result<Submission, StoreError>>;

pub(super) struct Pending {
    tx: NewTransaction,
    reply: Reply,
    /// Counts the request in progress until its row is committed and its
    /// inline send recorded, whatever becomes of the request itself (a
    /// client gone, a request timeout): the relay's shutdown waits for it
    /// before it gives claimed rows back and closes the store.
    guard: super::RequestGuard,
    /// The request's span: the commit and the inline send are its children.
    span: tracing::Span,
}

/// A committed row waiting for its inline send.
struct Outgoing {
    reply: Reply,
    transaction: Transaction,
    claim: ClaimRef,
    /// The stored ledger payload the message is built from.
    payload: String,
    trace: Option<crate::transaction::TraceContext>,
    guard: super::RequestGuard,
    span: tracing::Span,
}

pub(super) type Requests = mpsc::UnboundedSender<Pending>;

impl Relay {
    /// Requests waiting for the next group commit (tests watch it to know a
    /// group has formed).
    pub fn waiting_to_commit(&self) -> watch::Receiver<usize> {
        self.waiting.subscribe()
    }

    /// Commits a transaction (with whatever else arrived at the same time),
    /// then tries to send it inline. A failed or slow send never fails the
    /// request: the row is committed and the loop will deliver it.
    #[tracing::instrument(skip_all, fields(relay = %self.id, reference = %tx.reference, idempotency_key = %tx.idempotency_key))]
    pub async fn submit(self: &Arc<Self>, tx: &NewTransaction) -> Result<Submission, StoreError> {
        let requests = self.ingest.get_or_init(|| {
            let (requests, received) = mpsc::unbounded_channel();
            tokio::spawn(commit_groups(Arc::downgrade(self), received));
            requests
        });
        let (reply, answer) = oneshot::channel();
        self.waiting.send_modify(|n| *n += 1);
        let pending = Pending { tx: tx.clone(), reply, guard: self.enter(), span: tracing::Span::current() };
        if requests.send(pending).is_err() {
            self.waiting.send_modify(|n| *n = n.saturating_sub(1));
            return Err(StoreError::Unavailable("the relay is stopping".into()));
        }
        // The group's task ended without an answer: its INSERT may have gone out.
        let answered =
            answer.await.map_err(|_| StoreError::OutcomeUnknown("the relay stopped while committing".into()))?;
        let submission = answered.inspect_err(|error| {
            if error.is_outcome_unknown() {
                self.metrics.commit_outcome_unknown();
                warn!(%error, "commit outcome unknown; the client is told to retry with the same idempotency key");
            }
        })?;
        match &submission {
            Submission::Sent(row) => {
                self.metrics.accepted(Accepted::Created);
                info!(id = row.id, "committed");
                info!(id = row.id, message_id = row.message_id.as_deref().unwrap_or_default(), "sent inline");
            }
            Submission::Queued(row) => {
                self.metrics.accepted(Accepted::Created);
                info!(id = row.id, "committed");
            }
            Submission::Replayed(row) => {
                self.metrics.accepted(Accepted::Replayed);
                info!(id = row.id, "replayed: same idempotency key and content");
            }
            Submission::Retired(record) => {
                self.metrics.accepted(Accepted::Replayed);
                info!(id = record.id, "replayed after retention: answered from the retired record");
            }
            Submission::Conflict(conflict) => {
                self.metrics.accepted(Accepted::Rejected);
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
        let lease_end = tokio::time::Instant::now() + self.config.inline_lease();
        let inline = !self.config.suspend && self.queue_is_up();
        let lease_ms = if inline { super::millis(self.config.inline_lease()) } else { 0 };
        let fifo = self.is_fifo();
        let txs: Vec<&NewTransaction> = group.iter().map(|p| &p.tx).collect();
        // One commit span per request, each its own request's child.
        let commit_spans: Vec<tracing::Span> =
            group.iter().map(|p| tracing::debug_span!(parent: &p.span, "txrelay.commit", rows = group.len())).collect();
        let outcomes = self.store.insert_many(&txs, lease_ms, fifo).await;
        drop(commit_spans);
        let unavailable = outcomes.iter().find_map(|o| o.as_ref().err().filter(|e| e.is_unavailable()));
        self.mark_database(unavailable);

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
                    transaction,
                    claim,
                    payload: pending.tx.payload,
                    trace: pending.tx.trace,
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
                if let Err(error) = relay.store.release(&release).await {
                    warn!(relay = %relay.id, %error, rows = release.len(), "could not release held-back rows; they are swept after their inline lease");
                }
                relay.wake();
            });
        }
        if queued {
            self.wake();
        }
        if !outgoing.is_empty() {
            tokio::spawn(self.clone().send_group(outgoing, lease_end));
        }
    }

    /// Sends a group's committed rows in as few SendMessageBatch calls as
    /// the limits allow, then records every result in one write per kind.
    async fn send_group(self: Arc<Self>, rows: Vec<Outgoing>, lease_end: tokio::time::Instant) {
        // Until every result is recorded: one send span per request.
        let _send_spans: Vec<tracing::Span> =
            rows.iter().map(|row| tracing::debug_span!(parent: &row.span, "txrelay.send", path = "inline")).collect();
        let mut messages = Vec::with_capacity(rows.len());
        let mut results: Vec<Option<SendResult>> = Vec::with_capacity(rows.len());
        for row in &rows {
            match message::body(&row.payload, self.ledger_token.as_ref()) {
                Ok(body) => {
                    messages.push(OutboundMessage {
                        id: row.transaction.id,
                        body,
                        idempotency_key: row.transaction.idempotency_key.clone(),
                        reference: row.transaction.reference.clone(),
                        source: row.transaction.source.clone(),
                        group_id: row.transaction.wallet_address.clone(),
                        traceparent: row.trace.as_ref().map(|t| t.traceparent.clone()),
                        tracestate: row.trace.as_ref().and_then(|t| t.tracestate.clone()),
                    });
                    results.push(None);
                }
                Err(error) => results.push(Some(Err(SendFailure::message(error)))),
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
        let limit = self.config.inline_send_timeout;
        // A split batch's single sends share what is left of the send's part
        // of the lease; the rest of it is for recording.
        let sends_by = lease_end - limit - std::time::Duration::from_secs(1);
        // The call went out: the queue may have taken it.
        let timed_out = || SendFailure::unknown(format!("inline send got no answer within {limit:?}"));
        self.metrics.send_batch_size(batch.len());
        let results = match tokio::time::timeout(limit, self.queue.send_batch(batch)).await {
            Ok(Ok(results)) => results,
            Ok(Err(failure)) if failure.may_be_one_entry() && batch.len() > 1 => {
                let singles = batch.iter().map(|m| async move {
                    tokio::time::timeout_at(sends_by, self.queue.send(m)).await.unwrap_or_else(|_| Err(timed_out()))
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
            Some(failure) => self.mark_queue(false, Some(failure)),
            None if results.iter().flatten().any(Result::is_ok) => self.mark_queue(true, None),
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
                    self.count_failures(failure.kind, 1);
                    if failure.holds() {
                        warn!(relay = %self.id, reference = %row.transaction.reference, error = %failure,
                              "inline send refused by the queue; the relay will send it, no attempt counted");
                        held.push((row.claim, failure.message));
                    } else {
                        warn!(relay = %self.id, reference = %row.transaction.reference, error = %failure,
                              dead_letters = failure.dead_letters(), "inline send failed; the relay will retry");
                        failed.push(self.failed_send(row.claim, row.transaction.attempts, &failure));
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
            self.metrics.sent(SendPath::Inline, sent.len());
            match self.record_with_retry(lease_end, || self.sent_recorder.record(sent.clone())).await {
                Ok(rows) => stored.extend(rows.into_iter().map(|row| (row.id, row))),
                Err(error) => {
                    // Sent but not recorded: swept again after the inline
                    // lease, a duplicate the ledger drops by idempotency key.
                    recorded = false;
                    warn!(relay = %self.id, %error, rows = sent.len(), "sent but could not record the message ids");
                }
            }
        }
        if !held.is_empty() {
            match self.record_with_retry(lease_end, || self.store.hold(&held)).await {
                Ok(rows) => stored.extend(rows.into_iter().map(|row| (row.id, row))),
                Err(error) => warn!(relay = %self.id, %error, "could not record the refused inline sends"),
            }
        }
        if !failed.is_empty() {
            match self
                .record_with_retry(lease_end, || self.store.record_failures(&failed, self.config.max_attempts))
                .await
            {
                Ok(rows) => stored.extend(rows.into_iter().map(|row| (row.id, row))),
                Err(error) => warn!(relay = %self.id, %error, "could not record the failed inline sends"),
            }
        }
        if !held.is_empty() || !failed.is_empty() {
            self.wake();
            let store = self.store.clone();
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

/// Groups committed at once, at most. Normally one: the next group is
/// whatever arrived while the previous one committed, so groups grow with
/// load on their own (BENCHMARKS.md: at 32 connections one group in flight
/// gave groups of ~10 rows and the most requests per second, two and four
/// at once fewer, every extra statement costing both processes CPU on the
/// shared cores). More go out only past [`GROUP_PATIENCE`].
pub const GROUPS_IN_FLIGHT: usize = 4;

/// How long the next group waits for the one in flight before it commits
/// beside it, on a connection of its own: far above a commit (about a
/// millisecond here, a few on a managed database), far below any request's
/// timeout. One stalled connection, or a group slowed by replays checked
/// one by one, then never holds `/new` back.
pub const GROUP_PATIENCE: std::time::Duration = std::time::Duration::from_millis(50);

/// The group-commit task of one relay: ends when the relay is dropped.
///
/// On a FIFO queue a wallet's rows must commit in the order their requests
/// were taken, or a later row could be committed, and sent, before an
/// earlier one whose group stalled. So when a group commits beside a
/// stalled one (past [`GROUP_PATIENCE`]), rows of a wallet that group holds
/// wait for it, in order, while other wallets' rows go on: new requests are
/// still taken in meanwhile, and a waiting row never holds back another
/// wallet's.
async fn commit_groups(relay: Weak<Relay>, mut requests: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(GROUPS_IN_FLIGHT));
    let mut previous: Option<oneshot::Receiver<()>> = None;
    // FIFO only: the wallets of groups still committing, and a counter that
    // moves whenever one of those groups ends.
    let busy = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, usize>::new()));
    let (ended, mut group_ended) = watch::channel(0_u64);
    let ended = Arc::new(ended);
    // Requests taken and not yet in a group, in arrival order.
    let mut taken: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    let mut open = true;
    loop {
        if taken.is_empty() {
            match requests.recv().await {
                Some(first) => taken.push_back(first),
                None => return,
            }
        }
        // Whatever arrives while the previous group commits (or while every
        // slot is busy) joins this group.
        if let Some(previous) = previous.take() {
            let _ = tokio::time::timeout(GROUP_PATIENCE, previous).await;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        while let Ok(next) = requests.try_recv() {
            taken.push_back(next);
        }
        let Some(relay) = relay.upgrade() else { return };
        let fifo = relay.is_fifo();
        let group = if fifo {
            group_ended.borrow_and_update();
            take_free_wallets(&mut taken, &busy.lock().unwrap_or_else(|e| e.into_inner()), MAX_GROUP)
        } else {
            taken.drain(..taken.len().min(MAX_GROUP)).collect()
        };
        if group.is_empty() {
            // Every row taken waits for a group still committing (each is
            // bounded by the store's call timeout): wait for one to end,
            // taking new requests meanwhile, which may be free to go.
            drop(slot);
            drop(relay);
            tokio::select! {
                _ = group_ended.changed() => {}
                next = requests.recv(), if open => match next {
                    Some(next) => taken.push_back(next),
                    None => open = false,
                },
            }
            continue;
        }
        relay.waiting.send_modify(|n| *n = n.saturating_sub(group.len()));
        relay.metrics.ingest_group(group.len());
        let wallets: Vec<String> =
            if fifo { group.iter().map(|p| p.tx.wallet_address.clone()).collect() } else { Vec::new() };
        let held = WalletsHeld::hold(busy.clone(), ended.clone(), wallets);
        let (committed, done) = oneshot::channel::<()>();
        previous = Some(done);
        tokio::spawn(async move {
            // Released on every exit, a panic included: a wallet left
            // marked busy would hold its rows forever.
            let held = held;
            relay.commit_group(group).await;
            // Released before the intake is woken, so it sees the wallets free.
            drop(held);
            drop(slot);
            drop(committed);
        });
    }
}

/// The wallets of one group in flight, marked busy until it is dropped.
struct WalletsHeld {
    busy: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    ended: Arc<watch::Sender<u64>>,
    wallets: Vec<String>,
}

impl WalletsHeld {
    fn hold(
        busy: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
        ended: Arc<watch::Sender<u64>>,
        wallets: Vec<String>,
    ) -> Self {
        {
            let mut busy = busy.lock().unwrap_or_else(|e| e.into_inner());
            for wallet in &wallets {
                *busy.entry(wallet.clone()).or_default() += 1;
            }
        }
        Self { busy, ended, wallets }
    }
}

impl Drop for WalletsHeld {
    fn drop(&mut self) {
        if self.wallets.is_empty() {
            return;
        }
        {
            let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            for wallet in self.wallets.drain(..) {
                if let std::collections::hash_map::Entry::Occupied(mut entry) = busy.entry(wallet) {
                    *entry.get_mut() -= 1;
                    if *entry.get() == 0 {
                        entry.remove();
                    }
                }
            }
        }
        self.ended.send_modify(|n| *n += 1);
    }
}

/// Takes from `taken`, in arrival order, up to `max` rows whose wallet no
/// group in flight holds; a row whose wallet waits keeps every later row of
/// that wallet waiting behind it. What is not taken stays, in order.
fn take_free_wallets(
    taken: &mut std::collections::VecDeque<Pending>,
    busy: &std::collections::HashMap<String, usize>,
    max: usize,
) -> Vec<Pending> {
    let mut waiting_wallets = HashSet::new();
    let mut group = Vec::with_capacity(max.min(taken.len()));
    let mut rest = std::collections::VecDeque::with_capacity(taken.len());
    for pending in taken.drain(..) {
        let wallet = &pending.tx.wallet_address;
        if group.len() < max && !busy.contains_key(wallet) && !waiting_wallets.contains(wallet) {
            group.push(pending);
        } else {
            waiting_wallets.insert(wallet.clone());
            rest.push_back(pending);
        }
    }
    *taken = rest;
    group
}
