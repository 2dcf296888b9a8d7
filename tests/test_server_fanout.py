"""Fan-out over real TCP: per-channel ordering under concurrent senders, multi-device
delivery, delivery only to joined connections, edits and deletes in the stream, and the
slow-consumer cut (DESIGN.md invariants 1 and 7)."""

from __future__ import annotations

import contextlib
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import (
    TRANSPORTS,
    Harness,
    WireClient,
    fast_limits,
    make_settings,
    mint,
    running_server,
)
from conftest import sync_all as conftest_sync_all
from tsmsg.server.app import Connection, Server

CHANNEL = "room-1"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """The pushes reach members over TCP and a WebSocket of each subprotocol alike."""
    param: str = request.param
    return param


def is_event(channel: str = CHANNEL) -> Any:
    return lambda f: f.get("t") == "event" and f.get("channel") == channel


async def join(client: WireClient, channel: str = CHANNEL) -> dict[str, Any]:
    reply = await client.request("join", channel=channel)
    assert reply["t"] == "ok", reply
    return reply


async def barrier(client: WireClient) -> None:
    """A ping round trip. Frames for one connection leave its queue in order, so anything
    the server queued for it before the ping has been read into ``client.pending``."""
    pong = await client.request("ping")
    assert pong["t"] == "pong", pong


async def events(client: WireClient, n: int, channel: str = CHANNEL) -> list[dict[str, Any]]:
    return [await client.next(is_event(channel)) for _ in range(n)]


def pending_events(client: WireClient, channel: str = CHANNEL) -> list[dict[str, Any]]:
    return [f for f in client.pending if is_event(channel)(f)]


async def sync_all(client: WireClient, since: int, channel: str = CHANNEL) -> list[dict[str, Any]]:
    return await conftest_sync_all(client, since, channel)


async def send_pipelined(
    client: WireClient, items: list[tuple[str, str]], window: int, channel: str = CHANNEL
) -> dict[str, dict[str, Any]]:
    """Send (cid, text) pairs keeping up to ``window`` requests in flight; the acks by cid."""
    acks: dict[str, dict[str, Any]] = {}
    by_rid: dict[int, str] = {}
    free = trio.Semaphore(window)

    async def receive() -> None:
        while len(acks) < len(items):
            reply = await client.next(lambda f: f.get("rid") in by_rid)
            assert reply["t"] == "ok", reply
            acks[by_rid.pop(reply["rid"])] = reply
            free.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        for cid, text in items:
            await free.acquire()
            rid = next(client.rids)
            by_rid[rid] = cid
            await client.send(
                {"t": "send", "rid": rid, "channel": channel, "cid": cid, "text": text}
            )
    return acks


def assert_dense(log: list[dict[str, Any]], start: int = 1) -> None:
    assert [e["seq"] for e in log] == list(range(start, start + len(log)))


# ---------------------------------------------------------------------- ordering


async def test_concurrent_senders_one_order_for_every_member(harness: Harness) -> None:
    n_senders, per_sender = 8, 50
    total = n_senders * per_sender
    members = [await harness.connect(f"member{i}") for i in range(3)]
    for m in members:
        assert (await join(m))["head"] == 0
    senders = [await harness.connect(f"sender{i}") for i in range(n_senders)]
    acks: dict[str, dict[str, dict[str, Any]]] = {}
    seen: list[list[dict[str, Any]]] = [[] for _ in members]

    async def run_sender(i: int) -> None:
        items = [(f"s{i}-{k}", f"from sender{i} #{k}") for k in range(per_sender)]
        acks[f"sender{i}"] = await send_pipelined(senders[i], items, window=8)

    async def run_member(i: int) -> None:
        seen[i] = await events(members[i], total)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(len(members)):
                nursery.start_soon(run_member, i)
            for i in range(n_senders):
                nursery.start_soon(run_sender, i)

    # Every member saw the same dense sequence, no duplicates or gaps.
    assert_dense(seen[0])
    assert len(seen[0]) == total
    for other in seen[1:]:
        assert other == seen[0]
    by_seq = {e["seq"]: e for e in seen[0]}
    # Each ack matches what the members saw; a connection's sends commit in its order.
    for i in range(n_senders):
        user = f"sender{i}"
        seqs = []
        for k in range(per_sender):
            ack = acks[user][f"s{i}-{k}"]
            assert ack["dup"] is False
            event = by_seq[ack["seq"]]
            assert (event["id"], event["ts"]) == (ack["id"], ack["ts"])
            assert (event["sender"], event["text"], event["kind"]) == (
                user,
                f"from sender{i} #{k}",
                "message",
            )
            seqs.append(ack["seq"])
        assert seqs == sorted(seqs)
    # Sync from 0 replays the same order, and no member got anything extra.
    assert await sync_all(members[0], 0) == seen[0]
    for m in members:
        await barrier(m)
        assert pending_events(m) == []


