"""Training memory: how much a step may use, how many blocks recompute so that it fits (trial
steps before step 1, which fail early with what to change), and MLX's allocator limit while
training."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from lorapipe.errors import LorapipeError

if TYPE_CHECKING:
    from lorapipe.trainer import TrainingRun

# Messages of the allocators that run out: Metal, CUDA, and the CPU's C++ runtime.
_OUT_OF_MEMORY = ("out of memory", "insufficient memory", "bad_alloc", "cudamalloc", "outofmemory")
ADVICE = "lower train.batch_size or train.max_seq_length (with sanitize.max_tokens)"


# MLX's allocator limit is soft: past it, MLX waits for queued work to finish before the next
# allocation, then makes that allocation whatever it frees, so the peak passes the limit. The
# allocator is capped this much below train.memory_limit_gb; measured, that keeps the peak under
# it on the CPU, while training at SmolLM2-1.7B's shape on an H200 still passed it by 2-4%.
ALLOCATOR_SHARE = 0.98


def allocator_bytes(gigabytes: float) -> int:
    """MLX's allocator limit for a train.memory_limit_gb of `gigabytes`."""
    return int(gigabytes * 1e9 * ALLOCATOR_SHARE)


class OutOfMemory(LorapipeError):
    """A training step does not fit in the memory there is."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an error raised by MLX is an allocator running out."""
    return isinstance(exc, (RuntimeError, MemoryError)) and any(
        word in str(exc).lower() for word in _OUT_OF_MEMORY
    )


def memory_available() -> tuple[int, str]:
    """Bytes one training step may use, and where that figure comes from."""
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        info = mx.device_info()
        for key in ("free_memory", "max_recommended_working_set_size", "memory_size"):
            if isinstance(info.get(key), int) and info[key] > 0:
                return int(info[key]), f"the GPU's {key.replace('_', ' ')}"
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        kib = int(next(ln.split()[1] for ln in lines if ln.startswith("MemAvailable")))
        return kib * 1024, "free RAM"
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"


class Fit(NamedTuple):
    """How a step is made to fit: the blocks that recompute, and what a step then needs."""

    blocks: int  # blocks whose activations are recomputed in the backward pass
    need: int  # bytes: the peak of trial steps, the optimizer's state included
    limit: int  # bytes it must stay under
    source: str  # where the limit comes from


# Training queues a step before it waits for the one before: three steps queued that way reach
# the pattern training then repeats (two in flight), from a start with no optimizer state.
TRIAL_STEPS = 3


