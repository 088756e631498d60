//! Schema migrations, embedded in the binary from `migrations/`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::migrate::Migrator;

use super::{Result, Store, StoreError, named_statements};

/// The embedded migrations. A schema with migrations this binary does not
/// know (a newer release applied them) is accepted: every migration is
/// written so that the release before it keeps working (docs/upgrade.md),
/// so an older binary must not refuse to start, or a rollback would wedge.
fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// How long one migration statement waits for a lock before it gives up
/// and is tried again: a migration that queues for a lock behind a long
/// transaction would hold every writer behind itself meanwhile.
const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `migrate` waits between tries at first, doubling up to
/// [`MIGRATION_RETRY_MAX`]: writers queued behind a waiting migration stall
/// for at most the lock timeout per try, and tries thin out.
const MIGRATION_RETRY: Duration = Duration::from_secs(1);
const MIGRATION_RETRY_MAX: Duration = Duration::from_secs(30);

/// The versions applied to this schema.
const APPLIED_VERSIONS: &str = "SELECT version FROM _sqlx_migrations WHERE success";

const MIGRATIONS_TABLE_EXISTS: &str = "SELECT to_regclass('_sqlx_migrations') IS NOT NULL";

const APPLIED_MIGRATIONS: &str = "SELECT version, installed_on FROM _sqlx_migrations WHERE success ORDER BY version";

/// Lets the resend audit's down migration drop its records.
const SET_DROP_RESEND_AUDIT: &str = "SET txrelay.drop_resend_audit = on";

/// The statement timeout of the migrating session.
fn set_statement_timeout_sql(timeout: Duration) -> String {
    format!("SET statement_timeout = {}", timeout.as_millis())
}

/// The lock timeout of the migrating session.
fn set_lock_timeout_sql(timeout: Duration) -> String {
    format!("SET lock_timeout = {}", timeout.as_millis())
}

/// The name is a validated identifier (spec::is_schema_name), so quoting it is enough.
fn create_schema_sql(schema: &str) -> String {
    format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")
}

/// Every statement of this file prepared against the migrated schema, for
/// [`super::statements`].
pub(super) fn statements() -> Vec<(&'static str, &'static str)> {
    named_statements![APPLIED_VERSIONS, MIGRATIONS_TABLE_EXISTS, APPLIED_MIGRATIONS]
}

