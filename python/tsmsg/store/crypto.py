"""Encryption at rest of message text: AES-256-GCM with rotating keys (STORAGE.md,
"Encryption at rest").

An encrypted log entry keeps its plain fields (seq, kind, id, sender, ts, edited,
deleted) and replaces its body fields (``text`` and ``meta``) by
``enc = [kid, nonce, ciphertext]``: the body fields packed as a msgpack map, sealed with
the key ``kid`` under a random 96-bit nonce, with the entry's 16-byte log key (channel
id + seq) as associated data, so an entry copied to another channel or seq fails to
authenticate instead of showing another message's text.

``cryptography`` is imported only when a key ring is built: a server without encryption
does not need it.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import stat
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tsmsg._native import packb, unpackb
from tsmsg.store.base import Entry, StoreError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's 96-bit nonce, random per entry
ENCRYPTED_FIELDS = ("text", "meta")  # the user-authored body of an entry
KID = re.compile(r"[A-Za-z0-9_.-]{1,32}", re.ASCII)
INSTALL_HINT = "pip install 'tsmsg[crypto]' (or: pip install cryptography)"


class EncryptionError(StoreError):
    """An entry cannot be encrypted or decrypted (unknown key id, failed
    authentication), or the data directory needs a key that was not given."""

    code = "internal"


class KeyFileError(ValueError):
    """The key file is missing, malformed or readable by others."""


def _aesgcm() -> type[AESGCM]:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise EncryptionError(
            f"encryption at rest needs the cryptography package: {INSTALL_HINT}"
        ) from None
    return AESGCM


def _where(ad: bytes) -> str:
    if len(ad) == 16:
        chan, seq = int.from_bytes(ad[:8], "big"), int.from_bytes(ad[8:], "big")
        return f"entry seq {seq} of channel id {chan}"
    return "entry"


class Keyring:
    """The keys of a key file: the first is the active one (new writes), the others are
    kept to read entries written under them. One AESGCM object per key, reused."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise KeyFileError("a key ring needs at least one key")
        cipher = _aesgcm()
        self._ciphers: dict[str, AESGCM] = {}
        for kid, key in keys:
            if not KID.fullmatch(kid):
                raise KeyFileError(f"key id {kid!r}: 1 to 32 of A-Z a-z 0-9 _ . -")
            if len(key) != KEY_BYTES:
                raise KeyFileError(f"key {kid!r} is {len(key)} bytes, AES-256 needs {KEY_BYTES}")
            if kid in self._ciphers:
                raise KeyFileError(f"key id {kid!r} appears twice")
            self._ciphers[kid] = cipher(key)
        self.active = keys[0][0]
        self.kids = tuple(self._ciphers)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        return cls(read_key_file(path))

    def seal(self, entry: Entry, ad: bytes) -> Entry:
        """The entry with its body fields replaced by ``enc`` (a new dict); an entry
        without body fields is returned as it is."""
        body = {k: entry[k] for k in ENCRYPTED_FIELDS if k in entry}
        if not body:
            return entry
        out = {k: v for k, v in entry.items() if k not in ENCRYPTED_FIELDS}
        nonce = os.urandom(NONCE_BYTES)
        out["enc"] = [
            self.active,
            nonce,
            self._ciphers[self.active].encrypt(nonce, packb(body), ad),
        ]
        return out

    def open(self, entry: Entry, ad: bytes) -> Entry:
        """The entry with ``enc`` replaced by its body fields (in place)."""
        return open_entry(entry, ad, self)

    def decrypt(self, enc: Any, ad: bytes) -> dict[str, Any]:
        if not (isinstance(enc, list) and len(enc) == 3 and isinstance(enc[0], str)):
            raise EncryptionError(f"{_where(ad)}: malformed encrypted body")
        kid, nonce, data = enc
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise EncryptionError(
                f"{_where(ad)} is encrypted with key {kid!r}, which is not in the key file "
                f"(it has {', '.join(repr(k) for k in self.kids)})"
            )
        from cryptography.exceptions import InvalidTag

        try:
            body = unpackb(cipher.decrypt(bytes(nonce), bytes(data), ad))
        except (InvalidTag, ValueError, TypeError):
            raise EncryptionError(
                f"{_where(ad)} failed authentication under key {kid!r}: the entry was "
                "tampered with or moved, or the key file holds another key under that id"
            ) from None
        # Only the body fields: a sealed body must not override the entry's plain fields.
        if not isinstance(body, dict) or not body or not body.keys() <= set(ENCRYPTED_FIELDS):
            raise EncryptionError(f"{_where(ad)}: malformed encrypted body")
        return body


