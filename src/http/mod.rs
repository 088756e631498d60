//! The HTTP API (axum): ingest on `/new`, reads for operators, and the probes
//! and metrics on a separate listener.

mod client_ip;
pub mod error;
mod ingest;
pub mod openapi;
mod probes;
mod read;
mod resend;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::runtime::registry::Registry;
use crate::spec::RelayId;
pub use error::ApiError;

#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Requests served at once; more are shed with 503 instead of queued.
    pub max_in_flight: usize,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Serve without bearer tokens (local development only).
    pub insecure_no_auth: bool,
    /// `/readyz` fails while any served relay's database is unreachable.
    /// True standalone; the operator serves many relays, and one relay's
    /// database must not take `/new` away from the others.
    pub ready_needs_databases: bool,
    /// A connection that has not sent a whole request head this long after
    /// it began waiting for one is closed. hyper runs this timer from the
    /// moment a connection waits for a request, so it is also how long a
    /// kept-alive connection may sit idle.
    pub header_read_timeout: Duration,
    /// Connections served at once per listener; more wait in the kernel's
    /// accept queue until one closes.
    pub max_connections: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(10),
            max_in_flight: 1024,
            trusted_proxies: Vec::new(),
            insecure_no_auth: false,
            ready_needs_databases: true,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub relays: Arc<Registry>,
    pub metrics: Metrics,
    pub options: Arc<HttpOptions>,
    in_flight: Arc<Semaphore>,
}

impl AppState {
    pub fn new(relays: Arc<Registry>, metrics: Metrics, options: HttpOptions) -> Self {
        let in_flight = Arc::new(Semaphore::new(options.max_in_flight.max(1)));
        Self { relays, metrics, options: Arc::new(options), in_flight }
    }
}

/// The paths of the public API, declared once: the router uses them, and a
/// test checks them against `openapi.json`.
pub mod paths {
    pub const NEW: &str = "/new";
    pub const TRANSACTIONS: &str = "/transactions";
    pub const TRANSACTION: &str = "/transactions/{reference}";
    pub const TRANSACTION_HEALTH: &str = "/health/transactions";
    pub const RETRY: &str = "/transactions/{id}/retry";
    pub const RETRY_ALL: &str = "/retry-all";
    /// Every relay path also exists under this prefix.
    pub const RELAY_PREFIX: &str = "/relays/{namespace}/{name}";
    pub const HEALTHZ: &str = "/healthz";
    pub const READYZ: &str = "/readyz";
    pub const OPENAPI: &str = "/openapi.json";
    pub const METRICS: &str = "/metrics";

    /// (method, path) of the routes that exist per relay.
    pub const RELAY_ROUTES: &[(&str, &str)] = &[
        ("POST", NEW),
        ("GET", TRANSACTIONS),
        ("GET", TRANSACTION),
        ("GET", TRANSACTION_HEALTH),
        ("POST", RETRY),
        ("POST", RETRY_ALL),
    ];
    /// (method, path) of the routes of the service itself.
    pub const SERVICE_ROUTES: &[(&str, &str)] = &[("GET", HEALTHZ), ("GET", READYZ), ("GET", OPENAPI)];
}

/// The public API: what the Ingress exposes (`/new` paths) and the reads.
pub fn api_router(state: AppState) -> Router {
    let relay_routes = Router::new()
        .route(paths::NEW, post(ingest::new_transaction))
        .route(paths::TRANSACTIONS, get(read::list))
        .route(paths::TRANSACTION, get(read::get_one))
        .route(paths::TRANSACTION_HEALTH, get(read::transaction_health))
        .route(paths::RETRY, post(resend::retry_one))
        .route(paths::RETRY_ALL, post(resend::retry_all));
    Router::new()
        .merge(relay_routes.clone())
        .nest(paths::RELAY_PREFIX, relay_routes)
        .route(paths::HEALTHZ, get(probes::healthz))
        .route(paths::READYZ, get(probes::readyz))
        .route(paths::OPENAPI, get(openapi::serve))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Probes and metrics, on their own port that the Ingress never exposes.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route(paths::METRICS, get(probes::metrics))
        .route(paths::HEALTHZ, get(probes::healthz))
        .route(paths::READYZ, get(probes::readyz))
        .fallback(not_found)
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets open
/// connections finish their requests (the caller bounds that wait).
///
/// Not `axum::serve`: it runs hyper without a timer, so hyper's header-read
/// timeout never fires, and it accepts without limit. A client that opens a
/// connection and sends half a request head would hold a file descriptor for
/// ever; thousands of them would take the process down.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: HttpOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::Service;

    tracing::info!(
        listen = %listener.local_addr()?,
        header_read_timeout_ms = options.header_read_timeout.as_millis() as u64,
        max_connections = options.max_connections,
        request_timeout_ms = options.request_timeout.as_millis() as u64,
        max_in_flight = options.max_in_flight,
        max_body_bytes = options.max_body_bytes,
        "serving HTTP"
    );
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut make_service = router.into_make_service_with_connect_info::<SocketAddr>();
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(std::io::Error::other)?,
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: wait a little instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers are small and written as soon as they are ready; with
        // Nagle's algorithm on, a segment written while an earlier one is
        // unacknowledged waits for the client's delayed ACK (up to 40 ms).
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %peer, "could not set TCP_NODELAY");
        }
        // Cannot fail: the make-service only attaches the peer address.
        let Ok(service) = make_service.call(peer).await;
        let mut connection = hyper::server::conn::http1::Builder::new();
        connection.timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout).keep_alive(true);
        let mut closed = closed.clone();
        connections.spawn(async move {
            let _slot = slot;
            let serving = connection
                .serve_connection(TokioIo::new(stream), hyper_util::service::TowerToHyperService::new(service));
            tokio::pin!(serving);
            tokio::select! {
                result = serving.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %peer, "connection ended");
                    }
                }
                () = async { let _ = closed.wait_for(|closed| *closed).await; } => {
                    serving.as_mut().graceful_shutdown();
                    let _ = serving.await;
                }
            }
        });
        // Reap finished connections as we go, so the set stays small.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; see GET /openapi.json".into())
}

/// Sheds load beyond `max_in_flight`, bounds each request's time, and
/// records its duration by route and status class.
async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = match state.in_flight.clone().try_acquire_owned() {
        Err(_) => ApiError::Overloaded.into_response(),
        Ok(_permit) => match tokio::time::timeout(state.options.request_timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => ApiError::Timeout.into_response(),
        },
    };
    state.metrics.observe_http(&route, response.status().as_u16(), started.elapsed().as_secs_f64());
    response
}

/// Which relay a request is for: named in the path, or the default one.
pub struct Target(pub Option<RelayId>);

impl<S: Send + Sync> FromRequestParts<S> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Ok(params) = RawPathParams::from_request_parts(parts, state).await else {
            return Ok(Self(None));
        };
        let find = |key: &str| params.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_owned());
        Ok(Self(match (find("namespace"), find("name")) {
            (Some(namespace), Some(name)) => Some(RelayId::new(namespace, name)),
            _ => None,
        }))
    }
}
