//! `POST /new` and the read endpoints, through the real router, against the
//! real database and moto.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use txrelay::metrics::Metrics;
use txrelay::queue::{OutboundMessage, Queue, SendFailure, SendResult};
use txrelay::relay::{Relay, RelayConfig};

use crate::common::proxy::{SqsMode, SqsProxy, TcpProxy};
use crate::common::sqs::attribute;
use crate::common::*;

async fn stored_payload(db: &TestDb, reference: &str) -> String {
    sqlx::query_scalar("SELECT payload::text FROM transactions WHERE reference = $1")
        .bind(reference)
        .fetch_one(db.store.pool())
        .await
        .unwrap()
}

fn without_token(mut value: Value) -> Value {
    value["meta_data"].as_object_mut().unwrap().remove("token");
    value
}

#[tokio::test]
async fn new_transaction_is_committed_sent_inline_and_answered_201() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    let n = unique();
    let (status, tx) = app.post_new(&body(n, "wallet-1")).await;
    assert_eq!(status, StatusCode::CREATED, "{tx}");
    let message_id = tx["message_id"].as_str().expect("message id recorded").to_owned();
    assert!(tx["queue_sent_at"].is_string());
    assert_eq!(tx["value"], "100.000000");
    assert_eq!(tx["attempts"], 1);
    let mut free = body(unique(), "wallet-1");
    free["ledger_payload"]["payload"]["fee"] = json!(0);
    let (_, free) = app.post_new(&free).await;
    assert_eq!(free["fee"], "0.000000", "amounts always show their six stored decimals");

    let messages = queue.receive(2, Duration::from_secs(5)).await;
    assert_eq!(messages.len(), 2);
    let message =
        messages.iter().find(|m| m.message_id.as_deref() == Some(message_id.as_str())).expect("the first message");
    assert_eq!(message.message_id.as_deref(), Some(message_id.as_str()));
    let reference = format!("MYK-{n:06}");
    // Without a ledger token configured, the stored payload goes out byte for byte.
    assert_eq!(message.body.as_deref().unwrap(), stored_payload(&db, &reference).await);
    assert!(!message.body.as_deref().unwrap().contains(CLIENT_TOKEN));
    assert_eq!(attribute(message, "idempotency_key").as_deref(), Some(format!("idem-{n}").as_str()));
    assert_eq!(attribute(message, "reference").as_deref(), Some(reference.as_str()));
    assert_eq!(attribute(message, "source").as_deref(), Some("ANCHOR_SOLANA"));
    let row = db.store.find_by_reference(&reference).await.unwrap().unwrap();
    assert_eq!(row.message_id.as_deref(), Some(message_id.as_str()));
}

#[tokio::test]
async fn queued_body_is_the_stored_payload_with_the_relay_token_never_the_clients() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).ledger_token("relay-ledger-token")).await;
    let n = unique();
    let request = body(n, "w");
    assert_eq!(app.post_new(&request).await.0, StatusCode::CREATED);

    let stored = stored_payload(&db, &format!("MYK-{n:06}")).await;
    let stored_json: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored_json, without_token(request["ledger_payload"].clone()), "stored = received minus the token");

    let message = queue.receive(1, Duration::from_secs(5)).await.pop().expect("one message");
    let sent: Value = serde_json::from_str(message.body.as_deref().unwrap()).unwrap();
    assert_eq!(sent["meta_data"]["token"], "relay-ledger-token");
    assert_eq!(without_token(sent), stored_json);
    let anywhere =
        db.scalar_i64(&format!("SELECT count(*) FROM transactions WHERE payload::text LIKE '%{CLIENT_TOKEN}%'")).await;
    assert_eq!(anywhere, 0, "the client's token is never stored");
}

#[tokio::test]
async fn queue_down_still_commits_and_answers_202_without_counting_an_attempt() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    proxy.set(SqsMode::Down);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint)).await;
    let n = unique();
    let (status, tx) = app.post_new(&body(n, "w")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{tx}");
    assert_eq!(tx["message_id"], Value::Null);
    assert_eq!(tx["attempts"], 0, "an unreachable queue costs the row no attempt");
    assert!(tx["last_error"].is_string(), "but the error is shown: {tx}");
    let row = db.store.find_by_reference(&format!("MYK-{n:06}")).await.unwrap().expect("row committed");
    assert_eq!(row.message_id, None);
    assert_eq!(row.failed_at, None);

    // While the queue stays down, later requests still answer 202 at once.
    let started = std::time::Instant::now();
    assert_eq!(app.post_new(&body(unique(), "w")).await.0, StatusCode::ACCEPTED);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(queue.drain().await.is_empty());
}

