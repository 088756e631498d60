//! Resends by hand: filters choose exactly the rows they name, a dry run
//! changes nothing, every resend leaves one audit record (CLI and HTTP), and
//! the HTTP retry endpoints answer as documented.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

/// Rows in the states a filter tells apart, returned by name.
struct Rows {
    /// The oldest row of all, in no filter's choice but the widest: a
    /// resend that ignored its chosen ids would take it first.
    decoy_w3: i64,
    old_w1: i64,
    new_w1: i64,
    throttled_w2: i64,
    dead_w2: i64,
    sent_w1: i64,
}

async fn rows(db: &TestDb) -> Rows {
    let decoy_w3 = insert_unsent(db, "w3").await;
    let old_w1 = insert_unsent(db, "w1").await;
    let new_w1 = insert_unsent(db, "w1").await;
    let throttled_w2 = insert_unsent(db, "w2").await;
    let dead_w2 = insert_unsent(db, "w2").await;
    let sent_w1 = insert_unsent(db, "w1").await;
    // Creation times of their own, whatever today's date.
    db.execute("UPDATE transactions SET created_at = '2026-11-01T00:00:00Z'").await;
    db.execute(&format!(
        "UPDATE transactions SET created_at = '2026-01-01T00:00:00Z' WHERE id IN ({old_w1}, {decoy_w3})"
    ))
    .await;
    db.execute(&format!(
        "UPDATE transactions SET last_error = 'ThrottlingException: slow down', attempts = 2 WHERE id = {throttled_w2}"
    ))
    .await;
    db.execute(&format!(
        "UPDATE transactions SET failed_at = now(), last_error = 'InvalidMessageContents' WHERE id = {dead_w2}"
    ))
    .await;
    db.execute(&format!("UPDATE transactions SET message_id = 'already', queue_sent_at = now() WHERE id = {sent_w1}"))
        .await;
    // Nothing is due by itself: only a resend sends.
    db.execute("UPDATE transactions SET next_attempt_at = now() + interval '1 hour'").await;
    Rows { decoy_w3, old_w1, new_w1, throttled_w2, dead_w2, sent_w1 }
}

/// actor, via, command, filter, transaction_ids, succeeded, outcome
type AuditRecord = (String, String, String, Value, Vec<i64>, Option<i32>, Option<String>);

async fn cli(db: &TestDb, queue: &TestQueue, args: &[&str]) -> (i32, String, String) {
    run_to_end(command(&db.url, &db.schema, &queue.url, &queue.endpoint).env("USER", "alice").args(args)).await
}

/// The ids a dry run lists.
fn listed(stdout: &str) -> Vec<i64> {
    stdout.lines().filter_map(|line| line.split_whitespace().next()?.parse().ok()).collect()
}

