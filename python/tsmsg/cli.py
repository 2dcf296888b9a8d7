"""The ``tsmsg`` command line.

Exit codes: 0 success, 1 runtime failure (e.g. the data directory cannot be opened),
2 usage error (argparse), 3 a feature that is not built yet.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tsmsg.store import FormatError, LmdbStore, StoreConfig

EXIT_FAILURE = 1
EXIT_NOT_IMPLEMENTED = 3


def _open_store(args: argparse.Namespace) -> LmdbStore:
    return LmdbStore(args.data_dir, StoreConfig(durability=args.durability))


def cmd_serve(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        channels = store.channels()
        logging.info("store open at %s: %d channels", args.data_dir, len(channels))
        print(
            f"tsmsg: store ready in {args.data_dir} ({len(channels)} channels); the protocol "
            f"server on {args.host}:{args.port} is not implemented yet",
            file=sys.stderr,
        )
        return EXIT_NOT_IMPLEMENTED
    finally:
        store.close()


def cmd_compact(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        names = [args.channel] if args.channel else store.channels()
        for name in names:
            print(f"{name}\thorizon={store.compact(name)}")
        return 0
    finally:
        store.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsmsg", description="tsmsg chat server")
    sub = parser.add_subparsers(dest="command", required=True)

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", default="./data", help="LMDB data directory (default ./data)")
        p.add_argument(
            "--durability",
            choices=["fsync", "async"],
            default="fsync",
            help="fsync: an ack means on disk (default); async: may lose the last second "
            "on power loss, never on a process crash",
        )

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7700)
    store_args(serve)
    serve.set_defaults(func=cmd_serve)

    compact = sub.add_parser("compact", help="compact channel logs now (Kafka's rule)")
    compact.add_argument("--channel", help="one channel (default: all)")
    store_args(compact)
    compact.set_defaults(func=cmd_compact)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except FormatError as exc:
        print(f"tsmsg: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    sys.exit(main())
