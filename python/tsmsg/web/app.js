// The web chat page: everything it shows comes from tsmsg.js events. Message text is put
// into the page with textContent only, never as HTML.
import { TsmsgClient, dmChannel, tokenExpiry } from "/tsmsg.js";

const DEFAULT_CHANNEL = "general";
const TYPING_EVERY_MS = 3000; // while typing, tell the others at most this often
const TYPING_SHOW_MS = 8000; // a typing indicator without news disappears after this
const $ = (id) => document.getElementById(id);

let client = null;
let me = null;
let current = null;
// channel -> {messages: Map(id -> msg), more, unread, capped, counted (the seq up to which
// unread is counted), newFrom (who opened it: "new message from"), readers, typing, myRead}
const chats = new Map();
const status = new Map(); // user -> presence status
let editing = null; // the message being edited
let lastTyping = 0;

// ------------------------------------------------------------------ login

async function devToken(user) {
  const r = await fetch(`/dev/token?user=${encodeURIComponent(user)}`);
  if (r.status === 404) throw new Error("This server is not in --dev mode: paste a token from your app.");
  if (!r.ok) throw new Error((await r.text()).trim());
  return (await r.json()).token;
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("login-error").textContent = "";
  const user = $("login-user").value.trim();
  const pasted = $("login-token").value.trim();
  try {
    const options = pasted ? { token: pasted } : { tokenProvider: () => devToken(user) };
    if (!pasted && !user) throw new Error("Type a name (dev mode) or paste a token.");
    if (pasted && tokenExpiry(pasted) === null) throw new Error("That does not look like a JWT.");
    await start(options);
  } catch (err) {
    $("login-error").textContent = err.message || String(err);
  }
});

async function start(options) {
  client = new TsmsgClient(options);
  client.on("connection", onConnection);
  client.on("event", onEvent);
  client.on("typing", onTyping);
  client.on("read", onRead);
  client.on("presence", (p) => { status.set(p.user, p.status); renderLists(); });
  client.on("membership", onMembership);
  client.on("left", (l) => { chats.delete(l.channel); if (current === l.channel) current = null; renderAll(); });
  client.on("error", (err) => console.warn("tsmsg:", err));
  const welcome = await client.connect();
  me = welcome.user;
  $("login").classList.add("hidden");
  $("app").classList.remove("hidden");
  $("me").textContent = me;
  await openChannel(DEFAULT_CHANNEL);
}

function onConnection(c) {
  $("status").textContent = c.connected ? "connected" : "reconnecting…";
  $("status").classList.toggle("down", !c.connected);
  $("banner").classList.toggle("hidden", c.connected);
  document.body.dataset.connected = String(c.connected);
  if (c.connected) listSidebar();
}

// The sidebar is the user's channels and DMs as the server lists them, with its unread
// counts: at start and after every reconnect (membership pushes are best effort), and on
// each membership push. Each is followed, so it stays live. A live message past the
// listed head adds to the count.
async function listSidebar() {
  let list;
  try {
    list = await client.listChannels();
  } catch (err) {
    return console.warn(err);
  }
  for (const s of list) {
    const c = chat(s.channel);
    c.myRead = Math.max(c.myRead, s.read);
    if (s.channel !== current && s.head >= c.counted) Object.assign(c, { unread: s.unread, capped: s.capped, counted: s.head });
    follow(s.channel);
  }
  lookUp(list.map((s) => s.peer).filter(Boolean).slice(0, 100));
  renderLists();
}

// A new channel or DM of the user: another device joined it, or someone wrote to the user.
function onMembership(m) {
  if (m.by !== client.user) chat(m.channel).newFrom = m.by;
  follow(m.channel);
  listSidebar(); // its unread count
}

// Follow a channel without opening it.
function follow(channel) {
  if (client.channels.has(channel)) return;
  chat(channel);
  client.join(channel).catch(() => { chats.delete(channel); renderLists(); });
}

// The presence of DM peers, for the dots.
function lookUp(users) {
  if (!users.length) return;
  client.presence(users).then((list) => { for (const p of list) status.set(p.user, p.status); renderLists(); }, () => {});
}

// ------------------------------------------------------------------ channels

