//! HTTP endpoints (PROTOCOL.md sections 1 and 6): health, metrics, the dev token, the signaling upgrade
//! and the admin API. Handlers are thin: they authenticate, parse, call the hub or storage, and map
//! errors to the protocol's codes.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, Query, State, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::hub::now_ms;
use super::{AppState, peers};
use crate::auth::{AuthError, Identity};
use crate::billing::report::{UsageParams, UsageRequest};
use crate::ids::{CallId, UserId};
use crate::signaling::wire::{ApiError, CallState, EndReason, ErrorCode};
use crate::storage::CallFilter;

/// An HTTP error with the protocol's body: `{"error":{"code","message"}}`.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl HttpError {
    /// An error with a status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 401 unauthorized.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 400 bad_request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 500 internal; the detail is logged, never shown.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error in an HTTP handler");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed; see its log",
        )
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        let status = match e.code {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::CallNotFound => StatusCode::NOT_FOUND,
            ErrorCode::InvalidState | ErrorCode::Busy => StatusCode::CONFLICT,
            ErrorCode::NotInvitee | ErrorCode::NotInviter => StatusCode::FORBIDDEN,
            ErrorCode::ModeNotSupported => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::TooManyUsers => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, e.code.as_str(), e.message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

/// The bearer token of a request: `Authorization: Bearer …`, or, only when `query` allows it (the
/// WebSocket upgrade, which browsers cannot give headers), the `token` query parameter. Anywhere else
/// a token in the URL would end up in access logs and browser history, so it is not looked at.
fn bearer(parts: &Parts, query: bool) -> Option<String> {
    if let Some(v) = parts.headers.get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let t = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))?;
        return Some(t.trim().to_owned());
    }
    if !query {
        return None;
    }
    let q = parts.uri.query()?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "token").then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1), b.get(i + 2)) {
            (b'%', Some(h), Some(l)) => match (hex_val(*h), hex_val(*l)) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn verify(app: &AppState, parts: &Parts, query: bool) -> Result<Identity, HttpError> {
    let token = bearer(parts, query)
        .ok_or_else(|| HttpError::unauthorized(AuthError::Missing.to_string()))?;
    app.tokens
        .verify(&token)
        .map_err(|e| HttpError::unauthorized(e.to_string()))
}

/// A WebSocket upgrade with a valid access token, in the `Authorization` header or the `token`
/// query parameter.
pub struct SignalAuth(pub Identity);

impl FromRequestParts<AppState> for SignalAuth {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, HttpError> {
        verify(app, parts, true).map(SignalAuth)
    }
}

/// A request whose token carries `"admin": true`.
pub struct Admin(pub Identity);

impl FromRequestParts<AppState> for Admin {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, HttpError> {
        let id = verify(app, parts, false)?;
        // 401, not 403: PROTOCOL.md section 6 says so (docs/protocol.md, "HTTP").
        if !id.admin {
            return Err(HttpError::unauthorized(
                "this call needs a token with the admin claim",
            ));
        }
        Ok(Admin(id))
    }
}

/// `GET /v1/signal`: the WebSocket upgrade. The token is checked before upgrading.
pub async fn signal(
    State(app): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
    SignalAuth(identity): SignalAuth,
    ws: WebSocketUpgrade,
) -> Response {
    let cfg = &app.hub.config().signaling;
    let shutdown = app.shutdown.clone();
    if *shutdown.borrow() {
        return HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "the server is shutting down",
        )
        .into_response();
    }
    let client = super::admission::client_ip(
        peer.ip(),
        headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes()),
        &app.hub.config().http.trusted_proxies,
    );
    // The caps are checked before the upgrade: a refused client costs one response.
    let ticket = match app
        .admission
        .admit(&identity.user_id, client, std::time::Instant::now())
    {
        Ok(t) => t,
        Err(refusal) => {
            metrics::counter!(crate::metrics::SESSIONS_REFUSED, "cap" => refusal.label())
                .increment(1);
            return HttpError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                refusal.to_string(),
            )
            .into_response();
        }
    };
    ws.max_message_size(cfg.max_frame)
        .max_frame_size(cfg.max_frame)
        .read_buffer_size(2048)
        .write_buffer_size(0)
        .on_upgrade(move |socket| super::session::run(app, socket, identity, shutdown, ticket))
}

