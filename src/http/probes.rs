//! Liveness, readiness and metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Standalone: ready when the relay's database answers. Under the operator:
/// ready once serving, with each relay's database state in the body.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let mut relays = serde_json::Map::new();
    let mut ready = true;
    for handle in state.relays.all() {
        let reachable = handle.relay.store().ping().await.is_ok();
        ready &= reachable || !state.options.ready_needs_databases;
        relays.insert(handle.relay.id().to_string(), json!({"database": if reachable { "ok" } else { "unreachable" }}));
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({"status": if ready { "ready" } else { "not ready" }, "relays": relays});
    (status, Json(body)).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}
