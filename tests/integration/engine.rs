//! The relay loop against the real database and moto, with proxies to take
//! the network away.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::QueueAttributeName;
use axum::http::StatusCode;
use serde_json::json;
use tokio::sync::watch;
use txrelay::relay::backoff::Backoff;
use txrelay::store::{ClaimMode, Intake};
use txrelay::transaction::parse_request_body;

use crate::common::proxy::{SqsMode, SqsProxy, TcpProxy};
use crate::common::*;

async fn unsent(db: &TestDb) -> i64 {
    db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL AND failed_at IS NULL").await
}

#[tokio::test]
async fn after_an_outage_the_backlog_drains_and_delivery_resumes_within_seconds() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    let app =
        TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).spec(|s| s.retry_interval = secs(300)))
            .await;
    let running = RunningLoop::start(&app.relay);
    proxy.set(SqsMode::Down);
    for _ in 0..20 {
        assert_eq!(app.post_new(&body(unique(), "w")).await.0, StatusCode::ACCEPTED);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(unsent(&db).await, 20, "nothing is lost while the queue is down");
    let attempts = db.scalar_i64("SELECT max(attempts)::int8 FROM transactions").await;
    assert_eq!(attempts, 0, "an outage burns no attempt: the rows are held and probed with");

    proxy.set(SqsMode::Forward);
    let recovered = Instant::now();
    let first = queue.receive(1, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 1);
    let first_delivery = recovered.elapsed();
    assert!(first_delivery <= Duration::from_secs(5), "first delivery {first_delivery:?} after recovery");
    let rest = queue.receive(19, Duration::from_secs(20)).await;
    assert_eq!(rest.len(), 19);
    wait_until(Duration::from_secs(5), "every row recorded as sent", || async { unsent(&db).await == 0 }).await;
    running.stop().await;
}

#[tokio::test]
async fn a_failed_inline_send_on_one_replica_wakes_another_through_notify() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let down = SqsProxy::start(&queue.endpoint).await;
    down.set(SqsMode::Down);
    // Replica A accepts (its path to the queue is down) and runs no loop;
    // replica B runs the loop with a long interval.
    let replica_a = TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&down.endpoint)).await;
    let replica_b = RelayBuilder::new(&db, &queue).spec(|s| s.retry_interval = secs(300)).build().await;
    let running = RunningLoop::start(&replica_b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = Instant::now();
    assert_eq!(replica_a.post_new(&body(unique(), "w")).await.0, StatusCode::ACCEPTED);
    let delivered = queue.receive(1, Duration::from_secs(10)).await;
    assert_eq!(delivered.len(), 1);
    assert!(
        accepted.elapsed() < Duration::from_secs(5),
        "woken by NOTIFY, not by the interval: {:?}",
        accepted.elapsed()
    );
    running.stop().await;
}

#[tokio::test]
async fn a_poison_row_is_dead_lettered_after_one_attempt_and_the_rest_of_its_batch_is_sent() {
    let attributes = HashMap::from([(QueueAttributeName::MaximumMessageSize, "1024".to_owned())]);
    let (db, queue) = (TestDb::new().await, TestQueue::create(false, attributes).await);
    let relay = RelayBuilder::new(&db, &queue).build().await;
    for _ in 0..9 {
        insert_unsent(&db, "w").await;
    }
    let mut poison = body(unique(), "w");
    poison["ledger_payload"]["payload"]["memo"] = json!("x".repeat(2000));
    let poison = parse_request_body(&serde_json::to_vec(&poison).unwrap()).unwrap();
    db.store.insert(&poison, Intake::Queued).await.unwrap();

    let running = RunningLoop::start(&relay);
    wait_until(Duration::from_secs(15), "the batch is settled", || async { unsent(&db).await == 0 }).await;
    running.stop().await;
    let row = db.store.find_by_reference(&poison.reference).await.unwrap().unwrap();
    assert!(row.failed_at.is_some(), "dead-lettered");
    assert_eq!(row.attempts, 1, "at once, no retry storm");
    assert!(row.last_error.as_deref().unwrap_or_default().contains("InvalidParameterValue"), "{:?}", row.last_error);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NOT NULL").await, 9);
    assert_eq!(queue.drain().await.len(), 9);

    // The inline path dead-letters a poison row at once too, and still answers 202.
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    let mut inline_poison = body(unique(), "w");
    inline_poison["ledger_payload"]["payload"]["memo"] = json!("y".repeat(2000));
    let (status, tx) = app.post_new(&inline_poison).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(tx["failed_at"].is_string(), "{tx}");
}

