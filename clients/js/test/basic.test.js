// Connect, subscribe, publish, presence, history and errors against the real binary and Redis.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";

import WebSocket from "ws";

import { Pubgate, PubgateError } from "../src/index.js";
import {
  startRedis, startNode, client, connected, subscribed, once, channel, hasHistory,
  backendPublish, waitFor, sleep,
} from "./helpers.js";

let redis, node;
before(async () => {
  redis = await startRedis();
  node = await startNode({ PUBGATE_REDIS_URL: redis.url });
});
after(async () => {
  await node?.kill();
  redis?.stop();
});

test("connects and reports the welcome", async () => {
  const c = client(node);
  const ev = await connected(c);
  assert.equal(typeof ev.connId, "string");
  assert.equal(typeof ev.node, "string");
  assert.equal(c.state, "connected");
  c.close();
  assert.equal(c.state, "closed");
});

test("subscribe, publish and receive, in order, publisher included", async () => {
  const c = client(node);
  await connected(c);
  const ch = channel("news");
  const [sub] = await subscribed(c, ch);
  const got = [];
  sub.on("message", (m) => got.push(m.data));
  for (let i = 0; i < 20; i++) await c.publish(ch, { i });
  await waitFor(() => got.length === 20, 5000, "20 messages");
  assert.deepEqual(got, Array.from({ length: 20 }, (_, i) => ({ i })));
  c.close();
});

test("a backend publish on Redis reaches the subscription", async () => {
  const c = client(node);
  await connected(c);
  const ch = channel("backend");
  const [sub] = await subscribed(c, ch);
  const msg = once(sub, "message");
  backendPublish(redis, node, ch, { from: "backend" });
  assert.deepEqual((await msg).data, { from: "backend" });
  c.close();
});

test("subscriptions made before connect() are sent once connected", async () => {
  const c = client(node);
  const ch = channel("early");
  const sub = c.subscribe(ch);
  const s = once(sub, "subscribed");
  c.connect();
  await s;
  assert.equal(sub.state, "subscribed");
  const m = once(sub, "message");
  await c.publish(ch, "hi");
  assert.equal((await m).data, "hi");
  c.close();
});

test("a request made while connecting waits for the connection", async () => {
  const c = client(node);
  c.connect();
  const reply = await c.publish(channel("queued"), 1);
  assert.equal(typeof reply, "object");
  c.close();
});

test("unsubscribe stops deliveries", async () => {
  const c = client(node);
  await connected(c);
  const ch = channel("unsub");
  const [sub] = await subscribed(c, ch);
  let n = 0;
  sub.on("message", () => n++);
  await sub.unsubscribe();
  assert.equal(sub.state, "unsubscribed");
  await c.publish(ch, 1);
  await sleep(300);
  assert.equal(n, 0);
  c.close();
});

test("presence lists every subscriber", async () => {
  const a = client(node);
  const b = client(node);
  const [ea] = await Promise.all([connected(a), connected(b)]);
  const ch = channel("room");
  await subscribed(a, ch);
  await subscribed(b, ch);
  const p = await a.presence(ch);
  assert.equal(p.count, 2);
  assert.ok(p.members.some((m) => m.conn_id === ea.connId));
  a.close();
  b.close();
});

test("errors reject with the server's code and keep the connection", async () => {
  const c = client(node);
  await connected(c);
  await assert.rejects(c.publish("__reserved", 1), (e) => {
    assert.ok(e instanceof PubgateError);
    assert.equal(e.code, "invalid_channel");
    return true;
  });
  await assert.rejects(c.presence("bad channel!"), { code: "invalid_channel" });
  const sub = c.subscribe("__nope");
  const err = await once(sub, "error");
  assert.equal(err.code, "invalid_channel");
  assert.equal(sub.state, "unsubscribed");
  assert.equal(c.state, "connected");
  await c.publish(channel("ok"), 1);
  c.close();
});

test("requests after close() reject with not_connected; pending ones with closed", async () => {
  const c = client(node);
  await connected(c);
  const inflight = c.publish(channel("x"), 1);
  c.close();
  await assert.rejects(inflight, { code: "closed" });
  await assert.rejects(c.publish(channel("x"), 1), { code: "not_connected" });
});

