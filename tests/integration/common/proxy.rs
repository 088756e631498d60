//! Proxies that stand between a relay and its real servers, so a test can
//! take the network away and give it back without touching the servers
//! other tests share.

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
    /// Every connection is cut and new ones are refused (the port stops
    /// listening): a queue endpoint that is down, and known to have taken
    /// nothing.
    Down,
    /// Every call waits this long before it is forwarded.
    Delay(Duration),
}

/// Faults that real SQS shows and moto does not, set beside the mode.
#[derive(Debug, Clone, Default)]
pub struct SqsFaults {
    /// Only `sqs:SendMessage` is allowed (it covers SendMessageBatch), as
    /// under the usual producer IAM policy: every other action answers
    /// AccessDenied.
    pub send_only_policy: bool,
    /// Sends answer this (HTTP status, error code) without reaching moto.
    pub send_error: Option<(u16, &'static str)>,
    /// Batch entries whose body contains the marker are refused with this
    /// `SenderFault`; the rest of the batch goes through.
    pub refuse_entries: Option<(String, bool)>,
    /// SQS's rule for FIFO ids: MessageGroupId and MessageDeduplicationId
    /// are 1-128 ASCII letters, digits and punctuation. A call that breaks
    /// it is refused whole with InvalidParameterValue.
    pub strict_fifo_ids: bool,
    /// SendMessage and SendMessageBatch wait this long before going on.
    pub send_delay: Option<Duration>,
    /// Sends whose body contains the marker reach moto, which takes them;
    /// then their reply is lost as given. Real SQS does this; moto never.
    pub lose_replies: Option<(String, LostReply)>,
}

/// What becomes of the reply to a call that was carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReply {
    /// The connection is closed instead of answering.
    Dropped,
    /// The reply comes this much later (after the caller gave up).
    Late(Duration),
}

struct SqsState {
    mode: Mutex<SqsMode>,
    modes: watch::Sender<SqsMode>,
    faults: Mutex<SqsFaults>,
    cut: watch::Sender<u64>,
    upstream: String,
    client: Client<HttpConnector, Full<Bytes>>,
    send_calls: std::sync::atomic::AtomicU64,
    denied: std::sync::atomic::AtomicU64,
    /// The access key id that signed each call, by X-Amz-Target (or the
    /// form's Action for query-protocol calls such as STS).
    signed_by: Mutex<Vec<(String, String)>>,
    /// The bodies of STS calls (form-encoded).
    sts_calls: Mutex<Vec<String>>,
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
            modes: watch::Sender::new(SqsMode::Forward),
            faults: Mutex::new(SqsFaults::default()),
            cut: watch::Sender::new(0),
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            send_calls: 0.into(),
            denied: 0.into(),
            signed_by: Mutex::default(),
            sts_calls: Mutex::default(),
        });
        tokio::spawn(accept_http(listener, address, state.clone()));
        Self { endpoint: format!("http://{address}"), state }
    }

    pub fn set(&self, mode: SqsMode) {
        *self.state.mode.lock().unwrap() = mode;
        if mode == SqsMode::Down {
            self.state.cut.send_modify(|g| *g += 1);
        }
        self.state.modes.send_replace(mode);
    }

    pub fn faults(&self, change: impl FnOnce(&mut SqsFaults)) {
        change(&mut self.state.faults.lock().unwrap());
    }

    /// SendMessage and SendMessageBatch calls that reached the proxy.
    pub fn send_calls(&self) -> u64 {
        self.state.send_calls.load(Ordering::Relaxed)
    }

    /// Calls refused by the send-only policy.
    /// (action, access key id) of every call, in order.
    pub fn signed_by(&self) -> Vec<(String, String)> {
        self.state.signed_by.lock().unwrap().clone()
    }

    /// The form bodies of the STS AssumeRole calls.
    pub fn sts_calls(&self) -> Vec<String> {
        self.state.sts_calls.lock().unwrap().clone()
    }

    pub fn denied(&self) -> u64 {
        self.state.denied.load(Ordering::Relaxed)
    }
}

