#!/usr/bin/env node
// Runs the browser end-to-end scenarios against the real server binary.
//
//   node run.mjs                 every scenario
//   node run.mjs decline busy    only scenarios whose name contains one of the words
//
// It starts `target/release/switchboard serve --dev` (or $SWITCHBOARD_BIN) on a free port with a
// temporary database, launches headless Chromium ($SWITCHBOARD_CHROMIUM, default /usr/bin/chromium)
// with a fake camera and microphone, gives each user a fresh browser context, and saves screenshots
// under test-output/browser/<scenario>/. Exits non-zero if any scenario fails.

import { chromium } from 'playwright-core';
import { mkdir, rm } from 'node:fs/promises';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TestServer, User } from './lib.mjs';
import { scenarios } from './scenarios.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '..', '..');
const out = join(root, 'test-output', 'browser');
const bin = process.env.SWITCHBOARD_BIN || join(root, 'target', 'release', 'switchboard');
const chromiumPath = process.env.SWITCHBOARD_CHROMIUM || '/usr/bin/chromium';
const filters = process.argv.slice(2).filter((a) => !a.startsWith('-'));
const SCENARIO_TIMEOUT_MS = Number(process.env.SWITCHBOARD_SCENARIO_TIMEOUT_MS || 120_000);

const CHROMIUM_ARGS = [
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms / 1000} s`)), ms);
    }),
  ]);
}

async function main() {
  const chosen = scenarios.filter((s) => !filters.length || filters.some((f) => s.name.includes(f)));
  if (!chosen.length) {
    console.error(`no scenario matches ${filters.join(', ')}; have: ${scenarios.map((s) => s.name).join(', ')}`);
    process.exit(2);
  }
  await rm(out, { recursive: true, force: true });
  await mkdir(out, { recursive: true });
  const server = new TestServer({ bin, logPath: join(out, 'server.log') });
  let browser;
  const results = [];
  try {
    await server.start();
    console.log(`server ${server.url} (log: ${relative(process.cwd(), join(out, 'server.log'))})`);
    browser = await chromium.launch({ executablePath: chromiumPath, headless: true, args: CHROMIUM_ARGS });
    console.log(`chromium ${browser.version()}`);
    for (const s of chosen) results.push(await runOne(s, { server, browser }));
  } catch (e) {
    console.error(`setup failed: ${e.stack ?? e}`);
    results.push({ name: 'setup', ok: false });
  } finally {
    await browser?.close().catch(() => {});
    await server.stop().catch(() => {});
  }
  const failed = results.filter((r) => !r.ok);
  console.log(`\n${results.length - failed.length} passed, ${failed.length} failed${failed.length ? `: ${failed.map((r) => r.name).join(', ')}` : ''}`);
  console.log(`screenshots: ${relative(process.cwd(), out)}/`);
  process.exit(failed.length ? 1 : 0);
}

async function runOne(s, { server, browser }) {
  const dir = join(out, s.name);
  await mkdir(dir, { recursive: true });
  const users = [];
  const servers = [];
  let n = 0;
  const browsers = [];
  const cleanups = [];
  const t = {
    /** Runs `f` when the scenario ends, after its browsers and servers are gone. */
    defer(f) {
      cleanups.push(f);
    },
    server,
    browser,
    dir,
    chromiumPath,
    /** Another Chromium (e.g. a wrapper that runs it in a namespace), closed at the end. `args`: extra flags. */
    async launchBrowser(executablePath, args = []) {
      const b = await chromium.launch({ executablePath, headless: true, args: [...CHROMIUM_ARGS, ...args] });
      browsers.push(b);
      return b;
    },
    /** A signed-out user on a fresh page. `opts`: id, name, viewport, query. */
    async user(opts) {
      const u = new User(t, opts);
      users.push(u);
      await u.open();
      return u;
    },
    async shot(user, label) {
      n += 1;
      const file = join(dir, `${String(n).padStart(2, '0')}-${user.label}-${label}.png`);
      await user.page.screenshot({ path: file, animations: 'disabled' });
    },
    log: (msg) => console.log(`    ${msg}`),
    /** Another server, just for this scenario (e.g. `{dev: false}`); stopped at its end. */
    async startServer(opts) {
      const s = new TestServer({ bin, logPath: join(dir, `server-${servers.length + 1}.log`), ...opts });
      servers.push(s);
      return s.start();
    },
  };
  const started = Date.now();
  process.stdout.write(`\n● ${s.name}: ${s.title}\n`);
  let ok = true;
  try {
    await withTimeout(s.run(t), SCENARIO_TIMEOUT_MS, s.name);
    const crashed = users.filter((u) => u.errors.length);
    if (crashed.length) {
      throw new Error(`uncaught errors in the page of ${crashed.map((u) => `${u.label}: ${u.errors[0].message}`).join('; ')}`);
    }
  } catch (e) {
    ok = false;
    console.log(`  ✗ ${e.message}`);
    for (const u of users) {
      await u.page?.screenshot({ path: join(dir, `failure-${u.label}.png`) }).catch(() => {});
      const tail = u.logs.slice(-25);
      if (tail.length) console.log(`    console of ${u.label}:\n${tail.map((l) => `      ${l}`).join('\n')}`);
    }
  } finally {
    for (const u of users) await u.close();
    for (const b of browsers) await b.close().catch(() => {});
    for (const srv of servers) await srv.stop().catch(() => {});
    for (const f of cleanups.reverse()) await Promise.resolve().then(f).catch(() => {});
  }
  const secs = ((Date.now() - started) / 1000).toFixed(1);
  console.log(ok ? `  ✓ passed in ${secs} s` : `  ✗ failed after ${secs} s`);
  return { name: s.name, ok };
}

main();
