"""The ``tsmsg`` command line: ``serve``, ``token``, ``chat``, ``inspect``, ``compact``,
``backup``, ``restore``, ``keygen``.

Exit codes (every subcommand):

- 0: success;
- 1: runtime failure: a missing or incompatible data directory, no or a too short
  ``TSMSG_SECRET`` (or a bad secret file), bad settings or arguments the command refused
  (an invalid user id, an unknown scope, a ttl <= 0, an unknown channel), a backup
  target that is not empty, an I/O error; for ``chat``: no token (neither ``--token``
  nor ``TSMSG_SECRET``), a server that refused the token or the channel, or none
  reachable. One line ``tsmsg: <reason>`` on stderr, no traceback;
- 2: usage error (unknown option, missing argument), reported by argparse;
- 130: interrupted (Ctrl-C) while not serving; ``serve`` stops cleanly with 0.

``inspect``, ``compact``, ``backup`` and ``restore`` work on the engine the server's
settings select (``--engine``, ``TSMSG_ENGINE``, the config file; ``engine_password_file``):
LMDB in ``--data-dir`` or Redis. ``inspect`` and ``backup`` only read (LMDB readers never
block the writer), so they run while a server is serving from the same store.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import lmdb
import trio

from tsmsg.auth import (
    DM_PREFIX,
    SECRET_ENV,
    SECRET_PREVIOUS_ENV,
    TokenIssuer,
    TokenVerifier,
    generate_dev_secret,
    parse_secrets,
    previous_secret_from_env,
    secret_from_env,
    valid_channel,
)
from tsmsg.server.app import serve
from tsmsg.server.settings import Settings, load_settings, store_config
from tsmsg.store import (
    Entry,
    FormatError,
    LmdbStore,
    RedisStore,
    Store,
    StoreError,
    open_store,
)
from tsmsg.store.crypto import (
    EncryptionError,
    add_key,
    entry_kid,
    load_keyring,
    new_key_line,
    read_private_file,
)
from tsmsg.store.export import ChannelDump, ExportError, ExportSummary, restore, write_export
from tsmsg.store.lmdb_store import DATA_DIR_MODE, DATA_FILE_MODE, EnvStats, LmdbReader, now_ms
from tsmsg.store.redis_store import parse_redis_url
from tsmsg.tls import client_tls_context

EXIT_OK = 0
EXIT_FAILURE = 1
# Python's cyclic garbage collector, tuned while serving (issue 17): the objects made at
# start (modules, settings) are frozen out of every collection, and the youngest
# generation is collected every GC_GEN0_THRESHOLD net allocations instead of 700. Each
# connection's objects survive (it is open), and each young collection traversed them
# again: at the default, 10-17 % of a connect storm's CPU (bench/README.md). The older
# generations keep their counts (every 10 young, every 10 middle collections), so they
# run every 200,000 and 2,000,000 net allocations: cyclic garbage stays bounded.
GC_GEN0_THRESHOLD = 20_000
EXIT_USAGE = 2  # argparse's own
EXIT_INTERRUPTED = 130
EXIT_CODES_HELP = """exit codes:
  0    success
  1    runtime failure: missing or incompatible data directory, no TSMSG_SECRET,
       bad settings, arguments refused (bad user id, unknown scope, ttl <= 0, ...)
  2    usage error
  130  interrupted (serve stops cleanly with 0)"""
CHAT_TOKEN_TTL = 3600  # s: `chat` mints a fresh token before each expires
TEXT_WIDTH = 60  # characters of a message's text that `inspect --tail` shows
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
    # Neither format shows the caller, thread or process: not computing them makes a
    # record cheaper (the Logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def read_secret_file(path: str) -> tuple[bytes, ...]:
    """The secrets of a secret file (:func:`tsmsg.auth.parse_secrets`), the current one
    first. Refused unless a regular file that group and others cannot access, like an
    encryption key file."""
    data = read_private_file(path, "secret file")
    return parse_secrets(data, f"secret file {path}")


def env_secret_set(env: Mapping[str, str]) -> bool:
    """TSMSG_SECRET or TSMSG_SECRET_PREVIOUS is configured (another key source excludes it)."""
    return SECRET_ENV in env or previous_secret_from_env(env) is not None


def load_secrets(secret_file: str, env: Mapping[str, str] = os.environ) -> tuple[bytes, ...] | None:
    """The HS256 secrets, the current one first: the lines of ``secret_file``, or
    TSMSG_SECRET and then TSMSG_SECRET_PREVIOUS (if set). None when none is configured.
    Both sources at once is an error: which one is current would be a guess."""
    previous = previous_secret_from_env(env)
    if secret_file:
        if env_secret_set(env):
            raise CliError(
                f"both secret_file and {SECRET_ENV}/{SECRET_PREVIOUS_ENV} are set: use one "
                "(a secret file holds the previous secrets on its later lines)"
            )
        return read_secret_file(secret_file)
    secret = secret_from_env(env)
    if secret is None:
        if previous is not None:
            raise CliError(f"{SECRET_PREVIOUS_ENV} is set but {SECRET_ENV} is not")
        return None
    return (secret,) if previous is None else (secret, previous)


DEV_SECRET_FILE = "dev-secret"  # --dev: the generated secret, in the data directory


def dev_secret(data_dir: str) -> tuple[str, bool]:
    """The path of ``--dev``'s secret file in ``data_dir`` (made 700 if missing), and
    whether it was generated now: kept across restarts, so tokens minted with it stay
    valid. Mode 600, like any secret file."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    path = os.path.join(data_dir, DEV_SECRET_FILE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return path, False
    with os.fdopen(fd, "wb") as fh:
        fh.write(generate_dev_secret() + b"\n")
    return path, True