test("a request without reply times out with code timeout", async () => {
  // SIGSTOP freezes the node: the request is sent and never answered.
  const c = client(node, { requestTimeout: 300, pingMargin: 60000 });
  await connected(c);
  await node.freeze();
  try {
    await assert.rejects(c.publish(channel("t"), 1), { code: "timeout" });
  } finally {
    node.thaw();
  }
  c.close();
});

test("history returns the kept messages, oldest first (needs history)", async (t) => {
  const c = client(node);
  await connected(c);
  const ch = channel("hist");
  const [, ev] = await subscribed(c, ch);
  if (!hasHistory(ev)) {
    t.skip("server without history (no epoch in subscribed): lands with the history branch");
    c.close();
    return;
  }
  for (let i = 1; i <= 5; i++) await c.publish(ch, i);
  const h = await c.history(ch, { limit: 3 });
  assert.equal(h.epoch, ev.epoch);
  assert.deepEqual(h.messages.map((m) => m.data), [3, 4, 5]);
  assert.deepEqual(h.messages.map((m) => m.offset), [ev.offset + 3, ev.offset + 4, ev.offset + 5]);
  c.close();
});

test("join and leave events (needs presence events)", async (t) => {
  const a = client(node);
  const b = client(node);
  await Promise.all([connected(a), connected(b)]);
  const ch = channel("lobby");
  const probe = await a.presence(ch, { countOnly: true });
  if ("members" in probe) {
    t.skip("server without presence v2 (count_only ignored): lands with the presence branch");
    a.close();
    b.close();
    return;
  }
  const [sub] = await subscribed(a, ch, { presenceEvents: true });
  const join = once(sub, "join");
  const [subB] = await subscribed(b, ch);
  const eb = b.connId;
  assert.equal((await join).conn_id, eb);
  const leave = once(sub, "leave");
  await subB.unsubscribe();
  assert.equal((await leave).conn_id, eb);
  a.close();
  b.close();
});

test("works with Node's own global WebSocket (browser-like, no ws package)", async () => {
  const { execFile } = await import("node:child_process");
  const entry = new URL("../src/index.js", import.meta.url).href;
  const script = `
    import { Pubgate } from ${JSON.stringify(entry)};
    const c = new Pubgate(process.env.URL, { minReconnectDelay: 100 });
    const sub = c.subscribe("global-ws");
    const got = new Promise((r) => sub.on("message", (m) => r(m.data)));
    await new Promise((r) => { sub.on("subscribed", r); c.connect(); });
    await c.publish("global-ws", { native: true });
    console.log(JSON.stringify(await got));
    c.close();`;
  const out = await new Promise((resolve, reject) =>
    execFile(
      process.execPath,
      [
        // Node 22+ has the global WebSocket; Node 20 behind this flag.
        ...(typeof globalThis.WebSocket === "function" ? [] : ["--experimental-websocket"]),
        "--no-warnings", "--input-type=module", "-e", script,
      ],
      { env: { ...process.env, URL: node.ws }, timeout: 10000 },
      (err, stdout, stderr) => (err ? reject(new Error(`${err} ${stderr}`)) : resolve(stdout)),
    ),
  );
  assert.deepEqual(JSON.parse(out), { native: true });
});

test("the package resolves by its name through package.json exports", async () => {
  const byName = await import("pubgate-client");
  const byPath = await import("../src/index.js");
  assert.equal(byName.Pubgate, byPath.Pubgate);
});

test("close() and connect() while getToken is pending leave one connection", async () => {
  let release;
  const gate = new Promise((r) => (release = r));
  let calls = 0;
  const made = [];
  class Counting extends WebSocket {
    constructor(...a) {
      super(...a);
      made.push(this);
    }
  }
  // The node is anonymous: any token string is accepted (ignored).
  const c = client(node, {
    WebSocket: Counting,
    getToken: () => (calls++ === 0 ? gate.then(() => "slow") : Promise.resolve("fast")),
  });
  c.connect(); // waits for the first getToken
  c.close();
  await connected(c); // the second connect gets its token at once
  release();
  await sleep(300);
  assert.equal(made.length, 1, "the first, abandoned attempt opened no socket");
  assert.equal(calls, 2);
  c.close();
});

test("an http(s) URL is turned into ws(s) (pages may pass one)", async () => {
  const c = new Pubgate(`${node.http}/ws`, { WebSocket });
  await connected(c);
  c.close();
});
