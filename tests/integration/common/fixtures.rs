use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use txrelay::auth::TokenSet;
use txrelay::duration::HumanDuration;
use txrelay::http::{self, AppState, HttpOptions};
use txrelay::metrics::Metrics;
use txrelay::relay::{Relay, listen_for_due_rows, run_loop};
use txrelay::runtime::registry::Registry;
use txrelay::runtime::settings::{QueueSecrets, RelayHandle, RelaySettings};
use txrelay::secret::Secret;
use txrelay::spec::RelayId;
use txrelay::spec::{DatabaseSpec, QueueSpec, SecretKeyRef, SecretRef, TransactionRelaySpec};

use super::sqs::{ACCESS_KEY, REGION, SECRET_KEY};
use super::{TestDb, TestQueue};

pub const INGEST_TOKEN: &str = "test-ingest-token";
pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const CLIENT_TOKEN: &str = "client-secret-token-42";

/// A `/new` body; `n` makes reference, external reference and key unique.
pub fn body(n: u64, wallet: &str) -> Value {
    json!({
        "wallet_address": wallet,
        "ledger_payload": {
            "meta_data": {"source": "DAPP", "instruction_type": "Transaction", "created_at": "2026-11-26T10:00:00Z",
                          "token": CLIENT_TOKEN, "idempotency_key": format!("idem-{n}"), "ip_address": "203.0.113.7"},
            "payload": {"external_reference": format!("ext-{n}"), "source": "ANCHOR_SOLANA", "reference": format!("MYK-{n:06}"),
                        "first_name": "Ada", "last_name": "Lovelace", "transaction_type": "DEPOSIT", "status": "PENDING_PAYER",
                        "incoming_currency": "EUR", "outgoing_currency": "EURC", "value": "100.00", "fee": "1.50",
                        "payer": "user-1", "payee": null}
        }
    })
}

/// A validated transaction from [`body`].
pub fn new_tx(n: u64, wallet: &str) -> txrelay::transaction::NewTransaction {
    txrelay::transaction::parse_request_body(&serde_json::to_vec(&body(n, wallet)).unwrap()).unwrap()
}

/// Stores `tx` directly (no inline send, due at once) and returns the row.
pub async fn insert_created(
    db: &TestDb,
    tx: &txrelay::transaction::NewTransaction,
) -> txrelay::transaction::Transaction {
    match db.store.insert(tx, txrelay::store::Intake::Queued).await.unwrap() {
        txrelay::store::InsertOutcome::Created { transaction, .. } => transaction,
        other => panic!("expected a new row, got {other:?}"),
    }
}

/// SQL for a row written by hand (psql, a bulk fix, an older release), past
/// the store: the required columns for `reference` and `wallet`, plus
/// `extra` columns given as SQL expressions.
pub fn raw_insert(reference: &str, wallet: &str, extra: &[(&str, &str)]) -> String {
    let mut columns = String::from(
        "reference, external_reference, idempotency_key, transaction_type, status, source, instruction_type, \
         incoming_currency, outgoing_currency, value, fee, wallet_address, payload",
    );
    let mut values = format!(
        "'{reference}', 'e-{reference}', 'k-{reference}', 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 1, 0, '{wallet}', '{{}}'"
    );
    for (column, value) in extra {
        columns.push_str(", ");
        columns.push_str(column);
        values.push_str(", ");
        values.push_str(value);
    }
    format!("INSERT INTO transactions ({columns}) VALUES ({values})")
}

/// Inserts `rows` unsent transactions in one statement, as another writer
/// would (the triggers list them): references `{prefix}-1`…, spread over
/// `wallets` wallets.
pub fn bulk_insert(prefix: &str, rows: u32, wallets: u32) -> String {
    format!(
        "INSERT INTO transactions (reference, external_reference, idempotency_key, transaction_type, status, source, \
         instruction_type, incoming_currency, outgoing_currency, value, fee, wallet_address, payload) \
         SELECT '{prefix}-' || n, 'e-{prefix}-' || n, 'k-{prefix}-' || n, 'DEPOSIT', 'P', 'S', 'T', 'EUR', 'EUR', 1, 0, \
         'w' || n % {wallets}, '{{}}' FROM generate_series(1, {rows}) AS n"
    )
}

/// Stores a new unsent transaction of `wallet`; returns its id.
pub async fn insert_unsent(db: &TestDb, wallet: &str) -> i64 {
    insert_created(db, &new_tx(unique(), wallet)).await.id
}

/// A unique number per call, so tests never share references.
pub fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 1_000 + u64::from(fastrand::u16(..1000))
}

pub fn spec(schema: &str) -> TransactionRelaySpec {
    TransactionRelaySpec::with_defaults(
        DatabaseSpec::new(SecretKeyRef { name: "db".into(), key: None }, schema),
        QueueSpec { secret_ref: SecretRef { name: "sqs".into() }, role_arn: None, external_id: None },
    )
}

