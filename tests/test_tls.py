"""TLS over real TCP with the real server, certificates from a throwaway CA (trustme): the
reference client over TLS, server certificate and host name verification, client
certificates, handshake deadline and garbage before the handshake (the server survives
both and other connections are undisturbed), settings and startup errors."""

from __future__ import annotations

import logging
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import trustme

from conftest import (
    SECRET,
    WIRE_TIMEOUT,
    WS_JSON,
    WireClient,
    make_settings,
    mint,
    running_server,
    tcp_stream,
    ws_upgrade,
)
from server_proc import server_env, server_process
from tsmsg import FrameDecoder, encode
from tsmsg.cli import main
from tsmsg.client import Client, ConnectionClosed, connect
from tsmsg.server.settings import Settings, load_settings
from tsmsg.tls import client_tls_context, server_tls_context

HOST = "127.0.0.1"
CH = "room-1"
SHORT = 0.5  # s: the handshake deadline where a test waits for it


@dataclass
class Pki:
    """A CA and a server certificate it signed for 127.0.0.1, as PEM files."""

    dir: Path
    ca: trustme.CA
    ca_file: str
    cert_file: str
    key_file: str

    def leaf(self, name: str, *identities: str, ca: trustme.CA | None = None) -> tuple[str, str]:
        """A new certificate (signed by ``ca``, default this CA): its chain and key files."""
        cert = (ca or self.ca).issue_cert(*identities)
        cert_file, key_file = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_file))
        return str(cert_file), str(key_file)

    def client(self, **kw: Any) -> ssl.SSLContext:
        return client_tls_context(self.ca_file, **kw)


def write_ca(ca: trustme.CA, path: Path) -> str:
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    pki = Pki(tmp_path, ca, write_ca(ca, tmp_path / "ca.pem"), "", "")
    pki.cert_file, pki.key_file = pki.leaf("server", HOST)
    return pki


def tls_settings(tmp_path: Path, pki: Pki, **overrides: Any) -> Settings:
    files = {"tls_cert_file": pki.cert_file, "tls_key_file": pki.key_file}
    return make_settings(tmp_path / "data", **{**files, **overrides})


async def send_and_ack(client: Client, text: str) -> int:
    await client.join(CH)
    ack = await client.send(CH, text)
    assert ack.channel == CH and ack.seq >= 1
    return ack.seq


async def works(port: int, pki: Pki, user: str = "alice", **kw: Any) -> int:
    """hello, join, send, ack over TLS; the ack's seq."""
    with trio.fail_after(WIRE_TIMEOUT * 2):
        async with connect(HOST, port, token=mint(user), ssl_context=pki.client(**kw)) as client:
            assert client.user == user
            return await send_and_ack(client, f"hello from {user}")


async def refused(port: int, ssl_context: ssl.SSLContext) -> ConnectionClosed:
    with trio.fail_after(WIRE_TIMEOUT * 2), pytest.raises(ConnectionClosed) as info:
        async with connect(HOST, port, token=mint("eve"), ssl_context=ssl_context, reconnect=False):
            pass
    return info.value


async def closed_by_server(stream: trio.SocketStream) -> None:
    """Read until the server closes the connection (EOF or reset); bounded."""
    with trio.fail_after(WIRE_TIMEOUT):
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass  # a reset: closed all the same
    await stream.aclose()


def handshake_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]


@pytest.fixture(autouse=True)
def server_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tsmsg.server")


# ---------------------------------------------------------------------- happy path


