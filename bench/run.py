"""Side-by-side benchmark harness (issue #8): tsmsg, Redis Streams and NATS JetStream under
the same workloads, driven by the native load generator ``bench/loadgen`` (Rust, tokio).

For every system and durability tier it starts a fresh server on 127.0.0.1 pinned to CPU 0
(``taskset``), runs each case as one ``loadgen`` process pinned to CPU 1, and collects the
JSON each run prints. tsmsg is started here (``tsmsg serve`` with ``TSMSG_SECRET`` and the
per-connection, per-user and per-IP rate limits lifted: they are set for people); Redis and
NATS by ``bench/peers.py``. Durability tiers, like for like:

=======  ==================  ===========================  ===============================
tier     tsmsg               Redis (AOF)                  NATS JetStream (file storage)
=======  ==================  ===========================  ===============================
fsync    ``--durability      ``appendfsync always``       ``sync_interval: always``
         fsync``
async    ``--durability      ``appendfsync everysec``     default
         async``
=======  ==================  ===========================  ===============================

Workloads (``loadgen --help`` for every knob; bench/README.md explains each):
(a) ``fanin`` publishers into one channel, acked; (b) ``fanout`` one channel to N
subscribers, publish-to-deliver latency from a timestamp in the payload; (c) ``channels``
Zipf traffic over many channels and connections; (d) ``replay`` of N entries; (e)
``reconnect`` storm; (f) ``idle`` connections, server RSS per connection. Latency is taken
flat out (closed loop, ``window`` in flight) and at fixed offered rates (open loop, from
the scheduled send time: no coordinated omission).

Each run writes ``bench/results/<date>-<name>/``: ``results.json`` (every loadgen result,
the machine, versions, fdatasync latency measured in the run, load averages),
``results.md`` (tables; a hand-written ``## Analysis`` section is kept across re-runs) and
PNG plots. The machine is shared: the load average is recorded before each case.

    .venv/bin/python bench/run.py --quick          # make bench: a few minutes
    .venv/bin/python bench/run.py --full           # make bench-full
    .venv/bin/python bench/run.py --quick --systems tsmsg --tiers async --only fanin
    .venv/bin/python bench/run.py --quick --systems tsmsg --tls --only fanin,idle

**WebSocket** (issue 16): tsmsg is started with ``--ws 127.0.0.1:0`` as well, and the
fan-out to 100 subscribers and the idle connections run over TCP and, on the same server
configuration, over a WebSocket (``loadgen --addr ws://127.0.0.1:<ws port>/connect``:
subprotocol ``tsmsg.v1.msgpack``, one frame per binary message). The report compares
them against the issue's goals (WebSocket fan-out at least 80 % of TCP's deliveries/s,
an idle WebSocket connection under 12 KiB of server RSS); nothing is asserted.
``--transports tcp`` leaves the WebSocket cases out.

``--tls`` (tsmsg only): a throwaway CA and a server certificate for 127.0.0.1 are made with
``trustme`` in the scratch dir, the server serves TLS with them and the loadgen connects
with ``--tls --tls-ca``, verifying the certificate as every client does; the WebSocket
cases then run over ``wss://`` (the upgrade inside TLS, as a browser on an https page).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, write_report

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "target" / "loadgen" / "loadgen"
SECRET = "bench-run-secret-bench-run-secret-0123456789"  # >= 32 bytes
SERVER_CPU, LOADGEN_CPU = 0, 1
SERVING = re.compile(r"serving on \S+:(\d+)")
WEB_SERVING = re.compile(r"web chat page on https?://\S+:(\d+)/")
TRANSPORTS = ("tcp", "ws")
# Issue 16's goals for tsmsg over WebSocket, reported against (not asserted).
WS_FANOUT_GOAL = 0.80  # WebSocket fan-out deliveries/s at least this share of TCP's
WS_IDLE_GOAL_KIB = 12.0  # server RSS per idle WebSocket connection under this
TSMSG_ENV = {
    **{
        f"TSMSG_LIMITS_{kind}_{part}": "1000000"
        for kind in ("FRAME", "SEND", "CHANNEL_SEND")
        for part in ("RATE", "BURST")
    },
    "TSMSG_IP_CONNECT_RATE": "1000000",  # the idle and reconnect workloads open thousands
    "TSMSG_IP_CONNECT_BURST": "1000000",
    # Every loadgen connection comes from 127.0.0.1: the per-IP cap on connections open at
    # once (256 by default, set for a NAT's worth of people) would refuse the idle,
    # reconnect and 1,000-subscriber cases past their 256th connection.
    "TSMSG_IP_MAX_CONNECTIONS": "1000000",
}
SYSTEMS = ("tsmsg", "redis", "nats")
TIERS = ("fsync", "async")


@dataclass(frozen=True)
class Case:
    workload: str
    label: str
    args: tuple[str, ...]
    timeout_s: float = 180.0
    transport: str = "tcp"  # "ws": tsmsg over its WebSocket port (other systems skip it)
    # Open loop at half the acked msgs/s that the flat-out case of this label reached for
    # the same system and tier earlier in the run (issue 17: latency at half the peak).
    half_of: str | None = None


def over_ws(case: Case) -> Case:
    """``case`` over tsmsg's WebSocket port."""
    return Case(case.workload, f"{case.label} ws", case.args, case.timeout_s, "ws")


