"""The server's TLS (rust/src/tls.rs, server/tls_stream.py) against peers that do what
Python's ssl module never does on its own: a client handshakes with an SSLObject and then
writes TLS 1.3 records it encrypts itself (its traffic secret from the key log), such as
floods of KeyUpdates; and the private keys that rustls cannot serve with."""

from __future__ import annotations

import ssl
import struct
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

import test_tls
from conftest import WIRE_TIMEOUT, running_server, tcp_stream
from test_tls import HOST, Pki, tls_settings
from test_tls_stream import (
    OPEN,
    close_clients,  # noqa: F401  # the fixture: client streams closed after each test
    conn_of,
    errors_logged,
    hello,
    server_logs,  # noqa: F401  # the fixture: the server's INFO log captured
    small_send_buffer,
    wait_for,
)
from tsmsg import encode
from tsmsg.tls import server_tls_context

pki = test_tls.pki  # the fixture: a throwaway CA and the server's certificate


def expand_label(h: hashes.HashAlgorithm, secret: bytes, label: bytes, n: int) -> bytes:
    """TLS 1.3's HKDF-Expand-Label with an empty context (RFC 8446 section 7.1)."""
    full = b"tls13 " + label
    info = struct.pack(">H", n) + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(h, n, info).derive(secret)


class RecordWriter:
    """The client's TLS 1.3 write side: records of any content type, KeyUpdates."""

    SUITES: ClassVar[dict[str, tuple[hashes.HashAlgorithm, int, Any]]] = {
        "TLS_AES_256_GCM_SHA384": (hashes.SHA384(), 32, AESGCM),
        "TLS_AES_128_GCM_SHA256": (hashes.SHA256(), 16, AESGCM),
        "TLS_CHACHA20_POLY1305_SHA256": (hashes.SHA256(), 32, ChaCha20Poly1305),
    }

    def __init__(self, suite: str, secret: bytes) -> None:
        self.hash, self.key_len, self.aead = self.SUITES[suite]
        self._keys(secret)

    def _keys(self, secret: bytes) -> None:
        self.secret = secret
        self.cipher = self.aead(expand_label(self.hash, secret, b"key", self.key_len))
        self.iv = expand_label(self.hash, secret, b"iv", 12)
        self.seq = 0

    def record(self, content: bytes, content_type: int) -> bytes:
        inner = content + bytes([content_type])
        header = b"\x17\x03\x03" + struct.pack(">H", len(inner) + 16)
        nonce = bytes(a ^ b for a, b in zip(self.iv, self.seq.to_bytes(12, "big"), strict=True))
        self.seq += 1
        return header + self.cipher.encrypt(nonce, inner, header)

    def data(self, payload: bytes) -> bytes:
        return self.record(payload, 23)

    def key_update(self) -> bytes:
        """A KeyUpdate with update_requested (the server must answer with its own)."""
        record = self.record(b"\x18\x00\x00\x01\x01", 22)
        self._keys(expand_label(self.hash, self.secret, b"traffic upd", self.hash.digest_size))
        return record


class Crafted:
    """A TLS 1.3 client over TCP that writes its own records after the handshake."""

    def __init__(self, tcp: trio.SocketStream, writer: RecordWriter, finished: bytes) -> None:
        self.tcp = tcp
        self.w = writer
        self.finished = finished  # the client's last flight, not sent yet

    @classmethod
    async def connect(
        cls, port: int, pki: Pki, keylog: Path, *, rcvbuf: int | None = None
    ) -> Crafted:
        tcp = await tcp_stream(port, rcvbuf)
        OPEN.append(tcp)
        ctx = pki.client()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.keylog_filename = str(keylog)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname=HOST)
        with trio.fail_after(WIRE_TIMEOUT):
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                if data := out.read():
                    await tcp.send_all(data)
                data = await tcp.receive_some(65536)
                assert data, "the server closed during the handshake"
                inc.write(data)
        secret = next(
            bytes.fromhex(line.split()[2])
            for line in keylog.read_text().splitlines()
            if line.startswith("CLIENT_TRAFFIC_SECRET_0 ")
        )
        cipher = obj.cipher()
        assert cipher is not None
        return cls(tcp, RecordWriter(cipher[0], secret), out.read())

    async def send(self, data: bytes) -> None:
        await self.tcp.send_all(self.finished + data)
        self.finished = b""


# ---------------------------------------------------------------------- key types