pub fn secs(n: u64) -> HumanDuration {
    HumanDuration::from_secs(n)
}

/// Builds relays against a test schema and queue.
pub struct RelayBuilder {
    pub database_url: String,
    pub queue_url: String,
    pub endpoint: String,
    pub sts_endpoint: Option<String>,
    pub spec: TransactionRelaySpec,
    pub ledger_token: Option<String>,
    pub seed: Option<u64>,
    pub id: RelayId,
}

impl RelayBuilder {
    pub fn new(db: &TestDb, queue: &TestQueue) -> Self {
        Self {
            database_url: db.url.clone(),
            queue_url: queue.url.clone(),
            endpoint: queue.endpoint.clone(),
            sts_endpoint: None,
            spec: spec(&db.schema),
            ledger_token: None,
            seed: None,
            id: RelayId::new("test", db.schema.clone()),
        }
    }

    pub fn endpoint(mut self, endpoint: &str) -> Self {
        self.endpoint = endpoint.to_owned();
        self
    }

    pub fn sts_endpoint(mut self, endpoint: &str) -> Self {
        self.sts_endpoint = Some(endpoint.to_owned());
        self
    }

    pub fn database_url(mut self, url: String) -> Self {
        self.database_url = url;
        self
    }

    pub fn spec(mut self, change: impl FnOnce(&mut TransactionRelaySpec)) -> Self {
        change(&mut self.spec);
        self
    }

    pub fn ledger_token(mut self, token: &str) -> Self {
        self.ledger_token = Some(token.to_owned());
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    pub fn settings(&self) -> RelaySettings {
        RelaySettings {
            id: self.id.clone(),
            spec: self.spec.clone(),
            database_url: Secret::new(&self.database_url),
            queue: QueueSecrets {
                queue_url: self.queue_url.clone(),
                region: REGION.into(),
                endpoint_url: Some(self.endpoint.clone()),
                // Its own address, as a real SQS endpoint is not STS's.
                sts_endpoint_url: self.sts_endpoint.clone(),
                access_key_id: Some(ACCESS_KEY.into()),
                secret_access_key: Some(Secret::new(SECRET_KEY)),
                ledger_token: self.ledger_token.as_deref().map(Secret::new),
            },
            ingest_tokens: TokenSet::parse(INGEST_TOKEN),
            admin_tokens: TokenSet::parse(ADMIN_TOKEN),
        }
    }

    pub async fn handle(&self, metrics: &Metrics) -> RelayHandle {
        let mut handle = self.settings().build(metrics, 8).await.expect("relay builds");
        if let Some(seed) = self.seed {
            let relay = Arc::try_unwrap(handle.relay).expect("fresh relay");
            handle.relay = Arc::new(relay.with_seed(seed));
        }
        handle
    }

    pub async fn build(&self) -> Arc<Relay> {
        self.handle(&Metrics::new()).await.relay
    }
}

/// The HTTP API of one relay, driven without a socket.
pub struct TestApp {
    pub router: Router,
    pub relay: Arc<Relay>,
    pub metrics: Metrics,
}

impl TestApp {
    /// The value of one series of this app's metrics (0 when absent);
    /// `RELAY` in `series` stands for the relay's id.
    pub fn metric(&self, series: &str) -> f64 {
        let series = series.replace("RELAY", &self.relay.id().to_string());
        self.metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(series.as_str()).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    pub async fn new(builder: &RelayBuilder) -> Self {
        Self::with_options(builder, HttpOptions::default()).await
    }

    pub async fn with_options(builder: &RelayBuilder, options: HttpOptions) -> Self {
        let metrics = Metrics::new();
        let handle = builder.handle(&metrics).await;
        let relay = handle.relay.clone();
        let relays = Arc::new(Registry::new(None));
        relays.insert(handle);
        let router = http::api_router(AppState::new(relays, metrics.clone(), options));
        Self { router, relay, metrics }
    }

    pub async fn post_new(&self, body: &Value) -> (StatusCode, Value) {
        self.request("POST", "/new", Some(INGEST_TOKEN), "application/json", serde_json::to_vec(body).unwrap()).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request("GET", path, Some(ADMIN_TOKEN), "application/json", Vec::new()).await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let (status, _, value) = self.response(method, path, token, content_type, body).await;
        (status, value)
    }

    /// Like [`TestApp::request`], with the response headers.
    pub async fn response(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut request = Request::builder().method(method).uri(path).header("content-type", content_type);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = tower::ServiceExt::oneshot(self.router.clone(), request.body(Body::from(body)).unwrap())
            .await
            .expect("router answers");
        let (status, headers) = (response.status(), response.headers().clone());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, headers, value)
    }

