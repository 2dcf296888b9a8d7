"""Crash loops over TCP, Jepsen's way: writers with acks, SIGKILL, restart, check.

Each round starts a ``tsmsg serve`` subprocess (``fsync`` durability) on the same data
directory. Several writers, each its own user on its own connection, pipeline requests
(up to ``WINDOW`` in flight): sends to several channels, edits and deletes of their own
messages. The server is SIGKILLed at a random moment after the round's first ack, and
restarted for the next round. What each writer put on the wire and what the server
acknowledged is recorded before and after each frame, so the ledger knows every write
that may have been stored (sent) and every write that must have been (acked).

At the start of each round (and once more after the last), an independent checker reads
every channel from seq 0 with ``sync`` over TCP from the restarted server, replays the log
and checks it against the ledger:

- seqs are dense, 1..head; no message id and no cid appears twice (in any channel);
- every acked message is at its acked seq with its acked id; every stored message was
  sent (an unacked one was in flight at a kill), by the user whose cid it carries;
- every acked edit or delete is the entry at its acked seq, naming its target; every
  stored edit or delete was sent; nothing is edited or deleted after its delete;
- each message entry holds the replayed latest state (the last edit's text and ts, or a
  tombstone without text), a deleted message's edits lost their text, and ``history``
  shows the same state.

Then the writers resend every send they had in flight at the kill, with the same cid
(stored once: a dup with the stored seq, or a first store), and retry a few acked cids
(dups with the acked seq and id), before writing new ones.

Rounds: 10 by default, 50 with TSMSG_LONG=1 (``make test-long``); TSMSG_CRASH_SEED
repeats a run's kill delays and choices (not its timing). A fresh data directory starts
every ``ROUNDS_PER_DIR`` rounds so that the checks stay linear in the number of rounds.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import WireClient, mint
from server_proc import server_process

LONG = os.environ.get("TSMSG_LONG") == "1"
ROUNDS = 50 if LONG else 10
ROUNDS_PER_DIR = 25
CHANNELS = ("room-a", "room-b", "room-c")
WRITERS = 3
WINDOW = 8  # requests a writer keeps in flight
KILL_DELAY_S = (0.02, 0.5)  # after the round's first ack
FIRST_ACK_TIMEOUT_S = 15.0
RETRIES_PER_WRITER = 3  # acked cids resent at the start of a round
SYNC_PAGE = 5000
HISTORY_PAGE = 200
CONNECTION_LOST = (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class Ledger:
    """Every write put on the wire and every ack, over all rounds of a data directory."""

    sent: dict[str, tuple[str, str]] = field(default_factory=dict)  # cid -> (channel, user)
    acked: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # cid -> ch, seq, id
    edits_sent: dict[str, tuple[str, str]] = field(default_factory=dict)  # text -> (ch, target)
    edits_acked: dict[str, int] = field(default_factory=dict)  # text -> seq
    deletes_sent: set[tuple[str, str]] = field(default_factory=set)  # (ch, target)
    deletes_acked: dict[tuple[str, str], int] = field(default_factory=dict)  # -> seq
    cids: dict[tuple[str, str], str] = field(default_factory=dict)  # (ch, message id) -> cid
    in_flight: dict[str, list[str]] = field(default_factory=dict)  # user -> unacked cids
    dups: int = 0  # resends answered dup
    resent: int = 0  # sends in flight at a kill, resent after the restart

    def in_flight_of(self, user: str) -> list[str]:
        return [cid for cid in self.in_flight.get(user, []) if cid not in self.acked]


def sender_of(cid: str) -> str:
    return cid.split(".")[0]


def message_text(cid: str) -> str:
    return f"{cid}|message"


# ---------------------------------------------------------------------- the checker


async def read_channel(client: WireClient, channel: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    since = 0
    for _ in range(10_000):  # bounded: each page moves `since` forward
        page = await client.request("sync", channel=channel, since=since, limit=SYNC_PAGE)
        assert page["t"] == "ok", page
        for event in page["events"]:
            entries.append({k: v for k, v in event.items() if k not in ("t", "channel")})
        if not page["more"]:
            assert [e["seq"] for e in entries] == list(range(1, page["head"] + 1)), "gap"
            return entries
        since = entries[-1]["seq"]
    pytest.fail(f"{channel}: sync did not reach the head")


async def read_history(client: WireClient, channel: str, count: int) -> list[dict[str, Any]]:
    pages: list[list[dict[str, Any]]] = []
    before = None
    for _ in range(count // HISTORY_PAGE + 2):
        args = (
            {"limit": HISTORY_PAGE} if before is None else {"limit": HISTORY_PAGE, "before": before}
        )
        page = await client.request("history", channel=channel, **args)
        assert page["t"] == "ok", page
        pages.append(page["messages"])
        if not page["more"]:
            return [m for p in reversed(pages) for m in p]
        before = page["messages"][0]["seq"]
    pytest.fail(f"{channel}: history did not end after {count} messages")


def check_channel(
    channel: str, log: list[dict[str, Any]], ledger: Ledger, seen_cids: set[str]
) -> dict[str, dict[str, Any]]:
    """Replay one channel's log against the ledger; returns message id -> latest state."""
    state: dict[str, dict[str, Any]] = {}
    by_seq = {e["seq"]: e for e in log}
    for e in log:
        seq, kind, mid = e["seq"], e["kind"], e["id"]
        where = f"{channel} seq {seq}"
        if kind == "message":
            assert mid not in state, f"{where}: message id {mid} twice"
            cid = ledger.cids.get((channel, mid))
            if cid is None:
                # Not acked nor seen by an earlier check: it was in flight at a kill, so it
                # still has its text (only messages known to the ledger are deleted).
                assert not e.get("deleted"), f"{where}: unknown message {mid} is deleted"
                cid = e["text"].split("|")[0]
                ledger.cids[(channel, mid)] = cid
            assert ledger.sent.get(cid) == (channel, e["sender"]), f"{where}: {cid} never sent"
            assert cid not in seen_cids, f"{where}: cid {cid} stored twice"
            seen_cids.add(cid)
            if cid in ledger.acked:
                assert ledger.acked[cid] == (channel, seq, mid), f"{where}: {cid} acked elsewhere"
            state[mid] = {"text": message_text(cid), "sender": e["sender"], "edits": []}
            continue
        target = state.get(mid)
        assert target is not None, f"{where}: {kind} of unknown message {mid}"
        assert not target.get("deleted"), f"{where}: {kind} after the delete of {mid}"
        assert e["sender"] == target["sender"], f"{where}: {kind} by another user"
        if kind == "edit":
            if "text" in e:
                assert ledger.edits_sent.get(e["text"]) == (channel, mid), f"{where}: never sent"
            target["edits"].append(e)
            target["text"], target["edited"] = e.get("text"), e["ts"]
        else:
            assert kind == "delete", e
            assert (channel, mid) in ledger.deletes_sent, f"{where}: delete never sent"
            target["deleted"] = True

    for msg in (e for e in log if e["kind"] == "message"):
        st = state[msg["id"]]
        expected = {k: msg[k] for k in ("seq", "kind", "id", "sender", "ts")}
        if st.get("deleted"):
            expected["deleted"] = True
            for edit in st["edits"]:
                assert "text" not in edit and edit.get("deleted") is True, edit
        else:
            expected["text"] = st["text"]
            if "edited" in st:
                expected["edited"] = st["edited"]
        assert msg == expected, f"{channel}: message entry is not the replayed state"

    def acked_entry(seq: int, what: str) -> dict[str, Any]:
        assert seq in by_seq, f"{channel}: acked {what} at seq {seq} lost (head {len(log)})"
        return by_seq[seq]

    for cid, (ch, seq, mid) in ledger.acked.items():
        if ch == channel:
            e = acked_entry(seq, cid)
            assert e["kind"] == "message" and e["id"] == mid, f"acked {cid}: {e}"
    for text, seq in ledger.edits_acked.items():
        ch, mid = ledger.edits_sent[text]
        if ch == channel:
            e = acked_entry(seq, text)
            assert e["kind"] == "edit" and e["id"] == mid, f"acked edit {text}: {e}"
            assert e.get("text") == text or state[mid].get("deleted"), f"acked {text}: {e}"
    for (ch, mid), seq in ledger.deletes_acked.items():
        if ch == channel:
            e = acked_entry(seq, f"delete of {mid}")
            assert e["kind"] == "delete" and e["id"] == mid, f"acked delete of {mid}: {e}"
    return state


