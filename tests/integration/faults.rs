//! What production brings and the happy path never stages: a least-privilege
//! IAM policy, a queue that does not exist yet, refusals of the whole call or
//! of one entry, FIFO ids SQS would refuse, and slow calls against a claim
//! lease. moto shows none of these, so a proxy in front of it does.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::proxy::{SqsMode, SqsProxy, TcpProxy};
use crate::common::sqs::attribute;
use crate::common::*;

async fn row(db: &TestDb, n: u64) -> txrelay::transaction::Transaction {
    db.store.find_by_reference(&format!("MYK-{n:06}")).await.unwrap().expect("stored")
}

#[tokio::test]
async fn a_send_only_iam_policy_is_enough_to_start_deliver_and_recover_from_a_blip() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    proxy.faults(|f| f.send_only_policy = true);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint)).await;
    let running = RunningLoop::start(&app.relay);
    assert_eq!(app.post_new(&body(unique(), "w")).await.0, StatusCode::CREATED, "delivers under the policy");
    assert_eq!(queue.receive(1, Duration::from_secs(5)).await.len(), 1);

    proxy.set(SqsMode::Down);
    let during: Vec<u64> = (0..5).map(|_| unique()).collect();
    for n in &during {
        assert_eq!(app.post_new(&body(*n, "w")).await.0, StatusCode::ACCEPTED);
    }
    // The blip: the endpoint refuses connections for two seconds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(SqsMode::Forward);
    let returned = Instant::now();
    let delivered = queue.receive(5, Duration::from_secs(2)).await;
    assert_eq!(delivered.len(), 5, "all delivered within 2 s of the endpoint's return ({:?})", returned.elapsed());
    wait_until(Duration::from_secs(5), "recorded as sent", || async {
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL").await == 0
    })
    .await;
    for n in during {
        assert_eq!(row(&db, n).await.attempts, 1, "the blip burnt no attempt");
    }
    assert_eq!(proxy.denied(), 0, "nothing but sends was asked of the queue");
    running.stop().await;
}