    /// `POST /new` with the ingest token, headers included.
    pub async fn post_new_response(&self, body: &Value) -> (StatusCode, axum::http::HeaderMap, Value) {
        self.response("POST", "/new", Some(INGEST_TOKEN), "application/json", serde_json::to_vec(body).unwrap()).await
    }
}

/// A relay loop (and its LISTEN task) running in this process; stopped on drop.
pub struct RunningLoop {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningLoop {
    pub fn start(relay: &Arc<Relay>) -> Self {
        let (stop, stopped) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(run_loop(relay.drain().clone(), stopped.clone())),
            tokio::spawn(listen_for_due_rows(relay.outbox().clone(), stopped)),
        ];
        Self { stop, tasks }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for RunningLoop {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Runs `command` to its end: exit code, stdout, stderr.
pub async fn run_to_end(command: &mut Command) -> (i32, String, String) {
    let output = command.output().await.expect("the program runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_txrelay"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `txrelay` as a child process against a test schema and queue.
pub fn command(db_url: &str, schema: &str, queue_url: &str, endpoint: &str) -> Command {
    program(binary(), db_url, schema, queue_url, endpoint)
}

/// Any program with the environment [`command`] gives txrelay.
pub fn program(
    program: impl AsRef<std::ffi::OsStr>,
    db_url: &str,
    schema: &str,
    queue_url: &str,
    endpoint: &str,
) -> Command {
    let mut command = Command::new(program);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("TXRELAY_SCHEMA", schema)
        .env("SQS_QUEUE_URL", queue_url)
        .env("AWS_REGION", REGION)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("RELAY_API_TOKENS", INGEST_TOKEN)
        .env("RELAY_ADMIN_TOKENS", ADMIN_TOKEN)
        .env("RUST_LOG", "info")
        .kill_on_drop(true);
    command
}

/// A running `txrelay run`.
pub struct RelayProcess {
    pub child: Child,
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

impl RelayProcess {
    pub async fn start(command: Command, config: Option<&std::path::Path>) -> Self {
        Self::start_with(command, config, &[]).await
    }

    pub async fn start_with(mut command: Command, config: Option<&std::path::Path>, extra: &[&str]) -> Self {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::env::temp_dir().join(format!("txrelay-test-{}-{}.log", std::process::id(), fastrand::u64(..)));
        let file = std::fs::File::create(&log).unwrap();
        command.arg("run").arg("--listen").arg(api.to_string()).arg("--metrics-listen").arg(metrics.to_string());
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        command.args(extra);
        let child = command.stdout(Stdio::null()).stderr(file).spawn().expect("txrelay starts");
        let process = Self { child, api, metrics, log };
        let address = process.metrics;
        super::wait_until(Duration::from_secs(20), "txrelay answers /healthz", || async move {
            tokio::net::TcpStream::connect(address).await.is_ok()
        })
        .await;
        process
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One HTTP/1.1 request to the API or the metrics listener.
    pub async fn http(
        &self,
        address: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> (StatusCode, String) {
        self.http_with(address, method, path, token, &[], body).await
    }

    pub async fn http_with(
        &self,
        address: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> (StatusCode, String) {
        http_request(address, method, path, token, headers, body).await
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid).status().unwrap();
        assert!(status.success());
    }
}

/// One HTTP/1.1 request to a server the test started, bounded by 15 s.
pub async fn http_request(
    address: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &Value,
) -> (StatusCode, String) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"))
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let bytes = if body.is_null() { Vec::new() } else { serde_json::to_vec(body).unwrap() };
    let request = request.body(http_body_util::Full::new(bytes::Bytes::from(bytes))).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(15), client.request(request))
        .await
        .unwrap_or_else(|_| panic!("{method} {path} did not answer within 15 s"))
        .unwrap();
    let status = response.status();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    (StatusCode::from_u16(status.as_u16()).unwrap(), String::from_utf8_lossy(&text).into_owned())
}

/// Writes a TransactionRelay manifest for a process test.
pub fn manifest_file(spec: &TransactionRelaySpec) -> tempfile_path::TempPath {
    let manifest = json!({
        "apiVersion": "relay.mykobo.io/v1alpha1",
        "kind": "TransactionRelay",
        "metadata": {"name": "test", "namespace": "test"},
        "spec": spec,
    });
    tempfile_path::TempPath::with_contents(&serde_json::to_string_pretty(&manifest).unwrap())
}

pub mod tempfile_path {
    use std::path::{Path, PathBuf};

    /// A file deleted on drop.
    pub struct TempPath(PathBuf);

    impl TempPath {
        pub fn with_contents(text: &str) -> Self {
            let path = std::env::temp_dir().join(format!("txrelay-{}-{}.yaml", std::process::id(), fastrand::u64(..)));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }
    }

    impl std::ops::Deref for TempPath {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Host and port of the test database, for the TCP proxy.
pub fn database_address(url: &str) -> SocketAddr {
    let rest = url.split_once('@').map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap();
    host_port.parse().expect("the test database URL names host:port as an IP address")
}
