// Type declarations of pubgate-client (src/index.js). The wire protocol is docs/protocol.md.

/** An error from a request or a subscription: `code` is the server's code or the client's own. */
export class PubgateError extends Error {
  constructor(code: string, message?: string);
  /**
   * Server codes: `bad_request`, `unknown_type`, `invalid_channel`, `not_subscribed`,
   * `too_many_subscriptions`, `unsupported`, `unavailable`, `rate_limited`, `forbidden`,
   * `timeout`. Client codes: `timeout` (no reply in time; outcome unknown), `disconnected`
   * (dropped before the reply; outcome unknown), `closed`, `not_connected`, `refresh_failed`.
   */
  readonly code: string;
}

/** A presence member. */
export interface Member {
  conn_id: string;
  node: string;
  user: string | null;
  info?: Record<string, unknown>;
}

export interface ConnectedEvent {
  connId: string;
  node: string;
}

export interface DisconnectedEvent {
  /** The WebSocket close code; 4000 = the client's own ping or connect timeout. */
  code: number;
  reason: string;
  /** false after `close()`, an auth refusal or a backend disconnect: the client stopped. */
  willReconnect: boolean;
}

export interface SubscribedEvent {
  /** true: every message missed since the last one seen follows; false after a reconnect: resync. */
  recovered: boolean;
  /** The channel's history epoch; null when the server keeps no history. */
  epoch: string | null;
  /** The last offset seen (or the channel's newest at subscribe time); null without history. */
  offset: number | null;
}

export interface MessageEvent<T = unknown> {
  data: T;
  /** The message's offset in its channel; undefined without history or for a raw PUBLISH. */
  offset?: number;
  channel: string;
}

export interface SubscribeOptions {
  /** After a reconnect, resume from the last offset seen (needs history on the server). */
  recover?: boolean;
  /** Receive `join` / `leave` events for the other members. */
  presenceEvents?: boolean;
}

export interface PubgateOptions {
  /** A JWT to connect with. */
  token?: string;
  /**
   * Returns a fresh JWT: for the first token when `token` is absent, before `exp`, and after a
   * `token expired` close. Resolving to null or "" stops the client; throwing is retried.
   */
  getToken?: () => Promise<string | null | undefined>;
  /** ms, lower bound of every reconnect delay (default 500). */
  minReconnectDelay?: number;
  /** ms, upper bound of every reconnect delay (default 20000). */
  maxReconnectDelay?: number;
  /** ms to wait for a reply (default 10000). */
  requestTimeout?: number;
  /** ms from opening the socket to the server's welcome (default 10000). */
  connectTimeout?: number;
  /** ms of silence beyond the server's ping interval before a JSON ping (default 5000). */
  pingMargin?: number;
  /** ms to wait for the pong before the connection is replaced (default 10000). */
  pongTimeout?: number;
  /** Failures before any welcome after which delays are drawn from [max/2, max] (default 3). */
  failuresBeforeMaxDelay?: number;
  /** The WebSocket class where there is no global one (e.g. the `ws` package in Node 20). */
  WebSocket?: unknown;
}

declare class Emitter<Events> {
  on<K extends keyof Events>(event: K, listener: (payload: Events[K]) => void): this;
  off<K extends keyof Events>(event: K, listener: (payload: Events[K]) => void): this;
}

export interface SubscriptionEvents {
  subscribed: SubscribedEvent;
  message: MessageEvent;
  join: Member;
  leave: Member;
  error: PubgateError;
}

/** One channel subscription; kept across reconnects until `unsubscribe()` or a refusal. */
export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  readonly recover: boolean;
  readonly presenceEvents: boolean;
  readonly state: "pending" | "subscribed" | "unsubscribed";
  readonly epoch: string | null;
  readonly offset: number | null;
  /** Ends the subscription; settles once the server confirmed, never rejects. */
  unsubscribe(): Promise<void>;
}

export interface PubgateEvents {
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  error: PubgateError;
}

export interface PresenceResult {
  count: number;
  members?: Member[];
  truncated?: boolean;
}

export interface HistoryResult<T = unknown> {
  epoch: string;
  offset: number;
  messages: Array<{ offset: number; data: T }>;
}

/** A pubgate client: one WebSocket, reconnected with jittered backoff. */
export class Pubgate extends Emitter<PubgateEvents> {
  constructor(url: string, options?: PubgateOptions);
  readonly state: "disconnected" | "connecting" | "connected" | "closed";
  readonly connId: string | null;
  readonly node: string | null;
  /** Opens the connection (again after `close()`). */
  connect(): void;
  /** Closes for good: no reconnect; pending requests reject with `closed`. */
  close(): void;
  subscribe(channel: string, options?: SubscribeOptions): Subscription;
  publish(channel: string, data: unknown): Promise<{ offset?: number }>;
  presence(channel: string, options?: { countOnly?: boolean }): Promise<PresenceResult>;
  history(channel: string, options?: { limit?: number }): Promise<HistoryResult>;
}

/** The reconnect delay (ms) before retry `attempt`: uniform in [min, min(max, min*2^(attempt+1))]. */
export function reconnectDelay(
  attempt: number,
  min: number,
  max: number,
  random?: () => number,
): number;

/** The `exp` claim of a JWT, read without verifying it; null when absent. */
export function tokenExpiry(token: string): number | null;
