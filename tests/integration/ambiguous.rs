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
        app.metric(r#"txrelay_send_outcome_unknown_total{relay="RELAY"}"#) >= f64::from(MAX_ATTEMPTS),
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
    assert_eq!(app.metric(r#"txrelay_commit_outcome_unknown_total{relay="RELAY"}"#), 1.0);

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

fn audit(command: &'static str) -> txrelay::store::ResendAudit {
    txrelay::store::ResendAudit { actor: "test".into(), via: "cli", command }
}

async fn row_of(db: &TestDb, n: u64) -> txrelay::transaction::Transaction {
    db.store.find_by_reference(&format!("MYK-{n:06}")).await.unwrap().expect("stored")
}

/// On a FIFO queue, a dead-lettered row keeps holding its wallet: the
/// wallet's later rows wait until it is retried (then both go, in order) or
/// skipped on purpose (audited). Other wallets keep moving meanwhile.
#[tokio::test]
async fn on_a_fifo_queue_a_dead_letter_holds_its_wallet_until_retried_or_skipped() {
    let (db, queue) = (TestDb::new().await, TestQueue::fifo().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    let (deposit, withdrawal) = (unique(), unique());
    proxy.faults(|f| f.refuse_entries = Some((format!("MYK-{deposit:06}"), true)));
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint)).await;
    let running = RunningLoop::start(&app.relay);
    app.post_new(&body(deposit, "wallet-w")).await;
    wait_until(Duration::from_secs(10), "the deposit is dead-lettered", || async {
        row_of(&db, deposit).await.failed_at.is_some()
    })
    .await;
    let (status, _) = app.post_new(&body(withdrawal, "wallet-w")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "held behind the dead letter: not sent inline");
    // Another wallet's row goes through, and the gauge has been read since:
    // the relay has had every chance to send the withdrawal.
    let elsewhere = unique();
    app.post_new(&body(elsewhere, "wallet-x")).await;
    wait_until(Duration::from_secs(20), "another wallet moves and one wallet is counted as held", || async {
        row_of(&db, elsewhere).await.message_id.is_some()
            && app.metric(r#"txrelay_fifo_held_wallets{relay="RELAY"}"#) == 1.0
    })
    .await;
    assert_eq!(row_of(&db, withdrawal).await.message_id, None, "the withdrawal waits for its deposit");
    let refused = app.relay.resend().retry_one(row_of(&db, withdrawal).await.id, &audit("retry")).await;
    assert!(refused.is_err_and(|e| e.to_string().contains("txrelay skip")), "retry of the later row is refused");

    proxy.faults(|f| f.refuse_entries = None);
    app.relay.resend().retry_one(row_of(&db, deposit).await.id, &audit("retry")).await.expect("the deposit is retried");
    wait_until(Duration::from_secs(10), "the withdrawal follows", || async {
        row_of(&db, withdrawal).await.message_id.is_some()
    })
    .await;
    let order: Vec<String> = queue
        .drain()
        .await
        .iter()
        .filter_map(|m| attribute(m, "reference"))
        .filter(|r| r != &format!("MYK-{elsewhere:06}"))
        .collect();
    assert_eq!(order, [format!("MYK-{deposit:06}"), format!("MYK-{withdrawal:06}")], "the deposit lands first");

    // Skipped on purpose: the row stays dead-lettered, the wallet goes on.
    let (stuck, next) = (unique(), unique());
    proxy.faults(|f| f.refuse_entries = Some((format!("MYK-{stuck:06}"), true)));
    app.post_new(&body(stuck, "wallet-v")).await;
    wait_until(Duration::from_secs(10), "dead-lettered", || async { row_of(&db, stuck).await.failed_at.is_some() })
        .await;
    app.post_new(&body(next, "wallet-v")).await;
    let stuck_id = row_of(&db, stuck).await.id;
    app.relay.resend().skip_one(stuck_id, &audit("skip")).await.expect("a dead letter can be skipped");
    wait_until(Duration::from_secs(10), "the wallet goes on", || async {
        row_of(&db, next).await.message_id.is_some()
    })
    .await;
    assert!(row_of(&db, stuck).await.failed_at.is_some(), "the skipped row stays dead-lettered");
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM resend_audit WHERE command = 'skip' AND transaction_ids = ARRAY[{stuck_id}::bigint] \
             AND outcome LIKE 'skipped%'"
        ))
        .await,
        1,
        "the skip is audited"
    );
    assert!(app.relay.resend().skip_one(stuck_id, &audit("skip")).await.is_err(), "skipped once only");
    running.stop().await;
}

/// A row written by hand (psql, a bulk fix), as the old tools write it.
fn raw_ledger_insert(n: u64, wallet: &str) -> String {
    let payload = body(n, wallet)["ledger_payload"].to_string().replace('\'', "''");
    format!(
        "INSERT INTO transactions (reference, external_reference, idempotency_key, transaction_type, status, source, \
         instruction_type, incoming_currency, outgoing_currency, value, fee, wallet_address, payload) VALUES \
         ('MYK-{n:06}', 'ext-{n}', 'idem-{n}', 'DEPOSIT', 'PENDING_PAYER', 'ANCHOR_SOLANA', 'Transaction', 'EUR', \
         'EURC', 100, 1.5, '{wallet}', '{payload}')"
    )
}