/// `GET /healthz`.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// How long `/readyz` waits for the storage thread to answer.
const READY_STORAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `GET /readyz`: writes to storage work, the storage thread answers, and the server is not
/// shutting down or draining.
pub async fn readyz(State(app): State<AppState>) -> Response {
    let not_ready = |status: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": status})),
        )
            .into_response()
    };
    if *app.shutdown.borrow() || app.draining() {
        return not_ready("draining");
    }
    if app.hub.relay_to() == Some(None) {
        return not_ready("no node owns the calls yet");
    }
    let store = app.hub.store();
    if !store.healthy() {
        return not_ready("storage failing");
    }
    match tokio::time::timeout(READY_STORAGE_WAIT, store.call(|_| ())).await {
        Ok(Ok(())) if store.healthy() => Json(json!({"status": "ready"})).into_response(),
        Ok(Ok(())) => not_ready("storage failing"),
        Ok(Err(_)) => not_ready("storage unavailable"),
        Err(_) => not_ready("storage not answering"),
    }
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&app.metrics),
    )
        .into_response()
}

/// Body of `POST /v1/dev/token`.
#[derive(Deserialize)]
pub struct DevTokenRequest {
    user_id: String,
    #[serde(default)]
    name: Option<String>,
}

/// `POST /v1/dev/token` (dev mode only): a one-day token for any user.
pub async fn dev_token(
    State(app): State<AppState>,
    body: Result<Json<DevTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, HttpError> {
    if !app.dev {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "bad_request",
            "dev tokens exist only in --dev mode",
        ));
    }
    let Json(req) = body.map_err(|e| HttpError::bad_request(e.body_text()))?;
    let user =
        UserId::parse(&req.user_id).map_err(|e| HttpError::bad_request(format!("user_id {e}")))?;
    if let Some(n) = &req.name
        && n.chars().count() > crate::auth::MAX_NAME_CHARS
    {
        return Err(HttpError::bad_request("name is longer than 64 characters"));
    }
    let now = now_ms() / 1000;
    let ttl = app.hub.config().auth.max_token_ttl.min(24 * 3600);
    let token = app
        .tokens
        .issue(&user, req.name.as_deref(), false, now, ttl);
    Ok(Json(json!({
        "token": token,
        "user_id": user,
        "expires_at": (now + ttl) * 1000,
    })))
}

/// Query of `GET /v1/calls`.
#[derive(Deserialize)]
pub struct CallsQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    limit: Option<String>,
}

/// `GET /v1/calls?state=&user_id=&limit=`.
pub async fn list_calls(
    State(app): State<AppState>,
    _admin: Admin,
    q: Result<Query<CallsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, HttpError> {
    let Query(q) = q.map_err(|e| HttpError::bad_request(e.body_text()))?;
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some("started") => Some(CallState::Started),
        Some("ended") => Some(CallState::Ended),
        Some(s) => {
            return Err(HttpError::bad_request(format!(
                "state {s:?}: use started or ended"
            )));
        }
    };
    let user_id = match q.user_id.as_deref() {
        None | Some("") => None,
        Some(u) => {
            Some(UserId::parse(u).map_err(|e| HttpError::bad_request(format!("user_id {e}")))?)
        }
    };
    let limit = parse_limit(q.limit.as_deref())?;
    let filter = CallFilter {
        state,
        user_id,
        limit,
    };
    let calls = app
        .hub
        .store()
        .call(move |s| s.list_calls(&filter))
        .await
        .map_err(HttpError::internal)?
        .map_err(HttpError::internal)?;
    Ok(Json(json!({
        "calls": calls.iter().map(|c| c.info()).collect::<Vec<_>>(),
    })))
}

