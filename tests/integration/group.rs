//! Group commit at ingest: concurrent `/new` requests committed together,
//! each still answered for its own row. A group is formed for certain by
//! holding the table locked while the first request waits on it: whatever
//! arrives meanwhile is the next group.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;

use crate::common::proxy::TcpProxy;
use crate::common::*;

/// Holds an EXCLUSIVE lock on the test schema's table (INSERT waits, reads
/// do not) until dropped or committed.
async fn lock_table(db: &TestDb) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = db.store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE transactions IN EXCLUSIVE MODE").execute(&mut *tx).await.unwrap();
    tx
}

/// Fills every group-commit slot with one request that waits on the
/// table's lock, one at a time, so that whatever comes next has to gather.
async fn block_every_slot(app: &Arc<TestApp>, db: &TestDb) -> Vec<tokio::task::JoinHandle<(StatusCode, Value)>> {
    let mut openers = Vec::new();
    for blocked in 1..=txrelay::relay::GROUPS_IN_FLIGHT as i64 {
        let app = app.clone();
        // A wallet each: on a FIFO queue a wallet's next row waits for the
        // group holding its previous one instead of taking a slot.
        openers.push(tokio::spawn(async move { app.post_new(&body(unique(), &format!("opener-{blocked}"))).await }));
        wait_until(Duration::from_secs(10), "the group waits on the lock", || async {
            // INSERTs only: a running relay loop's claims wait on the lock too.
            db.scalar_i64(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE NOT l.granted AND l.relation = 'transactions'::regclass AND a.query LIKE 'WITH changed AS (INSERT INTO transactions%'",
            )
            .await
                == blocked
        })
        .await;
    }
    openers
}

/// Posts `bodies` so that all of them form one group: every commit slot
/// waits on `lock`, the bodies gather behind them; then the lock goes.
async fn post_as_one_group(
    app: &Arc<TestApp>,
    db: &TestDb,
    lock: sqlx::Transaction<'static, sqlx::Postgres>,
    bodies: Vec<Value>,
) -> Vec<(StatusCode, Value)> {
    let post = |body: Value| {
        let app = app.clone();
        tokio::spawn(async move { app.post_new(&body).await })
    };
    let openers = block_every_slot(app, db).await;
    let count = bodies.len();
    let posted: Vec<_> = bodies.into_iter().map(post).collect();
    let waiting = app.relay.ingest().waiting_to_commit();
    wait_until(Duration::from_secs(10), "every request waits for the next group", || {
        let queued = *waiting.borrow();
        async move { queued == count }
    })
    .await;
    lock.rollback().await.unwrap();
    for opener in openers {
        assert!(opener.await.unwrap().0.is_success());
    }
    let mut answers = Vec::new();
    for answer in posted {
        answers.push(answer.await.unwrap());
    }
    answers
}

fn group_sizes(app: &TestApp) -> (f64, f64) {
    let text = app.metrics.render();
    let value = |name: &str| {
        text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit_once(' ')?.1.parse().ok()).unwrap_or(0.0)
    };
    (value("txrelay_ingest_group_size_count"), value("txrelay_ingest_group_size_sum"))
}

#[tokio::test]
async fn a_group_decides_new_rows_replays_and_conflicts_each_for_itself() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = Arc::new(TestApp::new(&RelayBuilder::new(&db, &queue)).await);
    let stored = body(unique(), "w");
    assert_eq!(app.post_new(&stored).await.0, StatusCode::CREATED);

    let fresh = body(unique(), "w");
    let mut other_content = stored.clone();
    other_content["ledger_payload"]["payload"]["status"] = Value::String("SOMETHING_ELSE".into());
    let twice = body(unique(), "w");
    let lock = lock_table(&db).await;
    let answers = post_as_one_group(
        &app,
        &db,
        lock,
        vec![fresh.clone(), stored.clone(), other_content, twice.clone(), twice.clone()],
    )
    .await;
    let statuses: Vec<StatusCode> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses[0], StatusCode::CREATED, "new: {:?}", answers[0].1);
    assert_eq!(statuses[1], StatusCode::OK, "replay of a stored row: {:?}", answers[1].1);
    assert_eq!(statuses[2], StatusCode::CONFLICT, "same key, other content: {:?}", answers[2].1);
    assert_eq!(answers[2].1["error"]["field"], "ledger_payload.meta_data.idempotency_key");
    // The same request twice in one group: one is new, the other its replay.
    let mut pair = [statuses[3], statuses[4]];
    pair.sort();
    assert_eq!(pair, [StatusCode::OK, StatusCode::CREATED], "{:?} {:?}", answers[3].1, answers[4].1);
    assert_eq!(answers[3].1["id"], answers[4].1["id"]);
    let openers = txrelay::relay::GROUPS_IN_FLIGHT as i64;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 3 + openers, "stored, openers, fresh, twice");
    let (groups, rows) = group_sizes(&app);
    let slots = txrelay::relay::GROUPS_IN_FLIGHT as f64;
    assert_eq!((groups, rows), (2.0 + slots, 6.0 + slots), "the stored row, each opener alone, then one group of five");
    let sent = 3 + txrelay::relay::GROUPS_IN_FLIGHT;
    assert_eq!(queue.receive(sent, Duration::from_secs(10)).await.len(), sent, "each new row sent once");
    db.assert_unsent_rows_followed().await;
}

