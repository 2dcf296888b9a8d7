"""Server lifecycle over real TCP: SIGKILL and catch-up by sync, graceful shutdown (in
process and by SIGTERM), isolation of a crashing connection handler, the ``tsmsg serve``
command line (secret, --dev, JSON logs) and settings precedence."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import Harness, WireClient, fast_limits, make_settings, mint
from conftest import sync_all as conftest_sync_all
from server_proc import SERVING, server_env, server_process
from tsmsg.auth import TokenIssuer
from tsmsg.protocol.limits import Limits
from tsmsg.server.settings import Settings, load_settings, store_config
from tsmsg.store import CompactionPolicy, LmdbStore

CHANNEL = "room-1"
START_TIMEOUT = 15.0  # seconds for a server subprocess to log its port
CONNECTION_LOST = (EOFError, trio.BrokenResourceError, trio.ClosedResourceError)


def text_of(cid: str) -> str:
    return f"text of {cid}"


def stored_log(data_dir: Path, channel: str = CHANNEL) -> list[dict[str, Any]]:
    """Every entry of ``channel``, read from a reopened store (the server is gone)."""
    with LmdbStore(data_dir) as store:
        out: list[dict[str, Any]] = []
        since, more = 0, True
        while more:
            page = store.sync(channel, since, 5000)
            out += page.entries
            since = out[-1]["seq"] if out else 0
            more = page.more
        return out


def assert_dense(log: list[dict[str, Any]], start: int = 1) -> None:
    assert [e["seq"] for e in log] == list(range(start, start + len(log)))


async def sync_all(client: WireClient, since: int, channel: str = CHANNEL) -> list[dict[str, Any]]:
    return await conftest_sync_all(client, since, channel)


async def connect(port: int, user: str) -> WireClient:
    client = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
    welcome = await client.request("hello", v=1, token=mint(user))
    assert welcome["t"] == "welcome", welcome
    return client


async def send_until_lost(
    client: WireClient,
    cids: list[str],
    acks: dict[str, dict[str, Any]],
    window: int,
    read_acks: int | None = None,
) -> None:
    """Send ``cids`` with up to ``window`` requests in flight, recording each ok in
    ``acks``, until all are acknowledged or the connection goes away. With ``read_acks``
    the client stops reading after that many acks (as if the rest were lost in transit)
    and, its window full, stops sending too."""
    by_rid: dict[int, str] = {}
    free = trio.Semaphore(window)

    async with trio.open_nursery() as nursery:

        async def receive() -> None:
            try:
                while len(acks) < (len(cids) if read_acks is None else read_acks):
                    reply = await client.next(lambda f: f.get("rid") in by_rid)
                    cid = by_rid.pop(reply["rid"])
                    assert reply["t"] == "ok", reply
                    assert reply["dup"] is False, reply
                    acks[cid] = reply
                    free.release()
            except CONNECTION_LOST:
                pass
            else:
                if read_acks is not None:
                    await trio.sleep_forever()
            nursery.cancel_scope.cancel()

        nursery.start_soon(receive)
        try:
            for cid in cids:
                await free.acquire()
                rid = next(client.rids)
                by_rid[rid] = cid
                await client.send(
                    {"t": "send", "rid": rid, "channel": CHANNEL, "cid": cid, "text": text_of(cid)}
                )
        except CONNECTION_LOST:
            pass
        await trio.sleep_forever()  # until receive() is done


async def read_until_lost(client: WireClient, frames: list[dict[str, Any]]) -> None:
    """Collect every frame the server sends until it closes the connection."""
    try:
        while True:
            frames.append(await client.next())
    except CONNECTION_LOST:
        pass


def channel_events(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("t") == "event" and f.get("channel") == CHANNEL]


# ---------------------------------------------------------------------- SIGKILL


async def test_sigkill_mid_stream_then_restart_and_catch_up(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cids = [f"cid-{k:04d}" for k in range(300)]
    acks: dict[str, dict[str, Any]] = {}
    bob_frames: list[dict[str, Any]] = []
    read_acks, window = 100, 16
    async with server_process(data, tmp_path / "server-1.log") as server:
        alice = await connect(server.port, "alice")
        bob = await connect(server.port, "bob")
        assert (await bob.request("join", channel=CHANNEL))["head"] == 0
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                # alice reads 100 acks, then no more: the writes after those are committed
                # (bob sees them) or still in flight, but alice does not know which.
                nursery.start_soon(send_until_lost, alice, cids, acks, window, read_acks)
                nursery.start_soon(read_until_lost, bob, bob_frames)
                # Both sides must have caught up before the kill: bob's events and
                # alice's acks leave the server together but are read by separate tasks.
                while (
                    len(channel_events(bob_frames)) < read_acks + window // 2
                    or len(acks) < read_acks
                ):
                    await trio.sleep(0.001)
                assert server.kill() == -signal.SIGKILL
                nursery.cancel_scope.cancel()
        await alice.aclose()
        await bob.aclose()
    assert len(acks) == read_acks
    bob_live = channel_events(bob_frames)
    assert_dense(bob_live)

    async with server_process(data, tmp_path / "server-2.log") as server:
        alice = await connect(server.port, "alice")
        bob = await connect(server.port, "bob")
        with trio.fail_after(20):
            joined = await bob.request("join", channel=CHANNEL)
            head = joined["head"]
            assert read_acks + window // 2 <= head <= read_acks + window
            since = bob_live[-1]["seq"] if bob_live else 0
            log = bob_live + await sync_all(bob, since)
            assert_dense(log)
            assert len(log) == head
            # Every acked message is there with its seq and id; what bob saw live too.
            for cid, ack in acks.items():
                entry = log[ack["seq"] - 1]
                assert (entry["id"], entry["ts"], entry["text"], entry["sender"]) == (
                    ack["id"],
                    ack["ts"],
                    text_of(cid),
                    "alice",
                )
            assert await sync_all(bob, 0) == log
            committed = {e["text"]: e for e in log}

            # Retrying each unacked cid: a dup (with the original seq, id and ts) when it
            # was committed before the kill, else a new message.
            dups = 0
            for cid in cids:
                if cid in acks:
                    continue
                reply = await alice.request("send", channel=CHANNEL, cid=cid, text=text_of(cid))
                assert reply["t"] == "ok", reply
                entry = committed.get(text_of(cid))
                if entry is not None:
                    assert reply["dup"] is True, reply
                    assert (reply["seq"], reply["id"], reply["ts"]) == (
                        entry["seq"],
                        entry["id"],
                        entry["ts"],
                    )
                    dups += 1
                else:
                    assert reply["dup"] is False, reply
                    assert reply["seq"] > head
            assert dups == head - read_acks
            final = await sync_all(bob, 0)
        await alice.aclose()
        await bob.aclose()
        assert await server.terminate() == 0
    assert_dense(final)
    assert final[:head] == log
    assert sorted(e["text"] for e in final) == sorted(text_of(cid) for cid in cids)


# ---------------------------------------------------------------------- graceful shutdown


def assert_bye_then_eof(client: WireClient, frames: list[dict[str, Any]]) -> None:
    assert client.eof, "the server did not close the connection"
    byes = [f for f in frames if f.get("t") == "bye"]
    assert len(byes) == 1, frames[-5:]
    assert frames[-1] == byes[0]  # nothing after bye
    assert byes[0]["code"] == "shutting_down"


async def flood_and_stop(
    clients: dict[str, WireClient],
    senders: list[str],
    stop: Callable[[], Any],
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """Senders pipeline sends while every client reads; ``stop`` is called once some sends
    are acknowledged and more are in flight. Returns the acks and all frames received."""
    frames: dict[str, list[dict[str, Any]]] = {user: [] for user in clients}
    acks: dict[str, dict[str, dict[str, Any]]] = {user: {} for user in senders}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for user in senders:
                cids = [f"{user}-{k}" for k in range(300)]
                nursery.start_soon(send_until_lost, clients[user], cids, acks[user], 8)
            for user, client in clients.items():
                if user not in senders:
                    nursery.start_soon(read_until_lost, client, frames[user])
            while min(len(a) for a in acks.values()) < 20:
                await trio.sleep(0.001)
            stop()
    for user in senders:  # a sender's own reader kept the frames that were not its acks
        frames[user] = clients[user].pending
    return acks, frames


def assert_acked_are_stored(
    acks: dict[str, dict[str, dict[str, Any]]], log: list[dict[str, Any]]
) -> None:
    assert_dense(log)
    for user, by_cid in acks.items():
        for cid, ack in by_cid.items():
            entry = log[ack["seq"] - 1]
            assert (entry["id"], entry["sender"], entry["text"]) == (ack["id"], user, text_of(cid))


async def test_graceful_shutdown_in_process(
    harness: Harness, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tsmsg")
    users = ["alice", "bob", "carol"]
    clients = {user: await harness.connect(user) for user in users}
    for client in clients.values():
        assert (await client.request("join", channel=CHANNEL))["t"] == "ok"
    acks, frames = await flood_and_stop(clients, ["alice", "bob"], harness.server.stopping.set)
    with trio.fail_after(10):
        while not any(r.getMessage() == "store closed" for r in caplog.records):
            await trio.sleep(0.01)
    for user, client in clients.items():
        if not client.eof:  # a sender's reader may have stopped at the last ack
            assert await client.closed()
        if user == "carol":
            assert_bye_then_eof(client, frames[user])
        else:
            # A sender may see ECONNRESET rather than EOF after its bye (see
            # test_bye_then_clean_eof_despite_unread_requests).
            byes = [f for f in frames[user] if f.get("t") == "bye"]
            assert [b["code"] for b in byes] == ["shutting_down"], frames[user][-5:]
    assert_acked_are_stored(acks, stored_log(Path(settings.data_dir)))
    assert any(r.getMessage().startswith("shutting down") for r in caplog.records)


async def test_sigterm_shuts_down_gracefully(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with server_process(data, tmp_path / "server.log") as server:
        users = ["alice", "bob", "carol"]
        clients = {user: await connect(server.port, user) for user in users}
        for client in clients.values():
            assert (await client.request("join", channel=CHANNEL))["t"] == "ok"
        acks, frames = await flood_and_stop(
            clients, ["alice"], lambda: server.proc.send_signal(signal.SIGTERM)
        )
        code = await server.wait()
        for user in ["bob", "carol"]:
            assert_bye_then_eof(clients[user], frames[user])
        assert [f["code"] for f in frames["alice"] if f.get("t") == "bye"] == ["shutting_down"]
        for client in clients.values():
            await client.aclose()
        log = server.log()
    assert code == 0, log
    for line in ("received SIGTERM", "shutting down", "store closed"):
        assert line in log
    assert log.index("shutting down") < log.index("store closed")
    stored = stored_log(data)
    assert_acked_are_stored(acks, stored)
    # bob and carol saw a dense prefix of the log live, in order.
    for user in ["bob", "carol"]:
        live = channel_events(frames[user])
        assert_dense(live)
        assert [e["id"] for e in live] == [e["id"] for e in stored[: len(live)]]


async def test_bye_then_clean_eof_despite_unread_requests(harness: Harness) -> None:
    client = await harness.connect("alice")
    # The drain has begun (the first thing shutdown() does): the reader takes this ping
    # off the socket and then reads no more...
    harness.server.draining = True
    await client.send({"t": "ping", "rid": 1})
    await trio.sleep(0.1)
    # ... so this one is still unread in the server's socket when it closes.
    await client.send({"t": "ping", "rid": 2})
    await trio.sleep(0.1)
    harness.server.stopping.set()
    await trio.sleep(0.3)  # the close has reached the client
    frames: list[dict[str, Any]] = []
    with trio.fail_after(5):
        try:
            while True:
                frames.append(await client.next())
        except EOFError:
            pass
    assert [f["t"] for f in frames] == ["bye"]


async def test_a_connection_made_while_draining_is_not_left_hanging(tmp_path: Path) -> None:
    from test_server_fanout import connect_small_buffer, running_server, send_pipelined

    # A client that does not read holds the drain open: 1 MiB of events (under the queue
    # limit, over the socket buffers) stands between it and its bye.
    limits = fast_limits()
    settings = make_settings(tmp_path / "data", shutdown_grace_s=3.0, limits=limits)
    async with running_server(settings) as h:
        stuck = await connect_small_buffer(h, "stuck")
        assert (await stuck.request("join", channel=CHANNEL))["t"] == "ok"
        sender = await h.connect("alice")
        items = [(f"f{k}", "x" * 4096) for k in range(256)]
        await send_pipelined(sender, items, window=32)
        h.server.stopping.set()
        await trio.sleep(0.2)  # the bye has gone out to every connection there was
        assert h.server.connections, "the drain should still be waiting for `stuck`"
        try:
            late = await h.raw()
        except OSError:
            return  # refused: fine
        # Refused after accept, or told bye: promptly, long before the grace ends.
        frames: list[dict[str, Any]] = []
        with trio.fail_after(1.0):
            await late.send({"t": "hello", "rid": 1, "v": 1, "token": mint("late")})
            await read_until_lost(late, frames)
        assert frames == [] or frames[-1]["t"] == "bye", frames


# ---------------------------------------------------------------------- crash isolation


async def test_a_crashing_handler_only_closes_its_own_connection(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tsmsg.protocol.session import HANDLERS, Session

    ping = Session._ping

    def exploding_ping(self: Session, frame: Any, rid: int | None, now_ms: int) -> Any:
        if self.user == "mallory":
            raise RuntimeError("injected handler crash")
        return ping(self, frame, rid, now_ms)

    monkeypatch.setitem(HANDLERS, "ping", exploding_ping)
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await bob.request("join", channel=CHANNEL)
    mallory = await harness.connect("mallory")
    await mallory.request("join", channel=CHANNEL)
    opened = harness.server.metrics.value("tsmsg_connections_opened_total")

    await mallory.send({"t": "ping", "rid": 1})
    assert await mallory.closed()

    # Everyone else is unaffected.
    assert (await alice.request("ping"))["t"] == "pong"
    sent = await alice.request("send", channel=CHANNEL, cid="x", text="still here")
    assert sent["t"] == "ok", sent
    event = await bob.expect("event", channel=CHANNEL)
    assert event["seq"] == sent["seq"]
    assert (await bob.request("ping"))["t"] == "pong"
    assert harness.server.metrics.value("tsmsg_connections_opened_total") == opened
    assert len(harness.server.connections) == 2
    assert all(conn.user != "mallory" for conn in harness.server.connections.values())
    assert CHANNEL in harness.server.members
    assert all(c.user != "mallory" for c in harness.server.members[CHANNEL])

    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert len(crashes) == 1
    assert "mallory" in crashes[0].getMessage()
    assert "injected handler crash" in caplog.text
    # mallory can reconnect and use the server normally for anything but ping.
    again = await harness.connect("mallory")
    assert (await again.request("join", channel=CHANNEL))["head"] == sent["seq"]


# ---------------------------------------------------------------------- command line


async def test_json_log_format(tmp_path: Path) -> None:
    # The flag wins over the environment, which wins over the config file.
    config = write_toml(tmp_path, 'log_format = "text"\nport = 1\n')
    env = {"TSMSG_LOG_FORMAT": "text"}
    args = ("--config", config, "--log-format", "json")
    async with server_process(tmp_path / "data", tmp_path / "server.log", *args, env=env) as server:
        client = await connect(server.port, "alice")
        await client.request("ping")
        await client.aclose()
        assert await server.terminate() == 0
        lines = server.log().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(entries) >= 4
    for entry in entries:
        assert isinstance(entry, dict)
        assert {"ts", "level", "logger", "message"} <= entry.keys()
    messages = [e["message"] for e in entries]
    assert any(SERVING.match(m) for m in messages)
    assert any(m.startswith("connect ") for m in messages)
    assert "store closed" in messages


async def test_serve_without_secret_fails_clearly(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tsmsg.cli", "serve", "--port", "0"]
    cmd += ["--data-dir", str(tmp_path / "data")]
    with trio.fail_after(START_TIMEOUT):
        result = await trio.run_process(
            cmd, env=server_env(secret=False), capture_stdout=True, capture_stderr=True, check=False
        )
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "TSMSG_SECRET is not set" in err
    assert "--dev" in err
    assert "Traceback" not in err
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


async def test_serve_with_a_bad_config_fails_clearly(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "max_queue_bytez = 5\n")
    cmd = [sys.executable, "-m", "tsmsg.cli", "serve", "--port", "0", "--config", config]
    env = server_env()
    with trio.fail_after(START_TIMEOUT):
        result = await trio.run_process(
            cmd, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "max_queue_bytez" in err
    assert "Traceback" not in err


async def test_serve_dev_prints_how_to_mint_a_token(tmp_path: Path) -> None:
    data, log_path = tmp_path / "data", tmp_path / "server.log"
    async with server_process(data, log_path, "--dev", secret=False) as server:
        log = server.log()
        assert " token --user alice " in log
        match = re.search(r"--secret-file (\S+)", log)
        assert match, log
        # The secret file printed holds the secret the server verifies tokens with.
        secret = Path(match.group(1)).read_bytes().strip()
        token = TokenIssuer(secret).issue("alice", ["*"], ["chat:read"], 60, now=int(time.time()))
        client = WireClient(await trio.open_tcp_stream("127.0.0.1", server.port))
        welcome = await client.request("hello", v=1, token=token)
        assert welcome["t"] == "welcome", welcome
        await client.aclose()
        assert await server.terminate() == 0


# ---------------------------------------------------------------------- settings


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tsmsg.toml"
    path.write_text(text)
    return str(path)


def test_settings_defaults() -> None:
    assert load_settings(None, {}, None) == Settings()
    # Unrelated TSMSG_* variables (the secret) are not settings.
    assert load_settings(None, {"TSMSG_SECRET": "x" * 40}, {}) == Settings()


def test_store_config_from_settings() -> None:
    """Seconds become the store's milliseconds; 0 turns a retention limit or the
    background compaction off."""
    policy = store_config(Settings()).compaction
    assert policy == CompactionPolicy(
        keep_recent=1000, tombstone_retention_ms=86_400_000, interval_s=3600.0
    )
    env = {
        "TSMSG_COMPACT_INTERVAL_S": "0",
        "TSMSG_RETENTION_MAX_AGE_S": "2.5",
        "TSMSG_RETENTION_MAX_COUNT": "7",
        "TSMSG_TOMBSTONE_RETENTION_S": "60",
        "TSMSG_COMPACT_KEEP_RECENT": "3",
        "TSMSG_DURABILITY": "async",
    }
    config = store_config(load_settings(None, env, None))
    assert config.durability == "async" and config.encryption is None
    assert config.compaction == CompactionPolicy(
        keep_recent=3, tombstone_retention_ms=60_000, max_age_ms=2500, max_count=7
    )


def test_settings_precedence_file_env_flags(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        """
port = 8000
max_queue_bytes = 1000
log_format = "json"
shutdown_grace_s = 2
host = "0.0.0.0"

