"""Encryption at rest of message text (STORAGE.md, "Encryption at rest"): the store with a
key ring behaves exactly like one without (compared entry by entry), its file holds no
plaintext of any message, edit or meta, keys rotate, and every failure (unknown key id,
tampered or moved entry, no key, no ``cryptography``) is an error naming the key id.
The CLI part runs a real ``tsmsg serve`` with a key file and reads the text back over TCP.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from conftest import mint
from server_proc import server_env, server_process
from tsmsg._native import packb, unpackb
from tsmsg.cli import main
from tsmsg.client import connect
from tsmsg.server.settings import load_settings
from tsmsg.store import CompactionPolicy, EncryptionError, Keyring, LmdbStore, StoreConfig
from tsmsg.store.crypto import KeyFileError, add_key, entry_kid, load_keyring, read_key_file
from tsmsg.store.lmdb_store import U64, LmdbReader

T0 = 1_700_000_000_000
KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
# Distinctive strings, each stored once, so a grep of data.mdb finds exactly these.
WORDS = {
    "message": "zebra-quartz-7731",
    "meta": "heron-basalt-9052",
    "edit": "walrus-ember-4410",
    "deleted": "otter-flint-2208",
    "deleted_edit": "lynx-cobalt-6619",
}
LIVE = ("message", "meta", "edit")  # not deleted: certainly in a plaintext file
CHILD_TIMEOUT = 30.0


def keyring(*keys: tuple[str, bytes]) -> Keyring:
    return Keyring(list(keys))


def config(ring: Keyring | None, **policy: Any) -> StoreConfig:
    return StoreConfig(durability="async", encryption=ring, compaction=CompactionPolicy(**policy))


class Opener:
    """Opens stores (all at T0) and closes every one it opened."""

    def __init__(self) -> None:
        self.opened: list[LmdbStore] = []

    def __call__(self, path: Path, ring: Keyring | None = None, **policy: Any) -> LmdbStore:
        store = LmdbStore(path, config(ring, **policy), clock=lambda: T0)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture
def open_store() -> Iterator[Opener]:
    opener = Opener()
    yield opener
    opener.close_all()


def scenario(store: LmdbStore) -> dict[str, str]:
    """room: a message with meta, a message edited then deleted, a message edited; dm:
    one message; bob's cursor in room at 1. Returns the message ids."""
    a = store.append("room", "alice", "c1", f"hello {WORDS['message']}", {"f": WORDS["meta"]})
    b = store.append("room", "bob", "c2", f"first {WORDS['deleted']}")
    store.edit("room", "bob", b.id, f"second {WORDS['deleted_edit']}")
    store.delete("room", "bob", b.id)
    c = store.append("room", "alice", "c3", "typo")
    store.edit("room", "alice", c.id, f"fixed {WORDS['edit']}")
    store.append("dm", "bob", "c4", "psst")
    store.set_read("bob", "room", 1)
    return {"a": a.id, "b": b.id, "c": c.id}


def reads(store: LmdbStore) -> dict[str, Any]:
    """Everything a client can read, for comparing two stores."""
    out: dict[str, Any] = {}
    for ch in ("room", "dm"):
        out[f"sync {ch}"] = store.sync(ch, 0, 1000)
        out[f"sync {ch} from 2"] = store.sync(ch, 2, 1000)
        out[f"history {ch}"] = store.history(ch, None, 1000)
        out[f"history {ch} before 3"] = store.history(ch, 3, 2)
        out[f"info {ch}"] = store.channel(ch)
        for user in ("alice", "bob"):
            out[f"unread {user} {ch}"] = store.unread(user, ch)
    return out


