//! `POST /new`: validate, commit, send inline.

use axum::Json;
use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tracing::debug;

use super::client_ip::client_ip;
use super::{ApiError, AppState, Target};
use crate::metrics::Accepted;
use crate::relay::Submission;
use crate::runtime::settings::RelayHandle;
use crate::transaction::{TraceContext, parse_request_body};

pub async fn new_transaction(
    State(state): State<AppState>,
    Target(target): Target,
    request: Request,
) -> Result<Response, ApiError> {
    let handle = authorize(&state, target.as_ref(), Access::Ingest, request.headers())?;
    let _in_progress = handle.relay.enter();
    let rejected = |error: ApiError| {
        handle.relay.metrics().accepted(Accepted::Rejected);
        debug!(code = error.code(), error = %error, "rejected");
        error
    };
    if !is_json(request.headers()) {
        return Err(rejected(ApiError::UnsupportedMediaType));
    }
    let limit = state.options.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(rejected(ApiError::PayloadTooLarge(limit)));
    }
    let peer_ip = client_ip(&request, &state.options.trusted_proxies);
    let (trace, malformed) = {
        // Several tracestate headers are one list (W3C); several
        // traceparent headers are malformed.
        let all = |name: &str| -> Vec<&str> {
            request.headers().get_all(name).iter().map(|v| v.to_str().unwrap_or("\u{0}")).collect()
        };
        let parents = all("traceparent");
        let state = all("tracestate").join(",");
        match parents.as_slice() {
            [] => (None, None),
            [parent] => TraceContext::from_headers(Some(parent), (!state.is_empty()).then_some(state.as_str())),
            _ => (None, Some(crate::transaction::trace::Malformed::Traceparent)),
        }
    };
    if let Some(malformed) = malformed {
        // Never refused: the transaction goes on without the bad header.
        handle.relay.metrics().trace_context_invalid(malformed);
        debug!(?malformed, "malformed trace context header ignored");
    }
    let body = to_bytes(request.into_body(), limit).await.map_err(|_| rejected(ApiError::PayloadTooLarge(limit)))?;
    let mut transaction = parse_request_body(&body).map_err(|e| rejected(e.into()))?;
    if transaction.ip_address.is_none() {
        transaction.ip_address = peer_ip.map(|ip| ip.to_string());
    }
    // The ingest span continues the dApp's trace when it sent one.
    let span = tracing::debug_span!("txrelay.ingest", relay = %handle.relay.id());
    if let Some(trace) = trace.as_ref().filter(|_| !span.is_disabled()) {
        crate::telemetry::set_remote_parent(&span, &trace.traceparent, trace.tracestate.as_deref());
    }
    transaction.trace = trace;
    let submitted = tracing::Instrument::instrument(handle.relay.ingest().submit(&transaction), span).await?;
    let (status, transaction) = match submitted {
        Submission::Sent(tx) => (StatusCode::CREATED, tx),
        Submission::Queued(tx) => (StatusCode::ACCEPTED, tx),
        Submission::Replayed(tx) => (StatusCode::OK, tx),
        // Retention deleted the row; its record answers the replay.
        Submission::Retired(record) => return Ok((StatusCode::OK, Json(record)).into_response()),
        Submission::Conflict(conflict) => return Err(ApiError::Conflict(conflict)),
    };
    Ok((status, Json(transaction)).into_response())
}

/// `application/json`, with or without parameters such as a charset.
pub(super) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Which of a relay's token sets a route takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `POST /new`: the ingest tokens.
    Ingest,
    /// The reads: the admin tokens, never opened by `--insecure-no-auth`.
    Admin,
}

/// Checks the bearer token, then finds the relay. The token is checked
/// first against every relay served here, so that a caller without a valid
/// token learns nothing from the answer, not even which relays exist (404
/// against 401). Only `POST /new` of a relay that needs no ingest token (none
/// configured, none named by its spec), under `--insecure-no-auth`, lets a
/// request through without one; a relay whose tokens were revoked refuses
/// every request.
pub fn authorize(
    state: &AppState,
    target: Option<&crate::spec::RelayId>,
    access: Access,
    headers: &HeaderMap,
) -> Result<RelayHandle, ApiError> {
    // Checked first: once the relays are removed, no token would be
    // recognised, and a client told 401 would not retry elsewhere.
    if state.relays.is_closing() {
        return Err(ApiError::ShuttingDown);
    }
    let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let admits = |handle: &RelayHandle| match access {
        Access::Ingest => {
            (state.options.insecure_no_auth && !handle.ingest_required && handle.ingest_tokens.is_empty())
                || handle.ingest_tokens.accepts_header(presented)
        }
        Access::Admin => handle.admin_tokens.accepts_header(presented),
    };
    if !state.relays.any(admits) {
        return Err(ApiError::Unauthorized);
    }
    let handle = state.relays.resolve(target)?;
    if admits(&handle) { Ok(handle) } else { Err(ApiError::Unauthorized) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn json_content_types() {
        let check = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(value).unwrap());
            is_json(&headers)
        };
        assert!(check("application/json"));
        assert!(check("application/json; charset=utf-8"));
        assert!(check("Application/JSON"));
        assert!(!check("text/plain"));
        assert!(!check("application/jsonx"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