#[tokio::test]
async fn on_a_fifo_queue_a_failing_row_holds_back_its_wallet_only_and_order_is_kept() {
    let (db, queue) = (TestDb::new().await, TestQueue::fifo().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    let app =
        TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).spec(|s| s.retry_interval = secs(60)))
            .await;
    let running = RunningLoop::start(&app.relay);

    proxy.set(SqsMode::Down);
    let (a1, a2, b1) = (unique(), unique(), unique());
    assert_eq!(app.post_new(&body(a1, "wallet-a")).await.0, StatusCode::ACCEPTED);
    // A1 failed and backs off: for an hour, so that nothing below races
    // the clock; the test ends the backoff itself once it has looked.
    db.execute(&format!(
        "UPDATE transactions SET next_attempt_at = now() + interval '1 hour' WHERE reference = 'MYK-{a1:06}'"
    ))
    .await;
    proxy.set(SqsMode::Forward);
    // The relay learns that the queue is back from its next successful send:
    // a row of a third wallet is the probe.
    assert_eq!(app.post_new(&body(unique(), "wallet-c")).await.0, StatusCode::ACCEPTED);
    assert_eq!(queue.receive(1, Duration::from_secs(10)).await.len(), 1, "the probe went through");
    let health = app.relay.health();
    wait_until(Duration::from_secs(5), "the loop sees the queue again", || {
        let health = health.clone();
        async move { health.borrow().queue_error.is_none() }
    })
    .await;

    let (status, held) = app.post_new(&body(a2, "wallet-a")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "wallet A's newer row waits behind its older one: {held}");
    assert_eq!(held["attempts"], 0, "it was not sent inline");
    let (status, _) = app.post_new(&body(b1, "wallet-b")).await;
    assert_eq!(status, StatusCode::CREATED, "another wallet is not held back");

    let group = |m: &aws_sdk_sqs::types::Message| {
        m.attributes
            .as_ref()
            .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::MessageGroupId))
            .cloned()
    };
    let first = queue.receive(1, Duration::from_secs(2)).await;
    assert_eq!(first.iter().map(group).collect::<Vec<_>>(), [Some("wallet-b".to_owned())]);
    assert!(queue.receive(1, Duration::from_secs(1)).await.is_empty(), "wallet A waits while A1 backs off");
    assert!(db.store.find_by_reference(&format!("MYK-{a2:06}")).await.unwrap().unwrap().message_id.is_none());

    db.execute(&format!("UPDATE transactions SET next_attempt_at = now() WHERE reference = 'MYK-{a1:06}'")).await;
    app.relay.outbox().wake();
    let wallet_a = queue.receive(2, Duration::from_secs(30)).await;
    running.stop().await;
    let order: Vec<String> =
        wallet_a.iter().filter_map(|m| crate::common::sqs::attribute(m, "idempotency_key")).collect();
    // On failure, say where each of wallet A's rows stands.
    let rows = db
        .scalar_text(&format!(
            "SELECT string_agg(format('%s attempts=%s sent=%s failed=%s due_in=%s claimed_until=%s error=%s', \
             reference, attempts, message_id IS NOT NULL, failed_at IS NOT NULL, next_attempt_at - now(), \
             claimed_until - now(), last_error), '; ' ORDER BY id) FROM transactions \
             WHERE reference IN ('MYK-{a1:06}', 'MYK-{a2:06}')"
        ))
        .await;
    assert_eq!(order, [format!("idem-{a1}"), format!("idem-{a2}")], "wallet A keeps its order; rows: {rows}");
}

#[tokio::test]
async fn max_attempts_is_honoured_under_repeated_transient_failures() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    // Every batch entry is refused with SenderFault=false: a passing
    // failure of the message itself, which counts an attempt.
    proxy.faults(|f| f.refuse_entries = Some(("MYK-".into(), false)));
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).spec(|s| {
        s.max_attempts = 3;
        s.retry_interval = secs(1);
    }))
    .await;
    let running = RunningLoop::start(&app.relay);
    let n = unique();
    insert_created(&db, &new_tx(n, "w")).await;
    app.relay.outbox().wake();
    let reference = format!("MYK-{n:06}");
    wait_until(Duration::from_secs(20), "dead-lettered after three attempts", || async {
        db.store.find_by_reference(&reference).await.unwrap().unwrap().failed_at.is_some()
    })
    .await;
    let calls = proxy.send_calls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.stop().await;
    let row = db.store.find_by_reference(&reference).await.unwrap().unwrap();
    assert_eq!(row.attempts, 3);
    assert!(row.last_error.unwrap_or_default().contains("InternalError"));
    assert_eq!(proxy.send_calls(), calls, "a dead-lettered row is not tried again");
}