# ---------------------------------------------------------------------- delivery


async def test_every_device_of_a_user_gets_every_event(harness: Harness) -> None:
    devices = [await harness.connect("carol") for _ in range(3)]
    for d in devices:
        await join(d)
    bob = await harness.connect("bob")
    await join(bob)

    # On the writing connection the ok is queued before its own event (PROTOCOL.md 9.6).
    await devices[0].send(
        {"t": "send", "rid": 99, "channel": CHANNEL, "cid": "c1", "text": "from carol"}
    )
    # (best-effort pushes aside: membership, when each device's join was recorded)
    own = await devices[0].next(lambda f: f.get("t") not in ("membership", "presence"))
    assert (own["t"], own["rid"]) == ("ok", 99), own
    other = await bob.request("send", channel=CHANNEL, cid="b1", text="from bob")
    for client in [*devices, bob]:
        got = await events(client, 2)
        assert [(e["seq"], e["sender"], e["text"]) for e in got] == [
            (own["seq"], "carol", "from carol"),
            (other["seq"], "bob", "from bob"),
        ]

    # Leaving on one device stops its events there only.
    assert (await devices[1].request("leave", channel=CHANNEL))["t"] == "ok"
    third = await bob.request("send", channel=CHANNEL, cid="b2", text="after leave")
    for client in (devices[0], devices[2], bob):
        assert [e["seq"] for e in await events(client, 1)] == [third["seq"]]
    await barrier(devices[1])
    assert pending_events(devices[1]) == []
    # ... and that device still reads the channel by sync.
    assert [e["text"] for e in await sync_all(devices[1], 0)] == [
        "from carol",
        "from bob",
        "after leave",
    ]


async def test_events_only_reach_joined_connections(harness: Harness) -> None:
    member = await harness.connect("bob")
    await join(member)
    outsider = await harness.connect("bob")  # same user, never joined
    elsewhere = await harness.connect("dave")
    await join(elsewhere, "room-2")
    alice = await harness.connect("alice")  # sends without joining
    for k in range(5):
        reply = await alice.request("send", channel=CHANNEL, cid=f"a{k}", text=f"m{k}")
        assert reply["t"] == "ok", reply
    got = await events(member, 5)
    assert_dense(got)
    for client in (outsider, elsewhere, alice):
        await barrier(client)
        assert [f for f in client.pending if f.get("t") == "event"] == []
    assert await sync_all(outsider, 0) == got


async def test_edits_and_deletes_fan_out_in_seq_order(harness: Harness) -> None:
    alice = await harness.connect("alice")
    members = [await harness.connect("bob"), await harness.connect("erin")]
    for m in members:
        await join(m)

    async def send(cid: str, text: str) -> dict[str, Any]:
        reply = await alice.request("send", channel=CHANNEL, cid=cid, text=text)
        assert reply["t"] == "ok", reply
        return reply

    m1 = await send("1", "one")
    m2 = await send("2", "two")
    edit = await alice.request("edit", channel=CHANNEL, id=m1["id"], text="one, edited")
    assert edit["t"] == "ok", edit
    m3 = await send("3", "three")
    delete = await alice.request("delete", channel=CHANNEL, id=m2["id"])
    assert delete["t"] == "ok", delete
    m4 = await send("4", "four")

    expected = [
        (m1["seq"], "message", m1["id"], "one"),
        (m2["seq"], "message", m2["id"], "two"),
        (edit["seq"], "edit", m1["id"], "one, edited"),
        (m3["seq"], "message", m3["id"], "three"),
        (delete["seq"], "delete", m2["id"], None),
        (m4["seq"], "message", m4["id"], "four"),
    ]
    for m in members:
        got = await events(m, len(expected))
        assert_dense(got)
        assert [(e["seq"], e["kind"], e["id"], e.get("text")) for e in got] == expected
        assert all(e["sender"] == "alice" for e in got)
    # Sync replays the entries; per STORAGE.md a message entry holds its current state
    # (an edit rewrote its text, a delete left a tombstone), the change entries stay.
    replay = await sync_all(members[0], 0)
    assert_dense(replay)
    assert [(e["seq"], e["kind"], e["id"], e.get("text")) for e in replay] == [
        (m1["seq"], "message", m1["id"], "one, edited"),
        (m2["seq"], "message", m2["id"], None),
        *expected[2:],
    ]
    assert replay[0]["edited"] == edit["ts"]
    assert replay[1]["deleted"] is True