#[tokio::test]
async fn filters_choose_exactly_the_rows_they_name_and_a_dry_run_changes_nothing() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let r = rows(&db).await;
    let before: String =
        sqlx::query_scalar("SELECT string_agg(row_to_json(t)::text, ',' ORDER BY id) FROM transactions t")
            .fetch_one(&db.psql)
            .await
            .unwrap();
    let cases: [(&[&str], Vec<i64>); 7] = [
        (&[], vec![r.decoy_w3, r.old_w1, r.new_w1, r.throttled_w2]),
        (&["--include-dead"], vec![r.decoy_w3, r.old_w1, r.new_w1, r.throttled_w2, r.dead_w2]),
        (&["--dead-only"], vec![r.dead_w2]),
        (&["--wallet", "w1"], vec![r.old_w1, r.new_w1]),
        (&["--since", "2026-06-01"], vec![r.new_w1, r.throttled_w2]),
        (&["--until", "2026-06-01T00:00:00Z"], vec![r.decoy_w3, r.old_w1]),
        (&["--error", "Throttling", "--include-dead"], vec![r.throttled_w2]),
    ];
    for (filter, expected) in cases {
        let mut args = vec!["retry-all", "--dry-run"];
        args.extend_from_slice(filter);
        let (code, stdout, stderr) = cli(&db, &queue, &args).await;
        assert_eq!(code, 0, "{filter:?}: {stderr}");
        assert_eq!(listed(&stdout), expected, "{filter:?}:\n{stdout}");
        assert!(stdout.contains(&format!("would resend: {}", expected.len())), "{stdout}");
    }
    let (code, stdout, _) = cli(&db, &queue, &["retry-all", "--dry-run", "--limit", "1"]).await;
    assert_eq!((code, listed(&stdout)), (0, vec![r.decoy_w3]), "the limit takes the oldest");
    assert!(!listed(&cli(&db, &queue, &["retry-all", "--dry-run", "--include-dead"]).await.1).contains(&r.sent_w1));

    let after: String =
        sqlx::query_scalar("SELECT string_agg(row_to_json(t)::text, ',' ORDER BY id) FROM transactions t")
            .fetch_one(&db.psql)
            .await
            .unwrap();
    assert_eq!(after, before, "a dry run changes nothing");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM resend_audit").await, 0, "and leaves no audit record");
    assert!(queue.receive(1, Duration::from_millis(500)).await.is_empty(), "and sends nothing");
}

#[tokio::test]
async fn each_resend_from_the_cli_leaves_one_audit_record_and_one_log_line() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let r = rows(&db).await;
    let (code, stdout, stderr) = cli(&db, &queue, &["retry-all", "--wallet", "w1", "--rate", "100/s"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("succeeded: 2"), "{stdout}");
    assert_eq!(queue.receive(3, Duration::from_secs(3)).await.len(), 2, "the two rows of w1, and nothing else");
    let still_unsent = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM transactions WHERE message_id IS NULL AND id IN ({}, {})",
            r.decoy_w3, r.throttled_w2
        ))
        .await;
    assert_eq!(still_unsent, 2, "rows the filter did not name stay as they were");
    assert!(stderr.contains("resend started") && stderr.contains("alice"), "one structured line: {stderr}");

    let (code, _, stderr) = cli(&db, &queue, &["retry-all", "--dead-only"]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = cli(&db, &queue, &["retry", &r.throttled_w2.to_string()]).await;
    assert_eq!(code, 0, "{stderr}");

    let records: Vec<AuditRecord> = sqlx::query_as(
        "SELECT actor, via, command, filter, transaction_ids, succeeded, outcome FROM resend_audit ORDER BY id",
    )
    .fetch_all(&db.psql)
    .await
    .unwrap();
    assert_eq!(records.len(), 3, "one record per resend: {records:?}");
    let (actor, via, command, filter, ids, succeeded, outcome) = &records[0];
    assert_eq!((actor.as_str(), via.as_str(), command.as_str()), ("alice", "cli", "retry-all"));
    assert_eq!(filter["wallet"], "w1");
    assert_eq!(filter["rate"], 100.0);
    assert_eq!(ids, &vec![r.old_w1, r.new_w1]);
    assert_eq!((*succeeded, outcome.as_deref()), (Some(2), Some("completed")));
    assert_eq!(records[1].4, vec![r.dead_w2]);
    assert_eq!(records[1].3["dead_only"], true);
    assert_eq!((records[2].2.as_str(), &records[2].4), ("retry", &vec![r.throttled_w2]));
    assert!(records.iter().all(|record| record.5.is_some()), "every record has its outcome");
    let _ = r.sent_w1;
}

async fn post(app: &TestApp, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
    app.request("POST", path, token, "application/json", serde_json::to_vec(&body).unwrap()).await
}