/// Wraps the real queue and checks, from another connection, that the row
/// is committed at the moment it is sent.
struct CommitCheckingQueue {
    inner: Arc<dyn Queue>,
    db: TestDb,
    seen_committed: std::sync::Mutex<Vec<bool>>,
}

impl CommitCheckingQueue {
    /// Records, from another connection, whether each row is committed.
    async fn look(&self, messages: &[OutboundMessage]) {
        let other = TestDb::store_at(&self.db.url, &self.db.schema);
        for message in messages {
            let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM transactions WHERE idempotency_key = $1")
                .bind(&message.idempotency_key)
                .fetch_one(other.pool())
                .await
                .unwrap();
            self.seen_committed.lock().unwrap().push(visible == 1);
        }
    }
}

impl Queue for CommitCheckingQueue {
    fn is_fifo(&self) -> bool {
        self.inner.is_fifo()
    }

    fn send<'a>(&'a self, message: &'a OutboundMessage) -> BoxFuture<'a, SendResult> {
        Box::pin(async move {
            self.look(std::slice::from_ref(message)).await;
            self.inner.send(message).await
        })
    }

    fn send_batch<'a>(
        &'a self,
        messages: &'a [OutboundMessage],
    ) -> BoxFuture<'a, Result<Vec<SendResult>, SendFailure>> {
        Box::pin(async move {
            self.look(messages).await;
            self.inner.send_batch(messages).await
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SendFailure>> {
        self.inner.check()
    }
}

#[tokio::test]
async fn the_row_is_committed_before_the_message_is_sent() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let builder = RelayBuilder::new(&db, &queue);
    let real = builder.build().await;
    let sqs = txrelay::queue::sqs::SqsQueue::new(&builder.settings().sqs_settings()).await.unwrap();
    let checking = Arc::new(CommitCheckingQueue {
        inner: Arc::new(sqs),
        db: TestDb { url: db.url.clone(), schema: db.schema.clone(), store: db.store.clone(), psql: db.psql.clone() },
        seen_committed: Default::default(),
    });
    let relay = Arc::new(Relay::new(
        real.id().clone(),
        RelayConfig::from(&builder.spec),
        db.store.clone(),
        checking.clone(),
        None,
        Metrics::new().relay("test"),
    ));
    let tx = new_tx(unique(), "w");
    assert!(matches!(relay.ingest().submit(&tx).await.unwrap(), txrelay::relay::Submission::Sent(_)));
    assert_eq!(*checking.seen_committed.lock().unwrap(), [true]);
}

#[tokio::test]
async fn replay_with_same_key_and_content_returns_200_and_sends_nothing() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    let request = body(unique(), "w");
    let (status, first) = app.post_new(&request).await;
    assert_eq!(status, StatusCode::CREATED);
    let mut rotated_token = request.clone();
    rotated_token["ledger_payload"]["meta_data"]["token"] = json!("a-newer-client-token");
    for replay in [&request, &rotated_token] {
        let (status, again) = app.post_new(replay).await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["id"], first["id"]);
        assert_eq!(again["message_id"], first["message_id"]);
    }
    assert_eq!(queue.drain().await.len(), 1, "a replay sends nothing");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 1);
}

#[tokio::test]
async fn conflicts_answer_409_naming_the_field_and_store_nothing() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    let original = body(unique(), "w");
    assert_eq!(app.post_new(&original).await.0, StatusCode::CREATED);

    let mut other_content = original.clone();
    other_content["ledger_payload"]["payload"]["value"] = json!("999.00");
    let mut same_reference = body(unique(), "w");
    same_reference["ledger_payload"]["payload"]["reference"] =
        original["ledger_payload"]["payload"]["reference"].clone();
    let mut same_external = body(unique(), "w");
    same_external["ledger_payload"]["payload"]["external_reference"] =
        original["ledger_payload"]["payload"]["external_reference"].clone();
    let mut other_wallet = original.clone();
    other_wallet["wallet_address"] = json!("another-wallet");

    for (request, field) in [
        (&other_content, "ledger_payload.meta_data.idempotency_key"),
        (&other_wallet, "ledger_payload.meta_data.idempotency_key"),
        (&same_reference, "ledger_payload.payload.reference"),
        (&same_external, "ledger_payload.payload.external_reference"),
    ] {
        let (status, error) = app.post_new(request).await;
        assert_eq!(status, StatusCode::CONFLICT, "{error}");
        assert_eq!(error["error"]["field"], field);
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 1);
    assert_eq!(queue.drain().await.len(), 1);
}

