//! `txrelay run` as real processes: several replicas, SIGKILL, SIGTERM.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use txrelay::store::{InsertOutcome, Intake};

use crate::common::proxy::{SqsMode, SqsProxy};
use crate::common::sqs::attribute;
use crate::common::*;

async fn backlog(db: &TestDb, rows: usize) {
    let mut pending = Vec::new();
    for _ in 0..rows {
        let tx = new_tx(unique(), &format!("w{}", fastrand::u8(..)));
        let store = db.store.clone();
        pending.push(tokio::spawn(async move {
            assert!(matches!(store.insert(&tx, Intake::Queued).await.unwrap(), InsertOutcome::Created { .. }));
        }));
        if pending.len() == 16 {
            for task in pending.drain(..) {
                task.await.unwrap();
            }
        }
    }
    for task in pending {
        task.await.unwrap();
    }
}

async fn sent(db: &TestDb) -> i64 {
    db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NOT NULL").await
}

fn manifest(db: &TestDb, change: impl FnOnce(&mut txrelay::spec::TransactionRelaySpec)) -> tempfile_path::TempPath {
    let mut spec = spec(&db.schema);
    change(&mut spec);
    manifest_file(&spec)
}

#[tokio::test]
async fn two_replicas_drain_one_backlog_sending_every_row_exactly_once() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    backlog(&db, 2000).await;
    // One call in flight per relay against six receivers keeps the queue
    // shallow, which keeps moto's cost per call flat (it walks the whole
    // queue on every call): the test then takes seconds, not minutes, on a
    // slow machine too. Two claimers still race for every batch.
    let config = manifest(&db, |s| {
        s.batch_size = 100;
        s.concurrency = 1;
    });
    let start = || RelayProcess::start(command(&db.url, &db.schema, &queue.url, &queue.endpoint), Some(&config));
    let (first, second) = tokio::join!(start(), start());
    // The bound is for a loaded CI machine, where the real-cluster tier runs
    // beside this test: alone it takes about 20 s, and once 1,993 of the
    // 2,000 had arrived at 240 s.
    let messages = queue.receive_concurrently(2000, Duration::from_secs(420), 6).await;
    // A send is told apart from a redelivery by its message id: concurrent
    // receivers may be handed the same message twice (SQS standard queues
    // are at-least-once too), but a second send gets a message id of its own.
    let mut per_key: HashMap<String, HashSet<String>> = HashMap::new();
    for message in &messages {
        let key = attribute(message, "idempotency_key").expect("key attribute");
        per_key.entry(key).or_default().insert(message.message_id.clone().expect("message id"));
    }
    let duplicates: Vec<_> = per_key.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(duplicates.is_empty(), "sent twice: {duplicates:?}");
    if per_key.len() != 2000 {
        let states = db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL").await;
        panic!("{} of 2000 rows delivered; {states} rows still unsent in the database", per_key.len());
    }
    wait_until(Duration::from_secs(10), "all recorded as sent", || async { sent(&db).await == 2000 }).await;
    assert!(queue.receive(1, Duration::from_secs(2)).await.is_empty(), "nothing more arrives");
    let (first_logs, second_logs) = (first.logs(), second.logs());
    assert!(first_logs.contains("sweep") && second_logs.contains("sweep"), "both replicas swept");
    db.assert_unsent_rows_followed().await;
}

