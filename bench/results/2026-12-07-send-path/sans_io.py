import sys, time, tempfile, gc, dataclasses
sys.path.insert(0, "/work/main/tests")
from test_session import open_store, connect, NOW_MS
from tsmsg._native import FrameDecoder, encode
from tsmsg.store import AppendResult
from tsmsg.protocol.session import Submit
from tsmsg.protocol.ratelimit import UserLimits
gc.disable()
N = 50000
d = tempfile.mkdtemp()
store = open_store(d + "/db")
s = connect(store)
s._frames.rate = 1e12; s._frames.tokens = 1e12
s.user_limits = UserLimits(dataclasses.replace(s.limits, send_rate=1e9, send_burst=10**9, channel_send_rate=1e9, channel_send_burst=10**9))
frames = [{"t": "send", "rid": i, "channel": "room-1", "cid": "c%d" % i, "text": "x" * 100} for i in range(N)]
def run():
    best = {}
    for rep in range(5):
        t0 = time.perf_counter()
        acts = [s.receive_frame(f, NOW_MS) for f in frames]
        t1 = time.perf_counter()
        ops = [a[0].op for a in acts]
        for i, op in enumerate(ops):
            op.result = AppendResult("room-1", i + 1, "m%d" % i, 1700000000000, dup=False)
        t2 = time.perf_counter()
        res = [s.write_done(op) for op in ops]
        t3 = time.perf_counter()
        for k, v in (("receive", t1 - t0), ("write_done", t3 - t2)):
            best[k] = min(best.get(k, 9), v / N * 1e6)
        del acts, ops, res
    print(" ".join(f"{k} {v:.2f}us" for k, v in best.items()))
run()
if len(sys.argv) > 1:
    import cProfile, pstats
    cProfile.run("[s.receive_frame(f, NOW_MS) for f in frames]", "/tmp/s3/prof")
    pstats.Stats("/tmp/s3/prof").sort_stats("tottime").print_stats(15)
