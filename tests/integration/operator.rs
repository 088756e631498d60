//! The reconciler against a mocked Kubernetes API server, with real relays
//! (the real database and moto) started, reconfigured and stopped.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::Value;
use tokio::sync::watch;
use txrelay::http::{AppState, HttpOptions, api_router};
use txrelay::metrics::Metrics;
use txrelay::operator::{Context, Error, LeaderElector, error_policy, reconcile};
use txrelay::relay::RelayId;
use txrelay::relay::directory::Relays;
use txrelay::spec::{SecretKeyRef, TokenSpec, TransactionRelay};

use crate::common::kube_api::FakeApiServer;
use crate::common::sqs::{ACCESS_KEY, REGION, SECRET_KEY};
use crate::common::*;

const NAMESPACE: &str = "payments";

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

fn resource(db: &TestDb, name: &str, generation: i64) -> TransactionRelay {
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

fn put_secrets(api: &FakeApiServer, db: &TestDb, queue: &TestQueue) {
    api.put_secret(NAMESPACE, "dapp-db", &[("url", &db.url)]);
    put_queue_secret(api, queue, &queue.endpoint, Some("ledger-secret-token"));
    api.put_secret(NAMESPACE, "dapp-tokens", &[("ingest", INGEST_TOKEN)]);
}

fn put_queue_secret(api: &FakeApiServer, queue: &TestQueue, endpoint: &str, ledger_token: Option<&str>) {
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
async fn the_happy_path_starts_the_relay_serves_new_and_patches_status_with_counts() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    // Two rows waiting far in the future: the counts must show them.
    for n in 0..2 {
        let tx = new_tx(unique() + n, "w");
        db.store.insert(&tx, 3_600_000, false).await.unwrap();
    }
    let op = operator(true);
    put_secrets(&op.api, &db, &queue);
    let relay = resource(&db, "dapp", 3);
    op.api.put_relay(&relay);
    reconcile(Arc::new(relay), op.ctx.clone()).await.expect("reconciled");

    let patches = op.api.status_patches();
    let status = &patches.last().expect("a status patch")["status"];
    assert_eq!(condition(status, "Ready")["status"], "True", "{status}");
    assert_eq!(condition(status, "Ready")["reason"], "RelayRunning");
    assert_eq!(condition(status, "DatabaseReachable")["status"], "True");
    assert_eq!(condition(status, "QueueReachable")["status"], "True");
    assert_eq!(status["unsent"], 2);
    assert_eq!(status["failed"], 0);
    assert_eq!(status["observedGeneration"], 3);
    let events = op.api.events();
    assert!(events.iter().any(|e| e["reason"] == "RelayStarted" && e["type"] == "Normal"), "{events:?}");

    let everything_sent =
        serde_json::to_string(&op.api.requests().iter().map(|r| r.body.clone()).collect::<Vec<_>>()).unwrap();
    for secret in [SECRET_KEY, "ledger-secret-token", INGEST_TOKEN] {
        assert!(!everything_sent.contains(secret), "{secret} leaked into an API request");
    }

    let router = api_router(AppState::new(op.relays.clone(), op.metrics.clone(), HttpOptions::default()));
    let app = TestApp { router, relay: op.relays.all()[0].relay.clone(), metrics: op.metrics.clone() };
    let (status, tx) = app
        .request(
            "POST",
            &format!("/relays/{NAMESPACE}/dapp/new"),
            Some(INGEST_TOKEN),
            "application/json",
            serde_json::to_vec(&body(unique(), "w")).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{tx}");
    let (status, _) = app.post_new(&body(unique(), "w")).await;
    assert_eq!(status, StatusCode::CREATED, "plain /new reaches the only relay");
    assert!(op.metrics.render().contains("txrelay_relays 1"));
    op.ctx.supervisor.stop_all().await;
}

#[tokio::test]
async fn a_spec_or_secret_change_reconfigures_the_loop_and_deletion_stops_it() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let op = operator(true);
    put_secrets(&op.api, &db, &queue);
    let relay = resource(&db, "dapp", 1);
    op.api.put_relay(&relay);
    reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.unwrap();
    let id = RelayId::new(NAMESPACE, "dapp");
    let first = op.ctx.supervisor.get(&id).await.unwrap().relay;
    assert_eq!(first.config().batch_size, 100);

    // Unchanged: nothing restarts.
    reconcile(Arc::new(relay.clone()), op.ctx.clone()).await.unwrap();
    assert!(Arc::ptr_eq(&op.ctx.supervisor.get(&id).await.unwrap().relay, &first));

    let mut changed = relay.clone();
    changed.spec.batch_size = 7;
    changed.metadata.generation = Some(2);
    reconcile(Arc::new(changed.clone()), op.ctx.clone()).await.unwrap();
    let second = op.ctx.supervisor.get(&id).await.unwrap().relay;
    assert_eq!(second.config().batch_size, 7);
    assert!(first.store().pool().is_closed(), "the old loop was stopped");
    assert!(op.api.events().iter().any(|e| e["reason"] == "RelayReconfigured"));

    put_queue_secret(&op.api, &queue, &queue.endpoint, Some("rotated-ledger-token"));
    reconcile(Arc::new(changed), op.ctx.clone()).await.unwrap();
    let third = op.ctx.supervisor.get(&id).await.unwrap().relay;
    assert!(!Arc::ptr_eq(&second, &third), "a secret change rebuilds the relay");
    assert!(second.store().pool().is_closed());

    op.ctx.supervisor.retain(|_| false).await;
    assert!(op.ctx.supervisor.get(&id).await.is_none());
    assert!(op.relays.is_empty(), "/new no longer reaches it");
    assert!(third.store().pool().is_closed(), "the loop stopped");
    assert!(op.metrics.render().contains("txrelay_relays 0"));
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
    let submitted = handle.relay.submit(&new_tx(n, "w")).await.expect("stored");
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

#[tokio::test]
async fn leader_election_on_a_lease() {
    let api = FakeApiServer::start();
    let one =
        LeaderElector::new(api.client.clone(), "txrelay-system", "txrelay-operator", "pod-a", Duration::from_secs(15));
    let two =
        LeaderElector::new(api.client.clone(), "txrelay-system", "txrelay-operator", "pod-b", Duration::from_secs(15));
    assert!(one.try_lead().await.unwrap(), "the first replica creates and takes the lease");
    assert!(!two.try_lead().await.unwrap(), "a held lease is respected");
    assert!(one.try_lead().await.unwrap(), "the holder renews");
    let lease = api.lease("txrelay-system", "txrelay-operator").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "pod-a");

    // The holder stops renewing: once expired, another replica takes over.
    let mut stale = lease.clone();
    stale["spec"]["renewTime"] = Value::String("2020-01-01T00:00:00.000000Z".into());
    api.set_lease("txrelay-system", "txrelay-operator", stale);
    assert!(two.try_lead().await.unwrap());
    assert_eq!(api.lease("txrelay-system", "txrelay-operator").unwrap()["spec"]["holderIdentity"], "pod-b");
    assert_eq!(api.lease("txrelay-system", "txrelay-operator").unwrap()["spec"]["leaseTransitions"], 1);
    assert!(!one.try_lead().await.unwrap());
    two.release().await;
    assert!(one.try_lead().await.unwrap(), "a released lease is free at once");
}