#[tokio::test]
async fn rows_claimed_by_a_killed_replica_are_delivered_after_the_lease() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    proxy.set(SqsMode::Delay(Duration::from_millis(300)));
    backlog(&db, 300).await;
    let config = manifest(&db, |s| {
        s.claim_lease = secs(5);
        s.batch_size = 100;
    });
    let mut victim =
        RelayProcess::start(command(&db.url, &db.schema, &queue.url, &proxy.endpoint), Some(&config)).await;
    wait_until(Duration::from_secs(30), "the first replica is mid-drain", || async {
        let sent = sent(&db).await;
        sent > 0 && sent < 250
    })
    .await;
    victim.child.start_kill().unwrap();
    victim.child.wait().await.unwrap();
    // Whether or not their lease has run out by now (a slow machine may take
    // longer than the lease to get here), the killed replica's claims are
    // still on the rows: nobody released them.
    let held =
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL AND claimed_until IS NOT NULL").await;
    assert!(held > 0, "the killed replica left claimed rows behind");

    proxy.set(SqsMode::Forward);
    let _survivor = RelayProcess::start(command(&db.url, &db.schema, &queue.url, &proxy.endpoint), Some(&config)).await;
    wait_until(Duration::from_secs(60), "every row sent", || async { sent(&db).await == 300 }).await;
    let messages = queue.drain().await;
    let keys: std::collections::HashSet<String> =
        messages.iter().filter_map(|m| attribute(m, "idempotency_key")).collect();
    assert_eq!(keys.len(), 300, "every row delivered at least once");
    // What a crash can resend is what was sent and not yet recorded: a
    // relay holds a call's slot until its results are recorded, so at most
    // `concurrency` batches of 10 (the README's bound; the default
    // concurrency is 4). Redeliveries of one message (same id) are not sends.
    let sends: HashSet<String> = messages.iter().filter_map(|m| m.message_id.clone()).collect();
    let duplicates = sends.len() - keys.len();
    let bound = spec(&db.schema).concurrency as usize * 10;
    assert!(duplicates <= bound, "duplicates bounded by concurrency × 10 = {bound}: {duplicates}");
    db.assert_unsent_rows_followed().await;
}

#[tokio::test]
async fn sigterm_finishes_in_flight_sends_records_them_and_exits_zero() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = SqsProxy::start(&queue.endpoint).await;
    proxy.set(SqsMode::Delay(Duration::from_millis(400)));
    backlog(&db, 400).await;
    let config = manifest(&db, |s| s.batch_size = 100);
    let mut process =
        RelayProcess::start(command(&db.url, &db.schema, &queue.url, &proxy.endpoint), Some(&config)).await;
    wait_until(Duration::from_secs(30), "mid-drain", || async { sent(&db).await > 0 }).await;
    process.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(15), process.child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert!(status.success(), "exit code {status:?}\n{}", process.logs());
    let claimed =
        db.scalar_i64("SELECT count(*) FROM transactions WHERE message_id IS NULL AND claimed_until > now()").await;
    assert_eq!(claimed, 0, "no claimed row left unrecorded");
    let delivered = queue.drain().await.len() as i64;
    assert_eq!(delivered, sent(&db).await, "every message that went out is recorded");
    assert!(delivered < 400, "it stopped mid-drain");
    db.assert_unsent_rows_followed().await;
}

#[tokio::test]
async fn a_bad_manifest_is_a_one_line_error_naming_the_field_with_exit_code_2() {
    let db = TestDb::new().await;
    let config = tempfile_path::TempPath::with_contents(
        "apiVersion: relay.mykobo.io/v1alpha1\nkind: TransactionRelay\nmetadata: {name: x}\nspec:\n  batchSize: 5000\n  database: {secretRef: {name: d}}\n  queue: {secretRef: {name: q}}\n",
    );
    let output = command(&db.url, &db.schema, "http://127.0.0.1:9/q", "http://127.0.0.1:9")
        .arg("run")
        .arg("--config")
        .arg(&*config)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error = stderr.lines().last().unwrap_or_default();
    assert!(error.starts_with("error: spec.batchSize:"), "{stderr}");

    let output = command(&db.url, &db.schema, "http://127.0.0.1:9/q", "http://127.0.0.1:9")
        .env_remove("DATABASE_URL")
        .arg("run")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("DATABASE_URL: is not set"));
}

#[tokio::test]
async fn run_serves_new_on_the_api_port_and_metrics_only_on_the_other() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let process = RelayProcess::start(command(&db.url, &db.schema, &queue.url, &queue.endpoint), None).await;
    let (status, created) = process.http(process.api, "POST", "/new", Some(INGEST_TOKEN), &body(unique(), "w")).await;
    assert_eq!(status, axum::http::StatusCode::CREATED, "{created}");
    assert_eq!(queue.receive(1, Duration::from_secs(5)).await.len(), 1);

    let (status, metrics) = process.http(process.metrics, "GET", "/metrics", None, &serde_json::Value::Null).await;
    assert_eq!(status, axum::http::StatusCode::OK);
    assert!(metrics.contains("txrelay_transactions_accepted_total"), "{metrics}");
    let (status, _) = process.http(process.api, "GET", "/metrics", None, &serde_json::Value::Null).await;
    assert_eq!(status, axum::http::StatusCode::NOT_FOUND, "metrics are not on the public port");
    let (status, _) = process.http(process.metrics, "POST", "/new", Some(INGEST_TOKEN), &body(unique(), "w")).await;
    assert_eq!(status, axum::http::StatusCode::NOT_FOUND, "ingest is not on the metrics port");
    let (status, _) = process.http(process.metrics, "GET", "/readyz", None, &serde_json::Value::Null).await;
    assert_eq!(status, axum::http::StatusCode::OK);
}

