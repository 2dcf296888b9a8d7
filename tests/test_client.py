"""The reference client against a real server over TCP: the whole API, typed errors,
token refresh, rate limits, persistent state, and reconnect-and-resume while the server is
SIGKILLed and restarted mid-stream with messages in flight both ways, under trio and under
asyncio. Every wait is bounded."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio

import redis_servers
from conftest import SECRET, Harness, fresh_redis_url, make_settings, mint
from server_proc import ServerProcess, server_process
from tsmsg.auth import TokenVerifier
from tsmsg.client import (
    Ack,
    BadRequest,
    Client,
    ConnectionChanged,
    ConnectionClosed,
    Delete,
    Edit,
    Event,
    Forbidden,
    Message,
    NotFound,
    PresenceInfo,
    ReadReceipt,
    Resynced,
    Typing,
    Unauthorized,
    connect,
)
from tsmsg.protocol.limits import Limits
from tsmsg.server.app import Server
from tsmsg.server.settings import Settings

CH = "room-1"
HOST = "127.0.0.1"
STEP = 5.0  # seconds any single wait in these tests may take


async def next_event(
    client: Client, channel: str | None = CH, want: type | tuple[type, ...] = object
) -> Any:
    """The next event of ``channel`` that is a ``want``, skipping others."""
    with anyio.fail_after(STEP):
        async for event in client.events(channel):
            if isinstance(event, want):
                return event
    raise AssertionError("the event stream ended")


async def drain(client: Client) -> list[Event]:
    """The events already waiting (all channels)."""
    events: list[Event] = []
    with anyio.move_on_after(0.1):
        async for event in client.events():
            events.append(event)
    return events


async def sync_log(client: Client, channel: str = CH) -> list[Any]:
    out: list[Any] = []
    since, more = 0, True
    while more:
        page = await client.sync(channel, since)
        out += page.events
        since, more = page.head if not page.events else page.events[-1].seq, page.more
    return out


# ------------------------------------------------------------------------ the API


async def test_full_api(harness: Harness) -> None:
    port = harness.server.port
    with trio.fail_after(20):
        async with (
            connect(HOST, port, token=mint("alice")) as alice,
            connect(HOST, port, token=mint("bob")) as bob,
        ):
            assert (alice.user, bob.user) == ("alice", "bob")
            info = await alice.join(CH)
            assert (info.channel, info.head, info.read) == (CH, 0, 0)
            await bob.join(CH)
            assert await next_event(alice, want=Resynced) == Resynced(CH, 0, 0, ())
            assert (await next_event(bob, want=Resynced)).head == 0

            ack = await alice.send(CH, "hello", meta={"mentions": ["bob"]}, cid="c-1")
            assert (ack.channel, ack.seq, ack.dup) == (CH, 1, False)
            again = await alice.send(CH, "hello again?", cid="c-1")
            assert again == Ack(CH, 1, ack.id, ack.ts, True)  # stored once
            m = await next_event(bob)
            assert m == Message(CH, 1, ack.id, "alice", ack.ts, "hello", {"mentions": ["bob"]})
            assert (await next_event(alice)).seq == 1

            edit = await alice.edit(CH, ack.id, "hello!")
            assert (edit.seq, edit.id) == (2, ack.id)
            assert await next_event(bob) == Edit(CH, 2, ack.id, "alice", edit.ts, "hello!")
            second = await bob.send(CH, "bye")
            deleted = await bob.delete(CH, second.id)
            assert await next_event(bob) == Message(CH, 3, second.id, "bob", second.ts, "bye")
            assert await next_event(bob) == Delete(CH, 4, second.id, "bob", deleted.ts)

            page = await bob.history(CH)
            assert not page.more
            assert [(m.seq, m.text, m.edited, m.deleted) for m in page.messages] == [
                (1, "hello!", edit.ts, False),
                (3, None, None, True),
            ]
            assert [m.seq for m in (await bob.history(CH, before=3, limit=1)).messages] == [1]
            log = await sync_log(bob)
            assert [type(e) for e in log] == [Message, Edit, Message, Delete]

            assert await bob.unread([CH]) == {CH: 1}  # alice's message; bob's is deleted
            assert await bob.read(CH, 99) == 4  # clamped to the head
            assert await next_event(alice, want=ReadReceipt) == ReadReceipt(CH, "bob", 4)
            await bob.typing(CH)
            assert await next_event(alice, want=Typing) == Typing(CH, "bob", True)

            await bob.set_presence("away")
            infos = await alice.presence(["bob", "stranger"])
            assert infos == [PresenceInfo("bob", "away", True)]

            with pytest.raises(NotFound):
                await alice.delete(CH, second.id)
            keep = await bob.send(CH, "keep")
            with pytest.raises(Forbidden):
                await alice.edit(CH, keep.id, "not mine")
            with pytest.raises(BadRequest):
                await alice.send("bad name!", "x")
            await alice.leave(CH)
            assert alice.channels == []
            await bob.send(CH, "after alice left")
            assert [(await next_event(bob, want=Message)).seq for _ in range(2)] == [5, 6]
            with trio.move_on_after(0.2):
                event = await next_event(alice, want=(Message, Edit, Delete))
                raise AssertionError(f"left, yet got {event}")


async def test_an_iterator_of_a_channel_ends_when_it_is_left(harness: Harness) -> None:
    """``events(channel)`` ends once the channel is left (before, it waited for ever);
    an iterator made after a new join goes on with the channel's events."""
    with trio.fail_after(20):
        async with connect(HOST, harness.server.port, token=mint("alice")) as alice:
            await alice.join(CH)
            got: list[Event] = []

            async def iterate() -> None:
                async for event in alice.events(CH):
                    got.append(event)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(iterate)
                await alice.send(CH, "one")
                while not any(isinstance(e, Message) for e in got):
                    await trio.sleep(0.01)
                await alice.leave(CH)  # iterate() returns: the nursery can close
            assert [type(e) for e in got] == [Resynced, Message]
            await alice.join(CH)
            assert [m.text for m in (await next_event(alice, want=Resynced)).messages] == ["one"]


