"""The three data stages on ~25k rows (the seed runbook's 19,845 / 2,473 / 2,497) or a million,
timed, with each stage's peak memory.

    uv run python bench/data.py [--rows 25500] [--base models/base] [--repeats 3]
    uv run python bench/data.py --rows 1000000 --repeats 1 --out bench/results/data-cpu-1m.json

The demo data is scaled up by copying its raw lines with every copy's numbers changed, so the
copies are new rows (not duplicates) with the demo's defects at the same rates. Each stage runs
in a fresh process as `dvc repro` runs it and is timed end to end: load the base tokenizer,
read, tokenize, process, write (Python start-up and imports excluded); its peak RSS is the
process's, imports included. Targets on the 2-core Linux machine: all three under 10 s at 25k
rows; at a million, under 3 minutes with every stage under 2 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lorapipe import runtime

ROOT = Path(__file__).resolve().parents[1]
_DIGITS = re.compile(rb"\d+")


def scale_raw(source: Path, dest: Path, rows: int) -> int:
    """Write `rows` raw lines into dest/: the demo files, then copies with renumbered digits."""
    files = sorted(source.glob("*.jsonl"))
    lines = [(f, line) for f in files for line in f.read_bytes().splitlines(keepends=True)]
    outputs = {f: open(dest / f.name, "wb") for f in files}  # noqa: SIM115 - closed below
    try:
        for i in range(rows):
            copy, (f, line) = divmod(i, len(lines))[0], lines[i % len(lines)]
            outputs[f].write(renumber(line, copy) if copy else line)
    finally:
        for out in outputs.values():
            out.close()
    return rows


def renumber(line: bytes, copy: int) -> bytes:
    """The same line with every number changed: a new row, not a duplicate of the original."""
    return _DIGITS.sub(lambda m: str(int(m.group()) * 7 + copy).encode(), line)


def stage_params(work: Path, base: str) -> Any:
    """params.yaml with every data path under `work` (raw rows in work/raw)."""
    from lorapipe.params import load_params

    params = load_params(ROOT / "params.yaml")
    paths = dataclasses.replace(
        params.paths,
        base=base,
        raw=str(work / "raw"),
        preprocessed=str(work / "pre"),
        split=str(work / "split"),
        sanitized=str(work / "san"),
        metrics=str(work / "m"),
        reports=str(work / "r"),
    )
    data = dataclasses.replace(params.data, source=str(work / "raw" / "*.jsonl"))
    return dataclasses.replace(params, paths=paths, data=data)


def run_one(stage: str, work: Path, base: str) -> None:
    """In a fresh process: run one stage, print its seconds and the process's peak RSS."""
    import importlib

    runtime.setup()
    module = importlib.import_module(f"lorapipe.stages.{stage}")
    params = stage_params(work, base)
    tic = time.perf_counter()
    module.main(params)
    seconds = time.perf_counter() - tic
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def timed(stage: str, work: Path, base: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--stage", stage, "--work", str(work), "--base", base]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 25,500 raw lines leave ~24,800 rows after preprocess: the seed's 19,845 + 2,473 + 2,497.
    parser.add_argument("--rows", type=int, default=25_500)
    parser.add_argument("--base", default=str(ROOT / "models" / "base"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data-cpu.json"))
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # the child process's stage
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        run_one(args.stage, Path(args.work), args.base)
        return

    stages = ("preprocess", "split", "sanitize")
    timings: dict[str, list[float]] = {name: [] for name in stages}
    peaks: dict[str, list[float]] = {name: [] for name in stages}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "raw").mkdir()
        raw_lines = scale_raw(ROOT / "data" / "raw", work / "raw", args.rows)
        for _ in range(args.repeats):
            for name in stages:
                result = timed(name, work, args.base)
                timings[name].append(result["seconds"])
                peaks[name].append(result["peak_mb"])
        metrics = json.loads((work / "m" / "data.json").read_text())
        counts = {
            "raw_lines": raw_lines,
            "preprocessed": metrics["preprocess"]["kept"],
            **{name: s["rows"] for name, s in metrics["splits"].items()},
        }
        shutil.rmtree(work / "raw")

    medians = {name: statistics.median(t) for name, t in timings.items()}
    peak = {name: statistics.median(p) for name, p in peaks.items()}
    rows_in = {
        "preprocess": counts["raw_lines"],
        "split": counts["preprocessed"],
        "sanitize": counts["preprocessed"],
    }
    print(
        f"\ndata stages, {platform.machine()} {platform.system()}, Python {sys.version.split()[0]}"
    )
    print(f"rows: {counts}")
    print(f"{'stage':<12}{'rows in':>10}{'median s':>10}{'rows/s':>10}{'peak MB':>10}")
    for name, seconds in medians.items():
        print(
            f"{name:<12}{rows_in[name]:>10}{seconds:>10.2f}{rows_in[name] / seconds:>10.0f}"
            f"{peak[name]:>10.0f}"
        )
    total = sum(medians.values())
    limit = 10 if args.rows <= 25_500 else 180
    verdict = "met" if total < limit and max(peak.values()) < 2048 else "missed"
    print(f"{'total':<12}{'':>10}{total:>10.2f}   (target < {limit} s, < 2 GB: {verdict})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "counts": counts,
        "seconds": timings,
        "medians": medians,
        "peak_rss_mb": peaks,
        "total_median_s": total,
        "repeats": args.repeats,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
