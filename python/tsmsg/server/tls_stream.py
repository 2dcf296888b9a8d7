"""TLS on a plain socket, for the server side: :class:`TlsStream`.

trio's ``SSLStream`` gives every connection its own locks, conflict detectors and a
writer task (the flusher cannot write through it), which made an idle TLS connection
cost 32.6 KiB against 8.4 KiB in plaintext and every TLS write a task switch (issue 17).
This stream drives an ``ssl.SSLObject`` over two memory BIOs and the socket's fd the
way the plaintext path does (``os.read``/``os.write``, waiting with ``wait_readable``/
``wait_writable``), so the flusher writes TLS connections too (:meth:`TlsStream.try_send`)
and an idle one holds no task.

Semantics are trio's ``SSLStream(server_side=True, https_compatible=True)``, which it
replaces (PROTOCOL.md section 4): no ``close_notify`` is sent or required (an EOF without
one is a clean EOF), and a failed handshake or a TLS error is ``BrokenResourceError``
whose ``__cause__`` is the ``ssl`` error. One reader and one writer at a time, as the
server uses it (the reader task receives; the flusher or the writer task sends).
"""

from __future__ import annotations

import os
import ssl

import trio

from tsmsg.server.wire import RECEIVE_CHUNK, FdReceive


class TlsStream(trio.abc.Stream):
    """A server-side TLS connection on ``tcp``'s socket."""

    __slots__ = (
        "_in",
        "_out",
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

    def __init__(self, tcp: trio.SocketStream, context: ssl.SSLContext) -> None:
        self.tcp = tcp  # closed by aclose()
        self.socket = tcp.socket
        self.fd = tcp.socket.fileno()
        self._receive = FdReceive(self.fd)  # ciphertext, read as plaintext TCP is
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        # Ciphertext taken from the TLS object but not yet written: written first by
        # the next try_send or send_all. The connection's writer task takes over while
        # there is some (``Connection.flush``). A bytearray: appended to and written from
        # its front without copying the rest (CPython keeps an offset).
        self.backlog = bytearray()
        self.closed = False
        self.handshaken = False  # receive_some and send_all handshake first if needed
        self.peer_closed = False  # decrypt() met close_notify: receive_some says EOF

    # ------------------------------------------------------------------ handshake

    async def do_handshake(self) -> None:
        if self.handshaken:
            await trio.lowlevel.checkpoint()
            return
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                self._write_quietly()  # the alert, if the peer is still there
                raise trio.BrokenResourceError(str(exc)) from exc
            await self._send_backlog()
            if not await self._receive_ciphertext():
                raise trio.BrokenResourceError("the peer closed during the TLS handshake")
        self.handshaken = True
        await self._send_backlog()

    # ------------------------------------------------------------------ receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Plaintext, b"" at the peer's EOF (with or without close_notify)."""
        if not self.handshaken:
            await self.do_handshake()
        while True:
            data = self._plaintext(max_bytes or RECEIVE_CHUNK)
            if data is not None:  # taken out of the TLS object: not lost to a cancel
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            # What reading produced (a KeyUpdate's answer, an alert) is written without
            # waiting: a full socket is the writer task's to wait on, and what it does not
            # take goes with the connection's next write.
            self._write_quietly()
            if not await self._receive_ciphertext():
                # An EOF without close_notify is a clean EOF (https_compatible). The TLS
                # object is not told: it would fail every later write, and the replies to
                # requests already read still go out (PROTOCOL.md section 4).
                await trio.lowlevel.checkpoint()
                return b""

    @property
    def buffered(self) -> bool:
        """Input read from the socket that ``receive_some`` has not returned yet (records
        in the TLS object's buffer, plaintext it decrypted, or a close_notify that
        ``decrypt`` met): the reader takes it before it waits for the socket again."""
        return bool(self.peer_closed or self._in.pending or self._tls.pending())

    def decrypt(self, ciphertext: bytes) -> tuple[bytes, bool]:
        """The poller's read of the socket (server/poller.py): ``ciphertext`` into the TLS
        object, and all the plaintext it completes (b"" while a record is incomplete);
        True at close_notify. A TLS error is BrokenResourceError, as from receive_some."""
        self._in.write(ciphertext)
        parts: list[bytes] = []
        while (data := self._plaintext(RECEIVE_CHUNK)) is not None:
            if not data:
                self.peer_closed = True
                break
            parts.append(data)
        self._write_quietly()  # what reading produced: a KeyUpdate's answer, an alert
        return b"".join(parts), self.peer_closed

    def _plaintext(self, max_bytes: int) -> bytes | None:
        """What the TLS object can decrypt now: None if it needs more ciphertext, b"" at
        close_notify; a TLS error is BrokenResourceError."""
        try:
            return self._tls.read(max_bytes)
        except ssl.SSLWantReadError:
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""  # close_notify
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def _receive_ciphertext(self) -> bool:
        """Read the socket into the TLS object; False at the peer's EOF."""
        data = await self._receive()
        if data:
            self._in.write(data)
        return bool(data)

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
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        self.backlog += self._out.read()

    def _write_backlog(self) -> bool:
        """Write what the socket takes now; True when nothing is left."""
        backlog = self.backlog
        if self._out.pending:
            backlog += self._out.read()
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
