//! PostgreSQL: the outbox table and everything the relay asks of it. All SQL
//! lives here; the words "unsent", "dead-lettered" and "due" are defined once,
//! in the fragments below.

mod migrations;
mod outbox;
mod resend;
pub(crate) mod transactions;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use migrations::MigrationStatus;
pub use outbox::{
    Claim, ClaimMode, ClaimRef, ClaimedRow, DriftScan, DueFloor, FailedSend, Gauges, RetryOneError, SkipError,
};
pub use resend::{ResendAudit, ResendFilter, ResendRow};
pub use transactions::{Conflict, InsertOutcome, Intake, ListFilter, RetiredTransaction, Stats};

use crate::secret::Secret;
use crate::spec::QueueKind;

/// `sent`: the queue accepted it (a sent row is never dead-lettered).
macro_rules! sent {
    ($t:literal) => {
        concat!($t, ".message_id IS NOT NULL")
    };
}

/// `not sent`: unsent or dead-lettered.
macro_rules! not_sent {
    ($t:literal) => {
        concat!($t, ".message_id IS NULL")
    };
}

/// `dead-lettered`: given up on until retried by hand.
macro_rules! dead_lettered {
    ($t:literal) => {
        concat!($t, ".failed_at IS NOT NULL")
    };
}

/// `unsent`: neither sent nor dead-lettered.
macro_rules! unsent {
    ($t:literal) => {
        concat!($t, ".message_id IS NULL AND ", $t, ".failed_at IS NULL")
    };
}

/// `not held`: no process holds the row (never claimed, or its lease ran out).
macro_rules! not_held {
    ($t:literal) => {
        concat!("(", $t, ".claimed_until IS NULL OR ", $t, ".claimed_until <= now())")
    };
}

/// `holds its wallet`: dead-lettered and not resolved. On a FIFO queue such
/// a row holds its wallet's later rows until it is retried (unsent again)
/// or skipped on purpose (`txrelay skip`), so a withdrawal never lands
/// before the deposit that failed ahead of it. Indexed by
/// `transactions_dead_wallet_idx`.
macro_rules! holds_its_wallet {
    ($t:literal) => {
        concat!($t, ".failed_at IS NOT NULL AND ", $t, ".skipped_at IS NULL")
    };
}

/// `$o` is an older listed row of `$t`'s wallet. Written so that only
/// `unsent_transactions_wallet_idx` can serve it: the wallet by equality,
/// and the id inside a row comparison that starts with the wallet, which
/// the primary key cannot use. As `o.id < t.id` it could: with the listing
/// analyzed as almost empty under a held snapshot, the planner then prices
/// a walk of every id below `t.id` (dead entries included) as one entry.
macro_rules! listed_before {
    ($o:literal, $t:literal) => {
        concat!(
            $o,
            ".wallet_address = ",
            $t,
            ".wallet_address AND (",
            $o,
            ".wallet_address, ",
            $o,
            ".id) < (",
            $t,
            ".wallet_address, ",
            $t,
            ".id)"
        )
    };
}

/// On a FIFO queue a row waits while an older row of its wallet (its
/// MessageGroupId) is unsent, whether pending, claimed or backing off, or
/// is dead-lettered and unresolved. `unsent_transactions` holds exactly
/// the unsent rows. `OFFSET 0` keeps the listing's check a lookup per row
/// (a subplan): as an anti-join, the planner may merge it with a walk of
/// the whole wallet index, which it prices as nothing when the listing is
/// analyzed as almost empty.
macro_rules! first_of_its_wallet {
    ($t:literal) => {
        concat!(
            "NOT EXISTS (SELECT 1 FROM unsent_transactions o WHERE ",
            listed_before!("o", $t),
            " OFFSET 0) AND NOT EXISTS (SELECT 1 FROM transactions d WHERE d.wallet_address = ",
            $t,
            ".wallet_address AND d.id < ",
            $t,
            ".id AND ",
            holds_its_wallet!("d"),
            ")"
        )
    };
}