def raw_log(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """The log as stored (no store of this process may have ``path`` open)."""
    env = lmdb.open(str(path), max_dbs=12, readonly=True)
    try:
        db = env.open_db(b"log", create=False)
        with env.begin() as txn:
            return {
                (U64.unpack(k[:8])[0], U64.unpack(k[8:])[0]): unpackb(v)
                for k, v in txn.cursor(db=db)
            }
    finally:
        env.close()


def rewrite_raw(path: Path, fn: Callable[[lmdb.Transaction, Any], None]) -> None:
    env = lmdb.open(str(path), max_dbs=12)
    try:
        db = env.open_db(b"log")
        with env.begin(write=True) as txn:
            fn(txn, db)
    finally:
        env.close()


def log_key(chan: int, seq: int) -> bytes:
    return U64.pack(chan) + U64.pack(seq)


def write_key_file(path: Path, *keys: tuple[str, bytes], mode: int = 0o600) -> Path:
    path.write_text("".join(f"{kid}:{base64.b64encode(k).decode()}\n" for kid, k in keys))
    path.chmod(mode)
    return path


# ------------------------------------------------------------------ round trip


def test_encrypted_store_reads_exactly_like_a_plaintext_one(
    open_store: Opener, tmp_path: Path
) -> None:
    # One store id for both (an empty store copied), so ids and epochs are the same.
    LmdbStore(tmp_path / "plain").close()
    shutil.copytree(tmp_path / "plain", tmp_path / "sealed")
    plain = open_store(tmp_path / "plain", None, keep_recent=0, tombstone_retention_ms=0)
    sealed = open_store(
        tmp_path / "sealed", keyring(("A", KEY_A)), keep_recent=0, tombstone_retention_ms=0
    )
    assert scenario(plain) == scenario(sealed)
    expected = reads(plain)
    assert reads(sealed) == expected
    room = expected["history room"].messages
    assert room[0]["text"].endswith(WORDS["message"]) and room[0]["meta"] == {"f": WORDS["meta"]}
    assert room[1].get("deleted") and "text" not in room[1]
    assert room[2]["text"].endswith(WORDS["edit"]) and room[2]["edited"] == T0
    # dedup: a retried cid answers the first seq, writes nothing
    assert sealed.append("room", "alice", "c1", "again").seq == 1
    assert sealed.lookup_dup("room", "alice", "c1") == plain.lookup_dup("room", "alice", "c1")
    # compaction (edits, deletes and the tombstone dropped) keeps them equal
    assert plain.compact("room") == sealed.compact("room") == 6
    assert reads(sealed) == reads(plain)
    assert [e["seq"] for e in sealed.history("room", None, 10).messages] == [1, 5]
    sealed.close()
    reopened = open_store(tmp_path / "sealed", keyring(("A", KEY_A)))
    assert reads(reopened) == reads(plain)


@pytest.mark.parametrize("encrypted", [True, False])
def test_data_file_holds_no_plaintext(open_store: Opener, tmp_path: Path, encrypted: bool) -> None:
    path = tmp_path / "db"
    store = open_store(path, keyring(("A", KEY_A)) if encrypted else None)
    scenario(store)
    store.compact("room")
    store.close()
    raw = (path / "data.mdb").read_bytes()
    if encrypted:
        for name, word in WORDS.items():
            assert word.encode() not in raw, name
        assert b"typo" not in raw and b"psst" not in raw
    else:  # the control: the grep does find live text in a plaintext file
        for name in LIVE:
            assert WORDS[name].encode() in raw, name
    entries = raw_log(path)
    bodies = [e for e in entries.values() if "text" in e or "meta" in e]
    sealed = [e for e in entries.values() if "enc" in e]
    assert (len(bodies), len(sealed)) == ((0, 4) if encrypted else (4, 0))  # seq 3 was redacted
    if encrypted:  # one random nonce per entry
        assert len({bytes(e["enc"][1]) for e in sealed}) == len(sealed)
        assert all(len(e["enc"][1]) == 12 for e in sealed)


def test_wire_entries_carry_no_enc_field(open_store: Opener, tmp_path: Path) -> None:
    store = open_store(tmp_path / "db", keyring(("A", KEY_A)))
    scenario(store)
    for entry in store.sync("room", 0, 100).entries + store.history("room", None, 100).messages:
        assert "enc" not in entry


# ------------------------------------------------------------------ keys


def test_rotation_old_entries_readable_new_ones_under_new_key(
    open_store: Opener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "db"
    store = open_store(path, keyring(("A", KEY_A)))
    ids = scenario(store)
    before = reads(store)
    store.close()
    store = open_store(path, keyring(("B", KEY_B), ("A", KEY_A)))
    assert reads(store) == before
    new = store.append("room", "bob", "c9", "under B")
    store.edit("room", "alice", ids["a"], "edited under B")  # rewrites message 1 under B
    store.close()
    kids = {seq: entry_kid(e) for (chan, seq), e in raw_log(path).items() if chan == 1}
    assert kids[new.seq] == "B" and kids[new.seq + 1] == "B" and kids[1] == "B"
    assert kids[5] == "A" and kids[6] == "A"  # untouched entries keep their key
    with LmdbReader(path) as reader:
        assert reader.encryption == ("A", "B")

    # A removed from the key file: an error naming it, never garbage
    store = open_store(path, keyring(("B", KEY_B)))
    with pytest.raises(EncryptionError, match="key 'A'") as err:
        store.sync("room", 0, 100)
    assert "seq 5 of channel id 1" in str(err.value)
    with pytest.raises(EncryptionError, match="key 'A'"):
        store.history("room", None, 100)
    # An edit fails without telling the client key ids; the server's log names the key.
    with caplog.at_level(logging.ERROR, "tsmsg.store"):
        with pytest.raises(EncryptionError, match=r"^the message text cannot be decrypted$"):
            store.edit("room", "alice", ids["c"], "needs A to keep the meta")
    assert "encrypted with key 'A'" in caplog.text
    assert store.history("room", None, 1).messages[0]["text"] == "under B"  # B's still read
    store.delete("room", "alice", ids["c"])  # a delete needs no key: the body is dropped
    store.close()

    # rekey with both keys, then A is no longer needed
    store = open_store(path, keyring(("B", KEY_B), ("A", KEY_A)))
    assert store.rekey_all() == {"room": 0, "dm": 1}  # room: seqs 5 and 6 lost their body
    expected = reads(store)
    store.close()
    store = open_store(path, keyring(("B", KEY_B)))
    assert reads(store) == expected
    assert expected["history room"].messages[0]["text"] == "edited under B"
    store.close()
    with LmdbReader(path) as reader:
        assert reader.encryption == ("B",)


class CommitFailsOnce:
    """The store's environment, whose next write transaction fails at its commit with
    ``MapFullError`` (as LMDB's commit can when saving its free list in a full map); the
    store grows the map and runs the step again."""

    def __init__(self, env: Any) -> None:
        self._env, self.fired = env, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def begin(self, **kw: Any) -> Any:
        txn = self._env.begin(**kw)
        return txn if self.fired or not kw.get("write") else _FailingCommit(txn, self)


class _FailingCommit:
    def __init__(self, txn: lmdb.Transaction, owner: CommitFailsOnce) -> None:
        self._txn, self._owner = txn, owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)

    def __enter__(self) -> _FailingCommit:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> bool:
        self._txn.abort()
        if kind is None:
            self._owner.fired = True
            raise lmdb.MapFullError("injected at commit")
        return False


def test_rekey_retried_after_a_full_map_misses_no_entry(
    open_store: Opener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rekey step that failed (the map full at its commit: the store grows the map and
    runs it again) had already moved its resume point and count: the retry skipped the
    step's entries, left them in plaintext (or under the old key) and counted them twice,
    and rekey_all then recorded that only the active key was in use."""
    from tsmsg.store import lmdb_store

    monkeypatch.setattr(lmdb_store, "COMPACT_CHUNK", 2)
    path = tmp_path / "db"
    plain = open_store(path)
    for i in range(5):
        plain.append("room", "alice", f"c{i}", f"plain {i} {WORDS['message']}")
    plain.close()
    store = open_store(path, keyring(("A", KEY_A)))
    env = store._env
    store._env = failing = CommitFailsOnce(env)
    try:
        counts = store.rekey_all()
    finally:
        store._env = env
    assert failing.fired and counts == {"room": 5}
    store.close()
    assert [entry_kid(e) for _, e in sorted(raw_log(path).items())] == ["A"] * 5


def test_missing_old_key_is_warned_at_open(
    open_store: Opener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "db"
    open_store(path, keyring(("A", KEY_A))).close()
    with caplog.at_level(logging.WARNING, logger="tsmsg.store"):
        open_store(path, keyring(("B", KEY_B)))
    assert "'A'" in caplog.text and "rekey" in caplog.text


def test_open_without_key_refused_when_encrypted(open_store: Opener, tmp_path: Path) -> None:
    path = tmp_path / "db"
    scenario(open_store(path, keyring(("A", KEY_A))))
    open_store.close_all()
    with pytest.raises(EncryptionError, match=r"key\(s\) 'A'.*--encryption-key-file"):
        LmdbStore(path, config(None))
    with LmdbReader(path) as reader:  # a reader opens; its tail keeps the text sealed
        info, entries, _ = reader.tail("room", 10)
        assert info is not None and all("text" not in e for e in entries)
        assert entry_kid(entries[0]) == "A"
    with LmdbReader(path, keyring=keyring(("A", KEY_A))) as reader:
        _, entries, _ = reader.tail("room", 10)
        assert entries[0]["text"] == f"hello {WORDS['message']}"


def test_turning_encryption_on_keeps_plaintext_entries_readable(
    open_store: Opener, tmp_path: Path
) -> None:
    path = tmp_path / "db"
    plain = open_store(path)
    ids = scenario(plain)
    before = reads(plain)
    plain.close()
    store = open_store(path, keyring(("A", KEY_A)))
    assert reads(store) == before  # mixed: the old entries are plaintext
    store.append("room", "alice", "c8", "sealed one")
    store.edit("room", "alice", ids["a"], "now sealed")  # keeps the meta, seals both
    page = store.history("room", None, 10).messages
    assert page[0]["text"] == "now sealed" and page[0]["meta"] == {"f": WORDS["meta"]}
    store.close()
    entries = raw_log(path)
    assert entry_kid(entries[(1, 1)]) == "A" and "text" in entries[(1, 5)]
    store = open_store(path, keyring(("A", KEY_A)))
    assert store.rekey("room") == 2  # seq 5 and its edit seq 6
    assert store.rekey_all() == {"room": 0, "dm": 1}
    store.close()
    assert not any("text" in e or "meta" in e for e in raw_log(path).values())
    with LmdbReader(path) as reader:
        assert reader.encryption == ("A",)
        (tmp_path / "copy").mkdir()
        reader.backup(tmp_path / "copy")
    # data.mdb's free pages may still hold the old plaintext; a compacting backup copies
    # only live pages (STORAGE.md: how to get a file without it)
    raw = (tmp_path / "copy" / "data.mdb").read_bytes()
    assert not any(word.encode() in raw for word in WORDS.values())


def test_tampered_and_moved_entries_fail_authentication(open_store: Opener, tmp_path: Path) -> None:
    path = tmp_path / "db"
    ring = keyring(("A", KEY_A))
    scenario(open_store(path, ring))
    open_store.close_all()

    def tamper(txn: lmdb.Transaction, db: Any) -> None:
        entry = unpackb(txn.get(log_key(1, 1), db=db))
        data = bytearray(entry["enc"][2])
        data[0] ^= 1
        entry["enc"][2] = bytes(data)
        txn.put(log_key(1, 1), packb(entry), db=db)

    rewrite_raw(path, tamper)
    store = open_store(path, ring)
    with pytest.raises(EncryptionError, match="seq 1 of channel id 1 failed authentication"):
        store.history("room", None, 10)
    store.close()

    def move(txn: lmdb.Transaction, db: Any) -> None:  # message 5's sealed body onto seq 1
        entry = unpackb(txn.get(log_key(1, 5), db=db))
        entry["seq"], entry["id"] = 1, "1-1"
        txn.put(log_key(1, 1), packb(entry), db=db)

    rewrite_raw(path, move)
    store = open_store(path, ring)
    with pytest.raises(EncryptionError, match=r"seq 1 .* failed authentication under key 'A'"):
        store.sync("room", 0, 10)
    store.close()
    other = open_store(path, keyring(("A", KEY_B)))  # another key under the same id
    with pytest.raises(EncryptionError, match=r"seq 5 .*failed authentication under key 'A'"):
        other.sync("room", 4, 10)


def test_missing_cryptography_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(EncryptionError, match="needs the cryptography package"):
        Keyring([("A", KEY_A)])


def test_key_file_format_and_permissions(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "keys", ("B", KEY_B), ("A", KEY_A))
    path.write_text("# rotated 2026-05\n\n" + path.read_text())
    assert read_key_file(path) == [("B", KEY_B), ("A", KEY_A)]
    ring = load_keyring(str(path))
    assert ring is not None and ring.active == "B" and ring.kids == ("B", "A")
    assert load_keyring("") is None
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match=r"group or others.*chmod 600"):
        read_key_file(path)
    bad = {
        "nocolon\n": "line 1",
        "A:" + base64.b64encode(b"short").decode() + "\n": "line 1",
        "bad id!:" + base64.b64encode(KEY_A).decode() + "\n": "line 1",
        "A:not base64!!\n": "line 1",
        "# nothing\n": "holds no key",
    }
    for text, message in bad.items():
        path.write_text(text)
        path.chmod(0o600)
        with pytest.raises(KeyFileError, match=message):
            read_key_file(path)
    write_key_file(path, ("A", KEY_A), ("A", KEY_B))
    with pytest.raises(KeyFileError, match="twice"):
        Keyring.from_file(path)
    with pytest.raises(KeyFileError, match="No such file"):
        read_key_file(tmp_path / "absent")


def test_add_key_creates_then_rotates(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    kid, older = add_key(path, "A")
    assert (kid, older) == ("A", [])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kid, older = add_key(path)
    assert older == ["A"] and kid != "A"
    assert [k for k, _ in read_key_file(path)] == [kid, "A"]
    with pytest.raises(KeyFileError, match="already"):
        add_key(path, "A")
    assert os.listdir(tmp_path) == ["keys"]  # no temporary file left


def test_add_key_keeps_a_key_file_the_server_reads_byte_for_byte(tmp_path: Path) -> None:
    """A comment that is not ASCII (a name, a date in words) is read by the server;
    keygen failed on it with "'ascii' codec can't decode byte ...", naming no file."""
    path = tmp_path / "keys"
    old = "# clé de Zoë, 2026\n" + f"A:{base64.b64encode(KEY_A).decode()}\n"
    path.write_bytes(old.encode())
    path.chmod(0o600)
    assert read_key_file(path) == [("A", KEY_A)]
    kid, older = add_key(path, "B")
    assert (kid, older) == ("B", ["A"])
    new = path.read_bytes()
    assert new.startswith(b"B:") and new.endswith(old.encode())
    assert [k for k, _ in read_key_file(path)] == ["B", "A"]


def test_settings_take_the_key_file_from_toml_env_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "tsmsg.toml"
    toml.write_text('encryption_key_file = "/from/toml"\n')
    assert load_settings(str(toml), {}).encryption_key_file == "/from/toml"
    env = {"TSMSG_ENCRYPTION_KEY_FILE": "/from/env"}
    assert load_settings(str(toml), env).encryption_key_file == "/from/env"
    flags = {"encryption_key_file": "/from/flag"}
    assert load_settings(str(toml), env, flags).encryption_key_file == "/from/flag"
    assert load_settings(None, {}).encryption_key_file == ""


# ------------------------------------------------------------------ CLI, real server


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_keygen_prints_a_key_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "keygen", "--kid", "k1")
    kid, _, b64 = out.strip().partition(":")
    assert code == 0 and kid == "k1" and len(base64.b64decode(b64, validate=True)) == 32


async def test_serve_inspect_compact_backup_with_a_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, data, copy = tmp_path / "keys", tmp_path / "data", tmp_path / "copy"
    assert cli(capsys, "keygen", "--kid", "A", "--encryption-key-file", str(keys))[0] == 0
    secret_text, edit_text = f"hi {WORDS['message']}", f"fix {WORDS['edit']}"
    args = ("--encryption-key-file", str(keys))
    async with server_process(data, tmp_path / "server.log", *args) as server:
        async with connect("127.0.0.1", server.port, token=mint("alice"), reconnect=False) as c:
            await c.join("room")
            ack = await c.send("room", secret_text, meta={"f": WORDS["meta"]})
            await c.send("room", "second")
            await c.edit("room", ack.id, edit_text)
            page = await c.history("room")
            assert [m.text for m in page.messages] == [edit_text, "second"]
            assert page.messages[0].meta == {"f": WORDS["meta"]}
            synced = await c.sync("room", 0)
            # the message entry holds the message's current state, the edit entry its text
            texts = [getattr(e, "text", None) for e in synced.events]
            assert texts == [edit_text, "second", edit_text]
        # while it serves: inspect (read-only) and backup
        code, out, _ = cli(capsys, "inspect", "--data-dir", str(data), "--channel", "room", *args)
        assert code == 0 and f"[edited] {edit_text}" in out and "second" in out
        code, out, _ = cli(capsys, "inspect", "--data-dir", str(data), "--channel", "room")
        assert code == 0 and "[encrypted: key 'A']" in out and WORDS["edit"] not in out
        code, out, _ = cli(
            capsys, "inspect", "--data-dir", str(data), "--channel", "room", "--json"
        )
        first = json.loads(out.splitlines()[1])
        assert code == 0 and first["enc"][0] == "A" and "text" not in first
        code, out, _ = cli(capsys, "inspect", "--data-dir", str(data))
        assert code == 0 and "encryption      on (keys A)" in out
        code, out, _ = cli(capsys, "inspect", "--data-dir", str(data), "--json")
        assert code == 0 and json.loads(out)["encryption"] == ["A"]
        code, out, _ = cli(capsys, "backup", "--data-dir", str(data), str(copy))
        assert code == 0, out
        assert await server.terminate() == 0
    for path in (data, copy):
        raw = (path / "data.mdb").read_bytes()
        assert not any(w.encode() in raw for w in (WORDS["message"], WORDS["edit"], WORDS["meta"]))
    code, out, _ = cli(capsys, "inspect", "--data-dir", str(copy), "--channel", "room", *args)
    assert code == 0 and edit_text in out  # the backup decrypts with the same key file

    # compact needs the key; --rekey after a rotation moves everything to the new key
    code, _, err = cli(capsys, "compact", "--data-dir", str(data))
    assert code == 1 and "key(s) 'A'" in err and "--encryption-key-file" in err
    code, out, _ = cli(capsys, "keygen", "--kid", "B", "--encryption-key-file", str(keys))
    assert code == 0 and "older keys, kept for reading: A" in out
    code, out, _ = cli(capsys, "compact", "--data-dir", str(data), *args, "--rekey")
    assert code == 0 and "room\trekeyed=3" in out
    assert {entry_kid(e) for e in raw_log(data).values()} == {"B"}

    # a server without the key refuses to start, naming the key
    child = subprocess.run(
        [sys.executable, "-m", "tsmsg.cli", "serve", "--port", "0", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env=server_env(),
    )
    assert child.returncode == 1, child.stderr
    assert "key(s) 'B'" in child.stderr and "Traceback" not in child.stderr

    # and one with a key file others may read refuses too
    keys.chmod(0o644)
    child = subprocess.run(
        [sys.executable, "-m", "tsmsg.cli", "serve", "--port", "0", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env=server_env(TSMSG_ENCRYPTION_KEY_FILE=str(keys)),
    )
    assert child.returncode == 1 and "chmod 600" in child.stderr, child.stderr


def test_a_key_file_path_that_is_no_regular_file_is_refused_clearly(tmp_path: Path) -> None:
    """A directory used to surface as ``[Errno 21] Is a directory: 3`` (no path), and a
    FIFO blocked the start until something wrote to it."""
    folder = tmp_path / "keys.d"
    folder.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match=f"{folder} is not a regular file"):
        read_key_file(folder)
    fifo = tmp_path / "keys.fifo"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_key_file(fifo)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(CHILD_TIMEOUT)
    if reader.is_alive():  # blocked in open(): give it a writer so the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(CHILD_TIMEOUT)
        pytest.fail("read_key_file blocked on a FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], KeyFileError), outcome
    assert f"{fifo} is not a regular file" in str(outcome[0])


def test_a_sealed_body_cannot_override_the_plain_fields() -> None:
    """Only ``text`` and ``meta`` are sealed; a body holding anything else (crafted by
    whoever holds the key) is malformed, never merged over ``sender`` or ``deleted``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ring = keyring(("A", KEY_A))
    ad, nonce = log_key(1, 5), os.urandom(12)
    for body in ({"text": "hi", "sender": "mallory"}, {"deleted": True}, {}):
        sealed = AESGCM(KEY_A).encrypt(nonce, packb(body), ad)
        entry = {"seq": 5, "kind": "message", "sender": "alice", "enc": ["A", nonce, sealed]}
        with pytest.raises(EncryptionError, match="seq 5 of channel id 1: malformed"):
            ring.open(entry, ad)
    good = ring.seal({"seq": 5, "kind": "message", "sender": "alice", "text": "hi"}, ad)
    assert ring.open(good, ad) == {"seq": 5, "kind": "message", "sender": "alice", "text": "hi"}


# ------------------------------------------------------------------ exports


def test_an_export_of_encrypted_text_is_as_private_as_the_key_file(
    open_store: Opener, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export holds the text in plaintext: it was created with the umask's mode
    (0644 under the usual 022), readable by every local user, while the key file that
    protects the same text must be 600."""
    keys = write_key_file(tmp_path / "keys", ("A", KEY_A))
    scenario(open_store(tmp_path / "data", keyring(("A", KEY_A))))
    open_store.close_all()
    out = tmp_path / "x.export"
    old = os.umask(0o022)
    try:
        code, _, err = cli(
            capsys, "backup", "--export", "--data-dir", str(tmp_path / "data"),
            "--encryption-key-file", str(keys), str(out),
        )  # fmt: skip
    finally:
        os.umask(old)
    assert (code, err) == (0, "")
    assert WORDS["edit"].encode() in out.read_bytes()  # plaintext, as documented
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
