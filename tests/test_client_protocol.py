"""The sans-IO client protocol by plain calls: reconnect and rejoin, the reorder buffer and
dedup by seq, gaps filled by sync, resync handling, the outbox across reconnects, rate
limits, token refresh, heartbeats, bounded queues and error mapping. No sockets, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from tsmsg import FrameDecoder
from tsmsg.client import (
    Ack,
    BadRequest,
    ClientError,
    ClientProtocol,
    ConnectionChanged,
    ConnectionClosed,
    Delete,
    Edit,
    Forbidden,
    HistoryPage,
    JoinInfo,
    Left,
    LimitExceeded,
    Message,
    NotFound,
    ProtocolViolation,
    RateLimited,
    Resynced,
    StoreUnavailable,
    TokenExpired,
    Unauthorized,
    error_from_frame,
)
from tsmsg.client.protocol import (
    Completed,
    Disconnect,
    Failed,
    FollowChanged,
    HelloFailed,
    NeedToken,
    SendCompleted,
    Welcomed,
)
from tsmsg.protocol.limits import Limits

CH = "room-1"
HEARTBEAT = 30_000


class Wire:
    """Drives a ClientProtocol as a server would: ``sent()`` are the client's frames since
    the last call, ``recv(...)`` feeds one server frame."""

    def __init__(self, **kw: Any) -> None:
        self.p = ClientProtocol(**kw)
        self.now = 0
        self.outputs: list[Any] = []

    def sent(self) -> list[dict[str, Any]]:
        return FrameDecoder().feed(self.p.data_to_send())

    def recv(self, **frame: Any) -> list[Any]:
        out = self.p.receive_frame(frame, self.now)
        self.outputs += out
        return out

    def reply(self, request: dict[str, Any], t: str = "ok", **fields: Any) -> list[Any]:
        return self.recv(t=t, rid=request["rid"], **fields)

    def connect(
        self,
        user: str = "alice",
        *,
        limits: dict[str, Any] | None = None,
        max_frame: int = 1 << 20,
    ) -> list[dict[str, Any]]:
        """hello + welcome (the server's ``limits`` and ``max_frame``, if given); returns
        what the client sent after the welcome."""
        self.p.connection_made("token", self.now)
        [hello] = self.sent()
        assert hello["t"] == "hello" and hello["v"] == 1 and hello["token"] == "token"
        self.reply(
            hello,
            "welcome",
            v=1,
            user=user,
            session="s1",
            heartbeat_ms=HEARTBEAT,
            max_frame=max_frame,
            limits=limits or Limits().announce(),
            ts=0,
        )
        return self.sent()

    def events(self, channel: str | None = None) -> list[Any]:
        out = []
        while (e := self.p.next_event(channel)) is not None:
            out.append(e)
        return out

    def tick_for(self, ms: int, step: int = 1000) -> list[dict[str, Any]]:
        """Let ``ms`` of time pass in steps, answering every ping (the connection stays
        healthy); returns every other frame the client sent meanwhile."""
        frames: list[dict[str, Any]] = []
        end = self.now + ms
        while self.now < end:
            self.now += step
            self.outputs += self.p.tick(self.now)
            for f in self.sent():
                if f["t"] == "ping":
                    self.reply(f, "pong", ts=self.now)
                else:
                    frames.append(f)
        return frames

    def lose(self, reason: str = "reset") -> list[Any]:
        out = self.p.connection_lost(reason, self.now)
        self.outputs += out
        return out


def event(seq: int, kind: str = "message", **fields: Any) -> dict[str, Any]:
    frame = {"t": "event", "channel": CH, "seq": seq, "kind": kind, "id": f"1-{seq}"}
    frame.update(sender="bob", ts=1000 + seq)
    if kind in ("message", "edit"):
        frame["text"] = f"m{seq}"
    frame.update(fields)
    return frame


def join_ok(w: Wire, req: dict[str, Any], head: int, epoch: int = 1, horizon: int = 0) -> None:
    assert req["t"] == "join"
    w.reply(req, channel=req["channel"], head=head, read=0, epoch=epoch, horizon=horizon)


def sync_ok(
    w: Wire, req: dict[str, Any], seqs: range | list[int], more: bool = False, epoch: int = 1
) -> None:
    assert req["t"] == "sync"
    events = [event(s) for s in seqs]
    head = max([req["since"], *seqs])
    w.reply(req, channel=CH, events=events, more=more, head=head, epoch=epoch)


def seqs(events: list[Any]) -> list[int]:
    return [e.seq for e in events if isinstance(e, (Message, Edit, Delete))]


def live_channel(w: Wire, last: int, epoch: int = 1) -> None:
    """Followed, caught up at ``last`` (restored state), live."""
    w.p.restore([(CH, last, epoch)], [])
    [join] = w.connect()
    join_ok(w, join, head=last, epoch=epoch)
    [sync] = w.sent()
    assert (sync["since"], sync["epoch"]) == (last, epoch)
    sync_ok(w, sync, [], epoch=epoch)
    w.events()


# ------------------------------------------------------------------------ handshake, join


def test_welcome_then_first_join_loads_history_and_continues_from_head() -> None:
    w = Wire()
    assert w.connect() == []
    assert any(isinstance(o, Welcomed) and o.user == "alice" for o in w.outputs)
    assert w.events() == [ConnectionChanged(True, "connected")]
    handle = w.p.join(CH)
    [join] = w.sent()
    join_ok(w, join, head=7)
    assert Completed(handle, JoinInfo(CH, 7, 0, 1, 0)) in w.outputs
    assert FollowChanged(CH, True) in w.outputs
    [history] = w.sent()
    # Only messages up to the head the join reported: later ones come as events.
    assert history == {"t": "history", "rid": history["rid"], "channel": CH, "before": 8}
    w.recv(t="event", **{k: v for k, v in event(8).items() if k != "t"})  # live, held
    page = [{k: v for k, v in event(s).items() if k not in ("t", "channel")} for s in (5, 7)]
    w.reply(history, channel=CH, messages=page, more=True)
    [sync] = w.sent()
    assert (sync["since"], sync["epoch"]) == (7, 1)
    sync_ok(w, sync, [8])
    [resynced, m8] = w.events()
    assert isinstance(resynced, Resynced)
    assert (resynced.head, resynced.epoch) == (7, 1)
    assert [m.seq for m in resynced.messages] == [5, 7]
    assert isinstance(m8, Message) and m8.seq == 8 and m8.text == "m8"
    assert w.p.position(CH) == (8, 1)


def test_replay_join_syncs_from_zero_without_epoch() -> None:
    w = Wire()
    w.connect()
    w.p.join(CH, replay=True)
    [join] = w.sent()
    join_ok(w, join, head=3)
    [sync] = w.sent()
    assert sync["since"] == 0 and "epoch" not in sync
    sync_ok(w, sync, [1, 2], more=True)
    [sync2] = w.sent()
    assert sync2["since"] == 2
    sync_ok(w, sync2, [3])
    assert seqs(w.events()) == [1, 2, 3]


def test_hello_refused_maps_the_error_and_admission_wait() -> None:
    w = Wire()
    w.p.connection_made("token", 0)
    [hello] = w.sent()
    [out] = w.reply(hello, "error", code="unauthorized", message="bad signature")
    assert isinstance(out, HelloFailed) and isinstance(out.error, Unauthorized)
    w.p.connection_made("token", 0)
    w.sent()
    [out] = w.recv(t="error", code="rate_limited", message="slow down", retry_after_ms=1500)
    assert isinstance(out, HelloFailed) and out.retry_after_ms == 1500
    assert isinstance(out.error, RateLimited) and out.error.retry_after == 1.5


# ------------------------------------------------------------------------ live stream


def test_duplicates_dropped_gap_fetched_by_sync_reorder_buffer_drained_in_order() -> None:
    w = Wire()
    live_channel(w, last=3)
    w.recv(**event(4))
    w.recv(**event(4))  # duplicate
    w.recv(**event(2))  # old
    assert seqs(w.events()) == [4]
    assert w.sent() == []
    w.recv(**event(7))  # gap: 5 and 6 missing
    [sync] = w.sent()
    assert (sync["since"], sync["epoch"]) == (4, 1)
    w.recv(**event(8))
    w.recv(**event(6))  # held while syncing
    assert w.events() == []
    sync_ok(w, sync, [5, 6, 7])  # 7 came live too: applied once
    w.recv(**event(9))
    assert seqs(w.events()) == [5, 6, 7, 8, 9]
    assert w.sent() == []


def test_sync_pages_until_more_false_then_live() -> None:
    w = Wire()
    w.p.restore([(CH, 10, 1)], [])
    [join] = w.connect()
    join_ok(w, join, head=15)
    [sync] = w.sent()
    w.recv(**event(16))
    sync_ok(w, sync, [11, 12], more=True)
    [sync] = w.sent()
    assert sync["since"] == 12
    sync_ok(w, sync, [13, 14, 15, 16])
    assert seqs(w.events()) == [11, 12, 13, 14, 15, 16]


def test_edit_delete_and_unknown_kind() -> None:
    w = Wire()
    live_channel(w, last=0)
    w.recv(**event(1))
    w.recv(**event(2, "edit", id="1-1", text="fixed"))
    w.recv(**event(3, "reaction", id="1-1"))  # unknown kind: skipped, position moves
    w.recv(**event(4, "delete", id="1-1"))
    w.recv(**event(5))
    got = w.events()
    assert [type(e) for e in got] == [Message, Edit, Delete, Message]
    assert seqs(got) == [1, 2, 4, 5]
    assert got[1] == Edit(CH, 2, "1-1", "bob", 1002, "fixed")
    assert w.sent() == []  # no gap at 3


def test_cut_push_syncs_from_last_once() -> None:
    w = Wire()
    live_channel(w, last=5)
    w.recv(t="resync", channel=CH, head=9, epoch=1, reason="cut")
    [sync] = w.sent()
    assert (sync["since"], sync["epoch"]) == (5, 1)
    w.recv(t="resync", channel=CH, head=9, epoch=1, reason="cut")  # already syncing
    assert w.sent() == []
    sync_ok(w, sync, range(6, 10))
    assert seqs(w.events()) == [6, 7, 8, 9]


@pytest.mark.parametrize("reason", ["compacted", "ahead", "epoch", "new-reason"])
def test_resync_reply_reloads_from_head(reason: str) -> None:
    w = Wire()
    live_channel(w, last=5)
    w.recv(**event(6))
    w.recv(**event(8))  # gap
    [sync] = w.sent()
    w.reply(sync, "resync", channel=CH, head=2000, epoch=2, reason=reason)
    [history] = w.sent()
    assert history["before"] == 2001
    # The events queued before the reload are superseded: the app gets the Resynced.
    msg = {k: v for k, v in event(1999).items() if k not in ("t", "channel")}
    w.reply(history, channel=CH, messages=[msg], more=True)
    [sync] = w.sent()
    assert (sync["since"], sync["epoch"]) == (2000, 2)
    sync_ok(w, sync, [2001], epoch=2)
    got = w.events()
    assert isinstance(got[0], Resynced) and got[0].head == 2000 and got[0].epoch == 2
    assert seqs(got) == [2001]
    assert w.p.position(CH) == (2001, 2)


def test_epoch_change_on_rejoin_reloads() -> None:
    w = Wire()
    live_channel(w, last=40, epoch=3)
    w.lose()
    [join] = w.connect()
    join_ok(w, join, head=2, epoch=4)  # the log was reset
    [history] = w.sent()
    assert history["t"] == "history" and history["before"] == 3
    w.reply(history, channel=CH, messages=[], more=False)
    [sync] = w.sent()
    assert (sync["since"], sync["epoch"]) == (2, 4)


# ------------------------------------------------------------------------ reconnect, outbox


def test_outbox_waits_offline_then_resends_with_same_cid_after_reconnect() -> None:
    w = Wire()
    w.p.restore([(CH, 3, 1)], [])
    w.p.send(CH, "one", None, "cid-1", 0)
    w.p.send(CH, "two", {"k": 1}, "cid-2", 0)
    assert w.sent() == []  # not connected
    join, s1, s2 = w.connect()
    assert join["t"] == "join"
    assert [(s["cid"], s["text"]) for s in (s1, s2)] == [("cid-1", "one"), ("cid-2", "two")]
    assert s2["meta"] == {"k": 1}
    w.reply(s1, channel=CH, seq=4, id="1-4", ts=5, dup=False)
    assert SendCompleted("cid-1", CH, Ack(CH, 4, "1-4", 5, False)) in w.outputs
    w.lose()  # cid-2's ack is lost
    assert [cid for cid, *_ in w.p.outbox] == ["cid-2"]
    join, again = w.connect()
    assert (again["cid"], again["text"]) == ("cid-2", "two")
    w.reply(again, channel=CH, seq=5, id="1-5", ts=6, dup=True)
    assert SendCompleted("cid-2", CH, Ack(CH, 5, "1-5", 6, True)) in w.outputs
    assert w.p.outbox == []


def test_requests_across_a_lost_connection() -> None:
    w = Wire()
    w.connect()
    h_history = w.p.request("history", 0, channel=CH)
    h_edit = w.p.request("edit", 0, channel=CH, id="1-1", text="x")
    history, edit = w.sent()
    assert (history["t"], edit["t"]) == ("history", "edit")
    w.lose()
    # The edit's outcome is unknown: it fails. The history is asked again.
    assert any(isinstance(o, Failed) and o.handle == h_edit for o in w.outputs)
    assert isinstance(next(o for o in w.outputs if isinstance(o, Failed)).error, ConnectionClosed)
    [again] = w.connect()
    assert again["t"] == "history" and again["rid"] != history["rid"]
    w.reply(again, channel=CH, messages=[], more=False)
    assert Completed(h_history, HistoryPage((), False)) in w.outputs
    w.reply(history, channel=CH, messages=[], more=False)  # a stale rid: ignored
    assert sum(isinstance(o, Completed) for o in w.outputs) == 1


def test_followed_channels_rejoin_after_reconnect_and_connection_events() -> None:
    w = Wire()
    live_channel(w, last=5)
    w.recv(**event(6))
    w.lose("bye")
    w.recv(**event(7))  # nothing is read while down
    [join] = w.connect()
    join_ok(w, join, head=8)
    [sync] = w.sent()
    assert sync["since"] == 6
    sync_ok(w, sync, [7, 8])
    got = w.events()
    assert seqs(got) == [6, 7, 8]
    changes = [e for e in got if isinstance(e, ConnectionChanged)]
    assert changes == [ConnectionChanged(False, "bye"), ConnectionChanged(True, "connected")]


def test_left_push_stops_following() -> None:
    w = Wire()
    live_channel(w, last=1)
    w.recv(t="left", channel=CH, reason="forbidden")
    assert w.events() == [Left(CH, "forbidden")]
    assert FollowChanged(CH, False) in w.outputs
    w.recv(**event(2))
    assert w.events() == []
    w.lose()
    assert w.connect() == []  # not rejoined


# ------------------------------------------------------------------------ limits, tokens


def test_rate_limited_send_is_resent_with_same_cid_after_retry_after() -> None:
    w = Wire()
    w.connect()
    w.p.send(CH, "hi", None, "c1", 0)
    [send] = w.sent()
    w.now = 100
    w.reply(send, "error", code="rate_limited", message="slow", retry_after_ms=250)
    w.p.send(CH, "later", None, "c2", w.now)  # waits behind c1: order is kept
    assert w.sent() == []
    assert w.p.next_deadline() == 350
    w.p.tick(349)
    assert w.sent() == []
    w.p.tick(350)
    assert [(s["cid"], s["text"]) for s in w.sent()] == [("c1", "hi"), ("c2", "later")]


def test_store_unavailable_send_backs_off_and_other_errors_complete_it() -> None:
    w = Wire()
    w.connect()
    w.p.send(CH, "hi", None, "c1", 0)
    [send] = w.sent()
    w.reply(send, "error", code="store_unavailable", message="disk full")
    assert w.sent() == [] and w.p.next_deadline() == 500
    w.p.tick(500)
    [send] = w.sent()
    assert send["cid"] == "c1"
    w.reply(send, "error", code="forbidden", message="no")
    [done] = [o for o in w.outputs if isinstance(o, SendCompleted)]
    assert done.ack is None and isinstance(done.error, Forbidden)
    assert w.p.outbox == []


def test_token_expired_request_waits_for_refresh() -> None:
    w = Wire(can_refresh=True)
    w.connect()
    handle = w.p.request("unread", 0, channels=[CH])
    [req] = w.sent()
    out = w.reply(req, "error", code="token_expired", message="send refresh")
    assert out == [NeedToken("a request was refused: token expired")]
    assert w.recv(t="error", code="token_expired", message="x", refresh_within_ms=30000) == []
    w.p.refresh("new-token")
    [refresh] = w.sent()
    assert refresh["token"] == "new-token"
    w.reply(refresh, exp=2_000_000_000)
    [again] = w.sent()
    assert again["t"] == "unread"
    w.reply(again, unread={CH: 2}, capped=[])
    assert Completed(handle, {CH: 2}) in w.outputs


def test_token_expired_without_provider_fails_the_request() -> None:
    w = Wire()
    w.connect()
    handle = w.p.request("read", 0, channel=CH, seq=3)
    [req] = w.sent()
    [out] = w.reply(req, "error", code="token_expired", message="expired")
    assert isinstance(out, Failed) and out.handle == handle
    assert isinstance(out.error, TokenExpired)


def test_heartbeat_ping_and_dead_connection() -> None:
    w = Wire()
    w.connect()
    assert w.p.next_deadline() == HEARTBEAT // 2
    w.p.tick(HEARTBEAT // 2)
    [ping] = w.sent()
    assert ping["t"] == "ping"
    w.now = HEARTBEAT // 2 + 5
    w.reply(ping, "pong", ts=1)
    assert w.p.tick(HEARTBEAT) == []
    [ping] = w.sent()
    assert w.p.tick(2 * HEARTBEAT - 1) == []
    assert w.p.tick(2 * HEARTBEAT) == [Disconnect(f"no pong within {HEARTBEAT} ms")]


def test_full_queue_stalls_the_channel_then_syncs_in_free_room() -> None:
    w = Wire(max_queued=4)
    live_channel(w, last=0)
    for s in range(1, 8):
        w.recv(**event(s))
    assert w.sent() == []  # 5, 6, 7 dropped, not applied
    assert seqs([w.p.next_event(), w.p.next_event()]) == [1, 2]
    [sync] = w.sent()  # half the queue is free again
    assert (sync["since"], sync["limit"]) == (4, 2)
    sync_ok(w, sync, [5, 6], more=True)
    assert w.sent() == []  # full again: stalled until the app takes more
    assert seqs(w.events()) == [3, 4, 5, 6]
    [sync] = w.sent()  # sent when the app had taken 3 and 4: two free
    assert (sync["since"], sync["limit"]) == (6, 2)
    sync_ok(w, sync, [7])
    w.recv(**event(8))
    assert seqs(w.events()) == [7, 8]


# ------------------------------------------------------------------------ errors, checks


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("forbidden", Forbidden),
        ("not_found", NotFound),
        ("rate_limited", RateLimited),
        ("unauthorized", Unauthorized),
        ("token_expired", TokenExpired),
        ("bad_request", BadRequest),
        ("limit_exceeded", LimitExceeded),
        ("store_unavailable", StoreUnavailable),
        ("idle_timeout", ProtocolViolation),
        ("some_future_code", ClientError),
    ],
)
def test_error_codes_map_to_classes(code: str, cls: type[ClientError]) -> None:
    exc = error_from_frame({"t": "error", "code": code, "message": "m", "retry_after_ms": 20})
    assert type(exc) is cls and exc.code == code and exc.message == "m"
    if cls is RateLimited:
        assert isinstance(exc, RateLimited) and exc.retry_after == 0.02


def test_request_error_fails_the_handle() -> None:
    w = Wire()
    w.connect()
    handle = w.p.request("delete", 0, channel=CH, id="1-9")
    [req] = w.sent()
    [out] = w.reply(req, "error", code="not_found", message="no message")
    assert isinstance(out, Failed) and out.handle == handle and isinstance(out.error, NotFound)


def test_local_checks_use_the_shared_rules() -> None:
    w = Wire()
    with pytest.raises(BadRequest):
        w.p.send("no spaces allowed", "x", None, "c", 0)
    with pytest.raises(BadRequest):
        w.p.send(CH, "x", None, "c" * 65, 0)
    with pytest.raises(LimitExceeded):
        w.p.send(CH, "é" * 8193, None, "c", 0)
    with pytest.raises(LimitExceeded):
        w.p.send(CH, "x", {"blob": "y" * 5000}, "c", 0)
    with pytest.raises(BadRequest):
        w.p.join("")
    assert w.p.outbox == []


# ------------------------------------------------------------------------ found by tests/sim.py


def test_a_first_join_cut_short_before_its_history_reloads_on_rejoin() -> None:
    """The connection dropped after the join reply, before the history page: the app must
    still get its Resynced (the reload is redone from the new head), not events after a
    head it never saw (tests/sim.py seed 19)."""
    w = Wire()
    w.connect()
    w.p.join(CH)
    [join] = w.sent()
    join_ok(w, join, head=10)
    [history] = w.sent()
    assert history["t"] == "history"
    w.lose()
    [rejoin] = w.connect()
    join_ok(w, rejoin, head=12)
    [history] = w.sent()
    assert history == {"t": "history", "rid": history["rid"], "channel": CH, "before": 13}
    w.reply(history, channel=CH, messages=[], more=False)
    [sync] = w.sent()
    sync_ok(w, sync, [13])
    events = [e for e in w.events() if not isinstance(e, ConnectionChanged)]
    assert isinstance(events[0], Resynced) and events[0].head == 12
    assert seqs(events) == [13]


def test_a_cut_reload_redone_on_an_empty_channel_is_done() -> None:
    """The redone reload may find the channel empty (reset meanwhile): that reload is
    complete, so a later rejoin catches up with a sync instead of reloading again."""
    w = Wire()
    w.connect()
    w.p.join(CH)
    [join] = w.sent()
    join_ok(w, join, head=10)
    assert [f["t"] for f in w.sent()] == ["history"]  # cut short: no page comes
    w.lose()
    [rejoin] = w.connect()
    join_ok(w, rejoin, head=0, epoch=2)  # reset: an empty log with a new epoch
    [sync] = w.sent()
    sync_ok(w, sync, [1, 2], epoch=2)
    w.lose()
    [rejoin] = w.connect()
    join_ok(w, rejoin, head=3, epoch=2)
    [catch_up] = w.sent()
    assert catch_up["t"] == "sync" and catch_up["since"] == 2, catch_up
    sync_ok(w, catch_up, [3], epoch=2)
    events = [e for e in w.events() if not isinstance(e, ConnectionChanged)]
    assert [type(e).__name__ for e in events if isinstance(e, Resynced)] == ["Resynced"]
    assert seqs(events) == [1, 2, 3]


def test_next_deadline_ignores_the_backoff_of_requests_in_flight() -> None:
    """A send resent after its backoff keeps its old ``not_before`` while in flight: that
    time must not stay the next deadline, or the timer spins until the answer comes
    (tests/sim.py seed 4: virtual time stood still)."""
    w = Wire()
    w.connect()
    w.p.send(CH, "hi", None, "c1", w.now)
    [send] = w.sent()
    w.reply(send, "error", code="store_unavailable", message="disk full")
    assert w.p.next_deadline() == 500
    w.now = 500
    w.p.tick(w.now)
    [again] = w.sent()
    assert again["cid"] == "c1"
    assert w.p.next_deadline() == HEARTBEAT // 2  # only the heartbeat is due, not 500