/// Query of `GET /v1/admin/webhooks/dead`.
#[derive(Debug, Deserialize)]
pub struct LimitQuery {
    #[serde(default)]
    limit: Option<String>,
}

/// `GET /v1/admin/webhooks/dead`: the webhook events given up on, newest first, with how many
/// the store keeps.
pub async fn dead_webhooks(
    State(app): State<AppState>,
    _admin: Admin,
    q: Result<Query<LimitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, HttpError> {
    let Query(q) = q.map_err(|e| HttpError::bad_request(e.body_text()))?;
    let limit = parse_limit(q.limit.as_deref())?;
    let (dead, total) = app
        .hub
        .store()
        .call(move |s| {
            Ok::<_, crate::storage::StoreError>((s.dead_webhooks(limit)?, s.dead_webhook_count()?))
        })
        .await
        .map_err(HttpError::internal)?
        .map_err(HttpError::internal)?;
    Ok(Json(json!({ "dead_letters": dead, "total": total })))
}

/// `POST /v1/cluster/nodes/{node_id}/drain`: drains that node (as `POST /v1/admin/drain` on it).
pub async fn drain_node(
    State(app): State<AppState>,
    admin: Admin,
    headers: axum::http::HeaderMap,
    raw: Result<Path<String>, PathRejection>,
) -> Result<Response, HttpError> {
    let Path(node) =
        raw.map_err(|_| HttpError::new(StatusCode::NOT_FOUND, "bad_request", "no such node"))?;
    let me = app
        .hub
        .cluster()
        .map_or(app.hub.config().server.node_id.clone(), |c| {
            c.node_id().to_owned()
        });
    if node == me {
        return Ok(start_drain(State(app), admin).await.into_response());
    }
    match peers::peer_url_by_name(&app, &node) {
        Some((_, url)) if !peers::forwarded(&headers) => Ok(peers::respond(
            peers::forward(&url, reqwest::Method::POST, "/v1/admin/drain", &headers).await?,
        )),
        _ => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "bad_request",
            format!("no live node named {node:?}"),
        )),
    }
}

/// `GET /v1/cluster`: this node, the owner of the calls and every live node with its load, as the
/// registry had them at this node's last heartbeat. On a single node: that node alone.
pub async fn cluster(State(app): State<AppState>, _admin: Admin) -> Json<Value> {
    match app.hub.cluster() {
        Some(c) => Json(json!({
            "node_id": c.node_id(),
            "index": c.index(),
            "owner": c.owner(),
            "nodes": c.nodes(),
        })),
        None => Json(json!({
            "node_id": app.hub.config().server.node_id,
            "index": 0,
            "owner": null,
            "nodes": [],
        })),
    }
}

/// A `limit` query parameter: 1..1000, 50 when absent.
fn parse_limit(raw: Option<&str>) -> Result<usize, HttpError> {
    match raw {
        None | Some("") => Ok(50),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(HttpError::bad_request("limit must be 1..1000")),
        },
    }
}

fn parse_call_id(raw: &str) -> Result<CallId, HttpError> {
    CallId::parse(raw)
        .map_err(|_| HttpError::new(StatusCode::NOT_FOUND, "call_not_found", "no such call"))
}

/// The `{call_id}` of a path. A segment that is not even text (invalid percent-encoded UTF-8) names
/// no call either: 404 with the protocol's body, not axum's plain-text rejection.
fn call_id_from_path(raw: Result<Path<String>, PathRejection>) -> Result<CallId, HttpError> {
    let Path(raw) =
        raw.map_err(|_| HttpError::new(StatusCode::NOT_FOUND, "call_not_found", "no such call"))?;
    parse_call_id(&raw)
}

