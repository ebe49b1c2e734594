// Small DOM helpers for the app: icons, avatars, toasts, formatting. No framework.

const SVG_NS = 'http://www.w3.org/2000/svg';

// A telephone handset, drawn for Switchboard; the hang-up icon is the same, turned down.
const HANDSET = 'M6.5 3.5h2.6l1.6 4.3-2.1 1.4a12 12 0 0 0 6.2 6.2l1.4-2.1 4.3 1.6v2.6a2 2 0 0 1-2.2 2A16.5 16.5 0 0 1 4.5 5.7a2 2 0 0 1 2-2.2z';

// 24×24 line icons, drawn for Switchboard. Each is a list of [element, attributes].
const ICONS = {
  phone: [
    ['path', { d: HANDSET }],
  ],
  hangup: [
    ['path', { d: HANDSET, transform: 'rotate(135 12 12)' }],
  ],
  video: [
    ['rect', { x: 2.5, y: 6.5, width: 13, height: 11, rx: 2.5 }],
    ['path', { d: 'M15.5 10.5l6-3.5v10l-6-3.5' }],
  ],
  'video-off': [
    ['path', { d: 'M10 6.5h3a2.5 2.5 0 0 1 2.5 2.5v3M15.5 15v.5a2 2 0 0 1-2 2h-8.5a2.5 2.5 0 0 1-2.5-2.5v-6.5a2.5 2.5 0 0 1 2.5-2.5' }],
    ['path', { d: 'M15.5 10.5l6-3.5v10l-4-2.3' }],
    ['path', { d: 'M3 3l18 18' }],
  ],
  mic: [
    ['rect', { x: 9, y: 2.5, width: 6, height: 12, rx: 3 }],
    ['path', { d: 'M5.5 11a6.5 6.5 0 0 0 13 0M12 17.5v4' }],
  ],
  'mic-off': [
    ['path', { d: 'M15 9.5v-4a3 3 0 0 0-5.6-1.5M9 9v2.5a3 3 0 0 0 4.6 2.5' }],
    ['path', { d: 'M5.5 11a6.5 6.5 0 0 0 10.6 5M18.5 11a6.4 6.4 0 0 1-.6 2.7M12 17.5v4' }],
    ['path', { d: 'M3 3l18 18' }],
  ],
  'user-plus': [
    ['circle', { cx: 9, cy: 8, r: 3.8 }],
    ['path', { d: 'M2.5 20.5a6.5 6.5 0 0 1 13 0M19 8v6M16 11h6' }],
  ],
  close: [['path', { d: 'M6 6l12 12M18 6L6 18' }]],
  info: [
    ['circle', { cx: 12, cy: 12, r: 9 }],
    ['path', { d: 'M12 11v5.5M12 7.6v.1' }],
  ],
  missed: [
    ['path', { d: 'M3.5 7.5l6 6 4-4 5.5 5.5M19 11v4h-4' }],
  ],
  incoming: [['path', { d: 'M18 6L7 17M7 9.5V17h7.5' }]],
  outgoing: [['path', { d: 'M6 18L17 7M9.5 7H17v7.5' }]],
  users: [
    ['circle', { cx: 9, cy: 8, r: 3.5 }],
    ['path', { d: 'M2.5 20a6.5 6.5 0 0 1 13 0M16 4.7a3.5 3.5 0 0 1 0 6.6M18.5 14.5a6.5 6.5 0 0 1 3 5.5' }],
  ],
};

/** An inline SVG icon. */
export function icon(name, { size = 24, label } = {}) {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('width', size);
  svg.setAttribute('height', size);
  svg.setAttribute('fill', 'none');
  svg.setAttribute('stroke', 'currentColor');
  svg.setAttribute('stroke-width', '1.8');
  svg.setAttribute('stroke-linecap', 'round');
  svg.setAttribute('stroke-linejoin', 'round');
  svg.classList.add('icon');
  if (label) {
    svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', label);
  } else {
    svg.setAttribute('aria-hidden', 'true');
  }
  for (const [tag, attrs] of ICONS[name] ?? []) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    svg.append(el);
  }
  return svg;
}

/** Replaces the content of every `[data-icon]` placeholder under `root` with its icon. */
export function fillIcons(root = document) {
  for (const el of root.querySelectorAll('[data-icon]')) setIcon(el, el.dataset.icon);
}

/** Sets a placeholder's icon. */
export function setIcon(el, name) {
  el.dataset.icon = name;
  el.replaceChildren(icon(name));
}

