"""The bookkeeping of a node's copies of its connected users' memberships
(server/memberships.py), by plain calls; the real nodes' behaviour is in
test_cluster_adversarial.py."""

from __future__ import annotations

from tsmsg.auth import SCOPE_READ, Claims
from tsmsg.server.memberships import NOTICE_KEEP_S, MembershipCopies, Owed


def shared() -> tuple[MembershipCopies, list[int]]:
    woken: list[int] = []
    return MembershipCopies(lambda: woken.append(1), shared=True), woken


def test_a_notice_marks_a_connected_users_set_stale_and_wakes_the_loader() -> None:
    copies, woken = shared()
    copies.first_read("alice", (["a"], 3), started=0.0)
    assert copies.sets == {"alice": {"a"}} and copies.version == {"alice": 3}
    assert not copies.stale and not woken
    copies.note_notice("alice", now=1.0)
    assert list(copies.stale) == ["alice"] and woken
    copies.note_notice("bob", now=1.0)  # not connected here: nothing to read
    assert list(copies.stale) == ["alice"]
    assert "bob" in copies.noticed  # but a first device's read running now is made again


def test_a_notice_during_a_first_devices_read_makes_it_read_again() -> None:
    copies, _ = shared()
    copies.note_notice("alice", now=5.0)
    copies.first_read("alice", (["a"], 1), started=4.0)  # began before the notice
    assert list(copies.stale) == ["alice"]
    copies.first_read("bob", (["b"], 1), started=6.0)  # no notice for bob
    copies.note_notice("carol", now=5.0)
    copies.first_read("carol", (["c"], 1), started=6.0)  # began after it
    assert list(copies.stale) == ["alice"]


def test_old_notices_are_forgotten() -> None:
    copies, _ = shared()
    copies.note_notice("alice", now=0.0)
    copies.note_notice("bob", now=1.0)
    copies.note_notice("carol", now=NOTICE_KEEP_S + 2.0)
    assert list(copies.noticed) == ["carol"]


def test_a_read_is_applied_only_if_nothing_changed_meanwhile() -> None:
    copies, _ = shared()
    copies.first_read("alice", (["a"], 1), started=0.0)
    copies.first_read("bob", (["b"], 1), started=0.0)
    copies.changed("alice")
    copies.changed("bob")
    taken = copies.take_stale(10)
    assert set(taken) == {"alice", "bob"} and not copies.stale
    copies.note_notice("alice", now=1.0)  # during the read: its answer may be older
    copies.take_stale(10)  # (the loader takes alice again, reads...)
    pushes = copies.read_done(taken, {"alice": (["x"], 2), "bob": (["b", "c"], 2)})
    assert pushes == []
    assert copies.sets["alice"] == {"a"} and copies.version["alice"] == 1
    assert copies.sets["bob"] == {"b", "c"} and copies.version["bob"] == 2
    assert list(copies.stale) == ["alice"]  # read again


def test_take_stale_takes_at_most_the_batch_in_order() -> None:
    copies, _ = shared()
    for user in ("u1", "u2", "u3"):
        copies.first_read(user, ([], 0), started=0.0)
        copies.changed(user)
    assert list(copies.take_stale(2)) == ["u1", "u2"]
    assert list(copies.stale) == ["u3"]


def test_a_failed_read_marks_those_still_connected_stale_again() -> None:
    copies, _ = shared()
    copies.first_read("alice", (["a"], 1), started=0.0)
    copies.first_read("bob", (["b"], 1), started=0.0)
    copies.all_changed()
    taken = copies.take_stale(10)
    copies.forget("bob")
    copies.read_failed(taken)
    assert list(copies.stale) == ["alice"]


def test_own_pending_changes_are_applied_over_a_read_until_committed() -> None:
    copies, _ = shared()
    copies.first_read("alice", (["a", "b"], 1), started=0.0)
    copies.own_change("alice", "member", "c")
    copies.own_change("alice", "unmember", "a")
    assert copies.sets["alice"] == {"b", "c"}  # at once
    copies.changed("alice")
    taken = copies.take_stale(10)
    # The engine's answer predates both commits: the pending changes go over it.
    copies.read_done(taken, {"alice": (["a", "b"], 1)})
    assert copies.sets["alice"] == {"b", "c"}
    # The join commits: a read running across it is not applied (it may have missed it).
    copies.changed("alice")
    taken = copies.take_stale(10)
    copies.committed("alice", "member", "c", failed=False)
    copies.read_done(taken, {"alice": (["a", "b"], 1)})
    assert copies.sets["alice"] == {"b", "c"}
    copies.changed("alice")
    taken = copies.take_stale(10)
    copies.read_done(taken, {"alice": (["a", "b", "c"], 2)})
    assert copies.sets["alice"] == {"b", "c"}  # the leave still pending
    copies.committed("alice", "unmember", "a", failed=False)
    assert "alice" not in copies.pending
    copies.changed("alice")
    copies.read_done(copies.take_stale(10), {"alice": (["b", "c"], 3)})
    assert copies.sets["alice"] == {"b", "c"} and copies.version["alice"] == 3


