"""Issue 18 store figures: edit cost against a message's edit count, history over many edit
entries, deleting a much-edited message. Run with either tree first on PYTHONPATH to compare:

    PYTHONPATH=/path/to/old/python .venv/bin/python bench/edit_growth.py
"""

import tempfile
import time
from typing import Any

from tsmsg.store import LmdbStore, StoreConfig, WriteOp


def run() -> None:
    d = tempfile.mkdtemp()
    # the bound lifted (old trees have none), to show the growth
    kw: dict[str, Any] = (
        {"max_edits": 10**9} if "max_edits" in StoreConfig.__dataclass_fields__ else {}
    )
    s = LmdbStore(d, StoreConfig(durability="async", **kw))
    m = s.append("room", "u", "c0", "x")
    marks = {1000, 10000, 36000}
    done = 0
    for target in sorted(marks):
        batch = target - done - 200
        ops = [WriteOp("edit", "room", "u", text=f"e{i}", target=m.id) for i in range(batch)]
        s.submit(*ops)
        done += batch
        s.write(WriteOp("edit", "room", "u", text="sync", target=m.id), timeout=None)
        done += 1
        t = time.perf_counter()
        for i in range(200):
            s.edit("room", "u", m.id, f"t{i}")
        done += 200
        per = (time.perf_counter() - t) / 200 * 1000
        print(f"edit at {target} edits: {per:.3f} ms per edit (incl. commit)")
    for i in range(50):
        s.append("room", "u", f"n{i}", "y")
    t = time.perf_counter()
    for _ in range(20):
        s.history("room", None, 50)
    per_page = (time.perf_counter() - t) / 20 * 1000
    print(f"history page of 50 after 36k edit entries: {per_page:.2f} ms")
    t = time.perf_counter()
    s.history("room", None, 51)  # reaches the edited message past all its edits
    print(f"history page reaching past 36k edit entries: {(time.perf_counter() - t) * 1000:.2f} ms")
    t = time.perf_counter()
    s.delete("room", "u", m.id)
    print(f"delete of a message with 36k edits: {(time.perf_counter() - t) * 1000:.1f} ms")
    m2 = s.append("room", "u", "c-del", "x")
    for i in range(999):
        s.submit(WriteOp("edit", "room", "u", text=f"e{i}", target=m2.id))
    s.edit("room", "u", m2.id, "last")
    t = time.perf_counter()
    s.delete("room", "u", m2.id)
    print(f"delete of a message with 1000 edits: {(time.perf_counter() - t) * 1000:.1f} ms")
    s.close()


if __name__ == "__main__":
    run()
