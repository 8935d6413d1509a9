// Reconnects: a node killed (SIGKILL) and restarted with recovery and no message lost or doubled;
// 500 clients dropped by a drain spread their reconnects; the delays stay within their bounds.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";

import { reconnectDelay } from "../src/index.js";
import {
  startRedis, startNode, client, connected, subscribed, once, channel, hasHistory,
  backendPublish, waitFor, sleep,
} from "./helpers.js";

let redis;
before(async () => {
  redis = await startRedis();
});
after(() => redis?.stop());

test("reconnectDelay: full jitter within [min, min(max, min*2^(n+1))]", () => {
  for (let n = 0; n < 40; n++) {
    const ceiling = Math.min(20000, 500 * 2 ** (n + 1));
    assert.equal(reconnectDelay(n, 500, 20000, () => 0), 500);
    assert.ok(Math.abs(reconnectDelay(n, 500, 20000, () => 0.999999) - ceiling) < 1);
    for (let i = 0; i < 50; i++) {
      const d = reconnectDelay(n, 500, 20000);
      assert.ok(d >= 500 && d <= ceiling, `attempt ${n}: ${d}`);
    }
  }
});

test("SIGKILL and restart: resubscribed, and with history no message lost or doubled", async () => {
  const node = await startNode({ PUBGATE_REDIS_URL: redis.url });
  try {
    const c = client(node);
    await connected(c);
    const ch = channel("recover");
    const [sub, first] = await subscribed(c, ch, { recover: true });
    const got = [];
    sub.on("message", (m) => got.push(m));
    for (let i = 1; i <= 10; i++) await c.publish(ch, i);
    await waitFor(() => got.length === 10, 5000, "10 live messages");

    const gone = once(c, "disconnected", 5000);
    const killedAt = Date.now();
    await node.kill("SIGKILL");
    const d = await gone;
    assert.equal(d.willReconnect, true);
    // Published by a backend while the node is down: only history can bring them.
    for (let i = 11; i <= 20; i++) backendPublish(redis, node, ch, i);

    const back = once(c, "connected", 20000);
    const resub = once(sub, "subscribed", 20000);
    await node.start();
    const readyAt = Date.now();
    await back;
    const connectedAt = Date.now();
    const ev = await resub;
    console.log(
      `# reconnect after SIGKILL: ${connectedAt - readyAt} ms after /readyz, ` +
        `${connectedAt - killedAt} ms after the kill (restart included)`,
    );
    for (let i = 21; i <= 30; i++) await c.publish(ch, i);

    if (!hasHistory(first)) {
      // Without history the messages published while down are lost (v1): the resubscription
      // must still work, deliver the new ones once, and say recovered:false.
      assert.equal(ev.recovered, false);
      await waitFor(() => got.length === 20, 5000, "20 messages");
      assert.deepEqual(got.map((m) => m.data), [...range(1, 10), ...range(21, 30)]);
      c.close();
      return;
    }
    assert.equal(ev.recovered, true, "recovered after a restart while history keeps them");
    await waitFor(() => got.length >= 30, 5000, "30 messages");
    await sleep(200);
    assert.deepEqual(got.map((m) => m.data), range(1, 30), "none lost, none doubled, in order");
    const offsets = got.map((m) => m.offset);
    for (let i = 1; i < offsets.length; i++) assert.equal(offsets[i], offsets[i - 1] + 1);
    c.close();
  } finally {
    await node.kill();
  }
});

