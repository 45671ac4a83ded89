"""LoRA training throughput: lorapipe's train stage vs mlx-lm's trainer (+ PyTorch/PEFT on GPU).

    uv run python bench/train.py                          # CPU: ~13 min on 2 cores
    uv run python bench/train.py --bundled-steps 0        # without the bundled-BLAS run (~5 min)
    uv run python bench/train.py --shapes tiny --batch 2 --seq 32 --repeats 1 --windows 2 \
        --report-every 2 --ablation-steps 2 --bundled-steps 0 --cases trainers,ablation  # smoke
    python3 bench/train.py --device gpu --frameworks torch --output $OUT/torch.json
    python3 bench/train.py --device gpu --frameworks mlx --output $OUT/mlx.json
    uv run python bench/train.py --merge a.json b.json --output bench/results/train-gpu.json
    uv run python bench/train.py --trainers lorapipe,lorapipe_one_lane --rows \
        RUN/data/sanitized/train.jsonl --rows-tokenizer RUN/models/base --report-every 10 \
        --warmup 1 --windows 4 --bundled-steps 0    # a finished run's rows (RUN: its folder)

Both MLX trainers run themselves, with the same model, batches, LoRA layers and optimizer:

  lorapipe  `lorapipe.trainer.train_loop` itself (compiled step, NaN guard, per-step seed,
            its reports), with `lorapipe.tracking.Recorder` noting when each report arrives.
  mlx-lm    `mlx_lm.tuner.trainer.train` itself (its compiled step, its `default_loss`), with
            a TrainingCallback noting when each report arrives, fed the same token arrays
            (lengths (0, T): the same target mask as lorapipe's) by an `iterate_batches`.

`--trainers` picks among lorapipe, lorapipe_no_clip (max_grad_norm off: mlx-lm's and PEFT's
arithmetic), lorapipe_mlx_exp (MLX's own exp on an x86-64 CPU, not lorapipe.cpu_exp's),
lorapipe_one_lane (one stream on a CPU: no lanes, `lorapipe.lanes`),
lorapipe_memory_limit (train.memory_limit_gb = MEMORY_LIMIT_GB[shape]),
lorapipe_matched (that limit and train.grad_checkpoint = CHECKPOINT_BLOCKS[shape]: the setting
that keeps to PyTorch's memory), mlx_lm (as mlx_lm.lora runs it: buffer cache emptied every
step) and mlx_lm_keep_cache.

Model: llama with SmolLM2-135M's (or -1.7B's) shape and random weights; LoRA from
params.yaml (rank 8, scale 2, no dropout, every linear layer of every block); the optimizer is
lorapipe's `make_optimizer` (AdamW, cosine schedule with warm-up) for both. Batches are full
rows of random tokens (no padding), so tokens/s = batch x seq / seconds counts every token the
model reads. A run is `--warmup` reports (compilation; dropped) then `--windows` reports of
`--report-every` steps each; a window's time is the wall-clock time between two reports, so it
includes everything either loop does per step. Runs alternate (lorapipe, mlx-lm, lorapipe, ...)
`--repeats` times; the tables give medians over all windows. Peak memory is MLX's
`mx.get_peak_memory()` (allocated, not cached) and PyTorch's `torch.cuda.max_memory_allocated()`.

Cases besides `trainers`:
  ablation  step variants rebuilt from train_loop's pieces (`VARIANTS`: "before" is the step as
            committed before the speed work, "after" the step now, the others switch one lever),
            each alone on the device: a compile window, then `--windows` windows of
            `--ablation-steps` steps; ms/step, the host's share, peak memory.
  profile   (GPU) the kernels of `--profile-steps` steps of each `--profile-variants` variant,
            through PyTorch's profiler (CUPTI sees MLX's kernels too), grouped by kind; the
            PyTorch cases get the same. Profiling slows the wall clock: compare kernel times.
  env       the ablation in a fresh process per MLX setting read at start-up (`--env-sweep`,
            e.g. "MLX_USE_CUDA_GRAPHS=0;MLX_MAX_OPS_PER_BUFFER=10").
  micro     the NaN guard alone and `mx.random.seed` alone.
`--bundled-steps` runs lorapipe with MLX's bundled BLAS (LORAPIPE_BLAS=bundled) in a subprocess.
On GPU, `--frameworks torch` times PyTorch + PEFT (`--torch-modes`: torch-eager, torch-compile)
and Unsloth (`unsloth`: its FastLanguageModel, fused LoRA kernels and chunked loss) on the same
shapes, one subprocess per case. bench/README.md has the GPU recipe and the results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorapipe import lanes, runtime
from lorapipe.io import atomic_write_json
from lorapipe.memory import OutOfMemory

if TYPE_CHECKING:
    from lorapipe.tracking import Recorder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PEAK_BF16_TFLOPS = 790.0  # measured on the H100/H200 machines (../shared/FACTS.md)

COMMON: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 49152,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
SHAPES: dict[str, dict[str, Any]] = {
    "135m": {  # SmolLM2-135M (the embedded default model)
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 100000.0,
    },
    "1.7b": {  # SmolLM2-1.7B
        "num_hidden_layers": 24,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rope_theta": 130000.0,
    },
    "tiny": {  # a smoke test of this script, seconds on a CPU
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
    },
}
# Every linear layer of a llama block: what LoRA with `keys: null` adapts (PEFT's names).
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DISTINCT_BATCHES = 8  # cycled; all the same shape, so no recompilation

DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {
        "shapes": "135m",
        "batch": 4,
        "seq": 128,
        "dtype": "float32",
        "report_every": 1,
        "warmup": 2,
        "windows": 6,
        "repeats": 3,
        "frameworks": "mlx",
        "cases": "trainers,ablation,micro",
        "ablation_steps": 1,
        "variants": "before;after;after, LoRA branch in float32;mlx-lm step",
        "profile_variants": "",
        "profile_steps": 0,
        "bundled_steps": 2,
    },
    "gpu": {
        "shapes": "135m,1.7b",
        "batch": 8,
        "seq": 512,
        "dtype": "bfloat16",
        "report_every": 10,
        "warmup": 2,
        "windows": 5,
        "repeats": 2,
        "frameworks": "mlx,torch",
        "cases": "trainers,ablation,profile",
        "ablation_steps": 10,
        "variants": "before;after;after, LoRA branch in float32;after, guard over every gradient;"
        "after, host waits every step;after, swiglu through autodiff;after, memory limit;"
        "after, gradient checkpointing;mlx-lm step;forward and backward;forward only",
        "profile_variants": "before;after",
        "profile_steps": 5,
        "bundled_steps": 0,
    },
}


# --- shared pieces ----------------------------------------------------------------------------


def bench_params(args: argparse.Namespace, total_steps: int) -> Any:
    """params.yaml's LoRA and optimizer, with this benchmark's batch and reporting intervals.

    No evaluation and no checkpoint inside the timed steps: validation reads 0 batches (its
    report at step 0 marks the start) and saves happen after the last report."""
    from lorapipe.params import load_params

    params = load_params(ROOT / "params.yaml")
    train = dataclasses.replace(
        params.train,
        iters=total_steps,
        epochs=None,
        batch_size=args.batch,
        grad_accumulation_steps=1,
        max_seq_length=args.seq + 1,
        steps_per_report=args.report_every,
        steps_per_eval=total_steps,
        val_batches=0,
        save_every=total_steps,
    )
    return dataclasses.replace(params, train=train)


def make_data(args: argparse.Namespace, seed: int = 0) -> Any:
    """lorapipe Batches of full rows of random tokens (never zeros): seq inputs + 1 each; or,
    with --rows, a sanitized split's rows as the train stage batches them (--seq unused)."""
    from lorapipe.batches import Example, load_split, make_batches

    if args.rows:
        from mlx_lm.utils import load_tokenizer

        tokenizer = load_tokenizer(Path(args.rows_tokenizer))
        return make_batches(load_split(Path(args.rows), tokenizer, True), args.batch)
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, COMMON["vocab_size"], (DISTINCT_BATCHES * args.batch, args.seq + 1))
    examples = [Example(row.tolist(), [0] + [1] * args.seq) for row in rows]
    batches = make_batches(examples, args.batch)
    width = batches.tokens[0].shape[1]
    if width != args.seq + 1:
        sys.exit(f"bench/train.py: --seq {args.seq} is not a multiple of 32 (rows of {width})")
    return batches


