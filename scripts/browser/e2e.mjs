// Drives headless Chromium (Debian's /usr/bin/chromium, through playwright-core) through
// relay-only WebRTC calls on index.html, one per scenario, against a uturn that
// scripts/browser-e2e.sh started, and asserts on what the browser and uturn's allocations API
// report. During each call a second tab opens uturn's own relay-usage page (GET / on its HTTP
// listener), gives it the admin token when it asks, checks that it lists both allocations and
// that their counters grow between two of its refreshes, and saves a screenshot of it.
// Usage: node e2e.mjs CONFIG.json (fields: see scripts/browser-e2e.sh). Exit status 0
// only if every scenario passed; the browser console goes to config.consoleLog.
import { chromium } from 'playwright-core';
import { createHmac } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const here = path.dirname(fileURLToPath(import.meta.url));
const page = readFileSync(path.join(here, 'index.html'));
const consoleLines = [];

// Messages each way on the data channel, and RTP packets each side must have received per kind.
const MESSAGES = config.messages ?? 200;
const MEDIA_PACKETS = 50;

function restCredential(user) {
  // TURN REST (draft-uberti-behave-turn-rest-00): username "expiry:user",
  // password base64(HMAC-SHA1(secret, username)).
  const username = `${Math.floor(Date.now() / 1000) + 3600}:${user}`;
  const credential = createHmac('sha1', config.secret).update(username).digest('base64');
  return { username, credential };
}

const scenarios = [
  { name: 'udp', relayProtocol: 'udp', transport: 'udp',
    server: { urls: `turn:127.0.0.1:${config.udpPort}?transport=udp`, username: 'chrome-udp', credential: config.password } },
  { name: 'tcp', relayProtocol: 'tcp', transport: 'tcp',
    server: { urls: `turn:127.0.0.1:${config.tcpPort}?transport=tcp`, username: 'chrome-tcp', credential: config.password } },
  // turns: by name: Chromium verifies uturn's certificate for "localhost" against the test CA
  // that browser-e2e.sh put in the NSS database of the browser's HOME.
  { name: 'tls', relayProtocol: 'tls', transport: 'tls',
    server: { urls: `turns:localhost:${config.tlsPort}?transport=tcp`, username: 'chrome-tls', credential: config.password } },
  // uturn lists a TURN REST allocation under the user part of "expiry:user".
  { name: 'rest', relayProtocol: 'udp', transport: 'udp', apiUser: 'chrome-rest',
    server: { urls: `turn:127.0.0.1:${config.udpPort}?transport=udp`, ...restCredential('chrome-rest') } },
].filter((s) => !config.only || config.only.includes(s.name));
// After the calls: the relay-usage page's hints for allocations that show known failures.
const hintCheck = !config.only || config.only.includes('hints');

async function allocations(username) {
  const res = await fetch(`http://${config.http}/api/v1/allocations?user=${encodeURIComponent(username)}`,
    { headers: config.token ? { Authorization: `Bearer ${config.token}` } : {} });
  if (!res.ok) throw new Error(`allocations API answered ${res.status}`);
  return (await res.json()).allocations;
}

// The allocation whose relayed addresses include `address` ("IP:PORT").
function byRelayed(list, address) {
  return list.find((a) => a.relayed.includes(address));
}