def test_a_failed_own_change_is_read_again() -> None:
    copies, _ = shared()
    copies.first_read("alice", (["a"], 1), started=0.0)
    copies.own_change("alice", "member", "b")
    assert copies.sets["alice"] == {"a", "b"} and not copies.stale
    copies.committed("alice", "member", "b", failed=True)
    assert not copies.pending and list(copies.stale) == ["alice"]
    copies.read_done(copies.take_stale(10), {"alice": (["a"], 1)})
    assert copies.sets["alice"] == {"a"}


def test_a_join_not_recorded_is_read_again_only_if_it_moved_the_copy() -> None:
    """A join the engine did not record (changed False): at the memberships bound the
    copy, which took the channel at submit, is ahead (read again); for a channel the
    copy had already (a join again: the common case at a reconnect) nothing is read."""
    copies, _ = shared()
    copies.first_read("alice", (["a"], 1), started=0.0)
    copies.own_change("alice", "member", "a")  # a member already
    copies.committed("alice", "member", "a", failed=False, recorded=False)
    assert not copies.stale and copies.sets["alice"] == {"a"}
    copies.own_change("alice", "member", "b")  # refused at the bound
    copies.committed("alice", "member", "b", failed=False, recorded=False)
    assert list(copies.stale) == ["alice"]
    copies.read_done(copies.take_stale(10), {"alice": (["a"], 1)})
    assert copies.sets["alice"] == {"a"}


def test_a_commit_of_another_users_or_no_pending_change_is_ignored() -> None:
    copies, _ = shared()
    copies.committed("nobody", "member", "x", failed=True)
    assert not copies.stale and not copies.pending and not copies.gen


def test_on_one_node_the_copy_is_patched_and_never_read_again() -> None:
    woken: list[int] = []
    copies = MembershipCopies(lambda: woken.append(1))
    copies.first_read("alice", (["a"], 0), started=0.0)
    copies.own_change("alice", "member", "b")
    copies.note_notice("alice", now=1.0)
    copies.joined_by_other("alice", "dm")
    copies.committed("alice", "member", "b", failed=True)
    assert copies.sets["alice"] == {"a", "b", "dm"}
    assert not copies.stale and not copies.pending and not woken
    copies.first_read("bob", None, started=0.0)  # a store that did not answer
    assert "bob" not in copies.sets and copies.channels_for("bob", None) == []


def test_an_unread_set_owes_its_users_latest_change_until_read() -> None:
    copies, _ = shared()
    copies.first_read("alice", None, started=0.0)  # the engine was away
    assert copies.sets["alice"] == set() and list(copies.stale) == ["alice"]
    assert copies.channels_for("alice", None) is None and copies.known("alice") is None
    claims = Claims(user="alice", exp=0, scopes=frozenset({SCOPE_READ}), channels=("a*",))
    copies.owe("alice", claims, "away", 10, 1)
    copies.owe("alice", claims, "online", 11, 2)  # the latest
    copies.owe("bob", None, "online", 11, 1)  # not connected here: nothing kept
    taken = copies.take_stale(10)
    copies.read_failed(taken)
    assert list(copies.stale) == ["alice"]
    pushes = copies.read_done(copies.take_stale(10), {"alice": (["a1", "b1"], 4)})
    assert pushes == [Owed("alice", "online", 11, ["a1"], 2)]
    assert sorted(copies.channels_for("alice", None) or ()) == ["a1", "b1"]
    assert copies.known("alice") == {"a1", "b1"} and not copies.owed


def test_forget_drops_everything_of_the_user() -> None:
    copies, _ = shared()
    copies.first_read("alice", None, started=0.0)
    copies.owe("alice", None, "online", 1, 1)
    copies.own_change("alice", "member", "c")
    copies.take_stale(10)
    copies.changed("alice")
    copies.forget("alice")
    for held in (copies.sets, copies.version, copies.stale, copies.gen, copies.pending):
        assert "alice" not in held
    assert "alice" not in copies.unread and "alice" not in copies.owed
    # A read that was running when the user left is dropped.
    assert copies.read_done({"alice": 1}, {"alice": (["a"], 2)}) == []
    assert "alice" not in copies.sets


def test_check_versions_reads_again_the_sets_whose_version_moved() -> None:
    copies, _ = shared()
    copies.first_read("alice", (["a"], 1), started=0.0)
    copies.first_read("bob", (["b"], 7), started=0.0)
    copies.first_read("carol", None, started=0.0)  # never read: no version to check
    copies.take_stale(10)
    assert sorted(copies.versioned()) == ["alice", "bob"]
    copies.check_versions({"alice": 2, "bob": 7})
    assert list(copies.stale) == ["alice"]


def test_a_join_by_another_user_is_in_the_set_at_once_and_read_again() -> None:
    copies, _ = shared()
    copies.first_read("alice", (["a"], 1), started=0.0)
    copies.joined_by_other("alice", "dm:alice:bob")
    assert copies.sets["alice"] == {"a", "dm:alice:bob"} and list(copies.stale) == ["alice"]
    copies.joined_by_other("zed", "dm")  # not connected here
    assert "zed" not in copies.sets
