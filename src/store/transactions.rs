//! Storing and reading transactions.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use sqlx::{FromRow, Row};

use super::{
    ClaimRef, Result, Store, StoreError, columns, dead_lettered, due_at, follow, follow_columns, holds_its_wallet,
    named_statements, not_sent, sent, unsent,
};
use crate::transaction::{NewTransaction, Transaction};

/// What happened to a `/new` insert.
#[derive(Debug)]
pub enum InsertOutcome {
    /// A new row, committed. `held_back`: on a FIFO queue an older row of the
    /// same wallet is still unsent, so this one must wait its turn.
    Created {
        transaction: Transaction,
        held_back: bool,
        /// The inline send's hold on the row (no token when not held).
        claim: ClaimRef,
    },
    /// The same idempotency key with the same content: the stored row.
    Replayed(Transaction),
    /// The same idempotency key with the same content, for a row retention
    /// has deleted: its compact record.
    Retired(RetiredTransaction),
    Conflict(Conflict),
}

/// What stays of a sent transaction after retention deleted it, for the
/// idempotency window: enough to answer a replay, never the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct RetiredTransaction {
    pub id: i64,
    pub reference: String,
    pub idempotency_key: String,
    pub wallet_address: String,
    pub message_id: String,
    pub queue_sent_at: chrono::DateTime<chrono::Utc>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Always true: the full row is gone, only this record remains.
    #[sqlx(default)]
    pub retired: bool,
    #[serde(skip)]
    pub payload_digest: String,
}

/// What makes a request itself, to find its row among those a group returns.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Identity {
    idempotency_key: String,
    reference: String,
    external_reference: String,
    wallet_address: String,
    payload_digest: String,
}