/// When a sweep may claim an unsent row: its backoff, or the end of the
/// lease of the process holding it, whichever is later.
macro_rules! due_at {
    ($t:literal) => {
        concat!("greatest(", $t, ".next_attempt_at, coalesce(", $t, ".claimed_until, ", $t, ".next_attempt_at))")
    };
}

/// What every statement that writes `transactions` returns besides its own
/// columns, for [`follow!`] to keep `unsent_transactions` in step.
macro_rules! follow_columns {
    () => {
        concat!(
            "transactions.wallet_address AS follow_wallet, transactions.created_at AS follow_created_at, \
             transactions.claimed_until AS follow_claimed_until, ",
            unsent!("transactions"),
            " AS follow_unsent, ",
            due_at!("transactions"),
            " AS follow_due_at"
        )
    };
}

/// Statements that write `transactions` are written as
/// `WITH changed AS (… RETURNING …, follow_columns!()), follow!() SELECT …`:
/// in the same statement, a row still unsent is put (or kept) in
/// `unsent_transactions` as it now is, and a row sent or dead-lettered is
/// taken out. The relay's connections skip the triggers that do the same for
/// every other writer (`txrelay.relay_writes`), so this is the only place the
/// relay does it, except in the claims (`claim_sql!`), which update the
/// listing rows they locked with a plain UPDATE. Each writer locks a row of
/// `transactions` before its row of `unsent_transactions`, so they never
/// wait on each other in a cycle.
///
/// The listings go by `id = ANY (ARRAY(…))`, never by a join with
/// `changed`: every read of the listing names its rows by key, so no plan
/// can walk it whole, whatever its statistics say (see
/// `migrations/20261205000001_listing_lookups.up.sql`).
macro_rules! follow {
    () => {
        "still_unsent AS (INSERT INTO unsent_transactions (id, wallet_address, created_at, claimed_until, due_at) \
         SELECT id, follow_wallet, follow_created_at, follow_claimed_until, follow_due_at FROM changed \
         WHERE follow_unsent ON CONFLICT (id) DO UPDATE SET claimed_until = EXCLUDED.claimed_until, \
         due_at = EXCLUDED.due_at), \
         no_longer_unsent AS (DELETE FROM unsent_transactions gone \
         WHERE gone.id = ANY (ARRAY(SELECT id FROM changed WHERE NOT follow_unsent)))"
    };
}

/// The columns of [`crate::transaction::Transaction`].
macro_rules! columns {
    () => {
        concat!(
            "id, reference, external_reference, idempotency_key, transaction_type, status, incoming_currency, \
             outgoing_currency, value, fee, payer_id, payee_id, first_name, last_name, wallet_address, source, \
             instruction_type, ip_address, message_id, queue_sent_at, created_at, updated_at, attempts, last_error, \
             CASE WHEN ",
            unsent!("transactions"),
            " THEN next_attempt_at END AS next_attempt_at, failed_at"
        )
    };
}

/// `(name, text)` for each named statement, the name being the const's own
/// identifier: what [`statements`] lists.
macro_rules! named_statements {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), $name)),*]
    };
}

pub(crate) use {
    columns, dead_lettered, due_at, first_of_its_wallet, follow, follow_columns, holds_its_wallet, listed_before,
    named_statements, not_held, not_sent, sent, unsent,
};

const PING: &str = "SELECT 1";

const TLS_IN_USE: &str = "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)";

const SCHEMA_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)";

const NOTIFY_DUE: &str = "SELECT pg_notify($1, '')";

