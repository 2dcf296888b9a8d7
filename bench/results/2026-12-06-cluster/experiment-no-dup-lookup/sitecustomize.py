# Experiment only (not committed): the Redis engine without the per-send DUP round trip on
# the trio thread; the APPEND script still answers a duplicate cid atomically.
import os

if os.environ.get("TSMSG_EXPERIMENT_NO_DUP_LOOKUP"):
    import tsmsg.store.redis_store as _r

    _r.RedisStore.lookup_dup = lambda self, channel, sender, cid: None  # type: ignore