def open_entry(entry: Entry, ad: bytes, keyring: Keyring | None) -> Entry:
    """Decrypt ``entry``'s body in place if it has one (``enc``). ``ad`` is the entry's
    log key. Without a key ring an encrypted entry is an error naming its key id."""
    enc = entry.get("enc")
    if enc is None:
        return entry
    if keyring is None:
        kid = enc[0] if isinstance(enc, list) and enc else "?"
        raise EncryptionError(
            f"{_where(ad)} is encrypted with key {kid!r}: pass --encryption-key-file"
        )
    entry.update(keyring.decrypt(enc, ad))
    del entry["enc"]
    return entry


def entry_kid(entry: Entry) -> str | None:
    """The key id an entry's body is encrypted with (None: plaintext or no body)."""
    enc = entry.get("enc")
    return str(enc[0]) if isinstance(enc, list) and enc else None


# ---------------------------------------------------------------------- key files


def read_private_file(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of a file holding secrets (``what``: "encryption key file", "secret
    file"), refused unless it is a regular file that group and others cannot access (like
    ssh's private keys). Errors name ``what`` and the path, never the contents."""
    path = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO at the path must not hang the start (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: {exc.strerror}") from None
    try:  # checked on the open file (no race with a rename), before a file object exists:
        mode = os.fstat(fd).st_mode  # fdopen fails on a directory without naming the path
        if not stat.S_ISREG(mode):
            raise KeyFileError(f"{what} {path} is not a regular file")
        if mode & 0o077:
            raise KeyFileError(
                f"{what} {path} is accessible by group or others "
                f"(mode {stat.filemode(mode)}): chmod 600 {path}"
            )
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def read_key_file(path: str | os.PathLike[str]) -> list[tuple[str, bytes]]:
    """``kid:base64(32 bytes)`` per line, the active key first; blank lines and lines
    starting with ``#`` are ignored. Refused if group or others have any access."""
    path = os.fspath(path)
    text = read_private_file(path, "encryption key file").decode("ascii", errors="replace")
    keys: list[tuple[str, bytes]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kid, sep, b64 = line.partition(":")
        try:
            key = base64.b64decode(b64.strip(), validate=True) if sep else b""
        except ValueError:
            key = b""
        if not sep or not KID.fullmatch(kid.strip()) or len(key) != KEY_BYTES:
            raise KeyFileError(
                f"encryption key file {path}, line {n}: expected "
                f"'<kid>:<base64 of {KEY_BYTES} bytes>' (kid: 1 to 32 of A-Z a-z 0-9 _ . -)"
            )
        keys.append((kid.strip(), key))
    if not keys:
        raise KeyFileError(f"encryption key file {path} holds no key")
    return keys


def load_keyring(path: str | os.PathLike[str] | None) -> Keyring | None:
    """The key ring of a key file; None when no file is configured (empty setting)."""
    return Keyring.from_file(path) if path else None


def new_key_line(kid: str | None = None) -> tuple[str, str]:
    """A fresh random key as (kid, ``kid:base64`` line). The default kid is the date and
    a random suffix, e.g. ``20260501-3fa9c2``."""
    if kid is None:
        kid = datetime.now(UTC).strftime("%Y%m%d") + "-" + secrets.token_hex(3)
    if not KID.fullmatch(kid):
        raise KeyFileError(f"key id {kid!r}: 1 to 32 of A-Z a-z 0-9 _ . -")
    return kid, f"{kid}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"


def add_key(path: str | os.PathLike[str], kid: str | None = None) -> tuple[str, list[str]]:
    """Create the key file with a new key, or make a new key the active one of an
    existing file (its keys kept after it, for reading). Written to a temporary file of
    mode 600 and renamed over ``path``. Returns the new kid and the older kids."""
    path = os.fspath(path)
    old_data, old_kids = b"", []
    if os.path.lexists(path):
        old_kids = [k for k, _ in read_key_file(path)]
        with open(path, "rb") as fh:  # kept byte for byte (comments need not be ASCII)
            old_data = fh.read()
    kid, line = new_key_line(kid)
    if kid in old_kids:
        raise KeyFileError(f"key id {kid!r} is already in {path}")
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(line.encode() + b"\n" + old_data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return kid, old_kids