/// Runs a relay with credentials everywhere, drives it through success,
/// rejection and failure with debug logging in JSON, and checks that no
/// credential appears in the logs while transactions are traceable.
#[tokio::test]
async fn logs_carry_references_and_never_a_credential() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let password = "db-password-4f9a1c";
    let db_url = db.url.replacen("postgres@", &format!("postgres:{password}@"), 1);
    assert!(db_url.contains(password), "the test database URL has a user: {}", db.url);
    let secrets = [
        password,
        SECRET_KEY_FOR_LOGS,
        crate::common::sqs::ACCESS_KEY,
        "ledger-token-7d2e",
        INGEST_TOKEN,
        ADMIN_TOKEN,
        CLIENT_TOKEN,
    ];
    let mut command = command(&db_url, &db.schema, &queue.url, &queue.endpoint);
    command
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY_FOR_LOGS)
        .env("LEDGER_TOKEN", "ledger-token-7d2e")
        .env("RUST_LOG", "debug")
        .env("TXRELAY_LOG_FORMAT", "json");
    let process = RelayProcess::start(command, None).await;
    let n = unique();
    let (status, _) = process.http(process.api, "POST", "/new", Some(INGEST_TOKEN), &body(n, "w")).await;
    assert!(status.is_success());
    let (status, _) = process.http(process.api, "POST", "/new", Some("not-the-token"), &body(unique(), "w")).await;
    assert_eq!(status, axum::http::StatusCode::UNAUTHORIZED);
    let mut bad = body(unique(), "w");
    bad["ledger_payload"]["payload"]["value"] = serde_json::json!(CLIENT_TOKEN);
    let (status, _) = process.http(process.api, "POST", "/new", Some(INGEST_TOKEN), &bad).await;
    assert_eq!(status, axum::http::StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) =
        process.http(process.api, "GET", "/transactions?limit=5", Some(ADMIN_TOKEN), &serde_json::Value::Null).await;
    assert_eq!(status, axum::http::StatusCode::OK);
    process.signal("TERM");
    let mut process = process;
    process.child.wait().await.unwrap();

    let logs = process.logs();
    assert!(logs.lines().count() > 10, "debug logs were captured:\n{logs}");
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret} appears in the logs:\n{logs}");
    }
    let reference = format!("MYK-{n:06}");
    let committed: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "committed" || line["message"] == "sent inline")
        .collect();
    assert_eq!(committed.len(), 2, "{logs}");
    for event in committed {
        assert_eq!(event["span"]["reference"], reference.as_str(), "{event}");
        assert_eq!(event["span"]["idempotency_key"], format!("idem-{n}"), "{event}");
    }
}

const SECRET_KEY_FOR_LOGS: &str = "aws-secret-key-9b8c7d";

#[tokio::test]
async fn without_an_ingest_token_run_refuses_to_start_unless_told_it_is_insecure() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let output = command(&db.url, &db.schema, &queue.url, &queue.endpoint)
        .env_remove("RELAY_API_TOKENS")
        .args(["run", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("RELAY_API_TOKENS"));

    let mut insecure = command(&db.url, &db.schema, &queue.url, &queue.endpoint);
    insecure.env_remove("RELAY_API_TOKENS");
    let process = RelayProcess::start_with(insecure, None, &["--insecure-no-auth"]).await;
    let (status, _) = process.http(process.api, "POST", "/new", None, &body(unique(), "w")).await;
    assert_eq!(status, axum::http::StatusCode::CREATED);
    assert!(process.logs().contains("--insecure-no-auth"), "a warning is logged at start");
}

