//! Stopping while work is in progress: a relay stopped by its supervisor
//! (SIGTERM, a deleted resource) and a `retry-all` stopped by a signal
//! finish what is in flight, record it, give the rest back, and tell every
//! caller the truth.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use txrelay::http::{self, AppState, HttpOptions};
use txrelay::metrics::Metrics;
use txrelay::runtime::lifecycle::Supervisor;
use txrelay::runtime::registry::Registry;

use crate::common::proxy::SqsProxy;
use crate::common::*;

/// A relay started through the lifecycle `txrelay run` uses, served by the
/// real router, so that `stop_all` stops it exactly as SIGTERM does.
async fn supervised(builder: &RelayBuilder) -> (Arc<Supervisor>, TestApp) {
    let metrics = Metrics::new();
    let relays = Arc::new(Registry::new(None));
    let supervisor = Arc::new(Supervisor::standalone(relays.clone(), metrics.clone(), Duration::from_secs(10), true));
    let (_, handle) = supervisor.ensure(&builder.settings()).await.expect("relay starts");
    let router = http::api_router(AppState::new(relays, metrics.clone(), HttpOptions::default()));
    (supervisor, TestApp { router, relay: handle.relay, metrics })
}

/// Rows that are not due by themselves: only a resend sends them.
async fn resendable(db: &TestDb, rows: usize) {
    for _ in 0..rows {
        insert_unsent(db, &format!("w{}", fastrand::u8(..))).await;
    }
    db.execute("UPDATE transactions SET next_attempt_at = now() + interval '1 hour'").await;
}

async fn sent(db: &TestDb) -> i64 {
    db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NOT NULL").await
}

/// Every message that reached the queue is recorded, and no row is left
/// claimed.
async fn assert_recorded_and_released(db: &TestDb, queue: &TestQueue) {
    let claimed =
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL AND claimed_until > now()").await;
    assert_eq!(claimed, 0, "no claimed row left behind");
    let delivered = queue.drain().await.len() as i64;
    assert_eq!(delivered, sent(db).await, "every message that went out is recorded");
    db.assert_unsent_rows_followed().await;
}

/// (finished, succeeded, outcome, ids listed) of the only audit record.
async fn audit(db: &TestDb) -> (bool, Option<i32>, String, i64) {
    sqlx::query_as(
        "SELECT finished_at IS NOT NULL, succeeded, coalesce(outcome, ''), cardinality(transaction_ids)::bigint \
         FROM resend_audit",
    )
    .fetch_one(&db.psql)
    .await
    .expect("one audit record")
}

#[tokio::test]
async fn during_shutdown_new_answers_503_shutting_down_never_401() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let (supervisor, app) = supervised(&RelayBuilder::new(&db, &queue)).await;
    let (status, _) = app.post_new(&body(unique(), "w")).await;
    assert!(status.is_success());
    supervisor.stop_all().await;
    let (status, headers, answer) = app.post_new_response(&body(unique(), "w")).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("shutting_down")),
        "{answer}"
    );
    assert!(headers.contains_key("retry-after"));
    let (status, answer) = app.get("/transactions").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "reads too: {answer}");
}

#[tokio::test]
async fn a_request_cut_short_holds_the_shutdown_until_its_inline_send_is_recorded() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    // Slower than the client's patience, well within inlineSendTimeout.
    proxy.faults(|f| f.send_delay = Some(Duration::from_millis(1200)));
    let (supervisor, app) = supervised(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint)).await;
    let n = unique();
    // The client gives up (a timeout, a closed connection) while the send
    // is in flight: the request's future is dropped.
    let cut = tokio::time::timeout(Duration::from_millis(300), app.post_new(&body(n, "w"))).await;
    assert!(cut.is_err(), "the client gave up before the answer");
    supervisor.stop_all().await;
    let row = db.store.find_by_reference(&format!("MYK-{n:06}")).await.unwrap().expect("committed");
    assert!(row.message_id.is_some(), "the shutdown waited for the send and recorded it: {row:?}");
    // Sent once, and recorded.
    assert_recorded_and_released(&db, &queue).await;
}

