//! The reconciler against a mocked Kubernetes API server, with real relays
//! (the real database and moto) started, reconfigured and stopped.
//!
//! What a real API server shows is tested in `real_cluster::` (start, edits,
//! rotated Secrets, revoked tokens, deletion and re-creation, leader
//! election, outages); the tests here stay for what it cannot be made to
//! show (an API error answered on purpose, a skewed clock, a replica cut off
//! from the API server) or for the reconciler's own timing, which runs in
//! process in a fraction of the time.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::Value;
use tokio::sync::watch;
use txrelay::directory::Relays;
use txrelay::http::{AppState, HttpOptions, api_router};
use txrelay::metrics::Metrics;
use txrelay::operator::{Context, Error, LeaderElector, error_policy, reconcile};
use txrelay::spec::RelayId;
use txrelay::spec::{SecretKeyRef, TokenSpec, TransactionRelay};

use crate::common::kube_api::FakeApiServer;
use crate::common::sqs::{ACCESS_KEY, REGION, SECRET_KEY};
use crate::common::*;

pub(crate) const NAMESPACE: &str = "payments";

struct Operator {
    api: FakeApiServer,
    ctx: Arc<Context>,
    relays: Arc<Relays>,
    metrics: Metrics,
}

fn operator(leading: bool) -> Operator {
    let api = FakeApiServer::start();
    let metrics = Metrics::new();
    let relays = Arc::new(Relays::new(None));
    let (_keep, leading) = watch::channel(leading);
    std::mem::forget(_keep);
    let (supervisor, writer) = txrelay::operator::supervisor(
        api.client.clone(),
        relays.clone(),
        metrics.clone(),
        leading,
        Duration::from_secs(5),
    );
    let recorder = Recorder::new(api.client.clone(), Reporter { controller: "txrelay-test".into(), instance: None });
    let ctx = Arc::new(Context::new(api.client.clone(), supervisor, writer, recorder, metrics.clone(), false));
    Operator { api, ctx, relays, metrics }
}

pub(crate) fn resource(db: &TestDb, name: &str, generation: i64) -> TransactionRelay {
    let mut spec = spec(&db.schema);
    spec.database.secret_ref = SecretKeyRef { name: "dapp-db".into(), key: None };
    spec.queue.secret_ref.name = "dapp-sqs".into();
    spec.ingest =
        Some(TokenSpec { token_secret_ref: SecretKeyRef { name: "dapp-tokens".into(), key: Some("ingest".into()) } });
    let mut relay = TransactionRelay::new(name, spec);
    relay.metadata.namespace = Some(NAMESPACE.into());
    relay.metadata.generation = Some(generation);
    relay.metadata.uid = Some(format!("uid-{name}"));
    relay
}

/// An operator that has reconciled the relay `name` (generation 1) into a
/// running relay.
async fn with_relay(db: &TestDb, queue: &TestQueue, name: &str) -> (Operator, TransactionRelay) {
    let op = operator(true);
    put_secrets(&op.api, db, queue);
    let relay = resource(db, name, 1);
    op.api.put_relay(&relay);
    reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.expect("reconciled");
    (op, relay)
}

pub(crate) fn put_secrets(api: &FakeApiServer, db: &TestDb, queue: &TestQueue) {
    api.put_secret(NAMESPACE, "dapp-db", &[("url", &db.url)]);
    put_queue_secret(api, queue, &queue.endpoint, Some("ledger-secret-token"));
    api.put_secret(NAMESPACE, "dapp-tokens", &[("ingest", INGEST_TOKEN)]);
}

pub(crate) fn put_queue_secret(api: &FakeApiServer, queue: &TestQueue, endpoint: &str, ledger_token: Option<&str>) {
    let mut keys = vec![
        ("queueUrl", queue.url.as_str()),
        ("region", REGION),
        ("endpointUrl", endpoint),
        ("accessKeyId", ACCESS_KEY),
        ("secretAccessKey", SECRET_KEY),
    ];
    keys.extend(ledger_token.map(|token| ("ledgerToken", token)));
    api.put_secret(NAMESPACE, "dapp-sqs", &keys);
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} in {status}"))
}

