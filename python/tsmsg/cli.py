"""The ``tsmsg`` command line.

Exit codes: 0 success, 1 runtime failure (bad settings, no secret, the data directory
cannot be opened), 2 usage error (argparse).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import trio

from tsmsg.auth import (
    SECRET_ENV,
    TokenIssuer,
    TokenVerifier,
    generate_dev_secret,
    secret_from_env,
)
from tsmsg.server.app import serve
from tsmsg.server.settings import Settings, load_settings
from tsmsg.store import FormatError, LmdbStore, StoreConfig

EXIT_FAILURE = 1
log = logging.getLogger("tsmsg")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def make_verifier(settings: Settings) -> TokenVerifier:
    audience, issuer = settings.audience or None, settings.issuer or None
    if settings.public_key_file:
        with open(settings.public_key_file, "rb") as fh:
            key = fh.read()
        return TokenVerifier(
            public_key=key, algorithm=settings.algorithm, audience=audience, issuer=issuer
        )
    secret = secret_from_env()
    if secret is None:
        if not settings.dev:
            raise ValueError(
                f"{SECRET_ENV} is not set: set it to a secret of at least 32 bytes, "
                "or pass --dev to run with a generated one"
            )
        secret = generate_dev_secret()
        print(
            "tsmsg: --dev: generated a secret for this run. Mint a token with:\n"
            f"  {SECRET_ENV}={secret.decode()} tsmsg token --user alice --channels '*'",
            file=sys.stderr,
        )
    return TokenVerifier(secret, algorithm=settings.algorithm, audience=audience, issuer=issuer)


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "durability": args.durability,
        "log_format": args.log_format,
        "dev": True if args.dev else None,
    }
    settings = load_settings(args.config, os.environ, overrides)
    setup_logging(settings.log_format, settings.log_level)
    verifier = make_verifier(settings)
    trio.run(serve, settings, verifier)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    secret = secret_from_env()
    if secret is None:
        raise ValueError(f"{SECRET_ENV} is not set: tokens are signed with the server's secret")
    channels = [c for item in args.channels for c in item.split(",") if c]
    scopes = [s for item in args.scope for s in item.split(",") if s]
    token = TokenIssuer(secret).issue(
        args.user, channels, scopes or ("chat:read", "chat:send"), args.ttl, now=int(time.time())
    )
    print(token)
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    with LmdbStore(args.data_dir, StoreConfig()) as store:
        for name in [args.channel] if args.channel else store.channels():
            print(f"{name}\thorizon={store.compact(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsmsg", description="tsmsg chat server")
    sub = parser.add_subparsers(dest="command", required=True)

    serve_p = sub.add_parser("serve", help="run the server")
    serve_p.add_argument("--config", help="TOML settings file (see README)")
    serve_p.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve_p.add_argument("--port", type=int, help="listen port (default 7700)")
    serve_p.add_argument("--data-dir", help="LMDB data directory (default ./data)")
    serve_p.add_argument(
        "--durability",
        choices=["fsync", "async"],
        help="fsync: an ack means on disk (default); async: may lose the last second "
        "on power loss, never on a process crash",
    )
    serve_p.add_argument("--log-format", choices=["text", "json"])
    serve_p.add_argument(
        "--dev", action="store_true", help=f"run without {SECRET_ENV}, with a generated secret"
    )
    serve_p.set_defaults(func=cmd_serve)

    token_p = sub.add_parser("token", help=f"print a token signed with {SECRET_ENV}")
    token_p.add_argument("--user", required=True, help="the user id (the token's sub)")
    token_p.add_argument(
        "--channels",
        action="append",
        default=[],
        help="channel glob patterns, comma-separated or repeated (default: none, DMs only)",
    )
    token_p.add_argument(
        "--scope",
        action="append",
        default=[],
        help="chat:read, chat:send, chat:moderate (default: chat:read,chat:send)",
    )
    token_p.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token_p.set_defaults(func=cmd_token)

    compact_p = sub.add_parser("compact", help="compact channel logs now (Kafka's rule)")
    compact_p.add_argument("--channel", help="one channel (default: all)")
    compact_p.add_argument("--data-dir", default="./data", help="LMDB data directory")
    compact_p.set_defaults(func=cmd_compact)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (FormatError, ValueError, OSError) as exc:
        print(f"tsmsg: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
