//! Events as `kubectl get events` shows them (events.k8s.io/v1), from the
//! operator's reporting controller, under deploy/'s RBAC.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Cluster, MANAGER, backends};
use crate::common::wait_until;

async fn events(cluster: &Cluster) -> Vec<Value> {
    let text = cluster.ok(&["get", "events.events.k8s.io", "-o", "json"], None).await;
    let list: Value = serde_json::from_str(&text).unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn the_operators_events_are_listed_by_kubectl_get_events() {
    let cluster = Cluster::new().await;
    let (db, queue) = backends().await;
    cluster.secrets(&db, &queue).await;
    let operator = cluster.operator("op-events").await;

    // One relay whose database Secret does not exist: a Warning.
    let out = cluster
        .apply_relay(
            "broken",
            "s_broken",
            json!({"database": {"secretRef": {"name": "missing"}, "schema": "s_broken"}}),
        )
        .await;
    assert!(out.ok, "{}", out.stderr);
    // One that starts: a Normal Event.
    assert!(cluster.apply_relay("working", &db.schema, json!({})).await.ok);

    let seen = std::sync::Mutex::new(Vec::new());
    wait_until(Duration::from_secs(30), "a SecretNotFound Warning and a RelayStarted Event", || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let items = events(&cluster).await;
        let found =
            |relay: &str, reason: &str| items.iter().any(|e| e["regarding"]["name"] == relay && e["reason"] == reason);
        let done = found("broken", "SecretNotFound") && found("working", "RelayStarted");
        *seen.lock().unwrap() = items;
        done
    })
    .await;
    let items = seen.into_inner().unwrap();
    for event in &items {
        assert_eq!(event["reportingController"], MANAGER, "{event}");
        assert_eq!(event["reportingInstance"], "op-events", "{event}");
        assert_eq!(event["regarding"]["kind"], "TransactionRelay", "{event}");
    }
    let warning = items.iter().find(|e| e["reason"] == "SecretNotFound").unwrap();
    assert_eq!(warning["type"], "Warning");
    assert!(warning["note"].as_str().unwrap_or_default().contains("missing"), "{warning}");

    // And as a person reads them.
    let table = cluster.ok(&["get", "events", "--field-selector", "reason=SecretNotFound"], None).await;
    assert!(table.contains("transactionrelay/broken") && table.contains("Warning"), "{table}");
    let described = cluster.ok(&["describe", "txr", "broken"], None).await;
    assert!(described.contains("SecretNotFound"), "{described}");
    drop(operator);
}
