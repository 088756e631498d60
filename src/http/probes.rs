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

/// Answers at once from what each relay last saw of its database (its loop
/// checks every second, with a timeout): a stalled database never makes the
/// probe itself hang. Standalone: ready while the relay's database answers.
/// Under the operator: ready once serving, with each relay's state in the
/// body, so one relay's database never takes `/new` away from the others.
pub async fn readyz(State(state): State<AppState>) -> Response {
    // Shutting down: take this process out of the Service's endpoints.
    if state.relays.is_closing() {
        let body = json!({"status": "shutting down", "relays": {}});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let mut relays = serde_json::Map::new();
    let mut ready = true;
    for handle in state.relays.all() {
        let health = handle.relay.health().borrow().clone();
        let reachable = health.database_error.is_none();
        ready &= reachable || !state.options.ready_needs_databases;
        let mut entry = json!({"database": if reachable { "ok" } else { "unreachable" }});
        if let Some(code) = health.queue_error_code {
            entry["queue"] = json!(code);
        }
        relays.insert(handle.relay.id().to_string(), entry);
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({"status": if ready { "ready" } else { "not ready" }, "relays": relays});
    (status, Json(body)).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}
