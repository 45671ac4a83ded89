"""Data-parallel LoRA training: tokens/s of 1 vs N processes at one global batch.

    python3 bench/parallel.py --processes 1,2 --shapes 135m,1.7b --output $OUT/parallel.json
    uv run python bench/parallel.py --processes 1,2 --shapes tiny --batch 4 --seq 64 --dtype \
        float32 --report-every 2    # CPU, ring over loopback: a smoke test, for the record

For each shape and process count, `lorapipe.trainer.train_loop` runs on a llama of that shape
with random weights (bench/train.py's shapes and LoRA: rank 8 on every linear layer) and the
same global batch, which the processes share as `lorapipe train` shares it: more than one
process runs under `mlx.launch` (`--backend`: nccl where MLX runs on CUDA, one GPU a process;
ring on CPUs). Windows of `--report-every` steps after `--warmup` dropped windows; tokens/s
counts the global batch; the table gives medians and the speed-up over one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def bench_train() -> Any:
    """bench/train.py, for its shapes, model builder, params and window arithmetic."""
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def worker(args: argparse.Namespace) -> None:
    """One process of a measurement (rank 0 writes the result)."""
    from lorapipe import runtime

    runtime.setup()
    import mlx.core as mx
    import numpy as np

    from lorapipe.batches import Example, make_batches
    from lorapipe.tracking import Recorder
    from lorapipe.trainer import TrainingRun, attach_adapters, train_loop

    bench = bench_train()
    world = mx.distributed.init()
    total = (args.warmup + args.windows) * args.report_every
    params = bench.bench_params(args, total)
    params = dataclasses.replace(
        params, lora=dataclasses.replace(params.lora, keys=None, dropout=0.0)
    )
    model = bench.mlx_model(args.shape, args.dtype, seed=0)
    attach_adapters(model, params.lora)
    rng = np.random.default_rng(0)
    rows = rng.integers(1, bench.COMMON["vocab_size"], (8 * args.batch, args.seq + 1))
    examples = [Example(row.tolist(), [0] + [1] * args.seq) for row in rows]
    batches = make_batches(examples, args.batch, rank=world.rank(), ranks=world.size())
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as tmp:
        run = TrainingRun.fresh(
            model, params.train, params.seed, batches, total, Path(tmp), recorder, world
        )
        train_loop(run)
    if world.rank() != 0:
        return
    marks = bench.report_marks(recorder)
    result = bench.windows_from_marks(marks, args.warmup, args.report_every, args.batch * args.seq)
    result.update(
        processes=world.size(),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        losses=[r["train_loss"] for r in recorder.train_records()],
    )
    Path(args.result).write_text(json.dumps(result))


def measure(args: argparse.Namespace, shape: str, processes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [
            sys.executable, __file__, "--worker", "--shape", shape, "--result", str(result),
            *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k in ("batch", "seq", "dtype", "report_every", "warmup", "windows")),
        ]  # fmt: skip
        if processes > 1:
            launcher = Path(sys.executable).with_name("mlx.launch")
            launch = [str(launcher) if launcher.exists() else "mlx.launch", "-n", str(processes)]
            if args.backend:
                launch += ["--backend", args.backend]
            command = [*launch, "--", *command]
        subprocess.run(command, check=True)
        if not result.is_file():
            sys.exit(f"bench/parallel.py: {shape} x {processes}: no result (a process failed)")
        return dict(json.loads(result.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="135m,1.7b")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--backend", default="", help="mlx.launch's backend; default: its own")
    parser.add_argument("--batch", type=int, default=8, help="the global batch")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--report-every", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    rows = ["| shape | processes | tokens/s (median) | speed-up | peak GB (rank 0) |",
            "|---|---|---|---|---|"]  # fmt: skip
    for shape in args.shapes.split(","):
        base = None
        for processes in map(int, args.processes.split(",")):
            result = measure(args, shape, processes)
            report["runs"][f"{shape} x{processes}"] = result
            median = statistics.median(result["tokens_per_s"])
            base = base or median
            rows.append(
                f"| {shape} | {processes} | {median:,.0f} | {median / base:.2f}x | "
                f"{result['peak_memory_gb']:.2f} |"
            )
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
