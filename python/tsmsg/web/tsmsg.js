// tsmsg.js: the browser client of the tsmsg protocol (PROTOCOL.md), over a WebSocket with
// the `tsmsg.v1.json` subprotocol (PROTOCOL.md section 19). One dependency-free ES module;
// types in tsmsg.d.ts. It mirrors the Python client (python/tsmsg/client/protocol.py):
//
// - connect with a token or a token provider (asked again before the token expires, and
//   after a refusal with token_expired; a provider that fails then ends the connection,
//   as in the Python client), reconnect with exponential backoff and jitter;
//   a hello refused for good (a token refused although the provider just made it, or a
//   fixed token; unsupported_version, bad_request) stops the client and rejects what
//   waits, as the Python client (client.py _hello_fatal);
//   the backoff starts over only once a connection has stayed up backoffMaxMs after its
//   welcome (one that ends sooner doubles it, like a failed connect: a server that
//   welcomes and drops every connection gets no reconnect storm), as the Python client;
// - per channel: join, then on every (re)connect `sync` from the last applied seq, page by
//   page, holding live events meanwhile; a `resync` (or a new epoch) reloads the channel:
//   its newest history page is one `resynced` event, then it continues from the head. So
//   the app sees each event of a channel exactly once, in seq order, across reconnects and
//   server restarts;
// - an outbox: a send made while offline (or not yet acknowledged) is sent again with the
//   same cid after reconnecting; the server stores it once (`dup`).
//
// Events are delivered to listeners synchronously, in order: on("event", fn) for channel
// events (message, edit, delete, resynced), on("typing"), on("read"), on("presence"),
// on("membership") (a new channel or DM of the user: PROTOCOL.md 7.12), on("left"),
// on("connection"), on("error").

export const SUBPROTOCOL = "tsmsg.v1.json";
export const PROTOCOL_VERSION = 1;
export const BACKOFF_BASE_MS = 100; // the first reconnect waits up to this, doubling...
export const BACKOFF_MAX_MS = 30_000; // ... up to this (with full jitter); a connection up
// this long (backoffMaxMs) after its welcome resets the backoff, a shorter one doubles it
export const MAX_CLOSE_REASON_BYTES = 123; // a WebSocket close reason; a longer one throws
export const CONNECT_TIMEOUT_MS = 10_000; // open the WebSocket and get `welcome` within this
export const REFRESH_MARGIN_MS = 30_000; // refresh this long before exp (or a fifth of a short life)
export const STORE_RETRY_MS = 500; // a send refused with store_unavailable: first wait...
export const STORE_RETRY_MAX_MS = 30_000; // ... doubling up to this
const MAX_TIMER_MS = 2 ** 31 - 1; // the longest setTimeout delay
export const MAX_REORDER = 10_000; // live events held per channel while it syncs; past it,
// dropped (one more sync fetches them), so a long catch-up under a busy channel stays bounded
const DEFAULT_HEARTBEAT_MS = 30_000;
const INTERNAL = new Set(["join", "sync", "history", "ping", "refresh"]);
// A hello refused with one of these stops the client: retrying cannot help (PROTOCOL.md 8).
const FATAL_HELLO = new Set(["unsupported_version", "bad_request"]);
// ... and with one of these too, unless the token came from before this hello and a
// provider can make another (client.py _hello_fatal).
const TOKEN_REFUSED = new Set(["unauthorized", "token_expired"]);
const CHANNEL_RE = /^[A-Za-z0-9_.:@-]{1,128}$/;

/** An error the server answered (or the client decided), with its stable code. */
export class TsmsgError extends Error {
  constructor(code, message, frame = null) {
    super(`${code}: ${message}`);
    this.name = "TsmsgError";
    this.code = code;
    this.frame = frame;
    this.retryAfterMs = frame && typeof frame.retry_after_ms === "number" ? frame.retry_after_ms : 0;
  }
}

/** The `exp` claim of a JWT, in ms since the epoch (null if it cannot be read). */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "===".slice((part.length + 3) % 4)));
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

/** A random cid (RFC 4122 v4 when crypto.randomUUID exists). */
export function newCid() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function entryEvent(channel, e) {
  const base = { channel, seq: e.seq, id: e.id, sender: e.sender, ts: e.ts };
  if (e.kind === "message") return { type: "message", ...messageOf(channel, e) };
  if (e.kind === "edit") return { type: "edit", ...base, text: e.text };
  if (e.kind === "delete") return { type: "delete", ...base };
  return null; // an unknown kind: skipped, but the position still moves (PROTOCOL.md 17)
}

function messageOf(channel, m) {
  return {
    channel, seq: m.seq, id: m.id, sender: m.sender, ts: m.ts,
    text: m.text ?? null, meta: m.meta ?? null, edited: m.edited ?? null, deleted: !!m.deleted,
  };
}

