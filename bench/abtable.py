"""A back-to-back A/B's table: DIR/{before,after}-{1,2}/results.json, four runs of
bench/run.py, side by side (the tables of bench/results/2026-12-07-*/README.md).

python3 bench/abtable.py DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RUNS = ["before-1", "before-2", "after-1", "after-2"]


def fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "rate":
        return f"{value / 1000:,.1f}k"
    if kind == "s":
        return f"{value:.2f}"
    if kind == "bytes":
        return f"{value:,.0f}"
    return f"{value:.1f}"


def figures(run: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    r, workload = run["result"], run["workload"]
    if workload == "idle":
        return [
            ("connects/s", r["connects_s"], "rate"),
            ("RSS B/conn", r["server_rss_per_conn_bytes"], "bytes"),
        ]
    if workload == "reconnect":
        return [
            ("all caught up s", r["all_caught_up_s"], "s"),
            ("entries replayed/s", r["entries_replayed_s"], "rate"),
            ("µs/entry", r["cpu"]["server_cpu_s_per_million_msgs"], "us"),
            ("catch-up p99 ms", r["catch_up_time"]["p99_ms"], "ms"),
        ]
    if workload == "replay":
        return [
            ("entries/s", r["entries_s_median"], "rate"),
            ("µs/entry", r["cpu"]["server_cpu_s_per_million_msgs"], "us"),
        ]
    if workload == "fanout":
        return [
            ("deliveries/s", r["deliveries_s"], "rate"),
            ("µs/delivery", r["cpu"].get("server_cpu_s_per_million_deliveries"), "us"),
            ("p99 ms", r["deliver_latency"]["p99_ms"], "ms"),
        ]
    return [
        ("acked msgs/s", r["throughput_msgs_s"], "rate"),
        ("µs/msg", r["cpu"]["server_cpu_s_per_million_msgs"], "us"),
        ("p99 ms", r["ack_latency"]["p99_ms"], "ms"),
    ]


def main() -> None:
    here = Path(sys.argv[1])
    runs = {name: json.loads((here / name / "results.json").read_text())["runs"] for name in RUNS}
    print("| tier | case | figure | before (1 / 2) | after (1 / 2) |")
    print("| --- | --- | --- | ---: | ---: |")
    for i, case in enumerate(runs[RUNS[0]]):
        for j, (label, _, kind) in enumerate(figures(case)):
            cells = [fmt(figures(runs[name][i])[j][1], kind) for name in RUNS]
            name = f"{case['workload']} {case['label']}"
            before, after = " / ".join(cells[:2]), " / ".join(cells[2:])
            print(f"| {case['tier']} | {name} | {label} | {before} | {after} |")


if __name__ == "__main__":
    main()