def fanin(pubs: int, window: int, size: int, rate: int | None = None) -> Case:
    args = ["--publishers", str(pubs), "--window", str(window), "--size", str(size)]
    label = f"{pubs}p w{window} {size}B"
    if rate is not None:
        args += ["--rate", str(rate)]
        label += f" @{rate}/s"
    return Case("fanin", label, tuple(args))


def at_half_peak(case: Case) -> Case:
    """``case`` (flat out) again in open loop at half the rate it reached."""
    return Case(case.workload, f"{case.label} @half peak", case.args, case.timeout_s,
                case.transport, half_of=case.label)  # fmt: skip


def resolve(case: Case, system: str, tier: str, runs: list[dict[str, Any]]) -> Case:
    """A ``half_of`` case with its rate from the flat-out run it refers to."""
    if case.half_of is None:
        return case
    peak = next(
        (g(r, "result", "throughput_msgs_s") for r in runs
         if (r["system"], r["tier"], r["label"]) == (system, tier, case.half_of)),
        None,
    )  # fmt: skip
    if not peak:
        raise RuntimeError(f"no flat-out result for {case.half_of!r} to halve")
    rate = max(1, int(peak) // 2)
    return replace(case, args=(*case.args, "--rate", str(rate)))  # its rate: the result's


def fanout(subs: int, window: int = 16, rate: int | None = None) -> Case:
    args = ["--subscribers", str(subs), "--publishers", "1", "--window", str(window)]
    label = f"{subs} subs w{window}"
    if rate is not None:
        args += ["--rate", str(rate)]
        label = f"{subs} subs @{rate}/s"
    return Case("fanout", label, tuple(args), timeout_s=300.0)


def cases(full: bool) -> list[Case]:
    if full:
        grid = [fanin(p, w, s) for s in (100, 1024) for p in (1, 16, 64) for w in (1, 16)] + [
            fanin(16, 16, 100, r) for r in (1000, 5000, 10000)
        ]
        grid += [fanout(n) for n in (10, 100, 1000)] + [over_ws(fanout(100))]
        grid += [fanout(100, rate=r) for r in (100, 500)] + [fanout(1000, rate=50)]
        grid += [
            Case(
                "channels",
                "10k ch / 1k conns",
                (
                    "--channels",
                    "10000",
                    "--connections",
                    "1000",
                    "--publishers",
                    "16",
                    "--window",
                    "16",
                ),
                300.0,
            ),
            Case(
                "channels",
                "10k ch / 1k conns @2000/s",
                (
                    "--channels",
                    "10000",
                    "--connections",
                    "1000",
                    "--publishers",
                    "16",
                    "--window",
                    "16",
                    "--rate",
                    "2000",
                ),
                300.0,
            ),
            Case("replay", "100k entries", ("--entries", "100000", "--publishers", "8"), 300.0),
            Case(
                "reconnect",
                "2000 clients",
                ("--clients", "2000", "--channels", "100", "--backlog", "100"),
                300.0,
            ),
            Case("idle", "10k conns", ("--idle", "10000", "--hold", "5"), 300.0),
            over_ws(Case("idle", "10k conns", ("--idle", "10000", "--hold", "5"), 300.0)),
        ]
        return grid
    return [
        fanin(1, 1, 100),
        fanin(16, 16, 100),
        at_half_peak(fanin(16, 16, 100)),
        fanin(16, 16, 1024),
        fanin(16, 16, 100, 2000),
        fanout(100),
        over_ws(fanout(100)),
        fanout(100, rate=200),
        fanout(1000),
        Case(
            "channels",
            "1k ch / 100 conns",
            ("--channels", "1000", "--connections", "100", "--publishers", "8", "--window", "16"),
        ),
        Case("replay", "20k entries", ("--entries", "20000", "--publishers", "8")),
        Case(
            "reconnect", "500 clients", ("--clients", "500", "--channels", "50", "--backlog", "50")
        ),
        Case("idle", "2k conns", ("--idle", "2000", "--hold", "2")),
        over_ws(Case("idle", "2k conns", ("--idle", "2000", "--hold", "2"))),
    ]


# --- servers ----------------------------------------------------------------------------


def pin_prefix(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu)]
    return []