#[tokio::test]
async fn a_missing_queue_holds_rows_without_attempts_and_delivers_once_it_exists() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    queue.client.delete_queue().queue_url(&queue.url).send().await.expect("moto deletes the queue");
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).spec(|s| s.max_attempts = 2)).await;
    let running = RunningLoop::start(&app.relay);
    let rows: Vec<u64> = (0..3).map(|_| unique()).collect();
    for n in &rows {
        let (status, tx) = app.post_new(&body(*n, "w")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{tx}");
        assert_eq!(tx["failed_at"], Value::Null, "not dead-lettered: {tx}");
    }
    // The loop keeps trying by sending; more attempts than maxAttempts
    // would have dead-lettered the rows by now.
    wait_until(Duration::from_secs(10), "several sends were refused", || async {
        app.metric(r#"txrelay_send_failures_total{kind="queue",relay="RELAY"}"#) >= 5.0
    })
    .await;
    for n in &rows {
        let tx = row(&db, *n).await;
        assert_eq!((tx.attempts, tx.failed_at), (0, None), "no attempt burnt");
        assert!(tx.last_error.as_deref().unwrap_or("").contains("NonExistentQueue"), "{:?}", tx.last_error);
    }
    let health = app.relay.health().borrow().clone();
    assert_eq!(health.queue_error_code.as_deref(), Some("NonExistentQueue"), "{health:?}");
    assert_eq!(app.metric(r#"txrelay_queue_reachable{relay="RELAY"}"#), 0.0);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE failed_at IS NOT NULL").await, 0);

    let name = queue.url.rsplit('/').next().unwrap();
    queue.client.create_queue().queue_name(name).send().await.expect("moto creates the queue again");
    let delivered = queue.receive(3, Duration::from_secs(10)).await;
    assert_eq!(delivered.len(), 3, "delivered with no manual step");
    wait_until(Duration::from_secs(5), "recorded", || async {
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL").await == 0
    })
    .await;
    assert!(app.relay.health().borrow().queue_error_code.is_none());
    running.stop().await;
    db.assert_unsent_rows_followed().await;
}

#[tokio::test]
async fn refusals_of_the_whole_call_hold_rows_whatever_their_cause() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    let app =
        TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).spec(|s| s.max_attempts = 1)).await;
    // Inline: the request still answers 202 and the row is held.
    proxy.faults(|f| f.send_error = Some((403, "AccessDenied")));
    let n = unique();
    let (answer, tx) = app.post_new(&body(n, "w")).await;
    assert_eq!(answer, StatusCode::ACCEPTED, "{tx}");
    assert_eq!((tx["attempts"].as_i64(), tx["failed_at"].is_null()), (Some(0), true), "{tx}");

    let causes = [
        (403, "AccessDenied"),
        (403, "InvalidClientTokenId"),
        (403, "ExpiredToken"),
        (400, "KmsAccessDenied"),
        (400, "RequestThrottled"),
    ];
    let (_keep, stop) = tokio::sync::watch::channel(false);
    for (status, code) in causes {
        proxy.faults(|f| f.send_error = Some((status, code)));
        let n = unique();
        insert_created(&db, &new_tx(n, "w")).await;
        let report = app.relay.drain().sweep(txrelay::store::ClaimMode::Due, 100, &stop).await.unwrap();
        assert!(report.queue_error.is_some() && report.failed == 0, "{code}: {report:?}");
        let tx = row(&db, n).await;
        assert_eq!((tx.attempts, tx.failed_at), (0, None), "{code}: held, no attempt (maxAttempts is 1)");
        assert!(tx.last_error.as_deref().unwrap_or("").contains(code), "{code}: {:?}", tx.last_error);
        assert_eq!(app.relay.health().borrow().queue_error_code.as_deref(), Some(code));
        assert!(db.scalar_i64("SELECT count(*) FROM transactions WHERE claimed_until IS NOT NULL").await == 0);
    }
    assert!(app.metric(r#"txrelay_send_failures_total{kind="queue",relay="RELAY"}"#) >= causes.len() as f64);
    proxy.faults(|f| f.send_error = None);
    let running = RunningLoop::start(&app.relay);
    let delivered = queue.receive(causes.len() + 1, Duration::from_secs(10)).await;
    assert_eq!(delivered.len(), causes.len() + 1, "all delivered once the cause is gone");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE failed_at IS NOT NULL").await, 0);
    running.stop().await;
    db.assert_unsent_rows_followed().await;
}

#[tokio::test]
async fn a_refused_entry_is_dead_lettered_only_for_a_sender_fault_and_otherwise_retried_up_to_max_attempts() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    let relay = RelayBuilder::new(&db, &queue)
        .endpoint(&proxy.endpoint)
        .spec(|s| {
            s.max_attempts = 3;
            s.retry_interval = crate::common::secs(1);
        })
        .build()
        .await;
    let poison = unique();
    let transient = unique();
    let fine: Vec<u64> = (0..3).map(|_| unique()).collect();
    for n in [poison, transient].iter().chain(&fine) {
        insert_created(&db, &new_tx(*n, "w")).await;
    }
    // Entries are told apart by their body, which holds the reference.
    proxy.faults(|f| f.refuse_entries = Some((format!("MYK-{poison:06}"), true)));
    let (_keep, stop) = tokio::sync::watch::channel(false);
    let report = relay.drain().sweep(txrelay::store::ClaimMode::Due, 100, &stop).await.unwrap();
    assert_eq!((report.sent, report.dead_lettered), (4, 1), "{report:?}");
    let tx = row(&db, poison).await;
    assert!(tx.failed_at.is_some() && tx.attempts == 1, "a sender fault dead-letters at once: {tx:?}");

    proxy.faults(|f| f.refuse_entries = Some((format!("MYK-{transient:06}"), false)));
    db.execute(&format!(
        "UPDATE transactions SET message_id = NULL, attempts = 0 WHERE reference = 'MYK-{transient:06}'"
    ))
    .await;
    for attempt in 1..=3 {
        db.execute("UPDATE transactions SET next_attempt_at = now() WHERE message_id IS NULL").await;
        let report = relay.drain().sweep(txrelay::store::ClaimMode::Due, 100, &stop).await.unwrap();
        assert_eq!(report.failed, 1, "attempt {attempt}: {report:?}");
        let tx = row(&db, transient).await;
        assert_eq!(tx.attempts, attempt, "each transient refusal counts");
        assert_eq!(tx.failed_at.is_some(), attempt == 3, "dead-lettered at maxAttempts only: {tx:?}");
    }
    db.assert_unsent_rows_followed().await;
}

#[tokio::test]
async fn fifo_ids_sqs_would_refuse_are_sent_as_their_sha256_and_still_deduplicate() {
    let (db, queue) = (TestDb::new().await, TestQueue::fifo().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    proxy.faults(|f| f.strict_fifo_ids = true);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint)).await;
    let hex = |value: &str| format!("{:x}", Sha256::digest(value.as_bytes()));
    let awkward = ["has a space".to_owned(), "k".repeat(150), "clé-ключ-鍵".to_owned()];
    let mut expected = HashMap::new();
    for value in &awkward {
        let mut request = body(unique(), "w-plain");
        request["ledger_payload"]["meta_data"]["idempotency_key"] = Value::String(value.clone());
        let (status, tx) = app.post_new(&request).await;
        assert_eq!(status, StatusCode::CREATED, "idempotency_key {value:?}: {tx}");
        expected.insert(tx["reference"].as_str().unwrap().to_owned(), (hex(value), "w-plain".to_owned()));

        let n = unique();
        let (status, tx) = app.post_new(&body(n, value)).await;
        assert_eq!(status, StatusCode::CREATED, "wallet_address {value:?}: {tx}");
        expected.insert(tx["reference"].as_str().unwrap().to_owned(), (format!("idem-{n}"), hex(value)));
    }
    let delivered = queue.receive(expected.len(), Duration::from_secs(10)).await;
    assert_eq!(delivered.len(), expected.len());
    for message in delivered {
        let system = message.attributes.clone().unwrap_or_default();
        let reference = attribute(&message, "reference").unwrap();
        let (dedup, group) = &expected[&reference];
        use aws_sdk_sqs::types::MessageSystemAttributeName as A;
        assert_eq!(system.get(&A::MessageDeduplicationId), Some(dedup), "{reference}");
        assert_eq!(system.get(&A::MessageGroupId), Some(group), "{reference}");
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE failed_at IS NOT NULL").await, 0);
}

/// Two relays share a 300-row backlog through a queue whose batch calls
/// take 2.5 s, with a 15 s claim lease: a relay that started more sends
/// than its lease covers would see its rows claimed again by the other.
async fn two_relays_with_slow_batches(concurrency: u32) {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    proxy.faults(|f| f.send_delay = Some(Duration::from_millis(2500)));
    for _ in 0..300 {
        insert_created(&db, &new_tx(unique(), "w")).await;
    }
    let builder = RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).spec(|s| {
        s.claim_lease = secs(15);
        s.batch_size = 100;
        s.concurrency = concurrency;
    });
    let (first, second) = (builder.build().await, builder.build().await);
    let loops = [RunningLoop::start(&first), RunningLoop::start(&second)];
    let messages = queue.receive_concurrently(300, Duration::from_secs(240), 4).await;
    let mut per_key: HashMap<String, HashSet<String>> = HashMap::new();
    for message in &messages {
        let key = attribute(message, "idempotency_key").unwrap();
        per_key.entry(key).or_default().insert(message.message_id.clone().unwrap());
    }
    let twice: Vec<_> = per_key.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(twice.is_empty(), "concurrency {concurrency}: sent twice: {twice:?}");
    assert_eq!(per_key.len(), 300, "concurrency {concurrency}: every row delivered");
    for running in loops {
        running.stop().await;
    }
}