async def test_forbidden_channel_and_bad_token(harness: Harness) -> None:
    port = harness.server.port
    with trio.fail_after(10):
        async with connect(HOST, port, token=mint("carol", ["room-*"])) as carol:
            with pytest.raises(Forbidden):
                await carol.join("general")
            assert carol.channels == []
            with pytest.raises(Forbidden):
                await carol.send("general", "hi")
            assert carol.outbox == []
        with pytest.raises(Unauthorized):
            async with connect(HOST, port, token="not-a-jwt", connect_timeout=5):
                raise AssertionError("connected with a bad token")


async def test_first_join_of_a_busy_channel_loads_the_newest_page(harness: Harness) -> None:
    port = harness.server.port
    with trio.fail_after(10):
        async with connect(HOST, port, token=mint("alice")) as alice:
            for k in range(60):
                await alice.send(CH, f"m{k}")
            async with connect(HOST, port, token=mint("bob")) as bob:
                await bob.join(CH)
                resynced = await next_event(bob, want=Resynced)
                assert resynced.head == 60
                assert [m.seq for m in resynced.messages] == list(range(11, 61))
                await alice.send(CH, "next")
                assert (await next_event(bob)).seq == 61
                await bob.join("room-2", replay=True)
                await alice.send("room-2", "r1")
                assert (await next_event(bob, "room-2", Message)).text == "r1"


# ------------------------------------------------------------------------ tokens, rates


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(Server(settings, TokenVerifier(SECRET)).run)
        try:
            yield server
        finally:
            server.stopping.set()


