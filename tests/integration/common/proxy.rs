//! Proxies that stand between a relay and its real servers, so a test can
//! take the network away and give it back without touching the servers
//! other tests share.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqsMode {
    Forward,
    /// Every connection is cut and new ones are closed at once.
    Down,
    /// SendMessage and SendMessageBatch answer HTTP 500; other calls pass.
    FailSends,
    /// Every call waits this long before it is forwarded.
    Delay(Duration),
}

struct SqsState {
    mode: Mutex<SqsMode>,
    cut: watch::Sender<u64>,
    upstream: String,
    client: Client<HttpConnector, Full<Bytes>>,
    send_calls: std::sync::atomic::AtomicU64,
}

/// An HTTP proxy in front of moto.
pub struct SqsProxy {
    pub endpoint: String,
    state: Arc<SqsState>,
}

impl SqsProxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let state = Arc::new(SqsState {
            mode: Mutex::new(SqsMode::Forward),
            cut: watch::Sender::new(0),
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            send_calls: 0.into(),
        });
        tokio::spawn(accept_http(listener, state.clone()));
        Self { endpoint: format!("http://{address}"), state }
    }

    pub fn set(&self, mode: SqsMode) {
        *self.state.mode.lock().unwrap() = mode;
        if mode == SqsMode::Down {
            self.state.cut.send_modify(|g| *g += 1);
        }
    }

    /// SendMessage and SendMessageBatch calls that reached the proxy.
    pub fn send_calls(&self) -> u64 {
        self.state.send_calls.load(Ordering::Relaxed)
    }
}

async fn accept_http(listener: TcpListener, state: Arc<SqsState>) {
    while let Ok((stream, _)) = listener.accept().await {
        if *state.mode.lock().unwrap() == SqsMode::Down {
            drop(stream);
            continue;
        }
        let state = state.clone();
        tokio::spawn(async move {
            let mut cut = state.cut.subscribe();
            let service_state = state.clone();
            let service = hyper::service::service_fn(move |request| handle(service_state.clone(), request));
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = cut.changed() => {}
            }
        });
    }
}

async fn handle(state: Arc<SqsState>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let target = request.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let is_send = target.ends_with(".SendMessage") || target.ends_with(".SendMessageBatch");
    if is_send {
        state.send_calls.fetch_add(1, Ordering::Relaxed);
    }
    let mode = *state.mode.lock().unwrap();
    match mode {
        SqsMode::Down => return Ok(error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")),
        SqsMode::FailSends if is_send => return Ok(error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError")),
        SqsMode::Delay(delay) => tokio::time::sleep(delay).await,
        _ => {}
    }
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let uri = format!("{}{}", state.upstream, parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut forwarded = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        forwarded = forwarded.header(name, value);
    }
    let forwarded = forwarded.body(Full::new(body)).expect("request");
    match state.client.request(forwarded).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            Ok(Response::from_parts(parts, Full::new(body)))
        }
        Err(_) => Ok(error(StatusCode::BAD_GATEWAY, "BadGateway")),
    }
}

fn error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    let body = format!(r#"{{"__type":"{code}","message":"injected by the test proxy"}}"#);
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amzn-query-error", format!("{code};Receiver"))
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

/// A TCP proxy in front of PostgreSQL: `set_up(false)` cuts every
/// connection and refuses new ones, as a stopped server would.
pub struct TcpProxy {
    pub address: SocketAddr,
    up: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let up = Arc::new(AtomicBool::new(true));
        let stalled = Arc::new(AtomicBool::new(false));
        let cut = watch::Sender::new(0u64);
        let (accept_up, accept_stalled, accept_cut) = (up.clone(), stalled.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !accept_up.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut = accept_cut.subscribe();
                if accept_stalled.load(Ordering::SeqCst) {
                    // Accepted, never answered: a server that hangs.
                    tokio::spawn(async move {
                        let _held = client;
                        let _ = cut.changed().await;
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { address, up, stalled, cut }
    }

    /// New connections hang without an answer (existing ones are cut).
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|g| *g += 1);
        }
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme_user, rest) = url.split_once('@').expect("URL with user@host");
        let path_start = rest.find('/').unwrap_or(rest.len());
        format!("{scheme_user}@{}{}", self.address, &rest[path_start..])
    }
}