/// Every statement the store can run, by name, exactly as PostgreSQL
/// receives it: each variant of those chosen at run time (each claim mode,
/// FIFO or standard) is listed on its own. The integration tests prepare
/// every one against a migrated schema (tests/integration/statements.rs),
/// and check that no statement is written inline in `src/store/` and that
/// every named statement is listed here or in [`unprepared_statements`].
pub fn statements() -> Vec<(&'static str, String)> {
    let mut all: Vec<(&'static str, &'static str)> = named_statements![PING, TLS_IN_USE, SCHEMA_EXISTS, NOTIFY_DUE];
    all.extend(outbox::statements());
    all.extend(transactions::statements());
    all.extend(resend::statements());
    all.extend(migrations::statements());
    all.into_iter().map(|(name, sql)| (name, sql.to_owned())).collect()
}

/// The statements the store runs that are not prepared against the
/// migrated schema (session settings, DDL), by name, with their text or,
/// for those built at run time, its shape (see `store/migrations.rs`).
pub fn unprepared_statements() -> Vec<(&'static str, &'static str)> {
    migrations::unprepared_statements()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or did not answer in time: worth
    /// retrying, and a 503 at the HTTP edge.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Query(String),
    #[error("database URL is not a valid PostgreSQL URL")]
    InvalidUrl,
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("stored data is inconsistent: {0}")]
    Inconsistent(String),
    /// A write went out and its answer never came (the connection was lost
    /// after it was sent, or the bound here ran out): it may have
    /// committed. Worth retrying, like [`Self::Unavailable`], but never
    /// reported as "nothing was stored".
    #[error("the database did not confirm the write, which may have committed: {0}")]
    OutcomeUnknown(String),
}

impl StoreError {
    /// Worth retrying: the database could not be reached, or did not answer.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::OutcomeUnknown(_))
    }

    /// The same error once more, for each request of a group that shared it.
    pub fn again(&self) -> Self {
        match self {
            Self::Unavailable(text) => Self::Unavailable(text.clone()),
            Self::Query(text) => Self::Query(text.clone()),
            Self::InvalidUrl => Self::InvalidUrl,
            Self::Migration(text) => Self::Migration(text.clone()),
            Self::Inconsistent(text) => Self::Inconsistent(text.clone()),
            Self::OutcomeUnknown(text) => Self::OutcomeUnknown(text.clone()),
        }
    }

    /// A write that may have committed (see [`Self::OutcomeUnknown`]).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Self::OutcomeUnknown(_))
    }
}