function ackOf(f) {
  return { channel: f.channel, seq: f.seq, id: f.id, ts: f.ts, dup: !!f.dup };
}

class ChannelState {
  constructor(name, replay = false) {
    this.name = name;
    this.replay = replay;
    this.known = false; // joined once: position (last, epoch) is meaningful
    this.epoch = 0;
    this.last = 0; // the last applied seq
    this.phase = "idle"; // idle | joining | reloading | syncing | live
    this.gen = 0; // set anew from the client's one counter: replies for an older one are ignored
    this.pending = new Map(); // seq -> live event held while syncing
    this.reloadPending = false;
    // The sync in flight may miss live events: a `cut` push came while it was in flight
    // (its read may predate the cut, its reply still resumes the stream), or the reorder
    // buffer dropped some. Its last page then does not end the catch-up: a sync sent
    // after that moment does (it fetches them all). PROTOCOL.md 13.3 `ch.sync_again`.
    this.syncAgain = false;
    this.joinWaiters = [];
    this.delivered = null; // {seq, epoch}: how far the app has the channel (position())
  }
}

// `text` cut to MAX_CLOSE_REASON_BYTES of UTF-8 (whole characters): close() throws on a
// longer reason, and a server's message or a channel name can be longer.
function closeReason(text) {
  const bytes = new TextEncoder().encode(text);
  if (bytes.length <= MAX_CLOSE_REASON_BYTES) return text;
  let end = MAX_CLOSE_REASON_BYTES;
  while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--; // not inside a character
  return new TextDecoder().decode(bytes.subarray(0, end));
}

export class TsmsgClient {
  /**
   * @param {object} options
   *   url: the WebSocket URL (default: this page's origin + /connect);
   *   token: a JWT, or tokenProvider: async () => JWT (asked again before expiry);
   *   WebSocket: a WebSocket class (default: globalThis.WebSocket).
   */
  constructor(options = {}) {
    const here = globalThis.location;
    this.url = options.url ?? (here ? `${here.protocol === "https:" ? "wss" : "ws"}://${here.host}/connect` : null);
    if (!this.url) throw new TypeError("TsmsgClient: options.url is required outside a page");
    if (!options.token && !options.tokenProvider) throw new TypeError("TsmsgClient: token or tokenProvider is required");
    this._token = options.token ?? null;
    this._provider = options.tokenProvider ?? null;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.backoffMaxMs = options.backoffMaxMs ?? BACKOFF_MAX_MS;
    this.user = null;
    this.connected = false;
    this.limits = {};
    this.heartbeatMs = DEFAULT_HEARTBEAT_MS;
    this.closeReason = null; // the server's last word: an error code, or shutting_down
    this.channels = new Map(); // followed channels
    this._listeners = new Map();
    this._ws = null;
    this._rids = 1;
    this._inflight = new Map(); // rid -> request sent on this connection
    this._calls = new Set(); // app requests not yet answered
    this._outbox = new Map(); // cid -> send not yet acknowledged, in order
    this._held = []; // internal requests waiting out a rate limit
    this._attempt = 0;
    // Channel generations, one counter for all: a channel left and joined again (a new
    // ChannelState) never takes a generation a request of the old follow still holds.
    this._gens = 0;
    this._stopped = true;
    this._timers = new Set();
    this._pingSent = null;
    this._refreshTimer = null;
    this._expiredHere = false;
    this._firstWelcome = null;
    this._tokenFresh = false; // the token of this hello came from the provider for it
    this._fatal = null; // the hello refusal that stopped the client (until connect())
  }

  // ------------------------------------------------------------------ events

  /** Listen to `type`; returns a function that stops listening. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this._listeners.get(type).delete(fn);
  }

  /** Listen to one channel's events (message, edit, delete, resynced, typing, read, left). */
  onChannel(channel, fn) {
    const mine = (value) => { if (value.channel === channel) fn(value); };
    const offs = ["event", "typing", "read", "left"].map((type) => this.on(type, mine));
    return () => offs.forEach((off) => off());
  }

  /** Call the listeners of `type`: those there when the delivery starts, less any removed
   * meanwhile (one added during it gets the next event, not this one). With `ch`, an event
   * of that channel: it stops once the channel is no longer followed (a listener left it). */
  _emit(type, value, ch = null) {
    const listeners = this._listeners.get(type);
    if (!listeners) return;
    for (const fn of [...listeners]) {
      if (!listeners.has(fn)) continue;
      if (ch && !this._follows(ch)) return;
      try {
        fn(value);
      } catch (err) {
        if (type !== "error") this._emit("error", err);
        else console.error(err);
      }
    }
  }

  // ------------------------------------------------------------------ lifecycle

  /** Start connecting (and reconnecting); resolves at the first `welcome`. */
  connect() {
    if (!this._stopped) return this._firstWelcome.promise;
    this._stopped = false;
    this._fatal = null;
    this._attempt = 0; // a new start: the backoff starts over (as the Python client's connect())
    this._firstWelcome = deferred();
    this._open();
    return this._firstWelcome.promise;
  }

