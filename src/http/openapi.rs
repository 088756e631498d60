//! The OpenAPI 3 description of the HTTP API. The document is checked in at
//! `openapi.json` and embedded; a test keeps it in step with the code.

use axum::http::header;
use axum::response::IntoResponse;

pub const DOCUMENT: &str = include_str!("../../openapi.json");

pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}