#[tokio::test]
async fn a_row_that_breaks_a_constraint_does_not_fail_its_group() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = Arc::new(TestApp::new(&RelayBuilder::new(&db, &queue)).await);
    let poison = unique();
    db.execute(&format!("ALTER TABLE transactions ADD CONSTRAINT test_poison CHECK (reference <> 'MYK-{poison:06}')"))
        .await;
    let lock = lock_table(&db).await;
    let neighbours: Vec<Value> = (0..3).map(|_| body(unique(), "w")).collect();
    let mut bodies = neighbours.clone();
    bodies.insert(1, body(poison, "w"));
    let answers = post_as_one_group(&app, &db, lock, bodies).await;
    for (i, (status, answer)) in answers.iter().enumerate() {
        if i == 1 {
            assert!(status.is_server_error(), "the breaking row is refused: {status} {answer}");
        } else {
            assert_eq!(*status, StatusCode::CREATED, "neighbour {i}: {answer}");
        }
    }
    let refs = db.scalar_i64(&format!("SELECT count(*) FROM transactions WHERE reference = 'MYK-{poison:06}'")).await;
    assert_eq!(refs, 0, "nothing stored for it");
    let openers = txrelay::relay::GROUPS_IN_FLIGHT as i64;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM transactions").await,
        3 + openers,
        "the openers and three neighbours"
    );
    db.assert_unsent_rows_followed().await;
}

#[tokio::test]
async fn a_group_hit_by_a_database_outage_answers_503_to_every_request() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = TcpProxy::start(database_address(&db.url)).await;
    let app = Arc::new(TestApp::new(&RelayBuilder::new(&db, &queue).database_url(proxy.url_for(&db.url))).await);
    assert_eq!(app.post_new(&body(unique(), "w")).await.0, StatusCode::CREATED);
    let lock = lock_table(&db).await;
    let post = |body: Value| {
        let app = app.clone();
        tokio::spawn(async move { app.post_new(&body).await })
    };
    let openers = block_every_slot(&app, &db).await;
    let group: Vec<_> = (0..4).map(|_| post(body(unique(), "w"))).collect();
    let waiting = app.relay.ingest().waiting_to_commit();
    wait_until(Duration::from_secs(10), "the group has gathered", || {
        let queued = *waiting.borrow();
        async move { queued == 4 }
    })
    .await;
    proxy.set_up(false);
    for answer in group {
        let (status, error) = answer.await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
        assert_eq!(error["error"]["code"], "database_unavailable");
    }
    for opener in openers {
        let _ = opener.await;
    }
    lock.rollback().await.unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE wallet_address = 'w'").await, 1);
    proxy.set_up(true);
    assert_eq!(app.post_new(&body(unique(), "w")).await.0, StatusCode::CREATED, "recovers");
    db.assert_unsent_rows_followed().await;
}

#[tokio::test]
async fn on_a_fifo_queue_a_wallets_second_row_in_a_group_waits_behind_its_first() {
    let (db, queue) = (TestDb::new().await, TestQueue::fifo().await);
    let app = Arc::new(TestApp::new(&RelayBuilder::new(&db, &queue)).await);
    let running = RunningLoop::start(&app.relay);
    let (a1, a2, b1) = (unique(), unique(), unique());
    let lock = lock_table(&db).await;
    let answers =
        post_as_one_group(&app, &db, lock, vec![body(a1, "wallet-a"), body(a2, "wallet-a"), body(b1, "wallet-b")])
            .await;
    let statuses: Vec<StatusCode> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [StatusCode::CREATED, StatusCode::ACCEPTED, StatusCode::CREATED], "{answers:?}");
    assert_eq!(answers[1].1["attempts"], 0, "held, not sent inline");
    let all = 3 + txrelay::relay::GROUPS_IN_FLIGHT;
    let delivered = queue.receive(all, Duration::from_secs(20)).await;
    assert_eq!(delivered.len(), all, "the group and the openers");
    let wallet_a: Vec<String> = delivered
        .iter()
        .filter(|m| crate::common::sqs::attribute(m, "reference").is_some_and(|r| r != format!("MYK-{b1:06}")))
        .filter_map(|m| crate::common::sqs::attribute(m, "idempotency_key"))
        .filter(|k| *k == format!("idem-{a1}") || *k == format!("idem-{a2}"))
        .collect();
    assert_eq!(wallet_a, [format!("idem-{a1}"), format!("idem-{a2}")], "wallet A keeps its order");
    running.stop().await;
    db.assert_unsent_rows_followed().await;
}

