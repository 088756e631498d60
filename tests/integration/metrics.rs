//! `/metrics` after a known sequence of events: every value checked.

use std::collections::HashMap;

use aws_sdk_sqs::types::QueueAttributeName;
use axum::http::StatusCode;
use serde_json::json;
use tokio::sync::watch;
use txrelay::http::{AppState, HttpOptions, ops_router};
use txrelay::runtime::registry::Registry;
use txrelay::store::ClaimMode;

use crate::common::proxy::{SqsMode, SqsProxy};
use crate::common::*;

/// `name{labels}` → value, from the text exposition format.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn metrics_after_accepted_sent_failed_and_dead_lettered() {
    let attributes = HashMap::from([(QueueAttributeName::MaximumMessageSize, "1024".to_owned())]);
    let (db, queue) = (TestDb::new().await, TestQueue::create(false, attributes).await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint)).await;
    let relay_label = app.relay.id().to_string();

    let a = body(unique(), "w");
    assert_eq!(app.post_new(&a).await.0, StatusCode::CREATED); // created, sent inline
    assert_eq!(app.post_new(&a).await.0, StatusCode::OK); // replayed
    let mut invalid = body(unique(), "w");
    invalid["ledger_payload"]["payload"]["fee"] = json!("-1");
    assert_eq!(app.post_new(&invalid).await.0, StatusCode::UNPROCESSABLE_ENTITY); // rejected
    let mut conflict = body(unique(), "w");
    conflict["ledger_payload"]["payload"]["reference"] = a["ledger_payload"]["payload"]["reference"].clone();
    assert_eq!(app.post_new(&conflict).await.0, StatusCode::CONFLICT); // rejected

    proxy.faults(|f| f.send_error = Some((403, "AccessDenied")));
    assert_eq!(app.post_new(&body(unique(), "w")).await.0, StatusCode::ACCEPTED); // created, held: the queue refused
    proxy.faults(|f| f.send_error = None);
    let mut poison = body(unique(), "w");
    poison["ledger_payload"]["payload"]["memo"] = json!("x".repeat(2000));
    assert_eq!(app.post_new(&poison).await.0, StatusCode::ACCEPTED); // created; queue marked down, so not inline

    // One sweep sends the failed row and dead-letters the poison one.
    db.execute("UPDATE transactions SET next_attempt_at = now() WHERE message_id IS NULL").await;
    let (_keep, never) = watch::channel(false);
    let report = app.relay.drain().sweep(ClaimMode::Due, 100, &never).await.unwrap();
    assert_eq!((report.sent, report.dead_lettered), (1, 1));
    app.relay.outbox().refresh_gauges().await.unwrap();

    let relays = std::sync::Arc::new(Registry::new(None));
    let ops = ops_router(AppState::new(relays, app.metrics.clone(), HttpOptions::default()));
    let response =
        tower::ServiceExt::oneshot(ops, axum::http::Request::get("/metrics").body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text =
        String::from_utf8(http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes().to_vec())
            .unwrap();
    let values = parse(&text);
    let get = |series: &str| {
        let key = series.replace("RELAY", &relay_label);
        *values.get(&key).unwrap_or_else(|| panic!("missing {key} in\n{text}"))
    };

    assert_eq!(get(r#"txrelay_transactions_accepted_total{outcome="created",relay="RELAY"}"#), 3.0);
    assert_eq!(get(r#"txrelay_transactions_accepted_total{outcome="replayed",relay="RELAY"}"#), 1.0);
    assert_eq!(get(r#"txrelay_transactions_accepted_total{outcome="rejected",relay="RELAY"}"#), 2.0);
    assert_eq!(get(r#"txrelay_messages_sent_total{path="inline",relay="RELAY"}"#), 1.0);
    assert_eq!(get(r#"txrelay_messages_sent_total{path="sweep",relay="RELAY"}"#), 1.0);
    assert_eq!(get(r#"txrelay_send_failures_total{kind="queue",relay="RELAY"}"#), 1.0);
    assert_eq!(get(r#"txrelay_send_failures_total{kind="permanent",relay="RELAY"}"#), 1.0);
    assert_eq!(get(r#"txrelay_queue_reachable{relay="RELAY"}"#), 1.0, "the sweep's send showed the queue back");
    assert_eq!(get(r#"txrelay_unsent_transactions{relay="RELAY"}"#), 0.0);
    assert_eq!(get(r#"txrelay_dead_lettered_transactions{relay="RELAY"}"#), 1.0);
    assert_eq!(get(r#"txrelay_oldest_unsent_age_seconds{relay="RELAY"}"#), 0.0);
    // Other tests share the database: only that both are published.
    assert!(get(r#"txrelay_unsent_table_dead_tuples{relay="RELAY"}"#) >= 0.0);
    assert!(get(r#"txrelay_database_oldest_xmin_age_seconds{relay="RELAY"}"#) >= 0.0);
    assert_eq!(get(r#"txrelay_sweep_duration_seconds_count{relay="RELAY"}"#), 1.0);
    // Two inline calls of one entry each (the first row, the refused one),
    // then the sweep's batch of two, which the poison row made fail as a
    // whole before it was split.
    assert_eq!(get(r#"txrelay_send_batch_size_count{relay="RELAY"}"#), 3.0);
    assert_eq!(get(r#"txrelay_send_batch_size_sum{relay="RELAY"}"#), 4.0);
    assert_eq!(get(r#"txrelay_http_request_duration_seconds_count{route="/new",status_class="2xx"}"#), 4.0);
    assert_eq!(get(r#"txrelay_http_request_duration_seconds_count{route="/new",status_class="4xx"}"#), 2.0);
    assert!(get("process_resident_memory_bytes") > 0.0);
    assert!(text.contains("# TYPE txrelay_transactions_accepted_total counter"));
    assert!(text.contains("# TYPE txrelay_unsent_transactions gauge"));
}

#[tokio::test]
async fn the_backlog_gauges_follow_the_database() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    proxy.set(SqsMode::Down);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).endpoint(&proxy.endpoint)).await;
    for _ in 0..3 {
        app.post_new(&body(unique(), "w")).await;
    }
    db.execute("UPDATE transactions SET created_at = now() - interval '90 seconds'").await;
    let gauges = app.relay.outbox().refresh_gauges().await.unwrap();
    assert_eq!(gauges.unsent, 3);
    assert!((90.0..100.0).contains(&gauges.oldest_unsent_age_seconds), "{gauges:?}");
    let text = app.metrics.render();
    let label = app.relay.id().to_string();
    assert!(text.contains(&format!("txrelay_unsent_transactions{{relay=\"{label}\"}} 3")), "{text}");
}
