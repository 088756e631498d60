//! The reconciler against a mocked Kubernetes API server, with real relays
//! (the real database and moto) started, reconfigured and stopped.
//!
//! What a real API server shows is tested in `real_cluster::` (start, edits,
//! rotated Secrets, revoked tokens, deletion and re-creation, leader
//! election, outages); the tests here stay for what it cannot be made to
//! show (an API error answered on purpose, a skewed clock, a replica cut off
//! from the API server) or for the reconciler's own timing, which runs in
//! process in a fraction of the time.
//!
//! Split by subject: `reconcile`, `leader`, `lifecycle`; the fixtures here.

mod leader;
mod lifecycle;
mod reconcile;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::Value;
use tokio::sync::watch;
use txrelay::http::{AppState, HttpOptions, api_router};
use txrelay::metrics::Metrics;
use txrelay::operator::{Context, Error, LeaderElector, error_policy, reconcile};
use txrelay::runtime::registry::Registry;
use txrelay::spec::RelayId;
use txrelay::spec::{SecretKeyRef, TokenSpec, TransactionRelay};

use crate::common::kube_api::FakeApiServer;
use crate::common::sqs::{ACCESS_KEY, REGION, SECRET_KEY};
use crate::common::*;

pub(crate) const NAMESPACE: &str = "payments";

pub(crate) struct Operator {
    pub(crate) api: FakeApiServer,
    pub(crate) ctx: Arc<Context>,
    pub(crate) relays: Arc<Registry>,
    pub(crate) metrics: Metrics,
}

pub(crate) fn operator(leading: bool) -> Operator {
    let (_keep, leading) = watch::channel(leading);
    std::mem::forget(_keep);
    operator_following(FakeApiServer::start(), leading)
}

/// An operator whose leadership follows `leading` (a test's own, or an
/// elector's).
pub(crate) fn operator_following(api: FakeApiServer, leading: watch::Receiver<bool>) -> Operator {
    let metrics = Metrics::new();
    let relays = Arc::new(Registry::new(None));
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
pub(crate) async fn with_relay(db: &TestDb, queue: &TestQueue, name: &str) -> (Operator, TransactionRelay) {
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

pub(crate) fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} in {status}"))
}
