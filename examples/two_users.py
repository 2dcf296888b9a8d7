"""Two users in one channel: alice and bob connect, join, exchange a few messages, bob
fixes a typo with an edit, alice deletes a message, and each prints what they saw.

    .venv/bin/python examples/two_users.py [--secret-file data/dev-secret]
        [--host 127.0.0.1] [--port 7700] [--channel two-users]

Run it with the project's virtualenv (``make run`` creates it), while a server runs: the
token is signed with the secret of ``make run`` (``data/dev-secret``, the default), of
``--secret-file``, or of ``TSMSG_SECRET``. A server that is not running is one line on
stderr and exit code 1.

Each client's ``events()`` hands over the channel's entries (messages, edits, deletes)
exactly once and in order, the sender's own included, so both transcripts are the same.
"""

from __future__ import annotations

import argparse
import sys
import time

import anyio

from tsmsg.auth import TokenIssuer, signing_secret
from tsmsg.client import Client, ClientError, Delete, Edit, Message, connect

DEV_SECRET = "data/dev-secret"  # where `make run` (serve --dev) keeps its secret
TIMEOUT = 10.0  # s: the whole conversation; a live server needs well under one


async def transcript(client: Client, channel: str, last_seq: int) -> list[str]:
    """What ``client`` saw in ``channel``: its entries up to ``last_seq``, one line each."""
    lines: list[str] = []
    seq_of: dict[str, int] = {}  # message id -> seq: edits and deletes name their target by id
    async for event in client.events(channel):
        if isinstance(event, Message):
            seq_of[event.id] = event.seq
            lines.append(f"[{event.seq}] {event.sender}: {event.text}")
        elif isinstance(event, Edit):
            lines.append(f"[{event.seq}] {event.sender} edited [{seq_of[event.id]}]: {event.text}")
        elif isinstance(event, Delete):
            lines.append(f"[{event.seq}] {event.sender} deleted [{seq_of[event.id]}]")
        else:
            continue  # the first join's Resynced: the channel's earlier history
        if event.seq >= last_seq:
            return lines
    return lines


async def converse(host: str, port: int, channel: str, issuer: TokenIssuer) -> None:
    def token(user: str) -> str:
        return issuer.issue(user, [channel], now=int(time.time()))

    with anyio.fail_after(TIMEOUT):
        async with (
            connect(host, port, token=token("alice")) as alice,
            connect(host, port, token=token("bob")) as bob,
        ):
            await alice.join(channel)
            await bob.join(channel)
            await alice.send(channel, "hi bob")
            await bob.send(channel, "hi alice")
            question = await alice.send(channel, "lunch at noon?")
            typo = await bob.send(channel, "sure, see yuo there")
            await bob.edit(channel, typo.id, "sure, see you there")
            await alice.send(channel, "great")
            deleted = await alice.delete(channel, question.id)
            for client in (alice, bob):
                print(f"{client.user} saw:")
                for line in await transcript(client, channel, deleted.seq):
                    print(f"  {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7700)
    parser.add_argument("--secret-file", default=DEV_SECRET, help=f"default {DEV_SECRET}")
    parser.add_argument("--channel", default="two-users")
    args = parser.parse_args()
    try:
        secret = signing_secret(args.secret_file)
    except ValueError as exc:  # a secret too short to sign with: one line
        print(f"two_users: {exc}", file=sys.stderr)
        return 1
    if secret is None:
        print(
            f"two_users: no secret: run `make run` first (it writes {DEV_SECRET}), or pass "
            "--secret-file or set TSMSG_SECRET",
            file=sys.stderr,
        )
        return 1
    try:
        anyio.run(converse, args.host, args.port, args.channel, TokenIssuer(secret))
    except (ClientError, ValueError) as exc:  # server down, token refused, bad channel: one line
        print(f"two_users: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
