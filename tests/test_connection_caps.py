"""Caps on connections open at once (PROTOCOL.md 16.3, issue 18 item 2), over real TCP:
per client IP (``ip_max_connections``), per user (``user_max_connections``) and in all
(``max_connections``, never above RLIMIT_NOFILE minus ``FD_RESERVE``). A connection over a
cap gets one ``rate_limited`` frame naming the limit and is closed; other addresses and
users are unaffected, and the connections already open keep being served."""

from __future__ import annotations

import resource
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from conftest import Harness, WireClient, make_settings, mint, running_server
from tsmsg.server.app import CAP_RETRY_AFTER_MS, FD_RESERVE, connection_cap

OTHER_IP = "127.0.0.2"  # loopback too: the server on 127.0.0.1 sees another client address


async def connect_from(h: Harness, source: str = "127.0.0.1") -> WireClient:
    stream = await trio.open_tcp_stream("127.0.0.1", h.server.port, local_address=source)
    client = WireClient(stream)
    h.clients.append(client)
    return client


async def hello(client: WireClient, user: str) -> dict[str, object]:
    return await client.request("hello", v=1, token=mint(user))


async def refused_at_admission(client: WireClient, user: str) -> dict[str, object]:
    """Say hello at once, like a real client; the refusal comes before it is read, so it
    carries no rid."""
    await client.send({"t": "hello", "rid": 1, "v": 1, "token": mint(user)})
    return await client.next()


async def refused_with(client: WireClient, reply: dict[str, object], needle: str) -> None:
    assert reply["t"] == "error" and reply["code"] == "rate_limited", reply
    assert reply["retry_after_ms"] == CAP_RETRY_AFTER_MS, reply
    assert needle in str(reply["message"]), reply
    assert await client.closed()


async def until(check: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not check():
            await trio.sleep(0.005)


async def test_connections_per_ip_are_capped(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path / "data", ip_max_connections=3)) as h:
        held = [await connect_from(h) for _ in range(2)]  # silent: they count from accept
        alice = await connect_from(h)
        assert (await hello(alice, "alice"))["t"] == "welcome"
        await until(lambda: h.server.open_by_ip["127.0.0.1"] == 3)
        fourth = await connect_from(h)
        reply = await refused_at_admission(fourth, "bob")
        await refused_with(fourth, reply, "ip_max_connections 3")
        # Another address is unaffected; so are the connections already open.
        other = await connect_from(h, OTHER_IP)
        assert (await hello(other, "bob"))["t"] == "welcome"
        assert (await alice.request("ping"))["t"] == "pong"
        # A connection that closes frees its slot.
        await held[0].aclose()
        await until(lambda: h.server.open_by_ip["127.0.0.1"] == 2)
        again = await connect_from(h)
        assert (await hello(again, "carol"))["t"] == "welcome"
        assert h.server.metrics.value("tsmsg_rate_limited_total") == 1


async def test_connections_per_user_are_capped(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path / "data", user_max_connections=2)) as h:
        phone, laptop = await h.connect("alice"), await h.connect("alice")
        third = await h.raw()
        await refused_with(third, await hello(third, "alice"), "user_max_connections 2")
        bob = await h.connect("bob")  # another user is unaffected
        for client in (phone, laptop, bob):
            assert (await client.request("ping"))["t"] == "pong"
        await phone.aclose()
        await until(lambda: h.server.open_by_user["alice"] == 1)
        await h.connect("alice")  # the closed device's slot is free again
        # A refused hello is no failed login: the IP is not locked out.
        assert h.server.metrics.value("tsmsg_auth_failures_total") == 0


async def test_at_the_total_cap_new_connections_are_refused_and_open_ones_served(
    tmp_path: Path,
) -> None:
    async with running_server(make_settings(tmp_path / "data", max_connections=3)) as h:
        alice, bob = await h.connect("alice"), await h.connect("bob")
        await connect_from(h, OTHER_IP)  # silent
        await until(lambda: h.server.open_sockets == 3)
        for source in ("127.0.0.1", OTHER_IP):  # whoever asks
            late = await connect_from(h, source)
            reply = await refused_at_admission(late, "carol")
            await refused_with(late, reply, "connection limit (3 connections)")
        for client in (alice, bob):
            joined = await client.request("join", channel="room")
            assert joined["t"] == "ok", joined
        sent = await alice.request("send", channel="room", cid="c1", text="still here")
        assert sent["t"] == "ok", sent
        assert (await bob.expect("event", channel="room"))["text"] == "still here"
        assert h.server.open_sockets == 3
        # Each refusal's frame was sent, and counted (over TLS none is: test_tls.py).
        assert h.server.metrics.value("tsmsg_error_frames_total", code="rate_limited") == 2


async def test_an_ipv4_client_is_one_address_on_a_dual_stack_port_and_an_ipv4_one(
    tmp_path: Path,
) -> None:
    """An IPv6 socket that takes IPv4 connections (host "::", or here its loopback-only
    form "::ffff:127.0.0.1") sees an IPv4 client as "::ffff:127.0.0.1"; the WebSocket port
    on an IPv4 address sees it as "127.0.0.1". The per-IP caps and rates count the two
    ports together (PROTOCOL.md 19): one address, one count."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::ffff:127.0.0.1", 0))
    except OSError as exc:
        pytest.skip(f"no dual-stack socket here: {exc}")
    settings = make_settings(tmp_path / "data", ip_max_connections=1)
    async with running_server(replace(settings, host="::ffff:127.0.0.1")) as h:
        alice = await connect_from(h)  # IPv4, through the IPv6 socket
        assert (await hello(alice, "alice"))["t"] == "welcome"
        assert list(h.server.open_by_ip) == ["127.0.0.1"]
        assert h.server.ws_port is not None
        stream = await trio.open_tcp_stream("127.0.0.1", h.server.ws_port)
        with trio.fail_after(5):
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some(65536):
                reply += chunk
        await stream.aclose()
        assert reply.startswith(b"HTTP/1.1 503 ") and b"ip_max_connections 1" in reply, reply
        assert (await alice.request("ping"))["t"] == "pong"


def test_connection_cap_is_the_setting_within_the_fd_limit() -> None:
    assert connection_cap(0, 1024) == 1024 - FD_RESERVE
    assert connection_cap(100, 1024) == 100
    assert connection_cap(5000, 1024) == 1024 - FD_RESERVE  # the fds decide
    assert connection_cap(0, resource.RLIM_INFINITY) == sys.maxsize
    assert connection_cap(7, resource.RLIM_INFINITY) == 7
    assert connection_cap(0, FD_RESERVE) == 1  # never 0: one connection at least
