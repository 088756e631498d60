//! A relay's lifecycle under the operator: shutdown within the grace
//! period, resends in progress at shutdown or reconfiguration, and the
//! Events a resend by hand leaves on its resource.

use super::*;

#[tokio::test]
async fn shutdown_stops_every_relay_at_once_within_the_grace_period_leaving_no_row_claimed() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = crate::common::proxy::SqsProxy::start(&queue.endpoint).await;
    proxy.faults(|f| f.send_delay = Some(Duration::from_secs(3)));
    let op = operator(true); // grace period: 5 s
    let mut dbs = Vec::new();
    for name in ["one", "two", "three"] {
        let db = TestDb::new().await;
        for _ in 0..200 {
            insert_created(&db, &new_tx(unique(), "w")).await;
        }
        let secret = format!("{name}-db");
        op.api.put_secret(NAMESPACE, &secret, &[("url", &db.url)]);
        put_queue_secret(&op.api, &queue, &proxy.endpoint, None);
        op.api.put_secret(NAMESPACE, "dapp-tokens", &[("ingest", INGEST_TOKEN)]);
        let mut relay = resource(&db, name, 1);
        relay.spec.database.secret_ref.name = secret;
        relay.spec.concurrency = 1;
        reconcile(Arc::new(relay), op.ctx.clone()).await.expect("reconciled");
        dbs.push(db);
    }
    for db in &dbs {
        wait_until(Duration::from_secs(20), "every relay is mid-drain", || async {
            db.scalar_i64("SELECT count(*) FROM transactions WHERE claimed_until > now()").await > 0
        })
        .await;
    }
    let started = std::time::Instant::now();
    op.ctx.supervisor.stop_all().await;
    let took = started.elapsed();
    assert!(took <= Duration::from_secs(6), "three relays stopped within one 5 s grace period: {took:?}");
    for db in &dbs {
        let claimed = db
            .scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL AND claimed_until IS NOT NULL")
            .await;
        assert_eq!(claimed, 0, "no row left claimed for a lease to run out");
    }
    drop(db);
}

/// What a resend answered when the relay shut down while it was sending.
struct ResendAtShutdown {
    /// The resend had not answered when the shutdown started.
    still_sending: bool,
    status: StatusCode,
    answer: Value,
    /// The row's message id as stored afterwards.
    stored: Option<String>,
}

/// Runs an operator (grace period 5 s, rows given back from 3.75 s) with one
/// dead-lettered row, resends it over HTTP with every send taking
/// `send_delay`, and shuts down once the send is under way. The row is dead
/// before the relay starts: its loop leaves it to the resend, so every send
/// the proxy sees is the resend's.
async fn resend_then_shut_down(send_delay: Duration) -> ResendAtShutdown {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = crate::common::proxy::SqsProxy::start(&queue.endpoint).await;
    let op = operator(true);
    put_secrets(&op.api, &db, &queue);
    put_queue_secret(&op.api, &queue, &proxy.endpoint, None);
    op.api.put_secret(NAMESPACE, "dapp-tokens", &[("ingest", INGEST_TOKEN), ("admin", ADMIN_TOKEN)]);
    let row = insert_created(&db, &new_tx(unique(), "w")).await;
    db.execute(&format!("UPDATE transactions SET failed_at = now() WHERE id = {}", row.id)).await;
    let mut relay = resource(&db, "dapp", 1);
    relay.spec.admin =
        Some(TokenSpec { token_secret_ref: SecretKeyRef { name: "dapp-tokens".into(), key: Some("admin".into()) } });
    reconcile(Arc::new(relay), op.ctx.clone()).await.expect("reconciled");
    let router = api_router(AppState::new(op.relays.clone(), op.metrics.clone(), HttpOptions::default()));
    let app = Arc::new(TestApp { router, relay: op.relays.resolve(None).unwrap().relay, metrics: op.metrics.clone() });

    proxy.faults(|f| f.send_delay = Some(send_delay));
    let resend = {
        let app = app.clone();
        let path = format!("/transactions/{}/retry", row.id);
        tokio::spawn(
            async move { app.request("POST", &path, Some(ADMIN_TOKEN), "application/json", b"{}".to_vec()).await },
        )
    };
    wait_until(Duration::from_secs(5), "the resend is sending", || async { proxy.send_calls() > 0 }).await;
    let still_sending = !resend.is_finished();
    op.ctx.supervisor.stop_all().await;
    let (status, answer) = resend.await.unwrap();
    let stored = db.store.find_by_reference(&row.reference).await.unwrap().unwrap().message_id;
    ResendAtShutdown { still_sending, status, answer, stored }
}

