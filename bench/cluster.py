"""Cluster benchmark (issue 15): 1, 2 and 3 tsmsg nodes on one Redis, and the embedded
LMDB node for the ratio, under the workloads of ``make bench``, driven by the native load
generator (``bench/loadgen``) spread over the nodes.

Each configuration runs on a fresh deployment per case: one private ``redis-server``
(``bench/peers.py``: AOF, ``appendfsync always``, no RDB) and N ``tsmsg serve --engine
redis://...`` processes, each on its own port (``bench/run.py``'s ``tsmsg_server``); or one
``tsmsg serve`` on LMDB with ``--durability fsync``, the like-for-like tier. Cases:

* ``fanin``: 16 publishers x 16 in flight into one channel, spread round robin over all
  nodes: acked msgs/s.
* ``fanout``: one publisher (16 in flight) on node 1, 100 subscribers on the other nodes
  (node 1 when alone): deliveries/s.
* ``latency``: 16 publishers on node 1, open loop at half of the fan-in rate one node
  reached (the single-node configuration of the same round and engine: the publishers
  are all on node 1), 4 subscribers on the other nodes: publish-to-deliver latency across
  nodes (from the scheduled send time).

CPU per message comes from ``/proc/<pid>/stat`` (utime + stime, all threads) of every node
and of redis-server over the loadgen's measured phase; ``other_cpu_share`` is the CPU the
rest of the machine used meanwhile (``/proc/stat`` busy time minus ours), the noise figure
of a shared machine: the run waits for load1 below ``--max-load`` before it starts, and a
case measured while others used more than ``--max-others`` of a core is measured again
(``--retries``), keeping the quietest attempt. ``--rounds N`` repeats the whole grid; the
summary takes the median. Pinning (2 CPUs): Redis on CPU 0, every node on CPU 1, the
loadgen on CPU 0 (``--redis-cpu``, ``--node-cpu``, ``--loadgen-cpu``).

    .venv/bin/python bench/cluster.py             # make bench-cluster: quick, ~3 min
    .venv/bin/python bench/cluster.py --rounds 3  # results/2026-12-06-cluster
    .venv/bin/python bench/cluster.py --full      # 8 s windows, latency at 25/50/75 %, 3 rounds
    .venv/bin/python bench/cluster.py --nodes 1,2 --only fanin --duration 5
    .venv/bin/python bench/cluster.py --nodes 1 --only fanin --py-spy    # profile the nodes
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers
from benchlib import machine, write_report
from peers import cpu_seconds_of
from run import (
    LOADGEN,
    ROOT,
    SECRET,
    Server,
    build_loadgen,
    fdatasync_ms,
    pin_prefix,
    tsmsg_server,
    versions,
)

TIER = "fsync"  # tsmsg --durability fsync, Redis appendfsync always


@dataclass
class Deployment:
    engine: str  # "lmdb" or "redis"
    nodes: list[Server]
    redis: peers.Peer | None

    @property
    def name(self) -> str:
        return "lmdb x1" if self.redis is None else f"redis x{len(self.nodes)}"


@contextmanager
def deploy(engine: str, n: int, scratch: Path, cpus: dict[str, int]) -> Iterator[Deployment]:
    with ExitStack() as stack:
        store = None
        url = None
        if engine == "redis":
            store = peers.start("redis", TIER, cpu=cpus["redis"], base_dir=scratch)
            stack.callback(store.stop)
            url = f"redis://{store.host}:{store.port}"
        nodes = [
            stack.enter_context(tsmsg_server(TIER, scratch, engine=url, cpu=cpus["node"]))
            for _ in range(n)
        ]
        yield Deployment(engine, nodes, store)


def cpuinfo_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_times() -> dict[str, float]:
    """The machine's CPU seconds (all CPUs) from /proc/stat: busy in processes (user, nice,
    system), in soft and hard interrupts (loopback networking, charged to no process), and
    stolen by the hypervisor."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")  # fields: user nice system idle iowait irq softirq steal
    return {"busy": (f[0] + f[1] + f[2]) / hz, "irq": (f[5] + f[6]) / hz, "steal": f[7] / hz}


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def py_spy(pid: int, path: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` of a node until SIGINT, as bench/run.py --py-spy does."""
    return subprocess.Popen(
        [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
         "record", "--pid", str(pid), "--nonblocking", "--rate", "250", "--format", "raw",
         "--threads", "--output", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def run_case(
    d: Deployment,
    workload: str,
    args: list[str],
    common: list[str],
    cpu: int,
    pyspy: Path | None = None,
) -> Any:
    """One loadgen run against a deployment; ``pyspy``: profile each node into
    ``<pyspy>-<workload>-node<i>.txt``."""
    addrs = [s.addr for s in d.nodes]
    subs = addrs[1:] or addrs[:1]
    cmd = [*pin_prefix(cpu), str(LOADGEN), "--system", "tsmsg", "--opt", f"secret={SECRET}"]
    if workload == "fanin":
        cmd += ["--addr", ",".join(addrs)]
    else:  # publishers on node 1, subscribers on the others: deliveries cross nodes
        cmd += ["--addr", addrs[0], "--sub-addr", ",".join(subs)]
    pids = [s.pid for s in d.nodes] + ([d.redis.pid] if d.redis else [])
    cmd += ["--server-pid", ",".join(map(str, pids))]
    cmd += ["--workload", "fanin" if workload == "fanin" else "fanout", *common, *args]
    rc = redis.Redis(host=d.redis.host, port=d.redis.port) if d.redis else None
    if rc is not None:
        rc.config_resetstat()
    ours0 = sum(cpu_seconds_of(p) for p in pids) + children_cpu_s()
    spies = []
    if pyspy is not None:
        spies = [
            py_spy(s.pid, Path(f"{pyspy}-{workload}-node{i + 1}.txt"))
            for i, s in enumerate(d.nodes)
        ]
    times0, t0 = cpu_times(), time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        spy.wait(30)
    ours = sum(cpu_seconds_of(p) for p in pids) + children_cpu_s() - ours0
    try:
        rec: dict[str, Any] = json.loads(p.stdout)
    except json.JSONDecodeError:
        rec = {"error": f"no JSON from loadgen: {p.stderr.strip()[-1500:]}"}
    rec["command"] = " ".join(cmd).replace(SECRET, "<secret>")
    times = {k: v - times0[k] for k, v in cpu_times().items()}
    # Loopback networking runs in interrupt context but is mostly charged to our processes.
    rec["other_cpu_share"] = round((times["busy"] + times["irq"] - ours) / wall, 3)
    rec["irq_cpu_share"] = round(times["irq"] / wall, 3)
    rec["steal_cpu_share"] = round(times["steal"] / wall, 3)
    if rc is not None:
        stats = rc.info("commandstats")
        rec["redis_commandstats"] = {k: v for k, v in stats.items() if v.get("calls", 0) > 100}
        rc.close()
    return rec


def figures(d: Deployment, rec: dict[str, Any]) -> dict[str, Any]:
    """The row of one case: rates, latency, CPU per acked message per node and Redis."""
    r = rec.get("result") or {}
    cpu = r.get("cpu", {})
    acked = r.get("acked", 0)
    per_pid = {e["pid"]: e for e in cpu.get("per_pid", [])} or {
        d.nodes[0].pid: {
            "cpu_s": cpu.get("server_cpu_s", 0),
            "cpu_share": cpu.get("server_cpu_share", 0),
        }
    }

    def us(pid: int) -> float | None:
        return per_pid[pid]["cpu_s"] / acked * 1e6 if acked and pid in per_pid else None

    node_us = [us(s.pid) for s in d.nodes]
    deliveries = r.get("deliveries") or 0
    lat = r.get("deliver_latency") or {}
    out = {
        "acked_msgs_s": r.get("throughput_msgs_s"),
        "deliveries_s": r.get("deliveries_s"),
        "deliver_p50_ms": lat.get("p50_ms"),
        "deliver_p99_ms": lat.get("p99_ms"),
        "ack_p99_ms": (r.get("ack_latency") or {}).get("p99_ms"),
        "node_us_per_msg": node_us,
        "nodes_us_per_msg": sum(u for u in node_us if u is not None),
        "node_cpu_share": [per_pid[s.pid]["cpu_share"] for s in d.nodes if s.pid in per_pid],
        "redis_us_per_msg": us(d.redis.pid) if d.redis else None,
        "redis_cpu_share": per_pid[d.redis.pid]["cpu_share"] if d.redis else None,
        "nodes_us_per_delivery": (
            sum(per_pid[s.pid]["cpu_s"] for s in d.nodes) / deliveries * 1e6 if deliveries else None
        ),
        "loadgen_cpu_share": cpu.get("loadgen_cpu_share"),
        "other_cpu_share": rec.get("other_cpu_share"),
        "complete": r.get("complete", False),
    }
    return out


# --- report ---------------------------------------------------------------------------


def fmt(v: Any, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def table(runs: list[dict[str, Any]]) -> str:
    head = (
        "| round | deployment | case | acked msgs/s | deliveries/s | deliver p50 / p99 ms | "
        "node CPU µs / msg (each) | Redis CPU µs / msg | node CPU share (each) | "
        "Redis CPU share | loadgen CPU | others' CPU | attempts | load1 | complete |"
    )
    lines = [head, "| ---: |" + " --- |" * 2 + " ---: |" * 12]
    for run in runs:
        f = run.get("figures")
        if f is None:
            err = str(run.get("error", "failed")).replace("|", "/")[:200]
            lines.append(f"| {run['round']} | {run['deployment']} | {run['case']} | error: {err} |")
            continue
        each = " + ".join(fmt(u, ".1f") for u in f["node_us_per_msg"])
        shares = " + ".join(fmt(s * 100, ".0f") for s in f["node_cpu_share"])
        p = f"{fmt(f['deliver_p50_ms'], '.2f')} / {fmt(f['deliver_p99_ms'], '.2f')}"
        lines.append(
            f"| {run['round']} | {run['deployment']} | {run['case']} | {fmt(f['acked_msgs_s'])} | "
            f"{fmt(f['deliveries_s'])} | {p if f['deliver_p50_ms'] is not None else '-'} | "
            f"{fmt(f['nodes_us_per_msg'], '.1f')} ({each}) | "
            f"{fmt(f['redis_us_per_msg'], '.1f')} | {shares} % | "
            f"{fmt(f['redis_cpu_share'] and f['redis_cpu_share'] * 100, '.0f')} % | "
            f"{fmt(f['loadgen_cpu_share'] * 100, '.0f')} % | "
            f"{fmt(f['other_cpu_share'] * 100, '.0f')} % | {run.get('attempts', 1)} | "
            f"{run['load1']:.2f} | "
            f"{'yes' if f['complete'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def median(rows: list[dict[str, Any]], key: str) -> Any:
    values = [r["figures"][key] for r in rows if r["figures"].get(key) is not None]
    return statistics.median(values) if values else None


def summary(runs: list[dict[str, Any]]) -> str:
    """Per deployment, the median over rounds of each case's key figures, and the per-core
    capacities a deployment is sized with (from the fan-in rows)."""
    ok = [r for r in runs if "figures" in r]
    names = list(dict.fromkeys(r["deployment"] for r in ok))

    def rows(name: str, case: str) -> list[dict[str, Any]]:
        return [r for r in ok if r["deployment"] == name and r["case"].startswith(case)]

    base = median(rows("lmdb x1", "fanin"), "nodes_us_per_msg")
    lines = [
        "| deployment | fan-in acked msgs/s | node CPU µs / acked msg (all nodes) | "
        "acked msgs/s per node core | vs LMDB per core | Redis CPU µs / acked msg | "
        "acked msgs/s per Redis core | fan-out deliveries/s | latency case: rate, "
        "deliver p50 / p99 ms | rounds |",
        "| --- |" + " ---: |" * 9,
    ]
    for name in names:
        fi, fo, la = rows(name, "fanin"), rows(name, "fanout"), rows(name, "latency")
        node_us, redis_us = median(fi, "nodes_us_per_msg"), median(fi, "redis_us_per_msg")
        per_core = 1e6 / node_us if node_us else None
        vs = base / node_us if base and node_us else None
        lat = (
            f"{fmt(median(la, 'acked_msgs_s'))}/s: {fmt(median(la, 'deliver_p50_ms'), '.2f')}"
            f" / {fmt(median(la, 'deliver_p99_ms'), '.2f')}"
            if la
            else "-"
        )
        lines.append(
            f"| {name} | {fmt(median(fi, 'acked_msgs_s'))} | {fmt(node_us, '.1f')} | "
            f"{fmt(per_core)} | {fmt(vs and vs * 100, '.0f')} % | {fmt(redis_us, '.1f')} | "
            f"{fmt(redis_us and 1e6 / redis_us)} | {fmt(median(fo, 'deliveries_s'))} | "
            f"{lat} | {len(fi)} |"
        )
    return "\n".join(lines) + "\n"


def report(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    m = meta["machine"]
    return "\n".join(
        [
            f"# Cluster benchmark, {meta['date']} ({meta['name']})\n",
            f"- command: `{meta['command']}`",
            f"- machine: {m['nproc']} CPUs (`nproc`), {meta['cpuinfo_model']} "
            f"(/proc/cpuinfo), kernel {meta['kernel']}; scratch dirs on "
            f"{m.get('data_dir_device', '?')} "
            f"({m.get('data_dir_fs', '?')})",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
            f"- pinning: {meta['pinning']}",
            f"- fdatasync (4 KiB pwrite + fdatasync in the scratch dir): p50 "
            f"{meta['fdatasync_ms']['p50']:.2f} / p99 {meta['fdatasync_ms']['p99']:.2f} ms",
            f"- load average at start: {meta['load_start']}, at end: {meta.get('load_end')}; "
            "per case `load1`, and `others' CPU`: the machine's busy CPU (/proc/stat user + "
            "nice + system + irq + softirq) minus the nodes', Redis's and the loadgen's over "
            "the case, in % of one core (about ±15 % is accounting noise); a case measured "
            "while others used more than "
            f"{meta.get('max_others', 0.25):.0%} was measured again, up to "
            f"{meta.get('retries', 2)} times, and the quietest attempt kept",
            f"- durations: {meta['common']}; a fresh Redis and fresh nodes per case",
            "- durability: LMDB `--durability fsync`; Redis `appendonly yes`, "
            "`appendfsync always`, no RDB (bench/peers.py)",
            "- cases: `fanin` 16 publishers x 16 in flight, 100 B, spread over all nodes; "
            "`fanout` 1 publisher x 16 in flight on node 1, 100 subscribers on the other "
            "nodes; `latency @N/s` 16 publishers on node 1, open loop at half the fan-in "
            "rate one node reached (x1's in the same round), 4 subscribers on the other "
            "nodes (latency from the scheduled send time). With one node everything is on "
            "that node.",
            "- CPU: per acked message, over the loadgen's measured phase (window + drain); "
            "shares in % of one core",
            "\n## Summary (median over rounds)\n",
            "Per core = 1e6 / CPU µs per acked message in the fan-in case (all nodes "
            "together; Redis alone): what one core of each carries when it is the "
            "bottleneck.\n",
            summary(runs),
            "## Runs\n",
            table(runs),
        ]
    )


