//! The CRD as the API server serves it: printer columns, and invalid specs
//! refused by the server itself (OpenAPI schema and CEL rules), before any
//! operator sees them.

use serde_json::json;

use super::Cluster;

#[tokio::test]
async fn the_crd_applies_and_kubectl_get_shows_the_printer_columns() {
    let cluster = Cluster::new().await;
    // Applies cleanly: no "unrecognized format" (or any other) warning.
    let applied = cluster
        .plane
        .kubectl(
            &["apply", "--server-side", "--force-conflicts", "--field-manager=txrelay-tests", "-f", super::CRD],
            None,
        )
        .await;
    assert!(applied.ok && !applied.stderr.contains("Warning"), "{}", applied.stderr);
    let out = cluster.apply_relay("columns", "s_columns", json!({})).await;
    assert!(out.ok, "{}", out.stderr);
    let table = cluster.ok(&["get", "transactionrelays"], None).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "REASON", "UNSENT", "FAILED", "OLDEST", "AGE"], "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("columns "), "{table}");
    // The last error in the wide view; the category lists relays too.
    let wide = cluster.ok(&["get", "transactionrelays", "-o", "wide"], None).await;
    assert!(wide.lines().next().unwrap().trim_end().ends_with("AGE   LAST ERROR"), "{wide}");
    let by_category = cluster.ok(&["get", "txrelay", "-o", "name"], None).await;
    assert_eq!(by_category.trim(), "transactionrelay.relay.mykobo.io/columns");
    // The short name works too.
    let short = cluster.ok(&["get", "txr", "columns", "-o", "name"], None).await;
    assert_eq!(short.trim(), "transactionrelay.relay.mykobo.io/columns");
    // The schema's defaults are applied by the server.
    let stored = cluster.relays().get("columns").await.unwrap();
    assert_eq!(stored.spec.claim_lease.to_string(), "1m");
    assert_eq!(stored.spec.batch_size, 100);
}

#[tokio::test]
async fn the_api_server_refuses_a_claim_lease_too_short_for_a_queue_call() {
    let cluster = Cluster::new().await;
    let out =
        cluster.apply_relay("short-lease", "s_lease", json!({"claimLease": "2s", "inlineSendTimeout": "500ms"})).await;
    assert!(!out.ok, "a 2s claim lease was accepted:\n{}", out.stdout);
    assert!(out.stderr.contains("spec.claimLease") && out.stderr.contains("must be at least 5s"), "{}", out.stderr);
    assert!(cluster.kubectl(&["get", "txr", "short-lease"], None).await.stderr.contains("NotFound"));
}

#[tokio::test]
async fn the_api_server_refuses_an_inline_send_timeout_of_half_the_claim_lease() {
    let cluster = Cluster::new().await;
    let out =
        cluster.apply_relay("slow-inline", "s_inline", json!({"claimLease": "10s", "inlineSendTimeout": "5s"})).await;
    assert!(!out.ok, "accepted:\n{}", out.stdout);
    assert!(
        out.stderr.contains("spec.inlineSendTimeout") && out.stderr.contains("half of spec.claimLease"),
        "{}",
        out.stderr
    );
    // Just inside the limit, and a lease in days, are accepted.
    let ok = cluster
        .apply_relay("slow-inline", "s_inline", json!({"claimLease": "10s", "inlineSendTimeout": "4999ms"}))
        .await;
    assert!(ok.ok, "{}", ok.stderr);
    let days =
        cluster.apply_relay("lease-in-days", "s_days", json!({"claimLease": "1d", "inlineSendTimeout": "2s"})).await;
    assert!(days.ok, "{}", days.stderr);
}

