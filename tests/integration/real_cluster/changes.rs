//! Changes made to a running relay through the API server: a Secret
//! rotated, a token revoked while a rebuild waits on its database, an
//! invalid edit, a relay deleted and created again.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{Cluster, backends, http, ready};
use crate::common::proxy::TcpProxy;
use crate::common::{INGEST_TOKEN, body, database_address, unique, wait_until};

/// `POST /relays/{ns}/{name}/new` with `token`.
async fn post_with(operator: &super::Operator, ns: &str, name: &str, token: &str) -> (StatusCode, String) {
    http(operator.api, "POST", &format!("/relays/{ns}/{name}/new"), Some(token), &body(unique(), "w-change")).await
}

fn secret(name: &str, data: Value) -> String {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", "stringData": data})
        .to_string()
}

#[tokio::test]
async fn a_revoked_token_is_refused_within_seconds_even_while_a_rebuild_waits_for_its_database() {
    let cluster = Cluster::new().await;
    let (db, queue) = backends().await;
    cluster.secrets(&db, &queue).await;
    let operator = cluster.operator("op-0").await;
    let ns = cluster.namespace.clone();
    assert!(cluster.apply_relay("dapp", &db.schema, json!({})).await.ok);
    cluster.wait_ready("dapp", Duration::from_secs(30)).await;
    let (status, text) = post_with(&operator, &ns, "dapp", INGEST_TOKEN).await;
    assert!(status.is_success(), "{status} {text}");

    // An edit that rebuilds the relay on a new database URL whose migration
    // never gets an answer to its first statement (its look at
    // `_sqlx_migrations`, as on a database that stopped answering): the
    // reconcile waits out its migration bound, a minute here.
    let proxy = TcpProxy::start(database_address(&db.url)).await;
    proxy.hang_reply_after(b"_sqlx_migrations");
    // In clear text, so the proxy can see which statement goes out.
    let separator = if db.url.contains('?') { '&' } else { '?' };
    let stalled_url = format!("{}{separator}sslmode=disable", proxy.url_for(&db.url));
    cluster.ok(&["apply", "-f", "-"], Some(&secret("db-stalled", json!({"url": stalled_url})))).await;
    let out = cluster
        .apply_relay(
            "dapp",
            &db.schema,
            json!({"database": {"secretRef": {"name": "db-stalled", "key": "url"}, "schema": db.schema,
                                "migrationTimeout": "60s"}}),
        )
        .await;
    assert!(out.ok, "{}", out.stderr);
    wait_until(Duration::from_secs(20), "the rebuild to wait on its migration", || async { proxy.marker_seen() }).await;

    // The token is revoked (rotated to a new one) meanwhile.
    cluster.ok(&["apply", "-f", "-"], Some(&secret("tokens", json!({"tokens": "rotated-token"})))).await;
    wait_until(Duration::from_secs(10), "the old token refused while the rebuild still waits", || async {
        post_with(&operator, &ns, "dapp", INGEST_TOKEN).await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    let (status, text) = post_with(&operator, &ns, "dapp", "rotated-token").await;
    assert!(status.is_success(), "the rotated token works on the running relay: {status} {text}\n{}", operator.logs());
    assert!(!operator.logs().contains("relay reconfigured"), "the rebuild was still waiting");

    // The rebuild ends on a database that answers; it keeps the rotated
    // token, never the one it was read with.
    cluster.ok(&["apply", "-f", "-"], Some(&secret("db-stalled", json!({"url": db.url})))).await;
    proxy.set_up(false);
    cluster.wait_ready("dapp", Duration::from_secs(90)).await;
    assert_eq!(post_with(&operator, &ns, "dapp", INGEST_TOKEN).await.0, StatusCode::UNAUTHORIZED);
    assert!(post_with(&operator, &ns, "dapp", "rotated-token").await.0.is_success(), "{}", operator.logs());
}

#[tokio::test]
async fn a_rotated_database_secret_is_used_and_an_invalid_edit_keeps_the_relay_running_and_ready_false() {
    let cluster = Cluster::new().await;
    let (db, queue) = backends().await;
    cluster.secrets(&db, &queue).await;
    let operator = cluster.operator("op-0").await;
    let ns = cluster.namespace.clone();
    assert!(cluster.apply_relay("dapp", &db.schema, json!({})).await.ok);
    cluster.wait_ready("dapp", Duration::from_secs(30)).await;

    // The database URL rotated to go through a proxy: the relay is rebuilt
    // on it, and what is posted next goes through it.
    let proxy = TcpProxy::start(database_address(&db.url)).await;
    cluster.ok(&["apply", "-f", "-"], Some(&secret("db", json!({"url": proxy.url_for(&db.url)})))).await;
    wait_until(Duration::from_secs(30), "the relay to use the rotated database URL", || async {
        proxy.connections() > 0
    })
    .await;
    let (status, text) = post_with(&operator, &ns, "dapp", INGEST_TOKEN).await;
    assert!(status.is_success(), "{status} {text}");

    // An edit the operator cannot run (its queue Secret does not exist):
    // Ready=False with the reason, for that generation, and the relay that
    // runs keeps serving.
    let out =
        cluster.apply_relay("dapp", &db.schema, json!({"queue": {"secretRef": {"name": "no-such-secret"}}})).await;
    assert!(out.ok, "{}", out.stderr);
    let relay = cluster
        .wait_relay("dapp", Duration::from_secs(30), "Ready=False, observedGeneration not advanced", |r| {
            ready(r) == Some("False") && r.status.as_ref().and_then(|s| s.observed_generation) < r.metadata.generation
        })
        .await;
    let condition = relay.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap().clone();
    assert!(condition.message.contains("no-such-secret"), "{condition:?}");
    let (status, text) = post_with(&operator, &ns, "dapp", INGEST_TOKEN).await;
    assert!(status.is_success(), "the running relay keeps serving: {status} {text}\n{}", operator.logs());
}

#[tokio::test]
async fn a_deleted_relay_keeps_its_rows_and_created_again_delivers_them() {
    let cluster = Cluster::new().await;
    let (db, queue) = backends().await;
    cluster.secrets(&db, &queue).await;
    let operator = cluster.operator("op-0").await;
    let ns = cluster.namespace.clone();
    // Suspended: what is posted stays unsent.
    assert!(cluster.apply_relay("dapp", &db.schema, json!({"suspend": true})).await.ok);
    cluster.wait_ready("dapp", Duration::from_secs(30)).await;
    for _ in 0..3 {
        let (status, text) = post_with(&operator, &ns, "dapp", INGEST_TOKEN).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{text}");
    }

    cluster.ok(&["delete", "transactionrelay", "dapp", "--wait=false"], None).await;
    wait_until(Duration::from_secs(20), "the operator to stop the deleted relay", || async {
        operator.logs().contains("stopping relay")
    })
    .await;
    let (status, _) = post_with(&operator, &ns, "dapp", INGEST_TOKEN).await;
    assert!(!status.is_success(), "a deleted relay takes nothing: {status}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL").await, 3, "rows kept");

    assert!(cluster.apply_relay("dapp", &db.schema, json!({"suspend": false})).await.ok);
    cluster.wait_ready("dapp", Duration::from_secs(30)).await;
    assert_eq!(queue.receive(3, Duration::from_secs(30)).await.len(), 3, "{}", operator.logs());
    wait_until(Duration::from_secs(10), "every row recorded as sent", || async {
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL").await == 0
    })
    .await;
}
