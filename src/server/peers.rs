//! The admin API across a cluster: a request about something another node holds (a room on its
//! media engine, the calls on the owner, a drain of that node) is forwarded to that node's
//! `[cluster] advertise` URL with the caller's own token, and its answer returned as it came.
//! Forwarded requests carry [`FORWARDED`], and a node never forwards one again.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::AppState;
use super::http::HttpError;

/// Marks a request one node sent another.
pub const FORWARDED: &str = "x-switchboard-forwarded";

/// How long another node has to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    })
}

/// Whether this request came from another node (it is answered here, never forwarded again).
pub fn forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key(FORWARDED)
}

/// The advertised URL of node `index`, if it is live and another node.
pub fn peer_url(app: &AppState, index: u32) -> Option<String> {
    let c = app.hub.cluster()?;
    if index == c.index() {
        return None;
    }
    c.nodes()
        .into_iter()
        .find(|n| n.index == index)
        .map(|n| n.advertise)
}

/// The advertised URL of the node named `node_id`, if it is live.
pub fn peer_url_by_name(app: &AppState, node_id: &str) -> Option<(u32, String)> {
    app.hub
        .cluster()?
        .nodes()
        .into_iter()
        .find(|n| n.node_id == node_id)
        .map(|n| (n.index, n.advertise))
}

/// Sends the request to `base` + `path` with the caller's `Authorization`, and returns what came.
pub async fn forward(
    base: &str,
    method: reqwest::Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(StatusCode, Value), HttpError> {
    let mut req = client()
        .request(method, format!("{}{path}", base.trim_end_matches('/')))
        .header(FORWARDED, "1");
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        req = req.header(header::AUTHORIZATION, auth.as_bytes());
    }
    let unreachable = |e: reqwest::Error| {
        tracing::warn!(error = %e, %base, "admin request to another node failed");
        HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the node that holds this did not answer",
        )
    };
    let resp = req.send().await.map_err(unreachable)?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body: Value = resp.json().await.map_err(unreachable)?;
    Ok((status, body))
}

/// A forwarded answer as this node's response.
pub fn respond((status, body): (StatusCode, Value)) -> Response {
    (status, axum::Json(body)).into_response()
}