/** Creates an element: `h('div', {class: 'x', text: 'hi'}, child...)`. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c != null && c !== false) el.append(c);
  return el;
}

/** Up to two initials of a display name. */
export function initials(name) {
  const parts = String(name || '?').trim().split(/[\s._@-]+/).filter(Boolean);
  const letters = parts.length > 1 ? parts[0][0] + parts[1][0] : (parts[0] ?? '?').slice(0, 2);
  return letters.toUpperCase();
}

/** A stable hue for a user ID. */
export function hueOf(id) {
  let x = 2166136261;
  for (const ch of String(id)) x = Math.imul(x ^ ch.codePointAt(0), 16777619) >>> 0;
  return x % 360;
}

/** Fills an `.avatar` element for a user. */
export function paintAvatar(el, userId, name) {
  el.textContent = initials(name || userId);
  el.style.setProperty('--hue', hueOf(userId));
}

/** `mm:ss` or `h:mm:ss`. */
export function formatDuration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  const hh = Math.floor(s / 3600);
  const mm = String(Math.floor((s % 3600) / 60)).padStart(2, '0');
  const ss = String(s % 60).padStart(2, '0');
  return hh ? `${hh}:${mm}:${ss}` : `${mm}:${ss}`;
}

/** "just now", "5 min ago", "yesterday 14:02", a date. */
export function formatWhen(ms, now = Date.now()) {
  const d = new Date(ms);
  const diff = now - ms;
  if (diff < 60_000) return 'just now';
  if (diff < 3_600_000) return `${Math.floor(diff / 60_000)} min ago`;
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  const today = new Date(now);
  if (d.toDateString() === today.toDateString()) return time;
  const yesterday = new Date(now - 86_400_000);
  if (d.toDateString() === yesterday.toDateString()) return `Yesterday ${time}`;
  return `${d.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${time}`;
}

/** Joins names: "Bob", "Bob and Carol", "Bob, Carol and Dave", "Bob, Carol and 3 others". */
export function joinNames(names, max = 3) {
  if (names.length <= 1) return names[0] ?? '';
  if (names.length <= max) return `${names.slice(0, -1).join(', ')} and ${names[names.length - 1]}`;
  const rest = names.length - (max - 1);
  return `${names.slice(0, max - 1).join(', ')} and ${rest} others`;
}

/** Shows a short message at the bottom of the page. `kind`: info, success, warning, error. */
export function toast(message, { kind = 'info', ms = 4500 } = {}) {
  const area = document.getElementById('toasts');
  const el = h('div', { class: `toast toast-${kind}` }, h('span', { text: message }));
  area.append(el);
  requestAnimationFrame(() => el.classList.add('show'));
  setTimeout(() => {
    el.classList.remove('show');
    setTimeout(() => el.remove(), 300);
  }, ms);
  return el;
}

/** Shows one view, hides the others, and moves focus to its heading for screen readers. */
export function showView(id, { focus = true } = {}) {
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== id;
  document.body.dataset.view = id.replace(/^view-/, '');
  if (focus) {
    const target = document.querySelector(`#${id} [autofocus], #${id} h1`);
    if (target) {
      if (!target.hasAttribute('tabindex') && target.tagName === 'H1') target.setAttribute('tabindex', '-1');
      target.focus({ preventScroll: true });
    }
  }
}

/** A gentle two-tone ring from WebAudio (no sound files); returns a stop function. */
export function ring({ outgoing = false } = {}) {
  let ctx;
  try {
    ctx = new AudioContext();
  } catch {
    return () => {};
  }
  const gain = ctx.createGain();
  gain.gain.value = 0;
  gain.connect(ctx.destination);
  const tones = outgoing ? [440, 480] : [660, 880];
  const oscs = tones.map((f) => {
    const o = ctx.createOscillator();
    o.frequency.value = f;
    o.connect(gain);
    o.start();
    return o;
  });
  const period = outgoing ? 4 : 2.4;
  const on = outgoing ? 1.6 : 0.9;
  const level = outgoing ? 0.04 : 0.06;
  let stopped = false;
  const schedule = () => {
    if (stopped) return;
    const t = ctx.currentTime;
    gain.gain.setValueAtTime(0, t);
    gain.gain.linearRampToValueAtTime(level, t + 0.05);
    gain.gain.setValueAtTime(level, t + on);
    gain.gain.linearRampToValueAtTime(0, t + on + 0.05);
  };
  schedule();
  const timer = setInterval(schedule, period * 1000);
  return () => {
    stopped = true;
    clearInterval(timer);
    for (const o of oscs) try { o.stop(); } catch { /* stopped */ }
    ctx.close().catch(() => {});
  };
}