# --- main -------------------------------------------------------------------------------


def cases(full: bool) -> list[tuple[str, list[str]]]:
    out = [
        ("fanin", ["--publishers", "16", "--window", "16", "--size", "100"]),
        ("fanout", ["--subscribers", "100", "--publishers", "1", "--window", "16"]),
    ]
    for share in (0.25, 0.5, 0.75) if full else (0.5,):
        out.append(
            (f"latency:{share}", ["--subscribers", "4", "--publishers", "16", "--window", "16"])
        )
    return out


def measure(
    engine: str,
    n: int,
    scratch: Path,
    cpus: dict[str, int],
    a: argparse.Namespace,
    work: tuple[str, list[str], list[str]],
    rnd: int,
    pyspy: Path | None,
) -> dict[str, Any]:
    """One case on a fresh deployment; measured again (after a pause, at most
    ``a.retries`` times) while the rest of the machine used more than ``a.max_others`` of
    a core meanwhile. The quietest attempt is kept; ``attempts`` says how many were made."""
    case, args, common = work
    best: dict[str, Any] | None = None
    for attempt in range(1, a.retries + 2):
        if attempt > 1:
            print(f"  others used {best and best.get('other_cpu_share')} cores: again", flush=True)
            time.sleep(a.retry_pause)
        rec: dict[str, Any] = {"round": rnd, "attempts": attempt, "load1": os.getloadavg()[0]}
        print(f"round {rnd}: {engine} x{n} {case} (load1 {rec['load1']:.2f})", flush=True)
        try:
            with deploy(engine, n, scratch, cpus) as d:
                rec["deployment"] = d.name
                spy = pyspy / f"r{rnd}-{d.name.replace(' ', '')}" if pyspy else None
                rec.update(run_case(d, case.split(":")[0], args, common, a.loadgen_cpu, spy))
                if "result" in rec:
                    rec["figures"] = figures(d, rec)
        except Exception as e:  # a deployment that fails to start: record, go on
            rec.setdefault("deployment", f"{engine} x{n}")
            rec["error"] = f"{type(e).__name__}: {e}"
        if "error" in rec:
            return rec
        if best is None or rec["other_cpu_share"] < best["other_cpu_share"]:
            best = rec
        if rec["other_cpu_share"] <= a.max_others:
            break
    assert best is not None
    best["attempts"] = attempt
    return best


