//! Authentication, exposure, limits and the API contract.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{Value, json};
use txrelay::http::{ApiError, HttpOptions, paths};
use txrelay::spec::RelayId;

use crate::common::proxy::TcpProxy;
use crate::common::*;

fn openapi() -> Value {
    serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap())
        .unwrap()
}

#[tokio::test]
async fn the_openapi_document_describes_exactly_the_routes_served() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    let document = openapi();
    let documented: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| item.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone())))
        .collect();
    let mut served: BTreeSet<(String, String)> = BTreeSet::new();
    for (method, path) in paths::RELAY_ROUTES {
        served.insert((method.to_string(), path.to_string()));
        served.insert((method.to_string(), format!("{}{path}", paths::RELAY_PREFIX)));
    }
    for (method, path) in paths::SERVICE_ROUTES {
        served.insert((method.to_string(), path.to_string()));
    }
    assert_eq!(documented, served, "openapi.json and the router disagree");

    // Every documented operation reaches a handler (not the fallback, not 405).
    for (method, path) in &documented {
        let concrete =
            path.replace("{namespace}", "test").replace("{name}", &db.schema).replace("{reference}", "MYK-1");
        let (status, answer) =
            app.request(method, &concrete, Some(ADMIN_TOKEN), "application/json", b"{}".to_vec()).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {concrete}");
        let fallback = answer["error"]["message"].as_str().is_some_and(|m| m.contains("no such endpoint"));
        assert!(!fallback, "{method} {concrete} is not routed");
    }

    // The served document is the checked-in one.
    let (status, served_document) = app.request("GET", "/openapi.json", None, "application/json", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served_document, document);
}

#[tokio::test]
async fn the_openapi_schemas_match_what_the_api_answers() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    let document = openapi();
    let schema_keys = |name: &str| -> BTreeSet<String> {
        document["components"]["schemas"][name]["properties"].as_object().unwrap().keys().cloned().collect()
    };
    let (_, transaction) = app.post_new(&body(unique(), "w")).await;
    let keys: BTreeSet<String> = transaction.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, schema_keys("Transaction"));
    let (_, page) = app.get("/transactions").await;
    assert_eq!(page.as_object().unwrap().keys().cloned().collect::<BTreeSet<_>>(), schema_keys("Page"));
    let (_, health) = app.get("/health/transactions").await;
    assert_eq!(health.as_object().unwrap().keys().cloned().collect::<BTreeSet<_>>(), schema_keys("TransactionHealth"));
    let codes: Vec<String> =
        document["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
    assert_eq!(codes, ApiError::CODES);
}