/// Rows written under `session_replication_role = replica` (bulk fixes,
/// replication tools) are followed by the triggers; rows written with the
/// triggers disabled are found by the relay's drift reconciliation, counted
/// and delivered; `doctor`'s check sees the drift first.
#[tokio::test]
async fn rows_written_around_the_triggers_are_listed_counted_and_delivered() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let (replica, disabled) = (unique(), unique());
    let mut session = db.psql.begin().await.unwrap();
    for sql in ["SET LOCAL session_replication_role = replica".to_owned(), raw_ledger_insert(replica, "w")] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *session).await.unwrap();
    }
    session.commit().await.unwrap();
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM unsent_transactions").await,
        1,
        "the triggers fire under the replica role"
    );
    db.execute("ALTER TABLE transactions DISABLE TRIGGER unsent_transactions_follow").await;
    db.execute(&raw_ledger_insert(disabled, "w")).await;
    db.execute("ALTER TABLE transactions ENABLE ALWAYS TRIGGER unsent_transactions_follow").await;
    assert_eq!(db.store.count_unsent_drift().await.unwrap(), 1, "doctor's check sees the drift");

    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    let running = RunningLoop::start(&app.relay);
    wait_until(Duration::from_secs(10), "both rows are delivered", || async {
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NOT NULL").await == 2
    })
    .await;
    running.stop().await;
    assert_eq!(app.metric(r#"txrelay_unsent_drift_repaired_total{relay="RELAY"}"#), 1.0, "the repair is counted");
    assert_eq!(db.store.count_unsent_drift().await.unwrap(), 0);
    let copies = copies_per_key(&queue).await;
    assert_eq!(copies.get(&format!("idem-{replica}")), Some(&1));
    assert_eq!(copies.get(&format!("idem-{disabled}")), Some(&1));
    db.assert_unsent_rows_followed().await;
}

/// Retention deletes a sent row; a replay of its key within the
/// idempotency window is answered 200 from the retired record with the
/// original message id (409 for another body), and nothing is stored or
/// sent again. After the window the record goes.
#[tokio::test]
async fn a_replay_after_retention_is_recognised_within_the_idempotency_window_and_never_sent_twice() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).spec(|s| s.retention = Some(secs(3600)))).await;
    let n = unique();
    let (status, first) = app.post_new(&body(n, "w")).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    // Two hours pass for this row: retention (1 h) deletes it at the loop's first turn.
    db.execute(
        "UPDATE transactions SET created_at = now() - interval '2 hours', queue_sent_at = now() - interval '2 hours'",
    )
    .await;
    let running = RunningLoop::start(&app.relay);
    wait_until(Duration::from_secs(10), "retention deletes the sent row", || async {
        db.scalar_i64("SELECT count(*) FROM transactions").await == 0
    })
    .await;
    running.stop().await;

    let (status, replay) = app.post_new(&body(n, "w")).await;
    assert_eq!(status, StatusCode::OK, "{replay}");
    assert_eq!(replay["message_id"], first["message_id"], "the original message id: {replay}");
    assert_eq!(replay["retired"], true, "{replay}");
    let mut other = body(n, "w");
    other["ledger_payload"]["payload"]["value"] = "200.00".into();
    let (status, error) = app.post_new(&other).await;
    assert_eq!(status, StatusCode::CONFLICT, "{error}");
    assert_eq!(error["error"]["code"], "idempotency_key_reused");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 0, "nothing stored again");
    assert_eq!(copies_per_key(&queue).await.get(&format!("idem-{n}")), Some(&1), "never sent twice");

    db.execute("UPDATE retired_transactions SET created_at = now() - interval '31 days'").await;
    let window = Duration::from_secs(30 * 86_400);
    assert_eq!(db.store.expire_retired_older_than(window, 100).await.unwrap(), 1, "the window ends");
}

/// A server error (5xx) may come after SQS took the call (AWS: "may or may
/// not have been processed"; a gateway that forwarded it and timed out
/// answers 502/504): an unknown outcome, counted as an attempt, never a
/// hold that resends the same rows every second without limit.
#[tokio::test]
async fn a_server_error_answer_is_an_unknown_outcome_and_counts_an_attempt() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    let app =
        TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).spec(|s| s.max_attempts = 5)).await;
    let (_keep, stop) = tokio::sync::watch::channel(false);
    for (status, code) in [(500, "InternalError"), (502, "BadGateway"), (503, "ServiceUnavailable")] {
        proxy.faults(|f| f.send_error = Some((status, code)));
        let n = unique();
        insert_created(&db, &new_tx(n, "w")).await;
        let report = app.relay.drain().sweep(txrelay::store::ClaimMode::Due, 100, &stop).await.unwrap();
        assert!(report.queue_error.is_some(), "{code}: the queue is suspect: {report:?}");
        assert_eq!(row_of(&db, n).await.attempts, 1, "{code}: an attempt is counted, so resends are bounded");
        db.execute("DELETE FROM transactions").await;
    }
    assert_eq!(app.metric(r#"txrelay_send_outcome_unknown_total{relay="RELAY"}"#), 3.0);
}
