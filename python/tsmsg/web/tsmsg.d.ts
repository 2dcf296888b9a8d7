// Types of tsmsg.js, the browser client of the tsmsg protocol (PROTOCOL.md section 19).

export declare const SUBPROTOCOL: "tsmsg.v1.json";
export declare const PROTOCOL_VERSION: 1;
export declare const BACKOFF_BASE_MS: number;
export declare const BACKOFF_MAX_MS: number;
export declare const CONNECT_TIMEOUT_MS: number;
export declare const REFRESH_MARGIN_MS: number;
export declare const STORE_RETRY_MS: number;
export declare const STORE_RETRY_MAX_MS: number;
export declare const MAX_REORDER: number;

/** An error with a stable code: one of PROTOCOL.md section 8, or "connection_closed"
 * (a request's outcome is unknown) or "resync". */
export declare class TsmsgError extends Error {
  readonly code: string;
  readonly frame: Record<string, unknown> | null;
  readonly retryAfterMs: number;
  constructor(code: string, message: string, frame?: Record<string, unknown> | null);
}

export interface ClientOptions {
  /** ws(s)://host:port/connect; default: this page's origin + /connect. */
  url?: string;
  /** A JWT (PROTOCOL.md 5.1). */
  token?: string;
  /** Returns a fresh JWT; asked before the current one expires and after token_expired.
   * If it fails (throws or rejects) on a live connection, the error is emitted and the
   * connection is closed (as the Python client): the reconnect, with backoff, asks it
   * again. If it fails before a hello, the error is emitted and the hello retried with
   * backoff. A token it has just made that the server refuses at hello (unauthorized,
   * token_expired) stops the client (see connect()); a refused token from before that
   * hello is dropped and the provider asked again. */
  tokenProvider?: () => Promise<string> | string;
  /** A WebSocket implementation (default: globalThis.WebSocket). */
  WebSocket?: typeof WebSocket;
  /** The longest wait between reconnects (default 30,000 ms; exponential backoff with full
   * jitter from 100 ms). A connection that stays up this long after its welcome starts
   * the backoff over; one that ends sooner doubles it, like a failed connect. */
  backoffMaxMs?: number;
}

export interface Message {
  channel: string;
  seq: number;
  id: string;
  sender: string;
  ts: number;
  text: string | null;
  meta: Record<string, unknown> | null;
  /** ms of the latest edit (history only). */
  edited: number | null;
  deleted: boolean;
}

export type ChannelEvent =
  | ({ type: "message" } & Message)
  | { type: "edit"; channel: string; seq: number; id: string; sender: string; ts: number; text: string }
  | { type: "delete"; channel: string; seq: number; id: string; sender: string; ts: number }
  /** The channel was (re)loaded: forget its state, show these (newest page, oldest first). */
  | { type: "resynced"; channel: string; head: number; epoch: number; messages: Message[]; more?: boolean };

export interface Ack {
  channel: string;
  seq: number;
  /** The message's id (of an edit or delete: its target). */
  id: string;
  ts: number;
  dup: boolean;
}

export interface JoinInfo {
  channel: string;
  head: number;
  read: number;
  epoch: number;
  horizon: number;
}

export interface PresenceInfo {
  user: string;
  status: string;
  online: boolean;
  last_seen?: number;
}

/** One of the user's channels or DMs (listChannels). */
export interface ChannelSummary {
  channel: string;
  /** Its last seq. */
  head: number;
  /** The user's read cursor. */
  read: number;
  /** Unread messages (PROTOCOL.md 6.14); a lower bound when `capped`. */
  unread: number;
  capped: boolean;
  /** A DM's other user; null for a channel. */
  peer: string | null;
}

export interface EventMap {
  event: ChannelEvent;
  typing: { channel: string; user: string; on: boolean };
  read: { channel: string; user: string; seq: number };
  presence: { user: string; status: string; ts: number };
  /** The user is now a member of `channel`: `by` is the user (a join on one of its
   * devices) or, for a DM, the other user, whose message it is. Best effort: list the
   * channels again after a reconnect to be sure. */
  membership: { channel: string; by: string };
  left: { channel: string; reason: string };
  connection: { connected: boolean; reason: string; user?: string };
  /** A token provider's failure, a listener's exception, or the TsmsgError of a hello
   * refusal that stopped the client (see connect()). */
  error: unknown;
}

