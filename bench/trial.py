"""Memory trials against training: does the trial before step 1 predict training's peak?

    python3 bench/trial.py --device gpu --output $OUT/trial.json   # the default configs
    uv run python bench/trial.py --configs "tiny:0.05:1" --trials 3 --steps 10   # smoke, CPU

Each config is SHAPE:LIMIT_GB:BLOCKS[:SHARE]: `bench/train.py`'s model of that shape (random
weights, LoRA from params.yaml, batch 8 x 512, bfloat16), `train.memory_limit_gb` LIMIT_GB and
BLOCKS blocks recomputing (fixed: the trials are compared, not searched), MLX's allocator capped
at SHARE of the limit (default `lorapipe.memory.ALLOCATOR_SHARE`). First `lorapipe.memory`'s
trial on the run itself with each of `--trials` step counts (the train stage uses
`TRIAL_STEPS`), then `train_loop` for `--steps` steps, reporting every 5, with the peak reset
after every report: each report's peak is its own window's. The peak after the last report
(the final save) is kept apart. One JSON line per config; all of them in `--output`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lorapipe import runtime
from parallel import bench_train

bench = bench_train()


def one(
    shape: str, limit: float, blocks: int, share: float | None, trials: list[int], steps: int
) -> dict[str, Any]:
    import mlx.core as mx

    from lorapipe import memory
    from lorapipe.fast import checkpoint_blocks, fast_training
    from lorapipe.tracking import Recorder
    from lorapipe.trainer import TrainingRun, attach_adapters, train_loop

    class WindowPeaks(Recorder):
        def report(self, record: dict[str, Any]) -> None:
            super().report(record)
            mx.reset_peak_memory()  # the next report's peak is its window's own

    args = argparse.Namespace(batch=8, seq=512, dtype="bfloat16", report_every=5)
    batches = bench.make_data(args)
    params = bench.bench_params(args, steps)
    train = dataclasses.replace(params.train, memory_limit_gb=limit, grad_checkpoint=blocks)
    model = bench.mlx_model(shape, args.dtype)
    attach_adapters(model, params.lora)
    bench.free_mlx()
    recorder = WindowPeaks()
    default_steps, default_share = memory.TRIAL_STEPS, memory.ALLOCATOR_SHARE
    memory.ALLOCATOR_SHARE = share or default_share
    out: dict[str, Any] = {"shape": shape, "limit_gb": limit, "blocks": blocks, "trials": {}}
    out["allocator_share"] = memory.ALLOCATOR_SHARE
    with tempfile.TemporaryDirectory() as tmp:
        run = TrainingRun.fresh(model, train, params.seed, batches, steps, Path(tmp), recorder)
        with fast_training(model):  # as fit_memory runs it
            checkpoint_blocks(model, blocks)
            run.recompile()
            for count in trials:
                memory.TRIAL_STEPS = count
                tic = time.perf_counter()
                peak = memory.trial_peak(run, 0, limit)
                seconds = time.perf_counter() - tic
                out["trials"][count] = {"peak_gb": peak and peak / 1e9, "seconds": seconds}
        memory.TRIAL_STEPS = default_steps
        bench.free_mlx()
        tic = time.perf_counter()
        train_loop(run)
        out["train_seconds"] = time.perf_counter() - tic
        out["after_last_report_gb"] = mx.get_peak_memory() / 1e9  # the final save
    memory.ALLOCATOR_SHARE = default_share
    reports = [r for r in recorder.records if "train_loss" in r]
    out["window_peaks_gb"] = [round(r["peak_memory_gb"], 3) for r in reports]
    out["tokens_per_s"] = [round(r["tokens_per_second"]) for r in reports]
    bench.free_mlx()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--configs", default="1.7b:11.69:10;1.7b:13.5:6;1.7b:11.69:10:0.94")
    parser.add_argument("--trials", default="3,6,12", help="trial step counts, comma-separated")
    parser.add_argument("--steps", type=int, default=60, help="training steps after the trials")
    parser.add_argument("--output", default=str(bench.RESULTS / "trial.json"))
    args = parser.parse_args()
    runtime.setup()  # before mlx.core is imported: OpenBLAS on Linux CPU
    import mlx.core as mx

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    results = []
    for config in args.configs.split(";"):
        shape, limit, blocks, *share = config.split(":")
        counts = [int(c) for c in args.trials.split(",")]
        fraction = float(share[0]) if share else None
        results.append(one(shape, float(limit), int(blocks), fraction, counts, args.steps))
        print(json.dumps(results[-1]), flush=True)
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
