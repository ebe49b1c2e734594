//! The shell between signaling and the media plane (PROTOCOL.md section 4).
//!
//! - [`MediaPlane`] runs a session's `rtc_*` ops: the call must be started and the user `accepted`
//!   (checked by the signaling core on every op, so a user who quit or whose call ended can do nothing
//!   more), and only the session that joined may drive the participant.
//! - [`Sink`] is what the engine reports to: media events go to the participant's session in order,
//!   room occupancy to the signaling core (general-mode calls complete when the room stays empty), what
//!   each subscriber is forwarded to billing, and room events to the webhook outbox.
//! - The core's `LeaveRoom`/`CloseRoom` effects reach the engine through [`RoomControl`].

use std::sync::Arc;

use dashmap::DashMap;
use serde_json::{Value, json};

use super::billing::Biller;
use super::hub::{Hub, Outbound, RoomControl, now_ms};
use crate::ids::{CallId, SessionId, UserId};
use crate::sfu::{ConsumerUpdate, MediaSink, RtcEvent, Sfu, SfuError};
use crate::signaling::wire::{ApiError, ErrorCode, Op, Reply};
use crate::storage::Job;

/// Receives the engine's reports.
pub struct Sink {
    hub: Arc<Hub>,
    biller: Biller,
    webhooks: bool,
    /// The resolution class (billing tier name of the layer alone) of each measured layer, for the
    /// `switchboard_layers_by_resolution` gauge.
    layers: std::sync::Mutex<std::collections::HashMap<(CallId, String, String), String>>,
}

