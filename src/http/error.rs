//! The one place errors become HTTP responses:
//! `{"error": {"code": "...", "message": "...", "field": "..."}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tracing::{error, warn};

use crate::runtime::registry::ResolveError;
use crate::store::{Conflict, StoreError};
use crate::transaction::IngestError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidJson(String),
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{message}")]
    Invalid { field: Option<String>, message: String },
    #[error("{}", .0.message())]
    Conflict(Conflict),
    #[error("{0}")]
    NotFound(String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("database unavailable; nothing was stored, retry later")]
    Unavailable,
    /// The commit went out and its answer never came.
    #[error(
        "the database did not confirm the commit, so the transaction may or may not be stored; retry with the same \
         idempotency key and body: the answer is then 200 with the stored transaction, or 201/202 if it was not \
         stored, and it is never stored or sent twice"
    )]
    OutcomeUnknown,
    #[error("{0}; nothing was stored, retry later")]
    RelayNotReady(String),
    #[error("too many requests in flight; retry later")]
    Overloaded,
    /// The process is stopping; another replica answers a retry.
    #[error("this process is shutting down; nothing was stored, retry (another replica will answer)")]
    ShuttingDown,
    #[error("the request took too long; retry later with the same idempotency key")]
    Timeout,
    /// A retry refused for the row's state (already sent, held by a
    /// running relay, waiting behind an older row of its wallet).
    #[error("{message}")]
    RetryRefused { code: &'static str, message: String },
    /// The queue refused the retried message.
    #[error("{0}")]
    SendFailed(String),
    /// The retried message was sent but not recorded: it will be sent again.
    #[error("{0}")]
    NotRecorded(String),
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// Every `error.code` the API can answer with (documented in openapi.json).
    pub const CODES: &[&str] = &[
        "invalid_json",
        "unsupported_media_type",
        "payload_too_large",
        "invalid_field",
        "idempotency_key_reused",
        "duplicate_reference",
        "not_found",
        "unauthorized",
        "database_unavailable",
        "outcome_unknown",
        "relay_not_ready",
        "overloaded",
        "shutting_down",
        "timeout",
        "already_sent",
        "held",
        "waits_for_older",
        "suspended",
        "send_failed",
        "not_recorded",
        "internal",
    ];

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidJson(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Unavailable
            | Self::OutcomeUnknown
            | Self::RelayNotReady(_)
            | Self::Overloaded
            | Self::ShuttingDown
            | Self::Timeout
            | Self::NotRecorded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::RetryRefused { .. } => StatusCode::CONFLICT,
            Self::SendFailed(_) => StatusCode::BAD_GATEWAY,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::Invalid { .. } => "invalid_field",
            Self::Conflict(Conflict::IdempotencyKey) => "idempotency_key_reused",
            Self::Conflict(_) => "duplicate_reference",
            Self::NotFound(_) => "not_found",
            Self::Unauthorized => "unauthorized",
            Self::Unavailable => "database_unavailable",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::RelayNotReady(_) => "relay_not_ready",
            Self::Overloaded => "overloaded",
            Self::ShuttingDown => "shutting_down",
            Self::Timeout => "timeout",
            Self::RetryRefused { code, .. } => code,
            Self::SendFailed(_) => "send_failed",
            Self::NotRecorded(_) => "not_recorded",
            Self::Internal => "internal",
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } => field.as_deref(),
            Self::Conflict(conflict) => Some(conflict.field()),
            _ => None,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { field: Some(field.into()), message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code(), "message": self.to_string()});
        if let Some(field) = self.field() {
            body["field"] = json!(field);
        }
        let mut response = (self.status(), Json(json!({ "error": body }))).into_response();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, Self::Unauthorized) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::Syntax(message) => Self::InvalidJson(format!("request body is not valid JSON: {message}")),
            IngestError::Invalid(e) => Self::Invalid { field: e.field, message: e.message },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        if error.is_outcome_unknown() {
            warn!(%error, "database outcome unknown");
            Self::OutcomeUnknown
        } else if error.is_unavailable() {
            warn!(%error, "database unavailable");
            Self::Unavailable
        } else {
            error!(%error, "database error");
            Self::Internal
        }
    }
}

impl From<ResolveError> for ApiError {
    fn from(error: ResolveError) -> Self {
        match error {
            ResolveError::NotReady(..) => Self::RelayNotReady(error.to_string()),
            ResolveError::Ambiguous(relays) => Self::NotFound(format!(
                "several relays are served here; post to /relays/{{namespace}}/{{name}}/new (one of: {relays})"
            )),
            other => Self::NotFound(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_and_every_error_body_has_code_and_message() {
        let all = [
            ApiError::InvalidJson("x".into()),
            ApiError::UnsupportedMediaType,
            ApiError::PayloadTooLarge(1),
            ApiError::invalid("f", "m"),
            ApiError::Conflict(Conflict::IdempotencyKey),
            ApiError::Conflict(Conflict::Reference),
            ApiError::NotFound("x".into()),
            ApiError::Unauthorized,
            ApiError::Unavailable,
            ApiError::OutcomeUnknown,
            ApiError::RelayNotReady("x".into()),
            ApiError::Overloaded,
            ApiError::ShuttingDown,
            ApiError::Timeout,
            ApiError::RetryRefused { code: "already_sent", message: "m".into() },
            ApiError::RetryRefused { code: "held", message: "m".into() },
            ApiError::RetryRefused { code: "waits_for_older", message: "m".into() },
            ApiError::RetryRefused { code: "suspended", message: "m".into() },
            ApiError::SendFailed("x".into()),
            ApiError::NotRecorded("x".into()),
            ApiError::Internal,
        ];
        let codes: Vec<&str> = all.iter().map(ApiError::code).collect();
        assert_eq!(codes, ApiError::CODES);
        for error in all {
            let unavailable = error.status() == StatusCode::SERVICE_UNAVAILABLE;
            let response = error.into_response();
            assert_eq!(response.headers().contains_key(header::RETRY_AFTER), unavailable);
        }
    }
}
