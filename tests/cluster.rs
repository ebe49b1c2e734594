//! Several server processes as one cluster (`[cluster] redis_url`), on one PostgreSQL store and one
//! Redis, each test with servers of its own: users connected to different nodes call each other
//! with every rule of one node (ringing, busy, several devices, races, history), and the calls
//! survive the death of the node that owns them.
//!
//! Needs the test PostgreSQL server (`SWITCHBOARD_TEST_POSTGRES`, started by scripts/test) and
//! redis-server; without them the tests are skipped, except under CI, where they fail.

mod common;
mod sfu_support;

use std::cell::Cell;
use std::time::{Duration, Instant};

use common::WAIT;
use common::media::MediaUser;
use common::process::{Proc, free_port, start_logging};
use common::redis::Redis;
use serde_json::{Value, json};
use sfu_support::{Pump, pump_until};
use switchboard::client::rtc::TrackSpec;
use switchboard::client::signal::SignalClient;

/// A cluster's shared services.
struct Shared {
    dir: tempfile::TempDir,
    pg: String,
    redis: Redis,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // A failed test leaves its nodes' logs to read.
        if std::thread::panicking() {
            let keep =
                std::env::temp_dir().join(format!("cluster-test-logs-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&keep);
            if let Ok(dir) = std::fs::read_dir(self.dir.path()) {
                for e in dir.flatten() {
                    if e.path().extension().is_some_and(|x| x == "log") {
                        let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                    }
                }
            }
            eprintln!("node logs kept in {}", keep.display());
        }
    }
}

fn shared() -> Option<Shared> {
    common::pg::server()?;
    if !common::redis::available() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = common::pg::schema_url(&dir.path().join("cluster")).expect("schema");
    let redis = Redis::start(&dir.path().join("redis"));
    Some(Shared { dir, pg, redis })
}

impl Shared {
    /// Starts node `name`; it is ready once the calls have an owner (itself or another).
    async fn node(&self, name: &str) -> Proc {
        self.node_with(name, &[]).await
    }