/// A resend the HTTP API started holds its row among the relay's claimed
/// rows. A shutdown gives back what is still claimed; done before the
/// resend has recorded its send, the row was released under it: its message
/// id was lost and another replica would send it again.
#[tokio::test]
async fn shutdown_lets_a_resend_in_progress_record_its_send_before_giving_rows_back() {
    let ResendAtShutdown { still_sending, status, answer, stored } =
        resend_then_shut_down(Duration::from_millis(1500)).await;
    assert!(still_sending, "still sending when the shutdown starts");
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(stored.as_deref(), answer["message_id"].as_str(), "the send is recorded: {answer}");
    assert!(stored.is_some());
}

/// A resend whose send outlasts the shutdown's wait (a call may take a third
/// of the lease, longer than the grace period's share for sends) has its row
/// given back before it can record the message id. It must not answer 200
/// with a message id nothing recorded: the relay will send the row again.
#[tokio::test]
async fn a_resend_whose_claim_ends_before_its_send_is_recorded_does_not_answer_sent() {
    // Returns after the rows are given back (3.75 s) and before the store
    // closes (5 s).
    let ResendAtShutdown { status, answer, stored, .. } = resend_then_shut_down(Duration::from_millis(4400)).await;
    assert_eq!(stored, None, "given back before the send was recorded");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "not answered as sent: {answer}");
    assert_eq!(answer["error"]["code"], "not_recorded", "{answer}");
    assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains("send the row again")), "{answer}");
}

#[tokio::test]
async fn a_reconfigured_relay_keeps_its_store_open_for_requests_still_in_progress() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = crate::common::proxy::SqsProxy::start(&queue.endpoint).await;
    let op = operator(true);
    put_secrets(&op.api, &db, &queue);
    put_queue_secret(&op.api, &queue, &proxy.endpoint, None);
    let relay = resource(&db, "dapp", 1);
    reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.expect("reconciled");
    let router = api_router(AppState::new(op.relays.clone(), op.metrics.clone(), HttpOptions::default()));
    let app = Arc::new(TestApp { router, relay: op.relays.resolve(None).unwrap().relay, metrics: op.metrics.clone() });

    // A request reaches the relay and its send is slow...
    proxy.faults(|f| f.send_delay = Some(Duration::from_millis(1500)));
    let n = unique();
    let request = {
        let app = app.clone();
        tokio::spawn(async move { app.post_new(&body(n, "w")).await })
    };
    wait_until(Duration::from_secs(5), "the request is sending", || async { proxy.send_calls() > 0 }).await;
    // ...while the relay is reconfigured (a new ledger token).
    put_queue_secret(&op.api, &queue, &proxy.endpoint, Some("another-ledger-token"));
    reconcile(Arc::new(relay), op.ctx.clone()).await.expect("reconfigured");
    let (status, tx) = request.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "its message id was recorded: {tx}");
    let stored = db.store.find_by_reference(&format!("MYK-{n:06}")).await.unwrap().unwrap();
    assert_eq!(stored.message_id.as_deref(), tx["message_id"].as_str());
    op.ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn a_resend_by_hand_under_the_operator_is_an_event_on_the_relay() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let (op, _) = with_relay(&db, &queue, "dapp").await;
    let handle = op.relays.resolve(None).expect("serving");
    // Dead-lettered from the start, so the running relay never takes it.
    db.execute(&raw_insert("dead", "w", &[("failed_at", "now()"), ("last_error", "'refused'")])).await;
    let id = db.scalar_i64("SELECT id FROM transactions WHERE reference = 'dead'").await;
    let audit =
        txrelay::store::ResendAudit { actor: "admin token sha256:0123456789ab".into(), via: "http", command: "retry" };
    // Its stored payload is not a ledger payload: the resend fails, and is
    // audited all the same.
    assert!(handle.relay.resend().retry_one(id, &audit).await.is_err());
    wait_until(Duration::from_secs(10), "the resend Event", || async {
        op.api.events().iter().any(|e| {
            e["reason"] == "Resend"
                && e["regarding"]["name"] == "dapp"
                && e["note"].as_str().is_some_and(|n| {
                    n.contains("retry by admin token sha256:0123456789ab via http") && n.contains("0 sent, 1 failed")
                })
        })
    })
    .await;
    op.ctx.supervisor.stop_all().await;
}
