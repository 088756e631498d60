//! A mocked Kubernetes API server (kube's tower-test pattern): a
//! `kube::Client` whose requests are answered by a task that keeps Secrets,
//! TransactionRelays and Leases in memory and records every request, so a
//! test can assert what the operator asked for and wrote. Lists and watches
//! of TransactionRelays and of Secret metadata are served too (a watch is a
//! stream of newline-separated events that stays open), so the operator's
//! controller can run against it as it would against a cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::convert::Infallible;
use txrelay::spec::TransactionRelay;

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

/// One change, as a watch reports it.
#[derive(Clone)]
struct Change {
    version: u64,
    collection: &'static str,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    changes: Vec<Change>,
    watchers: Vec<tokio::sync::mpsc::UnboundedSender<Change>>,
    secrets: HashMap<String, Value>,
    relays: HashMap<String, Value>,
    leases: HashMap<String, Value>,
    requests: Vec<Recorded>,
    unexpected: Vec<String>,
    version: u64,
    /// Every request answers 503, as an API server out of reach would.
    down: bool,
    /// (resource, namespace) pairs RBAC refuses.
    forbidden: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct FakeApiServer {
    pub client: Client,
    state: Arc<Mutex<State>>,
}

impl FakeApiServer {
    pub fn start() -> Self {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
        let state = Arc::new(Mutex::new(State::default()));
        let served = state.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                respond.send_response(serve(&served, &parts, &bytes));
            }
        });
        Self { client: Client::new(service, "default"), state }
    }

    pub fn put_secret(&self, namespace: &str, name: &str, data: &[(&str, &str)]) {
        let encoded: serde_json::Map<String, Value> =
            data.iter().map(|(k, v)| ((*k).to_owned(), json!(base64_encode(v.as_bytes())))).collect();
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": encoded});
        let mut state = self.state.lock().unwrap();
        let key = format!("{namespace}/{name}");
        let kind = if state.secrets.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        let secret = state.changed("secrets", namespace, kind, secret);
        state.secrets.insert(key, secret);
    }

    pub fn put_relay(&self, relay: &TransactionRelay) {
        let key = format!(
            "{}/{}",
            relay.metadata.namespace.clone().unwrap_or_default(),
            relay.metadata.name.clone().unwrap_or_default()
        );
        let namespace = relay.metadata.namespace.clone().unwrap_or_default();
        let mut state = self.state.lock().unwrap();
        let kind = if state.relays.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        let relay = state.changed("transactionrelays", &namespace, kind, serde_json::to_value(relay).unwrap());
        state.relays.insert(key, relay);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn unexpected(&self) -> Vec<String> {
        self.state.lock().unwrap().unexpected.clone()
    }

    /// Bodies of the status patches, oldest first.
    pub fn status_patches(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::PATCH && r.path.ends_with("/status"))
            .map(|r| r.body)
            .collect()
    }

    pub fn events(&self) -> Vec<Value> {
        self.requests().into_iter().filter(|r| r.path.contains("/events")).map(|r| r.body).collect()
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().leases.get(&format!("{namespace}/{name}")).cloned()
    }

    pub fn set_lease(&self, namespace: &str, name: &str, lease: Value) {
        let mut state = self.state.lock().unwrap();
        state.version += 1;
        let mut lease = lease;
        lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.leases.insert(format!("{namespace}/{name}"), lease);
    }

    /// Takes the API server out of reach (`true`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// RBAC refuses every request for `resource` (e.g. "secrets") in `namespace`.
    pub fn forbid(&self, resource: &str, namespace: &str) {
        self.state.lock().unwrap().forbidden.push((resource.to_owned(), namespace.to_owned()));
    }

    /// Serves the same state over HTTP, for processes (the CLI) that reach
    /// the API server through a kubeconfig; returns that kubeconfig's path
    /// (current context's namespace: `namespace`).
    pub async fn kubeconfig(&self, dir: &std::path::Path, namespace: &str) -> std::path::PathBuf {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            Ok::<_, Infallible>(serve(&state, &parts, &bytes))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        let path = dir.join("kubeconfig");
        let config = format!(
            r#"apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{address}
users:
- name: sre
  user: {{}}
contexts:
- name: fake
  context:
    cluster: fake
    user: sre
    namespace: {namespace}
- name: other
  context:
    cluster: fake
    user: sre
    namespace: elsewhere
current-context: fake
"#
        );
        std::fs::write(&path, config).unwrap();
        path
    }

    pub fn remove_secret(&self, namespace: &str, name: &str) {
        let mut state = self.state.lock().unwrap();
        if let Some(secret) = state.secrets.remove(&format!("{namespace}/{name}")) {
            state.changed("secrets", namespace, "DELETED", secret);
        }
    }
}