#[tokio::test]
async fn a_missing_secret_sets_ready_false_publishes_an_event_and_retries_with_backoff() {
    let db = TestDb::new().await;
    let op = operator(true);
    op.api.put_secret(NAMESPACE, "dapp-tokens", &[("ingest", INGEST_TOKEN)]);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    let error = reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.unwrap_err();
    assert!(matches!(error, Error::SecretNotFound(ref name) if name == "dapp-db"), "{error}");

    let patches = op.api.status_patches();
    assert_eq!(patches.len(), 1);
    let ready = condition(&patches[0]["status"], "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "SecretNotFound");
    assert!(ready["message"].as_str().unwrap().contains("dapp-db"));
    assert_eq!(ready["observedGeneration"], 1);
    assert_eq!(condition(&patches[0]["status"], "DatabaseReachable")["status"], "Unknown");

    let events = op.api.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["reason"], "SecretNotFound");
    assert!(op.relays.is_empty(), "nothing is served");
    assert!(op.api.unexpected().is_empty(), "{:?}", op.api.unexpected());

    let waits: Vec<Duration> = (0..4)
        .map(|_| {
            let action = error_policy(Arc::new(relay.clone()), &error, op.ctx.clone());
            format!("{action:?}")
        })
        .map(|text| parse_requeue(&text))
        .collect();
    assert_eq!(waits, [1, 2, 4, 8].map(Duration::from_secs));
    assert!(op.metrics.render().contains(r#"txrelay_reconcile_errors_total{error="SecretNotFound"} 1"#));
}

fn parse_requeue(action: &str) -> Duration {
    // Action's Debug shows the requeue duration, e.g. `Some(2s)`.
    let start = action.find("Some(").map(|i| i + 5).expect("a requeue");
    let text = &action[start..action[start..].find(')').map(|i| start + i).unwrap()];
    if let Some(ms) = text.strip_suffix("ms") {
        Duration::from_millis(ms.parse().unwrap())
    } else {
        Duration::from_secs_f64(text.trim_end_matches('s').parse().unwrap())
    }
}

#[tokio::test]
async fn a_send_only_iam_policy_reconciles_to_ready_and_sends_tell_the_queue_state() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = crate::common::proxy::SqsProxy::start(&queue.endpoint).await;
    proxy.faults(|f| f.send_only_policy = true);
    let op = operator(true);
    put_secrets(&op.api, &db, &queue);
    put_queue_secret(&op.api, &queue, &proxy.endpoint, None);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.expect("reconciled without GetQueueAttributes");
    reconcile(Arc::new(relay), op.ctx.clone()).await.expect("and again");
    let status = op.api.status_patches().last().unwrap()["status"].clone();
    assert_eq!(condition(&status, "Ready")["status"], "True", "{status}");
    assert_eq!(proxy.denied(), 1, "asked once, then never again");
    let handle = op.relays.resolve(None).expect("serving");
    let n = unique();
    let submitted = handle.relay.ingest().submit(&new_tx(n, "w")).await.expect("stored");
    assert!(matches!(submitted, txrelay::relay::Submission::Sent(_)), "{submitted:?}");
    assert!(handle.relay.health().borrow().queue_error.is_none());
    op.ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn unreachable_database_or_queue_is_reported_without_a_crash() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let op = operator(true);
    put_secrets(&op.api, &db, &queue);
    op.api.put_secret(NAMESPACE, "dapp-db", &[("url", "postgres://relay:hunter2@127.0.0.1:9/nowhere")]);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    let error = reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.unwrap_err();
    assert_eq!(error.reason(), "DatabaseUnreachable");
    let status = op.api.status_patches().last().unwrap()["status"].clone();
    let status = &status;
    assert_eq!(condition(status, "DatabaseReachable")["status"], "False");
    assert_eq!(condition(status, "Ready")["reason"], "DatabaseUnreachable");
    let everything =
        serde_json::to_string(&op.api.requests().iter().map(|r| r.body.clone()).collect::<Vec<_>>()).unwrap();
    assert!(!everything.contains("hunter2"), "the database password never reaches status or Events");

    put_secrets(&op.api, &db, &queue);
    put_queue_secret(&op.api, &queue, "http://127.0.0.1:9", None);
    // An unreachable queue does not fail the reconcile: the relay stores
    // transactions and its sends find out when the queue is back.
    reconcile(Arc::new(relay), op.ctx.clone()).await.expect("reconciled");
    let status = op.api.status_patches().last().unwrap()["status"].clone();
    let status = &status;
    assert_eq!(condition(status, "QueueReachable")["status"], "False", "{status}");
    assert_eq!(condition(status, "QueueReachable")["reason"], "QueueUnreachable", "{status}");
    assert!(op.api.events().iter().any(|e| e["reason"] == "QueueUnreachable"));
    // The relay runs anyway: transactions are stored and wait for the queue.
    assert_eq!(op.relays.len(), 1);
    op.ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn only_the_leader_writes_status_and_events() {
    let db = TestDb::new().await;
    let op = operator(false);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    reconcile(Arc::new(relay), op.ctx.clone()).await.unwrap_err();
    assert!(op.api.status_patches().is_empty());
    assert!(op.api.events().is_empty());
}

#[tokio::test(start_paused = true)]
async fn leader_election_judges_expiry_by_the_local_clock_not_the_holders() {
    let api = FakeApiServer::start();
    let elector = |id: &str| {
        LeaderElector::new(api.client.clone(), "txrelay-system", "txrelay-operator", id, Duration::from_secs(15))
    };
    let (one, two, three) = (elector("pod-a"), elector("pod-b"), elector("pod-c"));
    assert!(one.try_lead().await.unwrap(), "the first replica creates and takes the lease");
    assert!(!two.try_lead().await.unwrap(), "a held lease is respected");
    assert!(one.try_lead().await.unwrap(), "the holder renews");
    let lease = api.lease("txrelay-system", "txrelay-operator").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "pod-a");

    // The holder's clock is years behind: its renewTime looks ancient, but it
    // keeps renewing, so it keeps the lease.
    let mut behind = lease.clone();
    behind["spec"]["renewTime"] = Value::String("2020-01-01T00:00:00.000000Z".into());
    api.set_lease("txrelay-system", "txrelay-operator", behind.clone());
    assert!(!two.try_lead().await.unwrap(), "a skewed clock does not hand the lease over");
    tokio::time::advance(Duration::from_secs(10)).await;
    api.set_lease("txrelay-system", "txrelay-operator", behind);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!two.try_lead().await.unwrap(), "renewed 10 s ago by this replica's clock");

    // The holder stops renewing: a lease duration later by *this* replica's
    // clock, another takes over.
    tokio::time::advance(Duration::from_secs(16)).await;
    assert!(two.try_lead().await.unwrap(), "unchanged for longer than the lease duration");
    let lease = api.lease("txrelay-system", "txrelay-operator").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "pod-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert!(!one.try_lead().await.unwrap(), "the old holder sees it moved and follows");

    // A dead holder whose clock ran ahead (renewTime in the future) is
    // still replaced once its lease stops changing.
    let mut ahead = lease.clone();
    ahead["spec"]["holderIdentity"] = Value::String("pod-gone".into());
    ahead["spec"]["renewTime"] = Value::String("2100-01-01T00:00:00.000000Z".into());
    api.set_lease("txrelay-system", "txrelay-operator", ahead);
    assert!(!three.try_lead().await.unwrap());
    tokio::time::advance(Duration::from_secs(16)).await;
    assert!(three.try_lead().await.unwrap(), "a future renewTime does not hold the lease forever");
    three.release().await;
    assert!(one.try_lead().await.unwrap(), "a released lease is free at once");
}