/// The statements of this file that are not prepared, for
/// [`super::unprepared_statements`]: the text of a named const, or the shape
/// of a statement built at run time.
pub(super) fn unprepared_statements() -> Vec<(&'static str, &'static str)> {
    vec![
        // A session setting of the migrating connection (a custom GUC), not a query of the schema.
        ("SET_DROP_RESEND_AUDIT", SET_DROP_RESEND_AUDIT),
        // A session setting whose value is the configured migration timeout.
        ("set_statement_timeout_sql", "SET statement_timeout = <milliseconds>"),
        // A session setting whose value is MIGRATION_LOCK_TIMEOUT.
        ("set_lock_timeout_sql", "SET lock_timeout = <milliseconds>"),
        // DDL run before the schema is migrated (it may not exist yet), on the relay's own schema name.
        ("create_schema_sql", "CREATE SCHEMA IF NOT EXISTS \"<schema>\""),
        // Not listed: sqlx's own migrator statements (its advisory lock, `_sqlx_migrations`
        // bookkeeping) and the migrations' SQL in migrations/*.sql, which the store does not write.
    ]
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationStatus {
    pub version: i64,
    pub description: String,
    pub installed_on: Option<DateTime<Utc>>,
}

impl Store {
    /// Creates the schema when missing and applies pending migrations. Safe
    /// to run from several replicas at once: sqlx serialises them with an
    /// advisory lock.
    ///
    /// Migrations run on a connection of their own, with the migration
    /// timeout instead of the 10 s request bound, and a 5 s lock timeout: a
    /// statement that cannot get its lock gives up, and the whole run is
    /// tried again (each migration is one transaction, so a failed try
    /// leaves nothing half done) until the migration timeout has passed.
    pub async fn migrate(&self) -> Result<()> {
        self.create_schema().await?;
        let deadline = tokio::time::Instant::now() + self.migration_timeout;
        let mut pause = MIGRATION_RETRY;
        loop {
            match self.migrate_once().await {
                Err(MigrationTry::LockTimeout(error)) if tokio::time::Instant::now() + pause < deadline => {
                    tracing::warn!(schema = %self.schema(), %error, retry_in_ms = pause.as_millis() as u64,
                                   "a migration could not get its lock in time; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MIGRATION_RETRY_MAX);
                }
                Err(MigrationTry::LockTimeout(error) | MigrationTry::Failed(error)) => return Err(error),
                Ok(()) => return Ok(()),
            }
        }
    }

    /// Whether this schema has every embedded migration applied (a missing
    /// table, or any error, reads as "maybe not": the locked path decides).
    async fn nothing_pending(&self, connection: &mut sqlx::PgConnection) -> bool {
        let applied: Vec<i64> = match sqlx::query_scalar(APPLIED_VERSIONS).fetch_all(connection).await {
            Ok(applied) => applied,
            Err(_) => return false,
        };
        migrator().iter().filter(|m| m.migration_type.is_up_migration()).all(|m| applied.contains(&m.version))
    }

    async fn migrate_once(&self) -> std::result::Result<(), MigrationTry> {
        let mut connection = self.pool().acquire().await.map_err(|e| MigrationTry::Failed(e.into()))?;
        // Session settings of this connection only: it is closed afterwards,
        // never handed back to the pool with them.
        connection.close_on_drop();
        let failed = |e: sqlx::Error| MigrationTry::Failed(e.into());
        let timeout = set_statement_timeout_sql(self.migration_timeout);
        sqlx::raw_sql(sqlx::AssertSqlSafe(timeout)).execute(&mut *connection).await.map_err(failed)?;
        // Nothing to do (every embedded migration applied): no lock. Every
        // relay of a database otherwise queues through one lock at each
        // start (100 relays took 44 s to start, BENCHMARKS.md).
        if self.nothing_pending(&mut connection).await {
            return Ok(());
        }
        // The migrators of every replica and relay on this database take
        // turns through one advisory lock: waited for here, without the
        // short lock timeout (it blocks no writer); sqlx's own take of it
        // below is then immediate (session advisory locks nest), and closing
        // the connection releases it.
        {
            use sqlx::migrate::Migrate;
            connection.lock().await.map_err(|e| MigrationTry::Failed(StoreError::Migration(e.to_string())))?;
        }
        let lock_timeout = set_lock_timeout_sql(MIGRATION_LOCK_TIMEOUT);
        sqlx::raw_sql(sqlx::AssertSqlSafe(lock_timeout)).execute(&mut *connection).await.map_err(failed)?;
        // The server's timeouts should fire first; this bounds a network
        // that stopped answering.
        let bound = self.migration_timeout + Duration::from_secs(5);
        let migrator = migrator();
        let run = migrator.run_direct(None, &mut *connection, false);
        match tokio::time::timeout(bound, run).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                let lock_timeout = match &error {
                    sqlx::migrate::MigrateError::Execute(e) | sqlx::migrate::MigrateError::ExecuteMigration(e, _) => {
                        e.as_database_error().and_then(|db| db.code()).is_some_and(|code| code == "55P03")
                    }
                    _ => false,
                };
                let error = StoreError::Migration(error.to_string());
                Err(if lock_timeout { MigrationTry::LockTimeout(error) } else { MigrationTry::Failed(error) })
            }
            Err(_) => Err(MigrationTry::Failed(StoreError::Unavailable(format!(
                "migrations did not finish within {bound:?}"
            )))),
        }
    }

    /// The bound on [`Self::migrate`], for callers that wait for it.
    pub fn migration_bound(&self) -> Duration {
        self.migration_timeout + Duration::from_secs(10)
    }

    /// Reverts the most recently applied migration; returns its version.
    /// Reverting the resend audit's migration refuses while it holds
    /// records (see [`Self::revert_last_migration_with`]).
    pub async fn revert_last_migration(&self) -> Result<Option<i64>> {
        self.revert_last_migration_with(false).await
    }

    /// As [`Self::revert_last_migration`]; `drop_resend_audit` lets the
    /// resend audit's down migration drop its records.
    pub async fn revert_last_migration_with(&self, drop_resend_audit: bool) -> Result<Option<i64>> {
        let applied: Vec<i64> =
            self.status().await?.into_iter().filter_map(|m| m.installed_on.map(|_| m.version)).collect();
        let Some((&last, earlier)) = applied.split_last() else {
            return Ok(None);
        };
        let target = earlier.last().copied().unwrap_or(0);
        let mut connection = self.pool().acquire().await?;
        // Session settings (the permission, the migration's own timeout)
        // must never go back to the pool with this connection.
        connection.close_on_drop();
        let timeout = set_statement_timeout_sql(self.migration_timeout);
        sqlx::raw_sql(sqlx::AssertSqlSafe(timeout)).execute(&mut *connection).await?;
        if drop_resend_audit {
            sqlx::query(SET_DROP_RESEND_AUDIT).execute(&mut *connection).await?;
        }
        let undone = migrator().undo(&mut *connection, target).await;
        undone.map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(Some(last))
    }

    /// Every known migration with the time it was applied, if it was.
    pub async fn status(&self) -> Result<Vec<MigrationStatus>> {
        let table_exists: bool = sqlx::query_scalar(MIGRATIONS_TABLE_EXISTS).fetch_one(self.pool()).await?;
        let applied: Vec<(i64, DateTime<Utc>)> =
            if table_exists { sqlx::query_as(APPLIED_MIGRATIONS).fetch_all(self.pool()).await? } else { Vec::new() };
        Ok(migrator()
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| MigrationStatus {
                version: m.version,
                description: m.description.to_string(),
                installed_on: applied.iter().find(|(v, _)| *v == m.version).map(|(_, at)| *at),
            })
            .collect())
    }

    async fn create_schema(&self) -> Result<()> {
        let sql = create_schema_sql(self.schema());
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(self.pool()).await?;
        Ok(())
    }
}

enum MigrationTry {
    /// A statement gave up waiting for a lock: worth another try.
    LockTimeout(StoreError),
    Failed(StoreError),
}
