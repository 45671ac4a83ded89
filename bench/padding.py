"""Padding of the train stage's batches on the demo data: how wide to pad, and whether packing pays.

    uv run python bench/padding.py     # needs models/base and data/sanitized (dvc repro sanitize)

Part 1 counts, for the default run's batches (length-sorted groups of `train.batch_size` rows),
the padded fraction when each batch's width is rounded up to a multiple of 32 (mlx-lm's rule),
8 or 1, and when rows are packed (samples laid end to end in rows of `train.max_seq_length`,
the packing a block-diagonal attention mask would allow). Part 2 trains the default model on
the same batches with widths rounded to 32 and to 8 through the train stage's own loop
(`train_loop`), alternating A B B A, and reports useful tokens/s (padding excluded, compilation of
every new width included: that is what a run pays).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from lorapipe import runtime

ROOT = Path(__file__).resolve().parents[1]


def packed_padding(lengths: list[int], row: int) -> tuple[float, int]:
    """Padding fraction and row count when samples are packed first-fit-decreasing into rows."""
    rows: list[int] = []
    for n in sorted(lengths, reverse=True):
        for i, used in enumerate(rows):
            if used + n <= row:
                rows[i] += n
                break
        else:
            rows.append(n)
    return 1 - sum(lengths) / (len(rows) * row), len(rows)


class Quiet:
    """The tracker train_loop is given: keeps the reports, prints nothing."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def report(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def say(self, line: str) -> None:
        pass


def train_on(batches: Any, params: Any, base: Path) -> tuple[float, int]:
    """Seconds and useful tokens of one pass over `batches` with the stage's loop."""
    from mlx_lm.utils import load

    from lorapipe.stages.train import LoopState, attach_adapters, make_optimizer, train_loop

    model = load(str(base))[0]
    attach_adapters(model, params.lora)
    steps = len(batches)
    optimizer = make_optimizer(params.train, steps)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        state = train_loop(
            model, optimizer, batches, batches, params, steps, LoopState(), Path(tmp), "", Quiet()
        )
        seconds = time.perf_counter() - tic
    return seconds, state.seen_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="batches trained per run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "padding-cpu.json"))
    args = parser.parse_args()
    runtime.setup()
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from lorapipe.params import load_params
    from lorapipe.stages.train import Batches, load_split, make_batches

    shipped = load_params(ROOT / "params.yaml")
    base = Path(shipped.paths.base)
    tokenizer = load_tokenizer(base)
    examples = load_split(Path(shipped.paths.sanitized) / "train.jsonl", tokenizer, True)
    batch_size = shipped.train.batch_size
    lengths = [len(e.tokens) for e in examples]

    counts: dict[str, Any] = {"rows": len(examples), "median_tokens": statistics.median(lengths)}
    for pad in (32, 8, 1):
        made = make_batches(examples, batch_size, pad)
        widths = {t.shape[1] for t in made.tokens}
        counts[f"pad_to_{pad}"] = {"padding": made.padding_fraction, "widths": len(widths)}
    fraction, rows = packed_padding(lengths, shipped.train.max_seq_length)
    counts["packed"] = {
        "padding": fraction,
        "rows": rows,
        "row_tokens": shipped.train.max_seq_length,
    }

    # Part 2: the same randomly chosen batches (same rows; only their width differs).
    chosen = np.random.default_rng(0).permutation(len(make_batches(examples, batch_size)))
    chosen = chosen[: args.steps]
    params = dataclasses.replace(
        shipped,
        train=dataclasses.replace(
            shipped.train,
            iters=args.steps,
            steps_per_eval=10**6,
            val_batches=0,
            save_every=10**6,
        ),
    )
    timings: dict[int, list[dict[str, float]]] = {32: [], 8: []}
    for pad in (32, 8, 8, 32):
        made = make_batches(examples, batch_size, pad)
        subset = Batches(
            [made.tokens[i] for i in chosen],
            [made.targets[i] for i in chosen],
            [made.real[i] for i in chosen],
        )
        seconds, tokens = train_on(subset, params, base)
        timings[pad].append({"seconds": seconds, "useful_tokens_per_s": tokens / seconds})
        rate = tokens / seconds
        print(f"pad to {pad:>2}: {tokens} useful tokens in {seconds:6.1f} s, {rate:6.1f}/s")
        mx.clear_cache()

    medians = {
        pad: statistics.median(r["useful_tokens_per_s"] for r in rs) for pad, rs in timings.items()
    }
    print(f"\npadding of the demo train split, batch {batch_size}, {len(examples)} rows")
    for name, value in counts.items():
        if isinstance(value, dict):
            print(f"  {name:<10} {value['padding']:6.1%}  {json.dumps(value)}")
    print(f"useful tokens/s, {args.steps} batches, {mx.default_device()}, {platform.machine()}")
    for pad, value in medians.items():
        print(f"  pad to {pad:>2}: {value:7.1f}")
    print(f"  pad 8 / pad 32: {medians[8] / medians[32]:.3f}x")
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": str(mx.default_device()),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "counts": counts,
        "steps": args.steps,
        "timings": {str(k): v for k, v in timings.items()},
        "median_useful_tokens_per_s": {str(k): v for k, v in medians.items()},
        "ratio_8_over_32": medians[8] / medians[32],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