def fit_memory(run: TrainingRun) -> Fit:
    """Choose how many blocks recompute their activations (train.grad_checkpoint: auto: the
    fewest that fit; a number: that many) and fail before step 1, with what to change, if a
    step on the longest batch does not fit in train.memory_limit_gb (null: the GPU's memory or
    the free RAM). Leaves that many blocks checkpointed on the run's model, compiled afresh so
    that training traces its own step.

    Each trial is training's own first steps on the batch with the most tokens, update and
    optimizer state included, then undone (`trial_peak`): whatever the optimizer, the
    fine-tuning type and the accumulation, the trial allocates what training allocates. auto
    tries no blocks, then all, then searches between."""
    from lorapipe.fast import checkpoint_blocks

    model, batches, train, world = run.model, run.train_batches, run.train, run.world
    ranks = world.size()
    if train.memory_limit_gb is not None:
        limit, source = int(train.memory_limit_gb * 1e9), "train.memory_limit_gb"
    else:
        limit, source = memory_available()
        if ranks > 1:  # one limit, so one decision, for all
            import mlx.core as mx

            limit = int(mx.distributed.all_min(mx.array(float(limit)), group=world).item())
    # (this process's share of) the batch with the most tokens
    largest = max(range(len(batches)), key=lambda i: batches.tokens[i].size)
    shape = "x".join(map(str, batches.tokens[largest].shape))
    total = len(model.layers)
    raise_limit = ", or raise it if the machine has more" if train.memory_limit_gb else ""

    def too_much(needed: int | None, blocks: int, advice: str) -> OutOfMemory:
        recompute = "" if blocks == 0 else f" with {blocks} of {total} blocks recomputing"
        what = "does not fit" if needed is None else f"needs about {needed / 1e9:.2f} GB"
        return OutOfMemory(
            f"train: a step on the longest batch ({shape} tokens){recompute} {what}, more than "
            f"the {limit / 1e9:.2f} GB of {source}; {advice}{raise_limit}"
        )

    def need(blocks: int) -> int | None:
        """A step's bytes with `blocks` blocks recomputing, the most any process needs (so
        that every process takes the same decisions); None: an allocator ran out."""
        checkpoint_blocks(model, blocks)
        run.recompile()
        peak = trial_peak(run, largest, train.memory_limit_gb)
        if ranks > 1:
            import mlx.core as mx

            if peak is None:
                # The others wait in this step's collective for this process, which cannot
                # reach it: end here (mlx.launch then stops them), saying what to set.
                more = "set train.grad_checkpoint to more blocks, or "
                raise too_much(None, blocks, more + ADVICE)
            peak = int(mx.distributed.all_max(mx.array(float(peak)), group=world).item())
        return peak

    if train.grad_checkpoint != "auto":
        blocks = total if train.grad_checkpoint == -1 else min(train.grad_checkpoint, total)
        needed = need(blocks)
        if needed is None or needed > limit:
            more = "" if blocks == total else "set train.grad_checkpoint: auto, or "
            raise too_much(needed, blocks, more + ADVICE)
        return Fit(blocks, needed, limit, source)

    plain = need(0)
    if plain is not None and plain <= limit:
        return Fit(0, plain, limit, source)
    every = need(total)
    if every is None or every > limit:
        raise too_much(every, total, ADVICE)
    # The fewest blocks that fit lie in (fails, fits]. Peak memory falls about linearly with
    # the blocks that recompute: try where the line through the two trials crosses the limit,
    # then its neighbour, and bisect only if the line was off by more than a block.
    fails, fits, fitting = 0, total, every
    if plain is not None and plain > every:
        guess = math.ceil((plain - limit) * total / (plain - every))
    else:
        guess = total // 2
    for attempt in range(total):
        if fits - fails <= 1:
            break
        blocks = min(max(guess, fails + 1), fits - 1)
        needed = need(blocks)
        if needed is not None and needed <= limit:
            fits, fitting = blocks, needed
        else:
            fails = blocks
        if attempt == 0:  # the line's neighbour on the other side
            guess = blocks - 1 if fits == blocks else blocks + 1
        else:
            guess = (fails + fits) // 2
    checkpoint_blocks(model, fits)
    run.recompile()
    return Fit(fits, fitting, limit, source)


def trial_peak(run: TrainingRun, batch: int, gigabytes: float | None) -> int | None:
    """Peak bytes of TRIAL_STEPS of training's own steps on `batch`, queued as training queues
    them, under the allocator limit training runs with (`memory_limit(gigabytes)`), then
    undone (`TrainingRun.rewound`); None where the allocator ran out. The peak counts the
    optimizer's state and the update's temporaries, and the arrays kept to undo the steps
    (one more copy of the trainable arrays and their state than training holds: a little
    more than it needs, never less)."""
    import mlx.core as mx

    try:
        with run.rewound(), run.on_lanes(), memory_limit(gigabytes):
            mx.reset_peak_memory()
            queued = run.launch(0, None, batch)
            for number in range(1, TRIAL_STEPS):
                following = run.launch(number, queued.accumulated, batch)
                queued.loss.item()  # training waits for a step before it queues the next
                queued = following
            mx.eval(run.compiled_state, queued.loss)
            return int(mx.get_peak_memory())
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        return None
    finally:
        mx.reset_peak_memory()
        mx.clear_cache()


@contextmanager
def memory_limit(gigabytes: float | None) -> Iterator[None]:
    """MLX's allocator limit at `gigabytes` (less its headroom) while inside (None: leave MLX's
    default), then restored.
    The host queues work ahead of the device, and every buffer a queued kernel reads stays
    allocated until that kernel has run; above the limit MLX waits for queued work to finish
    before it allocates more, so the limit also bounds how far the queue runs ahead."""
    import mlx.core as mx

    if gigabytes is None:
        yield
        return
    previous = mx.set_memory_limit(allocator_bytes(gigabytes))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)
