"""The whole server over real TCP against a plain-Python model (a hypothesis rule-based
state machine).

A real ``tsmsg serve`` child process (``fsync`` durability, rate limits lifted) is shared
by every example; each example uses its own users and channels (a fresh name prefix), so
examples cannot see each other's data. Three users hold five connections (alice and bob
two devices each, carol one). Their tokens allow a fixed set of channels, each user lacks
one of them, and alice and bob share a DM that carol may not use:

        pub   ab    bc    ca    dm:alice:bob
alice   yes   yes   no    yes   yes
bob     yes   yes   yes   no    yes
carol   yes   no    yes   yes   no

(patterns: alice ``pub``, ``ab``, ``ca``; bob ``*b*``; carol ``pub``, ``?c``, ``c?``; all
under the example's prefix).

The rules: joins, leaves, sends (fresh cids, bursts pipelined on one connection, retries
of any earlier cid: a dup with the original seq, id and ts exactly when the (channel,
sender, cid) is stored), edits and deletes of any known message id, junk ids and ids of
other channels (own: ok; another user's: ``forbidden``; unknown or deleted: ``not_found``),
read cursors (forward only, clamped to the head), unread counts, syncs from 0, the head,
past the head and with right and wrong epochs, history with random ``before``/``limit``,
every request also on channels the token does not allow (``forbidden``, nothing stored or
pushed), disconnect and reconnect of a device (optionally with a send in flight, which is
*maybe* stored and is resolved by resending the same cid on the new connection), and
server SIGKILL + restart with writes in flight.

At a kill, sends, edits and deletes are pipelined on several connections, the test waits
for some of their replies (a drawn number) and SIGKILLs the server. After the restart the
log is read with ``sync`` and every new entry must be exactly one of the in-flight writes,
valid at its position (the model applies it there); every write acked before the kill
must be in the log at its acked seq; the pushes each connection got before the kill must
be, per channel, a prefix of the resolved log; and every in-flight send is then resent
with its cid, answered ``dup`` with the stored seq exactly when it was stored.

The model (:class:`MChannel`) keeps each channel's log as written, each message's current
state (edits applied, tombstones, redacted edit entries), the dedup keys, the epoch and
the read cursors. Every reply is compared with the model's expected frame (only the ids
and timestamps the server assigns are taken from its acks), and after every step an
invariant checks, over TCP:

- every connection's pushes (``event``, ``read``; presence and typing ignored) since the
  last step, in arrival order, equal the model's (a ``ping`` makes sure all have arrived);
- each channel's whole log (``sync`` from 0) is dense 1..head and equals the model's
  stored state, so no cid is stored twice and every acked write is there; ``history``
  equals the model's latest message states; the epoch is stable;
- each user's unread counts equal the model's.

Steps favour a user's session: half the time a rule reuses the last step's device and
channel (else a channel the device may use, or any channel a quarter of the time).

Sizes: 100 examples of up to 40 steps in ``make test`` (22-36 s on this 2-core machine);
500 examples of up to 60 steps with TSMSG_LONG=1 (``make test-long``, 165-210 s). A
restart costs about 0.5 s, so each example draws once how many kills it may do: 0 or 1
(0, 1 or 2 when long).

Replaying a failure: hypothesis shrinks it and prints the failing steps, each with the
frames it sent (``note``), and (``print_blob``) a line ``You can reproduce this example by
temporarily adding @reproduce_failure('<version>', b'...')``. It also keeps the example in
its database (``.hypothesis/``), so the next run of this test replays it first. To replay
exactly, add that decorator above ``class ServerMachine`` (``from hypothesis import
reproduce_failure``) and run ``.venv/bin/pytest tests/test_server_model.py``. To repeat a
whole run's generation, pass ``--hypothesis-seed=N`` (any N; the same N draws the same
examples). A failure that needs a kill shrinks slowly (every attempt restarts the server;
hypothesis gives up shrinking after 5 minutes and prints what it has). A failure that
depends on timing (which in-flight writes a kill caught) may not replay exactly
(hypothesis then reports it as flaky); the model accepts every outcome the protocol
allows, so it is a bug all the same.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conftest import mint
from server_proc import ServerProcess
from tsmsg import FrameDecoder, encode

LONG = os.environ.get("TSMSG_LONG") == "1"
MAX_EXAMPLES = 500 if LONG else 100
STEPS = 60 if LONG else 40
# Kills allowed in an example, drawn once per example (a restart costs about 0.5 s, so
# most examples allow none; one choice shrinks every kill away).
KILL_BUDGETS = [0, 1, 2] if LONG else [0, 1]
IO_TIMEOUT_S = 10.0  # any single wait for a frame
INT64_MAX = 2**63 - 1

Frame = dict[str, Any]

# Channel keys; the real names are "<prefix>.<key>", and "dm" is "dm:<alice>:<bob>".
ROOMS = ("pub", "ab", "bc", "ca")
KEYS = (*ROOMS, "dm")
USERS = ("alice", "bob", "carol")
DEVICES = ("alice", "alice", "bob", "bob", "carol")
PATTERNS = {"alice": ["pub", "ab", "ca"], "bob": ["*b*"], "carol": ["pub", "?c", "c?"]}
# The model's authorization table, written out (checked against the patterns below).
ACCESS = {
    "alice": {"pub", "ab", "ca", "dm"},
    "bob": {"pub", "ab", "bc", "dm"},
    "carol": {"pub", "bc", "ca"},
}
JUNK_IDS = ["", "x", "0-0", "1-999999", "a" * 65]
PUSHES = ("event", "read", "resync", "left", "error", "bye")  # presence, typing ignored

texts = st.text(max_size=4)
metas = st.none() | st.dictionaries(
    st.sampled_from(["k", "n"]), st.integers(-5, 5) | st.text(max_size=3), max_size=2
)
_prefixes = itertools.count(1)


def pick(options: list[Any]) -> st.SearchStrategy[Any]:
    """One of ``options``, drawn as an index of a fixed range. After a kill the model's
    lists (message ids, heads) depend on which writes in flight were stored, a matter of
    timing; a strategy whose shape followed them (``sampled_from(ids)``) would make the
    same choices replay differently, which hypothesis refuses as flaky data generation."""
    assert options
    return st.integers(0, 255).map(lambda i: options[i % len(options)])


def upto(n: int) -> st.SearchStrategy[int]:
    """An integer from 0 to ``n``, the same way."""
    return st.integers(0, 255).map(lambda i: i % (n + 1))


# ---------------------------------------------------------------------- the wire client


class Conn:
    """A blocking protocol client: replies are kept by rid, pushes in arrival order."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
        self.decoder = FrameDecoder()
        self.replies: dict[int, Frame] = {}
        self.pushes: list[Frame] = []
        self.rids = itertools.count(1)
        self.eof = False

    def send(self, frame: Frame) -> int:
        rid = next(self.rids)
        self.sock.sendall(encode({**frame, "rid": rid}))
        return rid

    def fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            raise EOFError("the server closed the connection")
        for frame in self.decoder.feed(data):
            if frame.get("rid") is not None:
                self.replies[frame["rid"]] = frame
            else:
                self.pushes.append(frame)

    def reply(self, rid: int) -> Frame:
        while rid not in self.replies:
            self.fill()
        return self.replies.pop(rid)

    def request(self, t: str, **fields: Any) -> Frame:
        return self.reply(self.send({"t": t, **fields}))

    def ask(self, t: str, **fields: Any) -> tuple[int, Frame]:
        """The request's rid and its reply."""
        rid = self.send({"t": t, **fields})
        return rid, self.reply(rid)

    def drain(self) -> None:
        """Read what a killed server sent before it died."""
        try:
            while not self.eof:
                self.fill()
        except (OSError, EOFError):
            pass

    def close(self, abortive: bool = False) -> None:
        if abortive:  # a reset rather than a FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# ---------------------------------------------------------------------- the model