#[tokio::test]
async fn slow_batches_never_outlive_their_claim_with_one_call_in_flight() {
    two_relays_with_slow_batches(1).await;
}

#[tokio::test]
async fn slow_batches_never_outlive_their_claim_with_four_calls_in_flight() {
    two_relays_with_slow_batches(4).await;
}

#[tokio::test]
async fn a_black_holed_database_fails_readiness_fast_answers_503_and_everything_recovers() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = TcpProxy::start(database_address(&db.url)).await;
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).database_url(proxy.url_for(&db.url))).await;
    let running = RunningLoop::start(&app.relay);
    let probe = |path: &'static str| {
        let app = &app;
        async move {
            let started = Instant::now();
            let (status, body) = app.request("GET", path, None, "application/json", Vec::new()).await;
            assert!(started.elapsed() < Duration::from_secs(1), "{path} took {:?}", started.elapsed());
            (status, body)
        }
    };
    wait_until(Duration::from_secs(10), "ready", || async { probe("/readyz").await.0 == StatusCode::OK }).await;
    assert_eq!(app.post_new(&body(unique(), "w")).await.0, StatusCode::CREATED);

    // Bytes go nowhere, nothing comes back, and no connection is closed.
    proxy.set_black_hole(true);
    wait_until(Duration::from_secs(10), "/readyz fails", || async { probe("/readyz").await.0 != StatusCode::OK }).await;
    assert_eq!(probe("/healthz").await.0, StatusCode::OK, "liveness touches no dependency");
    let started = Instant::now();
    let (status, error) = app.post_new(&body(unique(), "w")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert!(started.elapsed() <= Duration::from_secs(11), "within the request timeout: {:?}", started.elapsed());
    let (_, ready) = probe("/readyz").await;
    assert_eq!(ready["relays"][app.relay.id().to_string()]["database"], "unreachable", "{ready}");
    assert!(app.relay.health().borrow().database_error.is_some());

    proxy.set_black_hole(false);
    wait_until(Duration::from_secs(30), "/readyz recovers", || async { probe("/readyz").await.0 == StatusCode::OK })
        .await;
    let n = unique();
    let (status, tx) = app.post_new(&body(n, "w")).await;
    assert!(status == StatusCode::CREATED || status == StatusCode::ACCEPTED, "{status}: {tx}");
    wait_until(Duration::from_secs(30), "every row delivered", || async {
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL").await == 0
    })
    .await;
    running.stop().await;
}