async function poll(fn, what, timeoutMs) {
  const started = Date.now();
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() - started > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function check(failures, ok, message) {
  if (!ok) failures.push(message);
}

// uturn_dropped_packets_total{reason="no_permission"} from /metrics.
async function droppedNoPermission() {
  const res = await fetch(`http://${config.http}/metrics`,
    { headers: config.token ? { Authorization: `Bearer ${config.token}` } : {} });
  if (!res.ok) throw new Error(`/metrics answered ${res.status}`);
  const line = (await res.text()).split('\n')
    .find((l) => l.startsWith('uturn_dropped_packets_total{') && l.includes('reason="no_permission"'));
  return line ? Number(line.split(' ').pop()) : 0;
}

// The relay-usage page's view of the two allocations whose relayed addresses are `relayed`:
// per address the row's counters (packets and bytes each way), or null when it has no row.
function consoleRows(tab, relayed) {
  return tab.evaluate((addresses) => addresses.map((address) => {
    const row = [...document.querySelectorAll('#rows tr[data-relayed]')]
      .find((tr) => tr.dataset.relayed.split(' ').includes(address));
    if (!row) return null;
    const cell = (cls) => {
      const td = row.querySelector(`td.${cls}`);
      return { packets: Number(td.dataset.packets), bytes: Number(td.dataset.bytes) };
    };
    return { id: Number(row.dataset.id), to_peer: cell('to-peer'), to_client: cell('to-client') };
  }), relayed);
}

// Opens uturn's relay-usage page in a new tab: it must ask for the token when one is configured
// (the API answers 401 without it) and then draw its first refresh. `errors` collects what the
// page logs as errors (a Content-Security-Policy violation, a script error), except the 401s
// Chromium logs before the token is given.
async function openConsole(context, label, failures) {
  const tab = await context.newPage();
  const errors = [];
  let tokenGiven = !config.token;
  tab.on('console', (m) => {
    consoleLines.push(`[${label} console] ${m.type()}: ${m.text()}`);
    const expected = !tokenGiven && m.text().includes('status of 401');
    if (m.type() === 'error' && !expected) errors.push(m.text());
  });
  tab.on('pageerror', (e) => errors.push(`pageerror: ${e}`));
  await tab.setViewportSize({ width: 1500, height: 560 });
  await tab.goto(`http://${config.http}/`);
  const asked = await tab.waitForSelector('#token-form:not([hidden])', { timeout: 10000 })
    .then(() => true, () => false);
  check(failures, asked === Boolean(config.token),
    `relay-usage page: asked for the token ${asked}, a token is configured ${Boolean(config.token)}`);
  if (asked) {
    await tab.fill('#token', config.token);
    tokenGiven = true;
    await tab.click('#token-form button');
  }
  await tab.waitForFunction(() => Number(document.body.dataset.refreshes) >= 1, null, { timeout: 10000 });
  return { tab, errors };
}

const refreshes = (tab) => tab.evaluate(() => Number(document.body.dataset.refreshes));

// During the call: the relay-usage page lists both allocations and shows their counters grow
// each way between two of its own refreshes. Saves a screenshot; returns what it saw.
async function checkConsole(context, scenario, relayed, failures) {
  let tab = null;
  try {
    const opened = await openConsole(context, scenario.name, failures);
    tab = opened.tab;
    const first = await poll(async () => {
      const rows = await consoleRows(tab, relayed);
      return rows.every(Boolean) && rows;
    }, `the relay-usage page to list the allocations of ${relayed}`, 10000);
    const startedAt = await refreshes(tab);
    // At least one refresh later (the page refreshes every 2 s), each way must have moved.
    const grown = await poll(async () => {
      if (await refreshes(tab) < startedAt + 1) return null;
      const rows = await consoleRows(tab, relayed);
      const moved = rows.every((r, i) => r && r.id === first[i].id &&
        r.to_peer.packets > first[i].to_peer.packets && r.to_client.packets > first[i].to_client.packets &&
        r.to_peer.bytes > first[i].to_peer.bytes && r.to_client.bytes > first[i].to_client.bytes);
      return moved && rows;
    }, 'the relay-usage page\'s counters to grow each way between two refreshes', 15000);
    // One more refresh so that the rates (from the last two polls) are on the screenshot.
    const now = await refreshes(tab);
    await tab.waitForFunction((n) => Number(document.body.dataset.refreshes) > n, now, { timeout: 10000 });
    const state = await tab.evaluate(() => ({
      status: document.getElementById('s-state').textContent,
      hints: [...document.querySelectorAll('tr.hint-row')].map((r) => r.textContent),
    }));
    check(failures, state.status === 'ready', `relay-usage page: state ${state.status}`);
    const screenshot = path.join(config.screenshotDir, `console-${scenario.name}.png`);
    await tab.screenshot({ path: screenshot, fullPage: true });
    check(failures, opened.errors.length === 0,
      `relay-usage page errors (CSP or script): ${opened.errors.join(' | ')}`);
    return { screenshot, first, grown, hints: state.hints };
  } catch (e) {
    failures.push(`relay-usage page: ${e.message}`);
    return null;
  } finally {
    if (tab) await tab.close();
  }
}

// Two allocations that show the page's hints for real, made in one tab before the calls:
// - "idle": a relay-only RTCPeerConnection that gathers its relay candidate and is never given
//   a remote side, so its allocation never gets a permission;
// - "one way": a relay-only RTCPeerConnection whose only remote candidate is the idle
//   allocation's relayed address. Its connectivity checks leave through uturn towards that
//   address, but nothing ever comes back (the idle allocation has no permission, so uturn drops
//   them there): packets to the peer and none to the client, as when a firewall blocks the relay
//   port range.
// Returns the tab and the two relayed addresses.
async function startHintAllocations(context, baseUrl) {
  const tab = await context.newPage();
  await tab.goto(`${baseUrl}/index.html`);
  const server = (username) => ({ urls: `turn:127.0.0.1:${config.udpPort}?transport=udp`, username, credential: config.password });
  const relayed = await tab.evaluate(async ({ idleServer, oneWayServer }) => {
    const relayAddress = (sdp) => {
      // a=candidate:FOUNDATION COMPONENT PROTOCOL PRIORITY ADDRESS PORT typ relay ...
      const line = sdp.split('\r\n').find((l) => l.includes(' typ relay'));
      const f = line ? line.split(' ') : [];
      return f.length > 5 ? { ip: f[4], port: f[5], address: `${f[4]}:${f[5]}` } : null;
    };
    const gathered = (pc) => new Promise((resolve) => {
      if (pc.iceGatheringState === 'complete') resolve();
      pc.addEventListener('icegatheringstatechange', () => pc.iceGatheringState === 'complete' && resolve());
    });
    const idle = new RTCPeerConnection({ iceServers: [idleServer], iceTransportPolicy: 'relay' });
    idle.createDataChannel('idle');
    await idle.setLocalDescription(await idle.createOffer());
    await gathered(idle);
    const idleRelay = relayAddress(idle.localDescription.sdp);
    const oneWay = new RTCPeerConnection({ iceServers: [oneWayServer], iceTransportPolicy: 'relay' });
    const answerer = new RTCPeerConnection();
    window.hintPcs = [idle, oneWay, answerer];
    if (!idleRelay) return { idle: null, oneWay: null };
    oneWay.createDataChannel('one-way');
    await oneWay.setLocalDescription(await oneWay.createOffer());
    await answerer.setRemoteDescription(oneWay.localDescription);
    await answerer.setLocalDescription(await answerer.createAnswer());
    // The answer's ICE credentials and DTLS fingerprint, without its own candidates: the only
    // remote candidate is the idle allocation's relayed address.
    const sdp = answerer.localDescription.sdp.split('\r\n')
      .filter((l) => !l.startsWith('a=candidate') && !l.startsWith('a=end-of-candidates')).join('\r\n');
    await oneWay.setRemoteDescription({ type: 'answer', sdp });
    await oneWay.addIceCandidate({ sdpMLineIndex: 0,
      candidate: `candidate:1 1 udp 2122260223 ${idleRelay.ip} ${idleRelay.port} typ host` });
    await gathered(oneWay);
    const oneWayRelay = relayAddress(oneWay.localDescription.sdp);
    return { idle: idleRelay.address, oneWay: oneWayRelay && oneWayRelay.address };
  }, { idleServer: server('chrome-idle'), oneWayServer: server('chrome-oneway') });
  return { tab, ...relayed };
}

// After the calls: the page explains both allocations of startHintAllocations in words (the
// idle one once older than 10 s, the one-way one once 5 s have passed without a packet back),
// and its hint logic, run in the page, names an idle channel. Saves a screenshot.
async function checkHints(context, made) {
  const started = Date.now();
  const failures = [];
  let tab = null;
  try {
    check(failures, made.idle && made.oneWay,
      `the hint RTCPeerConnections gathered no relay candidate: ${JSON.stringify(made)}`);
    if (!made.idle || !made.oneWay) return { name: 'hints', ok: false, seconds: 0, failures };
    const opened = await openConsole(context, 'hints', failures);
    tab = opened.tab;
    const hintFor = (address, words) => poll(async () => {
      const [row] = await consoleRows(tab, [address]);
      if (!row) return null;
      return tab.evaluate(({ id, words }) => {
        const hr = document.querySelector(`tr.hint-row[data-hint-for="${id}"]`);
        return hr && hr.textContent.includes(words) && hr.textContent;
      }, { id: row.id, words });
    }, `the hint "${words}" for the allocation of ${address}`, 30000);
    const idleHint = await hintFor(made.idle, 'No permission');
    const oneWayHint = await hintFor(made.oneWay, 'the peer\'s packets do not reach the relay');
    const [oneWayRow] = await consoleRows(tab, [made.oneWay]);
    check(failures, oneWayRow.to_peer.packets > 0 && oneWayRow.to_client.packets === 0,
      `one-way allocation: counters ${JSON.stringify(oneWayRow)}`);
    // Where they went: dropped at the idle allocation, which has no permission for them.
    const noPermissionDrops = await droppedNoPermission();
    check(failures, noPermissionDrops > 0,
      `uturn_dropped_packets_total{reason="no_permission"} is ${noPermissionDrops}`);
    // No browser keeps a bound channel silent (ICE consent checks every few seconds), so the
    // idle-channel hint is checked on the page's own logic with counters that stood still.
    const idleChannel = await tab.evaluate(() => {
      const at = 100000;
      const a = { permissions: [{ peer: '192.0.2.7', expires: 0 }],
        channels: [{ channel: 0x4001, peer: '192.0.2.7:5000', expires: 0 }],
        to_peer: { packets: 40, bytes: 4000 }, to_client: { packets: 40, bytes: 4000 } };
      const still = { firstAt: at - 30000, peerMovedAt: at - 30000, clientMovedAt: at - 30000, anyMovedAt: at - 30000 };
      const moving = { firstAt: at - 30000, peerMovedAt: at, clientMovedAt: at, anyMovedAt: at };
      return { still: hints(a, 60, still, at), moving: hints(a, 60, moving, at) };
    });
    check(failures, idleChannel.still.length === 1 && idleChannel.still[0].includes('0x4001 bound but no packets'),
      `idle channel: ${JSON.stringify(idleChannel.still)}`);
    check(failures, idleChannel.moving.length === 0, `a channel with traffic has hints: ${idleChannel.moving}`);
    const screenshot = path.join(config.screenshotDir, 'console-hints.png');
    await tab.screenshot({ path: screenshot, fullPage: true });
    check(failures, opened.errors.length === 0,
      `relay-usage page errors (CSP or script): ${opened.errors.join(' | ')}`);
    return { name: 'hints', ok: failures.length === 0, seconds: (Date.now() - started) / 1000, failures,
      idleHint, oneWayHint, oneWayRow, noPermissionDrops, screenshot, made };
  } catch (e) {
    failures.push(String(e.stack || e));
    return { name: 'hints', ok: false, seconds: (Date.now() - started) / 1000, failures };
  } finally {
    if (tab) await tab.close();
  }
}

async function runScenario(context, baseUrl, scenario) {
  const started = Date.now();
  const failures = [];
  const tab = await context.newPage();
  tab.on('console', (m) => consoleLines.push(`[${scenario.name}] ${m.type()}: ${m.text()}`));
  tab.on('pageerror', (e) => consoleLines.push(`[${scenario.name}] pageerror: ${e}`));
  try {
    await tab.goto(`${baseUrl}/index.html`);
    await tab.evaluate((iceServers) => startCall({ iceServers }), [scenario.server]);

    const { atA, atB } = await tab.evaluate((n) => exchange({ n }), MESSAGES);
    for (const [side, got, prefix] of [['b', atB, 'a->b'], ['a', atA, 'b->a']]) {
      const wrong = got.findIndex((m, i) => m !== `${prefix} ${i}`);
      check(failures, got.length === MESSAGES && wrong === -1,
        `side ${side} received ${got.length}/${MESSAGES} messages, first out of order at ${wrong} (${got[wrong]})`);
    }

    const media = await poll(async () => {
      const m = await tab.evaluate(() => mediaStats());
      const enough = ['a', 'b'].every((s) => m[s].audio >= MEDIA_PACKETS && m[s].video >= MEDIA_PACKETS);
      return enough && m;
    }, `${MEDIA_PACKETS} audio and video packets received on both sides`, 20000);

    const pairs = await tab.evaluate(() => selectedPairs());
    for (const side of ['a', 'b']) {
      const p = pairs[side];
      check(failures, p && p.local.type === 'relay' && p.remote.type === 'relay',
        `side ${side}: selected pair is not relay/relay: ${JSON.stringify(p)}`);
      check(failures, p && p.local.relayProtocol === scenario.relayProtocol,
        `side ${side}: relay protocol ${p && p.local.relayProtocol}, expected ${scenario.relayProtocol}`);
      const other = pairs[side === 'a' ? 'b' : 'a'];
      check(failures, p && other && p.remote.address === other.local.address,
        `side ${side}: remote end ${p && p.remote.address} is not the other side's relayed address`);
    }

    // uturn's view of the same call: the two allocations whose relayed addresses are the
    // selected pairs' local ends, with counters that grow between two reads during the call.
    const username = scenario.apiUser ?? scenario.server.username;
    const relayed = ['a', 'b'].map((s) => pairs[s] && pairs[s].local.address);
    const first = await allocations(username);
    const firstPair = relayed.map((r) => byRelayed(first, r));
    check(failures, firstPair.every(Boolean),
      `allocations API (user ${username}) lacks the selected relayed addresses ${relayed}: ${JSON.stringify(first)}`);
    let grown = null;
    if (firstPair.every(Boolean)) {
      for (const a of firstPair) {
        check(failures, a.username === username, `allocation ${a.id}: username ${a.username}, expected ${username}`);
        check(failures, a.transport === scenario.transport,
          `allocation ${a.id}: transport ${a.transport}, expected ${scenario.transport}`);
      }
      grown = await poll(async () => {
        const second = await allocations(username);
        const secondPair = relayed.map((r) => byRelayed(second, r));
        const moved = secondPair.every((a, i) => a && a.id === firstPair[i].id &&
          a.to_peer.packets > firstPair[i].to_peer.packets && a.to_client.packets > firstPair[i].to_client.packets);
        return moved && secondPair;
      }, 'both allocations\' packet counters to grow each way', 10000).catch((e) => {
        failures.push(e.message);
        return null;
      });
    }
    const consoleView = firstPair.every(Boolean)
      ? await checkConsole(context, scenario, relayed, failures) : null;
    const seconds = (Date.now() - started) / 1000;
    await tab.evaluate(() => hangup());
    return {
      name: scenario.name, ok: failures.length === 0, seconds, failures,
      messages: MESSAGES, media, pairs, console: consoleView,
      allocations: firstPair.map((a, i) => a && {
        id: a.id, transport: a.transport, relayed: relayed[i],
        to_peer_packets: [a.to_peer.packets, grown?.[i]?.to_peer.packets],
        to_client_packets: [a.to_client.packets, grown?.[i]?.to_client.packets],
      }),
    };
  } catch (e) {
    failures.push(String(e.stack || e));
    return { name: scenario.name, ok: false, seconds: (Date.now() - started) / 1000, failures };
  } finally {
    await tab.close();
  }
}

const server = http.createServer((req, res) => {
  if (req.url.split('?')[0] === '/index.html') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(page);
  } else if (req.url === '/favicon.ico') {
    res.writeHead(204);
    res.end();
  } else {
    res.writeHead(404);
    res.end();
  }
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
// getUserMedia needs a secure context: http://localhost is one.
const baseUrl = `http://localhost:${server.address().port}`;

const context = await chromium.launchPersistentContext(config.userDataDir, {
  executablePath: config.chromium ?? '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--no-first-run', '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  ],
});
const results = [];
mkdirSync(config.screenshotDir, { recursive: true });
try {
  // Made first, so that they are old enough for their hints when the calls are done, and on
  // the screenshots of the calls that run after their first 10 s.
  const made = hintCheck ? await startHintAllocations(context, baseUrl) : null;
  for (const scenario of scenarios) {
    const r = await runScenario(context, baseUrl, scenario);
    results.push(r);
    const status = r.ok ? 'PASS' : 'FAIL';
    console.log(`${status} ${r.name.padEnd(5)} ${r.seconds.toFixed(1)} s` + (r.ok
      ? `: ${r.messages} messages each way in order; media packets a=${JSON.stringify(r.media.a)} b=${JSON.stringify(r.media.b)};` +
        ` pairs relay/relay over ${r.pairs.a.local.relayProtocol}; allocations ${r.allocations.map((a) =>
          `${a.id} to_peer ${a.to_peer_packets.join('->')} to_client ${a.to_client_packets.join('->')}`).join(', ')}` +
        `; relay-usage page ${r.console.first.map((f, i) =>
          `${f.id} to_peer ${f.to_peer.packets}->${r.console.grown[i].to_peer.packets} to_client ${f.to_client.packets}->${r.console.grown[i].to_client.packets}`).join(', ')}` +
        `${r.console.hints.length ? `, hints: ${r.console.hints.join(' / ')}` : ', no hint'}; screenshot ${r.console.screenshot}`
      : ''));
    for (const f of r.failures) console.log(`  ${f}`);
  }
  if (made) {
    const r = await checkHints(context, made);
    results.push(r);
    console.log(`${r.ok ? 'PASS' : 'FAIL'} hints ${r.seconds.toFixed(1)} s` + (r.ok
      ? `: idle allocation ${r.made.idle}: "${r.idleHint}"; one-way allocation ${r.made.oneWay} ` +
        `(to_peer ${r.oneWayRow.to_peer.packets} packets, to_client ${r.oneWayRow.to_client.packets}; ` +
        `${r.noPermissionDrops} packets dropped for no permission): ` +
        `"${r.oneWayHint}"; idle-channel hint from the page's logic; screenshot ${r.screenshot}` : ''));
    for (const f of r.failures) console.log(`  ${f}`);
    await made.tab.close();
  }
} finally {
  await context.close();
  server.close();
  writeFileSync(config.consoleLog, consoleLines.join('\n') + '\n');
  if (config.resultsJson) writeFileSync(config.resultsJson, JSON.stringify(results, null, 1));
}
const failed = results.filter((r) => !r.ok).length;
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed === 0 && results.length === scenarios.length + (hintCheck ? 1 : 0) ? 0 : 1);
