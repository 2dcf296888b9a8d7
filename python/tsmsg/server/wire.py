"""The transports a connection speaks the protocol over: where bytes become frames and
frames become bytes. Everything above (Session, Connection, the hub) sees frames only.

- TCP (PROTOCOL.md section 3): length-prefixed msgpack, the Rust codec.
- WebSocket (PROTOCOL.md section 19): one frame per WebSocket message, as msgpack in a
  binary message (``tsmsg.v1.msgpack``) or as JSON in a text message (``tsmsg.v1.json``).
  wsproto does the WebSocket framing, sans-IO like the Session: bytes in, events out.

A :class:`Transport` is per connection (a WebSocket's decoder state); its
:class:`Codec` is shared by every connection of one kind, so a fan-out encodes a frame
once per codec, not once per member.
"""

from __future__ import annotations

import base64
import json
import math
import os
from typing import Any, Protocol

import trio
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason, FrameProtocol

from tsmsg._native import FrameDecoder, FrameError, FrameTooLarge, encode, packb, unpackb
from tsmsg.protocol import errors as E

RECEIVE_CHUNK = 64 * 1024  # bytes per socket read (plaintext, or TLS records)

SUBPROTOCOL_MSGPACK = "tsmsg.v1.msgpack"
SUBPROTOCOL_JSON = "tsmsg.v1.json"
SUBPROTOCOLS = (SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON)  # the server's preference order
# JSON integers outside msgpack's range cannot be stored or relayed: a bad_frame, as an
# out-of-range msgpack value is.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
# JavaScript numbers hold integers exactly up to 2**53 - 1 (Number.MAX_SAFE_INTEGER): a
# JSON client gets a larger integer (an epoch, a big value in meta) as its decimal string,
# and may send `epoch` back as one (PROTOCOL.md 19.2).
JS_SAFE_INT = 2**53 - 1
MAX_INT_DIGITS = len(str(INT_MAX))  # 20: the most digits an `epoch` string converts


class Codec(Protocol):
    def encode(self, frame: dict[str, Any]) -> bytes:
        """One server frame, as the bytes to write to the stream."""
        ...


class Decoder(Protocol):
    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (the frame deadline runs while > 0)."""
        ...

    def feed(self, data: bytes | bytearray) -> list[dict[str, Any]]:
        """The frames completed by ``data``; FrameError on a framing or decoding error."""
        ...


class Transport(Protocol):
    name: str  # in logs
    codec: Codec

    def decoder(self, max_frame: int, max_depth: int) -> Decoder: ...

    def take_control(self) -> bytes:
        """Bytes the transport itself must send after a feed (a WebSocket pong)."""
        ...

    @property
    def ended(self) -> bool:
        """The peer closed the transport in-band (a WebSocket close): an EOF."""
        ...

    def goodbye(self, reason: str) -> bytes:
        """The transport's last bytes before the server closes (a WebSocket close)."""
        ...


class TcpCodec:
    encode = staticmethod(encode)  # the extension's, called directly: once per reply


class Tcp:
    """Length-prefixed msgpack (PROTOCOL.md section 3). Stateless: one for all."""

    name = "tcp"
    codec: Codec = TcpCodec()
    ended = False

    def decoder(self, max_frame: int, max_depth: int) -> Decoder:
        return FrameDecoder(max_frame=max_frame, max_depth=max_depth)

    def take_control(self) -> bytes:
        return b""

    def goodbye(self, reason: str) -> bytes:
        return b""


TCP = Tcp()

# ----------------------------------------------------------------------------- WebSocket

# Server frames are unmasked, so one serialisation serves every member. A FrameProtocol
# keeps state only inside a fragmented message; every message here is one final frame.
_FRAMER = FrameProtocol(client=False, extensions=[])


def _binary_as_text(value: object) -> str:
    """A ``bin`` value (only in ``meta``, from a msgpack client) to a JSON client: its
    base64 text (PROTOCOL.md 19.2)."""
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class WsMsgpackCodec:
    def encode(self, frame: dict[str, Any]) -> bytes:
        return bytes(_FRAMER.send_data(packb(frame)))


def _js_safe(value: Any) -> Any:
    """``value`` with every integer beyond JS_SAFE_INT as its decimal string."""
    if type(value) is int:
        return value if -JS_SAFE_INT <= value <= JS_SAFE_INT else str(value)
    if isinstance(value, dict):
        return {k: _js_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_js_safe(v) for v in value]
    return value


class WsJsonCodec:
    def encode(self, frame: dict[str, Any]) -> bytes:
        text = json.dumps(
            _js_safe(frame),
            ensure_ascii=False,
            separators=(",", ":"),
            default=_binary_as_text,
            allow_nan=False,  # NaN and infinity are not JSON: a ValueError, not "NaN"
        )
        return bytes(_FRAMER.send_data(text))


WS_CODECS: dict[str, Codec] = {
    SUBPROTOCOL_MSGPACK: WsMsgpackCodec(),
    SUBPROTOCOL_JSON: WsJsonCodec(),
}