/// `spec.queue.roleArn`: the relay assumes the role through STS (moto's)
/// from its base credentials, with the external id and a session named
/// after it, and signs every send with the role's credentials, never the
/// base keys.
#[tokio::test]
async fn a_relay_with_a_role_arn_sends_with_the_assumed_roles_credentials() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    // STS at an address of its own, as in AWS: the SQS endpoint (a VPC
    // endpoint, say) never answers AssumeRole.
    let sts = SqsProxy::start(&queue.endpoint).await;
    let role = "arn:aws:iam::123456789012:role/txrelay-sender";
    let builder = RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).sts_endpoint(&sts.endpoint);
    let app = TestApp::new(&builder.spec(|s| {
        s.queue.role_arn = Some(role.into());
        s.queue.external_id = Some("ledger-42".into());
    }))
    .await;
    let running = RunningLoop::start(&app.relay);
    let (status, answer) = app.post_new(&body(unique(), "w")).await;
    assert_eq!(status, axum::http::StatusCode::CREATED, "{answer}");
    insert_unsent(&db, "w2").await;
    app.relay.outbox().wake();
    assert_eq!(queue.receive(2, Duration::from_secs(10)).await.len(), 2, "inline and sweep sends both went");
    running.stop().await;

    assert!(proxy.sts_calls().is_empty(), "never asked of the SQS endpoint");
    let base = crate::common::sqs::ACCESS_KEY;
    assert!(
        sts.signed_by().iter().any(|(action, key)| action == "AssumeRole" && key == base),
        "STS is called with the base keys: {:?}",
        sts.signed_by()
    );
    let sts = sts.sts_calls();
    assert_eq!(sts.len(), 1, "one AssumeRole, its credentials cached: {sts:?}");
    let call = &sts[0];
    assert!(call.contains("RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Ftxrelay-sender"), "{call}");
    assert!(call.contains("ExternalId=ledger-42"), "{call}");
    assert!(call.contains("RoleSessionName=txrelay-"), "{call}");
    let signed = proxy.signed_by();
    let sends: Vec<&String> =
        signed.iter().filter(|(action, _)| action.contains("SendMessage")).map(|(_, key)| key).collect();
    assert!(!sends.is_empty(), "{signed:?}");
    assert!(sends.iter().all(|key| *key != base && !key.is_empty()), "every send is signed by the role: {signed:?}");
}

#[test]
fn a_role_arn_and_external_id_are_checked_naming_the_field() {
    let mut spec = spec("s_role");
    spec.queue.role_arn = Some("arn:aws:iam::123:role/x".into());
    assert_eq!(spec.validate().unwrap_err().field, "spec.queue.roleArn");
    spec.queue.role_arn = Some("arn:aws-us-gov:iam::123456789012:role/path/to/x".into());
    assert!(spec.validate().is_ok());
    spec.queue.external_id = Some("a b".into());
    assert_eq!(spec.validate().unwrap_err().field, "spec.queue.externalId");
    spec.queue.role_arn = None;
    spec.queue.external_id = Some("ledger-42".into());
    assert_eq!(spec.validate().unwrap_err().field, "spec.queue.externalId", "an external id needs a role");
}

/// A role that cannot be assumed is the queue refusing calls, not a message
/// problem: rows stay unsent without an attempt, and the error says so.
#[tokio::test]
async fn a_role_that_cannot_be_assumed_holds_rows_without_an_attempt() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    // STS denies everything: AssumeRole is refused.
    let sts = SqsProxy::start(&queue.endpoint).await;
    sts.faults(|f| f.send_only_policy = true);
    let app =
        TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint).sts_endpoint(&sts.endpoint).spec(|s| {
            s.queue.role_arn = Some("arn:aws:iam::123456789012:role/txrelay-sender".into());
        }))
        .await;
    let (status, answer) = app.post_new(&body(unique(), "w")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["attempts"], 0, "{answer}");
    assert!(sts.denied() >= 1, "AssumeRole was asked and denied");
    let error = app.relay.health().borrow().queue_error.clone().unwrap_or_default();
    assert!(!error.is_empty(), "the queue is marked unreachable");
    assert!(queue.receive(1, Duration::from_secs(1)).await.is_empty());
}
