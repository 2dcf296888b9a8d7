"""A data directory over real TCP and real processes (issue 18): one process per data
directory, message ids that say nothing about other channels, and a corrupt stored
entry answered with an ``internal`` error frame on a connection that stays open."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import trio

from conftest import WireClient, mint
from server_proc import server_env, server_process
from tsmsg.store.lmdb_store import U64

CHILD_TIMEOUT = 30.0


async def connect(port: int, user: str) -> WireClient:
    client = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
    welcome = await client.request("hello", v=1, token=mint(user))
    assert welcome["t"] == "welcome", welcome
    return client


async def send(client: WireClient, channel: str, cid: str, text: str) -> dict[str, Any]:
    reply = await client.request("send", channel=channel, cid=cid, text=text)
    assert reply["t"] == "ok", reply
    return reply


def tsmsg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsmsg.cli", *args],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env=server_env(),
        stdin=subprocess.DEVNULL,
    )


# ------------------------------------------------------------------ one process (item 5)


async def test_a_second_server_and_compact_are_refused_naming_the_pid(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with server_process(data, tmp_path / "server.log") as server:
        assert server.proc is not None
        pid = server.proc.pid
        alice = await connect(server.port, "alice")
        await send(alice, "room", "c1", "hello")
        for args in (
            ("serve", "--port", "0", "--data-dir", str(data)),
            ("compact", "--data-dir", str(data)),
        ):
            child = await trio.to_thread.run_sync(lambda args=args: tsmsg(*args))
            assert child.returncode == 1, child
            lines = child.stderr.strip().splitlines()
            assert len(lines) == 1, child.stderr
            assert f"in use by another tsmsg process (pid {pid}" in lines[0]
        # The first server was not disturbed, and reading tools still run beside it.
        assert (await alice.request("history", channel="room"))["messages"][0]["text"] == "hello"
        inspect = await trio.to_thread.run_sync(lambda: tsmsg("inspect", "--data-dir", str(data)))
        assert inspect.returncode == 0, inspect.stderr
        await alice.aclose()
    # A killed server leaves no stale lock: the next one starts.
    async with server_process(data, tmp_path / "again.log") as again:
        bob = await connect(again.port, "bob")
        assert (await bob.request("history", channel="room"))["messages"][0]["text"] == "hello"
        await bob.aclose()


# ------------------------------------------------------------------ message ids (item 11)


async def test_message_ids_reveal_nothing_across_channels(tmp_path: Path) -> None:
    """Ids used to be ``<channel counter>-<seq>``: the gap between two rooms' ids told
    how many channels (DMs) others had created in between."""
    data = tmp_path / "data"
    async with server_process(data, tmp_path / "server.log") as server:
        alice = await connect(server.port, "alice")
        first = await send(alice, "room-a", "c1", "one")
        for i in range(5):  # others' DMs, created in between
            await send(alice, f"dm:alice:u{i}", f"d{i}", "psst")
        second = await send(alice, "room-b", "c2", "two")
        edited = await alice.request("edit", channel="room-a", id=first["id"], text="one!")
        assert edited["t"] == "ok", edited
        # An id of one channel names nothing in another, whatever its seq.
        other = await alice.request("edit", channel="room-b", id=first["id"], text="x")
        assert other["code"] == "not_found"
        await alice.aclose()
    prefixes = [reply["id"].rsplit("-", 1) for reply in (first, second)]
    assert [seq for _, seq in prefixes] == ["1", "1"]  # the seq in its channel, as before
    assert first["id"] != "1-1" and second["id"] != "7-1"  # no channel counter
    assert all(len(prefix) == 16 for prefix, _ in prefixes)  # 64 random-looking bits
    assert prefixes[0][0] != prefixes[1][0]
    # Stable across a restart, compaction, and a backup served as the data directory.
    compact = await trio.to_thread.run_sync(lambda: tsmsg("compact", "--data-dir", str(data)))
    assert compact.returncode == 0, compact.stderr
    backup = tmp_path / "backup"
    out = await trio.to_thread.run_sync(
        lambda: tsmsg("backup", "--data-dir", str(data), str(backup))
    )
    assert out.returncode == 0, out.stderr
    for directory in (data, backup):
        async with server_process(directory, tmp_path / f"{directory.name}.log") as server:
            bob = await connect(server.port, "bob")
            history = await bob.request("history", channel="room-a")
            assert [(m["id"], m["text"]) for m in history["messages"]] == [(first["id"], "one!")]
            dup = await bob.request("send", channel="room-b", cid="x", text="three")
            assert dup["id"] == second["id"][:-1] + "2"
            await bob.aclose()


# ------------------------------------------------------------------ corrupt entry (item 12)


async def test_a_corrupt_entry_answers_internal_and_keeps_the_connection(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    log_path = tmp_path / "server.log"
    async with server_process(data, log_path) as server:
        alice = await connect(server.port, "alice")
        for i in range(3):
            await send(alice, "room", f"c{i}", f"m{i}")
        await alice.aclose()
        assert await server.terminate() == 0
        env = lmdb.open(str(data), max_dbs=16)  # the server is gone: write its file directly
        try:
            with env.begin(write=True) as txn:
                key = U64.pack(1) + U64.pack(2)
                assert txn.replace(key, b"\xc1not msgpack", db=env.open_db(b"log", txn=txn))
        finally:
            env.close()
        await server.restart()
        bob = await connect(server.port, "bob")
        for request in (
            {"t": "sync", "channel": "room", "since": 0},
            {"t": "history", "channel": "room"},
            {"t": "sync", "channel": "room", "since": 0},  # asked again: the same answer
        ):
            reply = await bob.request(request.pop("t"), **request)
            assert reply["t"] == "error" and reply["code"] == "internal", reply
            assert "corrupt" not in reply["message"]  # the detail stays in the log
        # The connection is open, and the rest of the channel reads.
        assert (await bob.request("ping"))["t"] in ("pong", "ok")
        page = await bob.request("sync", channel="room", since=2)
        assert [e["text"] for e in page["events"]] == ["m2"]
        await bob.aclose()
    assert "log entry 2 of channel id 1 is corrupt" in server.log()