def mlx_model(shape: str, dtype: str, seed: int = 0) -> Any:
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    model = Model(ModelArgs(**COMMON, **SHAPES[shape]))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def count_params(model: Any) -> tuple[int, int]:
    from mlx.utils import tree_flatten

    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return int(total), int(trainable)


def free_mlx() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def windows_from_marks(marks: list[float], warmup: int, steps: int, tokens: int) -> dict[str, Any]:
    """Marks: the start, then one time per report. Drops the first `warmup` windows."""
    seconds = [b - a for a, b in itertools.pairwise(marks)]
    kept = seconds[warmup:]
    return {
        "window_seconds": seconds,
        "kept": kept,
        "tokens_per_s": [steps * tokens / s for s in kept],
        "warmup_s": sum(seconds[:warmup]),
    }


# --- the two MLX trainers, run whole ------------------------------------------------------------


def report_marks(recorder: Recorder) -> list[float]:
    """The window marks of a lorapipe.tracking.Recorder that train_loop reported to: the first
    record (the val report at step 0) marks the start; train reports end the windows."""
    return [
        t
        for i, (t, record) in enumerate(zip(recorder.times, recorder.records, strict=True))
        if i == 0 or "train_loss" in record
    ]


def run_lorapipe(
    args: argparse.Namespace,
    shape: str,
    batches: Any,
    seed: int,
    clip: bool = True,
    memory_limit: bool = False,
    checkpoint: bool = False,
    target_gb: float | None = None,
    mlx_exp: bool = False,
    one_lane: bool = False,
) -> dict[str, Any]:
    import mlx.core as mx

    from lorapipe import cpu_exp, lanes
    from lorapipe.fast import fast_training
    from lorapipe.memory import fit_memory
    from lorapipe.tracking import Recorder
    from lorapipe.trainer import TrainingRun, attach_adapters, train_loop

    total = (args.warmup + args.windows) * args.report_every
    params = bench_params(args, total)
    train = params.train
    if not clip:  # mlx-lm's trainer does not clip: the same arithmetic as it
        train = dataclasses.replace(train, max_grad_norm=None)
    if memory_limit:  # train.memory_limit_gb: the allocator limit while training
        limit = (MATCHED_LIMIT_GB if checkpoint else MEMORY_LIMIT_GB)[shape]
        train = dataclasses.replace(train, memory_limit_gb=limit, grad_checkpoint=0)
    if checkpoint:  # train.grad_checkpoint: blocks that recompute their activations
        blocks = args.checkpoint_blocks or CHECKPOINT_BLOCKS[shape]
        train = dataclasses.replace(train, grad_checkpoint=blocks)
    if target_gb is not None:  # train.memory_limit_gb alone: auto recomputes to meet it
        train = dataclasses.replace(train, memory_limit_gb=target_gb, grad_checkpoint="auto")
    model = mlx_model(shape, args.dtype, seed)
    attach_adapters(model, params.lora)
    free_mlx()
    recorder = Recorder()
    with (
        tempfile.TemporaryDirectory() as tmp,
        cpu_exp.mlx_exp() if mlx_exp else contextlib.nullcontext(),
    ):
        lane_count = 1 if one_lane else lanes.count(args.batch)  # as the train stage counts
        run = TrainingRun.fresh(
            model, train, params.seed, batches, total, Path(tmp), recorder, lanes=lane_count
        )
        started = time.perf_counter()
        with fast_training(model):  # as the stage does: the blocks that recompute, checked
            fit = fit_memory(run)
        fit_seconds = time.perf_counter() - started
        need = fit.need / 1e9
        log(f"    {fit.blocks} blocks recompute; a step needs {need:.2f} GB ({fit_seconds:.1f} s)")
        free_mlx()
        state = train_loop(run)
    marks = report_marks(recorder)
    result = windows_from_marks(marks, args.warmup, args.report_every, args.batch * args.seq)
    train_records = recorder.train_records()
    if args.rows:  # rows of many lengths: the tokens each window saw, as the train stage counts
        result["tokens_per_s"] = [r["tokens_per_second"] for r in train_records][args.warmup :]
    result.update(
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        losses=[r["train_loss"] for r in train_records],
        own_tokens_per_s=[r["tokens_per_second"] for r in train_records],
        steps=state.step,
        memory_limit_gb=train.memory_limit_gb,
        recomputed_blocks=fit.blocks,
        fit_need_gb=fit.need / 1e9,
        fit_seconds=fit_seconds,
        lanes=lane_count,
    )
    del model, run
    return result


def run_mlx_lm(
    args: argparse.Namespace, shape: str, batches: Any, seed: int, keep_cache: bool = False
) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, default_loss, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from lorapipe.batches import batch_order
    from lorapipe.trainer import adapter_config, make_optimizer

    total = (args.warmup + args.windows) * args.report_every
    params = bench_params(args, total)
    model = mlx_model(shape, args.dtype, seed)
    # As mlx_lm.lora does it (and lorapipe's attach_adapters): freeze, then adapters.
    model.freeze()
    blocks = len(model.layers)
    linear_to_lora_layers(model, blocks, adapter_config(params.lora, blocks)["lora_parameters"])
    optimizer = make_optimizer(params.train, total)
    marks: list[float] = []
    reports: list[dict[str, Any]] = []

    class Clock(TrainingCallback):
        def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
            marks.append(time.perf_counter())
            reports.append(dict(train_info))

    lengths = mx.array([[0, args.seq]] * args.batch)  # targets 1..seq: lorapipe's mask

    def same_batches(
        dataset: Any,
        batch_size: int,
        max_seq_length: int,
        loop: bool = False,
        seed: int | None = None,
        comm_group: Any = None,
    ) -> Any:
        # mlx-lm's iterate_batches would pad these 129-token rows to 161 (1 + 32 * ceil(129/32)):
        # hand it lorapipe's arrays instead, so both read exactly the same tokens.
        marks.append(time.perf_counter())
        for step in itertools.count():  # train_loop's order, so the losses can be compared
            epoch, position = divmod(step, len(batches))
            index = batch_order(params.seed, epoch, len(batches))[position]
            yield mx.array(batches.tokens[index]), lengths

    training_args = TrainingArgs(
        batch_size=args.batch,
        iters=total,
        val_batches=0,
        steps_per_report=args.report_every,
        steps_per_eval=total + 1,
        steps_per_save=total + 1,
        max_seq_length=args.seq + 1,
        # mlx_lm.lora's default, 0, empties MLX's buffer cache after every step.
        clear_cache_threshold=2**62 if keep_cache else 0,
    )
    free_mlx()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        training_args.adapter_file = str(Path(tmp) / "adapters.safetensors")
        train(
            model,
            optimizer,
            list(range(len(batches))),
            None,
            training_args,
            loss=default_loss,
            iterate_batches=same_batches,
            training_callback=Clock(),
        )
    result = windows_from_marks(marks, args.warmup, args.report_every, args.batch * args.seq)
    result.update(
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        losses=[r["train_loss"] for r in reports],
        own_tokens_per_s=[r["tokens_per_second"] for r in reports],
        steps=total,
    )
    del model, optimizer
    return result


