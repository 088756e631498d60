//! The store against the real database: constraints, timestamps, claims,
//! migrations.

use std::time::Duration;

use txrelay::spec::QueueKind;
use txrelay::store::{ClaimMode, ClaimRef, Conflict, DueFloor, FailedSend, InsertOutcome, Intake, Store};
use txrelay::transaction::limits;

use crate::common::{TestDb, bulk_insert, insert_created, new_tx, raw_insert, unique, wait_until};

/// sqlx-core 0.9.0 left Nagle's algorithm on: a group INSERT's last segment
/// then waited for PostgreSQL's delayed ACK, ~40 ms, on about one group in
/// ten (vendor/README.md). Checked on the socket itself: the one whose both
/// ends are those PostgreSQL reports for this very connection (every pool of
/// the store connects the same way).
#[tokio::test]
async fn database_connections_are_tcp_nodelay() {
    let db = TestDb::new().await;
    let mut connection = db.store.pool().acquire().await.expect("a connection");
    let (client, server, server_port): (Option<i32>, Option<String>, Option<i32>) =
        sqlx::query_as("SELECT inet_client_port(), host(inet_server_addr()), inet_server_port()")
            .fetch_one(&mut *connection)
            .await
            .expect("the connection's ends");
    let (Some(client), Some(server), Some(server_port)) = (client, server, server_port) else {
        panic!("the test database must be reached over TCP");
    };
    let server: std::net::Ipv4Addr = server.parse().expect("the test database is reached over IPv4");
    let port = |p: i32| u16::try_from(p).expect("a port");
    let nodelay = tcp_nodelay_of(port(client), std::net::SocketAddrV4::new(server, port(server_port)));
    assert_eq!(nodelay, Some(true), "the connection from port {client} must set TCP_NODELAY");
}

/// The bookkeeping connections run with `enable_seqscan = off`, which prices
/// any sequential scan (the backlog count over `unsent_transactions`) above
/// PostgreSQL's JIT thresholds: the gauges then spent ~85 ms compiling each
/// time they ran, once a second during a drain. No statement of the relay
/// is long enough to repay compiling; the connections turn it off
/// themselves, whatever the server's default (every pool shares the
/// connection options).
#[tokio::test]
async fn relay_connections_never_jit_compile_their_statements() {
    let db = TestDb::new().await;
    let (jit, source): (String, String) = sqlx::query_as("SELECT setting, source FROM pg_settings WHERE name = 'jit'")
        .fetch_one(db.store.pool())
        .await
        .expect("the jit setting");
    assert_eq!((jit.as_str(), source.as_str()), ("off", "client"));
}

/// TCP_NODELAY of this process's IPv4 socket from local `port` to `peer`, if
/// there is one. Other tests open and close sockets meanwhile: a descriptor
/// that changes hands between the listing and the calls fails them or does
/// not match both ends.
fn tcp_nodelay_of(port: u16, peer: std::net::SocketAddrV4) -> Option<bool> {
    let matches = |address: &libc::sockaddr_in, ip: std::net::Ipv4Addr, port: u16| {
        libc::c_int::from(address.sin_family) == libc::AF_INET
            && u16::from_be(address.sin_port) == port
            && u32::from_be(address.sin_addr.s_addr) == u32::from(ip)
    };
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<libc::c_int>().ok()) else { continue };
        // SAFETY: plain system calls on a descriptor number with buffers
        // sized for them; nothing is closed or taken over.
        unsafe {
            let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let (mut local, mut remote): (libc::sockaddr_in, libc::sockaddr_in) = std::mem::zeroed();
            let (mut local_size, mut remote_size) = (size, size);
            if libc::getsockname(fd, (&raw mut local).cast(), &mut local_size) != 0
                || libc::getpeername(fd, (&raw mut remote).cast(), &mut remote_size) != 0
                || u16::from_be(local.sin_port) != port
                || !matches(&remote, *peer.ip(), peer.port())
            {
                continue;
            }
            let mut value: libc::c_int = 0;
            let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, (&raw mut value).cast(), &mut length) == 0 {
                return Some(value != 0);
            }
        }
    }
    None
}

#[tokio::test]
async fn save_and_fetch_round_trips_every_column() {
    let db = TestDb::new().await;
    let tx = new_tx(unique(), "wallet-1");
    let saved = insert_created(&db, &tx).await;
    let by_reference = db.store.find_by_reference(&tx.reference).await.unwrap().unwrap();
    let by_id = db.store.find_by_id(saved.id).await.unwrap().unwrap();
    assert_eq!(by_reference, saved);
    assert_eq!(by_id, saved);
    assert_eq!(saved.reference, tx.reference);
    assert_eq!(saved.external_reference, tx.external_reference);
    assert_eq!(saved.idempotency_key, tx.idempotency_key);
    assert_eq!(saved.transaction_type, "DEPOSIT");
    assert_eq!(saved.value.to_string(), "100.000000");
    assert_eq!(saved.fee.to_string(), "1.500000");
    assert_eq!(saved.payer_id.as_deref(), Some("user-1"));
    assert_eq!(saved.payee_id, None);
    assert_eq!(saved.wallet_address, "wallet-1");
    assert_eq!(saved.ip_address.as_deref(), Some("203.0.113.7"));
    assert_eq!(saved.message_id, None);
    assert_eq!(saved.attempts, 0);
    let stored_payload: String = sqlx::query_scalar("SELECT payload::text FROM transactions WHERE id = $1")
        .bind(saved.id)
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(stored_payload, tx.payload);
    assert!(!stored_payload.contains(crate::common::CLIENT_TOKEN));
}