async def check(port: int, ledger: Ledger) -> dict[str, list[tuple[str, str]]]:
    """Check every channel; returns each writer's live (undeleted) messages."""
    client = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
    try:
        welcome = await client.request("hello", v=1, token=mint("checker"))
        assert welcome["t"] == "welcome", welcome
        seen_cids: set[str] = set()
        live: dict[str, list[tuple[str, str]]] = {}
        for channel in CHANNELS:
            log = await read_channel(client, channel)
            state = check_channel(channel, log, ledger, seen_cids)
            messages = [e for e in log if e["kind"] == "message"]
            assert await read_history(client, channel, len(messages)) == messages, channel
            for mid, st in state.items():
                if not st.get("deleted"):
                    live.setdefault(st["sender"], []).append((channel, mid))
        # Every acked cid was found in the log (check_channel found it at its seq).
        assert set(ledger.acked) <= seen_cids
        return live
    finally:
        await client.aclose()


# ---------------------------------------------------------------------- the writers


async def writer(
    port: int,
    user: str,
    tag: str,
    ledger: Ledger,
    live: list[tuple[str, str]],
    rng: random.Random,
    first_ack: trio.Event,
) -> None:
    """Write until the connection is lost (the kill). Records each frame in the ledger
    before sending it, and each ack when it arrives."""
    try:
        client = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
    except CONNECTION_LOST:
        return  # killed before this writer got going
    try:
        welcome = await client.request("hello", v=1, token=mint(user))
    except CONNECTION_LOST:
        await client.aclose()
        return
    assert welcome["t"] == "welcome", welcome
    pending: dict[int, tuple[str, Any]] = {}  # rid -> (kind, key)
    window = trio.Semaphore(WINDOW)
    resends = ledger.in_flight_of(user)
    stored = set(ledger.cids.values())  # found in the log by this round's check
    ledger.resent += len(resends)
    own_acked = [cid for cid, (ch, _, _) in ledger.acked.items() if sender_of(cid) == user]
    retries = rng.sample(own_acked, min(RETRIES_PER_WRITER, len(own_acked)))
    ledger.in_flight[user] = []
    counter = itertools.count()
    deleting: set[str] = set()

    async def receive() -> None:
        while True:
            reply = await client.next(lambda f: f.get("rid") in pending)
            kind, key = pending.pop(reply["rid"])
            assert reply["t"] == "ok", (kind, key, reply)
            if kind == "send":
                channel, seq, mid = reply["channel"], reply["seq"], reply["id"]
                if key in ledger.acked:
                    assert reply["dup"] and ledger.acked[key] == (channel, seq, mid), reply
                else:
                    # A resend is a dup exactly when the check found it stored.
                    assert reply["dup"] == (key in stored), (key, reply)
                    ledger.acked[key] = (channel, seq, mid)
                    ledger.cids[(channel, mid)] = key
                    live.append((channel, mid))
                ledger.dups += reply["dup"]
            elif kind == "edit":
                ledger.edits_acked[key] = reply["seq"]
            else:
                ledger.deletes_acked[key] = reply["seq"]
            first_ack.set()
            window.release()

    async def request(kind: str, key: Any, frame: dict[str, Any]) -> None:
        await window.acquire()
        rid = next(client.rids)
        pending[rid] = (kind, key)
        await client.send({"rid": rid, **frame})

    async def send(cid: str, channel: str) -> None:
        ledger.sent.setdefault(cid, (channel, user))
        if cid not in ledger.acked:
            ledger.in_flight[user].append(cid)  # until acked: resent after a kill
        await request(
            "send", cid, {"t": "send", "channel": channel, "cid": cid, "text": message_text(cid)}
        )

    async def write() -> None:
        for cid in resends + retries:
            await send(cid, ledger.sent[cid][0])
        while True:
            n = next(counter)
            roll = rng.random()
            targets = [t for t in live if t[1] not in deleting]
            if roll < 0.15 and targets:
                channel, mid = rng.choice(targets)
                text = f"{ledger.cids[(channel, mid)]}|edit.{tag}.{n}"
                ledger.edits_sent[text] = (channel, mid)
                await request(
                    "edit", text, {"t": "edit", "channel": channel, "id": mid, "text": text}
                )
            elif roll < 0.22 and targets:
                channel, mid = rng.choice(targets)
                live.remove((channel, mid))
                deleting.add(mid)
                ledger.deletes_sent.add((channel, mid))
                await request(
                    "delete", (channel, mid), {"t": "delete", "channel": channel, "id": mid}
                )
            else:
                channel = rng.choice(CHANNELS)
                await send(f"{user}.{tag}.{n}", channel)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(write)
    except* CONNECTION_LOST:
        pass
    finally:
        await client.aclose()