async def test_hello_send_ack_over_tls(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(tls_settings(tmp_path, pki)) as h:
        assert h.server.tls is not None
        assert h.server.tls.versions == ["TLSv1_2", "TLSv1_3"]
        assert await works(h.server.port, pki, "alice") == 1
        assert await works(h.server.port, pki, "bob") == 2
        for n, version in enumerate((ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3), 3):
            ctx = pki.client()
            ctx.minimum_version = ctx.maximum_version = version
            async with connect(HOST, h.server.port, token=mint("carol"), ssl_context=ctx) as c:
                assert await send_and_ack(c, f"over {version.name}") == n
    assert "TLS on (TLS 1.2+), without client certificates" in caplog.messages
    assert not handshake_failures(caplog)


@pytest.mark.parametrize("pkcs1", [False, True], ids=["pkcs8", "pkcs1"])
async def test_an_rsa_certificate_serves_too(tmp_path: Path, pki: Pki, pkcs1: bool) -> None:
    """trustme's (and certbot's) default is ECDSA; an RSA chain and its key, PKCS#8 or
    OpenSSL's older PKCS#1 ("BEGIN RSA PRIVATE KEY"), work the same."""
    from cryptography.hazmat.primitives import serialization

    rsa = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = rsa.issue_cert(HOST, key_type=trustme.KeyType.RSA)
    chain, key = tmp_path / "rsa.crt", tmp_path / "rsa.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    private = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    form = serialization.PrivateFormat
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        form.TraditionalOpenSSL if pkcs1 else form.PKCS8,
        serialization.NoEncryption(),
    )
    assert pem.startswith(
        b"-----BEGIN RSA PRIVATE KEY-----" if pkcs1 else b"-----BEGIN PRIVATE KEY-----"
    )
    key.write_bytes(pem)
    settings = tls_settings(tmp_path, pki, tls_cert_file=str(chain), tls_key_file=str(key))
    async with running_server(settings) as h:
        ctx = client_tls_context(write_ca(rsa, tmp_path / "rsa-ca.pem"))
        async with connect(HOST, h.server.port, token=mint("alice"), ssl_context=ctx) as c:
            assert await send_and_ack(c, "over RSA") == 1


@pytest.mark.parametrize(
    ("sni", "accepted"),
    [
        ("host:443", False),
        ("-bad-.com", False),
        ("my_host.example", True),
        ("example.com.", True),
        ("::1", True),
    ],
)
async def test_an_sni_that_is_no_host_name_fails_the_handshake(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, sni: str, accepted: bool
) -> None:
    """PROTOCOL.md section 4: the server does not depend on SNI, but one that is neither a
    DNS host name nor an IP address fails the handshake (rustls), with a line saying so.
    (The certificate is for 127.0.0.1: the client checks the chain, not the name.)"""
    ctx = pki.client()
    ctx.check_hostname = False
    async with running_server(tls_settings(tmp_path, pki)) as h:
        tcp = await trio.open_tcp_stream(HOST, h.server.port)
        stream = trio.SSLStream(tcp, ctx, server_hostname=sni)
        with trio.fail_after(WIRE_TIMEOUT):
            if accepted:
                await stream.do_handshake()
            else:
                with pytest.raises(trio.BrokenResourceError):
                    await stream.do_handshake()
        await stream.aclose()
    failures = handshake_failures(caplog)
    if accepted:
        assert not failures
    else:
        assert any("ServerNameMustContainOneHostName" in f for f in failures), failures


async def tls_client(port: int, pki: Pki, user: str, rcvbuf: int | None = None) -> WireClient:
    """A raw protocol client over TLS, past hello (``rcvbuf``: its socket's buffer)."""
    tcp = await tcp_stream(port, rcvbuf)
    stream = trio.SSLStream(tcp, pki.client(), server_hostname=HOST, https_compatible=True)
    client = WireClient(stream)  # type: ignore[arg-type]  # any trio stream will do
    welcome = await client.request("hello", v=1, token=mint(user))
    assert welcome["t"] == "welcome", welcome
    return client


