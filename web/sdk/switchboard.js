// Switchboard JavaScript SDK: signaling (call invitations) and media (rooms) over one WebSocket.
//
// One ES module, no dependencies, for browsers. See docs/sdk.md for a guide; the wire protocol it
// speaks is docs/protocol.md.
//
//   import { Switchboard } from '/sdk/switchboard.js';
//   const sb = new Switchboard({ token });
//   await sb.connect();
//   sb.on('call_invitation_received', (inv) => sb.callAccept(inv.call_id));
//
// Design notes:
// - Every op is a promise. A refusal rejects with a SwitchboardError whose `code` is the protocol's
//   error code (`busy`, `invalid_state`, ...) and whose `details` are the server's. Client-side
//   failures use three more codes: `disconnected`, `timeout` and `closed`.
// - Events are dispatched twice over: as DOM events (`addEventListener(name, e => e.detail)`) and to
//   `on(name, fn)` handlers, which get the event's `data` directly.
// - After a dropped socket the client reconnects with backoff. The server re-sends, at the start of
//   the new session, the invitations still ringing and the state of calls the user is in; the client
//   drops what it has already reported (by call ID and user state), and asks the call history for the
//   fate of calls that the replay no longer mentions, so an app sees each change once.
// - Media: `joinRoom` opens two peer connections, as the protocol says: a publisher (the client
//   offers, `rtc_publish`) and a subscriber (the server offers, `rtc_offer`). Incoming tracks are
//   mapped to users by the `msid` of their m-section (`<user_id> <track_id>`).

/** Human-readable text for every protocol error code, and for the SDK's own codes. */
export const ERROR_TEXT = Object.freeze({
  bad_request: 'The server did not understand the request.',
  unauthorized: 'Your sign-in is not valid (or has expired). Please sign in again.',
  call_not_found: 'That call does not exist any more.',
  not_invitee: 'Only someone who was invited can answer this call.',
  not_inviter: 'Only the person who sent the invitation can withdraw it.',
  invalid_state: 'The call has already moved on, so that is no longer possible.',
  mode_not_supported: 'That is only possible in a group call.',
  busy: 'You are already in another call.',
  too_many_users: 'Too many people for one call.',
  rate_limited: 'Too many requests at once. Wait a moment and try again.',
  internal: 'The server ran into a problem. Please try again.',
  unavailable: 'The server cannot save changes right now. Nothing was changed; please try again shortly.',
  disconnected: 'The connection to the server was lost.',
  timeout: 'The server did not answer in time.',
  closed: 'The connection was closed.',
  media: 'The camera or microphone could not be used.',
});

/** A readable sentence for an error code. */
export function describeError(code) {
  return ERROR_TEXT[code] ?? `Something went wrong (${code}).`;
}

/** An op that failed: `code` is a protocol error code or `disconnected` / `timeout` / `closed`. */
export class SwitchboardError extends Error {
  constructor(code, message, { details, op } = {}) {
    super(message || describeError(code));
    this.name = 'SwitchboardError';
    this.code = code;
    this.details = details ?? null;
    this.op = op ?? null;
  }
}

const RINGING = new Set(['inviting', 'received', 'offline']);
const MEDIA_EVENTS = new Set([
  'rtc_offer', 'rtc_candidate', 'participant_joined', 'participant_left', 'track_published',
  'track_unpublished', 'active_speakers', 'track_resolution', 'billing_tier', 'rtc_restart',
]);
const ENDED_CALLS_KEPT = 200;

/** A small event emitter on top of EventTarget: `on(name, fn)` handlers get the data directly. */
class Emitter extends EventTarget {
  #handlers = new Map();

  /** Calls `fn(data)` for every `name` event; returns a function that unsubscribes. */
  on(name, fn) {
    const wrapped = (e) => fn(e.detail);
    let byName = this.#handlers.get(name);
    if (!byName) this.#handlers.set(name, (byName = new Map()));
    byName.set(fn, wrapped);
    this.addEventListener(name, wrapped);
    return () => this.off(name, fn);
  }

  /** Removes a handler added with `on`. */
  off(name, fn) {
    const wrapped = this.#handlers.get(name)?.get(fn);
    if (!wrapped) return;
    this.removeEventListener(name, wrapped);
    this.#handlers.get(name).delete(fn);
  }

  /** Like `on`, for the next event only. */
  once(name, fn) {
    const off = this.on(name, (d) => {
      off();
      fn(d);
    });
    return off;
  }

  emit(name, data) {
    this.dispatchEvent(new CustomEvent(name, { detail: data }));
  }
}