async def crash_round(
    data_dir: Path, log_path: Path, round_no: int, ledger: Ledger, rng: random.Random
) -> int:
    """Check, write, kill. Returns the number of acks the round got."""
    async with server_process(data_dir, log_path) as server:
        live = await check(server.port, ledger)
        acked_before = len(ledger.acked) + len(ledger.edits_acked) + len(ledger.deletes_acked)
        first_ack = trio.Event()
        async with trio.open_nursery() as nursery:
            for w in range(WRITERS):
                user = f"w{w}"
                wrng = random.Random(rng.randrange(2**32))
                nursery.start_soon(
                    writer,
                    server.port,
                    user,
                    f"r{round_no}",
                    ledger,
                    live.setdefault(user, []),
                    wrng,
                    first_ack,
                )
            with trio.fail_after(FIRST_ACK_TIMEOUT_S):
                await first_ack.wait()
            await trio.sleep(rng.uniform(*KILL_DELAY_S))
            server.kill()
    return len(ledger.acked) + len(ledger.edits_acked) + len(ledger.deletes_acked) - acked_before


async def crash_loop(tmp_path: Path, rounds: int) -> None:
    seed = int(os.environ.get("TSMSG_CRASH_SEED", random.randrange(2**32)))
    print(f"TSMSG_CRASH_SEED={seed}")
    rng = random.Random(seed)
    ledger = Ledger()
    data_dir = tmp_path / "data-0"
    for r in range(rounds):
        if r % ROUNDS_PER_DIR == 0 and r:
            await final_check(data_dir, tmp_path, ledger)
            data_dir = tmp_path / f"data-{r}"
            ledger = Ledger()
        acks = await crash_round(data_dir, tmp_path / f"server-{r}.log", r, ledger, rng)
        assert acks > 0
    await final_check(data_dir, tmp_path, ledger)


async def final_check(data_dir: Path, tmp_path: Path, ledger: Ledger) -> None:
    """Restart once more and check; and make sure the rounds did what they claim to."""
    async with server_process(data_dir, tmp_path / "server-final.log") as server:
        await check(server.port, ledger)
    print(
        f"{data_dir.name}: {len(ledger.acked)} messages, {len(ledger.edits_acked)} edits and "
        f"{len(ledger.deletes_acked)} deletes acked; {ledger.resent} resent after a kill, "
        f"{ledger.dups} dups"
    )
    assert ledger.edits_acked and ledger.deletes_acked and ledger.dups, "too little was tested"


@pytest.mark.slow
async def test_sigkill_loop_loses_no_acked_write(tmp_path: Path) -> None:
    await crash_loop(tmp_path, ROUNDS)