def wait_for_quiet(max_load: float, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        print(f"load1 {os.getloadavg()[0]:.2f} > {max_load}: waiting", flush=True)
        time.sleep(15)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the short run (default)")
    ap.add_argument("--full", action="store_true", help="longer windows, more rates")
    ap.add_argument("--nodes", default="1,2,3", help="node counts on Redis")
    ap.add_argument("--no-lmdb", action="store_true", help="skip the LMDB reference node")
    ap.add_argument("--only", default="", help="comma-separated: fanin,fanout,latency")
    ap.add_argument(
        "--latency-rate", type=int, default=0, help="the latency case at this rate (msgs/s)"
    )
    ap.add_argument("--duration", type=float, help="measured seconds per case")
    ap.add_argument("--rounds", type=int, help="repeat the whole grid (default 1, --full 3)")
    ap.add_argument("--redis-cpu", type=int, default=0)
    ap.add_argument("--node-cpu", type=int, default=1)
    ap.add_argument("--loadgen-cpu", type=int, default=0)
    ap.add_argument("--max-load", type=float, default=1.0, help="wait for load1 below this")
    ap.add_argument("--wait-load", type=float, default=120.0, help="for at most this long")
    ap.add_argument(
        "--max-others",
        type=float,
        default=0.25,
        help="measure a case again while other processes used more of a core than this",
    )
    ap.add_argument("--retries", type=int, default=2, help="at most this many times")
    ap.add_argument("--retry-pause", type=float, default=10.0, help="seconds before each")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--py-spy", action="store_true", help="py-spy record every node per case")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, help="rewrite results.md of a results dir")
    a = ap.parse_args()
    if a.report:
        data = json.loads((a.report / "results.json").read_text())
        write_report(a.report, report(data, data.pop("runs")))
        return 0

    name = "cluster-full" if a.full else "cluster"
    date = datetime.date.today().isoformat()
    out = a.out or ROOT / "bench" / "results" / f"{date}-{name}"
    out.mkdir(parents=True, exist_ok=True)
    pyspy = out / "py-spy" if a.py_spy else None
    if pyspy:
        pyspy.mkdir(exist_ok=True)
    if not a.no_build:
        build_loadgen()
    duration = a.duration or (8.0 if a.full else 3.0)
    a.rounds = a.rounds or (3 if a.full else 1)
    common = ["--duration", str(duration), "--warmup", "1"]
    cpus = {"redis": a.redis_cpu, "node": a.node_cpu}
    configs = ([] if a.no_lmdb else [("lmdb", 1)]) + [
        ("redis", int(n)) for n in a.nodes.split(",") if n
    ]
    grid = [c for c in cases(a.full) if not a.only or c[0].split(":")[0] in a.only.split(",")]
    wait_for_quiet(a.max_load, a.wait_load)
    scratch = Path(tempfile.mkdtemp(prefix="tsmsg-cluster-", dir=os.environ.get("TMPDIR")))
    meta: dict[str, Any] = {
        "date": date,
        "name": name,
        "command": " ".join(["bench/cluster.py", *sys.argv[1:]]),
        "machine": machine(scratch),
        "kernel": os.uname().release,
        "cpuinfo_model": cpuinfo_model(),
        "versions": versions(),
        "pinning": (
            f"Redis `taskset -c {a.redis_cpu}`, every tsmsg node `taskset -c {a.node_cpu}`, "
            f"loadgen `taskset -c {a.loadgen_cpu}`"
            if pin_prefix(0)
            else "**not pinned** (taskset or a second CPU missing)"
        ),
        "load_start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "common": " ".join(common),
        "fdatasync_ms": fdatasync_ms(scratch, 0.5),
        "max_others": a.max_others,
        "retries": a.retries,
    }
    runs: list[dict[str, Any]] = []
    try:
        one_node: dict[tuple[int, str], float] = {}  # (round, engine) -> a node's fan-in
        for rnd, (engine, n) in itertools.product(range(1, a.rounds + 1), configs):
            fanin_rate = None
            for case, args in grid:
                label = case
                if case.startswith("latency"):
                    # The latency case's publishers are all on node 1: half the peak is
                    # half of what one node takes, not of the fan-in spread over N nodes.
                    peak = one_node.get((rnd, engine), fanin_rate)
                    share = float(case.split(":")[1])
                    if a.latency_rate:  # an A/B's: one rate for both sides
                        rate, label = a.latency_rate, f"latency @{a.latency_rate}/s (fixed)"
                    elif peak:
                        rate = round(peak * share)
                        whose = "fan-in" if n == 1 or (rnd, engine) not in one_node else "x1 fan-in"
                        label = f"latency @{rate}/s ({share:.0%} of {whose})"
                    else:
                        continue
                    args = [*args, "--rate", str(rate)]
                rec = measure(engine, n, scratch, cpus, a, (case, args, common), rnd, pyspy)
                rec["case"] = label
                if "error" in rec:
                    print(f"  error: {str(rec['error'])[:300]}", flush=True)
                elif case == "fanin":
                    fanin_rate = rec["figures"]["acked_msgs_s"]
                    if n == 1:
                        one_node[(rnd, engine)] = fanin_rate
                runs.append(rec)
    finally:
        meta["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        (out / "results.json").write_text(json.dumps({**meta, "runs": runs}, indent=1) + "\n")
        write_report(out, report(meta, runs))
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
