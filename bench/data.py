"""The three data stages on ~25k rows (the seed runbook's 19,845 / 2,473 / 2,497), timed.

    uv run python bench/data.py [--rows 24815] [--base models/base]

The demo data is scaled up by copying its raw lines with every copy's numbers changed, so the
copies are new rows (not duplicates) with the demo's defects at the same rates. Each stage runs
as `dvc repro` runs it and is timed end to end: load the base tokenizer, read, tokenize,
process, write (Python start-up and imports excluded). Target: all three under 10 s on the
2-core Linux machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 25,500 raw lines leave ~24,800 rows after preprocess: the seed's 19,845 + 2,473 + 2,497.
    parser.add_argument("--rows", type=int, default=25_500)
    parser.add_argument("--base", default=str(ROOT / "models" / "base"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data-cpu.json"))
    args = parser.parse_args()
    runtime.setup()

    from lorapipe.params import load_params
    from lorapipe.stages import preprocess, sanitize, split

    base_params = load_params(ROOT / "params.yaml")
    timings: dict[str, list[float]] = {"preprocess": [], "split": [], "sanitize": []}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "raw").mkdir()
        raw_lines = scale_raw(ROOT / "data" / "raw", work / "raw", args.rows)
        paths = dataclasses.replace(
            base_params.paths,
            base=args.base,
            preprocessed=str(work / "pre"),
            split=str(work / "split"),
            sanitized=str(work / "san"),
            metrics=str(work / "m"),
            reports=str(work / "r"),
        )
        params = dataclasses.replace(
            base_params,
            paths=paths,
            data=dataclasses.replace(base_params.data, source=str(work / "raw" / "*.jsonl")),
        )
        for _ in range(args.repeats):
            for name, stage in (
                ("preprocess", preprocess),
                ("split", split),
                ("sanitize", sanitize),
            ):
                tic = time.perf_counter()
                stage.main(params)
                timings[name].append(time.perf_counter() - tic)
        metrics = json.loads((work / "m" / "data.json").read_text())
        counts = {
            "raw_lines": raw_lines,
            "preprocessed": metrics["preprocess"]["kept"],
            **{name: s["rows"] for name, s in metrics["splits"].items()},
        }
        shutil.rmtree(work / "raw")

    medians = {name: statistics.median(t) for name, t in timings.items()}
    rows_in = {
        "preprocess": counts["raw_lines"],
        "split": counts["preprocessed"],
        "sanitize": counts["preprocessed"],
    }
    print(
        f"\ndata stages, {platform.machine()} {platform.system()}, Python {sys.version.split()[0]}"
    )
    print(f"rows: {counts}")
    print(f"{'stage':<12}{'rows in':>10}{'median s':>10}{'rows/s':>10}")
    for name, seconds in medians.items():
        print(f"{name:<12}{rows_in[name]:>10}{seconds:>10.2f}{rows_in[name] / seconds:>10.0f}")
    total = sum(medians.values())
    verdict = "met" if total < 10 else "missed"
    print(f"{'total':<12}{'':>10}{total:>10.2f}   (target < 10 s: {verdict})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "counts": counts,
        "seconds": timings,
        "medians": medians,
        "total_median_s": total,
        "repeats": args.repeats,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
