use std::sync::atomic::{AtomicU32, Ordering};

use txrelay::secret::Secret;
use txrelay::store::{Store, StoreOptions};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A schema of its own on the test database, migrated.
pub struct TestDb {
    pub url: String,
    pub schema: String,
    pub store: Store,
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
        Self { url, schema, store }
    }

    pub fn store_at(url: &str, schema: &str) -> Store {
        let mut options = StoreOptions::new(Secret::new(url), schema);
        options.max_connections = 8;
        Store::connect_lazy(&options).expect("valid test database URL")
    }

    /// Runs a statement against the test schema (test setup only).
    pub async fn execute(&self, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())).execute(self.store.pool()).await.expect(sql);
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(self.store.pool()).await.expect(sql)
    }
}