def self_command() -> str:
    """How to run this very ``tsmsg`` from the current directory: ``tsmsg`` when that is
    what the shell finds, else its path (``.venv/bin/tsmsg`` under ``make run``), so a
    printed command works when pasted."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) != "tsmsg" or not os.path.isfile(argv0):
        return f"{sys.executable} -m tsmsg.cli"
    found = shutil.which("tsmsg")
    if found is not None and os.path.samefile(found, argv0):
        return "tsmsg"
    return shell_path(argv0)


def shell_path(path: str) -> str:
    """``path`` relative to the current directory when under it (else absolute)."""
    rel = os.path.relpath(os.path.abspath(path))
    return rel if not rel.startswith("..") else os.path.abspath(path)


def dev_hint(path: str, made: bool, settings: Settings) -> str:
    """What ``serve --dev`` prints: where the secret is and the commands of the next steps,
    exactly as they run when pasted into another terminal in this directory."""
    tsmsg, secret = self_command(), shlex.quote(shell_path(path))
    where = [] if settings.host == "127.0.0.1" else [f"--host {shlex.quote(settings.host)}"]
    where += [] if settings.port == 7700 else [f"--port {settings.port}"]
    at = " ".join(where)
    how = "generated a secret" if made else "reusing the secret"
    return (
        f"tsmsg: --dev: {how} in {secret} (kept across restarts; development only).\n"
        "  chat, in two other terminals:\n"
        f"    {tsmsg} chat --user alice --secret-file {secret} {at}".rstrip()
        + f"\n    {tsmsg} chat --user bob --secret-file {secret} {at}".rstrip()
        + "\n"
        "  a token for your own client:\n"
        f"    {tsmsg} token --user alice --channels 'room-*' --secret-file {secret}"
    )


def make_verifier(settings: Settings) -> TokenVerifier:
    return make_credentials(settings)[0]


def make_credentials(settings: Settings) -> tuple[TokenVerifier, TokenIssuer | None]:
    """The token verifier, and with --dev an issuer of the same secret (the web page's
    dev-only token endpoint, docs/web.md)."""
    audience, issuer = settings.audience or None, settings.issuer or None
    if settings.public_key_file:
        if env_secret_set(os.environ):
            raise CliError(
                f"both public_key_file and {SECRET_ENV}/{SECRET_PREVIOUS_ENV} are set: use "
                "one (a public key verifies RS256/EdDSA tokens, a secret HS256 ones)"
            )
        with open(settings.public_key_file, "rb") as fh:
            key = fh.read()
        verifier = TokenVerifier(
            public_key=key,
            algorithm=settings.algorithm,
            audience=audience,
            issuer=issuer,
            max_lifetime_s=settings.token_max_lifetime_s,
        )
        return verifier, None
    secrets = load_secrets(settings.secret_file)
    if secrets is None:
        if not settings.dev:
            raise ValueError(
                f"{SECRET_ENV} is not set and no secret_file is configured: set one to a "
                "secret of at least 32 bytes, or pass --dev to run with a generated one"
            )
        path, made = dev_secret(settings.data_dir)
        secrets = read_secret_file(path)
        print(dev_hint(path, made, settings), file=sys.stderr)
    if len(secrets) > 1:
        log.info(
            "token secrets: the current one and %d previous (rotation: tokens signed with "
            "any of them are accepted)",
            len(secrets) - 1,
        )
    verifier = TokenVerifier(
        secrets[0],
        extra_secrets=secrets[1:],
        algorithm=settings.algorithm,
        audience=audience,
        issuer=issuer,
        max_lifetime_s=settings.token_max_lifetime_s,
    )
    dev = TokenIssuer(secrets[0], settings.algorithm) if settings.dev else None
    return verifier, dev


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir,
        "engine": args.engine,
        "reuse_port": True if args.reuse_port else None,
        "durability": args.durability,
        "encryption_key_file": args.encryption_key_file,
        "log_format": args.log_format,
        "dev": True if args.dev else None,
        "secret_file": args.secret_file,
        "metrics": args.metrics,
        "ws": args.ws,
        "tls_cert_file": args.tls_cert,
        "tls_key_file": args.tls_key,
        "tls_client_ca_file": args.tls_client_ca,
    }
    settings = load_settings(args.config, os.environ, overrides)
    setup_logging(settings.log_format, settings.log_level)
    verifier, dev_issuer = make_credentials(settings)
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *thresholds[1:])
    try:
        trio.run(functools.partial(serve, settings, verifier, dev_issuer=dev_issuer))
    except BaseExceptionGroup as group:  # trio's nurseries wrap startup errors
        raise lone_error(group) from None
    finally:  # as it was: main() also runs in-process (tests, embedding)
        gc.set_threshold(*thresholds)
        gc.unfreeze()
    return 0


def lone_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside nested exception groups (a busy port fails the listener's
    nursery, then the server's), so main() reports it in one line; else the group."""
    while len(group.exceptions) == 1 and isinstance(group.exceptions[0], BaseExceptionGroup):
        group = group.exceptions[0]
    return group.exceptions[0] if len(group.exceptions) == 1 else group


