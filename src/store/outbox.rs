//! The relay's side of the table: claiming due rows, recording what the queue
//! said, releasing what was not sent, and the numbers the loop reports.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{FromRow, Row};

use super::{
    Result, Store, StoreError, columns, dead_lettered, due_at, first_of_its_wallet, follow, follow_columns,
    holds_its_wallet, listed_before, named_statements, not_held, not_sent, sent, unsent,
};
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
    /// The W3C trace context of the request that created the row.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl ClaimedRow {
    /// A row just created by `/new`, for its inline send: the same fields a
    /// claim reads back, so both paths build the same message.
    pub fn created(tx: &Transaction, payload: String, trace: Option<crate::transaction::TraceContext>) -> Self {
        let (traceparent, tracestate) = trace.map(|t| (Some(t.traceparent), t.tracestate)).unwrap_or_default();
        Self {
            id: tx.id,
            reference: tx.reference.clone(),
            idempotency_key: tx.idempotency_key.clone(),
            wallet_address: tx.wallet_address.clone(),
            source: tx.source.clone(),
            attempts: tx.attempts,
            payload,
            traceparent,
            tracestate,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum ClaimMode<'a> {
    /// Rows whose backoff has passed and that nobody holds: the sweep.
    Due,
    /// As `Due`, for one of the claims that drain a backlog together: on a
    /// standard queue each starts its walk of the due index at the highest
    /// first row any of them locked (see [`DueFloor`]).
    Drain(&'a DueFloor),
    /// The unsent rows of `only` not held by a process, ignoring backoff,
    /// except those in `skip` (already tried in this run): `retry-all`.
    Force { skip: &'a [i64], only: &'a [i64] },
    /// The dead-lettered rows of `only`, revived and claimed in the same
    /// statement, so no running relay can take them unpaced and unaudited,
    /// except those in `skip` (tried in this run, and dead-lettered again):
    /// `retry-all --include-dead / --dead-only`.
    Revive { skip: &'a [i64], only: &'a [i64] },
}

/// Where the claims of one drain start their walk of
/// `unsent_transactions_due_idx`: the highest first row (by `due_at`, then
/// id) any of them locked so far.
///
/// Every claimed row leaves a dead entry at the head of that index (its
/// listing moves to the end of its lease, then is deleted once sent).
/// VACUUM cannot remove entries an open transaction may still see, so
/// while one is held (an analytics query, an `idle in transaction`
/// session) a claim that starts at the beginning walks every row drained
/// since: with 30,000 dead entries, listing a claim's 100 candidates took
/// 4.4 ms from the head and 0.1 ms from the floor
/// (docs/benchmarks-history.md).
///
/// A row can sit below the floor while due: given back by this or another
/// process (a release, a refused call), or committed late with an older
/// `due_at`. Such a row waits for the next claim that starts at the
/// beginning: a floor lives for one drain turn (the relay loop's
/// `DRAIN_TURN`, 1 s, plus the sweeps then in flight), and every sweep
/// outside a drain is such a claim.
/// On a FIFO queue the floor is never used: a row waiting behind an older
/// row of its wallet sits below the rows claimed past it, and becomes
/// claimable as soon as that row is sent.
#[derive(Debug, Default)]
pub struct DueFloor(std::sync::Mutex<Option<(DateTime<Utc>, i64)>>);

impl DueFloor {
    fn get(&self) -> Option<(DateTime<Utc>, i64)> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Overlapping claims report in any order: the floor only moves up.
    fn raise(&self, head: (DateTime<Utc>, i64)) {
        let mut floor = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if floor.is_none_or(|current| head > current) {
            *floor = Some(head);
        }
    }
}

#[derive(Debug)]
pub struct Claim {
    pub rows: Vec<ClaimedRow>,
    /// Rows are held until this long after the claim.
    pub lease: Duration,
    /// Written on every row of this claim; see [`ClaimRef`].
    pub token: i64,
}

impl Claim {
    pub fn row_ref(&self, id: i64) -> ClaimRef {
        ClaimRef { id, token: Some(self.token) }
    }
}

/// A row as one claim holds it. Each claim writes a token of its own on its
/// rows; every later write of that claim (result, failure, release) applies
/// only while the row still carries the token, so a process whose lease ran
/// out cannot record over, or release, a claim another process took since.
/// `token: None` stands for a row nobody claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimRef {
    pub id: i64,
    pub token: Option<i64>,
}

impl ClaimRef {
    /// A row no process holds (for tests and tools that write directly).
    pub fn unclaimed(id: i64) -> Self {
        Self { id, token: None }
    }
}

/// A new claim token: random, so that processes need no coordination.
pub(crate) fn new_token() -> i64 {
    fastrand::i64(1..)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedSend {
    pub row: ClaimRef,
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
    /// Wallets with a dead-lettered, unresolved row: on a FIFO queue their
    /// later rows wait for it.
    pub dead_wallets: i64,
    pub oldest_unsent_age_seconds: f64,
    /// When the oldest unsent row was created (none when nothing waits).
    pub oldest_unsent_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Dead tuples in `unsent_transactions` (PostgreSQL's statistics).
    pub unsent_dead_tuples: i64,
    /// How long the oldest transaction that holds back VACUUM's horizon in
    /// this database has been open (0 when none does). Sessions of other
    /// roles count only when the relay's role may see them (`pg_monitor`).
    pub oldest_xmin_age_seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum RetryOneError {
    #[error("no transaction with id {0}")]
    NotFound(i64),
    #[error("transaction {id} was already sent (message id {message_id})")]
    AlreadySent { id: i64, message_id: String },
    #[error("transaction {id} is being sent by a running relay until {until}; try again after that")]
    Held { id: i64, until: DateTime<Utc> },
    #[error(
        "transaction {id} must wait for the older transaction {older} of the same wallet (FIFO order): it is unsent, \
         or dead-lettered (retry it, or `txrelay skip {older}` to let the wallet go on without it)"
    )]
    WaitsForOlder { id: i64, older: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

macro_rules! claim_sql {
    ($unsent_filter:expr, $order:literal, $filter:expr) => {
        concat!(
            // Candidates come from `unsent_transactions`, locked there first
            // and then in `transactions`, each skipping rows another process
            // holds: a claim never waits, so it never joins a lock cycle with
            // a writer that locks in the other order. The ids as arrays keep
            // the plan an index lookup whatever the planner guesses for LIMIT
            // (a join here turns generic plans into a sequential scan).
            "WITH candidates AS MATERIALIZED (SELECT u.id, u.due_at FROM unsent_transactions u WHERE ",
            $unsent_filter,
            " ORDER BY ",
            $order,
            " LIMIT $1 FOR UPDATE SKIP LOCKED), \
             changed AS (UPDATE transactions SET claimed_until = now() + $2 * interval '1 millisecond', \
             claim_token = $3, updated_at = clock_timestamp() \
             WHERE id = ANY (ARRAY(SELECT t.id FROM transactions t \
             WHERE t.id = ANY (ARRAY(SELECT id FROM candidates)) AND ",
            unsent!("t"),
            " AND ",
            $filter,
            " FOR UPDATE SKIP LOCKED)) \
             RETURNING id, reference, idempotency_key, wallet_address, source, attempts, payload::text AS payload, traceparent, tracestate, \
             transactions.claimed_until AS lease_until, ",
            due_at!("transactions"),
            " AS lease_due_at), ",
            // A listed row whose transaction is gone or no longer unsent (a
            // writer that raced the listing) would hold its place, its
            // wallet's FIFO turn and the backlog gauge forever: the claim
            // that meets it takes it out. Only the candidates the claim left
            // are looked up (none, as a rule), not all of them.
            "strays AS (DELETE FROM unsent_transactions stray WHERE stray.id = ANY (ARRAY(SELECT c.id FROM candidates c \
             WHERE NOT EXISTS (SELECT 1 FROM changed WHERE changed.id = c.id))) \
             AND NOT EXISTS (SELECT 1 FROM transactions t WHERE t.id = stray.id AND ",
            unsent!("t"),
            ")), ",
            // Every claimed row is still unsent and its listing is locked by
            // this statement (`candidates`): a plain UPDATE keeps it in step.
            // `follow!`'s upsert did the same with an arbiter-index probe and
            // a conflict lock per row: a 100-row claim took about 4.2 ms
            // with it and 3.3 ms without (docs/benchmarks-history.md). The
            // ids as an array here too: joined on `changed` alone, the
            // listing could be read whole for a merge join.
            "leased AS (UPDATE unsent_transactions listed SET claimed_until = changed.lease_until, \
             due_at = changed.lease_due_at FROM changed WHERE listed.id = ANY (ARRAY(SELECT id FROM changed)) \
             AND listed.id = changed.id) ",
            // The first row this claim locked: a drain's next claim starts
            // there (`DueFloor`). A `due_at` of -infinity (set by hand) is
            // the head anyway, and has no chrono value: no floor then.
            "SELECT changed.*, nullif(head.due_at, '-infinity') AS head_due_at, head.id AS head_id FROM changed \
             LEFT JOIN (SELECT c.due_at, c.id FROM candidates c ORDER BY c.due_at, c.id LIMIT 1) AS head ON true"
        )
    };
}

/// Due: the backoff has run out and no process holds the row. A claim only
/// sets columns no index of `transactions` covers, so it is a HOT update.
macro_rules! due {
    () => {
        concat!("t.next_attempt_at <= now() AND ", not_held!("t"))
    };
}

/// Chosen for this run, not held by a running process, and not already
/// tried in this run.
macro_rules! not_held_nor_skipped {
    () => {
        concat!("u.id = ANY ($5::bigint[]) AND ", not_held!("u"), " AND NOT (u.id = ANY($4))")
    };
}

/// Due rows from `($4, $5)` on in the index's order (`due_at`, id): from
/// the beginning when both are NULL, else from a drain's [`DueFloor`].
macro_rules! due_from_floor {
    () => {
        "(u.due_at, u.id) >= (coalesce($4::timestamptz, '-infinity'::timestamptz), coalesce($5::bigint, -9223372036854775808)) \
         AND u.due_at <= now()"
    };
}

const CLAIM_DUE: &str = claim_sql!(due_from_floor!(), "u.due_at, u.id", due!());
const CLAIM_DUE_FIFO: &str =
    claim_sql!(concat!(due_from_floor!(), " AND ", first_of_its_wallet!("u")), "u.due_at, u.id", due!());
const CLAIM_FORCE: &str = claim_sql!(not_held_nor_skipped!(), "u.id", not_held!("t"));
const CLAIM_FORCE_FIFO: &str =
    claim_sql!(concat!(not_held_nor_skipped!(), " AND ", first_of_its_wallet!("u")), "u.id", not_held!("t"));

/// The rows of `$1` (ids) that still carry the claim tokens of `$2`. The
/// ids are also given as `id = ANY($1)`: whatever join the planner picks,
/// it reaches the rows through the primary key, never by reading the whole
/// table (a plan made while the table was small would).
macro_rules! still_held {
    ($alias:literal) => {
        concat!(
            "transactions.id = ANY ($1::bigint[]) AND transactions.id = ",
            $alias,
            ".row_id AND transactions.claim_token IS NOT DISTINCT FROM ",
            $alias,
            ".row_token AND ",
            not_sent!("transactions")
        )
    };
}

/// `WITH changed AS (<statement> RETURNING <columns>), follow!() SELECT …`.
macro_rules! and_follow {
    ($statement:expr, $returning:expr, $select:literal) => {
        concat!(
            "WITH changed AS (",
            $statement,
            " RETURNING ",
            $returning,
            ", ",
            follow_columns!(),
            "), ",
            follow!(),
            " ",
            $select
        )
    };
}

const RECORD_SENT: &str = and_follow!(
    concat!(
        "UPDATE transactions SET message_id = s.sent_message_id, queue_sent_at = now(), \
         attempts = transactions.attempts + 1, claimed_until = NULL, claim_token = NULL, failed_at = NULL, \
         updated_at = clock_timestamp() \
         FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS s(row_id, row_token, sent_message_id) WHERE ",
        still_held!("s")
    ),
    columns!(),
    "SELECT * FROM changed"
);

const RECORD_FAILURES: &str = and_follow!(
    concat!(
        "UPDATE transactions SET attempts = transactions.attempts + 1, last_error = f.failure, \
         next_attempt_at = now() + f.delay_ms * interval '1 millisecond', claimed_until = NULL, claim_token = NULL, \
         failed_at = CASE WHEN f.permanent OR ($6 > 0 AND transactions.attempts + 1 >= $6) THEN now() END, \
         updated_at = clock_timestamp() \
         FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bool[]) \
         AS f(row_id, row_token, failure, delay_ms, permanent) WHERE ",
        still_held!("f")
    ),
    columns!(),
    "SELECT * FROM changed"
);

/// Gives rows back after the queue refused the whole call: no attempt is
/// counted and the backoff is left alone (the rows stay due, and the oldest
/// of them are the relay's next probe), but the error is shown.
const HOLD: &str = and_follow!(
    concat!(
        "UPDATE transactions SET last_error = h.failure, claimed_until = NULL, claim_token = NULL, \
         updated_at = clock_timestamp() \
         FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS h(row_id, row_token, failure) WHERE ",
        still_held!("h")
    ),
    columns!(),
    "SELECT * FROM changed"
);

const RELEASE: &str = and_follow!(
    concat!(
        "UPDATE transactions SET claimed_until = NULL, claim_token = NULL, updated_at = clock_timestamp() \
         FROM unnest($1::bigint[], $2::bigint[]) AS r(row_id, row_token) WHERE ",
        still_held!("r")
    ),
    "transactions.id",
    "SELECT count(*) FROM changed"
);

const GAUGES: &str = concat!(
    "SELECT count(*) AS unsent, \
     coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age, min(created_at) AS oldest_at, \
     (SELECT count(*) FROM transactions WHERE ",
    dead_lettered!("transactions"),
    " AND transactions.skipped_at IS NULL) AS failed, \
     (SELECT count(DISTINCT d.wallet_address) FROM transactions d WHERE ",
    holds_its_wallet!("d"),
    " AND EXISTS (SELECT 1 FROM unsent_transactions w WHERE w.wallet_address = d.wallet_address \
     AND (w.wallet_address, w.id) > (d.wallet_address, d.id))) AS dead_wallets, \
     (SELECT coalesce(max(s.n_dead_tup), 0) FROM pg_stat_user_tables s \
     WHERE s.relid = 'unsent_transactions'::regclass) AS dead_tuples, ",
    // VACUUM cannot remove a row version an open transaction may still
    // see: the oldest such transaction in this database (or a prepared
    // one) is what lets dead tuples pile up under load.
    "(SELECT coalesce(extract(epoch FROM now() - min(x.since)), 0)::float8 FROM ( \
     SELECT a.xact_start AS since FROM pg_stat_activity a \
     WHERE a.backend_xmin IS NOT NULL AND a.datname = current_database() AND a.pid <> pg_backend_pid() \
     UNION ALL SELECT p.prepared FROM pg_prepared_xacts p WHERE p.database = current_database()) AS x) \
     AS oldest_xmin_age \
     FROM unsent_transactions"
);

macro_rules! next_due_sql {
    ($filter:expr) => {
        concat!(
            // NULL when nothing waits (the loop then sleeps its longest);
            // `greatest(0, NULL)` would be 0, a busy loop on an idle relay.
            // An overdue row's negative wait reads as 0 in the caller.
            // `due_at <= 'infinity'` holds for every row. It lets the
            // planner use the due index (partial, `due_at IS NOT NULL`) for
            // `min`: PostgreSQL 17 drops the `IS NOT NULL` that `min` adds
            // on a NOT NULL column, and with it the proof.
            "SELECT (extract(epoch FROM min(u.due_at) - now()) * 1000)::bigint AS due_in_ms \
             FROM unsent_transactions u WHERE u.due_at <= 'infinity'::timestamptz",
            $filter
        )
    };
}

const NEXT_DUE: &str = next_due_sql!("");
const NEXT_DUE_FIFO: &str = next_due_sql!(concat!(" AND ", first_of_its_wallet!("u")));

/// Dead-lettered rows of `$4`, revived and held by this claim at once. On
/// a FIFO queue only a row with no older unsent row of its wallet.
const CLAIM_REVIVE: &str = and_follow!(
    concat!(
        "UPDATE transactions SET failed_at = NULL, skipped_at = NULL, next_attempt_at = now(), \
         claimed_until = now() + $2 * interval '1 millisecond', claim_token = $3, updated_at = clock_timestamp() \
         WHERE id = ANY (ARRAY(SELECT t.id FROM transactions t WHERE t.id = ANY ($4::bigint[]) AND ",
        // A skipped row was given up on by decision: only `retry ID` names it.
        holds_its_wallet!("t"),
        " AND ",
        not_sent!("t"),
        " AND NOT (t.id = ANY ($6::bigint[])) AND (NOT $5 OR ",
        first_of_its_wallet!("t"),
        ") ORDER BY t.id LIMIT $1 FOR UPDATE SKIP LOCKED))"
    ),
    "id, reference, idempotency_key, wallet_address, source, attempts, payload::text AS payload, traceparent, tracestate",
    // Read as a claim's rows are (`Listed`); a revival has no floor.
    "SELECT *, NULL::timestamptz AS head_due_at, NULL::bigint AS head_id FROM changed"
);

const CLAIM_ONE: &str = and_follow!(
    concat!(
        "UPDATE transactions SET failed_at = NULL, skipped_at = NULL, \
         claimed_until = now() + $2 * interval '1 millisecond', claim_token = $4, updated_at = clock_timestamp() WHERE id = $1 AND ",
        not_sent!("transactions"),
        " AND ",
        not_held!("transactions"),
        " AND (NOT $3 OR ",
        first_of_its_wallet!("transactions"),
        ")"
    ),
    "id, reference, idempotency_key, wallet_address, source, attempts, payload::text AS payload, traceparent, tracestate",
    "SELECT * FROM changed"
);

/// Re-lists the unsent rows among the next `$2` ids after `$1` that are
/// missing from `unsent_transactions` (a writer that bypassed its triggers:
/// `DISABLE TRIGGER`, a direct edit of the narrow table). The scan walks the
/// primary key, so its cost is bounded by `$2` whatever the table's size.
const REPAIR_DRIFT: &str = concat!(
    "WITH scanned AS MATERIALIZED (SELECT id FROM transactions WHERE id > $1 ORDER BY id LIMIT $2), \
     repaired AS (INSERT INTO unsent_transactions (id, wallet_address, created_at, claimed_until, due_at) \
     SELECT t.id, t.wallet_address, t.created_at, t.claimed_until, ",
    due_at!("t"),
    " FROM transactions t WHERE t.id = ANY (ARRAY(SELECT id FROM scanned)) AND ",
    unsent!("t"),
    " AND t.id <> ALL (ARRAY(SELECT u.id FROM unsent_transactions u WHERE u.id = ANY (ARRAY(SELECT id FROM scanned)))) \
     ON CONFLICT (id) DO NOTHING RETURNING id) \
     SELECT (SELECT max(id) FROM scanned) AS last_id, ARRAY(SELECT id FROM repaired ORDER BY id) AS repaired"
);

/// Unsent rows missing from `unsent_transactions`, counted over the whole
/// table (`doctor`: a full scan, bounded by the statement timeout).
const COUNT_DRIFT: &str = concat!(
    "SELECT count(*) FROM transactions t WHERE ",
    unsent!("t"),
    " AND NOT EXISTS (SELECT 1 FROM unsent_transactions u WHERE u.id = t.id)"
);

/// One step of the drift reconciliation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriftScan {
    /// The last id scanned; `None` when the scan ran past the newest row.
    pub last_id: Option<i64>,
    /// Rows found missing and listed again.
    pub repaired: Vec<i64>,
}

/// Why `txrelay skip ID` was refused.
#[derive(Debug, thiserror::Error)]
pub enum SkipError {
    #[error("no transaction with id {0}")]
    NotFound(i64),
    #[error("transaction {0} is not dead-lettered (sent, or still being delivered); only a dead letter can be skipped")]
    NotDeadLettered(i64),
    #[error("transaction {0} was already skipped")]
    AlreadySkipped(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

const SKIP: &str = concat!(
    "UPDATE transactions SET skipped_at = now(), updated_at = clock_timestamp() WHERE id = $1 AND ",
    holds_its_wallet!("transactions"),
    " RETURNING wallet_address"
);

/// Whether a row is dead-lettered, and skipped: why [`SKIP`] left it alone.
const SKIP_STATE: &str = "SELECT failed_at IS NOT NULL, skipped_at IS NOT NULL FROM transactions WHERE id = $1";

/// Deletes up to `$2` sent rows created and sent more than `$1` ms ago,
/// keeping the compact record of those created within `$3` ms.
const DELETE_SENT: &str = concat!(
    // The outer predicate is checked again on a row changed
    // meanwhile: a row un-sent by hand is never deleted.
    "WITH gone AS (DELETE FROM transactions WHERE ",
    sent!("transactions"),
    " AND id IN (SELECT id FROM transactions WHERE ",
    sent!("transactions"),
    " AND queue_sent_at < now() - $1 * interval '1 millisecond' \
     AND created_at < now() - $1 * interval '1 millisecond' ORDER BY created_at LIMIT $2) \
     RETURNING idempotency_key, id, reference, wallet_address, \
     encode(sha256(convert_to(payload::text, 'UTF8')), 'hex') AS payload_digest, message_id, \
     queue_sent_at, created_at), \
     kept AS (INSERT INTO retired_transactions (idempotency_key, id, reference, wallet_address, \
     payload_digest, message_id, queue_sent_at, created_at) SELECT * FROM gone \
     WHERE created_at >= now() - $3 * interval '1 millisecond' ON CONFLICT (idempotency_key) DO NOTHING) \
     SELECT count(*) FROM gone",
);

/// Forgets up to `$2` retired keys created more than `$1` ms ago.
const EXPIRE_RETIRED: &str = "DELETE FROM retired_transactions WHERE idempotency_key = ANY (ARRAY(SELECT \
     idempotency_key FROM retired_transactions WHERE created_at < now() - $1 * interval '1 millisecond' ORDER BY \
     created_at LIMIT $2))";

/// The newest row of wallet `$1` older than `$2` that is unsent, or
/// dead-lettered and unresolved: what a FIFO retry must wait for.
const OLDER_OF_WALLET: &str = concat!(
    "SELECT max(id) FROM (SELECT id FROM unsent_transactions WHERE wallet_address = $1 \
     AND (wallet_address, id) < ($1, $2) \
     UNION ALL SELECT d.id FROM transactions d WHERE d.wallet_address = $1 AND d.id < $2 AND ",
    holds_its_wallet!("d"),
    ") AS older"
);

const CLAIMED_UNTIL: &str = "SELECT claimed_until FROM transactions WHERE id = $1";

/// A row of a claim (`claim_sql!`), with the first row the claim locked.
#[derive(FromRow)]
struct Listed {
    #[sqlx(flatten)]
    row: ClaimedRow,
    head_due_at: Option<DateTime<Utc>>,
    head_id: Option<i64>,
}

/// Every statement of this file, for [`super::statements`]: each claim mode
/// with a FIFO and a standard queue, and both waits for the next due row.
pub(super) fn statements() -> Vec<(&'static str, &'static str)> {
    named_statements![
        CLAIM_DUE,
        CLAIM_DUE_FIFO,
        CLAIM_FORCE,
        CLAIM_FORCE_FIFO,
        CLAIM_REVIVE,
        CLAIM_ONE,
        RECORD_SENT,
        RECORD_FAILURES,
        HOLD,
        RELEASE,
        GAUGES,
        NEXT_DUE,
        NEXT_DUE_FIFO,
        REPAIR_DRIFT,
        COUNT_DRIFT,
        SKIP,
        SKIP_STATE,
        DELETE_SENT,
        EXPIRE_RETIRED,
        OLDER_OF_WALLET,
        CLAIMED_UNTIL,
    ]
}

impl Store {
    /// One bounded step of the drift reconciliation: the next `batch` ids
    /// after `after` (see [`REPAIR_DRIFT`]).
    pub async fn repair_unsent_drift(&self, after: i64, batch: u32) -> Result<DriftScan> {
        let (last_id, repaired): (Option<i64>, Vec<i64>) = self
            .on(self.bookkeeping())
            .await?
            .run(|c| sqlx::query_as(REPAIR_DRIFT).bind(after).bind(i64::from(batch)).fetch_one(c))
            .await?;
        Ok(DriftScan { last_id, repaired })
    }

    /// Unsent rows missing from `unsent_transactions`, over the whole table.
    pub async fn count_unsent_drift(&self) -> Result<i64> {
        self.on(self.pool()).await?.run(|c| sqlx::query_scalar(COUNT_DRIFT).fetch_one(c)).await
    }

    /// Ends a dead-lettered row's hold on its FIFO wallet (`txrelay skip`):
    /// it stays dead-lettered and unsent. Returns its wallet.
    pub async fn skip_dead_letter(&self, id: i64) -> std::result::Result<String, SkipError> {
        let skipped: Option<String> =
            self.on(self.pool()).await?.run(|c| sqlx::query_scalar(SKIP).bind(id).fetch_optional(c)).await?;
        if let Some(wallet) = skipped {
            return Ok(wallet);
        }
        let state: Option<(bool, bool)> =
            self.on(self.pool()).await?.run(|c| sqlx::query_as(SKIP_STATE).bind(id).fetch_optional(c)).await?;
        Err(match state {
            None => SkipError::NotFound(id),
            Some((true, true)) => SkipError::AlreadySkipped(id),
            Some(_) => SkipError::NotDeadLettered(id),
        })
    }

    /// Claims up to `limit` rows in one short transaction, skipping rows other
    /// processes hold, and holds them for `lease` under a new claim token.
    pub async fn claim(&self, mode: ClaimMode<'_>, limit: u32, lease: Duration) -> Result<Claim> {
        let fifo = self.fifo();
        let lease_ms = millis(lease);
        let token = new_token();
        // A FIFO queue never starts at a floor (see `DueFloor`).
        let floor = match mode {
            ClaimMode::Drain(floor) if !fifo => Some(floor),
            _ => None,
        };
        let start = floor.and_then(DueFloor::get);
        let query = match (mode, fifo) {
            (ClaimMode::Due | ClaimMode::Drain(_), false) => sqlx::query_as(CLAIM_DUE),
            (ClaimMode::Due | ClaimMode::Drain(_), true) => sqlx::query_as(CLAIM_DUE_FIFO),
            (ClaimMode::Force { .. }, false) => sqlx::query_as(CLAIM_FORCE),
            (ClaimMode::Force { .. }, true) => sqlx::query_as(CLAIM_FORCE_FIFO),
            (ClaimMode::Revive { .. }, _) => sqlx::query_as(CLAIM_REVIVE),
        };
        let mut query = query.bind(i64::from(limit)).bind(lease_ms).bind(token);
        match mode {
            ClaimMode::Due | ClaimMode::Drain(_) => query = query.bind(start.map(|s| s.0)).bind(start.map(|s| s.1)),
            ClaimMode::Force { skip, only } => query = query.bind(skip).bind(only),
            ClaimMode::Revive { skip, only } => query = query.bind(only).bind(fifo).bind(skip),
        }
        let listed: Vec<Listed> = self.on(self.bookkeeping()).await?.run(|c| query.fetch_all(c)).await?;
        if let (Some(floor), Some(Listed { head_due_at: Some(at), head_id: Some(id), .. })) = (floor, listed.first()) {
            floor.raise((*at, *id));
        }
        let mut rows: Vec<ClaimedRow> = listed.into_iter().map(|l| l.row).collect();
        rows.sort_by_key(|row| row.id);
        Ok(Claim { rows, lease, token })
    }

    /// Records the message ids of many rows with a single UPDATE and returns
    /// the rows as they now are. Rows already sent, or no longer held by the
    /// claim that sent them, are left alone and absent.
    pub async fn record_sent(&self, sent: &[(ClaimRef, String)]) -> Result<Vec<Transaction>> {
        if sent.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens) = split(sent.iter().map(|(row, _)| row));
        let message_ids: Vec<&str> = sent.iter().map(|(_, m)| m.as_str()).collect();
        self.on(self.bookkeeping())
            .await?
            .run(|c| sqlx::query_as(RECORD_SENT).bind(&ids).bind(&tokens).bind(&message_ids).fetch_all(c))
            .await
    }

    /// Records failed sends with a single UPDATE and returns the rows as they
    /// now are: `failed_at` is set on those dead-lettered (permanent error, or
    /// `max_attempts` reached).
    pub async fn record_failures(&self, failures: &[FailedSend], max_attempts: u32) -> Result<Vec<Transaction>> {
        if failures.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens) = split(failures.iter().map(|f| &f.row));
        let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
        let delays: Vec<i64> = failures.iter().map(|f| millis(f.retry_in)).collect();
        let permanent: Vec<bool> = failures.iter().map(|f| f.permanent).collect();
        self.on(self.bookkeeping())
            .await?
            .run(|c| {
                sqlx::query_as(RECORD_FAILURES)
                    .bind(&ids)
                    .bind(&tokens)
                    .bind(&errors)
                    .bind(&delays)
                    .bind(&permanent)
                    .bind(i64::from(max_attempts))
                    .fetch_all(c)
            })
            .await
    }

    /// Gives rows back after the queue refused the call as a whole, keeping
    /// the error in `last_error`: no attempt, no backoff.
    pub async fn hold(&self, held: &[(ClaimRef, String)]) -> Result<Vec<Transaction>> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, tokens) = split(held.iter().map(|(row, _)| row));
        let errors: Vec<&str> = held.iter().map(|(_, e)| e.as_str()).collect();
        self.on(self.bookkeeping())
            .await?
            .run(|c| sqlx::query_as(HOLD).bind(&ids).bind(&tokens).bind(&errors).fetch_all(c))
            .await
    }

    /// Gives claimed rows back without an attempt (shutdown, lease running
    /// out, queue found down before sending): due again at once.
    pub async fn release(&self, rows: &[ClaimRef]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let (ids, tokens) = split(rows.iter());
        let released: i64 = self
            .on(self.bookkeeping())
            .await?
            .run(|c| sqlx::query_scalar(RELEASE).bind(&ids).bind(&tokens).fetch_one(c))
            .await?;
        Ok(u64::try_from(released).unwrap_or(0))
    }

    /// Unsent rows, dead-lettered rows and the age of the oldest unsent row.
    pub async fn gauges(&self) -> Result<Gauges> {
        let row = self.on(self.bookkeeping()).await?.run(|c| sqlx::query(GAUGES).fetch_one(c)).await?;
        Ok(Gauges {
            unsent: row.try_get("unsent")?,
            failed: row.try_get("failed")?,
            dead_wallets: row.try_get("dead_wallets")?,
            oldest_unsent_age_seconds: row.try_get("oldest_age")?,
            oldest_unsent_at: row.try_get("oldest_at")?,
            unsent_dead_tuples: row.try_get("dead_tuples")?,
            oldest_xmin_age_seconds: row.try_get("oldest_xmin_age")?,
        })
    }

    /// How long until the next row a sweep could claim becomes due; `None`
    /// when nothing is waiting.
    pub async fn next_due_in(&self) -> Result<Option<Duration>> {
        let sql = if self.fifo() { NEXT_DUE_FIFO } else { NEXT_DUE };
        let millis: Option<i64> =
            self.on(self.bookkeeping()).await?.run(|c| sqlx::query_scalar(sql).fetch_one(c)).await?;
        Ok(millis.map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))))
    }

    /// Deletes up to `batch` sent rows that were created and sent more than
    /// `age` ago. Unsent and dead-lettered rows are never touched. Each
    /// deleted row created within `window` leaves its compact record in
    /// `retired_transactions`, in the same statement, so its idempotency key
    /// is still recognised.
    pub async fn delete_sent_older_than(&self, age: Duration, window: Duration, batch: u32) -> Result<u64> {
        let deleted: i64 = self
            .on(self.bookkeeping())
            .await?
            .run(|c| {
                sqlx::query_scalar(DELETE_SENT)
                    .bind(millis(age))
                    .bind(i64::from(batch))
                    .bind(millis(window))
                    .fetch_one(c)
            })
            .await?;
        Ok(u64::try_from(deleted).unwrap_or(0))
    }

    /// Forgets up to `batch` retired keys created more than `window` ago:
    /// the idempotency window has ended for them.
    pub async fn expire_retired_older_than(&self, window: Duration, batch: u32) -> Result<u64> {
        let result = self
            .on(self.bookkeeping())
            .await?
            .run(|c| sqlx::query(EXPIRE_RETIRED).bind(millis(window)).bind(i64::from(batch)).execute(c))
            .await?;
        Ok(result.rows_affected())
    }

    /// Claims one row for `txrelay retry ID`, reviving it if dead-lettered.
    pub async fn claim_one(
        &self,
        id: i64,
        lease: Duration,
    ) -> std::result::Result<(ClaimedRow, ClaimRef), RetryOneError> {
        let fifo = self.fifo();
        let token = new_token();
        let claimed: Option<ClaimedRow> = self
            .on(self.pool())
            .await?
            .run(|c| sqlx::query_as(CLAIM_ONE).bind(id).bind(millis(lease)).bind(fifo).bind(token).fetch_optional(c))
            .await?;
        if let Some(row) = claimed {
            return Ok((row, ClaimRef { id, token: Some(token) }));
        }
        let Some(existing) = self.find_by_id(id).await? else {
            return Err(RetryOneError::NotFound(id));
        };
        if let Some(message_id) = existing.message_id {
            return Err(RetryOneError::AlreadySent { id, message_id });
        }
        let older: Option<i64> = self
            .on(self.pool())
            .await?
            .run(|c| sqlx::query_scalar(OLDER_OF_WALLET).bind(&existing.wallet_address).bind(id).fetch_one(c))
            .await?;
        match older {
            Some(older) if fifo => Err(RetryOneError::WaitsForOlder { id, older }),
            _ => {
                let until: Option<DateTime<Utc>> = self
                    .on(self.pool())
                    .await?
                    .run(|c| sqlx::query_scalar(CLAIMED_UNTIL).bind(id).fetch_one(c))
                    .await?;
                Err(RetryOneError::Held { id, until: until.unwrap_or_else(Utc::now) })
            }
        }
    }
}

