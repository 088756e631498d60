//! Schema migrations, embedded in the binary from `migrations/`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::migrate::Migrator;

use super::{Result, Store, StoreError};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

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
    pub async fn migrate(&self) -> Result<()> {
        self.create_schema().await?;
        MIGRATOR.run(self.pool()).await.map_err(|e| StoreError::Migration(e.to_string()))
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
        if drop_resend_audit {
            sqlx::query("SET txrelay.drop_resend_audit = on").execute(&mut *connection).await?;
        }
        let undone = MIGRATOR.undo(&mut *connection, target).await;
        if drop_resend_audit {
            // The pool must not hand the permission on to anyone else.
            connection.close_on_drop();
        }
        undone.map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(Some(last))
    }

    /// Every known migration with the time it was applied, if it was.
    pub async fn status(&self) -> Result<Vec<MigrationStatus>> {
        let table_exists: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(self.pool()).await?;
        let applied: Vec<(i64, DateTime<Utc>)> = if table_exists {
            sqlx::query_as("SELECT version, installed_on FROM _sqlx_migrations WHERE success ORDER BY version")
                .fetch_all(self.pool())
                .await?
        } else {
            Vec::new()
        };
        Ok(MIGRATOR
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
        // The name is a validated identifier (spec::is_schema_name), so quoting it is enough.
        let sql = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema());
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(self.pool()).await?;
        Ok(())
    }
}
