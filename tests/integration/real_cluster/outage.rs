//! An API server outage on a control plane of the test's own (it stops the
//! API server, which would disturb every other test on the shared one): the
//! relay keeps serving /new and draining throughout, and the operator
//! reconnects and applies an edit made after the restart.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{Cluster, OwnControlPlane, backends};
use crate::common::{body, unique};

const OUTAGE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn the_relay_serves_and_drains_through_an_api_server_outage_and_the_operator_applies_a_later_edit() {
    let own = OwnControlPlane::start("control-plane-outage").await;
    let cluster = Cluster::on(own.plane.clone()).await;
    let (db, queue) = backends().await;
    cluster.secrets(&db, &queue).await;
    let operator = cluster.operator("op-0").await;
    let ns = cluster.namespace.clone();
    assert!(cluster.apply_relay("dapp", &db.schema, json!({})).await.ok);
    cluster.wait_ready("dapp", Duration::from_secs(30)).await;

    own.stop_apiserver().await;
    assert!(!cluster.kubectl(&["get", "txr"], None).await.ok, "the API server is down");
    let down_at = Instant::now();
    let mut posted = 0;
    let mut delivered = 0;
    // For the whole outage: every transaction is accepted and reaches the queue.
    while down_at.elapsed() < OUTAGE {
        let n = unique();
        let (status, text) = operator.post_new(&ns, "dapp", &body(n, "wallet-outage")).await;
        assert!(status.is_success(), "{status} {text} after {:?} of outage\n{}", down_at.elapsed(), operator.logs());
        posted += 1;
        let got = queue.receive(1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1, "MYK-{n:06} not delivered during the outage\n{}", operator.logs());
        delivered += 1;
    }
    assert!(posted >= 5, "only {posted} requests in {OUTAGE:?}");
    own.start_apiserver().await;

    // An edit after the restart is applied once the watch reconnects, which
    // takes seconds (the restarted server answers the old resourceVersion
    // with 410 Gone; with kube's default backoff this took over a minute).
    let restarted_at = Instant::now();
    let edit = cluster.apply_relay("dapp", &db.schema, json!({"batchSize": 5})).await;
    assert!(edit.ok, "{}", edit.stderr);
    let relay = cluster
        .wait_relay("dapp", Duration::from_secs(30), "observedGeneration 2 after the restart", |r| {
            r.status.as_ref().and_then(|s| s.observed_generation) == Some(2) && super::ready(r) == Some("True")
        })
        .await;
    assert_eq!(relay.spec.batch_size, 5);
    eprintln!(
        "{posted} posted and delivered during the outage; the edit applied {:?} after the restart",
        restarted_at.elapsed()
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL").await, 0);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, delivered);
    cluster
        .wait_relay("dapp", Duration::from_secs(30), "status.unsent 0", |r| {
            r.status.as_ref().and_then(|s| s.unsent) == Some(0)
        })
        .await;
}
