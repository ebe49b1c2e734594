//! A signaling client over one WebSocket (tokio-tungstenite), written from docs/protocol.md: requests
//! are futures that resolve with the reply, events arrive in order on a queue. Used by the integration
//! tests and the load generator.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The WebSocket failed or was refused.
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The server answered `ok: false`.
    #[error("{code}: {message}")]
    Api {
        /// The protocol code.
        code: String,
        /// The message.
        message: String,
        /// Details, when given.
        details: Option<Value>,
    },
    /// The connection closed.
    #[error("connection closed")]
    Closed,
    /// Nothing arrived in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The server sent something that is not the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The protocol error code, for `Api` errors.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// An event frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerEvent {
    /// Its name.
    pub name: String,
    /// Its sequence number in this session.
    pub seq: u64,
    /// Its data.
    pub data: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// One session.
pub struct SignalClient {
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    events: mpsc::UnboundedReceiver<ServerEvent>,
    buffered: VecDeque<ServerEvent>,
    next_id: AtomicU64,
    close: Arc<Mutex<Option<(u16, String)>>>,
    /// The `session` event's data.
    pub session: Value,
}

impl std::fmt::Debug for SignalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalClient")
            .field("session", &self.session)
            .finish()
    }
}

impl SignalClient {
    /// Connects to `url` (`ws://host:port/v1/signal`) with a bearer token and waits for the `session`
    /// event.
    pub async fn connect(url: &str, token: &str) -> Result<Self, ClientError> {
        let mut req = url.into_client_request()?;
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            req.headers_mut().insert("authorization", v);
        }
        let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true).await?;
        let (mut sink, mut stream) = ws.split();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let close = Arc::new(Mutex::new(None));
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let p = Arc::clone(&pending);
        let c = Arc::clone(&close);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                match msg {
                    Message::Text(t) => {
                        let Ok(v) = serde_json::from_str::<Value>(&t) else {
                            continue;
                        };
                        if let Some(name) = v.get("event").and_then(Value::as_str) {
                            let _ = ev_tx.send(ServerEvent {
                                name: name.to_owned(),
                                seq: v.get("seq").and_then(Value::as_u64).unwrap_or(0),
                                data: v.get("data").cloned().unwrap_or(Value::Null),
                            });
                        } else if let Some(id) = v.get("id").and_then(Value::as_u64) {
                            if let Some(tx) = p.lock().await.remove(&id) {
                                let _ = tx.send(v);
                            }
                        } else {
                            // A reply without an id (the frame was unreadable): hand it to id 0.
                            if let Some(tx) = p.lock().await.remove(&0) {
                                let _ = tx.send(v);
                            }
                        }
                    }
                    Message::Close(f) => {
                        *c.lock().await = Some(f.map_or((1005, String::new()), |f| {
                            (f.code.into(), f.reason.to_string())
                        }));
                        break;
                    }
                    _ => {}
                }
            }
            // Wake everyone waiting for a reply.
            p.lock().await.clear();
        });
        let mut client = SignalClient {
            out: out_tx,
            pending,
            events: ev_rx,
            buffered: VecDeque::new(),
            next_id: AtomicU64::new(1),
            close,
            session: Value::Null,
        };
        let first = client.next_event(Duration::from_secs(10)).await?;
        if first.name != "session" || first.seq != 1 {
            return Err(ClientError::Protocol(format!(
                "first frame was {} seq {}",
                first.name, first.seq
            )));
        }
        client.session = first.data;
        Ok(client)
    }

    /// Sends an op and waits for its reply.
    pub async fn request(&self, op: &str, args: Value) -> Result<Value, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.request_with_id(id, op, args).await
    }

    /// Sends an op with a chosen id and waits for its reply.
    pub async fn request_with_id(
        &self,
        id: u64,
        op: &str,
        args: Value,
    ) -> Result<Value, ClientError> {
        let frame = json!({"id": id, "op": op, "args": args}).to_string();
        let reply = self.send_and_wait(id, Message::Text(frame.into())).await?;
        parse_reply(reply)
    }

    /// Sends any frame and waits for the reply carrying `id` (use 0 for frames without a readable id).
    pub async fn send_and_wait(&self, id: u64, msg: Message) -> Result<Value, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().await.insert(id, tx);
        self.out.send(msg).map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(Duration::from_secs(15), rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout(format!("reply {id}"))),
        }
    }

    /// Sends a frame without waiting.
    pub fn send_raw(&self, msg: Message) -> Result<(), ClientError> {
        self.out.send(msg).map_err(|_| ClientError::Closed)
    }

    /// The next event, in order.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<ServerEvent, ClientError> {
        if let Some(e) = self.buffered.pop_front() {
            return Ok(e);
        }
        match tokio::time::timeout(timeout, self.events.recv()).await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout("an event".into())),
        }
    }

    /// Waits for the next event named `name`, keeping the others (in order) for later calls.
    pub async fn wait_for(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<ServerEvent, ClientError> {
        if let Some(i) = self.buffered.iter().position(|e| e.name == name) {
            return self
                .buffered
                .remove(i)
                .ok_or_else(|| ClientError::Timeout(name.into()));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(e)) if e.name == name => return Ok(e),
                Ok(Some(e)) => self.buffered.push_back(e),
                Ok(None) => return Err(ClientError::Closed),
                Err(_) => return Err(ClientError::Timeout(name.into())),
            }
        }
    }

    /// Takes the event stream (with anything buffered first), so another task can consume events
    /// while this client keeps sending requests. Later `next_event`/`wait_for` calls see nothing.
    pub fn take_events(&mut self) -> mpsc::UnboundedReceiver<ServerEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        for e in self.buffered.drain(..) {
            let _ = tx.send(e);
        }
        let (_, dead) = mpsc::unbounded_channel();
        let mut live = std::mem::replace(&mut self.events, dead);
        tokio::spawn(async move {
            while let Some(e) = live.recv().await {
                if tx.send(e).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// Every event that arrived so far, without waiting.
    pub fn drain_events(&mut self) -> Vec<ServerEvent> {
        let mut v: Vec<ServerEvent> = self.buffered.drain(..).collect();
        while let Ok(e) = self.events.try_recv() {
            v.push(e);
        }
        v
    }

    /// The close code and reason, once the server closed the socket.
    pub async fn close_frame(&self) -> Option<(u16, String)> {
        self.close.lock().await.clone()
    }

    /// Waits until the server closes the socket and returns its close code.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Result<(u16, String), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(c) = self.close_frame().await {
                return Ok(c);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout("close".into()));
            }
            match tokio::time::timeout(left.min(Duration::from_millis(50)), self.events.recv())
                .await
            {
                Ok(Some(e)) => self.buffered.push_back(e),
                Ok(None) => {
                    // The reader ended; the close frame (if any) is recorded just before.
                    return Ok(self.close_frame().await.unwrap_or((1006, String::new())));
                }
                Err(_) => {}
            }
        }
    }

    /// Closes the socket.
    pub fn close(&self) {
        let _ = self.out.send(Message::Close(None));
    }
}

fn parse_reply(v: Value) -> Result<Value, ClientError> {
    match v.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
        Some(false) => {
            let e = v.get("error").cloned().unwrap_or(Value::Null);
            Err(ClientError::Api {
                code: e
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                message: e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                details: e.get("details").cloned(),
            })
        }
        None => Err(ClientError::Protocol(format!("reply without ok: {v}"))),
    }
}