def cmd_token(args: argparse.Namespace) -> int:
    secret_file = args.secret_file or os.environ.get("TSMSG_SECRET_FILE", "")
    secrets = load_secrets(secret_file)
    if secrets is None:
        raise ValueError(
            f"{SECRET_ENV} is not set (nor --secret-file): tokens are signed with the "
            "server's secret"
        )
    secret = secrets[0]  # the current one; previous secrets only verify
    channels = [c for item in args.channels for c in item.split(",") if c]
    scopes = [s for item in args.scope for s in item.split(",") if s]
    most = load_settings(args.config, os.environ).token_max_lifetime_s  # the server's bound
    if args.ttl < 1:
        raise CliError(f"--ttl must be at least 1 (seconds), not {args.ttl}")
    if args.ttl > most:
        raise CliError(
            f"--ttl {args.ttl} is over token_max_lifetime_s ({most} s): servers would refuse "
            "the token"
        )
    for pattern in channels:
        if pattern.startswith(DM_PREFIX):
            raise CliError(
                f"--channels {pattern!r} grants nothing: a pattern never grants a dm: "
                "channel (each DM is open to its two users, whatever the token names)"
            )
    token = TokenIssuer(secret).issue(
        args.user,
        channels,
        scopes or ("chat:read", "chat:send"),
        args.ttl,
        now=int(time.time()),
        max_ttl_s=most,
    )
    print(token)
    return 0


class CliError(Exception):
    """A runtime failure with a message for the operator (exit code 1)."""


def cmd_chat(args: argparse.Namespace) -> int:
    # Imported here: the client (and anyio) load only for `chat`, not for `serve`.
    import anyio

    from tsmsg.chat import run_chat
    from tsmsg.client import ClientError, ConnectionClosed, TokenProvider

    secret_file = args.secret_file or os.environ.get("TSMSG_SECRET_FILE", "")
    secrets = load_secrets(secret_file) if args.token is None else None
    secret = None if secrets is None else secrets[0]
    token: str | None = args.token
    provider: TokenProvider | None = None
    if token is None:
        if secret is None:
            raise CliError(
                f"no token: pass --token, or --secret-file (or {SECRET_ENV}) to mint one"
            )
        issuer, user = TokenIssuer(secret), args.user

        def mint() -> str:
            return issuer.issue(user, ["*"], ttl_s=CHAT_TOKEN_TTL, now=int(time.time()))

        async def mint_async() -> str:
            return mint()

        mint()  # a bad user id fails here, before connecting
        provider = mint_async  # refreshed before expiry: a chat may stay open for days
    tls = None
    if args.tls or args.ca_file or args.cert:
        tls = client_tls_context(args.ca_file, args.cert, args.key)
    screen = sys.stdin.isatty() and sys.stdout.isatty() and not args.lines
    chat = functools.partial(
        run_chat,
        args.host,
        args.port,
        args.channel,
        token=token,
        token_provider=provider,
        user=args.user,
        ssl_context=tls,
        screen=screen,
    )
    try:
        # asyncio: prompt_toolkit's loop (the client runs on either)
        return anyio.run(chat, backend="asyncio" if screen else "trio")
    except ConnectionClosed as exc:  # local, no wire code to show
        raise CliError(exc.message) from None
    except ClientError as exc:
        raise CliError(str(exc)) from None
    except BaseExceptionGroup as group:
        _, rest = group.split(KeyboardInterrupt)
        if rest is None:  # Ctrl-C, delivered inside the chat's task groups
            raise KeyboardInterrupt from None
        raise


def require_data_dir(path: str) -> None:
    """Refuse, without creating anything, a path that holds no LMDB environment (opening
    one with LmdbStore would create a fresh, empty data directory there)."""
    if not os.path.isdir(path):
        raise CliError(f"no tsmsg data directory at {path}")
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise CliError(f"no tsmsg data directory at {path} (it has no data.mdb)")


def fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def fmt_ts(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def fmt_text(entry: Entry) -> str:
    if entry.get("deleted"):
        return "[deleted]"
    kid = entry_kid(entry)
    if kid is not None:  # no key file given: the text stays sealed
        return f"[encrypted: key {kid!r}]"
    text = str(entry.get("text", "")).replace("\n", "\\n")
    if len(text) > TEXT_WIDTH:
        text = text[: TEXT_WIDTH - 1] + "\u2026"
    return f"[edited] {text}" if entry.get("edited") else text


def print_table(rows: list[list[str]], right: set[int]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


def json_default(obj: object) -> object:
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).hex()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def stats_json(data_dir: str, stats: EnvStats, file_bytes: int) -> dict[str, Any]:
    return {
        "data_dir": data_dir,
        "format": stats.format,
        "map_size": stats.map_size,
        "page_size": stats.page_size,
        "used_pages": stats.used_pages,
        "used_bytes": stats.used_bytes,
        "live_pages": stats.live_pages,
        "live_bytes": stats.live_bytes,
        "file_bytes": file_bytes,
        "cursor_users": stats.cursor_users,
        "cursors": stats.cursors,
        "dedup_entries": stats.dedup_entries,
        "members": stats.members,
        "encryption": list(stats.encryption),
        "channels": [channel_json(c) for c in stats.channels],
    }


def tool_settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """The server's settings as a tool sees them: --config, TSMSG_* variables, and the
    tool's --data-dir and --engine on top."""
    overrides.update(data_dir=args.data_dir, engine=args.engine)
    return load_settings(args.config, os.environ, overrides)


def describe(settings: Settings) -> str:
    if settings.engine == "lmdb":
        return settings.data_dir
    return f"redis {parse_redis_url(settings.engine).where}"


def open_tool_store(settings: Settings) -> Store:
    """The store of the settings' engine for a tool that writes (compact, restore): LMDB
    only in an existing data directory of a format this tsmsg reads."""
    if settings.engine == "lmdb":
        require_data_dir(settings.data_dir)
        with LmdbReader(settings.data_dir):
            pass  # check the format read-only first: LmdbStore creates its databases
    return open_engine_store(settings)


def open_engine_store(settings: Settings, data_dir: str | None = None) -> Store:
    config = store_config(settings)
    config = replace(config, compaction=replace(config.compaction, interval_s=None))
    return open_store(
        settings.engine,
        settings.data_dir if data_dir is None else data_dir,
        config,
        password_file=settings.engine_password_file or None,
    )


@contextmanager
def open_view(settings: Settings, keyring: Any = None) -> Iterator[LmdbReader | RedisStore]:
    """A read-only view of the settings' store, for inspect and backup: an LmdbReader
    (beside a running server) or a RedisStore. Both give ``tail`` and ``export``."""
    if settings.engine == "lmdb":
        require_data_dir(settings.data_dir)
        with LmdbReader(settings.data_dir, keyring=keyring) as reader:
            yield reader
        return
    store = open_engine_store(settings)
    assert isinstance(store, RedisStore)
    with store:
        yield store


def cmd_inspect(args: argparse.Namespace) -> int:
    settings = tool_settings(args)
    keyring = load_keyring(args.encryption_key_file)
    with open_view(settings, keyring) as view:
        if args.channel is not None:
            return inspect_channel(view, args, describe(settings))
        if isinstance(view, RedisStore):
            return inspect_redis(view, args)
        stats = view.stats()
    return inspect_lmdb(settings.data_dir, stats, args)


def inspect_lmdb(data_dir: str, stats: EnvStats, args: argparse.Namespace) -> int:
    file_bytes = os.path.getsize(os.path.join(data_dir, "data.mdb"))
    if args.json:
        print(json.dumps(stats_json(data_dir, stats, file_bytes)))
        return 0
    print(f"data directory  {data_dir}")
    print(f"format version  {'unset (fresh)' if stats.format is None else stats.format}")
    print(f"map size        {fmt_bytes(stats.map_size)} (data.mdb {fmt_bytes(file_bytes)})")
    print(
        f"pages           {stats.used_pages} used ({fmt_bytes(stats.used_bytes)}), "
        f"{stats.live_pages} live ({fmt_bytes(stats.live_bytes)}), {stats.page_size} B each"
    )
    print(f"read cursors    {stats.cursors} ({stats.cursor_users} users)")
    print(f"dedup journal   {stats.dedup_entries} entries")
    print(f"memberships     {stats.members}")
    keys = ", ".join(stats.encryption)
    print(f"encryption      {f'on (keys {keys})' if keys else 'off'}")
    return print_channels(stats.channels)


def inspect_redis(store: RedisStore, args: argparse.Namespace) -> int:
    channels = store.stats()
    cursors = sum(c.cursors for c in channels)
    dedup = sum(c.dedup_entries for c in channels)
    if args.json:
        rows = [channel_json(c) for c in channels]
        print(
            json.dumps(
                {"engine": str(store), "cursors": cursors, "dedup_entries": dedup}
                | {"channels": rows}
            )
        )
        return 0
    print(f"engine          {store}")
    print(f"read cursors    {cursors}")
    print(f"dedup index     {dedup} entries")
    return print_channels(channels)


def channel_json(c: Any) -> dict[str, Any]:
    fields = ("name", "head", "horizon", "epoch", "entries", "bytes")
    return {k: getattr(c, k) for k in fields}


def print_channels(channels: Sequence[Any]) -> int:
    """The channel table of inspect (LMDB's or Redis's figures, the same columns)."""
    print()
    if not channels:
        print("no channels")
        return 0
    rows = [["channel", "head", "horizon", "epoch", "entries", "bytes"]]
    rows += [
        [c.name, str(c.head), str(c.horizon), str(c.epoch), str(c.entries), fmt_bytes(c.bytes)]
        for c in channels
    ]
    print_table(rows, right={1, 2, 3, 4, 5})
    return 0


def inspect_channel(view: LmdbReader | RedisStore, args: argparse.Namespace, where: str) -> int:
    info, entries, cursors = view.tail(args.channel, args.tail)
    if info is None:
        raise CliError(f"no channel {args.channel!r} in {where}")
    if args.json:
        header = {"channel": info.name, "head": info.head, "horizon": info.horizon}
        header.update(epoch=info.epoch, cursors=cursors)
        print(json.dumps(header))
        for entry in entries:
            print(json.dumps(entry, default=json_default, ensure_ascii=False))
        return 0
    print(f"channel {info.name}: head {info.head}, horizon {info.horizon}, epoch {info.epoch}")
    if entries:
        rows = [["seq", "kind", "id", "sender", "ts", "text"]]
        rows += [
            [str(e["seq"]), e["kind"], e["id"], e["sender"], fmt_ts(e["ts"]), fmt_text(e)]
            for e in entries
        ]
        print_table(rows, right={0})
    else:
        print("no entries")
    print("read cursors:" if cursors else "read cursors: none")
    for user, seq in sorted(cursors.items()):
        print(f"  {user}\t{seq}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    # The server's settings give the policy (retention, tombstones) and the key file.
    settings = tool_settings(args, encryption_key_file=args.encryption_key_file)
    if args.rekey and not settings.encryption_key_file:
        raise CliError("--rekey needs --encryption-key-file")
    with open_tool_store(settings) as store:
        names = store.channels()
        if args.channel is not None:
            if args.channel not in names:
                raise CliError(f"no channel {args.channel!r} in {describe(settings)}")
            names = [args.channel]
        if not names:
            print("no channels")
        for name in names:
            print(f"{name}: {describe_horizon(store.compact(name))}")
        if args.rekey:
            rekey(store, names if args.channel is not None else None)
    return 0


def rekey(store: Store, names: list[str] | None) -> None:
    """Re-seal entries under the active key (LMDB: the Redis engine has no encryption)."""
    assert isinstance(store, LmdbStore) and store.config.encryption is not None
    counts = store.rekey_all() if names is None else {n: store.rekey(n) for n in names}
    for name, count in counts.items():
        print(f"{name}\trekeyed={count}")
    if names is None:
        print(f"every entry is now under key {store.config.encryption.active!r} (or in no key)")


def describe_horizon(horizon: int) -> str:
    """What ``compact`` did to a channel, in words (a bare ``horizon=0`` said nothing)."""
    if horizon == 0:
        return "nothing compacted (horizon 0: the whole log is kept)"
    return (
        f"horizon {horizon}: superseded entries below seq {horizon} are gone; a client "
        f"syncing from before it reloads (resync)"
    )


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.encryption_key_file is None:
        print(new_key_line(args.kid)[1])
        return 0
    folder = os.path.dirname(os.path.abspath(args.encryption_key_file))
    if not os.path.isdir(folder):  # else the error names add_key's temporary file
        raise CliError(f"no directory {folder} for {args.encryption_key_file}: create it first")
    kid, older = add_key(args.encryption_key_file, args.kid)
    print(f"added key {kid!r} to {args.encryption_key_file} as the active key")
    if older:
        print(f"older keys, kept for reading: {', '.join(older)}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    settings = tool_settings(args, encryption_key_file=args.encryption_key_file)
    if args.export:
        return export_backup(settings, args.out)
    if settings.engine != "lmdb":
        raise CliError(
            "the Redis engine has no data directory to copy: use tsmsg backup --export FILE"
        )
    return copy_backup(settings.data_dir, args.out)


def export_backup(settings: Settings, out: str) -> int:
    """An engine-neutral export of the settings' store into the new file ``out``."""
    if os.path.lexists(out):
        raise CliError(f"export target {out} exists")
    keyring = load_keyring(settings.encryption_key_file or None)
    with open_view(settings, keyring) as view:
        encryption = view.encryption if isinstance(view, LmdbReader) else ()
        counts = write_export(out, settings_engine(settings), now_ms(), view, encryption)
    size = os.path.getsize(out)
    print(
        f"wrote {out}: {fmt_bytes(size)}, export of {describe(settings)}: "
        f"{counts['channels']} channels, {counts['entries']} entries, {counts['users']} users"
    )
    return 0


def settings_engine(settings: Settings) -> str:
    return "lmdb" if settings.engine == "lmdb" else "redis"


def copy_backup(data_dir: str, out: str) -> int:
    """The LMDB data directory copied (compacted, one snapshot) into the new directory
    ``out``."""
    require_data_dir(data_dir)
    exists = os.path.lexists(out)
    if exists and not (os.path.isdir(out) and not os.listdir(out)):
        raise CliError(f"backup target {out} exists and is not an empty directory")
    target = os.path.join(out, "data.mdb")
    with LmdbReader(data_dir) as reader:  # opened first: a bad source leaves no OUT
        if not exists:
            os.makedirs(out, mode=DATA_DIR_MODE)
        try:
            stats = reader.backup(out)
            os.chmod(target, DATA_FILE_MODE)  # as private as the data directory
        except BaseException:
            if os.path.exists(target):
                os.unlink(target)
            if not exists:
                os.rmdir(out)
            raise
    with LmdbReader(out, lock=False) as copy:  # the copy must open as a data directory
        heads = {c.name: c.head for c in copy.stats().channels}
    if heads != {c.name: c.head for c in stats.channels}:
        raise CliError(f"backup {out} does not match the snapshot it was copied from")
    size = os.path.getsize(target)
    print(
        f"wrote {target}: {fmt_bytes(size)} ({size} bytes), format {stats.format}, "
        f"{len(stats.channels)} channels"
    )
    for c in stats.channels:
        print(f"  {c.name}\thead={c.head}\thorizon={c.horizon}\tentries={c.entries}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    settings = tool_settings(args, encryption_key_file=args.encryption_key_file)
    loaded: list[ChannelDump] = []
    kid: str | None = None  # the key the loaded text is encrypted with
    if settings.engine == "lmdb":
        summary, kid = restore_lmdb(settings, args.file, args.new_epochs, loaded.append)
    else:
        with open_engine_store(settings) as store:
            assert isinstance(store, RedisStore)
            summary = restore(args.file, store, new_epochs=args.new_epochs, progress=loaded.append)
    print(
        f"restored {args.file} (an export of {summary.source} taken {fmt_ts(summary.created)}) "
        f"into {describe(settings)}: {summary.channels} channels, {summary.entries} entries, "
        f"{summary.users} users{', new epochs' if args.new_epochs else ''}"
    )
    print(f"text stored encrypted with key {kid!r}" if kid else "text stored in plaintext")
    if summary.encryption and not kid:
        how = (
            "pass --encryption-key-file to encrypt it"
            if settings.engine == "lmdb"
            else "the Redis engine has no encryption at rest"
        )
        print(
            f"tsmsg: warning: the source of {args.file} stored its text encrypted (key(s) "
            f"{', '.join(map(repr, summary.encryption))}); it is stored here in plaintext "
            f"({how})",
            file=sys.stderr,
        )
    for c in loaded:
        print(
            f"  {c.name}\tepoch={c.epoch}\thead={c.head}\thorizon={c.horizon}\t"
            f"entries={len(c.entries)}"
        )
    return 0


def restore_lmdb(
    settings: Settings, path: str, new_epochs: bool, progress: Any
) -> tuple[ExportSummary, str | None]:
    """Load into a new directory beside the target, renamed into place once complete: a
    data directory at the target is never a half-loaded one. Returns the export's summary
    and the key id the text was encrypted with (None: plaintext)."""
    target = os.path.abspath(settings.data_dir)
    if os.path.lexists(target) and not (os.path.isdir(target) and not os.listdir(target)):
        raise CliError(f"restore target {target} is not empty (a new or empty directory is)")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):  # else the error names the temporary directory
        raise CliError(f"no directory {parent} for the restore target {target}: create it first")
    work = tempfile.mkdtemp(prefix=os.path.basename(target) + ".restoring-", dir=parent)
    try:
        with open_engine_store(settings, work) as store:
            assert isinstance(store, LmdbStore)
            summary = restore(path, store, new_epochs=new_epochs, progress=progress)
            ring = store.config.encryption
        os.rename(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary, None if ring is None else ring.active


def nonneg_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The store a tool works on, selected as the server selects it."""
    parser.add_argument(
        "--config", help="the server's TOML settings file (its engine, data_dir, policy)"
    )
    parser.add_argument("--data-dir", help="LMDB data directory (default ./data)")
    parser.add_argument(
        "--engine",
        metavar="ENGINE",
        help="lmdb (default) or the server's Redis URL (redis://HOST:PORT[/DB], rediss://..., "
        "redis-cluster://HOST:PORT[,...]); also TSMSG_ENGINE, and engine_password_file",
    )


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="tsmsg", description="tsmsg chat server", epilog=EXIT_CODES_HELP, formatter_class=fmt
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, 79),  # the raw formatter does not wrap
            epilog=EXIT_CODES_HELP,
            formatter_class=fmt,
        )

    serve_p = add("serve", "run the server", "Run the tsmsg server until SIGTERM or Ctrl-C.")
    serve_p.add_argument("--config", help="TOML settings file (see README)")
    serve_p.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve_p.add_argument("--port", type=int, help="listen port (default 7700)")
    serve_p.add_argument("--data-dir", help="LMDB data directory (default ./data)")
    serve_p.add_argument(
        "--engine",
        metavar="ENGINE",
        help="lmdb (default: one node, in --data-dir) or a Redis URL shared by the nodes of "
        "a cluster: redis://HOST:PORT[/DB], rediss://..., redis-cluster://HOST:PORT[,...]",
    )
    serve_p.add_argument(
        "--reuse-port",
        action="store_true",
        help="let several nodes on this machine listen on the same port (SO_REUSEPORT)",
    )
    serve_p.add_argument(
        "--durability",
        choices=["fsync", "async"],
        help="fsync: an ack means on disk (default); async: may lose the last second "
        "on power loss, never on a process crash",
    )
    serve_p.add_argument(
        "--encryption-key-file",
        metavar="PATH",
        help="encrypt message text at rest with the first key of this file (see STORAGE.md)",
    )
    serve_p.add_argument("--log-format", choices=["text", "json"])
    serve_p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus), /healthz and /readyz over HTTP here (default: off)",
    )
    serve_p.add_argument(
        "--ws",
        metavar="HOST:PORT",
        help="serve the web chat page and WebSocket clients here (e.g. 127.0.0.1:7780)",
    )
    serve_p.add_argument(
        "--dev", action="store_true", help=f"run without {SECRET_ENV}, with a generated secret"
    )
    serve_p.add_argument(
        "--secret-file",
        metavar="PATH",
        help=f"HS256 secrets instead of {SECRET_ENV}: one per line, the first current, the "
        "others previous ones still accepted during a rotation (mode 600; see docs/deploy.md)",
    )
    serve_p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    serve_p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    serve_p.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by this CA (with --tls-cert)",
    )
    serve_p.set_defaults(func=cmd_serve)

    token_p = add(
        "token",
        f"print a token signed with {SECRET_ENV}",
        f"Print a token (JWT) for a user, signed with the secret in {SECRET_ENV}.",
    )
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
    token_p.add_argument(
        "--ttl",
        type=int,
        default=3600,
        help="seconds (default 3600; at most the server's token_max_lifetime_s, 30 days)",
    )
    token_p.add_argument(
        "--config", help="the server's TOML settings file (its token_max_lifetime_s)"
    )
    token_p.add_argument(
        "--secret-file",
        metavar="PATH",
        help=f"sign with this secret file's first line instead of {SECRET_ENV} "
        "(default: TSMSG_SECRET_FILE)",
    )
    token_p.set_defaults(func=cmd_token)

    chat_p = add(
        "chat",
        "an interactive terminal chat",
        "An interactive chat in the terminal: joins --channel and shows its recent "
        "messages, then every new one with its sender and time, others' typing and read "
        "receipts. Type a line to send it; /help lists the commands (/join, /dm, /edit, "
        "/delete, /history, /who, /quit). It reconnects and catches up after a server "
        f"restart. With --secret-file or {SECRET_ENV} it mints a token for --user (all "
        "channels); otherwise pass --token. Exits 0 on /quit or end of input.",
    )
    chat_p.add_argument("--user", help="your user id (required unless --token is given)")
    chat_p.add_argument("--channel", default="room-1", help="channel to join (default room-1)")
    chat_p.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    chat_p.add_argument("--port", type=int, default=7700, help="server port (default 7700)")
    chat_p.add_argument("--token", help=f"a token (JWT); default: minted with {SECRET_ENV}")
    chat_p.add_argument(
        "--secret-file",
        metavar="FILE",
        help=f"mint the token with this secret file's first line instead of {SECRET_ENV} "
        "(e.g. the dev-secret that `serve --dev` keeps in its data directory)",
    )
    chat_p.add_argument(
        "--tls", action="store_true", help="connect over TLS, verifying the server's certificate"
    )
    chat_p.add_argument(
        "--lines",
        action="store_true",
        help="the line mode (lines in, lines out) even in a terminal; the full-screen UI "
        "is used when stdin and stdout are a terminal",
    )
    chat_p.add_argument("--ca-file", metavar="PEM", help="trust this CA only (implies --tls)")
    chat_p.add_argument("--cert", metavar="PEM", help="a client certificate (implies --tls)")
    chat_p.add_argument("--key", metavar="PEM", help="the private key of --cert")
    chat_p.set_defaults(func=cmd_chat, parser=chat_p)

    inspect_p = add(
        "inspect",
        "show channels, sizes and cursors of a data directory (read-only)",
        "Without --channel: the environment (map size, pages, format version, users with "
        "read cursors, dedup journal) and a table of channels (head, horizon, epoch, log "
        "entries, bytes). With --channel: the channel's last --tail entries and its read "
        "cursors. Only reads: safe while a server runs on the same data directory.",
    )
    add_engine_args(inspect_p)
    inspect_p.add_argument("--channel", help="show this channel's entries and read cursors")
    inspect_p.add_argument(
        "--tail",
        type=nonneg_int,
        default=None,
        metavar="N",
        help="with --channel: how many of the last entries (default 20)",
    )
    inspect_p.add_argument(
        "--json",
        action="store_true",
        help="machine-readable: one JSON object; with --channel, JSON lines (a header "
        "with the channel's head, horizon, epoch and cursors, then one entry per line)",
    )
    inspect_p.add_argument(
        "--encryption-key-file",
        metavar="PATH",
        help="with --channel: decrypt encrypted text (without it, shown as [encrypted])",
    )
    inspect_p.set_defaults(func=cmd_inspect, parser=inspect_p)

    compact_p = add(
        "compact",
        "compact channel logs now (Kafka's rule)",
        "Compact channel logs now by the server's policy (--config, TSMSG_* variables; "
        "see STORAGE.md) and print each channel's new horizon. Stop the server first.",
    )
    add_engine_args(compact_p)
    compact_p.add_argument("--channel", help="one channel (default: all)")
    compact_p.add_argument(
        "--encryption-key-file",
        metavar="PATH",
        help="the server's key file (needed when the data directory holds encrypted text)",
    )
    compact_p.add_argument(
        "--rekey",
        action="store_true",
        help="also re-encrypt every entry under the key file's active key (plaintext and "
        "older keys); afterwards older keys may be removed from the key file",
    )
    compact_p.set_defaults(func=cmd_compact)

    backup_p = add(
        "backup",
        "copy a data directory, or export any engine, also while the server runs",
        "Without --export (LMDB only): write a consistent, compacted copy of the data "
        "directory (LMDB's copy with compaction, from one read snapshot) to OUT/data.mdb; "
        "OUT must not exist or be an empty directory. The copy is a data directory: serve "
        "or inspect it with --data-dir OUT. With --export: write the store of the "
        "settings' engine (LMDB or Redis) to the new file OUT as an engine-neutral export "
        "that `tsmsg restore` loads into either engine (see STORAGE.md, Exports).",
    )
    add_engine_args(backup_p)
    backup_p.add_argument(
        "--export", action="store_true", help="write an engine-neutral export file"
    )
    backup_p.add_argument(
        "--encryption-key-file",
        metavar="PATH",
        help="with --export: decrypt encrypted text (an export holds plaintext)",
    )
    backup_p.add_argument("out", metavar="OUT", help="the new data directory (or export file)")
    backup_p.set_defaults(func=cmd_backup)

    restore_p = add(
        "restore",
        "load an export into an empty store of either engine",
        "Check the export FILE whole (a cut-short or altered file is refused before "
        "anything is written), then load it into the store of the settings' engine, which "
        "must be empty: an LMDB --data-dir that does not exist or is an empty directory, "
        "or a Redis without keys under tsmsg's prefix. Channels keep their epochs, seqs and "
        "message ids unless --new-epochs. Stop the servers first.",
    )
    add_engine_args(restore_p)
    restore_p.add_argument(
        "--new-epochs",
        action="store_true",
        help="give every channel a new epoch and new message ids: clients resync (use it "
        "for a backup older than what clients have seen; see docs/deploy.md)",
    )
    restore_p.add_argument(
        "--encryption-key-file",
        metavar="PATH",
        help="LMDB: encrypt the loaded text with this key file's active key",
    )
    restore_p.add_argument("file", metavar="FILE", help="the export to load")
    restore_p.set_defaults(func=cmd_restore)

    keygen_p = add(
        "keygen",
        "make a key for encryption at rest",
        "Make a random AES-256 key for encryption at rest of message text. Without "
        "--encryption-key-file: print it as a key file line (KID:BASE64). With it: create "
        "the file (mode 600) holding the new key, or, if it exists, add the new key as its "
        "first, active line and keep the older keys after it for reading (key rotation; "
        "restart the server to use it). See STORAGE.md.",
    )
    keygen_p.add_argument("--kid", help="the key id (default: today's date and a random suffix)")
    keygen_p.add_argument("--encryption-key-file", metavar="PATH", help="the key file to write")
    keygen_p.set_defaults(func=cmd_keygen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        if args.tail is not None and args.channel is None:
            args.parser.error("--tail needs --channel")  # exits with 2
        if args.tail is None:
            args.tail = 20
    if args.command == "chat":
        if args.user is None and args.token is None:
            args.parser.error("--user is required (unless --token is given)")  # exits with 2
        if not valid_channel(args.channel):
            args.parser.error(f"--channel: {args.channel!r} is no channel name")
        if args.key and not args.cert:
            args.parser.error("--key needs --cert")
    try:
        code: int = args.func(args)
    except BrokenPipeError:
        # The reader of stdout went away (`tsmsg inspect ... | head`): say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except (
        CliError,
        FormatError,
        EncryptionError,
        ExportError,
        StoreError,  # e.g. serve: the engine cannot be reached at start
        ValueError,
        OSError,
        lmdb.Error,
    ) as exc:
        print(f"tsmsg: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "serve" else EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
