"""TLS on a plain socket, for the server side: :class:`TlsStream`.

trio's ``SSLStream`` gives every connection its own locks, conflict detectors and a
writer task (the flusher cannot write through it), and Python's ``ssl`` module keeps
16.8 KiB of OpenSSL state per connection, buffers included (issue 17). This stream drives
a ``TlsSession`` of the Rust extension (rustls's unbuffered connection: no buffer held
between records, rust/src/tls.rs) over the socket's fd the way the plaintext path does
(``os.read``/``os.write``, waiting with ``wait_readable``/``wait_writable``), so the
flusher writes TLS connections too (:meth:`TlsStream.try_send`) and an idle one holds no
task.

Semantics are trio's ``SSLStream(server_side=True, https_compatible=True)``, which it
replaced (PROTOCOL.md section 4): no ``close_notify`` is sent or required (an EOF without
one is a clean EOF), and a failed handshake or a TLS error is ``BrokenResourceError``
whose ``__cause__`` is the ``TlsError``. One reader and one writer at a time, as the
server uses it (the reader task receives; the flusher or the writer task sends).
"""

from __future__ import annotations

import os

import trio

from tsmsg._native import TlsConfig, TlsError, TlsSession
from tsmsg.server.wire import RECEIVE_CHUNK, FdReceive


class TlsStream(trio.abc.Stream):
    """A server-side TLS connection on ``tcp``'s socket."""

    __slots__ = (
        "_plain",
        "_receive",
        "_tls",
        "backlog",
        "closed",
        "fd",
        "handshaken",
        "peer_closed",
        "socket",
        "tcp",
    )

    def __init__(self, tcp: trio.SocketStream, config: TlsConfig) -> None:
        self.tcp = tcp  # closed by aclose()
        self.socket = tcp.socket
        self.fd = tcp.socket.fileno()
        self._receive = FdReceive(self.fd)  # ciphertext, read as plaintext TCP is
        self._tls = TlsSession(config)
        # Plaintext decrypted but not returned yet: sent with the handshake's last flight,
        # or more than receive_some's max_bytes.
        self._plain = b""
        # Ciphertext taken from the TLS session but not yet written: written first by
        # the next try_send or send_all. The connection's writer task takes over while
        # there is some (``Connection.flush``). A bytearray: appended to and written from
        # its front without copying the rest (CPython keeps an offset).
        self.backlog = bytearray()
        self.closed = False
        self.handshaken = False  # receive_some and send_all handshake first if needed
        self.peer_closed = False  # close_notify came: receive_some says EOF after _plain

    # ------------------------------------------------------------------ handshake

    async def do_handshake(self) -> None:
        if self.handshaken:
            await trio.lowlevel.checkpoint()
            return
        while self._tls.handshaking:
            await self._send_backlog()
            data = await self._receive()
            if not data:
                raise trio.BrokenResourceError("the peer closed during the TLS handshake")
            self._plain += self._decrypt(data)
        self.handshaken = True
        await self._send_backlog()

    # ------------------------------------------------------------------ receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Plaintext, b"" at the peer's EOF (with or without close_notify)."""
        if not self.handshaken:
            await self.do_handshake()
        while not self._plain:
            if self.peer_closed:
                await trio.lowlevel.checkpoint()
                return b""
            data = await self._receive()
            if not data:
                # An EOF without close_notify is a clean EOF (https_compatible), and the
                # replies to requests already read still go out (PROTOCOL.md section 4).
                await trio.lowlevel.checkpoint()
                return b""
            self._plain = self._decrypt(data)
            # What reading produced (a KeyUpdate's answer, an alert) is written without
            # waiting: a full socket is the writer task's to wait on, and what it does not
            # take goes with the connection's next write.
            self._write_quietly()
        limit = max_bytes or RECEIVE_CHUNK
        data, self._plain = self._plain[:limit], self._plain[limit:]
        await trio.lowlevel.cancel_shielded_checkpoint()  # taken: not lost to a cancel
        return data

    @property
    def buffered(self) -> bool:
        """Input read from the socket that ``receive_some`` has not returned yet (plaintext
        decrypted, the start of a record, or a close_notify): the reader takes it before
        it waits for the socket again."""
        return bool(self._plain or self.peer_closed or self._tls.partial_record)

    def decrypt(self, ciphertext: bytes) -> tuple[bytes, bool]:
        """The poller's read of the socket (server/poller.py): ``ciphertext`` into the TLS
        session, and all the plaintext it completes (b"" while a record is incomplete);
        True at close_notify. A TLS error is BrokenResourceError, as from receive_some."""
        plain = self._decrypt(ciphertext)
        self._write_quietly()  # what reading produced: a KeyUpdate's answer, an alert
        return plain, self.peer_closed

    def _decrypt(self, ciphertext: bytes) -> bytes:
        try:
            plain, self.peer_closed = self._tls.receive(ciphertext)
        except TlsError as exc:
            self._write_quietly()  # the alert, if the peer is still there
            raise trio.BrokenResourceError(str(exc)) from exc
        return plain

    # ------------------------------------------------------------------ sending

    def try_send(self, data: bytes) -> int:
        """The flusher's non-blocking write: the bytes of ``data`` taken (all of them, or
        none while an earlier backlog is not written: BlockingIOError). Taken bytes are
        encrypted; what of them the socket did not take stays in ``backlog``."""
        if self.backlog and not self._write_backlog():
            raise BlockingIOError
        self._encrypt(data)
        self._write_backlog()
        return len(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """The backlog, then ``data``, all of it (the writer task's write)."""
        if self.closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if not self.handshaken:
            await self.do_handshake()
        if data:
            self._encrypt(bytes(data))
        await self._send_backlog()

    async def wait_send_all_might_not_block(self) -> None:
        if self.backlog:
            await trio.lowlevel.wait_writable(self.fd)
        else:
            await trio.lowlevel.checkpoint()

    def _encrypt(self, data: bytes) -> None:
        try:
            self.backlog += self._tls.encrypt(data)
        except TlsError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    def _write_backlog(self) -> bool:
        """Write what the socket takes now; True when nothing is left."""
        backlog = self.backlog
        if self._tls.wants_write:
            backlog += self._tls.take_outgoing()
        if not backlog:
            return True
        try:
            sent = os.write(self.fd, backlog)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        del backlog[:sent]
        return not backlog

    async def write_backlog(self, most: int) -> None:
        """Write the backlog until ``most`` bytes of it are written or none is left,
        waiting for the socket as needed (the writer task's step, under a deadline)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        goal = len(self.backlog) - most
        while not self._write_backlog() and len(self.backlog) > goal:
            await trio.lowlevel.wait_writable(self.fd)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send_backlog(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._write_backlog():
            await trio.lowlevel.wait_writable(self.fd)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _write_quietly(self) -> None:
        try:
            self._write_backlog()
        except trio.BrokenResourceError:
            pass

    # ------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Close the socket (no close_notify: https_compatible)."""
        self.closed = True
        await self.tcp.aclose()