#[tokio::test]
async fn an_http_retry_all_ends_when_its_relay_stops_with_what_it_sent_recorded() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    proxy.faults(|f| f.send_delay = Some(Duration::from_millis(500)));
    // Before the relay starts: its loop must not take a row before the
    // rows are put off.
    resendable(&db, 300).await;
    let (supervisor, app) = supervised(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint)).await;
    let app = Arc::new(app);
    let resend = {
        let app = app.clone();
        tokio::spawn(async move {
            let body = serde_json::to_vec(&json!({"limit": 300})).unwrap();
            app.request("POST", "/retry-all", Some(ADMIN_TOKEN), "application/json", body).await
        })
    };
    wait_until(Duration::from_secs(20), "the resend is under way", || async { sent(&db).await > 0 }).await;
    supervisor.stop_all().await;
    let (status, report): (StatusCode, Value) = resend.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{report}");
    assert!(report["stopped"].as_str().is_some_and(|s| s.starts_with("interrupted")), "{report}");
    let (finished, succeeded, outcome, _) = audit(&db).await;
    assert!(finished && outcome.starts_with("stopped: interrupted"), "{outcome}");
    assert_eq!(i64::from(succeeded.unwrap()), sent(&db).await);
    assert!(sent(&db).await < 300, "it stopped part-way");
    assert_recorded_and_released(&db, &queue).await;
}

#[tokio::test]
async fn cli_retry_all_on_sigint_or_sigterm_records_what_it_sent_releases_its_claims_and_reads_a_page_at_a_time() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
        let proxy = SqsProxy::start(&queue.endpoint).await;
        proxy.faults(|f| f.send_delay = Some(Duration::from_millis(500)));
        // More rows than one page of candidates (1000).
        resendable(&db, 1500).await;
        let mut child = command(&db.url, &db.schema, &queue.url, &proxy.endpoint)
            .env("USER", "alice")
            .arg("retry-all")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("txrelay retry-all starts");
        wait_until(Duration::from_secs(30), "the resend is under way", || async { sent(&db).await > 0 }).await;
        let pid = i32::try_from(child.id().expect("running")).unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let output = tokio::time::timeout(Duration::from_secs(20), async {
            let status = child.wait().await.unwrap();
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = tokio::io::AsyncReadExt::read_to_string(&mut pipe, &mut stderr).await;
            }
            (status, stderr)
        })
        .await
        .expect("retry-all ends within a call's timeout of the signal");
        let (status, stderr) = output;
        assert_eq!(status.code(), Some(130), "signal {signal}: {stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        let (finished, succeeded, outcome, listed) = audit(&db).await;
        assert!(finished && outcome.starts_with("stopped: interrupted"), "signal {signal}: {outcome}");
        assert_eq!(i64::from(succeeded.unwrap()), sent(&db).await);
        assert_eq!(listed, 1000, "candidates are read and recorded a page at a time, not all at once");
        assert!(sent(&db).await < 1500, "it stopped part-way");
        assert_recorded_and_released(&db, &queue).await;
    }
}

/// A revocation read while a relay is being rebuilt (a reconfiguration)
/// reaches the relay that takes over, whichever finishes first: the new
/// relay never serves with tokens older than the newest read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_during_a_reconfiguration_is_applied_to_the_relay_that_takes_over() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let supervisor =
        Arc::new(Supervisor::standalone(Arc::new(Registry::new(None)), Metrics::new(), Duration::from_secs(2), true));
    let builder = RelayBuilder::new(&db, &queue);
    let mut settings = builder.settings();
    let id = settings.id.clone();
    supervisor.ensure(&settings).await.expect("relay starts");
    for round in 0..20_u32 {
        // Tokens back, then a new configuration and a revocation at once.
        let read = supervisor.token_read();
        supervisor.set_tokens(&id, read, Some(settings.ingest_tokens.clone()), None).await;
        settings.spec.batch_size = 10 + round;
        let revoke = {
            let supervisor = supervisor.clone();
            let id = id.clone();
            async move {
                let read = supervisor.token_read();
                supervisor.set_tokens(&id, read, Some(txrelay::auth::TokenSet::default()), None).await;
            }
        };
        let (started, ()) = tokio::join!(supervisor.ensure(&settings), revoke);
        started.expect("reconfigured");
        let serving = supervisor.get(&id).expect("served");
        assert!(serving.ingest_tokens.is_empty(), "round {round}: the revoked tokens still open /new");
    }
    supervisor.stop_all().await;
}