async def test_a_member_that_reads_late_gets_every_event_over_tls(tmp_path: Path, pki: Pki) -> None:
    """The flusher writes TLS connections: when a member's socket is full, the TLS
    records already made wait in the stream's backlog and the connection's writer task
    sends them; the member, reading late, gets every event once, in order."""
    texts = [f"{i:04d}" + "x" * 3000 for i in range(120)]  # 360 KB: far over the socket's
    async with running_server(tls_settings(tmp_path, pki)) as h:
        late = await tls_client(h.server.port, pki, "bob", rcvbuf=4096)
        assert (await late.request("join", channel=CH))["t"] == "ok"
        sender = await tls_client(h.server.port, pki, "alice")
        for i, text in enumerate(texts):
            ack = await sender.request("send", channel=CH, cid=f"c{i}", text=text)
            assert ack["t"] == "ok" and ack["seq"] == i + 1
        conn = next(c for c in h.server.connections.values() if c.user == "bob")
        assert conn.blocked  # the socket was full: the writer task has the rest
        events = [await late.expect("event", seq=i + 1) for i in range(len(texts))]
        assert [e["text"] for e in events] == texts
        assert not [f for f in late.pending if f.get("t") == "resync"]
        await late.aclose()
        await sender.aclose()


async def test_a_slow_consumer_over_tls_is_cut_and_told_to_resync(tmp_path: Path, pki: Pki) -> None:
    settings = tls_settings(tmp_path, pki, max_queue_bytes=64 * 1024)
    async with running_server(settings) as h:
        slow = await tls_client(h.server.port, pki, "bob", rcvbuf=4096)
        assert (await slow.request("join", channel=CH))["t"] == "ok"
        sender = await tls_client(h.server.port, pki, "alice")
        for i in range(100):  # 400 KB of events: over the bound, the stream is cut
            await sender.request("send", channel=CH, cid=f"c{i}", text="y" * 4000)
        resync = await slow.expect("resync", channel=CH, reason="cut")
        assert resync["head"] >= 1
        seqs = [f["seq"] for f in slow.pending if f.get("t") == "event"]
        assert seqs == list(range(1, len(seqs) + 1))  # in order, none after the cut
        assert (await slow.request("ping"))["t"] == "pong"  # the connection goes on
        await slow.aclose()
        await sender.aclose()


# ---------------------------------------------------------------------- verification


