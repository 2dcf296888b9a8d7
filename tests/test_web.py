"""The WebSocket port (PROTOCOL.md section 19) beyond what the parameterized protocol suites
(test_server_requests.py, test_server_fanout.py) already run over it: the upgrade and its
refusals, the transport's own errors and close codes, WebSocket pings, the page's files
and the dev-only token endpoint. Every bad input is checked to leave the other
connections alone."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from wsproto.events import CloseConnection, Pong
from wsproto.frame_protocol import FrameProtocol, Opcode

from conftest import (
    SECRET,
    WIRE_TIMEOUT,
    WS_JSON,
    WS_MSGPACK,
    Harness,
    WireClient,
    WsFraming,
    make_settings,
    mint,
    running_server,
    ws_connect,
    ws_upgrade,
)
from tsmsg._native import FrameError
from tsmsg.auth import TokenIssuer, TokenVerifier
from tsmsg.server.app import Server
from tsmsg.server.settings import Settings, load_settings
from tsmsg.server.web import DEV_TOKEN_PATH
from tsmsg.server.wire import WS_CODECS, decode_json

ROOM = "room-1"


def framing(client: WireClient) -> WsFraming:
    assert isinstance(client.framing, WsFraming)
    return client.framing


async def upgrade(h: Harness, subprotocols: list[str], origin: str | None = None) -> WireClient:
    client = await ws_upgrade(h.server, subprotocols, origin=origin)
    h.clients.append(client)  # closed at the end of the test
    return client


async def hello(client: WireClient, user: str = "alice") -> None:
    welcome = await client.request("hello", v=1, token=mint(user))
    assert welcome["t"] == "welcome", welcome


async def connected(h: Harness, subprotocol: str, user: str = "alice") -> WireClient:
    client = await ws_connect(h.server, subprotocol)
    h.clients.append(client)  # closed at the end of the test
    await hello(client, user)
    return client


async def assert_open(client: WireClient) -> None:
    assert (await client.request("ping"))["t"] == "pong"


async def closed_with(client: WireClient, code: str, close_code: int) -> dict[str, Any]:
    """The connection error ``code`` arrives, then a close frame ``close_code``, then EOF."""
    error = await client.expect("error", code=code)
    assert "rid" not in error and error["message"], error
    assert await client.closed()
    assert framing(client).close_code == close_code, framing(client).close_reason
    return error


async def http_get(port: int, target: str, headers: dict[str, str] | None = None) -> Any:
    """One HTTP/1.1 request: (status, headers with lower-case names, body)."""
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    with trio.fail_after(WIRE_TIMEOUT):
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        while chunk := await stream.receive_some(65536):
            data += chunk
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), fields, body


# --- the upgrade ----------------------------------------------------------------------------


async def test_the_server_picks_the_clients_first_known_subprotocol(harness: Harness) -> None:
    client = await upgrade(harness, ["chat.v9", WS_JSON, WS_MSGPACK])
    assert framing(client).accepted == WS_JSON


@pytest.mark.parametrize("offered", [[], ["chat.v9"], ["tsmsg.v2.json"]], ids=repr)
async def test_an_upgrade_without_a_known_subprotocol_is_refused(
    harness: Harness, offered: list[str]
) -> None:
    other = await connected(harness, WS_MSGPACK)
    client = await upgrade(harness, offered)
    assert framing(client).accepted is None
    status, body = framing(client).rejected or (0, b"")
    assert status == 400
    assert b"tsmsg.v1.msgpack" in body and b"Sec-WebSocket-Protocol" in body
    await assert_open(other)


async def test_an_upgrade_from_another_origin_is_forbidden(harness: Harness) -> None:
    other = await connected(harness, WS_JSON)
    port = harness.server.ws_port
    evil = await upgrade(harness, [WS_JSON], origin="http://evil.example")
    assert (framing(evil).rejected or (0, b""))[0] == 403
    assert b"evil.example" in (framing(evil).rejected or (0, b""))[1]
    own = await upgrade(harness, [WS_JSON], origin=f"http://127.0.0.1:{port}")
    assert framing(own).accepted == WS_JSON
    await assert_open(other)


async def test_allowed_origins_are_a_setting(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", ws_allowed_origins=("https://chat.example",))
    async with running_server(settings) as h:
        good = await upgrade(h, [WS_JSON], origin="https://chat.example")
        assert framing(good).accepted == WS_JSON
        port = h.server.ws_port
        own = await upgrade(h, [WS_JSON], origin=f"http://127.0.0.1:{port}")
        assert (framing(own).rejected or (0, b""))[0] == 403


async def test_connect_without_an_upgrade_is_426(harness: Harness) -> None:
    assert harness.server.ws_port is not None
    status, headers, body = await http_get(harness.server.ws_port, "/connect")
    assert status == 426 and headers["upgrade"] == "websocket"
    assert b"WebSocket" in body


UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "keep-alive, Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",  # RFC 6455 1.3's example
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Protocol": WS_JSON,
}


async def test_the_101_is_rfc_6455s(harness: Harness) -> None:
    """The answer to RFC 6455's example key is its example accept value; the response
    names the subprotocol and nothing else is sent before the client speaks."""
    port = harness.server.ws_port
    assert port is not None
    lines = ["GET /connect HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in UPGRADE.items()]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(WIRE_TIMEOUT):
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += await stream.receive_some(4096)
    await stream.aclose()
    assert reply == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Sec-WebSocket-Protocol: " + WS_JSON.encode() + b"\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"Connection": "keep-alive"}, b"Connection: Upgrade"),
        ({"Sec-WebSocket-Version": "12"}, b"Sec-WebSocket-Version must be 13"),
        ({"Sec-WebSocket-Version": None}, b"Sec-WebSocket-Version must be 13"),
        ({"Sec-WebSocket-Key": None}, b"Sec-WebSocket-Key"),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, b"Sec-WebSocket-Key"),  # 5 bytes
        ({"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ!="}, b"Sec-WebSocket-Key"),
        ({"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZé="}, b"Sec-WebSocket-Key"),  # 24, not ASCII
    ],
    ids=[
        "no-connection-upgrade",
        "version-12",
        "no-version",
        "no-key",
        "short-key",
        "bad-key",
        "non-ascii-key",
    ],
)
async def test_a_malformed_upgrade_is_400_and_says_what(
    harness: Harness, change: dict[str, str | None], says: bytes
) -> None:
    assert harness.server.ws_port is not None
    headers = {k: v for k, v in {**UPGRADE, **change}.items() if v is not None}
    status, fields, body = await http_get(harness.server.ws_port, "/connect", headers)
    assert status == 400 and says in body, body
    if b"Version" in says:
        assert fields["sec-websocket-version"] == "13"


async def raw_status(port: int, head: bytes) -> int:
    """The status of the server's answer to ``head`` (bytes as they are)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reply = b""
    with trio.fail_after(WIRE_TIMEOUT):
        await stream.send_all(head)
        while b"\r\n\r\n" not in reply:
            chunk = await stream.receive_some(4096)
            assert chunk, reply
            reply += chunk
    await stream.aclose()
    return int(reply.split(b" ", 2)[1])


