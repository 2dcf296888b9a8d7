"""Python heap per WebSocket connection in the server, by tracemalloc (the figures in
bench/README.md, "WebSocket"): the transport (wire.WebSocket with wsproto's Connection,
after one message), and what Web.handle's frame keeps of the upgrade (head, h11.Request,
the 101 response) while it awaits _serve_connection.

    PYTHONPATH=python .venv/bin/python bench/results/2026-12-06-ws/profile/ws_memory.py
"""

import gc
import tracemalloc
from typing import Any

from wsproto.frame_protocol import FrameProtocol

from tsmsg._native import packb
from tsmsg.server import web
from tsmsg.server.wire import SUBPROTOCOL_MSGPACK, WebSocket

N = 2000
HEAD = (
    b"GET /connect HTTP/1.1\r\nHost: 127.0.0.1:37349\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Protocol: tsmsg.v1.msgpack\r\nOrigin: http://127.0.0.1:37349\r\n\r\n"
)


class FakeServer:
    class settings:
        ws_allowed_origins = ()

    tls = None


def per_object(make: Any) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    keep = [make() for _ in range(N)]
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    del keep
    return sum(s.size_diff for s in after.compare_to(before, "filename")) / N


def transport() -> WebSocket:
    msg = bytes(FrameProtocol(client=True, extensions=[]).send_data(packb({"t": "ping"})))
    w = WebSocket(SUBPROTOCOL_MSGPACK)
    w.decoder(1 << 20, 32)
    w.feed(msg)
    return w


def upgrade_locals() -> tuple[bytes, Any, bytes]:
    head = bytes(bytearray(HEAD))
    request = web.parse_head(head)
    _, accept = web.Web(FakeServer())._upgrade(request, head)  # type: ignore[arg-type]
    return head, request, accept


print(f"wire.WebSocket after one message: {per_object(transport):.0f} B")
print(f"Web.handle's upgrade locals (head, request, accept): {per_object(upgrade_locals):.0f} B")