#[tokio::test]
async fn each_unique_constraint_is_enforced() {
    let db = TestDb::new().await;
    let n = unique();
    let original = new_tx(n, "w");
    insert_created(&db, &original).await;

    let mut same_reference = new_tx(unique(), "w");
    same_reference.reference = original.reference.clone();
    let mut same_external = new_tx(unique(), "w");
    same_external.external_reference = original.external_reference.clone();
    let mut same_key_other_content = new_tx(unique(), "w");
    same_key_other_content.idempotency_key = original.idempotency_key.clone();
    same_key_other_content.payload = original.payload.replace("100.00", "999.00");

    for (tx, expected) in [
        (&same_reference, Conflict::Reference),
        (&same_external, Conflict::ExternalReference),
        (&same_key_other_content, Conflict::IdempotencyKey),
    ] {
        match db.store.insert(tx, Intake::Queued).await.unwrap() {
            InsertOutcome::Conflict(conflict) => assert_eq!(conflict, expected),
            other => panic!("expected {expected:?}, got {other:?}"),
        }
    }
    assert!(matches!(db.store.insert(&original, Intake::Queued).await.unwrap(), InsertOutcome::Replayed(_)));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 1);

    // The database itself refuses duplicates, whatever the application does.
    for column in ["reference", "external_reference", "idempotency_key"] {
        let sql = format!(
            "INSERT INTO transactions (reference, external_reference, idempotency_key, transaction_type, status, source, \
             instruction_type, incoming_currency, outgoing_currency, value, fee, wallet_address, payload) \
             SELECT {r}, {e}, {k}, 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 1, 0, 'w', '{{}}' FROM transactions LIMIT 1",
            r = if column == "reference" { "reference" } else { "'other-r'" },
            e = if column == "external_reference" { "external_reference" } else { "'other-e'" },
            k = if column == "idempotency_key" { "idempotency_key" } else { "'other-k'" },
        );
        let error = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(db.store.pool()).await.unwrap_err();
        let constraint = error.as_database_error().and_then(|e| e.constraint()).unwrap_or_default().to_owned();
        assert_eq!(constraint, format!("transactions_{column}_key"));
    }
}

#[tokio::test]
async fn amounts_must_not_be_negative_in_the_database_either() {
    let db = TestDb::new().await;
    let error = sqlx::query(
        "INSERT INTO transactions (reference, external_reference, idempotency_key, transaction_type, status, source, \
         instruction_type, incoming_currency, outgoing_currency, value, fee, wallet_address, payload) \
         VALUES ('r', 'e', 'k', 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 1, -0.01, 'w', '{}')",
    )
    .execute(db.store.pool())
    .await
    .unwrap_err();
    assert_eq!(error.as_database_error().and_then(|e| e.constraint()), Some("transactions_fee_non_negative"));
}

#[tokio::test]
async fn timestamps_are_set_by_the_database_and_updated_at_moves_on_every_update() {
    let db = TestDb::new().await;
    let before: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT now()").fetch_one(db.store.pool()).await.unwrap();
    let saved = insert_created(&db, &new_tx(unique(), "w")).await;
    assert!(saved.created_at >= before && saved.created_at - before < chrono::Duration::seconds(5));
    assert_eq!(saved.created_at, saved.updated_at);
    assert!(saved.created_at.timezone() == chrono::Utc);

    let sent = db.store.record_sent(&[(ClaimRef::unclaimed(saved.id), "message-1".into())]).await.unwrap().remove(0);
    assert!(sent.updated_at > saved.updated_at, "{} > {}", sent.updated_at, saved.updated_at);
    assert_eq!(sent.created_at, saved.created_at);
    let queue_sent_at = sent.queue_sent_at.expect("queue_sent_at set with the message id");
    assert!(queue_sent_at >= saved.created_at);

    db.execute(&format!("UPDATE transactions SET status = 'DONE' WHERE id = {}", saved.id)).await;
    let again = db.store.find_by_id(saved.id).await.unwrap().unwrap();
    assert!(again.updated_at > sent.updated_at);
}

#[tokio::test]
async fn column_lengths_match_the_validation_limits() {
    let db = TestDb::new().await;
    for (column, length) in limits::VARCHAR_COLUMNS {
        let declared: i32 = sqlx::query_scalar(
            "SELECT character_maximum_length FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = 'transactions' AND column_name = $2",
        )
        .bind(&db.schema)
        .bind(column)
        .fetch_one(db.store.pool())
        .await
        .unwrap();
        assert_eq!(declared as usize, *length, "column {column}");
    }
}

#[tokio::test]
async fn migrations_go_up_down_and_up_again() {
    let db = TestDb::unmigrated().await;
    let table = || async { db.scalar_i64("SELECT (to_regclass('transactions') IS NOT NULL)::int::int8").await };
    db.store.migrate().await.unwrap();
    assert_eq!(table().await, 1);
    assert!(db.store.status().await.unwrap().iter().all(|m| m.installed_on.is_some()));
    db.store.migrate().await.unwrap();

    let column = || async {
        db.scalar_i64("SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema() AND column_name = 'claim_token'").await
    };
    assert_eq!(column().await, 1);
    let unsent_table =
        || async { db.scalar_i64("SELECT (to_regclass('unsent_transactions') IS NOT NULL)::int::int8").await };
    assert_eq!(unsent_table().await, 1);
    revert_to_before_unsent_transactions(&db).await;
    assert_eq!((table().await, column().await, unsent_table().await), (1, 1, 0), "unsent_transactions goes first");
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261201000001));
    assert_eq!((table().await, column().await), (1, 0), "the claim token goes, the table stays");
    while db.store.revert_last_migration().await.unwrap().is_some() {}
    assert_eq!(table().await, 0);
    assert!(db.store.status().await.unwrap().iter().all(|m| m.installed_on.is_none()));

    db.store.migrate().await.unwrap();
    assert_eq!(table().await, 1);
    insert_created(&db, &new_tx(unique(), "w")).await;
}

#[tokio::test]
async fn a_rollback_never_drops_the_resend_audit_silently() {
    let db = TestDb::new().await;
    let audit = txrelay::store::ResendAudit { actor: "ops".into(), via: "cli", command: "retry" };
    db.store.begin_resend(&audit, &serde_json::json!({"id": 1}), &[1]).await.unwrap();
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261205000001));
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261204000001));
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261203000002));
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261203000001));
    let refused = db.store.revert_last_migration().await.expect_err("records would be dropped");
    assert!(refused.to_string().contains("resend_audit holds 1 records"), "{refused}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM resend_audit").await, 1, "kept");
    assert_eq!(db.store.revert_last_migration_with(true).await.unwrap(), Some(20261201000003), "dropped on request");
    db.store.migrate().await.unwrap();
}

