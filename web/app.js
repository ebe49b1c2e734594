// The Switchboard web app: sign in, call people, answer, talk. Built on the SDK at /sdk/switchboard.js.
//
// Views: sign-in → home → (waiting | incoming dialog) → call. One call at a time. One-to-one calls
// use general mode (hang up = leave the room); calls to several people use advanced mode, which
// allows inviting more during the call (hang up = call_quit).
//
// URL parameters: `timeout` (seconds an invitation rings, default 60; the tests use a short one),
// `video` (camera size as WxH, e.g. 640x360, default 1280x720), `debug=1` (log every frame).

import { Switchboard, describeError, getLocalMedia } from '/sdk/switchboard.js';
import {
  fillIcons, formatDuration, formatWhen, h, icon, joinNames, paintAvatar, ring, setIcon, showView, toast,
} from '/ui.js';

const params = new URLSearchParams(location.search);
const INVITE_TIMEOUT = intParam('timeout', 1, 600) ?? 60;
const VIDEO_SIZE = sizeParam('video') ?? { width: 1280, height: 720 };
const USER_ID = /^[A-Za-z0-9_.@-]{1,64}$/;
const RINGING = new Set(['inviting', 'received', 'offline']);
const TOKEN_KEY = 'switchboard.session';
// General mode has no "hang up" signal: the other side leaving the room is the sign. A short wait
// lets a reloading page come back; after our own reconnect, the other side may be reconnecting too.
const PEER_LEFT_GRACE_MS = 2500;
const PEER_AWAY_AFTER_REJOIN_MS = 15000;
const TIER_LABELS = { audio: 'Audio', hd: 'HD', full_hd: 'Full HD', '2k': '2K', '4k': '4K', '4k_plus': '4K+' };

const $ = (id) => document.getElementById(id);

const app = {
  sb: null,
  me: null,
  names: new Map(),
  incoming: [],
  shown: null,
  answering: null,
  outgoing: null,
  call: null,
  left: new Set(),
  stopRing: null,
};

function intParam(name, min, max) {
  const v = Number.parseInt(params.get(name) ?? '', 10);
  return Number.isFinite(v) ? Math.min(max, Math.max(min, v)) : null;
}

function sizeParam(name) {
  const m = /^(\d{2,4})x(\d{2,4})$/.exec(params.get(name) ?? '');
  return m ? { width: Number(m[1]), height: Number(m[2]) } : null;
}

function videoConstraints() {
  return { width: { ideal: VIDEO_SIZE.width }, height: { ideal: VIDEO_SIZE.height }, frameRate: { ideal: 30 } };
}

function parseExt(text) {
  try {
    const v = JSON.parse(text || '{}');
    return v && typeof v === 'object' ? v : {};
  } catch {
    return {};
  }
}

function parseIds(text) {
  return [...new Set(String(text).split(/[\s,;]+/).map((s) => s.trim()).filter(Boolean))];
}

function nameOf(id) {
  if (id === app.me?.id) return app.me.name;
  return app.names.get(id) || id;
}

async function learnNames(ids) {
  const unknown = [...new Set(ids)].filter((id) => id && id !== app.me?.id && !app.names.has(id));
  if (!unknown.length || !app.sb) return;
  try {
    const { users } = await app.sb.queryUsers(unknown);
    let changed = false;
    for (const u of users ?? []) {
      if (u.user_name) {
        app.names.set(u.user_id, u.user_name);
        changed = true;
      }
    }
    if (changed) refreshNames();
  } catch {
    /* names are a nicety */
  }
}

function refreshNames() {
  if (app.shown) renderIncoming(app.shown);
  if (app.outgoing) {
    $('waiting-name').textContent = nameOf(app.outgoing.callee);
    paintAvatar($('waiting-avatar'), app.outgoing.callee, nameOf(app.outgoing.callee));
  }
  if (app.call) {
    for (const [id, tile] of app.call.tiles) if (id !== app.me.id) tile.setName(nameOf(id));
    renderCallTitle();
  }
}

function tokenClaims(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), '=')));
  } catch {
    return {};
  }
}

// ----- sign in -----

function showSignIn(message) {
  $('topbar').hidden = true;
  showView('view-signin', { focus: false });
  const err = $('signin-error');
  err.hidden = !message;
  err.textContent = message ?? '';
  (app.tokenMode ? $('signin-token') : $('signin-user')).focus();
}

// Sign in with a pasted token instead of a user ID (the only way outside development mode).
function setTokenMode(on) {
  app.tokenMode = on;
  $('token-field').hidden = !on;
  $('user-field').hidden = on;
  $('name-field').hidden = on;
  $('token-toggle').textContent = on ? 'Sign in with a user ID instead' : 'I have an access token';
  $('token-toggle').hidden = on && app.devTokens === false;
  $('signin-lead').textContent = on
    ? 'Paste the access token you were given. It says who you are.'
    : 'Pick a user ID that others can call you by.';
  $('signin-error').hidden = true;
  for (const el of [$('signin-user'), $('signin-token')]) el.removeAttribute('aria-invalid');
}

async function onSignIn(e) {
  e.preventDefault();
  const err = $('signin-error');
  err.hidden = true;
  const submit = $('signin-submit');
  const userId = $('signin-user').value.trim();
  const name = $('signin-name').value.trim();
  const pasted = app.tokenMode ? $('signin-token').value.trim() : '';
  const fail = (msg, field) => {
    err.textContent = msg;
    err.hidden = false;
    field?.setAttribute('aria-invalid', 'true');
    field?.focus();
  };
  $('signin-user').removeAttribute('aria-invalid');
  $('signin-token').removeAttribute('aria-invalid');
  if (app.tokenMode && !pasted) {
    fail('Paste an access token.', $('signin-token'));
    return;
  }
  let token = pasted;
  submit.disabled = true;
  submit.setAttribute('aria-busy', 'true');
  try {
    if (!token) {
      if (!USER_ID.test(userId)) {
        fail(userId ? 'A user ID may only use letters, digits and _ . @ - (up to 64).' : 'Enter a user ID.', $('signin-user'));
        return;
      }
      let r;
      try {
        r = await fetch('/v1/dev/token', {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify(name ? { user_id: userId, name } : { user_id: userId }),
        });
      } catch {
        fail('Cannot reach the server. Check that it is running.');
        return;
      }
      if (r.status === 404) {
        app.devTokens = false;
        setTokenMode(true);
        fail('This server is not in development mode, so it does not hand out tokens: sign in with an access token.', $('signin-token'));
        return;
      }
      const body = await r.json().catch(() => ({}));
      if (!r.ok || !body.token) {
        fail(body?.error?.message ? `The server refused: ${body.error.message}.` : describeError(body?.error?.code ?? 'internal'));
        return;
      }
      token = body.token;
    }
    const ok = await startSession(token, app.tokenMode ? '' : name);
    if (!ok && app.tokenMode) $('signin-token').setAttribute('aria-invalid', 'true');
  } finally {
    submit.disabled = false;
    submit.removeAttribute('aria-busy');
  }
}

