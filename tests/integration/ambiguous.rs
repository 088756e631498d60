//! Ambiguous outcomes: a call the queue carried out whose reply never came,
//! a commit whose answer was lost, bookkeeping that drifted, a dead letter
//! in a FIFO wallet. Each is staged against the real PostgreSQL and moto,
//! with a proxy for the fault, and judged by what reaches the queue.

use std::collections::HashMap;
use std::time::Duration;

use axum::http::StatusCode;

use crate::common::proxy::{LostReply, SqsProxy, TcpProxy};
use crate::common::sqs::attribute;
use crate::common::*;

fn metric(app: &TestApp, series: &str) -> f64 {
    let series = series.replace("RELAY", &app.relay.id().to_string());
    app.metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Copies of each idempotency key in the queue, taking every message.
async fn copies_per_key(queue: &TestQueue) -> HashMap<String, usize> {
    let mut copies = HashMap::new();
    for message in queue.drain().await {
        *copies.entry(attribute(&message, "idempotency_key").expect("key attribute")).or_insert(0) += 1;
    }
    copies
}

/// Sends of one row keep losing their reply (dropped, or late past the call
/// timeout): each is an unknown outcome, counted as an attempt with backoff,
/// so the row is sent at most maxAttempts times and then dead-lettered.
/// Its batch-mates share the fate of a lost call, within the same bound,
/// and are delivered; rows posted later go out once each.
async fn lost_replies_are_bounded(lost: LostReply) {
    const MAX_ATTEMPTS: u32 = 3;
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    let unlucky = unique();
    proxy.faults(|f| f.lose_replies = Some((format!("idem-{unlucky}"), lost)));
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).spec(|s| {
        s.max_attempts = MAX_ATTEMPTS;
        // A 1 s call timeout (a third of the lease) and backoff of at most 1 s.
        s.claim_lease = secs(3);
        s.retry_interval = secs(1);
        s.inline_send_timeout = secs(1);
    }))
    .await;
    let running = RunningLoop::start(&app.relay);
    let (status, stored) = app.post_new(&body(unlucky, "w-unlucky")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "no answer is no 201: {stored}");
    let others: Vec<u64> = (0..5).map(|_| unique()).collect();
    for n in &others {
        let (status, _) = app.post_new(&body(*n, &format!("w-{n}"))).await;
        assert!(status == StatusCode::CREATED || status == StatusCode::ACCEPTED, "{status}");
    }
    wait_until(Duration::from_secs(30), "the other rows are sent and the unlucky one dead-lettered", || async {
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NOT NULL").await == others.len() as i64
            && db.scalar_i64("SELECT count(*) FROM transactions WHERE failed_at IS NOT NULL").await == 1
    })
    .await;
    let later: Vec<u64> = (0..3).map(|_| unique()).collect();
    for n in &later {
        app.post_new(&body(*n, &format!("w-{n}"))).await;
    }
    wait_until(Duration::from_secs(10), "later rows keep moving", || async {
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NOT NULL").await
            == (others.len() + later.len()) as i64
    })
    .await;
    running.stop().await;
    let unlucky_row = db.store.find_by_reference(&format!("MYK-{unlucky:06}")).await.unwrap().expect("stored");
    assert_eq!(unlucky_row.attempts, MAX_ATTEMPTS as i32, "each unanswered send counted: {unlucky_row:?}");
    let copies = copies_per_key(&queue).await;
    let unlucky_copies = copies.get(&format!("idem-{unlucky}")).copied().unwrap_or(0);
    assert!(
        (1..=MAX_ATTEMPTS as usize).contains(&unlucky_copies),
        "{lost:?}: {unlucky_copies} copies of a key whose replies were lost; the bound is maxAttempts ({MAX_ATTEMPTS})"
    );
    for n in others {
        let copies = copies.get(&format!("idem-{n}")).copied().unwrap_or(0);
        assert!((1..=MAX_ATTEMPTS as usize).contains(&copies), "{lost:?}: a batch-mate sent {copies} times");
    }
    for n in later {
        assert_eq!(copies.get(&format!("idem-{n}")), Some(&1), "{lost:?}: a later row: {copies:?}");
    }
    assert!(
        metric(&app, r#"txrelay_send_outcome_unknown_total{relay="RELAY"}"#) >= f64::from(MAX_ATTEMPTS),
        "every unanswered send is counted"
    );
}

#[tokio::test]
async fn a_dropped_reply_is_an_unknown_outcome_resent_at_most_max_attempts_times_while_other_rows_move() {
    lost_replies_are_bounded(LostReply::Dropped).await;
}

#[tokio::test]
async fn a_late_reply_is_an_unknown_outcome_resent_at_most_max_attempts_times_while_other_rows_move() {
    lost_replies_are_bounded(LostReply::Late(Duration::from_secs(3))).await;
}

/// The commit went through and its answer was lost: `/new` must not say
/// "nothing was stored". It answers 503 `outcome_unknown`, and the retry
/// with the same key and body is answered from the stored row; the queue
/// holds one copy.
#[tokio::test]
async fn a_commit_whose_answer_was_lost_is_outcome_unknown_and_the_retry_is_answered_from_the_row() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = TcpProxy::start(database_address(&db.url)).await;
    // In clear text, so the proxy can see which statement goes out.
    let separator = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}sslmode=disable", proxy.url_for(&db.url));
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).database_url(url)).await;
    let n = unique();
    // Every connection is new from here on, so the INSERT goes out with
    // its text (a prepared statement is parsed once per connection).
    proxy.set_up(false);
    proxy.set_up(true);
    proxy.lose_reply_after(b"INSERT INTO transactions");
    let (status, error) = app.post_new(&body(n, "w")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_eq!(error["error"]["code"], "outcome_unknown", "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.contains("nothing was stored"), "{message}");
    assert!(message.contains("same idempotency key"), "{message}");
    assert_eq!(
        db.scalar_i64(&format!("SELECT count(*) FROM transactions WHERE idempotency_key = 'idem-{n}'")).await,
        1,
        "the commit went through"
    );
    assert_eq!(metric(&app, r#"txrelay_commit_outcome_unknown_total{relay="RELAY"}"#), 1.0);

    let running = RunningLoop::start(&app.relay);
    let (status, replayed) = app.post_new(&body(n, "w")).await;
    assert_eq!(status, StatusCode::OK, "the retry finds the committed row: {replayed}");
    wait_until(Duration::from_secs(10), "the row is sent", || async {
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NOT NULL").await == 1
    })
    .await;
    let (status, again) = app.post_new(&body(n, "w")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(again["message_id"].is_string(), "the original message id: {again}");
    running.stop().await;
    assert_eq!(copies_per_key(&queue).await.get(&format!("idem-{n}")), Some(&1), "one copy, never two");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 1, "never a second row");
}

/// A database that could not be reached at all: nothing was sent to it, so
/// "nothing was stored" is known, and said.
#[tokio::test]
async fn a_database_that_refuses_connections_answers_that_nothing_was_stored() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = TcpProxy::start(database_address(&db.url)).await;
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).database_url(proxy.url_for(&db.url))).await;
    proxy.set_up(false);
    let (status, error) = app.post_new(&body(unique(), "w")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_eq!(error["error"]["code"], "database_unavailable", "{error}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 0);
}