@dataclass
class Server:
    system: str
    tier: str
    addr: str
    pid: int
    version: str
    opts: list[str] = field(default_factory=list)
    describe: dict[str, Any] = field(default_factory=dict)
    ws_addr: str = ""  # tsmsg with ws=True: host:port of its WebSocket port


def make_pki(scratch: Path) -> dict[str, str]:
    """A throwaway CA (``trustme``) and a server certificate it signed for 127.0.0.1, as PEM
    files in ``scratch``: their paths."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    pki = {k: str(scratch / f"tls-{k}.pem") for k in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(pki["ca"])
    Path(pki["cert"]).write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(pki["key"])
    return pki


@contextmanager
def tsmsg_server(
    tier: str,
    scratch: Path,
    pki: dict[str, str] | None = None,
    *,
    engine: str | None = None,
    cpu: int = SERVER_CPU,
    ws: bool = False,
) -> Iterator[Server]:
    """A ``tsmsg serve`` on a free port pinned to ``cpu``; ``engine`` (a Redis URL) makes
    it a node of the cluster on that Redis instead of an LMDB server; ``ws`` serves the
    WebSocket port too (``--ws 127.0.0.1:0``, its address in ``Server.ws_addr``)."""
    data = Path(tempfile.mkdtemp(prefix="tsmsg-", dir=scratch))
    log_path = data.parent / f"{data.name}.log"
    exe = Path(sys.executable).parent / "tsmsg"
    cmd = [*pin_prefix(cpu), str(exe), "serve", "--port", "0"]
    cmd += ["--data-dir", str(data / "data"), "--durability", tier]
    if engine is not None:
        cmd += ["--engine", engine]
    if ws:
        cmd += ["--ws", "127.0.0.1:0"]
    tls_opts: list[str] = []
    if pki is not None:
        cmd += ["--tls-cert", pki["cert"], "--tls-key", pki["key"]]
        tls_opts = ["--tls", "--tls-ca", pki["ca"]]
    env = {**os.environ, **TSMSG_ENV, "TSMSG_SECRET": SECRET, "TSMSG_LOG_LEVEL": "INFO"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            port = ws_port = 0
            while time.monotonic() < deadline and proc.poll() is None:
                logged = log_path.read_text(errors="replace")
                m = SERVING.search(logged)
                w = WEB_SERVING.search(logged)
                if m and (w or not ws):
                    port, ws_port = int(m.group(1)), int(w.group(1)) if w else 0
                    break
                time.sleep(0.05)
            if not port:
                raise RuntimeError(f"tsmsg did not start: {log_path.read_text()[-2000:]}")
            yield Server(
                "tsmsg",
                tier,
                f"127.0.0.1:{port}",
                proc.pid,
                metadata.version("tsmsg"),
                ["--opt", f"secret={SECRET}", *tls_opts],
                {"argv": cmd, "env": TSMSG_ENV},
                f"127.0.0.1:{ws_port}" if ws_port else "",
            )
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(data, ignore_errors=True)
            log_path.unlink(missing_ok=True)


@contextmanager
def peer_server(system: str, tier: str, scratch: Path) -> Iterator[Server]:
    import peers  # bench/peers.py (the Redis/NATS side of issue #8)

    peer = peers.start(system, tier, cpu=SERVER_CPU, base_dir=scratch)
    try:
        yield Server(
            system,
            tier,
            f"{peer.host}:{peer.port}",
            peer.pid,
            peer.version,
            [],
            peer.describe(),
        )
    finally:
        peer.stop()


def server(system: str, tier: str, scratch: Path, pki: dict[str, str] | None = None) -> Any:
    if system == "tsmsg":
        return tsmsg_server(tier, scratch, pki, ws=True)  # with pki: wss://
    return peer_server(system, tier, scratch)


# --- measurements -----------------------------------------------------------------------


def fdatasync_ms(root: Path, seconds: float) -> dict[str, float]:
    """4 KiB pwrite + fdatasync in place, repeated for ``seconds``: the disk's cost of one
    durable commit, measured in this run in the servers' scratch dir."""
    path = root / "fdatasync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    samples: list[float] = []
    try:
        os.pwrite(fd, b"\0" * 4096, 0)
        os.fdatasync(fd)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            os.pwrite(fd, os.urandom(4096), 0)
            os.fdatasync(fd)
            samples.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    samples.sort()

    def q(f: float) -> float:
        return round(samples[min(len(samples) - 1, int(f * len(samples)))], 4)

    return {"count": len(samples), "p50": q(0.5), "p99": q(0.99), "max": q(1.0)}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "tsmsg": metadata.version("tsmsg")}
    for name, cmd in (("rustc", ["rustc", "--version"]), ("loadgen", [str(LOADGEN), "-V"])):
        try:
            out[name] = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    try:
        import peers

        out.update(peers.versions())
    except Exception as e:  # a missing peer binary must not stop a tsmsg-only run
        out["peers"] = f"unavailable: {e}"
    return out