/// Ids and tokens as the two arrays the statements above unnest.
fn split<'a>(rows: impl Iterator<Item = &'a ClaimRef>) -> (Vec<i64>, Vec<Option<i64>>) {
    rows.map(|row| (row.id, row.token)).unzip()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod sql_tests {
    /// The claims and counts as PostgreSQL receives them, built from the
    /// predicates defined once in `store/mod.rs`: a change to a predicate
    /// shows here, in review.
    #[test]
    fn claims_and_counts_are_the_sql_reviewed() {
        let follow_columns = "transactions.wallet_address AS follow_wallet, \
                      transactions.created_at AS follow_created_at, \
                      transactions.claimed_until AS follow_claimed_until, \
                      transactions.message_id IS NULL AND transactions.failed_at IS NULL AS follow_unsent, \
                      greatest(transactions.next_attempt_at, coalesce(transactions.claimed_until, \
                      transactions.next_attempt_at)) AS follow_due_at";
        let follow = "still_unsent AS (INSERT INTO unsent_transactions (id, wallet_address, created_at, claimed_until, \
                      due_at) SELECT id, follow_wallet, follow_created_at, follow_claimed_until, follow_due_at \
                      FROM changed WHERE follow_unsent ON CONFLICT (id) DO UPDATE SET claimed_until = \
                      EXCLUDED.claimed_until, due_at = EXCLUDED.due_at), \
                      no_longer_unsent AS (DELETE FROM unsent_transactions gone \
                      WHERE gone.id = ANY (ARRAY(SELECT id FROM changed WHERE NOT follow_unsent)))";
        let claim = |unsent_filter: &str, order: &str, filter: &str| {
            format!(
                "WITH candidates AS MATERIALIZED (SELECT u.id, u.due_at FROM unsent_transactions u WHERE {unsent_filter} \
                 ORDER BY {order} LIMIT $1 FOR UPDATE SKIP LOCKED), \
                 changed AS (UPDATE transactions SET claimed_until = now() + $2 * interval '1 millisecond', \
                 claim_token = $3, updated_at = clock_timestamp() \
                 WHERE id = ANY (ARRAY(SELECT t.id FROM transactions t WHERE t.id = ANY (ARRAY(SELECT id FROM candidates)) \
                 AND t.message_id IS NULL AND t.failed_at IS NULL AND {filter} FOR UPDATE SKIP LOCKED)) \
                 RETURNING id, reference, idempotency_key, wallet_address, source, attempts, payload::text AS payload, traceparent, tracestate, \
                 transactions.claimed_until AS lease_until, greatest(transactions.next_attempt_at, \
                 coalesce(transactions.claimed_until, transactions.next_attempt_at)) AS lease_due_at), \
                 strays AS (DELETE FROM unsent_transactions stray WHERE stray.id = ANY (ARRAY(SELECT c.id FROM candidates c \
                 WHERE NOT EXISTS (SELECT 1 FROM changed WHERE changed.id = c.id))) \
                 AND NOT EXISTS (SELECT 1 FROM transactions t WHERE t.id = stray.id \
                 AND t.message_id IS NULL AND t.failed_at IS NULL)), \
                 leased AS (UPDATE unsent_transactions listed SET claimed_until = changed.lease_until, \
                 due_at = changed.lease_due_at FROM changed WHERE listed.id = ANY (ARRAY(SELECT id FROM changed)) \
                 AND listed.id = changed.id) \
                 SELECT changed.*, nullif(head.due_at, '-infinity') AS head_due_at, head.id AS head_id FROM changed \
                 LEFT JOIN (SELECT c.due_at, c.id FROM candidates c ORDER BY c.due_at, c.id LIMIT 1) AS head ON true"
            )
        };
        let not_held = |t: &str| format!("({t}.claimed_until IS NULL OR {t}.claimed_until <= now())");
        let first_of_its_wallet = "NOT EXISTS (SELECT 1 FROM unsent_transactions o WHERE o.wallet_address = \
                                   u.wallet_address AND (o.wallet_address, o.id) < (u.wallet_address, u.id) \
                                   OFFSET 0) AND NOT EXISTS (SELECT 1 FROM transactions d \
                                   WHERE d.wallet_address = u.wallet_address AND d.id < u.id \
                                   AND d.failed_at IS NOT NULL AND d.skipped_at IS NULL)";
        let due = format!("t.next_attempt_at <= now() AND {}", not_held("t"));
        let due_from = "(u.due_at, u.id) >= (coalesce($4::timestamptz, '-infinity'::timestamptz), \
                        coalesce($5::bigint, -9223372036854775808)) AND u.due_at <= now()";
        assert_eq!(super::CLAIM_DUE, claim(due_from, "u.due_at, u.id", &due));
        assert_eq!(
            super::CLAIM_DUE_FIFO,
            claim(&format!("{due_from} AND {first_of_its_wallet}"), "u.due_at, u.id", &due)
        );
        let not_held_nor_skipped = format!("u.id = ANY ($5::bigint[]) AND {} AND NOT (u.id = ANY($4))", not_held("u"));
        assert_eq!(super::CLAIM_FORCE, claim(&not_held_nor_skipped, "u.id", &not_held("t")));
        assert_eq!(
            super::CLAIM_FORCE_FIFO,
            claim(&format!("{not_held_nor_skipped} AND {first_of_its_wallet}"), "u.id", &not_held("t"))
        );
        assert_eq!(
            super::RELEASE,
            format!(
                "WITH changed AS (UPDATE transactions SET claimed_until = NULL, claim_token = NULL, \
                 updated_at = clock_timestamp() FROM unnest($1::bigint[], $2::bigint[]) AS r(row_id, row_token) \
                 WHERE transactions.id = ANY ($1::bigint[]) AND transactions.id = r.row_id AND transactions.claim_token IS NOT DISTINCT FROM r.row_token \
                 AND transactions.message_id IS NULL RETURNING transactions.id, {follow_columns}), {follow} \
                 SELECT count(*) FROM changed"
            )
        );
        assert_eq!(
            super::GAUGES,
            "SELECT count(*) AS unsent, coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age, min(created_at) AS oldest_at, \
             (SELECT count(*) FROM transactions WHERE transactions.failed_at IS NOT NULL \
             AND transactions.skipped_at IS NULL) AS failed, \
             (SELECT count(DISTINCT d.wallet_address) FROM transactions d WHERE d.failed_at IS NOT NULL \
             AND d.skipped_at IS NULL AND EXISTS (SELECT 1 FROM unsent_transactions w \
             WHERE w.wallet_address = d.wallet_address AND (w.wallet_address, w.id) > (d.wallet_address, d.id))) \
             AS dead_wallets, \
             (SELECT coalesce(max(s.n_dead_tup), 0) FROM pg_stat_user_tables s \
             WHERE s.relid = 'unsent_transactions'::regclass) AS dead_tuples, \
             (SELECT coalesce(extract(epoch FROM now() - min(x.since)), 0)::float8 FROM ( \
             SELECT a.xact_start AS since FROM pg_stat_activity a WHERE a.backend_xmin IS NOT NULL \
             AND a.datname = current_database() AND a.pid <> pg_backend_pid() \
             UNION ALL SELECT p.prepared FROM pg_prepared_xacts p WHERE p.database = current_database()) AS x) \
             AS oldest_xmin_age FROM unsent_transactions"
        );
        assert_eq!(
            crate::store::transactions::STATS_SQL,
            "SELECT count(*) AS total, count(*) FILTER (WHERE transactions.message_id IS NOT NULL) AS sent, \
             count(*) FILTER (WHERE transactions.message_id IS NULL AND transactions.failed_at IS NULL) AS unsent, \
             count(*) FILTER (WHERE transactions.failed_at IS NOT NULL) AS failed FROM transactions"
        );
    }
}