impl Sink {
    /// A sink feeding the hub and the biller.
    pub fn new(hub: Arc<Hub>, biller: Biller) -> Self {
        let webhooks = !hub.config().webhooks.urls.is_empty();
        Self {
            hub,
            biller,
            webhooks,
            layers: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Keeps the layers-by-class gauge: a layer measured or changed moves between classes; a track
    /// unpublished (or its room closed) takes its layers out.
    fn count_layers(&self, event: &RtcEvent) {
        let Ok(mut layers) = self.layers.lock() else {
            return;
        };
        let tiers = &self.hub.config().billing.tiers;
        let moved = |old: Option<String>, new: Option<&str>| {
            if let Some(o) = old {
                metrics::gauge!(crate::metrics::LAYERS_BY_CLASS, "class" => o).decrement(1.0);
            }
            if let Some(n) = new {
                metrics::gauge!(crate::metrics::LAYERS_BY_CLASS, "class" => n.to_owned())
                    .increment(1.0);
            }
        };
        match event {
            RtcEvent::TrackResolution {
                call_id,
                track_id,
                rid,
                width,
                height,
            } => {
                let pixels = u64::from(*width) * u64::from(*height);
                let class = tiers
                    .get(crate::billing::tier_index(tiers, pixels))
                    .map_or("", |t| t.name.as_str());
                let key = (call_id.clone(), track_id.to_string(), rid.clone());
                let old = layers.insert(key, class.to_owned());
                moved(old, Some(class));
            }
            RtcEvent::TrackUnpublished { call_id, track, .. } => {
                let track_id = track.track_id.to_string();
                let gone: Vec<_> = layers
                    .keys()
                    .filter(|(c, t, _)| c == call_id && *t == track_id)
                    .cloned()
                    .collect();
                for k in gone {
                    moved(layers.remove(&k), None);
                }
            }
            _ => {}
        }
    }
}

impl MediaSink for Sink {
    fn deliver(&self, session: SessionId, event: RtcEvent) {
        let data = event.data().to_string();
        self.hub
            .send_to(session, Outbound::Raw(event.name(), Arc::from(data)));
    }

    fn room_changed(&self, room: &CallId, participants: usize, at_ms: u64) {
        self.hub.room_changed(room, participants, at_ms);
    }

    fn consumer_changed(&self, update: ConsumerUpdate) {
        self.biller.update(update);
    }

    fn room_event(&self, event: &RtcEvent) {
        self.count_layers(event);
        // Resolution changes are for metrics; operators get the room events.
        if !self.webhooks || matches!(event, RtcEvent::TrackResolution { .. }) {
            return;
        }
        let ev = crate::webhooks::event(event.name(), now_ms(), event.data());
        // Kept and retried by the storage thread while the database fails.
        let _ = self.hub.store().submit(Job::Events(vec![ev]));
    }
}

/// The media plane as the shell uses it.
pub struct MediaPlane {
    sfu: Sfu,
    hub: Arc<Hub>,
    /// Which session drives each participant.
    joined: DashMap<(CallId, UserId), SessionId>,
    /// Calls someone tried to join, so the engine may hold their room: only these are closed in
    /// the engine when the call ends (most calls that ring never get a room).
    rooms: DashMap<CallId, ()>,
    /// In a cluster, on the owner: the node each room was placed on.
    placed: DashMap<CallId, u32>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for MediaPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaPlane")
            .field("sfu", &self.sfu)
            .finish()
    }
}

fn api(e: SfuError) -> ApiError {
    let code = match e.code() {
        "bad_request" => ErrorCode::BadRequest,
        "invalid_state" => ErrorCode::InvalidState,
        _ => ErrorCode::Internal,
    };
    if code == ErrorCode::Internal {
        tracing::error!(error = %e, "media engine failed");
        return ApiError::new(code, "the media engine failed");
    }
    ApiError::new(code, e.to_string())
}

impl MediaPlane {
    /// Wraps a started engine. Must be called inside the tokio runtime.
    pub fn new(sfu: Sfu, hub: Arc<Hub>) -> Self {
        Self {
            sfu,
            hub,
            joined: DashMap::new(),
            rooms: DashMap::new(),
            placed: DashMap::new(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Rooms someone joined here that are not closed yet.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// The rooms open here.
    pub fn room_ids(&self) -> Vec<String> {
        self.rooms
            .iter()
            .map(|r| r.key().as_str().to_owned())
            .collect()
    }

    /// Participants joined here.
    pub fn participant_count(&self) -> usize {
        self.joined.len()
    }

    /// The engine.
    pub fn sfu(&self) -> &Sfu {
        &self.sfu
    }

    /// The user driving `call_id`'s participant from this session, after checking they are still
    /// `accepted` in the started call.
    fn participant(
        &self,
        session: SessionId,
        call_id: &CallId,
        auth: &Auth,
    ) -> Result<UserId, ApiError> {
        let user = self.may_join(session, call_id, auth)?;
        match self.joined.get(&(call_id.clone(), user.clone())) {
            Some(s) if *s == session => Ok(user),
            _ => Err(ApiError::new(
                ErrorCode::InvalidState,
                "join the room (rtc_join) from this session first",
            )),
        }
    }

    fn may_join(
        &self,
        session: SessionId,
        call_id: &CallId,
        auth: &Auth,
    ) -> Result<UserId, ApiError> {
        match auth {
            Auth::Core => self.hub.may_join_room(session, call_id),
            Auth::Vouched(user) => Ok(user.clone()),
        }
    }

    /// Runs one `rtc_*` op for a session (`text` is its frame, for a room on another node).
    /// `None`: the room is on another node, which answers the session itself.
    pub async fn handle(&self, session: SessionId, op: Op, text: &str) -> Option<Reply> {
        if let Some(cluster) = self.hub.cluster()
            && let Some(call_id) = op.call_id().cloned()
        {
            match self.room_node(cluster, session, &op, &call_id).await {
                Err(e) => return Some(Err(e)),
                Ok(node) if node != cluster.index() => {
                    let user = if matches!(op, Op::RtcLeave(_)) {
                        self.hub.session_user(session)
                    } else {
                        self.hub.may_join_room(session, &call_id).ok()
                    };
                    let Some(user) = user else {
                        return Some(self.hub.may_join_room(session, &call_id).map(|_| json!({})));
                    };
                    // Behind the storage queue, as a reply would be: the room's node answers
                    // only after what this session's earlier ops changed is committed.
                    let msg = crate::cluster::Msg::Media {
                        sid: session.0,
                        user: user.as_str().to_owned(),
                        text: text.to_owned(),
                    };
                    let hub = Arc::clone(&self.hub);
                    let _ = self
                        .hub
                        .store()
                        .submit(Job::Run(Box::new(move |_| hub.send_to_node(node, msg))));
                    return None;
                }
                Ok(_) => {}
            }
        }
        Some(self.run(session, op, &Auth::Core).await)
    }

    /// On a room's node: runs an op the owner checked, for `user`.
    pub async fn handle_vouched(&self, session: SessionId, user: UserId, op: Op) -> Reply {
        self.run(session, op, &Auth::Vouched(user)).await
    }

    /// Where the room of `call_id` is (on the owner of the calls): where it was placed, or for a
    /// join, the least loaded live node. An op other than a join for a room placed nowhere runs
    /// here (and fails as a single node would).
    async fn room_node(
        &self,
        cluster: &Arc<crate::cluster::Cluster>,
        session: SessionId,
        op: &Op,
        call_id: &CallId,
    ) -> Result<u32, ApiError> {
        if let Some(n) = self.placed.get(call_id).map(|n| *n)
            && cluster.is_live(n)
        {
            return Ok(n);
        }
        if let Some(n) = cluster.room_node(call_id.as_str()).await {
            self.placed.insert(call_id.clone(), n);
            return Ok(n);
        }
        if !matches!(op, Op::RtcJoin(_)) {
            return Ok(cluster.index());
        }
        // Only someone who may join places the room.
        self.hub.may_join_room(session, call_id)?;
        let mut counts = std::collections::HashMap::new();
        for p in self.placed.iter() {
            *counts.entry(*p.value()).or_insert(0usize) += 1;
        }
        let choice = cluster.least_loaded(&counts);
        let node = cluster.place_room(call_id.as_str(), choice).await;
        self.placed.insert(call_id.clone(), node);
        tracing::info!(call_id = %call_id, node, "room placed");
        Ok(node)
    }

    /// Rooms placed on node `index` (which is gone): forgotten, and returned.
    pub fn rooms_lost(&self, index: u32) -> Vec<CallId> {
        let lost: Vec<CallId> = self
            .placed
            .iter()
            .filter(|p| *p.value() == index)
            .map(|p| p.key().clone())
            .collect();
        for c in &lost {
            self.placed.remove(c);
        }
        lost
    }

    async fn run(&self, session: SessionId, op: Op, auth: &Auth) -> Reply {
        match op {
            Op::RtcJoin(a) => {
                let user = self.may_join(session, &a.call_id, auth)?;
                // A drain opens no room, but a room in progress here takes its participants back
                // (a re-join after a network change, another device).
                if self.hub.draining() && !self.rooms.contains_key(&a.call_id) {
                    return Err(ApiError::new(
                        ErrorCode::InvalidState,
                        "the server is draining for a restart; try again in a moment",
                    ));
                }
                self.rooms.insert(a.call_id.clone(), ());
                let r = self
                    .sfu
                    .join(a.call_id.clone(), user.clone(), session)
                    .await
                    .map_err(api)?;
                self.joined
                    .insert((a.call_id.clone(), user.clone()), session);
                self.hub.hung_up(&a.call_id, &user, false);
                // The user may have quit or the call ended while the join ran: undo it. (A room
                // on a node that does not own the calls hears of that from the owner.)
                if matches!(auth, Auth::Core)
                    && self.hub.may_join_room(session, &a.call_id).is_err()
                {
                    let _ = self.sfu.leave(&a.call_id, &user).await;
                    self.joined.remove(&(a.call_id.clone(), user));
                    return Err(ApiError::new(
                        ErrorCode::InvalidState,
                        "the call changed while joining",
                    ));
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let ice_servers = crate::turn::ice_servers(&self.hub.config().turn, &user, now);
                Ok(json!({ "participants": r.participants, "ice_servers": ice_servers }))
            }
            Op::RtcPublish(a) => {
                let user = self.participant(session, &a.call_id, auth)?;
                let answer = self
                    .sfu
                    .publish(&a.call_id, &user, a.sdp)
                    .await
                    .map_err(api)?;
                Ok(json!({ "sdp": answer }))
            }
            Op::RtcIceRestart(a) => {
                let user = self.participant(session, &a.call_id, auth)?;
                self.sfu.ice_restart(&a.call_id, &user).await.map_err(api)?;
                Ok(json!({}))
            }
            Op::RtcAnswer(a) => {
                let user = self.participant(session, &a.call_id, auth)?;
                self.sfu
                    .answer(&a.call_id, &user, a.sdp)
                    .await
                    .map_err(api)?;
                Ok(json!({}))
            }
            Op::RtcCandidate(a) => {
                let user = self.participant(session, &a.call_id, auth)?;
                self.sfu
                    .candidate(&a.call_id, &user, a.target, a.candidate)
                    .await
                    .map_err(api)?;
                Ok(json!({}))
            }
            Op::RtcSubscription(a) => {
                let user = self.participant(session, &a.call_id, auth)?;
                self.sfu
                    .subscription(
                        &a.call_id,
                        &user,
                        &a.track_id,
                        a.enabled,
                        a.max_width,
                        a.max_height,
                    )
                    .await
                    .map_err(api)?;
                Ok(json!({}))
            }
            Op::RtcLeave(a) => {
                let user = match auth {
                    Auth::Core => self.hub.session_user(session),
                    Auth::Vouched(u) => Some(u.clone()),
                }
                .ok_or_else(|| ApiError::new(ErrorCode::Internal, "session not registered"))?;
                let key = (a.call_id.clone(), user.clone());
                if self.joined.get(&key).is_none_or(|s| *s != session) {
                    // Someone with nothing to do with the call learns no more from leave than
                    // from the other ops: call_not_found, as for rtc_join.
                    if let Err(e) = self.may_join(session, &a.call_id, auth)
                        && e.code == ErrorCode::CallNotFound
                    {
                        return Err(e);
                    }
                    return Err(ApiError::new(
                        ErrorCode::InvalidState,
                        "this session is not in the room",
                    ));
                }
                self.joined.remove(&key);
                self.sfu.leave(&a.call_id, &user).await.map_err(api)?;
                self.hub.hung_up(&a.call_id, &user, true);
                Ok(json!({}))
            }
            other => Err(ApiError::bad_request(format!(
                "{} is not a media op",
                other.name()
            ))),
        }
    }

    /// A room's description for the admin API.
    pub async fn room_info(&self, call_id: &CallId) -> Option<Value> {
        let room = self.sfu.room(call_id).await?;
        serde_json::to_value(room).ok()
    }

    /// Every room, for the admin API.
    pub async fn rooms(&self) -> Value {
        serde_json::to_value(self.sfu.rooms().await).unwrap_or(Value::Null)
    }

    /// Removes a participant (admin).
    pub async fn remove(&self, call_id: &CallId, user: &UserId) -> Result<(), SfuError> {
        self.joined.remove(&(call_id.clone(), user.clone()));
        self.sfu.leave(call_id, user).await
    }

    /// Stops the engine.
    pub async fn shutdown(&self) {
        self.sfu.shutdown().await;
    }
}

/// Who vouches that a session's user may drive a participant.
enum Auth {
    /// The signaling core on this node (it owns the calls).
    Core,
    /// The owner of the calls, on another node, checked this user.
    Vouched(UserId),
}

impl MediaPlane {
    /// Where a room placed by this node (the owner) is, when it is on another node.
    fn remote_room(&self, call_id: &CallId) -> Option<u32> {
        let me = self.hub.cluster()?.index();
        self.placed.get(call_id).map(|n| *n).filter(|n| *n != me)
    }

    /// Takes the user out of a room on this node.
    pub fn leave_here(&self, call_id: CallId, user_id: UserId) {
        self.joined.remove(&(call_id.clone(), user_id.clone()));
        let sfu = self.sfu.clone();
        self.runtime.spawn(async move {
            let _ = sfu.leave(&call_id, &user_id).await;
        });
    }

    /// Closes a room on this node.
    pub fn close_here(&self, call_id: CallId) {
        if self.rooms.remove(&call_id).is_none() {
            return;
        }
        self.joined.retain(|(c, _), _| *c != call_id);
        let sfu = self.sfu.clone();
        self.runtime.spawn(async move {
            sfu.close_room(&call_id).await;
        });
    }
}

impl RoomControl for MediaPlane {
    fn leave(&self, call_id: CallId, user_id: UserId) {
        if let Some(node) = self.remote_room(&call_id) {
            self.hub.send_to_node(
                node,
                crate::cluster::Msg::LeaveRoom {
                    call: call_id.as_str().to_owned(),
                    user: user_id.as_str().to_owned(),
                },
            );
            return;
        }
        self.leave_here(call_id, user_id);
    }

    fn close(&self, call_id: CallId) {
        if let Some(cluster) = self.hub.cluster().cloned()
            && let Some((_, node)) = self.placed.remove(&call_id)
        {
            let call = call_id.as_str().to_owned();
            if node != cluster.index() {
                self.hub
                    .send_to_node(node, crate::cluster::Msg::CloseRoom { call: call.clone() });
            }
            self.runtime
                .spawn(async move { cluster.forget_room(&call).await });
        }
        self.close_here(call_id);
    }
}