type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// One request, answered from `state` and recorded.
fn serve(state: &Mutex<State>, parts: &http::request::Parts, bytes: &[u8]) -> Response<ResponseBody> {
    let body: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let request = Recorded {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        content_type: parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned(),
        body,
    };
    let metadata_only = parts
        .headers
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("as=PartialObjectMetadata"));
    if let Some(refusal) = forbidden(state, &request) {
        return refusal;
    }
    if request.method == Method::GET
        && let Some(response) = list_or_watch(state, &request, metadata_only)
    {
        return response;
    }
    let (status, answer) = answer(state, request);
    json_response(status, &answer)
}

/// A 403 as RBAC gives it, when the test took away access to the request's
/// resource in its namespace.
fn forbidden(state: &Mutex<State>, request: &Recorded) -> Option<Response<ResponseBody>> {
    let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    let namespace = segments.iter().position(|s| *s == "namespaces").and_then(|i| segments.get(i + 1))?;
    let resource = segments.iter().position(|s| *s == "namespaces").and_then(|i| segments.get(i + 2))?;
    let mut state = state.lock().unwrap();
    if !state.forbidden.contains(&(resource.to_string(), namespace.to_string())) {
        return None;
    }
    state.requests.push(request.clone());
    let message = format!(
        "{resource} is forbidden: User \"system:serviceaccount:test:sre\" cannot get resource \"{resource}\" in the namespace \"{namespace}\""
    );
    Some(json_response(
        StatusCode::FORBIDDEN,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": "Forbidden", "code": 403}),
    ))
}

impl State {
    /// Gives `object` the next resourceVersion, records the change and tells
    /// every open watch; returns the object as stored.
    fn changed(&mut self, collection: &'static str, namespace: &str, kind: &'static str, mut object: Value) -> Value {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        let change =
            Change { version: self.version, collection, namespace: namespace.to_owned(), kind, object: object.clone() };
        self.watchers.retain(|watcher| watcher.send(change.clone()).is_ok());
        self.changes.push(change);
        object
    }
}

/// `GET` of a collection (`.../transactionrelays`, `.../secrets`, in one
/// namespace or all): a list, or with `watch=true` a stream of changes after
/// the given resourceVersion. `None` for any other request.
fn list_or_watch(state: &Mutex<State>, request: &Recorded, metadata_only: bool) -> Option<Response<ResponseBody>> {
    let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    let (collection, namespace) = match segments.as_slice() {
        ["apis", "relay.mykobo.io", "v1alpha1", "transactionrelays"] => ("transactionrelays", None),
        ["apis", "relay.mykobo.io", "v1alpha1", "namespaces", ns, "transactionrelays"] => {
            ("transactionrelays", Some(*ns))
        }
        ["api", "v1", "secrets"] => ("secrets", None),
        ["api", "v1", "namespaces", ns, "secrets"] => ("secrets", Some(*ns)),
        _ => return None,
    };
    let query: HashMap<&str, &str> = request.query.split('&').filter_map(|pair| pair.split_once('=')).collect();
    let shown = move |object: &Value| -> Value {
        if metadata_only {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": object["metadata"]})
        } else {
            object.clone()
        }
    };
    let namespace: Option<String> = namespace.map(str::to_owned);
    let in_scope = move |ns: &str| namespace.as_deref().is_none_or(|wanted| wanted == ns);
    let mut state = state.lock().unwrap();
    state.requests.push(request.clone());
    if !matches!(query.get("watch"), Some(&"true") | Some(&"1")) {
        let objects = if collection == "secrets" { &state.secrets } else { &state.relays };
        let items: Vec<Value> = objects
            .values()
            .filter(|o| in_scope(o["metadata"]["namespace"].as_str().unwrap_or_default()))
            .map(&shown)
            .collect();
        let (api_version, kind) = match (collection, metadata_only) {
            (_, true) => ("meta.k8s.io/v1", "PartialObjectMetadataList"),
            ("secrets", false) => ("v1", "SecretList"),
            _ => ("relay.mykobo.io/v1alpha1", "TransactionRelayList"),
        };
        let list = json!({"apiVersion": api_version, "kind": kind,
                          "metadata": {"resourceVersion": state.version.to_string()}, "items": items});
        return Some(json_response(StatusCode::OK, &list));
    }
    let after: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let in_scope_too = in_scope.clone();
    let relevant = move |change: &Change| change.collection == collection && in_scope_too(&change.namespace);
    let backlog: Vec<Change> = state.changes.iter().filter(|c| c.version > after && relevant(c)).cloned().collect();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    state.watchers.push(sender);
    let line = move |change: Change| {
        let mut text = serde_json::to_vec(&json!({"type": change.kind, "object": shown(&change.object)})).unwrap();
        text.push(b'\n');
        Ok::<_, Infallible>(Frame::data(Bytes::from(text)))
    };
    let live = futures::stream::unfold(receiver, |mut receiver| async move {
        let change = receiver.recv().await?;
        Some((change, receiver))
    })
    .filter(move |change| std::future::ready(relevant(change) && change.version > after));
    let stream = futures::stream::iter(backlog).map(line).chain(live.map(line));
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed_unsync())
        .unwrap();
    Some(response)
}