#[tokio::test]
async fn concurrent_claims_never_take_the_same_row() {
    let db = TestDb::new().await;
    for _ in 0..60 {
        insert_created(&db, &new_tx(unique(), &format!("w{}", fastrand::u8(..)))).await;
    }
    let lease = Duration::from_secs(30);
    let claims = futures::future::join_all((0..4).map(|_| db.store.claim(ClaimMode::Due, 20, lease))).await;
    let mut ids: Vec<i64> = claims.into_iter().flat_map(|c| c.unwrap().rows).map(|r| r.id).collect();
    let claimed = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), claimed, "a row was claimed twice");
    assert_eq!(claimed, 60);
    // Held rows are not due again until the lease runs out.
    assert!(db.store.claim(ClaimMode::Due, 100, lease).await.unwrap().rows.is_empty());
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions WHERE claimed_until > now()").await, 60);
}

#[tokio::test]
async fn fifo_claims_take_only_the_oldest_unsent_row_of_each_wallet() {
    let db = TestDb::new().await;
    let a1 = insert_created(&db, &new_tx(unique(), "wallet-a")).await;
    let a2 = insert_created(&db, &new_tx(unique(), "wallet-a")).await;
    let b1 = insert_created(&db, &new_tx(unique(), "wallet-b")).await;
    let claim = fifo_store(&db).claim(ClaimMode::Due, 10, Duration::from_secs(30)).await.unwrap();
    let ids: Vec<i64> = claim.rows.iter().map(|r| r.id).collect();
    assert_eq!(ids, [a1.id, b1.id]);
    // While a1 is held (in flight), a2 still waits.
    assert!(fifo_store(&db).claim(ClaimMode::Due, 10, Duration::from_secs(30)).await.unwrap().rows.is_empty());
    db.store.record_sent(&[(claim.row_ref(a1.id), "m-a1".into())]).await.unwrap();
    let next = fifo_store(&db).claim(ClaimMode::Due, 10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(next.rows.iter().map(|r| r.id).collect::<Vec<_>>(), [a2.id]);
}

#[tokio::test]
async fn writes_of_a_claim_apply_only_while_it_still_holds_the_row() {
    let db = TestDb::new().await;
    let row = insert_created(&db, &new_tx(unique(), "w")).await;
    let stale = db.store.claim(ClaimMode::Due, 10, Duration::from_millis(1)).await.unwrap();
    // The first claim's lease ran out and another process claimed the row.
    wait_until(Duration::from_secs(5), "the lease runs out", || async {
        db.scalar_i64(&format!("SELECT count(*) FROM transactions WHERE id = {} AND claimed_until < now()", row.id))
            .await
            == 1
    })
    .await;
    let current = db.store.claim(ClaimMode::Due, 10, Duration::from_secs(60)).await.unwrap();
    assert_eq!(current.rows.len(), 1);
    assert_ne!(stale.token, current.token);

    let (old, new) = (stale.row_ref(row.id), current.row_ref(row.id));
    assert_eq!(db.store.release(&[old]).await.unwrap(), 0, "a stale claim releases nothing");
    let failure = FailedSend { row: old, error: "late".into(), retry_in: Duration::ZERO, permanent: true };
    assert!(db.store.record_failures(&[failure], 1).await.unwrap().is_empty(), "nor records a failure");
    assert!(db.store.hold(&[(old, "late".into())]).await.unwrap().is_empty(), "nor gives it back");
    assert!(db.store.record_sent(&[(old, "m-late".into())]).await.unwrap().is_empty(), "nor records a send");
    let stored = db.store.find_by_id(row.id).await.unwrap().unwrap();
    assert_eq!((stored.attempts, stored.failed_at, stored.message_id), (0, None, None));
    assert!(
        db.scalar_i64(&format!("SELECT count(*) FROM transactions WHERE id = {} AND claimed_until > now()", row.id))
            .await
            == 1
    );

    let sent = db.store.record_sent(&[(new, "m-1".into())]).await.unwrap();
    assert_eq!(sent[0].message_id.as_deref(), Some("m-1"), "the current claim records");
}

#[tokio::test]
async fn failures_back_off_and_dead_letter_at_max_attempts_or_when_permanent() {
    let db = TestDb::new().await;
    let first = insert_created(&db, &new_tx(unique(), "w")).await;
    let poison = insert_created(&db, &new_tx(unique(), "w")).await;
    let failure = |id, permanent| FailedSend {
        row: ClaimRef::unclaimed(id),
        error: "boom".into(),
        retry_in: Duration::from_secs(60),
        permanent,
    };
    let rows = db.store.record_failures(&[failure(first.id, false), failure(poison.id, true)], 2).await.unwrap();
    let by_id = |id| rows.iter().find(|r| r.id == id).unwrap().clone();
    assert_eq!(by_id(first.id).attempts, 1);
    assert!(by_id(first.id).failed_at.is_none());
    assert!(by_id(first.id).next_attempt_at.unwrap() > chrono::Utc::now() + chrono::Duration::seconds(50));
    assert_eq!(by_id(first.id).last_error.as_deref(), Some("boom"));
    assert!(by_id(poison.id).failed_at.is_some(), "permanent errors dead-letter at once");
    assert_eq!(by_id(poison.id).attempts, 1);

    let rows = db.store.record_failures(&[failure(first.id, false)], 2).await.unwrap();
    assert!(rows[0].failed_at.is_some(), "second failure reaches maxAttempts = 2");
    let gauges = db.store.gauges().await.unwrap();
    assert_eq!((gauges.unsent, gauges.failed), (0, 2));
}

#[tokio::test]
async fn retention_deletes_only_old_sent_rows() {
    let db = TestDb::new().await;
    let old_sent = insert_created(&db, &new_tx(unique(), "w")).await;
    let old_unsent = insert_created(&db, &new_tx(unique(), "w")).await;
    let old_dead = insert_created(&db, &new_tx(unique(), "w")).await;
    let new_sent = insert_created(&db, &new_tx(unique(), "w")).await;
    db.store
        .record_sent(&[
            (ClaimRef::unclaimed(old_sent.id), "m1".into()),
            (ClaimRef::unclaimed(new_sent.id), "m2".into()),
        ])
        .await
        .unwrap();
    let dead = FailedSend {
        row: ClaimRef::unclaimed(old_dead.id),
        error: "x".into(),
        retry_in: Duration::ZERO,
        permanent: true,
    };
    db.store.record_failures(&[dead], 0).await.unwrap();
    db.execute(&format!(
        "UPDATE transactions SET created_at = now() - interval '40 days', \
         queue_sent_at = CASE WHEN message_id IS NULL THEN NULL ELSE now() - interval '40 days' END \
         WHERE id IN ({}, {}, {})",
        old_sent.id, old_unsent.id, old_dead.id
    ))
    .await;
    let deleted = db
        .store
        .delete_sent_older_than(Duration::from_secs(30 * 86_400), Duration::from_secs(30 * 86_400), 100)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let remaining: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM transactions ORDER BY id").fetch_all(db.store.pool()).await.unwrap();
    assert_eq!(remaining, [old_unsent.id, old_dead.id, new_sent.id]);
}

/// Rows in every state, written as the schema before `unsent_transactions`
/// had them: sent, unsent and due, unsent and backing off, claimed by a
/// process (lease running), claimed with its lease run out, dead-lettered.
const ROWS_IN_EVERY_STATE: &str = "INSERT INTO transactions (reference, external_reference, idempotency_key, \
     transaction_type, status, source, instruction_type, incoming_currency, outgoing_currency, value, fee, \
     wallet_address, payload, message_id, queue_sent_at, attempts, last_error, next_attempt_at, claimed_until, \
     claim_token, failed_at, created_at) VALUES \
     ('sent', 'e-sent', 'k-sent', 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 1, 0, 'w1', '{}', 'm-1', now(), 1, NULL, \
      now(), NULL, NULL, NULL, now() - interval '5 minutes'), \
     ('due', 'e-due', 'k-due', 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 2, 0, 'w1', '{}', NULL, NULL, 0, NULL, \
      now() - interval '1 second', NULL, NULL, NULL, now() - interval '4 minutes'), \
     ('backoff', 'e-backoff', 'k-backoff', 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 3, 0, 'w2', '{}', NULL, NULL, 2, \
      'throttled', now() + interval '2 hours', NULL, NULL, NULL, now() - interval '3 minutes'), \
     ('claimed', 'e-claimed', 'k-claimed', 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 4, 0, 'w3', '{}', NULL, NULL, 0, \
      NULL, now() - interval '1 second', now() + interval '1 hour', 77, NULL, now() - interval '2 minutes'), \
     ('lapsed', 'e-lapsed', 'k-lapsed', 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 5, 0, 'w4', '{}', NULL, NULL, 1, \
      NULL, now() - interval '1 minute', now() - interval '10 seconds', 78, NULL, now() - interval '90 seconds'), \
     ('dead', 'e-dead', 'k-dead', 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 6, 0, 'w5', '{}', NULL, NULL, 5, 'refused', \
      now(), NULL, NULL, now(), now() - interval '1 minute')";

/// Every column of every row, as one text (but `skipped_at`, which a later
/// migration adds).
const WHOLE_TABLE: &str =
    // The columns later migrations add (NULL for rows older than them) aside.
    "SELECT string_agg((row_to_json(t)::jsonb - 'skipped_at' - 'traceparent' - 'tracestate')::text, E'\\n' \
     ORDER BY id) FROM transactions t";

/// Whether recording a message id on row `reference` is a HOT update: tried
/// in a transaction that is rolled back, through a plain session.
async fn recording_a_message_id_is_hot(db: &TestDb, reference: &str) -> bool {
    let hot_updates = "SELECT pg_stat_get_xact_tuples_hot_updated('transactions'::regclass)";
    let mut tx = db.psql.begin().await.unwrap();
    // The count is the session's since its statistics were last reported,
    // so it is read before and after.
    let before: i64 = sqlx::query_scalar(hot_updates).fetch_one(&mut *tx).await.unwrap();
    sqlx::query(
        "UPDATE transactions SET message_id = 'm-hot', queue_sent_at = now(), attempts = attempts + 1, \
         claimed_until = NULL, claim_token = NULL WHERE reference = $1",
    )
    .bind(reference)
    .execute(&mut *tx)
    .await
    .unwrap();
    let after: i64 = sqlx::query_scalar(hot_updates).fetch_one(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    after - before == 1
}

#[tokio::test]
async fn unsent_transactions_migrate_up_and_down_keeping_every_row_and_its_state() {
    let db = TestDb::new().await;
    revert_to_before_unsent_transactions(&db).await;
    db.execute(ROWS_IN_EVERY_STATE).await;
    let before: String = sqlx::query_scalar(WHOLE_TABLE).fetch_one(&db.psql).await.unwrap();
    assert!(!recording_a_message_id_is_hot(&db, "due").await, "before: the partial indexes forbid a HOT update");

    db.store.migrate().await.unwrap();
    let after: String = sqlx::query_scalar(WHOLE_TABLE).fetch_one(&db.psql).await.unwrap();
    assert_eq!(after, before, "transactions keeps every column of every row");
    let unsent: Vec<String> = sqlx::query_scalar(
        "SELECT t.reference FROM unsent_transactions u JOIN transactions t USING (id) ORDER BY u.due_at, u.id",
    )
    .fetch_all(&db.psql)
    .await
    .unwrap();
    assert_eq!(unsent, ["lapsed", "due", "claimed", "backoff"], "the unsent rows, in claim order");
    db.assert_unsent_rows_followed().await;
    assert!(recording_a_message_id_is_hot(&db, "due").await, "after: recording a message id is a HOT update");

    // The relay claims only what was claimable before: the due row and the
    // row whose lease ran out, never the held one nor the one backing off.
    let claim = db.store.claim(ClaimMode::Due, 10, Duration::from_secs(30)).await.unwrap();
    let claimed: Vec<&str> = claim.rows.iter().map(|row| row.reference.as_str()).collect();
    assert_eq!(claimed, ["due", "lapsed"]);
    db.assert_unsent_rows_followed().await;
    let released = db.store.release(&claim.rows.iter().map(|row| claim.row_ref(row.id)).collect::<Vec<_>>()).await;
    assert_eq!(released.unwrap(), 2);
    db.assert_unsent_rows_followed().await;
    let after_release: String = sqlx::query_scalar(
        "SELECT string_agg(row_to_json(t)::text, E'\\n' ORDER BY id) FROM (SELECT id, reference, message_id, attempts, \
         last_error, next_attempt_at, claimed_until, claim_token, failed_at FROM transactions ORDER BY id) t",
    )
    .fetch_one(&db.psql)
    .await
    .unwrap();

    revert_to_before_unsent_transactions(&db).await;
    let reverted: String = sqlx::query_scalar(
        "SELECT string_agg(row_to_json(t)::text, E'\\n' ORDER BY id) FROM (SELECT id, reference, message_id, attempts, \
         last_error, next_attempt_at, claimed_until, claim_token, failed_at FROM transactions ORDER BY id) t",
    )
    .fetch_one(&db.psql)
    .await
    .unwrap();
    assert_eq!(reverted, after_release, "going down keeps every row and its delivery state");
    let partial_indexes = db
        .scalar_i64(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() AND indexname IN \
             ('transactions_unsent_due_idx', 'transactions_unsent_wallet_idx', 'transactions_sent_idx')",
        )
        .await;
    assert_eq!(partial_indexes, 3, "the indexes the earlier schema claims with are back");
    assert!(!recording_a_message_id_is_hot(&db, "due").await);
    // The earlier relay's claim finds the same rows in the reverted table.
    let due = db
        .scalar_i64(
            "SELECT count(*) FROM transactions WHERE message_id IS NULL AND failed_at IS NULL \
             AND next_attempt_at <= now() AND (claimed_until IS NULL OR claimed_until <= now())",
        )
        .await;
    assert_eq!(due, 2);

    db.store.migrate().await.unwrap();
    db.assert_unsent_rows_followed().await;
}

#[tokio::test]
async fn other_writers_keep_unsent_transactions_in_step_through_the_triggers() {
    let db = TestDb::new().await;
    db.execute(ROWS_IN_EVERY_STATE).await;
    db.assert_unsent_rows_followed().await;
    let updated = "SELECT (extract(epoch FROM updated_at) * 1000000)::int8 FROM transactions WHERE reference = 'dead'";
    let dead_updated_at = db.scalar_i64(updated).await;
    // As the old retry tool and a hand in psql would: mark sent, dead-letter,
    // revive, back off, delete, change an id.
    for sql in [
        "UPDATE transactions SET message_id = 'by-hand', queue_sent_at = now() WHERE reference = 'due'",
        "UPDATE transactions SET failed_at = now() WHERE reference = 'backoff'",
        "UPDATE transactions SET failed_at = NULL, next_attempt_at = now() WHERE reference = 'dead'",
        "UPDATE transactions SET next_attempt_at = now() + interval '1 day' WHERE reference = 'lapsed'",
        "DELETE FROM transactions WHERE reference = 'claimed'",
        "UPDATE transactions SET id = id + 1000 WHERE reference = 'lapsed'",
    ] {
        db.execute(sql).await;
        db.assert_unsent_rows_followed().await;
    }
    let unsent: Vec<String> = sqlx::query_scalar(
        "SELECT t.reference FROM unsent_transactions u JOIN transactions t USING (id) ORDER BY t.reference",
    )
    .fetch_all(&db.psql)
    .await
    .unwrap();
    assert_eq!(unsent, ["dead", "lapsed"]);
    let claim = db.store.claim(ClaimMode::Due, 10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(claim.rows.iter().map(|row| row.reference.as_str()).collect::<Vec<_>>(), ["dead"]);
    assert!(db.scalar_i64(updated).await > dead_updated_at, "updated_at still moves for every writer");
    db.execute("TRUNCATE transactions").await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM unsent_transactions").await, 0);
}

#[tokio::test]
async fn relay_connections_skip_the_triggers_and_a_claim_takes_out_a_listed_row_that_lost_its_match() {
    let db = TestDb::new().await;
    let first = insert_created(&db, &new_tx(unique(), "w1")).await;
    let second = insert_created(&db, &new_tx(unique(), "w1")).await;
    // A relay connection (txrelay.relay_writes = on): the triggers stay out
    // of the way, so a bare UPDATE there leaves the listing as it was.
    sqlx::query("UPDATE transactions SET message_id = 'raced' WHERE id = $1")
        .bind(first.id)
        .execute(db.store.pool())
        .await
        .unwrap();
    assert_eq!(db.scalar_i64(&format!("SELECT count(*) FROM unsent_transactions WHERE id = {}", first.id)).await, 1);
    assert_eq!(db.store.gauges().await.unwrap().unsent, 2, "the stray still counts, until a claim meets it");

    // On a FIFO queue the stray would hold its wallet's turn forever; the
    // claim that meets it takes it out, and the next claim takes the row
    // behind it.
    let lease = Duration::from_secs(30);
    let claim = fifo_store(&db).claim(ClaimMode::Due, 1, lease).await.unwrap();
    assert!(claim.rows.is_empty(), "the stray is not claimed: {:?}", claim.rows);
    db.assert_unsent_rows_followed().await;
    let claim = fifo_store(&db).claim(ClaimMode::Due, 1, lease).await.unwrap();
    assert_eq!(claim.rows.iter().map(|row| row.id).collect::<Vec<_>>(), [second.id]);
    assert_eq!(db.store.gauges().await.unwrap().unsent, 1);
}

#[tokio::test]
async fn a_row_written_while_the_migration_runs_is_listed() {
    let db = TestDb::new().await;
    revert_to_before_unsent_transactions(&db).await;
    // A relay still on the earlier schema, mid-transaction.
    let mut writer = db.psql.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(raw_insert("during", "w", &[]))).execute(&mut *writer).await.unwrap();
    let store = db.store.clone();
    let migration = tokio::spawn(async move { store.migrate().await });
    wait_until(Duration::from_secs(10), "the migration waits for the writer", || async {
        db.scalar_i64("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'transactions'::regclass").await
            > 0
    })
    .await;
    writer.commit().await.unwrap();
    migration.await.unwrap().unwrap();
    db.assert_unsent_rows_followed().await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM unsent_transactions").await, 1);
}

/// Reverts the migrations down to (and including) unsent_transactions.
async fn revert_to_before_unsent_transactions(db: &TestDb) {
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261205000001), "listing lookups");
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261204000001), "sustained load");
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261203000002), "trace context");
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261203000001), "ambiguous outcomes");
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261201000003), "the resend audit");
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261201000002), "unsent_transactions");
}