#[tokio::test]
async fn an_invalid_edit_keeps_ready_false_without_flapping_and_does_not_advance_observed_generation() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let (op, good) = with_relay(&db, &queue, "dapp").await;

    let mut bad = good.clone();
    bad.spec.batch_size = 5000;
    bad.metadata.generation = Some(2);
    op.api.put_relay(&bad);
    let error = reconcile(Arc::new(bad.clone()), op.ctx.clone()).await.unwrap_err();
    assert_eq!(error.reason(), "InvalidSpec");
    let events = op.api.events();
    assert!(
        events.iter().any(|e| e["reason"] == "PreviousConfigurationServing"
            && e["note"].as_str().unwrap_or_default().contains("still serving")),
        "{events:?}"
    );
    // The old configuration keeps serving, and its follower writes status
    // when its health changes: Ready must stay false with the reason.
    let handle = op.relays.resolve(None).expect("the old relay still serves");
    let written = op.api.status_patches().len();
    // A row backing off changes the backlog, which the follower reports.
    // Written backing off from the start, so the relay never sends it.
    db.execute(
        "INSERT INTO transactions (reference, external_reference, idempotency_key, transaction_type, status, \
         source, instruction_type, incoming_currency, outgoing_currency, value, fee, wallet_address, payload, \
         next_attempt_at) VALUES ('waiting', 'e-waiting', 'k-waiting', 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 1, \
         0, 'w', '{}', now() + interval '1 hour')",
    )
    .await;
    let gauges = handle.relay.outbox().refresh_gauges().await.expect("the backlog is read");
    assert_eq!(gauges.unsent, 1);
    wait_until(Duration::from_secs(30), "the follower writes a status", || async {
        op.api.status_patches().len() > written
    })
    .await;
    for patch in op.api.status_patches().into_iter().skip(written - 1) {
        let status = &patch["status"];
        assert_eq!(condition(status, "Ready")["status"], "False", "{status}");
        assert_eq!(condition(status, "Ready")["reason"], "InvalidSpec");
        assert_eq!(status["observedGeneration"], 1, "generation 2 was not applied: {status}");
    }

    let mut fixed = good.clone();
    fixed.metadata.generation = Some(3);
    op.api.put_relay(&fixed);
    reconcile(Arc::new(fixed), op.ctx.clone()).await.expect("fixed");
    let status = op.api.status_patches().last().unwrap()["status"].clone();
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(status["observedGeneration"], 3);
    op.ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn status_is_written_by_server_side_apply_so_a_cleared_last_error_disappears() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let op = operator(true);
    op.api.put_secret(NAMESPACE, "dapp-tokens", &[("ingest", INGEST_TOKEN)]);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.unwrap_err();
    let failed = op.api.status_patches().last().unwrap()["status"].clone();
    assert!(failed["lastError"].as_str().unwrap_or_default().contains("dapp-db"), "{failed}");

    put_secrets(&op.api, &db, &queue);
    tokio::time::sleep(Duration::from_millis(1100)).await; // the writer's once-a-second spacing
    reconcile(Arc::new(relay), op.ctx.clone()).await.expect("recovered");
    let writes: Vec<_> = op.api.requests().into_iter().filter(|r| r.path.ends_with("/status")).collect();
    let last = writes.last().unwrap();
    assert!(last.body["status"].get("lastError").is_none(), "{}", last.body);
    assert_eq!(condition(&last.body["status"], "Ready")["status"], "True");
    for write in &writes {
        assert_eq!(write.content_type, "application/apply-patch+yaml", "server-side apply");
        assert!(write.query.contains("fieldManager=txrelay-operator") && write.query.contains("force=true"));
        assert_eq!(write.body["kind"], "TransactionRelay");
    }
    op.ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn the_janitor_forgets_deleted_relays_and_everything_kept_about_them() {
    use kube::runtime::{reflector, watcher};
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let op = operator(true);
    put_secrets(&op.api, &db, &queue);
    let (running, broken) = (resource(&db, "dapp", 1), resource(&db, "broken", 1));
    let mut broken = broken;
    broken.spec.database.secret_ref.name = "missing".into();
    reconcile(Arc::new(running.clone()), op.ctx.clone()).await.expect("reconciled");
    let error = reconcile(Arc::new(broken.clone()), op.ctx.clone()).await.unwrap_err();
    let _ = error_policy(Arc::new(broken.clone()), &error, op.ctx.clone());
    assert_eq!(op.ctx.backing_off().len(), 1);

    let (store, mut writer) = reflector::store::<TransactionRelay>();
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitApply(running.clone()));
    writer.apply_watcher_event(&watcher::Event::InitApply(broken.clone()));
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let (stop, stopped) = watch::channel(false);
    let janitor = tokio::spawn(txrelay::operator::stop_deleted_relays(op.ctx.clone(), store, stopped));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(op.ctx.supervisor.ids().await.len(), 1, "present relays are kept");

    writer.apply_watcher_event(&watcher::Event::Delete(running.clone()));
    writer.apply_watcher_event(&watcher::Event::Delete(broken.clone()));
    let id = RelayId::new(NAMESPACE, "dapp");
    wait_until(Duration::from_secs(10), "the janitor stops the deleted relay", || async {
        op.ctx.supervisor.ids().await.is_empty()
    })
    .await;
    wait_until(Duration::from_secs(10), "and forgets its status and backoff", || async {
        op.ctx.status.ids().is_empty() && op.ctx.backing_off().is_empty()
    })
    .await;
    assert!(op.relays.resolve(Some(&id)).is_err());
    let _ = stop.send(true);
    let _ = janitor.await;
}

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
async fn leadership_moves_status_writing_with_it_and_a_replica_without_the_api_server_keeps_relaying() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let api = FakeApiServer::start();
    let (leading_tx, leading) = watch::channel(false);
    let metrics = Metrics::new();
    let relays = Arc::new(Relays::new(None));
    let (supervisor, writer) = txrelay::operator::supervisor(
        api.client.clone(),
        relays.clone(),
        metrics.clone(),
        leading,
        Duration::from_secs(5),
    );
    let recorder = Recorder::new(api.client.clone(), Reporter { controller: "txrelay-test".into(), instance: None });
    let ctx = Arc::new(Context::new(api.client.clone(), supervisor, writer, recorder, metrics, false));
    let elector =
        LeaderElector::new(api.client.clone(), "txrelay-system", "txrelay-operator", "pod-a", Duration::from_secs(3));
    let (stop, stopped) = watch::channel(false);
    let election = tokio::spawn(elector.run(leading_tx, stopped));
    let mut leading = ctx.status.leading();
    wait_until(Duration::from_secs(5), "pod-a leads", || {
        let l = *leading.borrow_and_update();
        async move { l }
    })
    .await;

    put_secrets(&api, &db, &queue);
    let relay = resource(&db, "dapp", 1);
    api.put_relay(&relay);
    reconcile(Arc::new(relay.clone()), ctx.clone()).await.expect("reconciled");
    assert!(!api.status_patches().is_empty(), "the leader writes status");

    // Another replica takes the lease (its renewals change the record).
    let mut taken = api.lease("txrelay-system", "txrelay-operator").unwrap();
    taken["spec"]["holderIdentity"] = Value::String("pod-b".into());
    api.set_lease("txrelay-system", "txrelay-operator", taken);
    wait_until(Duration::from_secs(2), "pod-a follows within one renew period (1 s)", || {
        let l = *leading.borrow_and_update();
        async move { !l }
    })
    .await;
    let written = api.status_patches().len();
    let events = api.events().len();
    let handle = relays.resolve(None).unwrap();
    handle.relay.ingest().submit(&new_tx(unique(), "w")).await.unwrap();
    reconcile(Arc::new(relay.clone()), ctx.clone()).await.expect("reconciled as a follower");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(api.status_patches().len(), written, "a follower writes no status");
    assert_eq!(api.events().len(), events, "nor Events");

    // pod-b gives the lease up: pod-a leads again and its follower writes.
    api.set_lease("txrelay-system", "txrelay-operator", serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "txrelay-operator", "namespace": "txrelay-system"}, "spec": {}}));
    wait_until(Duration::from_secs(3), "pod-a leads again", || {
        let l = *leading.borrow_and_update();
        async move { l }
    })
    .await;
    handle.relay.ingest().submit(&new_tx(unique(), "w")).await.unwrap();
    wait_until(Duration::from_secs(30), "the status follower writes again", || async {
        api.status_patches().len() > written
    })
    .await;

    // The API server goes away: no leadership, but /new and sweeps go on.
    api.set_down(true);
    wait_until(Duration::from_secs(3), "no leader without the API server", || {
        let l = *leading.borrow_and_update();
        async move { !l }
    })
    .await;
    let submitted = handle.relay.ingest().submit(&new_tx(unique(), "w")).await.expect("/new keeps working");
    assert!(matches!(submitted, txrelay::relay::Submission::Sent(_)), "{submitted:?}");
    let id = insert_created(&db, &new_tx(unique(), "w")).await.id;
    handle.relay.outbox().wake();
    wait_until(Duration::from_secs(10), "the loop keeps sweeping", || async {
        db.store.find_by_id(id).await.unwrap().unwrap().message_id.is_some()
    })
    .await;
    let _ = stop.send(true);
    let _ = election.await;
    ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn the_controller_reconfigures_a_relay_when_a_referenced_secret_changes_and_stops_within_the_grace() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let api = FakeApiServer::start();
    put_secrets(&api, &db, &queue);
    api.put_relay(&resource(&db, "dapp", 1));
    let relays = Arc::new(Relays::new(None));
    let options = txrelay::operator::OperatorOptions {
        namespace: None,
        insecure_no_auth: false,
        pool_size: 4,
        grace: Duration::from_secs(5),
        identity: "pod-a".into(),
        lease_namespace: "txrelay-system".into(),
        lease_duration: Duration::from_secs(3),
    };
    let (stop, mut stopped) = watch::channel(false);
    let shutdown = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let operator =
        tokio::spawn(txrelay::operator::run(api.client.clone(), relays.clone(), Metrics::new(), options, shutdown));
    wait_until(Duration::from_secs(20), "the controller starts the relay from the watch", || async {
        relays.resolve(None).is_ok()
    })
    .await;
    let accepts = |token: &str| relays.resolve(None).is_ok_and(|handle| handle.ingest_tokens.accepts(token));
    assert!(accepts(INGEST_TOKEN));

    // Only a Secret changes: the controller's Secret watch must notice. A
    // rotated token applies to the running relay...
    api.put_secret(NAMESPACE, "dapp-tokens", &[("ingest", "rotated-ingest-token")]);
    wait_until(Duration::from_secs(10), "the Secret watch applies the rotated token", || async {
        accepts("rotated-ingest-token") && !accepts(INGEST_TOKEN)
    })
    .await;
    // ...and a new queue setting reconfigures it.
    let before = relays.resolve(None).unwrap().relay;
    put_queue_secret(&api, &queue, &queue.endpoint, Some("another-ledger-token"));
    wait_until(Duration::from_secs(10), "the Secret watch reconfigures the relay", || async {
        relays.resolve(None).is_ok_and(|handle| !Arc::ptr_eq(&handle.relay, &before))
    })
    .await;
    wait_until(Duration::from_secs(5), "and says so in an Event", || async {
        api.events().iter().any(|e| e["reason"] == "RelayReconfigured")
    })
    .await;

    let started = std::time::Instant::now();
    let _ = stop.send(true);
    operator.await.unwrap();
    assert!(started.elapsed() <= Duration::from_secs(6), "stopped within the grace period: {:?}", started.elapsed());
    assert!(relays.resolve(None).is_err(), "no relay left serving");
    assert!(api.unexpected().is_empty(), "{:?}", api.unexpected());
}

#[tokio::test]
async fn a_resend_by_hand_under_the_operator_is_an_event_on_the_relay() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let (op, _) = with_relay(&db, &queue, "dapp").await;
    let handle = op.relays.resolve(None).expect("serving");
    // Dead-lettered from the start, so the running relay never takes it.
    db.execute(
        "INSERT INTO transactions (reference, external_reference, idempotency_key, transaction_type, status, \
         source, instruction_type, incoming_currency, outgoing_currency, value, fee, wallet_address, payload, \
         failed_at, last_error) VALUES ('dead', 'e-dead', 'k-dead', 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 1, 0, \
         'w', '{}', now(), 'refused')",
    )
    .await;
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