#[tokio::test]
async fn each_client_error_has_its_status_and_stores_and_sends_nothing() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    let valid = serde_json::to_vec(&body(unique(), "w")).unwrap();
    let mut negative = body(unique(), "w");
    negative["ledger_payload"]["payload"]["value"] = json!("-5");
    let mut huge = body(unique(), "w");
    huge["ledger_payload"]["payload"]["note"] = json!("x".repeat(70 * 1024));

    type Case<'a> = (&'a str, Option<&'a str>, &'a str, Vec<u8>, StatusCode, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "/new",
            Some(INGEST_TOKEN),
            "application/json",
            b"{\"wallet_address\": ".to_vec(),
            StatusCode::BAD_REQUEST,
            None,
        ),
        ("/new", Some(INGEST_TOKEN), "text/plain", valid.clone(), StatusCode::UNSUPPORTED_MEDIA_TYPE, None),
        (
            "/new",
            Some(INGEST_TOKEN),
            "application/json",
            serde_json::to_vec(&huge).unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
        (
            "/new",
            Some(INGEST_TOKEN),
            "application/json",
            serde_json::to_vec(&negative).unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("ledger_payload.payload.value"),
        ),
        ("/new", None, "application/json", valid.clone(), StatusCode::UNAUTHORIZED, None),
        ("/new", Some("wrong-token"), "application/json", valid.clone(), StatusCode::UNAUTHORIZED, None),
        (
            "/relays/nowhere/nothing/new",
            Some(INGEST_TOKEN),
            "application/json",
            valid.clone(),
            StatusCode::NOT_FOUND,
            None,
        ),
    ];
    for (path, token, content_type, bytes, expected, field) in cases {
        let (status, error) = app.request("POST", path, token, content_type, bytes).await;
        assert_eq!(status, expected, "{path} {content_type}: {error}");
        assert!(error["error"]["code"].is_string(), "JSON error body: {error}");
        assert!(error["error"]["message"].is_string());
        if let Some(field) = field {
            assert_eq!(error["error"]["field"], field);
        }
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 0);
    assert!(queue.drain().await.is_empty());
}

#[tokio::test]
async fn a_suspended_relay_stores_and_answers_202_but_sends_nothing() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).spec(|s| s.suspend = true)).await;
    let running = RunningLoop::start(&app.relay);
    let (status, tx) = app.post_new(&body(unique(), "w")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(tx["attempts"], 0);
    assert!(queue.receive(1, Duration::from_secs(2)).await.is_empty());
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL").await, 1);
    running.stop().await;
}

#[tokio::test]
async fn database_unreachable_answers_503_with_retry_after_and_sends_nothing() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = TcpProxy::start(database_address(&db.url)).await;
    let builder = RelayBuilder::new(&db, &queue).database_url(proxy.url_for(&db.url));
    let app = TestApp::new(&builder).await;
    proxy.set_up(false);
    let (status, headers, error) = app.post_new_response(&body(unique(), "w")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_eq!(error["error"]["code"], "database_unavailable");
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let (status, _) = app.request("GET", "/readyz", None, "application/json", Vec::new()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(queue.drain().await.is_empty());
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 0);

    proxy.set_up(true);
    let (status, _) = app.post_new(&body(unique(), "w")).await;
    assert_eq!(status, StatusCode::CREATED, "recovers once the database is back");
}