def upgrade_head(port: int, version: bytes = b"1.1", **fields: bytes | None) -> bytes:
    headers = {k.encode(): v.encode() for k, v in UPGRADE.items()}
    headers[b"Host"] = b"127.0.0.1:%d" % port
    for name, value in fields.items():
        key = name.replace("_", "-").encode()
        if value is None:
            headers.pop(key, None)
        else:
            headers[key] = value
    lines = [b"GET /connect HTTP/" + version] + [k + b": " + v for k, v in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        # Upgrade: the token websocket, not a word containing it (RFC 6455 4.2.1 item 3)
        ({"Upgrade": b"websockets"}, 426),
        ({"Upgrade": b"notwebsocket"}, 426),
        ({"Upgrade": b"websocket\xe9"}, 426),
        # Connection: the token Upgrade; a non-breaking space or NEL is no whitespace
        ({"Connection": b"upgrade\xa0"}, 400),
        ({"Connection": b"\x85Upgrade"}, 400),
        ({"Connection": b"keep-alive, upgrade\xa0"}, 400),
        # HTTP/1.1 at least (RFC 6455 4.1), with or without Host
        ({"version": b"1.0"}, 400),
        ({"version": b"1.0", "Host": None}, 400),
    ],
    ids=["websockets", "notwebsocket", "websocket-e9", "upgrade-nbsp", "nel-upgrade",
         "list-upgrade-nbsp", "http-1.0", "http-1.0-no-host"],
)  # fmt: skip
async def test_an_upgrade_is_read_token_by_token(
    harness: Harness, head: dict[str, bytes | None], expected: int
) -> None:
    """A review's finds: what the first hand-written checks let through to a 101."""
    port = harness.server.ws_port
    assert port is not None
    fields = dict(head)
    version = fields.pop("version", None) or b"1.1"
    assert await raw_status(port, upgrade_head(port, version, **fields)) == expected
    # The same head, well-formed, is upgraded (the checks are not refusing everything).
    assert await raw_status(port, upgrade_head(port)) == 101