/// A newer release applied a migration this binary does not know: it still
/// starts (every migration keeps the release before it working), so a
/// rollback of the binary never wedges on the schema.
#[tokio::test]
async fn a_schema_with_newer_migrations_does_not_stop_this_binary() {
    let db = TestDb::new().await;
    db.execute(
        "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time) \
         VALUES (20991231000000, 'a later release', now(), true, '\\x00', 0)",
    )
    .await;
    db.store.migrate().await.expect("an unknown, newer migration is no reason to refuse");
    insert_created(&db, &new_tx(unique(), "w")).await;
}

/// A migration that must wait for a lock (a long transaction reads the
/// table) gives up after its 5 s lock timeout instead of queueing every
/// writer behind itself, and tries again until it gets the lock.
#[tokio::test]
async fn a_migration_waiting_for_a_lock_lets_writers_through_and_tries_again() {
    let db = TestDb::new().await;
    // The trace-context migration adds columns (an exclusive lock); the one
    // after it only sets storage parameters, which waits for no reader, and
    // the last rebuilds indexes of `unsent_transactions`, which it does not
    // read.
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261205000001));
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261204000001));
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261203000002));
    let mut reader = db.psql.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM transactions").execute(&mut *reader).await.unwrap();
    let store = db.store.clone();
    let migration = tokio::spawn(async move { store.migrate().await });
    wait_until(Duration::from_secs(10), "the migration waits for its lock", || async {
        db.scalar_i64("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'transactions'::regclass").await
            > 0
    })
    .await;
    // Without a lock timeout this writer would queue behind the waiting
    // migration until the reader ends.
    // (A plain session, as the release before this migration writes: this
    // binary's INSERT needs the tables the migration adds.)
    let insert = sqlx::query(sqlx::AssertSqlSafe(raw_insert("meanwhile", "w", &[]))).execute(&db.psql);
    // At most the migration's 2 s lock timeout (plus scheduling), well under
    // the reader's hold: the writer never waits for the reader's end.
    let written = tokio::time::timeout(Duration::from_secs(3), insert).await;
    assert!(written.is_ok_and(|r| r.is_ok()), "a writer got through within the migration's lock timeout");
    reader.commit().await.unwrap();
    migration.await.unwrap().expect("the migration is applied once the lock is free");
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM _sqlx_migrations WHERE version IN (20261203000002, 20261204000001, 20261205000001) \
             AND success"
        )
        .await,
        3
    );
}

