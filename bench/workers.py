"""DVC queue workers on CPU: LoRA steps of N experiments at once, with and without lorapipe's
share of BLAS threads (lorapipe.workers).

    uv run python bench/workers.py [--workers 2] [--steps 5] [--budget 90]

Runs bench/blas.py's LoRA step (SmolLM2-135M's shape, random weights, batch 4 x 128, lorapipe's
OpenBLAS) in fresh interpreters: one alone with every core's thread, then N at once with every
core's threads each (OpenBLAS's default: what N queue workers ran before lorapipe.workers), then
N at once with the threads lorapipe.workers gives each (cores // N). Prints the load average
before each run (another process on the machine skews every number) and a table: median tokens/s
of each process, their sum, and the sum over the one process's. Raw numbers:
bench/results/workers-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorapipe.io import atomic_write_json
from lorapipe.workers import share

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "workers-cpu.json"


def run_together(count: int, threads: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """`count` LoRA-step processes at once, each with `threads` OpenBLAS threads."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "LORAPIPE_BLAS": "auto"}
    command = [sys.executable, str(ROOT / "bench" / "blas.py"), "--worker", "lora_step"]
    command += ["--steps", str(args.steps), "--budget", str(args.budget)]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(count)
    ]
    results = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode != 0:
            sys.exit(f"bench/workers.py: a LoRA-step process failed (exit {process.returncode})")
        results.append(json.loads(out.splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="experiments at once")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process, at most")
    parser.add_argument("--budget", type=float, default=90, help="stop (at 2 steps) past this")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    shared = share(1, args.workers, cores, "cpu", 0, {}).env["OPENBLAS_NUM_THREADS"]
    runs = [
        ("1 process alone", 1, cores),
        (f"{args.workers} at once, {cores} threads each (before)", args.workers, cores),
        (f"{args.workers} at once, {shared} each (lorapipe.workers)", args.workers, int(shared)),
    ]
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": cores,
        "settings": f"bench/blas.py lora_step, --steps {args.steps} --budget {args.budget}",
        "runs": {},
    }
    print(f"cores {cores}; {report['settings']}")
    for name, count, threads in runs:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"running: {name} (load average {load:.2f}) ...", flush=True)
        results = run_together(count, threads, args)
        report["runs"][name] = {"load_average_1min": load, "threads": threads, "results": results}

    alone = report["runs"][runs[0][0]]["results"][0]["tokens_per_s"]
    rows = [("run", "tokens/s of each (median step)", "together", "vs alone")]
    for name, _, _ in runs:
        each = [r["tokens_per_s"] for r in report["runs"][name]["results"]]
        cells = ", ".join(f"{t:.1f}" for t in each)
        rows.append((name, cells, f"{sum(each):.1f}", f"{sum(each) / alone:.2f}x"))
        report["runs"][name]["median_tokens_per_s"] = statistics.median(each)
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n" + "\n".join(lines))
    atomic_write_json(args.output, report)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
