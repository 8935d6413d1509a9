// pubgate-client: the JavaScript client of the pubgate WebSocket pub/sub gateway.
//
// One file, no dependencies, no build step: it is imported as is by browsers, by Node 20+ and
// by the node's own console page (the binary embeds this very file), so keep it a single
// self-contained ES module. The wire protocol is docs/protocol.md of the pubgate repository.

/**
 * An error a request rejects with, or a subscription reports: `code` is the server's error code
 * (`forbidden`, `invalid_channel`, `unavailable`, `timeout`, ...) or one of the client's own:
 * `timeout` (no reply within `requestTimeout`; the outcome is unknown), `disconnected` (the
 * connection dropped before the reply; the outcome is unknown), `closed` (`close()` was called),
 * `not_connected` (the client is not connecting; call `connect()`).
 */
export class PubgateError extends Error {
  /**
   * @param {string} code machine-readable error code
   * @param {string} message human-readable text
   */
  constructor(code, message) {
    super(message || code);
    this.name = "PubgateError";
    /** @type {string} */
    this.code = code;
  }
}

/** Subscribe errors worth retrying on the same connection; any other one ends the subscription. */
const TRANSIENT = new Set(["rate_limited", "unavailable", "timeout"]);

/** A minimal event emitter, the same in browsers and Node. */
class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
  }

  /**
   * Adds a listener for an event.
   * @param {string} event event name
   * @param {Function} listener called with the event's payload
   * @returns {this}
   */
  on(event, listener) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(listener);
    return this;
  }

  /**
   * Removes a listener added with `on`.
   * @param {string} event event name
   * @param {Function} listener the listener to remove
   * @returns {this}
   */
  off(event, listener) {
    this._listeners.get(event)?.delete(listener);
    return this;
  }

  /** Calls the listeners; one that throws does not disturb the client or the other listeners. */
  _emit(event, payload) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(payload);
      } catch (err) {
        setTimeout(() => {
          throw err;
        }, 0);
      }
    }
  }
}

/**
 * The reconnect delay before attempt `attempt` (0 for the first retry after a drop): "full
 * jitter" drawn uniformly between `min` and a ceiling that doubles per attempt,
 * `min(max, min * 2^(attempt+1))`, so it is always within `[min, max]` and clients dropped
 * together (a node drain) spread their reconnects over the whole window instead of arriving in
 * lockstep. Exported for tests and for apps that schedule their own retries.
 * @param {number} attempt consecutive failed attempts so far
 * @param {number} min minReconnectDelay in ms
 * @param {number} max maxReconnectDelay in ms
 * @param {() => number} [random] a uniform [0, 1) source
 * @returns {number} the delay in ms
 */
export function reconnectDelay(attempt, min, max, random = Math.random) {
  const ceiling = Math.min(max, min * 2 ** Math.min(attempt + 1, 30));
  return min + random() * Math.max(0, ceiling - min);
}

/**
 * The `exp` claim (unix seconds) of a JWT, read without verifying it (the server verifies); null
 * when the token has none or is not a JWT.
 * @param {string} token a compact JWT
 * @returns {number | null}
 */
export function tokenExpiry(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json = decodeURIComponent(
      Array.from(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)), (c) =>
        "%" + c.charCodeAt(0).toString(16).padStart(2, "0"),
      ).join(""),
    );
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

/**
 * One channel subscription of a {@link Pubgate} client. It survives reconnects: the client
 * subscribes again after every reconnect until `unsubscribe()` or a refusal by the server.
 *
 * Events: `subscribed` `{recovered, epoch, offset}` after every (re)subscription (`recovered`
 * false after a reconnect means messages may have been missed: resync from your backend),
 * `message` `{data, offset, channel}`, `join` and `leave` (a member, with `presenceEvents`),
 * `error` (a {@link PubgateError}; the subscription ended if `sub.state` is `unsubscribed`).
 */