/// Whether an error on a connection that had already sent a statement
/// leaves its outcome unknown: the connection broke, or the server ended
/// the session, before the answer arrived. An error the server answered
/// with (a constraint, its own statement timeout, which rolls back) is a
/// known failure.
fn answer_lost(error: &sqlx::Error) -> bool {
    use sqlx::Error as E;
    match error {
        E::Io(_) | E::Tls(_) | E::Protocol(_) | E::WorkerCrashed => true,
        E::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08: connection exception; 57P01/57P02: the session was ended
            // by an administrator or a crash, at a point the client cannot see.
            code.starts_with("08") || code == "57P01" || code == "57P02"
        }
        _ => false,
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &error {
            // A protocol error is what a connection cut mid-handshake looks
            // like (an SSLRequest answered by a closed socket): the database
            // is out of reach, which is worth retrying, not a bug in the query.
            E::Io(_) | E::Tls(_) | E::Protocol(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
                Self::Unavailable(error.to_string())
            }
            E::Database(db) => {
                let code = db.code().unwrap_or_default();
                // 08: connection exception; 57P0x: server shutting down or
                // starting; 57014: statement timeout; 53300: too many connections.
                if code.starts_with("08") || code.starts_with("57P0") || code == "57014" || code == "53300" {
                    Self::Unavailable(error.to_string())
                } else {
                    Self::Query(error.to_string())
                }
            }
            _ => Self::Query(error.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Database connections per relay, unless told otherwise (`--db-pool-size`).
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// One pooled connection, for statements bounded on this side.
///
/// `statement_timeout` is enforced by the server, which cannot enforce it
/// when the network between us is gone: a black-holed connection (a
/// stalled proxy, a dropped route after a failover) leaves a query waiting
/// for an answer that never comes, for as long as TCP takes to give up,
/// which is many minutes. So every statement is also bounded here, and a
/// connection whose statement ran out of time is closed rather than
/// returned to the pool: the pool would otherwise test it with a ping that
/// has no timeout, holding a slot for those same minutes.
pub(crate) struct Bounded {
    connection: sqlx::pool::PoolConnection<sqlx::Postgres>,
    limit: Duration,
    abandoned: bool,
}

impl Bounded {
    pub(crate) async fn run<'s, T, F>(
        &'s mut self,
        statement: impl FnOnce(&'s mut sqlx::PgConnection) -> F,
    ) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, sqlx::Error>> + 's,
    {
        match self.bounded(statement).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(limit) => Err(StoreError::Unavailable(format!("the database did not answer within {limit:?}"))),
        }
    }

    /// As [`Self::run`], for a statement that commits a write: a broken
    /// connection or the bound running out after it was sent is
    /// [`StoreError::OutcomeUnknown`], never "nothing was stored".
    pub(crate) async fn run_write<'s, T, F>(
        &'s mut self,
        statement: impl FnOnce(&'s mut sqlx::PgConnection) -> F,
    ) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, sqlx::Error>> + 's,
    {
        match self.bounded(statement).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) if answer_lost(&error) => Err(StoreError::OutcomeUnknown(error.to_string())),
            Ok(Err(error)) => Err(StoreError::from(error)),
            Err(limit) => Err(StoreError::OutcomeUnknown(format!("no answer within {limit:?}"))),
        }
    }

    /// The statement's own result, or the bound that ran out.
    async fn bounded<'s, T, F>(
        &'s mut self,
        statement: impl FnOnce(&'s mut sqlx::PgConnection) -> F,
    ) -> std::result::Result<std::result::Result<T, sqlx::Error>, Duration>
    where
        F: std::future::Future<Output = std::result::Result<T, sqlx::Error>> + 's,
    {
        let limit = self.limit;
        // Abandoned until the statement completes: whether this timer fires
        // or the caller drops the call (its own timeout, an HTTP request
        // cut short), a connection left mid-statement is closed.
        self.abandoned = true;
        let result = tokio::time::timeout(limit, statement(&mut self.connection)).await.map_err(|_| limit)?;
        self.abandoned = false;
        Ok(result)
    }
}

impl Drop for Bounded {
    fn drop(&mut self) {
        if self.abandoned {
            self.connection.close_on_drop();
        }
    }
}

/// A channel name is an identifier: PostgreSQL keeps at most 63 bytes of
/// it (LISTEN truncates a longer name, `pg_notify` refuses it), and a
/// schema name alone may take all 63. A name that would not fit is made
/// from a digest of the schema instead, the same in every replica.
fn due_channel(schema: &str) -> String {
    const PREFIX: &str = "txrelay_due_";
    const MAX: usize = 63;
    if PREFIX.len() + schema.len() <= MAX {
        return format!("{PREFIX}{schema}");
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(schema.as_bytes());
    let hex = crate::hex::lower(&digest[..20]);
    format!("{PREFIX}{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_channels_fit_postgresql_identifiers_and_differ_per_schema() {
        assert_eq!(due_channel("txrelay"), "txrelay_due_txrelay", "short names stay readable");
        let longest = format!("s{}", "x".repeat(62));
        assert!(crate::spec::is_schema_name(&longest), "a valid schema name of 63 bytes");
        let mut seen = std::collections::HashSet::new();
        for schema in
            [longest.clone(), format!("s{}", "y".repeat(62)), format!("s{}", "x".repeat(51)), "txrelay".into()]
        {
            let channel = due_channel(&schema);
            assert!(channel.len() <= 63, "{schema}: {channel} is {} bytes", channel.len());
            assert_eq!(channel, due_channel(&schema), "every replica computes the same name");
            assert!(seen.insert(channel), "{schema}: one channel per schema");
        }
    }
}

/// How to reach the database. The URL stays a [`Secret`]: sqlx's own option
/// type prints the password in its `Debug` output, so it is built only here.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub url: Secret,
    pub schema: String,
    pub max_connections: u32,
    /// Waiting for a pooled connection, opening a new one included.
    pub acquire_timeout: Duration,
    /// Enforced by the server, which cannot enforce it when the network
    /// between us is gone: every statement is also bounded on this side, a
    /// little later (see [`Bounded`]).
    pub statement_timeout: Duration,
    /// The statement timeout of migrations, which may rewrite or index a
    /// large table (see [`Store::migrate`]).
    pub migration_timeout: Duration,
}