async def test_a_malformed_request_is_400_and_an_unknown_path_404(harness: Harness) -> None:
    port = harness.server.ws_port
    assert port is not None
    assert (await http_get(port, "/nothing-here"))[0] == 404
    assert (await http_get(port, DEV_TOKEN_PATH + "?user=alice"))[0] == 404  # not --dev
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(WIRE_TIMEOUT):
        await stream.send_all(b"NONSENSE\r\n\r\n")
        reply = b""
        while chunk := await stream.receive_some(4096):
            reply += chunk
    await stream.aclose()
    assert reply.startswith(b"HTTP/1.1 400 ")


# --- the transport's errors ------------------------------------------------------------------


async def test_a_message_over_max_frame_is_frame_too_large(harness: Harness) -> None:
    other = await connected(harness, WS_MSGPACK, "bob")
    client = await connected(harness, WS_JSON)
    big = "x" * harness.server.settings.limits.max_frame
    await client.send({"t": "send", "rid": 5, "channel": ROOM, "cid": "c1", "text": big})
    await closed_with(client, "frame_too_large", 1009)
    await assert_open(other)


async def test_a_text_message_on_the_msgpack_subprotocol_is_bad_frame(harness: Harness) -> None:
    other = await connected(harness, WS_JSON, "bob")
    client = await connected(harness, WS_MSGPACK)
    await client.send_raw(framing(client).message('{"t": "ping"}'))
    error = await closed_with(client, "bad_frame", 1007)
    assert "text message" in error["message"]
    await assert_open(other)


async def test_a_binary_message_on_the_json_subprotocol_is_bad_frame(harness: Harness) -> None:
    client = await connected(harness, WS_JSON)
    await client.send_raw(framing(client).message(b"\x81\xa1t\xa4ping"))
    error = await closed_with(client, "bad_frame", 1007)
    assert "binary message" in error["message"]


async def test_invalid_utf8_in_a_text_message_is_bad_frame(harness: Harness) -> None:
    other = await connected(harness, WS_MSGPACK, "bob")
    client = await connected(harness, WS_JSON)
    masked = FrameProtocol(client=True, extensions=[])._serialize_frame(
        Opcode.TEXT, b'{"t":"\xff"}'
    )
    await client.send_raw(bytes(masked))
    error = await closed_with(client, "bad_frame", 1007)
    assert "UTF-8" in error["message"]
    await assert_open(other)


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[1, 2]",
        '"ping"',
        '{"t": "ping", "rid": 1e999}',
        '{"t": NaN}',
        "[" * 5000,
        '{"t": "presence", "status": "\\ud800"}',
        '{"t": "ping", "x": ' + "[" * 600 + "]" * 600 + "}",
    ],
    ids=["cut-short", "array", "string", "infinite", "nan", "deep", "surrogate", "deep-parsed"],
)
async def test_invalid_json_is_bad_frame(harness: Harness, text: str) -> None:
    other = await connected(harness, WS_JSON, "bob")
    client = await connected(harness, WS_JSON)
    await client.send_raw(framing(client).message(text))
    await closed_with(client, "bad_frame", 1007)
    await assert_open(other)


async def test_json_nesting_over_max_depth_is_bad_frame(harness: Harness) -> None:
    client = await connected(harness, WS_JSON)
    deep: Any = "x"
    for _ in range(harness.server.settings.limits.max_depth):
        deep = [deep]
    await client.send(
        {"t": "send", "rid": 2, "channel": ROOM, "cid": "c", "text": "", "meta": deep}
    )
    await closed_with(client, "bad_frame", 1007)


