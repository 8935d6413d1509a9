// Test helpers: a private redis-server on a free port, the real pubgate release binary as a
// child process (killable with SIGKILL/SIGTERM, restartable on the same port), HS256 tokens
// minted with node's crypto, and small waiting utilities.

import { spawn, execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { createHmac, randomBytes } from "node:crypto";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";
import WebSocket from "ws";

import { Pubgate } from "../src/index.js";

const here = path.dirname(fileURLToPath(import.meta.url));
export const BIN =
  process.env.PUBGATE_BIN || path.resolve(here, "../../../target/release/pubgate");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A TCP port nobody listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Polls `fn` until it returns a truthy value, or fails after `timeout` ms. */
export async function waitFor(fn, timeout = 5000, what = "condition") {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** The next `event` of an emitter (a Pubgate or a Subscription). */
export function once(emitter, event, timeout = 5000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, on);
      reject(new Error(`timed out waiting for ${event}`));
    }, timeout);
    const on = (payload) => {
      clearTimeout(timer);
      emitter.off(event, on);
      resolve(payload);
    };
    emitter.on(event, on);
  });
}

/** Starts a private redis-server without persistence. */
export async function startRedis() {
  const port = await freePort();
  const proc = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    { stdio: "ignore" },
  );
  const redis = {
    port,
    url: `redis://127.0.0.1:${port}/`,
    cli: (...args) =>
      execFileSync("redis-cli", ["-p", String(port), ...args.map(String)], {
        encoding: "utf8",
        stdio: ["ignore", "pipe", "ignore"],
      }).trim(),
    stop: () => proc.kill("SIGKILL"),
  };
  await waitFor(() => {
    try {
      return redis.cli("PING") === "PONG";
    } catch {
      return false;
    }
  }, 10000, "redis-server");
  return redis;
}

/**
 * Starts the pubgate binary on a fixed free port (so a restart keeps the URL); `env` adds
 * PUBGATE_* settings. Returns once /readyz answers 200.
 */
export async function startNode(env = {}) {
  const port = await freePort();
  const prefix = `t${randomBytes(4).toString("hex")}:`;
  const node = {
    port,
    prefix,
    http: `http://127.0.0.1:${port}`,
    ws: `ws://127.0.0.1:${port}/ws`,
    proc: null,
    log: "",
    async start() {
      const proc = spawn(BIN, [], {
        env: {
          ...process.env,
          RUST_LOG: "warn",
          PUBGATE_LISTEN: `127.0.0.1:${port}`,
          PUBGATE_CHANNEL_PREFIX: prefix,
          PUBGATE_PING_INTERVAL: "1s",
          PUBGATE_PONG_TIMEOUT: "2s",
          PUBGATE_RATE_LIMIT: "0",
          PUBGATE_HISTORY_SIZE: "1000",
          ...env,
        },
        stdio: ["ignore", "ignore", "pipe"],
      });
      proc.stderr.on("data", (d) => (node.log += d));
      node.proc = proc;
      node.exited = new Promise((r) => proc.once("exit", (code, sig) => r({ code, sig })));
      await waitFor(async () => {
        if (proc.exitCode !== null) throw new Error(`pubgate exited: ${node.log}`);
        try {
          return (await fetch(`${node.http}/readyz`)).status === 200;
        } catch {
          return false;
        }
      }, 15000, "pubgate /readyz");
      return node;
    },
    async kill(signal = "SIGKILL") {
      if (!node.proc || node.proc.exitCode !== null || node.proc.signalCode !== null) return;
      node.proc.kill(signal);
      await node.exited;
    },
    /** SIGSTOP, returning once the kernel shows the process stopped (state T). */
    async freeze() {
      node.proc.kill("SIGSTOP");
      await waitFor(() => {
        const stat = readFileSync(`/proc/${node.proc.pid}/stat`, "utf8");
        return stat.slice(stat.lastIndexOf(")") + 2).startsWith("T");
      }, 5000, "the node stopped");
    },
    thaw() {
      node.proc.kill("SIGCONT");
    },
    async restart() {
      await node.kill();
      return node.start();
    },
  };
  return node.start();
}

/** A client for `node` using the ws package, with short test timings unless overridden. */
export function client(node, options = {}) {
  return new Pubgate(node.ws, {
    WebSocket,
    minReconnectDelay: 100,
    maxReconnectDelay: 1000,
    pingMargin: 500,
    pongTimeout: 1000,
    requestTimeout: 3000,
    ...options,
  });
}

/** Connects and waits for `connected`. */
export async function connected(c, timeout = 5000) {
  const p = once(c, "connected", timeout);
  c.connect();
  return p;
}

/** Subscribes and waits for `subscribed`; returns `[sub, subscribedPayload]`. */
export async function subscribed(c, channel, options = {}) {
  const sub = c.subscribe(channel, options);
  const ev = await once(sub, "subscribed");
  return [sub, ev];
}

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** An HS256 JWT signed with `secret`. */
export function mintToken(secret, claims) {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", secret).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${sig}`;
}

/** Unique channel names per test. */
export function channel(name) {
  return `${name}-${randomBytes(3).toString("hex")}`;
}

/** Whether the server keeps history: its `subscribed` carries an `epoch`. */
export const hasHistory = (subscribedEvent) => typeof subscribedEvent.epoch === "string";

/**
 * Publishes as a backend would: `FCALL pubgate_publish` when the node loaded the function
 * (history), else a raw `PUBLISH`.
 */
export function backendPublish(redis, node, ch, payload) {
  const text = JSON.stringify(payload);
  let out;
  try {
    out = redis.cli("FCALL", "pubgate_publish", "1", node.prefix + ch, text);
  } catch {
    out = "ERR";
  }
  if (/ERR/.test(out)) return redis.cli("PUBLISH", node.prefix + ch, text);
  return out;
}