  /** A hello refused for good: stop (no more reconnects), reject whatever waits with
   * `error` (connect(), requests, joins, sends; a send stays in the outbox, to be saved
   * or sent by a new connect()), and any request made before connect() again; then emit
   * it. As the Python client's _fail. */
  _fail(error) {
    this._fatal = error;
    this.closeReason = error.code;
    this._stopped = true;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    clearTimeout(this._refreshTimer);
    const ws = this._ws;
    if (ws) {
      this._lost(error.code); // now: a connect() called before the close comes is not raced
      ws.close(1000, "hello refused");
    }
    this._firstWelcome.reject(error);
    for (const req of this._calls) req.reject(error);
    this._calls.clear();
    for (const req of this._outbox.values()) {
      req.reject(error);
      const d = deferred(); // a later send() of its cid, or connect() again, waits anew
      Object.assign(req, { promise: d.promise, resolve: d.resolve, reject: d.reject });
    }
    for (const ch of this.channels.values()) for (const d of ch.joinWaiters.splice(0)) d.reject(error);
    this._emit("error", error);
  }

  /** A promise rejected with the error that stopped the client, if one did. */
  _refused() {
    if (!this._fatal) return null;
    const d = deferred();
    d.reject(this._fatal);
    return d.promise;
  }

  /** Stop: close the connection, reconnect no more. Unacknowledged sends stay in outbox. */
  close() {
    this._stopped = true;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    clearTimeout(this._refreshTimer);
    if (this._ws) this._ws.close(1000, "client closed");
  }

  /** The unacknowledged sends, in order: what to keep if the page may reload. */
  get outbox() {
    return [...this._outbox.values()].map((r) => ({ cid: r.frame.cid, channel: r.frame.channel, text: r.frame.text, meta: r.frame.meta ?? null }));
  }

  /** (seq, epoch) of the last applied event of a channel. */
  position(channel) {
    const ch = this.channels.get(channel);
    // What the app has: during a reload `last` is already the head whose history (the
    // `resynced`) has not come yet; a position saved then would skip it when restored.
    return ch && ch.delivered ? { ...ch.delivered } : null;
  }

  /** Saved state, before connect(): channels [{channel, seq, epoch}], outbox as above. */
  restore({ channels = [], outbox = [] } = {}) {
    for (const { channel, seq, epoch } of channels) {
      const ch = new ChannelState(channel);
      Object.assign(ch, { known: true, last: seq, epoch, delivered: { seq, epoch } });
      this.channels.set(channel, ch);
    }
    for (const s of outbox) this._enqueueSend(s.channel, s.text, s.meta, s.cid, null);
  }

  async _currentToken() {
    this._tokenFresh = false;
    if (this._provider && (!this._token || this._expiresSoon(this._token))) {
      this._token = await this._provider();
      this._tokenFresh = true;
    }
    return this._token;
  }

  _expiresSoon(token) {
    const exp = tokenExpiry(token);
    return exp !== null && exp - Date.now() < REFRESH_MARGIN_MS / 3;
  }

  async _open() {
    if (this._stopped) return;
    let token;
    try {
      token = await this._currentToken();
    } catch (err) {
      this._emit("error", err);
      return this._retry();
    }
    if (this._stopped) return;
    const ws = new this._WebSocket(this.url, [SUBPROTOCOL]);
    this._ws = ws;
    this._conn = "hello";
    this._expiredHere = false; // the server said (on this connection) that the token expired
    this._inflight.clear();
    this.closeReason = null;
    const giveUp = this._later(CONNECT_TIMEOUT_MS, () => {
      if (this._ws === ws && this._conn !== "ready") ws.close(4000, "no welcome in time");
    });
    ws.onopen = () => this._write({ t: "hello", rid: this._rids++, v: PROTOCOL_VERSION, token });
    ws.onmessage = (msg) => {
      if (this._ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(msg.data);
      } catch {
        return ws.close(4002, "invalid JSON from the server");
      }
      this._lastRx = Date.now();
      this._receive(frame);
    };
    ws.onclose = (ev) => {
      clearTimeout(giveUp);
      this._timers.delete(giveUp);
      if (this._ws === ws) this._lost(this.closeReason || `closed (${ev.code})`);
    };
  }

  _later(ms, fn) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  /** Reconnect after a backoff with full jitter; waiting at least `leastMs` (a hello's
   * rate_limited: its retry_after_ms), as the Python client. */
  _retry(leastMs = 0) {
    if (this._stopped) return;
    const cap = Math.min(this.backoffMaxMs, BACKOFF_BASE_MS * 2 ** Math.min(this._attempt, 20));
    this._attempt += 1;
    this._later(Math.max(leastMs, Math.random() * cap), () => this._open());
  }

