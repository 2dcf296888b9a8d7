"""The example frames in PROTOCOL.md, checked against the code.

Every ``### Example: <name>`` section of PROTOCOL.md holds a ```json block (the frame) and a
```hex block (its bytes on the wire, ``hexdump -C`` style, length prefix included). For each
one: ``tsmsg.encode(frame)`` must give exactly those bytes, and ``FrameDecoder`` must give the
frame back, keys in the same order. Then a real :class:`Session` on an ``LmdbStore`` (fixed
clock, fixed session id) is driven through the documented session and must produce the
documented server frames: same keys, same order, same values and the same bytes (except an
error's ``message``, which is prose). Finally the error-code table must list exactly the
codes in ``tsmsg.protocol.errors`` with the right class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tsmsg import FrameDecoder, encode
from tsmsg.auth import TokenIssuer, TokenVerifier
from tsmsg.protocol import errors as E
from tsmsg.protocol.limits import Limits
from tsmsg.protocol.session import Publish, Reply, Session, Submit, Subscribe
from tsmsg.store import LmdbStore, StoreConfig

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "PROTOCOL.md"
SECRET = b"protocol-examples-secret-protocol-examples"  # >= 32 bytes for HS256
WELCOME_TS = 1_767_225_600_000  # the examples' clock: 2026-01-01T00:00:00Z
STORE_TS = WELCOME_TS + 250  # the store's fixed clock: the ts of every committed entry
SESSION_ID = "1-5f3a9c2e"
WAIT_S = 10.0  # a store write commits well within this
# The examples the brief for PROTOCOL.md requires, at the least.
REQUIRED = {"hello", "welcome", "send", "ok (send)", "event", "ok (sync)", "resync (reply)"}

HEADING_RE = re.compile(r"^### Example: (.+)$", re.MULTILINE)
FENCE_RE = re.compile(r"^```(json|hex)\n(.*?)\n```$", re.MULTILINE | re.DOTALL)
HEX_LINE_RE = re.compile(r"^(?P<offset>[0-9a-f]{8})  (?P<bytes>[0-9a-f ]+?)\s*\|.*\|$")


def parse_hex(dump: str) -> bytes:
    """The bytes of a ``hexdump -C`` style dump; offsets must follow on from each other."""
    out = bytearray()
    for line in dump.splitlines():
        m = HEX_LINE_RE.match(line)
        assert m is not None, f"not a hex dump line: {line!r}"
        assert int(m["offset"], 16) == len(out), f"offset out of step: {line!r}"
        out += bytes.fromhex(m["bytes"])
    return bytes(out)


def load_examples() -> dict[str, tuple[dict[str, Any], bytes]]:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    examples: dict[str, tuple[dict[str, Any], bytes]] = {}
    headings = list(HEADING_RE.finditer(text))
    for i, heading in enumerate(headings):
        name = heading[1].strip()
        end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
        # The section runs to the next heading of any level.
        section = re.split(r"^#", text[heading.end() : end], maxsplit=1, flags=re.MULTILINE)[0]
        blocks = FENCE_RE.findall(section)
        assert [kind for kind, _ in blocks] == ["json", "hex"], f"example {name!r}: {blocks}"
        assert name not in examples, f"two examples named {name!r}"
        examples[name] = (json.loads(blocks[0][1]), parse_hex(blocks[1][1]))
    return examples


EXAMPLES = load_examples()


def frame(name: str) -> dict[str, Any]:
    return EXAMPLES[name][0]


def ordered(value: Any) -> Any:
    """``value`` with every dict turned into its list of items: comparing two results
    compares key order too (plain dict equality ignores it)."""
    if isinstance(value, dict):
        return [(k, ordered(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [ordered(v) for v in value]
    return value


def assert_documented(actual: dict[str, Any], name: str) -> None:
    """``actual`` is the documented frame ``name``: the same keys in the same order, the same
    values, and the same bytes on the wire (so also the same types: 200.0 is not 200)."""
    doc_frame, wire = EXAMPLES[name]
    assert ordered(actual) == ordered(doc_frame)
    assert encode(actual) == wire


def without_message(f: dict[str, Any]) -> dict[str, Any]:
    """An error frame minus its prose ``message`` (which must still be a non-empty str)."""
    assert isinstance(f.get("message"), str) and f["message"]
    return {k: v for k, v in f.items() if k != "message"}


# ------------------------------------------------------------------- the document


def test_the_required_examples_are_documented() -> None:
    assert REQUIRED <= EXAMPLES.keys()
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_bytes_are_the_encoding_of_the_frame(name: str) -> None:
    doc_frame, wire = EXAMPLES[name]
    assert wire[:4] == (len(wire) - 4).to_bytes(4, "big"), "length prefix"
    assert encode(doc_frame) == wire


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_bytes_decode_to_the_frame(name: str) -> None:
    doc_frame, wire = EXAMPLES[name]
    decoded = FrameDecoder().feed(wire)
    assert decoded == [doc_frame]
    assert ordered(decoded[0]) == ordered(doc_frame)
    # Split anywhere, the stream decodes the same (a client reads TCP in arbitrary chunks).
    decoder = FrameDecoder()
    frames = [f for i in range(len(wire)) for f in decoder.feed(wire[i : i + 1])]
    assert frames == [doc_frame]


def test_error_code_table_matches_errors_py() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text.split("## 8. Error codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+?) \|", section, re.MULTILINE)
    documented = {code: cls.strip() for code, cls in rows}
    codes = {v for k, v in vars(E).items() if k.isupper() and isinstance(v, str) and v.islower()}
    assert documented.keys() == codes
    for code, cls in documented.items():
        if code in E.CONNECTION_ERRORS:
            assert cls == "connection", code
        elif code == E.SHUTTING_DOWN:
            assert "bye" in cls
        else:
            assert cls == "request", code


# ------------------------------------------------------------------- the real session


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbStore]:
    s = LmdbStore(tmp_path / "db", StoreConfig(durability="async"), clock=lambda: STORE_TS)
    try:
        yield s
    finally:
        s.close()


def hello_session(store: LmdbStore, limits: Limits | None = None) -> tuple[Session, list[Any]]:
    """A session for alice (``room-*``, chat:read + chat:send) after the documented hello,
    with a real token in place of the placeholder."""
    token = TokenIssuer(SECRET).issue("alice", ["room-*"], now=WELCOME_TS // 1000)
    session = Session(store, TokenVerifier(SECRET), limits or Limits(), SESSION_ID, WELCOME_TS)
    actions = session.receive_frame({**frame("hello"), "token": token}, WELCOME_TS)
    return session, actions


def reply(actions: list[Any]) -> dict[str, Any]:
    """The frame of the one Reply among ``actions``."""
    replies = [a for a in actions if isinstance(a, Reply)]
    assert len(replies) == 1, actions
    result: dict[str, Any] = replies[0].frame
    return result


def commit(session: Session, store: LmdbStore, actions: list[Any]) -> list[Any]:
    """Run the session's one submitted write through the store, as the server does."""
    [submit] = actions
    assert isinstance(submit, Submit)
    store.write(submit.op, timeout=WAIT_S)
    return session.write_done(submit.op)