#[tokio::test]
async fn the_backoff_schedule_follows_the_seeded_jitter() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    proxy.faults(|f| f.refuse_entries = Some(("MYK-".into(), false)));
    let seed = 20_261_126;
    let builder =
        RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).seed(seed).spec(|s| s.retry_interval = secs(60));
    let app = TestApp::new(&builder).await;
    let mut expected = fastrand::Rng::with_seed(seed);
    let backoff = Backoff::new(Duration::from_secs(60));

    let n = unique();
    insert_created(&db, &new_tx(n, "w")).await;
    let (_keep, never) = watch::channel(false);
    app.relay.drain().sweep(ClaimMode::Due, 10, &never).await.unwrap();
    let scheduled = |db: &TestDb| {
        let reference = format!("MYK-{n:06}");
        let store = db.store.clone();
        async move {
            let row = store.find_by_reference(&reference).await.unwrap().unwrap();
            ((row.next_attempt_at.expect("unsent") - row.updated_at).num_milliseconds(), row.attempts)
        }
    };
    let (delay, attempts) = scheduled(&db).await;
    assert_eq!(attempts, 1);
    let first = backoff.delay(1, &mut expected).as_millis() as i64;
    assert!((delay - first).abs() <= 50, "attempt 1: scheduled {delay} ms, expected {first} ms");

    // The second attempt draws the next number from the same sequence.
    db.execute("UPDATE transactions SET next_attempt_at = now()").await;
    app.relay.drain().sweep(ClaimMode::Due, 10, &never).await.unwrap();
    let (delay, attempts) = scheduled(&db).await;
    assert_eq!(attempts, 2);
    let second = backoff.delay(2, &mut expected).as_millis() as i64;
    assert!((delay - second).abs() <= 50, "attempt 2: scheduled {delay} ms, expected {second} ms");
    assert!(second <= 2000);
}

#[tokio::test]
async fn the_loop_survives_the_database_going_away_and_resumes_by_itself() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let db_proxy = TcpProxy::start(database_address(&db.url)).await;
    let relay = RelayBuilder::new(&db, &queue)
        .database_url(db_proxy.url_for(&db.url))
        .spec(|s| s.retry_interval = secs(300))
        .build()
        .await;
    let running = RunningLoop::start(&relay);
    tokio::time::sleep(Duration::from_millis(500)).await;
    db_proxy.set_up(false);
    // Rows arrive while the relay cannot see the database (inserted directly).
    for _ in 0..5 {
        insert_unsent(&db, "w").await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(unsent(&db).await, 5);
    db_proxy.set_up(true);
    let messages = queue.receive(5, Duration::from_secs(20)).await;
    assert_eq!(messages.len(), 5, "delivered once the database is back");
    wait_until(Duration::from_secs(5), "recorded", || async { unsent(&db).await == 0 }).await;
    running.stop().await;
}

#[tokio::test]
async fn retention_deletes_old_sent_rows_from_the_loop() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let relay = RelayBuilder::new(&db, &queue).spec(|s| s.retention = Some(secs(3600))).build().await;
    let old = insert_unsent(&db, "w").await;
    let kept_unsent = insert_unsent(&db, "w").await;
    db.store.record_sent(&[(txrelay::store::ClaimRef::unclaimed(old), "m".into())]).await.unwrap();
    db.execute(&format!(
        "UPDATE transactions SET created_at = now() - interval '2 hours', queue_sent_at = now() - interval '2 hours' WHERE id = {old}"
    ))
    .await;
    db.execute(&format!("UPDATE transactions SET created_at = now() - interval '2 hours', next_attempt_at = now() + interval '1 hour' WHERE id = {kept_unsent}")).await;
    let running = RunningLoop::start(&relay);
    wait_until(Duration::from_secs(10), "the old sent row is deleted", || async {
        db.scalar_i64(&format!("SELECT count(*) FROM transactions WHERE id = {old}")).await == 0
    })
    .await;
    running.stop().await;
    assert_eq!(db.scalar_i64(&format!("SELECT count(*) FROM transactions WHERE id = {kept_unsent}")).await, 1);
}
