// Tokens: an auth refusal stops retrying; refresh before exp through getToken; a `token expired`
// close brings a reconnect with a fresh token; a browser-like socket that hides the 401 backs off.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";

import { tokenExpiry } from "../src/index.js";
import {
  startRedis, startNode, client, connected, subscribed, once, channel, mintToken, sleep,
} from "./helpers.js";

const SECRET = "test-secret-for-the-js-client";
const now = () => Math.floor(Date.now() / 1000);
const token = (life, sub = "alice", secret = SECRET) =>
  mintToken(secret, { sub, exp: now() + life, subscribe: ["*"], publish: ["*"] });

/** A WebSocket class that counts its instances. */
function counting() {
  const made = [];
  return {
    made,
    WebSocket: class extends WebSocket {
      constructor(...args) {
        super(...args);
        made.push(Date.now());
      }
    },
  };
}

let redis, node;
before(async () => {
  redis = await startRedis();
  node = await startNode({ PUBGATE_REDIS_URL: redis.url, PUBGATE_JWT_SECRET: SECRET });
});
after(async () => {
  await node?.kill();
  redis?.stop();
});

test("tokenExpiry reads exp without verifying", () => {
  assert.equal(tokenExpiry(mintToken("x", { sub: "a", exp: 1234 })), 1234);
  assert.equal(tokenExpiry("not a jwt"), null);
});

test("a refused token (HTTP 401) stops the client: no retry", async () => {
  const { made, WebSocket } = counting();
  const c = client(node, { token: token(60, "alice", "wrong-secret"), WebSocket });
  const d = once(c, "disconnected");
  c.connect();
  const ev = await d;
  assert.deepEqual([ev.willReconnect, ev.reason], [false, "unauthorized"]);
  await sleep(1500);
  assert.equal(made.length, 1, "no second attempt");
  assert.equal(c.state, "disconnected");
});

test("with getToken a 401 is retried once with a fresh token, then stops", async () => {
  const { made, WebSocket } = counting();
  let calls = 0;
  const c = client(node, {
    getToken: async () => (calls++, token(60, "alice", "wrong-secret")),
    WebSocket,
  });
  const d = once(c, "disconnected", 5000);
  c.connect();
  assert.equal((await d).willReconnect, false);
  await sleep(1500);
  assert.equal(made.length, 2);
  assert.equal(calls, 2);
});

test("where the status is hidden (browsers), repeated failures back off to the maximum", async () => {
  // A browser-like socket: the refused upgrade is a bare 1006 with no status in the error.
  const made = [];
  class Opaque extends WebSocket {
    constructor(...args) {
      super(...args);
      made.push(Date.now());
      const set = (h) => (this._userOnError = h);
      Object.defineProperty(this, "onerror", { set, get: () => this._userOnError });
      this.addEventListener("error", () => this._userOnError?.({ type: "error" }));
    }
  }
  const c = client(node, {
    token: token(60, "alice", "wrong-secret"),
    WebSocket: Opaque,
    minReconnectDelay: 50,
    maxReconnectDelay: 1200,
    failuresBeforeMaxDelay: 3,
  });
  c.connect();
  await sleep(3500);
  c.close();
  const gaps = made.slice(1).map((t, i) => t - made[i]);
  // Attempts 2..3 follow quickly (50..200 ms); from the 3rd failure on, each waits >= max/2.
  assert.ok(gaps.length >= 3 && gaps.length <= 6, `gaps ${gaps}`);
  assert.ok(gaps.slice(0, 2).every((g) => g < 400), `early gaps ${gaps}`);
  assert.ok(gaps.slice(3).every((g) => g >= 580), `late gaps ${gaps}`);
});

test("getToken refreshes the token before exp: the connection outlives the first token", async () => {
  let calls = 0;
  const c = client(node, { getToken: async () => (calls++, token(3)) });
  let drops = 0;
  c.on("disconnected", () => drops++);
  await connected(c);
  const ch = channel("refresh");
  const [sub] = await subscribed(c, ch);
  await sleep(5500); // beyond the first token's exp (3 s) and the second's
  assert.equal(drops, 0, "never disconnected");
  assert.ok(calls >= 3, `getToken called ${calls} times`);
  const m = once(sub, "message");
  await c.publish(ch, "still here");
  assert.equal((await m).data, "still here");
  c.close();
});

test("a `token expired` close makes the client fetch a token and reconnect", async () => {
  let calls = 0;
  const errors = [];
  // The refresh hands over another user's token: the server refuses it (forbidden), so the
  // connection ends at exp with 1008 "token expired"; the next getToken is valid again.
  const c = client(node, {
    getToken: async () => (++calls === 2 ? token(60, "mallory") : token(calls === 1 ? 2 : 60)),
  });
  c.on("error", (e) => errors.push(e.code));
  await connected(c);
  const ch = channel("expired");
  const [sub] = await subscribed(c, ch);
  const d = await once(c, "disconnected", 6000);
  assert.deepEqual(d, { code: 1008, reason: "token expired", willReconnect: true });
  assert.deepEqual(errors, ["forbidden"]);
  await once(sub, "subscribed", 5000);
  assert.equal(calls, 3);
  assert.equal(c.state, "connected");
  c.close();
});