export interface OutboxEntry {
  cid: string;
  channel: string;
  text: string;
  meta: Record<string, unknown> | null;
}

export declare class TsmsgClient {
  constructor(options: ClientOptions);
  readonly url: string;
  user: string | null;
  connected: boolean;
  limits: Record<string, number>;
  heartbeatMs: number;
  /** The server's last word on the connection: an error code, or shutting_down; after a
   * hello refusal that stopped the client, its code. */
  closeReason: string | null;
  /** Listen to `type`; returns a function that stops listening. An event goes to the
   * listeners there when its delivery starts (one added during it gets the next). */
  on<K extends keyof EventMap>(type: K, fn: (value: EventMap[K]) => void): () => void;
  /** One channel's events: its entries, typing, read receipts, and its leaving. */
  onChannel(
    channel: string,
    fn: (value: EventMap["event"] | EventMap["typing"] | EventMap["read"] | EventMap["left"]) => void,
  ): () => void;
  /** Start connecting (and reconnecting); resolves at the first welcome. A hello refusal
   * that retrying cannot help (unauthorized or token_expired of a fixed token, or of one
   * the tokenProvider made for that hello; unsupported_version; bad_request) stops the
   * client: no more reconnects, closeReason set to the code, and a TsmsgError of that
   * code emitted ("error") and rejecting this promise (if still pending) and every
   * request waiting for a connection or made afterwards, until connect() is called
   * again. Rejected sends stay in `outbox`. rate_limited waits retry_after_ms (at least);
   * other refusals are retried with backoff. See docs/web.md. */
  connect(): Promise<{ user: string; session: string }>;
  /** Stop: close the connection, reconnect no more. Unacknowledged sends stay in outbox. */
  close(): void;
  readonly outbox: OutboxEntry[];
  /** How far the page has the channel (null until its first resynced or event). */
  position(channel: string): { seq: number; epoch: number } | null;
  restore(state: {
    channels?: { channel: string; seq: number; epoch: number }[];
    outbox?: OutboxEntry[];
  }): void;
  /** Follow a channel. A join refused (forbidden, ...) stops following it: the promise
   * rejects (a rejoin no join() waits for emits `left`). Except `token_expired` without a
   * tokenProvider on a channel followed before: it stays followed at its position (the
   * promise rejects) and the next connection, on a new token, resumes it. */
  join(channel: string, options?: { replay?: boolean }): Promise<JoinInfo>;
  /** Stop following a channel: from this call on no event of it is delivered (a listener
   * that leaves mid-page gets none of the rest, nor do the other listeners of the event it
   * left on), until a join starts it afresh. Resolves also when its connection closes
   * first: a new connection follows only the channels joined (again). */
  leave(channel: string): Promise<unknown>;
  send(
    channel: string,
    text: string,
    options?: { meta?: Record<string, unknown> | null; cid?: string },
  ): Promise<Ack>;
  edit(channel: string, id: string, text: string): Promise<Ack>;
  delete(channel: string, id: string): Promise<Ack>;
  history(
    channel: string,
    options?: { before?: number | null; limit?: number | null },
  ): Promise<{ messages: Message[]; more: boolean }>;
  read(channel: string, seq: number): Promise<number>;
  typing(channel: string, on?: boolean): Promise<void>;
  setPresence(status: string): Promise<string>;
  presence(users: string[]): Promise<PresenceInfo[]>;
  unread(channels: string[]): Promise<Record<string, number>>;
  /** Every page of the user's channels and DMs, in name order. */
  listChannels(): Promise<ChannelSummary[]>;
}

export declare function tokenExpiry(token: string): number | null;
export declare function newCid(): string;
export declare function dmChannel(a: string, b: string): string;