async def test_untrusted_ca_and_wrong_hostname_fail_clearly(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = client_tls_context(write_ca(trustme.CA(), tmp_path / "other-ca.pem"))
    async with running_server(tls_settings(tmp_path, pki)) as h:
        port = h.server.port
        # tls=True trusts the system's CAs only: not this test's CA. Not retried.
        with trio.fail_after(WIRE_TIMEOUT * 2), pytest.raises(ConnectionClosed) as info:
            async with connect(HOST, port, token=mint("eve"), tls=True):
                pass
        assert f"TLS: the certificate of {HOST} failed verification" in str(info.value)
        error = await refused(port, stranger)
        assert f"TLS: the certificate of {HOST} failed verification" in str(error)
        assert await works(port, pki) == 1  # the server is fine
    assert len(handshake_failures(caplog)) == 2

    cert, key = pki.leaf("elsewhere", "elsewhere.example")  # our CA, another name
    other = tls_settings(tmp_path, pki, tls_cert_file=cert, tls_key_file=key)
    async with running_server(other) as h:
        error = await refused(h.server.port, pki.client())
        assert f"mismatch, certificate is not valid for '{HOST}'" in str(error), error


# ---------------------------------------------------------------------- client certificates


async def test_client_certificate_required(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    client_ca = trustme.CA()
    settings = tls_settings(
        tmp_path, pki, tls_client_ca_file=write_ca(client_ca, tmp_path / "client-ca.pem")
    )
    good_cert, good_key = pki.leaf("alice", "alice.client.test", ca=client_ca)
    wrong_cert, wrong_key = pki.leaf("mallory", "mallory.client.test")  # the server's CA
    async with running_server(settings) as h:
        port = h.server.port
        await refused(port, pki.client())  # none: the server closes, no alert reaches it
        await refused(port, pki.client(cert_file=wrong_cert, key_file=wrong_key))
        assert await works(port, pki, cert_file=good_cert, key_file=good_key) == 1
    reasons = handshake_failures(caplog)
    assert len(reasons) == 2, reasons
    assert reasons[0].endswith("peer sent no certificates"), reasons
    assert reasons[1].endswith("invalid peer certificate: UnknownIssuer"), reasons
    assert "TLS on (TLS 1.2+), with client certificates" in caplog.messages


# ---------------------------------------------------------------------- misbehaving peers


async def test_silent_client_is_closed_after_the_handshake_deadline(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tls_settings(tmp_path, pki, tls_handshake_timeout_s=SHORT, hello_timeout_s=60.0)
    async with running_server(settings) as h:
        port = h.server.port
        silent = await trio.open_tcp_stream(HOST, port)  # never says ClientHello
        silent_peer = f"{HOST}:{silent.socket.getsockname()[1]}"
        token, ctx = mint("alice"), pki.client()
        with trio.fail_after(WIRE_TIMEOUT * 2):
            async with connect(HOST, port, token=token, ssl_context=ctx) as client:
                assert await send_and_ack(client, "one") == 1
                await closed_by_server(silent)
                assert (await client.send(CH, "two")).seq == 2  # undisturbed
    assert handshake_failures(caplog) == [
        f"TLS handshake failed from {silent_peer}: no handshake within {SHORT:g} s"
    ]
    assert h.server.metrics.value("tsmsg_tls_handshake_failures_total") == 1
    assert h.server.metrics.value("tsmsg_connections_opened_total") == 1  # the TLS client's


async def test_plaintext_to_a_tls_port_is_closed(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(tls_settings(tmp_path, pki)) as h:
        for data in (encode({"t": "hello", "v": 1, "token": mint("eve"), "rid": 1}), b"\0" * 64):
            raw = await trio.open_tcp_stream(HOST, h.server.port)
            await raw.send_all(data)
            await closed_by_server(raw)
        assert await works(h.server.port, pki) == 1
    assert len(handshake_failures(caplog)) == 2
    assert h.server.metrics.value("tsmsg_auth_failures_total") == 0


async def test_admission_refusal_over_tls(tmp_path: Path, pki: Pki) -> None:
    """Past the per-IP connection limit the server answers ``rate_limited`` inside TLS; a
    refused peer that fails the handshake is just closed."""
    settings = tls_settings(tmp_path, pki, ip_connect_rate=1e-6, ip_connect_burst=1)
    async with running_server(settings) as h:
        for _ in range(2):  # admitted, then refused: both fail the handshake
            raw = await trio.open_tcp_stream(HOST, h.server.port)
            await raw.send_all(b"\0" * 64)
            await closed_by_server(raw)
        tcp = await trio.open_tcp_stream(HOST, h.server.port)
        stream = trio.SSLStream(tcp, pki.client(), server_hostname=HOST, https_compatible=True)
        decoder, frames = FrameDecoder(), []
        with trio.fail_after(WIRE_TIMEOUT):
            while not frames:
                frames = decoder.feed(await stream.receive_some(4096))
        await stream.aclose()
        assert frames[0]["t"] == "error" and frames[0]["code"] == "rate_limited", frames
        assert h.server.metrics.value("tsmsg_rate_limited_total", scope="ip_connect") == 2


async def test_a_refusal_at_a_cap_over_tls_sends_no_frame_and_counts_none(
    tmp_path: Path, pki: Pki
) -> None:
    """At a cap a TLS connection is closed without a handshake (PROTOCOL.md 4), so without
    the rate_limited frame: the refusal is counted (tsmsg_rate_limited_total), no error
    frame is (tsmsg_error_frames_total counts the frames sent)."""
    async with running_server(tls_settings(tmp_path, pki, max_connections=1)) as h:
        held = await trio.open_tcp_stream(HOST, h.server.port)  # the one slot
        with trio.fail_after(WIRE_TIMEOUT):
            while h.server.open_sockets < 1:
                await trio.sleep(0.005)
        late = await trio.open_tcp_stream(HOST, h.server.port)
        await closed_by_server(late)
        await held.aclose()
        metrics = h.server.metrics
        assert metrics.value("tsmsg_rate_limited_total", scope="max_connections") == 1
        assert metrics.value("tsmsg_error_frames_total") == 0
        assert metrics.value("tsmsg_frames_out_total") == 0


# ---------------------------------------------------------------------- settings, CLI


def test_tls_settings_from_env_and_their_checks(tmp_path: Path) -> None:
    env = {
        "TSMSG_TLS_CERT_FILE": "c.pem",
        "TSMSG_TLS_KEY_FILE": "k.pem",
        "TSMSG_TLS_HANDSHAKE_TIMEOUT_S": "2.5",
    }
    s = load_settings(None, env, {"tls_client_ca_file": "ca.pem"})
    assert (s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file) == ("c.pem", "k.pem", "ca.pem")
    assert s.tls_handshake_timeout_s == 2.5
    with pytest.raises(ValueError, match="set both or neither"):
        load_settings(None, {"TSMSG_TLS_CERT_FILE": "c.pem"})
    with pytest.raises(ValueError, match="tls_client_ca_file needs"):
        load_settings(None, {"TSMSG_TLS_CLIENT_CA_FILE": "ca.pem"})
    with pytest.raises(ValueError, match="tls_handshake_timeout_s must be > 0"):
        load_settings(None, {"TSMSG_TLS_HANDSHAKE_TIMEOUT_S": "0"})


async def test_the_server_never_writes_session_keys_to_sslkeylogfile(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python's default contexts log TLS secrets to $SSLKEYLOGFILE (a debugging aid); a
    leftover variable must not make a server write every session's keys to disk. Its
    clients (the operator's own debugging) may."""
    keys = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(keys))
    assert client_tls_context(pki.ca_file).keylog_filename == str(keys)
    async with running_server(tls_settings(tmp_path, pki)) as h:
        ctx = pki.client()
        ctx.keylog_filename = None  # type: ignore[assignment]  # this client logs nothing
        async with connect(HOST, h.server.port, token=mint("alice"), ssl_context=ctx) as c:
            assert await send_and_ack(c, "secret") == 1
    # The file exists (a client context made it, with its header line): no secret in it.
    assert "SECRET" not in keys.read_text(), keys.read_text()


def test_bad_pem_files_fail_clearly(tmp_path: Path, pki: Pki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    other_cert, _ = pki.leaf("other", HOST)
    cases = [
        ((str(tmp_path / "nope.pem"), pki.key_file), "no such file: "),
        ((str(junk), pki.key_file), f"cannot load {junk} with key"),
        ((other_cert, pki.key_file), "the private key does not match the certificate"),
        ((pki.cert_file, pki.key_file, str(junk)), f"tls_client_ca_file: cannot load {junk}"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            server_tls_context(*args)
    with pytest.raises(ValueError, match="ca_file: no such file"):
        client_tls_context(str(tmp_path / "nope.pem"))


def test_a_key_file_the_server_cannot_read_is_named(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key file the server's user may not read (mode 600 for another user) stops it
    with the setting, the file and the reason. The tests run as root, who reads any file:
    the refusal is the kernel's answer to open(), stood in for here."""
    real_open = open

    def refusing_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == pki.key_file:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    message = f"tls_cert_file/tls_key_file: cannot read {pki.key_file}: Permission denied"
    with pytest.raises(ValueError) as refused:
        server_tls_context(pki.cert_file, pki.key_file)
    assert str(refused.value) == message


def test_serve_and_chat_with_tls_flags_under_asyncio(tmp_path: Path, pki: Pki) -> None:
    """``tsmsg serve --tls-*`` and ``tsmsg chat --ca-file`` as child processes; the
    client checks the result under asyncio."""

    async def run() -> None:
        args = ("--tls-cert", pki.cert_file, "--tls-key", pki.key_file)
        async with server_process(tmp_path / "data", tmp_path / "server.log", *args) as server:
            assert "TLS on (TLS 1.2+)" in server.log()
            chat = [sys.executable, "-m", "tsmsg.cli", "chat", "--port", str(server.port)]
            chat += ["--user", "bob", "--channel", CH, "--ca-file", pki.ca_file]
            with anyio.fail_after(WIRE_TIMEOUT * 3):
                result = await anyio.run_process(
                    chat, input=b"hi over TLS\n", env=server_env(), check=False
                )
            assert result.returncode == 0, result
            token, ctx = mint("alice"), pki.client()
            with anyio.fail_after(WIRE_TIMEOUT * 2):
                async with connect(HOST, server.port, token=token, ssl_context=ctx) as client:
                    await client.join(CH)
                    page = await client.history(CH)
            assert [(m.sender, m.text) for m in page.messages] == [("bob", "hi over TLS")]

    anyio.run(run, backend="asyncio")


def test_chat_tls_flags_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TSMSG_SECRET", SECRET.decode())
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--user", "alice", "--key", "k.pem"])
    assert exit_info.value.code == 2 and "--key needs --cert" in capsys.readouterr().err
    missing = tmp_path / "missing.pem"
    assert main(["chat", "--user", "alice", "--ca-file", str(missing)]) == 1
    assert capsys.readouterr().err == f"tsmsg: ca_file: no such file: {missing}\n"


async def test_serve_with_a_bad_certificate_path_fails_at_startup(tmp_path: Path, pki: Pki) -> None:
    missing = str(tmp_path / "missing.pem")
    cmd = [sys.executable, "-m", "tsmsg.cli", "serve", "--port", "0"]
    cmd += ["--data-dir", str(tmp_path / "data"), "--tls-cert", missing, "--tls-key", pki.key_file]
    with trio.fail_after(WIRE_TIMEOUT * 3):
        result = await trio.run_process(
            cmd, env=server_env(), capture_stdout=True, capture_stderr=True, check=False
        )
    err = result.stderr.decode()
    assert result.returncode == 1, err  # bad settings: like every other (cli.py exit codes)
    assert err == f"tsmsg: tls_cert_file/tls_key_file: no such file: {missing}\n"
    assert not (tmp_path / "data").exists()  # failed before opening the store


def test_a_key_with_a_passphrase_fails_clearly_without_prompting(tmp_path: Path, pki: Pki) -> None:
    """OpenSSL's default for an encrypted key is to prompt on the terminal: a server started
    from a shell would hang there, one under systemd fail with an opaque EINVAL."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(pki.key_file).read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    combined = tmp_path / "combined.pem"  # the chain and the encrypted key in one file
    combined.write_bytes(Path(pki.cert_file).read_bytes() + locked.read_bytes())
    message = "is encrypted with a passphrase"
    with pytest.raises(ValueError, match=f"tls_cert_file/tls_key_file: .*{locked}.*{message}"):
        server_tls_context(pki.cert_file, str(locked))
    with pytest.raises(ValueError, match=f"cert_file/key_file: .*{combined}.*{message}"):
        client_tls_context(pki.ca_file, str(combined))


async def test_the_websocket_port_speaks_tls(tmp_path: Path, pki: Pki) -> None:
    """wss:// and https:// with the server's TLS settings (PROTOCOL.md 19.1)."""
    async with running_server(tls_settings(tmp_path, pki)) as h:
        port = h.server.ws_port
        origin = f"https://{HOST}:{port}"
        client = await ws_upgrade(h.server, [WS_JSON], origin=origin, ssl_context=pki.client())
        h.clients.append(client)
        welcome = await client.request("hello", v=1, token=mint("alice"))
        assert welcome["t"] == "welcome", welcome
        assert (await client.request("join", channel=CH))["t"] == "ok"
        ok = await client.request("send", channel=CH, cid="c1", text="over wss")
        assert ok["t"] == "ok" and ok["seq"] == 1
        # A plaintext upgrade on a TLS port: a failed handshake (the TLS alert
        # decode_error is all the answer), closed, no WebSocket.
        raw = await trio.open_tcp_stream(HOST, port)
        await raw.send_all(
            f"GET /connect HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: http://{HOST}:{port}\r\n\r\n".encode()
        )
        answer = b""
        with trio.fail_after(WIRE_TIMEOUT):
            while data := await raw.receive_some(4096):
                answer += data
        await raw.aclose()
        assert answer == b"\x15\x03\x03\x00\x02\x02\x32", answer  # fatal, decode_error