# ---------------------------------------------------------------------- slow consumer

QUEUE_LIMIT = 64 * 1024
FLOOD_TEXT = 4 * 1024
FLOOD_COUNT = 512  # 2 MiB of text: far more than the queue limit plus the socket buffers
SMALL_RCVBUF = 16 * 1024  # the slow client's kernel buffer, so the server's queue fills soon


async def connect_small_buffer(h: Harness, user: str) -> WireClient:
    """A connection whose receive buffer is set small before connect (so the TCP window
    stays small): the server's outbound queue, not the kernel, absorbs the backlog."""
    client = await h.raw(rcvbuf=SMALL_RCVBUF)
    welcome = await client.request("hello", v=1, token=mint(user))
    assert welcome["t"] == "welcome", welcome
    return client


def connection_of(server: Server, user: str) -> Connection:
    (conn,) = [c for c in server.connections.values() if c.user == user]
    return conn


@pytest.mark.parametrize("resume", ["sync", "join"])
async def test_slow_consumer_is_cut_then_catches_up(
    tmp_path: Path, resume: str, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Rate limits raised: this test is about the outbound queue, not the frame rate.
    limits = fast_limits()
    settings = make_settings(tmp_path / "data", max_queue_bytes=QUEUE_LIMIT, limits=limits)
    async with running_server(settings, transport) as h:
        slow = await connect_small_buffer(h, "slow")
        assert (await join(slow))["head"] == 0
        await slow.expect("membership", channel=CHANNEL)  # its join's, before the flood
        sender = await h.connect("alice")
        conn = connection_of(h.server, "slow")
        texts = {f"f{k}": f"{k:05d}".ljust(FLOOD_TEXT, "x") for k in range(FLOOD_COUNT)}
        # The slow member does not read at all while the flood runs; the sender's acks
        # keep flowing regardless.
        with trio.fail_after(30):
            acks = await send_pipelined(sender, list(texts.items()), window=32)
        assert len(acks) == FLOOD_COUNT
        assert h.server.metrics.value("tsmsg_slow_consumer_resyncs_total") >= 1
        assert slow.pending == []  # it really has not read anything yet
        # The cut came with the queue full (the log says how full; sampling on a timer
        # would miss it: the cut empties the queue in the scheduler tick that filled it).
        cuts = [
            int(m[1])
            for r in caplog.records
            if r.getMessage().startswith(f"slow consumer {conn.peer} ")
            and (m := re.search(r"\((\d+) bytes queued, max_queue_bytes \d+\)$", r.getMessage()))
        ]
        frame_bytes = FLOOD_TEXT + 256  # one event frame: the text plus its envelope
        assert cuts and QUEUE_LIMIT - frame_bytes < max(cuts) <= QUEUE_LIMIT, cuts

        # Now it reads: a dense prefix of live events, then the resync push (no rid).
        log: list[dict[str, Any]] = []
        with trio.fail_after(10):
            while True:
                frame = await slow.next()
                if frame.get("t") == "resync":
                    assert "rid" not in frame, frame
                    assert frame["channel"] == CHANNEL
                    assert 0 < frame["head"] <= FLOOD_COUNT
                    assert "epoch" in frame
                    break
                assert is_event()(frame), frame
                log.append(frame)
        assert_dense(log)
        assert len(log) < FLOOD_COUNT
        # The live stream for the channel stays cut until a sync reaches the head.
        await barrier(slow)
        assert pending_events(slow) == []

        if resume == "join":
            # A re-join also resumes the live stream at once; the gap is filled by sync.
            assert (await join(slow))["head"] == FLOOD_COUNT
            await live_message_arrives(sender, slow, FLOOD_COUNT + 1)
            log += await sync_pages(slow, log[-1]["seq"] if log else 0, FLOOD_COUNT)
        else:
            # Catch up from the last applied seq in pages until more=false: the stream
            # resumes with that sync.
            log += await sync_pages(slow, log[-1]["seq"] if log else 0, FLOOD_COUNT)
            await live_message_arrives(sender, slow, FLOOD_COUNT + 1)
        assert_dense(log)
        assert len(log) == FLOOD_COUNT
        assert {e["id"]: e["text"] for e in log} == {
            acks[cid]["id"]: text for cid, text in texts.items()
        }


async def test_a_full_socket_hands_over_to_the_writer_and_back(tmp_path: Path) -> None:
    """The write path (server/app.py): while a member's socket takes everything, the
    flusher writes it; when the socket is full, the connection's writer task takes over
    and the flusher leaves it alone; once all is sent the flusher writes again. Across
    both hand-overs nothing is lost, duplicated or reordered, and nothing is cut (the
    backlog stays under ``max_queue_bytes``)."""
    settings = make_settings(tmp_path / "data", limits=fast_limits())
    async with running_server(settings) as h:
        slow = await connect_small_buffer(h, "slow")
        assert (await join(slow))["head"] == 0
        conn = connection_of(h.server, "slow")
        assert not conn.blocked  # plain TCP: the flusher writes
        # The server side's send buffer too, so 200 events of 4 KiB cannot all fit.
        conn.stream.socket.setsockopt(  # type: ignore[attr-defined]
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        sender = await h.connect("alice")
        texts = {f"f{k}": f"{k:05d}".ljust(FLOOD_TEXT, "x") for k in range(400)}
        items = list(texts.items())
        with trio.fail_after(30):
            acks = await send_pipelined(sender, items[:200], window=32)
        assert conn.blocked  # the member read nothing: the writer task waits for it
        log: list[dict[str, Any]] = []

        async def read_all() -> None:
            log.extend(await events(slow, len(texts)))

        with trio.fail_after(30):  # more events keep coming while the member catches up
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                acks |= await send_pipelined(sender, items[200:], window=4)
        assert_dense(log)
        assert [e["text"] for e in log] == list(texts.values())
        assert [e["id"] for e in log] == [acks[cid]["id"] for cid in texts]
        await barrier(slow)
        assert pending_events(slow) == []
        assert not conn.blocked and not conn.pending and not conn.queue  # the flusher's again
        assert not conn.writing  # and the writer task is gone until needed
        assert h.server.metrics.value("tsmsg_slow_consumer_resyncs_total") == 0
        await live_message_arrives(sender, slow, len(texts) + 1)


@pytest.mark.parametrize(
    ("error", "reason"),
    [(RuntimeError("injected write bug"), "internal_error"), (ConnectionResetError(), "lost")],
    ids=["bug", "reset"],
)
async def test_a_failed_write_closes_that_connection_only(
    harness: Harness, error: Exception, reason: str
) -> None:
    """The flusher writes for every connection: an exception there must close the
    connection it was writing for, not the server. A bug is an internal error; an OSError
    (the peer reset) reaches the connection's writer task, which reports a lost peer as
    trio's own send would."""
    broken = await harness.connect("broken")
    alice = await harness.connect("alice")
    for client in (broken, alice):
        await join(client)
    conn = connection_of(harness.server, "broken")

    def boom(data: bytes) -> int:
        raise error

    conn.try_send = boom
    sent = await alice.request("send", channel=CHANNEL, cid="c1", text="hi")
    assert sent["t"] == "ok", sent
    (event,) = await events(alice, 1)
    assert event["text"] == "hi"
    with pytest.raises(EOFError):  # closed by the server, the event never sent
        await broken.next(is_event())
    closed = harness.server.metrics.value
    with trio.fail_after(5):
        while not closed("tsmsg_connections_closed_total", reason=reason):
            await trio.sleep(0.01)
    assert (await alice.request("send", channel=CHANNEL, cid="c2", text="still"))["seq"] == 2


async def sync_pages(client: WireClient, since: int, head: int) -> list[dict[str, Any]]:
    """Sync from ``since`` page by page until more=false or past ``head``; the entries up
    to ``head``. The pages must be several."""
    out: list[dict[str, Any]] = []
    pages = 0
    with trio.fail_after(10):
        while since < head:
            page = await client.request("sync", channel=CHANNEL, since=since)
            assert page["t"] == "ok", page
            pages += 1
            out += [e for e in page["events"] if e["seq"] <= head]
            if page["events"]:
                since = page["events"][-1]["seq"]
            if not page["more"]:
                break
    assert since >= head
    assert pages >= 2  # 4 KiB entries: the flood does not fit one 1 MiB page
    return out


async def live_message_arrives(sender: WireClient, member: WireClient, seq: int) -> None:
    sent = await sender.request("send", channel=CHANNEL, cid=f"live-{seq}", text="live again")
    assert sent["seq"] == seq, sent
    (event,) = await events(member, 1)
    assert (event["seq"], event["text"]) == (seq, "live again")
    await barrier(member)
    assert pending_events(member) == []


async def test_deliveries_count_only_frames_actually_queued(harness: Harness) -> None:
    members = [await harness.connect(u) for u in ("alice", "bob", "carol")]
    for client in members:
        await client.request("join", channel=CHANNEL)

    def deliveries() -> float:
        return harness.server.metrics.value("tsmsg_fanout_deliveries_total")

    before = deliveries()
    await members[0].request("send", channel=CHANNEL, cid="d1", text="hi")
    for client in members:
        await client.expect("event", channel=CHANNEL)
    assert deliveries() - before == 3  # the sender's own connection too
    await members[0].request("typing", channel=CHANNEL, on=True)
    for client in members[1:]:
        await client.expect("typing", channel=CHANNEL, user="alice")
    assert deliveries() - before == 3 + 2  # the typer's connection is skipped


async def test_join_ok_comes_before_every_push_of_the_channel(harness: Harness) -> None:
    """PROTOCOL.md 6.2: on a connection that had not joined, the join's ``ok`` precedes
    every push of the channel, even while the channel is busy. Connections join one by
    one while another pipelines sends; in each, nothing of the channel comes before ok."""
    alice = await harness.connect("alice")
    joiners = [await harness.connect("bob") for _ in range(8)]
    sent = 0

    async def sender(stop: trio.Event) -> None:
        nonlocal sent
        while not stop.is_set() and sent < 300:  # within the default send burst
            for _ in range(5):
                frame = {"t": "send", "rid": 1000 + sent, "channel": CHANNEL, "cid": f"s{sent}"}
                await alice.send({**frame, "text": "x"})
                sent += 1
            await trio.sleep(0.002)

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, stop)
        for bob in joiners:
            await trio.sleep(0.005)
            await bob.send({"t": "join", "rid": 1, "channel": CHANNEL})
        await trio.sleep(0.02)
        stop.set()
    pushes_after_ok = 0
    for bob in joiners:
        # (membership is the user's notice, pushed to all its devices, not the channel's)
        first = await bob.next(
            lambda f: f.get("rid") == 1 or (f.get("channel") == CHANNEL and f["t"] != "membership")
        )
        assert first["t"] == "ok" and first.get("rid") == 1, first
        await barrier(bob)
        pushes_after_ok += len([f for f in bob.pending if f.get("t") == "event"])
    for k in range(sent):
        reply = await alice.next(lambda f, k=k: f.get("rid") == 1000 + k)
        assert reply["t"] == "ok", reply
    assert pushes_after_ok > 0  # the joins did race live traffic


async def test_a_peer_that_reads_nothing_is_closed_after_the_send_timeout(tmp_path: Path) -> None:
    """A member that stops reading: once its socket is full, the writer task waits for it
    at most ``send_timeout_s``, then the server closes the connection (reason
    ``send_timeout``). The queue bound is raised so that the cut does not come first.
    The sender and the channel go on."""
    settings = make_settings(tmp_path / "data", send_timeout_s=0.5, max_queue_bytes=64 << 20)
    async with running_server(settings) as h:
        stuck = await connect_small_buffer(h, "stuck")
        await join(stuck)
        alice = await h.connect("alice")
        closed = h.server.metrics.value
        n = 0
        with trio.fail_after(30):
            while not closed("tsmsg_connections_closed_total", reason="send_timeout"):
                n += 1
                ack = await alice.request("send", channel=CHANNEL, cid=f"c{n}", text="x" * 4096)
                assert ack["t"] == "ok", ack
        assert all(c.user != "stuck" for c in h.server.connections.values())
        assert h.server.metrics.value("tsmsg_slow_consumer_resyncs_total") == 0
        after = await alice.request("send", channel=CHANNEL, cid="after", text="still")
        assert after["seq"] == n + 1
        # What the stuck client had buffered is a dense prefix of the channel; then EOF.
        seqs: list[int] = []
        with pytest.raises((EOFError, trio.BrokenResourceError)):
            while True:
                seqs.append((await stuck.next(is_event()))["seq"])
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < n


class LateStream(trio.abc.Stream):
    """A stream whose first ``send_all`` completes only after the send deadline passed
    (the peer read, just late): shielded, so the deadline cannot interrupt it."""

    def __init__(self, late_s: float) -> None:
        self.late_s = late_s
        self.got: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.got:
            with trio.CancelScope(shield=True):
                await trio.sleep(self.late_s)
        else:
            await trio.lowlevel.checkpoint()
        self.got.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    def try_send(self, data: bytes) -> int:
        raise BlockingIOError  # the socket is full: everything goes to the writer task


async def test_a_write_that_completes_after_the_deadline_loses_nothing(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The writer's deadline expires while a write is completing: that write counts as
    sent, the frames queued meanwhile follow it in order, and the connection stays open.
    (A writer that kept one cancel scope for its life dropped the next write's bytes
    silently here: a scope whose deadline passed stays cancelled.)"""
    timeout = 1.0
    async with running_server(make_settings(tmp_path / "data", send_timeout_s=timeout)) as h:
        await h.connect("late")
        conn = connection_of(h.server, "late")
        stream = LateStream(late_s=timeout * 2)
        conn.stream, conn.try_send = stream, stream.try_send
        conn.send_bytes(b"first", None)  # the flusher cannot write it: the writer sends it
        await trio.sleep(timeout / 2)
        conn.send_bytes(b"second", None)  # queued while the first write waits
        await trio.sleep(timeout * 3)
        conn.send_bytes(b"third", None)
        await trio.sleep(timeout)
        assert stream.got == [b"first", b"second", b"third"]
        assert conn.closing is None and not conn.writing


class BrokenStream(LateStream):
    """A stream whose send_all has a bug: the writer task meets an unexpected error."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("injected writer bug")


async def test_a_writer_task_bug_closes_that_connection_only(harness: Harness) -> None:
    """Writer tasks run in the server's own nursery: an exception in one must close its
    connection as an internal error, never reach the nursery (which would stop the
    server)."""
    broken = await harness.connect("broken")
    alice = await harness.connect("alice")
    for client in (broken, alice):
        await join(client)
    conn = connection_of(harness.server, "broken")
    stream = BrokenStream(late_s=0)
    conn.stream, conn.try_send = stream, stream.try_send
    assert (await alice.request("send", channel=CHANNEL, cid="c1", text="hi"))["t"] == "ok"
    closed = harness.server.metrics.value
    with trio.fail_after(5):
        while not closed("tsmsg_connections_closed_total", reason="internal_error"):
            await trio.sleep(0.01)
    assert (await alice.request("send", channel=CHANNEL, cid="c2", text="still"))["seq"] == 2


async def test_a_slow_reader_that_keeps_reading_is_cut_not_closed(tmp_path: Path) -> None:
    """A member that reads steadily, just slower than a flood fans out (~100 KB/s): the
    overflow is cut (a resync push) and the connection stays open (PROTOCOL.md 14: "a
    slow client keeps its connection"); only a peer that reads nothing for
    ``send_timeout_s`` is closed. The writer task once sent everything queued (up to
    twice ``max_queue_bytes``) under one ``send_timeout_s`` deadline, so a reader slower
    than that many bytes per ``send_timeout_s`` was closed as one that "read nothing"."""
    settings = make_settings(tmp_path / "data", send_timeout_s=1.0, max_queue_bytes=128 * 1024)
    async with running_server(settings) as h:
        slow = await connect_small_buffer(h, "slow")
        await join(slow)
        await slow.expect("membership", channel=CHANNEL)
        sender = await h.connect("alice")
        got: list[dict[str, Any]] = []

        async def read_steadily() -> None:  # up to the cut: nothing is queued after it
            framing = slow.framing
            with contextlib.suppress(EOFError, trio.BrokenResourceError):
                while not any(f.get("t") == "resync" for f in got):
                    data = await slow.stream.receive_some(4096)
                    if not data:
                        raise EOFError
                    got.extend(framing.feed(data))
                    await trio.sleep(0.04)  # ~100 KB/s

        texts = [(f"f{k}", f"{k:05d}".ljust(4096, "x")) for k in range(400)]
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_steadily)
                await send_pipelined(sender, texts, window=32)
        closed = h.server.metrics.value("tsmsg_connections_closed_total", reason="send_timeout")
        assert closed == 0, "a reader that kept reading was closed for reading nothing"
        assert any(f.get("t") == "resync" and f.get("reason") == "cut" for f in got)
        slow.pending.extend(got)
        assert (await slow.request("ping"))["t"] == "pong"
