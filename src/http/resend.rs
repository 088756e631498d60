//! Resends over HTTP, for people without database access: the admin token,
//! the semantics of `txrelay retry` and `txrelay retry-all`, and the same
//! audit record, whose actor is the admin token's fingerprint.

use axum::Json;
use axum::body::to_bytes;
use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderMap, header};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ingest::{Access, authorize};
use super::{ApiError, AppState, Target};
use crate::relay::{ResendError, ResendRequest, RetryAllReport, RetryError};
use crate::store::{ResendAudit, ResendFilter, RetryOneError};

/// Rows one HTTP `retry-all` may resend; more is the CLI's job.
pub const MAX_RESEND: u64 = 1000;
pub const DEFAULT_RESEND: u64 = 100;

/// The admin token that made the request, named by a fingerprint (the
/// first 12 hex digits of its SHA-256): enough to tell tokens apart in the
/// audit record, useless to call the API with.
fn actor(headers: &HeaderMap) -> String {
    use sha2::{Digest, Sha256};
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(_, token)| token.trim())
        .unwrap_or_default();
    let digest = Sha256::digest(presented.as_bytes());
    let hex = crate::hex::lower(&digest[..6]);
    format!("admin token sha256:{hex}")
}

#[derive(Debug, Serialize)]
pub struct Retried {
    id: i64,
    message_id: String,
    audit: &'static str,
}

/// `POST …/transactions/{id}/retry`: sends one row now, reviving it if
/// dead-lettered. A row already sent is a 409 `already_sent` and nothing
/// is sent again.
pub async fn retry_one(
    State(state): State<AppState>,
    Target(target): Target,
    params: RawPathParams,
    headers: HeaderMap,
) -> Result<Json<Retried>, ApiError> {
    let handle = authorize(&state, target.as_ref(), Access::Admin, &headers)?;
    let in_progress = handle.relay.enter();
    let raw = params.iter().find(|(k, _)| *k == "id").map(|(_, v)| v).unwrap_or_default();
    let id: i64 = raw
        .parse()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::invalid("id", "must be a positive integer (the transaction's id)"))?;
    let audit = ResendAudit { actor: actor(&headers), via: "http", command: "retry" };
    // Its own task, counted as a request in progress: a request cut short
    // (timeout, client gone) must not abandon a send before its message id
    // and its audit outcome are recorded, nor a shutdown close the store
    // under it.
    let relay = handle.relay.clone();
    let retried = tokio::spawn(async move {
        let _in_progress = in_progress;
        relay.resend().retry_one(id, &audit).await
    });
    let Ok(retried) = retried.await else { return Err(ApiError::Internal) };
    match retried {
        Ok(message_id) => Ok(Json(Retried { id, message_id, audit: "resend_audit" })),
        Err(refused @ RetryError::Suspended(_)) => {
            Err(ApiError::RetryRefused { code: "suspended", message: refused.to_string() })
        }
        Err(RetryError::Claim(RetryOneError::NotFound(_))) => {
            Err(ApiError::NotFound(format!("no transaction with id {id}")))
        }
        Err(RetryError::Claim(refused @ RetryOneError::AlreadySent { .. })) => {
            Err(ApiError::RetryRefused { code: "already_sent", message: refused.to_string() })
        }
        Err(RetryError::Claim(refused @ RetryOneError::Held { .. })) => {
            Err(ApiError::RetryRefused { code: "held", message: refused.to_string() })
        }
        Err(RetryError::Claim(refused @ RetryOneError::WaitsForOlder { .. })) => {
            Err(ApiError::RetryRefused { code: "waits_for_older", message: refused.to_string() })
        }
        Err(RetryError::Claim(RetryOneError::Store(error)) | RetryError::Store(error)) => Err(error.into()),
        Err(error @ RetryError::Send { .. }) => Err(ApiError::SendFailed(error.to_string())),
        Err(error @ RetryError::NotRecorded { .. }) => Err(ApiError::NotRecorded(error.to_string())),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryAllBody {
    wallet: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    error: Option<String>,
    #[serde(default)]
    include_dead: bool,
    #[serde(default)]
    dead_only: bool,
    limit: Option<i64>,
    rate: Option<f64>,
    #[serde(default)]
    dry_run: bool,
}

/// `POST …/retry-all`: the rows a filter names, resent (or, with
/// `dry_run`, listed). Bounded to [`MAX_RESEND`] rows and to what fits in
/// the request timeout at the rate asked.
pub async fn retry_all(
    State(state): State<AppState>,
    Target(target): Target,
    request: Request,
) -> Result<Json<RetryAllReport>, ApiError> {
    let headers = request.headers().clone();
    let handle = authorize(&state, target.as_ref(), Access::Admin, &headers)?;
    let in_progress = handle.relay.enter();
    let limit = state.options.max_body_bytes;
    let body = to_bytes(request.into_body(), limit).await.map_err(|_| ApiError::PayloadTooLarge(limit))?;
    let body: RetryAllBody = if body.iter().all(u8::is_ascii_whitespace) {
        RetryAllBody::default()
    } else {
        if !super::ingest::is_json(&headers) {
            return Err(ApiError::UnsupportedMediaType);
        }
        serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(format!("request body: {e}")))?
    };
    let rows = match body.limit.map(u64::try_from) {
        None => DEFAULT_RESEND,
        Some(Ok(rows)) if (1..=MAX_RESEND).contains(&rows) => rows,
        Some(_) => {
            return Err(ApiError::invalid(
                "limit",
                format!("must be between 1 and {MAX_RESEND}; use the CLI for more"),
            ));
        }
    };
    let request = ResendRequest {
        filter: ResendFilter {
            wallet: body.wallet,
            since: body.since,
            until: body.until,
            error: body.error,
            include_dead: body.include_dead,
            dead_only: body.dead_only,
        },
        limit: Some(rows),
        rate: body.rate,
        dry_run: body.dry_run,
        budget: Some(state.options.request_timeout / 2),
    };
    request.validate().map_err(|e| ApiError::invalid(e.field, e.message))?;
    let audit = ResendAudit { actor: actor(&headers), via: "http", command: "retry-all" };
    // Its own task: a request cut short (timeout, client gone) must not
    // abandon a resend half-way; it finishes and records its outcome.
    // It ends early, its results recorded, when the relay stops.
    let relay = handle.relay.clone();
    let resend = tokio::spawn(async move {
        let _in_progress = in_progress;
        relay.resend().retry_all(&request, &audit, &relay.outbox().stopping(), |_| {}).await
    });
    match resend.await {
        Ok(Ok(report)) => Ok(Json(report)),
        Ok(Err(refused @ ResendError::Suspended(_))) => {
            Err(ApiError::RetryRefused { code: "suspended", message: refused.to_string() })
        }
        Ok(Err(ResendError::Store(error))) => Err(error.into()),
        Err(_) => Err(ApiError::Internal),
    }
}