/// One group in flight makes groups large, but a group stalled on the
/// database (a lock, a dead connection, replays checked one by one) must not
/// hold back the requests behind it: past `GROUP_PATIENCE` the next group
/// commits beside it. The stall here is a row trigger waiting on an
/// advisory lock the test holds, for one reference only.
#[tokio::test]
async fn a_group_stalled_on_the_database_does_not_hold_back_the_next() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = Arc::new(TestApp::new(&RelayBuilder::new(&db, &queue)).await);
    let stalled = unique();
    let key = i64::try_from(stalled).unwrap();
    db.execute(&format!(
        "CREATE FUNCTION test_stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.reference = 'MYK-{stalled:06}' THEN PERFORM pg_advisory_xact_lock({key}); END IF; RETURN NEW; END $$"
    ))
    .await;
    db.execute("CREATE TRIGGER test_stall BEFORE INSERT ON transactions FOR EACH ROW EXECUTE FUNCTION test_stall()")
        .await;
    let mut holder = db.psql.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)").bind(key).execute(&mut *holder).await.unwrap();

    let first = {
        let app = app.clone();
        tokio::spawn(async move { app.post_new(&body(stalled, "w")).await })
    };
    wait_until(Duration::from_secs(10), "the first group waits on the lock", || async {
        db.scalar_i64(&format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = {key}"
        ))
        .await
            == 1
    })
    .await;
    let next = {
        let app = app.clone();
        tokio::spawn(async move { app.post_new(&body(unique(), "w")).await })
    };
    let (status, answer) = tokio::time::timeout(Duration::from_secs(8), next)
        .await
        .expect("the next request is answered while the first group is stalled")
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert!(!first.is_finished(), "the first group is still stalled");

    sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut *holder).await.unwrap();
    let (status, answer) = first.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(queue.receive(2, Duration::from_secs(10)).await.len(), 2, "both sent");
    db.assert_unsent_rows_followed().await;
}

/// On a FIFO queue a wallet's rows commit, and go out, in the order their
/// requests were taken, even when the group holding the first one stalls:
/// the wallet's next row waits for that group while other wallets' rows go
/// on beside it.
#[tokio::test]
async fn on_a_fifo_queue_a_wallets_rows_keep_their_order_when_a_group_stalls() {
    let (db, queue) = (TestDb::new().await, TestQueue::fifo().await);
    let app = Arc::new(TestApp::new(&RelayBuilder::new(&db, &queue)).await);
    let running = RunningLoop::start(&app.relay);
    let (a1, a2) = (unique(), unique());
    let key = i64::try_from(a1).unwrap();
    db.execute(&format!(
        "CREATE FUNCTION test_stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.reference = 'MYK-{a1:06}' THEN PERFORM pg_advisory_xact_lock({key}); END IF; RETURN NEW; END $$"
    ))
    .await;
    db.execute("CREATE TRIGGER test_stall BEFORE INSERT ON transactions FOR EACH ROW EXECUTE FUNCTION test_stall()")
        .await;
    let mut holder = db.psql.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)").bind(key).execute(&mut *holder).await.unwrap();
    let post = |n: u64, wallet: &'static str| {
        let app = app.clone();
        tokio::spawn(async move { app.post_new(&body(n, wallet)).await })
    };

    let first = post(a1, "wallet-a");
    wait_until(Duration::from_secs(10), "the first group waits on the lock", || async {
        db.scalar_i64(&format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = {key}"
        ))
        .await
            == 1
    })
    .await;
    let second = post(a2, "wallet-a");
    let (status, answer) = tokio::time::timeout(Duration::from_secs(8), post(unique(), "wallet-b"))
        .await
        .expect("another wallet is answered while the first group is stalled")
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    // Asked only after that answer, so surely after wallet A's second row
    // was taken and set aside: it is answered too, while that row waits.
    let (status, answer) = tokio::time::timeout(Duration::from_secs(8), post(unique(), "wallet-c"))
        .await
        .expect("a later request of another wallet is answered while wallet A's second row waits")
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert!(!second.is_finished(), "wallet A's second row waits for the stalled group holding its first");

    sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut *holder).await.unwrap();
    let (status, answer) = first.await.unwrap();
    assert!(status.is_success(), "{answer}");
    let (status, answer) = second.await.unwrap();
    assert!(status.is_success(), "{answer}");
    let messages = queue.receive(4, Duration::from_secs(20)).await;
    running.stop().await;
    let wallet_a: Vec<String> = messages
        .iter()
        .filter(|m| {
            m.attributes
                .as_ref()
                .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::MessageGroupId))
                .is_some_and(|group| group == "wallet-a")
        })
        .filter_map(|m| crate::common::sqs::attribute(m, "idempotency_key"))
        .collect();
    assert_eq!(wallet_a, [format!("idem-{a1}"), format!("idem-{a2}")], "wallet A in the order it was posted");
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM transactions WHERE wallet_address = 'wallet-a' ORDER BY reference = $1 DESC",
    )
    .bind(format!("MYK-{a1:06}"))
    .fetch_all(&db.psql)
    .await
    .unwrap();
    assert!(ids[0] < ids[1], "committed in order: {ids:?}");
    db.assert_unsent_rows_followed().await;
}