#[tokio::test]
async fn the_api_server_refuses_an_invalid_spec_with_the_field_named() {
    let cluster = Cluster::new().await;
    for (spec, field) in [
        (json!({"batchSize": 0}), "spec.batchSize"),
        (json!({"concurrency": 65}), "spec.concurrency"),
        (json!({"retryInterval": "5 minutes"}), "spec.retryInterval"),
        (json!({"database": {"secretRef": {"name": "db"}, "schema": "Bad-Schema"}}), "spec.database.schema"),
        (json!({"queue": {"secretRef": {"name": ""}}}), "spec.queue.secretRef.name"),
    ] {
        let out = cluster.apply_relay("invalid", "s_invalid", spec.clone()).await;
        assert!(!out.ok, "{spec} was accepted");
        assert!(out.stderr.contains("is invalid") && out.stderr.contains(field), "{spec}: {}", out.stderr);
    }
}

#[tokio::test]
async fn the_database_schema_cannot_be_changed_once_created() {
    let cluster = Cluster::new().await;
    assert!(cluster.apply_relay("pinned", "s_first", json!({})).await.ok);
    // Other fields change freely.
    let edit = cluster.apply_relay("pinned", "s_first", json!({"batchSize": 7})).await;
    assert!(edit.ok, "{}", edit.stderr);
    let moved = cluster.apply_relay("pinned", "s_second", json!({"batchSize": 7})).await;
    assert!(!moved.ok, "the schema changed:\n{}", moved.stdout);
    assert!(moved.stderr.contains("spec.database.schema") && moved.stderr.contains("immutable"), "{}", moved.stderr);
    // Nor through a patch that bypasses kubectl apply's diff.
    let patch = cluster
        .kubectl(
            &["patch", "txr", "pinned", "--type=merge", "-p", r#"{"spec":{"database":{"schema":"s_third"}}}"#],
            None,
        )
        .await;
    assert!(!patch.ok && patch.stderr.contains("immutable"), "{}", patch.stderr);
    let stored = cluster.relays().get("pinned").await.unwrap();
    assert_eq!(stored.spec.database.schema, "s_first");
    assert_eq!(stored.spec.batch_size, 7);
}

/// Found on the real server: the schema accepted `maxAttempts: 4294967296`
/// and `retryInterval: 99999999999999999999s`, which the operator cannot
/// deserialize, and one such object fails the watcher's whole list, so the
/// operator saw no relay at all. The API server refuses them now.
#[tokio::test]
async fn the_api_server_refuses_numbers_and_durations_the_operator_could_not_read() {
    let cluster = Cluster::new().await;
    for (spec, field) in [
        (json!({"maxAttempts": 4_294_967_296_u64}), "spec.maxAttempts"),
        (json!({"retryInterval": "99999999999999999999s"}), "spec.retryInterval"),
        (json!({"idempotencyWindow": "1d1d1d1d1d1d"}), "spec.idempotencyWindow"),
        (json!({"retention": "9999999999999d"}), "spec.retention"),
    ] {
        let out = cluster.apply_relay("unreadable", "s_unreadable", spec.clone()).await;
        assert!(!out.ok, "{spec} was accepted");
        assert!(out.stderr.contains(field), "{spec}: {}", out.stderr);
    }
    let fine = json!({"maxAttempts": 4_294_967_295_u64, "retryInterval": "1h30m15s500ms", "retention": "999999999d",
                      "idempotencyWindow": "999999999d"});
    let out = cluster.apply_relay("unreadable", "s_unreadable", fine).await;
    assert!(out.ok, "{}", out.stderr);
    let stored = cluster.relays().get("unreadable").await.expect("the operator's type reads what the server stores");
    assert_eq!(stored.spec.max_attempts, u32::MAX);
}

/// The tier runs the API server the issue pins (scripts/control-plane.sh).
#[tokio::test]
async fn the_api_server_is_kubernetes_v1_37_2() {
    let plane = super::ControlPlane::shared();
    let out = plane.ok(&["version", "-o", "json"], None).await;
    let version: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.37.2", "{out}");
    assert_eq!(version["clientVersion"]["gitVersion"], "v1.37.2", "kubectl from the same build: {out}");
}