    async fn node_with(&self, name: &str, extra: &[(&str, String)]) -> Proc {
        let mut env = vec![
            ("SWITCHBOARD_STORAGE_URL", self.pg.clone()),
            ("SWITCHBOARD_SERVER_NODE_ID", name.to_owned()),
            ("SWITCHBOARD_CLUSTER_REDIS_URL", self.redis.url.clone()),
            ("SWITCHBOARD_CLUSTER_NODE_TTL", "3".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        let log = self.dir.path().join(format!("{name}.log"));
        start_logging(
            &self.dir.path().join(format!("{name}.db")),
            free_port(),
            &env,
            Some(&log),
        )
        .await
    }
}

async fn admin(p: &Proc, path: &str) -> Value {
    reqwest::Client::new()
        .get(p.url(path))
        .bearer_auth(common::process::token("ops", true))
        .send()
        .await
        .expect("admin request")
        .json()
        .await
        .expect("json")
}

/// Waits until `p`'s registry lists `n` live nodes, and returns its view.
async fn until_nodes(p: &Proc, n: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = admin(p, "/v1/cluster").await;
        if v["nodes"].as_array().map_or(0, Vec::len) == n {
            return v;
        }
        assert!(Instant::now() < deadline, "{n} nodes never listed: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The state of `user` in the call as the event says, if it names them.
fn state_of(ev: &Value, user: &str) -> Option<String> {
    ev["users"]
        .as_array()?
        .iter()
        .find(|u| u["user_id"] == user)
        .and_then(|u| u["state"].as_str())
        .map(str::to_owned)
}

/// Waits for a `call_user_state_changed` that puts `user` in `state`.
async fn until_state(c: &mut SignalClient, user: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = c
            .wait_for("call_user_state_changed", left)
            .await
            .unwrap_or_else(|e| panic!("{user} never became {state}: {e}"));
        if state_of(&ev.data, user).as_deref() == Some(state) {
            return ev.data;
        }
    }
}

/// A user's state in a call as the admin API shows it.
fn user_state(call: &Value, user: &str) -> String {
    state_of(call, user).unwrap_or_else(|| panic!("{user} is not in the call: {call}"))
}

fn code(r: Result<Value, switchboard::client::signal::ClientError>) -> String {
    match r {
        Err(switchboard::client::signal::ClientError::Api { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn skip() {
    eprintln!("no test PostgreSQL or no redis-server: skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_nodes_call_each_other_as_on_one_node() {
    let Some(s) = shared() else { return skip() };
    let a = s.node("node-a").await;
    let b = s.node("node-b").await;
    let c = s.node("node-c").await;
    let view = until_nodes(&a, 3).await;
    assert_eq!(
        view["owner"]["node_id"], "node-a",
        "the first node owns the calls: {view}"
    );
    let view_b = until_nodes(&b, 3).await;
    assert_eq!(
        view_b["owner"]["node_id"], "node-a",
        "every node knows the owner: {view_b}"
    );

    // Alice on A calls Bob on B and Carol on C.
    let mut alice = a.client("alice").await;
    let mut bob = b.client("bob").await;
    let mut carol = c.client("carol").await;
    let r = alice
        .request(
            "call_invite",
            json!({"invitees": ["bob", "carol"], "timeout": 30, "extended_data": "hi"}),
        )
        .await
        .expect("invite across nodes");
    let call = r["call_id"].as_str().expect("call_id").to_owned();
    for (who, client) in [("bob", &mut bob), ("carol", &mut carol)] {
        let ev = client
            .wait_for("call_invitation_received", WAIT)
            .await
            .unwrap_or_else(|e| panic!("{who} is not rung on another node: {e}"));
        assert_eq!(ev.data["call_id"], call.as_str());
        assert_eq!(ev.data["caller"], "alice");
        assert_eq!(ev.data["extended_data"], "hi");
    }
    until_state(&mut alice, "bob", "received").await;

    // Bob has a second device, on A: it rings too, and stops when the first answers.
    let mut bob2 = a.client("bob").await;
    let replay = bob2
        .wait_for("call_invitation_received", WAIT)
        .await
        .expect("a device that connects later is rung");
    assert_eq!(replay.data["call_id"], call.as_str());

    // Dave on C is busy-checked against a call owned elsewhere: Bob is ringing, so busy.
    let dave = c.client("dave").await;
    let r = dave
        .request("call_invite", json!({"invitees": ["bob"], "timeout": 30}))
        .await
        .expect("invite");
    let busy_call = r["call_id"].as_str().expect("id").to_owned();
    let dave_call = admin(&b, &format!("/v1/calls/{busy_call}")).await;
    assert_eq!(
        user_state(&dave_call, "bob"),
        "busy",
        "bob is busy across nodes: {dave_call}"
    );

    // Accept on B and reject on C race nothing: both answers land, in one order for everyone.
    let (acc, rej) = tokio::join!(
        bob.request("call_accept", json!({"call_id": call})),
        carol.request("call_reject", json!({"call_id": call})),
    );
    acc.expect("bob accepts");
    rej.expect("carol rejects");
    until_state(&mut alice, "bob", "accepted").await;
    until_state(&mut bob2, "bob", "accepted").await;

    // Alice is in a call now: her own invitation is refused, whichever node she is on.
    let r = alice
        .request("call_invite", json!({"invitees": ["carol"], "timeout": 30}))
        .await;
    assert_eq!(code(r), "busy");

    // Cancel racing accept, across nodes: exactly one wins.
    let erin = c.client("erin").await;
    let mut frank = b.client("frank").await;
    let r = erin
        .request("call_invite", json!({"invitees": ["frank"], "timeout": 30}))
        .await
        .expect("erin invites frank");
    let race = r["call_id"].as_str().expect("id").to_owned();
    frank
        .wait_for("call_invitation_received", WAIT)
        .await
        .expect("frank rings");
    let (cancel, accept) = tokio::join!(
        erin.request("call_cancel", json!({"call_id": race})),
        frank.request("call_accept", json!({"call_id": race})),
    );
    assert!(
        cancel.is_ok() != accept.is_ok(),
        "one of cancel and accept wins: {cancel:?} {accept:?}"
    );
    let final_state = admin(&a, &format!("/v1/calls/{race}")).await;
    let frank_state = user_state(&final_state, "frank");
    assert_eq!(
        frank_state,
        if accept.is_ok() {
            "accepted"
        } else {
            "cancelled"
        },
        "everyone sees the winner: {final_state}"
    );

    // History from any node.
    for (node, client) in [("C", &carol), ("B", &bob)] {
        let page = client
            .request("query_call_list", json!({"count": 10}))
            .await
            .expect("history");
        let ids: Vec<&str> = page["calls"]
            .as_array()
            .expect("calls")
            .iter()
            .filter_map(|c| c["call_id"].as_str())
            .collect();
        assert!(ids.contains(&call.as_str()), "history on {node}: {page}");
    }

    // Timeouts fire for invitees on other nodes.
    let r = dave
        .request("call_invite", json!({"invitees": ["gina"], "timeout": 1}))
        .await
        .expect("invite an offline user");
    let lonely = r["call_id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = admin(&b, &format!("/v1/calls/{lonely}")).await;
        if v["state"] == "ended" {
            assert_eq!(user_state(&v, "gina"), "timeout", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "the timeout never fired: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((a, b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ringing_call_survives_kill_9_of_its_owner() {
    let Some(s) = shared() else { return skip() };
    let mut a = s.node("node-a").await;
    let b = s.node("node-b").await;
    let c = s.node("node-c").await;
    until_nodes(&b, 3).await;
    let view = admin(&b, "/v1/cluster").await;
    assert_eq!(view["owner"]["node_id"], "node-a", "{view}");

    let mut alice = b.client("alice").await;
    let mut bob = c.client("bob").await;
    let r = alice
        .request("call_invite", json!({"invitees": ["bob"], "timeout": 20}))
        .await
        .expect("invite");
    let call = r["call_id"].as_str().expect("id").to_owned();
    bob.wait_for("call_invitation_received", WAIT)
        .await
        .expect("bob rings");
    until_state(&mut alice, "bob", "received").await;

    // An op in flight when the owner dies: the owner is stopped first, so it never answers. The
    // node that relayed it answers it once the calls have a new owner, without claiming an outcome.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(a.child.id() as i32, libc::SIGSTOP) };
    let killed = Cell::new(Instant::now());
    let (in_flight, ()) = tokio::join!(
        alice.request(
            "call_accept",
            json!({"call_id": "c_00000000000000000000000000000000"})
        ),
        async {
            // Long enough for the op to reach the stopped owner even on a loaded machine.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            killed.set(Instant::now());
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(a.child.id() as i32, libc::SIGKILL) };
            let _ = a.child.wait();
        }
    );
    let killed = killed.get();
    let e = in_flight
        .expect_err("the owner died before answering")
        .to_string();
    assert!(
        e.contains("unavailable") && e.contains("may or may not have been applied"),
        "{e}"
    );
    eprintln!(
        "the op in flight was answered {:?} after kill -9",
        killed.elapsed()
    );

    // Another node takes the calls over.
    let deadline = Instant::now() + Duration::from_secs(15);
    let owner = loop {
        let v = admin(&b, "/v1/cluster").await;
        let o = v["owner"]["node_id"].as_str().unwrap_or("").to_owned();
        if o == "node-b" || o == "node-c" {
            break o;
        }
        assert!(Instant::now() < deadline, "nobody took the calls over: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = killed.elapsed();
    eprintln!("{owner} owns the calls {took:?} after kill -9 of the owner");

    // Bob still rings (the replay after the resync says so), and his answer reaches Alice.
    let r = loop {
        match bob.request("call_accept", json!({"call_id": call})).await {
            Err(e) if e.to_string().contains("unavailable") => {
                assert!(Instant::now() < deadline, "accept never went through: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    r.expect("bob accepts after the takeover");
    until_state(&mut alice, "bob", "accepted").await;
    let v = admin(&c, &format!("/v1/calls/{call}")).await;
    assert_eq!(user_state(&v, "bob"), "accepted", "{v}");
    assert!(
        took < Duration::from_secs(5),
        "takeover took {took:?}: the lock is freed when the owner dies"
    );
}

/// Rings `callee` from `caller` and has them accept; returns the call ID.
async fn accepted_call(caller: &SignalClient, callee: &mut SignalClient, who: &str) -> String {
    let r = caller
        .request("call_invite", json!({"invitees": [who], "timeout": 30}))
        .await
        .expect("invite");
    let call = r["call_id"].as_str().expect("id").to_owned();
    callee
        .wait_for("call_invitation_received", WAIT)
        .await
        .expect("rings");
    callee
        .request("call_accept", json!({"call_id": call}))
        .await
        .expect("accept");
    call
}

/// Rooms each node reports (its heartbeat), by name.
async fn rooms_by_node(p: &Proc) -> std::collections::HashMap<String, u64> {
    admin(p, "/v1/cluster").await["nodes"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|n| {
                    (
                        n["node_id"].as_str().unwrap_or("").to_owned(),
                        n["load"]["rooms"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `pub_user` publishes video until `sub_user` has received packets for a second.
async fn media_flows(publisher: &mut MediaUser, subscriber: &mut MediaUser) {
    publisher.publish(&[TrackSpec::video()]).await;
    let p = publisher.publisher.take().expect("published");
    let mut first: Option<Instant> = None;
    pump_until(
        &p,
        Pump {
            video: Some(0),
            ..Pump::default()
        },
        Duration::from_secs(15),
        || {
            if !subscriber.drain_packets().is_empty() && first.is_none() {
                first = Some(Instant::now());
            }
            first.is_some_and(|t| t.elapsed() >= Duration::from_secs(1))
        },
    )
    .await;
    assert!(first.is_some(), "no media reached {}", subscriber.user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_placed_by_load_and_replaced_when_their_node_dies() {
    let Some(s) = shared() else { return skip() };
    let a = s.node("node-a").await;
    let b = s.node("node-b").await;
    let c = s.node("node-c").await;
    until_nodes(&a, 3).await;

    // Users on B and C, the calls owned by A, the room wherever the load says: signaling through
    // two nodes, media straight to the room's.
    let u1 = b.client("u1").await;
    let mut u2 = c.client("u2").await;
    let call1 = accepted_call(&u1, &mut u2, "u2").await;
    let (mut m1, _) = MediaUser::join(u1, "u1", &call1).await.expect("join");
    let (mut m2, _) = MediaUser::join(u2, "u2", &call1).await.expect("join");
    media_flows(&mut m1, &mut m2).await;

    // Two more calls, their users on A: each room goes to the least loaded node, so the three
    // rooms are on three nodes.
    let mut rooms = vec![(call1.clone(), room_node(&a, &call1).await)];
    let mut media = Vec::new();
    for (x, y) in [("u3", "u4"), ("u5", "u6")] {
        let cx = a.client(x).await;
        let mut cy = a.client(y).await;
        let call = accepted_call(&cx, &mut cy, y).await;
        let (mut mx, _) = MediaUser::join(cx, x, &call).await.expect("join");
        let (mut my, _) = MediaUser::join(cy, y, &call).await.expect("join");
        media_flows(&mut mx, &mut my).await;
        rooms.push((call.clone(), room_node(&b, &call).await));
        media.push((call, [x, y], mx, my));
    }
    let mut nodes: Vec<&str> = rooms.iter().map(|(_, n)| n.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "one room per node: {rooms:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let load = rooms_by_node(&a).await;
        if ["node-a", "node-b", "node-c"]
            .iter()
            .all(|n| load.get(*n) == Some(&1))
        {
            break;
        }
        assert!(Instant::now() < deadline, "rooms by node: {load:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The node of one of the last two rooms that does not own the calls dies (-9).
    let (lost, users, mut p1, mut p2) = {
        let i = if rooms[1].1 != "node-a" { 0 } else { 1 };
        let (call, users, mx, my) = media.remove(i);
        (call, users, mx, my)
    };
    let victim = rooms
        .iter()
        .find(|(c, _)| *c == lost)
        .map(|(_, n)| n.clone())
        .expect("placed");
    let mut victim_proc = if victim == "node-b" { b } else { c };
    victim_proc.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
    let told = Instant::now();
    for m in [&mut p1, &mut p2] {
        let ev = m
            .wait_event("rtc_restart", Duration::from_secs(10), |d| {
                d["call_id"] == lost.as_str()
            })
            .await
            .unwrap_or_else(|| panic!("{} was not told the room is gone", m.user));
        assert_eq!(ev.data["reason"], "media_node_lost");
    }
    eprintln!(
        "participants told {:?} after kill -9 of the room's node ({victim})",
        told.elapsed()
    );
    drop((p1, p2));
    // They join again (as the SDK does on rtc_restart): the room is placed on a live node.
    let (mut q1, _) = MediaUser::join(a.client(users[0]).await, users[0], &lost)
        .await
        .expect("joins again");
    let (mut q2, _) = MediaUser::join(a.client(users[1]).await, users[1], &lost)
        .await
        .expect("joins again");
    media_flows(&mut q1, &mut q2).await;
    let moved = room_node(&a, &lost).await;
    assert_ne!(moved, victim, "the room is on a live node now");
    let load = rooms_by_node(&a).await;
    assert!(!load.contains_key(&victim), "{victim} is gone: {load:?}");
    drop((m1, m2, media));
}

/// The node a call's room is on, as the admin API says (waits for it to be placed).
async fn room_node(p: &Proc, call: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = admin(p, &format!("/v1/calls/{call}")).await;
        if let Some(n) = v["room_node"].as_str() {
            return n.to_owned();
        }
        assert!(Instant::now() < deadline, "no room node: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_keeps_media_and_signaling_recovers() {
    let Some(s) = shared() else { return skip() };
    let a = s.node("node-a").await;
    let b = s.node("node-b").await;
    until_nodes(&a, 2).await;
    let alice = a.client("alice").await;
    let mut bob = b.client("bob").await;
    let call = accepted_call(&alice, &mut bob, "bob").await;
    let (mut ma, _) = MediaUser::join(alice, "alice", &call).await.expect("join");
    let (mut mb, _) = MediaUser::join(bob, "bob", &call).await.expect("join");
    ma.publish(&[TrackSpec::video()]).await;
    let publisher = ma.publisher.take().expect("published");

    // Video flows; two seconds in, Redis is stopped and started again (empty).
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut worst = Duration::ZERO;
    let mut restarted: Option<Instant> = None;
    let mut restart = None;
    pump_until(
        &publisher,
        Pump {
            video: Some(0),
            ..Pump::default()
        },
        Duration::from_secs(20),
        || {
            if !mb.drain_packets().is_empty() {
                let now = Instant::now();
                if first.is_some() {
                    worst = worst.max(now - last);
                }
                first.get_or_insert(now);
                last = now;
            }
            if restarted.is_none() && first.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
                restart = Some(s.redis.restart_in_background());
                restarted = Some(Instant::now());
            }
            restarted.is_some_and(|t| t.elapsed() > Duration::from_secs(2))
        },
    )
    .await;
    assert!(restarted.is_some(), "media never started");
    restart
        .expect("restarting")
        .join()
        .expect("Redis restarted");
    eprintln!("longest gap in bob's video across the Redis restart: {worst:?}");
    assert!(
        worst < Duration::from_millis(500),
        "media stalled {worst:?} across the Redis restart"
    );

    // The sessions stayed up, and signaling between the nodes works again within seconds.
    ma.sig
        .request("ping", json!({}))
        .await
        .expect("alice's session survived");
    let carol = b.client("carol").await;
    let mut dave = a.client("dave").await;
    let since = restarted.expect("restarted");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = carol
            .request("call_invite", json!({"invitees": ["dave"], "timeout": 30}))
            .await;
        // An invite in flight while the nodes resync is answered `unavailable` with its outcome
        // unknown, and may have been applied: dave ringing is what says signaling is back.
        if dave
            .wait_for("call_invitation_received", Duration::from_secs(2))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "signaling across nodes never recovered: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An upper bound: the first try comes after two seconds of media.
    eprintln!(
        "a call between nodes rings {:?} after the Redis restart began",
        since.elapsed()
    );
    // Both nodes are in the registry again.
    until_nodes(&b, 2).await;
}

async fn admin_send(p: &Proc, method: reqwest::Method, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .request(method, p.url(path))
        .bearer_auth(common::process::token("ops", true))
        .send()
        .await
        .expect("admin request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_for_the_cluster_from_any_node_and_drains_one_node() {
    let Some(s) = shared() else { return skip() };
    let a = s.node("node-a").await;
    let mut b = s.node("node-b").await;
    until_nodes(&a, 2).await;
    until_nodes(&b, 2).await;
    let u1 = a.client("u1").await;
    let mut u2 = b.client("u2").await;
    let call = accepted_call(&u1, &mut u2, "u2").await;
    let (mut m1, _) = MediaUser::join(u1, "u1", &call).await.expect("join");
    let (mut m2, _) = MediaUser::join(u2, "u2", &call).await.expect("join");
    media_flows(&mut m1, &mut m2).await;
    let on = room_node(&a, &call).await;

    // Every series of a node's /metrics carries its node label, the process series too.
    for (p, node) in [(&a, "node-a"), (&b, "node-b")] {
        let text = reqwest::get(p.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let label = format!("node=\"{node}\"");
        let unlabelled: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty() && !l.contains(&label))
            .collect();
        assert!(unlabelled.is_empty(), "{node}: {unlabelled:?}");
        assert!(
            text.contains(&format!("process_cpu_seconds_total{{{label}}}")),
            "{node}"
        );
    }

    // Rooms, one room and one call, from either node, wherever the room is.
    for p in [&a, &b] {
        let rooms = admin(p, "/v1/rooms").await;
        let ids: Vec<&str> = rooms["rooms"]
            .as_array()
            .expect("rooms")
            .iter()
            .filter_map(|r| r["call_id"].as_str())
            .collect();
        assert_eq!(ids, [call.as_str()], "every node's rooms, once: {rooms}");
        let (status, room) =
            admin_send(p, reqwest::Method::GET, &format!("/v1/rooms/{call}")).await;
        assert_eq!(status, 200, "{room}");
        assert_eq!(
            room["participants"].as_array().map(Vec::len),
            Some(2),
            "{room}"
        );
        let c = admin(p, &format!("/v1/calls/{call}")).await;
        assert_eq!(c["room_node"], on.as_str(), "{c}");
        assert_eq!(c["room"]["call_id"], call.as_str(), "{c}");
    }

    // A call ended through a node that does not own the calls.
    let (status, body) =
        admin_send(&b, reqwest::Method::POST, &format!("/v1/calls/{call}/end")).await;
    assert_eq!(status, 200, "{body}");
    let c = admin(&a, &format!("/v1/calls/{call}")).await;
    assert_eq!(c["state"], "ended", "{c}");
    let (status, body) =
        admin_send(&b, reqwest::Method::POST, &format!("/v1/calls/{call}/end")).await;
    assert_eq!(status, 409, "already ended, as the owner says: {body}");

    // Node B drained from node A: it says so, takes no new rooms, and stops once it has none.
    let (status, body) =
        admin_send(&a, reqwest::Method::POST, "/v1/cluster/nodes/node-b/drain").await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Ok(Some(st)) = b.child.try_wait() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "node B never stopped after its drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "a drained node exits 0: {exit:?}");
    let view = until_nodes(&a, 1).await;
    assert_eq!(view["nodes"][0]["node_id"], "node-a", "{view}");
    let (status, _) = admin_send(&a, reqwest::Method::POST, "/v1/cluster/nodes/node-x/drain").await;
    assert_eq!(status, 404, "an unknown node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signaling_only_node_places_every_room_on_a_node_that_takes_rooms() {
    let Some(s) = shared() else { return skip() };
    // The owner takes no rooms: the first message it sends node B is the relayed rtc_join, from
    // the storage thread (which once had no runtime to start B's sender on, and aborted).
    let a = s
        .node_with(
            "node-a",
            &[("SWITCHBOARD_CLUSTER_TAKES_ROOMS", "false".to_owned())],
        )
        .await;
    let b = s.node("node-b").await;
    until_nodes(&a, 2).await;
    let view = admin(&a, "/v1/cluster").await;
    let a_info = view["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node_id"] == "node-a").cloned())
        .expect("node-a listed");
    assert_eq!(a_info["takes_rooms"], false, "{view}");
    for round in 0..2 {
        let x = a.client(&format!("x{round}")).await;
        let mut y = a.client(&format!("y{round}")).await;
        let call = accepted_call(&x, &mut y, &format!("y{round}")).await;
        let (mut mx, _) = MediaUser::join(x, &format!("x{round}"), &call)
            .await
            .expect("join");
        let (mut my, _) = MediaUser::join(y, &format!("y{round}"), &call)
            .await
            .expect("join");
        media_flows(&mut mx, &mut my).await;
        assert_eq!(room_node(&a, &call).await, "node-b", "round {round}");
    }
    drop(b);
}
