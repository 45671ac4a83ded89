"""Training memory: how much a step may use, how many blocks recompute so that it fits (trial
steps before step 1, which fail early with what to change), and MLX's allocator limit while
training."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from lorapipe.batches import Batches
from lorapipe.errors import LorapipeError
from lorapipe.params import TrainParams

# Messages of the allocators that run out: Metal, CUDA, and the CPU's C++ runtime.
_OUT_OF_MEMORY = ("out of memory", "insufficient memory", "bad_alloc", "cudamalloc", "outofmemory")
ADVICE = "lower train.batch_size or train.max_seq_length (with sanitize.max_tokens)"


# MLX's allocator limit is soft: past it, MLX waits for queued work to finish before the next
# allocation, then makes that allocation whatever it frees, so the peak passes the limit. The
# allocator is capped this much below train.memory_limit_gb; measured, that keeps the peak under
# it on the CPU, while training at SmolLM2-1.7B's shape on an H200 still passed it by 2-3%.
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
    need: int  # bytes: a trial step's peak plus the optimizer's state
    limit: int  # bytes it must stay under
    source: str  # where the limit comes from


def fit_memory(
    model: Any,
    batches: Batches,
    train: TrainParams,
    trainable: int,
    compile_step: Callable[[], Any],
    world: Any = None,
) -> Fit:
    """Choose how many blocks recompute their activations (train.grad_checkpoint: auto: the
    fewest that fit; a number: that many) and fail before step 1, with what to change, if a
    step on the longest batch does not fit in train.memory_limit_gb (null: the GPU's memory or
    the free RAM). Leaves that many blocks checkpointed on `model`, and calls `compile_step()`
    (which compiles the training step afresh for the blocks `model` has now) last, so that
    training traces its own step.

    Each trial is two training steps on the batch with the most tokens (without the update),
    queued as training queues them, under the allocator limit training runs with: on a GPU the
    host queues work ahead, and a buffer is freed only when the work that reads it has run, so
    without a limit a step's peak is nearly everything it allocates, whatever recomputes. auto
    tries no blocks, then all, then searches between."""
    from lorapipe.fast import checkpoint_blocks

    if train.memory_limit_gb is not None:
        limit, source = int(train.memory_limit_gb * 1e9), "train.memory_limit_gb"
    else:
        limit, source = memory_available()
        if world is not None and world.size() > 1:  # one limit, so one decision, for all
            import mlx.core as mx

            limit = int(mx.distributed.all_min(mx.array(float(limit)), group=world).item())
    optimizer_state = 2 * 4 * trainable  # Adam's two fp32 moments per trainable parameter
    # Training caps MLX's allocator at the limit, with the optimizer's state in it; the trial,
    # which has no optimizer state yet, runs under what is left.
    if train.memory_limit_gb is None:
        allocator = None
    else:
        allocator = max(allocator_bytes(train.memory_limit_gb) - optimizer_state, 1)
    # (this process's share of) the batch with the most tokens
    largest = max(range(len(batches)), key=lambda i: batches.tokens[i].size)
    arrays = batches.arrays(largest)
    shape = "x".join(map(str, batches.tokens[largest].shape))
    total = len(model.layers)
    raise_limit = ", or raise it if the machine has more" if allocator is not None else ""

    def need(blocks: int) -> int | None:
        """A step's bytes with `blocks` blocks recomputing, the most any process needs (so
        that every process takes the same decisions); None: an allocator ran out."""
        checkpoint_blocks(model, blocks)
        peak = trial_peak(compile_step(), arrays, allocator)
        if world is not None and world.size() > 1:
            import mlx.core as mx

            ran_out = mx.array(float("inf") if peak is None else float(peak))
            most = float(mx.distributed.all_max(ran_out, group=world).item())
            peak = None if most == float("inf") else int(most)
        return None if peak is None else peak + optimizer_state

    def too_much(needed: int | None, blocks: int, advice: str) -> OutOfMemory:
        recompute = "" if blocks == 0 else f" with {blocks} of {total} blocks recomputing"
        what = "does not fit" if needed is None else f"needs about {needed / 1e9:.2f} GB"
        return OutOfMemory(
            f"train: a step on the longest batch ({shape} tokens){recompute} {what}, more than "
            f"the {limit / 1e9:.2f} GB of {source}; {advice}{raise_limit}"
        )

    if train.grad_checkpoint != "auto":
        blocks = total if train.grad_checkpoint == -1 else min(train.grad_checkpoint, total)
        needed = need(blocks)
        if needed is None or needed > limit:
            more = "" if blocks == total else "set train.grad_checkpoint: auto, or "
            raise too_much(needed, blocks, more + ADVICE)
        compile_step()
        return Fit(blocks, needed, limit, source)

    plain = need(0)
    if plain is not None and plain <= limit:
        compile_step()
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
    compile_step()
    return Fit(fits, fitting, limit, source)


def trial_peak(step: Any, arrays: tuple[Any, ...], allocator_limit: int | None) -> int | None:
    """Peak bytes of training's compiled `step` on `arrays` without the update, queued twice
    back to back as training queues its steps, under MLX's allocator limit `allocator_limit`
    (None: MLX's default); None where the allocator ran out. Training's own step, not a bare
    forward and backward pass: compiled with the optimizer's state, it peaks higher."""
    import mlx.core as mx

    previous = mx.set_memory_limit(allocator_limit) if allocator_limit is not None else None
    try:
        mx.reset_peak_memory()
        first = step(*arrays, None, False)  # compiles first
        mx.async_eval(first)
        second = step(*arrays, None, False)
        mx.eval(first, second)
        del first, second
        return int(mx.get_peak_memory())
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        return None
    finally:
        if previous is not None:
            mx.set_memory_limit(previous)
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
