//! The read endpoints: one transaction, a filtered page, and the health
//! summary the old service had. They need the admin token.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, RawPathParams, State};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::ingest::{Access, authorize};
use super::{ApiError, AppState, Target};
use crate::runtime::settings::RelayHandle;
use crate::store::ListFilter;
use crate::transaction::Transaction;

pub const MAX_PAGE: i64 = 1000;
pub const DEFAULT_PAGE: i64 = 50;

fn admin(
    state: &AppState,
    target: Option<&crate::spec::RelayId>,
    headers: &HeaderMap,
) -> Result<RelayHandle, ApiError> {
    authorize(state, target, Access::Admin, headers)
}

/// PostgreSQL text cannot hold a NUL character: a parameter with one could
/// match nothing, and the database refuses it outright.
fn storable(name: &str, value: Option<&str>) -> Result<(), ApiError> {
    if value.is_some_and(|v| v.contains('\0')) {
        return Err(ApiError::invalid(name, "must not contain a NUL character"));
    }
    Ok(())
}

pub async fn get_one(
    State(state): State<AppState>,
    Target(target): Target,
    params: RawPathParams,
    headers: HeaderMap,
) -> Result<Json<Transaction>, ApiError> {
    let handle = admin(&state, target.as_ref(), &headers)?;
    let _in_progress = handle.relay.enter();
    let reference = params.iter().find(|(k, _)| *k == "reference").map(|(_, v)| v).unwrap_or_default();
    storable("reference", Some(reference))?;
    handle
        .relay
        .store()
        .find_by_reference(reference)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound("no transaction with this reference".into()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    status: Option<String>,
    wallet_address: Option<String>,
    payer_id: Option<String>,
    payee_id: Option<String>,
    #[serde(default)]
    unsent: bool,
    #[serde(default)]
    failed: bool,
    limit: Option<i64>,
    after_id: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Page {
    transactions: Vec<Transaction>,
    next_after_id: Option<i64>,
}

pub async fn list(
    State(state): State<AppState>,
    Target(target): Target,
    headers: HeaderMap,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let handle = admin(&state, target.as_ref(), &headers)?;
    let _in_progress = handle.relay.enter();
    let Query(params) = query.map_err(|e| ApiError::Invalid { field: None, message: e.body_text() })?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid("limit", format!("must be between 1 and {MAX_PAGE}")));
    }
    if params.after_id.is_some_and(|id| id < 0) {
        return Err(ApiError::invalid("after_id", "must not be negative"));
    }
    for (name, value) in [
        ("status", &params.status),
        ("wallet_address", &params.wallet_address),
        ("payer_id", &params.payer_id),
        ("payee_id", &params.payee_id),
    ] {
        storable(name, value.as_deref())?;
    }
    let filter = ListFilter {
        status: params.status,
        wallet_address: params.wallet_address,
        payer_id: params.payer_id,
        payee_id: params.payee_id,
        unsent: params.unsent,
        failed: params.failed,
        not_sent: false,
        after_id: params.after_id,
        limit,
    };
    let transactions = handle.relay.store().list(&filter).await?;
    let next_after_id = if transactions.len() as i64 == limit { transactions.last().map(|t| t.id) } else { None };
    Ok(Json(Page { transactions, next_after_id }))
}

#[derive(Debug, Serialize)]
pub struct TransactionHealth {
    status: &'static str,
    unsent_count: i64,
    failed_count: i64,
    total_count: i64,
}

pub async fn transaction_health(
    State(state): State<AppState>,
    Target(target): Target,
    headers: HeaderMap,
) -> Result<Json<TransactionHealth>, ApiError> {
    let handle = admin(&state, target.as_ref(), &headers)?;
    let _in_progress = handle.relay.enter();
    let counts = handle.relay.store().counts().await?;
    let threshold = i64::try_from(handle.relay.config().unsent_warning_threshold).unwrap_or(i64::MAX);
    Ok(Json(TransactionHealth {
        status: if counts.unsent >= threshold { "warning" } else { "healthy" },
        unsent_count: counts.unsent,
        failed_count: counts.failed,
        total_count: counts.total,
    }))
}
