//! The administrative commands as a user runs them.

use std::time::Duration;

use serde_json::Value;
use txrelay::store::{ClaimRef, FailedSend};

use crate::common::*;

async fn txrelay(db: &TestDb, queue: &TestQueue, args: &[&str]) -> (i32, String, String) {
    let output = command(&db.url, &db.schema, &queue.url, &queue.endpoint).args(args).output().await.unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn retry_sends_one_row_now_and_prints_its_message_id() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let id = insert_unsent(&db, "w").await;
    db.execute(&format!("UPDATE transactions SET next_attempt_at = now() + interval '1 hour' WHERE id = {id}")).await;
    let (code, stdout, stderr) = txrelay(&db, &queue, &["retry", &id.to_string()]).await;
    assert_eq!(code, 0, "{stderr}");
    let message_id = stdout.trim();
    let message = queue.receive(1, Duration::from_secs(5)).await.pop().expect("delivered");
    assert_eq!(message.message_id.as_deref(), Some(message_id));
    assert_eq!(db.store.find_by_id(id).await.unwrap().unwrap().message_id.as_deref(), Some(message_id));

    let (code, _, stderr) = txrelay(&db, &queue, &["retry", "999999"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("no transaction with id 999999"), "{stderr}");
}

#[tokio::test]
async fn retry_revives_a_dead_lettered_row() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let id = insert_unsent(&db, "w").await;
    let dead =
        FailedSend { row: ClaimRef::unclaimed(id), error: "poison".into(), retry_in: Duration::ZERO, permanent: true };
    db.store.record_failures(&[dead], 20).await.unwrap();
    let (code, _, stderr) = txrelay(&db, &queue, &["retry", &id.to_string()]).await;
    assert_eq!(code, 0, "{stderr}");
    let row = db.store.find_by_id(id).await.unwrap().unwrap();
    assert!(row.message_id.is_some() && row.failed_at.is_none());
}

#[tokio::test]
async fn retry_all_delivers_every_unsent_row_but_not_those_a_relay_holds() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let mut ids = Vec::new();
    for _ in 0..25 {
        ids.push(insert_unsent(&db, "w").await);
    }
    let held = ids[3];
    db.execute(&format!(
        "UPDATE transactions SET next_attempt_at = now() + interval '1 hour', claimed_until = now() + interval '1 hour' WHERE id = {held}"
    ))
    .await;
    db.execute(&format!("UPDATE transactions SET next_attempt_at = now() + interval '1 hour' WHERE id = {}", ids[4]))
        .await;
    let dead = ids[5];
    db.store
        .record_failures(
            &[FailedSend {
                row: ClaimRef::unclaimed(dead),
                error: "x".into(),
                retry_in: Duration::ZERO,
                permanent: true,
            }],
            20,
        )
        .await
        .unwrap();

    let (code, stdout, stderr) = txrelay(&db, &queue, &["retry-all"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("total: 23\nsucceeded: 23\nfailed: 0"), "{stdout}");
    assert_eq!(queue.drain().await.len(), 23, "backoff ignored, held and dead rows left alone");
    assert!(db.store.find_by_id(held).await.unwrap().unwrap().message_id.is_none());

    let (code, stdout, _) = txrelay(&db, &queue, &["retry-all", "--include-dead"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("revived: 1"), "{stdout}");
    assert!(db.store.find_by_id(dead).await.unwrap().unwrap().message_id.is_some());
}

#[tokio::test]
async fn retry_all_stops_with_exit_code_1_when_the_queue_refuses_and_burns_no_attempt() {
    let (db, mut queue) = (TestDb::new().await, TestQueue::standard().await);
    let id = insert_unsent(&db, "w").await;
    queue.url = format!("{}-missing", queue.url);
    let (code, stdout, stderr) = txrelay(&db, &queue, &["retry-all"]).await;
    assert_eq!(code, 1);
    assert!(stdout.contains("failed: 0"), "{stdout}");
    assert!(stderr.contains("stopped early") && stderr.contains("NonExistentQueue"), "{stderr}");
    let row = db.store.find_by_id(id).await.unwrap().unwrap();
    assert_eq!((row.attempts, row.failed_at), (0, None), "held for the relay, not dead-lettered");
}

#[tokio::test]
async fn list_and_stats_show_what_is_not_sent() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let sent = insert_unsent(&db, "w").await;
    let unsent = insert_unsent(&db, "w").await;
    db.store.record_sent(&[(ClaimRef::unclaimed(sent), "m-1".into())]).await.unwrap();

    let (code, stdout, _) = txrelay(&db, &queue, &["list", "--json"]).await;
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&stdout).unwrap();
    let ids: Vec<i64> = listed.as_array().unwrap().iter().map(|t| t["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [unsent]);
    let (_, table, _) = txrelay(&db, &queue, &["list"]).await;
    assert!(table.contains("unsent"), "{table}");

    let (code, stdout, _) = txrelay(&db, &queue, &["stats", "--json"]).await;
    assert_eq!(code, 0);
    let stats: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(stats["total"], 2);
    assert_eq!(stats["sent"], 1);
    assert_eq!(stats["unsent"], 1);
    assert_eq!(stats["failed"], 0);
    assert_eq!(stats["by_status"]["PENDING_PAYER"], 2);
}

#[tokio::test]
async fn migrate_creates_the_schema_reverts_and_reports_status() {
    let db = TestDb::unmigrated().await;
    let queue = TestQueue::standard().await;
    let (code, stdout, stderr) = txrelay(&db, &queue, &["migrate"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("up to date"), "{stdout}");
    let (_, status, _) = txrelay(&db, &queue, &["migrate", "--status"]).await;
    assert!(status.contains("applied"), "{status}");
    let (code, stdout, _) = txrelay(&db, &queue, &["migrate", "--revert"]).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("reverted"), "{stdout}");
    let (_, status, _) = txrelay(&db, &queue, &["migrate", "--status"]).await;
    assert!(status.contains("pending"), "{status}");
}

#[tokio::test]
async fn retry_all_draws_a_progress_bar_on_a_terminal() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    for _ in 0..3 {
        insert_unsent(&db, "w").await;
    }
    // `script` gives the command a pseudo-terminal, as a user's shell would.
    let line = format!("{} retry-all", binary().display());
    let output = program("script", &db.url, &db.schema, &queue.url, &queue.endpoint)
        .env("TERM", "xterm")
        .args(["-qec", &line, "/dev/null"])
        .output()
        .await
        .unwrap();
    let terminal = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{terminal}");
    assert!(terminal.contains("sent, 0 failed"), "a progress bar was drawn: {terminal:?}");
    assert!(terminal.contains("succeeded: 3"), "{terminal}");
}

#[tokio::test]
async fn completion_prints_a_script_for_each_shell() {
    for (shell, marker) in [("bash", "_txrelay()"), ("zsh", "#compdef txrelay"), ("fish", "complete -c txrelay")] {
        let (code, stdout, stderr) =
            run_to_end(tokio::process::Command::new(binary()).args(["completion", shell])).await;
        assert_eq!(code, 0, "{shell}: {stderr}");
        assert!(stdout.contains(marker), "{shell}: no {marker:?}");
        assert!(stdout.contains("retry-all") && stdout.contains("report"), "{shell}: the commands are completed");
    }
    let (code, _, stderr) = run_to_end(tokio::process::Command::new(binary()).args(["completion", "tcsh"])).await;
    assert_eq!(code, 2, "an unknown shell is a usage error: {stderr}");
}
