"""`train` stage: LoRA / DoRA / full fine-tuning on mlx-lm's model pieces, resumable.

Set up (the base model with adapters, the sanitized splits as batches, the optimizer, or all of
these from the last checkpoint), train (`lorapipe.trainer`), save (the best or last adapter as a
plain mlx-lm adapter folder, and the run's metrics).

Checkpoints (`paths.checkpoints`, `persist: true` in dvc.yaml) hold everything needed to go on,
plus a fingerprint of the params, data and base model that shaped them: `dvc repro` after a kill
or Ctrl-C continues from the last one; after a change that invalidates them it starts afresh and
says why.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from lorapipe import lanes
from lorapipe.batches import Example, load_split, make_batches
from lorapipe.checkpoints import (
    BEST_ADAPTER,
    LoopState,
    clear_checkpoints,
    fingerprint,
    load_checkpoint,
    restore,
)
from lorapipe.io import atomic_dir, atomic_write_json
from lorapipe.memory import OutOfMemory, fit_memory, is_out_of_memory
from lorapipe.params import Params, TrainParams
from lorapipe.trainer import (
    TrainError,
    TrainingRun,
    adapter_config,
    attach_adapters,
    make_optimizer,
    train_loop,
)

PARAMS = ("seed", "lora", "train")


def check_splits(splits: dict[str, list[Example]], train: TrainParams) -> None:
    """Fail before loading anything else if a split cannot fill a batch or holds a row longer
    than train.max_seq_length (never cut silently)."""
    for name, examples in splits.items():
        if len(examples) < train.batch_size:
            raise TrainError(
                f"train: the {name} split has {len(examples)} rows, fewer than "
                f"train.batch_size {train.batch_size}; lower the batch size or add data"
            )
        longest = max(len(e.tokens) for e in examples)
        if longest > train.max_seq_length:
            raise TrainError(
                f"train.max_seq_length: {train.max_seq_length} is shorter than the longest {name} "
                f"row ({longest} tokens); raise it to {longest}, or lower sanitize.max_tokens"
            )


def summarize(
    state: LoopState, train: TrainParams, padding: float, recomputed_blocks: int
) -> dict[str, Any]:
    """metrics/train.json: what the run learned and what it cost."""
    import mlx.core as mx

    val_losses = [r["val_loss"] for r in state.history if "val_loss" in r]
    peaks = [r["peak_memory_gb"] for r in state.history if "peak_memory_gb" in r]
    return {
        "steps": state.step,
        "final_val_loss": val_losses[-1],
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "kept": train.keep,
        "stopped_early": state.stopped_early,
        "trained_tokens": state.trained_tokens,
        "train_seconds": round(state.train_seconds, 1),
        "seen_tokens": state.seen_tokens,
        "tokens_per_second": round(state.seen_tokens / max(state.train_seconds, 1e-9), 1),
        # The highest peak any report saw, across resumed runs (this process may have resumed
        # at the end and trained nothing).
        "peak_memory_gb": round(max([*peaks, mx.get_peak_memory() / 1e9]), 3),
        "padding_fraction": round(padding, 4),
        "recomputed_blocks": recomputed_blocks,  # train.grad_checkpoint's choice
    }


def main(params: Params) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from lorapipe.fast import check_mlx_lm, fast_training
    from lorapipe.provenance import run_record
    from lorapipe.tracking import Recorder, Tracker

    check_mlx_lm()
    paths, train = params.paths, params.train
    base, split_dir = Path(paths.base), Path(paths.sanitized)
    if not (base / "config.json").is_file():
        raise TrainError(f"{base}: not found; run `dvc repro base` (it makes {base})")
    # Data parallel (lorapipe.launch): every process trains on its share of each batch; only
    # rank 0 writes. A group of one when started as one process.
    world = mx.distributed.init()
    rank, ranks = world.rank(), world.size()
    if train.batch_size % ranks:
        raise TrainError(
            f"train.batch_size: {train.batch_size} rows cannot be shared by {ranks} processes; "
            f"use a multiple of {ranks} (the batch is global: each process takes its share)"
        )
    lane_count = lanes.count(train.batch_size // ranks)
    lanes.prepare(lane_count)  # before the first eval: MLX reads the setting once
    mx.random.seed(params.seed)
    model, tokenizer = load(str(base))[:2]
    num_layers = attach_adapters(model, params.lora)
    splits = {
        name: load_split(split_dir / f"{name}.jsonl", tokenizer, train.mask_prompt)
        for name in ("train", "valid")
    }
    check_splits(splits, train)
    train_batches = make_batches(splits["train"], train.batch_size, rank=rank, ranks=ranks)
    valid_batches = make_batches(splits["valid"], train.batch_size, rank=rank, ranks=ranks)
    total_steps = train.iters or math.ceil((train.epochs or 1) * len(train_batches))

    checkpoints = Path(paths.checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    weights = [*sorted(base.glob("*.safetensors")), base / "config.json"]
    data = [split_dir / "train.jsonl", split_dir / "valid.jsonl"]
    fp = fingerprint(params.seed, params.lora, train, [*data, *weights])
    optimizer = make_optimizer(train, total_steps)
    resume_from, decision = load_checkpoint(checkpoints, fp)
    if resume_from is None:
        if rank == 0:
            clear_checkpoints(checkpoints)
        state = LoopState()
    else:
        state = restore(resume_from, model, optimizer)

    trainable = sum(int(v.size) for _, v in tree_flatten(model.trainable_parameters()))
    tracker = (
        Tracker(Path(paths.train_log), checkpoints / "train.log", total_steps)
        if rank == 0
        else Recorder()  # the others report nothing: rank 0 speaks for the run
    )
    tracker.say(decision if ranks == 1 else f"{decision}; {ranks} processes")
    tracker.say(
        f"{params.lora.fine_tune_type}: {trainable / 1e6:.2f}M trainable parameters in "
        f"{num_layers} blocks; {len(splits['train'])} train / {len(splits['valid'])} valid rows; "
        f"{total_steps} steps of {train.batch_size}; padding {train_batches.padding_fraction:.1%}"
    )
    tracker.replay(state.history)
    if lane_count > 1:
        tracker.say(f"cpu: each step's rows on {lane_count} lanes ({lanes.origin()})")
    if train.grad_checkpoint != "auto" and train.grad_checkpoint > len(model.layers):
        raise TrainError(
            f"train.grad_checkpoint: {train.grad_checkpoint} but the model has "
            f"{len(model.layers)} blocks"
        )
    run = TrainingRun(
        model,
        optimizer,
        train_batches,
        valid_batches,
        train,
        params.seed,
        total_steps,
        state,
        checkpoints,
        fp,
        tracker,
        world,
        lane_count,
    )
    try:
        with fast_training(model):  # measure the step training will run
            fit = fit_memory(run)
        tracker.say(
            f"memory: {fit.blocks} of {len(model.layers)} blocks recompute their activations "
            f"(train.grad_checkpoint: {train.grad_checkpoint}); a step on the longest batch "
            f"needs about {fit.need / 1e9:.2f} GB of the {fit.limit / 1e9:.2f} GB of {fit.source}"
        )
        state = train_loop(run)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise OutOfMemory(
            f"train: out of memory after step {state.step}: {exc}; set train.memory_limit_gb "
            "below what the machine has (train.grad_checkpoint: auto then fits the step in it), "
            "or lower train.batch_size or train.max_seq_length; run `dvc repro train` to "
            f"resume from the last checkpoint in {checkpoints}"
        ) from exc
    finally:
        tracker.close()

    if rank != 0:
        return
    best = checkpoints / BEST_ADAPTER
    with atomic_dir(Path(paths.adapters)) as out:
        if train.keep == "best" and best.is_file():
            shutil.copy(best, out / "adapters.safetensors")
        else:
            mx.save_safetensors(
                str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
            )
        atomic_write_json(out / "adapter_config.json", adapter_config(params.lora, num_layers))
    summary = summarize(state, train, train_batches.padding_fraction, fit.blocks)
    atomic_write_json(Path(paths.metrics) / "train.json", summary)
    atomic_write_json(Path(paths.reports) / "run.json", run_record())
    print(
        f"train: {state.step} steps, best val loss {state.best_val_loss:.4f} at step "
        f"{state.best_step} -> {paths.adapters}/ ({train.keep})"
    )