async def test_token_refreshed_through_the_provider_before_exp(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", tick_ms=50)
    issued: list[str] = []

    async def provider() -> str:
        issued.append(mint("alice", ttl_s=2))
        return issued[-1]

    async with serve(settings) as server:
        with trio.fail_after(15):
            async with connect(HOST, server.port, token_provider=provider) as alice:
                await alice.join(CH)
                deadline = trio.current_time() + 4.5  # two token lifetimes and more
                k = 0
                while trio.current_time() < deadline:
                    await alice.send(CH, f"m{k}")
                    k += 1
                    await trio.sleep(0.25)
                events = await drain(alice)
                assert alice.connected
                assert not [
                    e for e in events if isinstance(e, ConnectionChanged) and not e.connected
                ]
                assert len([e for e in events if isinstance(e, Message)]) == k
                assert alice.refreshes >= 2
                assert len(issued) == alice.refreshes + 1


async def test_rate_limited_sends_wait_and_are_stored_once(tmp_path: Path) -> None:
    limits = Limits(send_rate=5.0, send_burst=2, channel_send_rate=5.0, channel_send_burst=2)
    settings = make_settings(tmp_path / "data", limits=limits)
    async with serve(settings) as server:
        with trio.fail_after(15):
            async with connect(HOST, server.port, token=mint("alice")) as alice:
                acks: dict[str, Ack] = {}
                start = trio.current_time()

                async def one(k: int) -> None:
                    acks[f"c{k}"] = await alice.send(CH, f"m{k}", cid=f"c{k}")

                async with trio.open_nursery() as nursery:
                    for k in range(8):
                        nursery.start_soon(one, k)
                elapsed = trio.current_time() - start
                assert elapsed >= 0.9  # 2 at once, then 5/s: the client waited
                log = await sync_log(alice)
                assert sorted(e.text for e in log) == sorted(f"m{k}" for k in range(8))
                assert not any(a.dup for a in acks.values())
                assert alice.connected


# ------------------------------------------------------------------------ a server subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


async def kill_and_restart_mid_stream(tmp_path: Path) -> dict[str, Any]:
    """The one node is SIGKILLed mid-stream and restarted on the same port."""
    data, log_path = tmp_path / "data", tmp_path / "server.log"
    async with server_process(data, log_path, port=free_port()) as server:
        return await kill_mid_stream(server, None)


async def kill_a_node_mid_stream(tmp_path: Path, engine: str) -> dict[str, Any]:
    """Node A of two on one Redis engine is SIGKILLed mid-stream for good: the clients,
    given both addresses, go on through node B."""
    async with (
        server_process(tmp_path / "a", tmp_path / "a.log", "--engine", engine) as a,
        server_process(tmp_path / "b", tmp_path / "b.log", "--engine", engine) as b,
    ):
        return await kill_mid_stream(a, b)


async def kill_mid_stream(server: ServerProcess, other: ServerProcess | None) -> dict[str, Any]:
    """alice and bob each send ``n`` messages to one channel, up to 16 in flight, while both
    read the channel; ``server`` is SIGKILLed mid-stream, then restarted (``other`` None)
    or left dead (the clients fail over to ``other``). Checks that each one's event stream
    is the whole log, gap-free, duplicate-free and in order, and that every message is
    stored exactly once."""
    n = 150
    more = [] if other is None else [(HOST, other.port)]

    def client(user: str) -> Any:
        return connect(
            HOST, server.port, token=mint(user), backoff_max=0.3, fallback_addresses=more
        )

    async with client("alice") as alice, client("bob") as bob:
        clients = {"alice": alice, "bob": bob}
        for c in clients.values():
            await c.join(CH)
        seen: dict[str, list[Event]] = {name: [] for name in clients}
        acks: dict[str, Ack] = {}

        def messages(name: str) -> list[Message]:
            return [e for e in seen[name] if isinstance(e, Message)]

        async def consume(name: str) -> None:
            async for event in clients[name].events(CH):
                seen[name].append(event)
                if len(messages(name)) == 2 * n:
                    return

        async def produce(name: str) -> None:
            window = anyio.Semaphore(16)

            async def one(cid: str) -> None:
                acks[cid] = await clients[name].send(CH, f"text {cid}", cid=cid)
                window.release()

            async with anyio.create_task_group() as tg:
                for k in range(n):
                    await window.acquire()
                    tg.start_soon(one, f"{name}-{k}")

        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                for name in clients:
                    tg.start_soon(consume, name)
                    tg.start_soon(produce, name)
                # Half of all the sends acknowledged: the rest is still to come (up to
                # 16 a client in flight), however far behind the readers are.
                while len(acks) < n:
                    await anyio.sleep(0.002)
                server.kill()
                killed_at = (len(acks), len(messages("bob")))
                if other is None:
                    await anyio.sleep(0.2)
                    await server.restart()
            log = await sync_log(bob)
            for c in clients.values():  # each one saw its node go and a node come back
                changes = [await next_event(c, None, ConnectionChanged) for _ in "123"]
                assert [c.connected for c in changes] == [True, False, True], changes
    # The application-level streams: a Resynced at 0, then every seq once, in order.
    for name in clients:
        resynced = [e for e in seen[name] if isinstance(e, Resynced)]
        assert resynced == [Resynced(CH, 0, 0, ())], name
        got = [m.seq for m in messages(name)]
        assert got == list(range(1, 2 * n + 1)), (name, killed_at, got)
        assert [m.id for m in messages(name)] == [e.id for e in log]
    # Every message stored exactly once, where its ack says.
    texts = [e.text for e in log]
    cids = [f"{name}-{k}" for name in clients for k in range(n)]
    assert sorted(texts) == sorted(f"text {cid}" for cid in cids)
    for cid, ack in acks.items():
        assert log[ack.seq - 1].text == f"text {cid}"
        assert log[ack.seq - 1].id == ack.id
    assert len(acks) == 2 * n
    # The kill was mid-stream (acks sent, bob's messages seen when it came).
    assert killed_at[0] < 2 * n and killed_at[1] < 2 * n, killed_at
    return {"dups": sum(a.dup for a in acks.values()), "killed_at": killed_at}


async def test_sigkill_restart_mid_stream_trio(tmp_path: Path) -> None:
    await kill_and_restart_mid_stream(tmp_path)


def test_sigkill_restart_mid_stream_asyncio(tmp_path: Path) -> None:
    anyio.run(kill_and_restart_mid_stream, tmp_path, backend="asyncio")


@pytest.mark.skipif(not redis_servers.available(), reason="needs redis-server")
async def test_sigkill_a_cluster_node_the_clients_fail_over(
    tmp_path: Path, redis_server: redis_servers.RedisServer
) -> None:
    """Cluster mode (docs/cluster.md): a node dies for good, its clients resume on another
    node exactly once, in order, their unacknowledged sends delivered once."""
    await kill_a_node_mid_stream(tmp_path, fresh_redis_url(redis_server))


def run_asyncio(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return anyio.run(fn, *args, backend="asyncio")


async def persistent_state_resumes(tmp_path: Path) -> None:
    """A restarted application (same state file) resumes its channels from where it was,
    and its outbox, filled while the server was down, is stored exactly once."""
    state = tmp_path / "alice.sqlite"
    data, log_path = tmp_path / "data", tmp_path / "server.log"
    async with server_process(data, log_path, port=free_port()) as server:
        async with connect(HOST, server.port, token=mint("bob")) as bob:
            async with connect(HOST, server.port, token=mint("alice"), state_path=state) as alice:
                await alice.join(CH)
                for k in range(3):
                    await bob.send(CH, f"b{k}")
                assert isinstance(await next_event(alice), Resynced)
                assert [(await next_event(alice)).seq for _ in range(3)] == [1, 2, 3]
            for k in range(3, 5):
                await bob.send(CH, f"b{k}")  # while alice is away
        async with connect(HOST, server.port, token=mint("alice"), state_path=state) as alice:
            assert alice.channels == [CH]  # followed again without a join
            assert [(await next_event(alice)).seq for _ in range(2)] == [4, 5]
            server.kill()
            with anyio.move_on_after(0.3):
                await alice.send(CH, "from the outbox", cid="outbox-1")
            assert alice.outbox == ["outbox-1"]
        await server.restart()
        async with connect(HOST, server.port, token=mint("alice"), state_path=state) as alice:
            with anyio.fail_after(STEP):
                while alice.outbox:
                    await anyio.sleep(0.01)
            event = await next_event(alice)
            assert (event.seq, event.text, event.sender) == (6, "from the outbox", "alice")
            log = await sync_log(alice)
            assert [e.text for e in log].count("from the outbox") == 1
            # Acked already: the same cid again is a dup, not a second message.
            assert (await alice.send(CH, "again", cid="outbox-1")).dup


async def test_persistent_state_resumes_trio(tmp_path: Path) -> None:
    await persistent_state_resumes(tmp_path)


def test_persistent_state_resumes_asyncio(tmp_path: Path) -> None:
    run_asyncio(persistent_state_resumes, tmp_path)


def test_connect_gives_up_after_connect_timeout() -> None:
    """A server that takes the connection and never answers: the timeout ends it. One
    that refuses it (nothing listening) is reported at once, under asyncio too."""
    mute = socket.socket()
    mute.bind((HOST, 0))
    mute.listen(8)  # never accepted: the kernel completes the handshake, no one answers

    async def main() -> None:
        with pytest.raises(ConnectionClosed, match="could not connect"):
            port = mute.getsockname()[1]
            async with connect(HOST, port, token=mint("a"), connect_timeout=0.5):
                raise AssertionError("connected to nothing")
        port = free_port()
        with pytest.raises(ConnectionClosed, match=f"connection refused by {HOST}:{port}"):
            async with connect(HOST, port, token=mint("a"), connect_timeout=60):
                raise AssertionError("connected to nothing")

    try:
        run_asyncio(main)
    finally:
        mute.close()


async def test_slow_application_bounded_queue_loses_nothing(harness: Harness) -> None:
    port = harness.server.port
    with trio.fail_after(15):
        async with (
            connect(HOST, port, token=mint("alice"), max_queued=10) as alice,
            connect(HOST, port, token=mint("bob")) as bob,
        ):
            await alice.join(CH)
            for k in range(100):  # alice's queue is full long before this ends
                await bob.send(CH, f"m{k}")
            assert alice.queued_events <= 10 + 2  # + ConnectionChanged, Membership
            got = [await next_event(alice, want=Message) for _ in range(100)]
            assert [m.seq for m in got] == list(range(1, 101))
            assert [m.text for m in got] == [f"m{k}" for k in range(100)]


class StuckStream(anyio.abc.ByteStream):
    """A connection whose writes never complete (a peer gone without a reset)."""

    async def send(self, item: bytes) -> None:
        await anyio.sleep_forever()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_an_ended_connection_does_not_hold_the_send_lock() -> None:
    """A caller's flush stuck writing to a connection that then ends (the reader saw it
    go) gives up at once: it must not hold the send lock for WRITE_TIMEOUT, or the next
    connection's hello waits behind it until the server's hello deadline closes that
    connection too (seen as a 40 s hang in the SIGKILL test above)."""
    from tsmsg.client.client import Client, _Session

    client = Client(
        [(HOST, 1)], token=mint("alice"), token_provider=None, state_path=None, reconnect=False,
        backoff_max=1.0, max_queued=10, ssl_context=None,
    )  # fmt: skip
    session = client._session = _Session(StuckStream())
    client._proto.connection_made(mint("alice"), client._now())  # a hello to write
    async with anyio.create_task_group() as tg:
        tg.start_soon(client._flush)
        await anyio.wait_all_tasks_blocked()
        assert client._send_lock.locked()
        session.end("connection lost")
        with anyio.fail_after(1):
            async with client._send_lock:  # free again, long before WRITE_TIMEOUT
                pass
    assert session.sending is None
