"""MLX on Linux CPU: its bundled reference BLAS vs lorapipe's OpenBLAS (lorapipe.runtime).

    uv run python bench/blas.py [--layers 30] [--steps 5] [--budget 120] [--repeats 10]

Each case runs in a fresh interpreter (a loaded BLAS cannot be unloaded), once with
LORAPIPE_BLAS=bundled and once with the default (auto), in the same environment, so thread
settings (OPENBLAS_NUM_THREADS, if set) are the same for both. Cases:

  matmul     float32 1024x1024 @ 1024x1024: median of --repeats after 3 warm-up runs
  lora step  one LoRA training step the way mlx-lm's trainer runs it (value_and_grad of its
             default_loss + Adam update, compiled): a llama-shaped model with SmolLM2-135M's
             dimensions and random weights, LoRA rank 8 on the last 8 blocks, batch 4 x 128
             tokens; median seconds per step after one warm-up step, over up to --steps
             steps (at least 2; no more once --budget seconds are spent: the reference BLAS
             needs ~70 s a step on 2 cores). The losses of both runs are compared too.

Prints the settings and a table (both columns and the ratio) and writes the raw numbers to
bench/results/blas-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorapipe import runtime
from lorapipe.io import atomic_write_json

RESULTS = Path(__file__).parent / "results" / "blas-cpu.json"
MODES = {"bundled": "bundled", "openblas": "auto"}  # column -> LORAPIPE_BLAS

# SmolLM2-135M's shape (the embedded default model), random weights.
MODEL_SHAPE: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}
LORA_LAYERS = 8
BATCH, SEQ_LEN = 4, 128
MATMUL_N = 1024
WARMUP_STEPS = 1  # the first step traces and compiles


# --- workers: run in a fresh interpreter with LORAPIPE_BLAS set --------------------------------


def _blas() -> str:
    return str(runtime.blas_info())


def matmul_case(repeats: int) -> dict[str, Any]:
    import mlx.core as mx

    a = mx.random.normal((MATMUL_N, MATMUL_N))
    b = mx.random.normal((MATMUL_N, MATMUL_N))
    mx.eval(a, b)
    for _ in range(3):
        mx.eval(a @ b)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "blas": _blas(),
        "seconds": seconds,
        "median_s": median,
        "gflops": 2 * MATMUL_N**3 / median / 1e9,
    }


def lora_step_case(layers: int, steps: int, budget_s: float) -> dict[str, Any]:
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(0)
    model = Model(ModelArgs(**MODEL_SHAPE, num_hidden_layers=layers))
    model.freeze()
    linear_to_lora_layers(model, LORA_LAYERS, LORA)
    optimizer = optim.Adam(learning_rate=1e-5)
    batch = mx.random.randint(0, MODEL_SHAPE["vocab_size"], (BATCH, SEQ_LEN + 1))
    lengths = mx.array([[0, SEQ_LEN]] * BATCH)  # (offset, length): every token is a target
    mx.eval(model.parameters(), batch)

    # As mlx_lm.tuner.trainer.train does it.
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch: mx.array, lengths: mx.array) -> mx.array:
        (loss, _), grad = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return loss

    # Up to `steps` timed steps, but stop after 2 once `budget_s` is spent: the reference BLAS
    # takes ~70 s a step on 2 cores, while OpenBLAS's steps vary more and need more samples.
    seconds: list[float] = []
    losses: list[float] = []
    for i in range(WARMUP_STEPS + steps):
        start = time.perf_counter()
        loss = step(batch, lengths)
        mx.eval(state, loss)
        if i >= WARMUP_STEPS:
            seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
        if len(seconds) >= 2 and sum(seconds) > budget_s:
            break
    median = statistics.median(seconds)
    return {
        "blas": _blas(),
        "seconds": seconds,
        "losses": losses,
        "median_s": median,
        "tokens_per_s": BATCH * SEQ_LEN / median,
    }


def worker(case: str, args: argparse.Namespace) -> None:
    runtime.setup()  # before mlx.core is imported
    if case == "matmul":
        result = matmul_case(args.repeats)
    else:
        result = lora_step_case(args.layers, args.steps, args.budget)
    print(json.dumps(result))


# --- driver -----------------------------------------------------------------------------------


def run_case(case: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "LORAPIPE_BLAS": MODES[mode]}
    command = [sys.executable, __file__, "--worker", case]
    command += ["--layers", str(args.layers), "--steps", str(args.steps)]
    command += ["--repeats", str(args.repeats), "--budget", str(args.budget)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench/blas.py: {case} with LORAPIPE_BLAS={MODES[mode]} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = models[0] if models else cpu
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    from importlib import metadata

    names = ("mlx", "mlx-cpu", "mlx-lm", "scipy-openblas32", "lorapipe")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def table(cases: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A Markdown table: one row per case, medians of both BLAS and the speed-up."""
    rows = [("case", "bundled reference BLAS", "lorapipe OpenBLAS", "speed-up")]
    for case, results in cases.items():
        bundled, openblas = results["bundled"], results["openblas"]
        if case == "matmul":
            name = f"matmul {MATMUL_N}x{MATMUL_N} float32, ms"
            cells = [
                f"{r['median_s'] * 1e3:.1f} ({r['gflops']:.0f} GFLOP/s)" for r in results.values()
            ]
        else:
            name = "LoRA step, s/step"
            cells = [
                f"{r['median_s']:.2f} ({r['tokens_per_s']:.1f} tokens/s, {len(r['seconds'])} steps)"
                for r in results.values()
            ]
        speedup = f"{bundled['median_s'] / openblas['median_s']:.1f}x"
        rows.append((name, cells[0], cells[1], speedup))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30, help="model blocks (SmolLM2-135M: 30)")
    parser.add_argument("--steps", type=int, default=5, help="timed LoRA steps per BLAS, at most")
    parser.add_argument(
        "--budget", type=float, default=120, help="stop timing LoRA steps (at 2 or more) past this"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed matmuls per BLAS")
    parser.add_argument("--cases", default="matmul,lora_step", help="comma-separated")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    parser.add_argument("--worker", choices=["matmul", "lora_step"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return

    settings = {
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "unset (all cores)"),
        "matmul": f"{MATMUL_N}x{MATMUL_N} float32, {args.repeats} timed after 3 warm-up",
        "lora_step": (
            f"llama {args.layers} blocks d={MODEL_SHAPE['hidden_size']} "
            f"ffn={MODEL_SHAPE['intermediate_size']} heads={MODEL_SHAPE['num_attention_heads']}/"
            f"{MODEL_SHAPE['num_key_value_heads']} vocab={MODEL_SHAPE['vocab_size']}, LoRA rank "
            f"{LORA['rank']} on the last {LORA_LAYERS} blocks, batch {BATCH}x{SEQ_LEN}, Adam, "
            f"compiled; after {WARMUP_STEPS} warm-up step, up to {args.steps} timed steps (at "
            f"least 2, no more once {args.budget:.0f} s are spent)"
        ),
    }
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": settings,
        "cases": {},
    }
    for key, value in [*report["machine"].items(), *report["versions"].items(), *settings.items()]:
        print(f"{key:<21} {value}")
    for case in args.cases.split(","):
        report["cases"][case] = {}
        for mode in MODES:
            print(f"running {case} with LORAPIPE_BLAS={MODES[mode]} ...", flush=True)
            result = run_case(case, mode, args)
            report["cases"][case][mode] = result
            print(f"  {result['blas']}")
    print()
    print(table(report["cases"]))
    if "lora_step" in report["cases"]:
        # Same seed, same data: the BLAS changes rounding only, not what is trained.
        pairs = zip(*(r["losses"] for r in report["cases"]["lora_step"].values()), strict=False)
        largest = max(abs(a - b) for a, b in pairs)
        print(f"LoRA losses, largest difference between the two BLAS: {largest:.2e}")

    atomic_write_json(args.output, report)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
