// Helpers for the browser end-to-end tests: the server under test, browser users, waits and checks.

import { spawn, execFile } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createWriteStream, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { randomBytes } from 'node:crypto';

const execFileP = promisify(execFile);
const WEB_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'web');
const WEB_TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.svg': 'image/svg+xml' };

// A development aid, off by default: SWITCHBOARD_WEB_FROM_DISK=1 answers the app's own files from
// web/ on disk instead of the binary, so that a change to the app needs no rebuild. The tests
// proper always exercise the files embedded in the binary.
async function serveWebFromDisk(context) {
  // Only sub-resources: a document that does not come from the loopback server would lose its
  // right to open a WebSocket to 127.0.0.1 (Chromium's local network access checks).
  await context.route(/\/(app\.js|ui\.js|style\.css|favicon\.svg|sdk\/switchboard\.js)(\?.*)?$/, async (route) => {
    const path = new URL(route.request().url()).pathname;
    const file = join(WEB_DIR, path);
    const ext = file.slice(file.lastIndexOf('.'));
    await route.fulfill({ body: await readFile(file), contentType: WEB_TYPES[ext] ?? 'application/octet-stream' });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export class AssertionError extends Error {}

export function assert(cond, message) {
  if (!cond) throw new AssertionError(message);
}

/** A TCP port nobody listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Polls `fn` until it returns a truthy value; throws with `what` after `timeout` ms. */
export async function waitUntil(fn, { timeout = 10_000, every = 200, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new AssertionError(`timed out after ${timeout} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ''}`);
    }
    await sleep(every);
  }
}

/** The real server binary in dev mode, on a free port, with its database in a temp directory. */
export class TestServer {
  /** `dev: false` runs a production-mode server with a random secret (no dev tokens). */
  /** `host`: the address HTTP and media bind to (default 127.0.0.1); `env`: extra variables. */
  constructor({ bin, logPath, dev = true, host = '127.0.0.1', env = {} }) {
    this.bin = bin;
    this.logPath = logPath;
    this.dev = dev;
    this.host = host;
    this.extraEnv = env;
    this.proc = null;
  }

  get #serveArgs() {
    // A dev server on another address than loopback must say so (it hands out tokens).
    const remote = this.dev && this.host !== '127.0.0.1' ? ['--dev-allow-remote'] : [];
    return this.dev ? ['serve', '--dev', ...remote] : ['serve'];
  }

  /** A user token, made by the binary as an operator would (`switchboard token`). */
  async token(user, name) {
    const args = ['token', ...(this.dev ? ['--dev'] : []), '--user', user, ...(name ? ['--name', name] : [])];
    const { stdout } = await execFileP(this.bin, args, { env: this.env });
    return stdout.trim().split(/\s+/).pop();
  }

  async start() {
    if (!existsSync(this.bin)) {
      throw new Error(`${this.bin} does not exist: build it with \`cargo build --release\` (or set SWITCHBOARD_BIN)`);
    }
    this.dir = await mkdtemp(join(tmpdir(), 'switchboard-browser-'));
    this.port = await freePort();
    this.url = `http://${this.host}:${this.port}`;
    // Only our own SWITCHBOARD_* variables reach the server: it refuses unknown ones, and the test
    // tooling sets a few of its own (SWITCHBOARD_CHROMIUM, SWITCHBOARD_BIN...).
    const inherited = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('SWITCHBOARD_')));
    this.env = {
      ...inherited,
      SWITCHBOARD_STORAGE_PATH: join(this.dir, 'switchboard.db'),
      SWITCHBOARD_SERVER_LISTEN: `${this.host}:${this.port}`,
      SWITCHBOARD_MEDIA_BIND: this.host,
      SWITCHBOARD_MEDIA_UDP_PORT: '0',
      SWITCHBOARD_MEDIA_TCP_PORT: '0',
      // Stopping at the end should not wait out calls in progress (SIGTERM drains them).
      SWITCHBOARD_SERVER_DRAIN_TIMEOUT: '1',
      // The group-call scenario rings again a user who declined: 2 s of re-invite cooldown, not 30
      // (the rule itself is tested in tests/hostile.rs).
      SWITCHBOARD_SIGNALING_REINVITE_COOLDOWN: '2',
      RUST_LOG: process.env.RUST_LOG ?? 'info',
      ...this.extraEnv,
    };
    if (!this.dev) this.env.SWITCHBOARD_AUTH_SECRET = randomBytes(32).toString('hex');
    const log = createWriteStream(this.logPath);
    this.proc = spawn(this.bin, this.#serveArgs, { env: this.env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc.stdout.pipe(log);
    this.proc.stderr.pipe(log);
    this.exited = new Promise((resolve) => this.proc.on('exit', (code, signal) => resolve({ code, signal })));
    const up = waitUntil(async () => (await fetch(`${this.url}/healthz`)).ok, { timeout: 30_000, what: 'the server to answer /healthz' });
    const died = this.exited.then(({ code, signal }) => {
      throw new Error(`the server exited (${signal ?? code}) while starting; see ${this.logPath}`);
    });
    await Promise.race([up, died]);
    const { stdout } = await execFileP(this.bin, ['token', ...(this.dev ? ['--dev'] : []), '--user', 'ops', '--admin'], { env: this.env });
    this.adminToken = stdout.trim().split(/\s+/).pop();
    return this;
  }

  /** GET an admin endpoint; resolves with `{status, body}`. */
  async admin(path) {
    const r = await fetch(`${this.url}${path}`, { headers: { authorization: `Bearer ${this.adminToken}` } });
    let body = null;
    try {
      body = await r.json();
    } catch { /* not JSON */ }
    return { status: r.status, body };
  }

  /** Kills the server (a crash: no drain, sockets just drop) and starts it again on the same port
   * and database. */
  async crashAndRestart() {
    this.proc.kill('SIGKILL');
    await this.exited;
    const log = createWriteStream(this.logPath, { flags: 'a' });
    this.proc = spawn(this.bin, this.#serveArgs, { env: this.env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc.stdout.pipe(log);
    this.proc.stderr.pipe(log);
    this.exited = new Promise((resolve) => this.proc.on('exit', (code, signal) => resolve({ code, signal })));
    await waitUntil(async () => (await fetch(`${this.url}/healthz`)).ok, { timeout: 30_000, what: 'the restarted server' });
  }

  async stop() {
    if (this.proc && this.proc.exitCode == null) {
      this.proc.kill('SIGTERM');
      const timer = setTimeout(() => this.proc.kill('SIGKILL'), 10_000);
      await this.exited;
      clearTimeout(timer);
    }
    if (this.dir) await rm(this.dir, { recursive: true, force: true });
  }
}

export const DESKTOP = { width: 1280, height: 800 };
export const PHONE = { width: 390, height: 844 };

// Chromium's fake microphone only beeps briefly once a second, which an active-speaker detector
// rightly ignores. A user created with `speaking: true` talks instead: the microphone track their
// page gets is a steady tone from WebAudio (no audio processing applies to it), so the server hears
// them through the audio-level header extension as a speaker would be heard.
const SPEAK = `(() => {
  const md = navigator.mediaDevices;
  const original = md.getUserMedia.bind(md);
  md.getUserMedia = async (constraints) => {
    const stream = await original(constraints);
    if (!constraints || !constraints.audio) return stream;
    const ctx = new AudioContext();
    const osc = ctx.createOscillator();
    osc.frequency.value = 220;
    const gain = ctx.createGain();
    gain.gain.value = 0.3;
    const out = ctx.createMediaStreamDestination();
    osc.connect(gain).connect(out);
    osc.start();
    await ctx.resume().catch(() => {});
    for (const t of stream.getAudioTracks()) { stream.removeTrack(t); t.stop(); }
    stream.addTrack(out.stream.getAudioTracks()[0]);
    return stream;
  };
})();`;

/** One person in one fresh browser context (its own cookies, storage and permissions). */
export class User {
  /** `browser`: another browser than the scenario's (e.g. one inside a network namespace). */
  constructor(t, { id, name, viewport = DESKTOP, query = '', device, speaking = false, server, browser }) {
    this.t = t;
    this.browser = browser;
    this.server = server ?? t.server;
    this.speaking = speaking;
    this.id = id;
    /** Names the page in screenshots and logs: the user ID, or `<id>-<device>` for a second device. */
    this.label = device ? `${id}-${device}` : id;
    this.name = name;
    this.viewport = viewport;
    this.query = query;
    this.logs = [];
    this.errors = [];
  }

  async open() {
    const browser = this.browser ?? this.t.browser;
    const { server } = this;
    this.context = await browser.newContext({
      viewport: this.viewport,
      deviceScaleFactor: 1,
      permissions: ['camera', 'microphone'],
      baseURL: server.url,
    });
    if (process.env.SWITCHBOARD_WEB_FROM_DISK === '1') await serveWebFromDisk(this.context);
    if (this.speaking) await this.context.addInitScript(SPEAK);
    this.page = await this.context.newPage();
    this.page.on('console', (m) => this.logs.push(`[${m.type()}] ${m.text()}`));
    this.page.on('pageerror', (e) => {
      this.errors.push(e);
      this.logs.push(`[pageerror] ${e.stack ?? e.message}`);
    });
    await this.page.goto(`/${this.query}`);
    await this.page.locator('#view-signin').waitFor({ state: 'visible' });
    return this;
  }

  /** Signs in through the form (dev mode: the page fetches a token). */
  async signIn() {
    const p = this.page;
    await p.getByLabel('User ID', { exact: true }).fill(this.id);
    await p.getByLabel(/Display name/).fill(this.name);
    await p.getByRole('button', { name: 'Sign in' }).click();
    await p.locator('#view-home').waitFor({ state: 'visible' });
    await waitUntil(() => p.evaluate(() => window.switchboardApp?.sb?.state === 'open'), { what: `${this.id} connected` });
    return this;
  }

  /** Starts a call from home: `type` is 'video' or 'voice'. */
  async call(ids, type = 'video') {
    const p = this.page;
    await p.getByLabel('Who do you want to call?').fill(Array.isArray(ids) ? ids.join(', ') : ids);
    await p.getByRole('button', { name: type === 'video' ? 'Video call' : 'Voice call', exact: true }).click();
  }

  /** The incoming-call dialog, once it is open. */
  async incoming({ timeout = 10_000 } = {}) {
    const dlg = this.page.locator('dialog#incoming[open]');
    await dlg.waitFor({ state: 'visible', timeout });
    return dlg;
  }

  async view(name, { timeout = 10_000 } = {}) {
    await this.page.locator(`#view-${name}`).waitFor({ state: 'visible', timeout });
  }

  async homeNotice({ timeout = 10_000 } = {}) {
    await this.view('home', { timeout });
    const n = this.page.locator('#home-notice');
    await n.waitFor({ state: 'visible', timeout });
    return (await n.textContent()).trim();
  }

  /** The call ID of the call the page is in (or waiting on). */
  callId() {
    return this.page.evaluate(() => window.switchboardApp.call?.callId ?? window.switchboardApp.outgoing?.callId ?? null);
  }

  /** Waits until the tile of `userId` plays video: frames are decoded and time advances. */
  async expectVideoFrom(userId, { timeout = 30_000 } = {}) {
    const p = this.page;
    const sample = () => p.evaluate((uid) => {
      const v = document.querySelector(`.tile[data-user="${CSS.escape(uid)}"] video`);
      return v ? { w: v.videoWidth, h: v.videoHeight, t: v.currentTime, paused: v.paused } : null;
    }, userId);
    const first = await waitUntil(async () => {
      const s = await sample();
      return s && s.w > 0 && s.t > 0 && !s.paused ? s : null;
    }, { timeout, what: `${this.id} to receive video from ${userId}` });
    await sleep(1200);
    let second = await sample();
    if (second && second.t < first.t) {
      // The element's playback started over (its stream's track was replaced: seen in the
      // reconnect scenario right after a call starts following a server restart; a known
      // defect, see the session notes). It must then play on from there.
      this.t.log(`${this.id}: video from ${userId} restarted (${first.t} → ${second.t})`);
      const restarted = second;
      await sleep(1200);
      second = await sample();
      assert(second && second.t > restarted.t + 0.5, `${this.id}: video from ${userId} is not advancing after it restarted (${restarted.t} → ${second?.t})`);
      return second;
    }
    assert(second && second.t > first.t + 0.5, `${this.id}: video from ${userId} is not advancing (${first.t} → ${second?.t})`);
    return second;
  }

  /** Waits until video from `userId` plays on (after a freeze): polls until its time has moved
   * by 0.5 s within a 1.2 s window. Resolves with when that window began. */
  async videoResumes(userId, { timeout = 20_000 } = {}) {
    const p = this.page;
    const time = () => p.evaluate((uid) => document.querySelector(`.tile[data-user="${CSS.escape(uid)}"] video`)?.currentTime ?? 0, userId);
    const deadline = Date.now() + timeout;
    for (;;) {
      const at = Date.now();
      const t0 = await time();
      await sleep(1200);
      const t1 = await time();
      if (t1 > t0 + 0.5) return at;
      assert(Date.now() < deadline, `${this.id}: video from ${userId} did not resume within ${timeout} ms (${t0} → ${t1})`);
    }
  }

  /** The server-measured resolution shown on a remote tile, e.g. "640×360". */
  async measuredResolution(userId, { timeout = 20_000 } = {}) {
    const badge = this.page.locator(`.tile[data-user="${userId}"] .tile-res`);
    await badge.waitFor({ state: 'visible', timeout });
    const text = (await badge.textContent()).trim();
    assert(/^\d+×\d+$/.test(text), `${this.id}: resolution badge of ${userId} reads “${text}”`);
    return text;
  }

  async shot(label) {
    await this.t.shot(this, label);
  }

  async close() {
    await this.context?.close().catch(() => {});
  }
}

/** Runs a command; rejects with its stderr if it fails. */
export async function sh(cmd, args) {
  try {
    return (await execFileP(cmd, args)).stdout;
  } catch (e) {
    throw new Error(`${cmd} ${args.join(' ')}: ${e.stderr?.trim() || e.message}`);
  }
}

/**
 * A client network namespace joined to the host by a veth pair: the host side is `hostIp`, the
 * namespace side `nsIp` (a /29 of 10.213.0.0/16 picked from the process ID, so that parallel runs
 * do not collide). Made and removed by the test; needs root (`ip netns`, nftables).
 */
export class Netns {
  constructor(tag) {
    const n = (process.pid % 250) + 1;
    this.name = `sb${tag}${process.pid}`;
    this.hostIf = `sbh${process.pid % 100000}`;
    this.nsIf = `sbn${process.pid % 100000}`;
    this.hostIp = `10.213.${n}.1`;
    this.nsIp = `10.213.${n}.2`;
  }

  static available() {
    return typeof process.getuid === 'function' && process.getuid() === 0;
  }

  async create() {
    await sh('ip', ['netns', 'add', this.name]);
    this.created = true;
    await sh('ip', ['link', 'add', this.hostIf, 'type', 'veth', 'peer', 'name', this.nsIf]);
    await sh('ip', ['link', 'set', this.nsIf, 'netns', this.name]);
    await sh('ip', ['addr', 'add', `${this.hostIp}/29`, 'dev', this.hostIf]);
    await sh('ip', ['link', 'set', this.hostIf, 'up']);
    await this.exec('ip', ['addr', 'add', `${this.nsIp}/29`, 'dev', this.nsIf]);
    await this.exec('ip', ['link', 'set', this.nsIf, 'up']);
    await this.exec('ip', ['link', 'set', 'lo', 'up']);
    return this;
  }

  exec(cmd, args) {
    return sh('ip', ['netns', 'exec', this.name, cmd, ...args]);
  }

  /** Source-NATs the namespace's UDP to random ports (nftables `masquerade random`), as a NAT
   * with port randomization does; `rebindUdp` then gives every UDP flow a new mapping. */
  async natUdp() {
    await this.exec('nft', ['add', 'table', 'ip', 'sbnat']);
    await this.exec('nft', ['add', 'chain', 'ip', 'sbnat', 'post', '{ type nat hook postrouting priority 100; }']);
    await this.exec('nft', ['add', 'rule', 'ip', 'sbnat', 'post', 'oifname', this.nsIf, 'meta', 'l4proto', 'udp', 'masquerade', 'random']);
  }

  /** Flushes the NAT's UDP mappings (conntrack): the next datagram of each flow leaves from a new
   * port. TCP (signaling) keeps its mapping. */
  async rebindUdp() {
    await this.exec('conntrack', ['-D', '-p', 'udp']).catch((e) => {
      // conntrack exits 1 when it deleted nothing.
      if (!/0 flow entries/.test(e.message)) throw e;
    });
  }

  /** Drops every UDP datagram the namespace sends (the path fails) until `unblockUdp`. */
  async blockUdp() {
    await this.exec('nft', ['add', 'table', 'inet', 'sbfail']);
    await this.exec('nft', ['add', 'chain', 'inet', 'sbfail', 'out', '{ type filter hook output priority 0; policy accept; }']);
    await this.exec('nft', ['add', 'rule', 'inet', 'sbfail', 'out', 'meta', 'l4proto', 'udp', 'drop']);
  }

  async unblockUdp() {
    await this.exec('nft', ['delete', 'table', 'inet', 'sbfail']);
  }

  /** Moves the namespace to the next address of its /29 (a network hand-over: every path that
   * used the old address dies). */
  async changeAddress() {
    const next = this.nsIp.replace(/\.(\d+)$/, (_, d) => `.${Number(d) + 1}`);
    await this.exec('ip', ['addr', 'add', `${next}/29`, 'dev', this.nsIf]);
    await this.exec('ip', ['addr', 'del', `${this.nsIp}/29`, 'dev', this.nsIf]);
    this.nsIp = next;
  }

  /** Drops (and counts) every UDP datagram the namespace sends to `ip` (only to `port`, if given). */
  async blockUdpTo(ip, port) {
    await this.exec('nft', ['add', 'table', 'inet', 'sbblock']);
    await this.exec('nft', ['add', 'chain', 'inet', 'sbblock', 'out', '{ type filter hook output priority 0; policy accept; }']);
    const match = port ? ['udp', 'dport', String(port)] : ['meta', 'l4proto', 'udp'];
    await this.exec('nft', ['add', 'rule', 'inet', 'sbblock', 'out', 'ip', 'daddr', ip, ...match, 'counter', 'drop']);
  }

  /** Packets the `blockUdpTo` rule dropped. */
  async udpDropped() {
    const out = await this.exec('nft', ['list', 'table', 'inet', 'sbblock']);
    const m = /counter packets (\d+)/.exec(out);
    return m ? Number(m[1]) : 0;
  }

  /** Shapes what the host sends into the namespace to `rate` (e.g. '600kbit') with a token
   * bucket (`tc tbf`; this kernel has no netem), or lifts the limit with `null`. */
  async limitDownlink(rate) {
    await sh('tc', ['qdisc', 'del', 'dev', this.hostIf, 'root']).catch(() => {});
    if (rate) await sh('tc', ['qdisc', 'add', 'dev', this.hostIf, 'root', 'tbf', 'rate', rate, 'burst', '20kb', 'latency', '300ms']);
  }

  /** A script that runs Chromium inside the namespace (for playwright's `executablePath`). */
  async chromiumWrapper(dir, chromium) {
    const { writeFile, chmod } = await import('node:fs/promises');
    const path = join(dir, `chromium-in-${this.name}`);
    await writeFile(path, `#!/bin/sh\nexec ip netns exec ${this.name} ${chromium} "$@"\n`);
    await chmod(path, 0o755);
    return path;
  }

  async destroy() {
    await sh('ip', ['link', 'del', this.hostIf]).catch(() => {});
    if (this.created) await sh('ip', ['netns', 'del', this.name]).catch(() => {});
  }
}

/** A real TURN server (Debian's coturn) on `ip`, checking TURN REST credentials
 * (`use-auth-secret`) as deploy/coturn/turnserver.conf does. */
export class Coturn {
  /** `tcp`: also take TURN over TCP, and hand out the `?transport=tcp` URL. */
  constructor(dir, ip, secret, { tcp = false } = {}) {
    this.dir = dir;
    this.ip = ip;
    this.secret = secret;
    this.tcp = tcp;
  }

  get url() {
    return `turn:${this.ip}:${this.port}?transport=${this.tcp ? 'tcp' : 'udp'}`;
  }

  async start() {
    const { writeFile } = await import('node:fs/promises');
    this.port = await freePort();
    this.log = join(this.dir, 'turnserver.log');
    const conf = join(this.dir, 'turnserver.conf');
    await writeFile(conf, [
      `listening-ip=${this.ip}`, `listening-port=${this.port}`, `relay-ip=${this.ip}`,
      'min-port=41000', 'max-port=41999', 'use-auth-secret', `static-auth-secret=${this.secret}`,
      'realm=switchboard.test', 'fingerprint', 'no-tls', 'no-dtls', ...(this.tcp ? [] : ['no-tcp']), 'no-cli',
      'no-software-attribute', `pidfile=${join(this.dir, 'turnserver.pid')}`, `log-file=${this.log}`,
      'simple-log', 'verbose', '',
    ].join('\n'));
    this.proc = spawn('turnserver', ['-c', conf], { stdio: 'ignore' });
    await waitUntil(async () => /listener opened on/.test(await readFile(this.log, 'utf8').catch(() => '')),
      { timeout: 10_000, what: 'coturn to open its listener' });
    return this;
  }

  async logText() {
    return readFile(this.log, 'utf8').catch(() => '');
  }

  stop() {
    this.proc?.kill('SIGTERM');
  }
}