fn json_response(status: StatusCode, value: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())).boxed_unsync())
        .unwrap()
}

fn not_found(what: &str) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

fn conflict() -> (StatusCode, Value) {
    (
        StatusCode::CONFLICT,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "conflict", "reason": "Conflict", "code": 409}),
    )
}

fn answer(state: &Mutex<State>, request: Recorded) -> (StatusCode, Value) {
    let mut state = state.lock().unwrap();
    if state.down {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "reason": "ServiceUnavailable", "message": "the test took the API server away"}),
        );
    }
    state.requests.push(request.clone());
    let Recorded { method, path, body, .. } = request;
    let (method, path) = (&method, path.as_str());
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["apis", "relay.mykobo.io", "v1alpha1", "namespaces", ns, "transactionrelays", name]) => state
            .relays
            .get(&format!("{ns}/{name}"))
            .cloned()
            .map_or_else(|| not_found("transactionrelay"), |r| (StatusCode::OK, r)),
        (&Method::GET, ["api", "v1", "namespaces", ns, "secrets", name]) => state
            .secrets
            .get(&format!("{ns}/{name}"))
            .cloned()
            .map_or_else(|| not_found("secret"), |s| (StatusCode::OK, s)),
        (
            &Method::PATCH,
            ["apis", "relay.mykobo.io", "v1alpha1", "namespaces", ns, "transactionrelays", name, "status"],
        ) => {
            let key = format!("{ns}/{name}");
            match state.relays.get_mut(&key) {
                Some(relay) => {
                    relay["status"] = body["status"].clone();
                    (StatusCode::OK, relay.clone())
                }
                None => not_found("transactionrelay"),
            }
        }
        (&Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", _, "events"]) => (StatusCode::CREATED, body),
        (&Method::PATCH, ["apis", "events.k8s.io", "v1", "namespaces", _, "events", _]) => (StatusCode::OK, body),
        (&Method::GET, ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => state
            .leases
            .get(&format!("{ns}/{name}"))
            .cloned()
            .map_or_else(|| not_found("lease"), |l| (StatusCode::OK, l)),
        (&Method::POST, ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"]) => {
            let key = format!("{ns}/{}", body["metadata"]["name"].as_str().unwrap_or_default());
            if state.leases.contains_key(&key) {
                return conflict();
            }
            state.version += 1;
            let mut lease = body;
            lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
            state.leases.insert(key, lease.clone());
            (StatusCode::CREATED, lease)
        }
        (&Method::PUT, ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => {
            let key = format!("{ns}/{name}");
            let current = state.leases.get(&key).map(|l| l["metadata"]["resourceVersion"].clone());
            if current != Some(body["metadata"]["resourceVersion"].clone()) {
                return conflict();
            }
            state.version += 1;
            let mut lease = body;
            lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
            state.leases.insert(key, lease.clone());
            (StatusCode::OK, lease)
        }
        _ => {
            state.unexpected.push(format!("{method} {path}"));
            not_found("resource")
        }
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
