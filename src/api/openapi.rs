//! `GET /api/v1/openapi.json`: the OpenAPI 3 document of every endpoint, written by
//! hand in `openapi.json` beside this file (a test checks it lists every route).

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn handle() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_is_json_and_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        assert_eq!(doc["openapi"], "3.0.3");
        let paths = doc["paths"].as_object().unwrap();
        for (path, method) in [
            ("/api/v1/events", "post"),
            ("/api/v1/events/batch", "post"),
            ("/api/v1/events/{id}", "get"),
            ("/api/v1/events/{id}/retry", "post"),
            ("/api/v1/events/{id}/cancel", "post"),
            ("/api/v1/accounts/{user_id}/events", "get"),
            ("/api/v1/stack", "get"),
            ("/api/v1/nas", "get"),
            ("/api/v1/nas/{id}", "get"),
            ("/api/v1/cluster", "get"),
            ("/api/v1/openapi.json", "get"),
            ("/rest_api/v2/EventsStackCompact/", "post"),
            ("/rest_api/v2/EventsStack/", "post"),
            ("/status", "get"),
            ("/metrics", "get"),
            ("/api/v1/whoami", "get"),
            ("/api/v1/overview", "get"),
            ("/api/v1/series", "get"),
            ("/api/v1/nas/{id}/series", "get"),
            ("/api/v1/nas/{id}/log", "get"),
            ("/api/v1/nas/{id}/pause", "post"),
            ("/api/v1/nas/{id}/resume", "post"),
            ("/api/v1/nas/{id}/probe", "post"),
            ("/api/v1/nas/{id}/send", "post"),
            ("/api/v1/nas/{id}/reconcile", "post"),
            ("/api/v1/events", "get"),
            ("/api/v1/events/retry", "post"),
            ("/api/v1/events/cancel", "post"),
            ("/api/v1/accounts", "get"),
            ("/api/v1/audit", "get"),
        ] {
            assert!(paths[path][method].is_object(), "{method} {path}");
        }
        assert_eq!(paths.len(), 29, "a route was added: document it");
    }
}
