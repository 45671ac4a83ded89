"""Validation's loss (`lorapipe.loss.dataset_loss`) on one stream vs on lanes, on the CPU.

    uv run python bench/validation.py --model models/fused --valid data/sanitized/valid.jsonl \
        --repeats 3 --output bench/results/validation-cpu.json

What training's validation (`train.val_batches` batches spread over all lengths, three times in
the default run) and quantize's loss before and after run: the split's rows encoded as training
encodes them (prompts masked), batches of `train.batch_size` rows. `one stream`: every batch on
MLX's default stream with the BLAS on all its threads (how validation ran before it used lanes);
`lanes`: each batch's rows shared over `lorapipe.lanes.count` lanes, one BLAS thread each. The
two alternate; medians of the repeats, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/fused"))
    parser.add_argument("--valid", type=Path, default=Path("data/sanitized/valid.jsonl"))
    parser.add_argument("--batch-size", type=int, default=4, help="train.batch_size")
    parser.add_argument("--batches", type=int, default=16, help="train.val_batches")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    from lorapipe import cpu_exp, lanes, runtime

    runtime.setup()
    count = lanes.count(args.batch_size)
    lanes.prepare(count)  # before the first eval, as the stages do
    import mlx.core as mx
    from mlx_lm import load

    from lorapipe.batches import encode, make_batches
    from lorapipe.io import read_jsonl
    from lorapipe.loss import dataset_loss

    model, tokenizer = load(str(args.model))
    cpu_exp.install()
    rows = [line.value for line in read_jsonl(args.valid)]
    examples = [encode(row, tokenizer, mask_prompt=True) for row in rows if row is not None]
    batches = make_batches(examples, args.batch_size)
    dataset_loss(model, batches, 2, lanes=count)  # warm-up: first calls pay one-off costs
    runs: dict[str, list[dict[str, float]]] = {"one stream": [], "lanes": []}
    for _ in range(args.repeats):
        for mode, lane_count in (("one stream", 1), ("lanes", count)):
            start = time.perf_counter()
            loss = dataset_loss(model, batches, args.batches, lanes=lane_count)
            runs[mode].append({"seconds": time.perf_counter() - start, "loss": loss})
            print(f"{mode}: {runs[mode][-1]['seconds']:.2f} s, loss {loss:.7f}", flush=True)
    median = {mode: statistics.median(r["seconds"] for r in rs) for mode, rs in runs.items()}
    print(
        f"median: one stream {median['one stream']:.2f} s, {count} lanes "
        f"{median['lanes']:.2f} s: {median['one stream'] / median['lanes']:.2f}x"
    )
    if args.output:
        report = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"platform": platform.platform(), "processor": platform.processor()},
            "device": str(mx.default_device()),
            "model": str(args.model),
            "batches": args.batches,
            "batch_size": args.batch_size,
            "lanes": count,
            "runs": runs,
            "median_seconds": median,
        }
        args.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