async def test_invalid_msgpack_is_bad_frame(harness: Harness) -> None:
    client = await connected(harness, WS_MSGPACK)
    await client.send_raw(framing(client).message(b"\xc1"))
    await closed_with(client, "bad_frame", 1007)


async def test_a_websocket_ping_is_answered(harness: Harness) -> None:
    client = await connected(harness, WS_MSGPACK)
    masked = FrameProtocol(client=True, extensions=[])._serialize_frame(
        Opcode.PING, b"are-you-there"
    )
    await client.send_raw(bytes(masked))
    pongs: list[bytes] = []
    ws = framing(client).ws
    with trio.fail_after(WIRE_TIMEOUT):
        while not pongs:
            data = await client.stream.receive_some(4096)
            ws.receive_data(data)
            pongs += [bytes(e.payload) for e in ws.events() if isinstance(e, Pong)]
    assert pongs == [b"are-you-there"]
    await assert_open(client)


@pytest.mark.parametrize("code", [1000, 4000, 3000, 1011])
async def test_a_client_close_still_gets_its_acks_then_a_close(harness: Harness, code: int) -> None:
    """Any close frame of the peer is its end of input (an application's own code too)."""
    client = await connected(harness, WS_JSON)
    await client.send({"t": "send", "rid": 9, "channel": ROOM, "cid": "c9", "text": "bye now"})
    await client.send_raw(framing(client).ws.send(CloseConnection(code)))
    ok = await client.next(lambda f: f.get("rid") == 9)
    assert ok["t"] == "ok" and ok["seq"] == 1
    assert await client.closed()
    assert framing(client).close_code == 1000


# --- values and lifecycle -------------------------------------------------------------------


async def test_bin_in_meta_reaches_a_json_client_as_base64(harness: Harness) -> None:
    sender = await connected(harness, WS_MSGPACK)
    reader = await connected(harness, WS_JSON, "bob")
    assert (await reader.request("join", channel=ROOM))["t"] == "ok"
    ok = await sender.request(
        "send", channel=ROOM, cid="b1", text="blob", meta={"thumb": b"\x00\x01\xff"}
    )
    assert ok["t"] == "ok", ok
    event = await reader.expect("event", seq=ok["seq"])
    assert event["meta"] == {"thumb": base64.b64encode(b"\x00\x01\xff").decode()}


async def test_a_membership_notice_reaches_websocket_clients_in_their_framing(
    harness: Harness,
) -> None:
    # A user notice (membership, PROTOCOL.md 7.12) is encoded per connection, like
    # presence: a TCP frame on a WebSocket would be garbage to the browser.
    sender = await connected(harness, WS_MSGPACK)
    readers = [await connected(harness, sub, "bob") for sub in (WS_JSON, WS_MSGPACK)]
    tcp = await harness.connect("bob", ["room-*"])
    ok = await sender.request("send", channel="dm:alice:bob", cid="m1", text="hi bob")
    assert ok["t"] == "ok", ok
    for reader in (*readers, tcp):
        push = await reader.expect("membership")
        assert push == {"t": "membership", "channel": "dm:alice:bob", "by": "alice"}
        await assert_open(reader)


async def test_shutdown_sends_bye_then_close_going_away(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path / "data")) as h:
        client = await connected(h, WS_JSON)
        h.server.stopping.set()
        bye = await client.expect("bye")
        assert bye["code"] == "shutting_down"
        assert await client.closed()
        assert framing(client).close_code == 1001


async def test_no_hello_in_time_is_hello_timeout_then_close_1008(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path / "data", hello_timeout_s=0.3)) as h:
        client = await upgrade(h, [WS_MSGPACK])
        assert framing(client).accepted == WS_MSGPACK
        await closed_with(client, "hello_timeout", 1008)