def trainers_case(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    batches = make_data(args)
    known: dict[str, Any] = {
        "lorapipe": run_lorapipe,  # params.yaml's train settings, gradient clipping included
        "lorapipe_no_clip": partial(run_lorapipe, clip=False),
        # MLX's own exp on an x86-64 CPU (LORAPIPE_CPU_EXP=mlx), not lorapipe.cpu_exp's
        "lorapipe_mlx_exp": partial(run_lorapipe, mlx_exp=True),
        # one stream on a CPU, the BLAS's threads on each product (LORAPIPE_CPU_LANES=1)
        "lorapipe_one_lane": partial(run_lorapipe, one_lane=True),
        # train.memory_limit_gb set to MEMORY_LIMIT_GB[shape]
        "lorapipe_memory_limit": partial(run_lorapipe, memory_limit=True),
        # and train.grad_checkpoint set to CHECKPOINT_BLOCKS[shape]
        "lorapipe_matched": partial(run_lorapipe, memory_limit=True, checkpoint=True),
        "mlx_lm": run_mlx_lm,  # as mlx_lm.lora runs it: buffer cache emptied every step
        "mlx_lm_keep_cache": partial(run_mlx_lm, keep_cache=True),
    }
    for target in args.memory_targets.get(shape, []):  # lorapipe_target_3.12GB, ...
        known[f"lorapipe_target_{target}GB"] = partial(run_lorapipe, target_gb=target)
    names = args.trainers.split(",")
    if args.rows and any(not name.startswith("lorapipe") for name in names):
        sys.exit("bench/train.py: --rows runs lorapipe's trainers only")
    if "lorapipe_targets" in names:
        at = names.index("lorapipe_targets")
        names[at : at + 1] = [n for n in known if n.startswith("lorapipe_target_")]
    runners = {name: known[name] for name in names}
    runs: dict[str, list[dict[str, Any]]] = {name + args.trainer_suffix: [] for name in runners}
    unfit: dict[str, str] = {}
    for repeat in range(args.repeats):
        for name, runner in runners.items():
            if name + args.trainer_suffix in unfit:
                continue
            log(f"  {shape} {name} run {repeat + 1}/{args.repeats} ...")
            load = os.getloadavg()[0]  # other work on the machine: the noise to expect
            try:
                runs[name + args.trainer_suffix].append(runner(args, shape, batches, seed=0))
            except OutOfMemory as exc:  # a memory target no setting meets: say so, go on
                log(f"    {exc}")
                unfit[name + args.trainer_suffix] = str(exc)
                del runs[name + args.trainer_suffix]
                free_mlx()
                continue
            last = runs[name + args.trainer_suffix][-1]
            last["load_before"], last["load_after"] = load, os.getloadavg()[0]
            log(
                f"    {statistics.median(last['tokens_per_s']):,.1f} tokens/s "
                f"(windows {', '.join(f'{t:,.0f}' for t in last['tokens_per_s'])}), "
                f"first losses {[round(x, 4) for x in last['losses'][:3]]}"
            )
            free_mlx()
    from lorapipe.trainer import attach_adapters

    model = mlx_model(shape, args.dtype)
    attach_adapters(model, bench_params(args, 1).lora)
    total, trainable = count_params(model)
    result: dict[str, Any] = {"params": total, "trainable": trainable, "runs": runs}
    if unfit:
        result["unfit"] = unfit
    # Same weights, batches and order: the losses agree up to rounding (bf16 drifts faster).
    ours, theirs = (n + args.trainer_suffix for n in ("lorapipe_no_clip", "mlx_lm_keep_cache"))
    if ours in runs and theirs in runs:
        first = [r["losses"] for r in (runs[ours][0], runs[theirs][0])]
        gaps = [abs(a - b) for a, b in zip(*first, strict=False)]
        relative = [abs(a - b) / abs(b) for a, b in zip(*first, strict=False)]
        log(
            f"    loss difference, {ours} vs {theirs} run 1 (the same maths): first report "
            f"{gaps[0]:.2e}, largest {max(gaps):.2e} ({max(relative):.2%})"
        )
        result.update(
            loss_difference_first=gaps[0],
            loss_difference_largest=max(gaps),
            loss_difference_largest_relative=max(relative),
        )
    summarize(result)
    return result


def summarize(trainers: dict[str, Any]) -> None:
    """Medians over every kept window of every run of each trainer."""
    trainers["summary"] = {}
    for name, results in trainers["runs"].items():
        tps = [t for r in results for t in r["tokens_per_s"]]
        trainers["summary"][name] = {
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_min": min(tps),
            "tokens_per_s_max": max(tps),
            "per_run_medians": [statistics.median(r["tokens_per_s"]) for r in results],
            "runs": len(results),
            "peak_memory_gb": max(r["peak_memory_gb"] for r in results),
            "mfu": mfu(trainers["params"], statistics.median(tps)),
        }


def memory_targets(text: str) -> dict[str, list[float]]:
    """'135m=3.12,4.42;1.7b=11.69' -> {'135m': [3.12, 4.42], '1.7b': [11.69]}"""
    pairs = (part.split("=") for part in text.split(";") if part)
    return {shape: [float(v) for v in values.split(",")] for shape, values in pairs}


def mfu(params: int, tokens_per_s: float) -> float:
    """LoRA: ~4N FLOPs a token (forward 2N + input gradients 2N; attention scores left out)."""
    return 4 * params * tokens_per_s / (PEAK_BF16_TFLOPS * 1e12)


# --- train_loop's step, rebuilt from its pieces: where the time goes -------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """One way to run a training step (the levers of bench/README.md, each on or off)."""

    guard: str | None = "norm"  # NaN guard: "every" gradient's isfinite, the clip "norm", None
    clip: bool = True  # params.yaml's max_grad_norm
    lora: str = "compute"  # "fp32": LoRALinear as is; "compute": fast.lora_in_compute_dtype
    pipelined: bool = True  # queue step i+1 before reading step i's loss (no per-step round trip)
    checkpoint: bool = False  # gradient checkpointing of every block (recompute in the backward)
    memory_limit: bool = False  # mx.set_memory_limit(MEMORY_LIMIT_GB[shape]) while it runs
    swiglu: bool = True  # fast.swiglu_keeping_inputs; False: mlx-lm's swiglu, autodiff's backward
    vector: bool = True  # fast.OneVector: the optimizer over one vector; False: array by array
    chunked: bool = True  # loss.chunked_cross_entropy over LOSS_CHUNK positions; False: all logits
    mlp: bool = True  # fast.swiglu_mlps: down_proj's backward recomputes swiglu's output
    cpu_exp: bool = True  # lorapipe.cpu_exp: exp as a power of two (float32, x86-64 CPU)


# "before": train_loop as committed before the speed work (isfinite over every gradient,
# float32 LoRA branch, mx.eval + three .item() after every step); "after": train_loop now.
# The others switch one lever of "after" off (or on, for checkpointing).
VARIANTS: dict[str, Step] = {
    "before": Step(
        guard="every",
        lora="fp32",
        pipelined=False,
        swiglu=False,
        vector=False,
        chunked=False,
        mlp=False,
        cpu_exp=False,
    ),
    "after": Step(),
    "after, optimizer array by array": Step(vector=False),
    "after, LoRA branch in float32": Step(lora="fp32"),
    "after, swiglu through autodiff": Step(swiglu=False),
    "after, guard over every gradient": Step(guard="every"),
    "after, host waits every step": Step(pipelined=False),
    "after, no guard and no clipping": Step(guard=None, clip=False),
    "after, gradient checkpointing": Step(checkpoint=True),
    "after, memory limit": Step(memory_limit=True),
    "after, whole logits": Step(chunked=False),
    "after, MLP keeps swiglu's output": Step(mlp=False),
    "after, MLX's exp": Step(cpu_exp=False),
}
# The limit MLX's allocator is asked to keep to (it then waits for queued work to finish
# before allocating more): PyTorch + PEFT + torch.compile's peak on the H200 (2026-11-21).
MEMORY_LIMIT_GB = {"135m": 4.4, "1.7b": 15.7, "tiny": 0.05}
# Blocks whose activations are recomputed (train.grad_checkpoint) so that, with that limit, the
# step needs no more than PyTorch: ~0.2 GB a block at 1.7B (of 24), ~0.02 GB at 135M (of 30).
CHECKPOINT_BLOCKS = {"135m": 2, "1.7b": 4, "tiny": 1}
# MLX fills its allocator up to the limit before it waits: below PyTorch's peak, with those blocks.
MATCHED_LIMIT_GB = {"135m": 4.4, "1.7b": 15.0, "tiny": 0.05}
# Also known to the ablation: "mlx-lm step", "mlx-lm step, cache cleared" (its compiled step as
# its trainer runs it), "forward only", "forward and backward" (no update, no guard).


def build_step(
    args: argparse.Namespace, shape: str, kind: str, batches: Any, stack: contextlib.ExitStack
) -> Any:
    """A model and a function run(first, n) -> host seconds that runs steps first..first+n-1
    of `kind` and returns with nothing in flight. What the variant changes (LoRA class, memory
    limit) stays in force until `stack` closes."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import default_loss

    from lorapipe import cpu_exp
    from lorapipe.fast import (
        ArrayByArray,
        OneVector,
        checkpoint_blocks,
        fast_training,
        lora_in_compute_dtype,
        swiglu_keeping_inputs,
        swiglu_mlps,
    )
    from lorapipe.loss import masked_loss
    from lorapipe.trainer import attach_adapters, make_optimizer, step_seed

    params = bench_params(args, 1000)
    model = mlx_model(shape, args.dtype)
    attach_adapters(model, params.lora)
    optimizer = make_optimizer(params.train, 1000)
    state = [model.state, optimizer.state, mx.random.state]
    lengths = mx.array([[0, args.seq]] * args.batch)

    def arrays(i: int) -> tuple[Any, Any]:
        return (
            mx.array(batches.tokens[i % len(batches)]),
            mx.array(batches.targets[i % len(batches)]),
        )

    if kind in ("forward only", "forward and backward"):
        backward = kind == "forward and backward"
        loss_and_grad = nn.value_and_grad(model, masked_loss)
        stack.enter_context(fast_training(model))

        @mx.compile
        def forward(tokens: Any, targets: Any) -> Any:
            if backward:
                return loss_and_grad(model, tokens, targets)
            return masked_loss(model, tokens, targets)

        def run_forward(first: int, n: int) -> float:
            host = 0.0
            for i in range(first, first + n):
                tic = time.perf_counter()
                out = forward(*arrays(i))
                mx.async_eval(out)
                host += time.perf_counter() - tic
                mx.eval(out)
            return host

        return model, run_forward

    if kind.startswith("mlx-lm step"):
        clear = kind == "mlx-lm step, cache cleared"
        mlx_lm_grad = nn.value_and_grad(model, default_loss)

        @partial(mx.compile, inputs=state, outputs=state)
        def mlx_lm_step(batch: Any, lengths: Any) -> Any:
            (loss, toks), grad = mlx_lm_grad(model, batch, lengths)
            optimizer.update(model, grad)
            return loss, toks

        def run_mlx_lm(first: int, n: int) -> float:
            host = 0.0
            for i in range(first, first + n):
                tic = time.perf_counter()
                loss, toks = mlx_lm_step(arrays(i)[0], lengths)
                mx.async_eval(state, loss, toks)
                host += time.perf_counter() - tic
                mx.eval(state, loss, toks)
                if clear:  # what mlx-lm's trainer does after every step by default
                    mx.clear_cache()
                float(loss.item())
            return host

        return model, run_mlx_lm

    v = VARIANTS[kind]
    # first, as fast_training enters it
    stack.enter_context(cpu_exp.installed() if v.cpu_exp else cpu_exp.mlx_exp())
    if not v.chunked:
        from lorapipe import loss

        chunk, loss.LOSS_CHUNK = loss.LOSS_CHUNK, 10**9  # read when the step is traced
        stack.callback(setattr, loss, "LOSS_CHUNK", chunk)
    if v.lora == "compute":
        stack.enter_context(lora_in_compute_dtype(model))
    if v.swiglu:
        stack.enter_context(swiglu_keeping_inputs())
    if v.mlp and v.lora == "compute":  # needs the bfloat16 LoRA layers
        stack.enter_context(swiglu_mlps(model))
    if v.memory_limit:
        previous = mx.set_memory_limit(int(MEMORY_LIMIT_GB[shape] * 1e9))
        stack.callback(mx.set_memory_limit, previous)
    if v.checkpoint:
        checkpoint_blocks(model, -1)
    max_norm = params.train.max_grad_norm or 1.0
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    layout = (OneVector if v.vector else ArrayByArray)(model, optimizer)
    state[:] = [model.state, optimizer.state, mx.random.state, layout.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens: Any, targets: Any) -> Any:  # train_loop's step, accumulate = 1
        (loss, count), grad = loss_and_grad(model, tokens, targets)
        finite = mx.array(True)
        if v.guard == "every":
            finite = mx.stack([mx.isfinite(g).all() for _, g in tree_flatten(grad)]).all()
        grad = layout.gradient(grad)
        if v.guard == "norm" or (v.clip and v.guard is None):
            norm_sq = layout.squared_norm(grad)
            if v.guard == "norm":
                finite = mx.isfinite(norm_sq)
        if v.clip:
            if v.guard == "every":  # the committed step: mlx's own clip_grad_norm
                import mlx.optimizers as optim

                grad, _ = optim.clip_grad_norm(grad, max_norm)
            else:
                grad = layout.scale(grad, mx.minimum(max_norm / (mx.sqrt(norm_sq) + 1e-6), 1.0))
        layout.update(grad)
        return loss, count, finite

    def launch(i: int) -> tuple[Any, ...]:
        mx.random.seed(step_seed(42, i))
        out = step(*arrays(i))
        mx.async_eval(state, *out)
        return tuple(out)

    def finish(out: tuple[Any, ...]) -> None:
        loss, count, finite = out
        _ = (float(loss.item()), bool(finite.item()), int(count.item()))

    def run_lorapipe(first: int, n: int) -> float:
        host = 0.0
        pending = None
        for i in range(first, first + n):
            tic = time.perf_counter()
            out = launch(i)
            host += time.perf_counter() - tic
            if not v.pipelined:
                mx.eval(state)
                finish(out)
                continue
            if pending is not None:
                finish(pending)
            pending = out
        if pending is not None:
            finish(pending)
            mx.eval(state)
        return host

    return model, run_lorapipe


def ablation_case(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    """Each variant in turn, alone on the device: build, one window to compile (dropped), then
    `--windows` windows of `--ablation-steps` steps. Peak memory is the variant's own (its
    model, optimizer and steps: nothing else is alive)."""
    import mlx.core as mx

    batches = make_data(args)
    tokens = args.batch * args.seq
    result: dict[str, Any] = {}
    for kind in args.variants.split(";"):
        free_mlx()
        walls, hosts = [], []
        with contextlib.ExitStack() as stack:
            model, run = build_step(args, shape, kind, batches, stack)
            run(0, args.ablation_steps)
            mx.reset_peak_memory()
            for w in range(args.windows):
                tic = time.perf_counter()
                hosts.append(run((w + 1) * args.ablation_steps, args.ablation_steps))
                walls.append(time.perf_counter() - tic)
            peak = mx.get_peak_memory() / 1e9
            del model, run
        ms = [s / args.ablation_steps * 1e3 for s in walls]
        host_ms = [s / args.ablation_steps * 1e3 for s in hosts]
        result[kind] = {
            "ms_per_step": ms,
            "host_ms_per_step": host_ms,
            "median_ms": statistics.median(ms),
            "host_median_ms": statistics.median(host_ms),
            "tokens_per_s": tokens / statistics.median(ms) * 1e3,
            "peak_memory_gb": peak,
        }
        if kind in VARIANTS and VARIANTS[kind].memory_limit:
            result[kind]["memory_limit_gb"] = MEMORY_LIMIT_GB[shape]
        r = result[kind]
        log(
            f"    {kind:<36} {r['median_ms']:8.2f} ms/step (host {r['host_median_ms']:7.2f})"
            f"  {r['tokens_per_s']:9,.0f} tokens/s  {r['peak_memory_gb']:6.2f} GB"
        )
    return result


def ablation_worker(args: argparse.Namespace) -> None:
    print(json.dumps(ablation_case(args, args.shapes)))


def env_case(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    """MLX's CUDA settings, read once at start-up: the ablation's variants in a fresh process per
    setting ("default", or K=V pairs joined by ',')."""
    out: dict[str, Any] = {}
    for setting in args.env_sweep.split(";"):
        env = dict(os.environ)
        if setting != "default":
            env.update(kv.split("=", 1) for kv in setting.split(","))
        log(f"  {shape} with {setting} ...")
        command = [sys.executable, __file__, "--worker", "ablation", "--device", args.device]
        command += ["--shapes", shape, "--variants", args.env_variants]
        command += ["--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype]
        command += ["--windows", str(args.windows), "--ablation-steps", str(args.ablation_steps)]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            log(f"    failed:\n{done.stderr[-3000:]}")
            out[setting] = {"error": done.stderr[-3000:]}
            continue
        sys.stderr.write("".join(done.stderr.splitlines(keepends=True)[-10:]))
        out[setting] = json.loads(done.stdout.splitlines()[-1])
    return out


# --- kernels: where the device time goes (GPU; CUPTI through PyTorch's profiler) ---------------

KERNEL_GROUPS = (  # first match wins; names as cuBLAS, cuDNN, MLX and Triton give them
    ("attention (fused SDPA)", ("flash", "fmha", "sdpa", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "sm90_", "sm80_", "splitk")),
    ("cross-entropy", ("cross_entropy", "crossentropy", "nll", "log_softmax", "logsumexp")),
    ("reduction", ("reduce", "sum", "all_", "norm_")),
    ("rms norm / rope", ("rms", "rope")),
    ("gather / scatter", ("gather", "scatter", "index", "embedding", "take")),
    ("copy / cast", ("copy", "cast", "convert", "concat", "fill")),
)


def kernel_summary(prof: Any, steps: int) -> dict[str, Any]:
    """Per-step kernel time from a torch.profiler run: groups, and the top kernels."""
    kernels = []
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            kernels.append((e.name, float(e.time_range.elapsed_us())))
    by_name: dict[str, list[float]] = {}
    for name, us in kernels:
        by_name.setdefault(name, []).append(us)
    groups: dict[str, float] = {}
    for name, times in by_name.items():
        low = name.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + sum(times) / 1e3 / steps
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {
        "kernels_per_step": len(kernels) / steps,
        "kernel_ms_per_step": sum(us for _, us in kernels) / 1e3 / steps,
        "groups_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top": [
            {
                "name": name[:160],
                "calls_per_step": len(t) / steps,
                "ms_per_step": sum(t) / 1e3 / steps,
            }
            for name, t in top
        ],
    }


def profile_worker(args: argparse.Namespace) -> None:
    """GPU: MLX steps of each variant under PyTorch's profiler (CUPTI records every kernel of the
    process, MLX's included). Prints one JSON line."""
    import mlx.core as mx
    import torch
    from torch.profiler import ProfilerActivity, profile

    shape, steps = args.shapes, args.ablation_steps
    batches = make_data(args)
    out: dict[str, Any] = {}
    for kind in args.variants.split(";"):
        free_mlx()
        with contextlib.ExitStack() as stack:
            model, run = build_step(args, shape, kind, batches, stack)
            run(0, 3)
            torch.cuda.synchronize()
            tic = time.perf_counter()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run(3, steps)
                mx.synchronize()
            wall = time.perf_counter() - tic
            del model, run
        out[kind] = {"wall_ms_per_step": wall / steps * 1e3, **kernel_summary(prof, steps)}
    print(json.dumps(out))