impl Identity {
    fn of(tx: &NewTransaction) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(tx.payload.as_bytes());
        Self {
            idempotency_key: tx.idempotency_key.clone(),
            reference: tx.reference.clone(),
            external_reference: tx.external_reference.clone(),
            wallet_address: tx.wallet_address.clone(),
            payload_digest: crate::hex::lower(&digest),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// The idempotency key belongs to a transaction with other content.
    IdempotencyKey,
    Reference,
    ExternalReference,
}

impl Conflict {
    pub fn field(self) -> &'static str {
        match self {
            Self::IdempotencyKey => "ledger_payload.meta_data.idempotency_key",
            Self::Reference => "ledger_payload.payload.reference",
            Self::ExternalReference => "ledger_payload.payload.external_reference",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::IdempotencyKey => "idempotency key already used for a transaction with different content",
            Self::Reference => "reference already belongs to another transaction",
            Self::ExternalReference => "external_reference already belongs to another transaction",
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub status: Option<String>,
    pub wallet_address: Option<String>,
    pub payer_id: Option<String>,
    pub payee_id: Option<String>,
    /// Only unsent rows.
    pub unsent: bool,
    /// Only dead-lettered rows.
    pub failed: bool,
    /// Rows not sent yet, dead-lettered or not (the CLI's `list`).
    pub not_sent: bool,
    pub after_id: Option<i64>,
    pub limit: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub total: i64,
    pub sent: i64,
    pub unsent: i64,
    pub failed: i64,
    pub by_status: BTreeMap<String, i64>,
}

/// New rows in one statement (group commit; a single insert is a group of
/// one). Rows come out of `unnest` in request order, so ids (and a wallet's
/// FIFO order) follow it; a row whose keys already exist, in the table or
/// earlier in the same group, is skipped and classified afterwards. Every
/// new row is unsent, so it goes into `unsent_transactions` in the same
/// statement. `held_back` sees only rows committed before this statement;
/// later rows of a wallet within the group are judged by the caller.
const INSERT_MANY: &str = concat!(
    "WITH changed AS (INSERT INTO transactions (reference, external_reference, idempotency_key, transaction_type, \
     status, source, instruction_type, incoming_currency, outgoing_currency, value, fee, payer_id, payee_id, \
     first_name, last_name, wallet_address, ip_address, payload, next_attempt_at, claimed_until, claim_token, \
     traceparent, tracestate) \
     SELECT r, er, ik, tt, st, so, it, ic, oc, va, fe, pa, pe, fi, la, wa, ip, pl::json, now(), \
     CASE WHEN tok IS NOT NULL THEN now() + $19 * interval '1 millisecond' END, tok, tp, ts \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], \
     $9::text[], $10::numeric[], $11::numeric[], $12::text[], $13::text[], $14::text[], $15::text[], $16::text[], \
     $17::text[], $18::text[], $20::bigint[], $22::text[], $23::text[]) WITH ORDINALITY \
     AS i(r, er, ik, tt, st, so, it, ic, oc, va, fe, pa, pe, fi, la, wa, ip, pl, tok, tp, ts, ord) \
     WHERE NOT EXISTS (SELECT 1 FROM retired_transactions k WHERE k.idempotency_key = i.ik) ORDER BY ord \
     ON CONFLICT DO NOTHING RETURNING ",
    columns!(),
    ", claim_token AS claim_token_out, \
     encode(sha256(convert_to(payload::text, 'UTF8')), 'hex') AS payload_digest, ",
    follow_columns!(),
    "), ",
    follow!(),
    " SELECT changed.*, ($21 AND (EXISTS (SELECT 1 FROM unsent_transactions o \
     WHERE o.wallet_address = changed.wallet_address) OR EXISTS (SELECT 1 FROM transactions d \
     WHERE d.wallet_address = changed.wallet_address AND d.id < changed.id AND ",
    holds_its_wallet!("d"),
    "))) AS held_back FROM changed"
);

const FIND_CONFLICT: &str = concat!(
    "SELECT ",
    columns!(),
    ", idempotency_key = $1 AS same_key, reference = $2 AS same_reference, \
     (payload::text = $4 AND wallet_address = $5) AS same_content \
     FROM transactions WHERE idempotency_key = $1 OR reference = $2 OR external_reference = $3 \
     ORDER BY (idempotency_key = $1) DESC, (reference = $2) DESC LIMIT 1"
);

const LIST: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM transactions WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR wallet_address = $2) \
     AND ($3::text IS NULL OR payer_id = $3) AND ($4::text IS NULL OR payee_id = $4) \
     AND (NOT $5 OR (",
    unsent!("transactions"),
    ")) AND (NOT $6 OR ",
    dead_lettered!("transactions"),
    ") AND (NOT $7 OR ",
    not_sent!("transactions"),
    ") AND id > $8 ORDER BY id LIMIT $9"
);

/// A retired key's compact record (see [`RetiredTransaction`]).
const FIND_RETIRED: &str = "SELECT id, reference, idempotency_key, wallet_address, message_id, queue_sent_at, \
     created_at, true AS retired, payload_digest FROM retired_transactions WHERE idempotency_key = $1";

const FIND_BY_REFERENCE: &str = concat!("SELECT ", columns!(), " FROM transactions WHERE reference = $1");

const FIND_BY_ID: &str = concat!("SELECT ", columns!(), " FROM transactions WHERE id = $1");

const COUNT_BY_STATUS: &str = "SELECT status, count(*) FROM transactions GROUP BY status ORDER BY status";

#[cfg(test)]
pub(crate) const STATS_SQL: &str = STATS;

const STATS: &str = concat!(
    "SELECT count(*) AS total, count(*) FILTER (WHERE ",
    sent!("transactions"),
    ") AS sent, count(*) FILTER (WHERE ",
    unsent!("transactions"),
    ") AS unsent, count(*) FILTER (WHERE ",
    dead_lettered!("transactions"),
    ") AS failed FROM transactions"
);

/// Every statement of this file, for [`super::statements`].
pub(super) fn statements() -> Vec<(&'static str, &'static str)> {
    named_statements![
        INSERT_MANY,
        FIND_CONFLICT,
        FIND_RETIRED,
        FIND_BY_REFERENCE,
        FIND_BY_ID,
        LIST,
        STATS,
        COUNT_BY_STATUS
    ]
}

/// What becomes of a new row once it is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Left for the relay loop (the queue is down, the relay suspended).
    Queued,
    /// Held for its inline send for `lease`, under a claim token of its own,
    /// so a sweep never races it; if the process dies, the row is swept
    /// once the lease ends.
    Inline { lease: Duration },
}

impl Intake {
    fn lease_ms(self) -> i64 {
        match self {
            Self::Queued => 0,
            Self::Inline { lease } => i64::try_from(lease.as_millis()).unwrap_or(i64::MAX).max(1),
        }
    }
}

impl Store {
    /// Commits a new transaction in one round trip.
    pub async fn insert(&self, tx: &NewTransaction, intake: Intake) -> Result<InsertOutcome> {
        // A conflicting row can vanish between the insert and the lookup
        // (retention); one more insert settles it.
        for _ in 0..2 {
            let mut rows = self.insert_rows(&[tx], intake).await?;
            if let Some(row) = rows.pop() {
                return created(&row);
            }
            if let Some(outcome) = self.classify_conflict(tx).await? {
                return Ok(outcome);
            }
        }
        Err(StoreError::Inconsistent("insert conflicted with a row that no longer exists".into()))
    }