async def test_rate_limited_admission_is_a_frame_then_close_1013(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", ip_connect_rate=0.001, ip_connect_burst=1)
    async with running_server(settings) as h:
        first = await connected(h, WS_JSON)
        refused = await upgrade(h, [WS_JSON])
        error = await refused.expect("error", code="rate_limited")
        assert error["retry_after_ms"] > 0
        assert await refused.closed()
        assert framing(refused).close_code == 1013
        assert h.server.ws_port is not None
        status, headers, body = await http_get(h.server.ws_port, "/")  # the page too
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert body.startswith(b"rate_limited: ")
        await assert_open(first)


async def test_every_refusal_of_the_port_is_counted_by_its_scope(tmp_path: Path) -> None:
    """tsmsg_rate_limited_total counts connections refused with rate_limited (metrics.md):
    on this port the upgrade (a frame), the page (a 429) and a cap (a 503) alike."""
    settings = make_settings(tmp_path / "data", ip_connect_rate=0.001, ip_connect_burst=1)
    async with running_server(settings) as h:
        await connected(h, WS_JSON)  # the address's one token
        refused = await upgrade(h, [WS_JSON])
        await refused.expect("error", code="rate_limited")
        assert h.server.ws_port is not None
        status, _, body = await http_get(h.server.ws_port, "/")
        assert status == 429 and body.startswith(b"rate_limited: "), (status, body)
        metrics = h.server.metrics
        assert metrics.value("tsmsg_rate_limited_total", scope="ip_connect") == 2
        assert metrics.value("tsmsg_rate_limited_total") == 2


async def test_a_connection_over_the_ip_cap_gets_503_at_once(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path / "data", ip_max_connections=1)) as h:
        first = await connected(h, WS_JSON)
        refused = await upgrade(h, [WS_JSON])
        status, body = framing(refused).rejected or (0, b"")
        assert status == 503 and b"ip_max_connections 1" in body
        await assert_open(first)


# --- the page ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type", "needle"),
    [
        ("/", "text/html", b"<title>"),
        ("/app.js", "text/javascript", b"tsmsg.js"),
        ("/tsmsg.js", "text/javascript", b"export class TsmsgClient"),
        ("/tsmsg.d.ts", "text/plain", b"export declare class TsmsgClient"),
    ],
)
async def test_the_page_and_client_are_served(
    harness: Harness, path: str, content_type: str, needle: bytes
) -> None:
    assert harness.server.ws_port is not None
    status, headers, body = await http_get(harness.server.ws_port, path)
    assert status == 200 and headers["content-type"].startswith(content_type)
    assert needle in body
    assert "script-src" not in headers["content-security-policy"]  # default-src 'self'
    assert headers["x-content-type-options"] == "nosniff"


async def test_dev_mode_mints_tokens_for_the_page(tmp_path: Path) -> None:
    settings: Settings = make_settings(tmp_path / "data", dev=True)
    async with trio.open_nursery() as nursery:
        server = Server(settings, TokenVerifier(SECRET), dev_issuer=TokenIssuer(SECRET))
        await nursery.start(server.run)
        assert server.ws_port is not None
        status, _, body = await http_get(server.ws_port, DEV_TOKEN_PATH + "?user=zoe")
        assert status == 200
        token = json.loads(body)["token"]
        bad = await http_get(server.ws_port, DEV_TOKEN_PATH + "?user=%3Cscript%3E")
        assert bad[0] == 400
        client = await ws_connect(server, WS_JSON)
        welcome = await client.request("hello", v=1, token=token)
        assert welcome["t"] == "welcome" and welcome["user"] == "zoe"
        await client.aclose()
        server.stopping.set()


def test_ws_settings_from_the_environment_and_a_file(tmp_path: Path) -> None:
    env = {"TSMSG_WS": "127.0.0.1:7780", "TSMSG_WS_ALLOWED_ORIGINS": "https://a.example, *"}
    settings = load_settings(None, env)
    assert settings.ws == "127.0.0.1:7780"
    assert settings.ws_allowed_origins == ("https://a.example", "*")
    config = tmp_path / "tsmsg.toml"
    config.write_text('ws = "[::1]:7780"\nws_allowed_origins = ["https://b.example"]\n')
    assert load_settings(str(config), {}).ws_allowed_origins == ("https://b.example",)
    with pytest.raises(ValueError, match="ws must be HOST:PORT"):
        load_settings(None, {"TSMSG_WS": "7780"})
    config.write_text("ws_allowed_origins = [1]\n")
    with pytest.raises(ValueError, match="list of strings"):
        load_settings(str(config), {})