async fn accept_http(listener: TcpListener, address: SocketAddr, state: Arc<SqsState>) {
    let mut listener = Some(listener);
    let mut modes = state.modes.subscribe();
    loop {
        // Down: the port is closed, so connections are refused, as by a
        // stopped endpoint, and no request can have been written.
        let Some(bound) = listener.as_ref() else {
            if modes.wait_for(|mode| *mode != SqsMode::Down).await.is_err() {
                return;
            }
            for _ in 0..100 {
                if let Ok(again) = TcpListener::bind(address).await {
                    listener = Some(again);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(listener.is_some(), "the SQS proxy could not listen on {address} again");
            continue;
        };
        let stream = tokio::select! {
            accepted = bound.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => return,
            },
            changed = modes.changed() => {
                if changed.is_err() {
                    return;
                }
                if *modes.borrow_and_update() == SqsMode::Down {
                    listener = None;
                }
                continue;
            }
        };
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

/// An error from the service makes hyper close the connection unanswered.
type Handled = Result<Response<Full<Bytes>>, Box<dyn std::error::Error + Send + Sync>>;

async fn handle(state: Arc<SqsState>, request: Request<Incoming>) -> Handled {
    let target = request.headers().get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let is_batch = target.ends_with(".SendMessageBatch");
    let is_send = is_batch || target.ends_with(".SendMessage");
    if is_send {
        state.send_calls.fetch_add(1, Ordering::Relaxed);
    }
    let mode = *state.mode.lock().unwrap();
    let faults = state.faults.lock().unwrap().clone();
    match mode {
        // A request already on a connection when the endpoint went down: a
        // refusal known to come before any processing (a 5xx would be an
        // unknown outcome), as a load balancer shedding load answers.
        SqsMode::Down => return Ok(error(StatusCode::BAD_REQUEST, "RequestThrottled")),
        SqsMode::Delay(delay) => tokio::time::sleep(delay).await,
        _ => {}
    }
    if faults.send_only_policy && !is_send {
        state.denied.fetch_add(1, Ordering::Relaxed);
        return Ok(error(StatusCode::FORBIDDEN, "AccessDenied"));
    }
    if is_send {
        if let Some(delay) = faults.send_delay {
            tokio::time::sleep(delay).await;
        }
        if let Some((status, code)) = faults.send_error {
            return Ok(error(StatusCode::from_u16(status).expect("status"), code));
        }
    }
    let (parts, body) = request.into_parts();
    let mut body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let key_id = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("Credential=").nth(1))
        .and_then(|v| v.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let form = String::from_utf8_lossy(&body).into_owned();
    let action = if target.is_empty() {
        form.split('&').find_map(|pair| pair.strip_prefix("Action=")).unwrap_or_default().to_owned()
    } else {
        target.clone()
    };
    if action == "AssumeRole" {
        state.sts_calls.lock().unwrap().push(form);
    }
    state.signed_by.lock().unwrap().push((action, key_id));
    let lost = faults
        .lose_replies
        .as_ref()
        .filter(|(marker, _)| is_send && body.windows(marker.len()).any(|w| w == marker.as_bytes()))
        .map(|(_, lost)| *lost);
    if is_send && faults.strict_fifo_ids && !fifo_ids_valid(&body) {
        return Ok(error(StatusCode::BAD_REQUEST, "InvalidParameterValue"));
    }
    let mut refused = Vec::new();
    if let (true, Some((marker, sender_fault))) = (is_batch, &faults.refuse_entries) {
        let mut request: serde_json::Value = serde_json::from_slice(&body).expect("batch request");
        let entries = request["Entries"].as_array_mut().expect("entries");
        entries.retain(|entry| {
            let refuse = entry["MessageBody"].as_str().is_some_and(|b| b.contains(marker.as_str()));
            if refuse {
                refused.push(serde_json::json!({"Id": entry["Id"], "SenderFault": sender_fault,
                    "Code": "InternalError", "Message": "entry refused by the test proxy"}));
            }
            !refuse
        });
        if entries.is_empty() {
            let answer = serde_json::json!({"Successful": [], "Failed": refused});
            return Ok(json_response(StatusCode::OK, answer.to_string()));
        }
        body = Bytes::from(request.to_string());
    }
    let uri = format!("{}{}", state.upstream, parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut forwarded = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if name != hyper::header::CONTENT_LENGTH {
            forwarded = forwarded.header(name, value);
        }
    }
    let forwarded = forwarded.body(Full::new(body)).expect("request");
    match state.client.request(forwarded).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            let mut body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            if !refused.is_empty() && parts.status.is_success() {
                let mut answer: serde_json::Value = serde_json::from_slice(&body).expect("batch answer");
                let failed = answer.as_object_mut().expect("object").entry("Failed").or_insert(serde_json::json!([]));
                failed.as_array_mut().expect("failed").extend(refused);
                body = Bytes::from(answer.to_string());
                parts.headers.remove(hyper::header::CONTENT_LENGTH);
            }
            match lost {
                Some(LostReply::Dropped) => return Err("reply dropped by the test proxy".into()),
                Some(LostReply::Late(delay)) => tokio::time::sleep(delay).await,
                None => {}
            }
            Ok(Response::from_parts(parts, Full::new(body)))
        }
        Err(_) => Ok(error(StatusCode::BAD_GATEWAY, "BadGateway")),
    }
}

/// SQS's rule for MessageGroupId and MessageDeduplicationId, on a
/// SendMessage or SendMessageBatch body.
fn fifo_ids_valid(body: &[u8]) -> bool {
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
    let valid = |value: &serde_json::Value| match value {
        serde_json::Value::Null => true,
        serde_json::Value::String(id) => {
            (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b.is_ascii_punctuation())
        }
        _ => false,
    };
    let entries = match request.get("Entries").and_then(|e| e.as_array()) {
        Some(entries) => entries.clone(),
        None => vec![request],
    };
    entries.iter().all(|e| valid(&e["MessageGroupId"]) && valid(&e["MessageDeduplicationId"]))
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.0")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

fn error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    let body = format!(r#"{{"__type":"{code}","message":"injected by the test proxy"}}"#);
    let mut response = json_response(status, body);
    let fault = if status.is_client_error() { "Sender" } else { "Receiver" };
    response.headers_mut().insert("x-amzn-query-error", format!("{code};{fault}").parse().expect("header"));
    response
}

/// A TCP proxy in front of PostgreSQL: `set_up(false)` cuts every
/// connection and refuses new ones, as a stopped server would;
/// `set_stalled(true)` accepts new connections and never answers them;
/// `set_black_hole(true)` freezes every connection, open or new, without
/// closing any: bytes go nowhere and nothing comes back, as on a network
/// that silently drops packets. Only client-side timeouts notice that.
pub struct TcpProxy {
    pub address: SocketAddr,
    /// The next client message containing these bytes reaches the server,
    /// whose whole answer is then swallowed and the client's connection
    /// closed: a statement carried out (a commit made) whose reply was lost.
    lose_reply: Arc<Mutex<Option<Vec<u8>>>>,
    /// The lost reply never ends: the connection stays open and silent.
    hang: Arc<AtomicBool>,
    up: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    frozen: watch::Sender<bool>,
    cut: watch::Sender<u64>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let up = Arc::new(AtomicBool::new(true));
        let stalled = Arc::new(AtomicBool::new(false));
        let cut = watch::Sender::new(0u64);
        let frozen = watch::Sender::new(false);
        let lose_reply: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let hang = Arc::new(AtomicBool::new(false));
        let accept_hang = hang.clone();
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (accept_up, accept_stalled, accept_cut, accept_frozen, accept_lose, accept_count) =
            (up.clone(), stalled.clone(), cut.clone(), frozen.clone(), lose_reply.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                accept_count.fetch_add(1, Ordering::SeqCst);
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
                let frozen = accept_frozen.subscribe();
                let lose = accept_lose.clone();
                let hang = accept_hang.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let blinded = Arc::new(AtomicBool::new(false));
                    let up = Tap::Request { lose, seen: Mutex::new(false), blinded: blinded.clone() };
                    tokio::select! {
                        _ = pump(client_read, server_write, frozen.clone(), up) => {}
                        _ = pump(server_read, client_write, frozen, Tap::Reply { blinded, hang }) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { address, lose_reply, hang, up, stalled, frozen, cut, accepted }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Arms a one-time lost reply (see the field).
    pub fn lose_reply_after(&self, marker: &[u8]) {
        self.hang.store(false, Ordering::SeqCst);
        *self.lose_reply.lock().unwrap() = Some(marker.to_vec());
    }

    /// Whether the armed marker went through (its reply is being lost).
    pub fn marker_seen(&self) -> bool {
        self.lose_reply.lock().unwrap().is_none()
    }

    /// Like [`Self::lose_reply_after`], but the connection then stays open
    /// and silent: a statement whose answer never comes, bounded only by
    /// the client.
    pub fn hang_reply_after(&self, marker: &[u8]) {
        self.hang.store(true, Ordering::SeqCst);
        *self.lose_reply.lock().unwrap() = Some(marker.to_vec());
    }

    /// New connections hang without an answer (existing ones are cut).
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
    }

    /// Every connection, open or new, stops carrying bytes but stays open;
    /// `false` lets them flow again.
    pub fn set_black_hole(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
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

/// What a pump watches for, besides copying.
enum Tap {
    /// Client to server: the message that arms a lost reply.
    Request { lose: Arc<Mutex<Option<Vec<u8>>>>, seen: Mutex<bool>, blinded: Arc<AtomicBool> },
    /// Server to client: swallowed once blinded, up to the server's
    /// ReadyForQuery (the statement and its commit are done), then the
    /// connection ends unanswered.
    Reply { blinded: Arc<AtomicBool>, hang: Arc<AtomicBool> },
}

/// Whether a chunk of frontend messages (type byte, then a big-endian
/// length that counts itself) holds an Execute.
fn has_execute(chunk: &[u8]) -> bool {
    let mut at = 0;
    while at + 5 <= chunk.len() {
        if chunk[at] == b'E' {
            return true;
        }
        let length = u32::from_be_bytes([chunk[at + 1], chunk[at + 2], chunk[at + 3], chunk[at + 4]]) as usize;
        at += 1 + length.max(4);
    }
    false
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Copies bytes one way, holding each chunk while the proxy is frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    tap: Tap,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// ReadyForQuery: 'Z', length 5, then the transaction status.
    const READY_FOR_QUERY: &[u8] = &[b'Z', 0, 0, 0, 5];
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else { return };
        if read == 0 {
            return;
        }
        if frozen.wait_for(|frozen| !*frozen).await.is_err() {
            return;
        }
        let chunk = &buffer[..read];
        match &tap {
            Tap::Request { lose, seen, blinded } => {
                let mut armed = lose.lock().unwrap();
                if armed.as_deref().is_some_and(|marker| contains(chunk, marker)) {
                    *armed = None;
                    *seen.lock().unwrap() = true;
                }
                // The statement is parsed (prepared) first and carried out
                // by a later Execute: the reply is lost from that one on.
                if *seen.lock().unwrap() && has_execute(chunk) {
                    *seen.lock().unwrap() = false;
                    blinded.store(true, Ordering::SeqCst);
                }
            }
            Tap::Reply { blinded, hang } if blinded.load(Ordering::SeqCst) => {
                if contains(chunk, READY_FOR_QUERY) && !hang.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            Tap::Reply { .. } => {}
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}