/// With nothing unsent, the next due time is "none", so an idle relay's
/// loop sleeps its longest instead of polling the database every 20 ms
/// (found at 100 relays: each idle relay ran ~85 transactions a second).
#[tokio::test]
async fn with_nothing_unsent_no_row_is_due_and_an_overdue_row_is_due_now() {
    let db = TestDb::new().await;
    for kind in [QueueKind::Standard, QueueKind::Fifo] {
        assert_eq!(db.store.clone().for_queue(kind).next_due_in().await.unwrap(), None, "{kind:?}");
    }
    crate::common::insert_unsent(&db, "w").await;
    db.execute("UPDATE transactions SET next_attempt_at = now() - interval '1 minute'").await;
    assert_eq!(db.store.next_due_in().await.unwrap(), Some(Duration::ZERO), "overdue: due now");
}

/// A schema with every migration applied starts without the migrators'
/// database-wide lock: another schema's long migration (another relay's,
/// on the same database) never holds up its start.
#[tokio::test]
async fn a_migrated_schema_starts_without_waiting_for_the_migration_lock() {
    let db = TestDb::new().await;
    let mut holder = db.psql.acquire().await.unwrap();
    sqlx::migrate::Migrate::lock(&mut *holder).await.unwrap();
    let started = tokio::time::timeout(Duration::from_secs(5), db.store.migrate()).await;
    sqlx::migrate::Migrate::unlock(&mut *holder).await.unwrap();
    assert!(started.is_ok_and(|r| r.is_ok()), "a migrated schema does not queue behind another migration");
}