/// `GET /v1/calls/{call_id}`: the call with its users and its room.
pub async fn get_call(
    State(app): State<AppState>,
    _admin: Admin,
    headers: axum::http::HeaderMap,
    raw: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, HttpError> {
    let id = call_id_from_path(raw)?;
    let lookup = id.clone();
    let call = app
        .hub
        .store()
        .call(move |s| s.call(&lookup))
        .await
        .map_err(HttpError::internal)?
        .map_err(HttpError::internal)?
        .ok_or_else(|| HttpError::new(StatusCode::NOT_FOUND, "call_not_found", "no such call"))?;
    let room = room_anywhere(&app, &id, &headers).await;
    // In a cluster: the node the call's room is on (null: no room, or this is one node).
    let room_node = match app.hub.cluster() {
        Some(c) => c.room_node(id.as_str()).await.and_then(|index| {
            c.nodes()
                .into_iter()
                .find(|n| n.index == index)
                .map(|n| n.node_id)
        }),
        None => None,
    };
    let mut v = serde_json::to_value(call.info()).map_err(HttpError::internal)?;
    if let Value::Object(o) = &mut v {
        o.insert("room".into(), room.unwrap_or(Value::Null));
        o.insert(
            "room_node".into(),
            room_node.map_or(Value::Null, Value::String),
        );
    }
    Ok(Json(v))
}

/// `POST /v1/calls/{call_id}/end`: ends the call with reason `admin` and closes its room.
pub async fn end_call(
    State(app): State<AppState>,
    _admin: Admin,
    headers: axum::http::HeaderMap,
    raw: Result<Path<String>, PathRejection>,
) -> Result<Response, HttpError> {
    let id = call_id_from_path(raw)?;
    // In a cluster the owner of the calls ends it.
    if !peers::forwarded(&headers)
        && let Some(relay) = app.hub.relay_to()
    {
        let url = relay
            .and_then(|owner| peers::peer_url(&app, owner))
            .ok_or_else(|| {
                HttpError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "no node owns the calls right now; try again in a moment",
                )
            })?;
        let path = format!("/v1/calls/{id}/end");
        return Ok(peers::respond(
            peers::forward(&url, reqwest::Method::POST, &path, &headers).await?,
        ));
    }
    app.hub.end_call(&id, EndReason::Admin).await?;
    Ok(Json(json!({"call_id": id, "reason": "admin"})).into_response())
}

/// Any other path.
pub async fn not_found() -> HttpError {
    HttpError::new(StatusCode::NOT_FOUND, "bad_request", "no such endpoint")
}

/// `GET /v1/billing/usage?from=&to=&call_id=&user_id=&format=json|csv&group=call|user`: usage per
/// (user, tier) and per (call, user, tier) in `[from, to)`, with billable minutes. `from` defaults to the
/// start of the current month (UTC), `to` to now. CSV has one table: per (call, user, tier) by default,
/// per (user, tier) with `group=user`.
pub async fn billing_usage(
    State(app): State<AppState>,
    _admin: Admin,
    q: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    use crate::billing::report::build;
    let Query(q) = q.map_err(|e| HttpError::bad_request(e.body_text()))?;
    let now = now_ms();
    let UsageRequest {
        query,
        csv,
        by_user,
    } = q.check(now).map_err(HttpError::bad_request)?;
    let (from, to) = (query.from_ms, query.to_ms);
    let (call_id, user_id) = (query.call_id.clone(), query.user_id.clone());
    // Segments still running are closed first, so the report includes everything up to now.
    if to > now.saturating_sub(app.hub.config().billing.checkpoint * 1000) {
        app.biller.flush().await;
    }
    let rows = app
        .hub
        .store()
        .call(move |s| s.usage(from, to, call_id.as_ref(), user_id.as_ref()))
        .await
        .map_err(HttpError::internal)?
        .map_err(HttpError::internal)?;
    let report = build(&rows, &query);
    Ok(if csv {
        let body = if by_user {
            report.users_csv()
        } else {
            report.calls_csv()
        };
        ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/json")],
            report.to_json(),
        )
            .into_response()
    })
}