#[tokio::test]
async fn a_request_slower_than_the_timeout_answers_503() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = TcpProxy::start(database_address(&db.url)).await;
    let builder = RelayBuilder::new(&db, &queue).database_url(proxy.url_for(&db.url));
    let options = HttpOptions { request_timeout: Duration::from_millis(300), ..HttpOptions::default() };
    let app = TestApp::with_options(&builder, options).await;
    proxy.set_stalled(true);
    let started = Instant::now();
    let (status, error) = app.post_new(&body(unique(), "w")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert_eq!(error["error"]["code"], "timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
    proxy.set_stalled(false);
}

#[tokio::test]
async fn load_beyond_the_concurrency_limit_is_shed_with_503_and_retry_after() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let proxy = TcpProxy::start(database_address(&db.url)).await;
    let builder = RelayBuilder::new(&db, &queue).database_url(proxy.url_for(&db.url));
    let options = HttpOptions { max_in_flight: 1, request_timeout: Duration::from_secs(5), ..HttpOptions::default() };
    let app = std::sync::Arc::new(TestApp::with_options(&builder, options).await);
    proxy.set_stalled(true);
    let stuck = {
        let app = app.clone();
        tokio::spawn(async move { app.post_new(&body(unique(), "w")).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let (status, headers, error) = app.post_new_response(&body(unique(), "w")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error["error"]["code"], "overloaded");
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert!(started.elapsed() < Duration::from_millis(500), "shed at once, not queued");
    proxy.set_stalled(false);
    stuck.abort();
}

#[tokio::test]
async fn nesting_beyond_the_limit_is_refused() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    let mut deep = json!("bottom");
    for _ in 0..40 {
        deep = json!([deep]);
    }
    let mut request = body(unique(), "w");
    request["ledger_payload"]["payload"]["memo"] = deep;
    let (status, error) = app.post_new(&request).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM transactions").await, 0);
}

#[tokio::test]
async fn database_connections_carry_a_statement_timeout() {
    let db = TestDb::new().await;
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout").fetch_one(db.store.pool()).await.unwrap();
    assert_eq!(timeout, "10s");
}

#[tokio::test]
async fn postgres_tls_is_taken_from_the_url() {
    let db = TestDb::new().await;
    let separator = if db.url.contains('?') { '&' } else { '?' };
    let required = TestDb::store_at(&format!("{}{separator}sslmode=require", db.url), &db.schema);
    let encrypted: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(required.pool())
        .await
        .expect("TLS connection with sslmode=require");
    assert!(encrypted);

    // verify-full checks the certificate: the local server's self-signed
    // certificate is not trusted for 127.0.0.1, so the connection is refused.
    let with_password = db.url.replacen("postgres@", "postgres:tls-secret-pw@", 1);
    let verified = TestDb::store_at(&format!("{with_password}{separator}sslmode=verify-full"), &db.schema);
    let error = verified.ping().await.expect_err("an untrusted certificate is refused");
    assert!(!error.to_string().contains("tls-secret-pw"), "{error}");
}

/// An API over `relays` with the default options.
fn api_over(relays: std::sync::Arc<txrelay::runtime::registry::Registry>, options: HttpOptions) -> axum::Router {
    txrelay::http::api_router(txrelay::http::AppState::new(relays, txrelay::metrics::Metrics::new(), options))
}

#[tokio::test]
async fn a_relay_that_is_not_running_yet_answers_503_not_404() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let running = RelayBuilder::new(&db, &queue);
    let relays = std::sync::Arc::new(txrelay::runtime::registry::Registry::new(None));
    relays.insert(running.handle(&txrelay::metrics::Metrics::new()).await);
    relays.set_not_ready(&RelayId::new("payments", "dapp"), "DatabaseUnreachable");
    let app = TestApp {
        router: api_over(relays, HttpOptions::default()),
        relay: running.build().await,
        metrics: Default::default(),
    };
    let (status, error) =
        app.request("POST", "/relays/payments/dapp/new", Some(INGEST_TOKEN), "application/json", b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error["error"]["code"], "relay_not_ready");
    let (status, _) =
        app.request("POST", "/relays/payments/other/new", Some(INGEST_TOKEN), "application/json", b"{}".to_vec()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn without_a_valid_token_no_answer_tells_which_relays_exist() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let builder = RelayBuilder::new(&db, &queue);
    let relays = std::sync::Arc::new(txrelay::runtime::registry::Registry::new(None));
    relays.insert(builder.handle(&txrelay::metrics::Metrics::new()).await);
    relays.set_not_ready(&RelayId::new("payments", "starting"), "SecretNotFound");
    let app = TestApp {
        router: api_over(relays, HttpOptions::default()),
        relay: builder.build().await,
        metrics: Default::default(),
    };
    let served = format!("/relays/{}/new", builder.id);
    for path in [served.as_str(), "/relays/payments/starting/new", "/relays/nowhere/nothing/new", "/new"] {
        for token in [None, Some("not-a-token"), Some(ADMIN_TOKEN)] {
            let (status, _) = app.request("POST", path, token, "application/json", b"{}".to_vec()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "POST {path} with {token:?}");
        }
    }
    for path in [format!("/relays/{}/transactions", builder.id), "/relays/nowhere/nothing/transactions".into()] {
        for token in [None, Some(INGEST_TOKEN)] {
            let (status, _) = app.request("GET", &path, token, "application/json", Vec::new()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "GET {path} with {token:?}");
        }
    }
}

#[tokio::test]
async fn insecure_no_auth_opens_new_only_and_reads_stay_closed() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let builder = RelayBuilder::new(&db, &queue);
    let mut handle = builder.handle(&txrelay::metrics::Metrics::new()).await;
    handle.ingest_tokens = txrelay::auth::TokenSet::parse("");
    handle.admin_tokens = txrelay::auth::TokenSet::parse("");
    handle.ingest_required = false;
    let relay = handle.relay.clone();
    let relays = std::sync::Arc::new(txrelay::runtime::registry::Registry::new(None));
    relays.insert(handle);
    let options = HttpOptions { insecure_no_auth: true, ..HttpOptions::default() };
    let app = TestApp { router: api_over(relays, options), relay, metrics: Default::default() };
    let (status, tx) =
        app.request("POST", "/new", None, "application/json", serde_json::to_vec(&body(unique(), "w")).unwrap()).await;
    assert_eq!(status, StatusCode::CREATED, "{tx}");
    for path in ["/transactions", "/transactions/MYK-000001", "/health/transactions"] {
        for token in [None, Some("anything")] {
            let (status, _) = app.request("GET", path, token, "application/json", Vec::new()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "GET {path} with {token:?}");
        }
    }
}

#[tokio::test]
async fn characters_postgresql_cannot_store_in_a_read_parameter_are_a_422_naming_it() {
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    for name in ["status", "wallet_address", "payer_id", "payee_id"] {
        let (status, error) = app.get(&format!("/transactions?{name}=a%00b")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {error}");
        assert_eq!(error["error"]["field"], name);
    }
    let (status, error) = app.get("/transactions/MYK%00").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["error"]["field"], "reference");
}

/// openapi.json says exactly which `ip_address` values `/new` takes: an
/// IPv4 or IPv6 address (the formats), in the characters the pattern
/// allows (no zone index). Every value the schema allows is accepted, and
/// every other one refused with the field named.
#[tokio::test]
async fn every_ip_address_the_schema_allows_is_accepted_and_no_other() {
    let document = openapi();
    let schema = &document["components"]["schemas"]["MetaData"]["properties"]["ip_address"];
    assert_eq!(schema["anyOf"], json!([{"format": "ipv4"}, {"format": "ipv6"}]), "{schema}");
    assert_eq!(schema["pattern"], "^[0-9A-Fa-f:.]+$", "{schema}");
    assert_eq!(schema["maxLength"], 45, "{schema}");
    let (db, queue) = (TestDb::new().await, TestQueue::standard().await);
    let app = TestApp::new(&RelayBuilder::new(&db, &queue)).await;
    // (value, allowed by the schema: the pattern, and ipv4 or ipv6 as RFC
    // 2673 / RFC 4291 define them)
    let cases = [
        ("203.0.113.7", true),
        ("::", true),
        ("::ffff:1.2.3.4", true),
        ("2001:db8::1", true),
        ("0000:0000:0000:0000:0000:ffff:255.255.255.255", true),
        ("1.2", false),
        ("1.2.3", false),
        ("::::", false),
        ("01.2.3.4", false),
        ("fe80::1%eth0", false),
        ("ab", false),
    ];
    for (value, allowed) in cases {
        let mut request = body(unique(), "w");
        request["ledger_payload"]["meta_data"]["ip_address"] = json!(value);
        let (status, answer) = app.post_new(&request).await;
        if allowed {
            assert!(status.is_success(), "{value}: {status} {answer}");
        } else {
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{value}: {answer}");
            assert_eq!(answer["error"]["field"], "ledger_payload.meta_data.ip_address", "{value}");
        }
    }
}