async function startSession(token, name) {
  const sb = new Switchboard({ token, debug: params.get('debug') === '1' });
  try {
    const session = await sb.connect();
    const claims = tokenClaims(token);
    app.sb = sb;
    app.me = { id: session.user_id, name: name || claims.name || session.user_id };
  } catch (e) {
    sb.close();
    sessionStorage.removeItem(TOKEN_KEY);
    showSignIn(e.code === 'unauthorized' ? 'That token was refused. It may have expired or be for another server.' : `Could not connect: ${e.message}`);
    return false;
  }
  sessionStorage.setItem(TOKEN_KEY, JSON.stringify({ token, name: app.me.name }));
  wire(sb);
  renderConnection(sb.state);
  $('topbar').hidden = false;
  $('me-name').textContent = app.me.name;
  $('me-id').textContent = app.me.name !== app.me.id ? `@${app.me.id}` : '';
  paintAvatar($('me-avatar'), app.me.id, app.me.name);
  if (!app.call && !app.outgoing) showHome();
  return true;
}

function signOut(message) {
  // Hang up first (quietly): the others should not wait for the server to notice we are gone.
  if (app.call) {
    const { callId, mode, room } = app.call;
    const sb = app.sb;
    teardownCall();
    room?.leave();
    if (mode === 'advanced') sb?.callQuit(callId).catch(() => {});
  }
  if (app.outgoing) {
    app.sb?.callCancel(app.outgoing.callId).catch(() => {});
    clearOutgoing();
  }
  for (const inv of [...app.incoming]) closeIncoming(inv.call_id);
  const sb = app.sb;
  app.sb = null;
  sb?.close();
  app.me = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $('signin-token').value = '';
  showSignIn(message);
}

function wire(sb) {
  sb.on('call_invitation_received', onInvitation);
  sb.on('call_invitation_cancelled', (d) => onInvitationGone(d, 'cancelled'));
  sb.on('call_invitation_timeout', (d) => onInvitationGone(d, 'timeout'));
  sb.on('call_user_state_changed', onUserStates);
  sb.on('call_invitation_ended', onCallEnded);
  sb.on('state', ({ state }) => renderConnection(state));
  sb.on('connected', (d) => {
    if (d.resumed) toast('Reconnected.', { kind: 'success', ms: 2500 });
  });
  sb.on('closed', (d) => {
    if (app.sb !== sb) return;
    if (d.error?.code === 'unauthorized') signOut('Your sign-in has expired. Please sign in again.');
    else signOut('You were disconnected from the server. Sign in again to continue.');
  });
}