def profile_case(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", "profile", "--device", args.device]
    command += ["--shapes", shape, "--variants", args.profile_variants]
    command += ["--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype]
    command += ["--ablation-steps", str(args.profile_steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"    profile failed:\n{done.stderr[-3000:]}")
        return {"error": done.stderr[-3000:]}
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    for kind, r in result.items():
        groups = ", ".join(f"{g} {ms:.1f}" for g, ms in r["groups_ms_per_step"].items())
        log(
            f"    {kind}: wall {r['wall_ms_per_step']:.1f} ms/step, kernels "
            f"{r['kernel_ms_per_step']:.1f} ms in {r['kernels_per_step']:.0f} launches ({groups})"
        )
    return result


def micro_case(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    """The NaN guard alone (over a gradient-shaped tree) and mx.random.seed alone."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from lorapipe.trainer import attach_adapters, step_seed

    model = mlx_model(shape, args.dtype)
    attach_adapters(model, bench_params(args, 1).lora)
    grads = [
        mx.random.normal(v.shape).astype(v.dtype)
        for _, v in tree_flatten(model.trainable_parameters())
    ]
    mx.eval(grads)

    @mx.compile
    def guard(*g: Any) -> Any:
        return mx.stack([mx.isfinite(x).all() for x in g]).all()

    def timed(fn: Any, repeats: int, inner: int) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            tic = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - tic) / inner)
        return statistics.median(samples)

    def seed_step() -> None:
        mx.random.seed(step_seed(42, 7))
        mx.eval(mx.random.state)

    result = {
        "gradient_arrays": len(grads),
        "isfinite_guard_ms": timed(lambda: mx.eval(guard(*grads)), 7, 20) * 1e3,
        "random_seed_us": timed(seed_step, 7, 200) * 1e6,
        "item_us": timed(lambda: float(grads[0].sum().item()), 7, 200) * 1e6,
    }
    log(
        f"    NaN guard over {len(grads)} arrays: {result['isfinite_guard_ms']:.3f} ms; "
        f"mx.random.seed + eval: {result['random_seed_us']:.1f} us; "
        f"small reduction + .item(): {result['item_us']:.1f} us"
    )
    return result


# --- MLX's bundled BLAS (CPU): lorapipe's loop, a couple of steps -------------------------------


def bundled_case(args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "LORAPIPE_BLAS": "bundled"}
    command = [
        sys.executable,
        __file__,
        "--worker",
        "bundled",
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--dtype",
        args.dtype,
        "--warmup",
        "1",
        "--windows",
        str(args.bundled_steps),
        "--report-every",
        "1",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench/train.py: the LORAPIPE_BLAS=bundled worker failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def bundled_worker(args: argparse.Namespace) -> None:
    shape = args.shapes.split(",")[0]
    result = run_lorapipe(args, shape, make_data(args), seed=0)
    result["blas"] = str(runtime.blas_info())
    result["median_tokens_per_s"] = statistics.median(result["tokens_per_s"])
    print(json.dumps(result))


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def torch_llama(args: argparse.Namespace, device: str, dtype: Any) -> Any:
    """The random-init llama of `args.shapes` (torch seed 0) that every PyTorch worker trains."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    fields = {k: v for k, v in {**COMMON, **SHAPES[args.shapes]}.items() if k != "model_type"}
    config = LlamaConfig(**fields, max_position_embeddings=max(2048, args.seq + 1))
    config._attn_implementation = "sdpa"  # what MLX's fast attention does: fused SDPA
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype)


def torch_batches(args: argparse.Namespace, device: str) -> tuple[list[Any], Any]:
    """DISTINCT_BATCHES rows of seq + 1 random tokens (never zeros) and the target mask (every
    target learned). Their own generator: the same batches in every PyTorch worker, whatever its
    model's set-up drew from torch's global one."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq + 1)
    data = [
        torch.randint(1, COMMON["vocab_size"], shape, generator=generator).to(device)
        for _ in range(DISTINCT_BATCHES)
    ]
    return data, torch.ones(args.batch, args.seq, device=device)


def torch_train(args: argparse.Namespace, model: Any, loss_fn: Any, device: str) -> dict[str, Any]:
    """The timed loop of every PyTorch worker: AdamW (lr 2e-3) on the trainable parameters,
    `(warmup + windows) * report_every` steps of `loss_fn(tokens, mask)` on torch_batches, a
    loss.item() per step; then --profile-steps more under the profiler. The result's fields."""
    import torch

    cuda = device == "cuda"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.0)
    data, mask = torch_batches(args, device)

    def step(i: int) -> float:
        loss = loss_fn(data[i % DISTINCT_BATCHES], mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.item())  # a sync per step, as the MLX trainers' mx.eval

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    marks, losses = [time.perf_counter()], []
    for i in range((args.warmup + args.windows) * args.report_every):
        losses.append(step(i))
        if (i + 1) % args.report_every == 0:
            marks.append(time.perf_counter())
    result = windows_from_marks(marks, args.warmup, args.report_every, args.batch * args.seq)
    # PyTorch's CUDA allocator's peak; on the CPU the process's peak RSS (MLX's figure on the
    # CPU is its allocator's: the two are not the same measure there).
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else peak_rss_gb()
    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        tic = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(args.profile_steps):
                step(i)
        wall = (time.perf_counter() - tic) / args.profile_steps * 1e3
        result["profile"] = {"wall_ms_per_step": wall, **kernel_summary(prof, args.profile_steps)}
    result.update(
        peak_memory_gb=peak,
        losses=losses[:: args.report_every],
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in trainable),
        adapter_dtype=str(trainable[0].dtype),
    )
    return result


def torch_worker(args: argparse.Namespace) -> None:
    """One case in a fresh process: eager or torch.compile, one shape. Prints JSON."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    cuda = args.device == "gpu"
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", getattr(torch, args.dtype))
    lora = bench_params(args, 1).lora
    model = get_peft_model(
        torch_llama(args, device, dtype),
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.scale * lora.rank,
            lora_dropout=lora.dropout,
            target_modules=list(LINEAR),
            task_type="CAUSAL_LM",
        ),
    )
    model.train()

    def loss_fn(tokens: Any, mask: Any) -> Any:  # as masked_loss: bf16 logits, fp32 sum
        logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
        ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return (ce.float() * mask.flatten()).sum() / mask.sum()

    compiled = args.worker == "torch-compile"
    result = torch_train(args, model, torch.compile(loss_fn) if compiled else loss_fn, device)
    result["attention"] = model.config._attn_implementation
    print(json.dumps(result))


def unsloth_tokenizer(folder: Path) -> None:
    """A WordLevel tokenizer of COMMON["vocab_size"] tokens, saved beside the model: Unsloth's
    loader wants one, and this one needs no network. Its special tokens lie inside the vocab
    and the pad token is not the EOS, so Unsloth adds no token (no embedding resize)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0-3
    words = specials + [f"t{i}" for i in range(len(specials), COMMON["vocab_size"])]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=words[0],
        bos_token=words[1],  # LlamaConfig's default bos_token_id 1
        eos_token=words[2],  # and eos_token_id 2
        pad_token=words[3],
        model_max_length=4096,
    )
    tokenizer.save_pretrained(folder)


