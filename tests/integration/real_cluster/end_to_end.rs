//! A TransactionRelay reconciled by the operator binary, running as its
//! ServiceAccount under deploy/'s RBAC, on a real API server: Ready, /new
//! through the operator's listener, delivery to the queue, status counts.

use std::time::Duration;

use serde_json::json;

use super::{Cluster, backends, ready};
use crate::common::{body, unique};

#[tokio::test]
async fn a_relay_becomes_ready_and_what_is_posted_to_the_operator_is_committed_delivered_and_counted() {
    let cluster = Cluster::new().await;
    let (db, queue) = backends().await;
    cluster.secrets(&db, &queue).await;
    let operator = cluster.operator("op-0").await;
    let ns = cluster.namespace.clone();

    // Suspended first: stored but not sent, so the status shows the backlog.
    let out = cluster.apply_relay("dapp", &db.schema, json!({"suspend": true})).await;
    assert!(out.ok, "{}", out.stderr);
    let relay = cluster.wait_ready("dapp", Duration::from_secs(30)).await;
    let reason = relay.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap().reason.clone();
    assert_eq!(reason, "Suspended", "{:?}\n{}", relay.status, operator.logs());

    let numbers: Vec<u64> = (0..3).map(|_| unique()).collect();
    let references: Vec<String> = numbers.iter().map(|n| format!("MYK-{n:06}")).collect();
    for n in &numbers {
        let (status, text) = operator.post_new(&ns, "dapp", &body(*n, "wallet-e2e")).await;
        assert!(status.is_success(), "{status} {text}\n{}", operator.logs());
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 3, "committed before the answer");
    cluster
        .wait_relay("dapp", Duration::from_secs(30), "status.unsent = 3", |r| {
            r.status.as_ref().and_then(|s| s.unsent) == Some(3)
        })
        .await;
    let table = cluster.ok(&["get", "txr", "dapp", "--no-headers"], None).await;
    let columns: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(&columns[..5], ["dapp", "True", "Suspended", "3", "0"], "{table}");
    // The oldest unsent transaction's wait, as a duration ("5s", "2m").
    assert!(columns.len() == 7 && columns[5].ends_with(['s', 'm', 'h', 'd']), "{table}");

    // Resumed by an edit: everything is delivered and the counts drop to 0.
    let out = cluster.apply_relay("dapp", &db.schema, json!({"suspend": false})).await;
    assert!(out.ok, "{}", out.stderr);
    let messages = queue.receive(3, Duration::from_secs(30)).await;
    let mut delivered: Vec<String> = messages
        .iter()
        .map(|m| {
            let body: serde_json::Value = serde_json::from_str(m.body.as_deref().unwrap()).unwrap();
            body["payload"]["reference"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    delivered.sort();
    let mut expected = references.clone();
    expected.sort();
    assert_eq!(delivered, expected, "{}", operator.logs());
    let relay = cluster
        .wait_relay("dapp", Duration::from_secs(30), "Ready=True RelayRunning, unsent 0, failed 0, generation 2", |r| {
            let status = r.status.as_ref();
            ready(r) == Some("True")
                && status.is_some_and(|s| {
                    s.unsent == Some(0)
                        && s.failed == Some(0)
                        && s.observed_generation == Some(2)
                        && s.last_sweep_time.is_some()
                        && s.conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "RelayRunning")
                })
        })
        .await;
    assert_eq!(relay.metadata.generation, Some(2));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL").await, 0);
    let table = cluster.ok(&["get", "txr", "dapp", "--no-headers"], None).await;
    let columns: Vec<&str> = table.split_whitespace().collect();
    assert_eq!(&columns[..5], ["dapp", "True", "RelayRunning", "0", "0"], "{table}");
    // Nothing waits: the Oldest cell is empty, and only Age follows.
    assert_eq!(columns.len(), 6, "{table}");
}