def test_json_carries_integers_beyond_2_53_as_strings() -> None:
    codec = WS_CODECS[WS_JSON]
    data = codec.encode({"t": "ok", "epoch": 2**60, "seq": 2**53 - 1, "meta": {"n": -(2**62)}})
    assert b'"epoch":"1152921504606846976"' in data and b'"seq":9007199254740991' in data
    assert b'"n":"-4611686018427387904"' in data
    assert decode_json('{"t":"sync","epoch":"1152921504606846976"}', 32)["epoch"] == 2**60


async def test_a_json_client_syncs_with_the_epoch_as_it_came(harness: Harness) -> None:
    client = await connected(harness, WS_JSON)
    await client.request("join", channel=ROOM)
    ok = await client.request("send", channel=ROOM, cid="e1", text="x")
    epoch = (await client.request("sync", channel=ROOM, since=0))["epoch"]
    assert isinstance(epoch, int)  # sent as a string when beyond 2**53 - 1 (exact_ints)
    reply = await client.request("sync", channel=ROOM, since=ok["seq"], epoch=str(epoch))
    assert reply["t"] == "ok" and reply["epoch"] == epoch, reply


async def test_an_http_request_after_the_upgrade_is_a_websocket_protocol_error(
    harness: Harness,
) -> None:
    """A review's find: bytes after the upgrade that look like an HTTP request got the TCP
    port's plain-text HTTP hint written into the WebSocket (bytes no WebSocket client can
    parse, then a close 1000), not the bad_frame and close 1002 of any protocol violation."""
    port = harness.server.ws_port
    assert port is not None
    for pipelined in (True, False):
        client = await upgrade(harness, [WS_JSON]) if not pipelined else None
        if client is None:  # the request right behind the upgrade, in the same write
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            client = WireClient(stream, WsFraming(WS_JSON))
            harness.clients.append(client)
            head = framing(client).upgrade(f"127.0.0.1:{port}", None, [WS_JSON])
            await stream.send_all(head + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        else:
            await client.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        error = await closed_with(client, "bad_frame", 1002)
        assert "WebSocket protocol error" in error["message"], error


def test_json_nesting_over_max_depth_says_so() -> None:
    """A review's find: between max_depth and the parser's recursion limit, the frame was
    refused as 'a lone surrogate escape' (the encoder's depth check failed first)."""
    for levels in (32, 200):
        text = '{"t":"ping","x":' + "[" * levels + "]" * levels + "}"
        with pytest.raises(FrameError, match="deeper than max_depth 32"):
            decode_json(text, 32)


async def test_an_epoch_string_of_too_many_digits_is_bad_request(harness: Harness) -> None:
    """A review's find: the string of digits was converted with int() outside any check,
    so one over Python's 4,300-digit limit raised a ValueError: an internal error (logged
    with its traceback), the connection dropped without an error frame or a close."""
    client = await connected(harness, WS_JSON)
    for epoch in ("1" * 5000, "1" * 21, str(2**64)):
        reply = await client.request("sync", channel=ROOM, since=0, epoch=epoch)
        assert reply["t"] == "error" and reply["code"] == "bad_request", reply
        assert "epoch" in reply["message"], reply
    await assert_open(client)


async def test_a_dev_token_ttl_that_is_no_decimal_number_is_400(tmp_path: Path) -> None:
    """A review's find: ttl_s was checked with str.isdigit(), true of '²' and of 5,000
    digits, which int() then refuses: a 500 (and a logged traceback) instead of a 400."""
    settings: Settings = make_settings(tmp_path / "data", dev=True)
    async with trio.open_nursery() as nursery:
        server = Server(settings, TokenVerifier(SECRET), dev_issuer=TokenIssuer(SECRET))
        await nursery.start(server.run)
        assert server.ws_port is not None
        for ttl in ("%C2%B2", "9" * 5000, "%D9%A3", "0", "3601"):
            status, _, body = await http_get(
                server.ws_port, f"{DEV_TOKEN_PATH}?user=zoe&ttl_s={ttl}"
            )
            assert status == 400 and b"ttl_s" in body, (ttl, status, body)
        status, _, body = await http_get(server.ws_port, f"{DEV_TOKEN_PATH}?user=zoe&ttl_s=0060")
        assert status == 200 and json.loads(body)["ttl_s"] == 60
        server.stopping.set()