def unsloth_loss_check(
    args: argparse.Namespace, model: Any, loss_fn: Any, device: str
) -> dict[str, Any]:
    """After the timed run: Unsloth's fused loss and masked_loss's arithmetic on the logits
    Unsloth's forward returns without labels, on the first batch: they must agree."""
    import torch
    import torch.nn.functional as F

    data, mask = torch_batches(args, device)
    tokens = data[0]
    with torch.no_grad():
        fused = float(loss_fn(tokens, mask).item())
        logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
        ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        reference = float(((ce.float() * mask.flatten()).sum() / mask.sum()).item())
    if abs(fused - reference) > 1e-2 * max(1.0, abs(reference)):
        log(f"    unsloth: its loss {fused:.4f} is not masked_loss's {reference:.4f}")
    return {"loss_check": {"unsloth": fused, "masked_loss": reference}}


def unsloth_worker(args: argparse.Namespace) -> None:
    """Unsloth (FastLanguageModel) on the GPU, one shape, in a fresh process. Prints JSON.

    The same random-init model as torch_worker's, saved and loaded back through Unsloth's
    loader in bf16 (no quantization), LoRA from params.yaml on the same layers without
    gradient checkpointing, the same batches, optimizer and timed loop (torch_train)."""
    with tempfile.TemporaryDirectory(prefix="bench-unsloth-") as tmp:
        # Offline (Unsloth's usage statistics download too), and its compiled modules in tmp,
        # not in the current directory (a repository checkout). Unsloth patches transformers,
        # peft and trl when it is imported, so it comes before them; and only here: the rest of
        # this script runs without it.
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS"):
            os.environ.setdefault(key, "1")
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(Path(tmp) / "compiled"))
        import torch
        import unsloth
        from unsloth import FastLanguageModel
        from unsloth.models import _utils as unsloth_utils

        device = "cuda" if args.device == "gpu" else "cpu"
        lora = bench_params(args, 1).lora
        folder = Path(tmp) / "model"
        model = torch_llama(args, device, torch.bfloat16)
        model.config.pad_token_id = 3  # unsloth_tokenizer's pad token
        model.save_pretrained(folder)
        unsloth_tokenizer(folder)
        del model
        model, _ = FastLanguageModel.from_pretrained(
            str(folder),
            max_seq_length=args.seq + 1,
            dtype=torch.bfloat16,
            load_in_4bit=False,
            load_in_8bit=False,
            full_finetuning=False,
            use_gradient_checkpointing=False,  # its default, "unsloth", arms checkpointing
        )
        # Unsloth's fused LoRA kernels need dropout 0 and no bias; lorapipe's default dropout
        # (params.yaml lora.dropout) is 0.0 too, as torch_worker's PEFT LoRA has it.
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.rank,
            lora_alpha=lora.scale * lora.rank,
            lora_dropout=0,
            target_modules=list(LINEAR),
            use_gradient_checkpointing=False,  # as the team measured Unsloth before
            bias="none",
            random_state=0,
        )
        model.train()

        def loss_fn(tokens: Any, mask: Any) -> Any:
            # Unsloth's own loss: given labels, its LlamaForCausalLM forward never makes the
            # logits but runs unsloth_fused_ce_loss (lm_head and cross-entropy in chunks, fp32),
            # the mean over the labels that are not -100: the mask's positions, as masked_loss.
            # It reads shift_labels when given (labels only select that branch): targets already
            # shifted (inputs tokens[:, :-1], targets tokens[:, 1:], as torch_worker's), so it
            # does not shift them again. unsloth_loss_check compares it with masked_loss's.
            targets = tokens[:, 1:].masked_fill(mask == 0, -100)
            inputs = tokens[:, :-1]
            return model(
                input_ids=inputs, labels=targets, shift_labels=targets, use_cache=False
            ).loss

        result = torch_train(args, model, loss_fn, device)
        result.update(unsloth_loss_check(args, model, loss_fn, device))
        # (names that moved between Unsloth releases: absent means not in use)
        flash = getattr(unsloth_utils, "HAS_FLASH_ATTENTION", False)
        xformers = getattr(unsloth_utils, "HAS_XFORMERS", False)
        result.update(
            attention="flash_attention_2" if flash else "xformers" if xformers else "sdpa",
            unsloth_version=unsloth.__version__,
            weights_dtype=str(model.get_input_embeddings().weight.dtype),  # as loaded
            gradient_checkpointing=any(
                getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
            ),
        )
    print(json.dumps(result))