export class Subscription extends Emitter {
  /** @internal */
  constructor(client, channel, options) {
    super();
    this._client = client;
    /** The channel name. @type {string} */
    this.channel = channel;
    /** Resume from the last offset seen after a reconnect. @type {boolean} */
    this.recover = !!options.recover;
    /** Receive `join`/`leave` events. @type {boolean} */
    this.presenceEvents = !!options.presenceEvents;
    /** `pending`, `subscribed` or `unsubscribed`. @type {string} */
    this.state = "pending";
    /** The channel's history epoch, once known. @type {string | null} */
    this.epoch = null;
    /** The offset of the last message seen (or the newest at subscribe time). @type {number | null} */
    this.offset = null;
  }

  /**
   * Ends the subscription. The promise settles once the server confirmed (or at once when the
   * client is not connected); it never rejects.
   * @returns {Promise<void>}
   */
  unsubscribe() {
    return this._client._unsubscribe(this);
  }
}

/**
 * A pubgate client: one WebSocket, reconnected with backoff, carrying any number of
 * subscriptions. Nothing happens until `connect()`.
 *
 * Events: `connected` `{connId, node}` (each time a connection is welcomed), `disconnected`
 * `{code, reason, willReconnect}` (when a welcomed connection ends, and when the client gives up),
 * `error` (a server error that answers no request).
 */