function defaultBaseUrl() {
  return typeof location !== 'undefined' ? location.origin : '';
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * A signaling client: one WebSocket session of one user.
 *
 * Options: `token` (required), `url` (the server's base URL, default this page's origin),
 * `reconnect` (default true), `requestTimeout` ms (default 15000), `debug` (log frames).
 */
export class Switchboard extends Emitter {
  #opts;
  #ws = null;
  #state = 'idle';
  #nextId = 1;
  #pending = new Map();
  #heartbeat = null;
  #retryTimer = null;
  #attempt = 0;
  #everConnected = false;
  #connectWaiter = null;
  #calls = new Map();
  #rooms = new Map();
  #lastSeq = 0;
  #onOnline = null;

  constructor({ token, url = defaultBaseUrl(), reconnect = true, requestTimeout = 15000, debug = false } = {}) {
    super();
    if (!token) throw new TypeError('Switchboard: a token is required');
    this.#opts = { token, url: String(url).replace(/\/+$/, ''), reconnect, requestTimeout, debug };
    /** The `session` event's data of the current session (`session_id`, `user_id`, `heartbeat`...). */
    this.session = null;
  }

  /** `idle`, `connecting`, `open`, `reconnecting` or `closed`. */
  get state() {
    return this.#state;
  }

  /** The signed-in user's ID (known once connected). */
  get userId() {
    return this.session?.user_id ?? null;
  }

  /** Calls this client knows about, by call ID: `{call_id, caller, mode, extended_data, users: Map}`. */
  get calls() {
    return this.#calls;
  }

  /** Opens the session. Resolves with the `session` event's data; rejects with a SwitchboardError. */
  connect() {
    if (this.#state === 'open') return Promise.resolve(this.session);
    if (this.#connectWaiter) return this.#connectWaiter.promise;
    let resolve, reject;
    const promise = new Promise((res, rej) => ((resolve = res), (reject = rej)));
    this.#connectWaiter = { promise, resolve, reject };
    this.#setState('connecting');
    this.#open();
    if (typeof window !== 'undefined' && !this.#onOnline) {
      this.#onOnline = () => this.#retryNow();
      window.addEventListener('online', this.#onOnline);
    }
    return promise;
  }

  /** Closes the session for good: no reconnect; pending ops reject with `closed`; rooms are left. */
  close() {
    if (this.#state === 'closed') return;
    for (const room of this.#rooms.values()) room._teardown('closed');
    this.#rooms.clear();
    this.#setState('closed');
    clearTimeout(this.#retryTimer);
    this.#stopHeartbeat();
    if (this.#onOnline) window.removeEventListener('online', this.#onOnline);
    this.#failPending('closed');
    if (this.#ws) {
      const ws = this.#ws;
      this.#ws = null;
      try { ws.close(1000, 'client closed'); } catch { /* already closing */ }
    }
    this.#connectWaiter?.reject(new SwitchboardError('closed'));
    this.#connectWaiter = null;
    this.emit('closed', { code: 1000, reason: 'client closed' });
  }

  /**
   * Sends one op and resolves with its `result`. Rejects with a SwitchboardError carrying the
   * protocol `code` and `details`. Ops sent while the socket is down reject with `disconnected`.
   */
  request(op, args = {}, { timeout } = {}) {
    if (this.#state === 'closed') return Promise.reject(new SwitchboardError('closed', null, { op }));
    const ws = this.#ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || !this.session) {
      return Promise.reject(new SwitchboardError('disconnected', null, { op }));
    }
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      const ms = timeout ?? this.#opts.requestTimeout;
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new SwitchboardError('timeout', null, { op }));
      }, ms);
      this.#pending.set(id, { resolve, reject, timer, op });
      const frame = JSON.stringify({ id, op, args });
      if (this.#opts.debug) console.debug('switchboard →', frame);
      ws.send(frame);
    });
  }

  // ----- call invitation (PROTOCOL.md 3.2) -----

  /** Invites users. `opts`: `mode` ('general' | 'advanced'), `timeout` s, `extendedData` (string). */
  callInvite(invitees, { mode = 'general', timeout, extendedData = '' } = {}) {
    const args = { invitees, mode, extended_data: extendedData };
    if (timeout != null) args.timeout = timeout;
    return this.request('call_invite', args).then((r) => {
      this.#rememberOwnCall(r.call_id, mode, extendedData, invitees);
      return r;
    });
  }

  /** Invites more users into an advanced-mode call. */
  callingInvite(callId, invitees, { extendedData = '' } = {}) {
    return this.request('calling_invite', { call_id: callId, invitees, extended_data: extendedData });
  }

  /** Withdraws invitations: all still ringing, or only `invitees`. */
  callCancel(callId, { invitees, extendedData = '' } = {}) {
    const args = { call_id: callId, extended_data: extendedData };
    if (invitees?.length) args.invitees = invitees;
    return this.request('call_cancel', args);
  }

  /** Accepts an invitation. */
  callAccept(callId, { extendedData = '' } = {}) {
    return this.request('call_accept', { call_id: callId, extended_data: extendedData }).then((r) => {
      this.#setMine(callId, 'accepted');
      return r;
    });
  }

  /** Declines an invitation. */
  callReject(callId, { extendedData = '' } = {}) {
    return this.request('call_reject', { call_id: callId, extended_data: extendedData }).then((r) => {
      this.#setMine(callId, 'rejected');
      return r;
    });
  }

  /** Joins an advanced-mode call by ID. */
  callJoin(callId, { extendedData = '' } = {}) {
    return this.request('call_join', { call_id: callId, extended_data: extendedData });
  }

  /** Leaves an advanced-mode call. */
  callQuit(callId, { extendedData = '' } = {}) {
    return this.request('call_quit', { call_id: callId, extended_data: extendedData });
  }

  /** Ends an advanced-mode call for everyone. */
  callEnd(callId, { extendedData = '' } = {}) {
    return this.request('call_end', { call_id: callId, extended_data: extendedData });
  }

  /** The user's calls, newest first: `{calls, next_flag}`. */
  queryCallList({ count = 20, nextFlag = 0 } = {}) {
    return this.request('query_call_list', { count, next_flag: nextFlag });
  }

  /** Names and presence: `{users: [{user_id, user_name, online}]}`. */
  queryUsers(userIds) {
    return this.request('query_users', { user_ids: userIds });
  }

  /** Keepalive; resolves with `{server_time}`. */
  ping() {
    return this.request('ping', {});
  }

  // ----- media -----

  /**
   * Joins the media room of a call (the user must have accepted it) and publishes local media.
   * Options: `audio`, `video` (booleans, default true), `localStream` (a MediaStream to publish
   * instead of opening the camera and microphone), `simulcast` (default true), `videoConstraints`
   * (MediaTrackConstraints for the camera), and `on`: `{event: handler}` registered before joining,
   * so that no event is missed. Resolves with the Room once `rtc_join` and `rtc_publish` succeeded;
   * rejects with a SwitchboardError (then the room is closed).
   */
  async joinRoom(callId, opts = {}) {
    const existing = this.#rooms.get(callId);
    if (existing) return existing;
    const room = new Room(this, callId, opts);
    for (const [name, fn] of Object.entries(opts.on ?? {})) room.on(name, fn);
    this.#rooms.set(callId, room);
    try {
      await room._start();
    } catch (e) {
      room._teardown('failed');
      throw e;
    }
    return room;
  }

  /** The room of a call this client is in, if any. */
  room(callId) {
    return this.#rooms.get(callId) ?? null;
  }

  // ----- internals -----

  #setState(s) {
    if (this.#state === s) return;
    this.#state = s;
    this.emit('state', { state: s });
  }

  #wsUrl() {
    const base = this.#opts.url || defaultBaseUrl();
    return `${base.replace(/^http/, 'ws')}/v1/signal?token=${encodeURIComponent(this.#opts.token)}`;
  }

  #open() {
    let ws;
    try {
      ws = new WebSocket(this.#wsUrl());
    } catch (e) {
      this.#onSocketGone(null, 1006, String(e?.message ?? e), false);
      return;
    }
    this.#ws = ws;
    let opened = false;
    ws.onopen = () => { opened = true; };
    ws.onmessage = (m) => this.#onFrame(m.data);
    ws.onclose = (c) => {
      if (this.#ws === ws) this.#onSocketGone(ws, c.code, c.reason, opened);
    };
    ws.onerror = () => { /* a close follows */ };
  }

  async #onSocketGone(ws, code, reason, opened) {
    this.#ws = null;
    this.session = null;
    this.#stopHeartbeat();
    this.#failPending('disconnected');
    if (this.#state === 'closed') return;
    // 4001: this user joined a room from another session, which took the call over. The call moved;
    // this device stays signed in, so close its rooms and reconnect without rejoining them.
    if (code === 4001) for (const room of [...this.#rooms.values()]) room._teardown('replaced');
    for (const room of this.#rooms.values()) room._socketLost();
    // A socket that never opened may have been refused before the upgrade: ask over plain HTTP,
    // which answers 401 with the reason when the token is bad.
    let refusal = null;
    if (!opened) refusal = await this.#probeToken();
    if (this.#state === 'closed') return;
    const giveUp = (error) => {
      if (this.#connectWaiter) {
        this.#connectWaiter.reject(error);
        this.#connectWaiter = null;
      } else if (error.code === 'unauthorized') {
        this.emit('error', error);
      }
      this.#setState('closed');
      this.emit('closed', { code, reason: error.message, error });
    };
    if (refusal) return giveUp(refusal);
    // The first connection failed: report it to connect()'s caller rather than retrying blindly.
    if (!this.#everConnected) {
      return giveUp(new SwitchboardError('disconnected', `Cannot reach the server (${code}).`));
    }
    if (!this.#opts.reconnect) {
      return giveUp(new SwitchboardError('closed', reason || ERROR_TEXT.closed));
    }
    const delay = this.#backoff();
    this.#setState('reconnecting');
    this.emit('disconnected', { code, reason, retryIn: delay });
    clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(() => this.#open(), delay);
  }

  #retryNow() {
    if (this.#state !== 'reconnecting' || this.#ws) return;
    clearTimeout(this.#retryTimer);
    this.#open();
  }

  #backoff() {
    const base = Math.min(10000, 500 * 2 ** this.#attempt);
    this.#attempt += 1;
    return Math.round(base * (0.8 + Math.random() * 0.4));
  }

  async #probeToken() {
    try {
      const base = this.#opts.url || defaultBaseUrl();
      const r = await fetch(`${base}/v1/signal?token=${encodeURIComponent(this.#opts.token)}`, {
        cache: 'no-store',
      });
      if (r.status !== 401) return null;
      const body = await r.json().catch(() => ({}));
      return new SwitchboardError('unauthorized', body?.error?.message
        ? `${ERROR_TEXT.unauthorized} (${body.error.message})`
        : ERROR_TEXT.unauthorized);
    } catch {
      return null;
    }
  }

  #failPending(code) {
    for (const [id, p] of this.#pending) {
      clearTimeout(p.timer);
      p.reject(new SwitchboardError(code, null, { op: p.op }));
      this.#pending.delete(id);
    }
  }

  #startHeartbeat(seconds) {
    this.#stopHeartbeat();
    // Half the interval the server expects keeps us well inside its 2x window; a ping that goes
    // unanswered for a whole interval means the connection is dead even if TCP has not noticed.
    const every = Math.max(1000, (seconds * 1000) / 2);
    this.#heartbeat = setInterval(() => {
      const ws = this.#ws;
      this.request('ping', {}, { timeout: Math.max(5000, seconds * 1000) }).catch((e) => {
        if (e.code === 'timeout' && this.#ws === ws && ws) {
          try { ws.close(4000, 'heartbeat timeout'); } catch { /* closing */ }
        }
      });
    }, every);
  }

  #stopHeartbeat() {
    clearInterval(this.#heartbeat);
    this.#heartbeat = null;
  }

  #onFrame(text) {
    if (this.#opts.debug) console.debug('switchboard ←', text);
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg && typeof msg.event === 'string') {
      if (typeof msg.seq === 'number') {
        if (this.#lastSeq && msg.seq !== this.#lastSeq + 1 && msg.event !== 'session') {
          this.emit('warning', { message: `event sequence gap: ${this.#lastSeq} → ${msg.seq}` });
        }
        this.#lastSeq = msg.seq;
      }
      this.#onEvent(msg.event, msg.data ?? {});
      return;
    }
    if (msg && 'ok' in msg) {
      const p = msg.id != null ? this.#pending.get(msg.id) : null;
      if (!p) {
        // A reply without a readable id: the server could not parse one of our frames.
        if (!msg.ok) this.emit('error', new SwitchboardError(msg.error?.code ?? 'bad_request', msg.error?.message));
        return;
      }
      this.#pending.delete(msg.id);
      clearTimeout(p.timer);
      if (msg.ok) p.resolve(msg.result ?? {});
      else {
        const e = msg.error ?? {};
        p.reject(new SwitchboardError(e.code ?? 'internal', e.message, { details: e.details, op: p.op }));
      }
    }
  }

  #onEvent(name, data) {
    if (name === 'session') {
      this.#onSession(data);
      return;
    }
    if (MEDIA_EVENTS.has(name)) {
      if (name === 'billing_tier') this.#tiers.set(data.call_id, data);
      this.#rooms.get(data.call_id)?._onEvent(name, data);
      this.emit(name, data);
      return;
    }
    const out = this.#track(name, data);
    if (out) this.emit(name, out);
  }

  #onSession(data) {
    const resumed = this.#everConnected;
    this.session = data;
    this.#lastSeq = 1;
    this.#everConnected = true;
    this.#attempt = 0;
    this.#setState('open');
    this.#startHeartbeat(Number(data.heartbeat) || 30);
    // Replays of this session, for resync: which calls the server still reports.
    this.#replayed = new Set();
    this.#replaying = true;
    if (this.#connectWaiter) {
      this.#connectWaiter.resolve(data);
      this.#connectWaiter = null;
    }
    this.emit('connected', { ...data, resumed });
    // The reply to the first request comes after the replay; then we know what it left out.
    this.ping()
      .then(() => {
        this.#replaying = false;
        if (resumed) return this.#resync();
      })
      .catch(() => {});
    if (resumed) {
      for (const room of this.#rooms.values()) room._resume();
    }
  }

  #replayed = new Set();
  #replaying = false;
  #tiers = new Map();

  /** The latest `billing_tier` data the server sent for a call (null before the first). */
  billingTier(callId) {
    return this.#tiers.get(callId) ?? null;
  }

  // Remembers what was reported per call; returns the data to emit, or null for a duplicate.
  #track(name, d) {
    const me = this.userId;
    const id = d.call_id;
    if (!id) return d;
    if (this.#replaying) this.#replayed.add(id);
    let c = this.#calls.get(id);
    switch (name) {
      case 'call_invitation_received': {
        const known = c && !c.ended && RINGING.has(c.users.get(me)?.state);
        c = this.#upsert(d);
        for (const u of d.users ?? []) c.users.set(u.user_id, { state: u.state, extended_data: u.extended_data });
        if (!RINGING.has(c.users.get(me)?.state)) c.users.set(me, { state: 'received', extended_data: '' });
        c.deadline = Date.now() + (Number(d.timeout) || 0) * 1000;
        return known ? null : d;
      }
      case 'call_invitation_created': {
        if (c) return null;
        this.#upsert({ ...d, caller: me, inviter: me });
        return d;
      }
      case 'call_user_state_changed': {
        c ??= this.#upsert({ call_id: id });
        const changed = [];
        for (const u of d.users ?? []) {
          const prev = c.users.get(u.user_id);
          if (!prev || prev.state !== u.state) changed.push(u);
          c.users.set(u.user_id, { state: u.state, extended_data: u.extended_data });
        }
        if (!changed.length) return null;
        return { ...d, users: changed };
      }
      case 'call_invitation_cancelled':
      case 'call_invitation_timeout': {
        const st = name === 'call_invitation_cancelled' ? 'cancelled' : 'timeout';
        if (c && c.users.get(me)?.state === st) return null;
        c ??= this.#upsert(d);
        c.users.set(me, { state: st, extended_data: d.extended_data ?? '' });
        return d;
      }
      case 'call_invitation_ended': {
        if (c?.ended) return null;
        c ??= this.#upsert(d);
        c.ended = true;
        c.end_reason = d.reason;
        this.#forgetOldCalls();
        return d;
      }
      default:
        return d;
    }
  }

  #upsert(d) {
    let c = this.#calls.get(d.call_id);
    if (!c) {
      c = { call_id: d.call_id, users: new Map(), ended: false };
      this.#calls.set(d.call_id, c);
    }
    for (const k of ['caller', 'inviter', 'mode', 'extended_data', 'create_time']) {
      if (d[k] != null && c[k] == null) c[k] = d[k];
    }
    return c;
  }

  #rememberOwnCall(callId, mode, extendedData, invitees) {
    const me = this.userId;
    const c = this.#upsert({ call_id: callId, caller: me, inviter: me, mode, extended_data: extendedData });
    if (!c.users.has(me)) c.users.set(me, { state: 'accepted', extended_data: '' });
    for (const u of invitees) if (!c.users.has(u)) c.users.set(u, { state: 'inviting', extended_data: '' });
  }

  #setMine(callId, state) {
    const c = this.#calls.get(callId);
    if (c) c.users.set(this.userId, { state, extended_data: '' });
  }

  #forgetOldCalls() {
    const ended = [...this.#calls.values()].filter((c) => c.ended);
    for (const c of ended.slice(0, Math.max(0, ended.length - ENDED_CALLS_KEPT))) this.#calls.delete(c.call_id);
  }

  // After a reconnect: calls we were told about that the replay left out have changed while we were
  // away (ended, cancelled, timed out, or the user was dropped). Ask the history and report the
  // difference as the events we missed, flagged `resync: true`.
  async #resync() {
    const me = this.userId;
    const missing = [...this.#calls.values()].filter((c) => !c.ended && !this.#replayed.has(c.call_id));
    if (!missing.length) return;
    let history = [];
    try {
      history = (await this.queryCallList({ count: 100 })).calls ?? [];
    } catch {
      return;
    }
    for (const c of missing) {
      const info = history.find((h) => h.call_id === c.call_id);
      const users = info?.users ?? [];
      const changed = users.filter((u) => c.users.get(u.user_id)?.state !== u.state);
      const mine = changed.find((u) => u.user_id === me);
      if (changed.length) {
        for (const u of changed) c.users.set(u.user_id, { state: u.state, extended_data: u.extended_data });
        this.emit('call_user_state_changed', { call_id: c.call_id, users: changed, resync: true });
      }
      if (mine?.state === 'cancelled') {
        this.emit('call_invitation_cancelled', { call_id: c.call_id, inviter: c.inviter ?? c.caller, extended_data: '', mode: c.mode, resync: true });
      } else if (mine?.state === 'timeout') {
        this.emit('call_invitation_timeout', { call_id: c.call_id, mode: c.mode, resync: true });
      }
      if (!info || info.state === 'ended') {
        c.ended = true;
        this.emit('call_invitation_ended', {
          call_id: c.call_id,
          caller: info?.caller ?? c.caller,
          operated_user_id: info?.caller ?? c.caller,
          extended_data: '',
          mode: info?.mode ?? c.mode,
          end_time: info?.end_time ?? Date.now(),
          reason: info?.end_reason ?? 'completed',
          resync: true,
        });
      }
    }
  }

  _removeRoom(callId, room) {
    if (this.#rooms.get(callId) === room) this.#rooms.delete(callId);
  }
}

// ----- media -----

/** The simulcast layers to send for a camera of this height: rids q/h/f at 1/4, 1/2 and full. */
export function simulcastEncodings(height) {
  if (height >= 540) {
    return [
      { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
      { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
      { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
    ];
  }
  if (height >= 270) {
    return [
      { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 300_000 },
      { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 900_000 },
    ];
  }
  return null;
}

/** Per m-section of an SDP: `mid` → `{mid, kind, userId, trackId, direction}` (msid = `<user> <track>`). */
export function parseMsids(sdp) {
  const out = new Map();
  let cur = null;
  for (const raw of String(sdp).split(/\r?\n/)) {
    const line = raw.trim();
    if (line.startsWith('m=')) {
      const [kind, port] = line.slice(2).split(' ');
      cur = { kind, mid: null, userId: null, trackId: null, direction: port === '0' ? 'inactive' : 'sendrecv' };
      continue;
    }
    if (!cur) continue;
    if (line.startsWith('a=mid:')) {
      cur.mid = line.slice(6);
      out.set(cur.mid, cur);
    } else if (line.startsWith('a=msid:')) {
      const [s, t] = line.slice(7).split(/\s+/);
      cur.userId = s;
      cur.trackId = t ?? null;
    } else if (!cur.userId && /^a=ssrc:\d+ msid:/.test(line)) {
      const [s, t] = line.replace(/^a=ssrc:\d+ msid:/, '').split(/\s+/);
      cur.userId = s;
      cur.trackId = t ?? null;
    } else if (/^a=(sendrecv|sendonly|recvonly|inactive)$/.test(line) && cur.direction !== 'inactive') {
      cur.direction = line.slice(2);
    }
  }
  return out;
}

/** Opens the camera and/or microphone. `video` may be true, false, or MediaTrackConstraints. */
export async function getLocalMedia({ audio = true, video = true } = {}) {
  const constraints = {
    audio: audio ? { echoCancellation: true, noiseSuppression: true, autoGainControl: true } : false,
    video: video ? (video === true ? defaultVideoConstraints() : video) : false,
  };
  try {
    return await navigator.mediaDevices.getUserMedia(constraints);
  } catch (e) {
    throw new SwitchboardError('media', `${ERROR_TEXT.media} (${e?.name ?? 'error'}: ${e?.message ?? ''})`);
  }
}

function defaultVideoConstraints() {
  return { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } };
}

// How long a connection may stay `disconnected` before it is ICE-restarted, and how long an ICE
// restart may take before the room is joined again from scratch.
const ICE_DISCONNECTED_WAIT_MS = 1500;
const ICE_RESTART_TIMEOUT_MS = 8000;

const PC_CONFIG = { iceServers: [], bundlePolicy: 'max-bundle', rtcpMuxPolicy: 'require' };

/**
 * One call's media room. Create it with `Switchboard.joinRoom`.
 *
 * Events (`on(name, fn)` or `addEventListener`):
 * - `participant_joined` / `participant_left` `{user_id}` (joined also for those already there,
 *   with `existing: true`);
 * - `track` `{userId, trackId, kind, track, stream}`: remote media to play; `stream` is that
 *   user's MediaStream (audio and video together);
 * - `track_ended` `{userId, trackId, kind}`;
 * - `track_published` / `track_unpublished`, `active_speakers`, `track_resolution`,
 *   `billing_tier`: the protocol's events, as sent;
 * - `local_stream` `{stream}` when the published camera changes;
 * - `connection` `{publisher, subscriber, signaling}`: the peer connections' states, and whether
 *   the signaling socket is up;
 * - `closed` `{reason}`: `left`, `replaced` (joined elsewhere), `failed` or `closed`.
 */
export class Room extends Emitter {
  #client;
  #opts;
  #pub = null;
  #sub = null;
  #subChain = Promise.resolve();
  #pubCandidates = [];
  #subCandidates = [];
  #remoteCandidates = { publisher: [], subscriber: [] };
  #pubReady = false;
  #subReady = false;
  #ownsStream = false;
  #midMap = new Map();
  #bound = new Map();
  #goneTracks = new Set();
  #joinedSince = null;
  #closed = false;
  #restarting = null;
  // Per connection ('publisher', 'subscriber'): the pending recovery timer, and whether an ICE
  // restart was already tried since it last connected.
  #recoverTimers = new Map();
  #iceServers = [];
  #restartDeadlines = new Map();
  #iceRestarted = new Set();

  constructor(client, callId, opts = {}) {
    super();
    this.#client = client;
    this.callId = callId;
    this.#opts = { audio: true, video: true, simulcast: true, ...opts };
    /** The published MediaStream (camera and microphone). */
    this.localStream = opts.localStream ?? null;
    /** Others in the room: user ID → `{user_id, tracks: Map(track_id → Track), stream}`. */
    this.participants = new Map();
    /** Measured resolutions: track ID → Map(rid → `{width, height}`). */
    this.resolutions = new Map();
    /** The latest `billing_tier` data for this user in this room, or null (`tier` is null while
     * nothing is received). */
    this.billingTier = client.billingTier(callId);
    /** The latest active speakers, loudest first. */
    this.activeSpeakers = [];
    this.microphoneEnabled = true;
    this.cameraEnabled = !!this.#opts.video;
  }

  get closed() {
    return this.#closed;
  }

  /** Turns the microphone on or off (the track keeps running and sends silence). */
  setMicrophoneEnabled(on) {
    this.microphoneEnabled = !!on;
    for (const t of this.localStream?.getAudioTracks() ?? []) t.enabled = this.microphoneEnabled;
  }

  /**
   * Turns the camera on or off. Off stops the camera (its light goes out) and stops sending video;
   * on opens it again and sends on the same simulcast encodings.
   */
  async setCameraEnabled(on) {
    on = !!on;
    if (!this.#opts.video || on === this.cameraEnabled) return;
    const sender = this.#videoSender();
    if (!on) {
      this.cameraEnabled = false;
      await sender?.replaceTrack(null);
      for (const t of this.localStream?.getVideoTracks() ?? []) {
        t.stop();
        this.localStream.removeTrack(t);
      }
    } else {
      const s = await getLocalMedia({ audio: false, video: this.#opts.videoConstraints ?? true });
      const track = s.getVideoTracks()[0];
      this.localStream ??= new MediaStream();
      this.localStream.addTrack(track);
      this.cameraEnabled = true;
      await sender?.replaceTrack(track);
    }
    this.emit('local_stream', { stream: this.localStream });
  }

  /** Pauses, resumes or caps a remote track (`rtc_subscription`). */
  setSubscription(trackId, { enabled = true, maxWidth, maxHeight } = {}) {
    const args = { call_id: this.callId, track_id: trackId, enabled };
    if (maxWidth != null) args.max_width = maxWidth;
    if (maxHeight != null) args.max_height = maxHeight;
    return this.#client.request('rtc_subscription', args);
  }

  /** Leaves the room (`rtc_leave`) and closes both peer connections; local tracks are stopped. */
  async leave() {
    if (this.#closed) return;
    const p = this.#client.request('rtc_leave', { call_id: this.callId }).catch(() => {});
    this._teardown('left');
    await p;
  }

  /** Stats of both connections, for diagnostics. */
  async getStats() {
    return {
      publisher: this.#pub ? await this.#pub.getStats() : null,
      subscriber: this.#sub ? await this.#sub.getStats() : null,
    };
  }

  // ----- lifecycle (called by the client) -----

  async _start() {
    if (!this.localStream && (this.#opts.audio || this.#opts.video)) {
      this.localStream = await getLocalMedia({ audio: this.#opts.audio, video: this.#opts.video ? (this.#opts.videoConstraints ?? true) : false });
      this.#ownsStream = true;
    }
    await this.#connect();
  }

  async #connect({ rejoin = false } = {}) {
    this.#newSubscriber();
    // Events can overtake the reply to rtc_join: whoever joins meanwhile is announced by an event,
    // and the reply's list (taken when our join was applied) does not name them.
    this.#joinedSince = new Set();
    const joined = await this.#client.request('rtc_join', { call_id: this.callId });
    if (this.#closed) return;
    // TURN servers for clients that cannot reach the media port directly (docs/protocol.md,
    // `ice_servers`). The publisher connection is made with them; the subscriber one, made
    // before the join so that no offer is missed, gets them now. Without TURN nothing changes.
    this.#iceServers = Array.isArray(joined.ice_servers) ? joined.ice_servers : [];
    if (this.#iceServers.length && this.#sub) {
      try {
        this.#sub.setConfiguration(this.#pcConfig());
      } catch (e) {
        this.emit('error', e);
      }
    }
    const present = new Set(this.#joinedSince);
    this.#joinedSince = null;
    for (const p of joined.participants ?? []) {
      present.add(p.user_id);
      const known = this.#addParticipant(p.user_id, true);
      for (const t of p.tracks ?? []) known.tracks.set(t.track_id, t);
    }
    // After a rejoin: whoever left while we were away.
    if (rejoin) for (const uid of [...this.participants.keys()]) if (!present.has(uid)) this.#removeParticipant(uid, { rejoin: true });
    await this.#publish();
  }

  _socketLost() {
    // The server drops our participant with the session; media may keep flowing a moment, but the
    // room must be joined again on the next session.
    this.emit('connection', { publisher: 'disconnected', subscriber: 'disconnected', signaling: false });
  }

  _resume() {
    this.#restart('resume');
  }

  #restart(why) {
    if (this.#closed || this.#restarting) return this.#restarting;
    this.#restarting = (async () => {
      // Participants stay (the rejoin reconciles them); their tracks end with the old connection.
      for (const mid of [...this.#bound.keys()]) this.#unbind(mid);
      this.#closePcs();
      try {
        await this.#connect({ rejoin: true });
      } catch (e) {
        this.emit('error', e);
        if (e.code === 'invalid_state' || e.code === 'call_not_found') this._teardown('failed');
      } finally {
        this.#restarting = null;
      }
    })();
    this.emit('restarting', { reason: why });
    return this.#restarting;
  }

  _teardown(reason) {
    if (this.#closed) return;
    this.#closed = true;
    for (const t of [...this.#recoverTimers.values(), ...this.#restartDeadlines.values()]) clearTimeout(t);
    this.#closePcs();
    if (this.#ownsStream) for (const t of this.localStream?.getTracks() ?? []) t.stop();
    this.#client._removeRoom(this.callId, this);
    this.emit('closed', { reason });
  }

  #closePcs() {
    for (const pc of [this.#pub, this.#sub]) {
      if (!pc) continue;
      pc.onicecandidate = pc.ontrack = pc.onconnectionstatechange = null;
      try { pc.close(); } catch { /* closed */ }
    }
    this.#pub = this.#sub = null;
    for (const t of [...this.#recoverTimers.values(), ...this.#restartDeadlines.values()]) clearTimeout(t);
    this.#recoverTimers.clear();
    this.#restartDeadlines.clear();
    this.#iceRestarted.clear();
    this.#pubReady = this.#subReady = false;
    this.#pubCandidates = [];
    this.#subCandidates = [];
    this.#remoteCandidates = { publisher: [], subscriber: [] };
    this.#midMap.clear();
    this.#bound.clear();
    this.#subChain = Promise.resolve();
  }

  // ----- publisher -----

  #pcConfig() {
    return this.#iceServers.length ? { ...PC_CONFIG, iceServers: this.#iceServers } : PC_CONFIG;
  }

  async #publish() {
    const pc = new RTCPeerConnection(this.#pcConfig());
    this.#pub = pc;
    this.#watch(pc, 'publisher');
    pc.onicecandidate = (e) => this.#localCandidate('publisher', e.candidate);
    const stream = this.localStream;
    const audio = stream?.getAudioTracks()[0];
    const video = stream?.getVideoTracks()[0];
    if (audio) {
      audio.enabled = this.microphoneEnabled;
      pc.addTransceiver(audio, { direction: 'sendonly', streams: [stream] });
    }
    if (this.#opts.video) {
      const height = video?.getSettings?.().height ?? 0;
      const encodings = this.#opts.simulcast ? simulcastEncodings(height) : null;
      const init = { direction: 'sendonly', streams: stream ? [stream] : [] };
      if (encodings) init.sendEncodings = encodings;
      pc.addTransceiver(video ?? 'video', init);
      if (!video) this.cameraEnabled = false;
    }
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const { sdp } = await this.#client.request('rtc_publish', { call_id: this.callId, sdp: pc.localDescription.sdp });
    if (this.#pub !== pc) return;
    await pc.setRemoteDescription({ type: 'answer', sdp });
    this.#pubReady = true;
    this.#flushCandidates('publisher');
  }

  #videoSender() {
    return this.#pub?.getTransceivers().find((t) => t.sender && (t.sender.track?.kind === 'video' || t.receiver.track?.kind === 'video'))?.sender ?? null;
  }

  // ----- subscriber -----

  #newSubscriber() {
    const pc = new RTCPeerConnection(this.#pcConfig());
    this.#sub = pc;
    this.#watch(pc, 'subscriber');
    pc.onicecandidate = (e) => this.#localCandidate('subscriber', e.candidate);
    // Tracks are bound after each negotiation from the transceivers themselves (see #reconcile),
    // which also covers a server that reuses an m-section for another track.
    pc.ontrack = () => {};
  }

  #onOffer(sdp) {
    const pc = this.#sub;
    if (!pc) return;
    this.#subChain = this.#subChain
      .then(async () => {
        if (this.#sub !== pc) return;
        await pc.setRemoteDescription({ type: 'offer', sdp });
        for (const [mid, info] of parseMsids(sdp)) this.#midMap.set(mid, info);
        const answer = await pc.createAnswer();
        await pc.setLocalDescription(answer);
        await this.#client.request('rtc_answer', { call_id: this.callId, sdp: pc.localDescription.sdp });
        if (this.#sub !== pc) return;
        this.#subReady = true;
        this.#flushCandidates('subscriber');
        this.#reconcile();
      })
      .catch((e) => {
        if (this.#sub === pc) this.emit('error', e);
      });
  }

  // Binds each receiving transceiver to the user and track its m-section's msid names.
  #reconcile() {
    const pc = this.#sub;
    // Mid-negotiation the directions are in flux; the negotiation reconciles when it completes.
    if (!pc || pc.signalingState !== 'stable') return;
    for (const tr of pc.getTransceivers()) {
      const mid = tr.mid;
      if (mid == null) continue;
      const info = this.#midMap.get(mid);
      // Only tracks of participants we know and tracks not unpublished since: a negotiation that
      // started before a track_unpublished or participant_left must not bring them back.
      const receiving = info && this.participants.has(info.userId) && !this.#goneTracks.has(info.trackId)
        && info.direction !== 'inactive' && tr.currentDirection !== 'inactive' && tr.currentDirection !== 'stopped';
      const prev = this.#bound.get(mid);
      if (prev && (!receiving || prev.trackId !== info.trackId || prev.userId !== info.userId)) {
        this.#unbind(mid);
      }
      if (!receiving || this.#bound.has(mid)) continue;
      const track = tr.receiver.track;
      const userId = info.userId;
      const p = this.participants.get(userId);
      for (const t of p.stream.getTracks()) if (t.kind === track.kind) p.stream.removeTrack(t);
      p.stream.addTrack(track);
      this.#bound.set(mid, { userId, trackId: info.trackId, kind: track.kind, track });
      this.emit('track', { userId, trackId: info.trackId, kind: track.kind, track, stream: p.stream });
    }
  }

  #unbind(mid) {
    const b = this.#bound.get(mid);
    if (!b) return;
    this.#bound.delete(mid);
    const p = this.participants.get(b.userId);
    if (p) p.stream.removeTrack(b.track);
    this.emit('track_ended', { userId: b.userId, trackId: b.trackId, kind: b.kind });
  }

  // ----- ICE -----

  #localCandidate(target, candidate) {
    if (!candidate || !candidate.candidate) return;
    const init = candidate.toJSON();
    const ready = target === 'publisher' ? this.#pubReady : this.#subReady;
    if (!ready) {
      (target === 'publisher' ? this.#pubCandidates : this.#subCandidates).push(init);
      return;
    }
    this.#sendCandidate(target, init);
  }

  #sendCandidate(target, candidate) {
    this.#client.request('rtc_candidate', { call_id: this.callId, target, candidate }).catch(() => {});
  }

  #flushCandidates(target) {
    const list = target === 'publisher' ? this.#pubCandidates : this.#subCandidates;
    for (const c of list.splice(0)) this.#sendCandidate(target, c);
    const pc = target === 'publisher' ? this.#pub : this.#sub;
    for (const c of this.#remoteCandidates[target].splice(0)) pc?.addIceCandidate(c).catch(() => {});
  }

  #remoteCandidate(target, candidate) {
    const pc = target === 'publisher' ? this.#pub : this.#sub;
    if (!pc || !candidate) return;
    if (!pc.remoteDescription) {
      this.#remoteCandidates[target].push(candidate);
      return;
    }
    pc.addIceCandidate(candidate).catch(() => {});
  }

  #watch(pc, which) {
    pc.onconnectionstatechange = () => {
      if (pc !== this.#pub && pc !== this.#sub) return;
      const state = {
        publisher: this.#pub?.connectionState ?? 'new',
        subscriber: this.#sub?.connectionState ?? 'new',
        signaling: true,
      };
      this.emit('connection', state);
      clearTimeout(this.#recoverTimers.get(which));
      this.#recoverTimers.delete(which);
      if (pc.connectionState === 'connected') {
        this.#iceRestarted.delete(which);
        clearTimeout(this.#restartDeadlines.get(which));
        this.#restartDeadlines.delete(which);
        return;
      }
      // A path that failed (or stays disconnected, as after a network change) is first repaired
      // with an ICE restart of that connection alone; if that does not reconnect it, the room is
      // joined again from scratch.
      const lost = pc.connectionState === 'failed' || pc.connectionState === 'disconnected';
      if (lost && this.#client.state === 'open') {
        const wait = pc.connectionState === 'failed' ? 0 : ICE_DISCONNECTED_WAIT_MS;
        this.#recoverTimers.set(which, setTimeout(() => this.#recover(pc, which), wait));
      }
    };
  }

  async #recover(pc, which) {
    const current = () => (which === 'publisher' ? this.#pub : this.#sub) === pc;
    if (!current() || pc.connectionState === 'connected' || this.#closed) return;
    if (this.#iceRestarted.has(which) || this.#client.state !== 'open') {
      this.#restart(`${which} ${pc.connectionState}`);
      return;
    }
    this.#iceRestarted.add(which);
    this.emit('ice_restart', { connection: which });
    try {
      if (which === 'publisher') {
        const offer = await pc.createOffer({ iceRestart: true });
        await pc.setLocalDescription(offer);
        const { sdp } = await this.#client.request('rtc_publish', { call_id: this.callId, sdp: pc.localDescription.sdp });
        if (!current()) return;
        await pc.setRemoteDescription({ type: 'answer', sdp });
      } else {
        // The server answers with a new rtc_offer carrying fresh credentials.
        await this.#client.request('rtc_ice_restart', { call_id: this.callId });
      }
    } catch (e) {
      if (current()) this.#restart(`${which} ICE restart failed`);
      return;
    }
    // Not connected again in time: rebuild everything.
    this.#restartDeadlines.set(which, setTimeout(() => {
      if (current() && pc.connectionState !== 'connected') this.#restart(`${which} ICE restart timed out`);
    }, ICE_RESTART_TIMEOUT_MS));
  }

  // ----- server events for this room -----

  _onEvent(name, d) {
    if (this.#closed) return;
    switch (name) {
      case 'rtc_offer':
        this.#onOffer(d.sdp);
        return;
      case 'rtc_candidate':
        this.#remoteCandidate(d.target, d.candidate);
        return;
      case 'rtc_restart':
        // The room's media node is gone (a cluster): joining again places the room on a live one.
        this.#restart(d.reason || 'rtc_restart');
        return;
      case 'participant_joined':
        this.#joinedSince?.add(d.user_id);
        this.#addParticipant(d.user_id, false);
        this.#reconcile();
        return;
      case 'participant_left':
        if (d.user_id === this.#client.userId) {
          this._teardown('replaced');
          return;
        }
        this.#removeParticipant(d.user_id);
        return;
      case 'track_published': {
        const p = this.#addParticipant(d.user_id, false);
        this.#goneTracks.delete(d.track_id);
        p.tracks.set(d.track_id, { track_id: d.track_id, user_id: d.user_id, kind: d.kind, mid: d.mid, rids: d.rids ?? [] });
        break;
      }
      case 'track_unpublished': {
        this.#goneTracks.add(d.track_id);
        this.participants.get(d.user_id)?.tracks.delete(d.track_id);
        this.resolutions.delete(d.track_id);
        for (const [mid, b] of this.#bound) if (b.trackId === d.track_id) this.#unbind(mid);
        break;
      }
      case 'active_speakers':
        this.activeSpeakers = d.user_ids ?? [];
        break;
      case 'track_resolution': {
        let layers = this.resolutions.get(d.track_id);
        if (!layers) this.resolutions.set(d.track_id, (layers = new Map()));
        layers.set(d.rid ?? '', { width: d.width, height: d.height });
        break;
      }
      case 'billing_tier':
        this.billingTier = d;
        break;
      default:
        break;
    }
    this.emit(name, d);
  }

  #addParticipant(userId, existing) {
    let p = this.participants.get(userId);
    if (!p) {
      p = { user_id: userId, tracks: new Map(), stream: new MediaStream() };
      this.participants.set(userId, p);
      this.emit('participant_joined', { call_id: this.callId, user_id: userId, existing });
    }
    return p;
  }

  // `rejoin`: not announced by the server, but missing when we joined again; they may well be on
  // their way back too.
  #removeParticipant(userId, { rejoin = false } = {}) {
    const p = this.participants.get(userId);
    if (!p) return;
    for (const [mid, b] of this.#bound) if (b.userId === userId) this.#unbind(mid);
    for (const id of p.tracks.keys()) this.resolutions.delete(id);
    this.participants.delete(userId);
    this.emit('participant_left', rejoin ? { call_id: this.callId, user_id: userId, rejoin } : { call_id: this.callId, user_id: userId });
  }

  /** The resolution the server measured of the layer closest to `height`, or the largest. */
  measuredResolution(trackId, height) {
    const layers = [...(this.resolutions.get(trackId)?.values() ?? [])];
    if (!layers.length) return null;
    if (height) {
      layers.sort((a, b) => Math.abs(a.height - height) - Math.abs(b.height - height));
      return layers[0];
    }
    return layers.reduce((a, b) => (b.width * b.height > a.width * a.height ? b : a));
  }
}

export default Switchboard;