function chat(channel) {
  if (!chats.has(channel)) {
    chats.set(channel, { messages: new Map(), more: false, unread: 0, capped: false, counted: 0, newFrom: null, readers: new Map(), typing: new Map(), myRead: 0 });
  }
  return chats.get(channel);
}

async function openChannel(channel) {
  const c = chat(channel);
  if (!client.channels.has(channel)) {
    const info = await client.join(channel);
    c.myRead = Math.max(c.myRead, info.read);
  }
  current = channel;
  editing = null;
  Object.assign(c, { unread: 0, capped: false, newFrom: null });
  if (channel.startsWith("dm:")) lookUp([peerOf(channel)]);
  renderAll();
  markRead();
  scrollToEnd();
}

$("join-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("join-channel").value.trim();
  if (name) openChannel(name).then(() => { $("join-channel").value = ""; }, (err) => alertError(err));
});

$("dm-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const peer = $("dm-user").value.trim();
  if (peer) openChannel(dmChannel(me, peer)).then(() => { $("dm-user").value = ""; }, (err) => alertError(err));
});

function alertError(err) {
  $("typing").textContent = `⚠ ${err.message || err}`;
}

// ------------------------------------------------------------------ events

function onEvent(e) {
  const c = chat(e.channel);
  if (e.type === "resynced") {
    c.messages = new Map(e.messages.map((m) => [m.id, m]));
    c.more = !!e.more || (e.messages.length > 0 && e.messages[0].seq > 1);
  } else if (e.type === "message") {
    c.messages.set(e.id, e);
    c.typing.delete(e.sender);
    if (e.seq > c.counted && e.sender !== me && (e.channel !== current || document.hidden)) c.unread += 1;
    c.counted = Math.max(c.counted, e.seq);
  } else if (e.type === "edit") {
    const m = c.messages.get(e.id);
    if (m) Object.assign(m, { text: e.text, edited: e.ts });
  } else if (e.type === "delete") {
    const m = c.messages.get(e.id);
    if (m) Object.assign(m, { text: null, meta: null, deleted: true });
  }
  if (e.channel === current) {
    const atEnd = nearEnd();
    renderMessages();
    if (atEnd || (e.type === "message" && e.sender === me)) scrollToEnd();
    if (e.type === "message" && !document.hidden) markRead();
  }
  renderLists();
}

function onTyping(t) {
  if (t.user === me) return;
  const c = chat(t.channel);
  if (t.on) c.typing.set(t.user, Date.now());
  else c.typing.delete(t.user);
  renderTyping();
}

function onRead(r) {
  const c = chat(r.channel);
  if (r.user === me) c.myRead = Math.max(c.myRead, r.seq);
  else c.readers.set(r.user, Math.max(c.readers.get(r.user) || 0, r.seq));
  if (r.channel === current) renderMessages();
}

function markRead() {
  if (!current) return;
  const c = chat(current);
  const last = Math.max(0, ...[...c.messages.values()].map((m) => m.seq));
  if (last > c.myRead) {
    c.myRead = last;
    client.read(current, last).catch((err) => console.warn(err));
  }
}

document.addEventListener("visibilitychange", () => { if (!document.hidden) markRead(); });

// ------------------------------------------------------------------ composer

$("composer-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("composer").value;
  if (!text.trim() || !current) return;
  $("composer").value = "";
  const channel = current;
  try {
    if (editing) {
      const id = editing;
      stopEditing();
      await client.edit(channel, id, text);
    } else {
      lastTyping = 0;
      client.typing(channel, false).catch(() => {});
      const sent = client.send(channel, text); // waits in the outbox while offline
      renderMessages(); // shown as "sending…" until acknowledged
      await sent;
      renderMessages();
    }
  } catch (err) {
    alertError(err);
  }
});

$("composer").addEventListener("input", () => {
  if (!current || editing || !client.connected) return;
  const now = Date.now();
  if (now - lastTyping > TYPING_EVERY_MS) {
    lastTyping = now;
    client.typing(current, true).catch(() => {});
  }
});

function startEditing(m) {
  editing = m.id;
  $("composer").value = m.text || "";
  $("editing").classList.remove("hidden");
  $("composer").focus();
}

function stopEditing() {
  editing = null;
  $("editing").classList.add("hidden");
}

$("cancel-edit").addEventListener("click", (e) => { e.preventDefault(); stopEditing(); $("composer").value = ""; });