/// A table's storage parameters (`ALTER TABLE … SET (…)`), as PostgreSQL lists them.
async fn reloptions(db: &TestDb, table: &str) -> Vec<String> {
    sqlx::query_scalar::<_, Option<Vec<String>>>("SELECT reloptions FROM pg_class WHERE oid = $1::regclass")
        .bind(table)
        .fetch_one(db.store.pool())
        .await
        .unwrap()
        .unwrap_or_default()
}

/// The test database's store, for a relay with a FIFO queue.
fn fifo_store(db: &TestDb) -> Store {
    db.store.clone().for_queue(QueueKind::Fifo)
}

/// `unsent_transactions` is vacuumed on a fixed threshold, whatever its
/// size, with no cost delay (the defaults wait for 20 % of the table to be
/// dead), and `transactions` keeps room on each page for its rows' updates;
/// reverting the migration gives both tables the server's defaults back.
#[tokio::test]
async fn the_bookkeeping_table_is_vacuumed_on_a_fixed_threshold_and_the_migration_reverts() {
    let db = TestDb::new().await;
    let options = || reloptions(&db, "unsent_transactions");
    let set = options().await;
    for option in [
        "autovacuum_vacuum_scale_factor=0",
        "autovacuum_vacuum_threshold=1000",
        "autovacuum_vacuum_cost_delay=0",
        "autovacuum_analyze_scale_factor=0",
        "autovacuum_analyze_threshold=1000",
    ] {
        assert!(set.iter().any(|o| o == option), "{option} missing from {set:?}");
    }
    let fillfactor = || reloptions(&db, "transactions");
    assert_eq!(fillfactor().await, ["fillfactor=50"], "room for each row's update beside it (a HOT update)");
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261205000001));
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261204000001));
    assert!(options().await.is_empty(), "the server's defaults again");
    assert_eq!(fillfactor().await, ["fillfactor=80"], "the fillfactor the table was created with");
    db.store.migrate().await.unwrap();
    assert_eq!(options().await.len(), 5);
}