function renderConnection(state) {
  const banner = $('connection-banner');
  $('presence').dataset.state = state;
  if (state === 'reconnecting') {
    banner.textContent = 'Connection lost. Reconnecting…';
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
}

// ----- home -----

function showHome(message, kind = 'info') {
  $('topbar').hidden = false;
  showView('view-home', { focus: false });
  setNotice(message, kind);
  loadHistory();
  $('callee-input').focus();
}

function setNotice(message, kind = 'info') {
  const n = $('home-notice');
  n.hidden = !message;
  n.dataset.kind = kind;
  $('home-notice-text').textContent = message ?? '';
  const iconEl = n.querySelector('.notice-icon');
  iconEl.replaceChildren(icon(kind === 'missed' ? 'missed' : 'info', { size: 20 }));
}

async function loadHistory() {
  const list = $('history');
  if (!app.sb) return;
  let calls = [];
  try {
    ({ calls = [] } = await app.sb.queryCallList({ count: 8 }));
  } catch {
    return;
  }
  const me = app.me.id;
  const others = calls.flatMap((c) => c.users.map((u) => u.user_id)).filter((u) => u !== me);
  list.replaceChildren(...calls.map((c) => historyRow(c, me)));
  $('history-empty').hidden = calls.length > 0;
  await learnNames(others);
  list.replaceChildren(...calls.map((c) => historyRow(c, me)));
}

function historyRow(c, me) {
  const ext = parseExt(c.extended_data);
  const type = ext.type === 'voice' ? 'voice' : 'video';
  const outgoing = c.caller === me;
  const others = c.users.map((u) => u.user_id).filter((u) => u !== me);
  const mine = c.users.find((u) => u.user_id === me)?.state;
  const anyAccepted = c.users.some((u) => u.user_id !== c.caller && (u.state === 'accepted' || u.state === 'quit'));
  let status;
  let kind = 'ok';
  // A one-to-one call stays open on the server a little after both hung up; for us it is over.
  const live = c.state === 'started' && (app.call?.callId === c.call_id || !app.left.has(c.call_id));
  if (live) status = 'In progress';
  else if (outgoing) {
    if (anyAccepted) status = 'Outgoing';
    else {
      status = { rejected: 'Declined', timeout: 'No answer', cancelled: 'Cancelled', caller_gone: 'Cancelled', admin: 'Ended by admin' }[c.end_reason] ?? 'Not answered';
      kind = 'muted';
    }
  } else if (mine === 'accepted' || mine === 'quit') status = 'Incoming';
  else if (mine === 'rejected') {
    status = 'Declined';
    kind = 'muted';
  } else {
    status = 'Missed';
    kind = 'missed';
  }
  const label = joinNames(others.map(nameOf), 3) || 'Unknown';
  const callBack = (t) => {
    $('callee-input').value = others.join(', ');
    startCall(t);
  };
  const avatar = h('span', { class: 'avatar avatar-md', 'aria-hidden': 'true' });
  if (others.length > 1) {
    avatar.classList.add('avatar-group');
    avatar.append(icon('users', { size: 20 }));
  } else {
    paintAvatar(avatar, others[0] ?? '?', nameOf(others[0] ?? '?'));
  }
  return h('li', { class: 'history-row', dataset: { kind } },
    avatar,
    h('span', { class: 'history-main' },
      h('span', { class: 'history-name', text: label }),
      h('span', { class: 'history-meta' },
        icon(kind === 'missed' ? 'missed' : outgoing ? 'outgoing' : 'incoming', { size: 14 }),
        h('span', { text: `${status} · ${type === 'voice' ? 'Voice' : 'Video'}${others.length > 1 ? ' · group' : ''} · ${formatWhen(c.create_time)}` }))),
    h('span', { class: 'history-actions' },
      h('button', { type: 'button', class: 'icon-btn', 'aria-label': `Voice call ${label}`, onclick: () => callBack('voice') }, icon('phone', { size: 18 })),
      h('button', { type: 'button', class: 'icon-btn', 'aria-label': `Video call ${label}`, onclick: () => callBack('video') }, icon('video', { size: 18 }))),
  );
}

// ----- media -----

// Opens what the call needs; falls back to less rather than failing: video → audio only → nothing.
async function acquireMedia(type) {
  if (type === 'video') {
    try {
      return await getLocalMedia({ audio: true, video: videoConstraints() });
    } catch {
      try {
        const s = await getLocalMedia({ audio: true, video: false });
        toast('Your camera is not available, so this call will be audio only.', { kind: 'warning' });
        return s;
      } catch { /* fall through */ }
    }
  }
  try {
    return await getLocalMedia({ audio: true, video: false });
  } catch {
    toast('Your microphone is not available: others will not hear you.', { kind: 'warning', ms: 7000 });
    return new MediaStream();
  }
}

function stopStream(stream) {
  for (const t of stream?.getTracks() ?? []) t.stop();
}

// ----- outgoing -----

function callError(message) {
  const el = $('call-error');
  el.textContent = message ?? '';
  el.hidden = !message;
}

function inviteErrorText(e, ids) {
  switch (e.code) {
    case 'busy':
      return app.left.has(e.details?.call_id)
        ? 'Your last call is still wrapping up on the server. Try again in a few seconds.'
        : 'You are already in another call (perhaps on another device). Hang up there first.';
    case 'bad_request':
      return `Could not call ${joinNames(ids)}: ${e.message.replace(/\.$/, '')}.`;
    case 'too_many_users':
      return 'That is too many people for one call.';
    default:
      return describeError(e.code);
  }
}

function errorUserText(u) {
  switch (u.reason) {
    case 'self': return 'You cannot call yourself.';
    case 'invalid_user_id': return `“${u.user_id}” is not a valid user ID.`;
    case 'already_in_call': return `${nameOf(u.user_id)} is already in this call.`;
    case 'not_pending': return `${nameOf(u.user_id)} is no longer being called.`;
    default: return `${u.user_id}: ${u.reason}`;
  }
}

async function startCall(type) {
  if (!app.sb || app.call || app.outgoing) return;
  callError(null);
  const input = $('callee-input');
  input.removeAttribute('aria-invalid');
  const ids = parseIds(input.value);
  const bad = ids.filter((id) => !USER_ID.test(id));
  const invalid = (msg) => {
    callError(msg);
    input.setAttribute('aria-invalid', 'true');
    input.focus();
  };
  if (!ids.length) return invalid('Enter the user ID of the person to call.');
  if (bad.length) return invalid(`${bad.map((b) => `“${b}”`).join(', ')} ${bad.length > 1 ? 'are not valid user IDs' : 'is not a valid user ID'}: use letters, digits and _ . @ - only.`);
  if (ids.length === 1 && ids[0] === app.me.id) return invalid('You cannot call yourself. Open a second window and sign in as someone else.');
  const invitees = ids.filter((id) => id !== app.me.id);
  if (invitees.length > 9) return invalid('A call can have at most 9 invitees.');
  const buttons = [$('voice-call'), $('video-call')];
  for (const b of buttons) b.disabled = true;
  $(type === 'voice' ? 'voice-call' : 'video-call').setAttribute('aria-busy', 'true');
  try {
    const stream = await acquireMedia(type);
    const mode = invitees.length > 1 ? 'advanced' : 'general';
    const ext = JSON.stringify({ type, caller_name: app.me.name });
    let r;
    try {
      r = await app.sb.callInvite(invitees, { mode, timeout: INVITE_TIMEOUT, extendedData: ext });
    } catch (e) {
      stopStream(stream);
      invalid(inviteErrorText(e, invitees));
      return;
    }
    for (const u of r.error_users ?? []) toast(errorUserText(u), { kind: 'warning' });
    const invited = invitees.filter((id) => !(r.error_users ?? []).some((u) => u.user_id === id));
    input.value = '';
    // Names first, so the first thing shown says "Bob", not "bob"; the call's states keep coming
    // into the SDK meanwhile and are read just after.
    await learnNames(invited);
    const known = app.sb.calls.get(r.call_id);
    if (mode === 'general') {
      app.outgoing = { callId: r.call_id, callee: invited[0], type, stream, ext };
      showWaiting();
      const st = known?.users.get(invited[0])?.state;
      if (st) applyOutgoingState(st);
      if (app.outgoing && known?.ended) onCallEnded({ call_id: r.call_id, reason: known.end_reason });
    } else {
      const states = new Map(invited.map((id) => [id, known?.users.get(id)?.state ?? 'inviting']));
      enterCall({ callId: r.call_id, mode, type, stream, ext, states, caller: app.me.id });
    }
  } finally {
    for (const b of buttons) {
      b.disabled = false;
      b.removeAttribute('aria-busy');
    }
  }
}

function showWaiting() {
  const o = app.outgoing;
  $('topbar').hidden = true;
  $('waiting-name').textContent = nameOf(o.callee);
  paintAvatar($('waiting-avatar'), o.callee, nameOf(o.callee));
  $('waiting-status').textContent = o.type === 'video' ? 'Video calling…' : 'Calling…';
  const preview = $('waiting-preview');
  const hasVideo = o.stream.getVideoTracks().length > 0;
  preview.hidden = !hasVideo;
  preview.srcObject = hasVideo ? o.stream : null;
  document.body.dataset.preview = hasVideo ? 'on' : 'off';
  showView('view-waiting', { focus: false });
  $('cancel-call').focus();
  app.stopRing?.();
  app.stopRing = ring({ outgoing: true });
}

function applyOutgoingState(state) {
  const o = app.outgoing;
  if (!o) return;
  const who = nameOf(o.callee);
  const status = $('waiting-status');
  switch (state) {
    case 'inviting':
      status.textContent = 'Calling…';
      break;
    case 'received':
      status.textContent = 'Ringing…';
      break;
    case 'offline':
      status.textContent = `${who} is offline. It will ring if they come online.`;
      break;
    case 'accepted': {
      const { callId, type, stream, ext, callee } = o;
      clearOutgoing({ keepStream: true });
      enterCall({ callId, mode: 'general', type, stream, ext, states: new Map([[callee, 'accepted']]), caller: app.me.id });
      break;
    }
    case 'rejected':
      endOutgoing(`${who} declined the call.`, 'declined');
      break;
    case 'busy':
      endOutgoing(`${who} is busy on another call. Try again later.`, 'busy');
      break;
    case 'timeout':
      endOutgoing(`No answer from ${who}.`, 'timeout');
      break;
    case 'cancelled':
      endOutgoing(null);
      break;
    default:
      break;
  }
}

function clearOutgoing({ keepStream = false } = {}) {
  const o = app.outgoing;
  if (!o) return;
  app.outgoing = null;
  app.stopRing?.();
  app.stopRing = null;
  $('waiting-preview').srcObject = null;
  if (!keepStream) stopStream(o.stream);
}

function endOutgoing(message, outcome) {
  if (!app.outgoing) return;
  clearOutgoing();
  showHome(message, outcome ? 'missed' : 'info');
  if (outcome) $('home-notice').dataset.outcome = outcome;
}

async function cancelOutgoing() {
  const o = app.outgoing;
  if (!o) return;
  const btn = $('cancel-call');
  btn.disabled = true;
  o.cancelling = true;
  try {
    await app.sb.callCancel(o.callId);
    if (app.outgoing === o) endOutgoing('Call cancelled.');
  } catch (e) {
    // invalid_state: they answered (or it timed out) at the same moment; the event that says so
    // is on its way and moves us on.
    if (e.code !== 'invalid_state' && app.outgoing === o) endOutgoing(describeError(e.code));
  } finally {
    btn.disabled = false;
  }
}

// ----- incoming -----

function onInvitation(d) {
  if (app.incoming.some((i) => i.call_id === d.call_id)) return;
  const ext = parseExt(d.extended_data);
  if (ext.caller_name && d.caller !== app.me.id) app.names.set(d.caller, String(ext.caller_name).slice(0, 64));
  if (app.call || app.outgoing) {
    // Only reachable when the server lets busy users be invited (busy_policy = "allow").
    app.sb.callReject(d.call_id, { extendedData: JSON.stringify({ reason: 'busy' }) }).catch(() => {});
    return;
  }
  app.incoming.push({ ...d, ext, type: ext.type === 'voice' ? 'voice' : 'video' });
  learnNames([d.caller, d.inviter, ...(d.users ?? []).map((u) => u.user_id)]);
  showNextIncoming();
}

function showNextIncoming() {
  if (app.shown || !app.incoming.length) return;
  const inv = app.incoming[0];
  app.shown = inv;
  renderIncoming(inv);
  const dlg = $('incoming');
  $('accept-call').disabled = false;
  $('decline-call').disabled = false;
  if (!dlg.open) dlg.showModal();
  $('accept-call').focus();
  app.stopRing?.();
  app.stopRing = ring();
}

function renderIncoming(inv) {
  const from = inv.inviter || inv.caller;
  $('incoming-name').textContent = nameOf(from);
  paintAvatar($('incoming-avatar'), from, nameOf(from));
  const others = (inv.users ?? []).map((u) => u.user_id).filter((u) => u !== app.me.id && u !== from);
  const group = inv.mode === 'advanced' || others.length > 0;
  $('incoming-kind').textContent = `Incoming ${group ? 'group ' : ''}${inv.type === 'voice' ? 'voice' : 'video'} call`;
  const oth = $('incoming-others');
  oth.hidden = !others.length;
  oth.textContent = others.length ? `With ${joinNames(others.map(nameOf), 3)}` : '';
  setIcon($('accept-icon'), inv.type === 'voice' ? 'phone' : 'video');
  $('accept-call').setAttribute('aria-label', `Accept ${inv.type} call from ${nameOf(from)}`);
  $('decline-call').setAttribute('aria-label', `Decline call from ${nameOf(from)}`);
  $('incoming').dataset.callId = inv.call_id;
}

function closeIncoming(callId, message, kind = 'info') {
  const had = app.incoming.some((i) => i.call_id === callId);
  app.incoming = app.incoming.filter((i) => i.call_id !== callId);
  if (app.shown?.call_id === callId) {
    app.shown = null;
    app.stopRing?.();
    app.stopRing = null;
    const dlg = $('incoming');
    if (dlg.open) dlg.close();
    delete dlg.dataset.callId;
    showNextIncoming();
  }
  if (had && message) toast(message, { kind });
}

function onInvitationGone(d, why) {
  const inv = app.incoming.find((i) => i.call_id === d.call_id);
  if (!inv) return;
  const who = nameOf(inv.inviter || inv.caller);
  closeIncoming(d.call_id, why === 'timeout' ? `Missed call from ${who}.` : `${who} cancelled the call.`, 'missed');
  if (app.me && !app.call && !app.outgoing && !$('view-home').hidden) loadHistory();
}

async function answer(accept) {
  const inv = app.shown;
  if (!inv) return;
  $('accept-call').disabled = true;
  $('decline-call').disabled = true;
  app.answering = inv.call_id;
  if (!accept) {
    try {
      await app.sb.callReject(inv.call_id);
      closeIncoming(inv.call_id);
    } catch (e) {
      closeIncoming(inv.call_id, answerErrorText(e), 'warning');
    } finally {
      app.answering = null;
    }
    if (!app.call && !app.outgoing && !$('view-home').hidden) loadHistory();
    return;
  }
  app.stopRing?.();
  app.stopRing = null;
  const stream = await acquireMedia(inv.type);
  try {
    await app.sb.callAccept(inv.call_id);
  } catch (e) {
    stopStream(stream);
    app.answering = null;
    closeIncoming(inv.call_id, answerErrorText(e), 'warning');
    return;
  }
  app.answering = null;
  closeIncoming(inv.call_id);
  for (const other of [...app.incoming]) {
    app.sb.callReject(other.call_id, { extendedData: JSON.stringify({ reason: 'busy' }) }).catch(() => {});
    closeIncoming(other.call_id);
  }
  const known = app.sb.calls.get(inv.call_id);
  const states = new Map();
  for (const [id, u] of known?.users ?? []) if (id !== app.me.id) states.set(id, u.state);
  enterCall({ callId: inv.call_id, mode: inv.mode, type: inv.type, stream, ext: inv.extended_data, states, caller: inv.caller });
}

function answerErrorText(e) {
  switch (e.code) {
    case 'invalid_state': return 'This call is no longer ringing: it was cancelled or answered on another device.';
    case 'call_not_found': return 'This call does not exist any more.';
    case 'not_invitee': return 'This invitation is not for you.';
    case 'busy': return 'You are already in another call.';
    default: return describeError(e.code);
  }
}

// ----- state changes and endings -----

function onUserStates(d) {
  const me = app.me?.id;
  const mine = d.users.find((u) => u.user_id === me);
  if (mine && !RINGING.has(mine.state) && app.answering !== d.call_id && app.incoming.some((i) => i.call_id === d.call_id)) {
    const where = { accepted: 'Answered on another device.', rejected: 'Declined on another device.' }[mine.state];
    closeIncoming(d.call_id, where ?? null);
  }
  if (app.outgoing?.callId === d.call_id) {
    const u = d.users.find((x) => x.user_id === app.outgoing.callee);
    if (u) applyOutgoingState(u.state);
  }
  if (app.call?.callId === d.call_id) {
    for (const u of d.users) if (u.user_id !== me) onCallUserState(u.user_id, u.state);
  }
  if (mine?.state === 'accepted' && !app.call && !app.outgoing && app.answering !== d.call_id && !app.left.has(d.call_id)) {
    offerRejoin(d.call_id);
  }
}

function onCallEnded(d) {
  const inv = app.incoming.find((i) => i.call_id === d.call_id);
  if (inv) {
    const who = nameOf(inv.inviter || inv.caller);
    closeIncoming(d.call_id, ['cancelled', 'timeout', 'caller_gone'].includes(d.reason) ? `Missed call from ${who}.` : null, 'missed');
  }
  if (app.outgoing?.callId === d.call_id) {
    const who = nameOf(app.outgoing.callee);
    const msg = {
      rejected: [`${who} declined the call.`, 'declined'],
      timeout: [`No answer from ${who}.`, 'timeout'],
      admin: ['An administrator ended the call.', 'ended'],
      server_shutdown: ['The server is restarting. Please call again in a moment.', 'ended'],
      cancelled: [app.outgoing.cancelling ? 'Call cancelled.' : null, null],
    }[d.reason] ?? [null, null];
    endOutgoing(...msg);
  }
  if (app.call?.callId === d.call_id) {
    const msg = {
      completed: 'The call has ended.',
      ended: d.operated_user_id && d.operated_user_id !== app.me.id ? `${nameOf(d.operated_user_id)} ended the call.` : 'The call has ended.',
      empty: 'Everyone has left the call.',
      admin: 'An administrator ended the call.',
      server_shutdown: 'The server is restarting, so the call has ended.',
      rejected: 'Nobody answered the call.',
      timeout: 'Nobody answered the call.',
      cancelled: 'The call was cancelled.',
      caller_gone: 'The caller left before anyone answered.',
    }[d.reason] ?? 'The call has ended.';
    leaveCall({ message: msg, alreadyOver: true });
  }
  if (app.rejoin === d.call_id) hideRejoin();
}

async function offerRejoin(callId) {
  if (app.rejoin === callId) return;
  app.rejoin = callId;
  let info = null;
  try {
    const { calls } = await app.sb.queryCallList({ count: 20 });
    info = calls.find((c) => c.call_id === callId) ?? null;
  } catch { /* show what we know */ }
  if (app.rejoin !== callId || app.call || app.outgoing) return;
  if (info && info.state !== 'started') return hideRejoin();
  const others = (info?.users ?? []).filter((u) => u.user_id !== app.me.id && (u.state === 'accepted' || RINGING.has(u.state)));
  await learnNames(others.map((u) => u.user_id));
  $('rejoin-text').textContent = others.length
    ? `Your call with ${joinNames(others.map((u) => nameOf(u.user_id)))} is in progress.`
    : 'You have a call in progress.';
  $('rejoin-banner').hidden = false;
  $('rejoin-button').onclick = async () => {
    hideRejoin();
    const ext = parseExt(info?.extended_data);
    const type = ext.type === 'voice' ? 'voice' : 'video';
    const stream = await acquireMedia(type);
    const states = new Map(others.map((u) => [u.user_id, u.state]));
    enterCall({ callId, mode: info?.mode ?? 'general', type, stream, ext: info?.extended_data ?? '', states, caller: info?.caller ?? app.me.id });
  };
}

function hideRejoin() {
  app.rejoin = null;
  $('rejoin-banner').hidden = true;
}

// ----- the call -----

class Tile {
  constructor(userId, { local = false } = {}) {
    this.userId = userId;
    this.local = local;
    this.trackId = null;
    this.lastFrame = 0;
    this.video = h('video', { autoplay: true, playsinline: true, 'aria-hidden': 'true' });
    if (local) this.video.muted = true;
    this.avatar = h('span', { class: 'avatar avatar-lg', 'aria-hidden': 'true' });
    this.status = h('span', { class: 'tile-status' });
    this.nameEl = h('span', { class: 'tile-name' });
    this.micOff = h('span', { class: 'tile-mic-off', hidden: true }, icon('mic-off', { size: 16, label: 'Microphone off' }));
    this.res = h('span', { class: 'tile-res', hidden: true, title: 'Resolution of this video as measured by the server' });
    this.el = h('div', { class: 'tile', role: 'listitem', dataset: { user: userId, local: local ? 'true' : 'false', video: 'off' } },
      this.video,
      h('div', { class: 'tile-placeholder' }, this.avatar, this.status),
      h('div', { class: 'tile-label' }, this.micOff, this.nameEl),
      this.res);
    this.setName(local ? `${app.me.name} (you)` : nameOf(userId));
    paintAvatar(this.avatar, userId, local ? app.me.name : nameOf(userId));
    this.video.addEventListener('resize', () => this.updateResolution());
    this.watchFrames();
  }

  setName(name) {
    this.nameEl.textContent = name;
    this.el.setAttribute('aria-label', name);
    if (!this.local) paintAvatar(this.avatar, this.userId, name);
  }

  setStatus(text, state) {
    this.status.textContent = text ?? '';
    if (state) this.el.dataset.state = state;
  }

  setStream(stream) {
    if (this.video.srcObject !== stream) this.video.srcObject = stream;
    const p = this.video.play();
    p?.catch?.((e) => {
      if (e?.name === 'NotAllowedError') $('enable-audio').hidden = false;
    });
  }

  // A tile shows its video only while frames arrive, so a camera turned off (or a stalled
  // stream) shows the avatar instead of a frozen picture.
  watchFrames() {
    const v = this.video;
    if ('requestVideoFrameCallback' in v) {
      const onFrame = () => {
        this.lastFrame = performance.now();
        v.requestVideoFrameCallback(onFrame);
      };
      v.requestVideoFrameCallback(onFrame);
    } else {
      let last = -1;
      this.frameFallback = setInterval(() => {
        if (v.currentTime !== last) {
          last = v.currentTime;
          this.lastFrame = performance.now();
        }
      }, 250);
    }
  }

  tick(now) {
    const hasVideo = this.video.srcObject?.getVideoTracks().some((t) => t.readyState === 'live') && now - this.lastFrame < 1500 && this.video.videoWidth > 0;
    this.el.dataset.video = hasVideo ? 'on' : 'off';
  }

  updateResolution() {
    const room = app.call?.room;
    if (this.local || !room || !this.trackId) {
      this.res.hidden = true;
      return;
    }
    const m = room.measuredResolution(this.trackId, this.video.videoHeight);
    this.res.hidden = !m;
    if (m) {
      this.res.textContent = `${m.width}×${m.height}`;
      this.el.dataset.measured = `${m.width}x${m.height}`;
    }
  }

  // Asks the server for the simulcast layer that fills this tile and no more: a phone's small
  // tile does not need 720p, and what a user receives is what they are billed for. While the page
  // is hidden nobody sees the video, so it is paused (the sound goes on).
  fitLayer() {
    const room = app.call?.room;
    if (this.local || !room || !this.trackId) return;
    const send = (key, opts) => {
      if (this.cap === key) return;
      this.cap = key;
      room.setSubscription(this.trackId, opts).catch(() => {
        this.cap = null;
      });
    };
    if (document.hidden) {
      send(`${this.trackId}:paused`, { enabled: false });
      return;
    }
    const layers = [...(room.resolutions.get(this.trackId)?.values() ?? [])]
      .filter((l) => l.width > 0 && l.height > 0)
      .sort((a, b) => a.width * a.height - b.width * b.height);
    if (!layers.length) {
      if (this.cap?.endsWith(':paused')) send(`${this.trackId}:any`, { enabled: true });
      return;
    }
    const rect = this.el.getBoundingClientRect();
    if (!rect.width || !rect.height) return;
    const dpr = window.devicePixelRatio || 1;
    const [w, h] = [rect.width * dpr, rect.height * dpr];
    const top = layers[layers.length - 1];
    const aspect = top.width / top.height;
    const cover = getComputedStyle(this.video).objectFit === 'cover';
    const shownH = cover ? Math.max(h, w / aspect) : Math.min(h, w / aspect);
    const shownW = shownH * aspect;
    const pick = layers.find((l) => l.width >= shownW * 0.85 && l.height >= shownH * 0.85) ?? top;
    send(`${this.trackId}:${pick.width}x${pick.height}`, { enabled: true, maxWidth: pick.width, maxHeight: pick.height });
  }

  destroy() {
    clearInterval(this.frameFallback);
    this.video.srcObject = null;
    this.el.remove();
  }
}

const STATUS_TEXT = {
  inviting: 'Calling…',
  received: 'Ringing…',
  offline: 'Offline: will ring when online',
  accepted: 'Connecting…',
};

function enterCall({ callId, mode, type, stream, ext, states, caller }) {
  hideRejoin();
  app.left.delete(callId);
  const c = {
    callId, mode, type, stream, ext, caller,
    room: null,
    tiles: new Map(),
    states: new Map(states),
    startedAt: null,
    ending: false,
    peerLeftTimer: null,
    everConnected: false,
  };
  app.call = c;
  $('topbar').hidden = true;
  $('grid').replaceChildren();
  $('tier-badge').hidden = true;
  $('enable-audio').hidden = true;
  $('call-state').textContent = 'Connecting…';
  $('call-timer').textContent = '00:00';
  $('invite-more').hidden = mode !== 'advanced';
  $('toggle-camera').hidden = type !== 'video';
  document.body.dataset.callType = type;
  const local = new Tile(app.me.id, { local: true });
  local.setStream(stream);
  c.tiles.set(app.me.id, local);
  $('grid').append(local.el);
  for (const [id, st] of c.states) if (st === 'accepted' || RINGING.has(st)) addRemoteTile(id, st);
  renderControls();
  renderCallTitle();
  layoutGrid();
  showView('view-call', { focus: false });
  $('hang-up').focus();
  c.ticker = setInterval(() => callTick(), 500);
  let fitTimer = null;
  c.resize = new ResizeObserver(() => {
    clearTimeout(fitTimer);
    fitTimer = setTimeout(() => {
      for (const t of c.tiles.values()) t.fitLayer();
    }, 300);
  });
  c.resize.observe($('grid'));
  learnNames([...c.states.keys()]);
  joinMedia(c);
}

async function joinMedia(c) {
  const hasAudio = c.stream.getAudioTracks().length > 0;
  const hasVideo = c.stream.getVideoTracks().length > 0;
  if (c.type === 'video' && !hasVideo) {
    const b = $('toggle-camera');
    b.disabled = true;
  }
  try {
    c.room = await app.sb.joinRoom(c.callId, {
      audio: hasAudio,
      video: c.type === 'video' && hasVideo,
      localStream: c.stream,
      videoConstraints: videoConstraints(),
      on: (c.handlers = roomHandlers(c)),
    });
    if (c.room.billingTier) c.handlers.billing_tier(c.room.billingTier);
  } catch (e) {
    if (app.call !== c || c.ending) return;
    if (e.code === 'invalid_state' || e.code === 'call_not_found') {
      leaveCall({ message: 'This call is over.', alreadyOver: true });
    } else {
      $('call-state').textContent = 'Media could not connect.';
      toast(`Could not connect audio and video: ${e.message}`, { kind: 'error', ms: 8000 });
    }
    return;
  }
  if (app.call !== c) c.room.leave();
}

function roomHandlers(c) {
  const live = () => app.call === c && !c.ending;
  return {
    participant_joined: ({ user_id }) => {
      if (!live()) return;
      clearTimeout(c.peerLeftTimer);
      c.everConnected = true;
      c.startedAt ??= Date.now();
      if (!c.states.has(user_id) || !['accepted'].includes(c.states.get(user_id))) c.states.set(user_id, 'accepted');
      const t = addRemoteTile(user_id, 'accepted');
      t.setStatus('Connecting…', 'joined');
      learnNames([user_id]);
      renderCallTitle();
    },
    participant_left: ({ user_id, rejoin }) => {
      if (!live()) return;
      const t = c.tiles.get(user_id);
      if (t) {
        t.video.srcObject = null;
        t.trackId = null;
        t.updateResolution();
        t.setStatus('Reconnecting…', 'away');
      }
      if (c.mode === 'general' && c.room && c.room.participants.size === 0) {
        clearTimeout(c.peerLeftTimer);
        c.peerLeftTimer = setTimeout(() => {
          if (live() && c.room?.participants.size === 0) {
            leaveCall({ message: `${nameOf(user_id)} hung up.` });
          }
        }, rejoin ? PEER_AWAY_AFTER_REJOIN_MS : PEER_LEFT_GRACE_MS);
      }
    },
    track: ({ userId, kind, trackId, stream }) => {
      if (!live()) return;
      const t = addRemoteTile(userId, 'accepted');
      t.setStatus('', 'live');
      if (kind === 'video') t.trackId = trackId;
      t.setStream(stream);
      t.updateResolution();
      t.fitLayer();
    },
    track_ended: ({ userId, kind }) => {
      const t = c.tiles.get(userId);
      if (t && kind === 'video') {
        t.trackId = null;
        t.updateResolution();
      }
    },
    active_speakers: ({ user_ids }) => {
      if (!live()) return;
      const speaking = new Set(user_ids ?? []);
      for (const [id, t] of c.tiles) {
        t.el.classList.toggle('speaking', speaking.has(id));
        t.el.classList.toggle('loudest', (user_ids ?? [])[0] === id);
      }
    },
    track_resolution: () => {
      if (!live()) return;
      for (const t of c.tiles.values()) {
        t.updateResolution();
        t.fitLayer();
      }
    },
    billing_tier: (d) => {
      if (!live()) return;
      const badge = $('tier-badge');
      if (!d.tier) {
        badge.hidden = true;
        return;
      }
      const label = TIER_LABELS[d.tier] ?? String(d.tier).toUpperCase();
      badge.textContent = label;
      badge.dataset.tier = d.tier;
      const px = Number(d.pixels) || 0;
      badge.title = d.tier === 'audio'
        ? 'Billing tier: audio (you are receiving no video)'
        : `Billing tier: ${label} (you receive ${px.toLocaleString()} pixels in total)`;
      badge.setAttribute('aria-label', badge.title);
      badge.hidden = false;
    },
    connection: (s) => {
      if (!live()) return;
      const states = [s.publisher, s.subscriber];
      let text = '';
      if (!s.signaling) text = 'Reconnecting…';
      else if (states.includes('failed')) text = 'Connection problem. Retrying…';
      else if (states.includes('disconnected')) text = 'Connection unstable…';
      else if (states.some((x) => x === 'new' || x === 'connecting')) text = c.everConnected ? '' : 'Connecting…';
      $('call-state').textContent = text;
      if (states.every((x) => x === 'connected')) c.mediaUp = true;
    },
    closed: ({ reason }) => {
      if (!live()) return;
      if (reason === 'replaced') leaveCall({ message: 'You joined this call from another device, so it moved there.', alreadyOver: true, keepInCall: true });
      else if (reason === 'failed') $('call-state').textContent = 'Media connection lost.';
    },
  };
}

function addRemoteTile(userId, state) {
  const c = app.call;
  let t = c.tiles.get(userId);
  if (!t) {
    t = new Tile(userId);
    c.tiles.set(userId, t);
    $('grid').append(t.el);
    layoutGrid();
  }
  if (state && state !== 'accepted') t.setStatus(STATUS_TEXT[state] ?? '', 'ringing');
  else if (!t.el.dataset.state || t.el.dataset.state === 'ringing') t.setStatus('Connecting…', 'accepted');
  return t;
}

function removeTile(userId) {
  const c = app.call;
  const t = c?.tiles.get(userId);
  if (!t) return;
  t.destroy();
  c.tiles.delete(userId);
  layoutGrid();
}

function onCallUserState(userId, state) {
  const c = app.call;
  const prev = c.states.get(userId);
  c.states.set(userId, state);
  const who = nameOf(userId);
  if (RINGING.has(state)) {
    addRemoteTile(userId, state);
  } else if (state === 'accepted') {
    const t = addRemoteTile(userId, 'accepted');
    if (RINGING.has(prev) && t.el.dataset.state !== 'live') t.setStatus('Joining…', 'accepted');
    if (RINGING.has(prev)) toast(`${who} joined.`, { kind: 'success', ms: 2500 });
  } else {
    const text = {
      rejected: `${who} declined.`,
      busy: `${who} is busy on another call.`,
      timeout: `${who} did not answer.`,
      cancelled: null,
      quit: `${who} left the call.`,
    }[state];
    removeTile(userId);
    if (text) toast(text, { kind: state === 'quit' ? 'info' : 'warning' });
  }
  renderCallTitle();
  // A one-to-one call whose other side is gone is over for us too.
  if (c.mode === 'general' && !RINGING.has(state) && state !== 'accepted' && ![...c.states.values()].some((s) => s === 'accepted' || RINGING.has(s))) {
    leaveCall({ message: `${who} hung up.` });
  }
}

function renderCallTitle() {
  const c = app.call;
  if (!c) return;
  const people = [...c.states].filter(([, s]) => s === 'accepted' || RINGING.has(s)).map(([id]) => nameOf(id));
  const title = c.mode === 'advanced'
    ? (people.length ? `Group call with ${joinNames(people, 3)}` : 'Group call')
    : (people[0] ?? nameOf([...c.states.keys()][0] ?? ''));
  $('call-title').textContent = title;
  document.title = `${title} · Switchboard`;
}

function renderControls() {
  const c = app.call;
  if (!c) return;
  const mic = $('toggle-mic');
  const micOn = c.room ? c.room.microphoneEnabled : !c.micOff;
  mic.setAttribute('aria-pressed', String(!micOn));
  mic.setAttribute('aria-label', micOn ? 'Mute microphone' : 'Unmute microphone');
  mic.classList.toggle('off', !micOn);
  setIcon(mic.querySelector('[data-icon]'), micOn ? 'mic' : 'mic-off');
  c.tiles.get(app.me.id)?.micOff.toggleAttribute('hidden', micOn);
  const cam = $('toggle-camera');
  const camOn = c.room ? c.room.cameraEnabled : c.stream.getVideoTracks().length > 0;
  cam.setAttribute('aria-pressed', String(!camOn));
  cam.setAttribute('aria-label', camOn ? 'Turn camera off' : 'Turn camera on');
  cam.classList.toggle('off', !camOn);
  setIcon(cam.querySelector('[data-icon]'), camOn ? 'video' : 'video-off');
}

function toggleMic() {
  const c = app.call;
  if (!c) return;
  if (c.room) c.room.setMicrophoneEnabled(!c.room.microphoneEnabled);
  else {
    c.micOff = !c.micOff;
    for (const t of c.stream.getAudioTracks()) t.enabled = !c.micOff;
  }
  renderControls();
}

async function toggleCamera() {
  const c = app.call;
  if (!c?.room || c.type !== 'video') return;
  const btn = $('toggle-camera');
  btn.disabled = true;
  try {
    await c.room.setCameraEnabled(!c.room.cameraEnabled);
    const local = c.tiles.get(app.me.id);
    if (local) {
      // Same stream, new track: re-attach so the element picks the new camera track up.
      local.video.srcObject = null;
      local.setStream(c.room.localStream);
    }
  } catch (e) {
    toast(`The camera could not be turned on: ${e.message}`, { kind: 'error' });
  } finally {
    btn.disabled = false;
    renderControls();
  }
}

function layoutGrid() {
  const c = app.call;
  const grid = $('grid');
  const n = c ? c.tiles.size : 1;
  grid.dataset.count = String(n);
  // Two people on video: the other fills the stage and I am a picture-in-picture; voice calls keep
  // two equal tiles.
  grid.classList.toggle('pip', n === 2 && c?.type === 'video');
  // Tiles change size with the layout; the grid's own size may not.
  requestAnimationFrame(() => {
    for (const t of app.call?.tiles.values() ?? []) t.fitLayer();
  });
}

function callTick() {
  const c = app.call;
  if (!c) return;
  const now = performance.now();
  for (const t of c.tiles.values()) t.tick(now);
  if (c.startedAt) $('call-timer').textContent = formatDuration(Date.now() - c.startedAt);
  else if (c.mode === 'advanced' && ![...c.states.values()].includes('accepted')) $('call-state').textContent = 'Waiting for others to join…';
}

async function hangUp() {
  const c = app.call;
  if (!c || c.ending) return;
  const duration = c.startedAt ? ` · ${formatDuration(Date.now() - c.startedAt)}` : '';
  await leaveCall({ message: `Call ended${duration}.` });
}

// Leaves the call: the room (rtc_leave) and, in advanced mode, the call (call_quit).
async function leaveCall({ message, alreadyOver = false, keepInCall = false } = {}) {
  const c = app.call;
  if (!c || c.ending) return;
  c.ending = true;
  const room = c.room;
  teardownCall();
  showHome(message);
  if (!keepInCall) app.left.add(c.callId);
  if (room && !room.closed) await room.leave();
  if (c.mode === 'advanced' && !alreadyOver && !keepInCall) {
    await app.sb?.callQuit(c.callId).catch(() => {});
  }
  loadHistory();
}

function teardownCall() {
  const c = app.call;
  if (!c) return;
  app.call = null;
  c.ending = true;
  clearInterval(c.ticker);
  clearTimeout(c.peerLeftTimer);
  c.resize?.disconnect();
  for (const t of c.tiles.values()) t.destroy();
  c.tiles.clear();
  stopStream(c.stream);
  if (c.room?.localStream && c.room.localStream !== c.stream) stopStream(c.room.localStream);
  const dlg = $('invite-dialog');
  if (dlg.open) dlg.close();
  document.title = 'Switchboard';
  delete document.body.dataset.callType;
}

// ----- invite more (advanced mode) -----

function openInvite() {
  if (!app.call || app.call.mode !== 'advanced') return;
  $('invite-error').hidden = true;
  $('invite-input').value = '';
  $('invite-dialog').showModal();
  $('invite-input').focus();
}

async function submitInvite(e) {
  e.preventDefault();
  const c = app.call;
  if (!c) return;
  const err = $('invite-error');
  const fail = (m) => {
    err.textContent = m;
    err.hidden = false;
    $('invite-input').focus();
  };
  const ids = parseIds($('invite-input').value).filter((id) => id !== app.me.id);
  const bad = ids.filter((id) => !USER_ID.test(id));
  if (!ids.length) return fail('Enter at least one user ID.');
  if (bad.length) return fail(`${bad.map((b) => `“${b}”`).join(', ')} ${bad.length > 1 ? 'are not valid user IDs' : 'is not a valid user ID'}.`);
  const already = ids.filter((id) => ['accepted', ...RINGING].includes(c.states.get(id)));
  const fresh = ids.filter((id) => !already.includes(id));
  if (!fresh.length) return fail(`${joinNames(already.map(nameOf))} ${already.length > 1 ? 'are' : 'is'} already in this call.`);
  const btn = $('invite-submit');
  btn.disabled = true;
  try {
    const ext = JSON.stringify({ ...parseExt(c.ext), type: c.type, caller_name: nameOf(c.caller), inviter_name: app.me.name });
    const r = await app.sb.callingInvite(c.callId, fresh, { extendedData: ext });
    const errs = r.error_users ?? [];
    for (const u of errs) toast(errorUserText(u), { kind: 'warning' });
    const known = app.sb.calls.get(c.callId);
    for (const id of fresh) {
      if (errs.some((u) => u.user_id === id)) continue;
      const st = known?.users.get(id)?.state ?? 'inviting';
      onCallUserState(id, st);
    }
    learnNames(fresh);
    $('invite-dialog').close();
  } catch (e2) {
    fail(e2.code === 'too_many_users' ? 'The call is full: no more people can join.' : describeError(e2.code));
  } finally {
    btn.disabled = false;
  }
}

// ----- start -----

function bind() {
  fillIcons();
  $('home-notice-close').replaceChildren(icon('close', { size: 18 }));
  $('signin-form').addEventListener('submit', onSignIn);
  $('token-toggle').addEventListener('click', () => {
    setTokenMode(!app.tokenMode);
    (app.tokenMode ? $('signin-token') : $('signin-user')).focus();
  });
  $('sign-out').addEventListener('click', () => signOut());
  $('call-form').addEventListener('submit', (e) => {
    e.preventDefault();
    startCall(e.submitter?.dataset.type === 'voice' ? 'voice' : 'video');
  });
  $('callee-input').addEventListener('input', () => callError(null));
  $('home-notice-close').addEventListener('click', () => setNotice(null));
  $('history-refresh').addEventListener('click', () => loadHistory());
  $('cancel-call').addEventListener('click', cancelOutgoing);
  $('accept-call').addEventListener('click', () => answer(true));
  $('decline-call').addEventListener('click', () => answer(false));
  // Escape must not silently dismiss a ringing call: the caller would hear it ring on.
  $('incoming').addEventListener('cancel', (e) => e.preventDefault());
  $('toggle-mic').addEventListener('click', toggleMic);
  $('toggle-camera').addEventListener('click', toggleCamera);
  $('hang-up').addEventListener('click', hangUp);
  $('invite-more').addEventListener('click', openInvite);
  $('invite-form').addEventListener('submit', submitInvite);
  $('invite-cancel').addEventListener('click', () => $('invite-dialog').close());
  $('enable-audio').addEventListener('click', () => {
    for (const t of app.call?.tiles.values() ?? []) t.video.play().catch(() => {});
    $('enable-audio').hidden = true;
  });
  document.addEventListener('keydown', (e) => {
    if (!app.call || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.target.closest?.('input, textarea, dialog[open]')) return;
    if (e.key === 'm' || e.key === 'M') toggleMic();
    else if ((e.key === 'v' || e.key === 'V') && app.call.type === 'video') toggleCamera();
  });
  document.addEventListener('visibilitychange', () => {
    for (const t of app.call?.tiles.values() ?? []) t.fitLayer();
  });
  window.addEventListener('pagehide', () => {
    // Leave cleanly when the tab closes; the server would notice anyway, only later.
    if (app.call?.room) app.call.room.leave();
  });
}

async function main() {
  bind();
  const saved = sessionStorage.getItem(TOKEN_KEY);
  const user = params.get('user');
  if (user && USER_ID.test(user)) $('signin-user').value = user;
  if (params.get('name')) $('signin-name').value = params.get('name').slice(0, 64);
  if (saved) {
    try {
      const { token, name } = JSON.parse(saved);
      if (await startSession(token, name)) return;
    } catch {
      sessionStorage.removeItem(TOKEN_KEY);
    }
  }
  showSignIn();
}

main();
// For the end-to-end tests and for debugging from the console.
window.switchboardApp = app;