def self_signed(tmp_path: Path, name: str, key: Any) -> tuple[str, str]:
    """A self-signed certificate for ``key``: its PEM chain and key files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    ed = isinstance(key, ed448.Ed448PrivateKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None if ed else hashes.SHA256())
    )
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_file), str(key_file)


@pytest.mark.parametrize("kind", ["ecdsa-p521", "ed448"])
async def test_a_key_type_rustls_cannot_serve_with_is_explained(tmp_path: Path, kind: str) -> None:
    """Python's ssl served with an ECDSA P-521, an Ed448 or an RSA key over 4096 bits
    (checked by hand: 8192); rustls's ring provider signs with none of them. The operator
    must learn that the key's type (or size) is the problem and which ones work, not
    "failed to parse private key as RSA, ECDSA, or EdDSA" (for a valid key of one of
    those)."""
    key = (
        ec.generate_private_key(ec.SECP521R1())
        if kind == "ecdsa-p521"
        else (ed448.Ed448PrivateKey.generate())
    )
    cert_file, key_file = self_signed(tmp_path, kind, key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)  # what the server loaded before rustls
    with pytest.raises(ValueError) as info:
        server_tls_context(cert_file, key_file)
    message = str(info.value)
    assert key_file in message, message
    assert "not supported" in message, message
    assert all(k in message for k in ("RSA", "P-256", "P-384", "Ed25519")), message
    assert "failed to parse" not in message, message


# ---------------------------------------------------------------------- KeyUpdate flood


async def test_key_updates_from_a_peer_that_reads_nothing_do_not_pile_up(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a defect (a regression guard for one suspected): rustls allows 32 KeyUpdate
    requests between application data records, and an empty record is one, so a peer
    that reads nothing could send [31 KeyUpdates, an empty record] over and over without
    a frame (no reply queued, no writer task, no send timeout). The answers must not pile
    up in the stream's backlog: rustls keeps one answer pending, sent before the next
    application data record (RFC 8446 4.6.3 allows that)."""
    async with running_server(tls_settings(tmp_path, pki)) as h:
        c = await Crafted.connect(h.server.port, pki, tmp_path / "keys.log", rcvbuf=4096)
        await c.send(c.w.data(encode(hello("alice"))))
        await wait_for(lambda: any(x.user == "alice" for x in h.server.connections.values()))
        conn = conn_of(h, "alice")
        stream = small_send_buffer(conn)
        most = 0
        with trio.fail_after(WIRE_TIMEOUT):
            for _ in range(1500):  # 46,500 KeyUpdates (1.3 MB); answered one by one: 1.2 MB
                batch = b"".join(c.w.key_update() for _ in range(31))
                await c.send(batch + c.w.data(b""))
                most = max(most, len(stream.backlog))
        await trio.sleep(0.2)
        most = max(most, len(stream.backlog))
        assert most <= 4096, f"{most} bytes of KeyUpdate answers held for the peer"
        assert conn in h.server.connections.values()
    assert not errors_logged(caplog)


# ---------------------------------------------------------------------- coalesced handshake


def client_hello(pki: Pki) -> bytes:
    """Python ssl's first flight: one record holding its ClientHello."""
    ctx = ssl.create_default_context(cafile=pki.ca_file)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


async def test_a_client_hello_record_with_more_handshake_messages_is_a_tls_error(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Unauthenticated bytes: the ClientHello's record also holding two more handshake
    messages. rustls fails the handshake (unexpected message) with the two still in its
    handshake deframer, whose spans point into the buffer it was given; drain_alerts then
    calls process_tls_records with an empty buffer and rustls panics indexing it. The
    panic is pyo3's PanicException, a BaseException: it escapes _tls_handshake (which
    re-raises BaseException) and the connection's handler, and ends the whole server."""
    record = client_hello(pki)
    assert record[0] == 22  # a handshake record
    extra = bytes([20, 0, 0, 4]) + b"abcd" + bytes([20, 0, 0, 4]) + b"efgh"
    (length,) = struct.unpack(">H", record[3:5])
    crafted = record[:3] + struct.pack(">H", length + len(extra)) + record[5 : 5 + length] + extra
    async with running_server(tls_settings(tmp_path, pki)) as h:
        stream = await trio.open_tcp_stream(HOST, h.server.port)
        await stream.send_all(crafted)
        await test_tls.closed_by_server(stream)  # a fatal alert, then closed
        assert await test_tls.works(h.server.port, pki) >= 1  # and the server still serves
