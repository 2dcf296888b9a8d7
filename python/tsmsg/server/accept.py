"""The server's listening TCP sockets and their accept loops.

What ``trio.serve_listeners`` does, minus the layers that cost a connection more than its
session does (bench/README.md, "What a disconnect costs"): trio's accept goes through its
socket wrapper (a checkpoint and a yield per accept), throws the peer's address away (the
server then asks for it again: ``getpeername``), and wraps each handler in
``aclose_forcefully``, a cancel scope cancelled around a second close of a stream the
handler already closed. Here each listening socket accepts with the standard library's
``accept`` until the kernel has no more connections queued, yielding to other tasks
every ``ACCEPT_BATCH`` connections, and hands each one with its peer's address to the
handler, which closes it (a stream it left open, after an error, is closed here).
Listeners that are not sockets of ours (the simulation's) are served the generic way.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

# The accept errors of a process out of resources (as trio's): logged, retried after a
# pause. The ones trio's SocketListener ignores (a connection reset before it was
# accepted, a firewall's refusal): skipped.
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_S = 0.1
ACCEPT_IGNORED_ERRNOS = {
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    )
    if hasattr(errno, name)
}  # fmt: skip
# Connections accepted before the loop lets other tasks run (at most): each handler's
# first step is short (it yields before its first read), so a round of 64 holds the
# others back ~2-3 ms here; 16 a round measured 12 % fewer connects/s in a storm.
ACCEPT_BATCH = 64
LISTEN_BACKLOG = 0xFFFF  # pending connections the kernel queues (it caps it at somaxconn)

# trio's logger name for the same line: the server's filter (one line per period while
# out of descriptors) is set on it.
log = logging.getLogger("trio.serve_listeners")

Address = Any  # a socket address: (host, port) or (host, port, flowinfo, scope_id)
Handler = Callable[[trio.SocketStream, Address], Awaitable[None]]


class Gate:
    """How many connections the accept loops may take in a round: never more than the
    server has room for (its connection cap less the sockets open), counting those
    accepted whose handler has not run yet (it counts them once it runs), so that a burst
    at the cap cannot eat the descriptors kept in reserve; at least one, which the server
    then refuses at once (it reads nothing from it), as trio's loop did."""

    def __init__(self, room: Callable[[], int]) -> None:
        self.room = room
        self.unstarted = 0

    def batch(self) -> int:
        return max(1, min(ACCEPT_BATCH, self.room() - self.unstarted))


class Acceptor:
    """A listening TCP socket of the server's: the standard library's socket, which the
    accept loop calls, and trio's view of it (its wait and its close)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port


async def tcp_acceptors(host: str, port: int, reuse_port: bool) -> list[Acceptor]:
    """Listening sockets on HOST:PORT, one per address it resolves to (SO_REUSEADDR;
    address families the system lacks skipped); with ``reuse_port`` (SO_REUSEPORT), other
    processes may listen on the same port (nodes on one machine, one per core)."""
    addresses = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    acceptors: list[Acceptor] = []
    unsupported: list[OSError] = []
    # An IPv6 socket takes IPv4 connections too (Linux's default: "::" is every address)
    # unless the host also resolves to an IPv4 address, whose socket would then clash.
    v6only = any(family == socket.AF_INET for family, *_ in addresses)
    try:
        for family, kind, proto, _, address in addresses:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno != errno.EAFNOSUPPORT:
                    raise
                unsupported.append(exc)
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
                sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
                acceptors.append(Acceptor(sock))  # non-blocking from here on
            except BaseException:
                sock.close()
                raise
    except BaseException:
        for acceptor in acceptors:
            acceptor.listener.socket.close()
        raise
    if not acceptors:
        raise OSError(errno.EAFNOSUPPORT, f"no socket this system supports for {host}")
    return acceptors


async def serve_connections(
    handler: Handler,
    listeners: Sequence[Acceptor | trio.abc.Listener[Any]],
    gate: Gate,
    *,
    handler_nursery: trio.Nursery,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on ``listeners`` until cancelled, as many a round as ``gate``
    says, each handled by ``handler(stream, peer address)`` in ``handler_nursery`` (the
    address None for a listener that is not an :class:`Acceptor`)."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            if isinstance(listener, Acceptor):
                nursery.start_soon(_accept_loop, listener, handler, gate, handler_nursery)
            else:
                nursery.start_soon(_serve_listener, listener, handler, handler_nursery)
        task_status.started()


async def _accept_loop(
    acceptor: Acceptor, handler: Handler, gate: Gate, nursery: trio.Nursery
) -> None:
    sock, listener = acceptor.sock, acceptor.listener
    async with listener:  # closed when the loop ends
        while True:
            for _ in range(gate.batch()):
                try:
                    conn, address = sock.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    break
                except OSError as exc:
                    if exc.errno in ACCEPT_IGNORED_ERRNOS:
                        continue
                    if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    name = errno.errorcode[exc.errno]
                    message = "accept returned %s (%s); retrying in %s seconds"
                    log.error(message, name, os.strerror(exc.errno), ACCEPT_RETRY_S)
                    await trio.sleep(ACCEPT_RETRY_S)
                    break
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                gate.unstarted += 1
                nursery.start_soon(_handle, handler, gate, stream, address)
            else:
                await trio.lowlevel.checkpoint()


async def _handle(
    handler: Handler, gate: Gate, stream: trio.SocketStream, address: Address
) -> None:
    gate.unstarted -= 1  # the handler counts it from here on
    handling = handler(stream, address)
    del address  # not kept for the connection's life (memory per idle connection)
    try:
        await handling
    finally:
        if stream.socket.fileno() != -1:  # left open (an error): closed here
            stream.socket.close()


async def _serve_listener(
    listener: trio.abc.Listener[Any], handler: Handler, nursery: trio.Nursery
) -> None:
    """Any other listener (the simulation's network), as trio would serve it."""

    async def run(stream: Any) -> None:
        try:
            await handler(stream, None)
        finally:
            await trio.aclose_forcefully(stream)

    async with listener:
        while True:
            nursery.start_soon(run, await listener.accept())