@dataclass
class MEntry:
    """A log entry as written (and pushed live)."""

    seq: int
    kind: str
    id: str
    sender: str
    ts: int
    text: str | None = None
    meta: dict[str, Any] | None = None


@dataclass
class MMessage:
    """A message's current state."""

    seq: int
    id: str
    sender: str
    ts: int
    text: str | None
    meta: dict[str, Any] | None
    edited: int | None = None
    deleted: bool = False


class MChannel:
    def __init__(self, key: str, name: str) -> None:
        self.key, self.name = key, name
        self.log: list[MEntry] = []
        self.messages: dict[str, MMessage] = {}
        self.dedup: dict[tuple[str, str], str] = {}  # (sender, cid) -> message id
        self.cursors: dict[str, int] = {}
        self.epoch = 0  # learned from the server when the log starts, then fixed

    @property
    def head(self) -> int:
        return len(self.log)

    def message_view(self, m: MMessage) -> Frame:
        out: Frame = {"seq": m.seq, "kind": "message", "id": m.id, "sender": m.sender}
        out["ts"] = m.ts
        if m.deleted:
            out["deleted"] = True
            return out
        out["text"] = m.text
        if m.meta:
            out["meta"] = m.meta
        if m.edited is not None:
            out["edited"] = m.edited
        return out

    def stored(self, e: MEntry) -> Frame:
        """The entry as ``sync`` replays it: current state, deleted text redacted."""
        if e.kind == "message":
            return self.message_view(self.messages[e.id])
        out: Frame = {"seq": e.seq, "kind": e.kind, "id": e.id, "sender": e.sender, "ts": e.ts}
        if e.kind == "edit":
            if self.messages[e.id].deleted:
                out["deleted"] = True
            else:
                out["text"] = e.text
        return out

    def sync_events(self, since: int, limit: int) -> list[Frame]:
        return [
            {"t": "event", "channel": self.name, **self.stored(e)}
            for e in self.log[since : since + limit]
        ]

    def live(self, e: MEntry) -> Frame:
        out: Frame = {"t": "event", "channel": self.name, "seq": e.seq, "kind": e.kind}
        out.update(id=e.id, sender=e.sender, ts=e.ts)
        if e.text is not None:
            out["text"] = e.text
        if e.meta:
            out["meta"] = e.meta
        return out

    def history(self, before: int | None, limit: int) -> tuple[list[Frame], bool]:
        msgs = [
            self.message_view(m)
            for m in sorted(self.messages.values(), key=lambda m: m.seq)
            if before is None or m.seq < before
        ]
        page = msgs[max(0, len(msgs) - limit) :]
        return page, len(msgs) > len(page)

    def unread(self, user: str) -> int:
        cursor = self.cursors.get(user, 0)
        return sum(
            1
            for m in self.messages.values()
            if m.seq > cursor and not m.deleted and m.sender != user
        )


