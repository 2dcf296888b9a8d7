"""End-to-end throughput and latency over TCP: the real server, a real load generator.

The server runs as a separate process (the ``tsmsg serve`` CLI, its own GIL), pinned to CPU 0
with ``taskset`` when that exists; this process is the load generator, pinned to CPU 1, one
trio event loop. Each case starts a fresh server on a fresh data dir, connects M members
that ``join`` one channel and N senders that do not, and lets the senders pipeline 200-byte
``send`` frames with up to W unacknowledged each (W = 1 shows the per-message round trip).
Every ``send`` carries ``meta: {"t0": time.perf_counter_ns()}``; the server stores and
pushes it, so each member computes send-to-deliver latency from its ``event`` frames (one
clock: senders and members share this process).

Reported per case, over a fixed measured window after a warm-up: acked sends/s, delivered
events/s (= sends x M), send-to-ack p50/p99 and send-to-deliver p50/p99/p99.9, and the CPU
time each side spent per 1,000 acked sends (server: utime + stime of its process from
``/proc/<pid>/stat``, both its threads; load generator: ``getrusage``). A side whose CPU
use is near 100 % of its one core is the bottleneck of that case. After the window the
senders stop, every ``ok`` is awaited, and the members must have received exactly
acked x M events (no loss, no ``resync`` cut) or the row says so.

The server's rate limits, set for people (200 frames/s per connection, 10 sends/s per
user, 5/s per user and channel), are lifted through ``TSMSG_LIMITS_*`` for the run;
nothing else is changed from the defaults. Loopback only.

Run with ``.venv/bin/python bench/e2e.py`` (``make bench-e2e``); ``--help`` for the case
grid and durations. Prints a Markdown table and writes ``results.json`` and ``results.md``
to ``bench/results/<date>-e2e/``; a hand-written "## Analysis" section in an existing
results.md is kept.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import datetime
import itertools
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import trio

from benchlib import machine, write_report
from tsmsg import FrameDecoder, encode
from tsmsg.auth import TokenIssuer

SECRET = b"e2e-bench-secret-e2e-bench-secret!!!"  # >= 32 bytes, as the server requires
TEXT = ("the quick brown fox jumps over a lazy dog " * 5)[:200]  # 200 bytes of ASCII
CHANNEL = "bench"
RATE_LIMIT_ENV = {  # the defaults are for people: they would cap a sender at 5 sends/s
    f"TSMSG_LIMITS_{kind}_{part}": "1000000"
    for kind in ("FRAME", "SEND", "CHANNEL_SEND")
    for part in ("RATE", "BURST")
}
RECEIVE_CHUNK = 64 * 1024  # bytes per socket read, as the server reads
SERVER_START_TIMEOUT_S = 20.0  # interpreter start + LMDB open on a loaded machine
SERVER_STOP_TIMEOUT_S = 10.0  # its shutdown grace is 5 s; then it is killed
CONNECT_TIMEOUT_S = 10.0  # connecting, hello and join for all clients of one case
DRAIN_TIMEOUT_S = 15.0  # after the window: the last acks, then the last deliveries
SERVER_CPU, LOADGEN_CPU = 0, 1  # taskset CPUs; only used with >= 2 CPUs and taskset present
SERVING = re.compile(r"serving on \S+:(\d+)")


@dataclass(frozen=True)
class Case:
    durability: str
    senders: int
    members: int
    window: int

    @property
    def name(self) -> str:
        return f"{self.durability}-s{self.senders}-m{self.members}-w{self.window}"


@dataclass
class Run:
    """Counters and samples of one case, shared by its tasks (one trio thread)."""

    case: Case
    sending: bool = True
    measuring: bool = False
    acked: int = 0
    delivered: int = 0
    resyncs: int = 0
    ack_ns: array.array[int] = field(default_factory=lambda: array.array("q"))
    deliver_ns: array.array[int] = field(default_factory=lambda: array.array("q"))


# --- processes --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads) from /proc/<pid>/stat."""
    return cpu_seconds_of(Path(f"/proc/{pid}/stat"))


def thread_stats(pid: int) -> tuple[float, int]:
    """CPU seconds of a process's main thread (the server's trio thread; the store writer
    and trio's worker threads are the rest) and the context switches of all its threads."""
    main, switches = 0.0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if int(task.name) == pid:
                main = cpu_seconds_of(task / "stat")
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    switches += int(line.split()[1])
        except (OSError, ValueError):
            continue  # a thread that exited between listing and reading
    return main, switches