def test_session_produces_the_documented_frames(store: LmdbStore) -> None:
    session, actions = hello_session(store)
    assert_documented(reply(actions), "welcome")

    actions = session.receive_frame(frame("join"), WELCOME_TS)
    assert actions[0] == Subscribe("room-1")
    assert_documented(reply(actions), "ok (join)")

    actions = commit(session, store, session.receive_frame(frame("send"), WELCOME_TS))
    assert_documented(reply(actions), "ok (send)")
    # The ok is queued before the event (PROTOCOL.md section 9, rule 6).
    assert [type(a) for a in actions] == [Reply, Publish]
    publish = actions[1]
    assert publish.channel == "room-1" and publish.skip_user is None
    assert_documented(publish.frame, "event")

    forbidden = {"t": "send", "rid": 4, "channel": "general", "cid": "x", "text": "hi"}
    error = reply(session.receive_frame(forbidden, WELCOME_TS))
    assert ordered(without_message(error)) == ordered(without_message(frame("error (forbidden)")))

    actions = session.receive_frame(frame("sync"), WELCOME_TS)
    assert_documented(reply(actions), "ok (sync)")

    too_new = {"t": "sync", "rid": 6, "channel": "room-1", "since": 7}
    actions = session.receive_frame(too_new, WELCOME_TS)
    assert_documented(reply(actions), "resync (reply)")
    # Without a rid the reply has none either; its reason still tells it from the cut push.
    without_rid = {k: v for k, v in too_new.items() if k != "rid"}
    expected = {k: v for k, v in frame("resync (reply)").items() if k != "rid"}
    assert ordered(reply(session.receive_frame(without_rid, WELCOME_TS))) == ordered(expected)

    actions = session.receive_frame(frame("sync (epoch)"), WELCOME_TS)
    assert_documented(reply(actions), "resync (epoch)")
    # The same position without `epoch` looks valid: only the epoch reveals the reset.
    no_epoch = {k: v for k, v in frame("sync (epoch)").items() if k != "epoch"}
    ok = reply(session.receive_frame(no_epoch, WELCOME_TS))
    assert ok["t"] == "ok" and ok["events"] == [] and ok["more"] is False

    push = session.cut_stream("room-1", store.channel("room-1"))
    assert_documented(push, "resync (push)")

    assert_documented(reply(session.receive_frame(frame("ping"), WELCOME_TS)), "pong")
    # A nil rid is no rid (PROTOCOL.md section 2).
    pong = reply(session.receive_frame({"t": "ping", "rid": None}, WELCOME_TS))
    assert ordered(pong) == ordered({"t": "pong", "ts": WELCOME_TS})


def test_rate_limited_error_is_the_documented_frame(store: LmdbStore) -> None:
    # A bucket of one frame: the second ping in the same millisecond finds it empty.
    session, _ = hello_session(store, replace(Limits(), frame_burst=1))
    assert_documented(reply(session.receive_frame(frame("ping"), WELCOME_TS)), "pong")
    error = reply(session.receive_frame({"t": "ping", "rid": 9}, WELCOME_TS))
    doc = frame("error (rate_limited)")
    assert ordered(without_message(error)) == ordered(without_message(doc))