export class Pubgate extends Emitter {
  /**
   * @param {string} url the node's WebSocket URL, e.g. `wss://host/ws`
   * @param {object} [options]
   * @param {string} [options.token] a JWT to connect with
   * @param {() => Promise<string|null>} [options.getToken] returns a fresh JWT: called for the
   *   first token when `token` is absent, before `exp` to refresh, and after a `token expired`
   *   close; resolving to null or "" means "not allowed" and stops the client; throwing is retried
   * @param {number} [options.minReconnectDelay=500] ms, lower bound of every reconnect delay
   * @param {number} [options.maxReconnectDelay=20000] ms, upper bound of every reconnect delay
   * @param {number} [options.requestTimeout=10000] ms to wait for a reply
   * @param {number} [options.connectTimeout=10000] ms from opening the socket to `welcome`
   * @param {number} [options.pingMargin=5000] ms of silence beyond the server's ping interval
   *   before the client sends a JSON `ping`
   * @param {number} [options.pongTimeout=10000] ms to wait for the `pong` before the connection
   *   counts as dead and is replaced
   * @param {number} [options.failuresBeforeMaxDelay=3] consecutive attempts that fail before any
   *   `welcome` after which every delay is drawn from [max/2, max] (a browser cannot see a 401)
   * @param {typeof WebSocket} [options.WebSocket] the WebSocket class where there is no global
   *   one (e.g. the `ws` package in Node 20)
   */
  constructor(url, options = {}) {
    super();
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== "function") {
      throw new TypeError(
        "pubgate-client: no global WebSocket; pass one as options.WebSocket (e.g. the ws package)",
      );
    }
    this._WS = WS;
    this._url = url;
    this._token = options.token ?? null;
    this._getToken = options.getToken ?? null;
    this._min = options.minReconnectDelay ?? 500;
    this._max = Math.max(this._min, options.maxReconnectDelay ?? 20000);
    this._requestTimeout = options.requestTimeout ?? 10000;
    this._connectTimeout = options.connectTimeout ?? 10000;
    this._pingMargin = options.pingMargin ?? 5000;
    this._pongTimeout = options.pongTimeout ?? 10000;
    this._failuresBeforeMax = options.failuresBeforeMaxDelay ?? 3;
    /** `disconnected`, `connecting`, `connected` or `closed`. @type {string} */
    this.state = "disconnected";
    /** The server's id of the current connection. @type {string | null} */
    this.connId = null;
    /** The node serving the current connection. @type {string | null} */
    this.node = null;
    /** @type {Map<string, Subscription>} */
    this._subs = new Map();
    /** Requests by id: `{msg, resolve, reject, timer, sent}`. */
    this._pending = new Map();
    this._nextId = 1;
    this._ws = null;
    this._attempt = 0; // consecutive failed attempts since the last welcome
    this._failuresBeforeWelcome = 0;
    this._reconnectTimer = null;
    this._connectTimer = null;
    this._liveTimer = null;
    this._refreshTimer = null;
    this._lastReceived = 0;
    this._pinging = false;
    this._pingIntervalMs = 25000;
    this._tokenExpired = false; // the last close was "token expired": get a fresh one first
    this._retriedAuth = false; // a 401 was already answered with a fresh token
    this._openGen = 0;
  }

  /** Opens the connection (again after `close()`); does nothing when already connecting. */
  connect() {
    if (this.state === "connecting" || this.state === "connected") return;
    this.state = "connecting";
    this._attempt = 0;
    this._failuresBeforeWelcome = 0;
    this._retriedAuth = false;
    this._open();
  }

  /**
   * Closes the connection for good: no reconnect, pending requests reject with `closed`.
   * Subscriptions are kept and sent again by a later `connect()`.
   */
  close() {
    const wasConnected = this.state === "connected";
    this.state = "closed";
    this._openGen++;
    this._rejectPending(() => true, "closed", "the client was closed");
    this._clearTimers();
    this._dropSocket(1000, "client closed");
    if (wasConnected) {
      this._emit("disconnected", { code: 1000, reason: "client closed", willReconnect: false });
    }
  }

  /**
   * Subscribes to a channel (now, or once connected), and again after every reconnect. A second
   * call for a channel still subscribed returns the existing subscription.
   * @param {string} channel the channel name
   * @param {{recover?: boolean, presenceEvents?: boolean}} [options]
   * @returns {Subscription}
   */
  subscribe(channel, options = {}) {
    const existing = this._subs.get(channel);
    if (existing) return existing;
    const sub = new Subscription(this, channel, options);
    this._subs.set(channel, sub);
    if (this.state === "connected") this._sendSubscribe(sub);
    return sub;
  }

  /**
   * Publishes `data` (any JSON value) on a channel. Resolves once the broker accepted it, with
   * the message's `offset` when the server reports one. While the client is connecting, the
   * request waits for the connection (within `requestTimeout`).
   * @param {string} channel the channel name
   * @param {*} data any JSON value
   * @returns {Promise<{offset?: number}>}
   */
  async publish(channel, data) {
    const reply = await this._request({ type: "publish", channel, data });
    return reply.offset === undefined ? {} : { offset: reply.offset };
  }

  /**
   * Who is subscribed to a channel, cluster-wide.
   * @param {string} channel the channel name
   * @param {{countOnly?: boolean}} [options]
   * @returns {Promise<{count: number, members?: Array<object>, truncated?: boolean}>}
   */
  async presence(channel, options = {}) {
    const msg = { type: "presence", channel };
    if (options.countOnly) msg.count_only = true;
    const { type, id, channel: _c, ...rest } = await this._request(msg);
    return rest;
  }

  /**
   * The newest kept messages of a channel, oldest first (needs history on the server; rejects
   * with `unsupported` when it is off).
   * @param {string} channel the channel name
   * @param {{limit?: number}} [options]
   * @returns {Promise<{epoch: string, offset: number, messages: Array<{offset: number, data: *}>}>}
   */
  async history(channel, options = {}) {
    const msg = { type: "history", channel };
    if (options.limit !== undefined) msg.limit = options.limit;
    const reply = await this._request(msg);
    return { epoch: reply.epoch, offset: reply.offset, messages: reply.messages };
  }

  // ---- connection ----------------------------------------------------------------------------

  async _open() {
    // A close() and connect() while getToken is pending must not leave two sockets.
    const gen = ++this._openGen;
    let token = this._token;
    if (this._getToken && (!token || this._tokenExpired || this._expiresSoon(token))) {
      try {
        token = await this._getToken();
      } catch (err) {
        if (this.state !== "connecting" || gen !== this._openGen) return;
        this._failed(1006, `getToken failed: ${err?.message ?? err}`, false);
        return;
      }
      if (this.state !== "connecting" || gen !== this._openGen) return;
      if (!token) {
        this._giveUp(1008, "unauthorized: getToken returned no token");
        return;
      }
      this._token = token;
    }
    this._tokenExpired = false;
    let ws;
    try {
      // Relative URLs resolve against the page; http(s) becomes ws(s).
      const u = new URL(this._url, globalThis.location?.href);
      u.protocol = u.protocol.replace(/^http/, "ws");
      if (token) u.searchParams.set("token", token);
      ws = new this._WS(u.toString());
    } catch (err) {
      this._giveUp(1006, `bad url: ${err?.message ?? err}`);
      return;
    }
    this._ws = ws;
    let httpStatus = null;
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      this._lastReceived = Date.now();
      this._onMessage(ev.data);
    };
    ws.onerror = (ev) => {
      // The ws package reports the refused upgrade's status; browsers hide it.
      const m = /Unexpected server response: (\d+)/.exec(String(ev?.message ?? ev?.error?.message));
      if (m) httpStatus = Number(m[1]);
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._ws = null;
      this._onClose(ev.code ?? 1006, ev.reason ?? "", httpStatus);
    };
    clearTimeout(this._connectTimer);
    this._connectTimer = setTimeout(() => {
      if (ws !== this._ws || this.state !== "connecting") return;
      this._dropSocket(4000, "connect timeout");
      this._failed(4000, "connect timeout", false);
    }, this._connectTimeout);
  }

  _onClose(code, reason, httpStatus) {
    const wasConnected = this.state === "connected";
    this._stopSession();
    if (this.state === "closed") return;
    if (httpStatus === 401 || httpStatus === 403) {
      // An explicit refusal: a fresh token may cure a 401 once; a second refusal stops.
      if (httpStatus === 401 && this._getToken && !this._retriedAuth) {
        this._retriedAuth = true;
        this._tokenExpired = true;
        this._failed(1006, `http ${httpStatus}`, wasConnected);
        return;
      }
      this._giveUp(1006, httpStatus === 401 ? "unauthorized" : "forbidden origin");
      return;
    }
    if (code === 1008 && reason === "token expired") {
      if (!this._getToken) {
        this._giveUp(code, reason);
        return;
      }
      this._tokenExpired = true;
    } else if (code === 1008 && reason === "disconnected") {
      // The backend disconnected this user (revocation): coming back would undo it.
      this._giveUp(code, reason);
      return;
    }
    this._failed(code, reason, wasConnected);
  }

  /** Schedules the next attempt; `wasConnected` says whether to emit `disconnected`. */
  _failed(code, reason, wasConnected) {
    if (this.state === "closed") return;
    if (wasConnected) {
      this._emit("disconnected", { code, reason, willReconnect: true });
    } else {
      this._failuresBeforeWelcome++;
    }
    this.state = "connecting";
    // Failing before any welcome, again and again, is what a refused upgrade (401) looks like
    // in a browser, which hides the status: wait near the maximum then (still jittered).
    const delay =
      this._failuresBeforeWelcome >= this._failuresBeforeMax
        ? this._max / 2 + (Math.random() * this._max) / 2
        : reconnectDelay(this._attempt, this._min, this._max);
    this._attempt++;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (this.state === "connecting") this._open();
    }, delay);
  }

  /** Stops for good (auth refusal): `disconnected` with `willReconnect: false`. */
  _giveUp(code, reason) {
    this.state = "disconnected";
    this._clearTimers();
    this._dropSocket(1000, "");
    this._rejectPending(() => true, "disconnected", reason);
    this._emit("disconnected", { code, reason, willReconnect: false });
  }

  _onWelcome(msg) {
    clearTimeout(this._connectTimer);
    this.state = "connected";
    this.connId = msg.conn_id;
    this.node = msg.node;
    this._attempt = 0;
    this._failuresBeforeWelcome = 0;
    this._retriedAuth = false;
    this._pingIntervalMs = msg.ping_interval_ms || 25000;
    this._startLiveness();
    this._scheduleRefresh();
    this._emit("connected", { connId: msg.conn_id, node: msg.node });
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
    for (const [id, p] of this._pending) {
      if (!p.sent) {
        p.sent = true;
        this._send({ ...p.msg, id });
      }
    }
  }

  /** Ends the current socket's session: timers, the socket, requests already sent. */
  _stopSession() {
    clearTimeout(this._connectTimer);
    clearInterval(this._liveTimer);
    clearTimeout(this._refreshTimer);
    this._liveTimer = this._refreshTimer = null;
    this._pinging = false;
    for (const sub of this._subs.values()) if (sub.state === "subscribed") sub.state = "pending";
    this._rejectPending((p) => p.sent, "disconnected", "the connection dropped before the reply");
  }

  _clearTimers() {
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._stopSession();
  }

  _dropSocket(code, reason) {
    const ws = this._ws;
    this._ws = null;
    if (!ws) return;
    ws.onmessage = ws.onclose = null;
    ws.onerror = () => {};
    try {
      // The ws package's terminate() frees a dead socket at once; close() would wait for a
      // closing handshake that never comes.
      if (typeof ws.terminate === "function" && code !== 1000) ws.terminate();
      else ws.close(code, reason);
    } catch {
      /* already closed */
    }
  }

  // ---- liveness and token refresh ------------------------------------------------------------

  /**
   * Browsers hide WebSocket pings, so liveness is judged on what arrives: after the server's
   * ping interval plus a margin with nothing received, send a JSON ping; no pong within
   * `pongTimeout` means the connection is dead, and it is replaced.
   */
  _startLiveness() {
    this._lastReceived = Date.now();
    const idleLimit = this._pingIntervalMs + this._pingMargin;
    const tick = Math.max(50, Math.min(1000, idleLimit / 5));
    const ws = this._ws;
    this._liveTimer = setInterval(() => {
      if (ws !== this._ws || this._pinging) return;
      if (Date.now() - this._lastReceived < idleLimit) return;
      this._pinging = true;
      this._request({ type: "ping" }, this._pongTimeout).then(
        () => {
          this._pinging = false;
        },
        (err) => {
          this._pinging = false;
          if (err.code === "timeout" && ws === this._ws && this.state === "connected") {
            this._dropSocket(4000, "ping timeout");
            this._stopSession();
            this._failed(4000, "ping timeout", true);
          }
        },
      );
    }, tick);
  }

  _expiresSoon(token) {
    const exp = tokenExpiry(token);
    return exp !== null && exp * 1000 - Date.now() < 1000;
  }

  /**
   * Refreshes the token before `exp`: a fifth of its remaining life ahead, at least 1 s and at
   * most 60 s before it (the server closes at `exp` with no leeway).
   */
  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this._getToken || !this._token) return;
    const exp = tokenExpiry(this._token);
    if (exp === null) return;
    const left = exp * 1000 - Date.now();
    const margin = Math.min(60000, Math.max(1000, left / 5));
    const ws = this._ws;
    this._refreshTimer = setTimeout(() => this._refresh(ws), Math.max(0, left - margin));
  }

  async _refresh(ws) {
    if (ws !== this._ws || this.state !== "connected") return;
    let token;
    try {
      token = await this._getToken();
    } catch (err) {
      this._emit("error", new PubgateError("refresh_failed", `getToken: ${err?.message ?? err}`));
      return;
    }
    if (!token || ws !== this._ws) return;
    try {
      await this._request({ type: "refresh", token });
      this._token = token;
      this._scheduleRefresh();
    } catch (err) {
      // The server keeps the old token; at its exp the close "token expired" brings a reconnect
      // with a token from getToken.
      this._emit("error", err);
    }
  }

  // ---- requests and messages -----------------------------------------------------------------

  _request(msg, timeout = this._requestTimeout) {
    if (this.state !== "connected" && this.state !== "connecting") {
      return Promise.reject(new PubgateError("not_connected", "call connect() first"));
    }
    return new Promise((resolve, reject) => {
      const id = this._nextId++;
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new PubgateError("timeout", `no reply to ${msg.type} within ${timeout} ms`));
      }, timeout);
      const entry = { msg, resolve, reject, timer, sent: false };
      this._pending.set(id, entry);
      if (this.state === "connected") {
        entry.sent = true;
        this._send({ ...msg, id });
      }
    });
  }

  _rejectPending(which, code, message) {
    for (const [id, p] of this._pending) {
      if (!which(p)) continue;
      this._pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new PubgateError(code, message));
    }
  }

  _send(obj) {
    try {
      this._ws?.send(JSON.stringify(obj));
    } catch {
      /* the close event follows */
    }
  }

  _sendSubscribe(sub) {
    const msg = { type: "subscribe", channel: sub.channel };
    if (sub.presenceEvents) msg.presence_events = true;
    if (sub.recover && sub.epoch !== null && sub.offset !== null) {
      msg.since = { epoch: sub.epoch, offset: sub.offset };
    }
    this._request(msg).then(
      (reply) => {
        if (sub.state === "unsubscribed" || this._subs.get(sub.channel) !== sub) return;
        const recovered = reply.recovered === true;
        if (reply.epoch !== undefined) {
          // Without recovery, live delivery starts after the channel's newest offset.
          if (!recovered || sub.epoch !== reply.epoch) sub.offset = reply.offset ?? 0;
          sub.epoch = reply.epoch;
        }
        sub.state = "subscribed";
        sub._emit("subscribed", { recovered, epoch: reply.epoch ?? null, offset: sub.offset });
      },
      (err) => {
        if (this._subs.get(sub.channel) !== sub || sub.state === "unsubscribed") return;
        // Dropped or closed: sent again with the next connection.
        if (err.code === "disconnected" || err.code === "closed") return;
        if (TRANSIENT.has(err.code)) {
          // Rate limited (hundreds of subscriptions resent at once after a reconnect), broker
          // down or no reply: try again on this connection after a jittered pause.
          const ws = this._ws;
          setTimeout(() => {
            if (ws === this._ws && this.state === "connected" && this._subs.get(sub.channel) === sub
              && sub.state === "pending") {
              this._sendSubscribe(sub);
            }
          }, reconnectDelay(0, this._min, this._max));
        } else {
          // A refusal by the server (forbidden, invalid_channel, ...): the subscription ends.
          this._subs.delete(sub.channel);
          sub.state = "unsubscribed";
        }
        sub._emit("error", err);
      },
    );
  }

  async _unsubscribe(sub) {
    if (sub.state === "unsubscribed") return;
    sub.state = "unsubscribed";
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
    if (this.state !== "connected") return;
    try {
      await this._request({ type: "unsubscribe", channel: sub.channel });
    } catch {
      /* not_subscribed, or the connection dropped: either way it is gone */
    }
  }

  _onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== "object") return;
    switch (msg.type) {
      case "welcome":
        this._onWelcome(msg);
        return;
      case "message": {
        const sub = this._subs.get(msg.channel);
        if (!sub || sub.state === "unsubscribed") return;
        if (typeof msg.offset === "number") {
          // Never twice: a replayed message also seen live is dropped.
          if (sub.offset !== null && msg.offset <= sub.offset) return;
          sub.offset = msg.offset;
        }
        sub._emit("message", { data: msg.data, offset: msg.offset, channel: msg.channel });
        return;
      }
      case "join":
      case "leave": {
        const sub = this._subs.get(msg.channel);
        if (sub && sub.state !== "unsubscribed") sub._emit(msg.type, msg.member);
        return;
      }
      case "unsubscribed":
        if (msg.id === undefined) {
          // Ended by the server (a refreshed token no longer permits it).
          const sub = this._subs.get(msg.channel);
          if (sub) {
            this._subs.delete(msg.channel);
            sub.state = "unsubscribed";
            sub._emit("error", new PubgateError(msg.reason || "unsubscribed", "ended by the server"));
          }
          return;
        }
        break;
    }
    if (msg.id !== undefined && this._pending.has(msg.id)) {
      const p = this._pending.get(msg.id);
      this._pending.delete(msg.id);
      clearTimeout(p.timer);
      if (msg.type === "error") p.reject(new PubgateError(msg.code, msg.message));
      else p.resolve(msg);
    } else if (msg.type === "error") {
      this._emit("error", new PubgateError(msg.code, msg.message));
    }
  }
}