#[tokio::test]
async fn read_endpoints_find_filter_and_page() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    let app = TestApp::new(
        &RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).spec(|s| s.unsent_warning_threshold = 2),
    )
    .await;
    let mut references = Vec::new();
    for i in 0..5 {
        if i == 3 {
            proxy.set(SqsMode::Down);
        }
        let n = unique();
        references.push(format!("MYK-{n:06}"));
        app.post_new(&body(n, if i % 2 == 0 { "even" } else { "odd" })).await;
    }
    let (status, one) = app.get(&format!("/transactions/{}", references[0])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["reference"], references[0]);
    assert_eq!(app.get("/transactions/MYK-nope").await.0, StatusCode::NOT_FOUND);

    let (_, page) = app.get("/transactions?limit=2").await;
    assert_eq!(page["transactions"].as_array().unwrap().len(), 2);
    let after = page["next_after_id"].as_i64().expect("a next page");
    let (_, rest) = app.get(&format!("/transactions?limit=10&after_id={after}")).await;
    assert_eq!(rest["transactions"].as_array().unwrap().len(), 3);
    assert_eq!(rest["next_after_id"], Value::Null);

    let (_, even) = app.get("/transactions?wallet_address=even").await;
    assert_eq!(even["transactions"].as_array().unwrap().len(), 3);
    let (_, unsent) = app.get("/transactions?unsent=true").await;
    assert_eq!(unsent["transactions"].as_array().unwrap().len(), 2);
    assert_eq!(app.get("/transactions?limit=5000").await.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.get("/transactions?bogus=1").await.0, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = app.request("GET", "/transactions", Some(INGEST_TOKEN), "application/json", Vec::new()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "reads need the admin token");

    let (_, health) = app.get("/health/transactions").await;
    assert_eq!(health, json!({"status": "warning", "unsent_count": 2, "failed_count": 0, "total_count": 5}));
}

#[tokio::test]
async fn concurrent_inline_sends_each_get_their_own_message_id_recorded() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    // Forty sends at once queue up inside moto: the timeout is generous so
    // that a slow machine still answers 201 to each (what is under test is
    // that every request records its own message id, not moto's speed).
    let app = std::sync::Arc::new(
        TestApp::new(&RelayBuilder::new(&db, &queue).spec(|s| {
            s.claim_lease = secs(120);
            s.inline_send_timeout = secs(30);
        }))
        .await,
    );
    let requests = (0..40).map(|_| {
        let app = app.clone();
        tokio::spawn(async move { app.post_new(&body(unique(), "w")).await })
    });
    let answers = futures::future::join_all(requests).await;
    let mut message_ids = std::collections::HashSet::new();
    for answer in answers {
        let (status, tx) = answer.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{tx}");
        let stored = db.store.find_by_id(tx["id"].as_i64().unwrap()).await.unwrap().unwrap();
        assert_eq!(stored.message_id.as_deref(), tx["message_id"].as_str());
        assert!(message_ids.insert(stored.message_id.unwrap()));
    }
    let delivered: std::collections::HashSet<String> =
        queue.receive(40, Duration::from_secs(20)).await.into_iter().filter_map(|m| m.message_id).collect();
    assert_eq!(delivered, message_ids);
}

#[tokio::test]
async fn a_held_back_fifo_row_is_answered_202_even_when_its_release_fails() {
    let (db, queue) = (TestDb::new().await, TestQueue::fifo().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    // An older unsent row of the wallet, backing off: the new one waits.
    let older = insert_created(&db, &new_tx(unique(), "wallet-a")).await;
    db.execute(&format!("UPDATE transactions SET next_attempt_at = now() + interval '1 hour' WHERE id = {}", older.id))
        .await;
    let n = unique();
    // Releasing the new row fails, as any write can when the database falters.
    db.execute(
        "CREATE FUNCTION refuse_release() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'release refused by the test'; END $$",
    )
    .await;
    db.execute(&format!(
        "CREATE TRIGGER refuse_release BEFORE UPDATE ON transactions FOR EACH ROW \
         WHEN (NEW.reference = 'MYK-{n:06}' AND OLD.claimed_until IS NOT NULL AND NEW.claimed_until IS NULL) \
         EXECUTE FUNCTION refuse_release()"
    ))
    .await;
    let (status, tx) = app.post_new(&body(n, "wallet-a")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "the row is committed, so never 'nothing was stored': {tx}");
    let stored = db.store.find_by_reference(&format!("MYK-{n:06}")).await.unwrap().expect("committed");
    assert_eq!(stored.message_id, None);
}