def torch_case(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in args.torch_modes.split(","):
        log(f"  {shape} {mode} ...")
        command = [
            args.torch_python or sys.executable,
            __file__,
            "--worker",
            mode,
            "--device",
            args.device,
            "--shapes",
            shape,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--warmup",
            str(args.warmup),
            "--windows",
            str(args.windows),
            "--report-every",
            str(args.report_every),
            "--profile-steps",
            str(args.profile_steps if "profile" in args.cases else 0),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"    failed:\n{done.stderr[-3000:]}")
            out[mode] = {"error": done.stderr[-3000:]}
            continue
        # The worker's result is its last JSON line (Unsloth prints its banners to stdout too).
        r = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])
        r["tokens_per_s_median"] = statistics.median(r["tokens_per_s"])
        r["mfu"] = mfu(r["params"], r["tokens_per_s_median"])
        out[mode] = r
        log(
            f"    {r['tokens_per_s_median']:,.0f} tokens/s, {r['peak_memory_gb']:.1f} GB, "
            f"warm-up {r['warmup_s']:.1f} s"
        )
        if "profile" in r:
            p = r["profile"]
            groups = ", ".join(f"{g} {ms:.1f}" for g, ms in p["groups_ms_per_step"].items())
            log(
                f"    profile: wall {p['wall_ms_per_step']:.1f} ms/step, kernels "
                f"{p['kernel_ms_per_step']:.1f} ms in {p['kernels_per_step']:.0f} launches "
                f"({groups})"
            )
    return out


