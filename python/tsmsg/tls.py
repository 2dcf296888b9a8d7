"""TLS settings for the server and the reference client (PROTOCOL.md section 4, "TLS"):
TLS 1.2 or newer, the protocol unchanged inside it, no ALPN. A missing file or bad PEM
raises ``ValueError`` naming the setting and the file, so it fails at startup clearly."""

from __future__ import annotations

import os
import ssl

from tsmsg._native import TlsConfig

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


def _read(what: str, path: str) -> bytes:
    _require_file(what, path)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:  # not readable by the server's user
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None


def server_tls_context(cert_file: str, key_file: str, client_ca_file: str = "") -> TlsConfig:
    """The server's TLS settings (rustls, in the Rust extension: rust/src/tls.rs): its
    certificate chain and private key (PEM files; no ``key_file`` when the chain's file
    holds the key); with ``client_ca_file``, a client must present a certificate signed by
    that CA. It never writes session keys anywhere ($SSLKEYLOGFILE is for clients)."""
    what = "tls_cert_file/tls_key_file"
    cert = _read(what, cert_file)
    key = _read(what, key_file) if key_file else cert
    try:
        config = TlsConfig(cert, key)
    except ValueError as exc:
        if "passphrase" in str(exc):
            raise ValueError(
                f"{what}: the private key in {key_file or cert_file} is encrypted with a "
                "passphrase, which tsmsg cannot ask for: give it the key without one (mode 600)"
            ) from None
        with_key = f" with key {key_file}" if key_file else ""
        raise ValueError(f"{what}: cannot load {cert_file}{with_key}: {exc}") from None
    if not client_ca_file:
        return config
    ca = _read("tls_client_ca_file", client_ca_file)
    try:
        return TlsConfig(cert, key, ca)
    except ValueError as exc:
        raise ValueError(f"tls_client_ca_file: cannot load {client_ca_file}: {exc}") from None


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