  _lost(reason) {
    const wasReady = this._conn === "ready";
    this._ws = null;
    this._conn = "down";
    this.connected = false;
    this._pingSent = null;
    clearTimeout(this._pingTimer);
    clearTimeout(this._refreshTimer);
    this._refreshing = false; // a refresh in flight died with the connection
    this._held = [];
    this._inflight.clear();
    for (const req of [...this._calls]) {
      const sent = req.rid !== null;
      req.rid = null;
      req.needsToken = false; // the next connection's hello carries a fresh token
      if (req.frame.t === "leave") {
        // A new connection follows only the channels joined on it: nothing to undo (sent
        // again after the joins, it would stop a channel the page joined again meanwhile).
        this._calls.delete(req);
        req.resolve(undefined);
      } else if (sent && !req.retry) {
        this._calls.delete(req);
        req.reject(new TsmsgError("connection_closed", `the connection closed (${reason}) before ${req.frame.t} was answered`));
      }
    }
    for (const req of this._outbox.values()) {
      req.rid = null;
      req.needsToken = false;
    }
    for (const ch of this.channels.values()) {
      ch.phase = "idle";
      ch.gen = ++this._gens;
      ch.pending.clear();
    }
    if (wasReady) this._emit("connection", { connected: false, reason });
    if (this._helloWait != null) {
      const wait = this._helloWait;
      this._helloWait = null;
      return this._retry(wait);
    }
    this._retry();
  }