/// `GET /v1/rooms`: every room with its participants, tracks, layers and bitrates.
pub async fn list_rooms(
    State(app): State<AppState>,
    _admin: Admin,
    headers: axum::http::HeaderMap,
) -> Json<Value> {
    let mut rooms = match app.media.rooms().await {
        Value::Array(v) => v,
        _ => Vec::new(),
    };
    // In a cluster, every node's rooms (a node that does not answer is left out, and logged).
    if let Some(c) = app.hub.cluster()
        && !peers::forwarded(&headers)
    {
        for n in c.nodes().into_iter().filter(|n| n.index != c.index()) {
            if let Ok((StatusCode::OK, body)) =
                peers::forward(&n.advertise, reqwest::Method::GET, "/v1/rooms", &headers).await
                && let Some(Value::Array(more)) = body.get("rooms").cloned()
            {
                rooms.extend(more);
            }
        }
    }
    Json(json!({ "rooms": rooms }))
}

/// The room of a call as its node describes it: here, or (in a cluster) on the room's node.
async fn room_anywhere(
    app: &AppState,
    id: &CallId,
    headers: &axum::http::HeaderMap,
) -> Option<Value> {
    if let Some(room) = app.media.room_info(id).await {
        return Some(room);
    }
    if peers::forwarded(headers) {
        return None;
    }
    let index = app.hub.cluster()?.room_node(id.as_str()).await?;
    let url = peers::peer_url(app, index)?;
    match peers::forward(
        &url,
        reqwest::Method::GET,
        &format!("/v1/rooms/{id}"),
        headers,
    )
    .await
    {
        Ok((StatusCode::OK, body)) => Some(body),
        _ => None,
    }
}

/// `GET /v1/rooms/{call_id}`.
pub async fn get_room(
    State(app): State<AppState>,
    _admin: Admin,
    headers: axum::http::HeaderMap,
    raw: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, HttpError> {
    let id = call_id_from_path(raw)?;
    room_anywhere(&app, &id, &headers)
        .await
        .map(Json)
        .ok_or_else(|| HttpError::new(StatusCode::NOT_FOUND, "call_not_found", "no such room"))
}

/// `DELETE /v1/rooms/{call_id}/participants/{user_id}`: takes the user out of the room (they stay in
/// the call and may join again).
pub async fn remove_participant(
    State(app): State<AppState>,
    _admin: Admin,
    headers: axum::http::HeaderMap,
    raw: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, HttpError> {
    // A segment that is not even text names no room or participant: 404 with the protocol's body.
    let Path((raw_call, raw_user)) = raw.map_err(|_| {
        HttpError::new(
            StatusCode::NOT_FOUND,
            "call_not_found",
            "no such participant",
        )
    })?;
    let id = parse_call_id(&raw_call)?;
    let user = UserId::parse(&raw_user).map_err(|_| {
        HttpError::new(
            StatusCode::NOT_FOUND,
            "call_not_found",
            "no such participant",
        )
    })?;
    // In a cluster the room may be on another node.
    if app.media.room_info(&id).await.is_none()
        && !peers::forwarded(&headers)
        && let Some(c) = app.hub.cluster()
        && let Some(index) = c.room_node(id.as_str()).await
        && let Some(url) = peers::peer_url(&app, index)
    {
        let path = format!("/v1/rooms/{id}/participants/{user}");
        return Ok(peers::respond(
            peers::forward(&url, reqwest::Method::DELETE, &path, &headers).await?,
        ));
    }
    match app.media.remove(&id, &user).await {
        Ok(()) => Ok(Json(json!({"call_id": id, "user_id": user})).into_response()),
        Err(crate::sfu::SfuError::NotJoined) => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "call_not_found",
            "no such participant in that room",
        )),
        Err(e) => Err(HttpError::internal(e)),
    }
}

/// `POST /v1/admin/drain`: starts a drain; the server exits when it is done. Answers at once.
pub async fn start_drain(State(app): State<AppState>, _admin: Admin) -> (StatusCode, Json<Value>) {
    let in_progress = app.hub.calls_in_progress();
    super::begin_drain(&app);
    app.drain_requested.notify_one();
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "draining": true,
            "calls_in_progress": in_progress,
            "drain_timeout": app.hub.config().server.drain_timeout,
        })),
    )
}