[limits]
max_text_bytes = 100
frame_rate = 50
""",
    )
    env = {
        "TSMSG_PORT": "9000",
        "TSMSG_HOST": "127.0.0.2",
        "TSMSG_DEV": "yes",
        "TSMSG_LIMITS_MAX_TEXT_BYTES": "200",
        "TSMSG_SEND_TIMEOUT_S": "1.5",
    }
    flags = {"port": 9100, "data_dir": None, "durability": "async"}
    s = load_settings(config, env, flags)
    assert s.port == 9100  # flag over env over file
    assert s.host == "127.0.0.2"  # env over file
    assert s.max_queue_bytes == 1000  # file over default
    assert s.log_format == "json"
    assert s.shutdown_grace_s == 2.0 and isinstance(s.shutdown_grace_s, float)
    assert s.send_timeout_s == 1.5
    assert s.dev is True
    assert s.durability == "async"
    assert s.data_dir == Settings().data_dir  # a None flag is "not given"
    assert s.limits == Limits(max_text_bytes=200, frame_rate=50.0)
    # Without the env, the file's values show through.
    s = load_settings(config, {}, None)
    assert (s.port, s.host, s.limits.max_text_bytes) == (8000, "0.0.0.0", 100)


@pytest.mark.parametrize(
    ("toml", "env", "flags", "named"),
    [
        ("bogus = 1\n", {}, {}, "bogus"),
        ("[limits]\nmax_bogus = 1\n", {}, {}, "max_bogus"),
        ("", {}, {"no_such_flag": 1}, "no_such_flag"),
    ],
)
def test_settings_unknown_key(
    tmp_path: Path, toml: str, env: dict[str, str], flags: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        load_settings(write_toml(tmp_path, toml), env, flags)


@pytest.mark.parametrize(
    ("toml", "env", "named"),
    [
        ('port = "eighty"\n', {}, "port"),
        ("port = 1.5\n", {}, "port"),
        ("port = true\n", {}, "port"),
        ("host = 5\n", {}, "host"),
        ('dev = "maybe"\n', {}, "dev"),
        ("limits = 5\n", {}, "limits"),
        ('[limits]\nmax_frame = "big"\n', {}, "max_frame"),
        ("", {"TSMSG_MAX_QUEUE_BYTES": "lots"}, "max_queue_bytes"),
        ("", {"TSMSG_LIMITS_FRAME_RATE": "fast"}, "frame_rate"),
        ('durability = "sometimes"\n', {}, "durability"),
        ('log_format = "xml"\n', {}, "log_format"),
    ],
)
def test_settings_wrong_type(tmp_path: Path, toml: str, env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        load_settings(write_toml(tmp_path, toml), env, None)


async def test_a_peer_closing_with_nothing_to_send_costs_no_writer_task(
    harness: Harness,
) -> None:
    """A disconnect is as common as a connect: a peer's EOF with nothing left to send
    closes the connection at once, without starting a writer task to flush nothing; one
    with a reply still owed (a send in flight) gets it first."""
    started: list[str] = []

    class Writers(trio.abc.Instrument):  # the writer tasks started (compiled or not)
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            if task.name.endswith("Connection.writer"):
                started.append(task.name)

    trio.lowlevel.add_instrument(Writers())
    for _ in range(3):
        client = await harness.connect("alice")
        assert (await client.request("ping"))["t"] == "pong"
        await client.aclose()
    with trio.fail_after(5):
        while harness.server.connections:
            await trio.sleep(0.01)
    assert started == []

    client = await harness.connect("bob")  # half-closes with a send in flight: acked
    await client.send({"t": "send", "rid": 7, "channel": "room", "cid": "c1", "text": "hi"})
    await client.stream.send_eof()
    with trio.fail_after(5):
        reply = await client.next()
    assert (reply["t"], reply["rid"]) == ("ok", 7), reply
    await client.aclose()