@dataclass
class Device:
    user: str  # the real user id
    short: str  # alice, bob, carol
    conn: Conn
    joined: set[str] = field(default_factory=set)  # channel keys
    expected: list[Frame] = field(default_factory=list)  # pushes due since the last check


@dataclass
class Op:
    """A write request: send, edit or delete."""

    dev: int
    kind: str
    key: str
    frame: Frame
    cid: str | None = None
    text: str | None = None
    meta: dict[str, Any] | None = None
    target: str | None = None
    rid: int | None = None


# ---------------------------------------------------------------------- the machine


class ServerMachine(RuleBasedStateMachine):
    server: ClassVar[ServerProcess | None] = None  # set by the test, shared by examples

    def __init__(self) -> None:
        super().__init__()
        assert self.server is not None
        if self.server.proc is None or self.server.proc.poll() is not None:
            anyio.run(self.server.restart)  # an earlier example failed while it was down
        self.prefix = f"x{next(_prefixes)}"
        note(f"names {self.prefix}.*, server log {self.server.log_path}")
        self.users = {u: f"{self.prefix}-{u}" for u in USERS}
        a, b = sorted([self.users["alice"], self.users["bob"]])
        names = {k: f"{self.prefix}.{k}" for k in ROOMS} | {"dm": f"dm:{a}:{b}"}
        self.channels = {k: MChannel(k, names[k]) for k in KEYS}
        self.counter = itertools.count(1)
        self.cids: list[str] = []  # every cid used, any user, any channel
        self.ids: list[str] = []  # every message id, any channel
        self.kills_left = 0
        self.last_dev, self.last_key = 0, "pub"
        self.devices: list[Device] = []
        self.checkers: dict[str, Conn] = {}
        for short, pats in PATTERNS.items():  # the model's table agrees with the patterns
            for key in ROOMS:
                allowed = any(fnmatch.fnmatchcase(names[key], f"{self.prefix}.{p}") for p in pats)
                assert allowed == (key in ACCESS[short]), (short, key)
        try:
            for short in DEVICES:
                self.devices.append(Device(self.users[short], short, self.connect(short)))
            self.connect_checkers()
        except BaseException:
            self.teardown()
            raise

    @initialize(kills=st.sampled_from(KILL_BUDGETS))
    def budget(self, kills: int) -> None:
        self.kills_left = kills

    # ---- connections

    def token(self, short: str) -> str:
        if short == "checker":
            return mint(f"{self.prefix}-checker", [f"{self.prefix}.*"])
        return mint(self.users[short], [f"{self.prefix}.{p}" for p in PATTERNS[short]])

    def connect(self, short: str) -> Conn:
        assert self.server is not None
        conn = Conn(self.server.port)
        try:
            welcome = conn.request("hello", v=1, token=self.token(short))
        except BaseException:
            conn.close()
            raise
        assert welcome["t"] == "welcome", welcome
        return conn

    def connect_checkers(self) -> None:
        """Reads every channel with sync and history, never joins: a user allowed every
        room (``<prefix>.*``) and, for the DM, a third alice connection."""
        for conn in self.checkers.values():
            conn.close()
        self.checkers = {}
        self.checkers["rooms"] = self.connect("checker")
        self.checkers["dm"] = self.connect("alice")

    def checker(self, key: str) -> Conn:
        return self.checkers["dm" if key == "dm" else "rooms"]

    def teardown(self) -> None:
        for dev in self.devices:
            dev.conn.close()
        for conn in self.checkers.values():
            conn.close()

    # ---- the model's bookkeeping

    def allowed(self, dev: Device, key: str) -> bool:
        return key in ACCESS[dev.short]

    def publish(self, key: str, frame: Frame) -> None:
        for dev in self.devices:
            if key in dev.joined:
                dev.expected.append(frame)

    def apply_message(self, op: Op, seq: int, mid: str, ts: int) -> None:
        ch = self.channels[op.key]
        user = self.devices[op.dev].user
        assert op.cid is not None and op.text is not None
        assert seq == ch.head + 1, f"{ch.name}: message at seq {seq}, head {ch.head}"
        assert mid not in self.ids, f"message id {mid} given twice"
        assert isinstance(ts, int) and ts > 0, ts
        entry = MEntry(seq, "message", mid, user, ts, op.text, op.meta or None)
        ch.log.append(entry)
        ch.messages[mid] = MMessage(seq, mid, user, ts, op.text, op.meta or None)
        ch.dedup[(user, op.cid)] = mid
        self.ids.append(mid)
        self.publish(op.key, ch.live(entry))

    def apply_change(self, op: Op, seq: int, ts: int) -> None:
        ch = self.channels[op.key]
        user = self.devices[op.dev].user
        assert op.target is not None
        m = ch.messages[op.target]
        assert seq == ch.head + 1, f"{ch.name}: {op.kind} at seq {seq}, head {ch.head}"
        assert isinstance(ts, int) and ts > 0, ts
        entry = MEntry(seq, op.kind, op.target, user, ts, op.text)
        ch.log.append(entry)
        if op.kind == "edit":
            m.text, m.edited = op.text, ts
        else:
            m.text, m.meta, m.edited, m.deleted = None, None, None, True
        self.publish(op.key, ch.live(entry))

    def change_error(self, op: Op) -> str | None:
        """The error an edit or delete gets now, None if it applies."""
        dev = self.devices[op.dev]
        if not self.allowed(dev, op.key):
            return "forbidden"
        assert op.target is not None
        m = self.channels[op.key].messages.get(op.target)
        if m is None or m.deleted:
            return "not_found"
        if m.sender != dev.user:
            return "forbidden"
        return None

    # ---- checking replies

    @staticmethod
    def expect_error(reply: Frame, rid: int, code: str) -> None:
        assert reply["t"] == "error" and reply["rid"] == rid, reply
        assert reply["code"] == code, (code, reply)
        assert isinstance(reply["message"], str), reply
        event(f"error {code}")

    def check_write(self, op: Op, reply: Frame, maybe_dup: bool = False) -> None:
        """Check a write's reply against the model, and apply it. ``maybe_dup``: a resend
        of a send that may or may not have been stored (either answer is right)."""
        assert op.rid is not None
        dev = self.devices[op.dev]
        ch = self.channels[op.key]
        if op.kind != "send":
            code = self.change_error(op)
            if code is not None:
                self.expect_error(reply, op.rid, code)
                return
            expected = {"t": "ok", "rid": op.rid, "channel": ch.name, "seq": ch.head + 1}
            expected.update(id=op.target, ts=reply.get("ts"), dup=False)
            assert reply == expected, (op, reply, expected)
            self.apply_change(op, reply["seq"], reply["ts"])
            event(f"{op.kind} ok")
            return
        if not self.allowed(dev, op.key):
            self.expect_error(reply, op.rid, "forbidden")
            return
        assert op.cid is not None
        mid = ch.dedup.get((dev.user, op.cid))
        if mid is not None:
            m = ch.messages[mid]
            expected = {"t": "ok", "rid": op.rid, "channel": ch.name, "seq": m.seq, "id": mid}
            expected.update(ts=m.ts, dup=True)
            assert reply == expected, (op, reply, expected)
            event("send dup" + (" of a deleted message" if m.deleted else ""))
            return
        expected = {"t": "ok", "rid": op.rid, "channel": ch.name, "seq": ch.head + 1}
        expected.update(id=reply.get("id"), ts=reply.get("ts"))
        expected["dup"] = reply.get("dup") if maybe_dup else False
        assert reply == expected, (op, reply, expected)
        assert isinstance(reply["id"], str) and 1 <= len(reply["id"]) <= 64, reply
        self.apply_message(op, reply["seq"], reply["id"], reply["ts"])
        event("send stored" + (" (the in-flight original)" if reply["dup"] else ""))

    def ask(self, dev: int, t: str, **fields: Any) -> tuple[int, Frame]:
        note(f"device {dev}: {t} {fields}")
        return self.devices[dev].conn.ask(t, **fields)

    def draw_dev(self, data: st.DataObject) -> int:
        """A device; half the time the one of the last step (a user's session)."""
        dev = data.draw(st.sampled_from([*["last"] * 5, *range(len(DEVICES))]), label="device")
        self.last_dev = self.last_dev if dev == "last" else dev
        return self.last_dev

    def draw_key(self, data: st.DataObject, dev: int) -> str:
        """A channel: the one of the last step if the device may use it, one it may use,
        or any (a third of the time; most users lack one of the five)."""
        mode = data.draw(st.sampled_from(["last", "last", "allowed", "any"]), label="channel")
        i = data.draw(st.integers(0, 255), label="index")
        allowed = sorted(ACCESS[self.devices[dev].short])
        if mode == "any":
            self.last_key = KEYS[i % len(KEYS)]
        elif mode == "allowed" or self.last_key not in allowed:
            self.last_key = allowed[i % len(allowed)]
        return self.last_key

    def run_ops(self, ops: list[Op]) -> None:
        """Pipeline the writes (all on one connection: processed in order), then check
        each reply in that order."""
        for op in ops:
            note(f"device {op.dev}: {op.frame}")
            op.rid = self.devices[op.dev].conn.send(op.frame)
        for op in ops:
            assert op.rid is not None
            self.check_write(op, self.devices[op.dev].conn.reply(op.rid))

    # ---- drawing requests

    def draw_send(self, data: st.DataObject, dev: int, key: str | None = None) -> Op:
        n = next(self.counter)
        if key is None:
            key = self.draw_key(data, dev)
        fresh = f"c{n}"
        cid = data.draw(pick([fresh, *self.cids]), label="cid")
        if cid == fresh:
            self.cids.append(cid)
        text = f"m{n}:{data.draw(texts, label='text')}"
        meta = data.draw(metas, label="meta")
        frame: Frame = {"t": "send", "channel": self.channels[key].name, "cid": cid, "text": text}
        if meta is not None:
            frame["meta"] = meta
        return Op(dev, "send", key, frame, cid=cid, text=text, meta=meta)

    def draw_change(self, data: st.DataObject, dev: int, kind: str) -> Op:
        """The target: one of the user's live messages (half the time, if any), any
        message (another user's, deleted), any id in any channel, or a junk id."""
        user = self.devices[dev].user
        everything = [(k, mid) for k, ch in self.channels.items() for mid in ch.messages]
        own = [
            (k, mid)
            for k, ch in self.channels.items()
            for mid, m in ch.messages.items()
            if m.sender == user and not m.deleted
        ]
        # Always the same three draws, whatever the lists hold (see ``pick``).
        mode = data.draw(st.sampled_from(["own", "own", "any", "cross", "junk"]), label="target")
        key = self.draw_key(data, dev)
        i = data.draw(st.integers(0, 255), label="index")
        pool = own if mode == "own" else everything
        if mode in ("own", "any") and pool:
            key, target = pool[i % len(pool)]
        else:
            ids = self.ids if mode == "cross" and self.ids else JUNK_IDS
            target = ids[i % len(ids)]
        ch = self.channels[key]
        frame: Frame = {"t": kind, "channel": ch.name, "id": target}
        text = None
        if kind == "edit":
            text = frame["text"] = f"e{next(self.counter)}:{data.draw(texts, label='text')}"
        return Op(dev, kind, key, frame, text=text, target=target)

    # ---- rules: writes

    @rule(data=st.data(), n=st.integers(1, 3))
    def send(self, data: st.DataObject, n: int) -> None:
        """1 to 3 sends pipelined on one connection (group commit, retries in flight)."""
        dev = self.draw_dev(data)
        self.run_ops([self.draw_send(data, dev) for _ in range(n)])

    @precondition(lambda self: any(d.joined for d in self.devices))
    @rule(data=st.data())
    def send_joined(self, data: st.DataObject) -> None:
        """A send to a channel the device has joined (its event is pushed back)."""
        devs = [i for i, d in enumerate(self.devices) if d.joined]
        dev = self.last_dev = data.draw(pick(devs), label="device")
        key = self.last_key = data.draw(pick(sorted(self.devices[dev].joined)), label="channel")
        self.run_ops([self.draw_send(data, dev, key)])

    @rule(data=st.data(), kind=st.sampled_from(["edit", "delete"]))
    def change(self, data: st.DataObject, kind: str) -> None:
        self.run_ops([self.draw_change(data, self.draw_dev(data), kind)])

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        dev = self.draw_dev(data)
        key = self.draw_key(data, dev)
        d, ch = self.devices[dev], self.channels[key]
        cursor = ch.cursors.get(d.user, 0)
        seq = data.draw(
            st.sampled_from([0, ch.head, ch.head + 1, max(cursor - 1, 0), INT64_MAX])
            | upto(ch.head + 2),
            label="seq",
        )
        rid, reply = self.ask(dev, "read", channel=ch.name, seq=seq)
        if not self.allowed(d, key):
            self.expect_error(reply, rid, "forbidden")
            return
        new = max(cursor, min(seq, ch.head))
        assert reply == {"t": "ok", "rid": rid, "channel": ch.name, "seq": new}, (reply, new)
        if new > cursor:
            ch.cursors[d.user] = new
            self.publish(key, {"t": "read", "channel": ch.name, "user": d.user, "seq": new})
            event("read moved")
        elif seq < cursor:
            event("read behind the cursor")

    # ---- rules: subscriptions and reads

    @rule(data=st.data(), join=st.booleans())
    def subscribe(self, data: st.DataObject, join: bool) -> None:
        """``join`` or ``leave``; a leave is ok allowed or not, joined or not."""
        dev = self.draw_dev(data)
        key = self.draw_key(data, dev)
        if join:
            self.join_channel(dev, key)
            return
        rid, reply = self.ask(dev, "leave", channel=self.channels[key].name)
        assert reply == {"t": "ok", "rid": rid, "channel": self.channels[key].name}, reply
        self.devices[dev].joined.discard(key)

    def join_channel(self, dev: int, key: str) -> None:
        d, ch = self.devices[dev], self.channels[key]
        rid, reply = self.ask(dev, "join", channel=ch.name)
        if not self.allowed(d, key):
            self.expect_error(reply, rid, "forbidden")
            return
        if ch.epoch == 0 and ch.head > 0:
            ch.epoch = reply.get("epoch", 0)
            assert ch.epoch != 0, reply
        expected = {"t": "ok", "rid": rid, "channel": ch.name, "head": ch.head}
        expected.update(read=ch.cursors.get(d.user, 0), epoch=ch.epoch, horizon=0)
        assert reply == expected, (reply, expected)
        d.joined.add(key)

    @rule(data=st.data(), history=st.booleans())
    def fetch(self, data: st.DataObject, history: bool) -> None:
        """``sync`` or ``history``."""
        dev = self.draw_dev(data)
        key = self.draw_key(data, dev)
        if history:
            self.history(dev, key, data)
        else:
            self.sync(dev, key, data)

    def sync(self, dev: int, key: str, data: st.DataObject) -> None:
        d, ch = self.devices[dev], self.channels[key]
        since = data.draw(
            st.sampled_from([0, ch.head, ch.head + 1, INT64_MAX]) | upto(ch.head + 2),
            label="since",
        )
        limit = data.draw(st.none() | st.integers(1, 5), label="limit")
        epoch = data.draw(st.sampled_from([None, ch.epoch, ch.epoch + 1, 0]), label="epoch")
        fields: Frame = {"channel": ch.name, "since": since}
        if limit is not None:
            fields["limit"] = limit
        if epoch is not None:
            fields["epoch"] = epoch
        rid, reply = self.ask(dev, "sync", **fields)
        if not self.allowed(d, key):
            self.expect_error(reply, rid, "forbidden")
            return
        base = {"rid": rid, "channel": ch.name, "head": ch.head, "epoch": ch.epoch}
        if epoch is not None and since > 0 and epoch != ch.epoch:
            expected = {"t": "resync", **base, "reason": "epoch"}
        elif since > ch.head:
            expected = {"t": "resync", **base, "reason": "ahead"}
        else:
            events = ch.sync_events(since, 500 if limit is None else limit)
            more = since + len(events) < ch.head
            expected = {"t": "ok", **base, "events": events, "more": more}
        assert reply == expected, (fields, reply, expected)
        event(f"sync {expected.get('reason', 'ok')}")

    def history(self, dev: int, key: str, data: st.DataObject) -> None:
        d, ch = self.devices[dev], self.channels[key]
        before = data.draw(
            st.none() | upto(ch.head + 1).map(lambda b: b + 1) | st.just(INT64_MAX), label="before"
        )
        limit = data.draw(st.none() | st.integers(1, 4), label="limit")
        fields: Frame = {"channel": ch.name}
        if before is not None:
            fields["before"] = before
        if limit is not None:
            fields["limit"] = limit
        rid, reply = self.ask(dev, "history", **fields)
        if not self.allowed(d, key):
            self.expect_error(reply, rid, "forbidden")
            return
        messages, more = ch.history(before, 50 if limit is None else limit)
        expected = {"t": "ok", "rid": rid, "channel": ch.name, "messages": messages, "more": more}
        assert reply == expected, (fields, reply, expected)
        event("history " + ("more" if more else "to the start"))

    @rule(data=st.data(), keys=st.lists(st.sampled_from(KEYS), unique=True, max_size=3))
    def unread(self, data: st.DataObject, keys: list[str]) -> None:
        """One refused channel fails the whole request."""
        dev = self.draw_dev(data)
        d = self.devices[dev]
        rid, reply = self.ask(dev, "unread", channels=[self.channels[k].name for k in keys])
        if not all(self.allowed(d, k) for k in keys):
            self.expect_error(reply, rid, "forbidden")
            return
        counts = {self.channels[k].name: self.channels[k].unread(d.user) for k in keys}
        expected = {"t": "ok", "rid": rid, "unread": counts, "capped": []}
        assert reply == expected, (reply, expected)

    # ---- rules: faults

    @rule(data=st.data(), in_flight=st.booleans(), abortive=st.booleans(), rejoin=st.booleans())
    def reconnect(self, data: st.DataObject, in_flight: bool, abortive: bool, rejoin: bool) -> None:
        """Close a device's connection (FIN or reset), optionally right after a send it
        never sees answered; connect again, resend that send with the same cid (the model
        cannot know whether the original was stored: either answer is right, at the next
        seq), and rejoin the channels the old connection had joined, if ``rejoin``."""
        dev = self.draw_dev(data)
        d = self.devices[dev]
        op = self.draw_send(data, dev) if in_flight else None
        if op is not None:
            note(f"device {dev}: {op.frame}, then close")
            d.conn.send(op.frame)
        d.conn.close(abortive)
        d.conn = self.connect(d.short)
        joined, d.joined, d.expected = d.joined, set(), []
        if op is not None:  # before any join: no push of the original can be missed
            note(f"device {dev}: the same again")
            op.rid = d.conn.send(op.frame)
            self.check_write(op, d.conn.reply(op.rid), maybe_dup=True)
        if rejoin:
            for key in sorted(joined):
                self.join_channel(dev, key)

    @precondition(lambda self: self.kills_left > 0)
    @rule(data=st.data())
    def kill_and_restart(self, data: st.DataObject) -> None:
        """SIGKILL the server with 0 to 5 writes in flight on any connections, after
        ``acked`` of them were answered; restart it on the same data directory."""
        assert self.server is not None
        self.kills_left -= 1
        ops: list[Op] = []
        for _ in range(data.draw(st.integers(0, 5), label="writes in flight")):
            dev = self.draw_dev(data)
            kind = data.draw(st.sampled_from(["send", "send", "edit", "delete"]), label="kind")
            ops.append(
                self.draw_send(data, dev) if kind == "send" else self.draw_change(data, dev, kind)
            )
        acked = data.draw(st.integers(0, len(ops)), label="acked")
        heads = {key: ch.head for key, ch in self.channels.items()}
        for op in ops:
            note(f"in flight at the kill, device {op.dev}: {op.frame}")
            op.rid = self.devices[op.dev].conn.send(op.frame)
        self.wait_for_replies(ops, acked)
        self.server.kill()
        for d in self.devices:
            d.conn.drain()
            d.conn.close()
        anyio.run(self.server.restart)
        self.connect_checkers()
        matched = self.resolve(ops, heads)
        self.check_pushes_before_kill()
        self.check_replies_before_kill(ops, matched)
        for i in range(len(self.devices)):
            seqs: dict[str, list[int]] = {}
            for j, op in enumerate(ops):
                if op.dev == i and j in matched:
                    seqs.setdefault(op.key, []).append(matched[j])
            for key, s in seqs.items():
                assert s == sorted(s), f"device {i}: writes to {key} committed out of order {s}"
        # Reconnect every device, rejoin what it had joined, resend every in-flight send.
        for i, d in enumerate(self.devices):
            d.conn = self.connect(d.short)
            joined, d.joined, d.expected = d.joined, set(), []
            for key in sorted(joined):
                self.join_channel(i, key)
        for op in ops:
            if op.kind == "send":
                op.rid = self.devices[op.dev].conn.send(op.frame)
                self.check_write(op, self.devices[op.dev].conn.reply(op.rid))
        event(f"kill: {len(matched)} of {len(ops)} writes in flight stored")

    def wait_for_replies(self, ops: list[Op], wanted: int) -> None:
        deadline = time.monotonic() + IO_TIMEOUT_S
        while True:
            waiting: dict[socket.socket, Conn] = {}
            for op in ops:
                conn = self.devices[op.dev].conn
                if op.rid not in conn.replies:
                    waiting[conn.sock] = conn
            if sum(op.rid in self.devices[op.dev].conn.replies for op in ops) >= wanted:
                return
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"fewer than {wanted} replies to the writes in flight"
            readable, _, _ = select.select(list(waiting), [], [], remaining)
            for sock in readable:
                waiting[sock].fill()

    def resolve(self, ops: list[Op], heads: dict[str, int]) -> dict[int, int]:
        """Read each channel after the restart; every entry past the pre-kill head must be
        one in-flight write, valid at its seq: apply it to the model there. Returns the
        index of each stored write -> its seq."""
        matched: dict[int, int] = {}
        for key, ch in self.channels.items():
            page = self.checker(key).request("sync", channel=ch.name, since=0, limit=5000)
            assert page["t"] == "ok" and not page["more"], page
            events = page["events"]
            assert [e["seq"] for e in events] == list(range(1, page["head"] + 1)), "gap"
            assert page["head"] >= heads[key], f"{ch.name}: acked entries lost"
            for e in events[heads[key] :]:
                j = self.match(key, e, ops, matched)
                op = ops[j]
                if op.kind == "send":
                    assert op.cid is not None
                    assert self.allowed(self.devices[op.dev], key), f"stored in {key}: {e}"
                    assert (e["sender"], op.cid) not in ch.dedup, f"cid {op.cid} stored twice"
                    assert e.get("meta") == (op.meta or None), (e, op)
                    self.apply_message(op, e["seq"], e["id"], e["ts"])
                else:
                    assert self.change_error(op) is None, f"{e} stored, but invalid there"
                    self.apply_change(op, e["seq"], e["ts"])
                matched[j] = e["seq"]
        return matched

    def match(self, key: str, e: Frame, ops: list[Op], matched: dict[int, int]) -> int:
        """The in-flight write that made log entry ``e``."""
        for j, op in enumerate(ops):
            if j in matched or op.key != key or self.devices[op.dev].user != e["sender"]:
                continue
            if e["kind"] == "message" and op.kind == "send" and op.text == e.get("text"):
                return j
            if e["kind"] == op.kind and op.target == e["id"]:
                # an edit is known by its text, unless a later delete redacted it
                if op.kind == "delete" or op.text == e.get("text") or e.get("deleted"):
                    return j
        pytest.fail(f"{key}: entry {e} was never sent (or stored twice)")

    def check_pushes_before_kill(self) -> None:
        """What each connection got before the kill is, per channel, a prefix of what
        the resolved log says it was due."""
        for i, d in enumerate(self.devices):
            got: dict[str, list[Frame]] = {}
            due: dict[str, list[Frame]] = {}
            for frame in d.conn.pushes:
                if frame["t"] in PUSHES:
                    got.setdefault(frame.get("channel", "?"), []).append(frame)
            for frame in d.expected:
                due.setdefault(frame["channel"], []).append(frame)
            for name, frames in got.items():
                assert frames == due.get(name, [])[: len(frames)], (i, name, frames, due)
            d.conn.pushes.clear()
            d.expected.clear()

    def check_replies_before_kill(self, ops: list[Op], matched: dict[int, int]) -> None:
        for j, op in enumerate(ops):
            d = self.devices[op.dev]
            reply = d.conn.replies.pop(op.rid or 0, None)
            if reply is None:
                continue
            ch = self.channels[op.key]
            if reply["t"] == "error":
                assert j not in matched, (op, reply)
                if not self.allowed(d, op.key):
                    assert reply["code"] == "forbidden", reply
                else:
                    assert op.kind != "send", f"a send was refused: {reply}"
                    assert reply["code"] in ("forbidden", "not_found"), reply
                continue
            assert reply["t"] == "ok" and reply["channel"] == ch.name, reply
            if op.kind == "send" and reply["dup"]:
                assert op.cid is not None
                mid = ch.dedup.get((d.user, op.cid))
                assert mid is not None, f"{op.cid}: acked dup, not stored"
                m = ch.messages[mid]
                assert (reply["seq"], reply["id"], reply["ts"]) == (m.seq, mid, m.ts), reply
                continue
            assert j in matched, f"acked write lost in the kill: {op.frame} -> {reply}"
            e = ch.log[matched[j] - 1]
            assert (reply["seq"], reply["ts"]) == (e.seq, e.ts), (reply, e)
            assert reply["id"] == (e.id if op.kind == "send" else op.target), (reply, e)
            event("kill: an acked write in flight")

    # ---- the invariant

    @invariant()
    def server_agrees(self) -> None:
        # Pushes: a ping's pong comes after every push queued before it.
        for i, d in enumerate(self.devices):
            pong = d.conn.request("ping")
            assert pong["t"] == "pong", pong
            got = [f for f in d.conn.pushes if f["t"] in PUSHES]
            assert got == d.expected, (f"device {i} ({d.short}) pushes", got, d.expected)
            d.conn.pushes.clear()
            d.expected.clear()
            assert not d.conn.replies, d.conn.replies
        for key, ch in self.channels.items():
            conn = self.checker(key)
            rid, page = conn.ask("sync", channel=ch.name, since=0, limit=5000)
            assert page["t"] == "ok" and not page["more"], page
            if ch.head == 0:
                assert page["epoch"] == 0, page
            elif ch.epoch == 0:
                ch.epoch = page["epoch"]
                assert ch.epoch != 0, page
            assert [e["seq"] for e in page["events"]] == list(range(1, page["head"] + 1)), "gap"
            expected = {"t": "ok", "rid": rid, "channel": ch.name}
            expected.update(events=ch.sync_events(0, ch.head), more=False, head=ch.head)
            expected["epoch"] = ch.epoch
            assert page == expected, (ch.name, page, expected)
            rid, hist = conn.ask("history", channel=ch.name, limit=500)
            messages, _ = ch.history(None, 500)
            assert hist == {
                "t": "ok",
                "rid": rid,
                "channel": ch.name,
                "messages": messages,
                "more": False,
            }, (ch.name, hist, messages)
        for name, conn in self.checkers.items():  # never joined: no pushes (rule 9)
            assert not [f for f in conn.pushes if f["t"] in PUSHES], (name, conn.pushes)
            conn.pushes.clear()
        for short in USERS:
            d = next(d for d in self.devices if d.short == short)
            keys = sorted(ACCESS[short])
            rid, reply = d.conn.ask("unread", channels=[self.channels[k].name for k in keys])
            counts = {self.channels[k].name: self.channels[k].unread(d.user) for k in keys}
            assert reply == {"t": "ok", "rid": rid, "unread": counts, "capped": []}, (
                short,
                reply,
                counts,
            )


SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    print_blob=True,
)


@pytest.mark.slow
def test_server_against_model(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    anyio.run(server.start)
    ServerMachine.server = server
    try:
        run_state_machine_as_test(ServerMachine, settings=SETTINGS)
    finally:
        ServerMachine.server = None
        server.kill()
