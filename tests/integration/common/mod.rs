//! Shared test fixtures: a fresh schema per test on the real PostgreSQL, a
//! fresh queue per test on the real moto SQS server, proxies that cut or
//! slow the network between the relay and either of them, and helpers to
//! build relays and payloads.

pub mod db;
pub mod fixtures;
pub mod kube_api;
pub mod otlp;
pub mod proxy;
pub mod sqs;

use std::future::Future;
use std::time::{Duration, Instant};

pub use db::TestDb;
pub use fixtures::*;
pub use sqs::TestQueue;

/// Polls `condition` until it holds or `timeout` passes; the test fails with
/// `what` on timeout.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `TXRELAY_TEST_LOG=debug` shows the relay's logs in failing tests.
pub fn init_logs() {
    if let Ok(filter) = std::env::var("TXRELAY_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

pub fn required_env(name: &str) -> String {
    init_logs();
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the integration tests with `just test`, which starts PostgreSQL's test database and moto")
    })
}