def load1() -> float:
    return os.getloadavg()[0]


def build_loadgen() -> None:
    cmd = ["cargo", "build", "--profile", "loadgen", "-p", "loadgen", "-q"]
    print("building loadgen:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def run_case(srv: Server, case: Case, common: list[str], pyspy: Path | None) -> dict[str, Any]:
    cmd = [*pin_prefix(LOADGEN_CPU), str(LOADGEN), "--system", srv.system]
    addr = f"ws://{srv.ws_addr}/connect" if case.transport == "ws" else srv.addr
    cmd += ["--addr", addr, *srv.opts, "--server-pid", str(srv.pid)]
    cmd += ["--workload", case.workload, *common, *case.args]
    spy = None
    if pyspy is not None and srv.system == "tsmsg":
        name = re.sub(r"[^A-Za-z0-9]+", "-", f"{srv.tier}-{case.workload}-{case.label}")
        spy = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(srv.pid),
             "--nonblocking", "--rate", "250", "--format", "raw", "--threads",
             "--output", str(pyspy / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=case.timeout_s)
        out = p.stdout
        err = p.stderr
    except subprocess.TimeoutExpired as e:
        out, err = "", f"timed out after {case.timeout_s:.0f} s: {e.stderr!r}"
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
    try:
        rec: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        rec = {"error": f"no JSON from loadgen: {err.strip()[-1500:]}"}
    rec["wall_s"] = round(time.monotonic() - t0, 2)
    rec["command"] = " ".join(cmd).replace(SECRET, "<secret>")
    if err.strip() and "error" in rec:
        rec["stderr"] = err.strip()[-1500:]
    return rec


# --- report -----------------------------------------------------------------------------


def g(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def num(v: Any, spec: str = ",.0f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return format(v, spec)


def lat(d: Any) -> str:
    if not isinstance(d, dict) or not d.get("count"):
        return "-"
    return f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f} / {d['p999_ms']:.2f}"


COLUMNS: dict[str, list[tuple[str, Any]]] = {
    "fanin": [
        ("acked msgs/s", lambda r: num(g(r, "throughput_msgs_s"))),
        ("ack p50 / p99 / p99.9 ms", lambda r: lat(g(r, "ack_latency"))),
    ],
    "fanout": [
        ("msgs/s", lambda r: num(g(r, "throughput_msgs_s"))),
        ("deliveries/s", lambda r: num(g(r, "deliveries_s"))),
        ("deliver p50 / p99 / p99.9 ms", lambda r: lat(g(r, "deliver_latency"))),
        (
            "server CPU s / M deliveries",
            lambda r: num(g(r, "cpu", "server_cpu_s_per_million_deliveries"), ",.1f"),
        ),
        ("loadgen µs / delivery", lambda r: num(g(r, "cpu", "loadgen_cpu_us_per_delivery"), ".2f")),
    ],
    "channels": [
        ("acked msgs/s", lambda r: num(g(r, "throughput_msgs_s"))),
        ("ack p50 / p99 / p99.9 ms", lambda r: lat(g(r, "ack_latency"))),
        ("deliver p50 / p99 / p99.9 ms", lambda r: lat(g(r, "deliver_latency"))),
    ],
    "replay": [
        ("entries/s (median of 3)", lambda r: num(g(r, "entries_s_median"))),
        ("seconds", lambda r: num(g(r, "seconds_median"), ".3f")),
        ("fill msgs/s", lambda r: num(g(r, "fill_rate_msgs_s"))),
    ],
    "reconnect": [
        ("all caught up s", lambda r: num(g(r, "all_caught_up_s"), ".2f")),
        (
            "catch-up p50 / p99 ms",
            lambda r: (
                f"{g(r, 'catch_up_time', 'p50_ms'):.0f} / {g(r, 'catch_up_time', 'p99_ms'):.0f}"
                if g(r, "catch_up_time", "count")
                else "-"
            ),
        ),
        ("entries replayed/s", lambda r: num(g(r, "entries_replayed_s"))),
    ],
    "idle": [
        ("connects/s", lambda r: num(g(r, "connects_s"))),
        (
            "server RSS / conn KiB",
            lambda r: num((g(r, "server_rss_per_conn_bytes") or 0) / 1024 or None, ".1f"),
        ),
        (
            "server CPU idle",
            lambda r: num(100 * (g(r, "server_cpu_share_idle") or 0), ".1f") + " %",
        ),
    ],
}
COMMON_TAIL: list[tuple[str, Any]] = [
    ("server CPU s / M msgs", lambda r: num(g(r, "cpu", "server_cpu_s_per_million_msgs"), ",.1f")),
    ("server CPU", lambda r: num(100 * (g(r, "cpu", "server_cpu_share") or 0), ".0f") + " %"),
    ("loadgen µs / msg", lambda r: num(g(r, "cpu", "loadgen_cpu_us_per_msg"), ".2f")),
    ("loadgen CPU", lambda r: num(100 * (g(r, "cpu", "loadgen_cpu_share") or 0), ".0f") + " %"),
    ("complete", lambda r: "yes" if g(r, "complete") else "**no**"),
]
TITLES = {
    "fanin": "(a) Fan-in with acks: publishers into one channel",
    "fanout": "(b) Fan-out: one channel to N subscribers",
    "channels": "(c) Many channels, Zipf traffic",
    "replay": "(d) Sync replay",
    "reconnect": "(e) Reconnect storm",
    "idle": "(f) Idle connections",
}


def tables(runs: list[dict[str, Any]]) -> str:
    out = []
    for wl, cols in COLUMNS.items():
        rows = [r for r in runs if r["workload"] == wl]
        if not rows:
            continue
        tail = COMMON_TAIL if wl not in ("idle",) else COMMON_TAIL[-1:]
        allcols = cols + tail
        out.append(f"\n### {TITLES[wl]}\n")
        out.append("| system | tier | case | " + " | ".join(c for c, _ in allcols) + " | load1 |")
        out.append("| --- | --- | --- | " + " | ".join("---:" for _ in allcols) + " | ---: |")
        for r in rows:
            res = r.get("result")
            if res is None:
                err = str(r.get("error", "failed")).replace("|", "/")[:200]
                out.append(f"| {r['system']} | {r['tier']} | {r['label']} | error: {err} |")
                continue
            cells = [f(res) for _, f in allcols]
            out.append(
                f"| {r['system']} | {r['tier']} | {r['label']} | "
                + " | ".join(cells)
                + f" | {r['load1']:.2f} |"
            )
    return "\n".join(out) + "\n"


def plots(runs: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    keys = sorted(
        {(r["system"], r["tier"]) for r in runs},
        key=lambda k: (SYSTEMS.index(k[0]) if k[0] in SYSTEMS else 9, k[1]),
    )
    # One hue per system; the async tier is the lighter shade of its system's.
    hue = {"tsmsg": "tab:blue", "redis": "tab:red", "nats": "tab:green"}
    colors = {
        k: matplotlib.colors.to_rgba(hue.get(k[0], "tab:gray"), 1.0 if k[1] == "fsync" else 0.45)
        for k in keys
    }

    def bars(ax: Any, wl: str, metric: Any, title: str, log: bool = False) -> None:
        rows = [r for r in runs if r["workload"] == wl and r.get("result")]
        labels = list(dict.fromkeys(r["label"] for r in rows))
        if not labels:
            ax.set_visible(False)
            return
        width = 0.8 / max(1, len(keys))
        for i, k in enumerate(keys):
            xs, ys = [], []
            for j, lab in enumerate(labels):
                for r in rows:
                    if (r["system"], r["tier"]) == k and r["label"] == lab:
                        v = metric(r["result"])
                        if v:
                            xs.append(j + i * width)
                            ys.append(v)
            ax.bar(xs, ys, width, label=f"{k[0]} {k[1]}", color=colors[k])
        ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        if log:  # linear unless asked: a log-scale bar exaggerates small differences
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)

    # Throughput per workload and system.
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    bars(axes[0][0], "fanin", lambda r: g(r, "throughput_msgs_s"), "(a) fan-in: acked msgs/s")
    bars(axes[0][1], "fanout", lambda r: g(r, "deliveries_s"), "(b) fan-out: deliveries/s")
    bars(axes[0][2], "channels", lambda r: g(r, "throughput_msgs_s"),
         "(c) many channels: acked msgs/s")  # fmt: skip
    bars(axes[1][0], "replay", lambda r: g(r, "entries_s_median"), "(d) replay: entries/s")
    bars(axes[1][1], "reconnect", lambda r: g(r, "all_caught_up_s"),
         "(e) reconnect storm: s until all caught up (lower is better)")  # fmt: skip
    bars(axes[1][2], "idle", lambda r: (g(r, "server_rss_per_conn_bytes") or 0) / 1024,
         "(f) idle: server RSS KiB per connection (lower is better)")  # fmt: skip
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(keys), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out / "throughput.png", dpi=90)
    plt.close(fig)
    made.append("throughput.png")

    # Latency percentiles per workload and system.
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, wl, key, title in (
        (axes[0], "fanin", "ack_latency", "(a) fan-in: publish-to-ack"),
        (axes[1], "fanout", "deliver_latency", "(b) fan-out: publish-to-deliver"),
        (axes[2], "channels", "deliver_latency", "(c) many channels: publish-to-deliver"),
    ):
        rows = [r for r in runs if r["workload"] == wl and g(r, "result", key, "count")]
        labels = list(dict.fromkeys(r["label"] for r in rows))
        width = 0.8 / max(1, len(keys))
        for i, k in enumerate(keys):
            for j, lab in enumerate(labels):
                for r in rows:
                    if (r["system"], r["tier"]) == k and r["label"] == lab:
                        h = r["result"][key]
                        x = j + i * width
                        ax.vlines(x, h["p50_ms"], h["p999_ms"], color=colors[k], lw=1)
                        ax.plot([x], [h["p50_ms"]], "o", color=colors[k], ms=4)
                        ax.plot([x], [h["p99_ms"]], "_", color=colors[k], ms=9, mew=2)
                        ax.plot([x], [h["p999_ms"]], "^", color=colors[k], ms=4)
            ax.plot([], [], "s", color=colors[k], label=f"{k[0]} {k[1]}")
        ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (o p50, — p99, ^ p99.9)")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=90)
    plt.close(fig)
    made.append("latency.png")
    return made


def ws_summary(runs: list[dict[str, Any]]) -> str:
    """Each tsmsg WebSocket case beside its TCP twin (same tier and case) against issue
    16's goals: reported, not asserted."""
    ok = {
        (r["tier"], r["workload"], r["label"], r.get("transport", "tcp")): r["result"]
        for r in runs
        if r["system"] == "tsmsg" and r.get("result")
    }
    rows = []
    for (tier, wl, label, transport), ws in ok.items():
        tcp = ok.get((tier, wl, label.removesuffix(" ws"), "tcp"))
        if transport != "ws" or tcp is None:
            continue
        case = label.removesuffix(" ws")
        if wl == "fanout":
            t, w = g(tcp, "deliveries_s"), g(ws, "deliveries_s")
            cpu_t = g(tcp, "cpu", "server_cpu_s_per_million_deliveries")
            cpu_w = g(ws, "cpu", "server_cpu_s_per_million_deliveries")
            ratio = w / t if t and w else None
            verdict = "-" if ratio is None else ("met" if ratio >= WS_FANOUT_GOAL else "**missed**")
            rows.append(
                f"| {tier} | fan-out {case}: deliveries/s | {num(t)} | {num(w)} | "
                f"{num(100 * ratio if ratio else None, '.0f')} % | "
                f">= {100 * WS_FANOUT_GOAL:.0f} % of TCP: {verdict} | "
                f"{num(cpu_t, ',.1f')} / {num(cpu_w, ',.1f')} s per M deliveries |"
            )
        elif wl == "idle":
            t, w = g(tcp, "server_rss_per_conn_bytes"), g(ws, "server_rss_per_conn_bytes")
            kt, kw = (t / 1024 if t else None), (w / 1024 if w else None)
            verdict = "-" if kw is None else ("met" if kw < WS_IDLE_GOAL_KIB else "**missed**")
            rows.append(
                f"| {tier} | idle {case}: server RSS KiB / conn | {num(kt, '.1f')} | "
                f"{num(kw, '.1f')} | {num(100 * kw / kt if kt and kw else None, '.0f')} % | "
                f"< {WS_IDLE_GOAL_KIB:.0f} KiB: {verdict} | "
                f"{num(g(tcp, 'connects_s'))} / {num(g(ws, 'connects_s'))} connects/s |"
            )
    if not rows:
        return ""
    return (
        "\n".join(
            [
                "\n### WebSocket beside TCP (tsmsg, issue 16; reported, not asserted)\n",
                "| tier | case | TCP | WebSocket | WS / TCP | goal | TCP / WS |",
                "| --- | --- | ---: | ---: | ---: | --- | ---: |",
                *rows,
            ]
        )
        + "\n"
    )


def report(meta: dict[str, Any], runs: list[dict[str, Any]], images: list[str]) -> str:
    m = meta["machine"]
    lines = [
        f"# Side-by-side benchmark, {meta['date']} ({meta['name']})\n",
        f"- command: `{meta['command']}`",
        f"- machine: {m['cpu']}, {m['nproc']} CPUs, {m['platform']}; scratch dirs on "
        f"{m.get('data_dir_device', '?')} ({m.get('data_dir_fs', '?')})",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- pinning: servers `taskset -c {SERVER_CPU}`, loadgen `taskset -c {LOADGEN_CPU}`"
        + ("" if meta["pinned"] else " (**not pinned**: taskset or a second CPU missing)"),
        "- fdatasync (4 KiB pwrite + fdatasync in the scratch dir, measured before each "
        "system/tier): "
        + "; ".join(
            f"{k}: p50 {v['p50']:.2f} / p99 {v['p99']:.2f} ms"
            for k, v in meta["fdatasync_ms"].items()
        ),
        f"- load average at start: {meta['load_start']}; per case in the `load1` column. "
        "**The machine has 2 CPUs shared with other jobs: with load1 above ~1 the figures "
        "are noisy; compare rows of one run only.**",
        f"- durations: {meta['common']}",
        *(
            ["- tls: on (tsmsg served TLS with a throwaway trustme CA; the loadgen verified it)"]
            if meta.get("tls")
            else []
        ),
        "- tsmsg settings: defaults, `TSMSG_SECRET`, and "
        + ", ".join(f"`{k}={v}`" for k, v in TSMSG_ENV.items())
        + " (the rate limits are set for people)",
        "- CPU columns: the server's CPU seconds (all threads, /proc/<pid>/stat) per million "
        "acked messages over the measured phase, its share of one core, and the load "
        "generator's own CPU (getrusage) per message: a side near 100 % is the bottleneck",
        "- transports: tsmsg serves TCP and, with `--ws 127.0.0.1:0`, a WebSocket port; "
        "rows labelled `ws` ran over the WebSocket (subprotocol `tsmsg.v1.msgpack`)"
        + (
            ", here `wss://` (inside TLS; issue 16's goals were set for plaintext)"
            if meta.get("tls")
            else ""
        ),
        "- latencies: flat out = closed loop (`window` publishes in flight per publisher); "
        "`@N/s` = open loop at N msgs/s in total, latency from the scheduled send time",
        "",
    ]
    lines += [f"![{i}]({i})" for i in images]
    lines.append(ws_summary(runs))
    lines.append(tables(runs))
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the short grid (default)")
    size.add_argument("--full", action="store_true", help="the whole grid of issue #8")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--tiers", default=",".join(TIERS))
    ap.add_argument("--only", default="", help="comma-separated workloads to run")
    ap.add_argument("--name", default="", help="results dir suffix (default quick/full)")
    ap.add_argument("--duration", type=float, help="measured seconds per case")
    ap.add_argument("--warmup", type=float, help="warm-up seconds per case")
    ap.add_argument("--no-build", action="store_true", help="use the built loadgen as is")
    ap.add_argument("--py-spy", action="store_true", help="py-spy record tsmsg per case")
    ap.add_argument("--tls", action="store_true", help="tsmsg only: serve and connect with TLS")
    ap.add_argument(
        "--transports",
        default=",".join(TRANSPORTS),
        help="tsmsg: tcp, ws (the WebSocket cases; with --tls: wss://)",
    )
    ap.add_argument("--out", type=Path, help="results dir (default bench/results/<date>-<name>)")
    ap.add_argument("--replot", type=Path, help="rewrite the plots and tables of a results dir")
    a = ap.parse_args()
    if a.replot:
        data = json.loads((a.replot / "results.json").read_text())
        recorded = data.pop("runs")
        write_report(a.replot, report(data, recorded, plots(recorded, a.replot)))
        return 0

    name = a.name or ("full" if a.full else "quick")
    date = datetime.date.today().isoformat()
    out = a.out or ROOT / "bench" / "results" / f"{date}-{name}"
    out.mkdir(parents=True, exist_ok=True)
    if not a.no_build:
        build_loadgen()
    if not LOADGEN.exists():
        print(f"{LOADGEN} is missing: build it (cargo build --profile loadgen -p loadgen)")
        return 2
    duration = a.duration or (5.0 if a.full else 3.0)
    warmup = a.warmup or 1.0
    common = ["--duration", str(duration), "--warmup", str(warmup)]
    grid = [c for c in cases(a.full) if not a.only or c.workload in a.only.split(",")]
    systems = [s for s in a.systems.split(",") if s]
    if a.tls and systems != ["tsmsg"]:
        print("--tls is for tsmsg only: add --systems tsmsg")
        return 2
    tiers = [t for t in a.tiers.split(",") if t]
    transports = {t for t in a.transports.split(",") if t}

    def runs_case(system: str, case: Case) -> bool:
        return case.transport == "tcp" or (system == "tsmsg" and case.transport in transports)

    pyspy = out / "py-spy" if a.py_spy else None
    if pyspy:
        pyspy.mkdir(exist_ok=True)

    scratch = Path(tempfile.mkdtemp(prefix="tsmsg-bench-", dir=os.environ.get("TMPDIR")))
    meta: dict[str, Any] = {
        "date": date,
        "name": name,
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "machine": machine(scratch),
        "versions": versions(),
        "pinned": bool(pin_prefix(0)),
        "load_start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "common": " ".join(common),
        "fdatasync_ms": {},
    }
    pki = None
    if a.tls:
        pki = make_pki(scratch)
        meta["tls"] = True
    runs: list[dict[str, Any]] = []
    todo = [(s, t, c) for s in systems for t in tiers for c in grid if runs_case(s, c)]
    bar = tqdm(total=len(todo), unit="case", dynamic_ncols=True)
    try:
        for system in systems:
            for tier in tiers:
                meta["fdatasync_ms"][f"{system}/{tier}"] = fdatasync_ms(scratch, 0.5)
                for case in grid:
                    if not runs_case(system, case):
                        continue
                    bar.set_description(f"{system} {tier} {case.workload} {case.label}")
                    try:
                        case = resolve(case, system, tier, runs)
                    except RuntimeError as e:
                        tqdm.write(f"{system} {tier} {case.label}: {e}")
                        bar.update()
                        continue
                    rec: dict[str, Any] = {
                        "system": system,
                        "tier": tier,
                        "workload": case.workload,
                        "label": case.label,
                        "transport": case.transport,
                        "load1": load1(),
                    }
                    try:
                        with server(system, tier, scratch, pki) as srv:
                            rec["server"] = {"version": srv.version, "pid": srv.pid}
                            rec.update(run_case(srv, case, common, pyspy))
                    except Exception as e:  # a peer that fails to start: record, go on
                        rec["error"] = f"{type(e).__name__}: {e}"
                    rec["load1_end"] = load1()
                    if "error" in rec:
                        tqdm.write(f"{system} {tier} {case.label}: {rec['error'][:300]}")
                    runs.append(rec)
                    bar.update()
    finally:
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
        meta["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        (out / "results.json").write_text(json.dumps({**meta, "runs": runs}, indent=1) + "\n")
        images = plots(runs, out) if runs else []
        write_report(out, report(meta, runs, images))
    failed = sum("error" in r for r in runs)
    print(f"{len(runs)} cases, {failed} failed; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
