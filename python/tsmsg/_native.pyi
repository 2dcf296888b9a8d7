"""Type stubs for the private Rust extension `tsmsg._native` (checked by mypy.stubtest)."""

from collections.abc import Callable, Iterable
from typing import Any, Final, Self, final

from typing_extensions import Buffer

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_FRAME",
    "AppendBatch",
    "DedupRing",
    "EncodeError",
    "FrameDecoder",
    "FrameError",
    "FrameTooLarge",
    "HmacJwt",
    "InvalidMsgpack",
    "InvalidUtf8",
    "LengthOverrun",
    "MalformedJws",
    "NonStringKey",
    "NotAMap",
    "TlsConfig",
    "TlsError",
    "TlsSession",
    "TooDeep",
    "TrailingBytes",
    "UnsupportedType",
    "dedup_key",
    "encode",
    "encode_many",
    "jws_parts",
    "packb",
    "unpackb",
]

DEFAULT_MAX_FRAME: Final[int]  # 1048576: largest frame body, in bytes
DEFAULT_MAX_DEPTH: Final[int]  # 32: deepest nesting of arrays and maps (a frame's map is 1)

# Exceptions (re-exported by tsmsg.errors). Messages name the violated limit or the byte
# offset; the streaming decoder adds "(frame at stream offset N)".
class FrameError(ValueError):
    """A frame could not be decoded; the base of every decode failure class."""

class FrameTooLarge(FrameError):
    """A frame length exceeds max_frame (raised from the 4-byte header alone)."""

class InvalidMsgpack(FrameError):
    """Not msgpack: reserved byte 0xc1, an empty body, a value cut short in the frame."""

class TrailingBytes(FrameError):
    """The body holds bytes after its one value."""

class NotAMap(FrameError):
    """The frame body is not a msgpack map."""

class NonStringKey(FrameError):
    """A map key, at any nesting level, is not a string."""

class TooDeep(FrameError):
    """Arrays and maps nest deeper than max_depth."""

class InvalidUtf8(FrameError):
    """A msgpack string is not valid UTF-8."""

class LengthOverrun(FrameError):
    """A str/bin/array/map header declares more than the bytes left in the frame."""

class UnsupportedType(FrameError):
    """A msgpack ext type (fixext, ext 8/16/32, timestamps): not in the wire format."""

class EncodeError(ValueError):
    """A value that cannot be encoded: unsupported type, int outside [-2**63, 2**64),
    non-str map key, nesting deeper than 32, a frame body that is not a dict."""

def dedup_key(chan_id: int, sender: str, cid: str) -> bytes:
    """A cid's key in the dedup journal and ring: the channel id (big-endian u64), the
    sender's UTF-8, NUL, the cid's UTF-8."""

def encode(obj: dict[str, Any], max_frame: int | None = None) -> bytes:
    """One frame: 4-byte big-endian length + msgpack map, byte-identical to
    ``msgpack.packb(obj)`` after the header. A non-dict ``obj`` raises EncodeError (it is
    the caller's bug, not bad input); a body over ``max_frame`` raises FrameTooLarge."""

def encode_many(objs: Iterable[dict[str, Any]], max_frame: int | None = None) -> bytes:
    """The frames of every dict in ``objs``, concatenated into one buffer."""

def packb(obj: Any) -> bytes:
    """A bare msgpack value (no length prefix) of any supported type."""

def unpackb(data: Buffer, max_depth: int = 32) -> Any:
    """The inverse of packb: exactly one value filling ``data``; FrameError subclasses on
    bad input (TrailingBytes, InvalidMsgpack, ...)."""

@final
class FrameDecoder:
    """Streaming decoder: ``feed`` bytes in any chunking, get complete frames in order.

    ``max_depth`` may be at most 512 (ValueError above: it bounds native recursion).
    Holds at most one incomplete frame. After any error it raises FrameError on every
    later ``feed`` (frames completed earlier in the failing call are dropped: the
    connection is closed anyway)."""

    def __new__(cls, max_frame: int = 1048576, max_depth: int = 32) -> Self: ...
    @property
    def max_frame(self) -> int: ...
    @property
    def max_depth(self) -> int: ...
    @property
    def buffered(self) -> int:
        """Bytes held of an incomplete frame."""

    def feed(self, data: Buffer) -> list[dict[str, Any]]: ...

@final
class AppendBatch:
    """One batch's new messages for the LMDB store's writer (rust/src/py_append.rs)."""

    def __new__(
        cls,
        ring: DedupRing,
        unsynced: dict[bytes, int],
        ts: int,
        next_order: int,
        channel: Callable[[str], tuple[dict[str, int], bytes, str]],
        seal: Callable[[dict[str, Any], bytes], dict[str, Any]] | None,
        result: Callable[[str, int, str, int], Any],
        max_user_bytes: int,
        max_cid_chars: int,
    ) -> Self: ...
    def append(self, op: Any) -> Any: ...
    def take(self) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]: ...
    @property
    def journal(self) -> list[tuple[bytes, bytes]]: ...
    @property
    def new_cids(self) -> dict[bytes, int]: ...

@final
class DedupRing:
    def __new__(cls, capacity: int, max_key_len: int = 256) -> Self: ...
    @property
    def capacity(self) -> int: ...
    @property
    def max_key_len(self) -> int: ...
    def get(self, key: str | bytes) -> int | None: ...
    def get_cid(self, chan_id: int, sender: str, cid: str) -> int | None: ...
    def insert(self, key: str | bytes, seq: int) -> int | None: ...
    def insert_all(self, items: dict[bytes, int]) -> None: ...
    def forget_oldest(self, key: object) -> bool: ...
    def __contains__(self, key: object) -> bool: ...
    def __len__(self) -> int: ...

class TlsError(Exception):
    """A TLS protocol failure (a failed handshake, a bad record, an alert from the peer)."""

@final
class TlsConfig:
    """A server's TLS settings: certificate chain, private key, optional client CAs (PEM)."""

    def __new__(
        cls, cert_pem: Buffer, key_pem: Buffer, client_ca_pem: Buffer | None = None
    ) -> Self: ...
    @property
    def client_certificates(self) -> bool: ...
    @property
    def versions(self) -> list[str]: ...

@final
class TlsSession:
    """One server-side TLS connection driven by bytes (rustls, unbuffered)."""

    def __new__(cls, config: TlsConfig) -> Self: ...
    def receive(self, ciphertext: Buffer) -> tuple[bytes, bool]: ...
    def encrypt(self, plaintext: Buffer) -> bytes: ...
    def take_outgoing(self) -> bytes: ...
    @property
    def handshaking(self) -> bool: ...
    @property
    def peer_closed(self) -> bool: ...
    @property
    def partial_record(self) -> bool: ...
    @property
    def wants_write(self) -> bool: ...

class MalformedJws(Exception):
    """A token that is not three parts of canonical unpadded base64url."""

def jws_parts(token: str) -> tuple[bytes, bytes, bytes]:
    """A token's parts decoded: header JSON, payload JSON, signature."""

@final
class HmacJwt:
    """Verifies HMAC signatures (HS256/384/512) against secrets, the current one first."""

    def __new__(cls, algorithm: str, secrets: list[bytes]) -> Self: ...
    def verify(self, signing_input: Buffer, signature: Buffer) -> bool: ...