#[tokio::test]
async fn the_client_address_is_the_peer_unless_a_trusted_proxy_forwarded_it() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let stored_ip = |n: u64| {
        let store = db.store.clone();
        async move { store.find_by_reference(&format!("MYK-{n:06}")).await.unwrap().unwrap().ip_address }
    };
    let without_ip = |n: u64| {
        let mut request = body(n, "w");
        request["ledger_payload"]["meta_data"].as_object_mut().unwrap().remove("ip_address");
        request
    };
    let forwarded = [("x-forwarded-for", "198.51.100.7")];

    let untrusting = RelayProcess::start(command(&db.url, &db.schema, &queue.url, &queue.endpoint), None).await;
    let n = unique();
    let (status, _) =
        untrusting.http_with(untrusting.api, "POST", "/new", Some(INGEST_TOKEN), &forwarded, &without_ip(n)).await;
    assert_eq!(status, axum::http::StatusCode::CREATED);
    assert_eq!(stored_ip(n).await.as_deref(), Some("127.0.0.1"), "a forged header is ignored");

    let trusting = RelayProcess::start_with(
        command(&db.url, &db.schema, &queue.url, &queue.endpoint),
        None,
        &["--trusted-proxy", "127.0.0.1/32"],
    )
    .await;
    let n = unique();
    trusting.http_with(trusting.api, "POST", "/new", Some(INGEST_TOKEN), &forwarded, &without_ip(n)).await;
    assert_eq!(stored_ip(n).await.as_deref(), Some("198.51.100.7"), "a trusted proxy's header is believed");
    let n = unique();
    trusting.http_with(trusting.api, "POST", "/new", Some(INGEST_TOKEN), &forwarded, &body(n, "w")).await;
    assert_eq!(stored_ip(n).await.as_deref(), Some("203.0.113.7"), "the payload's own address wins");
}

/// The text of a log without its ANSI colour sequences.
fn without_colours(logs: &str) -> String {
    let mut plain = String::with_capacity(logs.len());
    let mut chars = logs.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    plain
}

/// Opens a connection and sends part of a request's head, then nothing.
async fn slow_client(address: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(b"POST /new HTTP/1.1\r\nHost: relay\r\nContent-Type: appli").await.unwrap();
    stream
}

/// True once the server closed the connection (EOF or reset).
async fn closed_by_server(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buffer = [0u8; 512];
    match tokio::time::timeout(within, stream.read(&mut buffer)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        // A 408 before closing also counts: the server gave up on it.
        Ok(Ok(_)) => matches!(tokio::time::timeout(within, stream.read(&mut buffer)).await, Ok(Ok(0)) | Ok(Err(_))),
        Err(_) => false,
    }
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off_on_both_listeners_while_normal_requests_are_served() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let process = RelayProcess::start_with(
        command(&db.url, &db.schema, &queue.url, &queue.endpoint),
        None,
        &["--header-read-timeout", "1s", "--max-connections", "200"],
    )
    .await;
    wait_until(Duration::from_secs(10), "the limits are logged at start", || async {
        let logs = without_colours(&process.logs());
        logs.contains("header_read_timeout_ms=1000") && logs.contains("max_connections=200")
    })
    .await;
    let mut slow = Vec::new();
    for i in 0..64 {
        let address = if i % 4 == 0 { process.metrics } else { process.api };
        slow.push(slow_client(address).await);
    }
    let started = Instant::now();
    let (status, created) = process.http(process.api, "POST", "/new", Some(INGEST_TOKEN), &body(unique(), "w")).await;
    assert_eq!(status, axum::http::StatusCode::CREATED, "{created}");
    assert!(started.elapsed() < Duration::from_secs(2), "served at once beside 64 slow clients");
    for (i, stream) in slow.iter_mut().enumerate() {
        assert!(closed_by_server(stream, Duration::from_secs(10)).await, "slow client {i} is still connected");
    }

    // An idle kept-alive connection is closed too: after one request the
    // server waits at most the header-read timeout for the next one.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut idle = tokio::net::TcpStream::connect(process.metrics).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n").await.unwrap();
    let mut buffer = [0u8; 1024];
    let read = idle.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));
    assert!(closed_by_server(&mut idle, Duration::from_secs(10)).await, "idle keep-alive connection closed");
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_a_slot_is_free() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let process = RelayProcess::start_with(
        command(&db.url, &db.schema, &queue.url, &queue.endpoint),
        None,
        &["--header-read-timeout", "2s", "--max-connections", "4"],
    )
    .await;
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(slow_client(process.api).await);
    }
    let started = Instant::now();
    let (status, created) = process.http(process.api, "POST", "/new", Some(INGEST_TOKEN), &body(unique(), "w")).await;
    assert_eq!(status, axum::http::StatusCode::CREATED, "{created}");
    // The four slow clients hold every slot until their headers time out.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "served only once a slot was free: {:?}",
        started.elapsed()
    );
    drop(slow);
}

