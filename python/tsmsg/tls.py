"""TLS contexts for the server and the reference client (PROTOCOL.md section 4, "TLS"):
TLS 1.2 or newer, the protocol unchanged inside it, no ALPN. A missing file or bad PEM
raises ``ValueError`` naming the setting and the file, so it fails at startup clearly."""

from __future__ import annotations

import os
import ssl

MIN_VERSION = ssl.TLSVersion.TLSv1_2


def _require_file(what: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{what}: no such file: {path}")


class _EncryptedKey(Exception):
    """Raised by the password callback: the private key has a passphrase."""


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt for the passphrase on the terminal: a server
    # started from a shell would hang at startup, one under systemd fail with EINVAL.
    raise _EncryptedKey


def _load_cert_chain(ctx: ssl.SSLContext, what: str, cert_file: str, key_file: str) -> None:
    _require_file(what, cert_file)
    if key_file:
        _require_file(what, key_file)
    key = f" with key {key_file}" if key_file else ""
    try:
        ctx.load_cert_chain(cert_file, key_file or None, password=_no_passphrase)
    except _EncryptedKey:
        raise ValueError(
            f"{what}: the private key in {key_file or cert_file} is encrypted with a "
            "passphrase, which tsmsg cannot ask for: give it the key without one (mode 600)"
        ) from None
    except OSError as exc:  # ssl.SSLError included: not PEM, or a key that does not match
        raise ValueError(f"{what}: cannot load {cert_file}{key}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, what: str, ca_file: str) -> None:
    _require_file(what, ca_file)
    try:
        ctx.load_verify_locations(ca_file)
    except OSError as exc:
        raise ValueError(f"{what}: cannot load {ca_file}: {exc}") from None


def server_tls_context(cert_file: str, key_file: str, client_ca_file: str = "") -> ssl.SSLContext:
    """The server's context: its certificate chain and private key (PEM files); with
    ``client_ca_file``, a client must present a certificate signed by that CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.keylog_filename = None  # type: ignore[assignment]  # never SSLKEYLOGFILE's
    ctx.minimum_version = MIN_VERSION
    _load_cert_chain(ctx, "tls_cert_file/tls_key_file", cert_file, key_file)
    if client_ca_file:
        _load_ca(ctx, "tls_client_ca_file", client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and host name, against the
    system's CAs or, with ``ca_file``, that file's (a private CA). ``cert_file`` (with
    ``key_file`` unless its PEM holds the key too): a certificate for servers that ask."""
    if ca_file:
        _require_file("ca_file", ca_file)
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)  # ca_file: its CAs only
    except OSError as exc:
        raise ValueError(f"ca_file: cannot load {ca_file}: {exc}") from None
    ctx.minimum_version = MIN_VERSION
    if cert_file:
        _load_cert_chain(ctx, "cert_file/key_file", cert_file, key_file or "")
    return ctx