/// The listing's due and wallet indexes carry predicates that no lookup by
/// id implies, so only the primary key can serve one (the plans are checked
/// in `statements::with_the_listing_analyzed_as_empty_…`); reverting the
/// migration gives back the plain indexes.
#[tokio::test]
async fn the_listing_indexes_serve_no_lookup_by_id_and_the_migration_reverts() {
    let db = TestDb::new().await;
    let definitions = || async {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT indexname::text, indexdef FROM pg_indexes WHERE schemaname = current_schema() \
             AND tablename = 'unsent_transactions' AND indexname <> 'unsent_transactions_pkey' ORDER BY indexname",
        )
        .fetch_all(&db.psql)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(name, definition)| format!("{name}: {}", definition.split(" USING ").nth(1).unwrap()))
            .collect::<Vec<_>>()
    };
    let partial = [
        "unsent_transactions_due_idx: btree (due_at, id) WHERE (due_at IS NOT NULL)",
        "unsent_transactions_wallet_idx: btree (wallet_address, id) WHERE (wallet_address IS NOT NULL)",
    ];
    assert_eq!(definitions().await, partial);
    assert_eq!(db.store.revert_last_migration().await.unwrap(), Some(20261205000001));
    assert_eq!(
        definitions().await,
        [
            "unsent_transactions_due_idx: btree (due_at, id)",
            "unsent_transactions_wallet_idx: btree (wallet_address, id)"
        ]
    );
    db.store.migrate().await.unwrap();
    assert_eq!(definitions().await, partial);
}

/// The gauges say how long an open transaction has held back VACUUM (an
/// analytics session in REPEATABLE READ, here) and how many dead tuples
/// the bookkeeping table holds, so both can be alerted on before the
/// relay slows down.
#[tokio::test]
async fn the_gauges_show_a_transaction_holding_back_vacuum_and_the_dead_tuples() {
    let db = TestDb::new().await;
    let mut held = db.psql.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *held).await.unwrap();
    sqlx::query("SELECT count(*) FROM transactions").execute(&mut *held).await.unwrap();
    for _ in 0..20 {
        insert_created(&db, &new_tx(unique(), "w")).await;
    }
    // Sent: their entries in unsent_transactions are deleted, and stay as
    // dead tuples while the snapshot above may still see them.
    db.execute("UPDATE transactions SET message_id = 'm-' || id, queue_sent_at = now()").await;
    wait_until(Duration::from_secs(15), "the statistics count the dead tuples", || async {
        db.store.gauges().await.unwrap().unsent_dead_tuples >= 20
    })
    .await;
    // Polled: the age is the database clock's, whole seconds apart.
    wait_until(Duration::from_secs(10), "the held transaction's age reads at least 1 s", || async {
        db.store.gauges().await.unwrap().oldest_xmin_age_seconds >= 1.0
    })
    .await;
    held.commit().await.unwrap();
}

/// A drain's claims start at the highest first row any of them locked
/// (`DueFloor`): the row there is still in reach, a row given back below
/// it waits for a claim that starts at the head of the due index (every
/// sweep outside a drain, and each drain turn's first), and a FIFO queue
/// never starts past the head.
#[tokio::test]
async fn a_drain_claim_starts_at_its_floor_and_a_sweep_finds_the_row_it_passed() {
    let db = TestDb::new().await;
    let lease = Duration::from_secs(30);
    let mut ids = Vec::new();
    for wallet in ["w1", "w2", "w3", "w4", "w5"] {
        ids.push(insert_created(&db, &new_tx(unique(), wallet)).await.id);
    }
    let claimed = |claim: &txrelay::store::Claim| claim.rows.iter().map(|row| row.id).collect::<Vec<_>>();
    let floor = DueFloor::default();

    // Another session holds the first row: the claim locks its listing but
    // skips it, and its place is the floor, so the next claim still finds it.
    let mut other = db.psql.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM transactions WHERE id = $1 FOR UPDATE").bind(ids[0]).execute(&mut *other).await.unwrap();
    let first = db.store.claim(ClaimMode::Drain(&floor), 1, lease).await.unwrap();
    assert!(claimed(&first).is_empty(), "the locked row is skipped: {:?}", first.rows);
    other.rollback().await.unwrap();
    let first = db.store.claim(ClaimMode::Drain(&floor), 1, lease).await.unwrap();
    assert_eq!(claimed(&first), [ids[0]], "the floor's own row is in reach");
    let second = db.store.claim(ClaimMode::Drain(&floor), 1, lease).await.unwrap();
    assert_eq!(claimed(&second), [ids[1]]);
    // Given back: due again, at its place, now below the floor.
    assert_eq!(db.store.release(&[first.row_ref(ids[0])]).await.unwrap(), 1);
    let third = db.store.claim(ClaimMode::Drain(&floor), 10, lease).await.unwrap();
    assert_eq!(claimed(&third), [ids[2], ids[3], ids[4]], "the drain's claim starts at its floor");
    db.assert_unsent_rows_followed().await;

    let fifo = fifo_store(&db).claim(ClaimMode::Drain(&floor), 10, lease).await.unwrap();
    assert_eq!(claimed(&fifo), [ids[0]], "a FIFO queue's claim starts at the head");
    assert_eq!(db.store.release(&[fifo.row_ref(ids[0])]).await.unwrap(), 1);
    let sweep = db.store.claim(ClaimMode::Due, 10, lease).await.unwrap();
    assert_eq!(claimed(&sweep), [ids[0]], "a sweep starts at the head");
    db.assert_unsent_rows_followed().await;
}