def _bad_constant(name: str) -> Any:
    raise FrameError(f"{name} is not a JSON number the protocol accepts")


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FrameError(f"number {text[:40]} is not finite")
    return value


def _json_int(text: str) -> int:
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise FrameError(f"integer {text[:40]} is outside the 64-bit range")
    return value


def _depth(value: Any) -> int:
    """Nesting of arrays and maps, the frame's own map being 1 (PROTOCOL.md section 3)."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def decode_json(text: str, max_depth: int) -> dict[str, Any]:
    """One ``tsmsg.v1.json`` message as a frame; FrameError as for a bad msgpack frame."""
    try:
        frame = json.loads(
            text, parse_int=_json_int, parse_float=_json_float, parse_constant=_bad_constant
        )
    except FrameError:
        raise
    except RecursionError:
        raise FrameError(f"JSON nests deeper than max_depth {max_depth}") from None
    except ValueError as exc:
        raise FrameError(f"invalid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise FrameError("the message is not a JSON object")
    try:
        deep = _depth(frame) > max_depth
    except RecursionError:
        deep = True
    if deep:  # before the encoder's check below, whose own depth limit would fail first
        raise FrameError(f"JSON nests deeper than max_depth {max_depth}")
    try:
        # JSON's \u escapes can spell lone surrogates, which no codec can send back (and
        # msgpack's strings, UTF-8 checked, never hold): refused like invalid UTF-8.
        packb(frame)
    except Exception:
        raise FrameError("invalid string in JSON (a lone surrogate escape)") from None
    epoch = frame.get("epoch")
    if isinstance(epoch, str) and epoch.isascii() and epoch.isdigit():
        # As the server sent it (JS_SAFE_INT). More digits than any 64-bit value has stay
        # a string, which the request refuses (bad_request) as it does an int out of
        # range: int() of thousands of digits would raise, or cost quadratic time.
        if len(epoch.lstrip("0")) <= MAX_INT_DIGITS:
            frame["epoch"] = int(epoch)
    return frame


# Pongs waiting to be queued per read: pings beyond are not answered (RFC 6455 lets an
# endpoint answer only the latest; a peer pinging at line rate gets no memory from it).
MAX_PONG_BYTES = 4096

# Close codes (RFC 6455 7.4.1) by the reason the server closes for.
CLOSE_NORMAL = int(CloseReason.NORMAL_CLOSURE)  # 1000: a bye, or the peer closed first
CLOSE_GOING_AWAY = int(CloseReason.GOING_AWAY)  # 1001: the server shuts down
CLOSE_PROTOCOL = int(CloseReason.PROTOCOL_ERROR)  # 1002: broken WebSocket framing
CLOSE_BAD_DATA = int(CloseReason.INVALID_FRAME_PAYLOAD_DATA)  # 1007: bad_frame
CLOSE_POLICY = int(CloseReason.POLICY_VIOLATION)  # 1008: any other connection error
CLOSE_TOO_BIG = int(CloseReason.MESSAGE_TOO_BIG)  # 1009: frame_too_large
CLOSE_TRY_AGAIN = int(CloseReason.TRY_AGAIN_LATER)  # 1013: rate_limited at admission
MAX_CLOSE_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes, 2 for the code


def close_code(reason: str) -> int:
    """The WebSocket close code for a connection's close reason (``code: message`` for a
    connection error, else a description)."""
    code = reason.partition(":")[0]
    if reason == "server shutdown":
        return CLOSE_GOING_AWAY
    if code == E.FRAME_TOO_LARGE:
        return CLOSE_TOO_BIG
    if code == E.BAD_FRAME:
        return CLOSE_BAD_DATA
    if code == E.RATE_LIMITED:
        return CLOSE_TRY_AGAIN
    if code.isidentifier() and code.islower():  # any other connection error's code
        return CLOSE_POLICY
    return CLOSE_NORMAL


class WebSocket:
    """A WebSocket connection after its upgrade: wsproto's state machine, the chosen
    subprotocol's codec, and the message being received."""

    def __init__(self, subprotocol: str) -> None:
        self.name = f"ws {subprotocol}"
        self.codec = WS_CODECS[subprotocol]
        self.text = subprotocol == SUBPROTOCOL_JSON
        self.ws = WsConnection(ConnectionType.SERVER)
        self.parts: list[bytes | str] = []  # of the message being received
        self.partial = 0  # their size
        self.max_frame = self.max_depth = 0
        self.control = b""
        self.closed_by_peer = False
        self.close_sent = False
        self.failed_code: int | None = None  # a framing failure: the close code to use

    def decoder(self, max_frame: int, max_depth: int) -> Decoder:
        self.max_frame, self.max_depth = max_frame, max_depth
        return self

    @property
    def ended(self) -> bool:
        return self.closed_by_peer

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message: its parts so far, and what wsproto holds of a
        frame not yet complete (a header alone, a data frame begun, a control frame):
        the frame deadline runs while there are any (slowloris). wsproto does not
        expose its frame decoder's state; without it only the idle timeout applies."""
        frames = getattr(getattr(self.ws, "_proto", None), "_frame_decoder", None)
        held = len(getattr(frames, "buffer", b""))
        begun = getattr(frames, "header", None) is not None
        return self.partial + held + (1 if begun else 0)

    def take_control(self) -> bytes:
        data, self.control = self.control, b""
        return data

    def feed(self, data: bytes | bytearray) -> list[dict[str, Any]]:
        self.ws.receive_data(bytes(data))
        frames: list[dict[str, Any]] = []
        for event in self.ws.events():
            if isinstance(event, Message):
                frame = self._message(event)
                if frame is not None:
                    frames.append(frame)
            elif isinstance(event, Ping):
                if len(self.control) < MAX_PONG_BYTES:  # a peer that never reads: drop
                    self.control += self.ws.send(event.response())
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    # The peer's close frame, whatever its code: an EOF, pending acks
                    # are still sent (a parse failure leaves the state OPEN, below).
                    self.closed_by_peer = True
                    break
                self._fail(event.code, f"WebSocket protocol error: {event.reason}")
            # a Pong: nothing to do (the server sends no pings of its own)
        return frames

    def _fail(self, code: int, message: str) -> None:
        self.failed_code = code
        if code == CloseReason.INVALID_FRAME_PAYLOAD_DATA:
            raise FrameError(f"invalid UTF-8 in a text message: {message}")
        raise FrameError(message)

    def _message(self, event: Message[Any]) -> dict[str, Any] | None:
        self.parts.append(event.data)
        self.partial += len(event.data)  # a str: characters, <= its UTF-8 bytes
        if self.partial > self.max_frame:
            self.failed_code = CLOSE_TOO_BIG
            raise FrameTooLarge(
                f"message of more than {self.partial} bytes exceeds max_frame {self.max_frame}"
            )
        if not event.message_finished:
            return None
        parts, self.parts, self.partial = self.parts, [], 0
        if isinstance(event, TextMessage) != self.text:
            self.failed_code = CLOSE_BAD_DATA
            kind, want = ("text", "binary") if self.text is False else ("binary", "text")
            raise FrameError(
                f"a {kind} message on this subprotocol, which takes {want} messages only"
            )
        if isinstance(event, TextMessage):
            text = "".join(p for p in parts if isinstance(p, str))
            if len(text.encode()) > self.max_frame:
                self.failed_code = CLOSE_TOO_BIG
                raise FrameTooLarge(f"message exceeds max_frame {self.max_frame} bytes")
            return decode_json(text, self.max_depth)
        assert isinstance(event, BytesMessage)
        body = b"".join(p for p in parts if isinstance(p, bytes | bytearray))
        if not body:
            raise FrameError("an empty message is not a msgpack map")
        try:
            frame = unpackb(body, self.max_depth)
        except FrameError:
            raise
        except ValueError as exc:
            raise FrameError(str(exc)) from None
        if not isinstance(frame, dict):
            raise FrameError("the message is not a msgpack map")
        return frame

    def goodbye(self, reason: str) -> bytes:
        """A close frame, once; after a framing failure with the failure's code."""
        if self.close_sent:
            return b""
        self.close_sent = True
        code = self.failed_code or close_code(reason)
        text = reason.encode()[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")
        try:
            return self.ws.send(CloseConnection(code, text))
        except Exception:  # wsproto's state says closed already: nothing more to send
            return b""


class FdReceive:
    """A socket's receive (plaintext TCP, and TlsStream's records): ``os.read`` on its
    fd. After a read that emptied the socket (fewer bytes than asked for), the next one
    waits for the fd first: trying it at once would mostly fail with EAGAIN, a wasted
    syscall and exception per wake-up (a third of the reads in fan-in, issue 17). The
    first read is tried at once unless ``drained``: a client sends its hello (or TLS
    ClientHello) as soon as it is connected, so it is mostly there by the time the server
    reads, and waiting would cost the fd's registration with trio (bench/README.md,
    "Connects: the first read, presence in batches"). Either way a receive yields once,
    so a busy peer cannot starve the rest."""

    __slots__ = ("drained", "fd")

    def __init__(self, fd: int, drained: bool = False) -> None:
        self.fd = fd
        self.drained = drained

    async def __call__(self) -> bytes:
        fd = self.fd
        if self.drained:
            await trio.lowlevel.wait_readable(fd)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = os.read(fd, RECEIVE_CHUNK)
            except BlockingIOError:
                data = None  # waited for below, not in this handler: it would keep the
                # exception (and its traceback) alive for as long as the connection idles
            except OSError as exc:  # reported as trio's SocketStream reports it
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            if data is not None:
                self.drained = len(data) < RECEIVE_CHUNK
                return data
            await trio.lowlevel.wait_readable(fd)


async def close_stream(stream: trio.abc.Stream) -> None:
    """Close a connection's stream, also while the server is being cancelled. A plain
    socket closes at once (what its ``aclose`` does, without the checkpoint and the two
    cancel scopes: ~14 µs of a connect's ~270 here); any other stream (TLS: its socket
    too) within a second."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()
        return
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        await stream.aclose()
