"""Padding of the train stage's batches on the demo data: how wide to pad, and whether packing pays.

    uv run python bench/padding.py     # needs models/base and data/sanitized (dvc repro sanitize)

Part 1 counts, for the default run's batches (length-sorted groups of `train.batch_size` rows),
the padded fraction when each batch's width is rounded up to a multiple of 32 (mlx-lm's rule),
8 or 1, and when rows are packed (samples laid end to end in rows of `train.max_seq_length`,
the packing a block-diagonal attention mask would allow). Part 2 trains the default model on
the same batches with widths rounded to 32 and to 8 through the train stage's own loop
(`train_loop`), alternating A B B A, and reports useful tokens/s (padding excluded, compilation of
every new width included: that is what a run pays). Part 3 trains the same batches (widths
rounded to 32) with the output layer on the learned positions only (`Batches.positions`, what the
stage does) and on every position, A B B A.
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


def train_on(batches: Any, params: Any, base: Path) -> tuple[float, int]:
    """Seconds and useful tokens of one pass over `batches` with the stage's loop."""
    from mlx_lm.utils import load

    from lorapipe.tracking import Recorder
    from lorapipe.trainer import TrainingRun, attach_adapters, train_loop

    model = load(str(base))[0]
    attach_adapters(model, params.lora)
    steps = len(batches)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        run = TrainingRun.fresh(
            model, params.train, params.seed, batches, steps, Path(tmp), Recorder()
        )
        state = train_loop(run)
        seconds = time.perf_counter() - tic
    return seconds, state.seen_tokens


def subset(made: Any, chosen: Any, positions: bool = True) -> Any:
    """The chosen batches of `made`; without `positions`, logits at every position."""
    from lorapipe.batches import Batches

    return Batches(
        [made.tokens[i] for i in chosen],
        [made.targets[i] for i in chosen],
        [made.real[i] for i in chosen],
        [made.positions[i] for i in chosen] if positions else [],
    )


def alternate(cases: dict[str, Any], params: Any, base: Path) -> dict[str, Any]:
    """Train each case's batches A B B A; useful tokens/s per run and their medians."""
    import mlx.core as mx

    first, second = cases
    timings: dict[str, list[dict[str, float]]] = {first: [], second: []}
    for name in (first, second, second, first):
        seconds, tokens = train_on(cases[name], params, base)
        timings[name].append({"seconds": seconds, "useful_tokens_per_s": tokens / seconds})
        print(f"{name:>22}: {tokens} useful tokens in {seconds:6.1f} s, {tokens / seconds:6.1f}/s")
        mx.clear_cache()
    medians = {
        name: statistics.median(r["useful_tokens_per_s"] for r in runs)
        for name, runs in timings.items()
    }
    for name, value in medians.items():
        print(f"  {name:>22}: {value:7.1f} useful tokens/s (median)")
    ratio = medians[second] / medians[first]
    print(f"  {second} / {first}: {ratio:.3f}x")
    return {"timings": timings, "median_useful_tokens_per_s": medians, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="batches trained per run")
    parser.add_argument(
        "--parts", default="1,2,3", help="which parts to run (1: counts, 2: widths, 3: logits)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "padding-cpu.json"))
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    runtime.setup()
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from lorapipe.batches import load_split, make_batches
    from lorapipe.params import load_params

    shipped = load_params(ROOT / "params.yaml")
    base = Path(shipped.paths.base)
    tokenizer = load_tokenizer(base)
    examples = load_split(Path(shipped.paths.sanitized) / "train.jsonl", tokenizer, True)
    batch_size = shipped.train.batch_size
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.is_file() else {}  # other parts' results stay
    record.update(
        {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": str(mx.default_device()),
            "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
            "steps": args.steps,
        }
    )

    if 1 in parts:
        lengths = [len(e.tokens) for e in examples]
        counts: dict[str, Any] = {
            "rows": len(examples),
            "median_tokens": statistics.median(lengths),
        }
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
        made = make_batches(examples, batch_size)
        logit_rows = sum(
            t.shape[0] * (t.shape[1] - 1) if p is None else p.size
            for t, p in zip(made.tokens, made.positions, strict=True)
        )
        counts["logit_rows"] = {
            "all_positions": sum(t.shape[0] * (t.shape[1] - 1) for t in made.tokens),
            "learned_positions": logit_rows,
            "learned": int(sum(t[:, 1:].sum() for t in made.targets)),
        }
        print(f"padding of the demo train split, batch {batch_size}, {len(examples)} rows")
        for name, value in counts.items():
            if isinstance(value, dict):
                print(f"  {name:<10} {json.dumps(value)}")
        record["counts"] = counts

    # Parts 2 and 3: the same randomly chosen batches (same rows) in every run.
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
    print(f"useful tokens/s, {args.steps} batches, {mx.default_device()}, {platform.machine()}")
    if 2 in parts:
        by_pad = {pad: make_batches(examples, batch_size, pad) for pad in (32, 8)}
        cases = {f"pad to {pad}": subset(by_pad[pad], chosen) for pad in (32, 8)}
        record["widths"] = alternate(cases, params, base)
    if 3 in parts:
        made32 = make_batches(examples, batch_size)
        cases = {
            "logits everywhere": subset(made32, chosen, positions=False),
            "logits where learned": subset(made32, chosen),
        }
        record["logits"] = alternate(cases, params, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