/// W3C trace context from the dApp to the ledger: `/new`'s `traceparent`
/// and `tracestate` are kept with the row and sent as message attributes,
/// inline and by a later sweep alike; a malformed one is ignored and
/// counted, never refused; and the ingest, commit and send spans reach an
/// OTLP receiver in the dApp's trace.
#[tokio::test]
async fn trace_context_travels_from_new_to_the_queue_and_the_spans_are_exported_over_otlp() {
    use crate::common::otlp::OtlpReceiver;
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let receiver = OtlpReceiver::start().await;
    let proxy = SqsProxy::start(&queue.endpoint).await;
    let mut command = command(&db.url, &db.schema, &queue.url, &proxy.endpoint);
    command
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_SERVICE_NAME", "txrelay-under-test");
    let process = RelayProcess::start(command, None).await;
    let post = |n: u64, headers: Vec<(&'static str, String)>| {
        let headers: Vec<(&str, String)> = headers;
        let process = &process;
        async move {
            let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            process.http_with(process.api, "POST", "/new", Some(INGEST_TOKEN), &refs, &body(n, "w-trace")).await
        }
    };
    let (inline_trace, sweep_trace) = ("4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c");
    let inline_parent = format!("00-{inline_trace}-00f067aa0ba902b7-01");
    let sweep_parent = format!("00-{sweep_trace}-b7ad6b7169203331-01");
    let (n1, n2, n3) = (unique(), unique(), unique());

    let (status, text) =
        post(n1, vec![("traceparent", inline_parent.clone()), ("tracestate", "congo=t61rcWkgMzE".into())]).await;
    assert_eq!(status.as_u16(), 201, "{text}");
    // Sent later by the loop: the queue refuses until it is back.
    proxy.set(SqsMode::Down);
    let (status, text) = post(n2, vec![("traceparent", sweep_parent.clone())]).await;
    assert_eq!(status.as_u16(), 202, "{text}");
    proxy.set(SqsMode::Forward);
    let (status, text) = post(n3, vec![("traceparent", "garbage".into())]).await;
    assert!(status.is_success(), "a malformed traceparent is never refused: {text}");

    let messages = queue.receive(3, Duration::from_secs(30)).await;
    let carried = |n: u64| {
        let message = messages
            .iter()
            .find(|m| attribute(m, "idempotency_key").as_deref() == Some(&format!("idem-{n}")))
            .unwrap_or_else(|| panic!("message of {n} among {messages:?}"));
        (attribute(message, "traceparent"), attribute(message, "tracestate"))
    };
    assert_eq!(carried(n1), (Some(inline_parent.clone()), Some("congo=t61rcWkgMzE".into())), "inline send");
    assert_eq!(carried(n2), (Some(sweep_parent.clone()), None), "the sweep's send carries the original context");
    assert_eq!(carried(n3), (None, None), "nothing for a malformed header");

    let (_, metrics) = process.http(process.metrics, "GET", "/metrics", None, &serde_json::Value::Null).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("txrelay_trace_context_invalid_total{")
            && l.contains("header=\"traceparent\"")
            && l.ends_with(" 1")),
        "{metrics}"
    );

    let wanted = |spans: &[crate::common::otlp::ReceivedSpan]| {
        let has = |name: &str, trace: &str| spans.iter().any(|s| s.name == name && s.trace_id == trace);
        has("txrelay.ingest", inline_trace)
            && has("txrelay.commit", inline_trace)
            && has("txrelay.send", inline_trace)
            && has("txrelay.send", sweep_trace)
    };
    wait_until(Duration::from_secs(20), "the spans reach the OTLP receiver", || {
        let spans = receiver.spans();
        async move { wanted(&spans) }
    })
    .await;
    let spans = receiver.spans();
    let ingest = spans.iter().find(|s| s.name == "txrelay.ingest" && s.trace_id == inline_trace).unwrap();
    assert_eq!(ingest.parent_span_id, "00f067aa0ba902b7", "the ingest span is the dApp span's child");
    assert!(ingest.service.contains("txrelay-under-test"), "{ingest:?}");
    // (Its refused inline attempt is a send span too, the request span's child.)
    assert!(
        spans
            .iter()
            .any(|s| s.name == "txrelay.send" && s.trace_id == sweep_trace && s.parent_span_id == "b7ad6b7169203331"),
        "the later send joins the request's trace as the dApp span's child: {spans:?}"
    );
}
