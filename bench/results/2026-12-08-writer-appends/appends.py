"""The LMDB writer's batch in isolation (issue 17, 2026-12-08): N appends of 100-byte
messages from 16 senders into one channel, committed in batches of B (env B, default 16)
with ``async`` durability, calling the store's ``_write_batch`` directly (no threads, GC
off). Prints µs per append. Run from the repository root with the venv's python; the
before/after figures alternated two checkouts of python/tsmsg/store/lmdb_store.py."""

import functools
import gc
import os
import tempfile
import time

from tsmsg.store import LmdbStore, StoreConfig, WriteOp

gc.disable()
store = LmdbStore(tempfile.mkdtemp() + "/db", StoreConfig(durability="async"))
N, B = 80_000, int(os.environ.get("B", 16))
ops = [WriteOp("message", "room-1", f"u{i % 16}", cid=f"c{i}", text="x" * 100) for i in range(N)]
start = time.perf_counter()
for i in range(0, N, B):
    batch = ops[i : i + B]
    cids = store._with_map_growth(functools.partial(store._write_batch, batch))
    store._next_order += len(cids)
    store._unsynced_cids.update(cids)
    for key, seq in store._unsynced_cids.items():
        store._ring.insert(key, seq)
    store._unsynced_cids.clear()
print(f"{(time.perf_counter() - start) / N * 1e6:.2f} us/append (batches of {B})")
store.close()