$("older").addEventListener("click", async () => {
  const c = chat(current);
  const oldest = Math.min(...[...c.messages.values()].map((m) => m.seq));
  const box = $("messages");
  const before = box.scrollHeight;
  const page = await client.history(current, { before: oldest });
  for (const m of page.messages) if (!c.messages.has(m.id)) c.messages.set(m.id, m);
  c.more = page.more;
  renderMessages();
  box.scrollTop += box.scrollHeight - before; // keep the view where it was
});

// ------------------------------------------------------------------ rendering

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // always text, never HTML
  return node;
}

function renderAll() {
  renderLists();
  renderMessages();
  renderTyping();
}

function renderLists() {
  const channels = $("channel-list");
  const dms = $("dm-list");
  channels.replaceChildren();
  dms.replaceChildren();
  for (const [name, c] of [...chats.entries()].sort()) {
    const dm = name.startsWith("dm:");
    const li = el("li", name === current ? "active" : "");
    li.dataset.channel = name;
    if (dm) {
      const peer = peerOf(name);
      const dot = el("span", `dot ${status.get(peer) && status.get(peer) !== "offline" ? "online" : ""}`);
      dot.title = status.get(peer) || "offline";
      dot.dataset.presence = status.get(peer) || "offline";
      li.append(dot, el("span", "name", peer));
    } else {
      li.append(el("span", "name", `# ${name}`));
    }
    if (c.unread && name !== current) li.append(el("span", "unread", `${c.unread}${c.capped ? "+" : ""}`));
    if (c.newFrom && name !== current) li.append(el("span", "new", `new message from ${c.newFrom}`));
    li.addEventListener("click", () => openChannel(name));
    (dm ? dms : channels).append(li);
  }
  $("channel-title").textContent = current ? (current.startsWith("dm:") ? `@ ${peerOf(current)}` : `# ${current}`) : "";
}

function peerOf(dm) {
  return dm.split(":").slice(1).find((u) => u !== me) || me;
}

function renderMessages() {
  const list = $("message-list");
  list.replaceChildren();
  if (!current) return;
  const c = chat(current);
  const messages = [...c.messages.values()].sort((a, b) => a.seq - b.seq);
  $("older").classList.toggle("hidden", !c.more);
  const lastOwn = [...messages].reverse().find((m) => m.sender === me && !m.deleted);
  for (const m of messages) {
    const row = el("div", m.deleted ? "msg deleted" : "msg");
    row.dataset.seq = String(m.seq);
    row.dataset.id = m.id;
    const meta = el("div", "meta");
    meta.append(el("span", "sender", m.sender), el("span", "time", new Date(m.ts).toLocaleTimeString()));
    if (m.edited) meta.append(el("span", "edited", " (edited)"));
    if (m.sender === me && !m.deleted) {
      const actions = el("span", "actions");
      const edit = el("button", "edit", "edit");
      edit.type = "button";
      edit.addEventListener("click", () => startEditing(m));
      const del = el("button", "delete", "delete");
      del.type = "button";
      del.addEventListener("click", () => client.delete(current, m.id).catch(alertError));
      actions.append(edit, del);
      meta.append(actions);
    }
    row.append(meta, el("div", "text", m.deleted ? "message deleted" : m.text ?? ""));
    if (m === lastOwn) {
      const readers = [...c.readers.entries()].filter(([u, seq]) => u !== me && seq >= m.seq).map(([u]) => u);
      if (readers.length) row.append(el("div", "receipt", `✓ read by ${readers.sort().join(", ")}`));
    }
    list.append(row);
  }
  for (const s of client.outbox.filter((o) => o.channel === current)) {
    const row = el("div", "msg pending");
    row.dataset.cid = s.cid;
    const meta = el("div", "meta");
    meta.append(el("span", "sender", me), el("span", "time", "sending…"));
    row.append(meta, el("div", "text", s.text));
    list.append(row);
  }
  $("channel-info").textContent = `${messages.length} messages`;
}

function renderTyping() {
  if (!current) return;
  const c = chat(current);
  const now = Date.now();
  const who = [...c.typing.entries()].filter(([, t]) => now - t < TYPING_SHOW_MS).map(([u]) => u);
  $("typing").textContent = who.length ? `${who.sort().join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
}
setInterval(renderTyping, 1000);

function nearEnd() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 60;
}

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}