def cpu_seconds_of(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pinning() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


class ServerProcess:
    """``tsmsg serve`` on port 0 in a fresh data dir; its log goes to a file next to it."""

    def __init__(self, root: Path, durability: str, pin: bool) -> None:
        self.data_dir = root / "data"
        self.log_path = root / "server.log"
        tsmsg = Path(sys.executable).parent / "tsmsg"
        cmd = [str(tsmsg)] if tsmsg.exists() else [sys.executable, "-m", "tsmsg.cli"]
        cmd += ["serve", "--port", "0", "--data-dir", str(self.data_dir)]
        cmd += ["--durability", durability]
        if pin:
            cmd = ["taskset", "-c", str(SERVER_CPU), *cmd]
        env = {**os.environ, **RATE_LIMIT_ENV, "TSMSG_SECRET": SECRET.decode()}
        env["TSMSG_LOG_LEVEL"] = "INFO"  # the port is read from the "serving on" line
        self.log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = 0

    def wait_ready(self) -> int:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = SERVING.search(self.log_path.read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return self.port
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"server did not start:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def slow_consumer_cuts(self) -> int:
        return self.log_path.read_text(errors="replace").count("slow consumer")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(SERVER_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(SERVER_STOP_TIMEOUT_S)
        finally:
            self.log.close()


# --- load generator ---------------------------------------------------------------------------


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    @classmethod
    async def connect(cls, port: int, user: str) -> Client:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream)
        token = TokenIssuer(SECRET).issue(user, ["*"], now=int(time.time()))
        reply = await client.request({"t": "hello", "v": 1, "token": token, "rid": 0})
        if reply.get("t") != "welcome":
            raise RuntimeError(f"hello failed for {user}: {reply}")
        return client

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a frame and return the reply with its rid (nothing else is in flight)."""
        await self.stream.send_all(encode(frame))
        while True:
            data = await self.stream.receive_some(RECEIVE_CHUNK)
            if not data:
                raise RuntimeError(f"server closed the connection during {frame['t']}")
            for reply in self.decoder.feed(data):
                if reply.get("rid") == frame["rid"]:
                    return reply


async def sender(client: Client, index: int, run: Run) -> None:
    """Keep ``window`` sends in flight; each ``ok`` frees a slot, refilled in one write."""
    rids = itertools.count(1)
    pending: dict[int, int] = {}  # rid -> perf_counter_ns at send
    prefix = f"{index}-{random.getrandbits(64):016x}-"  # cids unique across runs, UUID-sized

    def frames(count: int) -> bytes:
        out = []
        for _ in range(count):
            rid = next(rids)
            t0 = time.perf_counter_ns()
            pending[rid] = t0
            send = {"t": "send", "rid": rid, "channel": CHANNEL, "cid": f"{prefix}{rid}"}
            send.update(text=TEXT, meta={"t0": t0})
            out.append(encode(send))
        return b"".join(out)

    await client.stream.send_all(frames(run.case.window))
    while pending:
        data = await client.stream.receive_some(RECEIVE_CHUNK)
        if not data:
            raise RuntimeError("server closed a sender's connection")
        now = time.perf_counter_ns()
        freed = 0
        for frame in client.decoder.feed(data):
            if frame.get("t") != "ok":
                raise RuntimeError(f"sender {index}: unexpected frame {frame}")
            t0 = pending.pop(frame["rid"])
            freed += 1
            if run.measuring:
                run.ack_ns.append(now - t0)
        run.acked += freed
        if freed and run.sending:
            await client.stream.send_all(frames(freed))


async def member(client: Client, run: Run) -> None:
    """Receive events until cancelled; the latency is taken once per socket read."""
    while True:
        data = await client.stream.receive_some(RECEIVE_CHUNK)
        if not data:
            raise RuntimeError("server closed a member's connection")
        now = time.perf_counter_ns()
        for frame in client.decoder.feed(data):
            t = frame.get("t")
            if t == "event":
                run.delivered += 1
                if run.measuring:
                    run.deliver_ns.append(now - frame["meta"]["t0"])
            elif t == "resync":
                run.resyncs += 1  # the server cut this member's stream: a slow consumer


async def drive(run: Run, server: ServerProcess, warmup: float, seconds: float) -> dict[str, Any]:
    case = run.case
    with trio.fail_after(CONNECT_TIMEOUT_S):
        members = [await Client.connect(server.port, f"member-{j}") for j in range(case.members)]
        for rid, client in enumerate(members, 1):
            reply = await client.request({"t": "join", "rid": rid, "channel": CHANNEL})
            if reply.get("t") != "ok":
                raise RuntimeError(f"join failed: {reply}")
        senders = [await Client.connect(server.port, f"sender-{i}") for i in range(case.senders)]
    marks: dict[str, tuple[float, float, float, int, int, float, int]] = {}

    def mark(name: str) -> None:
        main, switches = thread_stats(server.proc.pid)
        marks[name] = (
            time.perf_counter(),
            cpu_seconds(server.proc.pid),
            own_cpu_seconds(),
            run.acked,
            run.delivered,
            main,
            switches,
        )

    complete = False
    with trio.fail_after(warmup + seconds + 3 * DRAIN_TIMEOUT_S):
        async with trio.open_nursery() as receiving:
            for client in members:
                receiving.start_soon(member, client, run)
            with trio.CancelScope() as draining:
                async with trio.open_nursery() as sending:
                    for i, client in enumerate(senders):
                        sending.start_soon(sender, client, i, run)
                    await trio.sleep(warmup)
                    mark("start")
                    run.measuring = True
                    await trio.sleep(seconds)
                    run.measuring = False
                    mark("end")
                    run.sending = False
                    # The nursery's exit waits for each sender's last acks.
                    draining.deadline = trio.current_time() + DRAIN_TIMEOUT_S
            expected = run.acked * case.members
            with trio.move_on_after(DRAIN_TIMEOUT_S):
                while run.delivered < expected:
                    await trio.sleep(0.01)
            complete = (
                not draining.cancelled_caught and run.delivered == expected and run.resyncs == 0
            )
            receiving.cancel_scope.cancel()  # members read until every event has arrived
    for client in members + senders:
        await client.stream.aclose()

    t0, s0, l0, a0, d0, m0, c0 = marks["start"]
    t1, s1, l1, a1, d1, m1, c1 = marks["end"]
    wall, sends, events = t1 - t0, a1 - a0, d1 - d0
    return {
        "measured_s": wall,
        "acked_sends_per_s": sends / wall,
        "delivered_events_per_s": events / wall,
        "ack_ms": percentiles(run.ack_ns, (0.5, 0.99)),
        "deliver_ms": percentiles(run.deliver_ns, (0.5, 0.99, 0.999)),
        "server_cpu_s_per_1k_sends": (s1 - s0) / sends * 1000 if sends else None,
        "server_cpu_util": (s1 - s0) / wall,
        "server_main_thread_share": (m1 - m0) / (s1 - s0) if s1 > s0 else None,
        "server_ctx_switches_per_send": (c1 - c0) / sends if sends else None,
        "loadgen_cpu_s_per_1k_sends": (l1 - l0) / sends * 1000 if sends else None,
        "loadgen_cpu_util": (l1 - l0) / wall,
        "acked_total": run.acked,
        "delivered_total": run.delivered,
        "expected_deliveries": expected,
        "resyncs": run.resyncs,
        "complete": complete,
    }


def percentiles(samples: array.array[int], qs: tuple[float, ...]) -> list[float | None]:
    """Nearest-rank percentiles of nanosecond samples, in milliseconds."""
    if not samples:
        return [None for _ in qs]
    ordered = sorted(samples)
    return [ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6 for q in qs]


def fdatasync_ms(root: Path, seconds: float) -> dict[str, float | None]:
    """The disk's current cost of one durable commit: a 4 KiB in-place write + fdatasync,
    repeated for ``seconds`` (an LMDB fsync commit does two). Probed right before each case
    because other tenants' I/O moves it by an order of magnitude."""
    path = root / "fdatasync-probe"
    samples: list[float] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        block = b"x" * 4096
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        os.close(fd)
        path.unlink()
    samples.sort()
    p50, p99 = (samples[min(len(samples) - 1, int(q * len(samples)))] for q in (0.5, 0.99))
    return {"p50": p50, "p99": p99}


def run_case(case: Case, scratch: Path, args: argparse.Namespace, pin: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"{case.name}-", dir=scratch))
    load1 = os.getloadavg()[0]
    disk = fdatasync_ms(root, args.fdatasync_probe)
    server = ServerProcess(root, case.durability, pin)
    try:
        server.wait_ready()
        run = Run(case)
        result = trio.run(drive, run, server, args.warmup, args.seconds)
    finally:
        server.stop()
        cuts = server.slow_consumer_cuts()
        shutil.rmtree(root, ignore_errors=True)
    return {
        **dataclasses.asdict(case),
        "load1": load1,
        "fdatasync_ms": disk,
        **result,
        "slow_consumer_cuts": cuts,
    }


# --- report -----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "tsmsg": metadata.version("tsmsg"),
        "trio": metadata.version("trio"),
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| durability | senders | members | window | acked sends/s | delivered events/s | "
        "ack p50 / p99 ms | deliver p50 / p99 / p99.9 ms | server CPU s / 1k sends | "
        "server CPU | trio thread share | server ctx switches / send | "
        "loadgen CPU s / 1k sends | loadgen CPU | complete | load1 | fdatasync p50 / p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        ack = " / ".join(fmt(v, ".2f") for v in r["ack_ms"])
        deliver = " / ".join(fmt(v, ".2f") for v in r["deliver_ms"])
        check = (
            "yes" if r["complete"] else f"NO ({r['delivered_total']}/{r['expected_deliveries']})"
        )
        lines.append(
            f"| {r['durability']} | {r['senders']} | {r['members']} | {r['window']} | "
            f"{r['acked_sends_per_s']:,.0f} | {r['delivered_events_per_s']:,.0f} | {ack} | "
            f"{deliver} | {fmt(r['server_cpu_s_per_1k_sends'], '.3f')} | "
            f"{r['server_cpu_util']:.0%} | {fmt(r['server_main_thread_share'], '.0%')} | "
            f"{fmt(r['server_ctx_switches_per_send'], '.2f')} | "
            f"{fmt(r['loadgen_cpu_s_per_1k_sends'], '.3f')} | "
            f"{r['loadgen_cpu_util']:.0%} | {check} | {r['load1']:.2f} | "
            f"{r['fdatasync_ms']['p50']:.2f} / {r['fdatasync_ms']['p99']:.2f} |"
        )
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per case")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time per case")
    parser.add_argument("--durability", default="fsync,async", help="comma-separated")
    parser.add_argument("--senders", type=ints, default=[1, 8], help="comma-separated N")
    parser.add_argument("--members", type=ints, default=[1, 10, 50], help="comma-separated M")
    parser.add_argument("--window", type=ints, default=[1, 16], help="sends in flight per sender")
    parser.add_argument(
        "--fdatasync-probe", type=float, default=0.5, help="disk probe seconds per case"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--data-dir", type=Path, default=None, help="scratch (default: tmp)")
    args = parser.parse_args()

    pin = pinning() and not args.no_pin
    date = datetime.date.today().isoformat()
    out = args.out or Path(__file__).parent / "results" / f"{date}-e2e"
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="tsmsg-e2e-", dir=args.data_dir))
    host = machine(scratch)  # before pinning: nproc counts the CPUs this process may use
    if pin:
        os.sched_setaffinity(0, {LOADGEN_CPU})
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    info: dict[str, Any] = {
        "command": command,
        "date": date,
        "machine": host,
        "versions": versions(),
        "loadavg_at_start": os.getloadavg(),
        "pinning": (
            f"server taskset -c {SERVER_CPU}, load generator sched_setaffinity {{{LOADGEN_CPU}}}"
            if pin
            else "none"
        ),
        "server_env": RATE_LIMIT_ENV,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "text_bytes": len(TEXT),
    }
    print(json.dumps(info, indent=2), flush=True)
    cases = [
        Case(d, n, m, w)
        for d in args.durability.split(",")
        for n in args.senders
        for m in args.members
        for w in args.window
    ]
    rows: list[dict[str, Any]] = []
    try:
        for case in cases:
            row = run_case(case, scratch, args, pin)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**info, "cases": rows}, indent=2) + "\n")
    m, v = info["machine"], info["versions"]
    load = " / ".join(f"{x:.2f}" for x in info["loadavg_at_start"])
    report = (
        f"# End-to-end benchmark, {date}\n\n"
        f"- command: `{command}` (from the repository root; `make bench-e2e`)\n"
        f"- machine: {m['cpu']}, {m['nproc']} CPUs, {m['platform']}; data dirs on "
        f"{m['data_dir_device']} ({m['data_dir_fs']})\n"
        f"- versions: Python {v['python']}, tsmsg {v['tsmsg']}, trio {v['trio']}\n"
        f"- load average at start (1/5/15 min): {load}; per case in the `load1` column\n"
        f"- pinning: {info['pinning']}\n"
        "- server: `tsmsg serve --port 0 --data-dir <fresh tmp dir> --durability <d>`, "
        "default settings except "
        + ", ".join(f"`{k}={val}`" for k, val in RATE_LIMIT_ENV.items())
        + " (the default rate limits are set for people and would cap each sender)\n"
        f"- workload: N senders (not joined) and M members (joined) in one channel, "
        f"{len(TEXT)}-byte texts, `meta: {{t0}}` with the send time; each sender keeps "
        f"`window` sends in flight; {args.warmup:g} s warm-up, then {args.seconds:g} s "
        "measured\n"
        "- CPU columns: CPU seconds per 1,000 acked sends (server: its whole process, "
        "trio thread + store writer thread; load generator: this process) and the share of "
        "one core used over the window; a side near 100 % is the bottleneck. Trio thread "
        "share: the server's main (trio) thread's part of its CPU, the rest being the store "
        "writer thread. Context switches: voluntary + involuntary, all server threads\n"
        "- complete: after the window the senders stop; every event must reach every "
        "member (delivered = acked x M, no `resync`)\n"
        "- fdatasync: a 4 KiB pwrite + fdatasync in the case's data dir, repeated for "
        f"{args.fdatasync_probe:g} s right before the case (an LMDB fsync commit does two)\n\n"
        f"{table(rows)}\n"
    )
    print(report)
    write_report(out, report)


if __name__ == "__main__":
    main()
