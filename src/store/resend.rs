//! Resends by hand: choosing the rows a filter names, and the audit record
//! each resend leaves.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::FromRow;

use super::{Result, Store, dead_lettered, holds_its_wallet, named_statements, not_sent};

/// Which rows a resend takes. Every field narrows the choice; none set is
/// every unsent row (and with `include_dead`, the dead-lettered ones too).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResendFilter {
    /// Only this wallet's rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wallet: Option<String>,
    /// Only rows created at or after this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Only rows created before this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// Only rows whose last error contains this text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Dead-lettered rows too (revived first).
    pub include_dead: bool,
    /// Only dead-lettered rows (revived first).
    pub dead_only: bool,
}

/// A row a resend would take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct ResendRow {
    pub id: i64,
    pub reference: String,
    pub wallet_address: String,
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
    pub dead_lettered: bool,
    pub last_error: Option<String>,
}

/// Who resends, through what, and how, for the audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResendAudit {
    /// The OS user, or an admin token's fingerprint: never a token.
    pub actor: String,
    /// `cli` or `http`.
    pub via: &'static str,
    /// `retry` or `retry-all`.
    pub command: &'static str,
}

/// The rows a resend takes: [`SELECT`]'s text, for [`COUNT`] to count it.
macro_rules! select {
    () => {
        concat!(
            // Unsent rows come from their narrow table and dead-lettered ones from
            // their partial index, so the choice never reads the sent history.
            "SELECT t.id, t.reference, t.wallet_address, t.created_at, t.attempts, ",
            dead_lettered!("t"),
            " AS dead_lettered, t.last_error FROM transactions t \
             WHERE t.id IN (SELECT id FROM unsent_transactions WHERE NOT $5 AND id > $8 AND id <= $9 \
             UNION ALL SELECT id FROM transactions d WHERE ($5 OR $6) AND ",
            // Skipped dead letters were given up on by decision (`txrelay skip`):
            // a bulk resend never revives one behind its wallet's later rows.
            holds_its_wallet!("d"),
            " AND ",
            not_sent!("d"),
            ") AND ($1::text IS NULL OR t.wallet_address = $1) \
             AND ($2::timestamptz IS NULL OR t.created_at >= $2) \
             AND ($3::timestamptz IS NULL OR t.created_at < $3) \
             AND ($4::text IS NULL OR strpos(coalesce(t.last_error, ''), $4) > 0) \
             AND t.id > $8 AND t.id <= $9 ORDER BY t.id LIMIT $7"
        )
    };
}

const SELECT: &str = select!();

/// How many rows [`SELECT`] takes (its parameters, its page included).
const COUNT: &str = concat!("SELECT count(*) FROM (", select!(), ") AS chosen");

const LAST_TRANSACTION_ID: &str = "SELECT coalesce(max(id), 0)::bigint FROM transactions";

const EXTEND_RESEND: &str = "UPDATE resend_audit SET transaction_ids = transaction_ids || $2 WHERE id = $1";

const BEGIN_RESEND: &str = "INSERT INTO resend_audit (actor, via, command, filter, transaction_ids) \
     VALUES ($1, $2, $3, $4, $5) RETURNING id";

const RECENT_RESEND_AUDITS: &str = "SELECT json_build_object('id', id, 'at', at, 'actor', actor, 'via', via, \
     'command', command, 'filter', filter, 'rows', cardinality(transaction_ids), 'finished_at', finished_at, \
     'succeeded', succeeded, 'failed', failed, 'outcome', outcome) FROM resend_audit ORDER BY id DESC LIMIT $1";

const FINISH_RESEND: &str = "UPDATE resend_audit SET finished_at = now(), succeeded = $2, failed = $3, outcome = $4 \
     WHERE id = $1";

/// Every statement of this file, for [`super::statements`].
pub(super) fn statements() -> Vec<(&'static str, &'static str)> {
    named_statements![
        SELECT,
        COUNT,
        LAST_TRANSACTION_ID,
        EXTEND_RESEND,
        BEGIN_RESEND,
        RECENT_RESEND_AUDITS,
        FINISH_RESEND
    ]
}

/// [`SELECT`]'s parameters, in its order: the filter, then the page.
fn choice<'q, O>(
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    filter: &'q ResendFilter,
    limit: i64,
    after: i64,
    upto: i64,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(&filter.wallet)
        .bind(filter.since)
        .bind(filter.until)
        .bind(&filter.error)
        .bind(filter.dead_only)
        .bind(filter.include_dead)
        .bind(limit)
        .bind(after)
        .bind(upto)
}

impl Store {
    /// The rows `filter` names with an id after `after` and up to `upto`,
    /// oldest first, at most `limit`: a resend reads its candidates a page
    /// at a time, among the rows that existed when it began.
    pub async fn resend_candidates(
        &self,
        filter: &ResendFilter,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<ResendRow>> {
        self.on(self.pool())
            .await?
            .run(|c| choice(sqlx::query_as(SELECT), filter, limit, after, upto).fetch_all(c))
            .await
    }

    /// How many rows `filter` names, at most `limit` (a progress bar's length).
    pub async fn count_resend_candidates(&self, filter: &ResendFilter, limit: i64) -> Result<i64> {
        self.on(self.pool())
            .await?
            .run(|c| choice(sqlx::query_as::<_, (i64,)>(COUNT), filter, limit, 0, i64::MAX).fetch_one(c))
            .await
            .map(|(count,)| count)
    }

    /// The highest transaction id so far: where a resend's choice ends, so
    /// that rows posted while it runs (sent inline) are not chased.
    pub async fn last_transaction_id(&self) -> Result<i64> {
        self.on(self.pool()).await?.run(|c| sqlx::query_scalar(LAST_TRANSACTION_ID).fetch_one(c)).await
    }

    /// Adds the ids of the next page of a resend to its audit record, before
    /// any of them is revived or sent.
    pub async fn extend_resend(&self, audit_id: i64, ids: &[i64]) -> Result<()> {
        self.on(self.pool()).await?.run(|c| sqlx::query(EXTEND_RESEND).bind(audit_id).bind(ids).execute(c)).await?;
        Ok(())
    }

    /// Writes the audit record of a resend about to start; returns its id.
    pub async fn begin_resend(&self, audit: &ResendAudit, filter: &serde_json::Value, ids: &[i64]) -> Result<i64> {
        self.on(self.pool())
            .await?
            .run(|c| {
                sqlx::query_scalar(BEGIN_RESEND)
                    .bind(&audit.actor)
                    .bind(audit.via)
                    .bind(audit.command)
                    .bind(filter)
                    .bind(ids)
                    .fetch_one(c)
            })
            .await
    }

    /// The last `limit` audit records, newest first, with their row counts
    /// (not the ids): for an incident report.
    pub async fn recent_resend_audits(&self, limit: i64) -> Result<Vec<serde_json::Value>> {
        self.on(self.pool()).await?.run(|c| sqlx::query_scalar(RECENT_RESEND_AUDITS).bind(limit).fetch_all(c)).await
    }

    /// Adds the outcome to a resend's audit record.
    pub async fn finish_resend(&self, audit_id: i64, succeeded: u64, failed: u64, outcome: &str) -> Result<()> {
        self.on(self.pool())
            .await?
            .run(|c| {
                sqlx::query(FINISH_RESEND)
                    .bind(audit_id)
                    .bind(i32::try_from(succeeded).unwrap_or(i32::MAX))
                    .bind(i32::try_from(failed).unwrap_or(i32::MAX))
                    .bind(outcome)
                    .execute(c)
            })
            .await?;
        Ok(())
    }
}
