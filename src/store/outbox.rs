//! The relay's side of the table: claiming due rows, recording what the queue
//! said, releasing what was not sent, and the numbers the loop reports.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{FromRow, Row};

use super::{Result, Store, StoreError, columns, first_of_its_wallet, unsent};
use crate::transaction::Transaction;

/// A row claimed for sending: what a message is built from.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct ClaimedRow {
    pub id: i64,
    pub reference: String,
    pub idempotency_key: String,
    pub wallet_address: String,
    pub source: String,
    pub attempts: i32,
    pub payload: String,
}

#[derive(Debug, Clone, Copy)]
pub enum ClaimMode<'a> {
    /// Rows whose backoff has passed and that nobody holds: the sweep.
    Due,
    /// Every unsent row not held by a process, ignoring backoff, except those
    /// in `skip` (already tried in this run): `retry-all`.
    Force { skip: &'a [i64] },
}

#[derive(Debug)]
pub struct Claim {
    pub rows: Vec<ClaimedRow>,
    /// Rows are held until this long after the claim.
    pub lease: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedSend {
    pub id: i64,
    pub error: String,
    /// Backoff before the next attempt.
    pub retry_in: Duration,
    /// Dead-letter now, whatever the attempt count.
    pub permanent: bool,
}

/// The backlog, as every replica sees it in the database.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Gauges {
    pub unsent: i64,
    pub failed: i64,
    pub oldest_unsent_age_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RetryOneError {
    #[error("no transaction with id {0}")]
    NotFound(i64),
    #[error("transaction {id} was already sent (message id {message_id})")]
    AlreadySent { id: i64, message_id: String },
    #[error("transaction {id} is being sent by a running relay until {until}; try again after that")]
    Held { id: i64, until: DateTime<Utc> },
    #[error("transaction {id} must wait for the older unsent transaction {older} of the same wallet (FIFO order)")]
    WaitsForOlder { id: i64, older: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

macro_rules! claim_sql {
    ($filter:expr, $order:literal) => {
        concat!(
            // The ids as an array: the plan stays an index lookup whatever
            // the planner guesses for LIMIT (a join here turns generic plans
            // into a sequential scan).
            "UPDATE transactions SET claimed_until = now() + $2 * interval '1 millisecond' \
             WHERE id = ANY (ARRAY(SELECT t.id FROM transactions t WHERE ",
            unsent!("t"),
            " AND ",
            $filter,
            " ORDER BY ",
            $order,
            " LIMIT $1 FOR UPDATE SKIP LOCKED)) \
             RETURNING id, reference, idempotency_key, wallet_address, source, attempts, payload::text AS payload"
        )
    };
}

/// Due: the backoff has run out and no process holds the row. A claim only
/// sets `claimed_until`, which no index covers, so claiming is a HOT update
/// that touches none of the table's indexes.
macro_rules! due {
    () => {
        "t.next_attempt_at <= now() AND (t.claimed_until IS NULL OR t.claimed_until <= now())"
    };
}

/// Not held by a running process, and not already tried in this run.
macro_rules! not_held_nor_skipped {
    () => {
        "(t.claimed_until IS NULL OR t.claimed_until <= now()) AND NOT (t.id = ANY($3))"
    };
}

const CLAIM_DUE: &str = claim_sql!(due!(), "t.next_attempt_at, t.id");
const CLAIM_DUE_FIFO: &str = claim_sql!(concat!(due!(), " AND ", first_of_its_wallet!("t")), "t.next_attempt_at, t.id");
const CLAIM_FORCE: &str = claim_sql!(not_held_nor_skipped!(), "t.id");
const CLAIM_FORCE_FIFO: &str = claim_sql!(concat!(not_held_nor_skipped!(), " AND ", first_of_its_wallet!("t")), "t.id");

const RECORD_SENT: &str = concat!(
    "UPDATE transactions SET message_id = s.sent_message_id, queue_sent_at = now(), \
     attempts = transactions.attempts + 1, claimed_until = NULL, failed_at = NULL \
     FROM unnest($1::bigint[], $2::text[]) AS s(sent_id, sent_message_id) \
     WHERE transactions.id = s.sent_id AND transactions.message_id IS NULL RETURNING ",
    columns!()
);

const RECORD_FAILURES: &str = concat!(
    "UPDATE transactions SET attempts = transactions.attempts + 1, last_error = f.failure, \
     next_attempt_at = now() + f.delay_ms * interval '1 millisecond', claimed_until = NULL, \
     failed_at = CASE WHEN f.permanent OR ($5 > 0 AND transactions.attempts + 1 >= $5) THEN now() END \
     FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bool[]) AS f(failed_id, failure, delay_ms, permanent) \
     WHERE transactions.id = f.failed_id AND transactions.message_id IS NULL RETURNING ",
    columns!()
);

const GAUGES: &str = concat!(
    "SELECT count(*) AS unsent, \
     coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age, \
     (SELECT count(*) FROM transactions WHERE failed_at IS NOT NULL) AS failed \
     FROM transactions WHERE ",
    unsent!("transactions")
);

macro_rules! next_due_sql {
    ($filter:expr) => {
        concat!(
            "SELECT greatest(0, extract(epoch FROM \
             min(greatest(t.next_attempt_at, coalesce(t.claimed_until, t.next_attempt_at))) - now()) * 1000)::bigint \
             AS due_in_ms \
             FROM transactions t WHERE ",
            unsent!("t"),
            $filter
        )
    };
}

const NEXT_DUE: &str = next_due_sql!("");
const NEXT_DUE_FIFO: &str = next_due_sql!(concat!(" AND ", first_of_its_wallet!("t")));

impl Store {
    /// Claims up to `limit` rows in one short transaction, skipping rows other
    /// processes hold, and holds them for `lease`.
    pub async fn claim(&self, mode: ClaimMode<'_>, limit: u32, lease: Duration, fifo: bool) -> Result<Claim> {
        let lease_ms = millis(lease);
        let query = match (mode, fifo) {
            (ClaimMode::Due, false) => sqlx::query_as(CLAIM_DUE),
            (ClaimMode::Due, true) => sqlx::query_as(CLAIM_DUE_FIFO),
            (ClaimMode::Force { .. }, false) => sqlx::query_as(CLAIM_FORCE),
            (ClaimMode::Force { .. }, true) => sqlx::query_as(CLAIM_FORCE_FIFO),
        };
        let mut query = query.bind(i64::from(limit)).bind(lease_ms);
        if let ClaimMode::Force { skip } = mode {
            query = query.bind(skip);
        }
        let mut rows: Vec<ClaimedRow> = query.fetch_all(self.bookkeeping()).await?;
        rows.sort_by_key(|row| row.id);
        Ok(Claim { rows, lease })
    }

    /// Records the message ids of many rows with a single UPDATE and returns
    /// the rows as they now are (rows already sent are left alone and absent).
    pub async fn record_sent(&self, sent: &[(i64, String)]) -> Result<Vec<Transaction>> {
        if sent.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, message_ids): (Vec<i64>, Vec<&str>) = sent.iter().map(|(id, m)| (*id, m.as_str())).unzip();
        Ok(sqlx::query_as(RECORD_SENT).bind(&ids).bind(&message_ids).fetch_all(self.bookkeeping()).await?)
    }

    /// Records failed sends with a single UPDATE and returns the rows as they
    /// now are: `failed_at` is set on those dead-lettered (permanent error, or
    /// `max_attempts` reached).
    pub async fn record_failures(&self, failures: &[FailedSend], max_attempts: u32) -> Result<Vec<Transaction>> {
        if failures.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
        let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
        let delays: Vec<i64> = failures.iter().map(|f| millis(f.retry_in)).collect();
        let permanent: Vec<bool> = failures.iter().map(|f| f.permanent).collect();
        Ok(sqlx::query_as(RECORD_FAILURES)
            .bind(&ids)
            .bind(&errors)
            .bind(&delays)
            .bind(&permanent)
            .bind(i64::from(max_attempts))
            .fetch_all(self.bookkeeping())
            .await?)
    }

    /// Gives claimed rows back without an attempt (shutdown, lease running
    /// out, queue found down before sending): due again at once.
    pub async fn release(&self, ids: &[i64]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let result = sqlx::query(
            "UPDATE transactions SET claimed_until = NULL \
             WHERE id = ANY($1) AND message_id IS NULL",
        )
        .bind(ids)
        .execute(self.bookkeeping())
        .await?;
        Ok(result.rows_affected())
    }

    /// Unsent rows, dead-lettered rows and the age of the oldest unsent row.
    pub async fn gauges(&self) -> Result<Gauges> {
        let row = sqlx::query(GAUGES).fetch_one(self.pool()).await?;
        Ok(Gauges {
            unsent: row.try_get("unsent")?,
            failed: row.try_get("failed")?,
            oldest_unsent_age_seconds: row.try_get("oldest_age")?,
        })
    }

    /// How long until the next row a sweep could claim becomes due; `None`
    /// when nothing is waiting.
    pub async fn next_due_in(&self, fifo: bool) -> Result<Option<Duration>> {
        let sql = if fifo { NEXT_DUE_FIFO } else { NEXT_DUE };
        let millis: Option<i64> = sqlx::query_scalar(sql).fetch_one(self.pool()).await?;
        Ok(millis.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))))
    }

    /// Deletes up to `batch` sent rows that were created and sent more than
    /// `age` ago. Unsent and dead-lettered rows are never touched.
    pub async fn delete_sent_older_than(&self, age: Duration, batch: u32) -> Result<u64> {
        let result = sqlx::query(
            "DELETE FROM transactions WHERE id IN (SELECT id FROM transactions \
             WHERE message_id IS NOT NULL AND failed_at IS NULL \
             AND queue_sent_at < now() - $1 * interval '1 millisecond' \
             AND created_at < now() - $1 * interval '1 millisecond' ORDER BY queue_sent_at LIMIT $2)",
        )
        .bind(millis(age))
        .bind(i64::from(batch))
        .execute(self.bookkeeping())
        .await?;
        Ok(result.rows_affected())
    }

    /// Claims one row for `txrelay retry ID`, reviving it if dead-lettered.
    pub async fn claim_one(
        &self,
        id: i64,
        lease: Duration,
        fifo: bool,
    ) -> std::result::Result<ClaimedRow, RetryOneError> {
        let claimed: Option<ClaimedRow> = sqlx::query_as(concat!(
            "UPDATE transactions SET failed_at = NULL, claimed_until = now() + $2 * interval '1 millisecond' \
             WHERE id = $1 AND message_id IS NULL AND (claimed_until IS NULL OR claimed_until <= now()) \
             AND (NOT $3 OR ",
            first_of_its_wallet!("transactions"),
            ") \
             RETURNING id, reference, idempotency_key, wallet_address, source, attempts, payload::text AS payload",
        ))
        .bind(id)
        .bind(millis(lease))
        .bind(fifo)
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::from)?;
        if let Some(row) = claimed {
            return Ok(row);
        }
        let Some(existing) = self.find_by_id(id).await? else {
            return Err(RetryOneError::NotFound(id));
        };
        if let Some(message_id) = existing.message_id {
            return Err(RetryOneError::AlreadySent { id, message_id });
        }
        let older: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT max(id) FROM transactions o WHERE wallet_address = $1 AND id < $2 AND ",
            unsent!("o")
        ))
        .bind(&existing.wallet_address)
        .bind(id)
        .fetch_one(self.pool())
        .await
        .map_err(StoreError::from)?;
        match older {
            Some(older) if fifo => Err(RetryOneError::WaitsForOlder { id, older }),
            _ => {
                let until: Option<DateTime<Utc>> =
                    sqlx::query_scalar("SELECT claimed_until FROM transactions WHERE id = $1")
                        .bind(id)
                        .fetch_one(self.pool())
                        .await
                        .map_err(StoreError::from)?;
                Err(RetryOneError::Held { id, until: until.unwrap_or_else(Utc::now) })
            }
        }
    }

    /// Revives dead-lettered rows (`retry-all --include-dead`): due at once.
    pub async fn revive_dead_lettered(&self, limit: i64) -> Result<u64> {
        let result = sqlx::query(
            "UPDATE transactions SET failed_at = NULL, next_attempt_at = now() WHERE id IN \
             (SELECT id FROM transactions WHERE failed_at IS NOT NULL AND message_id IS NULL ORDER BY id LIMIT $1)",
        )
        .bind(limit)
        .execute(self.pool())
        .await?;
        Ok(result.rows_affected())
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