    /// Commits a group of new transactions in one statement and one
    /// transaction; the answer for each is in the order given. A group
    /// that fails for another reason than the database being unavailable (a
    /// constraint one row breaks) is retried row by row, so one bad row never
    /// fails its neighbours; an unavailable database fails every row of it.
    pub async fn insert_many(&self, txs: &[&NewTransaction], intake: Intake) -> Vec<Result<InsertOutcome>> {
        match self.insert_group(txs, intake).await {
            Ok(outcomes) => outcomes,
            Err(error) if error.is_unavailable() => txs.iter().map(|_| Err(error.again())).collect(),
            Err(_) => {
                let mut outcomes = Vec::with_capacity(txs.len());
                for tx in txs {
                    outcomes.push(self.insert(tx, intake).await);
                }
                outcomes
            }
        }
    }

    async fn insert_group(&self, txs: &[&NewTransaction], intake: Intake) -> Result<Vec<Result<InsertOutcome>>> {
        let rows = self.insert_rows(txs, intake).await?;
        // A returned row is a request's only if everything that makes the
        // request itself matches: two requests of one group may share a key
        // (a replay, or a conflict) while only one of them was inserted.
        let mut inserted: std::collections::HashMap<Identity, sqlx::postgres::PgRow> = std::collections::HashMap::new();
        for row in rows {
            let identity = Identity {
                idempotency_key: row.try_get("idempotency_key")?,
                reference: row.try_get("reference")?,
                external_reference: row.try_get("external_reference")?,
                wallet_address: row.try_get("wallet_address")?,
                payload_digest: row.try_get("payload_digest")?,
            };
            inserted.insert(identity, row);
        }
        let mut outcomes = Vec::with_capacity(txs.len());
        for tx in txs {
            match inserted.remove(&Identity::of(tx)) {
                Some(row) => outcomes.push(created(&row)),
                // Skipped: its keys exist (a replay, a conflict, or an
                // earlier row of this very group). Judged as one insert is.
                None => outcomes.push(match self.classify_conflict(tx).await {
                    Ok(Some(outcome)) => Ok(outcome),
                    Ok(None) => self.insert(tx, intake).await,
                    Err(error) => Err(error),
                }),
            }
        }
        Ok(outcomes)
    }

    /// Runs [`INSERT_MANY`]: the rows inserted, each held for its inline
    /// send under a token of its own when the intake is inline.
    async fn insert_rows(&self, txs: &[&NewTransaction], intake: Intake) -> Result<Vec<sqlx::postgres::PgRow>> {
        let inline_lease_ms = intake.lease_ms();
        let text = |f: fn(&NewTransaction) -> &str| txs.iter().map(|t| f(t).to_owned()).collect::<Vec<String>>();
        let optional = |f: fn(&NewTransaction) -> &Option<String>| txs.iter().map(|t| f(t).clone()).collect::<Vec<_>>();
        let tokens: Vec<Option<i64>> =
            txs.iter().map(|_| (inline_lease_ms > 0).then(super::outbox::new_token)).collect();
        let query = sqlx::query(INSERT_MANY)
            .bind(text(|t| &t.reference))
            .bind(text(|t| &t.external_reference))
            .bind(text(|t| &t.idempotency_key))
            .bind(text(|t| t.transaction_type.as_str()))
            .bind(text(|t| &t.status))
            .bind(text(|t| &t.source))
            .bind(text(|t| &t.instruction_type))
            .bind(text(|t| &t.incoming_currency))
            .bind(text(|t| &t.outgoing_currency))
            .bind(txs.iter().map(|t| t.value).collect::<Vec<_>>())
            .bind(txs.iter().map(|t| t.fee).collect::<Vec<_>>())
            .bind(optional(|t| &t.payer_id))
            .bind(optional(|t| &t.payee_id))
            .bind(optional(|t| &t.first_name))
            .bind(optional(|t| &t.last_name))
            .bind(text(|t| &t.wallet_address))
            .bind(optional(|t| &t.ip_address))
            .bind(text(|t| &t.payload))
            .bind(inline_lease_ms)
            .bind(tokens)
            .bind(self.fifo())
            .bind(txs.iter().map(|t| t.trace.as_ref().map(|c| c.traceparent.clone())).collect::<Vec<_>>())
            .bind(txs.iter().map(|t| t.trace.as_ref().and_then(|c| c.tracestate.clone())).collect::<Vec<_>>());
        // The INSERT is its own transaction: once it went out, a lost
        // answer leaves its commit unknown.
        self.on(self.pool()).await?.run_write(|c| query.fetch_all(c)).await
    }