#[tokio::test]
async fn the_http_retry_endpoints_need_the_admin_token_and_answer_each_case_as_documented() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    let r = rows(&db).await;
    let retry = |id: i64| format!("/transactions/{id}/retry");

    for token in [None, Some(INGEST_TOKEN), Some("wrong")] {
        let (status, _) = post(&app, &retry(r.dead_w2), token, json!({})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        let (status, _) = post(&app, "/retry-all", token, json!({})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
    }
    let (status, body) = post(&app, &retry(999_999), Some(ADMIN_TOKEN), json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let (status, body) = post(&app, "/transactions/abc/retry", Some(ADMIN_TOKEN), json!({})).await;
    assert_eq!((status, body["error"]["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("id")));

    // Already sent: refused, and nothing is sent again.
    let (status, body) = post(&app, &retry(r.sent_w1), Some(ADMIN_TOKEN), json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("already_sent")));
    // Held by a running relay: refused until its lease ends.
    db.execute(&format!("UPDATE transactions SET claimed_until = now() + interval '1 hour' WHERE id = {}", r.decoy_w3))
        .await;
    let (status, body) = post(&app, &retry(r.decoy_w3), Some(ADMIN_TOKEN), json!({})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("held")));

    // A dead-lettered row is revived and sent.
    let (status, body) = post(&app, &retry(r.dead_w2), Some(ADMIN_TOKEN), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let message = queue.receive(1, Duration::from_secs(10)).await.pop().expect("sent");
    assert_eq!(body["message_id"].as_str(), message.message_id.as_deref());
    let row = db.store.find_by_id(r.dead_w2).await.unwrap().unwrap();
    assert!(row.failed_at.is_none() && row.message_id.is_some(), "revived and sent: {row:?}");

    // retry-all: a dry run lists, a real one resends what the filter names.
    let (status, body) = post(&app, "/retry-all", Some(ADMIN_TOKEN), json!({"wallet": "w1", "dry_run": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<i64> = body["rows"].as_array().unwrap().iter().map(|row| row["id"].as_i64().unwrap()).collect();
    assert_eq!((ids, body["audit_id"].clone()), (vec![r.old_w1, r.new_w1], Value::Null));
    let (status, body) = post(&app, "/retry-all", Some(ADMIN_TOKEN), json!({"wallet": "w1", "limit": 10})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["selected"].as_i64(), body["succeeded"].as_i64()), (Some(2), Some(2)));
    for (body, field) in [
        (json!({"limit": 0}), "limit"),
        (json!({"limit": -1}), "limit"),
        (json!({"limit": 5000}), "limit"),
        (json!({"rate": -1}), "rate"),
        (json!({"dead_only": true, "include_dead": true}), "dead_only"),
        (json!({"wallet": "a\u{0}b"}), "wallet"),
    ] {
        let (status, answer) = post(&app, "/retry-all", Some(ADMIN_TOKEN), body.clone()).await;
        assert_eq!(
            (status, answer["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some(field)),
            "{body}"
        );
    }
    let (status, _) = post(&app, "/retry-all", Some(ADMIN_TOKEN), json!({"unknown": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let records: Vec<(String, String, String, Vec<i64>, String)> =
        sqlx::query_as("SELECT actor, via, command, transaction_ids, outcome FROM resend_audit ORDER BY id")
            .fetch_all(&db.psql)
            .await
            .unwrap();
    let summary: Vec<(&str, &[i64], &str)> = records
        .iter()
        .map(|(_, _, command, ids, outcome)| (command.as_str(), ids.as_slice(), outcome.split(':').next().unwrap()))
        .collect();
    assert_eq!(
        summary,
        [
            ("retry", &[999_999][..], "refused"),
            ("retry", &[r.sent_w1][..], "refused"),
            ("retry", &[r.decoy_w3][..], "refused"),
            ("retry", &[r.dead_w2][..], "sent"),
            ("retry-all", &[r.old_w1, r.new_w1][..], "completed"),
        ],
        "one record per attempt, with its outcome; none for bad requests or dry runs"
    );
    for (actor, via, _, _, _) in &records {
        assert_eq!(via, "http");
        assert!(actor.starts_with("admin token sha256:") && !actor.contains(ADMIN_TOKEN), "{actor}");
    }
}

#[tokio::test]
async fn a_dead_row_that_fails_again_is_tried_once_per_resend() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let dead = insert_unsent(&db, "w").await;
    let reference: String = sqlx::query_scalar("SELECT reference FROM transactions WHERE id = $1")
        .bind(dead)
        .fetch_one(&db.psql)
        .await
        .unwrap();
    db.execute(&format!("UPDATE transactions SET failed_at = now(), last_error = 'refused' WHERE id = {dead}")).await;
    // The queue refuses this message for itself (SenderFault): every send
    // of it dead-letters it again.
    let proxy = crate::common::proxy::SqsProxy::start(&queue.endpoint).await;
    proxy.faults(|f| f.refuse_entries = Some((reference, true)));
    let started = std::time::Instant::now();
    let (code, stdout, stderr) = run_to_end(
        command(&db.url, &db.schema, &queue.url, &proxy.endpoint)
            .env("USER", "alice")
            .args(["retry-all", "--dead-only"]),
    )
    .await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("total: 1\nsucceeded: 0\nfailed: 1"), "{stdout}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE failed_at IS NOT NULL").await, 1);
    assert_eq!(db.scalar_i64("SELECT attempts::int8 FROM transactions").await, 1, "one attempt, not a loop");
}

#[tokio::test]
async fn resends_by_hand_send_nothing_while_the_relay_is_suspended() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue).spec(|s| s.suspend = true)).await;
    let r = rows(&db).await;
    for (path, body) in [
        (format!("/transactions/{}/retry", r.dead_w2), json!({})),
        (format!("/transactions/{}/retry", r.old_w1), json!({})),
        ("/retry-all".to_owned(), json!({})),
        ("/retry-all".to_owned(), json!({"include_dead": true})),
    ] {
        let (status, answer) = post(&app, &path, Some(ADMIN_TOKEN), body).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("suspended")),
            "{path}: {answer}"
        );
    }
    // A dry run changes nothing: it still answers.
    let (status, answer) = post(&app, "/retry-all", Some(ADMIN_TOKEN), json!({"dry_run": true})).await;
    assert_eq!((status, answer["selected"].as_i64()), (StatusCode::OK, Some(4)), "{answer}");

    let mut spec = spec(&db.schema);
    spec.suspend = true;
    let config = manifest_file(&spec);
    let config = config.to_str().unwrap();
    for args in [
        vec!["--config", config, "retry-all"],
        vec!["--config", config, "retry-all", "--include-dead"],
        vec!["--config", config, "retry", &r.dead_w2.to_string()],
    ] {
        let (code, _, stderr) = cli(&db, &queue, &args).await;
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains("suspended"), "{args:?}: {stderr}");
    }
    assert!(queue.receive(1, Duration::from_secs(2)).await.is_empty(), "nothing was sent");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NOT NULL").await,
        1,
        "only the row sent before"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM resend_audit").await, 0, "refused before anything began");
}

/// The schema allows any positive `rate`: the server takes every one, and a
/// run too slow for the request stops at its share of the timeout, saying so.
#[tokio::test]
async fn any_rate_the_schema_allows_is_taken_and_a_slow_run_stops_within_its_time_budget() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let options = txrelay::http::HttpOptions { request_timeout: Duration::from_secs(2), ..Default::default() };
    let app = TestApp::with_options(&RelayBuilder::new(&db, &queue), options).await;
    rows(&db).await;
    let started = std::time::Instant::now();
    let (status, report) = post(&app, "/retry-all", Some(ADMIN_TOKEN), json!({"rate": 5e-324})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert!(report["stopped"].as_str().is_some_and(|s| s.contains("time budget")), "{report}");
    assert_eq!(report["succeeded"].as_i64(), Some(1), "the first message goes at once: {report}");
    assert!(started.elapsed() < Duration::from_secs(2), "within the request timeout: {:?}", started.elapsed());
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM resend_audit").fetch_one(&db.psql).await.unwrap();
    assert!(outcome.starts_with("stopped: the time budget"), "{outcome}");
}