# --- report -------------------------------------------------------------------------------------


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def machine(device: str) -> dict[str, Any]:
    cpu = platform.machine()
    with contextlib.suppress(OSError):
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device == "gpu":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version",
                "--format=csv,noheader",
            ]
            info["gpu"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return info


def versions() -> dict[str, str]:
    from importlib import metadata

    names = (
        "mlx",
        "mlx-cpu",
        "mlx-cuda-13",
        "mlx-lm",
        "scipy-openblas32",
        "torch",
        "transformers",
        "peft",
        "numpy",
    )
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def summary_table(report: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [
        (
            "shape",
            "trainer",
            "tokens/s (min-max)",
            "ms/step",
            "peak GB",
            "MFU",
            "tokens/s vs torch.compile",
            "memory vs torch.compile",
            "tokens/s vs mlx-lm",
        )
    ]
    tokens = report["settings"]["batch"] * report["settings"]["seq"]
    for shape in (s for s in SHAPES if s in report["shapes"]):
        cases = report["shapes"][shape]
        entries: list[tuple[str, float, str, float, int]] = []
        trainers = cases.get("trainers", {})
        for name, s in trainers.get("summary", {}).items():
            spread = (
                f"{s['tokens_per_s']:,.0f} ({s['tokens_per_s_min']:,.0f}-"
                f"{s['tokens_per_s_max']:,.0f})"
            )
            entries.append(
                (name, s["tokens_per_s"], spread, s["peak_memory_gb"], trainers["params"])
            )
        for mode in ("torch-eager", "torch-compile", "unsloth"):
            r = cases.get("torch", {}).get(mode, {})
            if "tokens_per_s" in r:
                t = r["tokens_per_s_median"]
                spread = f"{t:,.0f} ({min(r['tokens_per_s']):,.0f}-{max(r['tokens_per_s']):,.0f})"
                entries.append(
                    (
                        "Unsloth" if mode == "unsloth" else mode.replace("torch-", "PyTorch+PEFT "),
                        t,
                        spread,
                        r["peak_memory_gb"],
                        r["params"],
                    )
                )
        compiled = next((e for e in entries if e[0] == "PyTorch+PEFT compile"), None)
        mlx_lm = next((e[1] for e in entries if e[0] == "mlx_lm"), None)
        for name, t, spread, peak, n in entries:
            rows.append(
                (
                    shape,
                    name,
                    spread,
                    "-" if report["settings"].get("rows") else f"{tokens / t * 1e3:,.1f}",
                    f"{peak:.2f}",
                    f"{mfu(n, t):.1%}" if report["device"] == "gpu" else "-",
                    f"{t / compiled[1]:.3f}x" if compiled else "-",
                    f"{peak / compiled[3]:.3f}x" if compiled else "-",
                    f"{t / mlx_lm:.3f}x" if mlx_lm else "-",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def merge(paths: list[Path], output: Path) -> None:
    """One report from several runs of this script (the GPU machine takes MLX and PyTorch in
    separate calls): settings from the first, every shape's cases from all."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = reports[0]
    merged["merged_from"] = [
        {
            "date": r["date"],
            "frameworks": r["settings"]["frameworks"],
            "settings": r["settings"],
            "machine": r["machine"],
            "versions": r["versions"],
        }
        for r in reports
    ]
    for other in reports[1:]:
        for shape, cases in other["shapes"].items():
            mine = merged["shapes"].setdefault(shape, {})
            for case, value in cases.items():
                if case == "trainers" and case in mine:  # pool the runs of both reports
                    for name, runs in value["runs"].items():
                        mine[case]["runs"].setdefault(name, []).extend(runs)
                    summarize(mine[case])
                else:
                    mine[case] = value
        merged["versions"].update(other["versions"])
    print(summary_table(merged))
    atomic_write_json(output, merged)
    print(f"\nwrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(DEFAULTS), default="cpu")
    parser.add_argument("--shapes", help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int, help="tokens a row feeds the model (multiple of 32)")
    parser.add_argument(
        "--rows",
        help="lorapipe trainers on a sanitized split's rows (a finished run's "
        "data/sanitized/train.jsonl: mixed lengths, prompts masked) instead of random full rows",
    )
    parser.add_argument(
        "--rows-tokenizer", default="models/base", help="the tokenizer folder for --rows"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--report-every", type=int, help="steps per timed window")
    parser.add_argument("--warmup", type=int, help="windows dropped at the start of each run")
    parser.add_argument("--windows", type=int, help="timed windows per run")
    parser.add_argument("--repeats", type=int, help="runs of each trainer, alternating")
    parser.add_argument("--frameworks", help="mlx,torch")
    parser.add_argument("--cases", help="trainers,ablation,micro (padding: bench/padding.py)")
    parser.add_argument("--ablation-steps", type=int, help="steps per variant per round")
    parser.add_argument("--variants", help="ablation variants, separated by ';'")
    parser.add_argument("--profile-variants", help="profiled variants, separated by ';'")
    parser.add_argument("--profile-steps", type=int, help="profiled steps per variant; 0: off")
    parser.add_argument("--env-sweep", default="", help="env case: settings separated by ';'")
    parser.add_argument("--env-variants", default="after", help="env case: ablation variants")
    parser.add_argument(
        "--torch-modes",
        default="torch-eager,torch-compile",
        help="PyTorch cases: torch-eager, torch-compile, unsloth (needs unsloth installed)",
    )
    parser.add_argument(
        "--torch-python",
        help="the Python with torch, transformers and peft that runs the PyTorch cases (e.g. a "
        "separate venv's; lorapipe comes from src/ on PYTHONPATH); default: this one",
    )
    parser.add_argument(
        "--trainers",
        default="lorapipe,lorapipe_no_clip,mlx_lm,mlx_lm_keep_cache",
        help="trainers case: which (also lorapipe_memory_limit, lorapipe_matched, and "
        "lorapipe_targets: one run per --memory-targets figure)",
    )
    parser.add_argument(
        "--memory-targets",
        type=memory_targets,
        default="135m=3.12,4.42;1.7b=11.69,15.72;tiny=0.05,0.1",
        help="lorapipe_targets: train.memory_limit_gb values per shape, grad_checkpoint auto "
        "(default: Unsloth's and torch.compile's peaks on an H100, ../shared/FACTS.md)",
    )
    parser.add_argument(
        "--checkpoint-blocks", type=int, help="lorapipe_matched: blocks (default CHECKPOINT_BLOCKS)"
    )
    parser.add_argument("--trainer-suffix", default="", help="appended to the trainers' names")
    parser.add_argument("--bundled-steps", type=int, help="CPU: timed bundled-BLAS steps; 0: off")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+", help="combine reports into --output")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.merge:
        merge(args.merge, args.output or RESULTS / f"train-{args.device}.json")
        return
    if args.worker in ("torch-eager", "torch-compile"):
        torch_worker(args)
        return
    if args.worker == "unsloth":
        unsloth_worker(args)
        return
    frameworks = args.frameworks.split(",")
    if "mlx" in frameworks:
        runtime.setup()  # before mlx.core is imported: OpenBLAS on Linux CPU
        lanes.prepare(lanes.count(args.batch))  # before the first eval, as the stage does
    if args.worker == "bundled":
        bundled_worker(args)
        return
    if args.worker == "profile":
        profile_worker(args)
        return
    if args.worker == "ablation":
        ablation_worker(args)
        return
    output = args.output or RESULTS / f"train-{args.device}.json"
    cases = args.cases.split(",")
    settings = {k: getattr(args, k) for k in DEFAULTS[args.device]}
    settings["OPENBLAS_NUM_THREADS"] = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    settings["rows"] = args.rows
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "machine": machine(args.device),
        "versions": versions(),
        "settings": settings,
        "shapes": {},
    }
    if "mlx" in frameworks:
        import mlx.core as mx

        from lorapipe.params import load_params

        lora = load_params(ROOT / "params.yaml").lora
        report["mlx_device"] = str(mx.default_device())
        report["blas"] = str(runtime.blas_info()) if args.device == "cpu" else None
        report["lora"] = dataclasses.asdict(lora)
        train = bench_params(args, 1).train
        keys = ("optimizer", "learning_rate", "weight_decay", "lr_schedule", "warmup_steps")
        report["train"] = {k: getattr(train, k) for k in (*keys, "max_grad_norm")}
    shown = ("date", "machine", "versions", "settings", "mlx_device", "blas", "lora", "train")
    for key in shown:
        if key in report:
            log(f"{key:<11} {report[key]}")
    for shape in args.shapes.split(","):
        log(f"{shape}: {SHAPES[shape]}")
        cases_out: dict[str, Any] = {}
        report["shapes"][shape] = cases_out
        if "mlx" in frameworks:
            if "trainers" in cases:
                cases_out["trainers"] = trainers_case(args, shape)
            if "ablation" in cases:
                log(f"  {shape} ablation (step variants, one after another) ...")
                cases_out["ablation"] = ablation_case(args, shape)
                free_mlx()
            if "env" in cases and args.env_sweep:
                cases_out["env"] = env_case(args, shape)
            if "profile" in cases and args.profile_steps:
                log(f"  {shape} profile (kernels of {args.profile_steps} steps per variant) ...")
                cases_out["profile"] = profile_case(args, shape)
            if "micro" in cases:
                log(f"  {shape} micro ...")
                cases_out["micro"] = micro_case(args, shape)
                free_mlx()
        if "torch" in frameworks:
            cases_out["torch"] = torch_case(args, shape)
        atomic_write_json(output, report)  # keep what is done if a later case dies
    if "mlx" in frameworks and args.device == "cpu" and args.bundled_steps:
        log(f"LORAPIPE_BLAS=bundled: lorapipe, 1 warm-up + {args.bundled_steps} steps ...")
        report["bundled"] = bundled_case(args)
        log(
            f"    {report['bundled']['median_tokens_per_s']:.2f} tokens/s "
            f"({report['bundled']['blas']})"
        )
    atomic_write_json(output, report)
    print(summary_table(report))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