test("500 clients dropped by a drain spread their reconnects (full jitter)", async () => {
  const node = await startNode({ PUBGATE_REDIS_URL: redis.url });
  const N = 500;
  const MIN = 1000;
  const MAX = 8000;
  const clients = [];
  try {
    for (let i = 0; i < N; i++) {
      // Record each socket's creation time: the first one after the drop is the retry.
      const opened = [];
      class Recording extends WebSocket {
        constructor(...args) {
          super(...args);
          opened.push(Date.now());
        }
      }
      const c = client(node, {
        WebSocket: Recording,
        minReconnectDelay: MIN,
        maxReconnectDelay: MAX,
        pingMargin: 30000,
        connectTimeout: 15000,
      });
      c.opened = opened;
      clients.push(c);
    }
    for (let i = 0; i < N; i += 50) {
      await Promise.all(clients.slice(i, i + 50).map((c) => connected(c, 20000)));
    }
    const dropped = clients.map((c) =>
      once(c, "disconnected", 15000).then((d) => {
        c.dropAt = Date.now();
        return d;
      }),
    );
    const reconnected = clients.map((c) =>
      once(c, "connected", 60000).then(() => (c.backAt = Date.now())),
    );
    await node.kill("SIGTERM"); // drain delay 0: close 1001 to every client, then exit
    const drops = await Promise.all(dropped);
    assert.ok(drops.every((d) => d.code === 1001 && d.willReconnect));
    const dropAt = Date.now();
    await node.start();
    const readyAt = Date.now();
    await Promise.all(reconnected);

    // The first retry of each client: its delay after the drop is within [MIN, 2*MIN].
    const retries = clients.map((c) => c.opened[1]);
    const delays = clients.map((c) => c.opened[1] - c.dropAt);
    const lo = Math.min(...retries);
    const hi = Math.max(...retries);
    const buckets = new Map();
    for (const t of retries) {
      const b = Math.floor((t - lo) / 100);
      buckets.set(b, (buckets.get(b) ?? 0) + 1);
    }
    const busiest = Math.max(...buckets.values());
    console.log(
      `# drain of ${N} clients: first retries spread over ${hi - lo} ms, ` +
        `busiest 100 ms window ${busiest} clients, node restarted ${readyAt - dropAt} ms ` +
        `after the last close; delays ${Math.round(Math.min(...delays))}..` +
        `${Math.round(Math.max(...delays))} ms (bounds ${MIN}..${2 * MIN})`,
    );
    const back = clients.map((c) => c.backAt - c.dropAt).sort((a, b) => a - b);
    const pct = (p) => back[Math.min(back.length - 1, Math.floor((p / 100) * back.length))];
    console.log(
      `# drain of ${N} clients: time to reconnect (drop to welcome) p50 ${pct(50)} ms, ` +
        `p99 ${pct(99)} ms, max ${back[back.length - 1]} ms`,
    );
    for (const d of delays) assert.ok(d >= MIN - 20 && d <= 2 * MIN + 250, `delay ${d}`);
    assert.ok(hi - lo >= 0.6 * MIN, `spread ${hi - lo} ms`);
    assert.ok(busiest <= N * 0.25, `${busiest} clients in one 100 ms window`);
  } finally {
    for (const c of clients) c.close();
    await node.kill();
  }
});

test("a hundred subscriptions sent at once under a tight rate limit all come back", async () => {
  const node = await startNode({
    PUBGATE_REDIS_URL: redis.url,
    PUBGATE_RATE_LIMIT: "50",
    PUBGATE_RATE_BURST: "20",
  });
  try {
    const c = client(node, { minReconnectDelay: 200, maxReconnectDelay: 1000 });
    const subs = Array.from({ length: 100 }, (_, i) => c.subscribe(channel(`many${i}`)));
    const errors = [];
    for (const s of subs) s.on("error", (e) => errors.push(e.code));
    c.connect(); // 100 subscribes at once against a burst of 20
    await waitFor(() => subs.every((s) => s.state === "subscribed"), 20000, "100 subscriptions");
    assert.ok(errors.length > 0 && errors.every((e) => e === "rate_limited"), `${errors}`);
    const m = once(subs[99], "message");
    await c.publish(subs[99].channel, "last");
    assert.equal((await m).data, "last");
    c.close();
  } finally {
    await node.kill();
  }
});

function range(a, b) {
  return Array.from({ length: b - a + 1 }, (_, i) => a + i);
}