impl StoreOptions {
    pub fn new(url: Secret, schema: impl Into<String>) -> Self {
        Self {
            url,
            schema: schema.into(),
            max_connections: DEFAULT_POOL_SIZE,
            acquire_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(10),
            migration_timeout: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Connections with `synchronous_commit = off`, for the relay's
    /// bookkeeping (claims, results, releases). The commit that makes a
    /// transaction durable is its INSERT, on `pool`; losing the last few
    /// bookkeeping commits to a database crash only means those rows are
    /// sent again, which the at-least-once guarantee already covers. It
    /// saves a WAL flush per claim and per recorded batch.
    bookkeeping: PgPool,
    /// One connection for health checks, so a pool busy with requests is
    /// not mistaken for an unreachable database.
    health: PgPool,
    schema: String,
    /// The client-side ceiling on one call (acquire included).
    call_timeout: Duration,
    migration_timeout: Duration,
    /// Set once, by the relay that owns this store: a FIFO queue's claims
    /// and intake keep each wallet's order.
    queue_kind: QueueKind,
}

/// How much longer than `statement_timeout` a call may take on this side:
/// the server's own timeout should fire first whenever it can.
const CLIENT_MARGIN: Duration = Duration::from_secs(2);

/// Connections for bookkeeping, whatever the main pool's size: the result
/// writer, the claims and the failure records.
const BOOKKEEPING_CONNECTIONS: u32 = 4;

impl Store {
    /// Builds the pool without connecting: a relay starts even while its
    /// database is down, reports not-ready and recovers by itself.
    pub fn connect_lazy(options: &StoreOptions) -> Result<Self> {
        if !crate::spec::is_schema_name(&options.schema) {
            return Err(StoreError::Query(format!("invalid schema name {:?}", options.schema)));
        }
        let statement_timeout = format!("{}ms", options.statement_timeout.as_millis());
        let connect = PgConnectOptions::from_str(options.url.expose())
            .map_err(|_| StoreError::InvalidUrl)?
            .application_name("txrelay")
            // Generic plans: each statement is planned once per connection.
            // Every query here is written to plan well without its
            // parameter values (see the claim), and re-planning the
            // 20-parameter INSERT on each call cost more than running it.
            .options([
                ("search_path", options.schema.as_str()),
                ("statement_timeout", statement_timeout.as_str()),
                ("plan_cache_mode", "force_generic_plan"),
                // No statement here runs long enough to repay compiling it,
                // and `enable_seqscan = off` below prices a plain scan above
                // the JIT thresholds: the gauges then compiled for ~85 ms on
                // every run.
                ("jit", "off"),
                // These connections keep `unsent_transactions` in step
                // themselves (see `follow!`); the triggers that do it for
                // every other writer skip them.
                ("txrelay.relay_writes", "on"),
            ]);
        let pool_options = || {
            PgPoolOptions::new()
                .min_connections(1)
                .acquire_timeout(options.acquire_timeout)
                .idle_timeout(Duration::from_secs(600))
                .test_before_acquire(false)
        };
        let pool = pool_options().max_connections(options.max_connections).connect_lazy_with(connect.clone());
        // Every statement on the bookkeeping connections reaches its rows
        // by key (ids, the due and FIFO indexes). A generic plan made while
        // the table was still small (a new relay, a fresh schema) would
        // otherwise scan the whole table on every recorded batch for as long
        // as the connection lives; the bench showed exactly that.
        let bookkeeping = pool_options()
            .max_connections(BOOKKEEPING_CONNECTIONS)
            .connect_lazy_with(connect.clone().options([("synchronous_commit", "off"), ("enable_seqscan", "off")]));
        let health = PgPoolOptions::new()
            .max_connections(1)
            // Health answers fast or not at all: waiting long helps nobody.
            .acquire_timeout(options.acquire_timeout.min(Duration::from_secs(1)))
            .idle_timeout(Duration::from_secs(600))
            .connect_lazy_with(connect);
        let call_timeout = options.statement_timeout + options.acquire_timeout.min(CLIENT_MARGIN);
        Ok(Self {
            pool,
            bookkeeping,
            health,
            schema: options.schema.clone(),
            call_timeout,
            migration_timeout: options.migration_timeout,
            queue_kind: QueueKind::Standard,
        })
    }

    /// Connects and checks the database answers.
    pub async fn connect(options: &StoreOptions) -> Result<Self> {
        let store = Self::connect_lazy(options)?;
        store.ping().await?;
        Ok(store)
    }

    /// This store, for a relay whose queue is of `kind`.
    pub fn for_queue(mut self, kind: QueueKind) -> Self {
        self.queue_kind = kind;
        self
    }

    pub fn queue_kind(&self) -> QueueKind {
        self.queue_kind
    }

    fn fifo(&self) -> bool {
        self.queue_kind.is_fifo()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool for claims and results (asynchronous commit).
    pub(crate) fn bookkeeping(&self) -> &PgPool {
        &self.bookkeeping
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The LISTEN/NOTIFY channel on which replicas learn that rows became due.
    pub fn due_channel(&self) -> String {
        due_channel(&self.schema)
    }

    pub async fn ping(&self) -> Result<()> {
        self.ping_within(self.call_timeout).await
    }

    /// `SELECT 1` on the health connection, answered within `limit` or
    /// counted as unreachable.
    pub async fn ping_within(&self, limit: Duration) -> Result<()> {
        let mut connection = self.on(&self.health).await?;
        connection.limit = limit;
        connection.run(|c| sqlx::query(PING).execute(c)).await.map(|_| ())
    }

    /// Whether this connection to the database is encrypted (`doctor`).
    pub async fn tls_in_use(&self) -> Result<bool> {
        self.on(self.pool()).await?.run(|c| sqlx::query_scalar(TLS_IN_USE).fetch_one(c)).await
    }

    /// Whether the relay's schema exists (`doctor`).
    pub async fn schema_exists(&self) -> Result<bool> {
        let schema = self.schema.clone();
        self.on(self.pool()).await?.run(|c| sqlx::query_scalar(SCHEMA_EXISTS).bind(schema).fetch_one(c)).await
    }

    /// Tells every relay listening on this schema to look for due rows.
    pub async fn notify_due(&self) -> Result<()> {
        let channel = self.due_channel();
        self.on(self.pool()).await?.run(|c| sqlx::query(NOTIFY_DUE).bind(channel).execute(c)).await?;
        Ok(())
    }

    /// A connection of `pool` for one statement, bounded on this side: see
    /// [`Bounded`]. Waiting for it is bounded by the acquire timeout.
    pub(crate) async fn on(&self, pool: &PgPool) -> Result<Bounded> {
        Ok(Bounded { connection: pool.acquire().await?, limit: self.call_timeout, abandoned: false })
    }

    pub async fn close(&self) {
        self.pool.close().await;
        self.bookkeeping.close().await;
        self.health.close().await;
    }
}
