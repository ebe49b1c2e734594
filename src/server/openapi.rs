//! `GET /v1/openapi.json`: the OpenAPI document of the HTTP API (`docs/openapi.json`), compiled in so
//! the binary always serves the document of its own version. No token is needed.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The document, as committed.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

/// `GET /v1/openapi.json`.
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use super::DOCUMENT;
    use serde_json::Value;

    fn doc() -> Value {
        serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON")
    }

    #[test]
    fn is_an_openapi_3_document() {
        let d = doc();
        let version = d["openapi"].as_str().expect("openapi version");
        assert!(version.starts_with("3."), "{version}");
        assert!(d["info"]["title"].is_string());
    }

    /// Every endpoint of PROTOCOL.md section 6 and docs/protocol.md is described.
    #[test]
    fn describes_every_endpoint() {
        let d = doc();
        let paths = d["paths"].as_object().expect("paths");
        for (path, method) in [
            ("/healthz", "get"),
            ("/readyz", "get"),
            ("/metrics", "get"),
            ("/v1/signal", "get"),
            ("/v1/dev/token", "post"),
            ("/v1/openapi.json", "get"),
            ("/v1/calls", "get"),
            ("/v1/calls/{call_id}", "get"),
            ("/v1/calls/{call_id}/end", "post"),
            ("/v1/rooms", "get"),
            ("/v1/rooms/{call_id}", "get"),
            ("/v1/rooms/{call_id}/participants/{user_id}", "delete"),
            ("/v1/billing/usage", "get"),
            ("/v1/admin/drain", "post"),
        ] {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{} {path} is missing from docs/openapi.json",
                method.to_uppercase()
            );
        }
    }

    /// Every admin operation requires the bearer token and documents the 401 answer.
    #[test]
    fn admin_operations_need_a_token() {
        let d = doc();
        let paths = d["paths"].as_object().expect("paths");
        for (path, item) in paths {
            let admin = ["/v1/calls", "/v1/rooms", "/v1/billing", "/v1/admin"]
                .iter()
                .any(|p| path.starts_with(p));
            if !admin {
                continue;
            }
            for (method, op) in item.as_object().expect("path item") {
                let security = op["security"].as_array().expect("security");
                assert!(
                    security.iter().any(|s| s.get("bearerAuth").is_some()),
                    "{method} {path}: no bearerAuth"
                );
                assert!(
                    op["responses"].get("401").is_some(),
                    "{method} {path}: no 401"
                );
            }
        }
    }
}