/// `next_attempt_at = '-infinity'`, set by hand to say "at once", has no
/// chrono value: a claim reading its place back as a floor would panic.
#[tokio::test]
async fn a_row_due_since_minus_infinity_is_claimed_by_a_drain() {
    let db = TestDb::new().await;
    db.execute(&raw_insert("forever", "w", &[("next_attempt_at", "'-infinity'")])).await;
    let floor = DueFloor::default();
    let claim = db.store.claim(ClaimMode::Drain(&floor), 10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(claim.rows.iter().map(|row| row.reference.as_str()).collect::<Vec<_>>(), ["forever"]);
}

/// While a transaction holds back VACUUM, every row drained leaves a dead
/// entry at the head of the due index that no scan can skip. A drain's
/// claim starts at its floor instead of walking them: counted in the
/// buffers its scan of the index reads (not in time), with the generic plan
/// the relay's connections use.
#[tokio::test]
async fn under_a_held_snapshot_a_drain_claim_does_not_walk_the_rows_drained_before_it() {
    let db = TestDb::new().await;
    db.execute(&bulk_insert("held", 10_000, 100)).await;
    db.execute("ANALYZE transactions, unsent_transactions").await;
    let mut held = db.psql.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *held).await.unwrap();
    sqlx::query("SELECT count(*) FROM transactions").execute(&mut *held).await.unwrap();
    let lease = Duration::from_secs(30);
    let floor = DueFloor::default();
    for _ in 0..99 {
        let claim = db.store.claim(ClaimMode::Drain(&floor), 100, lease).await.unwrap();
        let sent: Vec<_> = claim.rows.iter().map(|row| (claim.row_ref(row.id), format!("m-{}", row.id))).collect();
        assert_eq!(db.store.record_sent(&sent).await.unwrap().len(), 100);
    }
    let (due_at, id): (chrono::DateTime<chrono::Utc>, i64) =
        sqlx::query_as("SELECT due_at, id FROM unsent_transactions ORDER BY due_at, id LIMIT 1")
            .fetch_one(&db.psql)
            .await
            .unwrap();
    let read = |from: String| {
        let db = &db;
        async move {
            let arguments = format!("100, 30000, 7, {from}");
            // Typed as the relay binds them.
            let plan = explain_generic(db, "CLAIM_DUE", "int8, int8, int8, timestamptz, int8", &arguments).await;
            let candidates = find_plan_node(&plan[0]["Plan"], &|node| node["Subplan Name"] == "CTE candidates")
                .expect("the claim lists its candidates");
            let scan = find_plan_node(candidates, &|node| node["Index Name"] == "unsent_transactions_due_idx")
                .unwrap_or_else(|| panic!("the candidates come from the due index: {candidates}"));
            let bound = scan["Index Cond"].as_str().unwrap_or_default();
            assert!(bound.contains("ROW(due_at, id) >="), "the floor bounds the index scan: {bound}");
            buffers(scan)
        }
    };
    let from_head = read("NULL, NULL".into()).await;
    let from_floor = read(format!("'{}'::timestamptz, {id}", due_at.to_rfc3339())).await;
    held.commit().await.unwrap();
    assert!(
        from_floor * 4 < from_head,
        "listing the candidates reads {from_floor} buffers from the floor and {from_head} from the head: the 9,900 \
         dead entries before the floor are walked"
    );
}

/// While a transaction holds back VACUUM, recording a sent batch deletes
/// its rows' listings, one dead entry each. After an ANALYZE that saw
/// almost none of the listing alive, the planner priced a walk of a whole
/// index as one entry, and the delete walked the `(wallet_address, id)`
/// index once per row: 33,604 buffers for 31 rows, 100–240 ms a batch, in
/// the held run's collapsed minute (docs/benchmarks-history.md). Counted in
/// buffers, with the generic plan the relay's connections use.
#[tokio::test]
async fn under_a_held_snapshot_after_an_analyze_recording_a_sent_batch_reads_its_listings_by_key() {
    let db = TestDb::new().await;
    // The statistics are what this test is about: autovacuum would race it.
    db.execute("ALTER TABLE unsent_transactions SET (autovacuum_enabled = false)").await;
    db.execute(&bulk_insert("sent", 40_000, 100)).await;
    let mut held = db.psql.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *held).await.unwrap();
    sqlx::query("SELECT count(*) FROM transactions").execute(&mut *held).await.unwrap();
    db.execute("UPDATE transactions SET message_id = 'm-' || id, queue_sent_at = now()").await;
    db.execute("ANALYZE unsent_transactions").await;
    db.execute(&bulk_insert("batch", 31, 31)).await;
    let claim = db.store.claim(ClaimMode::Due, 100, Duration::from_secs(30)).await.unwrap();
    assert_eq!(claim.rows.len(), 31);
    let ids = claim.rows.iter().map(|row| row.id.to_string()).collect::<Vec<_>>().join(",");
    let tokens = vec![claim.token.to_string(); claim.rows.len()].join(",");
    let arguments = format!("'{{{ids}}}', '{{{tokens}}}', array_fill('m'::text, ARRAY[{}])", claim.rows.len());
    let plan = explain_generic(&db, "RECORD_SENT", "int8[], int8[], text[]", &arguments).await;
    held.commit().await.unwrap();
    let delete = find_plan_node(&plan[0]["Plan"], &|node| {
        node["Operation"] == "Delete" && node["Relation Name"] == "unsent_transactions"
    })
    .expect("the sent rows' listings are deleted");
    let read = buffers(delete);
    assert!(read < 31 * 5, "deleting 31 listings read {read} buffers, not 3 or 4 each by the primary key: {delete}");
}

/// Runs the named store statement once as the relay's bookkeeping
/// connections plan it (a generic plan, no sequential scans), with its
/// parameters typed as `types` and given as `arguments` (SQL literals),
/// under `EXPLAIN (ANALYZE, BUFFERS)`, and rolls it back.
async fn explain_generic(db: &TestDb, name: &str, types: &str, arguments: &str) -> serde_json::Value {
    let sql = txrelay::store::statements()
        .into_iter()
        .find_map(|(listed, sql)| (listed == name).then_some(sql))
        .unwrap_or_else(|| panic!("{name} is a named statement"));
    let mut connection = db.store.pool().acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *connection).await.unwrap();
    sqlx::raw_sql(
        "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off; \
         SET LOCAL txrelay.relay_writes = on",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE explained ({types}) AS {sql}")))
        .execute(&mut *tx)
        .await
        .unwrap();
    let explain = format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE explained({arguments})");
    let plan = sqlx::query_scalar(sqlx::AssertSqlSafe(explain)).fetch_one(&mut *tx).await.unwrap();
    // Prepared statements outlive a rollback: gone before the connection
    // returns to the pool.
    tx.rollback().await.unwrap();
    sqlx::raw_sql("DEALLOCATE explained").execute(&mut *connection).await.unwrap();
    plan
}

/// The shared buffers a plan node read, from cache or not.
fn buffers(node: &serde_json::Value) -> i64 {
    node["Shared Hit Blocks"].as_i64().unwrap() + node["Shared Read Blocks"].as_i64().unwrap()
}

/// The first node of an `EXPLAIN (FORMAT JSON)` plan, depth first, that
/// `matches`.
fn find_plan_node<'a>(
    node: &'a serde_json::Value,
    matches: &dyn Fn(&serde_json::Value) -> bool,
) -> Option<&'a serde_json::Value> {
    if matches(node) {
        return Some(node);
    }
    node["Plans"].as_array()?.iter().find_map(|child| find_plan_node(child, matches))
}
