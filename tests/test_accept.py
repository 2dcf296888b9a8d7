"""The server's accept loops (server/accept.py) over real loopback sockets: every queued
connection is handed over with its peer's address, a burst longer than a batch too; a
stream its handler left open is closed; a process out of descriptors retries; other
listeners (the simulation's) are served the generic way."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

import pytest
import trio
import trio.testing

from tsmsg.server.accept import ACCEPT_BATCH, Gate, serve_connections, tcp_acceptors

WAIT_S = 10
OPEN = Gate(lambda: 10**6)  # room for any number of connections


async def test_every_queued_connection_is_handed_over_with_its_address() -> None:
    (acceptor,) = await tcp_acceptors("127.0.0.1", 0, reuse_port=False)
    seen: dict[tuple[str, int], bytes] = {}
    count = 3 * ACCEPT_BATCH + 5  # queued before the loop starts: several batches

    async def handler(stream: trio.SocketStream, address: Any) -> None:
        seen[address] = await stream.receive_some(100)
        stream.socket.close()

    clients = []
    for i in range(count):
        client = socket.create_connection(("127.0.0.1", acceptor.port))
        client.sendall(b"%d" % i)
        clients.append(client)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_connections(
                handler, [acceptor], OPEN, handler_nursery=nursery, task_status=task_status
            )
        )
        with trio.fail_after(WAIT_S):
            while len(seen) < count:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    expected = {c.getsockname(): b"%d" % i for i, c in enumerate(clients)}
    assert seen == expected
    for client in clients:
        client.close()


async def test_a_stream_its_handler_left_open_is_closed() -> None:
    (acceptor,) = await tcp_acceptors("127.0.0.1", 0, reuse_port=False)

    async def handler(stream: trio.SocketStream, address: Any) -> None:
        await stream.send_all(b"bye")  # returns without closing it

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_connections(
                handler, [acceptor], OPEN, handler_nursery=nursery, task_status=task_status
            )
        )
        client = await trio.open_tcp_stream("127.0.0.1", acceptor.port)
        received = b""
        with trio.fail_after(WAIT_S):
            while chunk := await client.receive_some(100):  # until EOF
                received += chunk
        assert received == b"bye"
        await client.aclose()
        nursery.cancel_scope.cancel()


class OutOfDescriptors:
    """A listening socket whose next accept fails with EMFILE, once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.failed = sock, False

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()


async def test_out_of_descriptors_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    (acceptor,) = await tcp_acceptors("127.0.0.1", 0, reuse_port=False)
    port, failing = acceptor.port, OutOfDescriptors(acceptor.sock)
    acceptor.sock = failing  # type: ignore[assignment]
    handled = trio.Event()

    async def handler(stream: trio.SocketStream, address: Any) -> None:
        handled.set()
        stream.socket.close()

    with caplog.at_level(logging.ERROR, logger="trio.serve_listeners"):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_connections(
                    handler, [acceptor], OPEN, handler_nursery=nursery, task_status=task_status
                )
            )
            client = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(WAIT_S):
                await handled.wait()
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert failing.failed
    assert [r.getMessage() for r in caplog.records] == [
        "accept returned EMFILE (Too many open files); retrying in 0.1 seconds"
    ]


async def test_other_listeners_are_served_without_an_address() -> None:
    streams: list[Any] = []

    class Listener(trio.abc.Listener[Any]):  # of the simulation's kind: memory streams
        def __init__(self) -> None:
            self.pending = [trio.testing.memory_stream_pair()[0] for _ in range(3)]

        async def accept(self) -> Any:
            if not self.pending:
                await trio.sleep_forever()
            return self.pending.pop()

        async def aclose(self) -> None:
            pass

    async def handler(stream: Any, address: Any) -> None:
        streams.append((stream, address))

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_connections(
                handler, [Listener()], OPEN, handler_nursery=nursery, task_status=task_status
            )
        )
        with trio.fail_after(WAIT_S):
            while len(streams) < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [address for _, address in streams] == [None] * 3


def test_a_round_takes_no_more_than_the_room_left_and_at_least_one() -> None:
    room = [1000]
    gate = Gate(lambda: room[0])
    assert gate.batch() == ACCEPT_BATCH
    room[0] = 5
    assert gate.batch() == 5
    gate.unstarted = 3  # accepted, not yet counted by their handlers
    assert gate.batch() == 2
    room[0] = 0  # at the cap: one a round, which the server refuses
    assert gate.batch() == 1


async def test_an_ipv6_wildcard_takes_ipv4_connections_too() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        (acceptor,) = await tcp_acceptors("::", 0, reuse_port=True)
    except OSError as exc:
        pytest.skip(f"no IPv6 socket here: {exc}")
    seen: list[Any] = []

    async def handler(stream: trio.SocketStream, address: Any) -> None:
        seen.append(address)
        stream.socket.close()

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_connections(
                handler, [acceptor], OPEN, handler_nursery=nursery, task_status=task_status
            )
        )
        client = await trio.open_tcp_stream("127.0.0.1", acceptor.port)
        with trio.fail_after(WAIT_S):
            while not seen:
                await trio.sleep(0.01)
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert seen[0][0] == "::ffff:127.0.0.1", seen  # an IPv4 peer, mapped