    async fn classify_conflict(&self, tx: &NewTransaction) -> Result<Option<InsertOutcome>> {
        let found = self
            .on(self.pool())
            .await?
            .run(|c| {
                sqlx::query(FIND_CONFLICT)
                    .bind(&tx.idempotency_key)
                    .bind(&tx.reference)
                    .bind(&tx.external_reference)
                    .bind(&tx.payload)
                    .bind(&tx.wallet_address)
                    .fetch_optional(c)
            })
            .await?;
        let Some(row) = found else {
            return self.classify_retired(tx).await;
        };
        let existing = Transaction::from_row(&row)?;
        let outcome = if row.try_get("same_key")? {
            if row.try_get("same_content")? {
                InsertOutcome::Replayed(existing)
            } else {
                InsertOutcome::Conflict(Conflict::IdempotencyKey)
            }
        } else if row.try_get("same_reference")? {
            InsertOutcome::Conflict(Conflict::Reference)
        } else {
            InsertOutcome::Conflict(Conflict::ExternalReference)
        };
        Ok(Some(outcome))
    }

    /// A key whose row retention deleted, within the idempotency window.
    async fn classify_retired(&self, tx: &NewTransaction) -> Result<Option<InsertOutcome>> {
        let retired: Option<RetiredTransaction> = self
            .on(self.pool())
            .await?
            .run(|c| sqlx::query_as(FIND_RETIRED).bind(&tx.idempotency_key).fetch_optional(c))
            .await?;
        Ok(retired.map(|retired| {
            if retired.payload_digest == Identity::of(tx).payload_digest && retired.wallet_address == tx.wallet_address
            {
                InsertOutcome::Retired(retired)
            } else {
                InsertOutcome::Conflict(Conflict::IdempotencyKey)
            }
        }))
    }

    pub async fn find_by_reference(&self, reference: &str) -> Result<Option<Transaction>> {
        self.on(self.pool()).await?.run(|c| sqlx::query_as(FIND_BY_REFERENCE).bind(reference).fetch_optional(c)).await
    }

    pub async fn find_by_id(&self, id: i64) -> Result<Option<Transaction>> {
        self.on(self.pool()).await?.run(|c| sqlx::query_as(FIND_BY_ID).bind(id).fetch_optional(c)).await
    }

    /// Keyset pagination by id: rows after `after_id`, oldest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Transaction>> {
        self.on(self.pool())
            .await?
            .run(|c| {
                sqlx::query_as(LIST)
                    .bind(&filter.status)
                    .bind(&filter.wallet_address)
                    .bind(&filter.payer_id)
                    .bind(&filter.payee_id)
                    .bind(filter.unsent)
                    .bind(filter.failed)
                    .bind(filter.not_sent)
                    .bind(filter.after_id.unwrap_or(0))
                    .bind(filter.limit)
                    .fetch_all(c)
            })
            .await
    }

    /// Totals without the per-status breakdown (`/health/transactions`).
    pub async fn counts(&self) -> Result<Stats> {
        let row = self.on(self.pool()).await?.run(|c| sqlx::query(STATS).fetch_one(c)).await?;
        Ok(Stats {
            total: row.try_get("total")?,
            sent: row.try_get("sent")?,
            unsent: row.try_get("unsent")?,
            failed: row.try_get("failed")?,
            by_status: BTreeMap::new(),
        })
    }

    pub async fn stats(&self) -> Result<Stats> {
        let mut stats = self.counts().await?;
        let by_status: Vec<(String, i64)> =
            self.on(self.pool()).await?.run(|c| sqlx::query_as(COUNT_BY_STATUS).fetch_all(c)).await?;
        stats.by_status = by_status.into_iter().collect();
        Ok(stats)
    }
}

/// A row [`INSERT_MANY`] returned, as the outcome of its request.
fn created(row: &sqlx::postgres::PgRow) -> Result<InsertOutcome> {
    let transaction = Transaction::from_row(row)?;
    let held_back = row.try_get::<Option<bool>, _>("held_back")?.unwrap_or(false);
    let token: Option<i64> = row.try_get("claim_token_out")?;
    let claim = ClaimRef { id: transaction.id, token };
    Ok(InsertOutcome::Created { transaction, held_back, claim })
}
