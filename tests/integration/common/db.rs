use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use txrelay::secret::Secret;
use txrelay::store::{Store, StoreOptions};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A schema of its own on the test database, migrated.
pub struct TestDb {
    pub url: String,
    pub schema: String,
    pub store: Store,
    /// A plain session on the schema, as psql or another tool would open:
    /// test setup writes through it, so the triggers that keep
    /// `unsent_transactions` in step for other writers are exercised too.
    pub psql: sqlx::PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        let db = Self::unmigrated().await;
        db.store.migrate().await.expect("migrations apply");
        db
    }

    pub async fn unmigrated() -> Self {
        let url = super::required_env("TXRELAY_TEST_DATABASE_URL");
        let schema = format!("t_{}_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed), fastrand::u32(..));
        let store = Self::store_at(&url, &schema);
        let options = sqlx::postgres::PgConnectOptions::from_str(&url)
            .expect("valid test database URL")
            .options([("search_path", schema.as_str())]);
        let psql = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect_lazy_with(options);
        Self { url, schema, store, psql }
    }

    pub fn store_at(url: &str, schema: &str) -> Store {
        let mut options = StoreOptions::new(Secret::new(url), schema);
        options.max_connections = 8;
        Store::connect_lazy(&options).expect("valid test database URL")
    }

    /// Runs a statement against the test schema (test setup only).
    pub async fn execute(&self, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).execute(&self.psql).await.expect(sql);
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&self.psql).await.expect(sql)
    }

    /// A text value (NULL reads as an empty string), for failure messages.
    pub async fn scalar_text(&self, sql: &str) -> String {
        let value: Option<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&self.psql).await.expect(sql);
        value.unwrap_or_default()
    }

    /// `unsent_transactions` holds exactly the unsent rows of `transactions`,
    /// each with its wallet, creation time, lease and due time.
    pub async fn assert_unsent_rows_followed(&self) {
        let mismatched = self
            .scalar_i64(
                "SELECT count(*) FROM ((SELECT id, wallet_address, created_at, claimed_until, \
                 greatest(next_attempt_at, coalesce(claimed_until, next_attempt_at)) AS due_at FROM transactions \
                 WHERE message_id IS NULL AND failed_at IS NULL \
                 EXCEPT SELECT id, wallet_address, created_at, claimed_until, due_at FROM unsent_transactions) \
                 UNION ALL (SELECT id, wallet_address, created_at, claimed_until, due_at FROM unsent_transactions \
                 EXCEPT SELECT id, wallet_address, created_at, claimed_until, \
                 greatest(next_attempt_at, coalesce(claimed_until, next_attempt_at)) FROM transactions \
                 WHERE message_id IS NULL AND failed_at IS NULL)) AS differences",
            )
            .await;
        assert_eq!(mismatched, 0, "unsent_transactions differs from the unsent rows of transactions");
    }
}