  _write(frame) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify(frame));
  }

  // ------------------------------------------------------------------ app requests

  /** Follow a channel; resolves with {channel, head, read, epoch, horizon}. */
  join(channel, { replay = false } = {}) {
    checkChannel(channel);
    if (this._fatal) return this._refused();
    let ch = this.channels.get(channel);
    if (!ch) this.channels.set(channel, (ch = new ChannelState(channel, replay)));
    const d = deferred();
    ch.joinWaiters.push(d);
    if (this._conn === "ready" && ch.phase !== "joining") this._startJoin(ch);
    return d.promise;
  }

  /**
   * Stop following a channel. From this call on no event of the channel is delivered
   * (a listener that leaves while a page is being delivered gets none of the rest), until
   * it is joined again, which starts afresh with a `resynced`. Resolves also when the
   * connection closes before the answer: a new connection follows only the joined channels.
   */
  leave(channel) {
    checkChannel(channel);
    const ch = this.channels.get(channel);
    this.channels.delete(channel);
    if (ch) for (const d of ch.joinWaiters) d.reject(new TsmsgError("connection_closed", `left ${channel} while joining`));
    if (this._conn !== "ready") return Promise.resolve();
    return this._call({ t: "leave", channel }, true);
  }

  /**
   * Send a message; resolves with the ack {channel, seq, id, ts, dup} once stored. Made
   * while offline, it waits in the outbox and goes (with the same cid) after reconnecting.
   */
  send(channel, text, { meta = null, cid = newCid() } = {}) {
    checkChannel(channel);
    if (typeof text !== "string") throw new TsmsgError("bad_request", "`text` must be a string");
    const most = this.limits.max_text_bytes ?? 16384;
    if (new TextEncoder().encode(text).length > most) throw new TsmsgError("limit_exceeded", `\`text\` is over ${most} bytes of UTF-8`);
    const pending = this._outbox.get(cid);
    if (pending && pending.frame.channel !== channel) {
      throw new TsmsgError("bad_request", `cid ${cid} is waiting to be sent to ${pending.frame.channel}`);
    }
    if (this._fatal) return this._refused();
    if (pending) return pending.promise;
    const d = deferred();
    this._enqueueSend(channel, text, meta, cid, d);
    this._pump();
    return d.promise;
  }

  edit(channel, id, text) {
    return this._call({ t: "edit", channel, id, text }, false).then(ackOf);
  }

  delete(channel, id) {
    return this._call({ t: "delete", channel, id }, false).then(ackOf);
  }

  /** A page of messages below `before` (newest page, oldest first): {messages, more}. */
  history(channel, { before = null, limit = null } = {}) {
    const frame = { t: "history", channel };
    if (before !== null) frame.before = before;
    if (limit !== null) frame.limit = limit;
    return this._call(frame, true).then((f) => ({ messages: f.messages.map((m) => messageOf(channel, m)), more: !!f.more }));
  }

  /** Move the read cursor; resolves with the cursor. */
  read(channel, seq) {
    return this._call({ t: "read", channel, seq }, true).then((f) => f.seq);
  }

  typing(channel, on = true) {
    return this._call({ t: "typing", channel, on: !!on }, true).then(() => undefined);
  }

  setPresence(status) {
    return this._call({ t: "presence", status }, true).then((f) => f.status);
  }

  /** [{user, status, online, last_seen?}] of users who share a channel with you. */
  presence(users) {
    return this._call({ t: "presence", users }, true).then((f) => f.users);
  }

  /** {channel: count} of unread messages. */
  unread(channels) {
    return this._call({ t: "unread", channels }, true).then((f) => f.unread);
  }

  /**
   * The user's channels and DMs (its memberships the token may read), in name order:
   * every page of `channels` (PROTOCOL.md 6.15), as [{channel, head, read, unread, capped,
   * peer}] (`peer`: a DM's other user, else null; `capped`: `unread` is a lower bound).
   * A DM another user opens is among them, and comes as a `membership` event meanwhile.
   */
  async listChannels() {
    const out = [];
    let after = null;
    for (;;) {
      const f = await this._call(after === null ? { t: "channels" } : { t: "channels", after }, true);
      const page = f.channels ?? [];
      for (const c of page) {
        out.push({ channel: c.channel, head: c.head, read: c.read, unread: c.unread, capped: !!c.capped, peer: c.peer ?? null });
      }
      if (!f.more || !page.length) return out;
      after = page[page.length - 1].channel;
    }
  }

  _call(frame, retry) {
    if (this._fatal) return this._refused();
    const d = deferred();
    const req = { frame, kind: "call", rid: null, retry, notBefore: 0, needsToken: false, resolve: d.resolve, reject: d.reject };
    this._calls.add(req);
    this._pump();
    return d.promise;
  }

  _enqueueSend(channel, text, meta, cid, d) {
    const frame = { t: "send", channel, cid, text };
    if (meta && Object.keys(meta).length) frame.meta = meta;
    d = d ?? deferred();
    this._outbox.set(cid, { frame, kind: "send", rid: null, notBefore: 0, attempts: 0, needsToken: false, promise: d.promise, resolve: d.resolve, reject: d.reject });
  }

  // ------------------------------------------------------------------ input

  _receive(f) {
    const t = f.t;
    if (this._conn === "hello") {
      if (t === "welcome") return this._welcome(f);
      if (t === "error") {
        this.closeReason = f.code;
        const error = new TsmsgError(f.code, f.message, f);
        if (f.code === "rate_limited") this._helloWait = error.retryAfterMs;
        else if (TOKEN_REFUSED.has(f.code) && this._provider && !this._tokenFresh) {
          this._token = null; // a token from before this hello: ask the provider again
        } else if (TOKEN_REFUSED.has(f.code) || FATAL_HELLO.has(f.code)) {
          // Retrying cannot help: another token from the provider would be refused too
          // (a wrong secret, a wrong user), and looping would hide it (each hello a
          // failed login of the page's address, PROTOCOL.md 16.3). Other codes
          // (hello_timeout, an unknown one) are retried with backoff.
          const why = TOKEN_REFUSED.has(f.code) ? `the token was refused: ${f.message}` : f.message;
          this._fail(new TsmsgError(f.code, why, f));
        }
      }
      return;
    }
    if (this._conn !== "ready") return;
    if (typeof f.rid === "number" && ["ok", "error", "resync", "pong"].includes(t)) {
      const req = this._inflight.get(f.rid);
      this._inflight.delete(f.rid);
      if (req) this._reply(req, f);
      return;
    }
    const ch = typeof f.channel === "string" ? this.channels.get(f.channel) : undefined;
    if (t === "event") {
      if (ch && Number.isInteger(f.seq)) this._live(ch, f);
    } else if (t === "resync") {
      if (ch) this._resyncPush(ch, f);
    } else if (t === "typing") {
      if (ch) this._emit("typing", { channel: ch.name, user: f.user, on: !!f.on }, ch);
    } else if (t === "read") {
      if (ch) this._emit("read", { channel: ch.name, user: f.user, seq: f.seq }, ch);
    } else if (t === "presence") {
      this._emit("presence", { user: f.user, status: f.status, ts: f.ts });
    } else if (t === "membership") {
      if (typeof f.channel === "string" && typeof f.by === "string") this._emit("membership", { channel: f.channel, by: f.by });
    } else if (t === "left") {
      if (ch) this._left(ch, String(f.reason ?? ""));
    } else if (t === "error") {
      if (f.code === "token_expired" && "refresh_within_ms" in f) {
        this._expiredHere = true;
        this._refreshNow();
      } else this.closeReason = f.code;
    } else if (t === "bye") {
      this.closeReason = f.code || "shutting_down";
    }
  }

  _welcome(f) {
    this._conn = "ready";
    this.connected = true;
    // The backoff starts over once this connection has stayed up backoffMaxMs: a
    // server that welcomes and then drops at once must not get a reconnect every
    // BACKOFF_BASE_MS from every page (so no reset here).
    const ws = this._ws;
    this._later(Math.min(this.backoffMaxMs, MAX_TIMER_MS), () => {
      if (this._ws === ws && this._conn === "ready") this._attempt = 0;
    });
    this.user = f.user;
    this.heartbeatMs = f.heartbeat_ms || DEFAULT_HEARTBEAT_MS;
    this.limits = f.limits || {};
    this._emit("connection", { connected: true, reason: "connected", user: this.user });
    this._firstWelcome.resolve({ user: f.user, session: f.session });
    this._schedulePing();
    this._scheduleRefresh();
    for (const ch of [...this.channels.values()].sort((a, b) => (a.name < b.name ? -1 : 1))) this._startJoin(ch);
    this._pump();
  }

  _schedulePing() {
    clearTimeout(this._pingTimer);
    const ws = this._ws;
    this._pingTimer = this._later(Math.max(1, this.heartbeatMs / 2), () => {
      if (this._ws !== ws || this._conn !== "ready") return;
      if (this._pingSent !== null && Date.now() - Math.max(this._pingSent, this._lastRx) >= this.heartbeatMs) {
        return ws.close(4001, `no pong within ${this.heartbeatMs} ms`);
      }
      if (this._pingSent === null) {
        this._pingSent = Date.now();
        this._send({ frame: { t: "ping" }, kind: "ping", rid: null });
      }
      this._schedulePing();
    });
  }

  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    const exp = this._provider ? tokenExpiry(this._token) : null;
    if (exp === null) return;
    const life = exp - Date.now();
    const margin = Math.min(REFRESH_MARGIN_MS, life / 5);
    const delay = Math.max(0, life - margin);
    // Timers hold at most 2^31 - 1 ms (24.8 days; a longer one fires at once): look again then.
    const later = delay > MAX_TIMER_MS;
    this._refreshTimer = setTimeout(() => (later ? this._scheduleRefresh() : this._refreshNow()), Math.min(delay, MAX_TIMER_MS));
  }

  async _refreshNow() {
    if (!this._provider || this._refreshing || this._conn !== "ready") return;
    this._refreshing = true;
    const ws = this._ws;
    try {
      this._token = await this._provider();
      if (this._ws === ws && this._conn === "ready") this._send({ frame: { t: "refresh", token: this._token }, kind: "refresh", rid: null });
      else this._refreshing = false; // the connection changed meanwhile: its hello carries the token
    } catch (err) {
      this._refreshing = false;
      this._emit("error", err);
      // The provider failed: end the connection now, whatever asked for the token (the
      // timer before exp, the server's expiry notice, a request refused token_expired),
      // as the Python client (client.py _refresh_token). The reconnect (with backoff)
      // asks the provider again, at its hello if the token is gone or about to expire,
      // else by the refresh timer after its welcome: so a provider that keeps failing is
      // asked at the pace of the backoff, and requests refused token_expired go on the
      // new connection instead of waiting for the server's grace close. A token the
      // server said has expired is dropped (not offered to the next hello).
      if (this._ws === ws && this._conn === "ready" && !this._stopped) {
        if (this._expiredHere) this._token = null;
        ws.close(4003, "the token provider failed"); // (a close reason: 123 bytes at most)
      }
    }
  }

  _reply(req, f) {
    req.rid = null;
    if (f.t === "error") {
      const error = new TsmsgError(f.code, f.message, f);
      if (f.code === "rate_limited") {
        req.notBefore = Date.now() + error.retryAfterMs;
        if (INTERNAL.has(req.kind)) this._held.push(req);
        this._later(error.retryAfterMs + 1, () => this._pump());
        return;
      }
      if (f.code === "token_expired" && this._provider && req.kind !== "refresh") {
        // Resent once the refresh's ok comes (the new token in place), not at the next
        // _pump before it: sent with the expired token, it would only be refused again.
        req.needsToken = true;
        this._expiredHere = true;
        if (INTERNAL.has(req.kind)) this._held.push(req);
        this._refreshNow();
        return;
      }
      return this._failed(req, error);
    }
    if (req.kind === "ping") {
      this._pingSent = null;
      return;
    }
    if (req.kind === "refresh") {
      this._refreshing = false;
      this._expiredHere = false;
      for (const waiting of [...this._calls, ...this._outbox.values(), ...this._held]) waiting.needsToken = false;
      this._scheduleRefresh();
      return this._pump();
    }
    if (req.kind === "send") {
      this._outbox.delete(req.frame.cid);
      return req.resolve(ackOf(f));
    }
    if (req.kind === "call") {
      this._calls.delete(req);
      if (f.t === "resync") return req.reject(new TsmsgError("resync", `${f.channel} must be reloaded`, f));
      return req.resolve(f);
    }
    const ch = this.channels.get(req.channel);
    if (!ch || req.gen !== ch.gen) return; // a reply for a channel state that moved on
    if (req.kind === "join") return this._joined(ch, f);
    if (f.t === "resync") this._reload(ch, f.head, f.epoch);
    else if (req.kind === "sync") this._synced(ch, f);
    else if (req.kind === "history") this._reloaded(ch, f);
  }

  /** A refusal to retry later (PROTOCOL.md 8): store_unavailable always, with a doubling
   * wait; internal up to 3 times. True if `req` waits for it now. */
  _backOff(req, error) {
    req.attempts = req.attempts || 0;
    if (error.code !== "store_unavailable" && !(error.code === "internal" && req.attempts < 3)) return false;
    const wait = Math.min(STORE_RETRY_MS * 2 ** Math.min(req.attempts, 16), STORE_RETRY_MAX_MS);
    req.attempts += 1;
    req.notBefore = Date.now() + wait;
    this._later(wait + 1, () => this._pump());
    return true;
  }

  _failed(req, error) {
    if (req.kind === "send") {
      if (this._backOff(req, error)) return;
      this._outbox.delete(req.frame.cid);
      return req.reject(error);
    }
    if (req.kind === "call") {
      this._calls.delete(req);
      return req.reject(error);
    }
    if (req.kind === "refresh") {
      this._refreshing = false;
      return this._ws && this._ws.close(4003, closeReason(`refresh failed: ${error.message}`));
    }
    const ch = this.channels.get(req.channel);
    if (!ch || req.gen !== ch.gen) return;
    if (this._backOff(req, error)) {
      this._held.push(req); // the store is away: the same step, later
      return;
    }
    if (error.code === "store_unavailable" || error.code === "internal") {
      // retried enough: start over (the reconnect rejoins every channel)
      const why = `${req.kind} of ${ch.name} failed: ${error.message}`;
      return this._ws && this._ws.close(4004, closeReason(why));
    }
    if (req.kind === "join") {
      if (error.code === "token_expired" && ch.known) {
        // The token expired (no provider to refresh it), not the channel: keep it and its
        // position for the next connection, on a new token (as the Python client).
        ch.phase = "idle";
        for (const d of ch.joinWaiters.splice(0)) d.reject(error);
        return;
      }
      // The token no longer allows the channel (or it is not valid): stop following.
      return this._left(ch, error.code, error);
    }
    ch.phase = "idle"; // a sync or history refused (forbidden after a refresh, ...): rejoining decides
  }

  // ------------------------------------------------------------------ channel flow

  _startJoin(ch) {
    ch.phase = "joining";
    ch.gen = ++this._gens;
    ch.pending.clear();
    this._internal("join", ch, { t: "join", channel: ch.name });
  }

  _joined(ch, f) {
    const info = { channel: ch.name, head: f.head, read: f.read, epoch: f.epoch, horizon: f.horizon };
    for (const d of ch.joinWaiters.splice(0)) d.resolve(info);
    if (!ch.known) {
      ch.known = true;
      if (ch.replay) this._catchUp(ch);
      else this._reload(ch, info.head, info.epoch);
    } else if (ch.reloadPending || epochChanged(ch.epoch, info.epoch)) {
      this._reload(ch, info.head, info.epoch);
    } else {
      this._catchUp(ch);
    }
  }

  _catchUp(ch) {
    ch.phase = "syncing";
    ch.syncAgain = false; // this sync is sent after whatever the flag was set for
    const frame = { t: "sync", channel: ch.name, since: ch.last };
    if (ch.epoch !== 0) frame.epoch = ch.epoch; // a reset log answers resync, reason "epoch"
    this._internal("sync", ch, frame);
  }

  _synced(ch, f) {
    if (epochChanged(ch.epoch, f.epoch)) return this._reload(ch, f.head, f.epoch);
    if (f.epoch !== 0) ch.epoch = f.epoch;
    for (const e of f.events) {
      this._apply(ch, e);
      if (!this._follows(ch)) return; // a listener left the channel mid-page: no more of it
    }
    if (f.more || ch.syncAgain) return this._catchUp(ch);
    ch.phase = "live";
    const pending = [...ch.pending.entries()].sort((a, b) => a[0] - b[0]);
    ch.pending = new Map();
    for (const [seq, e] of pending) {
      if (!this._follows(ch)) return;
      if (ch.phase === "live") this._live(ch, e);
      else if (ch.phase === "syncing") ch.pending.set(seq, e); // a gap remains
    }
  }

  _reload(ch, head, epoch) {
    ch.gen = ++this._gens;
    ch.pending.clear();
    Object.assign(ch, { known: true, epoch, last: head, reloadPending: head !== 0 });
    if (head === 0) {
      ch.delivered = { seq: 0, epoch };
      this._emit("event", { type: "resynced", channel: ch.name, head: 0, epoch, messages: [] }, ch);
      if (this._follows(ch)) this._catchUp(ch);
      return;
    }
    ch.phase = "reloading";
    this._internal("history", ch, { t: "history", channel: ch.name, before: head + 1 });
  }

  _reloaded(ch, f) {
    ch.reloadPending = false;
    const messages = f.messages.map((m) => messageOf(ch.name, m));
    ch.delivered = { seq: ch.last, epoch: ch.epoch };
    this._emit("event", { type: "resynced", channel: ch.name, head: ch.last, epoch: ch.epoch, messages, more: !!f.more }, ch);
    if (this._follows(ch)) this._catchUp(ch);
  }

  /** Whether `ch` is still followed (a listener may leave, or leave and join again, while
   * its events are delivered: nothing more of that follow goes out then). */
  _follows(ch) {
    return this.channels.get(ch.name) === ch;
  }

  _apply(ch, e) {
    if (!this._follows(ch)) return;
    if (e.seq <= ch.last) return; // already applied
    ch.last = e.seq;
    ch.delivered = { seq: e.seq, epoch: ch.epoch };
    const event = entryEvent(ch.name, e);
    if (event) this._emit("event", event, ch);
  }

  _live(ch, e) {
    if (!this._follows(ch)) return;
    if (ch.phase === "joining" || ch.phase === "reloading" || ch.phase === "syncing") {
      if (e.seq <= ch.last) return; // already applied (or below a reload's head): never worth holding
      if (ch.pending.size < MAX_REORDER) ch.pending.set(e.seq, e);
      else ch.syncAgain = true; // dropped: possibly above the head of the sync in flight
      return;
    }
    if (ch.phase !== "live" || e.seq <= ch.last) return; // idle (a sync will fetch it) or a repeat
    if (e.seq === ch.last + 1) this._apply(ch, e);
    else {
      ch.pending.set(e.seq, e); // a gap: fetch what is missing, hold this one
      this._catchUp(ch);
    }
  }

  _resyncPush(ch, f) {
    if (f.reason === "cut") {
      if (ch.phase === "live") this._catchUp(ch); // reaching the head resumes the stream
      else if (ch.phase === "syncing") ch.syncAgain = true; // the sync in flight may have been read before the cut
    } else if (ch.phase !== "reloading") {
      this._reload(ch, f.head, f.epoch);
    }
  }

  _left(ch, reason, error = null) {
    this.channels.delete(ch.name);
    if (ch.joinWaiters.length) {
      const failure = error ?? new TsmsgError("connection_closed", `left ${ch.name}: ${reason}`);
      for (const d of ch.joinWaiters.splice(0)) d.reject(failure);
    } else {
      this._emit("left", { channel: ch.name, reason });
    }
  }

  // ------------------------------------------------------------------ sending

  _internal(kind, ch, frame) {
    this._send({ frame, kind, rid: null, channel: ch.name, gen: ch.gen, notBefore: 0 });
  }

  _send(req) {
    req.rid = this._rids++;
    this._inflight.set(req.rid, req);
    this._write({ ...req.frame, rid: req.rid });
  }

  /** Send every waiting request that may go now; sends in order, stopping at the first that must wait. */
  _pump() {
    if (this._conn !== "ready") return;
    const now = Date.now();
    // A request refused token_expired (needsToken) waits for the refresh's ok.
    for (const req of this._calls) if (req.rid === null && !req.needsToken && req.notBefore <= now) this._send(req);
    for (const req of this._outbox.values()) {
      if (req.rid !== null) continue;
      if (req.needsToken || req.notBefore > now) break;
      this._send(req);
    }
    let due = Infinity; // the earliest wait left: looked at again then
    for (const req of this._held.splice(0)) {
      const ch = this.channels.get(req.channel);
      if (req.needsToken) {
        this._held.push(req);
      } else if (req.notBefore > now) {
        this._held.push(req);
        due = Math.min(due, req.notBefore);
      } else if (req.channel === undefined || (ch && req.gen === ch.gen)) this._send(req);
    }
    for (const req of [...this._calls, ...this._outbox.values()]) {
      if (req.rid === null && !req.needsToken && req.notBefore > now) due = Math.min(due, req.notBefore);
    }
    // A wall clock stepped back makes a wait end later than its timer: one timer, re-armed.
    if (due !== Infinity) {
      clearTimeout(this._pumpTimer);
      this._timers.delete(this._pumpTimer);
      this._pumpTimer = this._later(due - now + 1, () => this._pump());
    }
  }
}

function epochChanged(held, epoch) {
  return held !== 0 && epoch !== 0 && held !== epoch;
}

function checkChannel(channel) {
  if (typeof channel !== "string" || !CHANNEL_RE.test(channel)) {
    throw new TsmsgError("bad_request", `not a valid channel name: ${JSON.stringify(channel)}`);
  }
}

function deferred() {
  const d = {};
  d.promise = new Promise((resolve, reject) => Object.assign(d, { resolve, reject }));
  d.promise.catch(() => {}); // an ignored failure is not an unhandled rejection
  return d;
}

/** The DM channel of two users: dm:<a>:<b>, the ids sorted. */
export function dmChannel(a, b) {
  return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}
