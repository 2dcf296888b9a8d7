"""An echo bot: connects as ``echo-bot``, joins a channel and answers every message that is
not its own with ``echo: <text>``, until Ctrl-C (exit 0).

    .venv/bin/python examples/echo_bot.py [--secret-file data/dev-secret]
        [--host 127.0.0.1] [--port 7700] [--channel room-1]

Run it with the project's virtualenv (``make run`` creates it), while a server runs: the
token is signed with the secret of ``make run`` (``data/dev-secret``, the default), of
``--secret-file``, or of ``TSMSG_SECRET``. A server that is not running is one line on
stderr and exit code 1.

It signs its own token with the server's secret (a development setup) and mints a new one
before each expires. It runs under asyncio here; ``anyio.run(..., backend="trio")`` works
the same. A message that arrives while the bot is reconnecting is answered once it is back:
the client hands over every message exactly once.
"""

from __future__ import annotations

import argparse
import sys
import time

import anyio

from tsmsg.auth import TokenIssuer, signing_secret
from tsmsg.client import ClientError, Message, connect

USER = "echo-bot"
DEV_SECRET = "data/dev-secret"  # where `make run` (serve --dev) keeps its secret


async def echo(host: str, port: int, channel: str, issuer: TokenIssuer) -> None:
    async def token() -> str:
        return issuer.issue(USER, [channel], now=int(time.time()))

    async with connect(host, port, token_provider=token) as client:
        await client.join(channel)
        print(f"{USER} listening in {channel} on {host}:{port}", flush=True)
        # All events, not events(channel): events nobody takes would pile up in the client.
        async for event in client.events():
            if isinstance(event, Message) and event.sender != client.user and event.text:
                await client.send(channel, f"echo: {event.text}")
                print(f"echoed [{event.seq}] {event.sender}: {event.text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7700)
    parser.add_argument("--secret-file", default=DEV_SECRET, help=f"default {DEV_SECRET}")
    parser.add_argument("--channel", default="room-1")
    args = parser.parse_args()
    try:
        secret = signing_secret(args.secret_file)
    except ValueError as exc:  # a secret too short to sign with: one line
        print(f"echo_bot: {exc}", file=sys.stderr)
        return 1
    if secret is None:
        print(
            f"echo_bot: no secret: run `make run` first (it writes {DEV_SECRET}), or pass "
            "--secret-file or set TSMSG_SECRET",
            file=sys.stderr,
        )
        return 1
    issuer = TokenIssuer(secret)
    try:  # a channel no token can name fails here, not after the connect timeout
        issuer.issue(USER, [args.channel], now=int(time.time()))
    except ValueError as exc:
        print(f"echo_bot: {exc}", file=sys.stderr)
        return 1
    try:
        anyio.run(echo, args.host, args.port, args.channel, issuer)
    except KeyboardInterrupt:
        print(f"{USER} stopped", flush=True)
    except ClientError as exc:  # the server is down, or refused the token: one line
        print(f"echo_bot: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
